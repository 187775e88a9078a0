r"""Adafactor: Adam-like steps with factored second moments, a relative step size and
update clipping (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
Memory Cost", arXiv:1804.04235); the variant of ``torch.optim.Adafactor``.

With :math:`G_t` the gradient (negated when ``maximize``), :math:`\gamma_t` = ``max_lr``
times the schedule multiplier, :math:`\tau` = ``beta2_decay``,
:math:`(\epsilon_1, \epsilon_2)` = ``eps`` (:math:`\epsilon_1` = ``None`` means the
machine epsilon of the param's dtype), :math:`d` = ``d`` (the clipping threshold),
:math:`\lambda` = ``weight_decay`` and :math:`\operatorname{RMS}(x) = \lVert x\rVert_2 /
\sqrt{\operatorname{numel}(x)}`:

.. math::

    \hat\beta_{2,t} &= 1 - t^{\tau}, \qquad
    \rho_t = \min\left(\gamma_t, 1/\sqrt{t}\right), \qquad
    \alpha_t = \max\left(\epsilon_2, \operatorname{RMS}(p_{t-1})\right) \rho_t \\
    p'_{t-1} &= (1 - \gamma_t \lambda)\, p_{t-1} \\
    R_t &= \hat\beta_{2,t} R_{t-1} + (1 - \hat\beta_{2,t})\,
        \operatorname{mean}_{\text{cols}}(G_t^2), \qquad
    C_t = \hat\beta_{2,t} C_{t-1} + (1 - \hat\beta_{2,t})\,
        \operatorname{mean}_{\text{rows}}(G_t^2) \\
    \hat V_t &= \frac{R_t\, C_t}{\max\left(\operatorname{mean}_{\text{rows}}(R_t),
        \epsilon_1\right)} \quad\text{(params with 2 or more dims)} \\
    \hat V_t &= \hat\beta_{2,t} \hat V_{t-1} + (1 - \hat\beta_{2,t})\, G_t^2
        \quad\text{(0-d and 1-d params)} \\
    U_t &= \frac{G_t}{\max\left(\sqrt{\hat V_t}, \epsilon_1\right)}, \qquad
    \hat U_t = \frac{U_t}{\max\left(1, \operatorname{RMS}(U_t) / d\right)} \\
    p_t &= p'_{t-1} - \alpha_t \hat U_t

For a param of 2 or more dims the second moment is kept factored over its last two dims
(rows and columns; leading dims are a batch of matrices): ``row_var`` (:math:`R`, shape
``[..., rows, 1]``) and ``col_var`` (:math:`C`, shape ``[..., 1, cols]``), each a mean of
squared gradients; 0-d and 1-d params keep the full ``variance`` (:math:`\hat V`, the
param's shape). These are torch's state keys. Every leaf carries all three fields, the
unused ones as empty placeholders of shape ``(0,)``, so that the state is one fixed set
of trees (:meth:`AdafactorRule.state_shape` gives each field's shape per param).

Deviations from the paper are torch's: ``max_lr`` caps the relative step size
:math:`\rho_t` (the paper uses a constant 0.01, the default here) and scales a decoupled
weight decay; :math:`\epsilon_1` guards the variance estimate and the update's
denominator rather than being added to :math:`G_t^2`.

An extra, off by default: ``beta1`` (:math:`\beta_1`) keeps a first moment of the scaled,
clipped update, the momentum of the paper's section 7 experiments (state field
``exp_avg``, the param's shape; torch has no such option):

.. math::

    m_t = \beta_1 m_{t-1} + (1 - \beta_1)\, \alpha_t \hat U_t, \qquad p_t = p'_{t-1} - m_t

>>> import torch
>>> from optorch.adafactor import AdafactorConfig, adafactor_step, default_adafactor_state
>>> params = {"w": torch.full((2, 3), 2.0), "b": torch.zeros(3)}
>>> state = default_adafactor_state(params)
>>> state["row_var"]["w"].shape, state["col_var"]["w"].shape, state["variance"]["b"].shape
(torch.Size([2, 1]), torch.Size([1, 3]), torch.Size([3]))
>>> grads = {"w": torch.ones(2, 3), "b": torch.ones(3)}
>>> params, state = adafactor_step(params, grads, state, AdafactorConfig())
>>> params["w"]  # alpha = RMS(w) * min(lr, 1) = 2 * 0.01; the clipped update is 1
tensor([[1.9800, 1.9800, 1.9800],
        [1.9800, 1.9800, 1.9800]])
>>> params["b"]  # RMS(b) = 0, so alpha = eps2 * 0.01
tensor([-1.0000e-05, -1.0000e-05, -1.0000e-05])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from optorch.base import BaseConfig, Rule, apply_step, check_bool, check_range, init_state, is_zero
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import (
    TensorList,
    lerp,
    per_tensor,
    records_grad,
    scalar_sqrt,
    where,
    zeros_laid_out_like,
)

__all__ = ["AdafactorConfig", "AdafactorRule", "adafactor_step", "default_adafactor_state"]

#: The shape of a state field a param does not use (factored vs full second moment).
PLACEHOLDER_SHAPE = torch.Size([0])


@dataclass
class AdafactorConfig(BaseConfig):
    """Hyperparameters of Adafactor (``torch.optim.Adafactor`` names; ``max_lr`` is lr).

    ``eps`` is ``(eps1, eps2)``; ``eps1=None`` uses the param dtype's machine epsilon.
    ``beta1`` (not in torch) turns on momentum of the update; ``None`` keeps none.
    """

    max_lr: float = 1e-2
    beta2_decay: float = -0.8
    eps: tuple[float | None, float] = (None, 1e-3)
    d: float = 1.0
    weight_decay: float = 0.0
    steps: int = 0
    lr_schedule_value: float | None = None
    maximize: bool = False
    beta1: float | None = None

    def __post_init__(self) -> None:
        # YAML/Hydra give sequences as lists
        if isinstance(self.eps, Sequence) and not isinstance(self.eps, (str, tuple)):
            self.eps = tuple(self.eps)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_range(owner, "beta2_decay", self.beta2_decay, high=0.0)
        if not isinstance(self.eps, tuple) or len(self.eps) != 2:
            raise ValueError(
                f"Invalid {owner}.eps: {self.eps!r} (must be a tuple (eps1 or None, eps2))"
            )
        if self.eps[0] is not None:
            check_range(owner, "eps[0]", self.eps[0], 0.0)
        check_range(owner, "eps[1]", self.eps[1], 0.0)
        check_range(owner, "d", self.d, 1.0)
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        if self.beta1 is not None:
            check_range(owner, "beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_bool(owner, ("maximize", self.maximize))


#: The leaf key of a param of 0 or 1 dims: (factored, column mean by row blocks).
UNFACTORED = (False, False)

#: Rows per block of a compiled column mean (see :func:`_column_mean`).
ROW_BLOCK = 32


def _compiled_plain(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a plain tensor being traced by ``torch.compile``: not eager,
    not a DTensor (whose sharding the helpers below leave alone)."""
    return torch.compiler.is_compiling() and type(tensor) is torch.Tensor


