"""Wrappers that decide whether the inner step happens: :func:`accumulate` and
:func:`skip_nonfinite`.

Both pass their decision to the inner step as ``skip_if`` (a 0-d bool tensor), so the
decision is made on the device without a host sync and works inside compiled code;
every wrapper in :mod:`optorch.wrappers` honours ``skip_if`` for its own state too.
Put them outermost: ``accumulate(ema(adamw))`` updates the average once per real step,
whereas ``ema(accumulate(adamw))`` would average on every micro-step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from optorch.engine import whole_flag
from optorch.tree import PyTree, flatten, unflatten
from optorch.wrappers._core import (
    Wrapper,
    aligned_leaves,
    as_gate,
    check_count,
    check_counter,
    check_grads,
    check_step,
    commit,
    counter,
    either,
    expect_keys,
    host_readable,
    params_tree,
)

__all__ = ["Accumulate", "SkipNonfinite", "accumulate", "skip_nonfinite"]


class Accumulate(Wrapper):
    """Gradient accumulation over ``every`` calls. See :func:`accumulate`."""

    kind = "accumulate"

    def __init__(self, inner: Any, every: int) -> None:
        super().__init__(inner)
        check_count("accumulate", "every", every, minimum=1)
        self.every = every

    @property
    def name(self) -> str:
        return f"accumulate({self.inner.name}, every={self.every})"

    def init(self, params: Any) -> dict[str, Any]:
        tree = params_tree(params)
        _, leaves_, spec = flatten(tree)
        mean = [
            torch.zeros_like(p, memory_format=torch.preserve_format).detach()
            if isinstance(p, torch.Tensor)
            else None
            for p in leaves_
        ]
        count = counter(leaves_)
        return {
            "inner": self.inner.init(tree),
            "grad_mean": unflatten(spec, mean),
            "count": count,
            SEEN: torch.zeros(len(leaves_), dtype=torch.bool, device=count.device),
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
        expect_keys(who, state, ("inner", "grad_mean", "count"))
        check_counter(who, state, "count", below=self.every)
        gate = as_gate(who, skip_if)
        _, _, g_leaves = check_grads(who, params, grads)
        mean_spec = flatten(state["grad_mean"])[2]
        old_mean = aligned_leaves(who, "grad_mean", state["grad_mean"], params)
        count = state["count"]
        seen = _check_seen(who, state, count, len(g_leaves))
        taken = count + 1
        # running mean: a missing gradient counts as zero for this micro-batch
        new_mean = [
            None if m is None else (m - m / taken if g is None else m + (g - m) / taken)
            for m, g in zip(old_mean, g_leaves, strict=True)
        ]
        # the inner step sees the mean for the leaves that have a gradient now or had
        # one earlier in the cycle (as torch's accumulated .grad), where that is known
        # on the host; others sit the step out (None)
        earlier = seen.tolist() if seen is not None and host_readable(seen) else None
        mean_grads = unflatten(
            flatten(grads)[2],
            [
                m if g is not None or (earlier is not None and earlier[i]) else None
                for i, (m, g) in enumerate(zip(new_mean, g_leaves, strict=True))
            ],
        )
        if count.device.type == "cpu":
            present = torch.tensor([g is not None for g in g_leaves], dtype=torch.bool)
            now_seen = present if seen is None else seen | present
        else:
            # flags on an accelerator could not be read without a sync: not kept there
            # (a None gradient on the k-th call then sits the step out)
            now_seen = torch.zeros(len(g_leaves), dtype=torch.bool, device=count.device)
        inplace = self.inplace
        if gate is None and host_readable(count):
            # eager fast path: no inner call (and no wasted compute) before the k-th call
            if int(taken) < self.every:
                if hyper_overrides:  # checked as the step that does not run now
                    skip = torch.ones((), dtype=torch.bool)
                    check_step(
                        self.inner, params, mean_grads, state["inner"], hyper_overrides, skip
                    )
                kept = commit(old_mean, new_mean, inplace=inplace, skip=None)
                return params, self._state(state, state["inner"], kept, mean_spec, taken, now_seen)
            params, inner_state = self.inner.step(
                params, mean_grads, state["inner"], hyper_overrides=hyper_overrides
            )
            zeros = [None if m is None else torch.zeros_like(m) for m in old_mean]
            kept = commit(old_mean, zeros, inplace=inplace, skip=None)
            return params, self._state(
                state,
                inner_state,
                kept,
                mean_spec,
                torch.zeros_like(count),
                torch.zeros_like(now_seen),
            )
        is_last = taken >= self.every
        params, inner_state = self.inner.step(
            params,
            mean_grads,
            state["inner"],
            hyper_overrides=hyper_overrides,
            skip_if=either(~is_last, gate),
        )
        reset = [
            None if m is None else torch.where(is_last, torch.zeros_like(m), m) for m in new_mean
        ]
        kept = commit(old_mean, reset, inplace=inplace, skip=gate)
        new_count = torch.where(is_last, torch.zeros_like(count), taken)
        new_seen = torch.where(is_last, torch.zeros_like(now_seen), now_seen)
        if gate is not None:
            new_count = torch.where(gate, count, new_count)
            # a skipped call records nothing (a state without flags starts with none)
            kept_seen = torch.zeros_like(now_seen) if seen is None else seen
            new_seen = torch.where(gate, kept_seen, new_seen)
        return params, self._state(state, inner_state, kept, mean_spec, new_count, new_seen)

    def _state(
        self,
        state: Mapping[str, Any],
        inner_state: Any,
        mean: list[Any],
        mean_spec: Any,
        count: torch.Tensor,
        seen: torch.Tensor,
    ) -> dict[str, Any]:
        if self.inplace and isinstance(state, dict):
            with torch.no_grad():
                state["count"].copy_(count)
                if isinstance(state.get(SEEN), torch.Tensor):
                    state[SEEN].copy_(seen)
                else:  # a state from before the flags were kept
                    state[SEEN] = seen
            state["inner"] = inner_state
            return state
        return {
            **state,
            "inner": inner_state,
            "grad_mean": unflatten(mean_spec, mean),
            "count": count,
            SEEN: seen,
        }


#: Accumulate's per-leaf flags: which leaves had a gradient so far in the cycle.
SEEN = "grad_seen"


def _check_seen(who: str, state: Mapping[str, Any], count: torch.Tensor, n: int) -> Any:
    """``state["grad_seen"]``: a bool vector, one flag per leaf, on the count's device;
    None for a state from before it was kept."""
    seen = state.get(SEEN)
    if seen is None:
        return None
    if (
        not isinstance(seen, torch.Tensor)
        or seen.dtype != torch.bool
        or seen.shape != (n,)
        or seen.device != count.device
    ):
        raise ValueError(
            f"{who}: state[{SEEN!r}] must be a bool tensor of shape ({n},) (a flag per "
            f"leaf) on {count.device}, got {seen!r}"
        )
    return seen


def accumulate(optimizer: Any, *, every: int) -> Accumulate:
    r"""Gradient accumulation: average the gradients of ``every`` calls, then step.

    With :math:`k` = ``every``, calls :math:`1 \ldots k-1` of each cycle only update the
    running mean :math:`\bar g_n = \bar g_{n-1} + (g_n - \bar g_{n-1})/n` (params and the
    inner state untouched, bit for bit); call :math:`k` runs the inner step with
    :math:`\bar g_k` and resets the mean. For micro-batches of equal size this is one step
    on their concatenation with the mean loss. A ``None`` gradient counts as zero in the
    mean. On the k-th call the inner step sees the mean of a leaf whose gradient is
    ``None`` now but was present earlier in the cycle (as torch's accumulated ``.grad``),
    and ``None`` for a leaf without a gradient in the whole cycle; ``"grad_seen"`` (a
    bool per leaf) records which had one, kept where the count is on the CPU and read in
    eager steps (on an accelerator or while traced, such a leaf sits the step out).

    The state holds ``"grad_mean"`` (params-shaped) and ``"count"`` (0-d int64, calls
    since the last inner step). On the CPU, eagerly, the count is read on the host to
    skip the inner call; elsewhere (CUDA, under ``torch.compile`` or ``torch.func``, or
    when ``skip_if`` is given) the inner step always runs with ``skip_if`` = "not the
    k-th call", so nothing syncs with the host.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> opt = wrappers.accumulate(optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0),
    ...                           every=2)
    >>> params = {"w": torch.zeros(1)}
    >>> state = opt.init(params)
    >>> params, state = opt.step(params, {"w": torch.tensor([1.0])}, state)
    >>> params["w"], state["count"]
    (tensor([0.]), tensor(1))
    >>> params, state = opt.step(params, {"w": torch.tensor([3.0])}, state)
    >>> params["w"], state["count"]
    (tensor([-2.]), tensor(0))
    """
    return Accumulate(optimizer, every)


def _all_finite(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.ones((), dtype=torch.bool, device=device)
    return torch.stack([whole_flag(torch.isfinite(t).all()).to(device) for t in tensors]).all()


class SkipNonfinite(Wrapper):
    """Skip steps with non-finite gradients. See :func:`skip_nonfinite`."""

    kind = "skip_nonfinite"

    def __init__(self, inner: Any, max_consecutive: int | None) -> None:
        super().__init__(inner)
        if max_consecutive is not None:
            check_count("skip_nonfinite", "max_consecutive", max_consecutive, minimum=0)
        self.max_consecutive = max_consecutive

    def init(self, params: Any) -> dict[str, Any]:
        tree = params_tree(params)
        leaves_ = flatten(tree)[1]
        return {
            "inner": self.inner.init(tree),
            "skipped_total": counter(leaves_),
            "skipped_consecutive": counter(leaves_),
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
        gate, nonfinite, new_total, new_consecutive = self._counts(params, grads, state, skip_if)
        total = state["skipped_total"]
        consecutive = state["skipped_consecutive"]
        params, inner_state = self.inner.step(
            params,
            grads,
            state["inner"],
            hyper_overrides=hyper_overrides,
            skip_if=either(nonfinite, gate),
        )
        if self.inplace and isinstance(state, dict):
            with torch.no_grad():
                total.copy_(new_total)
                consecutive.copy_(new_consecutive)
            state["inner"] = inner_state
            return params, state
        return params, {
            **state,
            "inner": inner_state,
            "skipped_total": new_total,
            "skipped_consecutive": new_consecutive,
        }

    def check(
        self,
        params: PyTree,
        grads: PyTree,
        state: Mapping[str, Any],
        *,
        hyper_overrides: Mapping[str, Any] | None = None,
        skip_if: Any = None,
    ) -> None:
        """Raise what :meth:`step` would raise (``max_consecutive`` included, which a
        skipped step cannot see, and not for a step ``skip_if`` skips), changing nothing;
        ``partition`` checks groups with it."""
        gate = self._counts(params, grads, state, skip_if)[0]
        check_step(self.inner, params, grads, state["inner"], hyper_overrides, skip_if=gate)

    def _counts(
        self, params: PyTree, grads: PyTree, state: Mapping[str, Any], skip_if: Any
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The checked gate, whether the grads are non-finite, and the new counters;
        raises past ``max_consecutive``."""
        who = self.name
        expect_keys(who, state, ("inner", "skipped_total", "skipped_consecutive"))
        check_counter(who, state, "skipped_total")
        check_counter(who, state, "skipped_consecutive")
        gate = as_gate(who, skip_if)
        _, _, g_leaves = check_grads(who, params, grads)
        total = state["skipped_total"]
        consecutive = state["skipped_consecutive"]
        present = [g for g in g_leaves if g is not None]
        nonfinite = ~_all_finite(present, total.device)
        new_total = total + nonfinite.to(total.dtype)
        new_consecutive = torch.where(nonfinite, consecutive + 1, torch.zeros_like(consecutive))
        if gate is not None:
            new_total = torch.where(gate, total, new_total)
            new_consecutive = torch.where(gate, consecutive, new_consecutive)
        if self.max_consecutive is not None and int(new_consecutive) > self.max_consecutive:
            raise RuntimeError(
                f"{who}: {int(new_consecutive)} consecutive steps with non-finite gradients "
                f"(max_consecutive={self.max_consecutive}); params and state are left as "
                "they were before this step"
            )
        return gate, nonfinite, new_total, new_consecutive


def skip_nonfinite(optimizer: Any, *, max_consecutive: int | None = None) -> SkipNonfinite:
    """Skip every step whose gradients hold an inf or NaN: params and the inner state
    come back unchanged, bit for bit (through the inner step's ``skip_if``).

    The state counts ``"skipped_total"`` and ``"skipped_consecutive"`` (0-d int64).
    With ``max_consecutive`` set, a step that would make more than that many skips in a
    row raises ``RuntimeError`` before changing anything; that check reads the counter
    on the host (a device sync per step on accelerators, a graph break under
    ``torch.compile``). Without it nothing syncs.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> opt = wrappers.skip_nonfinite(optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0))
    >>> params = {"w": torch.ones(2)}
    >>> state = opt.init(params)
    >>> params, state = opt.step(params, {"w": torch.tensor([1.0, float("inf")])}, state)
    >>> params["w"], state["skipped_total"], state["inner"]["step"]
    (tensor([1., 1.]), tensor(1), tensor(0))
    """
    return SkipNonfinite(optimizer, max_consecutive)
