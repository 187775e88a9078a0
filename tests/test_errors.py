"""Table-driven error cases: the inputs users get wrong, for every public entry point.

Each case is ``(builder, inputs, error type, message regex)``. Every case asserts the
error type, a message that names the bad field or leaf path and/or the bad value, and,
for cases that reach a step, that params, grads and state are bit-identical afterwards
(an in-place step that raises must raise before it writes anything).

Tables:

* ``CONFIG_CASES``: hyperparameters of every registry optimizer (``optorch.REGISTRY``);
* ``STEP_CASES``: every registry optimizer x every malformed (params, grads, state);
* ``FOREIGN_STATE_CASES``: the state of one optimizer passed to another;
* ``WRAPPER_CASES`` / ``WRAPPER_STEP_CASES``: wrapper arguments and wrapper steps;
* ``SCHEDULE_CASES``, ``AMP_CASES``, ``CHECKPOINT_CASES``;
* the command line (``optorch demo``): one line on stderr, exit code 2, no traceback.
"""

from __future__ import annotations

import collections
import math
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optree
import pytest
import torch
from conftest import assert_trees_equal, clone_tree

import optorch
from optorch import amp, schedule, wrappers
from optorch.cli import main as cli_main

NAN = float("nan")
INF = float("inf")
REGISTRY_NAMES = sorted(optorch.REGISTRY)

# --------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------


