r"""Adamax: Adam with the infinity norm (Kingma & Ba 2014, "Adam: A Method for Stochastic
Optimization", arXiv:1412.6980, section 7.1).

With :math:`g_t` the gradient (negated when ``maximize``), :math:`\beta_1, \beta_2` =
``betas``, :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay`` and
:math:`\eta_t` = ``max_lr`` times the schedule multiplier:

.. math::

    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    u_t &= \max\big(\beta_2 u_{t-1},\ |g_t| + \epsilon\big) \\
    p_t &= p_{t-1} - \frac{\eta_t}{1 - \beta_1^t}\, \frac{m_t}{u_t}

The same conventions and numbers as ``torch.optim.Adamax`` (which puts
:math:`\epsilon` inside the maximum, so that :math:`u_t > 0`); the state fields
``exp_avg`` (:math:`m`) and ``exp_inf`` (:math:`u`) carry torch's names.

>>> import torch
>>> from optorch.adamax import AdamaxConfig, adamax_step, default_adamax_state
>>> params = {"w": torch.tensor([1.0, -1.0])}
>>> config = AdamaxConfig(max_lr=0.1)
>>> state = default_adamax_state(params)
>>> params, state = adamax_step(params, {"w": torch.tensor([0.5, -2.0])}, state, config)
>>> params["w"]
tensor([ 0.9000, -0.9000])
>>> state["exp_inf"]["w"]
tensor([0.5000, 2.0000])
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
from optorch.engine import addcdiv, lerp

__all__ = ["AdamaxConfig", "AdamaxRule", "adamax_step", "default_adamax_state"]


@dataclass
class AdamaxConfig(BaseConfig):
    """Hyperparameters of Adamax (``torch.optim.Adamax`` names; ``max_lr`` is the lr)."""

    max_lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    steps: int = 0
    lr_schedule_value: float | None = None
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_betas(owner, self.betas)
        check_range(owner, "eps", self.eps, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        check_bool(owner, ("maximize", self.maximize))


class AdamaxRule(Rule):
    name = "adamax"
    per_leaf_step = True  # t counts the param's own steps (torch.optim's per-param step)
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = AdamaxConfig

    def fields(self, config: AdamaxConfig) -> tuple[str, ...]:
        return ("exp_avg", "exp_inf")

    def static(self, config: AdamaxConfig) -> Any:
        return (config.maximize, not is_zero(config.weight_decay))

    config_scalars = ("beta1", "beta2", "eps", "weight_decay")

    def scalars(self, config: AdamaxConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        beta1, beta2 = config.betas
        return {
            "beta1": beta1,
            "beta2": beta2,
            "eps": config.eps,
            "weight_decay": config.weight_decay,
            "step_size": lr / (1.0 - beta1**t),
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        exp_avg, exp_inf, h = rest
        maximize, decay = h.static
        if maximize:
            grad = -grad
        if decay:
            grad = grad + param * h.weight_decay
        exp_avg = lerp(exp_avg, grad, 1.0 - h.beta1)
        exp_inf = (exp_inf * h.beta2).maximum(grad.abs() + h.eps)
        return addcdiv(param, exp_avg, exp_inf, -h.step_size), exp_avg, exp_inf


RULE = AdamaxRule()


def default_adamax_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "exp_avg": zeros, "exp_inf": zeros}`` for the trainable params."""
    return init_state(RULE, model, AdamaxConfig())


def adamax_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: AdamaxConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One Adamax step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)
