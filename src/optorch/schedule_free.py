r"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled", arXiv:2405.15682).

Schedule-Free methods replace the learning-rate decay schedule by an average of the
iterates. Three sequences share one params-sized buffer of extra memory: the base
sequence :math:`z` (plain AdamW-preconditioned steps), the average :math:`x` (where the
model is evaluated) and the interpolation :math:`y` (where gradients are taken, and
what the params hold during training). With :math:`\beta_1, \beta_2` = ``betas``,
:math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay``, :math:`T_w` =
``warmup_steps``, :math:`r` = ``r``, :math:`q` = ``weight_lr_power``, and
:math:`\eta_t` = ``max_lr`` times the schedule multiplier (1 unless a schedule is set),
step :math:`t = 1, 2, \dots` is:

.. math::

    \gamma_t &= \eta_t \min(1, t / T_w), \qquad
    \gamma^{\max}_t = \max(\gamma^{\max}_{t-1}, \gamma_t) \\
    w_t &= t^r \,(\gamma^{\max}_t)^q, \qquad W_t = W_{t-1} + w_t, \qquad
    c_t = w_t / W_t \ (0 \text{ if } W_t = 0) \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \quad (g_t = \nabla f(y_{t-1})) \\
    \hat g_t &= \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon} + \lambda\, y_{t-1} \\
    z_t &= z_{t-1} - \gamma_t\, \hat g_t \\
    x_t &= (1 - c_t)\, x_{t-1} + c_t\, z_t \\
    y_t &= (1 - \beta_1)\, z_t + \beta_1 x_t

starting from :math:`x_0 = y_0 = z_0` (the initial params), :math:`v_0 = 0`,
:math:`W_0 = 0`. Only :math:`y` and :math:`z` are stored; the step updates :math:`y`
directly, :math:`y_t = (1 - c_t)\, y_{t-1} + c_t z_{t-1} + \gamma_t(\beta_1 (1 - c_t) - 1)
\hat g_t`, which is the same recursion. Warmup is built in (``warmup_steps``); the
weights :math:`w_t` make the average ignore the small-lr warmup iterates (``weight_lr_power``)
and may favour late iterates (polynomial averaging, ``r``).

State: ``"z"`` and ``"exp_avg_sq"`` (params-shaped), plus ``"weight_sum"``
(:math:`W_t`) and ``"lr_max"`` (:math:`\gamma^{\max}_t`), 0-d float64 tensors shared
by all params, and ``"step"``. The algorithm and defaults are those of the
``schedulefree`` package's ``AdamWScheduleFree`` (its ``lr`` is ``max_lr`` here).

The params hold :math:`y` while training. Evaluate (and checkpoint) at :math:`x`:
:func:`eval_params` maps :math:`y \to x = y + (1 - 1/\beta_1)(z - y)` and
:func:`train_params` maps back, :math:`y = x + (1 - \beta_1)(z - x)`, like the
package's ``optimizer.eval()`` / ``optimizer.train()``. They are inverses: call them
in alternation (the state does not record which one the params hold).

>>> import torch
>>> from optorch.schedule_free import (
...     ScheduleFreeAdamWConfig, default_schedule_free_adamw_state, eval_params,
...     schedule_free_adamw_step, train_params)
>>> params = {"w": torch.tensor([1.0, -2.0])}
>>> config = ScheduleFreeAdamWConfig(max_lr=0.1)
>>> state = default_schedule_free_adamw_state(params)
>>> for _ in range(3):
...     grads = {"w": 2 * params["w"]}  # f(w) = |w|^2
...     params, state = schedule_free_adamw_step(params, grads, state, config)
>>> params["w"]  # y, where the gradients are taken
tensor([ 0.7968, -1.7933])
>>> params = eval_params(params, state, config)
>>> params["w"]  # x, the average of z_1..z_3 (equal weights: constant lr, r = 0)
tensor([ 0.8061, -1.8029])
>>> params = train_params(params, state, config)  # back to y before the next step
>>> params["w"]
tensor([ 0.7968, -1.7933])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from optorch.base import (
    BaseConfig,
    Rule,
    apply_step,
    check_betas,
    check_range,
    init_state,
)
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import addcmul, lerp, where
from optorch.tree import flatten, format_path, unflatten