def _params_for(name: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Nested params; Muon only takes 2-D weights, the others also get a 1-D bias."""
    gen = torch.Generator().manual_seed(7)
    second = (2, 2) if name == "muon" else (2,)
    return {
        "layer": {"w": torch.randn(3, 2, generator=gen, dtype=dtype)},
        "b": torch.randn(*second, generator=gen, dtype=dtype),
    }


def _grads_like(params: Any, seed: int = 11) -> Any:
    gen = torch.Generator().manual_seed(seed)
    return optree.tree_map(
        lambda p: torch.randn(p.shape, generator=gen, dtype=p.dtype), params, none_is_leaf=True
    )


def _dense(tree: Any) -> Any:
    """Sparse leaves as dense tensors, for a bit-identity check."""
    return optree.tree_map(
        lambda t: t.to_dense() if isinstance(t, torch.Tensor) and t.is_sparse else t,
        tree,
        none_is_leaf=True,
    )


def _first_field(opt: Any) -> str:
    return opt.rule.fields(opt.config)[0]


@dataclass(frozen=True)
class StepInputs:
    """What a step is called with, plus the trees that must come out bit-identical."""

    stepper: Any
    params: Any
    grads: Any
    state: Any
    kwargs: dict[str, Any]
    watched: tuple[Any, ...]


def _assert_step_raises(
    inputs: StepInputs, error: type[BaseException] | tuple[type[BaseException], ...], match: str
) -> None:
    before = [clone_tree(tree) for tree in inputs.watched]
    with pytest.raises(error, match=match):
        inputs.stepper.step(inputs.params, inputs.grads, inputs.state, **inputs.kwargs)
    for index, (tree, copy) in enumerate(zip(inputs.watched, before, strict=True)):
        assert_trees_equal(tree, copy, what=f"watched input #{index} after the failed step")


# --------------------------------------------------------------------------------------
# configs of every registry optimizer
# --------------------------------------------------------------------------------------

# (registry name, kwargs, error, message regex)
ConfigCase = tuple[str, dict[str, Any], type[BaseException], str]

CONFIG_CASES: list[ConfigCase] = []
for _name in REGISTRY_NAMES:
    CONFIG_CASES += [
        (_name, {"max_lr": -1.0}, ValueError, r"\.max_lr: -1\.0"),
        (_name, {"max_lr": NAN}, ValueError, r"\.max_lr: nan"),
        (_name, {"max_lr": INF}, ValueError, r"\.max_lr: inf"),
        (_name, {"max_lr": "0.1"}, TypeError, r"max_lr.*'0\.1'"),
        (_name, {"steps": -1}, ValueError, r"\.steps: -1"),
        (_name, {"lr_schedule_value": -0.5}, ValueError, r"lr_schedule_value: -0\.5"),
        (_name, {"lr_schedule_value": NAN}, ValueError, r"lr_schedule_value: nan"),
        (_name, {"lr_schedule_value": math.cos}, TypeError, r"lr_schedule_value.*callable"),
        (_name, {"schedule": 3}, TypeError, r"schedule must be callable, got 3"),
        (_name, {"schedule": math.cos, "lr_schedule_value": 0.5}, ValueError, r"not both"),
        (_name, {"impl": "fast"}, ValueError, r"\.impl: 'fast'"),
        (_name, {"inplace": "yes"}, TypeError, r"inplace must be a bool, got 'yes'"),
        (_name, {"no_such_field": 1}, TypeError, r"no_such_field"),
    ]

_BETAS_CASES: list[tuple[dict[str, Any], type[BaseException], str]] = [
    ({"betas": (1.0, 0.999)}, ValueError, r"betas\[0\]: 1\.0"),
    ({"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]: 1\.0"),
    ({"betas": (-0.1, 0.999)}, ValueError, r"betas\[0\]: -0\.1"),
    ({"betas": (0.9, NAN)}, ValueError, r"betas\[1\]: nan"),
    ({"betas": (0.9, INF)}, ValueError, r"betas\[1\]: inf"),
    ({"betas": (0.9,)}, ValueError, r"betas: \(0\.9,\)"),
    ({"betas": 0.9}, ValueError, r"betas: 0\.9"),
]
for _name in (
    "adam",
    "adamw",
    "decoupled_adam",
    "lion",
    "lamb",
    "adamax",
    "nadam",
    "radam",
    "schedule_free_adamw",
):
    CONFIG_CASES += [(_name, kw, err, rx) for kw, err, rx in _BETAS_CASES]

for _name in (
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
):
    CONFIG_CASES += [
        (_name, {"eps": -1e-8}, ValueError, r"\.eps: -1e-08"),
        (_name, {"eps": NAN}, ValueError, r"\.eps: nan"),
    ]
for _name in REGISTRY_NAMES:
    CONFIG_CASES.append((_name, {"weight_decay": -0.1}, ValueError, r"weight_decay: -0\.1"))

CONFIG_CASES += [
    # SGD
    ("sgd", {"momentum": -0.9}, ValueError, r"momentum: -0\.9"),
    ("sgd", {"dampening": 1.5}, ValueError, r"dampening: 1\.5"),
    ("sgd", {"nesterov": True, "momentum": 0.0}, ValueError, r"nesterov.*momentum=0\.0"),
    ("sgd", {"nesterov": True, "dampening": 0.5}, ValueError, r"nesterov.*dampening=0\.5"),
    (
        "sgd",
        {"nesterov": True, "momentum": torch.tensor(0.0)},
        ValueError,
        r"nesterov.*momentum=tensor\(0\.\)",
    ),
    # Adam modes
    ("adam", {"mode": "ADAMWW"}, ValueError, r"mode: 'ADAMWW'.*ORIGINAL"),
    ("adam", {"mode": 7}, ValueError, r"mode: 7"),
    ("adam", {"mode": None}, ValueError, r"mode: None"),
    ("adam", {"amsgrad": "yes"}, TypeError, r"amsgrad.*'yes'"),
    # LARS
    ("lars", {"trust_coefficient": 0.0}, ValueError, r"trust_coefficient: 0\.0"),
    ("lars", {"momentum": NAN}, ValueError, r"momentum: nan"),
    # Lion
    ("lion", {"decoupled_weight_decay": 1}, TypeError, r"decoupled_weight_decay.*1"),
    # LAMB
    ("lamb", {"clamp_value": 0.0}, ValueError, r"clamp_value: 0\.0"),
    # Adafactor
    ("adafactor", {"beta2_decay": 0.5}, ValueError, r"beta2_decay: 0\.5"),
    ("adafactor", {"eps": (None, -1.0)}, ValueError, r"eps\[1\]: -1\.0"),
    ("adafactor", {"eps": (-1e-30, 1e-3)}, ValueError, r"eps\[0\]: -1e-30"),
    ("adafactor", {"eps": (1e-30,)}, ValueError, r"eps: \(1e-30,\)"),
    ("adafactor", {"d": 0.5}, ValueError, r"\.d: 0\.5"),
    ("adafactor", {"beta1": 1.0}, ValueError, r"beta1: 1\.0"),
    # Muon
    ("muon", {"momentum": 1.0}, ValueError, r"momentum: 1\.0"),
    ("muon", {"eps": 0.0}, ValueError, r"eps: 0\.0"),
    ("muon", {"ns_steps": -1}, ValueError, r"ns_steps: -1"),
    ("muon", {"ns_steps": True}, ValueError, r"ns_steps: True"),
    ("muon", {"ns_coefficients": (1.0, 2.0)}, ValueError, r"ns_coefficients: \(1\.0, 2\.0\)"),
    ("muon", {"ns_coefficients": (1.0, NAN, 2.0)}, ValueError, r"ns_coefficients\[1\]: nan"),
    ("muon", {"adjust_lr_fn": "nope"}, ValueError, r"adjust_lr_fn: 'nope'"),
    ("muon", {"ns_dtype": "int32"}, ValueError, r"ns_dtype: torch\.int32"),
    ("muon", {"ns_dtype": "float17"}, ValueError, r"ns_dtype: 'float17'"),
    ("muon", {"nesterov": 1}, TypeError, r"nesterov must be a bool, got 1"),
    # RMSprop
    ("rmsprop", {"alpha": 1.5}, ValueError, r"alpha: 1\.5"),
    ("rmsprop", {"momentum": -1.0}, ValueError, r"momentum: -1\.0"),
    ("rmsprop", {"centered": 1}, TypeError, r"centered must be a bool, got 1"),
    # Adagrad
    ("adagrad", {"lr_decay": -1.0}, ValueError, r"lr_decay: -1\.0"),
    ("adagrad", {"initial_accumulator_value": -1.0}, ValueError, r"initial_accumulator_value"),
    # NAdam
    ("nadam", {"momentum_decay": -1.0}, ValueError, r"momentum_decay: -1\.0"),
    # Schedule-Free AdamW
    ("schedule_free_adamw", {"warmup_steps": -1}, ValueError, r"warmup_steps: -1"),
    ("schedule_free_adamw", {"r": -1.0}, ValueError, r"\.r: -1\.0"),
    ("schedule_free_adamw", {"weight_lr_power": -1.0}, ValueError, r"weight_lr_power: -1\.0"),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    CONFIG_CASES,
    ids=[f"{name}-{sorted(kwargs)}-{i}" for i, (name, kwargs, _, _) in enumerate(CONFIG_CASES)],
)
def test_config_rejects(
    name: str, kwargs: dict[str, Any], error: type[BaseException], match: str
) -> None:
    with pytest.raises(error, match=match):
        optorch.get_optimizer(name, **kwargs)


@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_replace_validates_and_keeps_the_original(name: str) -> None:
    opt = optorch.get_optimizer(name)
    before = repr(opt.config)
    with pytest.raises(ValueError, match=r"max_lr: -2\.0"):
        opt.replace(max_lr=-2.0)
    assert repr(opt.config) == before


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("nope", ValueError, r"Unknown optimizer 'nope'"),
        ("adamm", ValueError, r"did you mean 'adam"),
        (3, TypeError, r"must be a string, got 3"),
    ],
)
def test_unknown_registry_name(name: Any, error: type[BaseException], match: str) -> None:
    with pytest.raises(error, match=match):
        optorch.get_optimizer(name)


def test_optimizer_rejects_a_config_of_another_rule() -> None:
    adam = optorch.get_optimizer("adam")
    with pytest.raises(TypeError, match=r"adam needs a AdamConfig, got SGDConfig"):
        optorch.Optimizer(adam.rule, optorch.SGDConfig())


# --------------------------------------------------------------------------------------
# steps: malformed params, grads and state, for every registry optimizer
# --------------------------------------------------------------------------------------


def _base(name: str) -> tuple[Any, Any, Any, Any]:
    """An optimizer after one step (so the state is not all zeros), and fresh grads."""
    opt = optorch.get_optimizer(name)
    params = _params_for(name)
    state = opt.init(params)
    opt.step(params, _grads_like(params, seed=3), state)
    return opt, params, _grads_like(params), state


# perturbation: (opt, params, grads, state) -> (params, grads, state, step kwargs)
Perturb = Callable[[Any, Any, Any, Any], tuple[Any, Any, Any, dict[str, Any]]]


def _with_grad(grads: Any, **leaves: Any) -> Any:
    out = {"layer": dict(grads["layer"]), "b": grads["b"]}
    for key, value in leaves.items():
        if key == "w":
            out["layer"]["w"] = value
        else:
            out[key] = value
    return out


def _with_field(opt: Any, state: Any, value: Any) -> Any:
    return {**state, _first_field(opt): value}


def _field_leaf(opt: Any, state: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    field = state[_first_field(opt)]
    return _with_field(opt, state, {"layer": {"w": fn(field["layer"]["w"])}, "b": field["b"]})


_ONE = torch.ones(2)
_W = r"\['layer'\]\['w'\]"
_B = r"\['b'\]"

STEP_PERTURBATIONS: list[tuple[str, Perturb, type[BaseException], str]] = [
    # grads whose tree differs from the params'
    (
        "grads-missing-key",
        lambda o, p, g, s: (p, {"layer": g["layer"]}, s, {}),
        ValueError,
        r"grads do not match params \(key \['b'\] is missing\)",
    ),
    (
        "grads-extra-key",
        lambda o, p, g, s: (p, {**g, "extra": torch.zeros(2)}, s, {}),
        ValueError,
        r"grads do not match params \(unexpected key \['extra'\]\)",
    ),
    (
        "grads-list-vs-dict",
        lambda o, p, g, s: (p, [g["layer"]["w"], g["b"]], s, {}),
        ValueError,
        r"grads do not match params \(at <root>: dict vs list\)",
    ),
    (
        "grads-ordereddict-vs-dict",
        lambda o, p, g, s: (p, collections.OrderedDict(g), s, {}),
        ValueError,
        r"grads do not match params \(at <root>: dict vs OrderedDict\)",
    ),
    (
        "grads-nested-mismatch",
        lambda o, p, g, s: (p, {"layer": g["layer"]["w"], "b": g["b"]}, s, {}),
        ValueError,
        r"grads do not match params \(at \['layer'\]",
    ),
    # grads that do not fit their param
    (
        "grad-shape",
        lambda o, p, g, s: (p, _with_grad(g, w=torch.zeros(2, 3)), s, {}),
        ValueError,
        rf"grad at {_W} has shape \(2, 3\) but the param has shape \(3, 2\)",
    ),
    (
        "grad-dtype",
        lambda o, p, g, s: (p, _with_grad(g, b=g["b"].double()), s, {}),
        TypeError,
        rf"grad at {_B} has dtype torch\.float64 but the param has dtype torch\.float32",
    ),
    (
        "grad-meta-device",
        lambda o, p, g, s: (p, _with_grad(g, w=g["layer"]["w"].to("meta")), s, {}),
        ValueError,
        rf"grad at {_W} is on meta but the param is on cpu",
    ),
    (
        "grad-complex",
        lambda o, p, g, s: (p, _with_grad(g, w=g["layer"]["w"].to(torch.complex64)), s, {}),
        TypeError,
        rf"grad at {_W} has dtype torch\.complex64",
    ),
    (
        "grad-sparse",
        lambda o, p, g, s: (p, _with_grad(g, w=g["layer"]["w"].to_sparse()), s, {}),
        TypeError,
        rf"grad at {_W} is sparse",
    ),
    (
        "grad-sparse-csr",
        lambda o, p, g, s: (p, _with_grad(g, w=g["layer"]["w"].to_sparse_csr()), s, {}),
        TypeError,
        rf"grad at {_W} is sparse \(layout torch\.sparse_csr\)",
    ),
    (
        "state-leaf-sparse",
        lambda o, p, g, s: (p, g, _field_leaf(o, s, lambda t: t.to_sparse()), {}),
        TypeError,
        rf"state '\w+' at {_W} is sparse \(layout torch\.sparse_coo\)",
    ),
    (
        "grad-not-a-tensor",
        lambda o, p, g, s: (p, _with_grad(g, b=2.0), s, {}),
        TypeError,
        rf"grad at {_B} must be a tensor or None, got float",
    ),
    # params the optimizers cannot update
    (
        "param-integer",
        lambda o, p, g, s: (
            {**p, "b": torch.ones(p["b"].shape, dtype=torch.int64)},
            _with_grad(g, b=torch.ones(p["b"].shape, dtype=torch.int64)),
            s,
            {},
        ),
        TypeError,
        rf"param at {_B} has dtype torch\.int64; only floating point",
    ),
    (
        "param-complex",
        lambda o, p, g, s: (
            {**p, "b": p["b"].to(torch.complex64)},
            _with_grad(g, b=g["b"].to(torch.complex64)),
            s,
            {},
        ),
        TypeError,
        # refused by the rules that need real params (Adafactor, Muon); the others take
        # complex params, but not with the real state made for a real param
        rf"(param {_B} is complex|state '\w+' at {_B} has dtype torch\.float32 but the param "
        r"has dtype torch\.complex64)",
    ),
    (
        "param-meta-device",
        lambda o, p, g, s: ({**p, "b": p["b"].to("meta")}, g, s, {}),
        ValueError,
        rf"grad at {_B} is on cpu but the param is on meta",
    ),
    (
        "param-not-a-tensor",
        lambda o, p, g, s: ({**p, "b": [1.0, 2.0]}, g, s, {}),
        ValueError,
        r"grads do not match params",
    ),
    # state trees that differ from the params'
    (
        "state-missing-key",
        lambda o, p, g, s: (p, g, _with_field(o, s, {"layer": s[_first_field(o)]["layer"]}), {}),
        ValueError,
        rf"param at {_B} has a gradient but no '\w+' state",
    ),
    (
        "state-extra-key",
        lambda o, p, g, s: (
            p,
            g,
            _with_field(o, s, {**s[_first_field(o)], "zz": torch.zeros(2)}),
            {},
        ),
        ValueError,
        r"state '\w+' has a leaf at \['zz'\] that params do not have",
    ),
    (
        "state-list-vs-dict",
        lambda o, p, g, s: (
            p,
            g,
            _with_field(o, s, [s[_first_field(o)]["layer"]["w"], s[_first_field(o)]["b"]]),
            {},
        ),
        ValueError,
        r"state '\w+' has a leaf at \[0\] that params do not have .*dict vs list",
    ),
    (
        "state-nested-mismatch",
        lambda o, p, g, s: (p, g, _field_leaf(o, s, lambda t: {"inner": t}), {}),
        ValueError,
        rf"state '\w+' has a leaf at {_W}\['inner'\] that params do not have",
    ),
    (
        "state-field-not-a-tree",
        lambda o, p, g, s: (p, g, _with_field(o, s, 3), {}),
        ValueError,
        r"state '\w+' has a leaf at <root> that params do not have .*dict vs int",
    ),
    # state leaves that do not fit their param
    (
        "state-leaf-shape",
        lambda o, p, g, s: (p, g, _field_leaf(o, s, lambda t: torch.zeros(7)), {}),
        ValueError,
        rf"state '\w+' at {_W} has shape \(7,\)",
    ),
    (
        "state-leaf-dtype",
        lambda o, p, g, s: (p, g, _field_leaf(o, s, lambda t: t.double()), {}),
        TypeError,
        rf"state '\w+' at {_W} has dtype torch\.float64 but the param has dtype torch\.float32",
    ),
    (
        "state-leaf-meta-device",
        lambda o, p, g, s: (p, g, _field_leaf(o, s, lambda t: t.to("meta")), {}),
        ValueError,
        rf"state '\w+' at {_W} is on meta but the param is on cpu",
    ),
    (
        "state-leaf-not-a-tensor",
        lambda o, p, g, s: (p, g, _field_leaf(o, s, lambda t: 0.0), {}),
        TypeError,
        rf"state '\w+' at {_W} must be a tensor, got float",
    ),
    # the state dict itself
    (
        "state-foreign-field",
        lambda o, p, g, s: (p, g, {**s, "velocity": s[_first_field(o)]}, {}),
        ValueError,
        r"unexpected field\(s\) \['velocity'\].*another optimizer",
    ),
    (
        "state-step-string",
        lambda o, p, g, s: (p, g, {**s, "step": "3"}, {}),
        ValueError,
        r"state\['step'\] must be a 0-d tensor, got '3'",
    ),
    (
        "state-step-negative",
        lambda o, p, g, s: (p, g, {**s, "step": -1}, {}),
        ValueError,
        r"state\['step'\] must be a 0-d tensor, got -1",
    ),
    (
        "state-step-negative-tensor",
        lambda o, p, g, s: (p, g, {**s, "step": torch.tensor(-3)}, {}),
        ValueError,
        r"state\['step'\] must not be negative, got tensor\(-3\)",
    ),
    (
        "state-step-float-tensor",
        lambda o, p, g, s: (p, g, {**s, "step": torch.tensor(2.5)}, {}),
        ValueError,
        r"state\['step'\] must be an int64 \(or int32\) tensor .*got dtype torch\.float32",
    ),
    (
        "state-step-uint8",
        lambda o, p, g, s: (p, g, {**s, "step": torch.tensor(255, dtype=torch.uint8)}, {}),
        ValueError,
        r"state\['step'\] must be an int64 \(or int32\) tensor .*got dtype torch\.uint8",
    ),
    (
        "state-step-int8",
        lambda o, p, g, s: (p, g, {**s, "step": torch.tensor(127, dtype=torch.int8)}, {}),
        ValueError,
        r"state\['step'\] must be an int64 \(or int32\) tensor .*got dtype torch\.int8",
    ),
    (
        "state-step-on-another-device",
        lambda o, p, g, s: (p, g, {**s, "step": torch.tensor(1, device="meta")}, {}),
        ValueError,
        r"state\['step'\] is on meta, a device none of the params is on",
    ),
    (
        "state-step-vector",
        lambda o, p, g, s: (p, g, {**s, "step": torch.zeros(3, dtype=torch.int64)}, {}),
        ValueError,
        r"state\['step'\] must be a 0-d tensor",
    ),
    (
        "state-step-one-element-vector",
        lambda o, p, g, s: (p, g, {**s, "step": torch.ones(1, dtype=torch.int64)}, {}),
        ValueError,
        r"state\['step'\] must be a 0-d tensor",
    ),
    (
        "skip-if-meta",
        lambda o, p, g, s: (p, g, s, {"skip_if": torch.tensor(False, device="meta")}),
        ValueError,
        r"skip_if is on the meta device",
    ),
    (
        "state-not-a-dict",
        lambda o, p, g, s: (p, g, [s], {}),
        TypeError,
        r"optimizer state must be a dict \(from init\), got list",
    ),
    # step keywords
    (
        "override-lr-nan",
        lambda o, p, g, s: (p, g, s, {"hyper_overrides": {"max_lr": NAN}}),
        ValueError,
        r"max_lr: nan",
    ),
    (
        "override-lr-negative-tensor",
        lambda o, p, g, s: (p, g, s, {"hyper_overrides": {"max_lr": torch.tensor(-1.0)}}),
        ValueError,
        r"max_lr: tensor\(-1\.\)",
    ),
    (
        "override-unknown-field",
        lambda o, p, g, s: (p, g, s, {"hyper_overrides": {"lr": 0.1}}),
        ValueError,
        r"has no field\(s\) \['lr'\]",
    ),
    (
        "skip-if-string",
        lambda o, p, g, s: (p, g, s, {"skip_if": "yes"}),
        TypeError,
        r"skip_if must be a bool or a 0-d tensor, got 'yes'",
    ),
]


@pytest.mark.parametrize("name", REGISTRY_NAMES)
@pytest.mark.parametrize(
    ("perturb", "error", "match"),
    [pytest.param(f, e, m, id=label) for label, f, e, m in STEP_PERTURBATIONS],
)
def test_step_rejects_before_writing(
    name: str, perturb: Perturb, error: type[BaseException], match: str
) -> None:
    opt, params, grads, state = _base(name)
    bad_params, bad_grads, bad_state, kwargs = perturb(opt, params, grads, state)
    inputs = StepInputs(opt, bad_params, bad_grads, bad_state, kwargs, (params, grads, state))
    _assert_step_raises(inputs, error, match)


@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_params_converted_after_a_step_are_checked_again(name: str) -> None:
    """``model.double()`` keeps each Parameter object and swaps its data: the next step
    must see that the state no longer fits, even though these very tensors passed the
    checks on the step before."""
    opt, params, _, state = _base(name)  # one in-place step: the inputs are known good
    for leaf in optree.tree_leaves(params):
        leaf.data = leaf.data.double()
    grads = _grads_like(params)
    inputs = StepInputs(opt, params, grads, state, {}, (params, state))
    _assert_step_raises(
        inputs,
        TypeError,
        r"state '\w+' at \[.*\] has dtype torch\.float32 but the param has "
        r"dtype torch\.float64",
    )


@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_state_converted_after_a_step_is_checked_again(name: str) -> None:
    """A state tensor whose data was swapped for another dtype after a step (the same
    object, which the step's check cache knows) is refused as a new one would be."""
    opt, params, grads, state = _base(name)
    field = _first_field(opt)
    leaf = state[field]["layer"]["w"]
    leaf.data = leaf.data.double()
    inputs = StepInputs(opt, params, grads, state, {}, (params, state))
    _assert_step_raises(
        inputs,
        TypeError,
        rf"state '{field}' at \['layer'\]\['w'\] has dtype torch\.float64 but the param has "
        r"dtype torch\.float32",
    )


@pytest.mark.parametrize(
    ("multiplier", "error", "match"),
    [
        (NAN, ValueError, r"SGDConfig\.schedule\(1\): nan \(must be finite and >= 0\.0\)"),
        (-1.0, ValueError, r"SGDConfig\.schedule\(1\): -1\.0"),
        (math.inf, ValueError, r"SGDConfig\.schedule\(1\): inf"),
        (torch.tensor(NAN), ValueError, r"SGDConfig\.schedule\(1\): tensor\(nan\)"),
        (torch.ones(2), ValueError, r"SGDConfig\.schedule\(1\): a tensor of shape \(2,\)"),
        ("0.5", TypeError, r"SGDConfig\.schedule\(1\) must be a number or a 0-d tensor, got str"),
    ],
    ids=["nan", "negative", "inf", "nan-tensor", "vector", "string"],
)
def test_schedule_output_is_checked_before_writing(
    multiplier: Any, error: type[BaseException], match: str
) -> None:
    """A schedule's multiplier is held to what ``lr_schedule_value`` is: finite, >= 0."""
    opt = optorch.get_optimizer(
        "sgd", max_lr=0.1, momentum=0.9, schedule=lambda step: 1.0 if step == 0 else multiplier
    )
    params = _params_for("sgd")
    state = opt.init(params)
    opt.step(params, _grads_like(params, seed=3), state)  # step 0 is fine
    inputs = StepInputs(opt, params, _grads_like(params), state, {}, (params, state))
    _assert_step_raises(inputs, error, match)


def test_a_refused_step_adds_no_field_to_the_state() -> None:
    """A state that lacks a field the config needs (a seed-style dict, momentum turned
    on) gets it when the step runs; a step refused on the way (its schedule's output)
    leaves the dict without it."""
    opt = optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.9, schedule=lambda step: NAN)
    params = _params_for("sgd")
    state = {"step": torch.tensor(1)}
    inputs = StepInputs(opt, params, _grads_like(params), state, {}, (params, state))
    _assert_step_raises(inputs, ValueError, r"SGDConfig\.schedule\(1\): nan")
    assert sorted(state) == ["step"]


@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_a_tensor_given_twice_is_refused_in_place(name: str) -> None:
    """A tied weight listed twice would be updated twice by an in-place step."""
    opt = optorch.get_optimizer(name)
    tied = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    params = {"layer": {"w": tied}, "b": tied}
    grads = _grads_like(params)
    inputs = StepInputs(opt, params, grads, opt.init(params), {}, (params,))
    _assert_step_raises(
        inputs, ValueError, r"params at \['b'\] and \['layer'\]\['w'\] are the same memory"
    )


def test_muon_rejects_non_matrix_params() -> None:
    opt = optorch.get_optimizer("muon")
    params = {"w": torch.ones(3, 2), "bias": torch.ones(2)}
    state = opt.init(params)
    grads = {"w": torch.ones(3, 2), "bias": torch.ones(2)}
    inputs = StepInputs(opt, params, grads, state, {}, (params, grads, state))
    _assert_step_raises(inputs, ValueError, r"param \['bias'\] has shape \(2,\); Muon only")


# --------------------------------------------------------------------------------------
# the state of one optimizer passed to another
# --------------------------------------------------------------------------------------

# (optimizer whose state it is, optimizer given the state)
FOREIGN_STATE_CASES: list[tuple[str, str, str]] = [
    ("sgd", "adam", r"unexpected field\(s\) \['momentum'\]"),
    ("adam", "sgd", r"unexpected field\(s\) \['exp_avg', 'exp_avg_sq'\]"),
    ("adam", "lion", r"unexpected field\(s\) \['exp_avg_sq'\]"),
    ("adagrad", "rmsprop", r"unexpected field\(s\) \['sum'\]"),
    ("adafactor", "adam", r"unexpected field\(s\) \['row_var', 'col_var', 'variance'\]"),
    ("schedule_free_adamw", "adamw", r"unexpected field"),
    ("rmsprop", "adagrad", r"unexpected field"),
    # Lion's state has Adam's first field but not its second: filling the missing
    # second moment with zeros would run Adam on Lion's momentum silently
    ("lion", "adam", r"exp_avg_sq"),
    ("lion", "adamax", r"exp_inf|unexpected|lacks|missing"),
]


@pytest.mark.parametrize(
    ("source", "target", "match"),
    FOREIGN_STATE_CASES,
    ids=[f"{s}-state-to-{t}" for s, t, _ in FOREIGN_STATE_CASES],
)
def test_state_of_another_optimizer(source: str, target: str, match: str) -> None:
    params = {"w": torch.randn(3, 2), "v": torch.randn(2, 2)}
    foreign = optorch.get_optimizer(source).init(params)
    optorch.get_optimizer(source).step(params, _grads_like(params, seed=5), foreign)
    opt = optorch.get_optimizer(target)
    grads = _grads_like(params)
    inputs = StepInputs(opt, params, grads, foreign, {}, (params, grads, foreign))
    _assert_step_raises(inputs, ValueError, match)
    assert sorted(foreign) == sorted(optorch.get_optimizer(source).init(params))


# --------------------------------------------------------------------------------------
# wrappers
# --------------------------------------------------------------------------------------


def _adamw() -> Any:
    return optorch.get_optimizer("adamw", weight_decay=0.1)


WRAPPER_CASES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    ("ema-decay-above-1", lambda: wrappers.ema(_adamw(), 1.5), ValueError, r"ema\.decay: 1\.5"),
    ("ema-decay-nan", lambda: wrappers.ema(_adamw(), NAN), ValueError, r"ema\.decay: nan"),
    ("ema-warmup-int", lambda: wrappers.ema(_adamw(), 0.9, warmup=1), TypeError, r"warmup.*1"),
    (
        "ema-of-non-optimizer",
        lambda: wrappers.ema(3, 0.9),
        TypeError,
        r"ema: expected an optimizer.*got int",
    ),
    (
        "lookahead-sync-0",
        lambda: wrappers.lookahead(_adamw(), sync_period=0),
        ValueError,
        r"sync_period: 0",
    ),
    (
        "lookahead-sync-float",
        lambda: wrappers.lookahead(_adamw(), sync_period=2.0),
        TypeError,
        r"sync_period must be an int, got 2\.0",
    ),
    (
        "lookahead-alpha-negative",
        lambda: wrappers.lookahead(_adamw(), alpha=-0.1),
        ValueError,
        r"alpha: -0\.1",
    ),
    (
        "accumulate-every-0",
        lambda: wrappers.accumulate(_adamw(), every=0),
        ValueError,
        r"every: 0",
    ),
    (
        "accumulate-every-bool",
        lambda: wrappers.accumulate(_adamw(), every=True),
        TypeError,
        r"every must be an int, got True",
    ),
    (
        "skip-max-consecutive-negative",
        lambda: wrappers.skip_nonfinite(_adamw(), max_consecutive=-1),
        ValueError,
        r"max_consecutive: -1",
    ),
    (
        "clip-global-norm-0",
        lambda: wrappers.clip_by_global_norm(0.0),
        ValueError,
        r"max_norm: 0\.0",
    ),
    (
        "clip-global-norm-nan",
        lambda: wrappers.clip_by_global_norm(NAN),
        ValueError,
        r"max_norm: nan",
    ),
    (
        "clip-global-norm-inf",
        lambda: wrappers.clip_by_global_norm(INF),
        ValueError,
        r"max_norm: inf",
    ),
    ("clip-value-negative", lambda: wrappers.clip_by_value(-1.0), ValueError, r"limit: -1\.0"),
    (
        "clip-per-param-negative",
        lambda: wrappers.clip_by_norm_per_param(-1.0),
        ValueError,
        r"max_norm: -1\.0",
    ),
    ("adaptive-clip-0", lambda: wrappers.adaptive_clip(0.0), ValueError, r"clipping: 0\.0"),
    (
        "adaptive-clip-eps-negative",
        lambda: wrappers.adaptive_clip(0.1, eps=-1.0),
        ValueError,
        r"eps: -1\.0",
    ),
    ("scale-nan", lambda: wrappers.scale(NAN), ValueError, r"factor: nan"),
    ("scale-string", lambda: wrappers.scale("2"), TypeError, r"factor.*'2'"),
    ("noise-eta-negative", lambda: wrappers.add_noise(-1.0), ValueError, r"eta: -1\.0"),
    (
        "noise-seed-string",
        lambda: wrappers.add_noise(0.1, seed="a"),
        TypeError,
        r"seed must be an int, got 'a'",
    ),
    ("chain-empty", lambda: wrappers.chain(), TypeError, r"needs an optimizer"),
    (
        "chain-without-optimizer",
        lambda: wrappers.chain(wrappers.clip_by_value(1.0)),
        TypeError,
        r"last argument must be an optimizer",
    ),
    (
        "chain-bad-transform",
        lambda: wrappers.chain(3, _adamw()),
        TypeError,
        r"argument 0 must be a gradient transformation.*got int",
    ),
    (
        "partition-empty",
        lambda: wrappers.partition(lambda path, t: "a", {}),
        TypeError,
        r"non-empty dict",
    ),
    (
        "partition-mixed-modes",
        lambda: wrappers.partition(
            lambda path, t: "a",
            {"a": _adamw(), "b": optorch.get_optimizer("sgd", inplace=False)},
        ),
        ValueError,
        r"same mode.*'a': True.*'b': False",
    ),
    (
        "inject-unknown-name",
        lambda: wrappers.inject_hyperparams(_adamw(), names=["nope"]),
        ValueError,
        r"no hyperparameter 'nope'",
    ),
    (
        "inject-structural-option",
        lambda: wrappers.inject_hyperparams(_adamw(), names=["mode"]),
        TypeError,
        r"'mode' is .*ADAMW.*only numbers",
    ),
    (
        "inject-names-string",
        lambda: wrappers.inject_hyperparams(_adamw(), names="max_lr"),
        TypeError,
        r"names must be a non-empty sequence.*'max_lr'",
    ),
    (
        "inject-integer-dtype",
        lambda: wrappers.inject_hyperparams(_adamw(), names=["max_lr"], dtype=torch.int32),
        TypeError,
        r"floating dtype, got torch\.int32",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [pytest.param(b, e, m, id=label) for label, b, e, m in WRAPPER_CASES],
)
def test_wrapper_arguments(
    build: Callable[[], Any], error: type[BaseException], match: str
) -> None:
    with pytest.raises(error, match=match):
        build()


def _wrapped(make: Callable[[], Any]) -> tuple[Any, Any, Any, Any]:
    opt = make()
    params = {"layer": {"w": torch.randn(3, 2)}, "b": torch.randn(2)}
    state = opt.init(params)
    opt.step(params, _grads_like(params, seed=3), state)
    return opt, params, _grads_like(params), state


WRAPPED: dict[str, Callable[[], Any]] = {
    "ema": lambda: wrappers.ema(_adamw(), 0.9),
    "lookahead": lambda: wrappers.lookahead(_adamw(), sync_period=2),
    "accumulate": lambda: wrappers.accumulate(_adamw(), every=3),
    "skip_nonfinite": lambda: wrappers.skip_nonfinite(_adamw()),
    "chain": lambda: wrappers.chain(
        wrappers.clip_by_global_norm(1.0), wrappers.add_noise(0.01), _adamw()
    ),
    "masked": lambda: wrappers.masked(_adamw(), lambda path, t: t.dim() == 2),
    "decay_mask": lambda: wrappers.decay_mask(_adamw()),
    "inject_hyperparams": lambda: wrappers.inject_hyperparams(_adamw(), names=["max_lr"]),
}

# perturbations every wrapper must reject without writing (its own and its inner state)
WRAPPER_PERTURBATIONS: list[tuple[str, Perturb, type[BaseException], str]] = [
    (
        "grad-shape",
        lambda o, p, g, s: (p, _with_grad(g, w=torch.zeros(2, 3)), s, {}),
        ValueError,
        rf"grad at {_W} has shape \(2, 3\)",
    ),
    (
        "grads-extra-key",
        lambda o, p, g, s: (p, {**g, "extra": torch.zeros(2)}, s, {}),
        ValueError,
        r"grads do not match params \(unexpected key \['extra'\]\)",
    ),
    (
        "grads-list-vs-dict",
        lambda o, p, g, s: (p, [g["layer"]["w"], g["b"]], s, {}),
        ValueError,
        r"grads do not match params",
    ),
    (
        "grad-dtype",
        lambda o, p, g, s: (p, _with_grad(g, b=g["b"].double()), s, {}),
        TypeError,
        rf"grad at {_B} has dtype torch\.float64",
    ),
    (
        "grad-meta-device",
        lambda o, p, g, s: (p, _with_grad(g, b=g["b"].to("meta")), s, {}),
        ValueError,
        rf"grad at {_B} is on meta",
    ),
    (
        "grad-sparse",
        lambda o, p, g, s: (p, _with_grad(g, w=g["layer"]["w"].to_sparse()), s, {}),
        TypeError,
        rf"grad at {_W} is sparse \(layout torch\.sparse_coo\)",
    ),
    (
        "state-not-a-dict",
        lambda o, p, g, s: (p, g, 5, {}),
        TypeError,
        r"state must be a dict \(from init\), got int",
    ),
    (
        "state-empty",
        lambda o, p, g, s: (p, g, {}, {}),
        ValueError,
        r"state lacks \[.*another optimizer",
    ),
    (
        "skip-if-vector",
        lambda o, p, g, s: (p, g, s, {"skip_if": torch.zeros(3, dtype=torch.bool)}),
        TypeError,
        r"skip_if must be a bool or a 0-d tensor",
    ),
]


def _without_ema(state: Any) -> Any:
    """A partition state whose wrapped 'vec' group lost its EMA."""
    groups = dict(state["groups"])
    groups["vec"] = {k: v for k, v in groups["vec"].items() if k != "ema"}
    return {**state, "groups": groups}


# partitions whose groups include wrappers (which have no ``check``): a group that rejects
# its inputs must do so before any other group is written, whatever the groups' order
PARTITION_GROUPS: dict[str, Callable[[], dict[str, Any]]] = {
    "optimizer-then-wrapper": lambda: {
        "mat": optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.9),
        "vec": wrappers.ema(_adamw(), 0.9),
    },
    "wrapper-then-wrapper": lambda: {
        "mat": wrappers.lookahead(optorch.get_optimizer("sgd", max_lr=0.1), sync_period=2),
        "vec": wrappers.ema(_adamw(), 0.9),
    },
}


