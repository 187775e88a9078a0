r"""Fully decoupled Adam and LARS against independent references, params AND state.

Decoupled Adam (Loshchilov & Hutter 2017, arXiv:1711.05101), with :math:`s_t` the
schedule multiplier and :math:`\lambda` the weight decay:

.. math::

    p \leftarrow p (1 - \lambda s_t), \quad
    m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2, \quad
    p \leftarrow p - \eta s_t \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}

Under a constant schedule this is ``torch.optim.AdamW`` with weight decay
:math:`\lambda / \eta` (torch multiplies the decay by the lr). Under a varying schedule
it is checked against the formula above, written here in float64.

LARS (You, Gitman & Ginsburg 2017, arXiv:1708.03888, Algorithm 1), per tensor:
:math:`d = g + \lambda p`, trust ratio :math:`r = \kappa \lVert p \rVert / (\lVert d
\rVert + \epsilon)` (1 if either norm is zero), :math:`b \leftarrow \mu b + \eta r d`,
:math:`p \leftarrow p - b`; with ``exclude_1d`` the tensors of dim <= 1 use
:math:`b \leftarrow \mu b + \eta g` (no decay, no adaptation).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import (
    TOLERANCES,
    TorchReference,
    assert_matches_torch,
    assert_trees_close,
    assert_unchanged,
    grad_sequence,
    make_params,
    snapshot,
)

import optorch
from optorch.adam import AdamConfig, AdamWDMode, adam_step
from optorch.lars import LARSConfig, lars_step

STEPS = 20
DTYPES = [torch.float32, torch.float64]
#: float32 optorch against a float64 formula: the rounding of 20 float32 steps.
FORMULA_TOLERANCES = {
    torch.float64: TOLERANCES[torch.float64],
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
}


def varying_schedule(k: int) -> float:
    """A multiplier that moves every step: linear warmup over 3 steps, then a cosine."""
    if k < 3:
        return 0.2 + 0.8 * k / 3
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (k - 3) / 17))) * 0.9 + 0.05


def run_optorch(
    step_fn: Any,
    config: Any,
    params: dict[str, torch.Tensor],
    state: dict[str, Any],
    grads: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One step; in pure mode also check that the inputs come back untouched."""
    before = snapshot(params, grads, state)
    new_params, new_state = step_fn(params, grads, state, config)
    if not config.inplace:
        assert_unchanged([params, grads, state], before, what="pure step")
    return new_params, new_state


