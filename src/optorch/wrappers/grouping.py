"""Choosing which leaves an optimizer sees: :func:`masked`, :func:`freeze`,
:func:`partition` (functional param groups), :func:`decay_mask`.

Leaves are chosen by a function ``fn(path, tensor)`` of each tensor leaf, ``path``
being the leaf's dotted name (the key itself for ``dict(model.named_parameters())``,
``"encoder.0.weight"`` for nested containers), or by a tree shaped like the params
holding one bool (or label) per leaf. A leaf an optimizer does not see is passed to it
as ``None``: it is returned untouched and gets no state, while the state keeps the
params' structure (``None`` at those leaves), so checkpoints stay readable.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import torch

from optorch.tree import PyTree, flatten, format_path, unflatten
from optorch.wrappers._core import (
    GroupsConfig,
    Wrapper,
    as_gate,
    check_grads,
    check_optimizer,
    check_step,
    config_has,
    expect_keys,
    is_inplace,
    may_refuse_on_values,
    params_tree,
    restricted,
    select_leaves,
)

__all__ = [
    "Masked",
    "Partition",
    "decay_mask",
    "freeze",
    "masked",
    "no_weight_decay_on",
    "partition",
]

Selector = Callable[[str, torch.Tensor], Any] | PyTree


def _as_bool(who: str, value: Any, where: str) -> bool:
    """A Python bool, or a one-element bool tensor (read on the host), else TypeError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype == torch.bool:
        return bool(value)
    if not isinstance(value, bool):
        raise TypeError(f"{who}: the mask must give a bool for each leaf, got {value!r} at {where}")
    return value


def _bools(who: str, values: list[Any], paths: list[Any], leaves_: list[Any]) -> list[bool]:
    return [
        False if leaf is None else _as_bool(who, value, format_path(path))
        for path, value, leaf in zip(paths, values, leaves_, strict=True)
    ]


class Masked(Wrapper):
    """An optimizer applied to the selected leaves only. See :func:`masked`."""

    kind = "masked"

    def __init__(self, inner: Any, mask: Selector, *, invert: bool = False) -> None:
        super().__init__(inner)
        self.mask = mask
        self.invert = invert

    def _selection(self, params: PyTree) -> tuple[list[bool], list[Any], Any]:
        paths, leaves_, spec = flatten(params)
        values = select_leaves(self.name, "mask", self.mask, params)
        chosen = _bools(self.name, values, paths, leaves_)
        if self.invert:
            chosen = [leaf is not None and not c for c, leaf in zip(chosen, leaves_, strict=True)]
        return chosen, leaves_, spec

    def init(self, params: Any) -> dict[str, Any]:
        tree = params_tree(params)
        chosen, leaves_, spec = self._selection(tree)
        return {"inner": self.inner.init(restricted(leaves_, chosen, spec))}

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
        expect_keys(who, state, ("inner",))
        gate = as_gate(who, skip_if)
        _, _, g_leaves = check_grads(who, params, grads)
        chosen, p_leaves, spec = self._selection(params)
        new_sub, inner_state = self.inner.step(
            restricted(p_leaves, chosen, spec),
            restricted(g_leaves, chosen, spec),
            state["inner"],
            hyper_overrides=hyper_overrides,
            skip_if=gate,
        )
        new_leaves = flatten(new_sub)[1]
        out = unflatten(
            spec,
            [n if c else p for p, n, c in zip(p_leaves, new_leaves, chosen, strict=True)],
        )
        if self.inplace and isinstance(state, dict):
            state["inner"] = inner_state
            return out, state
        return out, {**state, "inner": inner_state}


def masked(optimizer: Any, mask: Selector) -> Masked:
    """Apply ``optimizer`` only to the leaves ``mask`` selects.

    ``mask`` is ``fn(path, tensor) -> bool`` or a tree of bools shaped like the params.
    Other leaves are returned untouched (their gradients are ignored) and get no state.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> sgd = optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0)
    >>> opt = wrappers.masked(sgd, lambda path, p: not path.endswith("bias"))
    >>> params = {"weight": torch.ones(2), "bias": torch.ones(2)}
    >>> params, state = opt.step(params, {"weight": torch.ones(2), "bias": torch.ones(2)},
    ...                          opt.init(params))
    >>> params["weight"], params["bias"]
    (tensor([0., 0.]), tensor([1., 1.]))
    """
    return Masked(optimizer, mask)