@pytest.mark.parametrize("groups", sorted(PARTITION_GROUPS))
@pytest.mark.parametrize(
    ("perturb", "error", "match"),
    [
        pytest.param(
            lambda s: (s, {"hyper_overrides": {"vec/max_lr": -1.0}}),
            ValueError,
            r"max_lr: -1\.0",
            id="override",
        ),
        pytest.param(lambda s: (_without_ema(s), {}), ValueError, r"lacks \['ema'\]", id="state"),
    ],
)
def test_partition_with_wrapped_groups_rejects_before_writing(
    groups: str, perturb: Callable[[Any], Any], error: type[BaseException], match: str
) -> None:
    opt, params, grads, state = _wrapped(
        lambda: wrappers.partition(
            lambda path, t: "mat" if t.dim() == 2 else "vec", PARTITION_GROUPS[groups]()
        )
    )
    bad_state, kwargs = perturb(state)
    inputs = StepInputs(opt, params, grads, bad_state, kwargs, (params, grads, state))
    _assert_step_raises(inputs, error, match)


Pair = collections.namedtuple("Pair", ["first", "second"])


@pytest.mark.parametrize(
    ("params", "grads", "where"),
    [
        pytest.param(
            [_ONE, [_ONE, _ONE]], [_ONE, (_ONE, _ONE)], r"\[1\]: list vs tuple", id="list"
        ),
        pytest.param((_ONE, _ONE), Pair(_ONE, _ONE), r"<root>: tuple vs Pair", id="namedtuple"),
    ],
)
@pytest.mark.parametrize("stepper", ["adam", "clip+adam"])
def test_a_container_of_another_type_is_named(
    params: Any, grads: Any, where: str, stepper: str
) -> None:
    opt = optorch.get_optimizer("adam", max_lr=0.1)
    if stepper == "clip+adam":
        opt = wrappers.chain(wrappers.clip_by_global_norm(1.0), opt)
    params = optree.tree_map(torch.clone, params)
    state = opt.init(params)
    inputs = StepInputs(opt, params, grads, state, {}, (params, state))
    _assert_step_raises(inputs, ValueError, rf"grads do not match params \(at {where}\)")


