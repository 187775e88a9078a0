"""SGD, Adam, AdamW and AMSGrad against ``torch.optim``: params AND state, 20 steps.

Each case of the table runs in float32 and float64, in place and pure, through the
reference loop and the default (``auto``) engine. The params are a dict pytree with a
matrix, a 1-D bias, a 0-d scalar and a 3-D tensor. State is compared field by field
with torch's ``momentum_buffer`` / ``exp_avg`` / ``exp_avg_sq`` / ``max_exp_avg_sq`` /
``step`` after every step. Scheduled runs compare with ``LambdaLR`` of the same
multiplier, set either by the loop (``config.lr_schedule_value``) or by ``schedule=``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import (
    TOLERANCES,
    TorchReference,
    assert_matches_torch,
    assert_no_aliasing,
    assert_unchanged,
    grad_sequence,
    make_params,
    snapshot,
)

import optorch
from optorch.builder import OPTIMIZER_STEP

STEPS = 20


@dataclass(frozen=True)
class Case:
    """One row: optorch registry name + hyperparameters, and the torch.optim twin."""

    id: str
    name: str
    hyper: dict[str, Any]
    torch_class: type[torch.optim.Optimizer]
    torch_hyper: dict[str, Any]
    fields: tuple[str, ...]
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _sgd(case_id: str, seed: int, **hyper: Any) -> Case:
    torch_hyper = {
        "lr": hyper.get("max_lr", 0.1),
        **{k: v for k, v in hyper.items() if k != "max_lr"},
    }
    fields = ("momentum",) if hyper.get("momentum", 0.9) != 0 else ()
    return Case(case_id, "sgd", hyper, torch.optim.SGD, torch_hyper, fields, seed)


def _adam(case_id: str, name: str, seed: int, **hyper: Any) -> Case:
    torch_class = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    torch_hyper = {"lr": hyper["max_lr"], **{k: v for k, v in hyper.items() if k != "max_lr"}}
    if name == "adamw":
        torch_hyper.setdefault("weight_decay", 0.0)  # torch's AdamW default is 0.01
    fields = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hyper.get("amsgrad") else ())
    return Case(case_id, name, hyper, torch_class, torch_hyper, fields, seed)


CASES = [
    _sgd("sgd-plain", 1, momentum=0.0, max_lr=0.1),
    _sgd("sgd-plain-wd", 2, momentum=0.0, weight_decay=0.1, max_lr=0.1),
    _sgd("sgd-momentum", 3, momentum=0.9, max_lr=0.05),
    _sgd(
        "sgd-momentum-wd-dampening", 4, momentum=0.9, weight_decay=0.05, dampening=0.3, max_lr=0.05
    ),
    _sgd("sgd-nesterov-wd", 5, momentum=0.8, weight_decay=0.01, nesterov=True, max_lr=0.05),
    _sgd("sgd-maximize", 6, momentum=0.5, weight_decay=0.02, maximize=True, max_lr=0.05),
    # a tensor dampening of 0 is "zero dampening" to torch's nesterov check too
    _sgd(
        "sgd-nesterov-tensor-dampening",
        16,
        momentum=0.8,
        nesterov=True,
        dampening=torch.tensor(0.0),
        max_lr=0.05,
    ),
    _adam("adam", "adam", 7, max_lr=0.05),
    _adam("adam-l2", "adam", 8, max_lr=0.05, weight_decay=0.1, betas=(0.8, 0.99)),
    _adam("adam-maximize", "adam", 9, max_lr=0.02, maximize=True, eps=1e-6),
    _adam("amsgrad", "adam", 10, max_lr=0.05, amsgrad=True),
    _adam("amsgrad-l2", "adam", 11, max_lr=0.05, amsgrad=True, weight_decay=0.05),
    _adam("adamw", "adamw", 12, max_lr=0.05, weight_decay=0.1),
    _adam("adamw-amsgrad", "adamw", 13, max_lr=0.05, weight_decay=0.2, amsgrad=True),
    _adam("adamw-maximize", "adamw", 14, max_lr=0.03, weight_decay=0.1, maximize=True),
    _adam("adamw-no-decay", "adamw", 15, max_lr=0.05, weight_decay=0.0),
]
DTYPES = [torch.float32, torch.float64]


def warmup_cosine(k: int) -> float:
    """A multiplier in [0, 1]: 4 warmup steps, then a cosine decay to 0.1 at step 20."""
    if k < 4:
        return (k + 1) / 4
    progress = min(1.0, (k - 4) / 16)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def run_against_torch(
    case: Case,
    dtype: torch.dtype,
    *,
    inplace: bool,
    impl: str,
    schedule_via: str | None = None,
) -> None:
    """Run ``case`` for STEPS steps in optorch and torch.optim, comparing after each."""
    tolerance = TOLERANCES[dtype]
    params = make_params(case.seed, dtype)
    grads_per_step = grad_sequence(case.seed, params, STEPS)
    multiplier = warmup_cosine if schedule_via is not None else None
    reference = TorchReference(case.torch_class, params, multiplier, **case.torch_hyper)

    hyper: dict[str, Any] = {**case.hyper, "inplace": inplace, "impl": impl}
    if schedule_via == "callable":
        hyper["schedule"] = warmup_cosine
    optimizer = optorch.get_optimizer(case.name, **hyper)
    config = optimizer.config
    step = OPTIMIZER_STEP[case.name]
    state = optimizer.init(params)

    for k, grads in enumerate(grads_per_step):
        if schedule_via == "value":
            config.lr_schedule_value = warmup_cosine(k)  # the seed's loop does exactly this
        before = snapshot(params, grads, state)
        new_params, new_state = step(params, grads, state, config)
        if inplace:
            for name, tensor in params.items():
                assert new_params[name] is tensor, f"step {k}: {name} is a new tensor"
            for field_name in case.fields:
                if field_name in state:
                    for name, tensor in state[field_name].items():
                        assert new_state[field_name][name] is tensor
        else:
            assert_unchanged([params, grads, state], before, what=f"{case.id} step {k}")
            assert_no_aliasing(
                new_params, [params, grads, state], what=f"{case.id} step {k} params"
            )
            assert_no_aliasing(
                {f: new_state[f] for f in case.fields},
                [params, grads, state],
                what=f"{case.id} step {k} state",
            )
        reference.step(grads)
        params, state = new_params, new_state
        assert_matches_torch(
            params,
            state,
            reference,
            case.fields,
            step_count=k + 1,
            what=f"{case.id} {dtype} step {k}",
            torch_has_step=case.name != "sgd",
            **tolerance,
        )
    if case.name == "sgd" and not case.fields:
        assert "momentum" not in state, "momentum=0 must keep no buffer (torch keeps none)"


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torch_optim(case: Case, dtype: torch.dtype, inplace: bool, impl: str) -> None:
    run_against_torch(case, dtype, inplace=inplace, impl=impl)


SCHEDULED = [
    c for c in CASES if c.id in {"sgd-momentum-wd-dampening", "adam-l2", "amsgrad", "adamw"}
]


@pytest.mark.parametrize("schedule_via", ["value", "callable"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SCHEDULED, ids=lambda c: c.id)
def test_scheduled_matches_lambda_lr(
    case: Case, dtype: torch.dtype, inplace: bool, schedule_via: str
) -> None:
    """``schedule(k)`` is evaluated at k steps taken (0 first), like ``LambdaLR``."""
    run_against_torch(case, dtype, inplace=inplace, impl="auto", schedule_via=schedule_via)


def test_schedule_is_not_ignored() -> None:
    """The scheduled run differs from the unscheduled one (else the tests above prove little)."""
    case = next(c for c in CASES if c.id == "adamw")
    params = make_params(case.seed, torch.float64)
    grads = grad_sequence(case.seed, params, 3)
    outs = []
    for schedule in (None, warmup_cosine):
        opt = optorch.get_optimizer(case.name, **case.hyper, schedule=schedule, inplace=False)
        p, s = params, opt.init(params)
        for g in grads:
            p, s = opt.step(p, g, s)
        outs.append(p)
    assert not torch.allclose(outs[0]["layer.weight"], outs[1]["layer.weight"], rtol=0, atol=1e-6)
