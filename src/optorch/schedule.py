r"""Learning-rate schedules: pure functions from the step to a multiplier of the peak lr.

A schedule maps ``step``, the number of optimizer steps already taken (0 on the first
step), to a multiplier :math:`m(s)`; the optimizer uses ``max_lr * schedule(step)``
(pass it as ``schedule=`` to any optimizer config). Every schedule here

* is a pure function of the step: nothing is stored between calls;
* clamps past its end: after its last step it keeps its final value, so a cosine never
  comes back up and a linear decay never goes negative;
* accepts the step as a Python ``int`` (and returns a Python ``float``) or as a tensor
  (and returns a tensor of the same shape, computed with torch operations only: no
  ``.item()`` and no Python branch on its value). That is what lets an optimizer step
  evaluate the schedule on the device, inside a ``torch.compile(fullgraph=True)`` graph
  without recompiling as the step changes, or under ``torch.func.vmap``. An integer
  tensor step is computed in ``float64``, a floating one in its own dtype; a negative
  tensor step counts as 0 (a negative Python step is an error).

Symbols used in the formulas below: :math:`s` = ``step``, :math:`W` = ``warmup_steps``,
:math:`T` = ``total_steps``, :math:`v_0` = ``warmup_start_value``, :math:`v_T` =
``lr_terminal_value``, and the clamped ramp

.. math::

    r(s; a, n) = \min\bigl(\max\bigl(\tfrac{s - a}{n}, 0\bigr), 1\bigr),
    \qquad r(s; a, 0) = [s \ge a],

the fraction of the interval :math:`[a, a + n]` covered at step :math:`s` (a unit step
at :math:`a` when the interval is empty). The linear warmup shared by the seed's
schedules is :math:`w(s) = v_0 + (1 - v_0)\, r(s; 0, W)`.

The seed's names (:class:`LRSchedulerConfig`, :func:`build_lr_scheduler`,
:func:`constant_lr`, :func:`rsqrt_lr`, :func:`cosine_lr`, :func:`linear_warmdown_lr`)
keep their meaning. The other builders take keyword arguments, validate them once and
return a callable ``step -> multiplier`` (a picklable ``functools.partial``).

>>> import torch
>>> from optorch.schedule import cosine_annealing, join_schedules, linear_warmup
>>> schedule = join_schedules(
...     [linear_warmup(total_iters=4, start_factor=0.0), cosine_annealing(T_max=8)], [4]
... )
>>> [round(schedule(step), 4) for step in (0, 2, 4, 8, 12, 20)]
[0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
>>> schedule(torch.tensor(8))
tensor(0.5000, dtype=torch.float64)
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DECAY_SHAPES",
    "SCHEDULER_TYPES",
    "LRSchedulerConfig",
    "Schedule",
    "build_lr_scheduler",
    "constant_lr",
    "cosine_annealing",
    "cosine_lr",
    "exponential_decay",
    "join_schedules",
    "linear_warmdown_lr",
    "linear_warmup",
    "piecewise_constant",
    "rsqrt_lr",
    "step_decay",
    "warmup_stable_decay",
]

#: A schedule: ``step -> multiplier`` (``int`` -> ``float``, tensor -> tensor).
Schedule = Callable[[Any], Any]
#: ``LRSchedulerConfig.scheduler_type`` values understood by :func:`build_lr_scheduler`.
SCHEDULER_TYPES = ("constant", "rsqrt", "cosine", "linear_warmdown", "wsd")
#: Decay shapes of :func:`warmup_stable_decay` (``decay_shape``).
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")

Value = Any  # a Python float, or a tensor when the step is a tensor


# --------------------------------------------------------------------------------------
# validation of hyperparameters (Python numbers only; `not lo <= x` so NaN fails)
# --------------------------------------------------------------------------------------


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count(owner: str, name: str, value: Any, minimum: int = 0) -> int:
    if not _is_count(value) or value < minimum:
        raise ValueError(f"Invalid {owner}.{name}: {value!r} (must be an int >= {minimum})")
    return int(value)


def _check_number(owner: str, name: str, value: Any, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Invalid {owner}.{name}: {value!r} (must be a Python number in [{low}, {high}])"
        )
    number = float(value)
    if not (low <= number <= high and math.isfinite(number)):
        raise ValueError(
            f"Invalid {owner}.{name}: {value!r} (must be finite and in [{low}, {high}])"
        )
    return number


def _check_boundaries(owner: str, boundaries: Any) -> tuple[int, ...]:
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise ValueError(f"Invalid {owner}.boundaries: {boundaries!r} (must be a sequence of ints)")
    checked = tuple(
        _check_count(owner, f"boundaries[{index}]", boundary)
        for index, boundary in enumerate(boundaries)
    )
    for index in range(1, len(checked)):
        if not checked[index - 1] < checked[index]:
            raise ValueError(
                f"Invalid {owner}.boundaries: {list(boundaries)!r} (must be strictly "
                f"increasing; boundaries[{index}] = {checked[index]} <= {checked[index - 1]})"
            )
    return checked


# --------------------------------------------------------------------------------------
# scalar arithmetic that works on a Python float or on a tensor without branching on it
# --------------------------------------------------------------------------------------


def _float_dtype(step: torch.Tensor) -> torch.dtype:
    return step.dtype if step.is_floating_point() else torch.float64


def _as_step(owner: str, step: Any) -> Value:
    """The step as a float (Python number in) or a floating tensor clamped at 0."""
    if isinstance(step, torch.Tensor):
        if step.is_complex() or step.dtype == torch.bool:
            raise TypeError(f"{owner}: step must be a real number tensor, got {step.dtype}")
        return step.to(_float_dtype(step)).clamp(min=0.0)
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(
            f"{owner}: step must be an int or a tensor, got {type(step).__name__} ({step!r})"
        )
    value = float(step)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{owner}: step must be finite and >= 0, got {step!r}")
    return value


def _unit_step(s: Value, threshold: float) -> Value:
    """1.0 where ``s >= threshold``, else 0.0."""
    if isinstance(s, torch.Tensor):
        return (s >= threshold).to(s.dtype)
    return 1.0 if s >= threshold else 0.0


def _ramp(s: Value, start: float, length: float) -> Value:
    """``r(s; start, length)`` of the module docstring."""
    if length == 0:  # an empty interval: jump at its start (no division by zero)
        return _unit_step(s, start)
    fraction = (s - start) / length
    if isinstance(fraction, torch.Tensor):
        return fraction.clamp(0.0, 1.0)
    return min(max(fraction, 0.0), 1.0)


def _mix(first: Value, last: Value, weight: Value) -> Value:
    """``first`` at weight 0 and ``last`` at weight 1, both exactly (unlike a + w(b - a))."""
    return first * (1.0 - weight) + last * weight


def _cos(x: Value) -> Value:
    return torch.cos(x) if isinstance(x, torch.Tensor) else math.cos(x)


def _sqrt(x: Value) -> Value:
    return torch.sqrt(x) if isinstance(x, torch.Tensor) else math.sqrt(x)


def _floor(x: Value) -> Value:
    return torch.floor(x) if isinstance(x, torch.Tensor) else float(math.floor(x))


def _maximum(x: Value, low: float) -> Value:
    return x.clamp(min=low) if isinstance(x, torch.Tensor) else max(x, low)


def _half_cosine(progress: Value) -> Value:
    """From 1 at progress 0 to 0 at progress 1 along half a cosine period."""
    return 0.5 * (1.0 + _cos(math.pi * progress))


def _decay_shape(shape: str, progress: Value) -> Value:
    """The fraction of the decay still left: 1 at progress 0, 0 at progress 1."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return _half_cosine(progress)
    return 1.0 - _sqrt(progress)  # "1-sqrt"