def _mean(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean over ``dim``, kept as a dim of size 1, as a sum divided by the size: on a
    DTensor sharded along ``dim`` the sum stays a partial result that one all-reduce
    completes, where ``mean`` gathers the whole tensor when the shards are uneven."""
    return tensor.sum(dim=dim, keepdim=True) / tensor.shape[dim]


def _column_mean(tensor: torch.Tensor, blocked: bool) -> torch.Tensor:
    """:func:`_mean` over dim -2 (the rows); compiled and ``blocked`` (the rows make
    whole blocks of ``ROW_BLOCK``, two or more), as sums over blocks and then over the
    blocks.

    Inductor's C++ sums over dim -2 column by column, striding over every row of the
    matrix (measured at about half the speed of a row sum); within a block of rows the
    strided reads stay in cache (58 ms per step on the GPT-like benchmark set, 71 ms
    with the plain sum). Eager tensors and DTensors (whose row shards need not hold
    whole blocks) take the plain sum.
    """
    if not blocked or not _compiled_plain(tensor):
        return _mean(tensor, -2)
    rows = tensor.shape[-2]
    blocks = tensor.reshape(*tensor.shape[:-2], rows // ROW_BLOCK, ROW_BLOCK, tensor.shape[-1])
    return blocks.sum(-2).sum(-2, keepdim=True) / rows


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 at least: squares of float16 overflow."""
    return torch.promote_types(dtype, torch.float32)


def _root_mean(sum_sq: torch.Tensor, numel: int) -> torch.Tensor:
    return (sum_sq / numel).sqrt()


def _rms(tensor: Any) -> Any:
    """The root mean square of every element, computed in float32 at least (squares of
    float16 overflow) and summed along the last dim first: inductor's C++ sums a whole
    tensor with a cascade of partial sums that is slower than row sums (1-4 ms of a
    58 ms step on the GPT-like benchmark set). Per tensor for a TensorList."""
    if isinstance(tensor, TensorList):
        return tensor.rms()
    squares = tensor.to(_wide(tensor.dtype)).square()
    return _root_mean(
        squares.sum(-1).sum() if squares.dim() >= 2 else squares.sum(), tensor.numel()
    )


def _stored(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``; compiled, viewed through ``as_strided`` onto itself, which inductor
    lowers onto a buffer of its own, so that the value is computed once.

    Inductor otherwise inlines a small result (a row or column factor, the step size)
    into every loop that reads it, and a loop over the whole matrix then recomputes it
    for each vector of 16 elements: square roots, divisions and a chain of scalar ops
    that cost more than the loop's memory traffic (89 ms per step on the GPT-like
    benchmark set instead of 58). A no-op for eager tensors and DTensors.
    """
    if _compiled_plain(tensor):
        return tensor.as_strided(tensor.shape, tensor.stride())
    return tensor


def _param_squares(param: torch.Tensor, grad_sq: torch.Tensor) -> torch.Tensor:
    """The sum of the param's squares, summed along its rows in the loop that reads the
    gradient's rows (compiled matrices).

    The sum adds ``0 * grad_sq`` so that inductor puts it into that loop: one pass
    reading two tensors instead of a pass of its own reading one, which streams at
    about half the speed on CPUs (GPT-like benchmark set: 55 -> 50 ms a step). The
    value is the plain sum unless the gradient holds an inf or a NaN, and then the whole
    step is NaN whatever the sum: a non-finite gradient element reaches every row's
    scale through the mean of the row moments.
    """
    wide = _wide(param.dtype)
    squares = param.to(wide).square() + 0.0 * grad_sq.to(wide)
    return squares.sum(-1).sum()


def _direction_sum_sq(
    grad: torch.Tensor,
    row_root: torch.Tensor,
    col_root: torch.Tensor,
    weighted: torch.Tensor,
    ratio: torch.Tensor,
    eps1: Any,
) -> torch.Tensor:
    """The sum of squares of a matrix's direction ``grad / max(row_root col_root, eps1)``
    (compiled).

    Where no element is clamped to ``eps1``, it is ``sum_i weighted_i / ratio_i`` with
    ``weighted_i = sum_j grad_ij^2 / C_j`` (``row_root^2 = ratio``, ``col_root^2 = C``),
    which the row pass already summed: no pass over the gradient of its own. Otherwise
    (rows or columns of (near) zero second moment, such as an embedding's unused rows
    early on) the direction is squared and summed element by element, under
    ``torch.cond`` so that only the branch taken runs.
    """
    clamped = row_root.amin() * col_root.amin() < eps1
    operands = (
        grad,
        row_root,
        col_root,
        weighted,
        ratio,
        torch.as_tensor(eps1, dtype=torch.float64),
    )
    return torch.cond(clamped, _clamped_sum_sq, _unclamped_sum_sq, operands)


def _clamped_sum_sq(*operands: torch.Tensor) -> torch.Tensor:
    """:func:`_direction_sum_sq` element by element (its operands, in order)."""
    grad, row_root, col_root, _, _, eps1 = operands
    direction = grad.to(_wide(grad.dtype)) / (row_root * col_root).clamp(min=eps1)
    return direction.square().sum(-1).sum()


def _unclamped_sum_sq(*operands: torch.Tensor) -> torch.Tensor:
    """:func:`_direction_sum_sq` from the row sums (its operands, in order)."""
    weighted, ratio = operands[3:5]
    return (weighted / ratio).sum()


class AdafactorRule(Rule):
    name = "adafactor"
    per_leaf_step = True  # t counts the param's own steps (torch.optim's per-param step)
    config_type = AdafactorConfig
    elementwise = False
    flattenable = False  # the factored moments need the last two dims
    foreach_ok = False  # row/column means per tensor have no foreach kernel (see below)
    optional_fields = ("exp_avg",)
    config_scalars = ("eps1", "eps2", "d", "beta1")

    def foreach_leaf(self, leaf: Any) -> bool:
        # vectors (and scalars) keep a full second moment: elementwise math and two RMS
        # per tensor, one foreach program for all of them (GPT-like benchmark set: its
        # 66 vectors 4.5 ms a step as compiled calls, one per tensor; 2.2 ms as one
        # program)
        return leaf == UNFACTORED

    def fields(self, config: AdafactorConfig) -> tuple[str, ...]:
        moments = ("row_var", "col_var", "variance")
        return moments if config.beta1 is None else (*moments, "exp_avg")

    def state_shape(self, name: str, param: torch.Tensor, config: AdafactorConfig) -> torch.Size:
        factored = param.dim() >= 2
        if name == "row_var":
            return torch.Size((*param.shape[:-1], 1)) if factored else PLACEHOLDER_SHAPE
        if name == "col_var":
            if not factored:
                return PLACEHOLDER_SHAPE
            return torch.Size((*param.shape[:-2], 1, param.shape[-1]))
        if name == "variance":
            return PLACEHOLDER_SHAPE if factored else param.shape
        return param.shape

    def init_field(self, name: str, param: torch.Tensor, config: AdafactorConfig) -> torch.Tensor:
        # sharded like a DTensor param where the shapes agree (FSDP2), never along the
        # dim a factor is a mean over (a one-row matrix's column factor has its shape)
        reduced = {"row_var": (-1,), "col_var": (-2,)}.get(name, ()) if param.dim() >= 2 else ()
        return zeros_laid_out_like(param, self.state_shape(name, param, config), reduced)

    def leaf_key(self, param: torch.Tensor, config: AdafactorConfig) -> Any:
        # (factored, column mean by row blocks): each pair is a compiled kernel of its
        # own, so that no kernel branches on (and dynamo never guards) the row count;
        # None for an empty param, which the step leaves as it is
        if param.numel() == 0:
            return None
        if param.dim() < 2:
            return UNFACTORED
        rows = param.shape[-2]
        return (True, rows % ROW_BLOCK == 0 and rows >= 2 * ROW_BLOCK)

    def static(self, config: AdafactorConfig) -> Any:
        return (
            config.maximize,
            not is_zero(config.weight_decay),
            config.eps[0] is None,
            config.beta1 is not None,
        )

    def scalars(self, config: AdafactorConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        eps1, eps2 = config.eps
        inv_sqrt_t = 1.0 / scalar_sqrt(t)
        return {
            "new_weight": t**config.beta2_decay,  # 1 - beta2_t
            "rho": where(lr < inv_sqrt_t, lr, inv_sqrt_t),
            "shrink": 1.0 - lr * config.weight_decay,
            # unused when eps1 is None: the update reads the param dtype's epsilon
            "eps1": 0.0 if eps1 is None else eps1,
            "eps2": eps2,
            "d": config.d,
            "beta1": 0.0 if config.beta1 is None else config.beta1,
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        h = rest[-1]
        if h.leaf is None:  # an empty param: the mean over an empty dimension is NaN
            return (param, *rest[:-1])
        row_var, col_var, variance = rest[:3]
        maximize, decay, machine_eps1, momentum = h.static
        factored, blocked = h.leaf
        dtype = param.dtype
        eps1 = torch.finfo(dtype).eps if machine_eps1 else h.eps1
        if maximize:
            grad = -grad
        # in the compiled engine's CPU kernels, a matrix takes its sums of squares in two
        # passes over the gradient instead of three, one of them shared with the param's
        # (see _param_squares and _direction_sum_sq); elsewhere the plain formulas: a
        # user's own torch.compile fails in dynamo on the cond, and on CUDA reading the
        # cond's predicate on the host would synchronise the device for every matrix
        fused = (
            factored
            and h.kernel
            and param.device.type == "cpu"  # a cond's predicate is read on the host
            and _compiled_plain(param)
            and not records_grad(param, grad, *rest[:2])
        )
        grad_sq = grad * grad
        # the relative step size reads the param before weight decay
        if fused:
            param_rms = _root_mean(_param_squares(param, grad_sq), param.numel())
        else:
            param_rms = _rms(param)
        if decay:
            param = param * h.shrink
        sum_sq = None
        if factored:
            col_var = _stored(lerp(col_var, _column_mean(grad_sq, blocked), h.new_weight))
            if fused:  # sum_j g_ij^2 / C_j, in the loop of the row means
                inverse = _stored(col_var.to(_wide(dtype)).reciprocal())
                weighted = _stored((grad_sq.to(inverse.dtype) * inverse).sum(-1, keepdim=True))
            row_var = _stored(lerp(row_var, _mean(grad_sq, -1), h.new_weight))
            row_scale = _mean(row_var, -2).clamp_min(eps1)
            ratio = _stored(row_var / row_scale)
            # sqrt(V) = sqrt(R / row_scale) sqrt(C): one root per row and one per column
            # (compiled, each stored once), not one per element
            row_root, col_root = _stored(ratio.sqrt()), _stored(col_var.sqrt())
            root = row_root * col_root
            if fused:
                sum_sq = _direction_sum_sq(grad, row_root, col_root, weighted, ratio, eps1)
        else:
            variance = lerp(variance, grad_sq, h.new_weight)
            root = variance.sqrt()
        direction = grad / root.clamp(min=eps1)
        rms = _rms(direction) if sum_sq is None else _root_mean(sum_sq, param.numel())

        def scale(param_rms: torch.Tensor, rms: torch.Tensor) -> torch.Tensor:
            # alpha (the relative step size) over the clipping factor
            alpha = param_rms.clamp(min=h.eps2) * h.rho
            return (alpha / (rms / h.d).clamp(min=1.0)).to(dtype)

        step = direction * _stored(per_tensor(scale, param_rms, rms))
        if momentum:
            exp_avg = lerp(rest[3], step, 1.0 - h.beta1)
            return param - exp_avg, row_var, col_var, variance, exp_avg
        return param - step, row_var, col_var, variance


RULE = AdafactorRule()


def default_adafactor_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "row_var", "col_var", "variance"}`` for the trainable params."""
    return init_state(RULE, model, AdafactorConfig())


def adafactor_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: AdafactorConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One Adafactor step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)
