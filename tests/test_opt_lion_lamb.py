"""Lion and LAMB against their papers' formulas in float64 (and Lion against lion-pytorch).

Every engine (reference, foreach; compiled for a few option sets, each in float32 in
place and float64 pure) and both modes (in place, pure) are compared step by step for 20
steps, on params and state, in float32 and float64. Then: LAMB's zero-norm guard,
validation and the registry (convergence: tests/test_convergence.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch._dynamo
from conftest import clone_tree, compiled_params
from lion_pytorch import Lion
from torch.optim.lr_scheduler import LambdaLR

import optorch
from optorch import lamb, lion
from optorch.base import Optimizer, Rule

STEPS = 20
# "zeros" starts at the origin (LAMB's ||p|| = 0 guard); "still" never gets a gradient
# (LAMB's ||update|| = 0 guard when there is no weight decay)
SHAPES = {
    "weight": (4, 3),
    "bias": (5,),
    "kernel": (2, 3, 2),
    "scale": (),
    "zeros": (3,),
    "still": (2, 2),
}
# (rtol, atol) on params and state after each step, against the float64 formula
TOLERANCES = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-11, 1e-13)}
# the compiled engine passes every per-step scalar as a 0-d tensor of the param dtype
COMPILED_TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}


def _decay(step: int) -> float:
    return 1.0 / (1.0 + 0.1 * step)


def _multiplier(options: dict[str, Any], taken: int) -> float:
    """The schedule multiplier of a step after ``taken`` steps (see ``BaseConfig``)."""
    if options.get("schedule") is not None:
        return float(options["schedule"](taken))
    return float(options.get("lr_schedule_value", 1.0))


def make_problem(dtype: torch.dtype, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Initial params and STEPS gradients of varying scale (some exact zeros)."""
    generator = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=generator, dtype=dtype) for k, s in SHAPES.items()}
    params["zeros"].zero_()
    grads = []
    for step in range(STEPS):
        scale = 10.0 ** ((step % 5) - 2)
        grad = {
            k: torch.randn(s, generator=generator, dtype=dtype) * scale for k, s in SHAPES.items()
        }
        grad["bias"][0] = 0.0
        grad["still"].zero_()
        grads.append(grad)
    return params, grads


# --------------------------------------------------------------------------------------
# the papers' formulas, in float64
# --------------------------------------------------------------------------------------


def lion_formula(
    options: dict[str, Any], params0: dict[str, torch.Tensor], grads: list[Any]
) -> list[Any]:
    """Algorithm 2 of arXiv:2302.06675, one tensor at a time."""
    config = lion.LionConfig(**options)
    beta1, beta2 = config.betas
    params = {k: v.double().clone() for k, v in params0.items()}
    momentum = {k: torch.zeros_like(v) for k, v in params.items()}
    history = []
    for taken, grad in enumerate(grads):
        multiplier = _multiplier(options, taken)
        lr = config.max_lr * multiplier
        decay = (multiplier if config.decoupled_weight_decay else lr) * config.weight_decay
        for name in params:
            g = grad[name].double() * (-1.0 if config.maximize else 1.0)
            update = torch.sign(beta1 * momentum[name] + (1.0 - beta1) * g)
            params[name] = params[name] * (1.0 - decay) - lr * update
            momentum[name] = beta2 * momentum[name] + (1.0 - beta2) * g
        history.append((dict(params), {"exp_avg": dict(momentum)}))
    return history


