r"""RMSprop: gradients divided by a running root mean square (Hinton, *Neural Networks for
Machine Learning*, lecture 6e, 2012), with the centered variant of Graves (2013,
arXiv:1308.0850) and heavy-ball momentum; the conventions of ``torch.optim.RMSprop``.

With :math:`g_t` the gradient (negated when ``maximize``), :math:`\alpha` = ``alpha``,
:math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay``, :math:`\mu` = ``momentum``
and :math:`\eta_t` = ``max_lr`` times the schedule multiplier:

.. math::

    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    v_t &= \alpha\, v_{t-1} + (1 - \alpha)\, g_t^2 \\
    \bar g_t &= \alpha\, \bar g_{t-1} + (1 - \alpha)\, g_t \quad\text{(centered)} \\
    d_t &= \frac{g_t}{\sqrt{v_t - \bar g_t^2} + \epsilon}\ \text{(centered)}
        \quad\text{or}\quad d_t = \frac{g_t}{\sqrt{v_t} + \epsilon} \\
    b_t &= \mu\, b_{t-1} + d_t \quad\text{(momentum > 0)} \\
    p_t &= p_{t-1} - \eta_t\, b_t \quad\text{or, without momentum,}\quad
        p_t = p_{t-1} - \eta_t\, d_t

All of :math:`v_0, \bar g_0, b_0` are zero. State fields (torch's names, each shaped
like the param): ``square_avg`` (:math:`v`), ``momentum_buffer`` (:math:`b`, only
when ``momentum > 0``) and ``grad_avg`` (:math:`\bar g`, only when ``centered``).

>>> import torch
>>> from optorch.rmsprop import RMSpropConfig, default_rmsprop_state, rmsprop_step
>>> params = {"w": torch.tensor([1.0, -1.0])}
>>> config = RMSpropConfig(max_lr=0.01, alpha=0.75, eps=0.0)
>>> state = default_rmsprop_state(params)
>>> params, state = rmsprop_step(params, {"w": torch.tensor([3.0, -4.0])}, state, config)
>>> params["w"]  # |step| = lr / sqrt(1 - alpha) = 0.02, whatever the gradient's size
tensor([ 0.9800, -0.9800])
>>> state["square_avg"]["w"]
tensor([2.2500, 4.0000])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optorch.base import BaseConfig, Rule, apply_step, check_bool, check_range, init_state, is_zero
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import addcdiv, addcmul, lerp

__all__ = ["RMSpropConfig", "RMSpropRule", "default_rmsprop_state", "rmsprop_step"]


@dataclass
class RMSpropConfig(BaseConfig):
    """Hyperparameters of RMSprop (``torch.optim.RMSprop`` names; ``max_lr`` is the lr)."""

    max_lr: float = 1e-2
    alpha: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    centered: bool = False
    steps: int = 0
    lr_schedule_value: float | None = None
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_range(owner, "alpha", self.alpha, 0.0, 1.0)
        check_range(owner, "eps", self.eps, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        check_range(owner, "momentum", self.momentum, 0.0)
        check_bool(owner, *((flag, getattr(self, flag)) for flag in ("centered", "maximize")))


class RMSpropRule(Rule):
    name = "rmsprop"
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = RMSpropConfig
    optional_fields = ("momentum_buffer", "grad_avg")

    def fields(self, config: RMSpropConfig) -> tuple[str, ...]:
        names = ["square_avg"]
        if not is_zero(config.momentum):
            names.append("momentum_buffer")
        if config.centered:
            names.append("grad_avg")
        return tuple(names)

    def static(self, config: RMSpropConfig) -> Any:
        return (
            not is_zero(config.momentum),
            config.centered,
            config.maximize,
            not is_zero(config.weight_decay),
        )

    config_scalars = ("alpha", "eps", "weight_decay", "momentum")

    def scalars(self, config: RMSpropConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        return {
            "lr": lr,
            "alpha": config.alpha,
            "eps": config.eps,
            "weight_decay": config.weight_decay,
            "momentum": config.momentum,
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        h = rest[-1]
        use_momentum, centered, maximize, decay = h.static
        fields = iter(rest[:-1])
        square_avg = next(fields)
        momentum_buffer = next(fields) if use_momentum else None
        grad_avg = next(fields) if centered else None
        if maximize:
            grad = -grad
        if decay:
            grad = grad + param * h.weight_decay
        square_avg = addcmul(square_avg * h.alpha, grad, grad, 1.0 - h.alpha)
        if grad_avg is not None:
            grad_avg = lerp(grad_avg, grad, 1.0 - h.alpha)
            denom = addcmul(square_avg, grad_avg, grad_avg, -1.0).sqrt() + h.eps
        else:
            denom = square_avg.sqrt() + h.eps
        new_state = [square_avg]
        if momentum_buffer is not None:
            momentum_buffer = addcdiv(momentum_buffer * h.momentum, grad, denom, 1.0)
            new_param = param - momentum_buffer * h.lr
            new_state.append(momentum_buffer)
        else:
            new_param = addcdiv(param, grad, denom, -h.lr)
        if grad_avg is not None:
            new_state.append(grad_avg)
        return (new_param, *new_state)


RULE = RMSpropRule()


def default_rmsprop_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "square_avg": zeros}`` for the trainable params (default config).

    Fields that another config needs (``momentum_buffer``, ``grad_avg``) are created on
    its first step, or up front with ``init_state(RULE, model, config)``.
    """
    return init_state(RULE, model, RMSpropConfig())


def rmsprop_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: RMSpropConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One RMSprop step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)