@pytest.mark.parametrize(("name", "config"), [("adamw", "SGDConfig"), ("sgd", "LARSConfig")])
def test_a_config_of_another_optimizer_is_a_type_error(name: str, config: str) -> None:
    from optorch import builder

    step = builder.OPTIMIZER_STEP[name]
    wrong = {"SGDConfig": optorch.sgd.SGDConfig, "LARSConfig": optorch.lars.LARSConfig}[config]
    params = _params_for(name)
    state = builder.DEFAULT_OPTIMIZER_STATES[name](params)
    inputs = StepInputs(
        type("Seed", (), {"step": staticmethod(lambda p, g, s: step(p, g, s, wrong()))})(),
        params,
        _grads_like(params),
        state,
        {},
        (params, state),
    )
    expected = builder.REGISTRY[name].rule.config_type.__name__
    _assert_step_raises(inputs, TypeError, rf"the config must be of type {expected}, got {config}")


@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_a_state_field_swapped_for_another_shape_after_a_step_is_named(impl: str) -> None:
    """The per-step fast check (inputs seen before) also notices a state leaf whose
    data was swapped for another shape."""
    opt = optorch.get_optimizer("adam", impl=impl)
    params = _params_for("adam")
    state = opt.init(params)
    opt.step(params, _grads_like(params, seed=3), state)
    state["exp_avg"]["b"].data = torch.zeros(1)
    inputs = StepInputs(opt, params, _grads_like(params), state, {}, (params, state))
    _assert_step_raises(inputs, ValueError, rf"state 'exp_avg' at {_B} has shape \(1,\)")


