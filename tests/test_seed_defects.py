"""One test (or a few) per defect of the seed (``/work/shared/SEED_API.md``, 1-12).

Each test fails on the seed's behaviour and passes on the fixed one:

1. SGD dropped weight decay with momentum > 0, and crashed with momentum 0 and no decay.
2. LARS changed nothing (it rebound local names) and had no zero-norm guard.
3. Decoupled Adam ignored the schedule value (and its test used no decay).
4. Adam ``ORIGINAL`` modified the caller's grads in place.
5. ``lr_schedule_value`` was typed as a callable but used as a float.
6. Bias correction allocated a tensor per param per step for a scalar.
7. The step counter lived in the config and was mutated by the step.
8. Loss scaler NaN handling: tested with :mod:`optorch.amp` (tests/test_amp*.py).
9. Schedules past their end: tested with :mod:`optorch.schedule` (its own tests).
10. State built for frozen params; ``None`` grads reaching the update; list params vs
    dict state not matched.
11. Test-only packages as runtime dependencies; a test path that did not exist; linters
    configured but never run.
12. Tests compared one step, no state, no fixed seed, loose tolerances. Nothing to add
    here: every reference test of this suite runs 20 steps with fixed seeds, compares
    params *and* state, and uses explicit tolerances (``conftest.TOLERANCES``: 1e-12 in
    float64, 1e-6 in float32), tight enough to catch defect 1 (see
    :func:`test_1_sgd_weight_decay_with_momentum_matches_torch`).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
from conftest import (
    TOLERANCES,
    TorchReference,
    assert_matches_torch,
    assert_trees_equal,
    clone_tree,
    grad_sequence,
    make_grads,
    make_params,
)
from torch.utils._python_dispatch import TorchDispatchMode

import optorch
import optorch.adam
from optorch.adam import AdamConfig, AdamWDMode, adam, adam_step
from optorch.lars import LARSConfig, lars, lars_step
from optorch.sgd import SGDConfig, default_sgd_state, sgd, sgd_step

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------
# 1. SGD weight decay with momentum; momentum 0 without decay
# --------------------------------------------------------------------------------------


def test_1_sgd_weight_decay_with_momentum_matches_torch() -> None:
    params = make_params(31, torch.float64)
    grads_per_step = grad_sequence(31, params, 5)
    config = SGDConfig(momentum=0.9, weight_decay=0.1, max_lr=0.1)
    reference = TorchReference(torch.optim.SGD, params, lr=0.1, momentum=0.9, weight_decay=0.1)
    state = default_sgd_state(params)
    for k, grads in enumerate(grads_per_step):
        params, state = sgd_step(params, grads, state, config)
        reference.step(grads)
        assert_matches_torch(
            params,
            state,
            reference,
            ("momentum",),
            step_count=k + 1,
            torch_has_step=False,
            **TOLERANCES[torch.float64],
        )


def test_1_sgd_weight_decay_changes_the_result_with_momentum() -> None:
    params = make_params(32, torch.float64)
    grads = make_grads(32, params)
    results = []
    for weight_decay in (0.0, 0.1):
        config = SGDConfig(momentum=0.9, weight_decay=weight_decay, inplace=False)
        new, _ = sgd_step(params, grads, default_sgd_state(params), config)
        results.append(new)
    for name, p in params.items():
        # one step: p - lr * (g + wd * p), the decay part is exactly lr * wd * p
        torch.testing.assert_close(
            results[0][name] - results[1][name], 0.1 * 0.1 * p, rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("entry", ["sgd_step", "sgd"])
def test_1_sgd_without_momentum_or_decay_runs(entry: str) -> None:
    params = make_params(33, torch.float64)
    grads = make_grads(33, params)
    expected = {k: p - 0.1 * grads[k] for k, p in params.items()}
    config = SGDConfig(momentum=0.0, weight_decay=0.0, max_lr=0.1)
    if entry == "sgd_step":
        params, _ = sgd_step(params, grads, default_sgd_state(params), config)
    else:
        params, _ = sgd(params, grads, optorch.common.zero_init_like(params), config)
    for name in params:
        torch.testing.assert_close(params[name], expected[name], rtol=1e-15, atol=1e-15)


# --------------------------------------------------------------------------------------
# 2. LARS changes the caller's params; zero-norm guard
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["lars_step", "lars"])
def test_2_lars_updates_the_params_in_place(entry: str) -> None:
    params = make_params(34, torch.float64)
    originals = clone_tree(params)
    tensors = dict(params)
    grads = make_grads(34, params)
    config = LARSConfig(momentum=0.9, weight_decay=0.01)
    if entry == "lars_step":
        state = optorch.init_optimizer_state("lars", params)
        out, state = lars_step(params, grads, state, config)
        momentum = state["momentum"]
    else:
        momentum = optorch.common.zero_init_like(params)
        out, momentum = lars(params, grads, momentum, config)
    for name, tensor in tensors.items():
        assert out[name] is tensor
        assert not torch.equal(tensor, originals[name]), f"LARS left {name} unchanged"
        assert momentum[name].abs().sum() > 0


def test_2_lars_zero_norm_guard() -> None:
    """||p|| = 0 or ||d|| = 0 gives trust ratio 1 and finite values, even with eps = 0."""
    params = {
        "zero_param": torch.zeros(2, 3, dtype=torch.float64),
        "zero_both": torch.zeros(3, 2, dtype=torch.float64),
    }
    grads = {
        "zero_param": torch.arange(6, dtype=torch.float64).reshape(2, 3),
        "zero_both": torch.zeros(3, 2, dtype=torch.float64),
    }
    config = LARSConfig(max_lr=0.5, momentum=0.0, trust_coefficient=0.001, eps=0.0)
    state = optorch.init_optimizer_state("lars", params, config)
    out, state = lars_step(params, grads, state, config)
    torch.testing.assert_close(out["zero_param"], -0.5 * grads["zero_param"], rtol=0, atol=1e-15)
    assert torch.equal(out["zero_both"], torch.zeros(3, 2, dtype=torch.float64))
    for field in (out, state["momentum"]):
        for name, tensor in field.items():
            assert torch.isfinite(tensor).all(), name


# --------------------------------------------------------------------------------------
# 3. decoupled Adam uses the schedule value (with nonzero decay)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule_value", [1.0, 0.5, 0.0])
def test_3_decoupled_adam_decay_follows_the_schedule(schedule_value: float) -> None:
    weight_decay = 0.1
    params = {"w": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}
    zero_grads = {"w": torch.zeros(3, dtype=torch.float64)}  # Adam's own update is exactly 0
    config = AdamConfig(
        max_lr=0.01,
        weight_decay=weight_decay,
        mode=AdamWDMode.DECOUPLED,
        lr_schedule_value=schedule_value,
        inplace=False,
    )
    state = optorch.init_optimizer_state("decoupled_adam", params)
    out, _ = adam_step(params, zero_grads, state, config)
    expected = params["w"] * (1.0 - weight_decay * schedule_value)
    torch.testing.assert_close(out["w"], expected, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------------
# 4. Adam (ORIGINAL) leaves the caller's grads alone
# --------------------------------------------------------------------------------------

GRAD_PRESERVING = [
    ("adam", {"weight_decay": 0.1}),
    ("adam", {"weight_decay": 0.1, "maximize": True, "amsgrad": True}),
    ("adamw", {"weight_decay": 0.1, "maximize": True}),
    ("sgd", {"weight_decay": 0.1, "maximize": True}),
    ("lars", {"weight_decay": 0.1}),
]


@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize(("name", "hyper"), GRAD_PRESERVING, ids=lambda x: str(x))
def test_4_step_does_not_modify_grads(name: str, hyper: dict[str, Any], impl: str) -> None:
    params = make_params(35, torch.float32)
    grads = make_grads(35, params)
    grads_before = clone_tree(grads)
    optimizer = optorch.get_optimizer(name, **hyper, impl=impl)
    state = optimizer.init(params)
    for _ in range(3):
        params, state = optimizer.step(params, grads, state)
    assert_trees_equal(grads, grads_before, what="grads")


def test_4_seed_adam_function_does_not_modify_grads() -> None:
    params = make_params(36, torch.float32)
    grads = make_grads(36, params)
    grads_before = clone_tree(grads)
    config = AdamConfig(weight_decay=0.1, mode="ORIGINAL")
    state = optorch.adam.default_adam_state(params)
    adam(params, grads, state["exp_avg"], state["exp_avg_sq"], config)
    assert_trees_equal(grads, grads_before, what="grads")


# --------------------------------------------------------------------------------------
# 5. lr_schedule_value is a float
# --------------------------------------------------------------------------------------

CONFIG_TYPES = [SGDConfig, AdamConfig, LARSConfig]


@pytest.mark.parametrize("config_type", CONFIG_TYPES, ids=lambda c: c.__name__)
def test_5_lr_schedule_value_is_typed_as_a_float(config_type: type) -> None:
    hints = typing.get_type_hints(config_type)
    assert hints["lr_schedule_value"] == (float | None)


@pytest.mark.parametrize("config_type", CONFIG_TYPES, ids=lambda c: c.__name__)
def test_5_callable_lr_schedule_value_points_to_schedule(config_type: type) -> None:
    with pytest.raises(TypeError, match=r"lr_schedule_value.*`schedule=`"):
        config_type(lr_schedule_value=lambda step: 1.0)


def test_5_callable_set_later_is_rejected_at_the_step() -> None:
    params = make_params(37, torch.float32)
    config = SGDConfig(momentum=0.0)
    config.lr_schedule_value = lambda step: 1.0  # type: ignore[assignment]
    before = clone_tree(params)
    with pytest.raises(TypeError, match=r"`schedule=`"):
        sgd_step(params, make_grads(37, params), default_sgd_state(params), config)
    assert_trees_equal(params, before, what="params after a rejected step")


def test_5_float_lr_schedule_value_scales_the_lr() -> None:
    params = make_params(38, torch.float64)
    grads = make_grads(38, params)
    config = SGDConfig(momentum=0.0, max_lr=0.2, lr_schedule_value=0.25, inplace=False)
    out, _ = sgd_step(params, grads, default_sgd_state(params), config)
    for name, p in params.items():
        torch.testing.assert_close(out[name], p - 0.05 * grads[name], rtol=1e-15, atol=1e-15)


# --------------------------------------------------------------------------------------
# 6. bias correction is scalar math, not a tensor per param
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(AdamWDMode), ids=lambda m: m.name)
def test_6_adam_scalars_are_python_numbers(mode: AdamWDMode) -> None:
    config = AdamConfig(mode=mode, weight_decay=0.1, amsgrad=True)
    values = optorch.adam.RULE.scalars(config, 3, 1e-3, 1.0)
    for key, value in values.items():
        assert type(value) in (float, int), f"{key} is {type(value).__name__}"
    torch.testing.assert_close(values["bias_correction2_sqrt"], (1 - 0.999**3) ** 0.5)
    torch.testing.assert_close(values["step_size"], 1e-3 / (1 - 0.9**3))


class _OpRecorder(TorchDispatchMode):
    """Records every aten op and the shapes of the tensors it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (list, tuple)) else [out]
        self.calls.append(
            (str(func), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)])
        )
        return out


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_6_adam_cpu_step_allocates_no_scalar_tensors(impl: str) -> None:
    """A CPU step makes no factory call; the only 0-d tensor op is the step count's add_."""
    params = make_params(39, torch.float32, {"weight": (4, 3), "bias": (5,)})
    grads = make_grads(39, params)
    config = AdamConfig(weight_decay=0.1, impl=impl)
    state = optorch.init_optimizer_state("adam", params, config)
    adam_step(params, grads, state, config)
    with _OpRecorder() as recorder:
        adam_step(params, grads, state, config)
    factory = re.compile(r"full|scalar_tensor|lift_fresh|ones|zeros|empty|arange|tensor\.")
    assert not [c for c in recorder.calls if factory.search(c[0])], recorder.calls
    # no param here is 0-d: a 0-d result can only be the step count's increment
    zero_dim = [name for name, shapes in recorder.calls if () in shapes]
    assert zero_dim == ["aten.add_.Tensor"], recorder.calls


