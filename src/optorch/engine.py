"""How a rule is executed over many tensors.

A :class:`~optorch.base.Rule` is written once, as tensor code that uses operators and
a small set of tensor methods. The engine runs that code three ways:

``reference``
    A loop over the tensors, one call of the rule per tensor. The oracle.
``foreach``
    One call of the rule per (device, dtype) group on :class:`TensorList` values, whose
    operators dispatch to ``torch._foreach_*`` kernels. Groups are split into chunks of
    bounded size (large tensors of elementwise rules are split into flat slices), so the
    temporaries of a step stay a fraction of the params' bytes.
``compiled``
    The rule is traced by ``torch.compile`` for a *chunk* of ``CHUNK`` flat 1-D tensors
    with dynamic sizes and every per-step scalar passed as a 0-d tensor: one generated
    kernel pass per tensor, compiled once per (rule, options, dtype, device) however
    many tensors there are and however the schedule moves. Rules that need a tensor's
    shape are compiled per tensor with dynamic shapes instead.

In-place mode writes the results into the given tensors; pure mode returns new ones.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
import os
import platform
import shlex
import subprocess
import sys
import types
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from optorch.base import Hyper, Rule, _is_dtensor

__all__ = [
    "CHUNK",
    "CHUNK_CUDA",
    "CHUNK_WITH_NORMS",
    "COMPILED_MIN_NUMEL",
    "FOREACH_CHUNK_NUMEL",
    "TensorList",
    "add_alpha",
    "add_scaled",
    "add_scaled_exact",
    "addcdiv",
    "addcmul",
    "as_real",
    "lerp",
    "norm_sharing_pass",
    "on_full_tensor",
    "per_tensor",
    "records_grad",
    "resolve_impl",
    "run",
    "scalar_sqrt",
    "select",
    "where",
    "whole_flag",
    "zeros_laid_out_like",
]

#: Tensors per compiled call (a chunk is padded with small scratch tensors). Fewer
#: calls cost less per step (each call costs ~0.1-0.2 ms of guards and wrappers), more
#: loops per kernel more compile time: 8 measured 41 ms a step and a 9.8 s first step
#: for AdamW on the GPT-like set, 4 gave 45 ms and 8.7 s.
CHUNK = 8
#: The same for rules that take per-tensor norms (LAMB, LARS): each tensor's loops carry
#: reductions, and 4 measured both faster to compile and no slower to run (LAMB: first
#: step 14.6-15.0 s instead of 18.8-20.4, step 89-98 ms instead of 105-109; LARS 12.9
#: instead of 16.2 s, 46.2 against 46.8 ms).
CHUNK_WITH_NORMS = 4
#: Tensors per compiled call on a CUDA device (fewer when a group has fewer; the last
#: call is padded). SGD on the GPT-like set on an H200: 13.9 ms a step in calls of 8
#: tensors, 2.8 ms in one call of its 34 large tensors.
CHUNK_CUDA = 64
#: Elements per foreach chunk: bounds the temporaries a foreach step allocates, and keeps
#: a chunk's operands in cache from one kernel to the next (measured best: 1M on an AMD
#: EPYC, 2M-4M on an Intel Xeon with a large shared L3).
FOREACH_CHUNK_NUMEL = 1 << 21
#: Smaller tensors skip the compiled kernel: for them a compiled call's fixed cost
#: (guards, argument handling) exceeds the work, and one foreach pass is faster.
#: (Concatenating them into one flat tensor for one call was measured too: no faster on
#: the GPT-like set, 1.6x slower on 2,000 small tensors, where the per-tensor cost of
#: ``cat`` and of the copies back equals that of the foreach kernels it saves.)
COMPILED_MIN_NUMEL = 1 << 16


# --------------------------------------------------------------------------------------
# scalars: the same code works for Python numbers and 0-d tensors
# --------------------------------------------------------------------------------------


def scalar_sqrt(value: Any) -> Any:
    """``sqrt`` of a Python number or a tensor."""
    if isinstance(value, torch.Tensor):
        return value.sqrt()
    return math.sqrt(value)


def floats_may_be_symbolic() -> bool:
    """Whether a Python float seen now may be a symbol: while dynamo traces a user's
    ``torch.compile`` with unspecialized floats (torch's default), a float that a
    recompile saw change (the next run of a learning-rate sweep in one process, say)
    becomes a graph input. optorch's own kernels trace with floats specialized."""
    return torch.compiler.is_compiling() and not torch._dynamo.config.specialize_float


def where(condition: Any, if_true: Any, if_false: Any) -> Any:
    """Select between two scalars by a Python bool or a 0-d bool tensor (no host sync)."""
    if isinstance(condition, torch.Tensor):
        if floats_may_be_symbolic():
            # numbers as float64 tensors: inductor (torch 2.13) keeps the value it first
            # saw for a symbolic float that torch.where selects (a compiled
            # where(lr < x, lr, x) went stale in a sweep, and so did SGD's
            # where(t == 1, 0, momentum) next to a nesterov step's use of momentum)
            if_true, if_false = (
                v if isinstance(v, torch.Tensor) else _number_tensor(v, condition.device)
                for v in (if_true, if_false)
            )
        elif not isinstance(if_true, torch.Tensor) and not isinstance(if_false, torch.Tensor):
            # two Python numbers would make a default-dtype (float32) tensor: keep float64
            if_true = _number_tensor(if_true, condition.device)
        return torch.where(condition, if_true, if_false)
    return if_true if condition else if_false


def _number_tensor(value: float, device: torch.device) -> torch.Tensor:
    """A 0-d float64 tensor of ``value`` on ``device``: a fill, not a copy from pageable
    host memory (which waits for the device to finish its queue); while tracing, the
    form inductor keeps right for a symbolic value."""
    if floats_may_be_symbolic():
        return torch.tensor(value, dtype=torch.float64, device=device)
    return torch.full((), value, dtype=torch.float64, device=device)


def lerp(start: Any, end: Any, weight: Any) -> Any:
    """``start + weight * (end - start)``; one kernel when ``weight`` is a Python number."""
    if isinstance(weight, torch.Tensor):
        if isinstance(start, torch.Tensor) and start.dtype in (torch.float32, torch.float64):
            # torch.lerp, as torch.optim calls it with a tensor weight (Muon's buffer
            # with a tensor momentum): its rounding, not that of the two-step form, which
            # Muon's bfloat16 Newton-Schulz amplified to 5e-5 apart; the weight in the
            # tensor's dtype, as lerp's batching rule (vmap) requires
            return torch.lerp(start, end, weight.to(start.dtype))
        return start + (end - start) * weight
    if isinstance(start, TensorList):
        return start.lerp(end, weight)
    float32_math = start.dtype in _FLOAT32_MATH
    if isinstance(weight, float) and torch.compiler.is_compiling():
        # eager ATen rounds the weight to its float32 compute dtype first, and computes
        # a float16/bfloat16 lerp in float32, rounded once; so does the kernel then
        # (inductor would compute the weight's 1 - w in double, and with emulated
        # precision casts round each of lerp's steps to bfloat16)
        if floats_may_be_symbolic():
            # a tensor weight: inductor's lerp with a number weight branches on it
            # (>= 0.5) and cannot when it is a symbol
            weight_dtype = torch.float32 if float32_math else start.dtype
            weight = torch.tensor(weight, dtype=weight_dtype, device=start.device)
        elif float32_math:
            weight = round_to_float32(weight)
        if float32_math and start.dtype is not torch.float32:
            return torch.lerp(start.float(), end.float(), weight).to(start.dtype)
    return torch.lerp(start, end, weight)


def round_to_float32(value: float) -> float:
    """``value`` rounded to the nearest float32 (ties to even), as a Python float.

    Python arithmetic only, so that dynamo folds it to a constant in old torch releases
    too (``float(torch.tensor(value, dtype=torch.float32))`` is a ``.item()`` that torch
    2.4's dynamo refuses under ``fullgraph``; the package declares torch >= 2.13, but
    its compiled kernels are kept working on older releases where that is cheap).
    """
    if value == 0.0 or not math.isfinite(value):
        return value
    _, exponent = math.frexp(value)
    # the float32 grid at this magnitude: 24 significant bits, subnormals below 2**-126
    shift = max(exponent - 24, -149)
    rounded = math.ldexp(round(math.ldexp(value, -shift)), shift)
    if abs(rounded) > _FLOAT32_MAX:
        return math.copysign(math.inf, value)
    return math.copysign(rounded, value)  # an underflow to zero keeps the sign


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

#: tensor types that are not subclasses with ops of their own (DTensor)
_PLAIN = (torch.Tensor, torch.nn.Parameter)

#: dtypes whose ATen kernels compute in float32
_FLOAT32_MATH = (torch.float32, torch.bfloat16, torch.float16)


def select(condition: Any, if_true: Any, if_false: Any) -> Any:
    """``torch.where`` for a tensor or a :class:`TensorList` ``if_true``."""
    if isinstance(if_true, TensorList):
        return if_true.where(condition, if_false)
    return torch.where(condition, if_true, if_false)


def add_scaled(x: Any, y: Any, alpha: Any) -> Any:
    """``x + alpha * y`` rounded once, as torch.optim's ``add_(y, alpha=...)`` does."""
    if isinstance(alpha, torch.Tensor):
        return x + y * alpha
    if isinstance(x, TensorList):
        node = x._node(
            lambda a, b: torch._foreach_add(a, b, alpha=alpha),
            lambda a, b: torch._foreach_add_(a, b, alpha=alpha),
            y,
        )
        if isinstance(y, TensorList):
            node.into_second_fn = lambda a, b: _add_scaled_into(a, b, alpha)
        return node
    return add_alpha(x, y, alpha)


def add_alpha(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``torch.add(x, y, alpha=alpha)``; spelled ``x + y * alpha`` while compiling.

    Inductor rewrites an ``add`` of a matmul's output into ``addmm`` and drops a
    non-default ``alpha`` on the way (torch 2.13 on CPU, measured: a compiled
    ``torch.func.grad`` + SGD step moved weights by ``+g`` instead of ``-lr * g``; the
    same family as pytorch/pytorch#167313). A gradient is often a matmul's output when
    a whole training step is compiled, so optorch never hands inductor an ``add`` with
    ``alpha``. On CPU inductor decomposes that ``add`` into this very product and sum, so
    the compiled arithmetic is the same; on CUDA it would have fused them into one FMA,
    so a compiled step there may differ from eager by a rounding. Eager keeps ATen's
    single kernel.
    """
    if torch.compiler.is_compiling():
        dtype = torch.promote_types(x.dtype, y.dtype)  # the product in it, as ATen computes
        return x.to(dtype) + y.to(dtype) * alpha
    return torch.add(x, y, alpha=alpha)


def add_scaled_exact(x: Any, y: Any, alpha: Any) -> Any:
    """``x + alpha * y`` with ``alpha`` applied exactly, in one pass where ATen allows.

    For float32/float64 this is :func:`add_scaled` (one kernel, rounded once; the
    foreach engine can write it into ``y``'s dead buffer: ``buf <- grad + momentum *
    buf``). ATen's ``add(..., alpha=)`` rounds ``alpha`` to a float16/bfloat16 tensor's
    dtype first (0.9 -> 0.8984375 in bfloat16), so for those it is ``x + y * alpha``. On
    tensor lists the choice is made for the whole list: if any of its tensors is
    float16/bfloat16 (float32 params with some bfloat16 grads, say), all of it takes the
    two-pass form, which for its float32 tensors differs from the reference impl by at
    most one rounding.
    """
    if isinstance(alpha, torch.Tensor):
        return x + y * alpha
    if isinstance(x, TensorList):
        node = x._node(
            lambda a, b: (
                list(torch._foreach_add(a, b, alpha=alpha))
                if not _low_precision(a, b)
                else list(torch._foreach_add(a, torch._foreach_mul(b, alpha)))
            ),
            lambda a, b: (
                torch._foreach_add_(a, b, alpha=alpha)
                if not _low_precision(a, b)
                else torch._foreach_add_(a, torch._foreach_mul(b, alpha))
            ),
            y,
        )
        if isinstance(y, TensorList):
            node.into_second_fn = lambda a, b: _add_scaled_into(a, b, alpha, exact=True)
        return node
    if x.dtype in _LOW_PRECISION or y.dtype in _LOW_PRECISION:
        return x + y * alpha
    return add_alpha(x, y, alpha)


def _low_precision(x: list[torch.Tensor], y: list[torch.Tensor]) -> bool:
    """Whether any tensor of the two lists is float16/bfloat16 (a group shares the
    params' dtype, but its grads may mix dtypes)."""
    return any(t.dtype in _LOW_PRECISION for t in (*x, *y))


def _add_scaled_into(
    x: list[torch.Tensor], y: list[torch.Tensor], alpha: Any, *, exact: bool = False
) -> None:
    """``y <- x + alpha * y`` in place (``exact``: see :func:`add_scaled_exact`).

    foreach has no such op; ATen's ``add(x, y, alpha=..., out=y)`` is the same kernel as
    the out-of-place add (so the result is bit-equal to ``torch.add``), run per tensor:
    microseconds a tensor, against a whole pass over the buffer saved. Tensors below
    ATen's parallel grain are the chunks the foreach engine spreads over worker threads,
    where Python loops would take turns on the GIL (measured: SGD on 2,000 x 4,096 went
    from 0.84x torch's time to 1.1x); they take one out-of-place foreach add and a copy.
    DTensors, whose ``out=`` support varies, too.
    """
    if exact and _low_precision(x, y):
        _foreach_mul_exact_(y, alpha)
        torch._foreach_add_(y, x)
        return
    if _is_dtensor(y[0]):
        _copy(y, list(torch._foreach_add(x, y, alpha=alpha)))
        return
    small = [k for k, y_i in enumerate(y) if y_i.numel() < _GRAIN]
    if small:  # one foreach call and a copy: no Python loop, which chunks on worker
        # threads would run one at a time (the GIL)
        new = torch._foreach_add([x[k] for k in small], [y[k] for k in small], alpha=alpha)
        torch._foreach_copy_([y[k] for k in small], new)
    for x_i, y_i in zip(x, y, strict=True):
        if y_i.numel() >= _GRAIN:
            torch.add(x_i, y_i, alpha=alpha, out=y_i)


def addcmul(x: Any, a: Any, b: Any, value: Any) -> Any:
    """``x + value * a * b`` for tensors or tensor lists; ``value`` may be a tensor."""
    if isinstance(x, TensorList):
        return x.addcmul(a, b, value)
    if isinstance(value, torch.Tensor) or floats_may_be_symbolic():
        # (inductor, torch 2.13, kept the first value of a symbolic ``value``)
        return x + a * b * value
    return torch.addcmul(x, a, b, value=value)


def addcdiv(x: Any, a: Any, b: Any, value: Any) -> Any:
    """``x + value * a / b`` for tensors or tensor lists; ``value`` may be a tensor."""
    if isinstance(x, TensorList):
        return x.addcdiv(a, b, value)
    if isinstance(value, torch.Tensor) or floats_may_be_symbolic():
        return x + a / b * value
    return torch.addcdiv(x, a, b, value=value)


# --------------------------------------------------------------------------------------
# sharded tensors (DTensor, as FSDP2 makes them): helpers for rules that are not
# elementwise
# --------------------------------------------------------------------------------------


def norm_sharing_pass(x: Any, other: Any) -> Any:
    """The L2 norm of ``x`` (per tensor for a :class:`TensorList`).

    Compiled, the squares of ``x`` are summed in the loop that reads ``other``, not in a
    pass of their own: a pass that reads one tensor streams at about half the speed of
    a loop that reads several on CPUs (LAMB on the GPT-like benchmark set: the param
    norm's pass was 1 of its 11 units of traffic and ~10% of its time). Inductor fuses
    loops that read a common tensor, so the sum reads ``other``: where ``other`` is NaN
    the square counts 0. For callers to whom the norm does not matter when ``other``
    holds a NaN. Where autograd records ``x``, the plain norm (whose gradient at 0 is 0,
    where that of the square root of a sum is NaN).
    """
    if isinstance(x, torch.Tensor) and torch.compiler.is_compiling() and not records_grad(x):
        return torch.where(other != other, 0.0, x * x).sum().sqrt()
    return x.norm()


def zeros_laid_out_like(
    param: torch.Tensor, shape: Sequence[int], reduced: Sequence[int] = ()
) -> torch.Tensor:
    """Zeros of ``shape`` in ``param``'s dtype and device, laid out like ``param``.

    For a ``DTensor`` param, a ``DTensor`` on its mesh that keeps each ``Shard(d)`` of
    the param where ``shape`` has the param's size along ``d`` and ``d`` is not one of
    the ``reduced`` dims (a statistic taken over ``d``, of size 1 there even when the
    param's size is 1 too), and is replicated along the others: each rank allocates only
    its part, and no step has to gather it. For a plain param, plain zeros.
    """
    if not _is_dtensor(param):
        return torch.zeros(shape, dtype=param.dtype, device=param.device)
    from torch.distributed.tensor import Replicate, Shard, zeros

    same_rank = len(shape) == param.dim()
    kept = {d % param.dim() for d in reduced} if param.dim() else set()
    placements = [
        p
        if isinstance(p, Shard)
        and same_rank
        and shape[p.dim] == param.shape[p.dim]
        and p.dim % param.dim() not in kept
        else Replicate()
        for p in param.placements  # type: ignore[attr-defined]
    ]
    return zeros(
        tuple(shape),
        dtype=param.dtype,
        device_mesh=param.device_mesh,  # type: ignore[attr-defined]
        placements=placements,
    )


def on_full_tensor(fn: Callable[[torch.Tensor], torch.Tensor], tensor: Any) -> Any:
    """``fn(tensor)`` for a function of the whole tensor that sharded ops would do badly
    (a matrix iteration such as Muon's Newton-Schulz, many matmuls on one matrix).

    A plain tensor goes straight to ``fn``. A ``DTensor`` is gathered once
    (``full_tensor()``), ``fn`` runs on the full tensor on every rank, and each rank
    keeps its own part of the result in the input's placements, with no further
    communication. ``fn`` must return a tensor of the input's shape.
    """
    if not _is_dtensor(tensor):
        return fn(tensor)
    from torch.distributed.tensor import DTensor, Replicate

    mesh = tensor.device_mesh
    whole = fn(tensor.full_tensor())
    replicated = DTensor.from_local(whole, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return replicated.redistribute(mesh, tensor.placements)


def per_tensor(fn: Callable[..., torch.Tensor], *numbers: Any) -> Any:
    """``fn`` of per-tensor numbers (0-d tensors, or TensorLists of them such as norms).

    For TensorLists, ``fn`` runs once on them stacked into 1-D tensors (elementwise
    tensor code then works unchanged) and the result is split into 0-d tensors again:
    a chain of k ops over the numbers of n tensors costs one stack per operand and k
    ops instead of k foreach calls of n ops each (Adafactor's step scale over the 66
    vectors of the GPT-like set: 6 foreach calls, ~1 ms, in one). Plain and 0-d tensors
    go straight to ``fn``.
    """
    if not any(isinstance(n, TensorList) for n in numbers):
        return fn(*numbers)

    def run(*values: Any) -> list[torch.Tensor]:
        stacked = [torch.stack(v) if isinstance(v, list) else v for v in values]
        return list(fn(*stacked).unbind())

    node = TensorList(fn=run, args=numbers, scalar_like=True)
    node.serial = True
    return node


# --------------------------------------------------------------------------------------
# TensorList: a list of tensors that behaves like one tensor, through foreach kernels
# --------------------------------------------------------------------------------------

_Fn = Callable[..., Any]


def _values(args: Sequence[Any]) -> list[Any]:
    return [a.value if isinstance(a, TensorList) else a for a in args]


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _device_scalar(value: Any) -> bool:
    """Whether ``value`` is a 0-d tensor on an accelerator: a ``torch._foreach_*`` op
    other than ``mul``/``div`` given one as its scalar reads it to the host (it takes the
    op's ``Scalar`` overload), which waits for the device."""
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type != "cpu"


def _foreach_add_scalar_tensor(
    tensors: list[torch.Tensor], other: torch.Tensor, *, alpha: int, inplace: bool
) -> Any:
    """``tensors + alpha * other`` (``alpha`` 1 or -1) for a 0-d tensor ``other``, through
    the ``Tensor`` overload of ``_foreach_add``. DTensor lists keep the plain ops (their
    dispatch wants every tensor operand to be a DTensor)."""
    if tensors and _is_dtensor(tensors[0]):
        plain: Any = {
            (1, False): torch._foreach_add,
            (1, True): torch._foreach_add_,
            (-1, False): torch._foreach_sub,
            (-1, True): torch._foreach_sub_,
        }[alpha, inplace]
        return plain(tensors, other)
    if inplace:
        torch.ops.aten._foreach_add_.Tensor(tensors, other, alpha=alpha)
        return None
    return torch.ops.aten._foreach_add.Tensor(tensors, other, alpha=alpha)


def _foreach_mul_exact_(tensors: list[torch.Tensor], other: Any) -> None:
    """``torch._foreach_mul_``, with a Python scalar kept exact for float16/bfloat16.

    torch's CPU kernel of ``_foreach_mul_(tensors, scalar)`` rounds the scalar to a
    low-precision list's dtype first (0.9 -> 0.8984375 in bfloat16), unlike ``torch.mul``
    and the out-of-place ``_foreach_mul``; a 0-d float32 tensor is applied exactly.
    """
    if (
        isinstance(other, (int, float))
        and not isinstance(other, bool)
        and tensors
        and tensors[0].dtype in _LOW_PRECISION
    ):
        # a fill, not a copy from pageable host memory (no wait for the device, and
        # nothing a CUDA graph would replay from freed host memory)
        other = torch.full((), float(other), dtype=torch.float32, device=tensors[0].device)
    torch._foreach_mul_(tensors, other)


class TensorList:
    """Many tensors under one set of operators, evaluated with ``torch._foreach_*``.

    Rules are written as ordinary tensor code; run on ``TensorList`` values, every
    operator records a node instead of computing. :func:`evaluate` then runs the nodes
    in order and, knowing each value's last use, computes in place (``_foreach_mul_``
    and friends) into buffers that are dead: temporaries, and, in an in-place step, the
    param and state buffers whose old values are no longer needed. A rule written
    functionally thus runs with the passes and allocations of hand-written in-place
    foreach code.

    Supports ``+ - * / **``, unary minus, comparisons, ``&``, and the methods below. The
    other operand may be a ``TensorList`` of the same length (equal shapes, or 0-d
    tensors for per-tensor scalars), a Python number or a 0-d tensor.
    """

    __slots__ = (
        "args",
        "fn",
        "inplace_fn",
        "into_second_fn",
        "scalar_like",
        "serial",
        "value",
        "writable",
    )

    def __init__(
        self,
        items: Iterable[torch.Tensor] | None = None,
        *,
        fn: _Fn | None = None,
        inplace_fn: _Fn | None = None,
        args: tuple[Any, ...] = (),
        scalar_like: bool = False,
        writable: bool = False,
    ) -> None:
        self.value: list[torch.Tensor] | None = None if items is None else list(items)
        self.fn = fn
        self.inplace_fn = inplace_fn
        self.args = args
        self.scalar_like = scalar_like
        self.writable = writable  # a leaf whose buffers may be overwritten after last use
        # an op that must run on the calling thread only: ATen runs transcendental ops
        # (sqrt, exp, log, pow) through a vector library with its own threads even on
        # small tensors, and arbitrary per-tensor functions may too (see _run_threaded)
        self.serial = False
        # an op that can also write its result into its second argument's buffers, for
        # when only that one is dead (``x + alpha * y`` into ``y``)
        self.into_second_fn: _Fn | None = None

    @property
    def items(self) -> list[torch.Tensor]:
        """The tensors (evaluating this node and what it depends on, if needed)."""
        if self.value is None:
            evaluate([self])
        assert self.value is not None
        return self.value

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "TensorList(leaf)" if self.fn is None else "TensorList(node)"

    def _node(self, fn: _Fn, inplace_fn: _Fn | None, *others: Any) -> TensorList:
        args = (self, *others)
        scalar_like = all(a.scalar_like for a in args if isinstance(a, TensorList))
        return TensorList(fn=fn, inplace_fn=inplace_fn, args=args, scalar_like=scalar_like)

    def _map(self, fn: Callable[..., torch.Tensor], *others: Any) -> TensorList:
        def apply(*values: Any) -> list[torch.Tensor]:
            first = values[0]
            columns = [v if isinstance(v, list) else [v] * len(first) for v in values[1:]]
            return [fn(x, *rest) for x, *rest in zip(first, *columns, strict=True)]

        return self._serial(self._node(apply, None, *others))

    @staticmethod
    def _serial(node: TensorList) -> TensorList:
        node.serial = True
        return node

    # arithmetic -------------------------------------------------------------------------
    def __add__(self, other: Any) -> TensorList:
        if _device_scalar(other):
            return self._add_device_scalar(other, 1)
        return self._node(torch._foreach_add, torch._foreach_add_, other)

    __radd__ = __add__

    def __sub__(self, other: Any) -> TensorList:
        if _device_scalar(other):
            return self._add_device_scalar(other, -1)
        return self._node(torch._foreach_sub, torch._foreach_sub_, other)

    def _add_device_scalar(self, other: torch.Tensor, alpha: int) -> TensorList:
        """``self + alpha * other`` for a 0-d tensor on an accelerator, through the
        ``Tensor`` overload of ``_foreach_add``: given a 0-d tensor, ``torch._foreach_add``
        and ``_foreach_sub`` pick their ``Scalar`` overload and read the value to the
        host, a device sync (measured on an H200: LAMB's and RAdam's steps)."""
        return self._node(
            functools.partial(_foreach_add_scalar_tensor, alpha=alpha, inplace=False),
            functools.partial(_foreach_add_scalar_tensor, alpha=alpha, inplace=True),
            other,
        )

    def __rsub__(self, other: Any) -> TensorList:
        return -self + other

    def __mul__(self, other: Any) -> TensorList:
        return self._node(torch._foreach_mul, _foreach_mul_exact_, other)

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> TensorList:
        return self._node(torch._foreach_div, torch._foreach_div_, other)

    def __rtruediv__(self, other: Any) -> TensorList:
        return self.reciprocal() * other

    def __neg__(self) -> TensorList:
        return self._node(torch._foreach_neg, torch._foreach_neg_)

    def __pow__(self, other: Any) -> TensorList:
        if _device_scalar(other):  # the foreach op would read it to the host
            return self._map(torch.pow, other)
        return self._serial(self._node(torch._foreach_pow, torch._foreach_pow_, other))

    # comparisons (elementwise, per tensor) ----------------------------------------------
    def __gt__(self, other: Any) -> TensorList:
        return self._map(torch.gt, other)

    def __ge__(self, other: Any) -> TensorList:
        return self._map(torch.ge, other)

    def __lt__(self, other: Any) -> TensorList:
        return self._map(torch.lt, other)

    def __le__(self, other: Any) -> TensorList:
        return self._map(torch.le, other)

    def __and__(self, other: Any) -> TensorList:
        return self._map(torch.logical_and, other)

    # methods --------------------------------------------------------------------------
    def sqrt(self) -> TensorList:
        return self._serial(self._node(torch._foreach_sqrt, torch._foreach_sqrt_))

    def abs(self) -> TensorList:
        return self._node(torch._foreach_abs, torch._foreach_abs_)

    def sign(self) -> TensorList:
        return self._node(torch._foreach_sign, torch._foreach_sign_)

    def exp(self) -> TensorList:
        return self._serial(self._node(torch._foreach_exp, torch._foreach_exp_))

    def log(self) -> TensorList:
        return self._serial(self._node(torch._foreach_log, torch._foreach_log_))

    def reciprocal(self) -> TensorList:
        return self._serial(self._node(torch._foreach_reciprocal, torch._foreach_reciprocal_))

    def square(self) -> TensorList:
        return self * self

    def norm(self) -> TensorList:
        """Per-tensor L2 norms, as a list of 0-d tensors."""
        node = self._node(torch._foreach_norm, None)
        node.scalar_like = True
        return self._serial(node)

    def rms(self) -> TensorList:
        """Per-tensor root mean squares, as a list of 0-d tensors (float32 at least:
        squares of float16 overflow; float64 for float32 tensors: ATen's CPU foreach
        norm sums in its input's dtype, 9e-6 off on a vector of 700,000 where the
        reference loop's sums were 1e-7; an empty tensor gives NaN)."""

        def fn(values: list[torch.Tensor]) -> list[torch.Tensor]:
            if not values:
                return []
            dtype = values[0].dtype
            wider = torch.float32 if dtype in _LOW_PRECISION else None
            if dtype == torch.float32:
                wider = torch.float64
            if wider is None:
                norms = list(torch._foreach_norm(values, 2))
            elif all(type(v) in _PLAIN for v in values):
                norms = list(torch._foreach_norm(values, 2, dtype=wider))
            else:
                # DTensor: torch 2.14's sharding rule for a foreach norm with a dtype
                # fails ("'>=' not supported between 'torch.dtype' and 'int'")
                norms = [torch.linalg.vector_norm(v, 2, dtype=wider) for v in values]
            if wider == torch.float64:
                norms = [norm.to(torch.float32) for norm in norms]
            return list(
                torch._foreach_div(norms, [math.sqrt(v.numel()) or math.nan for v in values])
            )

        node = self._node(fn, None)
        node.scalar_like = True
        return self._serial(node)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the tensors (one per list: the engine groups tensors by dtype).
        Evaluates the list if it is not yet computed."""
        return self.items[0].dtype

    def lerp(self, end: Any, weight: Any) -> TensorList:
        if isinstance(weight, (TensorList, torch.Tensor)):
            return self + (end - self) * weight
        return self._node(
            lambda s, e: torch._foreach_lerp(s, e, weight),
            lambda s, e: torch._foreach_lerp_(s, e, weight),
            end,
        )

    def maximum(self, other: Any) -> TensorList:
        if isinstance(other, TensorList):
            return self._node(torch._foreach_maximum, torch._foreach_maximum_, other)
        return self._map(torch.maximum, other)

    def minimum(self, other: Any) -> TensorList:
        if isinstance(other, TensorList):
            return self._node(torch._foreach_minimum, torch._foreach_minimum_, other)
        return self._map(torch.minimum, other)

    def clamp(self, min: Any = None, max: Any = None) -> TensorList:
        if _device_scalar(min) or _device_scalar(max):  # the foreach ops would read them
            return self._map(lambda x, lo, hi: x.clamp(min=lo, max=hi), min, max)
        result = self
        if min is not None:
            result = result._node(torch._foreach_clamp_min, torch._foreach_clamp_min_, min)
        if max is not None:
            result = result._node(torch._foreach_clamp_max, torch._foreach_clamp_max_, max)
        return result

    def addcmul(self, tensor1: Any, tensor2: Any, value: Any = 1) -> TensorList:
        if isinstance(value, torch.Tensor) or not isinstance(tensor1, TensorList):
            return self + tensor1 * tensor2 * value
        return self._node(
            lambda s, a, b: torch._foreach_addcmul(s, a, b, value=value),
            lambda s, a, b: torch._foreach_addcmul_(s, a, b, value=value),
            tensor1,
            tensor2,
        )

    def addcdiv(self, tensor1: Any, tensor2: Any, value: Any = 1) -> TensorList:
        if isinstance(value, torch.Tensor) or not isinstance(tensor1, TensorList):
            return self + tensor1 / tensor2 * value
        return self._node(
            lambda s, a, b: _foreach_addcdiv(s, a, b, value),
            lambda s, a, b: torch._foreach_addcdiv_(s, a, b, value=value),
            tensor1,
            tensor2,
        )

    def where(self, condition: Any, other: Any) -> TensorList:
        """``torch.where(condition, self, other)``, per tensor."""
        return self._map(lambda x, c, o: torch.where(c, x, o), condition, other)

    def to(self, dtype: torch.dtype) -> TensorList:
        return self._map(lambda x: x.to(dtype))

    def nan_to_num(self, nan: float = 0.0) -> TensorList:
        return self._map(lambda x: torch.nan_to_num(x, nan=nan))


def _foreach_addcdiv(
    start: list[torch.Tensor], numerators: Any, denominators: Any, value: Any
) -> list[torch.Tensor]:
    """``torch._foreach_addcdiv``; on DTensors, the in-place op on a copy (torch 2.13 has
    a sharding rule for ``_foreach_addcdiv_`` but none for the out-of-place op)."""
    if start and _is_dtensor(start[0]):
        out = [tensor.clone() for tensor in start]
        torch._foreach_addcdiv_(out, numerators, denominators, value=value)
        return out
    return list(torch._foreach_addcdiv(start, numerators, denominators, value=value))


def _reachable(outputs: Sequence[TensorList]) -> list[TensorList]:
    """Nodes the outputs depend on, each after its arguments (a topological order)."""
    order: list[TensorList] = []
    seen: set[int] = set()
    stack: list[tuple[TensorList, bool]] = [(o, False) for o in reversed(outputs)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in seen:
            continue
        if expanded or node.value is not None:
            seen.add(id(node))
            order.append(node)
            continue
        stack.append((node, True))
        for arg in reversed(node.args):
            if isinstance(arg, TensorList) and id(arg) not in seen:
                stack.append((arg, False))
    return order


class Program:
    """The foreach calls one :func:`evaluate` made, replayable on other tensor lists.

    Every chunk of a group runs the same rule with the same per-step values, so the
    calls, their constant arguments and the buffer reuse decisions are the same for
    all of them; replaying the recorded calls skips building and walking the node
    graph again (tens of microseconds a chunk, measured: a few ms a step on 100
    tensors in 1M-element chunks).
    """

    __slots__ = ("calls", "inputs", "outputs", "serial", "size")

    def __init__(
        self,
        size: int,
        inputs: list[tuple[int, int]],
        calls: list[tuple[_Fn, int | None, int, tuple[tuple[bool, Any], ...], tuple[int, ...]]],
        outputs: list[int],
        serial: bool,
    ) -> None:
        self.size = size  # number of value slots
        self.inputs = inputs  # (slot, position in the inputs given to replay)
        # (function, the argument it writes into (None: returns a new list), output
        #  slot, (is slot, slot or constant) per argument, slots freed after the call)
        self.calls = calls
        self.outputs = outputs  # the slot of each output
        self.serial = serial  # whether any call must stay on the calling thread

    def replay(self, inputs: Sequence[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        slots: list[Any] = [None] * self.size
        for slot, position in self.inputs:
            slots[slot] = inputs[position]
        for fn, into, out, args, frees in self.calls:
            values = [slots[a] if is_slot else a for is_slot, a in args]
            if into is not None:
                fn(*values)
                slots[out] = values[into]
            else:
                slots[out] = list(fn(*values))
            for slot in frees:
                slots[slot] = None
        return [slots[o] for o in self.outputs]


def evaluate(
    outputs: Sequence[TensorList],
    *,
    reuse: bool = True,
    inputs: Sequence[TensorList] = (),
) -> Program | None:
    """Compute ``outputs``, reusing dead buffers in place where allowed (see TensorList).

    Returns the :class:`Program` of the calls made, replayable with other values for
    ``inputs``, or None when the graph read a tensor list that is not one of ``inputs``.
    """
    order = _reachable(outputs)
    slot_of = {id(node): k for k, node in enumerate(order)}
    input_position = {id(x): k for k, x in enumerate(inputs)}
    replayable = True
    program_inputs: list[tuple[int, int]] = []
    calls: list[tuple[_Fn, int | None, int, tuple[tuple[bool, Any], ...], tuple[int, ...]]] = []
    remaining: dict[int, int] = {}
    for node in order:
        if node.value is not None:
            position = input_position.get(id(node))
            if position is None:
                replayable = False
            else:
                program_inputs.append((slot_of[id(node)], position))
        for arg in node.args:
            if isinstance(arg, TensorList):
                remaining[id(arg)] = remaining.get(id(arg), 0) + 1
    pinned = {id(o) for o in outputs}

    def dead(arg: Any, node: TensorList) -> bool:
        """Whether ``node`` may write its result into ``arg``'s buffers."""
        return (
            isinstance(arg, TensorList)
            and arg.writable
            and remaining.get(id(arg), 0) == 1
            and id(arg) not in pinned
            and (node.scalar_like or not arg.scalar_like)
        )

    for node in order:
        if node.value is not None:
            continue
        assert node.fn is not None
        values = _values(node.args)
        fn, into = node.fn, None
        if reuse and node.inplace_fn is not None and dead(node.args[0], node):
            fn, into = node.inplace_fn, 0
        elif reuse and node.into_second_fn is not None and dead(node.args[1], node):
            fn, into = node.into_second_fn, 1
        if into is None:
            node.value = list(fn(*values))
        else:
            fn(*values)
            node.value = values[into]
        node.writable = True
        frees: list[int] = []
        for arg in node.args:
            if isinstance(arg, TensorList):
                remaining[id(arg)] -= 1
                if remaining[id(arg)] == 0 and id(arg) not in pinned and arg.fn is not None:
                    arg.value = None  # free the temporary
                    frees.append(slot_of[id(arg)])
        if into is not None:
            reused = node.args[into]
            reused.value = None
            reused.writable = False
            frees.append(slot_of[id(reused)])
        args = tuple(
            (True, slot_of[id(a)]) if isinstance(a, TensorList) else (False, a) for a in node.args
        )
        calls.append((fn, into, slot_of[id(node)], args, tuple(frees)))
    if not replayable:
        return None
    serial = any(node.serial for node in order)
    return Program(len(order), program_inputs, calls, [slot_of[id(o)] for o in outputs], serial)


def _write_back(pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> None:
    """Copy each source into its destination, ordering copies so none reads a clobbered
    buffer (a source that is also another pair's destination is copied out first)."""
    pending = [(d, s) for d, s in pairs if d is not s and any(map(operator.is_not, d, s))]
    while pending:
        sources = {id(t) for _, s in pending for t in s}
        ready = [p for p in pending if not any(id(t) in sources for t in p[0])]
        if not ready:  # a cycle: break it with a copy of one source
            dst, src = pending[0]
            pending[0] = (dst, [t.clone() for t in src])
            continue
        for dst, src in ready:
            _copy(dst, src)
        pending = [p for p in pending if not any(p is r for r in ready)]


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    pairs = [(d, s) for d, s in zip(dst, src, strict=True) if d is not s]
    if not pairs:
        return
    if any(_is_dtensor(d) for d, _ in pairs):
        for d, s in pairs:
            d.copy_(_same_layout_as(s, d))
        return
    torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])


def _gate(gate: Any, new: Any, old: Any) -> Any:
    """``old`` where ``gate`` (a 0-d bool tensor) is true, else ``new``; no host sync."""
    if gate is None or new is old:
        return new
    if isinstance(new, TensorList):
        return old._map(lambda o, n: torch.where(gate, o, n), new)
    return torch.where(gate, old, new)


def _same_dtype(new: Any, old: Any) -> Any:
    """Keep a tensor output in its input's dtype: a 0-d float64 scalar (e.g. an injected
    learning rate) would otherwise promote a 0-d float32 param and its state; and a
    ``DTensor`` output in its input's placements (see :func:`_same_layout_as`)."""
    if isinstance(new, torch.Tensor) and new.dtype != old.dtype:
        new = new.to(old.dtype)
    return _same_layout_as(new, old)


def _same_layout_as(new: Any, old: Any) -> Any:
    """A ``DTensor`` result redistributed to its input's placements where DTensor's
    sharding propagation chose others (a one-row matrix sharded along its rows, whose
    update broadcasts a factor along that dim, came back replicated), so that an
    in-place copy and the caller's FSDP params keep their layout."""
    if (
        _is_dtensor(new)
        and _is_dtensor(old)
        and new.placements != old.placements
        and new.device_mesh == old.device_mesh
    ):
        return new.redistribute(old.device_mesh, old.placements)
    return new


def _apply_rule(rule: Any, h: Any, gate: Any, param: Any, grad: Any, own: Sequence[Any]) -> Any:
    out = rule.update(param, grad, *own, h)
    if not isinstance(param, TensorList):  # tensor lists are cast after evaluation
        out = (
            _same_dtype(out[0], param),
            *(_same_dtype(n, o) for n, o in zip(out[1:], own, strict=True)),
        )
    if gate is None:
        return out
    gated = [_gate(gate, n, o) for n, o in zip(out[1:], own, strict=True)]
    return (_gate(gate, out[0], param), *gated)


# --------------------------------------------------------------------------------------
# grouping
# --------------------------------------------------------------------------------------


def _any_foreach_leaf(rule: Any) -> bool:
    """Whether some params of ``rule`` can run as foreach programs (all of them, or the
    leaf keys its :meth:`~optorch.base.Rule.foreach_leaf` names)."""
    return bool(rule.foreach_ok) or type(rule).foreach_leaf is not Rule.foreach_leaf


def resolve_impl(rule: Any, config: Any) -> str:
    impl = config.impl
    if impl == "auto":
        return "foreach" if _any_foreach_leaf(rule) else "reference"
    if impl == "foreach" and not _any_foreach_leaf(rule):
        return "reference"
    return impl


def whole_flag(flag: torch.Tensor) -> torch.Tensor:
    """A 0-d decision (``found_inf``, "all finite") as a plain tensor: over ``DTensor``
    grads (FSDP2) a reduction is itself a ``DTensor``, and a gate must be a plain tensor
    to select between the plain local shards the step writes (every rank gets the
    same value: the reduction over all shards)."""
    if _is_dtensor(flag):
        return flag.full_tensor()  # type: ignore[attr-defined]
    return flag


_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


def _group(
    params: Sequence[torch.Tensor], leaf_keys: Sequence[Any]
) -> dict[tuple[Any, ...], list[int]]:
    """Indices grouped by (device, dtype, tensor type, the rule's leaf key)."""
    devices, dtypes, kinds = (
        set(map(_DEVICE, params)),
        set(map(_DTYPE, params)),
        set(map(type, params)),
    )
    keys = set(leaf_keys)
    if len(devices) == len(dtypes) == len(kinds) == len(keys) == 1:  # the usual case
        return {(devices.pop(), dtypes.pop(), kinds.pop(), keys.pop()): list(range(len(params)))}
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (p, key) in enumerate(zip(params, leaf_keys, strict=True)):
        groups.setdefault((p.device, p.dtype, type(p), key), []).append(i)
    return groups


# --------------------------------------------------------------------------------------
# executors
# --------------------------------------------------------------------------------------

Lists = tuple[list[torch.Tensor], list[list[torch.Tensor]]]


def _run_reference(
    rule: Any,
    h: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    inplace: bool,
    leaf_keys: Sequence[Any],
    gate: Any,
) -> Lists:
    new_params: list[torch.Tensor] = []
    new_states: list[list[torch.Tensor]] = [[] for _ in states]
    for i, (param, grad) in enumerate(zip(params, grads, strict=True)):
        own = [field[i] for field in states]
        out = _apply_rule(rule, h.with_leaf(leaf_keys[i]), gate, param, grad, own)
        if inplace:
            if out[0] is not param:
                param.copy_(out[0])
            for old, new in zip(own, out[1:], strict=True):
                if new is not old:
                    old.copy_(new)
            new_params.append(param)
            for column, old in zip(new_states, own, strict=True):
                column.append(old)
        else:
            new_params.append(out[0])
            for column, new in zip(new_states, out[1:], strict=True):
                column.append(new)
    return new_params, new_states


def _foreach_chunks(
    rule: Any,
    params: list[torch.Tensor],
    indices: list[int],
    limit: int | None = None,
    operands: Sequence[list[torch.Tensor]] = (),
) -> list[list[tuple[int, slice | None]]]:
    """Split a group into chunks of about ``limit`` (FOREACH_CHUNK_NUMEL) elements.

    Each entry is (tensor index, flat slice or None for the whole tensor); slicing is
    used only for elementwise rules when the param and every one of its ``operands``
    (grads, state fields) is contiguous: a flat slice is a view of each of them (a
    transposed grad or a state loaded in another layout has none; measured, that failed
    with part of the step already written).
    """
    limit = FOREACH_CHUNK_NUMEL if limit is None else limit
    numels = list(map(torch.Tensor.numel, [params[i] for i in indices]))
    if sum(numels) <= limit:  # one chunk, nothing to split
        return [[(i, None) for i in indices]]
    chunks: list[list[tuple[int, slice | None]]] = []
    current: list[tuple[int, slice | None]] = []
    size = 0
    for i, n in zip(indices, numels, strict=True):
        if n > limit:
            p = params[i]
            sliceable = all(column[i].is_contiguous() for column in operands)
            if rule.elementwise and p.is_contiguous() and sliceable and not _is_dtensor(p):
                for start in range(0, n, limit):
                    chunks.append([(i, slice(start, min(n, start + limit)))])
                continue
        if current and size + n > limit:
            chunks.append(current)
            current, size = [], 0
        current.append((i, None))
        size += n
    if current:
        chunks.append(current)
    return chunks


def _pieces(
    tensors: list[torch.Tensor], chunk: Sequence[tuple[int, slice | None]], whole: bool
) -> list[torch.Tensor]:
    """The chunk's tensors, or flat slices of them."""
    if whole:
        return [tensors[i] for i, _ in chunk]
    return [tensors[i] if part is None else tensors[i].view(-1)[part] for i, part in chunk]


def _run_foreach(
    rule: Any,
    h: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    inplace: bool,
    leaf_keys: Sequence[Any],
    gate: Any,
) -> Lists:
    new_params: list[Any] = list(params) if inplace else [None] * len(params)
    new_states: list[list[Any]] = [list(f) if inplace else [None] * len(params) for f in states]
    # reusing dead buffers is invisible to the caller, but not to autograd
    reuse = not torch.is_grad_enabled()

    def run_chunk(
        h_group: Any, chunk: list[tuple[int, slice | None]], program: Program | None = None
    ) -> Program | None:
        """Run one chunk (replaying ``program`` when given); the program it ran."""
        whole = all(part is None for _, part in chunk)
        inputs = [
            _pieces(params, chunk, whole),
            _pieces(grads, chunk, whole),
            *(_pieces(field, chunk, whole) for field in states),
        ]
        buffers = [inputs[0], *inputs[2:]]
        if program is not None:
            results = program.replay(inputs)
        else:
            p = TensorList(inputs[0], writable=inplace)
            g = TensorList(inputs[1])
            s = [TensorList(values, writable=inplace) for values in inputs[2:]]
            # the lists an in-place evaluation writes into, so that write-back sees them
            buffers = [p.items, *(x.items for x in s)]
            out = _apply_rule(rule, h_group, gate, p, g, s)
            program = evaluate(out, reuse=reuse, inputs=[p, g, *s])
            results = [node.items for node in out]
        for k, (result, buffer) in enumerate(zip(results, buffers, strict=True)):
            if list(map(_DTYPE, result)) != list(map(_DTYPE, buffer)):
                results[k] = [n.to(b.dtype) for n, b in zip(result, buffer, strict=True)]
        if inplace:
            _write_back(list(zip(buffers, results, strict=True)))
        else:
            for k, (i, _) in enumerate(chunk):
                new_params[i] = results[0][k]
                for column, new in zip(new_states, results[1:], strict=True):
                    column[i] = new[k]
        return program

    for (device, dtype, kind, leaf), indices in _group(params, leaf_keys).items():
        h_group = h.with_leaf(leaf)
        if _casts_scalars(device, dtype) and not torch.compiler.is_compiling():
            h_group = _scalars_in_list_dtype(h_group, device, dtype)
        if not rule.foreach_leaf(leaf):  # this leaf key needs the tensors' own shapes
            _scatter(
                indices,
                _run_reference(
                    rule,
                    h,
                    *_subset(indices, params, grads, states),
                    inplace,
                    [leaf] * len(indices),
                    gate,
                ),
                new_params,
                new_states,
            )
            continue
        if not inplace or device.type == "cuda":
            # on a GPU one foreach call over the whole group: chunks keep a CPU's cache
            # warm, and on a GPU each costs a launch per op (measured on an H200: SGD on
            # the GPT-like set took 2.05 ms a step unchunked)
            run_chunk(h_group, [(i, None) for i in indices])
            continue
        chunks = _foreach_chunks(rule, params, indices, operands=[grads, *states])
        may_thread = (
            len(chunks) > 2
            and device.type == "cpu"
            and kind in (torch.Tensor, torch.nn.Parameter)
            and torch.get_num_threads() > 1
        )
        large: list[list[tuple[int, slice | None]]] = []
        small: list[list[tuple[int, slice | None]]] = []
        for chunk in chunks:
            if may_thread and _below_grain(params, chunk):
                whole = [i for i, _ in chunk]
                small.extend(
                    _foreach_chunks(
                        rule, params, whole, THREADED_CHUNK_NUMEL, operands=[grads, *states]
                    )
                )
            else:
                large.append(chunk)
        program: Program | None = None
        for chunk in large:
            program = run_chunk(h_group, chunk, program)
        if small:
            program = run_chunk(h_group, small[0], program)
            if program is not None and not program.serial and len(small) > 2:
                _run_threaded(functools.partial(run_chunk, h_group, program=program), small[1:])
            else:
                for chunk in small[1:]:
                    program = run_chunk(h_group, chunk, program)
    return new_params, new_states


#: ATen runs an elementwise CPU kernel on one thread below this many elements
#: (``at::internal::GRAIN_SIZE``).
_GRAIN = 32768
_POOL: list[Any] = []  # [ThreadPoolExecutor, workers] once made


#: Elements per chunk of small tensors spread over worker threads: finer than
#: FOREACH_CHUNK_NUMEL, so that the chunks share out evenly (the first one runs alone,
#: to record the program the others replay). Measured on 2,000 x 4,096: SGD 20.7 ms
#: a step in 2M-element chunks, 18.4 in 512K.
THREADED_CHUNK_NUMEL = 1 << 19


def _below_grain(tensors: list[torch.Tensor], chunk: list[tuple[int, slice | None]]) -> bool:
    return all(part is None and tensors[i].numel() < _GRAIN for i, part in chunk)


def _forget_pool() -> None:
    _POOL.clear()  # a forked child has none of its parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _run_threaded(fn: Callable[[Any], Any], chunks: list[Any]) -> None:
    """``fn(chunk)`` for every chunk, spread over ``torch.get_num_threads()`` threads.

    For chunks of CPU tensors too small for ATen's own intra-op threads (a foreach
    kernel then runs one tensor after another on one core): the chunks touch disjoint
    tensors, and torch releases the GIL inside kernels, so the threads run the kernels
    side by side. Gradient and inference modes are thread-local: workers run under
    ``no_grad`` (as the in-place step that calls this does), and under
    ``inference_mode`` when the caller is (in-place updates of inference tensors are
    allowed only there).
    """
    from concurrent.futures import ThreadPoolExecutor

    inference = torch.is_inference_mode_enabled()

    workers = min(torch.get_num_threads(), len(chunks))
    if not _POOL or _POOL[1] < workers:
        if _POOL:
            _POOL[0].shutdown(wait=False)
        _POOL[:] = [ThreadPoolExecutor(workers, thread_name_prefix="optorch"), workers]

    def run_share(share: list[Any]) -> None:
        with torch.inference_mode() if inference else torch.no_grad():
            for chunk in share:
                fn(chunk)

    shares = [chunks[k::workers] for k in range(workers)]
    futures = [_POOL[0].submit(run_share, share) for share in shares[1:]]
    try:
        run_share(shares[0])
    finally:
        for future in futures:
            future.result()


# compiled ------------------------------------------------------------------------------

_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
_GATE = "__skip_if__"
_SCRATCH: dict[tuple[Any, ...], list[torch.Tensor]] = {}


@functools.cache
def _inductor_options(device_type: str) -> dict[str, Any]:
    """Inductor options for optorch's kernels on ``device_type`` (cold-start costs).

    On CPU, before its first kernel in a process with a fresh cache, inductor

    * builds a precompiled header of its C++ prelude (about 6 s here, measured), to
      speed up *later* kernel builds; an optimizer has one or two small kernels, each of
      which builds in about 1 s without it, so optorch turns it off;
    * checks each vector ISA the CPU reports by building the ATen vector headers with
      that ISA's flags (about 1.5 s per ISA, 7 s in all here), to find out whether the
      C++ compiler supports it. optorch asks the compiler the same question directly
      (does it accept the ISA's flags and intrinsics header: about 0.2 s each) and,
      when every ISA passes, tells inductor to trust them (``cpp.vec_isa_ok``). Any
      doubt, or ``TORCHINDUCTOR_VEC_ISA_OK`` set by the user, leaves inductor's own
      check in place.

    And one for speed: inductor decides whether a loop is split across threads from the
    sizes of the call it compiles for, and a kernel serves calls of every size (padded
    with two-element scratch tensors): ``cpp.dynamic_threads`` makes every loop a
    parallel one, sized at run time (measured: compiled first for a call padded with
    scratch tensors, the kernel ran those slots' loops on one thread for every later
    call, and an AdamW step took 70 ms instead of 43).
    """
    if device_type != "cpu":
        return {}
    options: dict[str, Any] = {"cpp_cache_precompile_headers": False, "cpp.dynamic_threads": True}
    if os.environ.get("TORCHINDUCTOR_VEC_ISA_OK") is None and _compiler_takes_cpu_isas():
        options["cpp.vec_isa_ok"] = True
    # an older torch lacks some of these settings (2.4: no precompiled headers to turn
    # off) and refuses a compile that names one
    return _known_options(options)


def _compiler_takes_cpu_isas() -> bool:
    """Whether inductor's C++ compiler accepts the flags of every x86 vector ISA this
    CPU supports (False when unsure: another architecture, torch internals moved)."""
    if platform.machine() not in ("x86_64", "AMD64") or sys.platform != "linux":
        return False
    try:
        from torch._inductor import cpp_builder, cpu_vec_isa

        cpu_flags = set(cpu_vec_isa.x86_isa_checker())
        isas = [
            isa
            for isa in cpu_vec_isa.supported_vec_isa_list
            if str(isa) and all(flag in cpu_flags for flag in str(isa).split())
        ]
        compiler = cpp_builder.get_cpp_compiler()
        for isa in isas:
            subprocess.run(
                [compiler, *shlex.split(isa.build_arch_flags()), "-fsyntax-only", "-x", "c++", "-"],
                input="#include <immintrin.h>\nint main() { return 0; }\n",
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            )
    except Exception:  # any doubt: inductor checks for itself
        return False
    return bool(isas)


def _scalar_pack(
    h: Any, gate: Any, device: torch.device, constant_names: Sequence[str] = ()
) -> tuple[tuple[str, ...], torch.Tensor, dict[str, Any], tuple[tuple[str, Any], ...]]:
    """Every per-step value (and the gate) packed into one 1-D float64 tensor.

    Returns ``(names, pack, others, constants)``: ``pack[i]`` holds the value named
    ``names[i]``; ``others`` are the non-numeric values; ``constants`` the Python numbers
    named in ``constant_names`` (the rule's ``config_scalars``), which the kernel is
    built with (see :func:`_compiled_fn`): a new Python-number value of one of those
    (a float ``weight_decay`` or ``betas`` changed between steps) builds a new kernel,
    while 0-d tensors travel in the pack. One tensor input
    instead of one per value: a change of a packed value never recompiles, there is a
    single argument to guard on, and no 0-d tensor input, which dynamo would trace as
    a symbolic float through ``.item()`` and then restart its analysis to specialize
    (seconds of compile time).
    """
    # float64, so that scalar arithmetic inside the rule (``1 - beta2``) is as exact as
    # the Python floats of the eager paths; a 0-d tensor does not promote the params'
    # dtype
    names: list[str] = []
    numbers: list[Any] = []
    others: dict[str, Any] = {}
    constants: list[tuple[str, Any]] = []
    for key, value in h.values().items():
        if key in constant_names and isinstance(value, (int, float)):
            constants.append((key, value))
        elif isinstance(value, (torch.Tensor, int, float)):
            names.append(key)
            numbers.append(float(value) if isinstance(value, bool) else value)
        else:
            others[key] = value
    if gate is not None:
        names.append(_GATE)
        numbers.append(gate)
    return tuple(names), _pack_values(numbers, device), others, tuple(constants)


def _pack_values(numbers: list[Any], device: torch.device) -> torch.Tensor:
    """``numbers`` (Python numbers, 0-d tensors) as one 1-D float64 tensor on ``device``.

    On a CUDA device, the values on the host (Python numbers, and per-step values that
    rules compute from the host-side step counter) travel in one copy from pinned
    memory that does not wait for the device: a copy from pageable memory would make
    every step wait until the device had finished all earlier work. Values already on
    the device are put in place there; values that autograd records keep the plain path.
    """
    tensors = [v for v in numbers if isinstance(v, torch.Tensor)]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # being recorded as a CUDA graph (optorch.graphs): a copy from pinned memory
        # would be replayed from that host memory, long since reused; a fill kernel
        # holds its number itself (host numbers here are the config's constants)
        pack = torch.empty(len(numbers), dtype=torch.float64, device=device)
        for index, value in enumerate(numbers):
            if isinstance(value, torch.Tensor):
                pack[index].copy_(value.reshape(()))
            else:
                pack[index].fill_(float(value))
        return pack
    if device.type != "cuda" or any(t.requires_grad for t in tensors):
        if tensors:
            return torch.stack(
                [
                    torch.as_tensor(v, dtype=torch.float64, device=device).reshape(())
                    for v in numbers
                ]
            )
        return torch.tensor(numbers, dtype=torch.float64, device=device)
    on_device = [isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in numbers]
    host = (
        torch.stack(
            [
                torch.zeros((), dtype=torch.float64)
                if there
                else torch.as_tensor(v, dtype=torch.float64).reshape(())
                for v, there in zip(numbers, on_device, strict=True)
            ]
        )
        if tensors
        else torch.tensor(numbers, dtype=torch.float64)
    )
    pack = host.pin_memory().to(device, non_blocking=True)
    for index, there in enumerate(on_device):
        if there:
            pack[index] = numbers[index].to(device=device, dtype=torch.float64).reshape(())
    return pack


def _compiled_fn(
    rule: Any,
    static: Any,
    leaf: Any,
    inplace: bool,
    flat: bool,
    names: tuple[str, ...],
    device_type: str,
    dtype: torch.dtype,
    constants: tuple[tuple[str, Any], ...] = (),
) -> Callable[..., Any]:
    # one compiled function per dtype too: otherwise every dtype adds a graph to the same
    # function, and enough of them hit dynamo's recompile limit (an error under fullgraph).
    # ``constants`` (config-only values) are closed over, not passed: the kernel holds
    # them as literals (measured: AdamW on 51M params 38.6 -> 35.2 ms with all of its
    # values literal; a value loaded from memory is reloaded for every vector because
    # the compiler cannot prove the stores do not alias it)
    key = (type(rule), static, leaf, inplace, flat, names, device_type, dtype, constants)
    fn = _COMPILED.get(key)
    if fn is not None:
        return fn
    gated = _GATE in names

    def chunk_step(
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[list[torch.Tensor]],
        pack: torch.Tensor,
        others: dict[str, Any],
    ) -> Any:
        values = {name: pack[i] for i, name in enumerate(names)}
        gate = values.pop(_GATE) != 0 if gated else None
        values.update(others)
        values.update(constants)
        h = Hyper(values, static, leaf)
        h.kernel = True
        outs = []
        for i in range(len(params)):
            outs.append(_apply_rule(rule, h, gate, params[i], grads[i], [f[i] for f in states]))
        if not inplace:
            return outs
        for i, out in enumerate(outs):
            params[i].copy_(out[0])
            for field, new in zip(states, out[1:], strict=True):
                field[i].copy_(new)
        return None

    # dynamo caches per code object: give every (rule, options) its own, so that kernels
    # of different rules never count against each other's recompile limit
    code = chunk_step.__code__.replace(co_name=f"optorch_{rule.name}_step_{len(_COMPILED)}")
    unique = types.FunctionType(
        code, chunk_step.__globals__, code.co_name, None, chunk_step.__closure__
    )
    options = {**_inductor_options(device_type), **_known_options(rule.inductor_options)}
    if dtype in _LOW_PRECISION:
        # eager ATen rounds each op's result to float16/bfloat16; inductor would keep a
        # fused expression in float32 and round once. Emulating eager's roundings keeps
        # the compiled step within a rounding per op of the reference's, though not
        # bit-equal: eager also rounds some scalars (add's alpha) to the low precision
        # first, where the kernel multiplies in float32. Measured without: float16
        # Adam's 1 - beta2 times a small g^2 underflowed to 0 in the reference and not
        # in the kernel, so one impl overflowed and the other did not; LAMB's norm pass
        # and update pass then disagreed and a pure step moved params by 2.7 at lr 1e-3
        options = {**options, **_known_options({"emulate_precision_casts": True})}
    if flat and not rule.elementwise and device_type == "cpu":
        options = {**options, **_known_options(_RECOMPUTE)}
    fn = torch.compile(unique, dynamic=True, fullgraph=True, options=options)
    _COMPILED[key] = fn
    return fn


def _known_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` less the names this torch's inductor has no setting for."""
    from torch._inductor import config as inductor_config

    known = {}
    for name, value in options.items():
        owner: Any = inductor_config
        *path, last = name.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        if owner is not None and hasattr(owner, last):
            known[name] = value
    return known


#: For rules with per-tensor norms (LAMB, LARS) on CPU: the update direction feeds both
#: its norm (a reduction) and the param update, and inductor's default stores it to a
#: full-size buffer between the two loops, allocated afresh at every call (page faults
#: each step). Recomputing it in the second loop from the state it reads anyway costs
#: arithmetic and no memory: LAMB on the GPT-like set 83-90 -> 76-78 ms a step, 0 MB
#: extra instead of up to 45.
_RECOMPUTE = {"realize_cpu_opcount_threshold": 10_000, "realize_reads_threshold": 10_000}


def _scratch(
    key: tuple[Any, ...], count: int, dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    cached = _SCRATCH.setdefault(key, [])
    # grown in place, never replaced: a CUDA graph (optorch.graphs) recorded with some
    # of these reads and writes them at every replay, so they must stay allocated
    cached.extend(torch.zeros(2, dtype=dtype, device=device) for _ in range(count - len(cached)))
    return cached[:count]


def _flat_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor on ``tensor``'s memory that is not a view of it.

    Dynamo guards on a view's base (its rank and sizes), so flat *views* of tensors of
    different shapes would compile different kernels; plain tensors that share the
    storage do not. Not for steps that autograd records (it does not see through
    ``set_``): those run the reference loop.
    """
    key = id(tensor)
    where = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
    known = _ALIASES.get(key)
    if known is not None and known[0]() is tensor and known[1] == where:
        return known[2]  # the same memory as last step: ~0.5 us instead of ~4
    alias = torch.empty((0,), dtype=tensor.dtype, device=tensor.device)
    alias.set_(tensor.untyped_storage(), tensor.storage_offset(), (tensor.numel(),), (1,))
    _ALIASES[key] = (weakref.ref(tensor, functools.partial(_forget_alias, key)), where, alias)
    return alias


#: id(tensor) -> (weak reference to it, (data_ptr, numel, dtype) when made, its alias).
#: An alias holds the tensor's storage, which the tensor holds anyway; it is dropped
#: with the tensor, and remade when the tensor's memory changed (``set_``, ``.data``).
_ALIASES: dict[int, tuple[Any, tuple[int, int, torch.dtype], torch.Tensor]] = {}


def _forget_alias(key: int, _ref: Any) -> None:
    _ALIASES.pop(key, None)


def _tracing_settings() -> Any:
    """The tracing settings of every compiled call.

    No duck shapes (tensors of equal sizes in the first call must not share a size
    symbol), and Python floats specialized: the only floats a kernel sees are a rule's
    ``config_scalars`` (per-step values travel in the pack tensor), and as literals the
    C++ compiler keeps them out of the loop; left symbolic, dynamo turns them into 0-d
    tensor inputs reloaded for every vector.
    """
    # an older torch lacks a setting (2.4 has no ``use_duck_shape``), and its ``patch``
    # raises for a name it does not know: only the settings this torch has are patched
    try:
        from torch.fx.experimental import _config as fx_config

        shapes = (
            fx_config.patch(use_duck_shape=False)  # type: ignore[attr-defined]
            if hasattr(fx_config, "use_duck_shape")
            else nullcontext()
        )
    except ImportError:  # pragma: no cover - older torch
        shapes = nullcontext()
    floats = (
        torch._dynamo.config.patch(specialize_float=True)
        if hasattr(torch._dynamo.config, "specialize_float")
        else nullcontext()
    )
    stack = contextlib.ExitStack()
    stack.enter_context(shapes)
    stack.enter_context(floats)
    return stack


def _run_compiled(
    rule: Any,
    h: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    inplace: bool,
    leaf_keys: Sequence[Any],
    gate: Any,
) -> Lists:
    new_params: list[Any] = list(params) if inplace else [None] * len(params)
    new_states: list[list[Any]] = [list(f) if inplace else [None] * len(params) for f in states]
    small: list[int] = []
    for (device, dtype, kind, leaf), indices in _group(params, leaf_keys).items():
        if kind is not torch.Tensor and kind is not torch.nn.Parameter:
            small.extend(indices)  # tensor subclasses (DTensor): run eagerly
            continue
        names, pack, others, constants = _scalar_pack(h, gate, device, rule.config_scalars)
        flat = rule.flattenable
        # small tensors run as one foreach program where the rule allows; a rule that
        # needs each tensor's shape runs them one by one, compiled (2+ elements)
        min_numel = COMPILED_MIN_NUMEL if flat or rule.foreach_leaf(leaf) else 2
        usable = [
            i
            for i in indices
            if params[i].numel() >= min_numel
            and (
                not flat
                or all(t.is_contiguous() for t in (params[i], grads[i], *(f[i] for f in states)))
            )
        ]
        chosen = set(usable)
        small.extend(i for i in indices if i not in chosen)
        if not usable:
            continue
        usable.sort(key=lambda i: params[i].numel())
        fn = _compiled_fn(rule, h.static, leaf, inplace, flat, names, device.type, dtype, constants)
        width = (CHUNK if rule.elementwise else CHUNK_WITH_NORMS) if flat else 1
        if flat and device.type == "cuda":
            # on a GPU each call's host cost (guards, wrappers) outweighs its kernels:
            # up to CHUNK_CUDA tensors a call (see CHUNK_CUDA)
            width = min(CHUNK_CUDA, len(usable))
        with _tracing_settings():  # entered once a group: ~45 us each time
            for start in range(0, len(usable), width):
                chunk = usable[start : start + width]
                p, g, s = _chunk_inputs(chunk, width, params, grads, states, flat)
                out = fn(p, g, s, pack, others)
                if not inplace:
                    for k, i in enumerate(chunk):
                        new_params[i] = _shaped(out[k][0], params[i])
                        for column, field, new in zip(new_states, states, out[k][1:], strict=True):
                            column[i] = _shaped(new, field[i])
    if small:
        # _run_foreach runs the leaf keys the rule cannot run as foreach one by one
        sub_keys = [leaf_keys[i] for i in small]
        out = _run_foreach(rule, h, *_subset(small, params, grads, states), inplace, sub_keys, gate)
        _scatter(small, out, new_params, new_states)
    return new_params, new_states


def _shaped(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A kernel's output with the shape of the input it replaces (a view only where the
    kernel ran on a flat alias: a view's base is one more thing a compiled call guards)."""
    return out if out.shape == like.shape else out.view(like.shape)


def _subset(
    indices: list[int],
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
    """The params, grads and state fields at ``indices``."""
    return (
        [params[i] for i in indices],
        [grads[i] for i in indices],
        [[f[i] for i in indices] for f in states],
    )


def _scatter(
    indices: list[int], out: Lists, new_params: list[Any], new_states: list[list[Any]]
) -> None:
    """Put the results ``out`` for ``indices`` into the step's result lists."""
    out_p, out_s = out
    for k, i in enumerate(indices):
        new_params[i] = out_p[k]
        for column, new in zip(new_states, out_s, strict=True):
            column[i] = new[k]


def _chunk_inputs(
    chunk: list[int],
    width: int,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    flat: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]]:
    """One compiled call's params, grads and state fields: flat 1-D tensors for
    flattenable rules, padded to ``width`` with small scratch tensors."""
    if flat:
        # aliases, not views, in place and pure (no step autograd records comes here)
        p = [_flat_alias(params[i]) for i in chunk]
        g = [_flat_alias(grads[i]) for i in chunk]
        s = [[_flat_alias(f[i]) for i in chunk] for f in states]
    else:
        p, g, s = _subset(chunk, params, grads, states)
    pad = width - len(chunk)
    if pad:
        like = params[chunk[0]]
        scratch = _scratch(
            (like.device, like.dtype), pad * (2 + len(states)), like.dtype, like.device
        )
        p = p + scratch[:pad]
        g = g + scratch[pad : 2 * pad]
        s = [col + scratch[(2 + k) * pad : (3 + k) * pad] for k, col in enumerate(s)]
    return p, g, s


def _step_tensors(params: Sequence[Any], grads: Sequence[Any], h: Any, gate: Any) -> list[Any]:
    """Every tensor a step reads besides the state: params, grads, per-step values, gate."""
    scalars = [v for v in h.values().values() if isinstance(v, torch.Tensor)]
    return [*params, *grads, *scalars, *([] if gate is None else [gate])]


def _under_functorch(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether a torch.func transform traces any of ``tensors`` (e.g. only a vmapped lr)."""
    if torch.compiler.is_compiling():
        return False  # dynamo traces the transforms itself
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor, peek_interpreter_stack
    except ImportError:  # pragma: no cover
        return False
    if peek_interpreter_stack() is None:
        return False  # no transform is running: nothing can be wrapped
    return any(is_functorch_wrapped_tensor(t) for t in tensors)


def _carries_tangent(tensors: Iterable[Any]) -> bool:
    """Whether a forward-mode AD level is open and one of ``tensors`` is a dual tensor
    (``torch.autograd.forward_ad.make_dual``); O(1) when no level is open."""
    from torch.autograd import forward_ad

    if getattr(forward_ad, "_current_level", -1) < 0 or torch.compiler.is_compiling():
        return False
    return any(
        isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None
        for t in tensors
    )


def _casts_scalars(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the foreach engine gives a group on ``device`` of ``dtype`` its per-step
    scalar tensors in that dtype (:func:`_scalars_in_list_dtype`): float32 on CUDA."""
    return device.type == "cuda" and dtype == torch.float32


def _scalars_in_list_dtype(h: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """``h`` with its 0-d float64 tensors on ``device`` in ``dtype`` (float32 lists).

    The step counter lives on the params' device, so the per-step values that rules
    compute from it (bias corrections, ...) are float64 device tensors. ATen's CUDA
    ``_foreach_mul_``/``_foreach_div_`` take their one-launch route for a scalar tensor
    only when it has the list's dtype, and otherwise loop over the tensors (measured on
    an H200: AdamW's foreach step on 100 tensors made about 100 ``mul_`` and 100 ``div_``
    launches). Those kernels compute in float32 either way, the scalar cast to it;
    arithmetic between two such scalars inside a rule now rounds to float32 too.
    Not for float16/bfloat16 lists, whose kernels would read the scalar in their own
    dtype. (Written from ATen's source and the profile; the speed-up was not measured:
    the session that wrote it had no device time left.)
    """
    return h.replaced(
        {
            name: value.to(dtype)
            for name, value in h.values().items()
            if isinstance(value, torch.Tensor)
            and value.device == device
            and value.dtype == torch.float64
            and value.dim() == 0
            and not value.requires_grad
        }
    )


def records_grad(*tensors: Any) -> bool:
    """Whether autograd records ops on ``tensors`` (a differentiable step): grad mode is
    on and one of them requires grad."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


_EXECUTORS = {"reference": _run_reference, "foreach": _run_foreach, "compiled": _run_compiled}


def _same_layout(tensor: Any, like: Any) -> bool:
    return (
        _is_dtensor(tensor)
        and tensor.device_mesh == like.device_mesh
        and tensor.placements == like.placements
        and tensor.shape == like.shape
    )


def _layouts_differ(
    params: list[torch.Tensor], grads: list[torch.Tensor], states: list[list[torch.Tensor]]
) -> bool:
    """Whether a DTensor param's grad or state has another layout (a replicated grad or
    state of a sharded param)."""
    return any(
        _is_dtensor(param)
        and not all(_same_layout(t, param) for t in (grads[i], *(f[i] for f in states)))
        for i, param in enumerate(params)
    )


def _local_shards(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    inplace: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]] | None:
    """Each operand's local shard, when every param is a DTensor and its grad and state
    share its layout (FSDP2 params, their grads, state from ``init``); else None."""
    if not all(_is_dtensor(p) for p in params):
        return None
    if _layouts_differ(params, grads, states):
        return None
    # in place, the shards are written through: they must be the DTensors' own buffers,
    # which to_local() returns outside autograd
    context = torch.no_grad() if inplace else nullcontext()
    with context:
        return (
            [p.to_local() for p in params],  # type: ignore[attr-defined]
            [g.to_local() for g in grads],  # type: ignore[attr-defined]
            [[s.to_local() for s in field] for field in states],  # type: ignore[attr-defined]
        )


def _as_dtensors(locals_: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return [
        DTensor.from_local(
            local,
            p.device_mesh,  # type: ignore[attr-defined]
            p.placements,  # type: ignore[attr-defined]
            run_check=False,
            shape=p.shape,
            stride=p.stride(),
        )
        for local, p in zip(locals_, like, strict=True)
    ]


def run(
    rule: Any,
    config: Any,
    h: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    gate: torch.Tensor | None = None,
    leaf_keys: list[Any] | None = None,
) -> Lists:
    """Execute ``rule`` over aligned lists; returns (params, states) lists.

    ``gate``: a 0-d bool tensor; where true, every output equals its input bit for bit
    (a skipped step), decided on the device without a host sync. ``leaf_keys``: the
    rule's :meth:`~optorch.base.Rule.leaf_key` per param, when the params given are
    views of the ones the keys belong to (complex params seen as real).
    """
    if not params:
        return [], [[] for _ in states]
    if leaf_keys is None and any(map(torch.is_complex, params)):
        return _run_as_real(rule, config, h, params, grads, states, gate)
    if rule.elementwise and _is_dtensor(params[0]):
        local = _local_shards(params, grads, states, config.inplace)
        if local is not None:
            # an elementwise rule on operands sharded alike is the same rule on each
            # rank's shards: no DTensor dispatch per op (2x slower for foreach, 7x for
            # the reference loop, measured), and the compiled kernels apply
            local_p, local_g, local_s = local
            new_p, new_s = run(rule, config, h, local_p, local_g, local_s, gate, leaf_keys)
            if config.inplace:
                return list(params), [list(field) for field in states]
            return _as_dtensors(new_p, params), [_as_dtensors(col, params) for col in new_s]
    if any(p.dim() == 0 for p in params) and not _is_dtensor(params[0]):
        return _run_as_vectors(rule, config, h, params, grads, states, gate, leaf_keys)
    impl = resolve_impl(rule, config)
    tensors = _step_tensors(params, grads, h, gate)
    # lazily: both return before looking at a tensor unless a transform or a forward-AD
    # level is active (no list of every operand built on each eager step)
    if impl != "reference" and _under_functorch(itertools.chain(tensors, *states)):
        impl = "reference"  # torch.func transforms trace plain tensor ops best
    if impl != "reference" and _carries_tangent(itertools.chain(tensors, *states)):
        # forward-mode AD (torch.autograd.forward_ad's dual tensors): the foreach kernels
        # give a 0-d scalar's tangent the wrong shape or drop it (LAMB failed, RAdam's
        # tangent came out 0); the per-tensor ops carry it
        impl = "reference"
    if (
        impl != "reference"
        and not config.inplace
        and records_grad(*tensors, *(t for field in states for t in field))
    ):
        # autograd through torch._foreach_* has gaps: no gradient into a 0-d tensor
        # scalar (`_foreach_mul(list, lr)` fails in backward) nor into the divisor of
        # `_foreach_addcdiv` when a list holds a 0-d tensor. The compiled kernels would
        # need differentiable flat views, whose bases dynamo guards on (rank, strides,
        # offset): a recompile for each new layout of a chunk, and a hard error after
        # eight under fullgraph
        impl = "reference"
    if impl != "reference" and _is_dtensor(params[0]) and _layouts_differ(params, grads, states):
        # DTensor redistributes such operands op by op, which its in-place foreach ops
        # cannot do for every layout (a param's dim smaller than the mesh: "in-place
        # operations that require placement changes are not supported", after the
        # moments were written); the per-tensor loop can
        impl = "reference"
    if impl != "reference" and torch.compiler.is_compiling():
        # already inside a compiled graph: inductor fuses the per-tensor code itself, and
        # dynamo cannot trace TensorList's lazy graph (a graph break under fullgraph=True)
        impl = "reference"
    executor = _EXECUTORS[impl]
    if leaf_keys is None:
        leaf_keys = _leaf_keys(rule, config, params)
    context = torch.no_grad() if config.inplace else nullcontext()
    with context:
        return executor(rule, h, params, grads, states, config.inplace, leaf_keys, gate)


def _leaf_keys(rule: Any, config: Any, params: list[torch.Tensor]) -> list[Any]:
    if type(rule).leaf_key is Rule.leaf_key:  # no per-leaf classes
        return [None] * len(params)
    return [rule.leaf_key(p, config) for p in params]


def as_real(t: torch.Tensor, *, read_only: bool = False) -> torch.Tensor:
    """A complex tensor as its real and imaginary parts, a view with a trailing dim of 2
    (``torch.view_as_real``): its L2 norm is the complex one, and elementwise math on it
    treats the parts as two coordinates; any other tensor as it is."""
    if not t.is_complex():
        return t
    # a conjugate view (``z.conj()``) has no real view of its own memory: a gradient is
    # read, so it may be resolved into a copy (``resolve_conj`` is the tensor itself
    # otherwise); a param or state written in place may not (torch.view_as_real refuses
    # it, saying so)
    return torch.view_as_real(t.resolve_conj() if read_only else t)


def _as_complex(new: torch.Tensor) -> torch.Tensor:
    # a result laid out so that (re, im) pairs sit side by side is viewed, any other
    # copied; while compiling (dynamo cannot trace storage_offset) always through
    # contiguous(), which is the tensor itself when it already is
    if torch.compiler.is_compiling():
        return torch.view_as_complex(new.contiguous())
    viewable = (
        new.stride(-1) == 1
        and new.storage_offset() % 2 == 0
        and all(stride % 2 == 0 for stride in new.stride()[:-1])
    )
    return torch.view_as_complex(new if viewable else new.contiguous())


def _run_as_real(
    rule: Any,
    config: Any,
    h: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    gate: torch.Tensor | None,
) -> Lists:
    """:func:`run` with every complex operand seen as real: ``torch.view_as_real``, a
    view with a trailing dim of 2 (real and imaginary parts), as torch.optim does. A
    complex number is two real coordinates to the rule: elementwise state (moments,
    accumulators) is kept per coordinate, and a tensor's norm is the complex one. The
    rule's per-leaf classes are taken from the complex params (a complex vector stays
    a vector); in place the writes reach the complex tensors, and pure results are
    viewed as complex again.
    """
    pure = not config.inplace  # params and state are only read
    return _run_viewed(
        rule,
        config,
        h,
        (params, grads, states),
        gate,
        _leaf_keys(rule, config, params),
        lambda t: as_real(t, read_only=pure),
        lambda g: as_real(g, read_only=True),
        lambda new, old: _as_complex(new) if old.is_complex() else new,
    )


def _run_viewed(
    rule: Any,
    config: Any,
    h: Any,
    operands: tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor]]],
    gate: torch.Tensor | None,
    leaf_keys: list[Any] | None,
    view: Callable[[torch.Tensor], torch.Tensor],
    view_grad: Callable[[torch.Tensor], torch.Tensor],
    back: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> Lists:
    """:func:`run` on views of the operands: in place the writes reach the given
    tensors (returned as they are); pure results are mapped ``back(new, given)``."""
    params, grads, states = operands
    new_p, new_s = run(
        rule,
        config,
        h,
        [view(p) for p in params],
        [view_grad(g) for g in grads],
        [[view(t) for t in field] for field in states],
        gate,
        leaf_keys,
    )
    if config.inplace:
        return list(params), [list(field) for field in states]
    return (
        [back(n, o) for n, o in zip(new_p, params, strict=True)],
        [
            [back(n, o) for n, o in zip(column, field, strict=True)]
            for column, field in zip(new_s, states, strict=True)
        ],
    )


def _run_as_vectors(
    rule: Any,
    config: Any,
    h: Any,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[list[torch.Tensor]],
    gate: torch.Tensor | None,
    leaf_keys: list[Any] | None = None,
) -> Lists:
    """:func:`run` with every 0-d operand seen as a 1-element vector (a view: in place,
    the writes reach the 0-d tensors).

    Two 0-d operands promote to the wider dtype, so a 0-d float32 param (a learnable
    scale) times a 0-d float64 hyperparameter (``weight_decay`` as a tensor, or
    injected) became float64 mid-rule, and an op mixing it with the float32 state
    failed (``lerp``); a vector and a 0-d number keep the vector's dtype.
    """

    def vector(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(1) if t.dim() == 0 else t

    def back(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new.reshape(()) if old.dim() == 0 else new

    return _run_viewed(
        rule, config, h, (params, grads, states), gate, leaf_keys, vector, vector, back
    )
