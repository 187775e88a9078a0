"""The registry: every name builds and steps; errors name the choices; the seed's dicts
are live views of :data:`optorch.builder.REGISTRY`; config-dependent state."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from conftest import assert_trees_equal, clone_tree, grad_sequence, make_params

import optorch
from optorch.builder import (
    DEFAULT_OPTIMIZER_CONFIGS,
    DEFAULT_OPTIMIZER_STATES,
    OPTIMIZER_STEP,
    REGISTRY,
    get_optimizer,
    get_optimizer_step,
    init_optimizer_state,
    register,
)

#: 2-D weights only: every registered optimizer takes these (Muon takes nothing else).
MATRICES = {"encoder.weight": (4, 3), "decoder.weight": (3, 5)}
SEED_NAMES = ["adam", "adamw", "decoupled_adam", "lars", "sgd"]


def test_seed_names_are_registered() -> None:
    assert set(SEED_NAMES) <= set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_registered_optimizer_builds_inits_and_steps(name: str) -> None:
    optimizer = get_optimizer(name)
    assert isinstance(optimizer, optorch.Optimizer)
    assert optimizer.name == REGISTRY[name].rule.name
    config_before = dataclasses.asdict(optimizer.config)
    params = make_params(91, torch.float32, MATRICES)
    originals = clone_tree(params)
    state = optimizer.init(params)
    assert int(state["step"]) == 0
    for grads in grad_sequence(91, params, 3):
        params, state = optimizer.step(params, grads, state)
    assert int(state["step"]) == 3
    assert dataclasses.asdict(optimizer.config) == config_before
    for key, tensor in params.items():
        assert torch.isfinite(tensor).all(), key
        assert not torch.equal(tensor, originals[key]), f"{name} left {key} unchanged"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_seed_dict_entries_step_like_get_optimizer(name: str) -> None:
    params = make_params(92, torch.float64, MATRICES)
    grads = grad_sequence(92, params, 2)
    config = DEFAULT_OPTIMIZER_CONFIGS[name](inplace=False)
    state = DEFAULT_OPTIMIZER_STATES[name](params)
    optimizer = get_optimizer(name, inplace=False)
    other_state = optimizer.init(params)
    p, q = params, params
    for g in grads:
        p, state = OPTIMIZER_STEP[name](p, g, state, config)
        q, other_state = optimizer.step(q, g, other_state)
    for key in params:
        assert torch.equal(p[key], q[key]), key


@pytest.mark.parametrize(
    ("wrong", "closest"),
    [("adamww", "adamw"), ("sgdd", "sgd"), ("lars2", "lars"), ("decoupled_adm", "decoupled_adam")],
)
def test_unknown_name_lists_known_names_and_the_closest(wrong: str, closest: str) -> None:
    for entry in (get_optimizer, get_optimizer_step, lambda n: init_optimizer_state(n, {})):
        with pytest.raises(ValueError, match=f"did you mean '{closest}'") as info:
            entry(wrong)
        for known in SEED_NAMES:
            assert repr(known) in str(info.value)
    with pytest.raises(ValueError, match=f"did you mean '{closest}'"):
        OPTIMIZER_STEP[wrong]


def test_unknown_name_without_a_close_match() -> None:
    with pytest.raises(ValueError, match=r"Unknown optimizer 'zzzz'.*Known optimizers: \[") as info:
        get_optimizer("zzzz")
    assert "did you mean" not in str(info.value)


def test_name_must_be_a_string() -> None:
    with pytest.raises(TypeError, match="must be a string"):
        get_optimizer(3)  # type: ignore[arg-type]


def test_seed_dicts_have_the_registry_keys() -> None:
    for view in (DEFAULT_OPTIMIZER_CONFIGS, DEFAULT_OPTIMIZER_STATES, OPTIMIZER_STEP):
        assert list(view) == list(REGISTRY)
        assert len(view) == len(REGISTRY)
    assert DEFAULT_OPTIMIZER_CONFIGS["adamw"]().mode is optorch.AdamWDMode.ADAMW
    assert DEFAULT_OPTIMIZER_CONFIGS["decoupled_adam"]().mode is optorch.AdamWDMode.DECOUPLED
    assert DEFAULT_OPTIMIZER_CONFIGS["adam"]().mode is optorch.AdamWDMode.ORIGINAL


def test_seed_dicts_are_read_only() -> None:
    with pytest.raises(TypeError):
        DEFAULT_OPTIMIZER_CONFIGS["mine"] = optorch.SGDConfig  # type: ignore[index]


@pytest.fixture
def temporary_entry() -> Iterator[str]:
    name = "test_registry_plain_sgd"
    register(name, optorch.sgd.RULE, defaults={"momentum": 0.0}, summary="test only")
    try:
        yield name
    finally:
        REGISTRY.pop(name, None)


def test_registered_later_appears_in_every_view(temporary_entry: str) -> None:
    name = temporary_entry
    for view in (DEFAULT_OPTIMIZER_CONFIGS, DEFAULT_OPTIMIZER_STATES, OPTIMIZER_STEP):
        assert name in list(view)
    config = DEFAULT_OPTIMIZER_CONFIGS[name](max_lr=0.5)
    assert config.momentum == 0.0
    params = {"w": torch.ones(2)}
    state = DEFAULT_OPTIMIZER_STATES[name](params)
    params, state = OPTIMIZER_STEP[name](params, {"w": torch.ones(2)}, state, config)
    torch.testing.assert_close(params["w"], torch.full((2,), 0.5), rtol=0, atol=0)
    with pytest.raises(ValueError, match="already registered"):
        register(name, optorch.sgd.RULE)
    del REGISTRY[name]
    for view in (DEFAULT_OPTIMIZER_CONFIGS, DEFAULT_OPTIMIZER_STATES, OPTIMIZER_STEP):
        assert name not in list(view)


@pytest.mark.parametrize(
    "view", [DEFAULT_OPTIMIZER_CONFIGS, DEFAULT_OPTIMIZER_STATES, OPTIMIZER_STEP]
)
def test_seed_dicts_answer_membership_like_dicts(view: Mapping[str, Any]) -> None:
    """``name in OPTIMIZER_STEP`` and ``.get`` work as on the seed's plain dicts."""
    assert ("sgd" in view) is True
    assert ("no_such_optimizer" in view) is False
    assert view.get("no_such_optimizer") is None