# --------------------------------------------------------------------------------------
# 7. the step count lives in the state; the config is never mutated
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hyper"),
    [
        ("sgd", {"momentum": 0.9}),
        ("adam", {"amsgrad": True}),
        ("decoupled_adam", {"weight_decay": 0.1}),
        ("lars", {}),
    ],
    ids=lambda x: str(x),
)
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
def test_7_step_count_in_state_config_unchanged(
    name: str, hyper: dict[str, Any], inplace: bool
) -> None:
    params = make_params(40, torch.float32)
    config = optorch.DEFAULT_OPTIMIZER_CONFIGS[name](
        **hyper, inplace=inplace, lr_schedule_value=0.5
    )
    before = dataclasses.asdict(config)
    state = optorch.init_optimizer_state(name, params, config)
    step = optorch.OPTIMIZER_STEP[name]
    for k, grads in enumerate(grad_sequence(40, params, 3)):
        params, state = step(params, grads, state, config)
        assert isinstance(state["step"], torch.Tensor)
        assert int(state["step"]) == k + 1
    assert dataclasses.asdict(config) == before
    assert config.steps == 0


def test_7_seed_update_functions_leave_config_steps_alone() -> None:
    params = make_params(41, torch.float32)
    grads = make_grads(41, params)
    config = AdamConfig(steps=4)
    before = dataclasses.asdict(config)
    state = optorch.adam.default_adam_state(params)
    adam(params, grads, state["exp_avg"], state["exp_avg_sq"], config)
    sgd_config = SGDConfig()
    sgd_before = dataclasses.asdict(sgd_config)
    sgd(params, grads, optorch.common.zero_init_like(params), sgd_config)
    assert dataclasses.asdict(config) == before
    assert dataclasses.asdict(sgd_config) == sgd_before


