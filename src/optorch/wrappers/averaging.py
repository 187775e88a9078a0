"""Weight averaging: :func:`ema` (Polyak averaging) and :func:`lookahead`.

Both keep a params-shaped copy of the weights in the state and update it after the
inner step. When a step is skipped (``skip_if``) they leave their state unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from optorch.tree import PyTree, flatten, unflatten
from optorch.wrappers._core import (
    Wrapper,
    aligned_leaves,
    as_gate,
    check_count,
    check_counter,
    check_probability,
    clone_leaves,
    commit,
    counter,
    expect_keys,
    host_readable,
    params_tree,
)

__all__ = ["EMA", "Lookahead", "ema", "ema_params", "lookahead"]


class EMA(Wrapper):
    """An exponential moving average of the params. See :func:`ema`."""

    kind = "ema"

    def __init__(self, inner: Any, decay: Any, *, warmup: bool) -> None:
        super().__init__(inner)
        check_probability("ema", "decay", decay)
        if not isinstance(warmup, bool):
            raise TypeError(f"ema: warmup must be a bool, got {warmup!r}")
        self.decay = decay
        self.warmup = warmup

    def init(self, params: Any) -> dict[str, Any]:
        tree = params_tree(params)
        _, leaves_, spec = flatten(tree)
        return {
            "inner": self.inner.init(tree),
            "ema": unflatten(spec, clone_leaves(leaves_, differentiable=not self.inplace)),
            "count": counter(leaves_),
        }

    def decay_at(self, count: torch.Tensor) -> Any:
        """The decay of the update that follows ``count`` updates (a float or 0-d tensor)."""
        if not self.warmup:
            return self.decay
        taken = count.to(torch.float64)
        return torch.clamp((1.0 + taken) / (10.0 + taken), max=self.decay)

    def averaged_params(self, state: Mapping[str, Any]) -> PyTree:
        """The averaged params in ``state`` (this wrapper's state)."""
        expect_keys(self.name, state, ("ema",))
        return state["ema"]

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
        expect_keys(who, state, ("inner", "ema", "count"))
        check_counter(who, state, "count")
        gate = as_gate(who, skip_if)
        ema_spec = flatten(state["ema"])[2]
        old = aligned_leaves(who, "ema", state["ema"], params)
        count = state["count"]
        params, inner_state = self.inner.step(
            params, grads, state["inner"], hyper_overrides=hyper_overrides, skip_if=gate
        )
        decay = self.decay_at(count)
        new: list[Any] = []
        for average, param in zip(old, flatten(params)[1], strict=True):
            if average is None or param is None:
                new.append(average)
                continue
            weight = 1.0 - decay
            if isinstance(weight, torch.Tensor):
                weight = weight.to(device=average.device, dtype=average.dtype)
            current = (param.detach() if self.inplace else param).to(average.dtype)
            new.append(torch.lerp(average, current, weight))
        kept = commit(old, new, inplace=self.inplace, skip=gate)
        new_count = count + 1 if gate is None else torch.where(gate, count, count + 1)
        if self.inplace and isinstance(state, dict):
            with torch.no_grad():
                count.copy_(new_count)
            state["inner"] = inner_state
            return params, state
        return params, {
            **state,
            "inner": inner_state,
            "ema": unflatten(ema_spec, kept),
            "count": new_count,
        }


def ema(optimizer: Any, decay: float, *, warmup: bool = False) -> EMA:
    r"""Keep an exponential moving average of the params (Polyak & Juditsky 1992; the
    EMA form used for evaluation weights, e.g. Tan & Le 2019, arXiv:1905.11946).

    After each inner step, with :math:`d` = ``decay`` and :math:`t` the number of
    averaging updates made before (0 on the first):

    .. math::

        \bar\theta_t = d_t\, \bar\theta_{t-1} + (1 - d_t)\, \theta_t, \qquad
        d_t = \begin{cases} \min\bigl(d, \tfrac{1 + t}{10 + t}\bigr) & \text{warmup} \\
                            d & \text{otherwise} \end{cases}

    with :math:`\bar\theta_{-1}` the params given to ``init``. The average is
    ``state["ema"]`` (also :func:`ema_params`); ``state["count"]`` counts the updates.
    This is ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn(decay)``
    after one ``update_parameters`` call at the start.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> opt = wrappers.ema(optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0), 0.9)
    >>> params = {"w": torch.zeros(1)}
    >>> state = opt.init(params)
    >>> params, state = opt.step(params, {"w": torch.tensor([-10.0])}, state)
    >>> params["w"], wrappers.ema_params(state)["w"]
    (tensor([10.]), tensor([1.]))
    """
    return EMA(optimizer, decay, warmup=warmup)


def ema_params(state: Mapping[str, Any]) -> PyTree:
    """The averaged params of the :func:`ema` wrapper whose state is in ``state``.

    It is found through the ``"inner"`` states of the wrappers around it, and through
    the groups of a :func:`~optorch.wrappers.partition`: there each group's average
    covers that group's leaves, and the result puts them together in one params-shaped
    tree (``None`` for the leaves of groups without an ``ema``).
    """
    found = _ema_trees(state)
    if not found:
        raise ValueError("ema_params: no ema wrapper state found in this state")
    if len(found) == 1:
        return found[0]
    spec = flatten(found[0])[2]
    columns = zip(*(flatten(tree)[1] for tree in found), strict=True)
    return unflatten(spec, [next((x for x in column if x is not None), None) for column in columns])


def _ema_trees(node: Any) -> list[Any]:
    """The ``ema`` trees in a (wrapper) state: one, or one per partition group."""
    while isinstance(node, Mapping):
        if "ema" in node and "count" in node:
            return [node["ema"]]
        if "groups" in node and isinstance(node["groups"], Mapping):
            return [tree for group in node["groups"].values() for tree in _ema_trees(group)]
        node = node.get("inner")
    return []


class Lookahead(Wrapper):
    """Lookahead: slow weights synced every ``sync_period`` steps. See :func:`lookahead`."""

    kind = "lookahead"

    def __init__(self, inner: Any, sync_period: int, alpha: Any) -> None:
        super().__init__(inner)
        check_count("lookahead", "sync_period", sync_period, minimum=1)
        check_probability("lookahead", "alpha", alpha)
        self.sync_period = sync_period
        self.alpha = alpha

    @property
    def name(self) -> str:
        return f"lookahead({self.inner.name}, sync_period={self.sync_period})"

    def init(self, params: Any) -> dict[str, Any]:
        tree = params_tree(params)
        _, leaves_, spec = flatten(tree)
        return {
            "inner": self.inner.init(tree),
            "slow": unflatten(spec, clone_leaves(leaves_, differentiable=not self.inplace)),
            "count": counter(leaves_),
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
        expect_keys(who, state, ("inner", "slow", "count"))
        check_counter(who, state, "count")
        gate = as_gate(who, skip_if)
        slow_spec = flatten(state["slow"])[2]
        slow = aligned_leaves(who, "slow", state["slow"], params)
        count = state["count"]
        fast, inner_state = self.inner.step(
            params, grads, state["inner"], hyper_overrides=hyper_overrides, skip_if=gate
        )
        inplace = self.inplace
        taken = count + 1
        _, fast_leaves, spec = flatten(fast)
        if gate is None and host_readable(count):
            # eager fast path: touch the weights only on sync steps
            if int(taken) < self.sync_period:
                return fast, self._state(state, inner_state, slow, slow_spec, taken)
            synced = self._interpolate(slow, fast_leaves)
            kept_slow = commit(slow, synced, inplace=inplace, skip=None)
            new_fast = commit(fast_leaves, synced, inplace=inplace, skip=None)
            return unflatten(spec, new_fast), self._state(
                state, inner_state, kept_slow, slow_spec, torch.zeros_like(count)
            )
        is_sync = taken >= self.sync_period
        keep = ~is_sync if gate is None else (~is_sync | gate)
        synced = self._interpolate(slow, fast_leaves)
        kept_slow = commit(slow, synced, inplace=inplace, skip=keep)
        new_fast = commit(fast_leaves, synced, inplace=inplace, skip=keep)
        new_count = torch.where(is_sync, torch.zeros_like(count), taken)
        if gate is not None:
            new_count = torch.where(gate, count, new_count)
        return unflatten(spec, new_fast), self._state(
            state, inner_state, kept_slow, slow_spec, new_count
        )

    def _interpolate(self, slow: list[Any], fast: list[Any]) -> list[Any]:
        return [
            None
            if s is None or f is None
            else torch.lerp(s, (f.detach() if self.inplace else f).to(s.dtype), self.alpha)
            for s, f in zip(slow, fast, strict=True)
        ]

    def _state(
        self,
        state: Mapping[str, Any],
        inner_state: Any,
        slow: list[Any],
        slow_spec: Any,
        count: torch.Tensor,
    ) -> dict[str, Any]:
        if self.inplace and isinstance(state, dict):
            with torch.no_grad():
                state["count"].copy_(count)
            state["inner"] = inner_state
            return state
        return {**state, "inner": inner_state, "slow": unflatten(slow_spec, slow), "count": count}


def lookahead(optimizer: Any, *, sync_period: int = 5, alpha: float = 0.5) -> Lookahead:
    r"""Lookahead (Zhang et al. 2019, arXiv:1907.08610): the inner optimizer moves the
    fast weights :math:`\theta`; every :math:`k` = ``sync_period`` steps the slow weights
    :math:`\phi` (``state["slow"]``, starting at the initial params) move towards them
    and the fast weights restart from there, with :math:`\alpha` = ``alpha``:

    .. math::

        \phi \leftarrow \phi + \alpha\,(\theta - \phi), \qquad \theta \leftarrow \phi

    The inner optimizer's state is kept across syncs. ``state["count"]`` counts steps
    since the last sync.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> sgd = optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0)
    >>> opt = wrappers.lookahead(sgd, sync_period=2, alpha=0.5)
    >>> params = {"w": torch.zeros(1)}
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...     params, state = opt.step(params, {"w": torch.tensor([-1.0])}, state)
    >>> params["w"], state["slow"]["w"]
    (tensor([1.]), tensor([1.]))
    """
    return Lookahead(optimizer, sync_period, alpha)
