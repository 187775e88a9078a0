"""Pytree helpers on :mod:`optree` whose errors name the offending leaf.

Params, grads and optimizer state may be any pytree of tensors: a list, a dict of
``name -> tensor`` as ``dict(model.named_parameters())`` gives, or anything nested.
``None`` is treated as a leaf (a missing gradient, or a param that carries no state).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import optree
import torch

__all__ = [
    "PyTree",
    "flatten",
    "format_path",
    "leaves",
    "map_leaves",
    "same_structure",
    "unflatten",
]

PyTree = Any
Path = tuple[Any, ...]


def _is_leaf(node: Any) -> bool:
    return isinstance(node, torch.Tensor)


class _Hole:
    """A ``None`` leaf while dynamo traces (see :func:`flatten`)."""

    __slots__ = ()


_HOLE = _Hole()


def _swap(tree: PyTree, old: Any, new: Any) -> PyTree:
    """``tree`` with each leaf ``old`` of its dicts, lists and tuples (namedtuples and
    ``OrderedDict`` included) replaced by ``new``; other nodes as they are."""
    if tree is old:
        return new
    kind = type(tree)
    if kind is dict:
        return {key: _swap(value, old, new) for key, value in tree.items()}
    if kind is OrderedDict:
        return OrderedDict((key, _swap(value, old, new)) for key, value in tree.items())
    if kind is list:
        return [_swap(value, old, new) for value in tree]
    if kind is tuple:
        return tuple(_swap(value, old, new) for value in tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple
        return kind(*(_swap(value, old, new) for value in tree))
    return tree


def flatten(tree: PyTree) -> tuple[list[Path], list[Any], optree.PyTreeSpec]:
    """Flatten ``tree`` into (paths, leaves, spec), with tensors and ``None`` as leaves.

    While dynamo traces (a user's ``torch.compile`` of a step), ``None`` leaves are
    flattened as a placeholder object and given back as ``None``: dynamo's stand-in for
    optree cannot flatten a dict whose values are all ``None`` (torch 2.13: "Unexpected
    type in sourceless builder"), which is what the grads of a frozen or unused
    submodule are, nor unflatten ``None`` leaves (see :func:`unflatten`).
    """
    if torch.compiler.is_compiling():
        paths, leaves_, spec = optree.tree_flatten_with_path(
            _swap(tree, None, _HOLE), is_leaf=_is_leaf, none_is_leaf=True
        )
        return list(paths), [None if leaf is _HOLE else leaf for leaf in leaves_], spec
    paths, leaves_, spec = optree.tree_flatten_with_path(tree, is_leaf=_is_leaf, none_is_leaf=True)
    return list(paths), list(leaves_), spec


def unflatten(spec: optree.PyTreeSpec, leaves_: Sequence[Any]) -> PyTree:
    """Inverse of :func:`flatten`."""
    if torch.compiler.is_compiling() and any(leaf is None for leaf in leaves_):
        # dynamo's stand-in takes a None leaf for an empty node ("length mismatch")
        holed = [_HOLE if leaf is None else leaf for leaf in leaves_]
        return _swap(optree.tree_unflatten(spec, holed), _HOLE, None)
    return optree.tree_unflatten(spec, list(leaves_))


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` (tensors and ``None``) in flattening order."""
    return flatten(tree)[1]


def map_leaves(fn: Callable[[Any], Any], tree: PyTree) -> PyTree:
    """Apply ``fn`` to every leaf (``None`` included) and keep the structure."""
    _, leaves_, spec = flatten(tree)
    return unflatten(spec, [fn(leaf) for leaf in leaves_])


def same_structure(a: optree.PyTreeSpec, b: optree.PyTreeSpec) -> bool:
    """Whether two tree specs describe the same structure (``a == b``).

    While dynamo traces, compared node by node (type, entries, children): dynamo's
    stand-in for optree's specs compares their unflatten functions in ``==``, which the
    dynamo of torch 2.11 cannot trace (measured: a user's ``torch.compile`` of a train
    step failed in optorch's check that grads match params).
    """
    if not torch.compiler.is_compiling():
        return bool(a == b)
    return _same_nodes(a, b)


def _same_nodes(a: Any, b: Any) -> bool:
    if a.type is not b.type or a.num_children != b.num_children:
        return False
    if a.num_leaves != b.num_leaves or list(a.entries()) != list(b.entries()):
        return False
    return all(_same_nodes(x, y) for x, y in zip(a.children(), b.children(), strict=True))


def format_path(path: Path) -> str:
    """Render a leaf path for messages: ``['layer.weight']``, ``[0]``, ``['a'][1]``."""
    if not path:
        return "<root>"
    return "".join(f"[{key!r}]" for key in path)
