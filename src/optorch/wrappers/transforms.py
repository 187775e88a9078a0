r"""Gradient transformations and :func:`chain`, which runs them before an optimizer.

A gradient transformation has ``init(params) -> state`` and
``update(grads, state, params) -> (grads, state, info)``: it returns new gradients and
a new state (it never writes to its inputs, the caller's gradients included) and an
``info`` dict of values worth logging. :func:`chain` applies transformations in order,
then the optimizer's step, and keeps every transformation's state in its own state.

>>> import torch, optorch
>>> from optorch import wrappers
>>> opt = wrappers.chain(
...     wrappers.clip_by_global_norm(1.0),
...     optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0),
... )
>>> params = {"w": torch.zeros(2)}
>>> state = opt.init(params)
>>> params, state = opt.step(params, {"w": torch.tensor([3.0, 4.0])}, state)
>>> params["w"]
tensor([-0.6000, -0.8000])
>>> state["transforms"][0]["grad_norm"]
tensor(5.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from optorch.base import _is_dtensor, check_range
from optorch.engine import as_real, whole_flag
from optorch.tree import PyTree, flatten, unflatten
from optorch.wrappers._core import (
    Wrapper,
    as_gate,
    check_counter,
    check_grads,
    commit_tree,
    counter,
    expect_keys,
    first_device,
    params_tree,
)

__all__ = [
    "Chain",
    "GradientTransformation",
    "adaptive_clip",
    "add_noise",
    "chain",
    "clip_by_global_norm",
    "clip_by_norm_per_param",
    "clip_by_value",
    "global_norm",
    "scale",
    "zero_nans",
]

#: Added to a norm before dividing by it, as ``torch.nn.utils.clip_grad_norm_`` does.
NORM_EPS = 1e-6


class GradientTransformation:
    """Base class of gradient transformations (any object with ``init`` and ``update``
    works with :func:`chain`). ``update`` must not modify its arguments."""

    name = "transformation"

    def init(self, params: PyTree) -> dict[str, Any]:
        return {}

    def update(
        self, grads: PyTree, state: Mapping[str, Any], params: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name}>"


def _map_grads(grads: PyTree, fn: Any) -> PyTree:
    _, leaves_, spec = flatten(grads)
    return unflatten(spec, [None if g is None else fn(g) for g in leaves_])


def _norm_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    wide = (torch.float64, torch.complex128)
    return torch.float64 if any(t.dtype in wide for t in tensors) else torch.float32


def _norm(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a complex tensor's norm is that of its real and imaginary parts together
    return torch.linalg.vector_norm(as_real(tensor, read_only=True), dtype=dtype)


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    r"""The L2 norm of all ``tensors`` together, :math:`\sqrt{\sum_i \lVert g_i\rVert^2}`
    (float32, or float64 if a tensor is float64).

    For ``DTensor`` (FSDP2) tensors it is the norm of the full tensors: the shards'
    norms are partial results, combined by one all-reduce per device mesh; the result
    is a plain tensor, the same on every rank.
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    dtype = _norm_dtype(tensors)
    device = tensors[0].device
    norms: list[torch.Tensor] = []
    sharded: dict[Any, list[torch.Tensor]] = {}
    for tensor in tensors:
        norm = _norm(tensor, dtype)
        mesh = getattr(norm, "device_mesh", None)
        if mesh is None:
            norms.append(norm.to(device))
        else:
            sharded.setdefault(mesh, []).append(norm)
    for partial_norms in sharded.values():
        whole = torch.linalg.vector_norm(torch.stack(partial_norms))
        norms.append(whole.full_tensor().to(device))
    return torch.linalg.vector_norm(torch.stack(norms))