@pytest.mark.parametrize(
    "view", [DEFAULT_OPTIMIZER_CONFIGS, DEFAULT_OPTIMIZER_STATES, OPTIMIZER_STEP]
)
@pytest.mark.parametrize(
    ("alias", "name"), [("AdamW", "adamw"), ("decoupled-adam", "decoupled_adam")]
)
def test_seed_dicts_take_the_names_get_optimizer_takes(
    view: Mapping[str, Any], alias: str, name: str
) -> None:
    assert alias in view
    assert alias not in list(view)  # iteration yields the registry's own names
    params = {"w": torch.ones(2)}
    if view is OPTIMIZER_STEP:
        config = DEFAULT_OPTIMIZER_CONFIGS[name](weight_decay=0.5)
        grads = {"w": torch.full((2,), 0.5)}
        results = [
            view[key](clone_tree(params), grads, DEFAULT_OPTIMIZER_STATES[name](params), config)
            for key in (alias, name)
        ]
        assert_trees_equal(*results)
    elif view is DEFAULT_OPTIMIZER_CONFIGS:
        assert view[alias]() == view[name]()
    else:
        assert_trees_equal(view[alias](params), view[name](params))


def test_amsgrad_state_with_and_without_config() -> None:
    model = torch.nn.Linear(3, 2)
    config = DEFAULT_OPTIMIZER_CONFIGS["adamw"](amsgrad=True)
    upfront = init_optimizer_state("adamw", model, config)
    assert set(upfront) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert set(upfront["max_exp_avg_sq"]) == {"weight", "bias"}

    lazy = init_optimizer_state("adamw", model)
    assert "max_exp_avg_sq" not in lazy
    params = dict(model.named_parameters())
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    params_copy = {k: v.detach().clone() for k, v in params.items()}
    params, lazy = OPTIMIZER_STEP["adamw"](params, grads, lazy, config)
    assert set(lazy["max_exp_avg_sq"]) == {"weight", "bias"}

    # the lazily created field gives the same step as the one created up front
    pure = config.replace(inplace=False)
    want, want_state = OPTIMIZER_STEP["adamw"](params_copy, grads, upfront, pure)
    for key in want:
        assert torch.equal(params[key], want[key])
        assert torch.equal(lazy["max_exp_avg_sq"][key], want_state["max_exp_avg_sq"][key])


def test_init_with_a_config_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="needs a AdamConfig"):
        init_optimizer_state("adamw", torch.nn.Linear(2, 2), optorch.SGDConfig())


@pytest.mark.parametrize("name", SEED_NAMES)
def test_get_optimizer_step_signature(name: str) -> None:
    step = get_optimizer_step(name)
    assert callable(step)
    parameters = list(inspect.signature(step).parameters)
    assert len(parameters) == 4, parameters
    params = {"w": torch.ones(3)}
    config = DEFAULT_OPTIMIZER_CONFIGS[name]()
    state = init_optimizer_state(name, params, config)
    new_params, new_state = step(params, {"w": torch.ones(3)}, state, config)
    assert int(new_state["step"]) == 1
    assert not torch.equal(new_params["w"], torch.ones(3))
