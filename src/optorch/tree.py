"""Pytree helpers on :mod:`optree` whose errors name the offending leaf.

Params, grads and optimizer state may be any pytree of tensors: a list, a dict of
``name -> tensor`` as ``dict(model.named_parameters())`` gives, or anything nested.
``None`` is treated as a leaf (a missing gradient, or a param that carries no state).
"""

from __future__ import annotations

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
    "unflatten",
]

PyTree = Any
Path = tuple[Any, ...]


def _is_leaf(node: Any) -> bool:
    return isinstance(node, torch.Tensor)


def flatten(tree: PyTree) -> tuple[list[Path], list[Any], optree.PyTreeSpec]:
    """Flatten ``tree`` into (paths, leaves, spec), with tensors and ``None`` as leaves."""
    paths, leaves_, spec = optree.tree_flatten_with_path(tree, is_leaf=_is_leaf, none_is_leaf=True)
    return list(paths), list(leaves_), spec


def unflatten(spec: optree.PyTreeSpec, leaves_: Sequence[Any]) -> PyTree:
    """Inverse of :func:`flatten`."""
    return optree.tree_unflatten(spec, list(leaves_))


def leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` (tensors and ``None``) in flattening order."""
    return flatten(tree)[1]


def map_leaves(fn: Callable[[Any], Any], tree: PyTree) -> PyTree:
    """Apply ``fn`` to every leaf (``None`` included) and keep the structure."""
    _, leaves_, spec = flatten(tree)
    return unflatten(spec, [fn(leaf) for leaf in leaves_])


def format_path(path: Path) -> str:
    """Render a leaf path for messages: ``['layer.weight']``, ``[0]``, ``['a'][1]``."""
    if not path:
        return "<root>"
    return "".join(f"[{key!r}]" for key in path)
