r"""NAdam: Adam with Nesterov momentum (Dozat 2016, "Incorporating Nesterov Momentum into
Adam", ICLR 2016 workshop, https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ).

With :math:`g_t` the gradient (negated when ``maximize``), :math:`\beta_1, \beta_2` =
``betas``, :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay``,
:math:`\psi` = ``momentum_decay`` and :math:`\eta_t` = ``max_lr`` times the schedule
multiplier:

.. math::

    g_t &\leftarrow g_t + \lambda\, p_{t-1}
        \quad\text{or, with decoupled\_weight\_decay,}\quad
        p_{t-1} \leftarrow (1 - \eta_t \lambda)\, p_{t-1} \\
    \mu_t &= \beta_1 \big(1 - \tfrac12\, 0.96^{t \psi}\big), \qquad
    \Pi_t = \textstyle\prod_{i=1}^{t} \mu_i \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    p_t &= p_{t-1} - \eta_t \Big(\frac{1 - \mu_t}{1 - \Pi_t}\, g_t
        + \frac{\mu_{t+1}}{1 - \Pi_t\, \mu_{t+1}}\, m_t\Big)
        \Big/ \Big(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon\Big)

The same conventions and numbers as ``torch.optim.NAdam`` (its momentum schedule
:math:`\mu_t` is Dozat's, with :math:`\psi = 0.004`). The state fields ``exp_avg`` and
``exp_avg_sq`` carry torch's names, and ``mu_product`` (:math:`\Pi_t`, a 0-d float64
tensor) is torch's running product, multiplied by :math:`\mu_t` with the
:math:`\beta_1` of each step, so a :math:`\beta_1` that changes between steps (a
scheduler cycling it, :func:`optorch.inject_hyperparams`) enters the product as torch's
does. torch keeps it per param; here it is one value for the optimizer's count. A param
that sat out steps (its own count lags, see ``skipped_steps``) takes the product over its
own count in closed form, :func:`nadam_mu_product` (exact while :math:`\beta_1` has
stayed fixed; a state saved without ``mu_product`` resumes from it too):

.. math::

    \log \Pi_t = t \log \beta_1
        - \sum_{k \ge 1} \frac{2^{-k}}{k}\, \frac{q^k (1 - q^{k t})}{1 - q^k},
    \qquad q = 0.96^{\psi},

the expansion :math:`\log(1 - x/2) = -\sum_k 2^{-k} x^k / k` summed over
:math:`x = q^i` as geometric series; it converges like :math:`2^{-k}`, so a fixed number
of terms (at most about 120) reaches float64 precision at any step count.

>>> import torch
>>> from optorch.nadam import NAdamConfig, default_nadam_state, nadam_step
>>> params = {"w": torch.tensor([1.0, -1.0])}
>>> config = NAdamConfig(max_lr=0.1)
>>> state = default_nadam_state(params)
>>> params, state = nadam_step(params, {"w": torch.tensor([0.5, -2.0])}, state, config)
>>> params["w"]
tensor([ 0.8944, -0.8944])
>>> from optorch.nadam import nadam_mu_product
>>> round(nadam_mu_product(1, 0.9, 0.004), 6)  # mu_1 = 0.9 * (1 - 0.96 ** 0.004 / 2)
0.450073
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import MappingProxyType
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
    is_zero,
)
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import addcmul, floats_may_be_symbolic, lerp, scalar_sqrt, where

__all__ = [
    "NAdamConfig",
    "NAdamRule",
    "default_nadam_state",
    "nadam_mu_product",
    "nadam_step",
]

#: Dozat's base for the momentum schedule, as in ``torch.optim.NAdam``.
_SCHEDULE_BASE = 0.96
#: Series terms are summed until their tail is below this, in log-space (float64 ulp).
_SERIES_TOLERANCE = 1e-18
#: Step counts beyond this are not expected; bounds the series for a traced step.
_MAX_STEPS = float(2**53)


@dataclass
class NAdamConfig(BaseConfig):
    """Hyperparameters of NAdam (``torch.optim.NAdam`` names; ``max_lr`` is the lr)."""

    max_lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum_decay: float = 4e-3
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
        if isinstance(self.momentum_decay, torch.Tensor):
            raise TypeError(
                f"{owner}.momentum_decay must be a Python number (it sizes the series for "
                f"the momentum product), got a tensor {self.momentum_decay!r}"
            )
        check_range(owner, "momentum_decay", self.momentum_decay, 0.0)
        check_bool(
            owner, *((name, getattr(self, name)) for name in ("decoupled_weight_decay", "maximize"))
        )


def _max_terms() -> int:
    """The series length for the smallest momentum_decay: every term's bound at its
    ``_MAX_STEPS`` cap."""
    k = 1
    while 0.5**k / k * _MAX_STEPS >= _SERIES_TOLERANCE:
        k += 1
    return k


_MAX_TERMS = _max_terms()


@functools.lru_cache(maxsize=64)
def _series_length(momentum_decay: float) -> int:
    r"""How many terms of the series float64 needs at any step count.

    Term ``k`` is at most ``2^-k / k * min(t, 1 / (1 - q^k))``; terms are counted until
    that bound, with ``t`` at its largest, falls below ``_SERIES_TOLERANCE``.
    """
    log_q = momentum_decay * math.log(_SCHEDULE_BASE)
    k = 1
    while 0.5**k / k * min(_MAX_STEPS, -1.0 / math.expm1(k * log_q)) >= _SERIES_TOLERANCE:
        k += 1
    return k


def nadam_mu_product(step: Any, beta1: Any, momentum_decay: float) -> Any:
    r""":math:`\Pi_t = \prod_{i=1}^{t} \beta_1 (1 - \frac12 0.96^{i \psi})` for ``t = step``.

    ``step`` is a Python int (returns a float) or a tensor (returns a float64 tensor,
    computed on its device without a host sync). This is ``torch.optim.NAdam``'s
    ``mu_product`` state after ``step`` steps; ``step = 0`` gives 1.
    """
    if isinstance(beta1, torch.Tensor) and not isinstance(step, torch.Tensor):
        step = torch.tensor(step, device=beta1.device)
    if isinstance(step, torch.Tensor):
        step = step.to(torch.float64)
    log_q = momentum_decay * math.log(_SCHEDULE_BASE)
    if log_q == 0:  # a constant schedule, mu_i = beta1 / 2 (momentum_decay 0 or denormal)
        return (beta1 * 0.5) ** step
    # the most terms any momentum_decay needs when it is a symbol that dynamo traces
    # (the loop that sizes the series cannot run on one); the extra terms are below
    # float64's resolution of the sum
    terms = _MAX_TERMS if floats_may_be_symbolic() else _series_length(float(momentum_decay))
    # term k is 2^-k / k * q^k * (q^(k t) - 1) / (1 - q^k); the ratio is taken first so
    # that a tiny momentum_decay (1 - q^k near 0) cannot overflow
    if isinstance(step, torch.Tensor):
        k = torch.arange(1, terms + 1, dtype=torch.float64, device=step.device)
        ratio = torch.expm1(k * (step * log_q)) / -torch.expm1(k * log_q)
        log_schedule = (0.5**k / k * torch.exp(k * log_q) * ratio).sum()
        log_beta1 = (
            beta1.to(torch.float64).log() if isinstance(beta1, torch.Tensor) else _log(beta1)
        )
        # where() keeps step 0 at 1 even when beta1 = 0 (0 * -inf would be nan)
        return torch.where(step > 0, torch.exp(step * log_beta1 + log_schedule), 1.0)
    if step == 0:
        return 1.0
    if beta1 == 0:
        return 0.0
    log_schedule_py = math.fsum(
        0.5**k / k * math.exp(k * log_q) * (math.expm1(k * step * log_q) / -math.expm1(k * log_q))
        for k in range(1, terms + 1)
    )
    return math.exp(step * math.log(beta1) + log_schedule_py)


def _mu(beta1: Any, t: Any, momentum_decay: float) -> Any:
    r""":math:`\mu_t = \beta_1 (1 - \frac12 0.96^{t \psi})`."""
    return beta1 * (1.0 - 0.5 * _SCHEDULE_BASE ** (t * momentum_decay))


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


class NAdamRule(Rule):
    name = "nadam"
    per_leaf_step = True  # t counts the param's own steps (torch.optim's per-param step)
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = NAdamConfig

    def fields(self, config: NAdamConfig) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def static(self, config: NAdamConfig) -> Any:
        return (config.maximize, not is_zero(config.weight_decay), config.decoupled_weight_decay)

    config_scalars = ("beta1", "beta2", "eps", "weight_decay")

    resumable_globals = ("mu_product",)
    stored_dtype_globals = ("mu_product",)
    global_bounds = MappingProxyType({"mu_product": (0.0, 1.0)})

    def global_fields(self, config: NAdamConfig) -> dict[str, float]:
        return {"mu_product": 1.0}

    def resume_global(self, config: NAdamConfig, name: str, taken: Any) -> Any:
        # a state saved before mu_product was kept: its closed form at the count (exact
        # while beta1 has stayed what it is now)
        return nadam_mu_product(taken, config.betas[0], config.momentum_decay)

    def scalars(self, config: NAdamConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        beta1, beta2 = config.betas
        return {
            "beta1": beta1,
            "beta2": beta2,
            "eps": config.eps,
            "weight_decay": config.weight_decay,
            "shrink": 1.0 - lr * config.weight_decay,
            "lr": lr,
            "t": t,
            "mu": _mu(beta1, t, config.momentum_decay),
            "mu_next": _mu(beta1, t + 1, config.momentum_decay),
            "bias_correction2_sqrt": scalar_sqrt(1.0 - beta2**t),
        }

    def advance(
        self, config: NAdamConfig, t: Any, lr: Any, multiplier: Any, old: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        # torch's running product, with beta1 as it is at each step (a scheduler may
        # cycle it)
        mu_product = old["mu_product"] * _mu(config.betas[0], t, config.momentum_decay)
        return {"mu_product": mu_product}, {"mu_product": mu_product}

    def own_scalars(
        self, config: NAdamConfig, values: dict[str, Any], extra: dict[str, Any], offset: Any
    ) -> dict[str, Any]:
        values = dict(values)
        lr, t, mu, mu_next = (values.pop(name) for name in ("lr", "t", "mu", "mu_next"))
        mu_product = extra["mu_product"]
        if not isinstance(offset, int) or offset != 0:
            # a param that sat out steps: the product over its own steps, in closed form
            # from its count (torch's running product while beta1 has been fixed)
            own = nadam_mu_product(t, config.betas[0], config.momentum_decay)
            mu_product = own if isinstance(offset, int) else where(offset == 0, mu_product, own)
        values["grad_step"] = lr * (1.0 - mu) / (1.0 - mu_product)
        values["exp_avg_step"] = lr * mu_next / (1.0 - mu_product * mu_next)
        return values

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
        denom = exp_avg_sq.sqrt() / h.bias_correction2_sqrt + h.eps
        nesterov_direction = grad * h.grad_step + exp_avg * h.exp_avg_step
        return param - nesterov_direction / denom, exp_avg, exp_avg_sq


RULE = NAdamRule()


def default_nadam_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "exp_avg": zeros, "exp_avg_sq": zeros, "mu_product": 1}`` for the
    trainable params."""
    return init_state(RULE, model, NAdamConfig())


def nadam_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: NAdamConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One NAdam step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)
