"""Tests of ``optorch.schedule``.

* every schedule against a float64 formula written here from its definition, at every
  step up to well past its end, with the step as a Python int and as a tensor;
* clamping past the end, ``total_steps == warmup_steps``, tensor dtypes and shapes,
  ``torch.func.vmap``, ``torch.compile(fullgraph=True)`` without recompiles;
* trajectories equal to the ``torch.optim.lr_scheduler`` equivalents, and SGD driven by
  each schedule equal to ``torch.optim.SGD`` driven by that scheduler (params and
  momentum buffers, 20 steps);
* validation: (callable, arguments, error type, message regex) tables.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_trees_close, grad_sequence, make_params
from torch._dynamo.testing import CompileCounter
from torch.optim import lr_scheduler as torch_schedulers

import optorch
from optorch import schedule as S

RTOL = 1e-12  # float64 formulas vs float64 implementations
ATOL = 1e-14
NAN = float("nan")


# --------------------------------------------------------------------------------------
# float64 references written from the definitions (piecewise, with plain branches)
# --------------------------------------------------------------------------------------


def ref_warmup(s: int, warmup: int, start: float) -> float:
    return start + (1.0 - start) * s / warmup if s < warmup else 1.0


def ref_rsqrt(s: int, warmup: int, start: float) -> float:
    return ref_warmup(s, warmup, start) if s < warmup else math.sqrt(warmup) / math.sqrt(s)


def ref_shape(shape: str, progress: float) -> float:
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - math.sqrt(progress)


def ref_wsd(
    s: int, total: int, warmup: int, decay: int, shape: str, start: float, terminal: float
) -> float:
    """Warmup, 1 until ``total - decay``, then ``shape`` down to ``terminal`` at ``total``."""
    if s < warmup:
        return ref_warmup(s, warmup, start)
    if s >= total:
        return terminal
    if s < total - decay:
        return 1.0
    progress = (s - (total - decay)) / decay
    return terminal + (1.0 - terminal) * ref_shape(shape, progress)


def ref_step_decay(s: int, step_size: int, gamma: float) -> float:
    return gamma ** (s // step_size)


def ref_exponential(s: int, gamma: float, every: int, staircase: bool, floor: float) -> float:
    exponent = s // every if staircase else s / every
    return max(gamma**exponent, floor)


def ref_piecewise(s: int, boundaries: list[int], values: list[float]) -> float:
    value = values[0]
    for boundary, after in zip(boundaries, values[1:], strict=True):
        if s >= boundary:
            value = after
    return value


def ref_linear(s: int, total: int, start: float, end: float) -> float:
    if s >= total:
        return end
    return start + (end - start) * s / total


def ref_cosine_annealing(s: int, t_max: int, eta_min: float) -> float:
    if s >= t_max:
        return eta_min
    return eta_min + (1.0 - eta_min) * 0.5 * (1.0 + math.cos(math.pi * s / t_max))


def ref_joined(s: int, pieces: list[Callable[[int], float]], boundaries: list[int]) -> float:
    start, piece = 0, pieces[0]
    for boundary, after in zip(boundaries, pieces[1:], strict=True):
        if s >= boundary:
            start, piece = boundary, after
    return piece(s - start)


def seed_config(kind: str, **fields: Any) -> Callable[[Any], Any]:
    return S.build_lr_scheduler(S.LRSchedulerConfig(scheduler_type=kind, **fields))


# (id, schedule, reference, last step to check); every step in [0, last] is checked
CASES: list[tuple[str, Callable[[Any], Any], Callable[[int], float], int]] = [
    (
        "constant_lr",
        functools.partial(S.constant_lr, warmup_steps=5, warmup_start_value=0.1),
        lambda s: ref_warmup(s, 5, 0.1),
        12,
    ),
    (
        "constant_lr-no-warmup",
        functools.partial(S.constant_lr, warmup_steps=0, warmup_start_value=0.3),
        lambda s: 1.0,
        5,
    ),
    (
        "rsqrt_lr",
        functools.partial(S.rsqrt_lr, warmup_steps=4, warmup_start_value=0.2),
        lambda s: ref_rsqrt(s, 4, 0.2),
        40,
    ),
    (
        "cosine_lr",
        functools.partial(
            S.cosine_lr,
            total_steps=20,
            warmup_steps=5,
            warmup_start_value=0.1,
            lr_terminal_value=0.05,
        ),
        lambda s: ref_wsd(s, 20, 5, 15, "cosine", 0.1, 0.05),
        40,
    ),
    (
        "cosine_lr-no-warmup",
        functools.partial(
            S.cosine_lr,
            total_steps=9,
            warmup_steps=0,
            warmup_start_value=0.0,
            lr_terminal_value=0.0,
        ),
        lambda s: ref_cosine_annealing(s, 9, 0.0),
        20,
    ),
    (
        "linear_warmdown_lr",
        functools.partial(
            S.linear_warmdown_lr,
            total_steps=17,
            warmup_steps=3,
            warmup_start_value=0.0,
            lr_terminal_value=0.2,
        ),
        lambda s: ref_wsd(s, 17, 3, 14, "linear", 0.0, 0.2),
        30,
    ),
    *[
        (
            f"wsd-{shape}",
            S.warmup_stable_decay(
                total_steps=30,
                warmup_steps=5,
                decay_steps=9,
                decay_shape=shape,
                warmup_start_value=0.1,
                lr_terminal_value=0.01,
            ),
            functools.partial(lambda s, shape: ref_wsd(s, 30, 5, 9, shape, 0.1, 0.01), shape=shape),
            40,
        )
        for shape in S.DECAY_SHAPES
    ],
    (
        "wsd-fraction",  # round(0.25 * 30) = 8 decay steps
        S.warmup_stable_decay(total_steps=30, warmup_steps=4, decay_fraction=0.25),
        lambda s: ref_wsd(s, 30, 4, 8, "linear", 0.0, 0.0),
        35,
    ),
    (
        "wsd-no-decay",
        S.warmup_stable_decay(total_steps=10, warmup_steps=2, decay_steps=0, lr_terminal_value=0.5),
        lambda s: ref_wsd(s, 10, 2, 0, "linear", 0.0, 0.5),
        15,
    ),
    (
        "wsd-no-stable-phase",
        S.warmup_stable_decay(total_steps=10, warmup_steps=4, decay_steps=6, decay_shape="cosine"),
        lambda s: ref_wsd(s, 10, 4, 6, "cosine", 0.0, 0.0),
        15,
    ),
    (
        "step_decay",
        S.step_decay(step_size=3, gamma=0.5),
        lambda s: ref_step_decay(s, 3, 0.5),
        20,
    ),
    (
        "exponential",
        S.exponential_decay(gamma=0.9),
        lambda s: ref_exponential(s, 0.9, 1, False, 0.0),
        30,
    ),
    (
        "exponential-smooth-floor",
        S.exponential_decay(gamma=0.5, transition_steps=4, min_value=0.1),
        lambda s: ref_exponential(s, 0.5, 4, False, 0.1),
        30,
    ),
    (
        "exponential-staircase",
        S.exponential_decay(gamma=0.7, transition_steps=3, staircase=True),
        lambda s: ref_exponential(s, 0.7, 3, True, 0.0),
        30,
    ),
    (
        "piecewise",
        S.piecewise_constant(boundaries=[3, 7, 12], values=[1.0, 0.5, 0.2, 0.05]),
        lambda s: ref_piecewise(s, [3, 7, 12], [1.0, 0.5, 0.2, 0.05]),
        20,
    ),
    (
        "linear_warmup",
        S.linear_warmup(total_iters=8, start_factor=0.25),
        lambda s: ref_linear(s, 8, 0.25, 1.0),
        15,
    ),
    (
        "linear-decreasing",
        S.linear_warmup(total_iters=6, start_factor=1.0, end_factor=0.5),
        lambda s: ref_linear(s, 6, 1.0, 0.5),
        15,
    ),
    (
        "linear-zero-iters",
        S.linear_warmup(total_iters=0, start_factor=0.1, end_factor=0.7),
        lambda s: 0.7,
        3,
    ),
    (
        "cosine_annealing",
        S.cosine_annealing(T_max=12, eta_min=0.1),
        lambda s: ref_cosine_annealing(s, 12, 0.1),
        30,
    ),
    (
        "cosine_annealing-zero",
        S.cosine_annealing(T_max=0, eta_min=0.3),
        lambda s: 0.3,
        3,
    ),
    (
        "join",
        S.join_schedules(
            [
                S.linear_warmup(total_iters=4, start_factor=0.0),
                S.cosine_annealing(T_max=10, eta_min=0.2),
                S.step_decay(step_size=2, gamma=0.5),
            ],
            [4, 16],
        ),
        lambda s: ref_joined(
            s,
            [
                lambda k: ref_linear(k, 4, 0.0, 1.0),
                lambda k: ref_cosine_annealing(k, 10, 0.2),
                lambda k: ref_step_decay(k, 2, 0.5),
            ],
            [4, 16],
        ),
        25,
    ),
    (
        "join-seed-functions",  # plain callables taking the shifted step, int or tensor
        S.join_schedules(
            [
                functools.partial(S.constant_lr, warmup_steps=3, warmup_start_value=0.5),
                functools.partial(S.rsqrt_lr, warmup_steps=2, warmup_start_value=1.0),
            ],
            [6],
        ),
        lambda s: ref_warmup(s, 3, 0.5) if s < 6 else ref_rsqrt(s - 6, 2, 1.0),
        20,
    ),
    (
        "config-constant",
        seed_config("constant", warmup_steps=3, warmup_start_value=0.4),
        lambda s: ref_warmup(s, 3, 0.4),
        8,
    ),
    (
        "config-rsqrt",
        seed_config("rsqrt", warmup_steps=3),
        lambda s: ref_rsqrt(s, 3, 0.0),
        20,
    ),
    (
        "config-cosine",
        seed_config("cosine", warmup_steps=2, total_steps=12, lr_terminal_value=0.1),
        lambda s: ref_wsd(s, 12, 2, 10, "cosine", 0.0, 0.1),
        20,
    ),
    (
        "config-linear_warmdown",
        seed_config("linear_warmdown", warmup_steps=2, total_steps=12, warmup_start_value=0.5),
        lambda s: ref_wsd(s, 12, 2, 10, "linear", 0.5, 0.0),
        20,
    ),
    (
        "config-wsd",
        seed_config(
            "wsd", warmup_steps=2, total_steps=20, decay_fraction=0.3, decay_shape="1-sqrt"
        ),
        lambda s: ref_wsd(s, 20, 2, 6, "1-sqrt", 0.0, 0.0),
        25,
    ),
]
CASE_IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("name", "schedule", "reference", "last"), CASES, ids=CASE_IDS)
def test_matches_formula_for_int_and_tensor_steps(
    name: str, schedule: Callable[[Any], Any], reference: Callable[[int], float], last: int
) -> None:
    for step in range(last + 1):
        expected = reference(step)
        value = schedule(step)
        assert type(value) is float, f"{name}({step}) returned {type(value).__name__}"
        assert value == pytest.approx(expected, rel=RTOL, abs=ATOL), f"{name}({step})"
        tensor_value = schedule(torch.tensor(step))
        assert isinstance(tensor_value, torch.Tensor) and tensor_value.shape == ()
        assert tensor_value.dtype == torch.float64
        assert float(tensor_value) == pytest.approx(expected, rel=RTOL, abs=ATOL), (
            f"{name}(tensor({step}))"
        )


@pytest.mark.parametrize(("name", "schedule", "reference", "last"), CASES, ids=CASE_IDS)
def test_vectorised_and_vmapped_steps(
    name: str, schedule: Callable[[Any], Any], reference: Callable[[int], float], last: int
) -> None:
    steps = torch.arange(last + 1)
    expected = torch.tensor([schedule(k) for k in range(last + 1)], dtype=torch.float64)
    batched = schedule(steps)
    assert batched.shape == steps.shape
    torch.testing.assert_close(batched, expected, rtol=RTOL, atol=ATOL)
    vmapped = torch.func.vmap(schedule)(steps)
    torch.testing.assert_close(vmapped, expected, rtol=RTOL, atol=ATOL)


# (schedule, step from which it must not increase, end step, value held from the end on)
DECAYING = [
    (functools.partial(S.cosine_lr, total_steps=20, warmup_steps=5, warmup_start_value=0.1,
                       lr_terminal_value=0.05), 5, 20, 0.05),
    (functools.partial(S.linear_warmdown_lr, total_steps=20, warmup_steps=5,
                       warmup_start_value=0.0, lr_terminal_value=0.0), 5, 20, 0.0),
    (S.warmup_stable_decay(total_steps=20, warmup_steps=2, decay_steps=5, decay_shape="1-sqrt",
                           lr_terminal_value=0.1), 2, 20, 0.1),
    (S.cosine_annealing(T_max=10), 0, 10, 0.0),
    (S.linear_warmup(total_iters=7, start_factor=1.0, end_factor=0.0), 0, 7, 0.0),
    (S.piecewise_constant(boundaries=[2, 4], values=[1.0, 0.3, 0.0]), 0, 4, 0.0),
    (S.exponential_decay(gamma=0.5, min_value=0.25), 0, 2, 0.25),
]  # fmt: skip


@pytest.mark.parametrize(("schedule", "peak", "end", "final"), DECAYING)
def test_clamps_past_the_end(
    schedule: Callable[[Any], Any], peak: int, end: int, final: float
) -> None:
    """Non-increasing from the peak, exactly ``final`` from the end on, never negative
    (the seed's cosine rose back to 1 and its linear warmdown went negative)."""
    values = [schedule(step) for step in range(peak, 5 * end + 50)]
    assert all(later <= earlier for earlier, later in itertools.pairwise(values))
    assert all(value == final for value in values[end - peak :])
    tail = schedule(torch.arange(end, 5 * end + 50))
    assert bool((tail == final).all())
    assert min(values) >= 0.0


EQUAL_ENDS: list[tuple[str, Callable[[int, int], Callable[[Any], Any]]]] = [
    ("cosine_lr", lambda w, t: functools.partial(
        S.cosine_lr, total_steps=t, warmup_steps=w, warmup_start_value=0.2,
        lr_terminal_value=0.1)),
    ("linear_warmdown_lr", lambda w, t: functools.partial(
        S.linear_warmdown_lr, total_steps=t, warmup_steps=w, warmup_start_value=0.2,
        lr_terminal_value=0.1)),
    ("wsd", lambda w, t: S.warmup_stable_decay(
        total_steps=t, warmup_steps=w, decay_steps=0, warmup_start_value=0.2,
        lr_terminal_value=0.1)),
    ("config-cosine", lambda w, t: seed_config(
        "cosine", total_steps=t, warmup_steps=w, warmup_start_value=0.2, lr_terminal_value=0.1)),
]  # fmt: skip


@pytest.mark.parametrize(("name", "make"), EQUAL_ENDS, ids=[case[0] for case in EQUAL_ENDS])
@pytest.mark.parametrize("warmup", [0, 1, 6])
def test_total_steps_equal_to_warmup_steps(
    name: str, make: Callable[[int, int], Callable[[Any], Any]], warmup: int
) -> None:
    """The seed divided by zero here; now: warmup, then the terminal value from step W on."""
    if warmup == 0 and name == "config-cosine":
        with pytest.raises(ValueError, match=r"total_steps: 0 .*must be >= 1"):
            make(warmup, warmup)  # a config asks for a decay that has a length
        return
    schedule = make(warmup, warmup)
    for step in range(warmup + 10):
        expected = ref_warmup(step, warmup, 0.2) if step < warmup else 0.1
        assert schedule(step) == pytest.approx(expected, rel=RTOL, abs=ATOL), step
        assert float(schedule(torch.tensor(step))) == pytest.approx(expected, rel=RTOL, abs=ATOL)


# --------------------------------------------------------------------------------------
# tensor steps: dtypes, negative steps, compile, vmap
# --------------------------------------------------------------------------------------

ALL_SCHEDULES = {name: schedule for name, schedule, _, _ in CASES}


def test_tensor_step_dtype_and_device_rules() -> None:
    schedule = S.cosine_annealing(T_max=10, eta_min=0.1)
    assert schedule(torch.tensor(3, dtype=torch.int32)).dtype == torch.float64
    as_float32 = schedule(torch.tensor(3.0, dtype=torch.float32))
    assert as_float32.dtype == torch.float32
    assert float(as_float32) == pytest.approx(ref_cosine_annealing(3, 10, 0.1), rel=1e-6)
    # a negative tensor step counts as 0 (a negative Python step raises, see below)
    assert float(schedule(torch.tensor(-4))) == schedule(0)
    joined = ALL_SCHEDULES["join"]
    assert float(joined(torch.tensor(-4))) == joined(0)


@pytest.mark.parametrize("name", sorted(ALL_SCHEDULES))
def test_compiles_fullgraph_without_recompiling(name: str) -> None:
    schedule = ALL_SCHEDULES[name]
    torch._dynamo.reset()
    counter = CompileCounter()

    def scaled_lr(step: torch.Tensor) -> torch.Tensor:
        return schedule(step) * 0.5

    compiled = torch.compile(scaled_lr, backend=counter, fullgraph=True)
    for step in range(50):
        value = compiled(torch.tensor(step))
        assert float(value) == pytest.approx(0.5 * schedule(step), rel=RTOL, abs=ATOL), step
    assert counter.frame_count == 1, f"{name} compiled {counter.frame_count} times in 50 steps"


def test_compiles_through_aot_autograd() -> None:
    """The joined schedule as a functionalised graph (what inductor receives)."""
    schedule = ALL_SCHEDULES["join"]
    torch._dynamo.reset()
    compiled = torch.compile(schedule, backend="aot_eager", fullgraph=True)
    steps = torch.arange(26)
    torch.testing.assert_close(
        compiled(steps),
        torch.tensor([schedule(k) for k in range(26)], dtype=torch.float64),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("name", ["cosine_lr", "wsd-cosine", "join", "config-constant"])
def test_pickle_round_trip(name: str) -> None:
    schedule = ALL_SCHEDULES[name]
    restored = pickle.loads(pickle.dumps(schedule))  # noqa: S301 - our own bytes
    assert [restored(k) for k in range(30)] == [schedule(k) for k in range(30)]


# --------------------------------------------------------------------------------------
# torch.optim.lr_scheduler equivalents
# --------------------------------------------------------------------------------------

Factory = Callable[[torch.optim.Optimizer], torch_schedulers.LRScheduler]

# (id, our schedule, the torch scheduler built on an optimizer with lr=1); every cosine
# ends at step 20, after which torch's CosineAnnealingLR would rise again; its eta_min is an
# absolute lr, ours a fraction of the peak
TORCH_EQUIVALENTS: list[tuple[str, Callable[[Any], Any], Factory]] = [
    (
        "cosine_annealing",
        S.cosine_annealing(T_max=20, eta_min=0.1),
        lambda opt: torch_schedulers.CosineAnnealingLR(opt, T_max=20,
                                                       eta_min=0.1 * opt.defaults["lr"]),
    ),
    (
        "cosine_lr",
        functools.partial(
            S.cosine_lr, total_steps=20, warmup_steps=0, warmup_start_value=0.0,
            lr_terminal_value=0.1,
        ),
        lambda opt: torch_schedulers.CosineAnnealingLR(opt, T_max=20,
                                                       eta_min=0.1 * opt.defaults["lr"]),
    ),
    (
        "wsd-all-decay-cosine",
        S.warmup_stable_decay(total_steps=20, decay_steps=20, decay_shape="cosine"),
        lambda opt: torch_schedulers.CosineAnnealingLR(opt, T_max=20),
    ),
    (
        "linear_warmup",
        S.linear_warmup(total_iters=8, start_factor=0.25),
        lambda opt: torch_schedulers.LinearLR(opt, start_factor=0.25, total_iters=8),
    ),
    (
        "linear-decreasing",
        S.linear_warmup(total_iters=6, start_factor=1.0, end_factor=0.5),
        lambda opt: torch_schedulers.LinearLR(opt, start_factor=1.0, end_factor=0.5,
                                              total_iters=6),
    ),
    (
        "constant_lr",
        functools.partial(S.constant_lr, warmup_steps=5, warmup_start_value=0.2),
        lambda opt: torch_schedulers.LinearLR(opt, start_factor=0.2, total_iters=5),
    ),
    (
        "linear_warmdown_lr",
        functools.partial(
            S.linear_warmdown_lr, total_steps=10, warmup_steps=0, warmup_start_value=0.0,
            lr_terminal_value=0.3,
        ),
        lambda opt: torch_schedulers.LinearLR(opt, start_factor=1.0, end_factor=0.3,
                                              total_iters=10),
    ),
    (
        "join-warmup-cosine",
        S.join_schedules(
            [S.linear_warmup(total_iters=4, start_factor=0.25),
             S.cosine_annealing(T_max=16, eta_min=0.1)],
            [4],
        ),
        lambda opt: torch_schedulers.SequentialLR(
            opt,
            [torch_schedulers.LinearLR(opt, start_factor=0.25, total_iters=4),
             torch_schedulers.CosineAnnealingLR(opt, T_max=16, eta_min=0.1 * opt.defaults["lr"])],
            milestones=[4],
        ),
    ),
    (
        "step_decay",
        S.step_decay(step_size=3, gamma=0.5),
        lambda opt: torch_schedulers.StepLR(opt, step_size=3, gamma=0.5),
    ),
    (
        "exponential",
        S.exponential_decay(gamma=0.9),
        lambda opt: torch_schedulers.ExponentialLR(opt, gamma=0.9),
    ),
    (
        "piecewise",
        S.piecewise_constant(boundaries=[3, 7, 12], values=[1.0, 0.3, 0.3**2, 0.3**3]),
        lambda opt: torch_schedulers.MultiStepLR(opt, milestones=[3, 7, 12], gamma=0.3),
    ),
]  # fmt: skip
TORCH_IDS = [case[0] for case in TORCH_EQUIVALENTS]


def torch_lr_trajectory(make_scheduler: Factory, steps: int) -> list[float]:
    """The lr of the k-th ``optimizer.step()`` (k = 0, 1, ...) under a torch scheduler.

    optorch evaluates ``schedule(k)`` with k the steps already taken, so entry k is what
    our schedule must return at k.
    """
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer)
    trajectory = []
    for _ in range(steps):
        trajectory.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.zeros(1)
        optimizer.step()
        scheduler.step()
    return trajectory


@pytest.mark.parametrize(("name", "schedule", "make_scheduler"), TORCH_EQUIVALENTS, ids=TORCH_IDS)
def test_trajectory_matches_torch_scheduler(
    name: str, schedule: Callable[[Any], Any], make_scheduler: Factory
) -> None:
    steps = 21  # torch's cosine rises again after T_max: compare up to T_max only
    expected = torch.tensor(torch_lr_trajectory(make_scheduler, steps), dtype=torch.float64)
    as_ints = torch.tensor([schedule(k) for k in range(steps)], dtype=torch.float64)
    torch.testing.assert_close(as_ints, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(schedule(torch.arange(steps)), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("name", "schedule", "make_scheduler"), TORCH_EQUIVALENTS, ids=TORCH_IDS)
def test_sgd_with_schedule_matches_torch_sgd_with_scheduler(
    name: str, schedule: Callable[[Any], Any], make_scheduler: Factory
) -> None:
    """Params and momentum buffers of 20 SGD steps, ours vs torch.optim.SGD + scheduler."""
    params = make_params(3, torch.float64, {"w": (4, 3), "b": (4,)})
    grads = grad_sequence(4, params, 20)
    opt = optorch.get_optimizer(
        "sgd", max_lr=0.5, momentum=0.9, weight_decay=0.01, schedule=schedule
    )
    ours = {k: v.clone() for k, v in params.items()}
    state = opt.init(ours)
    torch_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch_opt = torch.optim.SGD(
        list(torch_params.values()), lr=0.5, momentum=0.9, weight_decay=0.01, foreach=False
    )
    scheduler = make_scheduler(torch_opt)
    for step_grads in grads:
        ours, state = opt.step(ours, step_grads, state)
        for key, tensor in torch_params.items():
            tensor.grad = step_grads[key].clone()
        torch_opt.step()
        scheduler.step()
    tol = {"rtol": 1e-11, "atol": 1e-12}
    assert_trees_close(ours, {k: v.detach() for k, v in torch_params.items()}, **tol,
                       what=f"{name} params")  # fmt: skip
    torch_momentum = {k: torch_opt.state[v]["momentum_buffer"] for k, v in torch_params.items()}
    assert_trees_close(state["momentum"], torch_momentum, **tol, what=f"{name} momentum")
    assert int(state["step"]) == 20


# --------------------------------------------------------------------------------------
# integration with the optimizer's lr multiplier
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("name", ["join", "wsd-cosine", "config-rsqrt", "piecewise"])
def test_sgd_update_is_scaled_by_schedule_at_steps_taken(name: str, inplace: bool) -> None:
    """With lr 1, no momentum and unit grads, the k-th update (k = 0 first) is schedule(k)."""
    schedule = ALL_SCHEDULES[name]
    opt = optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0, schedule=schedule, inplace=inplace)
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = opt.init(params)
    grads = {"w": torch.ones(3, dtype=torch.float64)}
    for step in range(20):
        before = params["w"].clone()
        params, state = opt.step(params, grads, state)
        expected = torch.full((3,), -schedule(step), dtype=torch.float64)
        torch.testing.assert_close(params["w"] - before, expected, rtol=1e-12, atol=1e-15)


def test_compiled_step_evaluates_schedule_on_the_step_tensor() -> None:
    """A whole optimizer step under torch.compile(fullgraph=True): the step count is a
    tensor there, the schedule is traced into the graph and nothing recompiles."""
    schedule = ALL_SCHEDULES["join"]
    opt = optorch.get_optimizer(
        "sgd", max_lr=1.0, momentum=0.0, schedule=schedule, inplace=False, impl="reference"
    )
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    state = opt.init(params)
    grads = {"w": torch.ones(3, dtype=torch.float64)}
    torch._dynamo.reset()
    counter = CompileCounter()
    step_fn = torch.compile(opt.step, backend=counter, fullgraph=True)
    for step in range(20):
        before = params["w"].clone()
        params, state = step_fn(params, grads, state)
        expected = torch.full((3,), -schedule(step), dtype=torch.float64)
        torch.testing.assert_close(params["w"] - before, expected, rtol=1e-12, atol=1e-15)
    assert counter.frame_count == 1


# --------------------------------------------------------------------------------------
# the seed's config
# --------------------------------------------------------------------------------------


def test_config_keeps_the_seed_fields_first() -> None:
    fields = dataclasses.fields(S.LRSchedulerConfig)
    seed = [(f.name, f.default) for f in fields[:5]]
    assert seed == [
        ("warmup_steps", 0),
        ("warmup_start_value", 0.0),
        ("total_steps", 0),
        ("scheduler_type", "constant"),
        ("lr_terminal_value", 0.0),
    ]
    positional = S.LRSchedulerConfig(2, 0.1, 10, "cosine", 0.05)
    schedule = S.build_lr_scheduler(positional)
    for step in range(15):
        assert schedule(step) == pytest.approx(
            S.cosine_lr(step, 10, 2, 0.1, 0.05), rel=RTOL, abs=ATOL
        )
    assert S.build_lr_scheduler(S.LRSchedulerConfig())(0) == 1.0  # the default: constant 1
    assert S.constant_lr(steps=3, warmup_steps=6, warmup_start_value=0.0) == 0.5


CONFIG_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"warmup_steps": -1}, r"LRSchedulerConfig\.warmup_steps: -1"),
    ({"warmup_steps": 2.0}, r"LRSchedulerConfig\.warmup_steps: 2\.0"),
    ({"warmup_steps": True}, r"LRSchedulerConfig\.warmup_steps: True"),
    ({"total_steps": -3}, r"LRSchedulerConfig\.total_steps: -3"),
    ({"warmup_start_value": 1.5}, r"LRSchedulerConfig\.warmup_start_value: 1\.5"),
    ({"warmup_start_value": NAN}, r"LRSchedulerConfig\.warmup_start_value: nan"),
    ({"lr_terminal_value": -0.1}, r"LRSchedulerConfig\.lr_terminal_value: -0\.1"),
    ({"lr_terminal_value": NAN, "scheduler_type": "cosine", "total_steps": 5},
     r"lr_terminal_value: nan"),
    ({"scheduler_type": "cosin"},
     r"scheduler_type: 'cosin' \(must be one of \('constant', 'rsqrt', 'cosine', "
     r"'linear_warmdown', 'wsd'\)\)"),
    ({"scheduler_type": "rsqrt"}, r"warmup_steps: 0 \(scheduler_type 'rsqrt' needs a warmup"),
    ({"scheduler_type": "cosine", "warmup_steps": 10, "total_steps": 5},
     r"total_steps: 5 .*>= warmup_steps = 10"),
    ({"scheduler_type": "linear_warmdown", "warmup_steps": 10, "total_steps": 5},
     r"total_steps: 5 .*>= warmup_steps = 10"),
    ({"scheduler_type": "cosine"}, r"total_steps: 0 .*must be >= 1"),
    ({"scheduler_type": "wsd", "total_steps": 10},
     r"exactly one of decay_steps and decay_fraction"),
    ({"scheduler_type": "wsd", "total_steps": 10, "decay_steps": 2, "decay_fraction": 0.2},
     r"exactly one of decay_steps and decay_fraction"),
    ({"scheduler_type": "wsd", "total_steps": 10, "warmup_steps": 5, "decay_steps": 6},
     r"LRSchedulerConfig: warmup_steps \(5\) \+ decay steps \(6\) exceed total_steps \(10\)"),
    ({"scheduler_type": "wsd", "total_steps": 10, "decay_fraction": 1.5},
     r"LRSchedulerConfig\.decay_fraction: 1\.5"),
    ({"scheduler_type": "wsd", "total_steps": 10, "decay_steps": 2, "decay_shape": "sqrt"},
     r"LRSchedulerConfig\.decay_shape: 'sqrt' \(must be one of"),
    ({"scheduler_type": "cosine", "total_steps": 10, "decay_steps": 2},
     r"decay_steps: 2 \(only used by scheduler_type 'wsd', not 'cosine'\)"),
    ({"decay_fraction": 0.1}, r"decay_fraction: 0\.1 \(only used by scheduler_type 'wsd'"),
    ({"decay_shape": "cosine"}, r"decay_shape: 'cosine' \(only used by scheduler_type 'wsd'"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "match"), CONFIG_ERRORS)