def lamb_formula(
    options: dict[str, Any], params0: dict[str, torch.Tensor], grads: list[Any]
) -> list[Any]:
    """Algorithm 2 of arXiv:1904.00962 with Adam's bias correction, per tensor."""
    config = lamb.LambConfig(**options)
    beta1, beta2 = config.betas
    params = {k: v.double().clone() for k, v in params0.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(v) for k, v in params.items()}
    history = []
    for taken, grad in enumerate(grads):
        t = taken + 1
        lr = config.max_lr * _multiplier(options, taken)
        for name in params:
            g = grad[name].double() * (-1.0 if config.maximize else 1.0)
            m[name] = beta1 * m[name] + (1.0 - beta1) * g
            v[name] = beta2 * v[name] + (1.0 - beta2) * g * g
            m_hat = m[name] / (1.0 - beta1**t)
            v_hat = v[name] / (1.0 - beta2**t)
            update = m_hat / (torch.sqrt(v_hat) + config.eps) + config.weight_decay * params[name]
            weight_norm = math.sqrt(float((params[name] ** 2).sum()))
            update_norm = math.sqrt(float((update**2).sum()))
            if weight_norm > 0 and update_norm > 0:
                phi = (
                    weight_norm
                    if config.clamp_value is None
                    else min(weight_norm, config.clamp_value)
                )
                trust_ratio = phi / update_norm
            else:
                trust_ratio = 1.0
            params[name] = params[name] - lr * trust_ratio * update
        history.append((dict(params), {"exp_avg": dict(m), "exp_avg_sq": dict(v)}))
    return history


def lion_pytorch_reference(
    options: dict[str, Any], params0: dict[str, torch.Tensor], grads: list[Any]
) -> list[Any]:
    """The lion-pytorch package (its plain PyTorch update, not the triton kernel)."""
    config = lion.LionConfig(**options)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in params0.items()}
    optimizer = Lion(
        list(params.values()),
        lr=config.max_lr,
        betas=config.betas,
        weight_decay=config.weight_decay,
        use_triton=False,
        decoupled_weight_decay=config.decoupled_weight_decay,
    )
    scheduler = LambdaLR(optimizer, config.schedule) if config.schedule is not None else None
    history = []
    for grad in grads:
        for name, param in params.items():
            param.grad = grad[name].clone()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        state = {name: optimizer.state[p]["exp_avg"].clone() for name, p in params.items()}
        history.append(({k: p.detach().clone() for k, p in params.items()}, {"exp_avg": state}))
    return history


# --------------------------------------------------------------------------------------
# running ours, and comparing
# --------------------------------------------------------------------------------------


def assert_trees_equal(actual: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_trees_equal(actual[key], expected[key])
    else:
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)


def run_ours(
    rule: Rule, config: Any, params0: dict[str, torch.Tensor], grads: list[Any]
) -> list[Any]:
    """(params, state) after each step; checks each mode's contract along the way."""
    optimizer = Optimizer(rule, config)
    params = clone_tree(params0)
    state = optimizer.init(params)
    history = []
    for step, grad in enumerate(grads, start=1):
        if config.inplace:
            storage = {k: v.data_ptr() for k, v in params.items()}
            new_params, new_state = optimizer.step(params, grad, state)
            assert new_params is params
            assert {k: v.data_ptr() for k, v in new_params.items()} == storage
        else:
            before = (clone_tree(params), clone_tree(grad), clone_tree(state))
            new_params, new_state = optimizer.step(params, grad, state)
            # pure mode: every input bit-identical, the results new tensors
            assert_trees_equal(params, before[0])
            assert_trees_equal(grad, before[1])
            assert_trees_equal(state, before[2])
            assert all(new_params[k] is not params[k] for k in params)
        assert int(new_state["step"]) == step
        params, state = new_params, new_state
        history.append((clone_tree(params), clone_tree(state)))
    return history


def compare(ours: list[Any], reference: list[Any], rtol: float, atol: float) -> None:
    """Params and every state field of the reference, after each step, in ours' dtype."""
    assert len(ours) == len(reference) == STEPS
    for step, ((params, state), (ref_params, ref_state)) in enumerate(
        zip(ours, reference, strict=True), start=1
    ):
        dtype = next(iter(params.values())).dtype
        pairs = [("params", params, ref_params)]
        pairs += [(key, state[key], tree) for key, tree in ref_state.items()]
        for what, actual, expected in pairs:
            assert all(actual[name].dtype == dtype for name in ref_params)
            # one comparison per tree: the message names the step and the field
            torch.testing.assert_close(
                _flat(actual, ref_params),
                _flat(expected, ref_params).to(dtype),
                rtol=rtol,
                atol=atol,
                msg=lambda m, w=what, s=step: f"{w} after step {s}: {m}",
            )


