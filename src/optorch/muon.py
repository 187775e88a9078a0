r"""Muon: momentum orthogonalised by Newton-Schulz, for 2-D hidden weights.

Keller Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"
(https://kellerjordan.github.io/posts/muon/); the AdamW-matching learning-rate scale is
from Liu et al. 2025, "Muon is Scalable for LLM Training" (arXiv:2502.16982). The
conventions are those of ``torch.optim.Muon``.

For a matrix param :math:`W \in \mathbb{R}^{A \times B}` with gradient :math:`G_t`,
:math:`\mu` = ``momentum``, :math:`\lambda` = ``weight_decay``, :math:`\eta_t` =
``max_lr`` times the schedule multiplier:

.. math::

    M_t &= \mu\, M_{t-1} + (1 - \mu)\, G_t \\
    D_t &= \begin{cases} (1 - \mu)\, G_t + \mu\, M_t & \text{nesterov} \\
                          M_t & \text{otherwise} \end{cases} \\
    O_t &= \mathrm{NS}_k^{(a,b,c)}(D_t) \\
    W_t &= (1 - \eta_t \lambda)\, W_{t-1} - \rho(A, B)\, \eta_t\, O_t

where :math:`\mathrm{NS}_k^{(a,b,c)}` (``ns_steps`` = :math:`k`, ``ns_coefficients`` =
:math:`(a, b, c)`) approximates the orthogonal polar factor :math:`U V^\top` of
:math:`D = U S V^\top`: with :math:`X_0 = D / \max(\lVert D \rVert_F, \epsilon)`
(transposed first when :math:`A > B`, so that :math:`X X^\top` is the smaller Gram
matrix),

.. math::

    X_{j+1} = a X_j + \left(b\, X_j X_j^\top + c\, (X_j X_j^\top)^2\right) X_j ,

a quintic iteration tuned to push every singular value into roughly
:math:`[0.7, 1.2]` in five steps. The iteration runs in ``ns_dtype`` (``bfloat16`` by
default, as torch does; ``None`` keeps the param's dtype). The scale
:math:`\rho(A, B)` is set by ``adjust_lr_fn``:

* ``"original"`` (or ``None``): :math:`\rho = \sqrt{\max(1, A / B)}` (Keller Jordan);
* ``"match_rms_adamw"``: :math:`\rho = 0.2 \sqrt{\max(A, B)}`, which gives the update
  the RMS of a typical AdamW update, so AdamW's lr and weight decay carry over
  (Moonshot AI).

Muon is meant for the 2-D weights of hidden layers only; a param of any other
dimension raises ``ValueError`` naming it. Embeddings, the output layer, biases and
norm gains go to AdamW, as the authors recommend; :func:`optorch.wrappers.partition`
makes the pair one optimizer:

>>> import torch, optorch
>>> from optorch import wrappers
>>> def group(path, param):
...     hidden_matrix = param.ndim == 2 and not path.startswith(("embed", "head"))
...     return "muon" if hidden_matrix else "adamw"
>>> optimizer = wrappers.partition(group, {
...     "muon": optorch.get_optimizer("muon", max_lr=0.02),
...     "adamw": optorch.get_optimizer("adamw", max_lr=3e-4, weight_decay=0.01)})
>>> params = {"embed": torch.randn(10, 4), "hidden": torch.randn(4, 4),
...           "hidden_bias": torch.zeros(4), "head": torch.randn(2, 4)}
>>> state = optimizer.init(params)
>>> sorted(k for k, v in state["groups"]["muon"]["momentum"].items() if v is not None)
['hidden']

One step of Muon alone:

>>> from optorch.muon import MuonConfig, default_muon_state, muon_step
>>> params = {"w": torch.zeros(2, 3)}
>>> state = default_muon_state(params)
>>> config = MuonConfig(max_lr=0.1, momentum=0.0, weight_decay=0.0, ns_dtype=torch.float32)
>>> grads = {"w": torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.5, 0.0]])}
>>> params, state = muon_step(params, grads, state, config)
>>> params["w"]  # about -0.1 * U V^T whatever the gradient's singular values (3 and 0.5)
tensor([[-0.0714,  0.0000,  0.0000],
        [ 0.0000, -0.1042,  0.0000]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from types import MappingProxyType
from typing import Any

import torch

from optorch.base import (
    BaseConfig,
    Rule,
    apply_step,
    check_bool,
    check_choice,
    check_range,
    init_state,
)
from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE
from optorch.engine import add_alpha, lerp, on_full_tensor

__all__ = [
    "ADJUST_LR_FNS",
    "MuonConfig",
    "MuonRule",
    "default_muon_state",
    "muon_step",
    "newton_schulz",
]

#: Keller Jordan's quintic coefficients (a, b, c), torch.optim.Muon's defaults.
DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
#: The learning-rate scalings ``adjust_lr_fn`` accepts (``None`` means "original").
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
#: torch.optim.Muon refuses this many Newton-Schulz steps or more.
MAX_NS_STEPS = 100


def _parse_dtype(value: Any) -> torch.dtype | None:
    """A dtype, ``None``, or a dtype's name as YAML gives it (``"torch.float32"``)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        candidate = getattr(torch, value.strip().removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise ValueError(
        f"Invalid MuonConfig.ns_dtype: {value!r} (must be None, a torch.dtype or its name)"
    )