def test_config_validation(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S.LRSchedulerConfig(**fields)


def test_build_revalidates_a_mutated_config_and_rejects_other_types() -> None:
    config = S.LRSchedulerConfig(scheduler_type="cosine", total_steps=10)
    config.scheduler_type = "linear"
    with pytest.raises(ValueError, match=r"scheduler_type: 'linear' \(must be one of"):
        S.build_lr_scheduler(config)
    with pytest.raises(TypeError, match=r"needs an LRSchedulerConfig"):
        S.build_lr_scheduler(["cosine"])  # type: ignore[arg-type]
    # a mapping of the fields (the seed's YAML node) is validated like the dataclass
    with pytest.raises(ValueError, match=r"total_steps: 0 \(scheduler_type 'cosine'"):
        S.build_lr_scheduler({"scheduler_type": "cosine"})


# --------------------------------------------------------------------------------------
# validation of the functions and builders
# --------------------------------------------------------------------------------------

ERRORS: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], type[Exception], str]] = [
    (S.constant_lr, (0, -1, 0.0), {}, ValueError, r"constant_lr\.warmup_steps: -1"),
    (S.constant_lr, (0, 2, 1.5), {}, ValueError, r"constant_lr\.warmup_start_value: 1\.5"),
    (S.constant_lr, (0, 2, NAN), {}, ValueError, r"constant_lr\.warmup_start_value: nan"),
    (S.constant_lr, (-1, 2, 0.0), {}, ValueError, r"constant_lr: step must be finite and >= 0"),
    (S.constant_lr, (math.inf, 2, 0.0), {}, ValueError, r"step must be finite and >= 0, got inf"),
    (S.constant_lr, (True, 2, 0.0), {}, TypeError, r"step must be an int or a tensor, got bool"),
    (S.constant_lr, ("3", 2, 0.0), {}, TypeError, r"step must be an int or a tensor, got str"),
    (S.constant_lr, (torch.tensor(1j), 2, 0.0), {}, TypeError, r"real number tensor"),
    (S.constant_lr, (torch.tensor(True), 2, 0.0), {}, TypeError, r"real number tensor"),
    (S.rsqrt_lr, (3, 0, 0.0), {}, ValueError,
     r"rsqrt_lr\.warmup_steps: 0 \(the inverse square root schedule needs a warmup"),
    (S.rsqrt_lr, (3, -2, 0.0), {}, ValueError, r"rsqrt_lr\.warmup_steps: -2"),
    (S.cosine_lr, (0, 5, 10, 0.0, 0.0), {}, ValueError,
     r"cosine_lr\.total_steps: 5 \(must be >= warmup_steps = 10\)"),
    (S.cosine_lr, (0, 10, 2, 0.0, -0.1), {}, ValueError, r"cosine_lr\.lr_terminal_value: -0\.1"),
    (S.linear_warmdown_lr, (0, 10, 2, 0.0, 1.5), {}, ValueError,
     r"linear_warmdown_lr\.lr_terminal_value: 1\.5"),
    (S.linear_warmdown_lr, (0, 1, 2, 0.0, 0.0), {}, ValueError,
     r"linear_warmdown_lr\.total_steps: 1"),
    (S.warmup_stable_decay, (), {"total_steps": 10}, ValueError,
     r"warmup_stable_decay: set exactly one of decay_steps and decay_fraction"),
    (S.warmup_stable_decay, (), {"total_steps": 10, "decay_steps": 3, "decay_fraction": 0.3},
     ValueError, r"set exactly one of decay_steps and decay_fraction"),
    (S.warmup_stable_decay, (), {"total_steps": 10, "decay_steps": -3}, ValueError,
     r"warmup_stable_decay\.decay_steps: -3"),
    (S.warmup_stable_decay, (), {"total_steps": 10, "decay_fraction": NAN}, ValueError,
     r"warmup_stable_decay\.decay_fraction: nan"),
    (S.warmup_stable_decay, (), {"total_steps": 10, "warmup_steps": 3, "decay_fraction": 0.8},
     ValueError, r"warmup_steps \(3\) \+ decay steps \(8\) exceed total_steps \(10\)"),
    (S.warmup_stable_decay, (), {"total_steps": 10, "decay_steps": 3, "decay_shape": "exp"},
     ValueError, r"decay_shape: 'exp' \(must be one of \('linear', 'cosine', '1-sqrt'\)\)"),
    (S.warmup_stable_decay, (10,), {}, TypeError, r"positional"),
    (S.step_decay, (), {"step_size": 0}, ValueError,
     r"step_decay\.step_size: 0 \(must be an int >= 1\)"),
    (S.step_decay, (), {"step_size": 2, "gamma": 1.5}, ValueError, r"step_decay\.gamma: 1\.5"),
    (S.step_decay, (), {"step_size": 2, "gamma": NAN}, ValueError, r"step_decay\.gamma: nan"),
    (S.step_decay, (), {"step_size": 2, "gamma": torch.tensor(0.5)}, ValueError,
     r"step_decay\.gamma: tensor\(0\.5000\) \(must be a Python number"),
    (S.exponential_decay, (), {"gamma": -0.1}, ValueError, r"exponential_decay\.gamma: -0\.1"),
    (S.exponential_decay, (), {"gamma": 0.9, "transition_steps": 0}, ValueError,
     r"exponential_decay\.transition_steps: 0"),
    (S.exponential_decay, (), {"gamma": 0.9, "staircase": "yes"}, ValueError,
     r"exponential_decay\.staircase: 'yes' \(must be a bool\)"),
    (S.exponential_decay, (), {"gamma": 0.9, "min_value": 2.0}, ValueError,
     r"exponential_decay\.min_value: 2\.0"),
    (S.piecewise_constant, (), {"boundaries": [3, 3], "values": [1.0, 0.5, 0.1]}, ValueError,
     r"piecewise_constant\.boundaries: \[3, 3\] \(must be strictly increasing"),
    (S.piecewise_constant, (), {"boundaries": [-1], "values": [1.0, 0.5]}, ValueError,
     r"piecewise_constant\.boundaries\[0\]: -1"),
    (S.piecewise_constant, (), {"boundaries": "12", "values": [1.0, 0.5]}, ValueError,
     r"piecewise_constant\.boundaries: '12' \(must be a sequence of ints\)"),
    (S.piecewise_constant, (), {"boundaries": [3], "values": [1.0]}, ValueError,
     r"piecewise_constant\.values: \[1\.0\] \(needs len\(boundaries\) \+ 1 = 2 values, got 1\)"),
    (S.piecewise_constant, (), {"boundaries": [3], "values": [1.0, -0.5]}, ValueError,
     r"piecewise_constant\.values\[1\]: -0\.5"),
    (S.piecewise_constant, (), {"boundaries": [3], "values": [1.0, math.inf]}, ValueError,
     r"piecewise_constant\.values\[1\]: inf"),
    (S.linear_warmup, (), {"total_iters": -1}, ValueError, r"linear_warmup\.total_iters: -1"),
    (S.linear_warmup, (), {"total_iters": 3, "start_factor": 2.0}, ValueError,
     r"linear_warmup\.start_factor: 2\.0"),
    (S.linear_warmup, (), {"total_iters": 3, "end_factor": NAN}, ValueError,
     r"linear_warmup\.end_factor: nan"),
    (S.cosine_annealing, (), {"T_max": -1}, ValueError, r"cosine_annealing\.T_max: -1"),
    (S.cosine_annealing, (), {"T_max": 5.5}, ValueError, r"cosine_annealing\.T_max: 5\.5"),
    (S.cosine_annealing, (), {"T_max": 5, "eta_min": 1.5}, ValueError,
     r"cosine_annealing\.eta_min: 1\.5"),
    (S.join_schedules, ([S.step_decay(step_size=1)], [3]), {}, ValueError,
     r"join_schedules\.schedules: needs len\(boundaries\) \+ 1 = 2 schedules, got 1"),
    (S.join_schedules, ([S.step_decay(step_size=1), 0.5], [3]), {}, TypeError,
     r"join_schedules\.schedules\[1\] must be callable, got 0\.5"),
    (S.join_schedules, ([S.step_decay(step_size=1)] * 3, [5, 2]), {}, ValueError,
     r"join_schedules\.boundaries: \[5, 2\] \(must be strictly increasing"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("function", "args", "kwargs", "error", "match"),
    ERRORS,
    ids=[f"{case[0].__name__}-{index}" for index, case in enumerate(ERRORS)],
)
def test_invalid_arguments(
    function: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    with pytest.raises(error, match=match):
        function(*args, **kwargs)


@pytest.mark.parametrize("name", ["step_decay", "join", "config-cosine", "piecewise"])
def test_built_schedules_reject_bad_steps(name: str) -> None:
    schedule = ALL_SCHEDULES[name]
    with pytest.raises(ValueError, match=r"step must be finite and >= 0, got -2"):
        schedule(-2)
    with pytest.raises(TypeError, match=r"step must be an int or a tensor, got NoneType"):
        schedule(None)