def _warmup(s: Value, warmup_steps: int, warmup_start_value: float) -> Value:
    return _mix(warmup_start_value, 1.0, _ramp(s, 0.0, warmup_steps))


# --------------------------------------------------------------------------------------
# the values, without validation of the hyperparameters (the builders validated them)
# --------------------------------------------------------------------------------------


def _warmup_decay_value(
    step: Any,
    *,
    owner: str,
    warmup_steps: int,
    warmup_start_value: float,
    decay_start: int,
    decay_steps: int,
    decay_shape: str,
    lr_terminal_value: float,
) -> Value:
    s = _as_step(owner, step)
    progress = _ramp(s, decay_start, decay_steps)
    decay = _mix(lr_terminal_value, 1.0, _decay_shape(decay_shape, progress))
    # each factor is exactly 1 outside its own phase (the decay starts after the warmup)
    return _warmup(s, warmup_steps, warmup_start_value) * decay


def _constant_value(
    step: Any, *, owner: str, warmup_steps: int, warmup_start_value: float
) -> Value:
    return _warmup(_as_step(owner, step), warmup_steps, warmup_start_value)


def _rsqrt_value(step: Any, *, owner: str, warmup_steps: int, warmup_start_value: float) -> Value:
    s = _as_step(owner, step)
    decay = _sqrt(warmup_steps / _maximum(s, warmup_steps))
    return _warmup(s, warmup_steps, warmup_start_value) * decay


