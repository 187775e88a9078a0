"""Property-based tests (hypothesis) over random pytrees, shapes, dtypes and valid
hyperparameters, for every registry optimizer.

Each example draws an optimizer from ``optorch.REGISTRY``, a params pytree (dicts and
lists nested up to two levels, with 0-d and empty tensors; Muon gets 2-D matrices
only), a dtype (float32, float64, bfloat16, float16) and hyperparameters within their
valid ranges, then takes a few steps. Properties:

* every impl ("reference", "foreach") in every mode (in place, pure) equals the
  in-place reference run, params and state, within a tolerance per dtype;
* finite inputs give finite params and state (float16 examples use eps >= 1e-3 and
  gradients of magnitude >= 0.1: with eps = 1e-8, which float16 rounds to 0, a tiny
  gradient makes ``m / sqrt(v)`` overflow, in torch.optim too);
* the step count goes up by exactly one per step, and every state leaf keeps its
  dtype (the param's) and shape (the rule's ``state_shape``);
* ``skip_if=True`` leaves params and state, step count included, bit-identical.

``impl="compiled"`` is left to tests/test_engine_equivalence.py: compiling per example
would take seconds each.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from conftest import assert_trees_equal, clone_tree
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import optorch

EXAMPLES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
STEPS = 3
NAMES = sorted(optorch.REGISTRY)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TOLERANCE: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 3e-2, "atol": 3e-2},
    torch.float16: {"rtol": 5e-3, "atol": 5e-3},
}
WITH_BETAS = {
    "adam",
    "adamw",
    "decoupled_adam",
    "lion",
    "lamb",
    "adamax",
    "nadam",
    "radam",
    "schedule_free_adamw",
}
WITH_EPS = {
    "adam",
    "adamw",
    "decoupled_adam",
    "lamb",
    "lars",
    "adamax",
    "nadam",
    "radam",
    "rmsprop",
    "adagrad",
    "schedule_free_adamw",
}

# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------

any_shape = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
matrix_shape = st.tuples(st.integers(1, 4), st.integers(1, 4))
keys = st.sampled_from(["w", "b", "scale", "layer", "0", "emb"])


def trees(shape: st.SearchStrategy[tuple[int, ...]]) -> st.SearchStrategy[Any]:
    """Nested dicts/lists (at most two levels) whose leaves are shapes."""
    return st.recursive(
        shape,
        lambda children: st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
        ),
        max_leaves=4,
    )


def unit(high: float) -> st.SearchStrategy[float]:
    return st.floats(0.0, high, allow_nan=False, allow_infinity=False)


@st.composite
def hyperparameters(draw: st.DrawFn, name: str, dtype: torch.dtype) -> dict[str, Any]:
    hyper: dict[str, Any] = {"max_lr": draw(unit(0.1)), "weight_decay": draw(unit(0.1))}
    if name in WITH_BETAS:
        hyper["betas"] = (draw(unit(0.99)), draw(unit(0.999)))
    if name in WITH_EPS and dtype == torch.float16:
        hyper["eps"] = draw(st.floats(1e-3, 1e-2))
    if name == "sgd":
        hyper["momentum"] = draw(unit(0.99))
        hyper["nesterov"] = hyper["momentum"] > 0 and draw(st.booleans())
    if name == "rmsprop":
        hyper.update(momentum=draw(unit(0.9)), centered=draw(st.booleans()))
    if name == "lars":
        hyper["momentum"] = draw(unit(0.99))
    if name == "muon":
        hyper.update(momentum=draw(unit(0.99)), ns_dtype=None)
    if name == "adafactor":
        hyper["beta1"] = draw(st.one_of(st.none(), unit(0.9)))
    if name == "adam":
        hyper["amsgrad"] = draw(st.booleans())
    return hyper


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    name = draw(st.sampled_from(NAMES))
    dtype = draw(st.sampled_from(DTYPES))
    structure = draw(trees(matrix_shape if name == "muon" else any_shape))
    return {
        "name": name,
        "dtype": dtype,
        "structure": structure,
        "hyper": draw(hyperparameters(name, dtype)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


# --------------------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------------------


def _is_shape(node: Any) -> bool:
    return isinstance(node, tuple)


def _tensors(structure: Any, gen: torch.Generator, dtype: torch.dtype, *, low: float) -> Any:
    """A tensor per shape leaf: values of magnitude in [low, 2], random signs."""

    def make(shape: tuple[int, ...]) -> torch.Tensor:
        magnitude = low + (2.0 - low) * torch.rand(shape, generator=gen, dtype=torch.float64)
        sign = torch.randint(0, 2, shape, generator=gen).to(torch.float64) * 2 - 1
        return (magnitude * sign).to(dtype)

    return optree.tree_map(make, structure, is_leaf=_is_shape)


def _inputs(case: dict[str, Any]) -> tuple[Any, list[Any]]:
    gen = torch.Generator().manual_seed(case["seed"])
    dtype = case["dtype"]
    params = _tensors(case["structure"], gen, dtype, low=0.0)
    low = 0.1 if dtype == torch.float16 else 0.0
    grads = [_tensors(case["structure"], gen, dtype, low=low) for _ in range(STEPS)]
    return params, grads


def _run(case: dict[str, Any], impl: str, inplace: bool) -> tuple[Any, Any, list[int]]:
    opt = optorch.get_optimizer(case["name"], impl=impl, inplace=inplace, **case["hyper"])
    params, grads = _inputs(case)
    state = opt.init(params)
    counts = [int(state["step"])]
    for grad in grads:
        params, state = opt.step(params, grad, state)
        counts.append(int(state["step"]))
    return params, state, counts


def _assert_close(actual: Any, expected: Any, dtype: torch.dtype, what: str) -> None:
    a_paths, a_leaves, a_spec = optree.tree_flatten_with_path(actual, none_is_leaf=True)
    e_leaves, e_spec = optree.tree_flatten(expected, none_is_leaf=True)
    assert a_spec == e_spec, f"{what}: structure"
    for path, a, e in zip(a_paths, a_leaves, e_leaves, strict=True):
        if isinstance(e, torch.Tensor):
            tolerance = TOLERANCE.get(e.dtype, TOLERANCE[dtype])
            torch.testing.assert_close(a, e, equal_nan=False, msg=f"{what} at {path}", **tolerance)
        else:
            assert a == e, f"{what} at {path}"


# --------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------


@EXAMPLES
@given(case=cases())
def test_every_impl_and_mode_matches_the_reference(case: dict[str, Any]) -> None:
    event(f"{case['name']} {case['dtype']}")
    oracle = _run(case, "reference", inplace=True)
    for impl, inplace in (("reference", False), ("foreach", True), ("foreach", False)):
        other = _run(case, impl, inplace)
        what = f"{case['name']} {impl} inplace={inplace} {case['dtype']}"
        _assert_close(other[0], oracle[0], case["dtype"], f"{what} params")
        _assert_close(other[1], oracle[1], case["dtype"], f"{what} state")


@EXAMPLES
@given(case=cases(), impl=st.sampled_from(["reference", "foreach"]), inplace=st.booleans())
def test_finite_in_finite_out_and_state_invariants(
    case: dict[str, Any], impl: str, inplace: bool
) -> None:
    params, state, counts = _run(case, impl, inplace)
    assert counts == list(range(STEPS + 1))
    assert state["step"].dtype == torch.int64 and state["step"].dim() == 0
    opt = optorch.get_optimizer(case["name"], **case["hyper"])
    p_paths, p_leaves, _ = optree.tree_flatten_with_path(params, none_is_leaf=True)
    for path, param in zip(p_paths, p_leaves, strict=True):
        assert param.dtype == case["dtype"], path
        assert bool(param.isfinite().all()), f"{case['name']}: non-finite param at {path}"
    for field in opt.rule.fields(opt.config):
        s_paths, s_leaves, _ = optree.tree_flatten_with_path(state[field], none_is_leaf=True)
        assert s_paths == p_paths, field
        for path, leaf, param in zip(s_paths, s_leaves, p_leaves, strict=True):
            expected_shape = tuple(opt.rule.state_shape(field, param, opt.config))
            assert (leaf.dtype, tuple(leaf.shape)) == (case["dtype"], expected_shape), (
                f"{field} at {path}"
            )
            assert bool(leaf.isfinite().all()), f"{case['name']}: non-finite {field} at {path}"


@EXAMPLES
@given(case=cases(), impl=st.sampled_from(["reference", "foreach"]), inplace=st.booleans())
def test_skip_if_true_changes_no_bit(case: dict[str, Any], impl: str, inplace: bool) -> None:
    opt = optorch.get_optimizer(case["name"], impl=impl, inplace=inplace, **case["hyper"])
    params, grads = _inputs(case)
    state = opt.init(params)
    params, state = opt.step(params, grads[0], state)
    before = clone_tree((params, state))
    new_params, new_state = opt.step(params, grads[1], state, skip_if=torch.tensor(True))
    assert_trees_equal((new_params, new_state), before, what="after a skipped step")
    assert_trees_equal((params, state), before, what="inputs of a skipped step")