@dataclass
class MuonConfig(BaseConfig):
    """Hyperparameters of Muon (``torch.optim.Muon`` names; ``max_lr`` is the lr).

    ``ns_dtype`` (keyword-only) is the dtype of the Newton-Schulz iteration:
    ``torch.bfloat16`` as in torch, or ``None`` for the param's own dtype.
    """

    max_lr: float = 1e-3
    weight_decay: float = 0.1
    momentum: float = 0.95
    nesterov: bool = True
    ns_coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS
    eps: float = 1e-7
    ns_steps: int = 5
    adjust_lr_fn: str | None = None
    steps: int = 0
    lr_schedule_value: float | None = None
    _: KW_ONLY
    ns_dtype: torch.dtype | None = torch.bfloat16

    def __post_init__(self) -> None:
        if isinstance(self.ns_coefficients, Sequence) and not isinstance(
            self.ns_coefficients, (str, tuple)
        ):
            self.ns_coefficients = tuple(self.ns_coefficients)
        self.ns_dtype = _parse_dtype(self.ns_dtype)
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        owner = self._owner
        check_range(owner, "weight_decay", self.weight_decay, 0.0)
        # 1 would freeze the buffer at zero (the update lerps towards the gradient by 1 - mu)
        check_range(owner, "momentum", self.momentum, 0.0, 1.0, high_open=True)
        check_range(owner, "eps", self.eps, 0.0, low_open=True)
        check_bool(owner, ("nesterov", self.nesterov))
        coefficients = self.ns_coefficients
        if not isinstance(coefficients, tuple) or len(coefficients) != 3:
            raise ValueError(
                f"Invalid {owner}.ns_coefficients: {coefficients!r} (must be 3 numbers a, b, c)"
            )
        for index, value in enumerate(coefficients):
            if isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{owner}.ns_coefficients[{index}] must be a Python number (it selects "
                    f"the compiled kernel), got a tensor"
                )
            check_range(owner, f"ns_coefficients[{index}]", value)
        steps = self.ns_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < MAX_NS_STEPS:
            raise ValueError(
                f"Invalid {owner}.ns_steps: {steps!r} (must be an int in [0, {MAX_NS_STEPS}))"
            )
        check_choice(owner, "adjust_lr_fn", self.adjust_lr_fn, ADJUST_LR_FNS)
        self.ns_dtype = _parse_dtype(self.ns_dtype)
        if self.ns_dtype is not None and not self.ns_dtype.is_floating_point:
            raise ValueError(
                f"Invalid {owner}.ns_dtype: {self.ns_dtype!r} (must be a floating dtype)"
            )
        if isinstance(self.eps, torch.Tensor):
            raise TypeError(f"{owner}.eps must be a Python number, got a tensor")


def lr_scale(shape: Sequence[int], adjust_lr_fn: str | None) -> float:
    """:math:`\\rho(A, B)`: the factor on the lr for a matrix of shape ``(A, B)``."""
    rows, cols = shape[0], shape[1]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if cols == 0:  # an empty matrix: nothing is updated, any factor will do
        return 1.0
    return math.sqrt(max(1.0, rows / cols))


def newton_schulz(
    matrix: torch.Tensor,
    *,
    coefficients: tuple[float, float, float] = DEFAULT_NS_COEFFICIENTS,
    steps: int = 5,
    eps: float = 1e-7,
    dtype: torch.dtype | None = torch.bfloat16,
    transpose: bool | None = None,
) -> torch.Tensor:
    """``steps`` quintic Newton-Schulz iterations towards the polar factor of ``matrix``.

    Runs in ``dtype`` (the input's when ``None``) and returns that dtype. ``transpose``
    (default: whether the matrix has more rows than columns) iterates on the transpose,
    so that the Gram matrix is the smaller of the two.

    >>> q = newton_schulz(torch.diag(torch.tensor([4.0, 1.0])), dtype=torch.float32)
    >>> bool(((q.diagonal() > 0.6) & (q.diagonal() < 1.25)).all())
    True
    """
    a, b, c = coefficients
    if transpose is None:
        transpose = matrix.shape[0] > matrix.shape[1]
    x = matrix.to(dtype) if dtype is not None else matrix
    if transpose:
        x = x.mT
    # Frobenius normalisation bounds the spectral norm by 1, inside the region where
    # the iteration converges
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x.mT if transpose else x


