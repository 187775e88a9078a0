r"""RAdam: rectified Adam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate
and Beyond", arXiv:1908.03265).

With :math:`g_t` the gradient (negated when ``maximize``), :math:`\beta_1, \beta_2` =
``betas``, :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay`` and
:math:`\eta_t` = ``max_lr`` times the schedule multiplier:

.. math::

    g_t &\leftarrow g_t + \lambda\, p_{t-1}
        \quad\text{or, with decoupled\_weight\_decay,}\quad
        p_{t-1} \leftarrow (1 - \eta_t \lambda)\, p_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad
    \hat m_t = \frac{m_t}{1 - \beta_1^t} \\
    \rho_\infty &= \frac{2}{1 - \beta_2} - 1, \qquad
    \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t} \\
    r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\,\rho_\infty}
                      {(\rho_\infty - 4)(\rho_\infty - 2)\,\rho_t}} \\
    p_t &= \begin{cases}
        p_{t-1} - \eta_t\, r_t\, \hat m_t\, \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon}
            & \rho_t > 5 \\
        p_{t-1} - \eta_t\, \hat m_t & \text{otherwise (SGD with momentum)}
    \end{cases}

The same conventions and numbers as ``torch.optim.RAdam``; the state fields ``exp_avg``
and ``exp_avg_sq`` carry torch's names. The choice between the two updates depends only
on the step, so it is made among the per-step scalars (with ``where``, no host sync when
the step is a device tensor) and the update adds both terms, one of them scaled by zero.

>>> import torch
>>> from optorch.radam import RAdamConfig, default_radam_state, radam_step
>>> params = {"w": torch.tensor([1.0, -1.0])}
>>> config = RAdamConfig(max_lr=0.1)
>>> state = default_radam_state(params)
>>> params, state = radam_step(params, {"w": torch.tensor([0.5, -2.0])}, state, config)
>>> params["w"]
tensor([ 0.9500, -0.8000])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optorch.base import (
    BaseConfig,
    Rule,
    apply_step,
    check_betas,
    check_bool,
    check_range,
    init_state,
    is_zero,
)
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import addcdiv, addcmul, lerp, scalar_sqrt, where

__all__ = ["RAdamConfig", "RAdamRule", "default_radam_state", "radam_step"]

#: The rectification applies once the variance of the adaptive rate is tractable.
_RHO_THRESHOLD = 5.0


@dataclass
class RAdamConfig(BaseConfig):
    """Hyperparameters of RAdam (``torch.optim.RAdam`` names; ``max_lr`` is the lr)."""

    max_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    steps: int = 0
    lr_schedule_value: float | None = None
    decoupled_weight_decay: bool = False
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_betas(owner, self.betas)
        check_range(owner, "eps", self.eps, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        check_bool(
            owner, *((name, getattr(self, name)) for name in ("decoupled_weight_decay", "maximize"))
        )


class RAdamRule(Rule):
    name = "radam"
    per_leaf_step = True  # t counts the param's own steps (torch.optim's per-param step)
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = RAdamConfig

    def fields(self, config: RAdamConfig) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def static(self, config: RAdamConfig) -> Any:
        return (config.maximize, not is_zero(config.weight_decay), config.decoupled_weight_decay)

    config_scalars = ("beta1", "beta2", "eps", "weight_decay")

    def scalars(self, config: RAdamConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        beta1, beta2 = config.betas
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        rho_inf = 2.0 / (1.0 - beta2) - 1.0
        rho_t = rho_inf - 2.0 * t * beta2**t / bias_correction2
        rectified = rho_t > _RHO_THRESHOLD
        # outside the rectified regime the ratio may be negative or 0/0 (rho_inf = 4):
        # evaluate it at a harmless point instead and let the flag discard it
        rho_t_used = where(rectified, rho_t, _RHO_THRESHOLD + 1.0)
        rho_inf_used = where(rectified, rho_inf, _RHO_THRESHOLD + 1.0)
        rectification = scalar_sqrt(
            (rho_t_used - 4.0)
            * (rho_t_used - 2.0)
            * rho_inf_used
            / ((rho_inf_used - 4.0) * (rho_inf_used - 2.0) * rho_t_used)
        )
        step_size = lr / bias_correction1
        return {
            "beta1": beta1,
            "beta2": beta2,
            "eps": config.eps,
            "weight_decay": config.weight_decay,
            "shrink": 1.0 - lr * config.weight_decay,
            # multiplies m_t / (sqrt(v_t) + eps): the rectified update, or zero
            "adaptive_step": where(
                rectified, step_size * rectification * scalar_sqrt(bias_correction2), 0.0
            ),
            # multiplies m_t: the unrectified (momentum SGD) update, or zero
            "momentum_step": where(rectified, 0.0, step_size),
            # added to the denominator where the adaptive term is zero: 0 / (0 + eps)
            # would be 0/0 wherever sqrt(v_t) + eps is 0 (eps=0, or float16 underflow)
            "denom_guard": where(rectified, 0.0, 1.0),
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        exp_avg, exp_avg_sq, h = rest
        maximize, decay, decoupled = h.static
        if maximize:
            grad = -grad
        if decay:
            if decoupled:
                param = param * h.shrink
            else:
                grad = grad + param * h.weight_decay
        exp_avg = lerp(exp_avg, grad, 1.0 - h.beta1)
        exp_avg_sq = addcmul(exp_avg_sq * h.beta2, grad, grad, 1.0 - h.beta2)
        # with host-side scalars one term is a known zero: skip its work
        if is_zero(h.adaptive_step):
            return param - exp_avg * h.momentum_step, exp_avg, exp_avg_sq
        denom = exp_avg_sq.sqrt() + h.eps
        if is_zero(h.momentum_step):
            return addcdiv(param, exp_avg, denom, -h.adaptive_step), exp_avg, exp_avg_sq
        # per-step values as tensors (compiled, accelerators, transforms): both terms, the
        # zero one's denominator kept away from 0 (NaN times the zero weight is NaN)
        scale = h.adaptive_step / (denom + h.denom_guard) + h.momentum_step
        return param - exp_avg * scale, exp_avg, exp_avg_sq


RULE = RAdamRule()


def default_radam_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros}`` for the trainable params."""
    return init_state(RULE, model, RAdamConfig())


def radam_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: RAdamConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One RAdam step: ``(params, grads, state, config) -> (params, state)``.

    The first steps (while :math:`\\rho_t \\le 5`, the first five with the default
    ``betas``) are momentum SGD steps.
    """
    return apply_step(RULE, config, params, grads, opt_state)
