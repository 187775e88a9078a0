"""PyTorch's function transforms applied to training itself.

* **Meta-gradients.** The pure step (``inplace=False``) is differentiable: a validation
  loss after a few unrolled steps has gradients with respect to the learning rate, the
  weight decay (given as tensors) and the initial params, by ``torch.autograd.grad``
  and by ``torch.func.grad``. Each is checked against central finite differences in
  float64 (an independent oracle: nothing but forward evaluations).
* **Ensembles.** ``torch.func.vmap`` of a whole train step (``functional_call``,
  ``torch.func.grad``, an optorch step) over stacked models, each with its own learning
  rate as a batched tensor, equals separate eager runs, params and state, for 20 steps.
* **Transform matrix.** Every (transform, in place or pure, impl) combination either
  matches an oracle computed without the transform, or raises a short ``RuntimeError``
  from optorch itself (never a deep autograd trace).
* **Compile.** A whole train step (forward, backward, optimizer step, schedule, loss
  scaler) under ``torch.compile(fullgraph=True)``: no graph break, no recompilation
  over 30 steps while the schedule moves, the eager trajectory reproduced; and every
  registered optimizer's step compiled whole by the user, equal to eager.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from conftest import assert_trees_close, generator
from optree import tree_leaves as optree_leaves
from torch.func import (
    functional_call,
    grad,
    grad_and_value,
    jacrev,
    jvp,
    stack_module_state,
    vjp,
    vmap,
)

import optorch
import optorch.builder
from optorch.schedule import cosine_annealing

F64 = torch.float64
F32 = torch.float32


# --------------------------------------------------------------------------------------
# a tiny model, written as a function of a params dict
# --------------------------------------------------------------------------------------

#: A 3-4-1 tanh MLP with an output gain: 22 scalars in matrices, vectors, a 1-element
#: bias and a 0-d tensor (foreach kernels treat 0-d tensors specially).
MLP_SHAPES: dict[str, tuple[int, ...]] = {
    "w1": (4, 3),
    "b1": (4,),
    "w2": (1, 4),
    "b2": (1,),
    "gain": (),
}


def mlp_params(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = generator(seed)
    params = {
        name: (0.7 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype)
        for name, shape in MLP_SHAPES.items()
    }
    params["gain"] = (params["gain"] * 0.1 + 1.0).to(dtype)
    return params


def mlp(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    hidden = torch.tanh(x @ params["w1"].T + params["b1"])
    return (hidden @ params["w2"].T + params["b2"]) * params["gain"]


def mse(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((mlp(params, x) - y) ** 2).mean()


def regression_batches(
    seed: int, count: int, size: int, dtype: torch.dtype
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` batches of a smooth 3 -> 1 target plus noise."""
    gen = generator(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(size, 3, generator=gen, dtype=F64)
        y = torch.sin(x.sum(dim=1, keepdim=True)) + 0.1 * torch.randn(size, 1, generator=gen)
        batches.append((x.to(dtype), y.to(dtype)))
    return batches


# --------------------------------------------------------------------------------------
# meta-gradients: d(validation loss after K steps) / d(lr, weight decay, initial params)
# --------------------------------------------------------------------------------------

INNER_STEPS = 5
TRAIN_BATCHES = regression_batches(seed=1, count=INNER_STEPS, size=8, dtype=F64)
VALIDATION_BATCH = regression_batches(seed=2, count=1, size=16, dtype=F64)[0]
INIT_PARAMS = mlp_params(seed=3, dtype=F64)

#: (id, registry name, fixed hyperparameters, lr, weight decay). The learning rate and
#: the weight decay are the differentiated hyperparameters; adamw also runs a schedule,
#: so that lr = max_lr * multiplier carries the tensor through ``scalars()``.
META_CASES: list[tuple[str, str, dict[str, Any], float, float]] = [
    ("sgd-momentum", "sgd", {"momentum": 0.9}, 0.1, 0.01),
    ("adam-l2", "adam", {}, 0.05, 0.01),
    ("adamw-cosine", "adamw", {"schedule": cosine_annealing(T_max=8, eta_min=0.1)}, 0.05, 0.1),
    # z_0 is the initial params (its init must stay connected to them), and with warmup
    # the rule-wide weight_sum/lr_max carry the lr from step to step
    ("schedule-free-warmup", "schedule_free_adamw", {"warmup_steps": 2}, 0.05, 0.01),
]
META_IDS = [case[0] for case in META_CASES]

#: (differentiation mode, impl): how the inner grads and the hypergradient are taken.
#: Under ``torch.func`` the engine runs the reference loop whatever impl is asked.
META_MODES = [("autograd", "reference"), ("autograd", "auto"), ("func", "auto")]


def unrolled_validation_loss(
    name: str,
    hyper: dict[str, Any],
    lr: Any,
    weight_decay: Any,
    params0: dict[str, torch.Tensor],
    *,
    mode: str,
    impl: str,
) -> torch.Tensor:
    """The validation loss after ``INNER_STEPS`` pure steps from ``params0``."""
    opt = optorch.get_optimizer(
        name, max_lr=lr, weight_decay=weight_decay, inplace=False, impl=impl, **hyper
    )
    params, state = params0, opt.init(params0)
    for x, y in TRAIN_BATCHES:
        if mode == "autograd":
            leaves = list(params.values())
            inner = torch.autograd.grad(mse(params, x, y), leaves, create_graph=True)
            grads = dict(zip(params, inner, strict=True))
        else:
            grads = grad(mse)(params, x, y)
        params, state = opt.step(params, grads, state)
    return mse(params, *VALIDATION_BATCH)


def hypergradients(
    name: str, hyper: dict[str, Any], lr: float, weight_decay: float, *, mode: str, impl: str
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(d/d lr, d/d weight_decay, d/d params0) of the unrolled validation loss."""
    lr_t = torch.tensor(lr, dtype=F64)
    wd_t = torch.tensor(weight_decay, dtype=F64)
    params0 = {k: v.clone() for k, v in INIT_PARAMS.items()}
    if mode == "autograd":
        inputs = [lr_t.requires_grad_(), wd_t.requires_grad_()]
        inputs += [p.requires_grad_() for p in params0.values()]
        loss = unrolled_validation_loss(name, hyper, lr_t, wd_t, params0, mode=mode, impl=impl)
        d_lr, d_wd, *d_params = torch.autograd.grad(loss, inputs)
        return d_lr, d_wd, dict(zip(params0, d_params, strict=True))

    def loss_of(lr_: torch.Tensor, wd_: torch.Tensor, p0: dict[str, torch.Tensor]) -> Any:
        return unrolled_validation_loss(name, hyper, lr_, wd_, p0, mode=mode, impl=impl)

    d_lr, d_wd, d_params = grad(loss_of, argnums=(0, 1, 2))(lr_t, wd_t, params0)
    return d_lr, d_wd, d_params


FD_EPS = 1e-6


@functools.cache
def finite_differences(case_id: str) -> tuple[float, float, dict[str, torch.Tensor]]:
    """Central differences of the unrolled loss (plain floats in, eager steps)."""
    _, name, hyper, lr, weight_decay = next(c for c in META_CASES if c[0] == case_id)

    def value(lr_: float, wd_: float, p0: dict[str, torch.Tensor]) -> float:
        loss = unrolled_validation_loss(name, hyper, lr_, wd_, p0, mode="func", impl="reference")
        return float(loss)

    d_lr = (
        value(lr + FD_EPS, weight_decay, INIT_PARAMS)
        - value(lr - FD_EPS, weight_decay, INIT_PARAMS)
    ) / (2 * FD_EPS)
    d_wd = (
        value(lr, weight_decay + FD_EPS, INIT_PARAMS)
        - value(lr, weight_decay - FD_EPS, INIT_PARAMS)
    ) / (2 * FD_EPS)
    d_params: dict[str, torch.Tensor] = {}
    for key, tensor in INIT_PARAMS.items():
        flat = torch.zeros(tensor.numel(), dtype=F64)
        for index in range(tensor.numel()):
            shifted = []
            for sign in (1.0, -1.0):
                moved = {k: v.clone() for k, v in INIT_PARAMS.items()}
                moved[key].view(-1)[index] += sign * FD_EPS
                shifted.append(value(lr, weight_decay, moved))
            flat[index] = (shifted[0] - shifted[1]) / (2 * FD_EPS)
        d_params[key] = flat.view(tensor.shape)
    return d_lr, d_wd, d_params


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize(("mode", "impl"), META_MODES, ids=[f"{m}-{i}" for m, i in META_MODES])
@pytest.mark.parametrize(
    ("case_id", "name", "hyper", "lr", "weight_decay"), META_CASES, ids=META_IDS
)
def test_hypergradients_match_finite_differences(
    case_id: str,
    name: str,
    hyper: dict[str, Any],
    lr: float,
    weight_decay: float,
    mode: str,
    impl: str,
) -> None:
    d_lr, d_wd, d_params = hypergradients(name, hyper, lr, weight_decay, mode=mode, impl=impl)
    fd_lr, fd_wd, fd_params = finite_differences(case_id)
    assert d_lr.dtype == F64 and d_lr.shape == ()
    # central differences in float64 with eps 1e-6: truncation and rounding both << 1e-6
    assert abs(float(d_lr) - fd_lr) <= 1e-6 * abs(fd_lr), (float(d_lr), fd_lr)
    assert abs(float(d_wd) - fd_wd) <= 1e-6 * abs(fd_wd), (float(d_wd), fd_wd)
    flat = torch.cat([d_params[k].reshape(-1) for k in MLP_SHAPES])
    fd_flat = torch.cat([fd_params[k].reshape(-1) for k in MLP_SHAPES])
    assert relative_error(flat, fd_flat) < 1e-6, (flat, fd_flat)
    assert_trees_close(d_params, fd_params, rtol=1e-5, atol=1e-9, what="d loss / d params0")


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize(
    ("case_id", "name", "hyper", "lr", "weight_decay"), META_CASES, ids=META_IDS
)
def test_autograd_through_steps_with_float_hyperparameters(
    case_id: str, name: str, hyper: dict[str, Any], lr: float, weight_decay: float, impl: str
) -> None:
    """Hyperparameters as Python floats, only the initial params differentiated: the
    plain ``loss.backward()``-style use of the pure step, through each eager engine."""
    params0 = {k: v.clone().requires_grad_() for k, v in INIT_PARAMS.items()}
    loss = unrolled_validation_loss(
        name, hyper, lr, weight_decay, params0, mode="autograd", impl=impl
    )
    d_params = dict(zip(params0, torch.autograd.grad(loss, list(params0.values())), strict=True))
    _, _, fd_params = finite_differences(case_id)
    assert_trees_close(d_params, fd_params, rtol=1e-5, atol=1e-9, what="d loss / d params0")


def test_hypergradient_of_a_learning_rate_sweep_is_a_batched_gradient() -> None:
    """``vmap(grad(...))`` over 3 learning rates equals 3 separate hypergradients."""
    name, hyper = "sgd", {"momentum": 0.9}
    lrs = torch.tensor([0.02, 0.05, 0.1], dtype=F64)

    def loss_of(lr: torch.Tensor) -> torch.Tensor:
        return unrolled_validation_loss(
            name, hyper, lr, 0.0, INIT_PARAMS, mode="func", impl="reference"
        )

    batched = vmap(grad(loss_of))(lrs)
    separate = torch.stack([grad(loss_of)(lr) for lr in lrs])
    torch.testing.assert_close(batched, separate, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------
# tensor hyperparameters: validation
# --------------------------------------------------------------------------------------

BAD_TENSOR_HYPER: list[tuple[str, Any, type[Exception], str]] = [
    ("negative", torch.tensor(-0.1), ValueError, r"max_lr.*-0\.1"),
    ("nan", torch.tensor(float("nan")), ValueError, r"max_lr.*nan"),
    ("inf", torch.tensor(float("inf")), ValueError, r"max_lr.*inf"),
    ("one-element-vector", torch.tensor([0.1]), ValueError, r"max_lr.*0-d"),
    ("vector", torch.tensor([0.1, 0.2]), ValueError, r"max_lr.*0-d"),
]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [case[1:] for case in BAD_TENSOR_HYPER],
    ids=[case[0] for case in BAD_TENSOR_HYPER],
)
def test_bad_tensor_hyperparameter_is_rejected_naming_it(
    value: torch.Tensor, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        optorch.get_optimizer("adamw", max_lr=value, inplace=False)


def test_tensor_hyperparameter_is_checked_under_grad_and_skipped_under_vmap() -> None:
    """A traced value is checked where it can be read (grad) and passes where it cannot
    (vmap: a batched value has no single number to check)."""
    params = {"w": torch.ones(3)}

    def updated(lr: torch.Tensor) -> torch.Tensor:
        opt = optorch.get_optimizer("sgd", max_lr=lr, momentum=0.0, inplace=False)
        return opt.step(params, {"w": torch.ones(3)}, opt.init(params))[0]["w"]

    with pytest.raises(ValueError, match="max_lr"):
        grad(lambda lr: updated(lr).sum())(torch.tensor(-0.5))
    out = vmap(updated)(torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(out, torch.tensor([[0.5] * 3, [0.75] * 3]), rtol=0, atol=0)


# --------------------------------------------------------------------------------------
# ensembles: vmap of a whole train step over stacked models and batched learning rates
# --------------------------------------------------------------------------------------

ENSEMBLE_SIZE = 8
ENSEMBLE_STEPS = 20

#: (registry name, fixed hyperparameters, the 8 learning rates).
ENSEMBLE_CASES: list[tuple[str, dict[str, Any], list[float]]] = [
    ("adamw", {"weight_decay": 0.1}, [0.001 * 2**k for k in range(ENSEMBLE_SIZE)]),
    (
        "sgd",
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        [0.01 * 1.5**k for k in range(8)],
    ),
    ("lion", {"weight_decay": 0.5}, [1e-4 * 2**k for k in range(ENSEMBLE_SIZE)]),
]


def stacked_modules(dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """8 differently initialised 3-4-1 MLPs, stacked, and a weightless copy to call."""
    torch.manual_seed(11)
    models = [
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(dtype)
        for _ in range(ENSEMBLE_SIZE)
    ]
    stacked, _ = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    return skeleton, {k: v.detach() for k, v in stacked.items()}


def module_loss(
    skeleton: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    return ((functional_call(skeleton, params, (x,)) - y) ** 2).mean()


def ensemble_train_step(
    skeleton: torch.nn.Module, name: str, hyper: dict[str, Any], how: str
) -> Callable[..., Any]:
    """One model's train step; the learning rate arrives as a (vmapped) 0-d tensor."""

    def step(params: Any, state: Any, lr: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> Any:
        grads = grad(functools.partial(module_loss, skeleton))(params, x, y)
        if how == "config":
            opt = optorch.get_optimizer(name, max_lr=lr, inplace=False, **hyper)
            return opt.step(params, grads, state)
        opt = optorch.get_optimizer(name, inplace=False, **hyper)
        return opt.step(params, grads, state, hyper_overrides={"max_lr": lr})

    return step


@pytest.mark.parametrize("how", ["config", "hyper_overrides"])
@pytest.mark.parametrize(
    ("name", "hyper", "lrs"), ENSEMBLE_CASES, ids=[c[0] for c in ENSEMBLE_CASES]
)
def test_vmapped_ensemble_equals_separate_runs(
    name: str, hyper: dict[str, Any], lrs: list[float], how: str
) -> None:
    skeleton, stacked = stacked_modules(F64)
    batches = regression_batches(seed=5, count=ENSEMBLE_STEPS, size=8, dtype=F64)
    lr_tensor = torch.tensor(lrs, dtype=F64)
    opt = optorch.get_optimizer(name, inplace=False, **hyper)
    step = vmap(ensemble_train_step(skeleton, name, hyper, how), in_dims=(0, 0, 0, None, None))
    params, state = stacked, vmap(opt.init)(stacked)
    for x, y in batches:
        params, state = step(params, state, lr_tensor, x, y)

    assert state["step"].dtype == torch.int64
    assert state["step"].tolist() == [ENSEMBLE_STEPS] * ENSEMBLE_SIZE
    fields = [k for k in state if k != "step"]
    assert fields, f"{name} keeps no per-param state to compare"
    for index, lr in enumerate(lrs):
        # the oracle: a plain eager in-place run of one model with a Python float lr
        alone = optorch.get_optimizer(name, max_lr=lr, **hyper)
        own = {k: v[index].clone() for k, v in stacked.items()}
        own_state = alone.init(own)
        for x, y in batches:
            grads = grad(functools.partial(module_loss, skeleton))(own, x, y)
            own, own_state = alone.step(own, grads, own_state)
        what = f"{name} model {index} (lr {lr:g})"
        mine = {k: v[index] for k, v in params.items()}
        assert_trees_close(mine, own, rtol=1e-10, atol=1e-13, what=f"{what} params")
        for field in fields:
            mine_field = {k: v[index] for k, v in state[field].items()}
            assert_trees_close(
                mine_field, own_state[field], rtol=1e-10, atol=1e-13, what=f"{what} {field}"
            )


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_vmap_over_learning_rates_from_one_shared_init(impl: str) -> None:
    """A learning-rate sweep from the same initial params: only the lr is batched, so on
    the first step params, grads and state are plain tensors and only the lr is traced
    by vmap (the engine must notice it there too)."""
    lrs = torch.tensor([0.01, 0.05, 0.2], dtype=F64)

    def train(lr: torch.Tensor) -> dict[str, torch.Tensor]:
        opt = optorch.get_optimizer("adamw", max_lr=lr, weight_decay=0.1, inplace=False, impl=impl)
        params, state = INIT_PARAMS, opt.init(INIT_PARAMS)
        for x, y in TRAIN_BATCHES:
            params, state = opt.step(params, grad(mse)(params, x, y), state)
        return params

    swept = vmap(train)(lrs)
    for index, lr in enumerate(lrs.tolist()):
        opt = optorch.get_optimizer("adamw", max_lr=lr, weight_decay=0.1)
        params = {k: v.clone() for k, v in INIT_PARAMS.items()}
        state = opt.init(params)
        for x, y in TRAIN_BATCHES:
            params, state = opt.step(params, grad(mse)(params, x, y), state)
        assert_trees_close(
            {k: v[index] for k, v in swept.items()}, params, rtol=1e-10, atol=1e-13, what=f"lr {lr}"
        )


# --------------------------------------------------------------------------------------
# the transform matrix: every mode under every transform, with its oracle
# --------------------------------------------------------------------------------------

TRANSFORMS = ("grad", "vjp", "jacrev", "jvp", "vmap")
IMPLS = ("reference", "foreach", "compiled")
TRANSFORM_ERROR = (
    r"in-place step cannot run on tensors traced by a torch\.func transform.*inplace=False"
)


def _validation_after_one_step(opt: optorch.Optimizer, params: dict[str, torch.Tensor]) -> Any:
    x, y = TRAIN_BATCHES[0]
    return mse(opt.step(params, grad(mse)(params, x, y), opt.init(params))[0], *VALIDATION_BATCH)


def _autograd_oracle(params0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d validation / d params0 through one pure reference step, by plain autograd."""
    opt = optorch.get_optimizer(
        "adamw", max_lr=0.05, weight_decay=0.1, inplace=False, impl="reference"
    )
    leaves = {k: v.clone().requires_grad_() for k, v in params0.items()}
    x, y = TRAIN_BATCHES[0]
    grads = torch.autograd.grad(mse(leaves, x, y), list(leaves.values()), create_graph=True)
    stepped = opt.step(leaves, dict(zip(leaves, grads, strict=True)), opt.init(leaves))[0]
    out = torch.autograd.grad(mse(stepped, *VALIDATION_BATCH), list(leaves.values()))
    return dict(zip(leaves, out, strict=True))


def _run_transform(transform: str, opt: optorch.Optimizer) -> Any:
    params0 = {k: v.clone() for k, v in INIT_PARAMS.items()}
    loss_of = functools.partial(_validation_after_one_step, opt)
    if transform == "grad":
        return grad(loss_of)(params0)
    if transform == "jacrev":
        return jacrev(loss_of)(params0)
    if transform == "vjp":
        _, pullback, *_ = vjp(loss_of, params0)
        return pullback(torch.tensor(1.0, dtype=F64))[0]
    if transform == "jvp":  # forward mode: one directional derivative per param tensor
        return {key: jvp(loss_of, (params0,), (_basis(key),))[1] for key in params0}
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params0.items()}
    return vmap(functools.partial(_params_after_one_step, opt))(stacked)


def _params_after_one_step(
    opt: optorch.Optimizer, params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    x, y = TRAIN_BATCHES[0]
    return opt.step(params, grad(mse)(params, x, y), opt.init(params))[0]


def _basis(key: str) -> dict[str, torch.Tensor]:
    """A tangent: ones on the param ``key``, zeros elsewhere."""
    return {k: torch.full_like(v, float(k == key)) for k, v in INIT_PARAMS.items()}


def _transform_oracle(transform: str) -> Any:
    if transform == "jvp":
        gradient = _autograd_oracle(INIT_PARAMS)
        return {key: gradient[key].sum() for key in gradient}
    if transform != "vmap":
        return _autograd_oracle(INIT_PARAMS)
    opt = optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.1, impl="reference")
    outs = [
        _params_after_one_step(opt, {k: scale * v.clone() for k, v in INIT_PARAMS.items()})
        for scale in (1.0, 2.0)
    ]
    return {k: torch.stack([o[k] for o in outs]) for k in INIT_PARAMS}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_transform_matrix(transform: str, inplace: bool, impl: str) -> None:
    opt = optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.1, inplace=inplace, impl=impl)
    if inplace:
        with pytest.raises(RuntimeError, match=TRANSFORM_ERROR) as excinfo:
            _run_transform(transform, opt)
        # optorch refuses before any tensor is touched: the error comes from its own
        # check, in one line, not from deep inside autograd or a batching rule
        assert "optorch" in Path(str(excinfo.traceback[-1].path)).parts
        assert "\n" not in str(excinfo.value) and len(str(excinfo.value)) < 300
        return
    result = _run_transform(transform, opt)
    assert_trees_close(result, _transform_oracle(transform), rtol=1e-10, atol=1e-13, what=transform)


# --------------------------------------------------------------------------------------
# in-place steps and autograd (outside torch.func)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS[:2])
def test_inplace_step_on_leaves_that_require_grad_is_the_torch_optim_pattern(impl: str) -> None:
    """``loss.backward()`` then an in-place step on the leaves: the leaves stay leaves
    (no graph is recorded through the update) and the numbers equal the pure step."""
    opt = optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.1, impl=impl)
    leaves = {k: v.clone().requires_grad_() for k, v in INIT_PARAMS.items()}
    state = opt.init(leaves)
    mse(leaves, *TRAIN_BATCHES[0]).backward()
    grads = {k: v.grad for k, v in leaves.items()}
    expected = opt.replace(inplace=False).step(
        {k: v.detach() for k, v in leaves.items()}, grads, opt.init(leaves)
    )[0]
    out, state = opt.step(leaves, grads, state)
    for key, tensor in out.items():
        assert tensor is leaves[key] and tensor.is_leaf and tensor.requires_grad
        assert tensor.grad_fn is None
    assert_trees_close(
        {k: v.detach() for k, v in out.items()}, expected, rtol=0, atol=0, what="in place"
    )


def test_inplace_step_on_params_inside_an_autograd_graph_raises() -> None:
    """Params that are results of differentiable ops (not leaves) would be overwritten
    under ``no_grad``: the graph would silently lose the update. Refuse it."""
    opt = optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.0)
    w = INIT_PARAMS["w1"].clone().requires_grad_()
    params = {"w1": w * 1.0, **{k: v for k, v in INIT_PARAMS.items() if k != "w1"}}
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    with pytest.raises(RuntimeError, match=r"in-place.*w1.*autograd graph.*inplace=False"):
        opt.step(params, grads, opt.init(params))


def test_inplace_step_records_no_hypergradient() -> None:
    """With ``inplace=True`` the update runs under ``no_grad``: a learning rate that
    requires grad is not in the graph, and autograd says so."""
    lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
    opt = optorch.get_optimizer("sgd", max_lr=lr, momentum=0.0)
    params = {k: v.clone() for k, v in INIT_PARAMS.items()}
    params, _ = opt.step(params, grad(mse)(params, *TRAIN_BATCHES[0]), opt.init(params))
    loss = mse(params, *VALIDATION_BATCH)
    assert not loss.requires_grad
    pure = opt.replace(inplace=False)
    params = {k: v.clone() for k, v in INIT_PARAMS.items()}
    params, _ = pure.step(params, grad(mse)(params, *TRAIN_BATCHES[0]), pure.init(params))
    assert mse(params, *VALIDATION_BATCH).requires_grad


# --------------------------------------------------------------------------------------
# torch.compile of a whole train step
# --------------------------------------------------------------------------------------

COMPILE_STEPS = 30

#: (id, inplace, impl, loss scaler, lr as a tensor override, backend, atol). Inside a
#: compiled graph every impl runs the reference loop; the eager baseline of
#: ``impl="compiled"`` runs optorch's own compiled kernels, which fuse differently (1e-6 a
#: step in float32, accumulated over 30 steps).
COMPILE_CASES: list[tuple[str, bool, str, bool, bool, str, float]] = [
    ("pure-reference", False, "reference", False, False, "aot_eager", 1e-6),
    ("inplace-auto-scaler", True, "auto", True, False, "aot_eager", 1e-6),
    ("pure-compiled-lr-tensor", False, "compiled", False, True, "aot_eager", 1e-5),
    ("inplace-reference-inductor", True, "reference", False, False, "inductor", 1e-6),
]


def _compile_fixture(inplace: bool, impl: str, scaler: bool, lr_tensor: bool) -> Any:
    from optorch import amp

    batches = regression_batches(seed=7, count=COMPILE_STEPS, size=16, dtype=F32)
    params0 = mlp_params(seed=8, dtype=F32)
    schedule = cosine_annealing(T_max=COMPILE_STEPS, eta_min=0.05)
    opt = optorch.get_optimizer(
        "adamw", max_lr=0.03, weight_decay=0.1, inplace=inplace, impl=impl, schedule=schedule
    )

    def train_step(params: Any, state: Any, scaler_state: Any, lr: Any, x: Any, y: Any) -> Any:
        overrides = {"max_lr": lr} if lr_tensor else None
        if scaler:

            def scaled_loss(p: Any) -> tuple[torch.Tensor, torch.Tensor]:
                loss = mse(p, x, y)
                return amp.scale_loss(loss, scaler_state), loss

            grads, (_, loss) = grad_and_value(scaled_loss, has_aux=True)(params)
            out = amp.scaled_step(
                opt, params, grads, state, scaler_state, hyper_overrides=overrides
            )
            return out.params, out.opt_state, out.scaler_state, loss
        grads, loss = grad_and_value(mse)(params, x, y)
        params, state = opt.step(params, grads, state, hyper_overrides=overrides)
        return params, state, scaler_state, loss

    def trajectory(step_fn: Callable[..., Any]) -> tuple[Any, Any, torch.Tensor]:
        params = {k: v.clone() for k, v in params0.items()}
        state = opt.init(params)
        scaler_state = amp.init_grad_scaler(init_scale=2.0**8, growth_interval=4)
        lr = torch.tensor(0.03)
        losses = []
        for k, (x, y) in enumerate(batches):
            lr.fill_(0.03 * (1.0 - k / (2 * COMPILE_STEPS)))  # changes every step
            params, state, scaler_state, loss = step_fn(params, state, scaler_state, lr, x, y)
            losses.append(loss.detach().clone())
        return params, state, torch.stack(losses)

    return train_step, trajectory


@pytest.mark.parametrize(
    ("inplace", "impl", "scaler", "lr_tensor", "backend", "atol"),
    [case[1:] for case in COMPILE_CASES],
    ids=[case[0] for case in COMPILE_CASES],
)
def test_compiled_train_step_has_no_graph_break_and_no_recompile(
    inplace: bool, impl: str, scaler: bool, lr_tensor: bool, backend: str, atol: float
) -> None:
    train_step, trajectory = _compile_fixture(inplace, impl, scaler, lr_tensor)
    eager_params, eager_state, eager_losses = trajectory(train_step)

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(train_step, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        params, state, losses = trajectory(compiled)

    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert int(state["step"]) == COMPILE_STEPS
    assert_trees_close(params, eager_params, rtol=1e-5, atol=atol, what="compiled params")
    for field in ("exp_avg", "exp_avg_sq"):
        assert_trees_close(state[field], eager_state[field], rtol=1e-5, atol=atol, what=field)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=atol)
    assert float(losses[-1]) < float(losses[0])
    assert math.isfinite(float(losses[-1]))


@pytest.mark.parametrize("name", sorted(optorch.builder.REGISTRY))
def test_every_optimizer_step_compiles_whole_in_user_code(name: str) -> None:
    """A user's own ``torch.compile(opt.step, fullgraph=True)`` traces every registered
    optimizer's step as one graph (the engine runs the reference loop inside it, and
    rules keep their compiled engine's special forms, such as Adafactor's
    ``torch.cond``, to the engine's kernels), and 3 compiled steps equal 3 eager ones.
    A matrix and a vector (Muon: matrices only)."""
    gen = generator(91)
    shapes = {"w": (16, 8), "v": (8, 12)} if name == "muon" else {"w": (16, 8), "b": (8,)}
    params0 = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]
    opt = optorch.get_optimizer(name, inplace=False)

    def run(step: Callable[..., Any]) -> tuple[Any, Any]:
        params = {k: v.clone() for k, v in params0.items()}
        state = opt.init(params)
        for g in grads:
            params, state = step(params, g, state)
        return params, state

    eager_params, eager_state = run(opt.step)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    params, state = run(torch.compile(opt.step, backend="aot_eager", fullgraph=True))
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert_trees_close(params, eager_params, rtol=1e-5, atol=1e-6, what=f"{name} params")
    eager_leaves = [v for v in optree_leaves(eager_state) if isinstance(v, torch.Tensor)]
    leaves = [v for v in optree_leaves(state) if isinstance(v, torch.Tensor)]
    assert len(leaves) == len(eager_leaves)
    for got, want in zip(leaves, eager_leaves, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(optorch.builder.REGISTRY))
def test_a_submodule_whose_grads_are_all_none_compiles_in_user_code(name: str) -> None:
    """Grads of a frozen or unused submodule are a dict of ``None``s, which dynamo's
    stand-in for optree could not flatten (torch 2.13: "Unexpected type in sourceless
    builder"; every optimizer's compiled step failed). A frozen submodule ("frozen",
    no state either) and an expert that sits out the second step; compiled equals
    eager, params and state."""
    gen = generator(92)
    matrix = (8, 6)
    params0 = {
        "frozen": {"w": torch.randn(matrix, generator=gen)},
        "expert": {"w": torch.randn(matrix, generator=gen)},
        "head": {"w": torch.randn(matrix, generator=gen)},
    }
    if name != "muon":  # Muon takes matrices only
        params0["head"]["b"] = torch.randn(6, generator=gen)
    grads = []
    for step in range(3):
        g: dict[str, Any] = {"frozen": {"w": None}}
        for part in ("expert", "head"):
            g[part] = {k: torch.randn(v.shape, generator=gen) for k, v in params0[part].items()}
        if step == 1:
            g["expert"] = {"w": None}
        grads.append(g)
    opt = optorch.get_optimizer(name, inplace=False)

    def run(step: Callable[..., Any]) -> tuple[Any, Any]:
        params = optree.tree_map(torch.clone, params0)
        state = opt.init(params)
        state = {  # no state for the frozen submodule, as init(module) gives
            k: {**v, "frozen": {"w": None}} if isinstance(v, dict) and "frozen" in v else v
            for k, v in state.items()
        }
        for g in grads:
            params, state = step(params, g, state)
        return params, state

    eager_params, eager_state = run(opt.step)
    torch._dynamo.reset()
    params, state = run(torch.compile(opt.step, backend="aot_eager", fullgraph=True))
    assert_trees_close(params, eager_params, rtol=1e-5, atol=1e-6, what=f"{name} params")
    assert optree.tree_structure(state, none_is_leaf=True) == optree.tree_structure(
        eager_state, none_is_leaf=True
    )
    for got, want in zip(optree_leaves(state), optree_leaves(eager_state), strict=True):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


#: (id, registry name, hyperparameters): the rules that add ``alpha * y`` to a gradient or
#: to a param, where the gradient is a matmul's output inside the compiled graph
MATMUL_GRAD_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("sgd-plain", "sgd", {"max_lr": 0.1, "momentum": 0.0}),
    ("sgd-decay", "sgd", {"max_lr": 0.1, "momentum": 0.0, "weight_decay": 0.1}),
    ("sgd-nesterov-decay", "sgd", {"max_lr": 0.05, "nesterov": True, "weight_decay": 0.1}),
    ("sgd-dampening", "sgd", {"max_lr": 0.05, "momentum": 0.8, "dampening": 0.3}),
    ("muon", "muon", {"max_lr": 0.05, "ns_dtype": None}),
]


@pytest.mark.parametrize(
    ("name", "hyper"), [c[1:] for c in MATMUL_GRAD_CASES], ids=[c[0] for c in MATMUL_GRAD_CASES]
)
def test_inductor_train_step_with_matmul_grads_equals_eager(
    name: str, hyper: dict[str, Any]
) -> None:
    """Forward, ``torch.func.grad`` and step compiled by inductor equal eager for 10 steps.

    The weights' gradients are matmul outputs in the graph, and inductor rewrites an
    ``add`` of a matmul output into ``addmm``, dropping ``alpha`` (torch 2.13: SGD moved
    the weights by ``+g`` instead of ``-lr * g``): optorch never hands it such an add.
    """
    gen = generator(93)
    x = torch.randn(32, 16, generator=gen)
    y = torch.randn(32, 8, generator=gen)
    params0 = {
        "w1": torch.randn(24, 16, generator=gen) / 4,
        "w2": torch.randn(8, 24, generator=gen) / 5,
    }
    opt = optorch.get_optimizer(name, **hyper, impl="reference", inplace=False)

    def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((torch.tanh(x @ params["w1"].T) @ params["w2"].T - y) ** 2).mean()

    def train_step(params: Any, state: Any) -> tuple[Any, Any]:
        return opt.step(params, grad(loss_fn)(params), state)

    def run(step: Callable[..., Any]) -> tuple[Any, Any]:
        params = {k: v.clone() for k, v in params0.items()}
        state = opt.init(params)
        for _ in range(10):
            params, state = step(params, state)
        return params, state

    eager_params, eager_state = run(train_step)
    torch._dynamo.reset()
    params, state = run(torch.compile(train_step, backend="inductor", fullgraph=True))
    assert_trees_close(params, eager_params, rtol=1e-5, atol=1e-6, what=f"{name} params")
    assert sorted(state) == sorted(eager_state)
    for field in ("momentum",) if "momentum" in eager_state else ():
        assert_trees_close(state[field], eager_state[field], rtol=1e-5, atol=1e-6, what=field)
    assert float(loss_fn(params)) < float(loss_fn(params0))


@pytest.mark.parametrize(
    ("grads", "message"),
    [
        ({"w": torch.ones(3)}, r"key \['b'\] is missing"),
        ([torch.ones(3), torch.ones(2)], "dict vs list"),
    ],
    ids=["missing-key", "other-container"],
)
def test_compiled_step_still_checks_that_grads_match_params(grads: Any, message: str) -> None:
    """Under dynamo the structures are compared node by node (``tree.same_structure``),
    not with the specs' ``==``; a mismatch still stops the step, naming where."""
    opt = optorch.get_optimizer("adamw", inplace=False)
    params = {"w": torch.zeros(3), "b": torch.zeros(2)}
    state = opt.init(params)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=f"grads do not match params.*{message}"):
        step(params, grads, state)


# --------------------------------------------------------------------------------------
# gradients through wrapper state and the loss scaler
# --------------------------------------------------------------------------------------


def _directional_difference(
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    at: dict[str, torch.Tensor],
    direction: dict[str, torch.Tensor],
) -> float:
    """Central difference of ``loss_of`` along ``direction`` (float64, eps 1e-6)."""
    shifted = [
        float(loss_of({k: v + sign * FD_EPS * direction[k] for k, v in at.items()}))
        for sign in (1.0, -1.0)
    ]
    return (shifted[0] - shifted[1]) / (2 * FD_EPS)


@pytest.mark.parametrize("wrapper", ["ema", "lookahead"])
def test_gradient_wrt_initial_params_flows_through_averages_that_start_at_them(
    wrapper: str,
) -> None:
    """An EMA and lookahead's slow weights start as copies of the params; in a pure run
    those copies must stay connected to the initial params (they were detached)."""

    def loss_of(params0: dict[str, torch.Tensor]) -> torch.Tensor:
        inner = optorch.get_optimizer("adam", max_lr=0.05, inplace=False)
        if wrapper == "ema":
            opt: Any = optorch.wrappers.ema(inner, 0.5)
        else:
            opt = optorch.wrappers.lookahead(inner, sync_period=2, alpha=0.5)
        params, state = params0, opt.init(params0)
        for x, y in TRAIN_BATCHES:
            params, state = opt.step(params, grad(mse)(params, x, y), state)
        final = optorch.wrappers.ema_params(state) if wrapper == "ema" else params
        return mse(final, *VALIDATION_BATCH)

    direction = mlp_params(seed=9, dtype=F64)
    expected = _directional_difference(loss_of, INIT_PARAMS, direction)
    gradient = grad(loss_of)(INIT_PARAMS)
    along = float(sum((gradient[k] * direction[k]).sum() for k in MLP_SHAPES))
    assert abs(along - expected) <= 1e-6 * abs(expected), (along, expected)


@pytest.mark.parametrize("mode", ["func", "autograd"])
def test_hypergradient_through_the_loss_scaler(mode: str) -> None:
    """d(validation loss) / d lr through ``amp.scaled_step``: the unscaled grads are part
    of the differentiated program (they were computed outside autograd)."""
    from optorch import amp

    def loss_of(lr: Any) -> torch.Tensor:
        opt = optorch.get_optimizer("adamw", max_lr=lr, weight_decay=0.01, inplace=False)
        params, state = INIT_PARAMS, opt.init(INIT_PARAMS)
        scaler = amp.init_grad_scaler(init_scale=2.0**10)
        for x, y in TRAIN_BATCHES:

            def scaled(
                p: dict[str, torch.Tensor], x: Any = x, y: Any = y, scaler: Any = scaler
            ) -> torch.Tensor:
                return amp.scale_loss(mse(p, x, y), scaler)

            params, state, scaler, _ = amp.scaled_step(
                opt, params, grad(scaled)(params), state, scaler
            )
        return mse(params, *VALIDATION_BATCH)

    lr = 0.05
    expected = (float(loss_of(lr + FD_EPS)) - float(loss_of(lr - FD_EPS))) / (2 * FD_EPS)
    lr_t = torch.tensor(lr, dtype=F64)
    if mode == "func":
        got = float(grad(loss_of)(lr_t))
    else:
        got = float(torch.autograd.grad(loss_of(lr_t.requires_grad_()), lr_t)[0])
    assert abs(got - expected) <= 1e-6 * abs(expected), (got, expected)


def test_vmapped_scaled_steps_equal_separate_runs() -> None:
    """An ensemble with one loss scale per model under ``vmap`` (``unscale_grads`` ran
    ``_foreach_mul``, which has no batching rule); model 1 overflows at step 2."""
    from optorch import amp

    models = 3
    opt = optorch.get_optimizer("adamw", max_lr=0.05, weight_decay=0.01, inplace=False)
    base = amp.init_grad_scaler(init_scale=2.0**10, growth_interval=2)
    gen = generator(21)
    stacked = {
        k: torch.randn(models, *shape, generator=gen, dtype=F64) for k, shape in MLP_SHAPES.items()
    }

    def train_step(
        params: Any, state: Any, scale: Any, tracker: Any, overflow: Any, batch: Any
    ) -> Any:
        x, y = batch
        scaler = {**base, "scale": scale, "growth_tracker": tracker}

        def scaled(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return amp.scale_loss(mse(p, x, y), scaler) * torch.where(overflow, math.inf, 1.0)

        params, state, scaler, _ = amp.scaled_step(opt, params, grad(scaled)(params), state, scaler)
        return params, state, scaler["scale"], scaler["growth_tracker"]

    def overflows(step: int) -> torch.Tensor:
        return torch.tensor([step == 2 and m == 1 for m in range(models)])

    params, state = stacked, vmap(opt.init)(stacked)
    scale = base["scale"].repeat(models)
    tracker = base["growth_tracker"].repeat(models)
    for step, batch in enumerate(TRAIN_BATCHES):
        params, state, scale, tracker = vmap(train_step, in_dims=(0, 0, 0, 0, 0, None))(
            params, state, scale, tracker, overflows(step), batch
        )
    assert float(scale[1]) != float(scale[0]), "model 1 must have backed off"
    for m in range(models):
        single = {k: v[m] for k, v in stacked.items()}
        single_state, single_scale, single_tracker = (
            opt.init(single),
            base["scale"],
            base["growth_tracker"],
        )
        for step, batch in enumerate(TRAIN_BATCHES):
            single, single_state, single_scale, single_tracker = train_step(
                single, single_state, single_scale, single_tracker, overflows(step)[m], batch
            )
        got = {k: v[m] for k, v in params.items()}
        assert_trees_close(got, single, rtol=1e-12, atol=1e-14, what=f"model {m} params")
        member_state = {
            k: v[m] if k == "step" else {n: t[m] for n, t in v.items()} for k, v in state.items()
        }
        assert_trees_close(
            member_state, single_state, rtol=1e-12, atol=1e-14, what=f"model {m} state"
        )
        assert float(scale[m]) == float(single_scale), m


# --------------------------------------------------------------------------------------
# forward-mode AD (dual tensors) and Adagrad's tensor initial accumulator
# --------------------------------------------------------------------------------------

#: Configs for the forward-mode check: Muon's Newton-Schulz in float64 (bfloat16 would
#: swamp a finite difference), everything else the registry's defaults.
_FORWARD_CONFIGS: dict[str, dict[str, Any]] = {"muon": {"ns_dtype": None}}


def _unrolled_loss(name: str, lr: Any, impl: str, steps: int = 5) -> torch.Tensor:
    """sum(p^2) after ``steps`` pure steps of ``name`` on fixed float64 gradients."""
    gen = generator(41)
    params = {"w": torch.randn(4, 3, generator=gen, dtype=F64)}
    if name != "muon":
        params["b"] = torch.randn(4, generator=gen, dtype=F64)
    opt = optorch.get_optimizer(
        name, max_lr=lr, impl=impl, inplace=False, **_FORWARD_CONFIGS.get(name, {})
    )
    state = opt.init(params)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in params.items()}
        params, state = opt.step(params, grads, state)
    return sum(p.square().sum() for p in params.values())  # type: ignore[return-value]


@pytest.mark.parametrize("impl", ["auto", "compiled"])
@pytest.mark.parametrize("name", sorted(optorch.builder.REGISTRY))
def test_forward_mode_ad_through_pure_steps_matches_finite_differences(
    name: str, impl: str
) -> None:
    """A dual learning rate (torch.autograd.forward_ad) through five pure steps: the
    loss's tangent is its derivative in lr. The foreach kernels gave LAMB, LARS and
    Adafactor a tangent of the wrong shape (an error) and RAdam none (0.0)."""
    from torch.autograd import forward_ad

    lr = 0.01
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(torch.tensor(lr, dtype=F64), torch.tensor(1.0, dtype=F64))
        tangent = forward_ad.unpack_dual(_unrolled_loss(name, dual, impl)).tangent
    h = 1e-6
    with torch.no_grad():
        difference = (
            _unrolled_loss(name, torch.tensor(lr + h, dtype=F64), "reference")
            - _unrolled_loss(name, torch.tensor(lr - h, dtype=F64), "reference")
        ) / (2 * h)
    assert tangent is not None
    torch.testing.assert_close(tangent, difference, rtol=1e-5, atol=1e-8)


def _assert_hypergradient_is_the_central_difference(
    loss: Callable[[torch.Tensor], torch.Tensor], at: float, h: float = 1e-6
) -> torch.Tensor:
    """autograd's d loss / d x at ``at`` equals the central difference (rtol 1e-6),
    which is returned."""
    value = torch.tensor(at, dtype=F64, requires_grad=True)
    (hypergradient,) = torch.autograd.grad(loss(value), value)
    with torch.no_grad():
        upper, lower = (loss(torch.tensor(at + d, dtype=F64)) for d in (h, -h))
    difference = (upper - lower) / (2 * h)
    torch.testing.assert_close(hypergradient, difference, rtol=1e-6, atol=0.0)
    return difference


def test_adagrad_tensor_initial_accumulator_has_a_hypergradient_and_vmaps() -> None:
    """``initial_accumulator_value`` as a tensor starts the accumulator from it: its
    hypergradient matches a central finite difference (it was read as a number: 0,
    with no graph), and under vmap each model starts from its own value."""
    gen = generator(7)
    w0 = torch.randn(4, 3, generator=gen, dtype=F64)
    grads = [torch.randn(4, 3, generator=gen, dtype=F64) for _ in range(3)]

    def loss(initial: torch.Tensor) -> torch.Tensor:
        opt = optorch.get_optimizer(
            "adagrad", max_lr=0.1, initial_accumulator_value=initial, inplace=False
        )
        params = {"w": w0}
        state = opt.init(params)
        for g in grads:
            params, state = opt.step(params, {"w": g}, state)
        return params["w"].square().sum()

    difference = _assert_hypergradient_is_the_central_difference(loss, 0.1)
    torch.testing.assert_close(
        grad(loss)(torch.tensor(0.1, dtype=F64)), difference, rtol=1e-6, atol=0.0
    )
    values = torch.tensor([0.0, 0.1, 1.0], dtype=F64)
    batched = vmap(loss)(values)
    separate = torch.stack([loss(torch.tensor(float(v), dtype=F64)) for v in values])
    torch.testing.assert_close(batched, separate, rtol=1e-12, atol=0.0)


def test_nadam_with_a_float32_mu_product_keeps_its_beta1_differentiable_and_vmappable() -> None:
    """A state holding mu_product in float32 (torch's per-param layout, as the adapter
    keeps it) advances it in float32; the per-step values derived from it were then read
    as numbers even when beta1 was a tensor autograd tracks (a hypergradient 10% off) or
    vmap batches (an error)."""
    gen = generator(83)
    start = torch.randn(5, generator=gen, dtype=F64)
    grad_ = torch.randn(5, generator=gen, dtype=F64)
    opt = optorch.get_optimizer("nadam", max_lr=1e-2, inplace=False)
    state = opt.init([start.clone()])
    for _ in range(2):
        _, state = opt.step([start.clone()], [grad_], state)
    narrow = {**state, "mu_product": state["mu_product"].float()}

    def loss(beta1: torch.Tensor) -> torch.Tensor:
        params, _ = opt.step(
            [start.clone()], [grad_], narrow, hyper_overrides={"betas": (beta1, 0.999)}
        )
        return params[0].sum()

    _assert_hypergradient_is_the_central_difference(loss, 0.9)
    betas = torch.tensor([0.8, 0.9], dtype=F64)
    separate = torch.stack([loss(torch.tensor(float(b), dtype=F64)) for b in betas])
    torch.testing.assert_close(vmap(loss)(betas), separate, rtol=1e-12, atol=0.0)