# --------------------------------------------------------------------------------------
# 10. frozen params, None grads, list params vs dict state
# --------------------------------------------------------------------------------------


class _PartlyFrozen(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Parameter(torch.randn(5, 3), requires_grad=False)
        self.linear = torch.nn.Linear(3, 2)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "lars", "decoupled_adam"])
def test_10_no_state_for_frozen_params(name: str) -> None:
    model = _PartlyFrozen()
    state = optorch.init_optimizer_state(name, model)
    fields = [k for k in state if k != "step"]
    assert fields, f"{name} created no state field"
    for field in fields:
        assert set(state[field]) == {"linear.weight", "linear.bias"}, (field, sorted(state[field]))
    assert set(optorch.common.zero_init_like(model)) == {"linear.weight", "linear.bias"}


def test_10_frozen_params_can_be_stepped_with_their_state_missing() -> None:
    model = _PartlyFrozen()
    frozen_before = model.embedding.detach().clone()
    params = dict(model.named_parameters())
    grads = {k: (torch.ones_like(v) if v.requires_grad else None) for k, v in params.items()}
    state = optorch.init_optimizer_state("adamw", model)
    config = optorch.DEFAULT_OPTIMIZER_CONFIGS["adamw"](weight_decay=0.1)
    params, state = optorch.OPTIMIZER_STEP["adamw"](params, grads, state, config)
    assert torch.equal(model.embedding, frozen_before)
    assert "embedding" not in state["exp_avg"]
    assert int(state["step"]) == 1


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_10_none_grad_leaves_param_and_state_untouched(name: str, inplace: bool) -> None:
    params = make_params(42, torch.float32)
    optimizer = optorch.get_optimizer(name, weight_decay=0.1, inplace=inplace)
    state = optimizer.init(params)
    grads = make_grads(42, params)
    params, state = optimizer.step(params, grads, state)  # nonzero state everywhere
    before_params, before_state = clone_tree(params), clone_tree(state)
    grads = make_grads(43, params)
    grads["layer.bias"] = None
    params, state = optimizer.step(params, grads, state)
    assert torch.equal(params["layer.bias"], before_params["layer.bias"])
    # its own step count stays too (torch.optim's per-param step): AdamW's bias
    # correction reads it; SGD and LARS read none
    skipped = state.pop("skipped_steps", None)
    if name == "adamw":
        assert skipped is not None
        assert {k: None if v is None else int(v) for k, v in skipped.items()} == {
            k: 1 if k == "layer.bias" else 0 for k in params
        }
    else:
        assert skipped is None
    fields = [k for k in state if k != "step"]
    for field in fields:
        assert torch.equal(state[field]["layer.bias"], before_state[field]["layer.bias"])
        assert not torch.equal(state[field]["layer.weight"], before_state[field]["layer.weight"])
    assert not torch.equal(params["layer.weight"], before_params["layer.weight"])


