r"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay.

With :math:`g_t` the gradient (negated when ``maximize``), :math:`\lambda` =
``weight_decay``, :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening`` and
:math:`\eta_t` = ``max_lr`` times the schedule multiplier:

.. math::

    g_t &\leftarrow g_t + \lambda\, p_{t-1} \\
    b_t &= \begin{cases} g_t & t = 1 \\ \mu\, b_{t-1} + (1 - \tau)\, g_t & t > 1\end{cases} \\
    d_t &= g_t + \mu\, b_t \ \text{(nesterov)} \quad\text{or}\quad d_t = b_t \\
    p_t &= p_{t-1} - \eta_t\, d_t

(Sutskever et al. 2013; the same conventions as ``torch.optim.SGD``.) With
``momentum=0`` no buffer is kept and :math:`d_t = g_t`.

:math:`t` is the buffer's own count, as torch.optim starts each param's buffer at its
first gradient: with ``dampening`` (the only case where the first step differs), a param
that sat out steps (a ``None`` gradient) keeps ``state["skipped_steps"]``, and a buffer
created after the first step (momentum turned on mid-run, a ``TorchOptimizer`` group's
``momentum`` set from 0, a config replaced by one with momentum) starts its count
there. A momentum injected as a tensor (:func:`optorch.wrappers.inject_hyperparams`)
steps on :math:`g_t` while it is 0, as torch's; but its buffer exists through those
steps (it holds the last gradient), so when the tensor then rises the buffer continues
where torch would start a new one: to turn momentum on mid-run as torch does, replace
the config (``opt.replace(momentum=0.9)``), which creates the buffer then.

Rounding: with ``dampening=0`` and float32/float64 buffers, the buffer update
:math:`g_t + \mu\, b_{t-1}` is one ``torch.add(grad, buf, alpha=momentum)`` (rounded
once, one pass over the buffer), where ``torch.optim.SGD`` runs
``buf.mul_(momentum).add_(grad)`` (rounded twice, two passes). Results agree with
torch.optim to float rounding, not bit for bit; on CPU every ``impl`` of optorch gives
the same bits as the ``reference`` one.

>>> import torch
>>> from optorch.sgd import SGDConfig, sgd_step, default_sgd_state
>>> params = {"w": torch.tensor([1.0, 2.0])}
>>> config = SGDConfig(momentum=0.0, max_lr=0.5)
>>> state = default_sgd_state(params)
>>> params, state = sgd_step(params, {"w": torch.tensor([1.0, 1.0])}, state, config)
>>> params["w"]
tensor([0.5000, 1.5000])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from optorch.base import (
    BaseConfig,
    Rule,
    apply_step,
    check_bool,
    check_range,
    concrete,
    init_state,
    is_zero,
)
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import add_scaled, add_scaled_exact, where

__all__ = ["SGDConfig", "SGDRule", "default_sgd_state", "sgd", "sgd_step"]


@dataclass
class SGDConfig(BaseConfig):
    """Hyperparameters of SGD (``torch.optim.SGD`` names; ``max_lr`` is the lr)."""

    momentum: float = 0.9
    weight_decay: float = 0.0
    max_lr: float = 0.1
    steps: int = 0
    lr_schedule_value: float | None = None
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_range(owner, "momentum", self.momentum, 0.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        check_range(owner, "dampening", self.dampening, 0.0, 1.0)
        check_bool(owner, ("nesterov", self.nesterov), ("maximize", self.maximize))
        # tensors too, where their value can be read without a device sync (as torch does)
        momentum, dampening = concrete(self.momentum), concrete(self.dampening)
        if self.nesterov and (momentum == 0 or (dampening is not None and dampening != 0)):
            raise ValueError(
                f"Invalid {owner}: nesterov=True needs momentum > 0 and dampening == 0 "
                f"(momentum={self.momentum!r}, dampening={self.dampening!r})"
            )


class SGDRule(Rule):
    name = "sgd"
    complex_ok = True  # as torch.optim: real and imaginary parts as two coordinates
    config_type = SGDConfig
    optional_fields = ("momentum",)
    # the first step of a buffer is undamped: torch.optim.SGD starts each param's buffer
    # at its first gradient (one that sat out steps, or a momentum turned on mid-run)
    per_leaf_step = True
    new_fields_restart_count = True

    def tracks_own_count(self, config: SGDConfig) -> bool:
        # only a damped buffer's first step differs from the others
        return not is_zero(config.momentum) and not is_zero(config.dampening)

    def fields(self, config: SGDConfig) -> tuple[str, ...]:
        return () if is_zero(config.momentum) else ("momentum",)

    def static(self, config: SGDConfig) -> Any:
        return (
            not is_zero(config.momentum),
            config.nesterov,
            config.maximize,
            not is_zero(config.weight_decay),
            is_zero(config.dampening),
        )

    config_scalars = ("momentum", "weight_decay")

    def scalars(self, config: SGDConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        first = t == 1
        momentum = config.momentum
        # torch.optim.SGD starts the buffer at the first gradient, undamped; and with
        # momentum 0 (here a tensor, as inject_hyperparams passes it) it steps on the
        # gradient itself, so the buffer then takes it whole
        plain = first | (momentum == 0) if isinstance(momentum, torch.Tensor) else first
        return {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": config.weight_decay,
            # read by the damped update only: undamped, a zero buffer plus the gradient
            # is the gradient, so there is no first-step case, and a buffer carried in
            # (the seed's sgd() and states, which have no count) keeps its momentum, as
            # torch.optim keeps a loaded buffer
            "keep": where(first, 0.0, momentum),
            "grad_scale": where(plain, 1.0, 1.0 - config.dampening),
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        h = rest[-1]
        use_momentum, nesterov, maximize, decay, undamped = h.static
        if maximize:
            grad = -grad
        if decay:
            grad = add_scaled(grad, param, h.weight_decay)
        if not use_momentum:
            return (add_scaled(param, grad, -h.lr),)
        if undamped:
            # grad + momentum * buf in one pass, written into the dead buffer by the
            # foreach engine (torch.optim takes two: mul_ then add_; see module docs).
            # The momentum is the config's own value, a literal of the compiled kernels
            # (a per-step value there is a tensor, which a bfloat16 kernel rounds to
            # bfloat16 first: 0.8984375 for 0.9)
            buf = add_scaled_exact(grad, rest[0], h.momentum)
        else:
            buf = add_scaled(rest[0] * h.keep, grad, h.grad_scale)
        direction = add_scaled(grad, buf, h.momentum) if nesterov else buf
        return add_scaled(param, direction, -h.lr), buf


RULE = SGDRule()


def default_sgd_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "momentum": zeros like each trainable param}``."""
    return init_state(RULE, model, SGDConfig())


def sgd_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: SGDConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One SGD step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)


def sgd(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    momentum: PARAMS_GRADS_TYPE,
    config: SGDConfig,
    *,
    step: int | None = None,
) -> tuple[PARAMS_GRADS_TYPE, PARAMS_GRADS_TYPE]:
    """The seed's update function: ``-> (params, momentum)``.

    ``step`` is the number of steps already taken (defaults to ``config.steps``, which is
    read, never written); it matters only with ``dampening``, whose first step starts the
    buffer at the gradient, undamped (pass the count there: at 0, every call is a first
    step). Without dampening the buffer carries over from call to call, as the seed's did.
    """
    taken = config.steps if step is None else step
    state = {"step": torch.tensor(taken, dtype=torch.int64), "momentum": momentum}
    if is_zero(config.momentum):
        state.pop("momentum")
    params, state = sgd_step(params, grads, state, config)
    return params, state.get("momentum", momentum)