def _step_decay_value(step: Any, *, step_size: int, gamma: float) -> Value:
    s = _as_step("step_decay", step)
    return gamma ** _floor(s / step_size)


def _exponential_value(
    step: Any, *, gamma: float, transition_steps: int, staircase: bool, min_value: float
) -> Value:
    s = _as_step("exponential_decay", step)
    exponent = s / transition_steps
    if staircase:
        exponent = _floor(exponent)
    return _maximum(gamma**exponent, min_value)


def _piecewise_value(step: Any, *, boundaries: tuple[int, ...], values: tuple[float, ...]) -> Value:
    s = _as_step("piecewise_constant", step)
    if isinstance(s, torch.Tensor):
        value = torch.full_like(s, values[0])
        for boundary, after in zip(boundaries, values[1:], strict=True):
            value = torch.where(s >= boundary, after, value)
        return value
    return values[bisect.bisect_right(boundaries, s)]


def _linear_value(step: Any, *, total_iters: int, start_factor: float, end_factor: float) -> Value:
    s = _as_step("linear_warmup", step)
    return _mix(start_factor, end_factor, _ramp(s, 0.0, total_iters))


def _cosine_annealing_value(step: Any, *, T_max: int, eta_min: float) -> Value:
    s = _as_step("cosine_annealing", step)
    return _mix(eta_min, 1.0, _half_cosine(_ramp(s, 0.0, T_max)))