def test_10_list_params_with_dict_state_is_an_error() -> None:
    named = make_params(44, torch.float32)
    state = optorch.init_optimizer_state("adam", named)
    params = list(named.values())
    grads = list(make_grads(44, named).values())
    before = clone_tree([params, state])
    with pytest.raises(ValueError, match=r"(?s)exp_avg.*\['conv\.weight'\].*list vs dict"):
        adam_step(params, grads, state, AdamConfig())
    assert_trees_equal([params, state], before, what="inputs after a rejected step")


# --------------------------------------------------------------------------------------
# 11. packaging: runtime dependencies, test paths, linters in the test target
# --------------------------------------------------------------------------------------


def _requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return match.group(1).lower().replace("_", "-")


def test_11_runtime_dependencies_are_torch_and_optree_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {_requirement_name(r) for r in project["dependencies"]}
    assert names == {"torch", "optree"}


def test_11_testpaths_exist() -> None:
    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"
    ]
    paths = pytest_options["testpaths"]
    assert paths, "no testpaths configured"
    doctests = "--doctest-modules" in pytest_options.get("addopts", "")
    for path in paths:
        assert (ROOT / path).is_dir(), f"testpaths entry {path!r} does not exist"
        # a folder of tests, or of modules whose docstring examples run as doctests
        holds_tests = any((ROOT / path).glob("test_*.py"))
        holds_doctests = doctests and any((ROOT / path).glob("*.py"))
        assert holds_tests or holds_doctests, f"nothing to test under {path!r}"
    assert any(any((ROOT / p).glob("test_*.py")) for p in paths), "no test files at all"