# a wrapper's own params-shaped state and counters, checked before its inner step runs
WRAPPER_STATE_LEAVES = [("ema", "ema"), ("lookahead", "slow"), ("accumulate", "grad_mean")]


@pytest.mark.parametrize(("wrapper", "field"), WRAPPER_STATE_LEAVES)
@pytest.mark.parametrize(
    ("leaf", "what"),
    [(0.0, "got 0.0"), (torch.zeros(2, dtype=torch.int64), "got dtype torch.int64")],
    ids=["float", "int-tensor"],
)
def test_wrapper_state_leaf_of_the_wrong_kind_is_rejected_before_writing(
    wrapper: str, field: str, leaf: Any, what: str
) -> None:
    opt, params, grads, state = _wrapped(WRAPPED[wrapper])
    bad_state = {**state, field: {**state[field], "b": leaf}}
    inputs = StepInputs(opt, params, grads, bad_state, {}, (params, grads, state))
    match = (
        rf"state '{field}' at {_B} must be a floating-point \(or complex\) tensor, "
        rf"{re.escape(what)}"
    )
    _assert_step_raises(inputs, TypeError, match)


@pytest.mark.parametrize(
    ("wrapper", "counter"),
    [
        ("ema", "count"),
        ("lookahead", "count"),
        ("accumulate", "count"),
        ("skip_nonfinite", "skipped_total"),
        ("skip_nonfinite", "skipped_consecutive"),
    ],
)
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (torch.tensor(-1), ValueError, r"must not be negative, got -1"),
        (torch.tensor(True), TypeError, r"must be a 0-d int64 tensor, got tensor\(True\)"),
        (torch.tensor(3, dtype=torch.uint8), TypeError, r"must be a 0-d int64 tensor"),
    ],
    ids=["negative", "bool", "uint8"],
)
def test_wrapper_counter_is_checked_before_writing(
    wrapper: str, counter: str, value: torch.Tensor, error: type[BaseException], match: str
) -> None:
    opt, params, grads, state = _wrapped(WRAPPED[wrapper])
    inputs = StepInputs(opt, params, grads, {**state, counter: value}, {}, (params, grads, state))
    _assert_step_raises(inputs, error, rf"state\['{counter}'\] {match}")


@pytest.mark.parametrize(("wrapper", "field"), WRAPPER_STATE_LEAVES)
def test_wrapper_state_leaf_that_is_sparse_is_rejected_before_writing(
    wrapper: str, field: str
) -> None:
    """A sparse leaf failed in torch's lerp after the inner step had run."""
    opt, params, grads, state = _wrapped(WRAPPED[wrapper])
    bad_state = {**state, field: {**state[field], "b": state[field]["b"].to_sparse()}}
    inputs = StepInputs(opt, params, grads, bad_state, {}, (params, grads, state))
    _assert_step_raises(
        inputs, TypeError, rf"state '{field}' at {_B} is sparse \(layout torch\.sparse_coo\)"
    )


def test_add_noise_counter_is_checked_before_writing() -> None:
    """A negative count made the noise's std inf or NaN: non-finite params."""
    opt, params, grads, state = _wrapped(WRAPPED["chain"])
    transforms = list(state["transforms"])
    transforms[1] = {**transforms[1], "count": torch.tensor(-2)}
    inputs = StepInputs(
        opt, params, grads, {**state, "transforms": transforms}, {}, (params, grads, state)
    )
    _assert_step_raises(
        inputs, ValueError, r"add_noise: state\['count'\] must not be negative, got -2"
    )


def test_accumulate_counter_past_its_cycle_is_refused() -> None:
    opt, params, grads, state = _wrapped(WRAPPED["accumulate"])  # every=3
    inputs = StepInputs(
        opt, params, grads, {**state, "count": torch.tensor(3)}, {}, (params, grads, state)
    )
    _assert_step_raises(
        inputs, ValueError, r"state\['count'\] must be less than 3 \(calls into the cycle\), got 3"
    )


def test_injected_hyperparameter_the_wrapper_does_not_inject_is_refused() -> None:
    """A value no step reads (eps=-1 from another injection) was silently ignored."""
    opt, params, grads, state = _wrapped(WRAPPED["inject_hyperparams"])
    injected = {**state["hyperparams"], "eps": torch.tensor(-1.0, dtype=torch.float64)}
    inputs = StepInputs(
        opt, params, grads, {**state, "hyperparams": injected}, {}, (params, grads, state)
    )
    _assert_step_raises(inputs, ValueError, r"state\['hyperparams'\] has \['eps'\], which")


def _nan_from_step_one(step: Any) -> float:
    return math.nan if step >= 1 else 1.0


@pytest.mark.parametrize(
    ("schedule", "corrupt", "match"),
    [
        pytest.param(
            None,
            lambda s: {**s, "step": torch.tensor(-1)},
            r"adam: state\['step'\] must not be negative",
            id="negative-step",
        ),
        pytest.param(_nan_from_step_one, lambda s: s, r"schedule\(1\): nan", id="schedule-nan"),
    ],
)
def test_partition_checks_counts_and_schedules_before_any_group_steps(
    schedule: Any, corrupt: Callable[[Any], Any], match: str
) -> None:
    """Group 'mat' (SGD) was stepped before group 'vec' (Adam) refused its negative count
    or its schedule's NaN, which only a real step checked."""
    groups = {
        "mat": optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.9),
        "vec": optorch.get_optimizer("adam", schedule=schedule),
    }
    opt, params, grads, state = _wrapped(
        lambda: wrappers.partition(lambda path, t: "mat" if t.dim() == 2 else "vec", groups)
    )
    bad_groups = {**state["groups"], "vec": corrupt(state["groups"]["vec"])}
    inputs = StepInputs(
        opt, params, grads, {**state, "groups": bad_groups}, {}, (params, grads, state)
    )
    _assert_step_raises(inputs, ValueError, match)


def test_partition_check_of_a_wrapped_group_adds_no_state_field() -> None:
    """The skipped step that checks a wrapped group runs on copies of the state's dicts:
    a field its optimizer creates on a first step (AMSGrad's maximum, for a state made
    without the config) is not added to the caller's state when another group raises."""
    groups = {
        "mat": wrappers.lookahead(optorch.get_optimizer("sgd", max_lr=0.1), sync_period=2),
        "vec": wrappers.ema(optorch.get_optimizer("adam", amsgrad=True), 0.9),
    }
    opt = wrappers.partition(lambda path, t: "mat" if t.dim() == 2 else "vec", groups)
    params = _params_for("adam")
    state = opt.init(params)
    del state["groups"]["vec"]["inner"]["max_exp_avg_sq"]
    kwargs = {"hyper_overrides": {"mat/max_lr": -1.0}}
    inputs = StepInputs(opt, params, _grads_like(params), state, kwargs, (params, state))
    _assert_step_raises(inputs, ValueError, r"max_lr: -1\.0")
    assert sorted(state["groups"]["vec"]["inner"]) == ["exp_avg", "exp_avg_sq", "step"]


def test_partition_refusal_only_a_real_step_sees_leaves_the_groups_unwritten() -> None:
    """skip_nonfinite's max_consecutive depends on the grads' values, which a skipped
    step does not see: its own check runs before any group is stepped."""
    groups = {
        "mat": wrappers.ema(optorch.get_optimizer("sgd", max_lr=0.1), 0.9),
        "vec": wrappers.skip_nonfinite(optorch.get_optimizer("sgd"), max_consecutive=0),
    }
    opt = wrappers.partition(lambda path, t: "mat" if t.dim() == 2 else "vec", groups)
    params = _params_for("sgd")
    state = opt.init(params)
    grads = _with_grad(_grads_like(params), b=torch.tensor([float("inf"), 0.0]))
    inputs = StepInputs(opt, params, grads, state, {}, (params, state))
    _assert_step_raises(inputs, RuntimeError, r"max_consecutive=0")