def _as_float_tensor(value: Any, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.full_like(like, value, dtype=_float_dtype(like))


def _joined_value(
    step: Any, *, schedules: tuple[Schedule, ...], boundaries: tuple[int, ...]
) -> Value:
    if isinstance(step, torch.Tensor):
        # every piece is evaluated and the right one selected: no branch on the value
        value = _as_float_tensor(schedules[0](step), step)
        for boundary, schedule in zip(boundaries, schedules[1:], strict=True):
            local = schedule((step - boundary).clamp(min=0))
            value = torch.where(step >= boundary, _as_float_tensor(local, step), value)
        return value
    _as_step("join_schedules", step)
    index = bisect.bisect_right(boundaries, step)
    start = boundaries[index - 1] if index else 0
    return schedules[index](step - start)


# --------------------------------------------------------------------------------------
# the seed's schedules
# --------------------------------------------------------------------------------------


def _check_warmup(owner: str, warmup_steps: Any, warmup_start_value: Any, minimum: int = 0) -> None:
    _check_count(owner, "warmup_steps", warmup_steps, minimum)
    _check_number(owner, "warmup_start_value", warmup_start_value)


def _check_total(owner: str, total_steps: Any, warmup_steps: int) -> None:
    _check_count(owner, "total_steps", total_steps)
    if total_steps < warmup_steps:
        raise ValueError(
            f"Invalid {owner}.total_steps: {total_steps!r} (must be >= warmup_steps = "
            f"{warmup_steps})"
        )


def constant_lr(steps: Any, warmup_steps: int, warmup_start_value: float) -> Value:
    r"""Linear warmup to 1, then 1: :math:`m(s) = w(s)`.

    .. math::

        m(s) = \begin{cases} v_0 + (1 - v_0)\, s / W & s < W \\ 1 & s \ge W \end{cases}

    >>> [constant_lr(step, warmup_steps=4, warmup_start_value=0.2) for step in (0, 2, 4, 9)]
    [0.2, 0.6, 1.0, 1.0]
    """
    owner = "constant_lr"
    _check_warmup(owner, warmup_steps, warmup_start_value)
    return _constant_value(
        steps, owner=owner, warmup_steps=warmup_steps, warmup_start_value=warmup_start_value
    )


def rsqrt_lr(steps: Any, warmup_steps: int, warmup_start_value: float) -> Value:
    r"""Linear warmup, then inverse square root decay (Vaswani et al. 2017, arXiv:1706.03762).

    Needs ``warmup_steps >= 1`` (the decay is normalised by it).

    .. math::

        m(s) = \begin{cases} v_0 + (1 - v_0)\, s / W & s < W \\
               \sqrt{W} / \sqrt{s} & s \ge W \end{cases}

    >>> [rsqrt_lr(step, warmup_steps=4, warmup_start_value=0.0) for step in (2, 4, 16)]
    [0.5, 1.0, 0.5]
    """
    owner = "rsqrt_lr"
    if _is_count(warmup_steps) and warmup_steps == 0:
        raise ValueError(
            f"Invalid {owner}.warmup_steps: {warmup_steps!r} (the inverse square root "
            "schedule needs a warmup: warmup_steps must be >= 1)"
        )
    _check_warmup(owner, warmup_steps, warmup_start_value, minimum=1)
    return _rsqrt_value(
        steps, owner=owner, warmup_steps=warmup_steps, warmup_start_value=warmup_start_value
    )


def cosine_lr(
    steps: Any,
    total_steps: int,
    warmup_steps: int,
    warmup_start_value: float,
    lr_terminal_value: float,
) -> Value:
    r"""Linear warmup, then half a cosine from 1 down to ``lr_terminal_value`` at ``total_steps``.

    (Loshchilov & Hutter 2016, arXiv:1608.03983, without restarts.) Constant at
    :math:`v_T` from :math:`T` on. With :math:`T = W` the value is :math:`v_T` from step
    :math:`W` on.

    .. math::

        m(s) = w(s) \cdot \Bigl(v_T + (1 - v_T)\,
               \tfrac{1}{2}\bigl(1 + \cos(\pi\, r(s; W, T - W))\bigr)\Bigr)

    >>> [round(cosine_lr(step, 10, 2, 0.0, 0.1), 4) for step in (1, 2, 6, 10, 50)]
    [0.5, 1.0, 0.55, 0.1, 0.1]
    """
    owner = "cosine_lr"
    _check_warmup(owner, warmup_steps, warmup_start_value)
    _check_total(owner, total_steps, warmup_steps)
    _check_number(owner, "lr_terminal_value", lr_terminal_value)
    return _warmup_decay_value(
        steps,
        owner=owner,
        warmup_steps=warmup_steps,
        warmup_start_value=warmup_start_value,
        decay_start=warmup_steps,
        decay_steps=total_steps - warmup_steps,
        decay_shape="cosine",
        lr_terminal_value=lr_terminal_value,
    )


def linear_warmdown_lr(
    steps: Any,
    total_steps: int,
    warmup_steps: int,
    warmup_start_value: float,
    lr_terminal_value: float,
) -> Value:
    r"""Linear warmup, then a linear decay from 1 to ``lr_terminal_value`` at ``total_steps``.

    Constant at :math:`v_T` from :math:`T` on (never negative).

    .. math::

        m(s) = w(s) \cdot \bigl(1 - (1 - v_T)\, r(s; W, T - W)\bigr)

    >>> [linear_warmdown_lr(step, 10, 2, 0.0, 0.0) for step in (1, 2, 6, 10, 50)]
    [0.5, 1.0, 0.5, 0.0, 0.0]
    """
    owner = "linear_warmdown_lr"
    _check_warmup(owner, warmup_steps, warmup_start_value)
    _check_total(owner, total_steps, warmup_steps)
    _check_number(owner, "lr_terminal_value", lr_terminal_value)
    return _warmup_decay_value(
        steps,
        owner=owner,
        warmup_steps=warmup_steps,
        warmup_start_value=warmup_start_value,
        decay_start=warmup_steps,
        decay_steps=total_steps - warmup_steps,
        decay_shape="linear",
        lr_terminal_value=lr_terminal_value,
    )


# --------------------------------------------------------------------------------------
# builders of other schedules
# --------------------------------------------------------------------------------------


def warmup_stable_decay(
    *,
    total_steps: int,
    warmup_steps: int = 0,
    decay_steps: int | None = None,
    decay_fraction: float | None = None,
    decay_shape: str = "linear",
    warmup_start_value: float = 0.0,
    lr_terminal_value: float = 0.0,
) -> Schedule:
    r"""Warmup-stable-decay (WSD): warmup, a constant phase, then a decay over the last steps.

    (Hu et al. 2024, MiniCPM, arXiv:2404.06395; the ``"1-sqrt"`` shape from Hägele et
    al. 2024, arXiv:2405.18392.) The decay covers the last :math:`D` steps, given as
    ``decay_steps`` or as ``decay_fraction`` of ``total_steps`` (exactly one of them;
    :math:`D = \lfloor \text{fraction} \cdot T + \tfrac12 \rfloor`), and needs
    :math:`W + D \le T`. With :math:`p = r(s; T - D, D)`:

    .. math::

        m(s) = w(s) \cdot \bigl(v_T + (1 - v_T)\, f(p)\bigr), \qquad
        f(p) = \begin{cases} 1 - p & \text{linear} \\
               \tfrac12 (1 + \cos \pi p) & \text{cosine} \\
               1 - \sqrt{p} & \text{1-sqrt} \end{cases}

    >>> schedule = warmup_stable_decay(total_steps=10, warmup_steps=2, decay_steps=4)
    >>> [schedule(step) for step in (0, 1, 2, 6, 8, 10, 99)]
    [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    """
    return _build_wsd(
        "warmup_stable_decay",
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        decay_steps=decay_steps,
        decay_fraction=decay_fraction,
        decay_shape=decay_shape,
        warmup_start_value=warmup_start_value,
        lr_terminal_value=lr_terminal_value,
    )


def _build_wsd(
    owner: str,
    *,
    total_steps: int,
    warmup_steps: int,
    decay_steps: int | None,
    decay_fraction: float | None,
    decay_shape: str,
    warmup_start_value: float,
    lr_terminal_value: float,
) -> Schedule:
    _check_warmup(owner, warmup_steps, warmup_start_value)
    _check_total(owner, total_steps, warmup_steps)
    _check_number(owner, "lr_terminal_value", lr_terminal_value)
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(
            f"Invalid {owner}.decay_shape: {decay_shape!r} (must be one of {DECAY_SHAPES})"
        )
    length = _decay_length(owner, total_steps, decay_steps, decay_fraction)
    if warmup_steps + length > total_steps:
        raise ValueError(
            f"Invalid {owner}: warmup_steps ({warmup_steps}) + decay steps ({length}) exceed "
            f"total_steps ({total_steps})"
        )
    return functools.partial(
        _warmup_decay_value,
        owner=owner,
        warmup_steps=warmup_steps,
        warmup_start_value=float(warmup_start_value),
        decay_start=total_steps - length,
        decay_steps=length,
        decay_shape=decay_shape,
        lr_terminal_value=float(lr_terminal_value),
    )


def _decay_length(
    owner: str, total_steps: int, decay_steps: int | None, decay_fraction: float | None
) -> int:
    if (decay_steps is None) == (decay_fraction is None):
        raise ValueError(
            f"Invalid {owner}: set exactly one of decay_steps and decay_fraction "
            f"(decay_steps={decay_steps!r}, decay_fraction={decay_fraction!r})"
        )
    if decay_steps is not None:
        return _check_count(owner, "decay_steps", decay_steps)
    fraction = _check_number(owner, "decay_fraction", decay_fraction)
    return math.floor(fraction * total_steps + 0.5)


def step_decay(*, step_size: int, gamma: float = 0.1) -> Schedule:
    r"""Multiply by ``gamma`` every ``step_size`` steps (as ``torch.optim.lr_scheduler.StepLR``).

    .. math::

        m(s) = \gamma^{\lfloor s / \text{step\_size} \rfloor}

    >>> schedule = step_decay(step_size=3, gamma=0.5)
    >>> [schedule(step) for step in (0, 2, 3, 6, 7)]
    [1.0, 1.0, 0.5, 0.25, 0.25]
    """
    owner = "step_decay"
    return functools.partial(
        _step_decay_value,
        step_size=_check_count(owner, "step_size", step_size, minimum=1),
        gamma=_check_number(owner, "gamma", gamma),
    )


def exponential_decay(
    *,
    gamma: float,
    transition_steps: int = 1,
    staircase: bool = False,
    min_value: float = 0.0,
) -> Schedule:
    r"""Exponential decay by ``gamma`` per ``transition_steps`` steps, floored at ``min_value``.

    With ``transition_steps=1`` and ``staircase=False`` this is
    ``torch.optim.lr_scheduler.ExponentialLR``; ``staircase=True`` decays in jumps, once
    every ``transition_steps`` steps.

    .. math::

        m(s) = \max\bigl(\gamma^{e(s)}, m_{\min}\bigr), \qquad
        e(s) = \begin{cases} s / n & \text{smooth} \\
               \lfloor s / n \rfloor & \text{staircase} \end{cases}

    with :math:`n` = ``transition_steps`` and :math:`m_{\min}` = ``min_value``.

    >>> schedule = exponential_decay(gamma=0.5, transition_steps=2, staircase=True)
    >>> [schedule(step) for step in (0, 1, 2, 5)]
    [1.0, 1.0, 0.5, 0.25]
    """
    owner = "exponential_decay"
    if not isinstance(staircase, bool):
        raise ValueError(f"Invalid {owner}.staircase: {staircase!r} (must be a bool)")
    return functools.partial(
        _exponential_value,
        gamma=_check_number(owner, "gamma", gamma),
        transition_steps=_check_count(owner, "transition_steps", transition_steps, minimum=1),
        staircase=staircase,
        min_value=_check_number(owner, "min_value", min_value),
    )


def piecewise_constant(*, boundaries: Sequence[int], values: Sequence[float]) -> Schedule:
    r"""``values[i]`` between ``boundaries[i - 1]`` (included) and ``boundaries[i]``.

    ``boundaries`` are strictly increasing step counts and ``values`` has one more entry
    (its last value holds from the last boundary on). With ``values[i] = gamma ** i`` this
    is ``torch.optim.lr_scheduler.MultiStepLR(milestones=boundaries, gamma=gamma)``.

    .. math::

        m(s) = v_i \quad\text{where}\quad i = \#\{j : b_j \le s\}

    >>> schedule = piecewise_constant(boundaries=[2, 5], values=[1.0, 0.1, 0.01])
    >>> [schedule(step) for step in (0, 1, 2, 4, 5, 99)]
    [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    """
    owner = "piecewise_constant"
    checked = _check_boundaries(owner, boundaries)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"Invalid {owner}.values: {values!r} (must be a sequence of numbers)")
    if len(values) != len(checked) + 1:
        raise ValueError(
            f"Invalid {owner}.values: {list(values)!r} (needs len(boundaries) + 1 = "
            f"{len(checked) + 1} values, got {len(values)})"
        )
    numbers = tuple(
        _check_number(owner, f"values[{index}]", value, 0.0, math.inf)
        for index, value in enumerate(values)
    )
    return functools.partial(_piecewise_value, boundaries=checked, values=numbers)


