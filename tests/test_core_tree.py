"""The step driver on pytrees: structures, None grads, errors, modes, dtypes, skipping.

* any pytree of params works (list, dict, nested dict/list/tuple) and gives the same
  numbers as ``torch.optim`` on the flattened leaves; state mirrors the structure;
* ``None`` grads leave that param and its state untouched; ``None`` params are allowed;
* every malformed input raises before anything is modified, naming the bad leaf;
* in place: the same tensor objects and storage come back; pure: inputs untouched and
  the result is differentiable (``torch.autograd.gradcheck`` through the step);
* bf16/fp16 params keep their dtype, and so does their state;
* ``skip_if`` leaves params and state (step included) bit-identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import optree
import pytest
import torch
from conftest import (
    TOLERANCES,
    TorchReference,
    assert_trees_close,
    assert_trees_equal,
    clone_tree,
    generator,
    grad_sequence,
    make_grads,
    make_params,
)

import optorch
from optorch.adam import AdamConfig, adam_step

# --------------------------------------------------------------------------------------
# pytrees
# --------------------------------------------------------------------------------------


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def make_structure(kind: str, seed: int) -> Any:
    gen = generator(seed)
    if kind == "list":
        return [_randn(gen, 3, 2), _randn(gen, 4), _randn(gen)]
    if kind == "dict":
        return {"w": _randn(gen, 3, 2), "b": _randn(gen, 4), "s": _randn(gen)}
    if kind == "tuple":
        return (_randn(gen, 3, 2), _randn(gen, 4))
    if kind == "nested":
        return {
            "encoder": {"layers": [_randn(gen, 2, 3), (_randn(gen, 3), _randn(gen))]},
            "head": [_randn(gen, 5)],
        }
    raise AssertionError(kind)


STRUCTURES = ["list", "dict", "tuple", "nested"]
TORCH_TWINS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}, ("momentum",)),
    "adamw": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}, ("exp_avg", "exp_avg_sq")),
}
OPTORCH_HYPER = {
    "sgd": {"max_lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "adamw": {"max_lr": 0.05, "weight_decay": 0.1},
}
TORCH_NAMES = {"momentum": "momentum_buffer", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", STRUCTURES)
def test_pytree_structures_match_torch_on_leaves(kind: str, name: str, inplace: bool) -> None:
    params = make_structure(kind, 61)
    spec = optree.tree_structure(params)
    leaves = optree.tree_leaves(params)
    torch_class, torch_hyper, fields = TORCH_TWINS[name]
    reference = TorchReference(
        torch_class, {str(i): x for i, x in enumerate(leaves)}, **torch_hyper
    )
    optimizer = optorch.get_optimizer(name, **OPTORCH_HYPER[name], inplace=inplace)
    state = optimizer.init(params)
    for field in fields:
        assert optree.tree_structure(state[field]) == spec, field
    for k in range(5):
        grads = optree.tree_map(
            lambda p, k=k: torch.randn(p.shape, generator=generator(k), dtype=p.dtype), params
        )
        params, state = optimizer.step(params, grads, state)
        reference.step({str(i): g for i, g in enumerate(optree.tree_leaves(grads))})
        assert optree.tree_structure(params) == spec
        got = {str(i): x for i, x in enumerate(optree.tree_leaves(params))}
        assert_trees_close(
            got, reference.params(), what=f"params step {k}", **TOLERANCES[torch.float64]
        )
        for field in fields:
            assert optree.tree_structure(state[field]) == spec
            got_state = {str(i): x for i, x in enumerate(optree.tree_leaves(state[field]))}
            assert_trees_close(
                got_state,
                reference.state_field(TORCH_NAMES[field]),
                what=field,
                **TOLERANCES[torch.float64],
            )
        assert int(state["step"]) == k + 1


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_none_grad_in_nested_tree(impl: str, inplace: bool) -> None:
    params = make_structure("nested", 62)
    optimizer = optorch.get_optimizer("adamw", weight_decay=0.1, impl=impl, inplace=inplace)
    state = optimizer.init(params)
    params, state = optimizer.step(params, make_grads(62, params), state)
    before_params, before_state = clone_tree(params), clone_tree(state)
    grads = make_grads(63, params)
    grads["encoder"]["layers"][1] = (None, grads["encoder"]["layers"][1][1])
    params, state = optimizer.step(params, grads, state)

    def frozen(tree: Any) -> torch.Tensor:
        return tree["encoder"]["layers"][1][0]

    assert torch.equal(frozen(params), frozen(before_params))
    for field in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(frozen(state[field]), frozen(before_state[field]))
        assert not torch.equal(state[field]["head"][0], before_state[field]["head"][0])
    assert not torch.equal(params["head"][0], before_params["head"][0])
    assert not torch.equal(
        params["encoder"]["layers"][1][1], before_params["encoder"]["layers"][1][1]
    )
    assert int(state["step"]) == 2


def test_none_params_are_skipped() -> None:
    params = {"w": torch.ones(3), "unused": None}
    grads = {"w": torch.ones(3), "unused": None}
    optimizer = optorch.get_optimizer("adam", max_lr=0.1)
    state = optimizer.init(params)
    assert state["exp_avg"]["unused"] is None
    params, state = optimizer.step(params, grads, state)
    assert params["unused"] is None and state["exp_avg"]["unused"] is None
    torch.testing.assert_close(params["w"], torch.full((3,), 0.9), rtol=1e-6, atol=1e-6)


def test_frozen_module_params_are_left_alone() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    params = dict(model.named_parameters())
    state = optorch.init_optimizer_state("sgd", model)
    assert "0.weight" not in state["momentum"]
    grads = {k: (torch.ones_like(v) if v.requires_grad else None) for k, v in params.items()}
    config = optorch.DEFAULT_OPTIMIZER_CONFIGS["sgd"]()
    for _ in range(2):
        params, state = optorch.OPTIMIZER_STEP["sgd"](params, grads, state, config)
    assert torch.equal(model[0].weight, frozen_before)
    assert not torch.equal(model[1].bias, torch.zeros(1))


# --------------------------------------------------------------------------------------
# malformed inputs: a clear error naming the leaf, and nothing modified
# --------------------------------------------------------------------------------------


def _base() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    params = {
        "enc": {
            "w": torch.randn(3, 2, generator=generator(64)),
            "b": torch.randn(3, generator=generator(65)),
        },
        "head": [torch.randn(2, generator=generator(66))],
    }
    grads = make_grads(67, params)
    state = optorch.init_optimizer_state("adam", params)
    # a step first, so that the state holds values worth protecting
    params, state = adam_step(params, grads, state, AdamConfig())
    return params, grads, state


def _drop(tree: dict[str, Any], *path: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    del tree[path[-1]]


def _set(tree: Any, value: Any, *path: Any) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def _mutate_grads(fn: Any) -> Any:
    def apply(params: Any, grads: Any, state: Any) -> tuple[Any, Any, Any]:
        grads = {"enc": dict(grads["enc"]), "head": list(grads["head"])}
        return params, fn(grads), state

    return apply


def _mutate_state(fn: Any) -> Any:
    def apply(params: Any, grads: Any, state: Any) -> tuple[Any, Any, Any]:
        state = dict(state)
        state["exp_avg"] = {
            "enc": dict(state["exp_avg"]["enc"]),
            "head": list(state["exp_avg"]["head"]),
        }
        return params, grads, fn(state)

    return apply


def _return(tree: Any, action: Any) -> Any:
    action(tree)
    return tree


BAD_INPUTS = [
    (
        "grads-missing-key",
        _mutate_grads(lambda g: _return(g, lambda t: _drop(t, "enc", "b"))),
        ValueError,
        r"grads do not match params.*\['enc'\]\['b'\].*missing",
    ),
    (
        "grads-extra-key",
        _mutate_grads(lambda g: _return(g, lambda t: _set(t, torch.zeros(1), "enc", "extra"))),
        ValueError,
        r"grads do not match params.*unexpected key \['enc'\]\['extra'\]",
    ),
    (
        "grads-list-vs-dict",
        lambda p, g, s: (p, [g["enc"]["b"], g["enc"]["w"], g["head"][0]], s),
        ValueError,
        r"grads do not match params.*dict vs list",
    ),
    (
        "grads-nested-length",
        _mutate_grads(lambda g: _return(g, lambda t: t["head"].append(torch.zeros(2)))),
        ValueError,
        r"grads do not match params.*\['head'\].*length 1 vs 2",
    ),
    (
        "grads-nested-container",
        _mutate_grads(lambda g: _return(g, lambda t: _set(t, {"x": t["head"][0]}, "head"))),
        ValueError,
        r"grads do not match params.*\['head'\]",
    ),
    (
        "grad-shape",
        _mutate_grads(lambda g: _return(g, lambda t: _set(t, torch.zeros(2, 3), "enc", "w"))),
        ValueError,
        r"grad at \['enc'\]\['w'\] has shape \(2, 3\).*\(3, 2\)",
    ),
    (
        "grad-dtype",
        _mutate_grads(
            lambda g: _return(g, lambda t: _set(t, torch.zeros(3, dtype=torch.float64), "enc", "b"))
        ),
        TypeError,
        r"grad at \['enc'\]\['b'\] has dtype torch.float64",
    ),
    (
        "grad-device",
        _mutate_grads(
            lambda g: _return(g, lambda t: _set(t, torch.zeros(2, device="meta"), "head", 0))
        ),
        ValueError,
        r"grad at \['head'\]\[0\] is on meta",
    ),
    (
        "state-extra-key",
        _mutate_state(
            lambda s: _return(s, lambda t: _set(t["exp_avg"], torch.zeros(1), "enc", "extra"))
        ),
        ValueError,
        r"exp_avg.*\['enc'\]\['extra'\]",
    ),
    (
        "state-missing-key",
        _mutate_state(lambda s: _return(s, lambda t: _drop(t["exp_avg"], "enc", "w"))),
        ValueError,
        r"\['enc'\]\['w'\].*exp_avg",
    ),
    (
        "state-list-vs-dict",
        _mutate_state(
            lambda s: _return(
                s, lambda t: _set(t, list(optree.tree_leaves(t["exp_avg"])), "exp_avg")
            )
        ),
        ValueError,
        r"exp_avg.*\[0\].*dict vs list",
    ),
    (
        "state-shape",
        _mutate_state(
            lambda s: _return(s, lambda t: _set(t["exp_avg"], torch.zeros(4), "enc", "b"))
        ),
        ValueError,
        r"state 'exp_avg' at \['enc'\]\['b'\] has shape \(4,\)",
    ),
    (
        "state-dtype",
        _mutate_state(
            lambda s: _return(
                s, lambda t: _set(t["exp_avg"], torch.zeros(2, dtype=torch.float16), "head", 0)
            )
        ),
        TypeError,
        r"state 'exp_avg' at \['head'\]\[0\] has dtype torch.float16",
    ),
    (
        "state-device",
        _mutate_state(
            lambda s: _return(
                s, lambda t: _set(t["exp_avg"], torch.zeros(3, 2, device="meta"), "enc", "w")
            )
        ),
        ValueError,
        r"state 'exp_avg' at \['enc'\]\['w'\] is on meta",
    ),
    (
        "state-of-another-optimizer",
        lambda p, g, s: (p, g, {**s, "momentum": s["exp_avg"]}),
        ValueError,
        r"unexpected field.*momentum",
    ),
    (
        "state-not-a-dict",
        lambda p, g, s: (p, g, [s["exp_avg"], s["exp_avg_sq"]]),
        TypeError,
        r"state must be a dict",
    ),
]


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize(
    ("case_id", "corrupt", "error", "pattern"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_inputs_raise_naming_the_leaf_and_modify_nothing(
    case_id: str, corrupt: Any, error: type[Exception], pattern: str, impl: str
) -> None:
    params, grads, state = _base()
    params, grads, state = corrupt(params, grads, state)
    params_before, state_before = clone_tree(params), clone_tree(state)
    config = AdamConfig(weight_decay=0.1, impl=impl)
    config_before = dataclasses.asdict(config)
    with pytest.raises(error, match=f"(?s){pattern}"):
        adam_step(params, grads, state, config)
    assert_trees_equal(params, params_before, what=f"{case_id} params")
    assert_trees_equal(state, state_before, what=f"{case_id} state")
    assert dataclasses.asdict(config) == config_before


# --------------------------------------------------------------------------------------
# seed-style state, config immutability
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
def test_seed_state_without_step_is_accepted(inplace: bool) -> None:
    params = make_params(68, torch.float64)
    grads = make_grads(68, params)
    seed_state = {
        "exp_avg": {k: torch.zeros_like(v) for k, v in params.items()},
        "exp_avg_sq": {k: torch.zeros_like(v) for k, v in params.items()},
    }
    config = AdamConfig(max_lr=0.01, inplace=inplace)
    fresh = optorch.init_optimizer_state("adam", params, config)
    want_params, want_state = adam_step(
        clone_tree(params), grads, fresh, config.replace(inplace=False)
    )
    params, state = adam_step(params, grads, seed_state, config)
    assert isinstance(state["step"], torch.Tensor) and int(state["step"]) == 1
    assert_trees_close(params, want_params, rtol=0, atol=0, what="params")
    for field in ("exp_avg", "exp_avg_sq"):
        assert_trees_close(state[field], want_state[field], rtol=0, atol=0, what=field)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "decoupled_adam", "lars"])
def test_config_never_mutated(name: str) -> None:
    params = make_params(69, torch.float32)
    config = optorch.DEFAULT_OPTIMIZER_CONFIGS[name](weight_decay=0.01, schedule=lambda k: 0.5)
    before = dataclasses.asdict(config)
    state = optorch.init_optimizer_state(name, params, config)
    for grads in grad_sequence(69, params, 3):
        params, state = optorch.OPTIMIZER_STEP[name](params, grads, state, config)
    assert dataclasses.asdict(config) == before


# --------------------------------------------------------------------------------------
# in place versus pure
# --------------------------------------------------------------------------------------

MODE_CASES = [
    ("sgd", {"momentum": 0.9, "weight_decay": 0.1}),
    ("adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("adamw", {"weight_decay": 0.1}),
    ("lars", {"weight_decay": 0.01, "trust_coefficient": 0.1}),
]


def _storages(tree: Any) -> list[tuple[int, int]]:
    return [
        (x.untyped_storage().data_ptr(), x.data_ptr())
        for x in optree.tree_leaves(tree)
        if isinstance(x, torch.Tensor)
    ]


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize(("name", "hyper"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_inplace_returns_the_same_tensors(name: str, hyper: dict[str, Any], impl: str) -> None:
    params = make_params(70, torch.float32)
    optimizer = optorch.get_optimizer(name, **hyper, impl=impl)
    state = optimizer.init(params)
    originals = clone_tree(params)
    tensor_ids = [id(x) for x in optree.tree_leaves([params, state])]
    storages = _storages([params, state])
    for grads in grad_sequence(70, params, 3):
        new_params, new_state = optimizer.step(params, grads, state)
        for key, tensor in params.items():
            assert new_params[key] is tensor
        assert [id(x) for x in optree.tree_leaves([new_params, new_state])] == tensor_ids
        assert _storages([new_params, new_state]) == storages
        params, state = new_params, new_state
    assert not torch.equal(params["layer.weight"], originals["layer.weight"])


@pytest.mark.parametrize(("name", "hyper"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_pure_step_is_differentiable(name: str, hyper: dict[str, Any]) -> None:
    """gradcheck of the new params (and state) w.r.t. the old params and the grads."""
    gen = generator(71)
    param = torch.randn(3, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    grad = torch.randn(3, 2, generator=gen, dtype=torch.float64).requires_grad_(True)
    optimizer = optorch.get_optimizer(name, **hyper, inplace=False, max_lr=0.05)
    # a state after two steps, so that every state field is nonzero and enters the update
    warm_params = {"w": param.detach().clone()}
    state = optimizer.init(warm_params)
    for grads in grad_sequence(71, warm_params, 2):
        warm_params, state = optimizer.step(warm_params, grads, state)
    state_before = clone_tree(state)

    def one_step(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        new_params, new_state = optimizer.step({"w": p}, {"w": g}, state)
        fields = [new_state[k]["w"] for k in new_state if k != "step"]
        return (new_params["w"], *fields)

    assert torch.autograd.gradcheck(one_step, (param, grad), eps=1e-6, atol=1e-5)
    new_param = one_step(param, grad)[0]
    (d_param,) = torch.autograd.grad(new_param.sum(), param)
    assert torch.isfinite(d_param).all() and d_param.abs().sum() > 0
    assert_trees_equal(state, state_before, what="state after pure steps")


def test_pure_sgd_gradient_is_the_identity_jacobian() -> None:
    """For plain SGD, d(p - lr g)/dp = I and d/dg = -lr I: the exact derivative."""
    param = torch.randn(4, generator=generator(72), dtype=torch.float64, requires_grad=True)
    grad = torch.randn(4, generator=generator(73), dtype=torch.float64, requires_grad=True)
    config = optorch.DEFAULT_OPTIMIZER_CONFIGS["sgd"](momentum=0.0, max_lr=0.3, inplace=False)
    new, _ = optorch.OPTIMIZER_STEP["sgd"](
        {"p": param}, {"p": grad}, optorch.init_optimizer_state("sgd", {"p": param}, config), config
    )
    d_param, d_grad = torch.autograd.grad(new["p"].sum(), (param, grad))
    torch.testing.assert_close(d_param, torch.ones(4, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(
        d_grad, torch.full((4,), -0.3, dtype=torch.float64), rtol=0, atol=1e-15
    )


# --------------------------------------------------------------------------------------
# low precision
# --------------------------------------------------------------------------------------

LOW_PRECISION = {torch.bfloat16: 0.05, torch.float16: 0.01}


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize(("name", "hyper"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_low_precision_params_keep_their_dtype(
    name: str, hyper: dict[str, Any], dtype: torch.dtype, impl: str
) -> None:
    params64 = make_params(74, torch.float64)
    params = {k: v.to(dtype) for k, v in params64.items()}
    # |g| >= 0.5: fp16 keeps (1 - beta2) g^2 above its smallest subnormal, so Adam's
    # denominator cannot underflow to eps (a property of fp16, not of the optimizer)
    grads_per_step = [
        {k: g.sign() * (0.5 + g.abs() % 1.0) for k, g in grads.items()}
        for grads in grad_sequence(74, params64, 3)
    ]
    optimizer = optorch.get_optimizer(name, **hyper, max_lr=0.05, impl=impl)
    exact = optorch.get_optimizer(name, **hyper, max_lr=0.05, impl="reference")
    state, state64 = optimizer.init(params), exact.init(params64)
    for grads in grads_per_step:
        params, state = optimizer.step(params, {k: g.to(dtype) for k, g in grads.items()}, state)
        params64, state64 = exact.step(params64, grads, state64)
    for tree in (params, *(state[k] for k in state if k != "step")):
        for key, tensor in tree.items():
            assert tensor.dtype == dtype, (key, tensor.dtype)
    tolerance = LOW_PRECISION[dtype]
    assert_trees_close(params, params64, rtol=tolerance, atol=tolerance, what=f"{dtype} params")


# --------------------------------------------------------------------------------------
# skip_if
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize(("name", "hyper"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_skip_if_true_is_bit_identical(
    name: str, hyper: dict[str, Any], impl: str, inplace: bool
) -> None:
    params = make_params(75, torch.float32)
    optimizer = optorch.get_optimizer(name, **hyper, impl=impl, inplace=inplace)
    state = optimizer.init(params)
    grads_per_step = grad_sequence(75, params, 3)
    params, state = optimizer.step(params, grads_per_step[0], state)
    before_params, before_state = clone_tree(params), clone_tree(state)
    skipped_params, skipped_state = optimizer.step(
        params, grads_per_step[1], state, skip_if=torch.tensor(True)
    )
    assert_trees_equal(skipped_params, before_params, what="params after a skipped step")
    assert_trees_equal(skipped_state, before_state, what="state after a skipped step")
    # a false gate is an ordinary step
    reference = optorch.get_optimizer(name, **hyper, impl="reference", inplace=False)
    want_params, want_state = reference.step(before_params, grads_per_step[2], before_state)
    got_params, got_state = optimizer.step(
        skipped_params, grads_per_step[2], skipped_state, skip_if=torch.tensor(False)
    )
    assert_trees_close(got_params, want_params, rtol=1e-6, atol=1e-7, what="params")
    assert_trees_close(got_state, want_state, rtol=1e-6, atol=1e-7, what="state")
    assert int(got_state["step"]) == 2


# --------------------------------------------------------------------------------------
# tensor-valued schedules keep dtypes
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize(("name", "hyper"), MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_tensor_schedule_keeps_param_and_state_dtypes(
    name: str, hyper: dict[str, Any], impl: str
) -> None:
    """A schedule may return a float64 0-d tensor (as a schedule of a tensor step does);
    a pure step must still return float32 params and state, 0-d params included."""
    params = make_params(76, torch.float32)
    optimizer = optorch.get_optimizer(
        name,
        **hyper,
        impl=impl,
        inplace=False,
        schedule=lambda step: torch.tensor(0.5, dtype=torch.float64),
    )
    state = optimizer.init(params)
    params, state = optimizer.step(params, make_grads(76, params), state)
    for tree in (params, *(state[k] for k in state if k != "step")):
        for key, tensor in tree.items():
            assert tensor.dtype == torch.float32, (key, tensor.dtype)