def _make_rules(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """target -> (prerequisites, recipe lines) for a simple Makefile."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("\t"):
            for target in current:
                rules[target][1].append(line.strip())
            continue
        match = re.match(r"^([^\s:=#][^:=]*?)\s*:(?!=)\s*(.*)$", line)
        if match:
            targets = match.group(1).split()
            prerequisites = match.group(2).split("|")[0].split("#")[0].split()
            current = targets
            for target in targets:
                rules.setdefault(target, ([], []))[0].extend(prerequisites)
        elif line.strip() and not line.startswith("#"):
            current = []
    return rules


def _recipes_of(rules: dict[str, tuple[list[str], list[str]]], target: str) -> list[str]:
    seen: set[str] = set()
    lines: list[str] = []

    def visit(name: str) -> None:
        if name in seen or name not in rules:
            return
        seen.add(name)
        prerequisites, recipe = rules[name]
        for prerequisite in prerequisites:
            visit(prerequisite)
        lines.extend(recipe)

    visit(target)
    return lines


def test_11_make_test_runs_ruff_mypy_and_pytest() -> None:
    rules = _make_rules((ROOT / "Makefile").read_text())
    recipes = " \n".join(_recipes_of(rules, "test"))
    assert re.search(r"\bruff\b.*\bcheck\b", recipes), recipes
    assert re.search(r"\bruff\b.*\bformat\b", recipes), recipes
    assert re.search(r"\bmypy\b", recipes), recipes
    assert re.search(r"\bpytest\b", recipes), recipes