__all__ = [
    "ScheduleFreeAdamWConfig",
    "ScheduleFreeAdamWRule",
    "default_schedule_free_adamw_state",
    "eval_params",
    "schedule_free_adamw_step",
    "train_params",
]


@dataclass
class ScheduleFreeAdamWConfig(BaseConfig):
    """Hyperparameters of Schedule-Free AdamW (``schedulefree.AdamWScheduleFree`` names;
    ``max_lr`` is its ``lr``)."""

    max_lr: float = 0.0025
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    r: float = 0.0
    weight_lr_power: float = 2.0
    steps: int = 0
    lr_schedule_value: float | None = None

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_betas(owner, self.betas)
        check_range(owner, "eps", self.eps, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"Invalid {owner}.warmup_steps: {warmup!r} (must be an int >= 0)")
        check_range(owner, "r", self.r, 0.0)
        check_range(owner, "weight_lr_power", self.weight_lr_power, 0.0)


def _ratio(numerator: Any, denominator: Any) -> Any:
    """``numerator / denominator``, 0 where the denominator is 0 (floats or 0-d tensors)."""
    if isinstance(denominator, torch.Tensor):
        positive = denominator > 0
        return torch.where(positive, numerator / torch.where(positive, denominator, 1.0), 0.0)
    return numerator / denominator if denominator > 0 else 0.0


class ScheduleFreeAdamWRule(Rule):
    name = "schedule_free_adamw"
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = ScheduleFreeAdamWConfig

    def fields(self, config: ScheduleFreeAdamWConfig) -> tuple[str, ...]:
        return ("z", "exp_avg_sq")

    def init_field(
        self, name: str, param: torch.Tensor, config: ScheduleFreeAdamWConfig
    ) -> torch.Tensor:
        if name == "z":  # z_0 = x_0 = y_0
            return param.clone(memory_format=torch.preserve_format)
        return super().init_field(name, param, config)

    global_bounds = MappingProxyType({"weight_sum": (0.0, math.inf), "lr_max": (0.0, math.inf)})

    def global_fields(self, config: ScheduleFreeAdamWConfig) -> dict[str, float]:
        return {"weight_sum": 0.0, "lr_max": 0.0}

    def static(self, config: ScheduleFreeAdamWConfig) -> Any:
        decay = isinstance(config.weight_decay, torch.Tensor) or config.weight_decay != 0
        return (decay,)

    config_scalars = ("beta2", "one_minus_beta2", "eps", "weight_decay")

    def scalars(
        self, config: ScheduleFreeAdamWConfig, t: Any, lr: Any, multiplier: Any
    ) -> dict[str, Any]:
        beta2 = config.betas[1]
        return {
            "beta2": beta2,
            # from the exact beta2: 1 - beta2 taken after rounding beta2 to a float32
            # 0-d tensor (the compiled engine) would be off by about 1e-5 relative
            "one_minus_beta2": 1.0 - beta2,
            "eps": config.eps,
            "weight_decay": config.weight_decay,
            "bias_correction2": 1.0 - beta2**t,
        }

    def advance(
        self,
        config: ScheduleFreeAdamWConfig,
        t: Any,
        lr: Any,
        multiplier: Any,
        old: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        warmup = config.warmup_steps
        scheduled_lr = lr * where(t <= warmup, t / warmup, 1.0) if warmup else lr
        lr_max = where(scheduled_lr > old["lr_max"], scheduled_lr, old["lr_max"])
        weight = t**config.r * lr_max**config.weight_lr_power
        weight_sum = old["weight_sum"] + weight
        average_weight = _ratio(weight, weight_sum)
        beta1 = config.betas[0]
        extra = {
            "lr": scheduled_lr,
            "average_weight": average_weight,
            "y_step": scheduled_lr * (beta1 * (1.0 - average_weight) - 1.0),
        }
        return {"weight_sum": weight_sum, "lr_max": lr_max}, extra

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        z, exp_avg_sq, h = rest
        (decay,) = h.static
        exp_avg_sq = addcmul(exp_avg_sq * h.beta2, grad, grad, h.one_minus_beta2)
        denom = (exp_avg_sq / h.bias_correction2).sqrt() + h.eps
        direction = grad / denom
        if decay:  # at y, where the gradient was taken
            direction = direction + param * h.weight_decay
        y = lerp(param, z, h.average_weight) + direction * h.y_step
        z = z - direction * h.lr
        return y, z, exp_avg_sq


RULE = ScheduleFreeAdamWRule()


def default_schedule_free_adamw_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """Fresh state: ``z`` (a copy of the params), ``exp_avg_sq`` (zeros), the scalars
    ``weight_sum`` and ``lr_max``, and ``step``."""
    return init_state(RULE, model, ScheduleFreeAdamWConfig())


def schedule_free_adamw_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: ScheduleFreeAdamWConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One step from :math:`y` (the params while training):
    ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)


