r"""Lion: evolved sign momentum (Chen et al. 2023, "Symbolic Discovery of Optimization
Algorithms", arXiv:2302.06675).

With :math:`g_t` the gradient (negated when ``maximize``), :math:`\beta_1, \beta_2` =
``betas``, :math:`\lambda` = ``weight_decay``, :math:`s_t` the schedule multiplier and
:math:`\eta_t` = ``max_lr`` :math:`\cdot s_t`:

.. math::

    c_t &= \operatorname{sign}\big(\beta_1 m_{t-1} + (1 - \beta_1)\, g_t\big) \\
    p_t &= (1 - \eta_t \lambda)\, p_{t-1} - \eta_t\, c_t \\
    m_t &= \beta_2 m_{t-1} + (1 - \beta_2)\, g_t

(Algorithm 2 of the paper.) The update direction interpolates with :math:`\beta_1` but
the momentum :math:`m` (state field ``exp_avg``) is tracked with :math:`\beta_2`. Every
coordinate moves by exactly :math:`\eta_t`, so Lion wants a learning rate 3-10x smaller
than AdamW's and a weight decay 3-10x larger.

With ``decoupled_weight_decay=True`` the decay follows the schedule but not the
learning rate, :math:`p_t = (1 - s_t \lambda)\, p_{t-1} - \eta_t c_t` (the
``decoupled_weight_decay`` option of the ``lion-pytorch`` package).

>>> import torch
>>> from optorch.lion import LionConfig, default_lion_state, lion_step
>>> params = {"w": torch.tensor([1.0, -1.0, 0.5])}
>>> config = LionConfig(max_lr=0.1, weight_decay=0.5)
>>> state = default_lion_state(params)
>>> params, state = lion_step(params, {"w": torch.tensor([2.0, -3.0, 0.0])}, state, config)
>>> params["w"]
tensor([ 0.8500, -0.8500,  0.4750])
>>> state["exp_avg"]["w"]
tensor([ 0.0200, -0.0300,  0.0000])
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

__all__ = ["LionConfig", "LionRule", "default_lion_state", "lion_step"]


@dataclass
class LionConfig(BaseConfig):
    """Hyperparameters of Lion (``lion-pytorch`` names; ``max_lr`` is the lr)."""

    max_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    steps: int = 0
    lr_schedule_value: float | None = None
    decoupled_weight_decay: bool = False
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_betas(owner, self.betas)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        check_bool(
            owner, *((name, getattr(self, name)) for name in ("decoupled_weight_decay", "maximize"))
        )


class LionRule(Rule):
    name = "lion"
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = LionConfig

    def fields(self, config: LionConfig) -> tuple[str, ...]:
        return ("exp_avg",)

    def static(self, config: LionConfig) -> Any:
        return (config.maximize, not is_zero(config.weight_decay))

    config_scalars = ("beta1", "beta2")

    def scalars(self, config: LionConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        beta1, beta2 = config.betas
        decay_rate = multiplier if config.decoupled_weight_decay else lr
        return {
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "shrink": 1.0 - decay_rate * config.weight_decay,
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        exp_avg, h = rest
        maximize, decay = h.static
        if maximize:
            grad = -grad
        # products and a sum rather than lerp: lerp rounds differently, and the sign of a
        # near-zero interpolation must agree with the paper's formula
        direction = (exp_avg * h.beta1 + grad * (1.0 - h.beta1)).sign()
        if decay:
            param = param * h.shrink
        new_param = param - direction * h.lr
        exp_avg = exp_avg * h.beta2 + grad * (1.0 - h.beta2)
        return new_param, exp_avg


RULE = LionRule()


def default_lion_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "exp_avg": zeros}`` for the trainable params."""
    return init_state(RULE, model, LionConfig())


def lion_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: LionConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One Lion step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)
