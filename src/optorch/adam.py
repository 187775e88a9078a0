r"""Adam, AdamW and fully decoupled Adam (Kingma & Ba 2014, arXiv:1412.6980;
Loshchilov & Hutter 2017, arXiv:1711.05101), with AMSGrad (Reddi et al. 2018).

With :math:`\beta_1, \beta_2` = ``betas``, :math:`\epsilon` = ``eps``, :math:`\lambda` =
``weight_decay``, :math:`s_t` the schedule multiplier and :math:`\eta_t` = ``max_lr``
:math:`\cdot s_t`:

.. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t)\ \text{(amsgrad)} \quad\text{else}\quad \hat v_t = v_t \\
    p_t &= p_{t-1} - \frac{\eta_t}{1 - \beta_1^t}\,
           \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

Weight decay by ``mode`` (:class:`AdamWDMode`, or its name as a string):

* ``ORIGINAL``: L2, :math:`g_t \leftarrow g_t + \lambda p_{t-1}` (``torch.optim.Adam``);
* ``ADAMW``: :math:`p_{t-1} \leftarrow (1 - \eta_t \lambda)\, p_{t-1}` before the update
  (``torch.optim.AdamW``);
* ``DECOUPLED``: :math:`p_{t-1} \leftarrow (1 - \lambda s_t)\, p_{t-1}`, scaled by the
  schedule but not by the learning rate (Loshchilov & Hutter's form, as in
  MosaicML's DecoupledAdamW).

>>> import torch
>>> from optorch.adam import AdamConfig, adam_step, default_adam_state
>>> params = {"w": torch.tensor([1.0, -1.0])}
>>> config = AdamConfig(max_lr=0.1, mode="ADAMW", weight_decay=0.01)
>>> state = default_adam_state(params)
>>> params, state = adam_step(params, {"w": torch.tensor([0.5, -0.5])}, state, config)
>>> params["w"]
tensor([ 0.8990, -0.8990])
>>> int(state["step"])
1
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import torch

from optorch.base import (
    BaseConfig,
    Rule,
    apply_step,
    check_betas,
    check_bool,
    check_range,
    init_state,
)
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import addcdiv, addcmul, lerp, scalar_sqrt

__all__ = [
    "AdamConfig",
    "AdamRule",
    "AdamWDMode",
    "adam",
    "adam_step",
    "default_adam_state",
]


class AdamWDMode(enum.Enum):
    """How Adam applies weight decay (see the module docstring)."""

    ORIGINAL = 0
    ADAMW = 1
    DECOUPLED = 2

    @classmethod
    def parse(cls, value: Any) -> AdamWDMode:
        """Accept a member, its name (``"ADAMW"``, ``"adamw"``, ``"AdamWDMode.ADAMW"``) or
        its value; raise ``ValueError`` listing the choices otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            name = value.strip().rsplit(".", 1)[-1].upper()
            if name in cls.__members__:
                return cls.__members__[name]
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(
            f"Invalid AdamConfig.mode: {value!r} (must be one of {list(cls.__members__)})"
        )


@dataclass
class AdamConfig(BaseConfig):
    """Hyperparameters of Adam / AdamW / decoupled Adam (``torch.optim.Adam`` names)."""

    max_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    mode: AdamWDMode | str = AdamWDMode.ORIGINAL
    steps: int = 0
    lr_schedule_value: float | None = None
    amsgrad: bool = False
    maximize: bool = False

    def __post_init__(self) -> None:
        self.mode = AdamWDMode.parse(self.mode)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        self.mode = AdamWDMode.parse(self.mode)
        check_betas(owner, self.betas)
        check_range(owner, "eps", self.eps, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        check_bool(owner, ("amsgrad", self.amsgrad), ("maximize", self.maximize))


class AdamRule(Rule):
    name = "adam"
    per_leaf_step = True  # t counts the param's own steps (torch.optim's per-param step)
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = AdamConfig
    optional_fields = ("max_exp_avg_sq",)

    def fields(self, config: AdamConfig) -> tuple[str, ...]:
        if config.amsgrad:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def static(self, config: AdamConfig) -> Any:
        decay = isinstance(config.weight_decay, torch.Tensor) or config.weight_decay != 0
        return (config.mode, config.amsgrad, config.maximize, decay)

    config_scalars = ("beta1", "beta2", "eps", "weight_decay")

    def scalars(self, config: AdamConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        beta1, beta2 = config.betas
        if config.mode is AdamWDMode.ADAMW:
            shrink = 1.0 - lr * config.weight_decay
        elif config.mode is AdamWDMode.DECOUPLED:
            shrink = 1.0 - config.weight_decay * multiplier
        else:
            shrink = 1.0
        return {
            "beta1": beta1,
            "beta2": beta2,
            "eps": config.eps,
            "weight_decay": config.weight_decay,
            "shrink": shrink,
            "step_size": lr / (1.0 - beta1**t),
            "bias_correction2_sqrt": scalar_sqrt(1.0 - beta2**t),
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        h = rest[-1]
        mode, amsgrad, maximize, decay = h.static
        exp_avg, exp_avg_sq = rest[0], rest[1]
        if maximize:
            grad = -grad
        if decay:
            if mode is AdamWDMode.ORIGINAL:
                grad = grad + param * h.weight_decay
            else:
                param = param * h.shrink
        exp_avg = lerp(exp_avg, grad, 1.0 - h.beta1)
        exp_avg_sq = addcmul(exp_avg_sq * h.beta2, grad, grad, 1.0 - h.beta2)
        if amsgrad:
            max_exp_avg_sq = rest[2].maximum(exp_avg_sq)
            denom = max_exp_avg_sq.sqrt() / h.bias_correction2_sqrt + h.eps
            new_param = addcdiv(param, exp_avg, denom, -h.step_size)
            return new_param, exp_avg, exp_avg_sq, max_exp_avg_sq
        denom = exp_avg_sq.sqrt() / h.bias_correction2_sqrt + h.eps
        return addcdiv(param, exp_avg, denom, -h.step_size), exp_avg, exp_avg_sq


RULE = AdamRule()


def default_adam_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros}`` for the trainable params."""
    return init_state(RULE, model, AdamConfig())


def adam_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: AdamConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One Adam step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)


def adam(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    exp_avg: PARAMS_GRADS_TYPE,
    exp_avg_sq: PARAMS_GRADS_TYPE,
    config: AdamConfig,
    *,
    step: int | None = None,
) -> tuple[PARAMS_GRADS_TYPE, PARAMS_GRADS_TYPE, PARAMS_GRADS_TYPE]:
    """The seed's update function: ``-> (params, exp_avg, exp_avg_sq)``.

    ``step`` is the number of steps already taken, for bias correction (defaults to
    ``config.steps``, which is read, never written). Prefer :func:`adam_step`, whose
    state carries the count.
    """
    if config.amsgrad:
        raise ValueError("adam(): amsgrad needs the running maximum; use adam_step")
    taken = config.steps if step is None else step
    state = {
        "step": torch.tensor(taken, dtype=torch.int64),
        "exp_avg": exp_avg,
        "exp_avg_sq": exp_avg_sq,
    }
    params, state = adam_step(params, grads, state, config)
    return params, state["exp_avg"], state["exp_avg_sq"]