# --------------------------------------------------------------------------------------
# switching the params between y (training) and x (evaluation)
# --------------------------------------------------------------------------------------


def _interpolate_towards_z(
    params: PARAMS_GRADS_TYPE,
    state: Mapping[str, Any],
    config: ScheduleFreeAdamWConfig,
    weight: float,
    caller: str,
) -> PARAMS_GRADS_TYPE:
    """Every param ``p`` that has a ``z`` becomes ``p + weight * (z - p)``."""
    if not isinstance(state, Mapping) or "z" not in state:
        raise ValueError(f"{caller}: the state has no 'z' (is it a Schedule-Free state?)")
    param_paths, param_leaves, spec = flatten(params)
    z_paths, z_leaves, _ = flatten(state["z"])
    z_at = dict(zip(z_paths, z_leaves, strict=True))
    unknown = [format_path(p) for p in z_paths if p not in set(param_paths)]
    if unknown:
        raise ValueError(f"{caller}: state 'z' has leaves {unknown} that params do not have")
    out = list(param_leaves)
    for index, (path, param) in enumerate(zip(param_paths, param_leaves, strict=True)):
        z = z_at.get(path)
        if param is None or z is None:
            continue  # frozen or never optimized: y = x = z
        if z.shape != param.shape:
            raise ValueError(
                f"{caller}: state 'z' at {format_path(path)} has shape {tuple(z.shape)} but "
                f"the param has shape {tuple(param.shape)}"
            )
        if config.inplace:
            with torch.no_grad():
                param.lerp_(z, weight)
        else:
            out[index] = torch.lerp(param, z, weight)
    return params if config.inplace else unflatten(spec, out)


def eval_params(
    params: PARAMS_GRADS_TYPE, state: Mapping[str, Any], config: ScheduleFreeAdamWConfig
) -> PARAMS_GRADS_TYPE:
    r"""The training params :math:`y` moved to the evaluation point :math:`x`.

    :math:`x = y + (1 - 1/\beta_1)(z - y)`. In place when ``config.inplace`` (the given
    tensors change and are returned), else new tensors. Undo with :func:`train_params`.
    """
    beta1 = config.betas[0]
    if isinstance(beta1, torch.Tensor) or not beta1 > 0:
        raise ValueError(
            f"eval_params: betas[0] = {beta1!r} must be a positive number: with beta1 = 0 "
            "the params equal z and the average x cannot be recovered from them"
        )
    return _interpolate_towards_z(params, state, config, 1.0 - 1.0 / beta1, "eval_params")


def train_params(
    params: PARAMS_GRADS_TYPE, state: Mapping[str, Any], config: ScheduleFreeAdamWConfig
) -> PARAMS_GRADS_TYPE:
    r"""The evaluation params :math:`x` moved back to the training point :math:`y`.

    :math:`y = x + (1 - \beta_1)(z - x)`. In place when ``config.inplace``, else new
    tensors. The inverse of :func:`eval_params`.
    """
    beta1 = config.betas[0]
    if isinstance(beta1, torch.Tensor):
        raise TypeError("train_params: betas[0] must be a Python number")
    return _interpolate_towards_z(params, state, config, 1.0 - beta1, "train_params")
