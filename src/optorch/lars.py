r"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888).

For each param tensor (a "layer") with :math:`\lambda` = ``weight_decay``,
:math:`\kappa` = ``trust_coefficient``, :math:`\mu` = ``momentum`` and
:math:`\eta_t` = ``max_lr`` times the schedule multiplier:

.. math::

    d_t &= g_t + \lambda\, p_{t-1} \\
    r_t &= \begin{cases}
        \kappa\, \lVert p_{t-1} \rVert / (\lVert d_t \rVert + \epsilon)
            & \lVert p_{t-1} \rVert > 0 \text{ and } \lVert d_t \rVert > 0 \\
        1 & \text{otherwise (the zero-norm guard)}
    \end{cases} \\
    b_t &= \mu\, b_{t-1} + \eta_t\, r_t\, d_t \\
    p_t &= p_{t-1} - b_t

This is Algorithm 1 of the paper (the global rate :math:`\eta_t` sits inside the
momentum buffer) with one difference, kept from the seed's definition of the rule: the
trust ratio divides by the norm of the decayed gradient :math:`\lVert d_t \rVert`, as
optax's ``lars`` does (decayed weights added before the trust ratio is taken), where
the paper writes :math:`\lVert g_t \rVert + \lambda \lVert p_{t-1} \rVert`. The two agree
when :math:`\lambda = 0` (or :math:`g_t` is a non-negative multiple of :math:`p_{t-1}`);
otherwise :math:`\lVert d_t \rVert` is the smaller (triangle inequality) and the rate
here the larger. With ``exclude_1d=True``, 1-D and 0-d params (biases, norm scales)
get neither weight decay nor adaptation (:math:`r_t = 1`), as is usual for LARS.

>>> import torch
>>> from optorch.lars import LARSConfig, lars_step
>>> from optorch.sgd import default_sgd_state
>>> params = {"w": torch.tensor([3.0, 4.0])}
>>> state = default_sgd_state(params)
>>> config = LARSConfig(max_lr=1.0, momentum=0.0, trust_coefficient=0.1, eps=0.0)
>>> params, state = lars_step(params, {"w": torch.tensor([0.0, 1.0])}, state, config)
>>> params["w"]
tensor([3.0000, 3.5000])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from optorch.base import BaseConfig, Rule, apply_step, check_bool, check_range, init_state
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import select

__all__ = ["LARSConfig", "LARSRule", "default_lars_state", "lars", "lars_step"]


@dataclass
class LARSConfig(BaseConfig):
    """Hyperparameters of LARS."""

    max_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    trust_coefficient: float = 0.001
    eps: float = 1e-8
    steps: int = 0
    lr_schedule_value: float | None = None
    exclude_1d: bool = False

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_range(owner, "momentum", self.momentum, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        check_range(owner, "trust_coefficient", self.trust_coefficient, 0.0, low_open=True)
        check_range(owner, "eps", self.eps, 0.0)
        check_bool(owner, ("exclude_1d", self.exclude_1d))


class LARSRule(Rule):
    name = "lars"
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = LARSConfig
    elementwise = False  # per-tensor norms; flattening a tensor keeps them

    def fields(self, config: LARSConfig) -> tuple[str, ...]:
        return ("momentum",)

    def leaf_key(self, param: torch.Tensor, config: LARSConfig) -> Any:
        return config.exclude_1d and param.dim() <= 1

    config_scalars = ("momentum", "weight_decay", "trust_coefficient", "eps")

    def scalars(self, config: LARSConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        return {
            "lr": lr,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "trust_coefficient": config.trust_coefficient,
            "eps": config.eps,
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        buf, h = rest
        if h.leaf:  # excluded from decay and adaptation: heavy-ball momentum
            buf = buf * h.momentum + grad * h.lr
            return param - buf, buf
        direction = grad + param * h.weight_decay
        param_norm = param.norm()
        direction_norm = direction.norm()
        ratio = param_norm * h.trust_coefficient / (direction_norm + h.eps)
        trust_ratio = select((param_norm > 0) & (direction_norm > 0), ratio, 1.0)
        buf = buf * h.momentum + direction * (trust_ratio * h.lr)
        return param - buf, buf


RULE = LARSRule()


def default_lars_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "momentum": zeros}`` for the trainable params."""
    return init_state(RULE, model, LARSConfig())


def lars_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: LARSConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One LARS step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)


def lars(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    momentum: PARAMS_GRADS_TYPE,
    config: LARSConfig,
) -> tuple[PARAMS_GRADS_TYPE, PARAMS_GRADS_TYPE]:
    """The seed's update function: ``-> (params, momentum)``."""
    state = {"step": torch.tensor(config.steps, dtype=torch.int64), "momentum": momentum}
    params, state = lars_step(params, grads, state, config)
    return params, state["momentum"]