class _ClipByGlobalNorm(GradientTransformation):
    name = "clip_by_global_norm"

    def __init__(self, max_norm: Any) -> None:
        check_range(self.name, "max_norm", max_norm, 0.0, low_open=True)
        self.max_norm = max_norm

    def init(self, params: PyTree) -> dict[str, Any]:
        leaves_ = [p for p in flatten(params_tree(params))[1] if isinstance(p, torch.Tensor)]
        dtype = _norm_dtype(leaves_) if leaves_ else torch.float32
        return {"grad_norm": torch.zeros((), dtype=dtype, device=first_device(leaves_))}

    def update(
        self, grads: PyTree, state: Mapping[str, Any], params: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        present = [g for g in flatten(grads)[1] if g is not None]
        norm = global_norm(present)
        coefficient = (self.max_norm / (norm + NORM_EPS)).clamp(max=1.0)
        clipped = _map_grads(grads, lambda g: g * coefficient.to(g.dtype))
        old = state["grad_norm"]
        new_state = {"grad_norm": norm.to(dtype=old.dtype, device=old.device)}
        return clipped, new_state, {"grad_norm": norm, "clip_coefficient": coefficient}


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    r"""Scale all gradients together so that their global norm is at most ``max_norm``.

    .. math::

        g_i \leftarrow g_i \cdot \min\!\Bigl(1, \frac{c}{\lVert g \rVert + 10^{-6}}\Bigr),
        \qquad \lVert g \rVert = \sqrt{\textstyle\sum_i \lVert g_i \rVert_2^2}

    with :math:`c` = ``max_norm`` (the same rule as ``torch.nn.utils.clip_grad_norm_``;
    Pascanu et al. 2013, arXiv:1211.5063). The pre-clip norm is kept in the state as
    ``"grad_norm"`` for logging (``update`` also returns it in ``info``).

    >>> import torch
    >>> clip = clip_by_global_norm(1.0)
    >>> grads = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}
    >>> new, state, info = clip.update(grads, clip.init(grads), grads)
    >>> new["a"], state["grad_norm"]
    (tensor([0.6000]), tensor(5.))
    """
    return _ClipByGlobalNorm(max_norm)


class _ClipByValue(GradientTransformation):
    name = "clip_by_value"

    def __init__(self, limit: Any) -> None:
        check_range(self.name, "limit", limit, 0.0)
        self.limit = limit

    def update(
        self, grads: PyTree, state: Mapping[str, Any], params: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        def clip(g: torch.Tensor) -> torch.Tensor:
            if g.is_complex():  # the real and imaginary parts each, as two coordinates
                return torch.view_as_complex(
                    as_real(g, read_only=True).clamp(-self.limit, self.limit)
                )
            return g.clamp(-self.limit, self.limit)

        return _map_grads(grads, clip), {}, {}


def clip_by_value(limit: float) -> GradientTransformation:
    r"""Clamp every gradient element to :math:`[-c, c]`, :math:`c` = ``limit`` (>= 0);
    a complex element's real and imaginary parts are clamped each.

    >>> import torch
    >>> clip = clip_by_value(0.5)
    >>> clip.update({"w": torch.tensor([-2.0, 0.1, 3.0])}, {}, None)[0]["w"]
    tensor([-0.5000,  0.1000,  0.5000])
    """
    return _ClipByValue(limit)


class _ClipByNormPerParam(GradientTransformation):
    name = "clip_by_norm_per_param"

    def __init__(self, max_norm: Any) -> None:
        check_range(self.name, "max_norm", max_norm, 0.0, low_open=True)
        self.max_norm = max_norm

    def update(
        self, grads: PyTree, state: Mapping[str, Any], params: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        def clip(g: torch.Tensor) -> torch.Tensor:
            norm = _norm(g, _norm_dtype([g]))
            return g * (self.max_norm / (norm + NORM_EPS)).clamp(max=1.0).to(g.dtype)

        return _map_grads(grads, clip), {}, {}


def clip_by_norm_per_param(max_norm: float) -> GradientTransformation:
    r"""Scale each gradient tensor on its own so that its L2 norm is at most ``max_norm``:
    :math:`g_i \leftarrow g_i \min(1, c / (\lVert g_i\rVert + 10^{-6}))`.

    >>> import torch
    >>> clip = clip_by_norm_per_param(1.0)
    >>> clip.update({"w": torch.tensor([3.0, 4.0])}, {}, None)[0]["w"]
    tensor([0.6000, 0.8000])
    """
    return _ClipByNormPerParam(max_norm)


def unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (over every dim but the first, kept for broadcasting);
    the whole-tensor norm for 0-d and 1-D tensors (biases and gains are one unit)."""
    if x.dim() <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())), keepdim=True)


class _AdaptiveClip(GradientTransformation):
    name = "adaptive_clip"

    def __init__(self, clipping: Any, eps: Any) -> None:
        check_range(self.name, "clipping", clipping, 0.0, low_open=True)
        check_range(self.name, "eps", eps, 0.0)
        self.clipping = clipping
        self.eps = eps

    def update(
        self, grads: PyTree, state: Mapping[str, Any], params: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        _, g_leaves, spec = flatten(grads)
        p_leaves = flatten(params)[1]
        if len(p_leaves) != len(g_leaves):
            raise ValueError(f"{self.name}: grads and params have different numbers of leaves")
        out: list[Any] = []
        for g, p in zip(g_leaves, p_leaves, strict=True):
            if g is None:
                out.append(None)
                continue
            max_norm = unitwise_norm(p.detach()).clamp(min=self.eps) * self.clipping
            grad_norm = unitwise_norm(g)
            shrunk = g * (max_norm / grad_norm.clamp(min=NORM_EPS))
            out.append(torch.where(grad_norm > max_norm, shrunk, g))
        return unflatten(spec, out), {}, {}


def adaptive_clip(clipping: float, *, eps: float = 1e-3) -> GradientTransformation:
    r"""Adaptive gradient clipping, unit-wise (AGC; Brock et al. 2021, arXiv:2102.06171).

    For each output unit :math:`i` (a row of a weight: every dim but the first; a whole
    bias or gain vector), with :math:`\lambda` = ``clipping`` and
    :math:`\lVert W_i\rVert^\star = \max(\lVert W_i\rVert, \epsilon)`, :math:`\epsilon` =
    ``eps``:

    .. math::

        G_i \leftarrow \begin{cases}
            \lambda \dfrac{\lVert W_i\rVert^\star}{\lVert G_i\rVert} G_i
                & \text{if } \dfrac{\lVert G_i\rVert}{\lVert W_i\rVert^\star} > \lambda \\
            G_i & \text{otherwise}
        \end{cases}

    The paper leaves the final classifier layer unclipped; route it around with
    :func:`~optorch.wrappers.partition` or apply the chain under
    :func:`~optorch.wrappers.masked`.

    >>> import torch
    >>> agc = adaptive_clip(0.1)
    >>> params = {"w": torch.tensor([[3.0, 4.0], [0.0, 1.0]])}
    >>> grads = {"w": torch.tensor([[6.0, 8.0], [0.0, 0.05]])}
    >>> agc.update(grads, {}, params)[0]["w"]
    tensor([[0.3000, 0.4000],
            [0.0000, 0.0500]])
    """
    return _AdaptiveClip(clipping, eps)


class _Scale(GradientTransformation):
    name = "scale"

    def __init__(self, factor: Any) -> None:
        check_range(self.name, "factor", factor)
        self.factor = factor

    def update(
        self, grads: PyTree, state: Mapping[str, Any], params: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        return _map_grads(grads, lambda g: g * self.factor), {}, {}


def scale(factor: float) -> GradientTransformation:
    """Multiply every gradient by ``factor`` (finite; negative ascends).

    >>> import torch
    >>> scale(0.5).update({"w": torch.tensor([2.0])}, {}, None)[0]["w"]
    tensor([1.])
    """
    return _Scale(factor)


# A counter-based generator (a hash of (seed, leaf, step, element)) keeps the noise a
# pure function of the state: no generator object, no host sync, same under compile.
_MASK32 = 0xFFFFFFFF


def _mul32(x: Any, constant: int) -> Any:
    """``x * constant mod 2**32`` for 32-bit ``x`` without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Any) -> Any:
    """MurmurHash3's 32-bit finaliser (Appleby 2011) on ints or int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _uniform(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform in the open interval (0, 1) from 32 random bits (24 used)."""
    return ((bits >> 8).to(dtype) + 0.5) * (1.0 / (1 << 24))


def counter_normal(
    shape: tuple[int, ...], key: torch.Tensor, *, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Standard normal values, a pure function of ``key`` (an int64 tensor in [0, 2**32))
    and the element index (Box-Muller on two hashed uniforms per element)."""
    numel = math.prod(shape)
    index = torch.arange(numel, dtype=torch.int64, device=device)
    stream = _mix32((_mul32(key, 0x9E3779B9) + 0x7F4A7C15) & _MASK32)
    first = _mix32(_mix32(((index << 1) ^ stream) & _MASK32))
    second = _mix32(_mix32((((index << 1) | 1) ^ stream) & _MASK32))
    work = torch.float64 if dtype == torch.float64 else torch.float32
    radius = torch.sqrt(-2.0 * torch.log(_uniform(first, work)))
    angle = (2.0 * math.pi) * _uniform(second, work)
    return (radius * torch.cos(angle)).reshape(shape).to(dtype)


def _laid_out_like(full: torch.Tensor, like: Any) -> Any:
    """``full`` (the same on every rank) as a DTensor laid out like ``like``: each rank
    keeps its own part, so the noise of an element is the one its global index gets in
    one process."""
    from torch.distributed.tensor import distribute_tensor

    try:  # every rank slices its own copy: no communication
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # pragma: no cover - torch < 2.6: rank 0's copy is scattered
        return distribute_tensor(full, like.device_mesh, like.placements)


class _AddNoise(GradientTransformation):
    name = "add_noise"

    def __init__(self, eta: Any, gamma: Any, seed: int) -> None:
        check_range(self.name, "eta", eta, 0.0)
        check_range(self.name, "gamma", gamma, 0.0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"{self.name}: seed must be an int, got {seed!r}")
        self.eta = eta
        self.gamma = gamma
        self.seed = seed

    def init(self, params: PyTree) -> dict[str, Any]:
        return {"count": counter(flatten(params_tree(params))[1])}

    def update(
        self, grads: PyTree, state: Mapping[str, Any], params: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        count = state["count"]
        if not isinstance(count, torch.Tensor) or count.dtype != torch.int64 or count.dim():
            raise TypeError(
                f"{self.name}: state['count'] must be a 0-d int64 tensor, got {count!r}"
            )
        check_counter(self.name, state, "count")  # not negative (the noise's std: inf)
        std = torch.sqrt(self.eta / (1.0 + count.to(torch.float64)) ** self.gamma)
        step_key = _mix32((count & _MASK32) ^ _mix32(self.seed & _MASK32))
        _, leaves_, spec = flatten(grads)
        out: list[Any] = []
        for index, g in enumerate(leaves_):
            if g is None:
                out.append(None)
                continue
            key = _mix32((step_key + _mix32(index)) & _MASK32).to(g.device)
            if g.is_complex():  # each of the real and imaginary parts gets its own
                real = g.real.dtype
                noise = counter_normal((*g.shape, 2), key, dtype=real, device=g.device)
                noise = torch.view_as_complex(noise * std.to(device=g.device, dtype=real))
            else:
                noise = counter_normal(g.shape, key, dtype=g.dtype, device=g.device)
                noise = noise * std.to(device=g.device, dtype=g.dtype)
            if _is_dtensor(g):
                noise = _laid_out_like(noise, g)
            out.append(g + noise)
        return unflatten(spec, out), {"count": count + 1}, {"noise_std": std}


def add_noise(eta: float, gamma: float = 0.55, *, seed: int = 0) -> GradientTransformation:
    r"""Add annealed Gaussian noise to the gradients (Neelakantan et al. 2015,
    arXiv:1511.06807):

    .. math::

        g_t \leftarrow g_t + \mathcal N\!\Bigl(0, \frac{\eta}{(1 + t)^\gamma}\Bigr)

    with :math:`\eta` = ``eta``, :math:`\gamma` = ``gamma`` and :math:`t` the number of
    updates made before (0 on the first). The noise is a deterministic function of
    (``seed``, leaf position, :math:`t`, element index) through a counter-based hash, so
    runs reproduce, the state is one 0-d counter, and nothing syncs with the host.

    >>> import torch
    >>> noise = add_noise(0.01, seed=3)
    >>> grads = {"w": torch.zeros(10000)}
    >>> out, state, info = noise.update(grads, noise.init(grads), grads)
    >>> round(float(out["w"].var()), 3), int(state["count"])
    (0.01, 1)
    """
    return _AddNoise(eta, gamma, seed)


class _ZeroNans(GradientTransformation):
    name = "zero_nans"

    def init(self, params: PyTree) -> dict[str, Any]:
        device = first_device(flatten(params_tree(params))[1])
        return {"found_nan": torch.zeros((), dtype=torch.bool, device=device)}

    def update(
        self, grads: PyTree, state: Mapping[str, Any], params: PyTree
    ) -> tuple[PyTree, dict[str, Any], dict[str, Any]]:
        present = [g for g in flatten(grads)[1] if g is not None]
        old = state["found_nan"]
        if present:
            # over DTensor grads (FSDP2) a plain tensor, the same on every rank
            found = whole_flag(torch.stack([g.isnan().any().to(old.device) for g in present]).any())
        else:
            found = torch.zeros_like(old)

        def clean(g: torch.Tensor) -> torch.Tensor:
            if g.is_complex():  # the real and imaginary parts each, as two coordinates
                parts = as_real(g, read_only=True)
                return torch.view_as_complex(torch.where(parts.isnan(), 0.0, parts))
            return torch.where(g.isnan(), torch.zeros_like(g), g)

        cleaned = _map_grads(grads, clean)
        return cleaned, {"found_nan": found}, {"found_nan": found}


def zero_nans() -> GradientTransformation:
    """Replace NaN gradient elements by 0 (infinities are kept); the state's
    ``"found_nan"`` (0-d bool) says whether the last gradients had any.

    >>> import torch
    >>> clean = zero_nans()
    >>> grads = {"w": torch.tensor([1.0, float("nan")])}
    >>> out, state, _ = clean.update(grads, clean.init(grads), grads)
    >>> out["w"], bool(state["found_nan"])
    (tensor([1., 0.]), True)
    """
    return _ZeroNans()


# --------------------------------------------------------------------------------------
# chain
# --------------------------------------------------------------------------------------


def _is_transformation(obj: Any) -> bool:
    return callable(getattr(obj, "init", None)) and callable(getattr(obj, "update", None))


class Chain(Wrapper):
    """Gradient transformations, then an optimizer. See :func:`chain`."""

    kind = "chain"

    def __init__(self, transforms: tuple[Any, ...], inner: Any) -> None:
        super().__init__(inner)
        for position, transform in enumerate(transforms):
            if not _is_transformation(transform):
                raise TypeError(
                    f"chain: argument {position} must be a gradient transformation (with "
                    f".init and .update), got {type(transform).__name__}"
                )
        self.transforms = tuple(transforms)

    @property
    def name(self) -> str:
        names = [getattr(t, "name", type(t).__name__) for t in self.transforms]
        return f"chain({', '.join([*names, self.inner.name])})"

    def init(self, params: Any) -> dict[str, Any]:
        tree = params_tree(params)
        return {
            "transforms": [transform.init(tree) for transform in self.transforms],
            "inner": self.inner.init(tree),
        }

    def step(
        self,
        params: PyTree,
        grads: PyTree,
        state: Mapping[str, Any],
        *,
        hyper_overrides: Mapping[str, Any] | None = None,
        skip_if: Any = None,
    ) -> tuple[PyTree, dict[str, Any]]:
        who = self.name
        expect_keys(who, state, ("transforms", "inner"))
        gate = as_gate(who, skip_if)
        check_grads(who, params, grads)
        old_states = list(state["transforms"])
        if len(old_states) != len(self.transforms):
            raise ValueError(
                f"{who}: state holds {len(old_states)} transformation states for "
                f"{len(self.transforms)} transformations"
            )
        new_states = []
        for transform, old in zip(self.transforms, old_states, strict=True):
            grads, new, _ = transform.update(grads, old, params)
            new_states.append(new)
        params, inner_state = self.inner.step(
            params, grads, state["inner"], hyper_overrides=hyper_overrides, skip_if=gate
        )
        inplace = self.inplace
        committed = [
            commit_tree(who, old, new, inplace=inplace, skip=gate)
            for old, new in zip(old_states, new_states, strict=True)
        ]
        if inplace and isinstance(state, dict):
            if isinstance(state["transforms"], list):
                state["transforms"][:] = committed
            else:
                state["transforms"] = committed
            state["inner"] = inner_state
            return params, state
        return params, {**state, "transforms": committed, "inner": inner_state}


def chain(*parts: Any) -> Chain:
    """``chain(transform, ..., optimizer)``: apply the gradient transformations in order,
    then the optimizer's step. The transformations' states are kept, in order, under
    ``state["transforms"]``; the optimizer's under ``state["inner"]``.

    Put :func:`~optorch.wrappers.accumulate` outside the chain to clip the accumulated
    mean, inside to clip each micro-batch.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> opt = wrappers.chain(
    ...     wrappers.zero_nans(), wrappers.clip_by_value(1.0),
    ...     optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.0),
    ... )
    >>> params = {"w": torch.zeros(3)}
    >>> grads = {"w": torch.tensor([float("nan"), 5.0, -0.5])}
    >>> params, state = opt.step(params, grads, opt.init(params))
    >>> params["w"]
    tensor([ 0.0000, -0.1000,  0.0500])
    """
    if not parts:
        raise TypeError("chain: needs an optimizer as its last argument")
    *transforms, optimizer = parts
    if _is_transformation(optimizer) and not callable(getattr(optimizer, "step", None)):
        raise TypeError(
            "chain: the last argument must be an optimizer (with .init and .step), got the "
            f"gradient transformation {optimizer!r}"
        )
    return Chain(tuple(transforms), optimizer)