class MuonRule(Rule):
    name = "muon"
    config_type = MuonConfig
    # matmuls on each tensor's own shape: no flattening, no foreach lists
    elementwise = False
    flattenable = False
    foreach_ok = False
    # The bfloat16 quintic amplifies any difference in its input, so the compiled step
    # rounds where eager code (and torch.optim.Muon) does, or it ends 1e-3 apart from
    # torch after 12 steps (measured): inductor emulates eager's bfloat16 casts (it
    # would keep the iteration's elementwise results in float32 between the matmuls);
    # the C++ compiler may fuse a multiply and an add, as ATen's vectorized lerp does;
    # and the momentum's weights are kernel constants, which engine.lerp rounds to
    # float32 as ATen does (as per-step tensors they would be float64).
    inductor_options = MappingProxyType(
        {"emulate_precision_casts": True, "cpp.enable_floating_point_contract_flag": "fast"}
    )
    config_scalars = ("momentum", "one_minus_momentum")

    def fields(self, config: MuonConfig) -> tuple[str, ...]:
        return ("momentum",)

    def validate_leaf(self, path: str, param: torch.Tensor, config: MuonConfig) -> None:
        super().validate_leaf(path, param, config)
        if param.dim() != 2:
            raise ValueError(
                f"muon: param {path} has shape {tuple(param.shape)}; Muon only updates 2-D "
                "weight matrices. Give biases, norm gains, embeddings and other non-2-D "
                "params to AdamW (e.g. with optorch.wrappers.partition)"
            )

    def leaf_key(self, param: torch.Tensor, config: MuonConfig) -> Any:
        # Python values fixed per shape: the compiled kernel then never guards on sizes
        rows, cols = param.shape[0], param.shape[1]
        return (rows > cols, lr_scale((rows, cols), config.adjust_lr_fn))

    def static(self, config: MuonConfig) -> Any:
        decay = isinstance(config.weight_decay, torch.Tensor) or config.weight_decay != 0
        return (
            config.nesterov,
            decay,
            tuple(float(v) for v in config.ns_coefficients),
            config.ns_steps,
            float(config.eps),
            config.ns_dtype,
        )

    def scalars(self, config: MuonConfig, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        return {
            "lr": lr,
            "momentum": config.momentum,
            "one_minus_momentum": 1.0 - config.momentum,
            "shrink": 1.0 - lr * config.weight_decay,
        }

    def update(self, param: Any, grad: Any, *rest: Any) -> tuple[Any, ...]:
        buf, h = rest
        nesterov, decay, coefficients, ns_steps, eps, ns_dtype = h.static
        transpose, scale = h.leaf
        buf = lerp(buf, grad, h.one_minus_momentum)
        direction = lerp(grad, buf, h.momentum) if nesterov else buf
        # a sharded (FSDP2) matrix is gathered once and orthogonalised whole on every
        # rank, which keeps its own rows: DTensor matmuls would gather in each iteration
        orthogonal = on_full_tensor(
            lambda matrix: newton_schulz(
                matrix,
                coefficients=coefficients,
                steps=ns_steps,
                eps=eps,
                dtype=ns_dtype,
                transpose=transpose,
            ),
            direction,
        )
        if isinstance(h.lr, torch.Tensor) and param.dtype in (torch.bfloat16, torch.float16):
            # a float16/bfloat16 param as eager ATen steps it: each op in float32,
            # rounded once, with the decay factor in float32 and add's alpha rounded to
            # the param's dtype (the compiled kernel emulates low-precision casts, which
            # would round the factors to bfloat16 and each partial result: a unit in the
            # last place a step off torch's, measured)
            if decay:
                param = (param.float() * h.shrink.float()).to(param.dtype)
            alpha = (h.lr * scale).float().to(param.dtype).float()  # double -> float -> dtype
            return (param.float() - orthogonal.float() * alpha).to(param.dtype), buf
        if decay:
            param = param * h.shrink
        if isinstance(h.lr, torch.Tensor):
            return param - orthogonal.to(param.dtype) * (h.lr * scale), buf
        # one fused a + alpha * b on the upcast update, as torch.optim.Muon does it
        return add_alpha(param, orthogonal, -(h.lr * scale)), buf


RULE = MuonRule()


def default_muon_state(model: Any) -> OPTIMIZER_STATE_TYPE:
    """``{"step": 0, "momentum": zeros}`` for the trainable params (all must be 2-D)."""
    return init_state(RULE, model, MuonConfig())


def muon_step(
    params: PARAMS_GRADS_TYPE,
    grads: PARAMS_GRADS_TYPE,
    opt_state: OPTIMIZER_STATE_TYPE,
    config: MuonConfig,
) -> tuple[PARAMS_GRADS_TYPE, OPTIMIZER_STATE_TYPE]:
    """One Muon step: ``(params, grads, state, config) -> (params, state)``."""
    return apply_step(RULE, config, params, grads, opt_state)