def linear_warmup(
    *, total_iters: int, start_factor: float = 0.0, end_factor: float = 1.0
) -> Schedule:
    r"""Linear from ``start_factor`` to ``end_factor`` over ``total_iters`` steps, then constant.

    As ``torch.optim.lr_scheduler.LinearLR`` (which also decreases when
    ``end_factor < start_factor``); unlike it, ``start_factor=0`` is allowed, and
    ``total_iters=0`` is ``end_factor`` from the first step (a warmup of no steps), where
    ``LinearLR`` would keep ``start_factor`` for ever.

    .. math::

        m(s) = f_0 + (f_1 - f_0)\, r(s; 0, N)

    with :math:`f_0` = ``start_factor``, :math:`f_1` = ``end_factor``, :math:`N` =
    ``total_iters``.

    >>> schedule = linear_warmup(total_iters=4, start_factor=0.2)
    >>> [round(schedule(step), 4) for step in (0, 2, 4, 9)]
    [0.2, 0.6, 1.0, 1.0]
    """
    owner = "linear_warmup"
    return functools.partial(
        _linear_value,
        total_iters=_check_count(owner, "total_iters", total_iters),
        start_factor=_check_number(owner, "start_factor", start_factor),
        end_factor=_check_number(owner, "end_factor", end_factor),
    )