def freeze(optimizer: Any, frozen: Selector) -> Masked:
    """Keep the leaves ``frozen`` selects fixed: they never change and get no state
    (``frozen`` as for :func:`masked`). The same as ``masked`` with the mask inverted.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> sgd = optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0)
    >>> opt = wrappers.freeze(sgd, lambda path, p: path == "embedding")
    >>> params = {"embedding": torch.ones(2), "head": torch.ones(2)}
    >>> state = opt.init(params)
    >>> state["inner"]["step"], state["inner"]
    (tensor(0), {'step': tensor(0)})
    """
    wrapper = Masked(optimizer, frozen, invert=True)
    wrapper.kind = "freeze"
    return wrapper


# --------------------------------------------------------------------------------------
# partition
# --------------------------------------------------------------------------------------


class Partition:
    """Different optimizers for different groups of leaves. See :func:`partition`."""

    kind = "partition"

    def __init__(self, labels: Selector, optimizers: Mapping[Hashable, Any]) -> None:
        if not isinstance(optimizers, Mapping) or not optimizers:
            raise TypeError(
                "partition: optimizers must be a non-empty dict {label: optimizer}, got "
                f"{optimizers!r}"
            )
        for label, optimizer in optimizers.items():
            check_optimizer(f"partition group {label!r}", optimizer)
        modes = {label: is_inplace(opt) for label, opt in optimizers.items()}
        if len(set(modes.values())) > 1:
            raise ValueError(f"partition: every group must use the same mode, got inplace={modes}")
        self.labels = labels
        self.optimizers = dict(optimizers)

    @property
    def inplace(self) -> bool:
        return is_inplace(next(iter(self.optimizers.values())))

    @property
    def config(self) -> GroupsConfig:
        """A :class:`GroupsConfig`: each group's config, by label."""
        return GroupsConfig(
            {label: opt.config for label, opt in self.optimizers.items()}, self.inplace
        )

    @property
    def name(self) -> str:
        groups = ", ".join(f"{label}: {opt.name}" for label, opt in self.optimizers.items())
        return f"partition({groups})"

    def __repr__(self) -> str:
        return f"<{self.name}>"

    def replace(self, **changes: Any) -> Partition:
        """Each group with the config fields it has changed (``"label/field"`` names one
        group)."""
        groups = dict(self.optimizers)
        for field, value in changes.items():
            targets = self._targets(field)
            for label, rest in targets:
                groups[label] = groups[label].replace(**{rest: value})
        return Partition(self.labels, groups)

    def _targets(self, field: str) -> list[tuple[Hashable, str]]:
        """(group, field within it) for a field or ``"label/field"`` name."""
        if "/" in field:
            text, _, rest = field.partition("/")
            for label, opt in self.optimizers.items():
                if str(label) == text and config_has(opt.config, rest):
                    return [(label, rest)]
            raise ValueError(
                f"{self.name}: no group {text!r} with a hyperparameter {rest!r} (groups: "
                f"{[str(k) for k in self.optimizers]})"
            )
        targets = [
            (label, field)
            for label, opt in self.optimizers.items()
            if config_has(opt.config, field)
        ]
        if not targets:
            raise ValueError(f"{self.name}: no group has a hyperparameter {field!r}")
        return targets

    def _split_overrides(
        self, overrides: Mapping[str, Any] | None
    ) -> dict[Hashable, dict[str, Any]]:
        routed: dict[Hashable, dict[str, Any]] = {label: {} for label in self.optimizers}
        for field, value in (overrides or {}).items():
            for label, rest in self._targets(field):
                routed[label][rest] = value
        return routed

    def _assignment(self, params: PyTree) -> tuple[list[Any], list[Any], Any]:
        paths, leaves_, spec = flatten(params)
        labels = select_leaves(self.kind, "labels", self.labels, params)
        for path, label, leaf in zip(paths, labels, leaves_, strict=True):
            if leaf is None:
                continue
            try:
                known = label in self.optimizers
            except TypeError:
                known = False
            if not known:
                raise ValueError(
                    f"partition: the label {label!r} of param {format_path(path)} has no "
                    f"optimizer (labels with one: {list(self.optimizers)})"
                )
        return labels, leaves_, spec

    def init(self, params: Any) -> dict[str, Any]:
        tree = params_tree(params)
        labels, leaves_, spec = self._assignment(tree)
        return {
            "groups": {
                label: opt.init(
                    restricted(
                        leaves_,
                        [
                            lab == label and x is not None
                            for lab, x in zip(labels, leaves_, strict=True)
                        ],
                        spec,
                    )
                )
                for label, opt in self.optimizers.items()
            }
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
        expect_keys(who, state, ("groups",))
        gate = as_gate(who, skip_if)
        _, _, g_leaves = check_grads(who, params, grads)
        labels, p_leaves, spec = self._assignment(params)
        groups_state = state["groups"]
        missing = [label for label in self.optimizers if label not in groups_state]
        if missing:
            raise ValueError(f"{who}: state has no group(s) {missing}")
        routed = self._split_overrides(hyper_overrides)
        # every group is checked before any is stepped: an in-place step must not leave
        # some groups updated when a later group's inputs are rejected
        # a group no param is labelled with has nothing to step (as a torch param group
        # without params): it is left out, and its state stays as it is (its all-None
        # trees also failed to trace under torch.compile)
        chosen_of = {
            label: [lab == label and x is not None for lab, x in zip(labels, p_leaves, strict=True)]
            for label in self.optimizers
        }
        stepped = {label: opt for label, opt in self.optimizers.items() if any(chosen_of[label])}
        # a group that is itself a wrapper has no ``check``: it is checked by a skipped
        # step (``_core.check_step``), except the first such group, which is not
        # checked but stepped first (it rejects its inputs before it changes anything).
        # Wrapped groups step before the others: a refusal only their real step can see
        # (skip_nonfinite's max_consecutive) then finds the plain groups unwritten
        wrapped = [label for label, opt in stepped.items() if getattr(opt, "check", None) is None]
        # of those, a group that may refuse on the values (skip_nonfinite's
        # max_consecutive, under another wrapper) first: the one stepped unchecked
        wrapped.sort(key=lambda label: not may_refuse_on_values(stepped[label]))
        stepped = {
            **{label: stepped[label] for label in wrapped},
            **{label: opt for label, opt in stepped.items() if label not in wrapped},
        }
        for label, opt in stepped.items():
            if label not in wrapped[:1]:
                chosen = chosen_of[label]
                check_step(
                    opt,
                    restricted(p_leaves, chosen, spec),
                    restricted(g_leaves, chosen, spec),
                    groups_state[label],
                    routed[label] or None,
                    skip_if=gate,
                )
        # in place, a later group that refuses on the values finds earlier groups
        # written: they are kept (copies of their params and state) to be put back
        kept: list[Any] | None = (
            []
            if self.inplace and any(may_refuse_on_values(stepped[x]) for x in wrapped[1:])
            else None
        )
        out_leaves = list(p_leaves)
        new_groups: dict[Hashable, Any] = {}
        try:
            for label, opt in stepped.items():
                chosen = chosen_of[label]
                if kept is not None:
                    mine = [p for p, c in zip(p_leaves, chosen, strict=True) if c]
                    kept.append(_keep((mine, groups_state[label])))
                new_sub, new_groups[label] = opt.step(
                    restricted(p_leaves, chosen, spec),
                    restricted(g_leaves, chosen, spec),
                    groups_state[label],
                    hyper_overrides=routed[label] or None,
                    skip_if=gate,
                )
                for index, (tensor, c) in enumerate(zip(flatten(new_sub)[1], chosen, strict=True)):
                    if c:
                        out_leaves[index] = tensor
        except RuntimeError:
            for snapshot in reversed(kept or []):
                _put_back(snapshot)
            raise
        out = unflatten(spec, out_leaves)
        if self.inplace and isinstance(state, dict) and isinstance(groups_state, dict):
            groups_state.update(new_groups)
            return out, state
        return out, {**state, "groups": {**groups_state, **new_groups}}


def _keep(tree: Any) -> tuple[str, Any, Any]:
    """A copy of ``tree`` for :func:`_put_back`: its containers and tensors by identity,
    with the tensors' values."""
    if isinstance(tree, torch.Tensor):
        return ("tensor", tree, tree.detach().clone())
    if isinstance(tree, dict):
        return ("dict", tree, {key: _keep(value) for key, value in tree.items()})
    if isinstance(tree, list):
        return ("list", tree, [_keep(value) for value in tree])
    if isinstance(tree, tuple):
        return ("tuple", tree, [_keep(value) for value in tree])
    return ("leaf", tree, None)


def _put_back(kept: tuple[str, Any, Any]) -> Any:
    """Restore what :func:`_keep` saw: the same objects, their old contents."""
    kind, obj, data = kept
    if kind == "tensor":
        with torch.no_grad():
            obj.copy_(data)
    elif kind == "dict":
        values = {key: _put_back(value) for key, value in data.items()}
        obj.clear()
        obj.update(values)
    elif kind == "list":
        obj[:] = [_put_back(value) for value in data]
    elif kind == "tuple":
        for value in data:
            _put_back(value)
    return obj


def partition(labels: Selector, optimizers: Mapping[Hashable, Any]) -> Partition:
    """Functional param groups: the optimizer ``optimizers[label]`` for the leaves with
    that label.

    ``labels`` is ``fn(path, tensor) -> label`` or a tree of labels shaped like the params;
    every label must have an optimizer, and all groups must share ``inplace``. Each
    group's state is ``state["groups"][label]``, shaped like the params with ``None`` on
    the other groups' leaves. ``hyper_overrides`` and :func:`inject_hyperparams` names
    reach every group that has the field, or one group as ``"label/field"``.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> opt = wrappers.partition(
    ...     lambda path, p: "matrix" if p.ndim >= 2 else "vector",
    ...     {"matrix": optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.0),
    ...      "vector": optorch.get_optimizer("adamw", max_lr=0.01)},
    ... )
    >>> params = {"w": torch.ones(2, 2), "b": torch.ones(2)}
    >>> state = opt.init(params)
    >>> sorted(state["groups"]), state["groups"]["matrix"]["step"]
    (['matrix', 'vector'], tensor(0))
    >>> params, state = opt.step(params, {"w": torch.ones(2, 2), "b": torch.ones(2)}, state)
    >>> params["w"][0], params["b"]
    (tensor([0.9000, 0.9000]), tensor([0.9900, 0.9900]))
    """
    return Partition(labels, optimizers)


def _has_weight_decay(optimizer: Any) -> None:
    if not config_has(optimizer.config, "weight_decay"):
        raise ValueError(
            f"decay_mask: {getattr(optimizer, 'name', optimizer)!r} has no weight_decay "
            "hyperparameter"
        )
    if not hasattr(optimizer, "replace"):
        raise TypeError(f"decay_mask: {optimizer!r} has no replace() to set weight_decay=0")


def _is_matrix(path: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2


def decay_mask(optimizer: Any, mask: Selector = _is_matrix) -> Partition:
    """Weight decay only on the leaves ``mask`` selects (by default tensors with 2 or
    more dims, i.e. no decay on biases and norm weights); the others get the same
    optimizer with ``weight_decay=0``.

    A :func:`partition` with groups ``"decay"`` and ``"no_decay"``: the same as
    ``torch.optim`` param groups ``[{"params": decay}, {"params": rest,
    "weight_decay": 0}]``.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> adamw = optorch.get_optimizer("adamw", max_lr=1e-3, weight_decay=0.1)
    >>> opt = wrappers.decay_mask(adamw, lambda path, p: p.ndim >= 2)
    >>> opt.config.groups["no_decay"].weight_decay
    0.0
    """
    _has_weight_decay(optimizer)
    no_decay = optimizer.replace(weight_decay=0.0)
    labels: Selector
    if callable(mask):

        def labels(path: str, tensor: torch.Tensor) -> str:
            return "decay" if _as_bool("decay_mask", mask(path, tensor), path) else "no_decay"
    else:
        paths, values, spec = flatten(mask)
        labels = unflatten(
            spec,
            [
                None
                if v is None
                else ("decay" if _as_bool("decay_mask", v, format_path(p)) else "no_decay")
                for p, v in zip(paths, values, strict=True)
            ],
        )
    return Partition(labels, {"decay": optimizer, "no_decay": no_decay})


def no_weight_decay_on(optimizer: Any, excluded: Selector) -> Partition:
    """No weight decay on the leaves ``excluded`` selects, the configured decay on the
    rest (the inverse of :func:`decay_mask`).

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> adamw = optorch.get_optimizer("adamw", weight_decay=0.1)
    >>> opt = wrappers.no_weight_decay_on(adamw, lambda path, p: "norm" in path or p.ndim < 2)
    >>> state = opt.init({"norm.weight": torch.ones(3), "fc.weight": torch.ones(3, 3)})
    >>> state["groups"]["no_decay"]["exp_avg"]["fc.weight"] is None
    True
    """
    if callable(excluded):

        def keep(path: str, tensor: torch.Tensor) -> bool:
            return not _as_bool("no_weight_decay_on", excluded(path, tensor), path)

        return decay_mask(optimizer, keep)
    paths, values, spec = flatten(excluded)
    return decay_mask(
        optimizer,
        unflatten(
            spec,
            [
                None if v is None else not _as_bool("no_weight_decay_on", v, format_path(p))
                for p, v in zip(paths, values, strict=True)
            ],
        ),
    )