def _flat(tree: dict[str, torch.Tensor], order: dict[str, Any]) -> torch.Tensor:
    return torch.cat([tree[name].reshape(-1) for name in order])


@dataclass(frozen=True)
class Case:
    id: str
    module: Any
    formula: Callable[..., list[Any]]
    options: dict[str, Any]
    compiled: bool = False


CASES = [
    Case("lion-default", lion, lion_formula, {}),
    Case("lion-lr-betas", lion, lion_formula, {"max_lr": 3e-3, "betas": (0.95, 0.98)}),
    Case("lion-beta1-zero", lion, lion_formula, {"max_lr": 1e-3, "betas": (0.0, 0.9)}),
    Case("lion-wd", lion, lion_formula, {"max_lr": 1e-3, "weight_decay": 0.5}),
    Case(
        "lion-wd-maximize",
        lion,
        lion_formula,
        {"max_lr": 1e-3, "weight_decay": 0.5, "maximize": True},
    ),
    Case(
        "lion-decoupled-schedule",
        lion,
        lion_formula,
        {"max_lr": 1e-3, "weight_decay": 0.01, "decoupled_weight_decay": True, "schedule": _decay},
        compiled=True,
    ),
    Case(
        "lion-schedule-value",
        lion,
        lion_formula,
        {"max_lr": 1e-3, "weight_decay": 0.5, "lr_schedule_value": 0.25},
    ),
    Case("lamb-default", lamb, lamb_formula, {}),
    Case(
        "lamb-lr-betas-eps", lamb, lamb_formula, {"max_lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-3}
    ),
    Case("lamb-wd", lamb, lamb_formula, {"max_lr": 0.01, "weight_decay": 0.1}),
    Case(
        "lamb-wd-clamp",
        lamb,
        lamb_formula,
        {"max_lr": 0.01, "weight_decay": 0.1, "clamp_value": 0.5},
        compiled=True,
    ),
    Case(
        "lamb-maximize-clamp-inactive",
        lamb,
        lamb_formula,
        {"max_lr": 0.01, "maximize": True, "clamp_value": 100.0},
    ),
    Case(
        "lamb-schedule",
        lamb,
        lamb_formula,
        {"max_lr": 0.01, "weight_decay": 0.01, "schedule": _decay},
    ),
    Case("lamb-schedule-value", lamb, lamb_formula, {"max_lr": 0.01, "lr_schedule_value": 0.5}),
]


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_the_paper(case: Case, dtype: torch.dtype, impl: str, inplace: bool) -> None:
    params0, grads = make_problem(dtype)
    reference = case.formula(case.options, params0, grads)
    config = case.module.RULE.config_type(**case.options, impl=impl, inplace=inplace)
    ours = run_ours(case.module.RULE, config, params0, grads)
    compare(ours, reference, *TOLERANCES[dtype])


COMPILED = compiled_params([c for c in CASES if c.compiled], lambda case: case.id)


@pytest.mark.parametrize(("case", "dtype", "inplace"), COMPILED)
def test_compiled_matches_the_paper(case: Case, dtype: torch.dtype, inplace: bool) -> None:
    params0, grads = make_problem(dtype, seed=1)
    reference = case.formula(case.options, params0, grads)
    config = case.module.RULE.config_type(**case.options, impl="compiled", inplace=inplace)
    ours = run_ours(case.module.RULE, config, params0, grads)
    compare(ours, reference, *COMPILED_TOLERANCES[dtype])


LION_PACKAGE_CASES = [
    c
    for c in CASES
    if c.module is lion and not c.options.get("maximize") and "lr_schedule_value" not in c.options
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", LION_PACKAGE_CASES, ids=lambda c: c.id)
def test_lion_matches_lion_pytorch(case: Case, dtype: torch.dtype) -> None:
    params0, grads = make_problem(dtype, seed=2)
    reference = lion_pytorch_reference(case.options, params0, grads)
    for impl in ("reference", "foreach"):
        config = lion.LionConfig(**case.options, impl=impl)
        compare(run_ours(lion.RULE, config, params0, grads), reference, *TOLERANCES[dtype])


# --------------------------------------------------------------------------------------
# LAMB's trust ratio
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_lamb_moves_each_tensor_by_lr_times_its_norm(impl: str) -> None:
    """Away from the guards, ||p_t - p_{t-1}|| = lr * min(||p_{t-1}||, clamp_value)."""
    generator = torch.Generator().manual_seed(3)
    params = {
        "a": torch.randn(6, 4, generator=generator, dtype=torch.float64) * 3.0,
        "b": torch.randn(7, generator=generator, dtype=torch.float64) * 0.1,
    }
    grads = {
        k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * 1e3
        for k, v in params.items()
    }
    config = lamb.LambConfig(
        max_lr=0.05, weight_decay=0.3, clamp_value=2.0, impl=impl, inplace=False
    )
    state = lamb.default_lamb_state(params)
    new_params, _ = lamb.lamb_step(params, grads, state, config)
    for name in params:
        moved = float(torch.linalg.vector_norm(new_params[name] - params[name]))
        expected = 0.05 * min(float(torch.linalg.vector_norm(params[name])), 2.0)
        assert moved == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("user_compile", [False, True], ids=["eager", "user-compiled"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_lamb_zero_norm_guards_and_pure_gradients_stay_finite(
    impl: str, user_compile: bool
) -> None:
    """||p|| = 0 and ||update|| = 0 give trust ratio 1, and no NaN in autograd either,
    also when the user compiles the step (the param norm keeps its plain form where
    autograd records it)."""
    params = {
        "origin": torch.zeros(3, dtype=torch.float64, requires_grad=True),
        "still": torch.ones(2, dtype=torch.float64, requires_grad=True),
    }
    grads = {
        "origin": torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64),
        "still": torch.zeros(2, dtype=torch.float64),
    }
    config = lamb.LambConfig(max_lr=0.1, impl=impl, inplace=False)
    state = lamb.default_lamb_state({k: v.detach() for k, v in params.items()})
    step = lamb.lamb_step
    if user_compile:
        torch._dynamo.reset()
        step = torch.compile(lamb.lamb_step, backend="aot_eager", fullgraph=True)
    new_params, _ = step(params, grads, state, config)
    # trust ratio 1: an Adam step of size lr per coordinate, zero where the gradient is
    expected = -0.1 * torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / (1.0 + 1e-6)
    torch.testing.assert_close(new_params["origin"], expected, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(new_params["still"], params["still"], rtol=0.0, atol=0.0)
    total = sum(v.sum() for v in new_params.values())
    for value in torch.autograd.grad(total, list(params.values())):
        assert torch.isfinite(value).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["no-wd", "wd"])
def test_lamb_compiled_matches_the_reference_with_a_non_finite_gradient(
    bad: float, weight_decay: float
) -> None:
    """Compiled, the param's norm is summed in the loop that reads the gradient, counting
    0 where the gradient is NaN (engine.norm_sharing_pass). A NaN makes the update's
    norm NaN and the trust ratio 1 whatever the param's norm, and an inf leaves the sum
    as it is: params and moments equal the reference loop's, NaN for NaN, over 3 steps,
    next to a finite tensor (compiled too: the tests compile tensors of any size)."""
    size = 300
    gen = torch.Generator().manual_seed(5)
    params = {k: torch.randn(size, generator=gen) for k in ("bad", "fine")}
    grads = [{k: torch.randn(size, generator=gen) for k in params} for _ in range(3)]
    grads[1]["bad"][11] = bad
    results = []
    for impl in ("reference", "compiled"):
        config = lamb.LambConfig(max_lr=0.1, weight_decay=weight_decay, impl=impl)
        current = {k: v.clone() for k, v in params.items()}
        state = lamb.default_lamb_state(current)
        for grad in grads:
            current, state = lamb.lamb_step(current, grad, state, config)
        results.append((current, state["exp_avg"], state["exp_avg_sq"]))
    for ours, expected in zip(results[1], results[0], strict=True):
        for name in params:
            torch.testing.assert_close(ours[name], expected[name], equal_nan=True)
    assert bool(results[0][0]["fine"].isfinite().all())


# --------------------------------------------------------------------------------------
# validation and the registry
# --------------------------------------------------------------------------------------

INVALID = [
    (lion.LionConfig, {"max_lr": -1e-4}, ValueError, r"max_lr"),
    (lion.LionConfig, {"max_lr": float("nan")}, ValueError, r"max_lr"),
    (lion.LionConfig, {"betas": (1.0, 0.99)}, ValueError, r"betas\[0\]"),
    (lion.LionConfig, {"betas": (0.9, float("nan"))}, ValueError, r"betas\[1\]"),
    (lion.LionConfig, {"betas": (0.9, 0.99, 0.999)}, ValueError, r"betas"),
    (lion.LionConfig, {"weight_decay": -0.1}, ValueError, r"weight_decay"),
    (lion.LionConfig, {"weight_decay": float("inf")}, ValueError, r"weight_decay"),
    (lion.LionConfig, {"decoupled_weight_decay": 1}, TypeError, r"decoupled_weight_decay"),
    (lion.LionConfig, {"maximize": "no"}, TypeError, r"maximize"),
    (lion.LionConfig, {"steps": -1}, ValueError, r"steps"),
    (lamb.LambConfig, {"max_lr": -0.1}, ValueError, r"max_lr"),
    (lamb.LambConfig, {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]"),
    (lamb.LambConfig, {"betas": (-0.1, 0.999)}, ValueError, r"betas\[0\]"),
    (lamb.LambConfig, {"eps": -1e-6}, ValueError, r"eps"),
    (lamb.LambConfig, {"eps": float("nan")}, ValueError, r"eps"),
    (lamb.LambConfig, {"weight_decay": -1.0}, ValueError, r"weight_decay"),
    (lamb.LambConfig, {"clamp_value": 0.0}, ValueError, r"clamp_value"),
    (lamb.LambConfig, {"clamp_value": float("nan")}, ValueError, r"clamp_value"),
    (lamb.LambConfig, {"maximize": None}, TypeError, r"maximize"),
    (lamb.LambConfig, {"lr_schedule_value": lambda step: 1.0}, TypeError, r"lr_schedule_value"),
]


@pytest.mark.parametrize(
    ("config_type", "kwargs", "error", "pattern"),
    INVALID,
    ids=lambda v: (
        ",".join(f"{k}={v[k]!r}" if not callable(v[k]) else f"{k}=<callable>" for k in v)
        if isinstance(v, dict)
        else None
    ),
)
def test_invalid_hyperparameters_are_rejected(
    config_type: type, kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        config_type(**kwargs)


def test_betas_from_yaml_lists_become_tuples() -> None:
    assert lion.LionConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert lamb.LambConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


@pytest.mark.parametrize("name", ["lion", "lamb"])
def test_registered_and_steps_by_name(name: str) -> None:
    module = {"lion": lion, "lamb": lamb}[name]
    assert optorch.REGISTRY[name].rule is module.RULE
    optimizer = optorch.get_optimizer(name, max_lr=1e-3)
    assert optimizer.config.max_lr == 1e-3
    params = {"w": torch.ones(3)}
    state = optimizer.init(params)
    params, state = optimizer.step(params, {"w": torch.tensor([1.0, -1.0, 0.0])}, state)
    assert params["w"][0] < 1.0 < params["w"][1]
    assert int(state["step"]) == 1


@pytest.mark.parametrize(("module", "prefix"), [(lion, "lion"), (lamb, "lamb")])
def test_seed_style_functions(module: Any, prefix: str) -> None:
    """``default_x_state(model)`` covers trainable params; ``x_step`` takes a config."""
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    state = getattr(module, f"default_{prefix}_state")(model)
    assert set(state["exp_avg"]) == {"weight"}
    params = {"weight": model.weight}
    grads = {"weight": torch.ones(2, 3)}
    config = module.RULE.config_type(max_lr=0.1)
    before = model.weight.detach().clone()
    getattr(module, f"{prefix}_step")(params, grads, state, config)
    assert torch.all(model.weight < before)  # in place, on the model's own tensor
    assert int(state["step"]) == 1
