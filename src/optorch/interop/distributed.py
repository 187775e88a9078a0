r"""optorch under ``torch.distributed``: FSDP2, DDP and sharded checkpoints (DCP).

An optorch step is tensor code, so it runs unchanged on the ``DTensor`` params and
grads that FSDP2 (``torch.distributed.fsdp.fully_shard``) gives a module: state made by
``optimizer.init`` is created with ``torch.zeros_like(param)``, so it is a ``DTensor``
with the param's mesh and placements (each rank allocates only its own shard), and
every elementwise operation of a step is local to the shard. Whole-tensor reductions
are taken on the full logical tensor by DTensor itself: ``param.norm()`` of a sharded
param is a partial norm that is all-reduced when it is used, so that

.. math::

    \lVert p \rVert = \Bigl(\sum_{r} \lVert p^{(r)} \rVert^2\Bigr)^{1/2}

over the shards :math:`p^{(r)}` of the ranks (LARS, LAMB, Adafactor's RMS), and a mean
over a sharded dim sums over every rank before dividing by the full size (Adafactor's
factored row and column moments). With DDP every rank holds the full params and
all-reduced grads, so optorch runs exactly as in one process.

This module adds what the engine does not do by itself: :func:`gather_full` (every
``DTensor`` of a tree as its full tensor, for logging, tests and single-file export),
and sharded checkpoints through ``torch.distributed.checkpoint`` (DCP):
:func:`save_sharded` writes each rank's shards (a tree of model and optimizer state
dicts), :func:`load_sharded` reads them into a template on any number of ranks, one
process without a process group included. See ``docs/distributed.md``.

>>> import tempfile, torch, optorch
>>> from optorch.interop.distributed import load_sharded, save_sharded
>>> opt = optorch.get_optimizer("adamw", max_lr=0.1)
>>> params = {"w": torch.ones(3)}
>>> state = opt.init(params)
>>> params, state = opt.step(params, {"w": torch.ones(3)}, state)
>>> path = tempfile.mkdtemp()
>>> save_sharded(path, {"params": params, "optim": state})
>>> template = {"params": {"w": torch.zeros(3)}, "optim": opt.init({"w": torch.zeros(3)})}
>>> restored = load_sharded(path, template)
>>> int(restored["optim"]["step"]), restored["params"]["w"]
(1, tensor([0.9000, 0.9000, 0.9000]))
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import optree
import torch

from optorch.base import SKIPPED, STEP
from optorch.tree import flatten, unflatten

__all__ = [
    "gather_full",
    "is_distributed",
    "is_dtensor",
    "load_sharded",
    "save_sharded",
]


def is_distributed() -> bool:
    """Whether a default process group is initialised (``torch.distributed``)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_dtensor(value: Any) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor``."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def gather_full(tree: Any) -> Any:
    """``tree`` with every ``DTensor`` leaf replaced by its full tensor (``full_tensor()``).

    A collective: every rank of each leaf's mesh must call it, with the same tree. Plain
    tensors and other leaves come back as they are (DDP params, the step count). The
    result is a plain tensor on every rank, so it can be compared, logged, or saved with
    ``torch.save`` as a single-process checkpoint.

    >>> import torch
    >>> gather_full({"step": torch.tensor(3), "w": torch.ones(2)})
    {'step': tensor(3), 'w': tensor([1., 1.])}
    """

    def full(leaf: Any) -> Any:
        if not is_dtensor(leaf):
            return leaf
        whole = leaf.full_tensor()
        # a replicated leaf's full tensor is its local buffer, which the next in-place
        # step writes: a copy, so that what was gathered stays what it was
        return whole.clone() if whole.data_ptr() == leaf.to_local().data_ptr() else whole

    return optree.tree_map(full, tree, none_is_leaf=True)


