"""Soak: 10,000 float16 steps with dynamic loss scaling and injected faults.

A two-layer MLP (8 -> 16 -> 4, 212 params) keeps float32 master params. Every step
scales the loss with :func:`optorch.amp.scale_loss`, takes the gradients of the
masters, rounds them to float16 (so a scaled gradient beyond 65504 becomes ``inf``,
as in a float16 backward pass; the matmuls themselves run in float32 because float16
matmuls on CPU are about 20x slower), and takes :func:`optorch.amp.scaled_step` with
AdamW (foreach, in place). At seeded random steps a gradient entry is overwritten with
``inf``, ``-inf`` or ``NaN``. A growth interval of 25 lets the scale climb to
float16's ceiling, so natural overflows happen as well as the injected ones.

Checked over the whole run:

* no NaN or inf ever reaches the params or the optimizer state (checked every step);
* every step is skipped exactly when its gradients are non-finite: the injected faults
  plus the natural float16 overflows, which the test detects itself (on the gradients
  before injection) and counts separately; the optimizer's step count equals the
  number of steps taken;
* the scale follows ``torch.amp.GradScaler``'s rule exactly: the test replays the rule
  in Python on its own fault record, with powers of two, so every value is exact;
* the scale stays within bounds derived from the rule: at least
  ``init_scale * backoff_factor ** faults_so_far`` and at most
  ``max(init_scale, growth_factor * 65504 / g_floor)``, where ``g_floor`` is the
  smallest largest-unscaled-gradient of the run (above ``65504 / g_floor`` the scaled
  float16 gradient overflows, which backs the scale off; one growth may overshoot).
"""

from __future__ import annotations

import random

import pytest
import torch

import optorch
from optorch import amp

pytestmark = pytest.mark.soak

STEPS = 10_000
INIT_SCALE = 2.0**10
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5
GROWTH_INTERVAL = 25
FP16_MAX = torch.finfo(torch.float16).max
#: fault steps: 1.5% of the steps; a tenth of them NaN, the rest +-inf
FAULT_RATE = 0.015


def _fault_plan(seed: int) -> dict[int, float]:
    rng = random.Random(seed)
    plan: dict[int, float] = {}
    for step in range(STEPS):
        if rng.random() < FAULT_RATE:
            plan[step] = rng.choice([float("nan")] + [float("inf"), float("-inf")] * 5)
    return plan


def _replay_scale(found: list[bool]) -> list[float]:
    """GradScaler's update rule in plain Python: the scale after each step."""
    scale, tracker, out = INIT_SCALE, 0, []
    for overflow in found:
        if overflow:
            scale, tracker = scale * BACKOFF_FACTOR, 0
        else:
            tracker += 1
            if tracker >= GROWTH_INTERVAL:
                scale, tracker = scale * GROWTH_FACTOR, 0
        out.append(scale)
    return out


def test_fp16_soak_with_injected_faults() -> None:
    gen = torch.Generator().manual_seed(2024)
    params = {
        "hidden.weight": torch.randn(16, 8, generator=gen) * 0.3,
        "hidden.bias": torch.zeros(16),
        "out.weight": torch.randn(4, 16, generator=gen) * 0.3,
        "out.bias": torch.zeros(4),
    }
    teacher = torch.randn(8, 4, generator=gen)
    inputs = [torch.randn(16, 8, generator=gen) for _ in range(32)]
    batches = [(x, torch.tanh(x @ teacher)) for x in inputs]

    opt = optorch.get_optimizer("adamw", max_lr=1e-3, weight_decay=0.01, impl="foreach")
    opt_state = opt.init(params)
    scaler = amp.init_grad_scaler(
        init_scale=INIT_SCALE,
        growth_factor=GROWTH_FACTOR,
        backoff_factor=BACKOFF_FACTOR,
        growth_interval=GROWTH_INTERVAL,
        precision="fp16",
    )
    names = list(params)
    masters = [params[n] for n in names]
    state_leaves = [opt_state[f][n] for f in opt.rule.fields(opt.config) for n in names]
    watched = masters + state_leaves
    plan = _fault_plan(seed=7)

    finite_after = torch.zeros(STEPS, dtype=torch.bool)
    skipped = torch.zeros(STEPS, dtype=torch.bool)
    natural = torch.zeros(STEPS, dtype=torch.bool)
    scales = torch.zeros(STEPS, dtype=torch.float32)
    largest_grad = torch.zeros(STEPS, dtype=torch.float32)

    for step in range(STEPS):
        x, y = batches[step % len(batches)]
        for tensor in masters:
            tensor.requires_grad_(True)
        w1, b1, w2, b2 = masters
        prediction = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        loss = ((prediction - y) ** 2).mean()
        scaled = amp.scale_loss(loss, scaler)
        exact = torch.autograd.grad(scaled, masters)
        for tensor in masters:
            tensor.requires_grad_(False)
        # float16 gradients (rounded, inf beyond 65504) of the float32 masters
        grads = [g.half().float() for g in exact]

        # the test's own record: natural overflow, and the largest unscaled gradient
        natural[step] = ~torch.stack(torch._foreach_norm(grads)).isfinite().all()
        largest = torch.stack(torch._foreach_norm(exact, ord=float("inf"))).max()
        largest_grad[step] = largest / scaler["scale"]
        fault = plan.get(step)
        if fault is not None:
            target = grads[step % len(grads)]
            target.view(-1)[step % target.numel()] = fault

        out = amp.scaled_step(
            opt,
            dict(zip(names, masters, strict=True)),
            dict(zip(names, grads, strict=True)),
            opt_state,
            scaler,
        )
        skipped[step] = out.found_inf.bool()
        scales[step] = scaler["scale"]
        norms = torch._foreach_norm(watched)
        finite_after[step] = torch.stack(norms).isfinite().all()

    bad = (~finite_after).nonzero()
    assert bad.numel() == 0, f"non-finite params/state after step {int(bad[0])}"

    injected = torch.zeros(STEPS, dtype=torch.bool)
    injected[list(plan)] = True
    expected_skips = injected | natural
    wrong = (skipped != expected_skips).nonzero()
    assert wrong.numel() == 0, f"step {int(wrong[0])} skipped={bool(skipped[wrong[0]])}"
    assert int(skipped.sum()) == len(plan) + int((natural & ~injected).sum())
    assert len(plan) > 100 and any(v != v for v in plan.values())  # NaN faults included
    assert int(natural.sum()) > 0  # the scale reached float16's ceiling: both kinds happen
    assert int(opt_state["step"]) == STEPS - int(skipped.sum())

    replayed = torch.tensor(_replay_scale(expected_skips.tolist()), dtype=torch.float32)
    mismatch = (scales != replayed).nonzero()
    assert mismatch.numel() == 0, (
        f"scale after step {int(mismatch[0])}: {float(scales[mismatch[0]])} vs "
        f"GradScaler's rule {float(replayed[mismatch[0]])}"
    )

    faults_so_far = torch.cumsum(expected_skips.to(torch.float64), 0)
    lower = INIT_SCALE * BACKOFF_FACTOR**faults_so_far
    finite_steps = largest_grad[~expected_skips]
    g_floor = float(finite_steps[finite_steps > 0].min())
    upper = max(INIT_SCALE, GROWTH_FACTOR * FP16_MAX / g_floor)
    assert bool((scales.double() >= lower).all())
    assert float(scales.max()) <= upper
    assert float(scales.min()) > 0.0