def cosine_annealing(*, T_max: int, eta_min: float = 0.0) -> Schedule:
    r"""Half a cosine from 1 down to ``eta_min`` at ``T_max``, then constant.

    As ``torch.optim.lr_scheduler.CosineAnnealingLR`` over its first ``T_max`` steps,
    with ``eta_min`` given as a fraction of the peak lr; unlike it, the value stays at
    ``eta_min`` after ``T_max`` instead of rising again (Loshchilov & Hutter 2016,
    arXiv:1608.03983). ``T_max=0`` anneals in no steps: ``eta_min`` from step 0 (torch's
    class divides by zero at its first step).

    .. math::

        m(s) = \eta_{\min} + (1 - \eta_{\min})\,
               \tfrac12\bigl(1 + \cos(\pi \min(s, T_{\max}) / T_{\max})\bigr)

    >>> schedule = cosine_annealing(T_max=10, eta_min=0.1)
    >>> [round(schedule(step), 4) for step in (0, 5, 10, 30)]
    [1.0, 0.55, 0.1, 0.1]
    """
    owner = "cosine_annealing"
    return functools.partial(
        _cosine_annealing_value,
        T_max=_check_count(owner, "T_max", T_max),
        eta_min=_check_number(owner, "eta_min", eta_min),
    )


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    r"""Run ``schedules`` one after the other, switching at each of ``boundaries``.

    From ``boundaries[i - 1]`` on, ``schedules[i]`` is evaluated at the steps counted
    from that boundary (so it starts at its own step 0), as
    ``torch.optim.lr_scheduler.SequentialLR`` (with ``milestones=boundaries``) and
    ``optax.join_schedules`` do. ``schedules`` may be any callables ``step ->
    multiplier`` that accept ``int`` and tensor steps.

    .. math::

        m(s) = m_i(s - b_{i-1}) \quad\text{where}\quad i = \#\{j : b_j \le s\},
        \quad b_{-1} = 0

    >>> schedule = join_schedules(
    ...     [linear_warmup(total_iters=2), step_decay(step_size=2, gamma=0.5)], [2]
    ... )
    >>> [schedule(step) for step in (0, 1, 2, 3, 4, 6)]
    [0.0, 0.5, 1.0, 1.0, 0.5, 0.25]
    """
    owner = "join_schedules"
    checked = _check_boundaries(owner, boundaries)
    if isinstance(schedules, (str, bytes)) or not isinstance(schedules, Sequence):
        raise ValueError(f"Invalid {owner}.schedules: {schedules!r} (must be a sequence)")
    if len(schedules) != len(checked) + 1:
        raise ValueError(
            f"Invalid {owner}.schedules: needs len(boundaries) + 1 = {len(checked) + 1} "
            f"schedules, got {len(schedules)}"
        )
    for index, schedule in enumerate(schedules):
        if not callable(schedule):
            raise TypeError(f"{owner}.schedules[{index}] must be callable, got {schedule!r}")
    return functools.partial(_joined_value, schedules=tuple(schedules), boundaries=checked)


