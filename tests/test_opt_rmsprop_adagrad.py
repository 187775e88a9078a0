"""RMSprop and Adagrad against ``torch.optim``: params AND state after each of 20 steps.

Every row of the option tables runs in float32 and float64, in place and pure, through
the reference loop and the foreach engine; two rows also run compiled (float32 in place,
float64 pure). The params are a dict pytree with a matrix, a 1-D bias, a 0-d scalar and
a 3-D tensor, and the grads a seeded random sequence, fed identically to ``torch.optim``
(single-tensor path). State is compared field by field under torch's own names
(``square_avg``, ``momentum_buffer``, ``grad_avg``, ``sum``) and the step count. Then:
bad hyperparameters (``ValueError`` naming the field), the registry and the seed-style
functions (convergence: tests/test_convergence.py).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import (
    TOLERANCES,
    TorchReference,
    assert_no_aliasing,
    assert_trees_close,
    assert_unchanged,
    compiled_params,
    grad_sequence,
    make_params,
    snapshot,
)

import optorch
from optorch.adagrad import AdagradConfig, adagrad_step, default_adagrad_state
from optorch.base import init_state
from optorch.rmsprop import RMSpropConfig, default_rmsprop_state, rmsprop_step

STEPS = 20


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny tensors: a second intra-op thread only spins (20x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def halving_every_five(step: int) -> float:
    """A schedule multiplier that changes during the run (0.5 ** (step // 5))."""
    return 0.5 ** (step // 5)


@dataclass(frozen=True)
class Case:
    """One row: optorch name + hyperparameters, the torch.optim twin, the state fields."""

    id: str
    name: str
    hyper: dict[str, Any]
    torch_class: type[torch.optim.Optimizer]
    torch_hyper: dict[str, Any]
    fields: tuple[str, ...]
    seed: int
    multiplier: Callable[[int], float] | None = None


def _case(
    case_id: str,
    name: str,
    seed: int,
    fields: tuple[str, ...],
    *,
    multiplier: Callable[[int], float] | None = None,
    **hyper: Any,
) -> Case:
    torch_class = {"rmsprop": torch.optim.RMSprop, "adagrad": torch.optim.Adagrad}[name]
    torch_hyper = {"lr": hyper["max_lr"], **{k: v for k, v in hyper.items() if k != "max_lr"}}
    if multiplier is not None:
        hyper = {**hyper, "schedule": multiplier}
    return Case(case_id, name, hyper, torch_class, torch_hyper, fields, seed, multiplier)


SQ = ("square_avg",)
RMSPROP_CASES = [
    _case("rmsprop", "rmsprop", 1, SQ, max_lr=0.01),
    _case("rmsprop-alpha-eps", "rmsprop", 2, SQ, max_lr=0.02, alpha=0.9, eps=1e-3),
    _case("rmsprop-wd", "rmsprop", 3, SQ, max_lr=0.01, weight_decay=0.1),
    _case("rmsprop-momentum", "rmsprop", 4, (*SQ, "momentum_buffer"), max_lr=0.01, momentum=0.9),
    _case("rmsprop-centered", "rmsprop", 5, (*SQ, "grad_avg"), max_lr=0.01, centered=True),
    _case(
        "rmsprop-centered-momentum-wd",
        "rmsprop",
        6,
        (*SQ, "momentum_buffer", "grad_avg"),
        max_lr=0.005,
        alpha=0.95,
        momentum=0.5,
        centered=True,
        weight_decay=0.05,
    ),
    _case(
        "rmsprop-maximize",
        "rmsprop",
        7,
        (*SQ, "momentum_buffer"),
        max_lr=0.01,
        momentum=0.3,
        weight_decay=0.02,
        maximize=True,
    ),
    _case(
        "rmsprop-schedule",
        "rmsprop",
        8,
        (*SQ, "momentum_buffer"),
        max_lr=0.02,
        momentum=0.9,
        multiplier=halving_every_five,
    ),
]
ADAGRAD_CASES = [
    _case("adagrad", "adagrad", 11, ("sum",), max_lr=0.1),
    _case("adagrad-lr-decay", "adagrad", 12, ("sum",), max_lr=0.1, lr_decay=0.2),
    _case("adagrad-wd", "adagrad", 13, ("sum",), max_lr=0.1, weight_decay=0.05),
    _case(
        "adagrad-initial-accumulator",
        "adagrad",
        14,
        ("sum",),
        max_lr=0.1,
        initial_accumulator_value=0.5,
    ),
    _case("adagrad-eps", "adagrad", 15, ("sum",), max_lr=0.05, eps=1e-3),
    _case("adagrad-maximize", "adagrad", 16, ("sum",), max_lr=0.1, maximize=True),
    _case(
        "adagrad-all",
        "adagrad",
        17,
        ("sum",),
        max_lr=0.2,
        lr_decay=0.05,
        weight_decay=0.1,
        initial_accumulator_value=0.1,
        eps=1e-6,
        maximize=True,
    ),
    _case(
        "adagrad-schedule",
        "adagrad",
        18,
        ("sum",),
        max_lr=0.1,
        lr_decay=0.1,
        multiplier=halving_every_five,
    ),
]
CASES = RMSPROP_CASES + ADAGRAD_CASES
DTYPES = [torch.float32, torch.float64]


def run_against_torch(case: Case, dtype: torch.dtype, impl: str, *, inplace: bool) -> None:
    """20 steps of optorch and torch.optim side by side, compared after every step."""
    params = make_params(case.seed, dtype)
    grads = grad_sequence(case.seed, params, STEPS)
    reference = TorchReference(
        case.torch_class, params, multiplier=case.multiplier, **case.torch_hyper
    )
    optimizer = optorch.get_optimizer(case.name, impl=impl, inplace=inplace, **case.hyper)
    state = optimizer.init(params)
    assert sorted(state) == sorted(("step", *case.fields))
    tolerance = TOLERANCES[dtype]
    for step, grad in enumerate(grads, start=1):
        what = f"{case.id} {dtype} {impl} inplace={inplace} step {step}"
        before = snapshot(params, grad, state)
        new_params, new_state = optimizer.step(params, grad, state)
        if inplace:
            assert_unchanged([grad], before[1:2], what=f"{what} grads")
            assert all(new_params[k] is params[k] for k in params), f"{what}: params replaced"
            for field in case.fields:
                assert all(new_state[field][k] is state[field][k] for k in params), what
        else:
            assert_unchanged([params, grad, state], before, what=what)
            assert_no_aliasing(new_params, (params, grad, state), what=f"{what} params")
            assert_no_aliasing(
                {k: new_state[k] for k in case.fields}, (params, grad, state), what=f"{what} state"
            )
        params, state = new_params, new_state
        reference.step(grad)
        assert_trees_close(params, reference.params(), **tolerance, what=f"{what} params")
        for field in case.fields:
            expected = reference.state_field(field)
            assert_trees_close(state[field], expected, **tolerance, what=f"{what} {field!r}")
        assert state["step"].dtype == torch.int64 and int(state["step"]) == step, what
        assert reference.steps_taken() == [step] * len(params)
        assert all(p.dtype == dtype for p in params.values()), f"{what}: dtype changed"


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_matches_torch_optim(case: Case, dtype: torch.dtype, impl: str, inplace: bool) -> None:
    run_against_torch(case, dtype, impl, inplace=inplace)


# compiling costs seconds per kernel: one row per optimizer, in float32 in place and in
# float64 pure
COMPILED_CASES = compiled_params([RMSPROP_CASES[5], ADAGRAD_CASES[6]], lambda case: case.id)


@pytest.mark.parametrize(("case", "dtype", "inplace"), COMPILED_CASES)
def test_compiled_matches_torch_optim(case: Case, dtype: torch.dtype, inplace: bool) -> None:
    run_against_torch(case, dtype, "compiled", inplace=inplace)


# --------------------------------------------------------------------------------------
# config validation
# --------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ("rmsprop", {"max_lr": -0.1}, ValueError, r"max_lr: -0\.1"),
    ("rmsprop", {"alpha": 1.5}, ValueError, r"alpha: 1\.5"),
    ("rmsprop", {"alpha": -0.01}, ValueError, r"alpha: -0\.01"),
    ("rmsprop", {"alpha": math.nan}, ValueError, r"alpha: nan"),
    ("rmsprop", {"eps": -1e-8}, ValueError, r"eps: -1e-08"),
    ("rmsprop", {"weight_decay": -0.1}, ValueError, r"weight_decay: -0\.1"),
    ("rmsprop", {"momentum": -0.5}, ValueError, r"momentum: -0\.5"),
    ("rmsprop", {"momentum": math.inf}, ValueError, r"momentum: inf"),
    ("rmsprop", {"centered": "yes"}, TypeError, r"centered must be a bool"),
    ("rmsprop", {"maximize": 1}, TypeError, r"maximize must be a bool"),
    ("rmsprop", {"impl": "fused"}, ValueError, r"impl: 'fused'"),
    ("adagrad", {"max_lr": math.nan}, ValueError, r"max_lr: nan"),
    ("adagrad", {"lr_decay": -0.1}, ValueError, r"lr_decay: -0\.1"),
    ("adagrad", {"weight_decay": math.nan}, ValueError, r"weight_decay: nan"),
    ("adagrad", {"initial_accumulator_value": -0.5}, ValueError, r"initial_accumulator_value"),
    ("adagrad", {"eps": -1.0}, ValueError, r"eps: -1\.0"),
    ("adagrad", {"eps": math.inf}, ValueError, r"eps: inf"),
    ("adagrad", {"maximize": None}, TypeError, r"maximize must be a bool"),
    ("adagrad", {"lr_decay": "0.1"}, TypeError, r"lr_decay"),
]


@pytest.mark.parametrize(
    ("name", "hyper", "error", "message"),
    BAD_CONFIGS,
    ids=[f"{name}-{next(iter(hyper))}-{i}" for i, (name, hyper, _, _) in enumerate(BAD_CONFIGS)],
)
def test_bad_hyperparameters_are_rejected(
    name: str, hyper: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        optorch.get_optimizer(name, **hyper)


def test_config_change_that_breaks_validation_is_rejected_at_step() -> None:
    config = RMSpropConfig()
    config.alpha = 2.0  # written after construction: the step validates again
    params = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"alpha: 2\.0"):
        rmsprop_step(params, {"w": torch.ones(2)}, default_rmsprop_state(params), config)
    assert torch.equal(params["w"], torch.zeros(2))


# --------------------------------------------------------------------------------------
# registry, defaults and the seed-style functions
# --------------------------------------------------------------------------------------

TORCH_TWINS = [
    ("rmsprop", RMSpropConfig, torch.optim.RMSprop),
    ("adagrad", AdagradConfig, torch.optim.Adagrad),
]


@pytest.mark.parametrize(("name", "config_type", "torch_class"), TORCH_TWINS)
def test_registered_with_torch_defaults(
    name: str, config_type: type[Any], torch_class: type[torch.optim.Optimizer]
) -> None:
    assert name in optorch.REGISTRY
    optimizer = optorch.get_optimizer(name)
    assert isinstance(optimizer.config, config_type)
    assert optimizer.name == name
    torch_defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(torch_class.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    assert optimizer.config.max_lr == torch_defaults["lr"]
    shared = [key for key in torch_defaults if hasattr(optimizer.config, key)]
    assert "eps" in shared and "weight_decay" in shared and "maximize" in shared
    for key in shared:
        assert getattr(optimizer.config, key) == torch_defaults[key], key
    assert optorch.get_optimizer_step(name) is not None
    assert isinstance(optorch.DEFAULT_OPTIMIZER_CONFIGS[name](), config_type)


def test_fields_follow_the_config() -> None:
    params = {"w": torch.ones(3)}
    plain = optorch.get_optimizer("rmsprop").init(params)
    full = optorch.get_optimizer("rmsprop", momentum=0.9, centered=True).init(params)
    assert sorted(plain) == ["square_avg", "step"]
    assert sorted(full) == ["grad_avg", "momentum_buffer", "square_avg", "step"]
    accumulator = optorch.get_optimizer("adagrad", initial_accumulator_value=0.25).init(params)
    assert torch.equal(accumulator["sum"]["w"], torch.full((3,), 0.25))


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


@pytest.mark.parametrize("name", ["rmsprop", "adagrad"])
def test_seed_style_functions_on_a_module(name: str) -> None:
    """``default_x_state(model)`` then ``x_step`` with a config needing more fields."""
    torch.manual_seed(3)
    model = TinyNet()
    if name == "rmsprop":
        state = default_rmsprop_state(model)
        config: Any = RMSpropConfig(max_lr=0.01, momentum=0.9, centered=True)
        step_fn: Any = rmsprop_step
        torch_twin: Any = torch.optim.RMSprop(
            [p.detach().clone().requires_grad_() for p in model.layer.parameters()],
            lr=0.01,
            momentum=0.9,
            centered=True,
        )
    else:
        state = default_adagrad_state(model)
        config = AdagradConfig(max_lr=0.1, lr_decay=0.1)
        step_fn = adagrad_step
        torch_twin = torch.optim.Adagrad(
            [p.detach().clone().requires_grad_() for p in model.layer.parameters()],
            lr=0.1,
            lr_decay=0.1,
        )
    assert sorted(state["square_avg" if name == "rmsprop" else "sum"]) == [
        "layer.bias",
        "layer.weight",
    ]
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    generator = torch.Generator().manual_seed(5)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
        params, state = step_fn(params, grads, state, config)
        for tensor, key in zip(torch_twin.param_groups[0]["params"], grads, strict=True):
            tensor.grad = grads[key].clone()
        torch_twin.step()
    expected = dict(
        zip(["layer.weight", "layer.bias"], torch_twin.param_groups[0]["params"], strict=True)
    )
    assert_trees_close(
        dict(model.layer.named_parameters(prefix="layer")),
        {k: v.detach() for k, v in expected.items()},
        rtol=1e-6,
        atol=1e-6,
        what=f"{name} module params",
    )
    assert int(state["step"]) == 5


def test_init_with_config_matches_created_on_first_step() -> None:
    """Fields missing from a seed-style state are created exactly as init would."""
    config = AdagradConfig(initial_accumulator_value=0.3)
    params = make_params(21)
    grads = grad_sequence(21, params, 1)[0]
    from_init = init_state(optorch.REGISTRY["adagrad"].rule, params, config)
    first, _ = adagrad_step({k: v.clone() for k, v in params.items()}, grads, from_init, config)
    lazily = {"step": torch.zeros((), dtype=torch.int64)}
    second, lazy_state = adagrad_step(
        {k: v.clone() for k, v in params.items()}, grads, lazily, config
    )
    assert_trees_close(first, second, rtol=0.0, atol=0.0, what="params")
    assert_trees_close(from_init["sum"], lazy_state["sum"], rtol=0.0, atol=0.0, what="sum")