def test_partition_checks_wrapped_groups_without_an_extra_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The skipped step that checks a wrapped group returns after its checks in place:
    two wrapped groups cost two engine passes a step, not three."""
    from optorch import engine

    passes: list[int] = []
    run = engine.run

    def counted(rule: Any, config: Any, h: Any, params: Any, *rest: Any) -> Any:
        passes.append(len(params))
        return run(rule, config, h, params, *rest)

    monkeypatch.setattr(engine, "run", counted)
    groups = {
        "mat": wrappers.ema(optorch.get_optimizer("adamw"), 0.9),
        "vec": wrappers.lookahead(optorch.get_optimizer("adamw"), sync_period=2),
    }
    opt = wrappers.partition(lambda path, t: "mat" if t.dim() == 2 else "vec", groups)
    params = _params_for("adamw")
    state = opt.init(params)
    opt.step(params, _grads_like(params), state)
    assert passes == [1, 1]


# masked ignores the gradients of the leaves it does not select ('b' here): by design
_MASKED_IGNORES = {("masked", "grad-dtype"), ("masked", "grad-meta-device")}


@pytest.mark.parametrize("wrapper", sorted(WRAPPED))
@pytest.mark.parametrize(
    ("label", "perturb", "error", "match"),
    [pytest.param(label, f, e, m, id=label) for label, f, e, m in WRAPPER_PERTURBATIONS],
)
def test_wrapper_step_rejects_before_writing(
    wrapper: str, label: str, perturb: Perturb, error: type[BaseException], match: str
) -> None:
    opt, params, grads, state = _wrapped(WRAPPED[wrapper])
    bad_params, bad_grads, bad_state, kwargs = perturb(opt, params, grads, state)
    if (wrapper, label) in _MASKED_IGNORES:
        bad_grads = _with_grad(grads, w=torch.zeros(2, 3))
        match = rf"grad at {_W} has shape \(2, 3\)"
        error = ValueError
    inputs = StepInputs(opt, bad_params, bad_grads, bad_state, kwargs, (params, grads, state))
    _assert_step_raises(inputs, error, match)


def _leaf_in(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    return {"layer": {"w": fn(tree["layer"]["w"])}, "b": tree["b"]}


# wrapper-specific state corruption: (wrapper, corrupt(state) -> state, error, regex)
WRAPPER_STATE_CASES: list[tuple[str, str, Callable[[Any], Any], type[BaseException], str]] = [
    (
        "ema",
        "ema-leaf-shape",
        lambda s: {**s, "ema": _leaf_in(s["ema"], lambda t: torch.zeros(5))},
        ValueError,
        rf"state 'ema' at {_W} has shape \(5,\)",
    ),
    (
        "ema",
        "ema-leaf-meta-device",
        lambda s: {**s, "ema": _leaf_in(s["ema"], lambda t: t.to("meta"))},
        ValueError,
        rf"'ema' at {_W} .*meta",
    ),
    (
        "ema",
        "ema-count-vector",
        lambda s: {**s, "count": torch.zeros(5, dtype=torch.int64)},
        ValueError,
        r"count",
    ),
    (
        "ema",
        "ema-count-list",
        lambda s: {**s, "count": [0]},
        TypeError,
        r"count",
    ),
    (
        "lookahead",
        "slow-list-vs-dict",
        lambda s: {**s, "slow": [s["slow"]]},
        ValueError,
        r"state 'slow' does not match params",
    ),
    (
        "lookahead",
        "slow-leaf-meta-device",
        lambda s: {**s, "slow": _leaf_in(s["slow"], lambda t: t.to("meta"))},
        ValueError,
        rf"'slow' at {_W} .*meta",
    ),
    (
        "lookahead",
        "lookahead-count-float",
        lambda s: {**s, "count": torch.zeros((), dtype=torch.float64)},
        TypeError,
        r"count",
    ),
    (
        "accumulate",
        "grad-mean-leaf-shape",
        lambda s: {**s, "grad_mean": _leaf_in(s["grad_mean"], lambda t: torch.zeros(5))},
        ValueError,
        rf"state 'grad_mean' at {_W} has shape \(5,\)",
    ),
    (
        "accumulate",
        "grad-mean-leaf-meta-device",
        lambda s: {**s, "grad_mean": _leaf_in(s["grad_mean"], lambda t: t.to("meta"))},
        ValueError,
        rf"'grad_mean' at {_W} .*meta",
    ),
    (
        "accumulate",
        "accumulate-count-vector",
        lambda s: {**s, "count": torch.zeros(5, dtype=torch.int64)},
        ValueError,
        r"count",
    ),
    (
        "skip_nonfinite",
        "skipped-total-vector",
        lambda s: {**s, "skipped_total": torch.zeros(5, dtype=torch.int64)},
        ValueError,
        r"skipped_total",
    ),
    (
        "chain",
        "chain-transform-count",
        lambda s: {**s, "transforms": [s["transforms"][0], {"count": torch.zeros(())}]},
        TypeError,
        r"count",
    ),
    (
        "chain",
        "chain-transform-state-count",
        lambda s: {**s, "transforms": s["transforms"][:1]},
        ValueError,
        r"holds 1 transformation states for 2",
    ),
    (
        "decay_mask",
        "second-group-state-dtype",
        lambda s: {
            "groups": {
                **s["groups"],
                "no_decay": {
                    **s["groups"]["no_decay"],
                    "exp_avg": {"b": s["groups"]["no_decay"]["exp_avg"]["b"].double()},
                },
            }
        },
        TypeError,
        rf"state 'exp_avg' at {_B} has dtype torch\.float64",
    ),
    (
        "decay_mask",
        "missing-group",
        lambda s: {"groups": {"decay": s["groups"]["decay"]}},
        ValueError,
        r"state has no group\(s\) \['no_decay'\]",
    ),
    (
        "inject_hyperparams",
        "hyperparam-negative",
        lambda s: {**s, "hyperparams": {"max_lr": torch.tensor(-1.0, dtype=torch.float64)}},
        ValueError,
        r"max_lr: tensor\(-1\.",
    ),
    (
        "inject_hyperparams",
        "hyperparam-missing",
        lambda s: {**s, "hyperparams": {}},
        ValueError,
        r"state\['hyperparams'\] lacks \['max_lr'\]",
    ),
]


@pytest.mark.parametrize(
    ("wrapper", "corrupt", "error", "match"),
    [pytest.param(w, c, e, m, id=f"{w}-{label}") for w, label, c, e, m in WRAPPER_STATE_CASES],
)
def test_wrapper_state_rejected_before_writing(
    wrapper: str, corrupt: Callable[[Any], Any], error: type[BaseException], match: str
) -> None:
    opt, params, grads, state = _wrapped(WRAPPED[wrapper])
    inputs = StepInputs(opt, params, grads, corrupt(state), {}, (params, grads, state))
    _assert_step_raises(inputs, error, match)


@pytest.mark.parametrize(
    ("name", "value", "error", "match"),
    [
        ("max_lr", NAN, ValueError, r"'max_lr' must be finite, got nan"),
        ("nope", 1.0, ValueError, r"'nope' is not injected"),
        ("betas", 0.9, ValueError, r"'betas' needs 2 values, got 0\.9"),
    ],
)
def test_set_hyperparam_rejects(
    name: str, value: Any, error: type[BaseException], match: str
) -> None:
    opt = wrappers.inject_hyperparams(_adamw(), names=["max_lr", "betas"])
    state = opt.init({"w": torch.ones(2)})
    before = clone_tree(state)
    with pytest.raises(error, match=match):
        wrappers.set_hyperparam(state, name, value)
    assert_trees_equal(state, before, what="state after a rejected set_hyperparam")


# --------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------

SCHEDULE_CASES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    (
        "config-total-below-warmup-cosine",
        lambda: schedule.LRSchedulerConfig(scheduler_type="cosine", total_steps=5, warmup_steps=10),
        ValueError,
        r"total_steps: 5 .*warmup_steps = 10",
    ),
    (
        "config-total-below-warmup-warmdown",
        lambda: schedule.LRSchedulerConfig(
            scheduler_type="linear_warmdown", total_steps=3, warmup_steps=4
        ),
        ValueError,
        r"total_steps: 3 .*warmup_steps = 4",
    ),
    (
        "config-total-zero",
        lambda: schedule.LRSchedulerConfig(scheduler_type="linear_warmdown", total_steps=0),
        ValueError,
        r"total_steps: 0",
    ),
    (
        "config-unknown-type",
        lambda: schedule.LRSchedulerConfig(scheduler_type="nope"),
        ValueError,
        r"scheduler_type: 'nope'",
    ),
    (
        "config-rsqrt-without-warmup",
        lambda: schedule.LRSchedulerConfig(scheduler_type="rsqrt"),
        ValueError,
        r"warmup_steps: 0 .*rsqrt",
    ),
    (
        "config-warmup-negative",
        lambda: schedule.LRSchedulerConfig(warmup_steps=-1),
        ValueError,
        r"warmup_steps: -1",
    ),
    (
        "config-warmup-float",
        lambda: schedule.LRSchedulerConfig(warmup_steps=2.5),
        ValueError,
        r"warmup_steps: 2\.5",
    ),
    (
        "config-warmup-bool",
        lambda: schedule.LRSchedulerConfig(warmup_steps=True),
        ValueError,
        r"warmup_steps: True",
    ),
    (
        "config-start-value-above-1",
        lambda: schedule.LRSchedulerConfig(warmup_start_value=1.5),
        ValueError,
        r"warmup_start_value: 1\.5",
    ),
    (
        "config-start-value-nan",
        lambda: schedule.LRSchedulerConfig(warmup_start_value=NAN),
        ValueError,
        r"warmup_start_value: nan",
    ),
    (
        "config-terminal-negative",
        lambda: schedule.LRSchedulerConfig(
            scheduler_type="cosine", total_steps=10, lr_terminal_value=-0.1
        ),
        ValueError,
        r"lr_terminal_value: -0\.1",
    ),
    (
        "config-wsd-decay-too-long",
        lambda: schedule.LRSchedulerConfig(scheduler_type="wsd", total_steps=10, decay_steps=20),
        ValueError,
        r"decay steps \(20\) exceed total_steps \(10\)",
    ),
    (
        "config-wsd-unknown-shape",
        lambda: schedule.LRSchedulerConfig(
            scheduler_type="wsd", total_steps=10, decay_steps=2, decay_shape="nope"
        ),
        ValueError,
        r"decay_shape: 'nope'",
    ),
    (
        "config-decay-steps-without-wsd",
        lambda: schedule.LRSchedulerConfig(decay_steps=3),
        ValueError,
        r"decay_steps: 3 .*only used by scheduler_type 'wsd'",
    ),
    (
        "build-non-config",
        lambda: schedule.build_lr_scheduler("cosine"),
        TypeError,
        r"needs an LRSchedulerConfig \(or a mapping of its fields\), got 'cosine'",
    ),
    (
        "build-mapping-unknown-key",
        lambda: schedule.build_lr_scheduler({"scheduler": "cosine"}),
        TypeError,
        r"\['scheduler'\] are not LRSchedulerConfig fields",
    ),
    (
        "cosine-total-below-warmup",
        lambda: schedule.cosine_lr(
            3, total_steps=5, warmup_steps=10, warmup_start_value=0.0, lr_terminal_value=0.0
        ),
        ValueError,
        r"cosine_lr\.total_steps: 5 .*warmup_steps = 10",
    ),
    (
        "warmdown-total-below-warmup",
        lambda: schedule.linear_warmdown_lr(
            3, total_steps=5, warmup_steps=10, warmup_start_value=0.0, lr_terminal_value=0.0
        ),
        ValueError,
        r"linear_warmdown_lr\.total_steps: 5",
    ),
    (
        "wsd-total-below-warmup",
        lambda: schedule.warmup_stable_decay(total_steps=5, warmup_steps=10),
        ValueError,
        r"total_steps: 5 .*warmup_steps = 10",
    ),
    (
        "rsqrt-without-warmup",
        lambda: schedule.rsqrt_lr(3, warmup_steps=0, warmup_start_value=0.0),
        ValueError,
        r"rsqrt_lr\.warmup_steps: 0",
    ),
    (
        "step-negative",
        lambda: schedule.constant_lr(-1, warmup_steps=0, warmup_start_value=0.0),
        ValueError,
        r"step must be finite and >= 0, got -1",
    ),
    (
        "step-nan",
        lambda: schedule.constant_lr(NAN, warmup_steps=0, warmup_start_value=0.0),
        ValueError,
        r"step must be finite and >= 0, got nan",
    ),
    (
        "step-string",
        lambda: schedule.constant_lr("3", warmup_steps=0, warmup_start_value=0.0),
        TypeError,
        r"step must be an int or a tensor, got str",
    ),
    (
        "step-decay-size-0",
        lambda: schedule.step_decay(step_size=0),
        ValueError,
        r"step_size: 0",
    ),
    (
        "exponential-gamma-above-1",
        lambda: schedule.exponential_decay(gamma=2.0),
        ValueError,
        r"gamma: 2\.0",
    ),
    (
        "piecewise-not-increasing",
        lambda: schedule.piecewise_constant(boundaries=[5, 3], values=[1.0, 0.5, 0.1]),
        ValueError,
        r"boundaries: \[5, 3\] .*strictly increasing",
    ),
    (
        "piecewise-too-few-values",
        lambda: schedule.piecewise_constant(boundaries=[5], values=[1.0]),
        ValueError,
        r"values: \[1\.0\]",
    ),
    (
        "join-non-callable",
        lambda: schedule.join_schedules([1, 2], [3]),
        TypeError,
        r"schedules\[0\] must be callable, got 1",
    ),
    (
        "cosine-annealing-negative",
        lambda: schedule.cosine_annealing(T_max=-1),
        ValueError,
        r"T_max: -1",
    ),
    (
        "linear-warmup-start-above-1",
        lambda: schedule.linear_warmup(total_iters=3, start_factor=2.0),
        ValueError,
        r"start_factor: 2\.0",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [pytest.param(b, e, m, id=label) for label, b, e, m in SCHEDULE_CASES],
)
def test_schedule_rejects(build: Callable[[], Any], error: type[BaseException], match: str) -> None:
    with pytest.raises(error, match=match):
        build()


def test_schedule_config_mutated_after_construction_is_rechecked() -> None:
    config = schedule.LRSchedulerConfig(scheduler_type="cosine", total_steps=10, warmup_steps=2)
    config.total_steps = 1
    with pytest.raises(ValueError, match=r"total_steps: 1 .*warmup_steps = 2"):
        schedule.build_lr_scheduler(config)


# --------------------------------------------------------------------------------------
# the loss scaler
# --------------------------------------------------------------------------------------

AMP_CASES: list[tuple[str, dict[str, Any], type[BaseException], str]] = [
    ("scale-zero", {"init_scale": 0.0}, ValueError, r"init_scale: 0\.0"),
    ("scale-negative", {"init_scale": -1.0}, ValueError, r"init_scale: -1\.0"),
    ("scale-nan", {"init_scale": NAN}, ValueError, r"init_scale: nan"),
    ("scale-inf", {"init_scale": INF}, ValueError, r"init_scale: inf"),
    ("scale-overflows-float32", {"init_scale": 1e39}, ValueError, r"init_scale: 1e\+39"),
    ("scale-string", {"init_scale": "1"}, TypeError, r"init_scale must be a number.*'1'"),
    ("scale-bool", {"init_scale": True}, TypeError, r"init_scale must be a number.*True"),
    ("growth-1", {"growth_factor": 1.0}, ValueError, r"growth_factor: 1\.0"),
    ("growth-nan", {"growth_factor": NAN}, ValueError, r"growth_factor: nan"),
    ("backoff-1", {"backoff_factor": 1.0}, ValueError, r"backoff_factor: 1\.0"),
    ("backoff-0", {"backoff_factor": 0.0}, ValueError, r"backoff_factor: 0\.0"),
    ("interval-0", {"growth_interval": 0}, ValueError, r"growth_interval: 0"),
    ("interval-float", {"growth_interval": 2.0}, ValueError, r"growth_interval: 2\.0"),
    ("precision-unknown", {"precision": "fp8"}, ValueError, r"precision: 'fp8'"),
    ("precision-int", {"precision": torch.int32}, ValueError, r"precision: torch\.int32"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [pytest.param(k, e, m, id=label) for label, k, e, m in AMP_CASES],
)
def test_grad_scaler_arguments(
    kwargs: dict[str, Any], error: type[BaseException], match: str
) -> None:
    with pytest.raises(error, match=match):
        amp.init_grad_scaler(**kwargs)


def _scaler() -> Any:
    return amp.init_grad_scaler(init_scale=4.0, growth_interval=2, precision="fp16")


UNSCALE_CASES: list[tuple[str, Any, Callable[[Any], Any], type[BaseException], str]] = [
    (
        "fp16-grad",
        {"w": torch.ones(2, dtype=torch.float16)},
        lambda s: s,
        ValueError,
        r"grad at \['w'\] is float16",
    ),
    (
        "integer-grad",
        {"w": torch.ones(2, dtype=torch.int64)},
        lambda s: s,
        TypeError,
        r"grad at \['w'\] must be a dense floating point tensor \(got torch\.int64",
    ),
    (
        "sparse-grad",
        {"w": torch.ones(2).to_sparse()},
        lambda s: s,
        TypeError,
        r"grad at \['w'\] .*layout torch\.sparse_coo",
    ),
    (
        "complex-grad",
        {"w": torch.ones(2, dtype=torch.complex64)},
        lambda s: s,
        TypeError,
        r"grad at \['w'\] .*complex64",
    ),
    ("string-grad", {"w": "x"}, lambda s: s, TypeError, r"grad at \['w'\] must be a tensor"),
    (
        "state-not-a-dict",
        {"w": torch.ones(2)},
        lambda s: [s],
        TypeError,
        r"scaler_state must be the dict from init_grad_scaler, got list",
    ),
    (
        "scale-negative",
        {"w": torch.ones(2)},
        lambda s: {**s, "scale": torch.tensor(-1.0)},
        ValueError,
        r"scaler_state\['scale'\] must be finite and > 0, got -1\.0",
    ),
    (
        "scale-one-element-vector",
        {"w": torch.ones(2)},
        lambda s: {**s, "scale": torch.ones(1)},
        TypeError,
        r"scaler_state\['scale'\] must be a 0-d floating point tensor",
    ),
    (
        "tracker-float",
        {"w": torch.ones(2)},
        lambda s: {**s, "growth_tracker": torch.tensor(0.0)},
        TypeError,
        r"scaler_state\['growth_tracker'\] must be a 0-d integer tensor, got dtype",
    ),
    (
        "growth-factor-below-one",
        {"w": torch.ones(2)},
        lambda s: {**s, "growth_factor": 0.5},
        ValueError,
        r"scaler_state\['growth_factor'\] must be in \(1\.0, inf\), got 0\.5",
    ),
    (
        "backoff-factor-one",
        {"w": torch.ones(2)},
        lambda s: {**s, "backoff_factor": 1.0},
        ValueError,
        r"scaler_state\['backoff_factor'\] must be in \(0\.0, 1\.0\), got 1\.0",
    ),
    (
        "growth-interval-zero",
        {"w": torch.ones(2)},
        lambda s: {**s, "growth_interval": 0},
        ValueError,
        r"scaler_state\['growth_interval'\] must be an int >= 1, got 0",
    ),
    (
        "growth-interval-string",
        {"w": torch.ones(2)},
        lambda s: {**s, "growth_interval": "2"},
        TypeError,
        r"scaler_state\['growth_interval'\] must be a number, got '2'",
    ),
    (
        "scale-not-0d",
        {"w": torch.ones(2)},
        lambda s: {**s, "scale": torch.ones(3)},
        TypeError,
        r"scaler_state\['scale'\] must be a 0-d floating point tensor",
    ),
    # a KeyError by design (tests/test_amp.py): the scaler state is a dict missing a key
    (
        "state-missing-scale",
        {"w": torch.ones(2)},
        lambda s: {k: v for k, v in s.items() if k != "scale"},
        KeyError,
        r"scaler_state lacks \['scale'\]",
    ),
]


@pytest.mark.parametrize(
    ("grads", "corrupt", "error", "match"),
    [pytest.param(g, c, e, m, id=label) for label, g, c, e, m in UNSCALE_CASES],
)
def test_unscale_grads_rejects(
    grads: Any, corrupt: Callable[[Any], Any], error: type[BaseException], match: str
) -> None:
    scaler = _scaler()
    before = clone_tree(dict(scaler))
    grads_before = clone_tree(grads)
    with pytest.raises(error, match=match):
        amp.unscale_grads(grads, corrupt(scaler))
    assert_trees_equal(dict(scaler), before, what="scaler state")
    assert_trees_equal(_dense(grads), _dense(grads_before), what="grads")


def test_update_scale_rejects_a_vector_found_inf() -> None:
    scaler = _scaler()
    before = clone_tree(dict(scaler))
    with pytest.raises((TypeError, ValueError), match=r"found_inf"):
        amp.update_scale(scaler, torch.ones(3))
    assert_trees_equal(dict(scaler), before, what="scaler state")


def test_scale_loss_rejects_a_python_number() -> None:
    with pytest.raises(TypeError, match=r"loss.*float"):
        amp.scale_loss(1.0, _scaler())


@pytest.mark.parametrize(
    ("grads", "match"),
    [
        ({"x": torch.ones(2)}, r"grads do not match params"),
        ({"w": torch.ones(2, dtype=torch.float16)}, r"grad at \['w'\] is float16"),
    ],
)
def test_scaled_step_rejects_without_writing(grads: Any, match: str) -> None:
    opt = optorch.get_optimizer("sgd", momentum=0.9)
    params = {"w": torch.ones(2)}
    opt_state = opt.init(params)
    scaler = _scaler()
    before = clone_tree((params, opt_state, dict(scaler)))
    with pytest.raises(ValueError, match=match):
        amp.scaled_step(opt, params, grads, opt_state, scaler)
    assert_trees_equal((params, opt_state, dict(scaler)), before, what="after scaled_step")


# --------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


CLI_CASES: list[tuple[str, Callable[[Path], list[str]], str]] = [
    ("unknown-optimizer", lambda d: ["--optimizers", "nope"], r"Unknown optimizer 'nope'"),
    (
        "missing-text",
        lambda d: ["--text", str(d / "missing.txt")],
        r"--text: no such file: '.*missing\.txt'",
    ),
    (
        "missing-config",
        lambda d: ["--config", str(d / "missing.yaml")],
        r"--config: no such file",
    ),
    (
        "yaml-syntax",
        lambda d: ["--config", _recipe(d, "optimizers: [unclosed\n  foo: {bar\n")],
        r"not a valid YAML recipe",
    ),
    (
        "yaml-not-a-mapping",
        lambda d: ["--config", _recipe(d, "- just\n- a list\n")],
        r"the recipe must be a mapping",
    ),
    (
        "yaml-unknown-target",
        lambda d: [
            "--config",
            _recipe(d, "optimizers:\n  x:\n    _target_: optorch.nope.Nope\n"),
        ],
        r"cannot instantiate optimizers\.x",
    ),
    (
        "yaml-bad-hyperparameter",
        lambda d: [
            "--config",
            _recipe(
                d,
                "optimizers:\n  adamw:\n    _target_: optorch.get_optimizer\n"
                "    optimizer_name: adamw\n    max_lr: -1.0\n",
            ),
        ],
        r"max_lr: -1\.0",
    ),
    ("steps-negative", lambda d: ["--steps", "-1"], r"Invalid --steps: -1"),
    ("empty-optimizer-name", lambda d: ["--optimizers", "adamw,"], r"an empty name in 'adamw,'"),
    ("no-optimizer-names", lambda d: ["--optimizers", ""], r"an empty name in ''"),
    (
        "recipe-warmup-beyond-steps",
        lambda d: ["--config", str(EXAMPLES / "recipe_train.yaml"), "--steps", "10"],
        r"Invalid train\.warmup_steps of --config: 20 \(must be <= --steps 10\)",
    ),
]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--threads", "0"], r"Invalid --threads: 0 \(must be >= 1\)"),
        (["--device", "tpu"], r"Invalid --device: 'tpu'"),
        (["--steps", "0"], r"Invalid --steps: 0 \(must be >= 1\)"),
        (["--warmup", "-1"], r"Invalid --warmup: -1 \(must be >= 0\)"),
        (["--sets", "tiny,nope"], r"Invalid --sets: 'nope' in 'tiny,nope'"),
        (["--impls", "foreach,"], r"Invalid --impls: an empty name in 'foreach,'"),
        (["--impls", "graphed"], r"Invalid --impls: 'graphed' \(CUDA graphs\) needs --device cuda"),
        (["--optimizers", "adamw,nope"], r"Invalid --optimizers: 'nope'"),
        (["--out", "{file}/sub"], r"Invalid --out: '.*a-file/sub' \(Not a directory\)"),
        (["--out", "{file}"], r"Invalid --out: '.*a-file' \(File exists\)"),
    ],
    ids=[
        "threads",
        "device",
        "steps",
        "warmup",
        "sets",
        "impls",
        "graphed-on-cpu",
        "optimizers",
        "out-under-file",
        "out-is-file",
    ],
)
def test_bench_checks_its_arguments_before_any_work(
    argv: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One line, exit 2, before the bandwidth probe or any timing (nothing is printed)."""
    (tmp_path / "a-file").write_text("in the way")
    argv = [a.replace("{file}", str(tmp_path / "a-file")) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out")]
    code = cli_main(["bench", "--sets", "tiny", *argv, *out])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optorch bench: error: "), captured.err
    assert re.search(match, lines[0]), lines[0]


def test_demo_refuses_an_unwritable_out_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    code = cli_main(["demo", "--optimizers", "sgd", "--steps", "2", "--out", str(blocker)])
    captured = capsys.readouterr()
    assert code == 2 and "step" not in captured.out, captured.out
    assert re.fullmatch(
        r"optorch demo: error: Invalid --out: '.*a-file' \(File exists\)\n", captured.err
    )


@pytest.mark.parametrize(
    ("argv", "match"),
    [pytest.param(a, m, id=label) for label, a, m in CLI_CASES],
)
def test_cli_reports_one_line(
    argv: Callable[[Path], list[str]],
    match: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli_main(["demo", *argv(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("optorch demo: error: ")
    assert "Traceback" not in captured.err
    assert re.search(match, lines[0]), lines[0]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["demo", "--steps", "abc"], r"^optorch demo: error: argument --steps: invalid int value"),
        (["demo", "--precision", "fp8"], r"^optorch demo: error: argument --precision"),
        (["demo", "--bogus"], r"^optorch demo: error: unrecognized arguments: --bogus"),
        (["bench", "--steps", "x"], r"^optorch bench: error: argument --steps"),
        (["frobnicate"], r"^optorch: error: argument command: invalid choice: 'frobnicate'"),
        (["--bogus", "demo"], r"^optorch: error: unrecognized arguments: --bogus"),
    ],
    ids=[
        "bad-int",
        "bad-choice",
        "unknown-flag",
        "bench-bad-int",
        "unknown-command",
        "flag-before-command",
    ],
)
def test_cli_parse_error_is_one_line(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse's own errors too: one line naming the command, no usage block."""
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(match, lines[0]), lines[0]


def test_cli_process_exits_with_one_line(tmp_path: Path) -> None:
    """The real entry point (``python -m optorch``): exit code 2 and no traceback."""
    bad = _recipe(tmp_path, "optimizers: [unclosed\n")
    result = subprocess.run(
        [sys.executable, "-m", "optorch", "demo", "--config", bad, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a valid YAML recipe" in lines[0], result.stderr


# --------------------------------------------------------------------------------------
# the checkpoint loader
# --------------------------------------------------------------------------------------


class _Payload:
    """A pickled object whose unpickling would call a function: never to be loaded."""

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (print, ("unpickled code ran",))


def _saved_adam(directory: Path, suffix: str) -> tuple[Path, Any, Any]:
    from optorch.interop import checkpoint

    opt = optorch.get_optimizer("adam")
    params = {"layer": {"w": torch.randn(3, 2)}, "b": torch.randn(2)}
    state = opt.init(params)
    opt.step(params, _grads_like(params), state)
    path = directory / f"adam{suffix}"
    checkpoint.save(path, state, optimizer=opt, params=params)
    return path, opt, params


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def _truncated(directory: Path, suffix: str) -> Path:
    path, _, _ = _saved_adam(directory, suffix)
    data = path.read_bytes()
    return _write(directory, f"truncated{suffix}", data[: len(data) // 2])


def _edited(directory: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A valid safetensors checkpoint whose optorch header was edited by ``edit``."""
    import json

    import safetensors
    from safetensors.torch import save_file

    path, _, _ = _saved_adam(directory, ".safetensors")
    with safetensors.safe_open(str(path), "pt") as reader:
        header = json.loads(reader.metadata()["optorch"])
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    edit(header)
    edited = directory / "edited.safetensors"
    save_file(tensors, str(edited), metadata={"optorch": json.dumps(header)})
    return edited


def _as_chain_with(name: str) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        inner = header["optimizer"]["tree"]
        transform = {"name": name, "args": {}}
        header["optimizer"]["tree"] = {"kind": "chain", "inner": inner, "transforms": [transform]}

    return edit


def _adam_params() -> Any:
    return {"layer": {"w": torch.zeros(3, 2)}, "b": torch.zeros(2)}


def _params_other_shape() -> Any:
    return {"layer": {"w": torch.zeros(2, 3)}, "b": torch.zeros(2)}


# (label, call(directory) -> None, error, regex); every call must raise before returning
CHECKPOINT_CASES: list[tuple[str, Callable[[Path], Any], type[BaseException], str]] = [
    (
        "missing-file",
        lambda d: _checkpoint().load(d / "nope.safetensors"),
        FileNotFoundError,
        r"no checkpoint at '.*nope\.safetensors'",
    ),
    ("a-directory", lambda d: _checkpoint().load(d), ValueError, r"is not a file"),
    (
        "garbage-bytes",
        lambda d: _checkpoint().load(_write(d, "x.bin", b"definitely not a checkpoint")),
        ValueError,
        r"is not an optorch checkpoint",
    ),
    (
        "empty-file",
        lambda d: _checkpoint().load(_write(d, "empty.pt", b"")),
        ValueError,
        r"is not an optorch checkpoint",
    ),
    (
        "truncated-safetensors",
        lambda d: _checkpoint().load(_truncated(d, ".safetensors")),
        ValueError,
        r"not a readable safetensors file|not an optorch checkpoint",
    ),
    (
        "truncated-torch",
        lambda d: _checkpoint().load(_truncated(d, ".pt")),
        ValueError,
        r"not a readable torch checkpoint|not an optorch checkpoint",
    ),
    (
        "plain-torch-file",
        lambda d: (
            torch.save({"w": torch.ones(2)}, d / "plain.pt"),
            _checkpoint().load(d / "plain.pt"),
        ),
        ValueError,
        r"not an optorch checkpoint",
    ),
    (
        "pickled-code",
        lambda d: (
            torch.save({"optorch": _Payload()}, d / "evil.pt"),
            _checkpoint().load(d / "evil.pt"),
        ),
        ValueError,
        r"not a readable torch checkpoint",
    ),
    (
        "state-vs-params-of-other-shape",
        lambda d: _checkpoint().load(
            _saved_adam(d, ".safetensors")[0], params=_params_other_shape()
        ),
        ValueError,
        r"wrong shape at \['exp_avg'\]\['layer'\]\['w'\]: \(3, 2\) in the checkpoint, \(2, 3\)",
    ),
    (
        "state-vs-params-with-extra-key",
        lambda d: _checkpoint().load(
            _saved_adam(d, ".safetensors")[0],
            params={"layer": {"w": torch.zeros(3, 2)}, "b": torch.zeros(2), "c": torch.zeros(1)},
        ),
        ValueError,
        r"missing leaf .*\['c'\]",
    ),
    (
        "state-vs-params-of-other-dtype",
        lambda d: _checkpoint().load(
            _saved_adam(d, ".pt")[0],
            params={"layer": {"w": torch.zeros(3, 2, dtype=torch.float64)}, "b": torch.zeros(2)},
        ),
        ValueError,
        r"wrong dtype at \['exp_avg'\]\['layer'\]\['w'\]: torch\.float32 in the checkpoint",
    ),
    (
        "state-of-another-optimizer",
        lambda d: _checkpoint().load(
            _saved_adam(d, ".safetensors")[0],
            like=optorch.get_optimizer("sgd").init(
                {"layer": {"w": torch.zeros(3, 2)}, "b": torch.zeros(2)}
            ),
        ),
        ValueError,
        r"missing leaf \['momentum'\]",
    ),
    (
        "restore-params-without-params",
        lambda d: _checkpoint().load_checkpoint(
            _saved_adam(d, ".safetensors")[0], restore_params=True
        ),
        ValueError,
        r"restore_params=True needs params=",
    ),
    (
        "edited-state-node",
        lambda d: _checkpoint().load(
            _edited(d, lambda h: h.__setitem__("state", {"dict": 5})), params=_adam_params()
        ),
        ValueError,
        r"malformed checkpoint tree node: dict of 5",
    ),
    (
        "edited-enum-name",
        lambda d: _checkpoint().load_optimizer(
            _edited(
                d, lambda h: h["optimizer"]["tree"]["config"].__setitem__("mode", {"enum": "NO"})
            )
        ),
        ValueError,
        r"'NO' is not a AdamWDMode",
    ),
    (
        "edited-record-without-inner",
        lambda d: _checkpoint().load_optimizer(
            _edited(d, lambda h: h["optimizer"].__setitem__("tree", {"kind": "ema"}))
        ),
        ValueError,
        r"malformed optimizer record \(KeyError: 'inner'\)",
    ),
    (
        "edited-chain-calls-another-function",
        lambda d: _checkpoint().load_optimizer(_edited(d, _as_chain_with("global_norm"))),
        ValueError,
        r"'global_norm' is not a gradient transform that checkpoints record",
    ),
    (
        "unknown-format",
        lambda d: _checkpoint().save(d / "x.ckpt", {"w": torch.ones(1)}, format="npz"),
        ValueError,
        r"format must be one of .*'npz'",
    ),
    (
        "metadata-not-strings",
        lambda d: _checkpoint().save(d / "x.pt", {"w": torch.ones(1)}, metadata={"run": 3}),
        TypeError,
        r"metadata must be a dict of strings",
    ),
]


def _checkpoint() -> Any:
    from optorch.interop import checkpoint

    return checkpoint


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [pytest.param(c, e, m, id=label) for label, c, e, m in CHECKPOINT_CASES],
)
def test_checkpoint_rejects(
    call: Callable[[Path], Any],
    error: type[BaseException],
    match: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(error, match=match):
        call(tmp_path)
    assert "unpickled code ran" not in capsys.readouterr().out


def test_checkpoint_restore_into_mismatched_params_changes_nothing(tmp_path: Path) -> None:
    path, _, _ = _saved_adam(tmp_path, ".safetensors")
    target = {"layer": {"w": torch.zeros(3, 2)}, "b": torch.zeros(3)}
    before = clone_tree(target)
    with pytest.raises(ValueError, match=r"wrong shape at \['exp_avg'\]\['b'\]"):
        _checkpoint().load_checkpoint(
            path, params=target, optimizer=optorch.get_optimizer("adam"), restore_params=True
        )
    assert_trees_equal(target, before, what="params after a rejected restore")
