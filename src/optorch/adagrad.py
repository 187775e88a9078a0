r"""Adagrad: per-coordinate steps scaled by the accumulated squared gradients (Duchi, Hazan
& Singer 2011, "Adaptive Subgradient Methods for Online Learning and Stochastic
Optimization", JMLR 12); the conventions of ``torch.optim.Adagrad``.

With :math:`g_t` the gradient (negated when ``maximize``), :math:`\lambda` =
``weight_decay``, :math:`\delta` = ``lr_decay``, :math:`\epsilon` = ``eps``,
:math:`s_0` = ``initial_accumulator_value`` and :math:`\eta_t` = ``max_lr`` times the
schedule multiplier:

.. math::

    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    \tilde\eta_t &= \frac{\eta_t}{1 + (t - 1)\, \delta} \\
    s_t &= s_{t-1} + g_t^2 \\
    p_t &= p_{t-1} - \tilde\eta_t\, \frac{g_t}{\sqrt{s_t} + \epsilon}

The state field ``sum`` (:math:`s`, torch's name, shaped like the param) starts at
``initial_accumulator_value`` everywhere.

>>> import torch
>>> from optorch.adagrad import AdagradConfig, adagrad_step, default_adagrad_state
>>> params = {"w": torch.tensor([1.0, -1.0])}
>>> config = AdagradConfig(max_lr=0.5, eps=0.0)
>>> state = default_adagrad_state(params)
>>> params, state = adagrad_step(params, {"w": torch.tensor([3.0, -4.0])}, state, config)
>>> params["w"]  # the first step moves every coordinate by lr, in the gradient's sign
tensor([ 0.5000, -0.5000])
>>> state["sum"]["w"]
tensor([ 9., 16.])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from optorch.base import BaseConfig, Rule, apply_step, check_bool, check_range, init_state
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import addcdiv, addcmul

__all__ = ["AdagradConfig", "AdagradRule", "adagrad_step", "default_adagrad_state"]


@dataclass
class AdagradConfig(BaseConfig):
    """Hyperparameters of Adagrad (``torch.optim.Adagrad`` names; ``max_lr`` is the lr)."""

    max_lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    steps: int = 0
    lr_schedule_value: float | None = None
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_range(owner, "lr_decay", self.lr_decay, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        check_range(owner, "initial_accumulator_value", self.initial_accumulator_value, 0.0)
        check_range(owner, "eps", self.eps, 0.0)
        check_bool(owner, ("maximize", self.maximize))


class AdagradRule(Rule):
    name = "adagrad"
    per_leaf_step = True  # t counts the param's own steps (torch.optim's per-param step)
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = AdagradConfig

    def fields(self, config: AdagradConfig) -> tuple[str, ...]:
        return ("sum",)

    def init_field(self, name: str, param: torch.Tensor, config: AdagradConfig) -> torch.Tensor:
        initial = config.initial_accumulator_value
        if isinstance(initial, torch.Tensor):
            # a tensor stays one (not read as a number): a hypergradient flows into it,
            # and under vmap each model's accumulator starts at its own value
            zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
            start = initial.to(device=param.device, dtype=zeros.real.dtype)
            return zeros + (torch.complex(start, start) if param.is_complex() else start)
        # a complex param's accumulator starts at initial in both coordinates, as
        # torch.optim.Adagrad's does
        value = complex(initial, initial) if param.is_complex() else initial
        return torch.full_like(param, value, memory_format=torch.preserve_format)

    def static(self, config: AdagradConfig) -> Any:
        decay = isinstance(config.weight_decay, torch.Tensor) or config.weight_decay != 0
        return (config.maximize, decay)

    config_scalars = ("eps", "weight_decay")

    def scalars(self, config: AdagradConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        return {
            "clr": lr / (1.0 + (t - 1) * config.lr_decay),
            "eps": config.eps,
            "weight_decay": config.weight_decay,
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        accumulated, h = rest
        maximize, decay = h.static
        if maximize:
            grad = -grad
        if decay:
            grad = grad + param * h.weight_decay
        accumulated = addcmul(accumulated, grad, grad, 1.0)
        denom = accumulated.sqrt() + h.eps
        return addcdiv(param, grad, denom, -h.clr), accumulated


RULE = AdagradRule()


def default_adagrad_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "sum": zeros}`` for the trainable params (the default config).

    For a non-zero ``initial_accumulator_value`` use ``init_state(RULE, model, config)``
    (or ``Optimizer.init``).
    """
    return init_state(RULE, model, AdagradConfig())


def adagrad_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: AdagradConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One Adagrad step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)