def _checkpoint_id(who: str, path: Any) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{who}: path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fspath(path)


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    """DCP warns that it assumes one process when no group is initialised; here that is
    the intent, said by ``no_dist``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


def _check_state(who: str, state: Any) -> None:
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{who}: state must be a dict (e.g. {{'model': model.state_dict(), 'optim': "
            f"opt_state}}), got {type(state).__name__}"
        )


def _add_skipped_counts(template: Any, checkpoint_id: str) -> None:
    """Give each optimizer state of ``template`` the ``"skipped_steps"`` tree that the
    checkpoint holds for it and the template (a fresh ``optimizer.init``) lacks: a state
    gains it once a param sits out a step (:data:`optorch.base.SKIPPED`), and DCP reads
    only the keys a template has, so the per-param counts would be lost. And take out
    of the template the rule-wide values a checkpoint may predate (NAdam's
    ``mu_product``), which DCP would report missing."""
    import torch.distributed.checkpoint as dcp

    try:
        saved = list(dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata)
    except Exception:  # an unreadable checkpoint: dcp.load says why
        return
    from optorch.interop.checkpoint import _resumable_at

    counted = any(SKIPPED in key.split(".") for key in saved)

    def visit(node: Any, prefix: str) -> None:
        if not isinstance(node, dict):
            return
        # a value the checkpoint predates (NAdam's mu_product, accumulate's grad_seen):
        # the step remakes it
        resumable = _resumable_at(node)
        for name in [n for n in node if n in resumable and prefix + n not in saved]:
            del node[name]
        if (
            counted
            and STEP in node
            and SKIPPED not in node
            and any(key.startswith(prefix + SKIPPED + ".") for key in saved)
        ):
            # the params' structure: that of a per-param field of the same state
            like = next(
                (v for k, v in node.items() if k != STEP and isinstance(v, (dict, list, tuple))),
                None,
            )
            if like is not None:
                _, leaves, spec = flatten(like)
                node[SKIPPED] = unflatten(
                    spec,
                    [
                        None if leaf is None else torch.zeros((), dtype=torch.int64)
                        for leaf in leaves
                    ],
                )
        for key, value in node.items():
            visit(value, f"{prefix}{key}.")

    visit(template, "")


def save_sharded(
    path: str | os.PathLike[str], state: Mapping[str, Any], *, process_group: Any = None
) -> None:
    """Write ``state`` (a dict of state dicts) as a sharded DCP checkpoint in folder ``path``.

    Each rank writes the shards it holds of every ``DTensor`` (FSDP2 params, optimizer
    state made for them); plain tensors (the step count, DDP or single-process params)
    are written once. Call it on every rank of ``process_group`` (the default group when
    ``None``), or in one process without a process group. ``state`` is typically
    ``{"model": model.state_dict(), "optim": opt_state}``: FSDP2's ``state_dict()`` is
    already sharded, and an optorch state is a plain tree of tensors, so no
    optimizer-specific flattening is needed.
    """
    import torch.distributed.checkpoint as dcp

    who = "save_sharded"
    checkpoint_id = _checkpoint_id(who, path)
    _check_state(who, state)
    with _single_process_quietly():
        dcp.save(
            dict(state),
            checkpoint_id=checkpoint_id,
            process_group=process_group,
            no_dist=not is_distributed(),
        )


def load_sharded(
    path: str | os.PathLike[str], template: Mapping[str, Any], *, process_group: Any = None
) -> Any:
    """Read a checkpoint of :func:`save_sharded` into ``template``, in place; return it.

    ``template`` has the structure of the saved state and the layout wanted now: the
    ``state_dict()`` of the model as it is wrapped now and ``optimizer.init(params)``
    for its params. DCP reshards: a checkpoint written on 2 ranks loads on 1 (plain
    tensors), on 2, or on any other mesh, and each rank reads only the pieces of its
    own shards. Loading in place is what makes ``model.state_dict()`` entries update
    the model's own parameters.
    """
    import torch.distributed.checkpoint as dcp

    who = "load_sharded"
    checkpoint_id = _checkpoint_id(who, path)
    _check_state(who, template)
    found = os.path.isdir(checkpoint_id)
    if is_distributed():
        # every rank decides together: one rank raising while the others enter the
        # collective load would leave those waiting until the group's timeout
        flag = torch.tensor([0 if found else 1], dtype=torch.int32)
        if torch.distributed.get_backend(process_group) == "nccl":
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, group=process_group)
        missing_somewhere = int(flag.item())
        if found and missing_somewhere:
            raise FileNotFoundError(
                f"{who}: the checkpoint folder {checkpoint_id!r} is missing on "
                f"{missing_somewhere} rank(s) (storage not shared between ranks?)"
            )
    if not found:
        raise FileNotFoundError(f"{who}: no checkpoint folder at {checkpoint_id!r}")
    _add_skipped_counts(template, checkpoint_id)
    with _single_process_quietly():
        dcp.load(
            template,
            checkpoint_id=checkpoint_id,
            process_group=process_group,
            no_dist=not is_distributed(),
        )
    return template