# --------------------------------------------------------------------------------------
# the seed's config and builder
# --------------------------------------------------------------------------------------

_DECAYING_TYPES = ("cosine", "linear_warmdown", "wsd")


@dataclass
class LRSchedulerConfig:
    """A schedule described by plain fields (for YAML/Hydra), built by :func:`build_lr_scheduler`.

    The seed's five fields come first. ``scheduler_type`` is one of
    :data:`SCHEDULER_TYPES`: ``"constant"`` (:func:`constant_lr`), ``"rsqrt"``
    (:func:`rsqrt_lr`, needs ``warmup_steps >= 1``), ``"cosine"`` (:func:`cosine_lr`),
    ``"linear_warmdown"`` (:func:`linear_warmdown_lr`) and ``"wsd"``
    (:func:`warmup_stable_decay`, which also reads ``decay_steps`` or ``decay_fraction``,
    and ``decay_shape``). The decaying types need ``total_steps >= 1`` and
    ``total_steps >= warmup_steps``. Checked on construction and again when built.

    >>> config = LRSchedulerConfig(warmup_steps=2, total_steps=10, scheduler_type="wsd",
    ...                            decay_fraction=0.4)
    >>> schedule = build_lr_scheduler(config)
    >>> [schedule(step) for step in (1, 2, 6, 8, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """

    warmup_steps: int = 0
    warmup_start_value: float = 0.0
    total_steps: int = 0
    scheduler_type: str = "constant"
    lr_terminal_value: float = 0.0  # the value reached at total_steps by the decaying types
    decay_steps: int | None = None  # "wsd": length of the final decay, in steps
    decay_fraction: float | None = None  # "wsd": ... or as a fraction of total_steps
    decay_shape: str = "linear"  # "wsd": one of DECAY_SHAPES

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and its value."""
        owner = type(self).__name__
        if self.scheduler_type not in SCHEDULER_TYPES:
            raise ValueError(
                f"Invalid {owner}.scheduler_type: {self.scheduler_type!r} (must be one of "
                f"{SCHEDULER_TYPES})"
            )
        _check_count(owner, "warmup_steps", self.warmup_steps)
        _check_number(owner, "warmup_start_value", self.warmup_start_value)
        _check_count(owner, "total_steps", self.total_steps)
        _check_number(owner, "lr_terminal_value", self.lr_terminal_value)
        kind = self.scheduler_type
        if kind == "rsqrt" and self.warmup_steps == 0:
            raise ValueError(
                f"Invalid {owner}.warmup_steps: 0 (scheduler_type 'rsqrt' needs a warmup: "
                "warmup_steps must be >= 1)"
            )
        if kind in _DECAYING_TYPES and not (
            self.total_steps >= 1 and self.total_steps >= self.warmup_steps
        ):
            raise ValueError(
                f"Invalid {owner}.total_steps: {self.total_steps!r} (scheduler_type {kind!r} "
                f"decays until total_steps, which must be >= 1 and >= warmup_steps = "
                f"{self.warmup_steps})"
            )
        if kind == "wsd":
            self._wsd()  # checks the decay fields together
            return
        for name, default in (("decay_steps", None), ("decay_fraction", None)):
            if getattr(self, name) is not default:
                raise ValueError(
                    f"Invalid {owner}.{name}: {getattr(self, name)!r} (only used by "
                    f"scheduler_type 'wsd', not {kind!r})"
                )
        if self.decay_shape != "linear":
            raise ValueError(
                f"Invalid {owner}.decay_shape: {self.decay_shape!r} (only used by "
                f"scheduler_type 'wsd', not {kind!r})"
            )

    def _wsd(self) -> Schedule:
        return _build_wsd(
            type(self).__name__,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps,
            decay_fraction=self.decay_fraction,
            decay_shape=self.decay_shape,
            warmup_start_value=self.warmup_start_value,
            lr_terminal_value=self.lr_terminal_value,
        )


def build_lr_scheduler(config: LRSchedulerConfig | Mapping[str, Any]) -> Schedule:
    """The schedule ``step -> multiplier`` that ``config`` describes.

    ``config`` may also be a mapping of :class:`LRSchedulerConfig`'s fields (a plain
    dict, or the nested node of a Hydra YAML without a ``_target_``, as the seed's
    configs wrote it); an unknown key raises ``TypeError`` naming it.

    >>> schedule = build_lr_scheduler(LRSchedulerConfig(warmup_steps=4))
    >>> [schedule(step) for step in (0, 1, 4, 100)]
    [0.0, 0.25, 1.0, 1.0]
    >>> build_lr_scheduler({"warmup_steps": 4})(2)
    0.5
    """
    if isinstance(config, Mapping):
        fields = {f.name for f in dataclasses.fields(LRSchedulerConfig)}
        unknown = sorted(str(key) for key in config if key not in fields)
        if unknown:
            raise TypeError(
                f"build_lr_scheduler: {unknown} are not LRSchedulerConfig fields "
                f"(it has {sorted(fields)})"
            )
        config = LRSchedulerConfig(**{str(key): value for key, value in config.items()})
    if not isinstance(config, LRSchedulerConfig):
        raise TypeError(
            f"build_lr_scheduler needs an LRSchedulerConfig (or a mapping of its fields), "
            f"got {config!r}"
        )
    config.validate()  # the dataclass is mutable: fields may have changed since __init__
    kind = config.scheduler_type
    owner = f"{type(config).__name__}({kind!r})"
    warmup_steps = config.warmup_steps
    warmup_start_value = float(config.warmup_start_value)
    if kind == "constant":
        return functools.partial(
            _constant_value,
            owner=owner,
            warmup_steps=warmup_steps,
            warmup_start_value=warmup_start_value,
        )
    if kind == "rsqrt":
        return functools.partial(
            _rsqrt_value,
            owner=owner,
            warmup_steps=warmup_steps,
            warmup_start_value=warmup_start_value,
        )
    if kind == "wsd":
        return config._wsd()
    return functools.partial(
        _warmup_decay_value,
        owner=owner,
        warmup_steps=warmup_steps,
        warmup_start_value=warmup_start_value,
        decay_start=warmup_steps,
        decay_steps=config.total_steps - warmup_steps,
        decay_shape="cosine" if kind == "cosine" else "linear",
        lr_terminal_value=float(config.lr_terminal_value),
    )
