r"""Functional dynamic loss scaling for mixed precision training.

In float16 small gradients underflow to zero. Dynamic loss scaling (Micikevicius et
al. 2017, "Mixed Precision Training", arXiv:1710.03740) multiplies the loss by a scale
:math:`S` before differentiation, so the gradients are :math:`S` times larger, divides
them by :math:`S` again before the optimizer step, and adapts :math:`S`: a step whose
gradients hold ``inf`` or ``NaN`` is skipped and :math:`S` shrinks; after
:math:`N` finite steps in a row :math:`S` grows. bfloat16 has float32's exponent
range and needs no scaling (see ``docs/mixed_precision.md``).

With :math:`S_t` = ``scale``, :math:`k_t` = ``growth_tracker``, :math:`\gamma` =
``growth_factor``, :math:`\beta` = ``backoff_factor``, :math:`N` = ``growth_interval``
and :math:`f_t` = ``found_inf`` (1 when any unscaled gradient is non-finite):

.. math::

    \hat g_t &= \operatorname{fl_{32}}\!\big(1 / S_t\big)\; g^{\text{scaled}}_t \\
    (S_{t+1}, k_{t+1}) &= \begin{cases}
        (\beta S_t,\ 0) & f_t = 1 \\
        (\gamma S_t \text{ if finite in float32, else } S_t,\ 0) & f_t = 0,\ k_t + 1 \ge N \\
        (S_t,\ k_t + 1) & \text{otherwise}
    \end{cases}

which is the rule of ``torch.amp.GradScaler.update`` (the products are formed in float64
and rounded to float32 once, as its kernel does). Everything here stays on the device:
no ``.item()``, no Python branch on a tensor's value, so a whole train step compiles
with ``torch.compile(fullgraph=True)``.

The scaler state is a plain dict (:class:`GradScalerState`) with the seed's keys.

>>> import torch
>>> from optorch.amp import init_grad_scaler, scale_loss, unscale_grads, update_scale
>>> scaler = init_grad_scaler(init_scale=1024.0, growth_interval=2, precision="fp16")
>>> scaler["precision"]
torch.float16
>>> scaled = scale_loss(torch.tensor(0.5), scaler)
>>> grads, found_inf = unscale_grads({"w": torch.tensor([2048.0, float("nan")])}, scaler)
>>> grads["w"], found_inf
(tensor([2., nan]), tensor(1.))
>>> _ = update_scale(scaler, found_inf)
>>> scaler["scale"], scaler["growth_tracker"]
(tensor(512.), tensor(0, dtype=torch.int32))
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, NamedTuple, Protocol, TypedDict, cast

import torch

from optorch.base import _host_readable, transform_active
from optorch.engine import records_grad, whole_flag
from optorch.tree import PyTree, flatten, format_path, unflatten

__all__ = [
    "PRECISIONS",
    "GradScalerState",
    "ScaledStep",
    "StepsWithSkip",
    "init_grad_scaler",
    "inverse_scale",
    "needs_loss_scaling",
    "next_scaler_state",
    "parse_precision",
    "scale_loss",
    "scaled_step",
    "unscale_grads",
    "update_scale",
]

#: Accepted names for ``precision`` (compared after ``strip().lower()``). YAML configs
#: pass the dtype as text; it is looked up here, never evaluated.
PRECISIONS: Mapping[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "torch.bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "torch.float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "torch.float32": torch.float32,
    "fp32": torch.float32,
}
_PRECISION_DTYPES = frozenset(PRECISIONS.values())
_CPU = torch.device("cpu")


class GradScalerState(TypedDict):
    """The scaler's state: a plain dict, so the seed's ``state["scale"]`` keeps working."""

    #: 0-d float32 tensor: the current loss scale :math:`S_t`.
    scale: torch.Tensor
    #: :math:`\gamma > 1`: the scale's multiplier after ``growth_interval`` good steps.
    growth_factor: float
    #: :math:`\beta \in (0, 1)`: the scale's multiplier after a non-finite step.
    backoff_factor: float
    #: :math:`N \ge 1`: finite steps in a row before the scale grows.
    growth_interval: int
    #: 0-d int32 tensor: finite steps since the scale last changed, :math:`k_t`.
    growth_tracker: torch.Tensor
    #: The low-precision dtype the run computes in (``torch.autocast(dtype=...)``).
    precision: torch.dtype


# --------------------------------------------------------------------------------------
# construction and validation
# --------------------------------------------------------------------------------------


def parse_precision(precision: Any) -> torch.dtype:
    """A ``torch.dtype`` from a dtype or one of the names in :data:`PRECISIONS`.

    >>> parse_precision("torch.bfloat16"), parse_precision(torch.float16)
    (torch.bfloat16, torch.float16)
    """
    if isinstance(precision, torch.dtype):
        if precision in _PRECISION_DTYPES:
            return precision
    elif isinstance(precision, str):
        dtype = PRECISIONS.get(precision.strip().lower())
        if dtype is not None:
            return dtype
    names = ", ".join(repr(name) for name in PRECISIONS)
    raise ValueError(
        f"Invalid init_grad_scaler.precision: {precision!r} (must be torch.bfloat16, "
        f"torch.float16, torch.float32 or one of the names {names})"
    )


def needs_loss_scaling(precision: Any) -> bool:
    """Whether gradients in ``precision`` need loss scaling: only float16 does.

    bfloat16 and float32 share float32's exponent range, so gradients do not underflow.

    >>> needs_loss_scaling("bf16"), needs_loss_scaling("fp16")
    (False, True)
    """
    return parse_precision(precision) == torch.float16


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"init_grad_scaler.{name} must be a number, got {type(value).__name__} ({value!r})"
        )
    return float(value)


def _check_scaler_args(
    init_scale: Any, growth_factor: Any, backoff_factor: Any, growth_interval: Any
) -> None:
    scale = _number("init_scale", init_scale)
    # a scale that is finite as a Python float may still round to inf in float32
    if not (0.0 < scale and math.isfinite(scale) and math.isfinite(float(torch.tensor(scale)))):
        raise ValueError(
            f"Invalid init_grad_scaler.init_scale: {init_scale!r} (must be finite in float32 "
            "and > 0)"
        )
    growth = _number("growth_factor", growth_factor)
    if not (1.0 < growth and math.isfinite(growth)):
        raise ValueError(
            f"Invalid init_grad_scaler.growth_factor: {growth_factor!r} (must be finite and > 1)"
        )
    backoff = _number("backoff_factor", backoff_factor)
    if not 0.0 < backoff < 1.0:
        raise ValueError(
            f"Invalid init_grad_scaler.backoff_factor: {backoff_factor!r} (must be in (0, 1))"
        )
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int):
        raise ValueError(
            f"Invalid init_grad_scaler.growth_interval: {growth_interval!r} (must be an int >= 1)"
        )
    if growth_interval < 1:
        raise ValueError(
            f"Invalid init_grad_scaler.growth_interval: {growth_interval!r} (must be an int >= 1)"
        )


def init_grad_scaler(
    init_scale: float = 2.0**16,
    growth_factor: float = 2.0,
    backoff_factor: float = 0.5,
    growth_interval: int = 2000,
    precision: str | torch.dtype = "torch.bfloat16",
    device: torch.device | str = _CPU,
) -> GradScalerState:
    """A fresh scaler state (the defaults are ``torch.amp.GradScaler``'s).

    ``precision`` is a dtype or a name from :data:`PRECISIONS` (``"bf16"``,
    ``"torch.float16"``, ...); it is recorded for the training loop (e.g.
    ``torch.autocast(..., dtype=state["precision"])``) and does not change the scaling.
    ``scale`` and ``growth_tracker`` live on ``device``: put them next to the params.

    Raises ``ValueError`` naming the argument for ``init_scale`` not finite and > 0,
    ``growth_factor <= 1``, ``backoff_factor`` outside (0, 1), ``growth_interval`` not
    an int >= 1, or an unknown ``precision``.

    >>> state = init_grad_scaler(init_scale=8.0)
    >>> state["scale"], state["growth_tracker"], state["precision"]
    (tensor(8.), tensor(0, dtype=torch.int32), torch.bfloat16)
    """
    _check_scaler_args(init_scale, growth_factor, backoff_factor, growth_interval)
    dtype = parse_precision(precision)
    return GradScalerState(
        scale=torch.full((), float(init_scale), dtype=torch.float32, device=device),
        growth_factor=float(growth_factor),
        backoff_factor=float(backoff_factor),
        growth_interval=int(growth_interval),
        growth_tracker=torch.zeros((), dtype=torch.int32, device=device),
        precision=dtype,
    )


_STATE_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "growth_tracker")


def _checked_state(scaler_state: Any) -> Mapping[str, Any]:
    """The state, after checking its shape (types only: no device values are read)."""
    if not isinstance(scaler_state, Mapping):
        raise TypeError(
            "scaler_state must be the dict from init_grad_scaler, got "
            f"{type(scaler_state).__name__}"
        )
    missing = [key for key in _STATE_KEYS if key not in scaler_state]
    if missing:
        raise KeyError(f"scaler_state lacks {missing}; build it with optorch.amp.init_grad_scaler")
    for key, floating in (("scale", True), ("growth_tracker", False)):
        value = scaler_state[key]
        kind = "floating point" if floating else "integer"
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise TypeError(f"scaler_state[{key!r}] must be a 0-d {kind} tensor, got {value!r}")
        integer = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
        if value.is_floating_point() != floating or not (floating or integer):
            raise TypeError(
                f"scaler_state[{key!r}] must be a 0-d {kind} tensor, got dtype {value.dtype}"
            )
    _check_state_values(scaler_state)
    return cast(Mapping[str, Any], scaler_state)


def _check_state_values(state: Mapping[str, Any]) -> None:
    """The ranges ``init_grad_scaler`` enforces, for a state built or edited by hand: the
    Python numbers always, the scale where reading it costs no device sync (a scale of
    -1 made every step an ascent)."""
    for key, low, high, closed in (
        ("growth_factor", 1.0, math.inf, False),
        ("backoff_factor", 0.0, 1.0, False),
        ("growth_interval", 1, math.inf, True),
    ):
        value = state[key]
        if isinstance(value, torch.Tensor):
            if not _host_readable(value) or value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"scaler_state[{key!r}] must be a number, got {value!r}")
        inside = low <= value < high if closed else low < value < high
        if key == "growth_interval" and isinstance(value, float) and not value.is_integer():
            inside = False
        if not inside:
            rule = "an int >= 1" if closed else f"in ({low}, {high})"
            raise ValueError(f"scaler_state[{key!r}] must be {rule}, got {value!r}")
    scale = state["scale"]
    if _host_readable(scale):
        value = float(scale)
        if not (0.0 < value and math.isfinite(value)):
            raise ValueError(f"scaler_state['scale'] must be finite and > 0, got {value!r}")


# --------------------------------------------------------------------------------------
# scaling and unscaling
# --------------------------------------------------------------------------------------


def scale_loss(loss: torch.Tensor, scaler_state: Mapping[str, Any]) -> torch.Tensor:
    r"""``loss`` times the scale :math:`S_t`, computed in at least float32.

    A float16 loss is upcast first: :math:`2^{16}` times a loss above 1 would overflow
    float16's maximum (65504) before any gradient is formed.

    >>> scale_loss(torch.tensor(0.25, dtype=torch.float16), init_grad_scaler(4.0))
    tensor(1.)
    """
    scale = _checked_state(scaler_state)["scale"]
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"scale_loss: loss must be a tensor, got {type(loss).__name__} ({loss!r})")
    dtype = torch.promote_types(loss.dtype, scale.dtype)
    return loss.to(dtype) * scale.to(device=loss.device, dtype=dtype)


def inverse_scale(scaler_state: Mapping[str, Any]) -> torch.Tensor:
    r""":math:`\operatorname{fl_{32}}(1 / S_t)`: the reciprocal formed in float64, rounded once.

    The same rounding as ``torch.amp.GradScaler``, so unscaled gradients agree bit for bit.
    """
    scale = _checked_state(scaler_state)["scale"]
    return scale.double().reciprocal().float()


def unscale_grads(
    grads: PyTree,
    scaler_state: Mapping[str, Any],
    device: torch.device | str | None = None,
    allow_fp16: bool = False,
    *,
    inplace: bool = False,
) -> tuple[PyTree, torch.Tensor]:
    r"""Divide scaled gradients by the scale and report whether any is non-finite.

    Returns ``(grads, found_inf)``: the gradients times :func:`inverse_scale` (same
    pytree, ``None`` leaves kept), and a 0-d float32 tensor on ``device`` (default: the
    scale's device) that is 1.0 when any unscaled gradient holds ``inf`` or ``NaN`` and
    0.0 otherwise. The check is made on the device: nothing is read back to the host.

    The unscaled values are checked (not the scaled ones): with a scale below 1 a finite
    scaled gradient can overflow when unscaled, and that step must be skipped too.

    ``allow_fp16``: float16 gradients are refused (``ValueError`` naming the leaf)
    unless this is true; unscaling in float16 loses the small values the scale was
    protecting. Keep float32 master params and let autocast run the float16 compute.
    ``inplace=True`` multiplies the given gradient tensors in place (saves memory;
    the caller's gradients change) and returns them.

    >>> state = init_grad_scaler(init_scale=4.0)
    >>> grads, found_inf = unscale_grads([torch.tensor([8.0]), None], state)
    >>> grads, found_inf
    ([tensor([2.]), None], tensor(0.))
    """
    state = _checked_state(scaler_state)
    scale: torch.Tensor = state["scale"]
    out_device = scale.device if device is None else torch.device(device)
    paths, leaves, spec = flatten(grads)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, (path, grad) in enumerate(zip(paths, leaves, strict=True)):
        if grad is None:
            continue
        location = format_path(path)
        if not isinstance(grad, torch.Tensor):
            raise TypeError(f"unscale_grads: grad at {location} must be a tensor, got {grad!r}")
        if grad.layout != torch.strided or not grad.is_floating_point():
            raise TypeError(
                f"unscale_grads: grad at {location} must be a dense floating point tensor "
                f"(got {grad.dtype}, layout {grad.layout})"
            )
        if grad.dtype == torch.float16 and not allow_fp16:
            raise ValueError(
                f"unscale_grads: grad at {location} is float16; keep float32 master params "
                "(autocast computes in float16 and returns float32 gradients) or pass "
                "allow_fp16=True"
            )
        groups.setdefault((grad.device, grad.dtype), []).append(index)

    inv_scale = inverse_scale(state)
    out = list(leaves)
    flags: list[torch.Tensor] = []
    present = [g for g in leaves if isinstance(g, torch.Tensor)]
    # a differentiated run (hypergradients through the unscaled grads) or a torch.func
    # transform (vmap has no batching rule for _foreach_mul) takes one plain product a
    # tensor, recorded by autograd; otherwise one foreach kernel, outside autograd
    differentiable = not inplace and (records_grad(*present) or transform_active())
    context = nullcontext() if differentiable else torch.no_grad()
    with context:
        for (grad_device, _), indices in groups.items():
            members = [leaves[i] for i in indices]
            factor = inv_scale.to(grad_device)
            if differentiable:
                unscaled = [member * factor for member in members]
            elif inplace:
                torch._foreach_mul_(members, factor)
                unscaled = members
            else:
                unscaled = list(torch._foreach_mul(members, factor))
            for i, tensor in zip(indices, unscaled, strict=True):
                out[i] = tensor
                flag = whole_flag(torch.isfinite(tensor).all().logical_not())
                flags.append(flag.to(out_device))
    if flags:
        found_inf = torch.stack(flags).any().to(torch.float32)
    else:
        found_inf = torch.zeros((), dtype=torch.float32, device=out_device)
    return unflatten(spec, out), found_inf


# --------------------------------------------------------------------------------------
# the scale update
# --------------------------------------------------------------------------------------


def _next_scale_and_tracker(
    state: Mapping[str, Any], found_inf: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    scale: torch.Tensor = state["scale"]
    tracker: torch.Tensor = state["growth_tracker"]
    if not isinstance(found_inf, torch.Tensor):  # a Python flag from a hand-written loop
        found_inf = torch.tensor(float(found_inf))
    if found_inf.numel() != 1:
        raise ValueError(
            f"found_inf must be a 0-d tensor (from unscale_grads), got shape "
            f"{tuple(found_inf.shape)}"
        )
    # nonzero (NaN included) counts as an overflow, as in GradScaler's kernel
    overflow = found_inf.to(device=scale.device).reshape(()) != 0
    finite_in_a_row = tracker + 1
    grow = finite_in_a_row.ge(state["growth_interval"]).logical_and(overflow.logical_not())
    # float64 products rounded once to float32: the rounding of GradScaler's kernel
    backed_off = (scale.double() * state["backoff_factor"]).float()
    grown = (scale.double() * state["growth_factor"]).float()
    grown = torch.where(torch.isfinite(grown), grown, scale)  # never grow into inf
    new_scale = torch.where(overflow, backed_off, torch.where(grow, grown, scale))
    reset = overflow.logical_or(grow)
    new_tracker = torch.where(reset, torch.zeros_like(tracker), finite_in_a_row.to(tracker.dtype))
    return new_scale, new_tracker


def next_scaler_state(
    scaler_state: Mapping[str, Any], found_inf: torch.Tensor | float
) -> GradScalerState:
    r"""The scaler state after a step with ``found_inf``; the input is left untouched.

    The pure form of :func:`update_scale` (for ``torch.func`` transforms and code that
    keeps old states). See the module docstring for the rule.

    >>> state = init_grad_scaler(init_scale=8.0, growth_interval=1)
    >>> next_scaler_state(state, torch.tensor(0.0))["scale"], state["scale"]
    (tensor(16.), tensor(8.))
    """
    state = _checked_state(scaler_state)
    new_scale, new_tracker = _next_scale_and_tracker(state, found_inf)
    new_state = dict(state)
    new_state["scale"] = new_scale
    new_state["growth_tracker"] = new_tracker
    return cast(GradScalerState, new_state)


def update_scale(
    scaler_state: Mapping[str, Any], found_inf: torch.Tensor | float
) -> GradScalerState:
    r"""Update ``scale`` and ``growth_tracker`` in place (``GradScaler.update``'s rule).

    Call it after **every** step, finite or not: a non-finite step shrinks the scale, a
    finite one counts towards growth. Returns the same dict.

    >>> state = init_grad_scaler(init_scale=8.0, growth_interval=1)
    >>> _ = update_scale(state, torch.tensor(1.0))
    >>> state["scale"]
    tensor(4.)
    """
    state = _checked_state(scaler_state)
    new_scale, new_tracker = _next_scale_and_tracker(state, found_inf)
    with torch.no_grad():
        state["scale"].copy_(new_scale)
        state["growth_tracker"].copy_(new_tracker)
    return cast(GradScalerState, state)


# --------------------------------------------------------------------------------------
# the combined step
# --------------------------------------------------------------------------------------


class StepsWithSkip(Protocol):
    """What :func:`scaled_step` needs: an ``optorch.base.Optimizer`` or a wrapper of one."""

    def step(
        self, params: PyTree, grads: PyTree, state: Mapping[str, Any], *, skip_if: Any = ...
    ) -> tuple[PyTree, dict[str, Any]]: ...


class ScaledStep(NamedTuple):
    """What :func:`scaled_step` returns."""

    #: The params after the step (bit-identical to the inputs when ``found_inf``).
    params: PyTree
    #: The optimizer state after the step (``"step"`` not advanced when ``found_inf``).
    opt_state: dict[str, Any]
    #: The scaler state after :func:`update_scale`.
    scaler_state: GradScalerState
    #: 0-d float32 tensor, 1.0 when this step was skipped.
    found_inf: torch.Tensor


def scaled_step(
    optimizer: StepsWithSkip,
    params: PyTree,
    grads: PyTree,
    opt_state: Mapping[str, Any],
    scaler_state: Mapping[str, Any],
    *,
    allow_fp16: bool = False,
    scaler_inplace: bool | None = None,
    **step_kwargs: Any,
) -> ScaledStep:
    """Unscale, step unless non-finite, update the scale: one mixed-precision step.

    ``grads`` are the gradients of :func:`scale_loss` (scaled by :math:`S_t`). The
    optimizer runs with ``skip_if=found_inf``: on a non-finite step it returns params and
    state, its step count included, bit-identical, and the scale backs off. Whether a
    step was skipped is decided on the device, so this function never waits for the
    device and a whole train step compiles with ``torch.compile(fullgraph=True)``.

    ``scaler_inplace``: update ``scaler_state``'s tensors in place (:func:`update_scale`)
    or return a new dict (:func:`next_scaler_state`); by default the optimizer's
    ``config.inplace`` decides (in place when it has no config). ``step_kwargs``
    (e.g. ``hyper_overrides``) go to ``optimizer.step``.

    >>> import optorch
    >>> opt = optorch.get_optimizer("sgd", max_lr=0.5, momentum=0.0)
    >>> params = {"w": torch.ones(2)}
    >>> opt_state, scaler = opt.init(params), init_grad_scaler(init_scale=4.0)
    >>> out = scaled_step(opt, params, {"w": torch.tensor([4.0, 8.0])}, opt_state, scaler)
    >>> out.params["w"], out.found_inf, out.scaler_state["growth_tracker"]
    (tensor([0.5000, 0.0000]), tensor(0.), tensor(1, dtype=torch.int32))
    >>> out = scaled_step(opt, params, {"w": torch.tensor([float("inf"), 8.0])}, opt_state, scaler)
    >>> out.params["w"], out.found_inf, out.scaler_state["scale"], int(out.opt_state["step"])
    (tensor([0.5000, 0.0000]), tensor(1.), tensor(2.), 1)
    """
    state = _checked_state(scaler_state)
    scale_device = state["scale"].device
    unscaled, found_inf = unscale_grads(grads, state, scale_device, allow_fp16)
    new_params, new_opt_state = optimizer.step(
        params, unscaled, opt_state, skip_if=found_inf.bool(), **step_kwargs
    )
    if scaler_inplace is None:
        scaler_inplace = bool(getattr(getattr(optimizer, "config", None), "inplace", True))
    if scaler_inplace:
        new_scaler_state = update_scale(state, found_inf)
    else:
        new_scaler_state = next_scaler_state(state, found_inf)
    return ScaledStep(new_params, new_opt_state, new_scaler_state, found_inf)
