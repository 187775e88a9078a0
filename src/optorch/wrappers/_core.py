"""Shared machinery of the wrappers: the optimizer protocol, leaf selection, commits.

A wrapper holds an *inner* optimizer (an :class:`optorch.base.Optimizer` or another
wrapper) and offers the same interface. Its own state lives next to the inner state
in one dict, so that checkpoints and inspection see everything. Every tensor the
wrapper keeps is written through :func:`commit`, which honours the two modes of the
library (in place: write into the existing tensors; pure: return new ones and never
touch the inputs) and a ``skip_if`` gate (keep the old values, decided on the device).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from optorch.base import _STEP_DTYPES, _first_structure_difference, check_dense, check_range
from optorch.base import _host_readable as host_readable  # a CPU tensor, eager, untraced
from optorch.tree import PyTree, flatten, format_path, same_structure, unflatten

__all__ = [
    "GroupsConfig",
    "Wrapper",
    "as_gate",
    "check_optimizer",
    "commit",
    "commit_tree",
    "config_has",
    "config_value",
    "counter",
    "either",
    "expect_keys",
    "host_readable",
    "is_inplace",
    "leaf_name",
    "params_tree",
    "select_leaves",
]

#: A predicate or labeller on one leaf: ``fn(path, tensor)``, ``path`` a dotted string.
LeafFn = Callable[[str, torch.Tensor], Any]


# --------------------------------------------------------------------------------------
# the optimizer protocol
# --------------------------------------------------------------------------------------


def check_optimizer(who: str, optimizer: Any) -> None:
    """Raise ``TypeError`` unless ``optimizer`` has ``init``, ``step`` and ``config``."""
    missing = [
        attr
        for attr in ("init", "step", "config")
        if not hasattr(optimizer, attr)
        or (attr != "config" and not callable(getattr(optimizer, attr)))
    ]
    if missing:
        raise TypeError(
            f"{who}: expected an optimizer (an optorch.Optimizer or a wrapper, with .init, "
            f".step and .config), got {type(optimizer).__name__} lacking {missing}"
        )


def is_inplace(optimizer: Any) -> bool:
    """Whether ``optimizer`` updates its inputs in place (its config's ``inplace``)."""
    flag = getattr(optimizer, "inplace", None)
    if isinstance(flag, bool):
        return flag
    return bool(optimizer.config.inplace)


@dataclass(frozen=True)
class GroupsConfig:
    """The ``config`` of a :func:`~optorch.wrappers.partition`: one config per label."""

    groups: Mapping[Hashable, Any]
    inplace: bool


def _split(name: str) -> tuple[str, str]:
    label, _, rest = name.partition("/")
    return label, rest


def config_has(config: Any, name: str) -> bool:
    """Whether ``name`` (``"field"`` or ``"label/field"`` into partitions) exists."""
    if isinstance(config, GroupsConfig):
        if "/" in name:
            label, rest = _split(name)
            group = _group_by_text(config, label)
            return group is not None and config_has(group, rest)
        return any(config_has(group, name) for group in config.groups.values())
    return "/" not in name and hasattr(config, name) and not name.startswith("_")


def _group_by_text(config: GroupsConfig, label: str) -> Any:
    for key, group in config.groups.items():
        if str(key) == label:
            return group
    return None


def config_value(config: Any, name: str) -> Any:
    """The value of ``name`` in ``config``; an unqualified name into a partition must
    have one value in every group that has it."""
    if not config_has(config, name):
        raise ValueError(f"no hyperparameter {name!r} in {_describe(config)}")
    if isinstance(config, GroupsConfig):
        if "/" in name:
            label, rest = _split(name)
            return config_value(_group_by_text(config, label), rest)
        values = [config_value(g, name) for g in config.groups.values() if config_has(g, name)]
        if any(not _same(values[0], v) for v in values[1:]):
            raise ValueError(
                f"hyperparameter {name!r} differs between the groups of a partition "
                f"({values}); name one group as 'label/{name}'"
            )
        return values[0]
    return getattr(config, name)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (RuntimeError, TypeError):
        return a is b


def _describe(config: Any) -> str:
    if isinstance(config, GroupsConfig):
        return f"partition groups {[str(k) for k in config.groups]}"
    return type(config).__name__


class Wrapper:
    """Base of the wrappers: holds ``inner`` and forwards ``config``/``replace``.

    Subclasses implement :meth:`init` and :meth:`step` with the optimizer signature
    ``step(params, grads, state, *, hyper_overrides=None, skip_if=None)``.
    """

    kind = "wrapper"

    def __init__(self, inner: Any) -> None:
        check_optimizer(self.kind, inner)
        self.inner = inner

    @property
    def config(self) -> Any:
        """The inner optimizer's config (hyperparameters, ``inplace``, ``impl``)."""
        return self.inner.config

    @property
    def inplace(self) -> bool:
        return is_inplace(self.inner)

    @property
    def name(self) -> str:
        return f"{self.kind}({self.inner.name})"

    def replace(self, **changes: Any) -> Any:
        """The same wrapper around ``inner.replace(**changes)`` (config fields changed)."""
        if not hasattr(self.inner, "replace"):
            raise TypeError(f"{self.name}: the inner optimizer has no replace()")
        clone = copy.copy(self)
        clone.inner = self.inner.replace(**changes)
        return clone

    def init(self, params: Any) -> dict[str, Any]:
        raise NotImplementedError

    def step(
        self,
        params: PyTree,
        grads: PyTree,
        state: Mapping[str, Any],
        *,
        hyper_overrides: Mapping[str, Any] | None = None,
        skip_if: Any = None,
    ) -> tuple[PyTree, dict[str, Any]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.name}>"


# --------------------------------------------------------------------------------------
# trees and leaves
# --------------------------------------------------------------------------------------


def params_tree(model_or_params: Any) -> PyTree:
    """A module becomes ``{name: param}`` with frozen params (no grad) as ``None``."""
    if isinstance(model_or_params, torch.nn.Module):
        return {
            name: (p if p.requires_grad else None) for name, p in model_or_params.named_parameters()
        }
    return model_or_params


def leaf_name(path: tuple[Any, ...]) -> str:
    """The dotted name predicates see: ``("encoder", "layer.weight") -> "encoder.layer.weight"``."""
    return ".".join(str(key) for key in path)


def first_device(leaves: Sequence[Any]) -> torch.device:
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def check_step(
    optimizer: Any,
    params: PyTree,
    grads: PyTree,
    state: Any,
    hyper_overrides: Mapping[str, Any] | None,
    skip_if: Any = None,
) -> None:
    """Raise what ``optimizer.step`` would raise on these inputs (with this ``skip_if``),
    changing nothing.

    Through the optimizer's ``check`` where it has one (optimizers, ``skip_nonfinite``);
    else (wrappers) its step with ``skip_if=True``, which leaves params and state
    bit-identical. The gate is a CPU tensor, read on the host: an in-place optimizer step
    returns after its checks, with no arithmetic (and nothing for ``optorch.graphs`` to
    record); a pure step computes and discards. A refusal that depends on the values
    (``skip_nonfinite``'s ``max_consecutive``) is not seen by such a skipped step, only by
    ``check`` (see :func:`may_refuse_on_values`).
    """
    check = getattr(optimizer, "check", None)
    if check is not None:
        check(params, grads, state, hyper_overrides=hyper_overrides, skip_if=skip_if)
        return
    skip = torch.ones((), dtype=torch.bool)
    # on new containers (the same tensors): a skipped in-place step still adds the state
    # fields it creates on a first step, which the check must not do to the caller's dicts
    _, state_leaves, state_spec = flatten(state)
    containers = unflatten(state_spec, state_leaves)
    optimizer.step(params, grads, containers, hyper_overrides=hyper_overrides, skip_if=skip)


def may_refuse_on_values(optimizer: Any) -> bool:
    """Whether ``optimizer`` (a wrapper stack) holds a refusal that depends on the
    values, which a skipped step does not see: ``skip_nonfinite(max_consecutive=...)``."""
    if getattr(optimizer, "max_consecutive", None) is not None:
        return True
    inner = [getattr(optimizer, "inner", None)]
    inner += list(getattr(optimizer, "transforms", ()))
    inner += list(getattr(optimizer, "optimizers", {}).values())
    return any(may_refuse_on_values(o) for o in inner if o is not None)


def counter(leaves: Sequence[Any], value: int = 0) -> torch.Tensor:
    """A 0-d int64 tensor on the params' device."""
    return torch.full((), value, dtype=torch.int64, device=first_device(leaves))


def check_grads(who: str, params: PyTree, grads: PyTree) -> tuple[list[Any], list[Any], Any]:
    """Flatten params and grads; raise naming the first mismatch (before any write)."""
    paths, p_leaves, spec = flatten(params)
    g_paths, g_leaves, g_spec = flatten(grads)
    if g_paths != paths or not same_structure(g_spec, spec):
        raise ValueError(
            f"{who}: grads do not match params ({_first_structure_difference(params, grads)})"
        )
    for path, p, g in zip(paths, p_leaves, g_leaves, strict=True):
        if g is None:
            continue
        if not isinstance(g, torch.Tensor):
            raise TypeError(
                f"{who}: grad at {format_path(path)} must be a tensor or None, "
                f"got {type(g).__name__}"
            )
        if p is None:
            raise ValueError(f"{who}: grad at {format_path(path)} is set but the param is None")
        check_dense(f"{who}: grad at {format_path(path)}", g)
        if isinstance(p, torch.Tensor) and g.shape != p.shape:
            raise ValueError(
                f"{who}: grad at {format_path(path)} has shape {tuple(g.shape)} but the "
                f"param has shape {tuple(p.shape)}"
            )
        if isinstance(p, torch.Tensor) and g.dtype != p.dtype:
            raise TypeError(
                f"{who}: grad at {format_path(path)} has dtype {g.dtype} but the param has "
                f"dtype {p.dtype}"
            )
        if isinstance(p, torch.Tensor) and g.device != p.device:
            raise ValueError(
                f"{who}: grad at {format_path(path)} is on {g.device} but the param is on "
                f"{p.device}"
            )
    return paths, p_leaves, g_leaves


def expect_keys(who: str, state: Any, keys: Sequence[str]) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(f"{who}: state must be a dict (from init), got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(
            f"{who}: state lacks {missing} (has {sorted(map(str, state))}); is it the state "
            "of another optimizer?"
        )


def aligned_leaves(who: str, field: str, tree: PyTree, params: PyTree) -> list[Any]:
    """Leaves of a params-shaped state tree, checked against the params' structure."""
    paths, leaves_, _ = flatten(tree)
    p_paths, p_leaves, _ = flatten(params)
    if paths != p_paths:
        raise ValueError(
            f"{who}: state {field!r} does not match params "
            f"({_first_structure_difference(params, tree)})"
        )
    for path, p, s in zip(paths, p_leaves, leaves_, strict=True):
        if s is not None and not (
            isinstance(s, torch.Tensor) and (s.is_floating_point() or s.is_complex())
        ):
            what = f"dtype {s.dtype}" if isinstance(s, torch.Tensor) else repr(s)
            raise TypeError(
                f"{who}: state {field!r} at {format_path(path)} must be a floating-point "
                f"(or complex) tensor, got {what}"
            )
        if s is not None:
            check_dense(f"{who}: state {field!r} at {format_path(path)}", s)
        if isinstance(p, torch.Tensor) and isinstance(s, torch.Tensor) and s.shape != p.shape:
            raise ValueError(
                f"{who}: state {field!r} at {format_path(path)} has shape {tuple(s.shape)} "
                f"but the param has shape {tuple(p.shape)}"
            )
        if isinstance(p, torch.Tensor) and isinstance(s, torch.Tensor) and s.device != p.device:
            raise ValueError(
                f"{who}: state {field!r} at {format_path(path)} is on {s.device} but the "
                f"param is on {p.device}"
            )
    return leaves_


def check_counter(
    who: str, state: Mapping[str, Any], key: str, *, below: int | None = None
) -> torch.Tensor:
    """``state[key]`` must be a 0-d integer tensor (a wrapper's step counter), of the
    dtypes a step count may have, not negative and (``below``) less than a cycle's
    length, where it can be read without a device sync."""
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.dtype not in _STEP_DTYPES:
        raise TypeError(f"{who}: state[{key!r}] must be a 0-d int64 tensor, got {value!r}")
    if value.dim() != 0:
        raise ValueError(
            f"{who}: state[{key!r}] must be a 0-d int64 tensor, got shape {tuple(value.shape)}"
        )
    if host_readable(value) and int(value) < 0:
        raise ValueError(f"{who}: state[{key!r}] must not be negative, got {int(value)}")
    if below is not None and host_readable(value) and int(value) >= below:
        raise ValueError(
            f"{who}: state[{key!r}] must be less than {below} (calls into the cycle), "
            f"got {int(value)}"
        )
    return value


def _is_leaf(node: Any) -> bool:
    return isinstance(node, torch.Tensor)


def select_leaves(who: str, what: str, selector: LeafFn | PyTree, params: PyTree) -> list[Any]:
    """One value per leaf of ``params``: ``selector(path, tensor)`` for each tensor leaf
    (``None`` for ``None`` leaves), or the leaves of a tree shaped like ``params``."""
    paths, p_leaves, _ = flatten(params)
    if callable(selector):
        return [
            selector(leaf_name(path), p) if isinstance(p, torch.Tensor) else None
            for path, p in zip(paths, p_leaves, strict=True)
        ]
    s_paths, s_leaves, _ = flatten(selector)
    if list(s_paths) != paths:
        raise ValueError(
            f"{who}: the {what} tree does not match params "
            f"({_first_structure_difference(params, selector)})"
        )
    return list(s_leaves)


def restricted(leaves_: Sequence[Any], keep: Sequence[bool], spec: Any) -> PyTree:
    """The tree with ``None`` where ``keep`` is false."""
    return unflatten(spec, [x if k else None for x, k in zip(leaves_, keep, strict=True)])


# --------------------------------------------------------------------------------------
# skipping and writing
# --------------------------------------------------------------------------------------


def as_gate(who: str, skip_if: Any) -> torch.Tensor | None:
    """``skip_if`` as a 0-d bool tensor (or ``None``)."""
    if skip_if is None:
        return None
    if isinstance(skip_if, bool):
        return torch.tensor(skip_if)
    if not isinstance(skip_if, torch.Tensor) or skip_if.numel() != 1:
        raise TypeError(f"{who}: skip_if must be a bool or a 0-d tensor, got {skip_if!r}")
    return skip_if.reshape(()).to(torch.bool)


def either(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Logical or of two optional gates."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b


def commit(
    old: Sequence[Any], new: Sequence[Any], *, inplace: bool, skip: torch.Tensor | None
) -> list[Any]:
    """The values to keep: ``new`` (or ``old`` where ``skip``), written into ``old`` in
    place mode and returned as new tensors in pure mode. ``None`` leaves stay ``None``."""
    out: list[Any] = []
    for before, after in zip(old, new, strict=True):
        if before is None or after is None:
            out.append(before)
            continue
        if after.dtype != before.dtype:  # a 0-d leaf widened by a 0-d hyperparameter
            after = after.to(before.dtype)
        value = after if skip is None else torch.where(skip, before, after)
        if inplace:
            if value is not before:
                with torch.no_grad():
                    before.copy_(value)
            out.append(before)
        else:
            out.append(value)
    return out


def commit_tree(
    who: str, old: PyTree, new: PyTree, *, inplace: bool, skip: torch.Tensor | None
) -> PyTree:
    """:func:`commit` on two trees of the same structure."""
    paths, old_leaves, spec = flatten(old)
    new_paths, new_leaves, _ = flatten(new)
    if new_paths != paths:
        raise ValueError(
            f"{who}: the new state does not have the structure of the old one "
            f"({_first_structure_difference(old, new)})"
        )
    return unflatten(spec, commit(old_leaves, new_leaves, inplace=inplace, skip=skip))


def clone_leaves(leaves_: Sequence[Any], *, differentiable: bool = False) -> list[Any]:
    """Copies of the tensor leaves (``None`` kept): detached, or for a pure
    (differentiable) wrapper still connected to the leaves (gradients w.r.t. the
    initial params flow through an average that starts at them)."""
    return [
        (p if differentiable else p.detach()).clone(memory_format=torch.preserve_format)
        if isinstance(p, torch.Tensor)
        else None
        for p in leaves_
    ]


def check_probability(who: str, name: str, value: Any) -> None:
    """``value`` in [0, 1] (NaN and non-numbers rejected, the message names it)."""
    check_range(who, name, value, 0.0, 1.0)


def check_count(who: str, name: str, value: Any, *, minimum: int) -> None:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"Invalid {who}.{name}: {value!r} (must be an int >= {minimum})")
