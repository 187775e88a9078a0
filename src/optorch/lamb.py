r"""LAMB: layer-wise adaptive moments (You et al. 2019, "Large Batch Optimization for
Deep Learning: Training BERT in 76 minutes", arXiv:1904.00962).

For each param tensor (a "layer") with :math:`g_t` the gradient (negated when
``maximize``), :math:`\beta_1, \beta_2` = ``betas``, :math:`\epsilon` = ``eps``,
:math:`\lambda` = ``weight_decay`` and :math:`\eta_t` = ``max_lr`` times the schedule
multiplier:

.. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    \hat m_t &= \frac{m_t}{1 - \beta_1^t}, \qquad \hat v_t = \frac{v_t}{1 - \beta_2^t} \\
    u_t &= \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon} + \lambda\, p_{t-1} \\
    r_t &= \begin{cases}
        \phi(\lVert p_{t-1} \rVert) / \lVert u_t \rVert
            & \lVert p_{t-1} \rVert > 0 \text{ and } \lVert u_t \rVert > 0 \\
        1 & \text{otherwise (the zero-norm guard)}
    \end{cases} \\
    p_t &= p_{t-1} - \eta_t\, r_t\, u_t

This is Algorithm 2 of the paper (v3 and later) with Adam's bias correction; norms are
taken over each whole tensor. The first term of :math:`u_t` is computed as
:math:`\frac{\sqrt{1 - \beta_2^t}}{1 - \beta_1^t} \cdot
\frac{m_t}{\sqrt{v_t} + \epsilon \sqrt{1 - \beta_2^t}}`, the same value (Kingma &
Ba's ordering) with one division per element instead of three. :math:`\phi` is the
identity, or :math:`\phi(z) = \min(z, c)` with :math:`c` = ``clamp_value`` when that
is set (the bound on the weight norm that the paper allows and ``torch-optimizer``'s
Lamb applies).
Away from the guard each tensor moves by :math:`\eta_t \phi(\lVert p \rVert)` in L2
norm, whatever the scale of its gradient. The moments are the state fields ``exp_avg``
and ``exp_avg_sq``.

>>> import torch
>>> from optorch.lamb import LambConfig, default_lamb_state, lamb_step
>>> params = {"w": torch.tensor([3.0, 4.0])}
>>> config = LambConfig(max_lr=0.1)
>>> state = default_lamb_state(params)
>>> params, state = lamb_step(params, {"w": torch.tensor([1.0, 1.0])}, state, config)
>>> params["w"]
tensor([2.6464, 3.6464])
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
from optorch.engine import addcmul, lerp, norm_sharing_pass, scalar_sqrt, select

__all__ = ["LambConfig", "LambRule", "default_lamb_state", "lamb_step"]


@dataclass
class LambConfig(BaseConfig):
    """Hyperparameters of LAMB (``torch-optimizer`` names; ``max_lr`` is the lr)."""

    max_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    steps: int = 0
    lr_schedule_value: float | None = None
    clamp_value: float | None = None
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_betas(owner, self.betas)
        check_range(owner, "eps", self.eps, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        if self.clamp_value is not None:
            check_range(owner, "clamp_value", self.clamp_value, 0.0, low_open=True)
        check_bool(owner, ("maximize", self.maximize))


class LambRule(Rule):
    name = "lamb"
    per_leaf_step = True  # t counts the param's own steps (torch.optim's per-param step)
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = LambConfig
    elementwise = False  # per-tensor norms; flattening a tensor keeps them

    def fields(self, config: LambConfig) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def static(self, config: LambConfig) -> Any:
        return (config.maximize, not is_zero(config.weight_decay), config.clamp_value is not None)

    config_scalars = ("beta1", "beta2", "eps", "weight_decay", "clamp_value")

    def scalars(self, config: LambConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        beta1, beta2 = config.betas
        correction2 = scalar_sqrt(1.0 - beta2**t)
        return {
            "lr": lr,
            "beta1": beta1,
            "beta2": beta2,
            "eps": config.eps,
            "weight_decay": config.weight_decay,
            "clamp_value": config.clamp_value if config.clamp_value is not None else 0.0,
            # the bias corrections as two scalars (see the module docs): one division
            # per element instead of three
            "direction_scale": correction2 / (1.0 - beta1**t),
            "eps_hat": config.eps * correction2,
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        exp_avg, exp_avg_sq, h = rest
        maximize, decay, clamp = h.static
        if maximize:
            grad = -grad
        exp_avg = lerp(exp_avg, grad, 1.0 - h.beta1)
        exp_avg_sq = addcmul(exp_avg_sq * h.beta2, grad, grad, 1.0 - h.beta2)
        direction = exp_avg / (exp_avg_sq.sqrt() + h.eps_hat) * h.direction_scale
        if decay:
            direction = direction + param * h.weight_decay
        # a NaN in the gradient makes the direction's norm NaN, and the trust ratio 1
        # whatever the param's norm (see norm_sharing_pass)
        param_norm = norm_sharing_pass(param, grad)
        direction_norm = direction.norm()
        weight_norm = param_norm.clamp(max=h.clamp_value) if clamp else param_norm
        # a safe denominator keeps the unused branch finite, so pure-mode gradients too
        safe_direction_norm = select(direction_norm > 0, direction_norm, 1.0)
        trust_ratio = select(
            (param_norm > 0) & (direction_norm > 0), weight_norm / safe_direction_norm, 1.0
        )
        return param - direction * (trust_ratio * h.lr), exp_avg, exp_avg_sq


RULE = LambRule()


def default_lamb_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros}`` for the trainable params."""
    return init_state(RULE, model, LambConfig())


def lamb_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: LambConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One LAMB step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)