# --------------------------------------------------------------------------------------
# decoupled Adam
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("constant", [None, 1.0, 0.6], ids=["no-schedule", "value-1", "value-0.6"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoupled_adam_matches_torch_adamw_under_constant_schedule(
    dtype: torch.dtype, inplace: bool, constant: float | None
) -> None:
    max_lr, weight_decay = 0.05, 0.02
    params = make_params(21, dtype)
    grads_per_step = grad_sequence(21, params, STEPS)
    multiplier = constant if constant is not None else 1.0
    # torch: p *= 1 - (max_lr * s) * wd_torch; optorch: p *= 1 - wd * s, so wd_torch = wd / max_lr
    reference = TorchReference(
        torch.optim.AdamW,
        params,
        (lambda k: multiplier) if constant is not None else None,
        lr=max_lr,
        weight_decay=weight_decay / max_lr,
        betas=(0.9, 0.99),
    )
    config = AdamConfig(
        max_lr=max_lr,
        weight_decay=weight_decay,
        betas=(0.9, 0.99),
        mode=AdamWDMode.DECOUPLED,
        lr_schedule_value=constant,
        inplace=inplace,
    )
    state = optorch.init_optimizer_state("decoupled_adam", params, config)
    for k, grads in enumerate(grads_per_step):
        params, state = run_optorch(adam_step, config, params, state, grads)
        reference.step(grads)
        assert_matches_torch(
            params,
            state,
            reference,
            ("exp_avg", "exp_avg_sq"),
            step_count=k + 1,
            what=f"decoupled step {k}",
            **TOLERANCES[dtype],
        )


def decoupled_adam_formula(
    params: dict[str, torch.Tensor],
    grads_per_step: list[dict[str, torch.Tensor]],
    *,
    max_lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    amsgrad: bool,
    schedule: Any,
) -> list[tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]]:
    """Loshchilov & Hutter's decoupled Adam in float64; (params, state) after each step."""
    beta1, beta2 = betas
    p = {k: v.detach().to(torch.float64).clone() for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in p.items()}
    v = {k: torch.zeros_like(x) for k, x in p.items()}
    v_max = {k: torch.zeros_like(x) for k, x in p.items()}
    history = []
    for t, grads in enumerate(grads_per_step, start=1):
        s = schedule(t - 1)
        for name in p:
            g = grads[name].to(torch.float64)
            p[name] = p[name] * (1.0 - weight_decay * s)
            m[name] = beta1 * m[name] + (1.0 - beta1) * g
            v[name] = beta2 * v[name] + (1.0 - beta2) * g * g
            v_max[name] = torch.maximum(v_max[name], v[name])
            second = v_max[name] if amsgrad else v[name]
            m_hat = m[name] / (1.0 - beta1**t)
            v_hat = second / (1.0 - beta2**t)
            p[name] = p[name] - max_lr * s * m_hat / (torch.sqrt(v_hat) + eps)
        state = {"exp_avg": dict(m), "exp_avg_sq": dict(v)}
        if amsgrad:
            state["max_exp_avg_sq"] = dict(v_max)
        history.append((dict(p), state))
    return history


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("schedule_via", ["value", "callable"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoupled_adam_matches_formula_under_varying_schedule(
    dtype: torch.dtype, inplace: bool, schedule_via: str, amsgrad: bool
) -> None:
    hyper = {
        "max_lr": 0.04,
        "weight_decay": 0.05,
        "betas": (0.85, 0.995),
        "eps": 1e-7,
        "amsgrad": amsgrad,
    }
    params = make_params(22, dtype)
    grads_per_step = grad_sequence(22, params, STEPS)
    expected = decoupled_adam_formula(params, grads_per_step, schedule=varying_schedule, **hyper)

    config = optorch.DEFAULT_OPTIMIZER_CONFIGS["decoupled_adam"](
        **hyper,
        inplace=inplace,
        schedule=varying_schedule if schedule_via == "callable" else None,
    )
    assert config.mode is AdamWDMode.DECOUPLED
    state = optorch.init_optimizer_state("decoupled_adam", params, config)
    fields = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    for k, grads in enumerate(grads_per_step):
        if schedule_via == "value":
            config.lr_schedule_value = varying_schedule(k)
        params, state = run_optorch(adam_step, config, params, state, grads)
        want_params, want_state = expected[k]
        tolerance = FORMULA_TOLERANCES[dtype]
        assert_trees_close(params, want_params, what=f"params step {k}", **tolerance)
        for name in fields:
            assert_trees_close(state[name], want_state[name], what=f"{name} step {k}", **tolerance)
        assert int(state["step"]) == k + 1


def test_decoupled_decay_differs_from_adamw_under_a_schedule() -> None:
    """With s_t < 1, DECOUPLED decays by wd * s_t while ADAMW decays by lr * s_t * wd."""
    params = {"w": torch.ones(3, dtype=torch.float64)}
    zero = {"w": torch.zeros(3, dtype=torch.float64)}  # Adam's own update is then exactly 0
    for mode, factor in (
        (AdamWDMode.DECOUPLED, 1 - 0.1 * 0.5),
        (AdamWDMode.ADAMW, 1 - 0.2 * 0.5 * 0.1),
    ):
        config = AdamConfig(
            max_lr=0.2, weight_decay=0.1, mode=mode, lr_schedule_value=0.5, inplace=False
        )
        state = optorch.init_optimizer_state("adam", params, config)
        new, _ = adam_step(params, zero, state, config)
        torch.testing.assert_close(
            new["w"], torch.full((3,), factor, dtype=torch.float64), rtol=0, atol=1e-15
        )


# --------------------------------------------------------------------------------------
# LARS
# --------------------------------------------------------------------------------------

LARS_SHAPES = {
    "weight": (4, 3),
    "bias": (4,),
    "scale": (),
    "zero_weight": (3, 2),  # starts at zero: ||p|| = 0 on the first step
    "dead_weight": (2, 2),  # zero param and zero grad throughout: both norms 0
    "still_weight": (2, 3),  # zero grad throughout: d = wd * p only
}


def lars_problem(
    dtype: torch.dtype, seed: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    params = make_params(seed, dtype, LARS_SHAPES)
    params["zero_weight"].zero_()
    params["dead_weight"].zero_()
    grads_per_step = grad_sequence(seed, params, STEPS)
    for grads in grads_per_step:
        grads["dead_weight"].zero_()
        grads["still_weight"].zero_()
    return params, grads_per_step


def lars_formula(
    params: dict[str, torch.Tensor],
    grads_per_step: list[dict[str, torch.Tensor]],
    *,
    max_lr: float,
    momentum: float,
    weight_decay: float,
    trust_coefficient: float,
    eps: float,
    exclude_1d: bool,
    schedule: Any,
) -> list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Algorithm 1 of arXiv:1708.03888 in float64; (params, momentum) after each step."""
    p = {k: v.detach().to(torch.float64).clone() for k, v in params.items()}
    b = {k: torch.zeros_like(v) for k, v in p.items()}
    history = []
    for k, grads in enumerate(grads_per_step):
        lr = max_lr * schedule(k)
        for name in p:
            g = grads[name].to(torch.float64)
            if exclude_1d and p[name].dim() <= 1:
                b[name] = momentum * b[name] + lr * g
            else:
                d = g + weight_decay * p[name]
                p_norm = math.sqrt(float((p[name] ** 2).sum()))
                d_norm = math.sqrt(float((d**2).sum()))
                ratio = (
                    trust_coefficient * p_norm / (d_norm + eps)
                    if p_norm > 0 and d_norm > 0
                    else 1.0
                )
                b[name] = momentum * b[name] + lr * ratio * d
            p[name] = p[name] - b[name]
        history.append((dict(p), dict(b)))
    return history


LARS_CASES = [
    ("plain", {"momentum": 0.9, "weight_decay": 0.0, "trust_coefficient": 0.02, "eps": 1e-8}),
    ("decay", {"momentum": 0.9, "weight_decay": 0.01, "trust_coefficient": 0.02, "eps": 1e-8}),
    ("no-momentum", {"momentum": 0.0, "weight_decay": 0.05, "trust_coefficient": 0.1, "eps": 1e-6}),
]


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "scheduled"])
@pytest.mark.parametrize("exclude_1d", [False, True], ids=["all", "exclude-1d"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("case_id", "hyper"), LARS_CASES, ids=[c[0] for c in LARS_CASES])
def test_lars_matches_paper_formula(
    case_id: str,
    hyper: dict[str, float],
    dtype: torch.dtype,
    inplace: bool,
    exclude_1d: bool,
    scheduled: bool,
    impl: str,
) -> None:
    max_lr = 0.5
    params, grads_per_step = lars_problem(dtype, seed=23)
    schedule = varying_schedule if scheduled else (lambda k: 1.0)
    expected = lars_formula(
        params, grads_per_step, max_lr=max_lr, exclude_1d=exclude_1d, schedule=schedule, **hyper
    )
    config = LARSConfig(max_lr=max_lr, exclude_1d=exclude_1d, inplace=inplace, impl=impl, **hyper)
    state = optorch.init_optimizer_state("lars", params, config)
    tolerance = FORMULA_TOLERANCES[dtype]
    for k, grads in enumerate(grads_per_step):
        if scheduled:
            config.lr_schedule_value = varying_schedule(k)
        params, state = run_optorch(lars_step, config, params, state, grads)
        want_params, want_momentum = expected[k]
        assert_trees_close(params, want_params, what=f"{case_id} params step {k}", **tolerance)
        assert_trees_close(
            state["momentum"], want_momentum, what=f"{case_id} momentum step {k}", **tolerance
        )
        assert int(state["step"]) == k + 1
        for name, tensor in params.items():
            assert torch.isfinite(tensor).all(), f"{name} not finite at step {k}"
    # the zero-norm guard kept the all-zero tensors finite and moved the zero-init one
    assert torch.equal(params["dead_weight"], torch.zeros_like(params["dead_weight"]))
    assert params["zero_weight"].abs().sum() > 0


def test_lars_trust_ratio_is_applied() -> None:
    """The layer-wise rate really scales the step: a tiny trust coefficient gives a tiny step."""
    params = {"w": torch.tensor([[3.0, 4.0]], dtype=torch.float64)}  # ||p|| = 5
    grads = {"w": torch.tensor([[0.0, 2.0]], dtype=torch.float64)}  # ||g|| = 2
    config = LARSConfig(max_lr=1.0, momentum=0.0, trust_coefficient=0.01, eps=0.0, inplace=False)
    state = optorch.init_optimizer_state("lars", params, config)
    new, _ = lars_step(params, grads, state, config)
    # ratio = 0.01 * 5 / 2 = 0.025; p - 1.0 * 0.025 * g
    torch.testing.assert_close(
        new["w"], torch.tensor([[3.0, 4.0 - 0.05]], dtype=torch.float64), rtol=0, atol=1e-15
    )
