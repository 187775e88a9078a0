r"""Checkpoints: optimizer state (and params, and the optimizer itself) to one file.

A checkpoint holds a **state**: any pytree of tensors, ``None``, Python numbers,
strings and ``torch.dtype`` values in dicts, lists and tuples (an optimizer state,
a wrapper state nesting those, the :mod:`optorch.amp` scaler state). Optionally it
also holds the **params**, an **extra** pytree (the scaler state, a data position, ...)
and a description of the **optimizer** (registry name, config fields, wrapper
structure), so that :func:`load_optimizer` rebuilds optimizer and state together.

Two file formats:

* ``"safetensors"`` (default): the tensors in a ``.safetensors`` file, the structure in
  its string metadata (key ``"optorch"``, JSON). Readable by any safetensors tool.
* ``"torch"``: ``torch.save`` of a dict of plain tensors and one JSON string, read back
  with ``torch.load(weights_only=True)``.

Nothing is ever unpickled as code: the structure is JSON, and the only callables
rebuilt from a file are schedules made by :mod:`optorch.schedule` (recorded as the
builder's function name in that module and its keyword arguments). Any other callable
(a custom schedule, a partition's label function without params to evaluate it on)
is recorded as *missing*, and :func:`load_optimizer` asks the caller to pass it again.

Encoding of the structure (``"tree"`` nodes in the JSON): a tensor is
``{"T": key}`` (the key of the tensor in the file; the same tensor object twice in the
tree is stored once and comes back as one object), a dict is
``{"dict": [[key, node], ...]}`` (keys in order, any JSON scalar or tuple), a list
``{"list": [...]}``, a tuple ``{"tuple": [...]}``, a dtype ``{"dtype": "float16"}``, a
non-finite float ``{"float": "inf"}``, and ``None``, bools, ints, finite floats and
strings are themselves.

>>> import tempfile, os, torch, optorch
>>> from optorch.interop import checkpoint
>>> opt = optorch.get_optimizer("adamw", max_lr=1e-3)
>>> params = {"w": torch.ones(2, 2)}
>>> state = opt.init(params)
>>> params, state = opt.step(params, {"w": torch.ones(2, 2)}, state)
>>> path = os.path.join(tempfile.mkdtemp(), "opt.safetensors")
>>> _ = checkpoint.save(path, state, optimizer=opt, params=params)
>>> opt2, state2 = checkpoint.load_optimizer(path, params=params)
>>> opt2.config == opt.config, torch.equal(state2["exp_avg"]["w"], state["exp_avg"]["w"])
(True, True)
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import optree
import torch

from optorch.base import _STEP_DTYPES, SKIPPED, STEP
from optorch.tree import PyTree, flatten, format_path

__all__ = [
    "FORMATS",
    "Checkpoint",
    "describe_optimizer",
    "info",
    "load",
    "load_checkpoint",
    "load_optimizer",
    "load_params",
    "rebuild_optimizer",
    "save",
]

#: File formats :func:`save` writes.
FORMATS = ("safetensors", "torch")
_MAGIC = "optorch.checkpoint"
_VERSION = 1
_META_KEY = "optorch"
_SUFFIX_FORMATS = {
    ".safetensors": "safetensors",
    ".pt": "torch",
    ".pth": "torch",
    ".ckpt": "torch",
    ".bin": "torch",
}


# --------------------------------------------------------------------------------------
# tree <-> JSON + tensor table
# --------------------------------------------------------------------------------------


class _TensorTable:
    """Tensors by key; one entry per tensor object (aliasing is kept)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.devices: dict[str, str] = {}
        self._by_id: dict[int, str] = {}
        self._storages: set[tuple[str, int]] = set()

    def add(self, tensor: torch.Tensor, path: tuple[Any, ...], prefix: str) -> str:
        known = self._by_id.get(id(tensor))
        if known is not None:
            return known
        if tensor.layout != torch.strided:
            raise TypeError(
                f"cannot store the {tensor.layout} tensor at {prefix}{format_path(path)}: "
                "only dense tensors are supported"
            )
        base = prefix + "/".join(str(k) for k in path) if path else prefix.rstrip("/")
        key, n = base, 1
        while key in self.tensors:
            n += 1
            key = f"{base}#{n}"
        self._by_id[id(tensor)] = key
        self.devices[key] = str(tensor.device)
        self.tensors[key] = self._standalone(tensor.detach())
        return key

    def _standalone(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU tensor owning exactly its own storage (no views of others)."""
        out = tensor.to("cpu")
        storage = out.untyped_storage()
        whole = storage.nbytes() == out.numel() * out.element_size()
        ident = (str(tensor.device), tensor.untyped_storage().data_ptr())
        shared = out.numel() > 0 and ident in self._storages
        if not out.is_contiguous() or not whole or shared:
            # a copy: a file must not carry the whole storage of a view, and
            # safetensors refuses tensors that share storage
            out = out.clone(memory_format=torch.contiguous_format)
        if tensor.numel() > 0:
            self._storages.add(ident)
        return out


def _encode(node: Any, path: tuple[Any, ...], table: _TensorTable, prefix: str) -> Any:
    if isinstance(node, torch.Tensor):
        return {"T": table.add(node, path, prefix)}
    if node is None or isinstance(node, (bool, int, str)):
        return node
    if isinstance(node, float):
        return node if math.isfinite(node) else {"float": repr(node)}
    if isinstance(node, torch.dtype):
        return {"dtype": _dtype_name(node)}
    if isinstance(node, Mapping):
        return {
            "dict": [
                [_encode_key(k, path), _encode(v, (*path, k), table, prefix)]
                for k, v in node.items()
            ]
        }
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
        return {"tuple": [_encode(v, (*path, i), table, prefix) for i, v in enumerate(node)]}
    if isinstance(node, list):
        return {"list": [_encode(v, (*path, i), table, prefix) for i, v in enumerate(node)]}
    raise TypeError(
        f"cannot store the {type(node).__name__} at {prefix}{format_path(path)}: a checkpoint "
        "holds tensors, None, numbers, strings and dtypes in dicts, lists and tuples"
    )


def _encode_key(key: Any, path: tuple[Any, ...]) -> Any:
    if key is None or isinstance(key, (bool, int, str)):
        return key
    if isinstance(key, float) and math.isfinite(key):
        return key
    if isinstance(key, tuple):
        return {"tuple": [_encode_key(k, path) for k in key]}
    raise TypeError(f"cannot store the dict key {key!r} at {format_path(path)}")


def _decode(node: Any, tensors: Callable[[str], torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        raise ValueError("malformed checkpoint tree: a bare list")
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"malformed checkpoint tree node: {node!r}")
    ((kind, value),) = node.items()
    if kind == "T":
        return tensors(str(value))
    if kind in ("dict", "list", "tuple") and not isinstance(value, list):
        raise ValueError(f"malformed checkpoint tree node: {kind} of {value!r}")
    if kind == "dict":
        if not all(isinstance(item, list) and len(item) == 2 for item in value):
            raise ValueError(f"malformed checkpoint tree node: dict items {value!r}")
        return {_decode_key(k): _decode(v, tensors) for k, v in value}
    if kind == "list":
        return [_decode(v, tensors) for v in value]
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    if kind == "dtype":
        return _dtype(value)
    if kind == "float":
        return float(value)
    raise ValueError(f"malformed checkpoint tree node: unknown kind {kind!r}")


def _decode_key(node: Any) -> Hashable:
    if isinstance(node, dict) and set(node) == {"tuple"}:
        return tuple(_decode_key(k) for k in node["tuple"])
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise ValueError(f"malformed checkpoint tree: bad dict key {node!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: Any) -> torch.dtype:
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"malformed checkpoint: unknown dtype {name!r}")
    return value


# --------------------------------------------------------------------------------------
# describing an optimizer (name, config, wrappers) as JSON, and rebuilding it
# --------------------------------------------------------------------------------------


class _Missing(Exception):
    """A value that cannot be recorded (a general callable)."""


#: Gradient transformations of :func:`optorch.wrappers.chain` by name: the builder in
#: :mod:`optorch.wrappers` and the attributes that are its keyword arguments.
_TRANSFORMS: dict[str, tuple[str, ...]] = {
    "clip_by_global_norm": ("max_norm",),
    "clip_by_value": ("limit",),
    "clip_by_norm_per_param": ("max_norm",),
    "adaptive_clip": ("clipping", "eps"),
    "scale": ("factor",),
    "add_noise": ("eta", "gamma", "seed"),
    "zero_nans": (),
}


def _callable_name(fn: Any) -> str | None:
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        return f"{module}:{qualname}"
    return None


def _encode_schedule(fn: Any) -> Any:
    """A schedule built by :mod:`optorch.schedule` as ``{"function", "kwargs"}``."""
    from optorch import schedule as schedule_module

    if (
        isinstance(fn, functools.partial)
        and not fn.args
        and getattr(fn.func, "__module__", None) == schedule_module.__name__
        and getattr(schedule_module, fn.func.__name__, None) is fn.func
    ):
        kwargs = {}
        for key, value in fn.keywords.items():
            if key == "schedules":
                kwargs[key] = {"schedules": [_encode_schedule(s) for s in value]}
            else:
                kwargs[key] = _encode_plain(value)
        return {"function": fn.func.__name__, "kwargs": kwargs}
    raise _Missing


def _decode_schedule(record: Any) -> Any:
    from optorch import schedule as schedule_module

    name = record.get("function") if isinstance(record, dict) else None
    func = getattr(schedule_module, str(name), None)
    if not (inspect.isfunction(func) and func.__module__ == schedule_module.__name__):
        raise ValueError(f"checkpoint: {name!r} is not a schedule function of optorch.schedule")
    kwargs = {}
    for key, value in record["kwargs"].items():
        if isinstance(value, dict) and set(value) == {"schedules"}:
            kwargs[key] = tuple(_decode_schedule(s) for s in value["schedules"])
        else:
            kwargs[key] = _decode_plain(value)
    return functools.partial(func, **kwargs)


def _encode_plain(value: Any) -> Any:
    """A config value as JSON: numbers, strings, tuples/lists of them, enums, dtypes."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, enum.Enum):
        return {"enum": value.name}
    if isinstance(value, torch.dtype):
        return {"dtype": _dtype_name(value)}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return {
            "tensor": value.detach().cpu().reshape(()).item(),
            "dtype": _dtype_name(value.dtype),
        }
    if isinstance(value, tuple):
        return {"tuple": [_encode_plain(v) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode_plain(v) for v in value]}
    raise _Missing


def _decode_plain(value: Any, default: Any = None) -> Any:
    if not isinstance(value, dict):
        return value
    if "enum" in value:
        if isinstance(default, enum.Enum):
            members = type(default).__members__
            if value["enum"] not in members:
                raise ValueError(
                    f"malformed checkpoint: {value['enum']!r} is not a "
                    f"{type(default).__name__} (members: {list(members)})"
                )
            return members[value["enum"]]
        return value["enum"]  # configs accept an enum member's name
    if "dtype" in value and "tensor" in value:
        return torch.tensor(value["tensor"], dtype=_dtype(value["dtype"]))
    if "dtype" in value:
        return _dtype(value["dtype"])
    if "float" in value:
        return float(value["float"])
    if "tuple" in value:
        return tuple(_decode_plain(v) for v in value["tuple"])
    if "list" in value:
        return [_decode_plain(v) for v in value["list"]]
    raise ValueError(f"malformed checkpoint: config value {value!r}")


def _registry_key(optimizer: Any) -> str | None:
    """The registry name whose rule and implied defaults match ``optimizer``."""
    from optorch.builder import REGISTRY

    best: tuple[int, str] | None = None
    for key, entry in REGISTRY.items():
        if entry.rule is not optimizer.rule:
            continue
        try:
            implied = entry.make_config()
        except (TypeError, ValueError):  # pragma: no cover - defaults always validate
            continue
        if all(
            getattr(implied, field) == getattr(optimizer.config, field) for field in entry.defaults
        ):
            score = (len(entry.defaults), key)
            if best is None or score[0] > best[0]:
                best = score
    return None if best is None else best[1]


def _describe_config(config: Any, where: str, missing: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key = f"{where}{field.name}"
        if field.name == "schedule" and value is not None:
            try:
                out[field.name] = {"schedule": _encode_schedule(value)}
            except _Missing:
                out[field.name] = {"missing": key}
                missing.append({"key": key, "what": "schedule", "repr": repr(value)[:200]})
            continue
        try:
            out[field.name] = _encode_plain(value)
        except _Missing:
            out[field.name] = {"missing": key}
            missing.append({"key": key, "what": "config value", "repr": repr(value)[:200]})
    return out


def _describe_selector(
    selector: Any, params: PyTree | None, where: str, missing: list[dict[str, Any]], what: str
) -> dict[str, Any]:
    """A label/mask selector: a tree as JSON; a function evaluated on ``params``."""
    from optorch.wrappers._core import params_tree, select_leaves

    if callable(selector):
        name = _callable_name(selector)
        if params is None:
            missing.append({"key": where, "what": what, "repr": name or repr(selector)[:200]})
            return {"missing": where, "callable": name}
        tree = params_tree(params)
        _, spec = optree.tree_flatten(tree, is_leaf=_is_tensor, none_is_leaf=True)
        values = select_leaves(what, what, selector, tree)
        selector = optree.tree_unflatten(spec, values)
        return {"tree": _encode(selector, (), _NO_TENSORS, ""), "callable": name}
    return {"tree": _encode(selector, (), _NO_TENSORS, ""), "callable": None}


def _is_tensor(node: Any) -> bool:
    return isinstance(node, torch.Tensor)


class _NoTensors(_TensorTable):
    def add(self, tensor: torch.Tensor, path: tuple[Any, ...], prefix: str) -> str:
        raise TypeError(f"a selector tree holds a tensor at {format_path(path)}")


_NO_TENSORS = _NoTensors()


def describe_optimizer(optimizer: Any, params: PyTree | None = None) -> dict[str, Any]:
    """A JSON-able description of ``optimizer`` (an :class:`optorch.Optimizer` or a
    wrapper of the library), from which :func:`rebuild_optimizer` rebuilds it.

    ``params`` (optional) evaluates the label and mask functions of
    :func:`~optorch.wrappers.partition` and :func:`~optorch.wrappers.masked` (and so
    :func:`~optorch.wrappers.decay_mask`): they are recorded as the tree of labels they
    give, which rebuilds an equivalent wrapper for params of that structure. What cannot
    be recorded is listed under ``"missing"`` (each with a ``key`` to pass it again by).

    >>> import optorch
    >>> record = describe_optimizer(optorch.get_optimizer("sgd", momentum=0.5))
    >>> record["tree"]["name"], record["tree"]["config"]["momentum"], record["missing"]
    ('sgd', 0.5, [])
    """
    missing: list[dict[str, Any]] = []
    tree = _describe(optimizer, params, "", missing)
    return {"tree": tree, "missing": missing}


def _describe(
    optimizer: Any, params: PyTree | None, where: str, missing: list[dict[str, Any]]
) -> dict[str, Any]:
    from optorch import wrappers
    from optorch.base import Optimizer

    if isinstance(optimizer, Optimizer):
        return {
            "kind": "optimizer",
            "name": _registry_key(optimizer),
            "rule": optimizer.rule.name,
            "config_type": type(optimizer.config).__name__,
            "config": _describe_config(optimizer.config, where, missing),
        }
    inner_where = f"{where}inner."
    if isinstance(optimizer, wrappers.Chain):
        transforms = []
        for index, transform in enumerate(optimizer.transforms):
            name = getattr(transform, "name", None)
            try:
                if name not in _TRANSFORMS:
                    raise _Missing
                args = {a: _encode_plain(getattr(transform, a)) for a in _TRANSFORMS[name]}
                transforms.append({"name": name, "args": args})
            except _Missing:
                key = f"{where}transforms[{index}]"
                missing.append(
                    {"key": key, "what": "gradient transformation", "repr": repr(transform)}
                )
                transforms.append({"missing": key})
        return {
            "kind": "chain",
            "transforms": transforms,
            "inner": _describe(optimizer.inner, params, inner_where, missing),
        }
    if isinstance(optimizer, wrappers.Accumulate):
        return {
            "kind": "accumulate",
            "every": optimizer.every,
            "inner": _describe(optimizer.inner, params, inner_where, missing),
        }
    if isinstance(optimizer, wrappers.SkipNonfinite):
        return {
            "kind": "skip_nonfinite",
            "max_consecutive": optimizer.max_consecutive,
            "inner": _describe(optimizer.inner, params, inner_where, missing),
        }
    if isinstance(optimizer, (wrappers.EMA, wrappers.Lookahead)):
        value = optimizer.decay if isinstance(optimizer, wrappers.EMA) else optimizer.alpha
        try:
            _encode_plain(value)
        except _Missing:
            key = where.rstrip(".") or "optimizer"
            missing.append({"key": key, "what": "optimizer", "repr": repr(optimizer)[:200]})
            return {"kind": "missing", "missing": key, "repr": repr(optimizer)[:200]}
    if isinstance(optimizer, wrappers.EMA):
        return {
            "kind": "ema",
            "decay": _encode_plain(optimizer.decay),
            "warmup": optimizer.warmup,
            "inner": _describe(optimizer.inner, params, inner_where, missing),
        }
    if isinstance(optimizer, wrappers.Lookahead):
        return {
            "kind": "lookahead",
            "sync_period": optimizer.sync_period,
            "alpha": _encode_plain(optimizer.alpha),
            "inner": _describe(optimizer.inner, params, inner_where, missing),
        }
    if isinstance(optimizer, wrappers.InjectHyperparams):
        return {
            "kind": "inject_hyperparams",
            "names": list(optimizer.names),
            "dtype": None if optimizer.dtype is None else _dtype_name(optimizer.dtype),
            "inner": _describe(optimizer.inner, params, inner_where, missing),
        }
    if isinstance(optimizer, wrappers.Masked):
        # a masked inner optimizer sees only the selected leaves (others None)
        return {
            "kind": "masked",
            "wrapper_kind": optimizer.kind,
            "invert": optimizer.invert,
            "mask": _describe_selector(optimizer.mask, params, f"{where}mask", missing, "mask"),
            "inner": _describe(optimizer.inner, params, inner_where, missing),
        }
    if isinstance(optimizer, wrappers.Partition):
        groups = []
        for label, group in optimizer.optimizers.items():
            groups.append(
                [
                    _encode_key(label, ()),
                    _describe(group, params, f"{where}groups.{label}.", missing),
                ]
            )
        return {
            "kind": "partition",
            "labels": _describe_selector(
                optimizer.labels, params, f"{where}labels", missing, "labels"
            ),
            "groups": groups,
        }
    key = where.rstrip(".") or "optimizer"
    missing.append({"key": key, "what": "optimizer", "repr": repr(optimizer)[:200]})
    return {"kind": "missing", "missing": key, "repr": repr(optimizer)[:200]}


def rebuild_optimizer(
    record: Mapping[str, Any],
    *,
    schedule: Callable[[Any], Any] | None = None,
    callables: Mapping[str, Any] | None = None,
    strict: bool = True,
) -> Any:
    """The optimizer :func:`describe_optimizer` described.

    Values that could not be recorded are looked up in ``callables`` by their key (as
    listed in ``record["missing"]``, e.g. ``"schedule"``, ``"inner.schedule"``,
    ``"groups.decay.schedule"``, ``"labels"``); a missing ``schedule`` may instead be given
    once as ``schedule=`` for all of them. ``strict=False`` builds the optimizer with no
    schedule where one is missing (enough to create or check state, which never depends
    on the schedule); other missing values always raise ``ValueError`` naming their keys.
    """
    given = dict(callables or {})
    unresolved: list[str] = []

    def resolve(key: str, what: str) -> Any:
        if key in given:
            return given[key]
        if what == "schedule" and schedule is not None:
            return schedule
        if what == "schedule" and not strict:
            return None
        unresolved.append(key)
        return None

    whats = {str(item["key"]): str(item.get("what", "")) for item in record.get("missing", [])}
    unknown = sorted(set(given) - set(whats))
    if unknown:
        raise ValueError(
            f"checkpoint: callables {unknown} are not missing from the optimizer record "
            f"(missing: {sorted(whats)})"
        )
    tree = record.get("tree")
    if not isinstance(tree, Mapping):
        raise ValueError("checkpoint: the optimizer record has no 'tree'")
    try:
        built = _rebuild(tree, lambda key: resolve(key, whats.get(key, "")))
    except (TypeError, KeyError, AttributeError, IndexError) as exc:
        # a record this version of optorch did not write (edited, or damaged)
        raise ValueError(
            f"checkpoint: malformed optimizer record ({type(exc).__name__}: {exc})"
        ) from None
    if unresolved:
        raise ValueError(
            "checkpoint: cannot rebuild the optimizer: these values were not recorded "
            f"(general callables): {unresolved}; pass them again as "
            "callables={key: value} (or schedule=... for schedules), or pass optimizer="
        )
    return built


def _rebuild(node: Mapping[str, Any], resolve: Callable[[str], Any]) -> Any:
    from optorch import wrappers
    from optorch.base import Optimizer
    from optorch.builder import REGISTRY

    kind = node.get("kind")
    if kind == "missing":
        return resolve(str(node["missing"]))
    if kind == "optimizer":
        name = node.get("name")
        entry = REGISTRY.get(str(name)) if name is not None else None
        if entry is None:
            entry = next((e for e in REGISTRY.values() if e.rule.name == node.get("rule")), None)
        if entry is None:
            raise ValueError(
                f"checkpoint: optimizer {name or node.get('rule')!r} is not registered here "
                f"(known: {sorted(REGISTRY)})"
            )
        defaults = {f.name: f.default for f in dataclasses.fields(entry.rule.config_type)}
        kwargs: dict[str, Any] = {}
        for field, value in node["config"].items():
            if field not in defaults:
                raise ValueError(
                    f"checkpoint: {entry.rule.config_type.__name__} has no field {field!r} "
                    "(the checkpoint was written by another version of optorch)"
                )
            if isinstance(value, dict) and "missing" in value:
                kwargs[field] = resolve(str(value["missing"]))
            elif isinstance(value, dict) and "schedule" in value:
                kwargs[field] = _decode_schedule(value["schedule"])
            else:
                kwargs[field] = _decode_plain(value, defaults[field])
        return Optimizer(entry.rule, entry.rule.config_type(**kwargs))
    if kind in (
        "chain",
        "accumulate",
        "skip_nonfinite",
        "ema",
        "lookahead",
        "inject_hyperparams",
        "masked",
    ):
        inner = _rebuild(node["inner"], resolve)
        if kind == "chain":
            parts: list[Any] = []
            for transform in node["transforms"]:
                if "missing" in transform:
                    parts.append(resolve(str(transform["missing"])))
                    continue
                if transform.get("name") not in _TRANSFORMS:
                    raise ValueError(
                        f"checkpoint: {transform.get('name')!r} is not a gradient transform "
                        f"that checkpoints record (known: {sorted(_TRANSFORMS)})"
                    )
                builder = getattr(wrappers, transform["name"])
                args = {k: _decode_plain(v) for k, v in transform["args"].items()}
                parts.append(builder(**args))
            return wrappers.chain(*parts, inner)
        if kind == "accumulate":
            return wrappers.accumulate(inner, every=node["every"])
        if kind == "skip_nonfinite":
            return wrappers.skip_nonfinite(inner, max_consecutive=node["max_consecutive"])
        if kind == "ema":
            return wrappers.ema(inner, _decode_plain(node["decay"]), warmup=node["warmup"])
        if kind == "lookahead":
            return wrappers.lookahead(
                inner, sync_period=node["sync_period"], alpha=_decode_plain(node["alpha"])
            )
        if kind == "inject_hyperparams":
            dtype = None if node["dtype"] is None else _dtype(node["dtype"])
            return wrappers.inject_hyperparams(inner, names=list(node["names"]), dtype=dtype)
        mask = _selector(node["mask"], resolve)
        built = wrappers.Masked(inner, mask, invert=bool(node["invert"]))
        built.kind = str(node.get("wrapper_kind", "masked"))
        return built
    if kind == "partition":
        labels = _selector(node["labels"], resolve)
        groups = {_decode_key(label): _rebuild(group, resolve) for label, group in node["groups"]}
        return wrappers.partition(labels, groups)
    raise ValueError(f"checkpoint: unknown optimizer record kind {kind!r}")


def _selector(node: Mapping[str, Any], resolve: Callable[[str], Any]) -> Any:
    if "tree" in node:
        return _decode(node["tree"], _no_tensor)
    return resolve(str(node["missing"]))


def _no_tensor(key: str) -> torch.Tensor:
    raise ValueError("malformed checkpoint: a selector tree refers to a tensor")


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------


def _format_for(path: Path, format: str | None) -> str:
    if format is None:
        return _SUFFIX_FORMATS.get(path.suffix.lower(), "safetensors")
    if format not in FORMATS:
        raise ValueError(f"checkpoint format must be one of {FORMATS}, got {format!r}")
    return format


def save(
    path: str | os.PathLike[str],
    state: PyTree,
    *,
    optimizer: Any = None,
    params: PyTree | None = None,
    extra: PyTree | None = None,
    format: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``state`` (and optionally ``params``, ``extra``, ``optimizer``) to ``path``.

    * ``state``: the optimizer state (or any pytree, see the module docstring).
    * ``optimizer``: recorded (registry name, config, wrappers; see
      :func:`describe_optimizer`) so that :func:`load_optimizer` rebuilds it.
    * ``params``: stored too (restore them with :func:`load_params`), and used to
      evaluate partition/mask functions for the optimizer record.
    * ``extra``: any other pytree to keep with it (the loss scaler's state, a data
      position), returned by :func:`load_checkpoint`; loaded without checks.
    * ``format``: ``"safetensors"`` or ``"torch"``; by default from the suffix
      (``.pt``/``.pth``/``.ckpt``/``.bin``: torch; otherwise safetensors).
    * ``metadata``: strings kept as they are (e.g. the run name).

    The file is written to a temporary name in the same folder, then renamed, so an
    interrupted save never leaves a truncated checkpoint under ``path``.
    Returns the path written.
    """
    target = Path(path)
    kind = _format_for(target, format)
    if metadata is not None and not (
        isinstance(metadata, Mapping)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise TypeError(f"metadata must be a dict of strings, got {metadata!r}")
    table = _TensorTable()
    header: dict[str, Any] = {
        "format": _MAGIC,
        "version": _VERSION,
        "state": _encode(state, (), table, "state/"),
        "params": None if params is None else _encode(_plain_params(params), (), table, "params/"),
        "extra": None if extra is None else _encode(extra, (), table, "extra/"),
        "optimizer": None if optimizer is None else describe_optimizer(optimizer, params),
        "devices": table.devices,
        "metadata": dict(metadata or {}),
        "torch_version": torch.__version__,
    }
    text = json.dumps(header, allow_nan=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(handle)
    try:
        if kind == "safetensors":
            _write_safetensors(temporary, table.tensors, text)
        else:
            torch.save({_META_KEY: text, "tensors": table.tensors}, temporary)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _plain_params(params: Any) -> PyTree:
    if isinstance(params, torch.nn.Module):
        return dict(params.named_parameters())
    return params


#: The safetensors metadata entry naming the complex128 tensors stored as real views.
_COMPLEX128_KEY = "optorch.complex128"


def _write_safetensors(path: str, tensors: dict[str, torch.Tensor], text: str) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ValueError(
            "format='safetensors' needs the safetensors package (pip install safetensors); "
            "or save with format='torch'"
        ) from None
    # safetensors has no complex128 (0.8): such tensors go in as their float64 real view
    # (a trailing dim of 2), named in the metadata, and come back complex on reading
    complex_keys = sorted(k for k, t in tensors.items() if t.dtype == torch.complex128)
    stored = {k: (torch.view_as_real(t) if k in complex_keys else t) for k, t in tensors.items()}
    metadata = {_META_KEY: text}
    if complex_keys:
        metadata[_COMPLEX128_KEY] = json.dumps(complex_keys)
    try:
        save_file(stored, path, metadata=metadata)
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise ValueError(
            f"safetensors cannot store this state ({exc}); save with format='torch'"
        ) from exc


# --------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    #: The optimizer state (new tensors).
    state: PyTree
    #: The saved params (new tensors), or the given params after ``restore_params``;
    #: ``None`` when none were saved.
    params: PyTree | None
    #: The ``extra`` pytree given to :func:`save`, or ``None``.
    extra: PyTree | None
    #: The optimizer: the one given, or rebuilt from the record; ``None`` when neither.
    optimizer: Any
    #: ``format``, ``version``, ``optimizer`` record, ``metadata``, ``torch_version``.
    info: dict[str, Any]


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"no checkpoint at {str(source)!r}")
    if not source.is_file():
        raise ValueError(f"{str(source)!r} is not a file")
    with open(source, "rb") as handle:
        head = handle.read(9)
    if head[:2] == b"PK":  # a zip archive: torch.save's format
        try:
            blob = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{str(source)!r} is not a readable torch checkpoint: {exc}") from exc
        if not isinstance(blob, dict) or not isinstance(blob.get(_META_KEY), str):
            raise ValueError(
                f"{str(source)!r} is a torch file but not an optorch checkpoint (no "
                f"{_META_KEY!r} entry); was it written by optorch.interop.save?"
            )
        tensors = blob.get("tensors")
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise ValueError(f"{str(source)!r}: malformed optorch checkpoint (tensors)")
        text = blob[_META_KEY]
    elif len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, JSON
        try:
            from safetensors import safe_open
        except ImportError:
            raise ValueError(
                f"{str(source)!r} is a safetensors file: reading it needs the safetensors "
                "package (pip install safetensors)"
            ) from None
        try:
            with safe_open(str(source), framework="pt", device="cpu") as reader:
                found = reader.metadata() or {}
                tensors = {key: reader.get_tensor(key) for key in reader.keys()}
        except Exception as exc:
            raise ValueError(f"{str(source)!r} is not a readable safetensors file: {exc}") from exc
        if _META_KEY not in found:
            raise ValueError(
                f"{str(source)!r} is a safetensors file but not an optorch checkpoint (no "
                f"{_META_KEY!r} metadata); was it written by optorch.interop.save?"
            )
        text = found[_META_KEY]
        try:
            complex_keys = json.loads(found.get(_COMPLEX128_KEY, "[]"))
            for key in complex_keys:
                tensors[key] = torch.view_as_complex(tensors[key].contiguous())
        except (ValueError, TypeError, KeyError, RuntimeError) as exc:
            raise ValueError(f"{str(source)!r}: malformed complex128 entries ({exc})") from None
    else:
        raise ValueError(
            f"{str(source)!r} is not an optorch checkpoint (neither a safetensors nor a "
            "torch.save file)"
        )
    try:
        header = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(source)!r}: malformed optorch checkpoint header ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != _MAGIC:
        raise ValueError(f"{str(source)!r}: not an optorch checkpoint header")
    if header.get("version") != _VERSION:
        raise ValueError(
            f"{str(source)!r}: checkpoint version {header.get('version')!r} is not supported "
            f"(this optorch reads version {_VERSION})"
        )
    return header, tensors


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint's description: optimizer record, metadata, devices, versions
    (reads the whole file; no tensor is returned)."""
    header, _ = _read(path)
    return {k: v for k, v in header.items() if k not in ("state", "params", "extra")}


def _in_layout_of(state: Any, like: Any) -> Any:
    """``state`` with each tensor in the memory layout of the ``like`` leaf at its path
    (the state ``init`` makes for a transposed param is transposed too): a checkpoint
    stores tensors contiguous, and a reduction over a tensor in another layout sums in
    another order (LAMB's norms: 3e-8 apart after a resume, where the promise is bit for
    bit)."""
    paths, leaves, _ = optree.tree_flatten_with_path(like, is_leaf=_is_tensor, none_is_leaf=True)
    layouts = {
        path: leaf for path, leaf in zip(paths, leaves, strict=True) if type(leaf) is torch.Tensor
    }

    def relaid(path: Any, leaf: Any) -> Any:
        model = layouts.get(path)
        if (
            type(leaf) is not torch.Tensor
            or model is None
            or model.shape != leaf.shape
            or model.stride() == leaf.stride()
        ):
            return leaf
        out = torch.empty_like(model, dtype=leaf.dtype, device=leaf.device)
        return out.copy_(leaf) if out.stride() != leaf.stride() else leaf

    return optree.tree_map_with_path(relaid, state, is_leaf=_is_tensor, none_is_leaf=True)


def _meta_params(params: Any) -> Any:
    """Data-free copies of ``params`` (meta tensors, same structure and dtypes), so that
    ``optimizer.init`` on them builds the state's skeleton without allocating it."""
    if isinstance(params, torch.nn.Module):
        return _MetaModule(params)

    def meta(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            copy = leaf.detach().to("meta")
            return copy.requires_grad_(leaf.requires_grad) if copy.is_floating_point() else copy
        return leaf

    return optree.tree_map(meta, params, is_leaf=_is_tensor, none_is_leaf=True)


class _MetaModule(torch.nn.Module):
    """Stands for a module in ``optimizer.init``: the same named params, on meta."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self._named = [
            (name, torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad))
            for name, p in module.named_parameters()
        ]

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        return iter(self._named)


def _describe_leaf(leaf: Any) -> str:
    if isinstance(leaf, torch.Tensor):
        return f"a tensor of shape {tuple(leaf.shape)} and dtype {leaf.dtype}"
    return f"{type(leaf).__name__} {leaf!r}"


def _without_skipped(where: str, loaded: Any, reference: Any) -> Any:
    """``loaded`` without the ``"skipped_steps"`` trees the reference (a fresh ``init``)
    lacks: a state gains one once a param sits out a step (see
    :data:`optorch.base.SKIPPED`). Their leaves are checked here: None or 0-d integer
    tensors."""
    if not isinstance(loaded, Mapping) or not isinstance(reference, Mapping):
        return loaded
    out = {}
    for key, value in loaded.items():
        if key == SKIPPED and key not in reference:
            paths, leaves, _ = flatten(value)
            for path, leaf in zip(paths, leaves, strict=True):
                if leaf is not None and (
                    not isinstance(leaf, torch.Tensor)
                    or leaf.dim() != 0
                    or leaf.dtype not in _STEP_DTYPES
                ):
                    raise ValueError(
                        f"{where}: state {SKIPPED!r} at {format_path(path)} is "
                        f"{_describe_leaf(leaf)}, not a 0-d int64 count"
                    )
            continue
        out[key] = _without_skipped(where, value, reference.get(key))
    return type(loaded)(out) if isinstance(loaded, dict) else out


def _resumable_at(node: Mapping[str, Any]) -> frozenset[str]:
    """The keys a saved state node may lack, added by later versions and remade by the
    step: in an optimizer's state (it has ``"step"``), the rules' resumable globals
    (NAdam's ``mu_product``, resumed from the count,
    :meth:`optorch.base.Rule.resume_global`); in an ``accumulate`` state,
    ``grad_seen``."""
    from optorch.builder import REGISTRY
    from optorch.wrappers.control import SEEN

    keys: set[str] = set()
    if STEP in node:
        keys.update(name for entry in REGISTRY.values() for name in entry.rule.resumable_globals)
    if "grad_mean" in node and "count" in node:
        keys.add(SEEN)
    return frozenset(keys)


def _without_resumed(loaded: Any, reference: Any) -> Any:
    """``reference`` without the keys of :func:`_resumable_at` that ``loaded`` lacks."""
    if not isinstance(loaded, Mapping) or not isinstance(reference, Mapping):
        return reference
    resumable = _resumable_at(reference)
    out = {
        key: _without_resumed(loaded.get(key), value)
        for key, value in reference.items()
        if not (key in resumable and key not in loaded)
    }
    return type(reference)(out) if isinstance(reference, dict) else out


def _check_against(what: str, loaded: PyTree, reference: PyTree) -> None:
    """Raise ``ValueError`` naming the first difference of ``loaded`` from ``reference``:
    a missing or extra leaf, a container of another kind, a wrong shape or dtype."""
    l_paths, l_leaves, l_spec = optree.tree_flatten_with_path(
        loaded, is_leaf=_is_tensor, none_is_leaf=True
    )
    r_paths, r_leaves, r_spec = optree.tree_flatten_with_path(
        reference, is_leaf=_is_tensor, none_is_leaf=True
    )
    loaded_at = dict(zip(l_paths, l_leaves, strict=True))
    reference_at = dict(zip(r_paths, r_leaves, strict=True))
    for path in r_paths:
        if path not in loaded_at:
            raise ValueError(
                f"{what}: missing leaf {format_path(path)} (expected "
                f"{_describe_leaf(reference_at[path])})"
            )
    for path in l_paths:
        if path not in reference_at:
            raise ValueError(
                f"{what}: extra leaf {format_path(path)} ({_describe_leaf(loaded_at[path])}) "
                "that the params/optimizer do not have"
            )
    if l_spec != r_spec:
        raise ValueError(f"{what}: the containers differ: {l_spec} vs expected {r_spec}")
    for path, got, want in zip(r_paths, [loaded_at[p] for p in r_paths], r_leaves, strict=True):
        where = format_path(path)
        if isinstance(want, torch.Tensor) != isinstance(got, torch.Tensor):
            raise ValueError(
                f"{what}: at {where} found {_describe_leaf(got)}, expected {_describe_leaf(want)}"
            )
        if isinstance(want, torch.Tensor):
            if got.shape != want.shape:
                raise ValueError(
                    f"{what}: wrong shape at {where}: {tuple(got.shape)} in the checkpoint, "
                    f"{tuple(want.shape)} expected"
                )
            if got.dtype != want.dtype:
                raise ValueError(
                    f"{what}: wrong dtype at {where}: {got.dtype} in the checkpoint, "
                    f"{want.dtype} expected"
                )
        elif (got is None) != (want is None) or (want is not None and type(got) is not type(want)):
            raise ValueError(
                f"{what}: at {where} found {_describe_leaf(got)}, expected {_describe_leaf(want)}"
            )


def _device_of(params: Any) -> torch.device | None:
    if params is None:
        return None
    tree = _plain_params(params)
    devices = {
        leaf.device
        for leaf in optree.tree_leaves(tree, is_leaf=_is_tensor, none_is_leaf=True)
        if isinstance(leaf, torch.Tensor)
    }
    return devices.pop() if len(devices) == 1 else None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    params: PyTree | None = None,
    optimizer: Any = None,
    like: PyTree | None = None,
    map_location: torch.device | str | None = None,
    restore_params: bool = False,
    schedule: Callable[[Any], Any] | None = None,
    callables: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Read everything a checkpoint holds (see :class:`Checkpoint`).

    Checks, before anything is returned or written:

    * with ``like`` (a state of the expected structure, e.g. ``opt.init(params)`` or
      :func:`optorch.amp.init_grad_scaler`): the state has its structure, shapes and
      dtypes (other leaves: the same type);
    * else with ``params``: the state has the structure, shapes and dtypes that
      ``optimizer.init(params)`` has (``optimizer`` given, or rebuilt from the file; the
      reference is built on the meta device, so nothing is allocated);
    * without ``like``, a given ``optimizer`` has the rules the file records (Adam's
      state and RAdam's have the same fields, so the structure alone would not tell);
    * with ``restore_params=True`` (needs ``params``): the saved params have the
      structure, shapes and dtypes of ``params``; then they are copied into ``params``
      in place.

    A mismatch raises ``ValueError`` naming the first difference (missing leaf, extra
    leaf, wrong shape, wrong dtype), and nothing is changed.

    Tensors go to ``map_location`` if given, else to the device of ``params`` (when they
    are all on one), else to the device each was saved from.

    The optimizer is rebuilt from the file when ``optimizer`` is not given and every
    value of it was recorded (else ``Checkpoint.optimizer`` is ``None``; pass the missing
    values as ``schedule=``/``callables=``, see :func:`rebuild_optimizer`).
    """
    header, tensors = _read(path)
    return _load(
        str(path),
        header,
        tensors,
        params=params,
        optimizer=optimizer,
        like=like,
        map_location=map_location,
        restore_params=restore_params,
        schedule=schedule,
        callables=callables,
        check_state=True,
    )


def _optimizers_in(node: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], tuple[str, str]]:
    """(registry name, rule) of each optimizer in a record's tree, by where it sits: a
    partition's groups by label (their order in the record is not their identity), a
    chain's members by position."""
    if isinstance(node, Mapping):
        if node.get("kind") == "optimizer":
            return {path: (str(node.get("name")), str(node.get("rule")))}
        out: dict[tuple[Any, ...], tuple[str, str]] = {}
        for key, value in node.items():
            out.update(_optimizers_in(value, (*path, str(key))))
        return out
    if isinstance(node, (list, tuple)):
        out = {}
        for index, value in enumerate(node):
            labelled = (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and isinstance(value[0], str)
                and isinstance(value[1], Mapping)
            )
            if labelled:  # a partition's [label, group]
                out.update(_optimizers_in(value[1], (*path, value[0])))
            else:
                out.update(_optimizers_in(value, (*path, index)))
        return out
    return {}


def _check_same_rules(where: str, record: Mapping[str, Any], optimizer: Any) -> None:
    """An optimizer given to a load must have the rules the checkpoint was saved with,
    where it has them (a partition's groups by label): two rules whose states have the
    same fields (Adam's and RAdam's, SGD's and LARS's) would otherwise take each other's
    state silently."""
    try:
        described = describe_optimizer(optimizer)
    except (TypeError, ValueError, AttributeError):
        return
    if any(item.get("what") == "optimizer" for item in described["missing"]):
        return  # a part the record cannot describe (a user's own wrapper): nothing to check
    given = _optimizers_in(described["tree"])
    saved = _optimizers_in(record.get("tree"))
    rules = {path: rule for path, (_, rule) in saved.items()}
    if saved and rules != {path: rule for path, (_, rule) in given.items()}:

        def text(found: dict[tuple[Any, ...], tuple[str, str]]) -> str:
            def at(path: tuple[Any, ...]) -> str:
                labels = [str(part) for part in path if part not in ("tree", "inner")]
                return f"{'/'.join(labels)}: " if labels else ""

            return (
                ", ".join(f"{at(path)}{name} (rule {rule})" for path, (name, rule) in found.items())
                or "nothing"
            )

        raise ValueError(
            f"{where}: the checkpoint holds the state of {text(saved)}, not of the given "
            f"optimizer's {text(given)}; pass the optimizer it was saved with (or, to "
            "load it anyway, like=optimizer.init(params), which checks the structure only)"
        )


def _load(
    where: str,
    header: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    params: PyTree | None,
    optimizer: Any,
    like: PyTree | None,
    map_location: torch.device | str | None,
    restore_params: bool,
    schedule: Callable[[Any], Any] | None,
    callables: Mapping[str, Any] | None,
    check_state: bool,
) -> Checkpoint:
    record = header.get("optimizer")
    if check_state and optimizer is not None and like is None and isinstance(record, Mapping):
        _check_same_rules(where, record, optimizer)
    rebuilt = optimizer
    checker = optimizer
    if rebuilt is None and record is not None:
        try:
            rebuilt = checker = rebuild_optimizer(record, schedule=schedule, callables=callables)
        except ValueError:
            rebuilt = None
            if check_state and params is not None and like is None:
                # the state's structure never depends on the schedule: check without it
                checker = rebuild_optimizer(
                    record, schedule=schedule, callables=callables, strict=False
                )

    def cpu_tensor(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ValueError(f"{where}: malformed checkpoint: no tensor {key!r}")
        return tensors[key]

    def build(section: str) -> Any:
        node = header.get(section)
        return None if node is None else _decode(node, cpu_tensor)

    state_cpu = build("state")
    if check_state:
        if like is None and params is not None:
            if checker is None:
                raise ValueError(
                    f"{where}: cannot check the state against params: the checkpoint "
                    "records no optimizer; pass optimizer= or like="
                )
            like = checker.init(_meta_params(params))
        if like is not None:
            _check_against(
                f"{where}: state",
                _without_skipped(where, state_cpu, like),
                _without_resumed(state_cpu, like),
            )
    saved_params_cpu = build("params")
    if restore_params:
        if params is None:
            raise ValueError("restore_params=True needs params= (the tensors to restore into)")
        if saved_params_cpu is None:
            raise ValueError(f"{where}: the checkpoint holds no params to restore")
        _check_against(f"{where}: params", saved_params_cpu, _plain_params(params))

    device = torch.device(map_location) if map_location is not None else _device_of(params)
    devices: dict[str, str] = header.get("devices", {})
    placed: dict[str, torch.Tensor] = {}

    def tensor(key: str) -> torch.Tensor:
        if key not in placed:
            target = device if device is not None else torch.device(devices.get(key, "cpu"))
            placed[key] = cpu_tensor(key).to(target)
        return placed[key]

    state = _decode(header["state"], tensor)
    if like is not None:
        state = _in_layout_of(state, like)
    extra = None if header.get("extra") is None else _decode(header["extra"], tensor)
    out_params = None if saved_params_cpu is None else _decode(header["params"], tensor)
    if restore_params:
        given = optree.tree_leaves(_plain_params(params), is_leaf=_is_tensor, none_is_leaf=True)
        saved = optree.tree_leaves(saved_params_cpu, is_leaf=_is_tensor, none_is_leaf=True)
        with torch.no_grad():
            for destination, source in zip(given, saved, strict=True):
                if isinstance(destination, torch.Tensor):
                    destination.copy_(source)
        out_params = params
    meta = {k: v for k, v in header.items() if k not in ("state", "params", "extra")}
    return Checkpoint(state, out_params, extra, rebuilt, meta)


def load(
    path: str | os.PathLike[str],
    *,
    params: PyTree | None = None,
    optimizer: Any = None,
    like: PyTree | None = None,
    map_location: torch.device | str | None = None,
) -> PyTree:
    """The state saved at ``path``, checked against ``like`` or ``params`` when given
    (see :func:`load_checkpoint` for the checks and the device placement).

    >>> import tempfile, os, torch
    >>> from optorch.amp import init_grad_scaler
    >>> path = os.path.join(tempfile.mkdtemp(), "scaler.pt")
    >>> _ = save(path, init_grad_scaler(init_scale=8.0))
    >>> scaler = load(path, like=init_grad_scaler())
    >>> scaler["scale"], scaler["precision"], scaler["growth_interval"]
    (tensor(8.), torch.bfloat16, 2000)
    """
    return load_checkpoint(
        path, params=params, optimizer=optimizer, like=like, map_location=map_location
    ).state


def load_params(
    path: str | os.PathLike[str],
    params: PyTree | None = None,
    *,
    map_location: torch.device | str | None = None,
) -> PyTree:
    """The params saved at ``path``. With ``params`` (a pytree or ``nn.Module``), the saved
    values are checked against them (structure, shapes, dtypes) and copied into them in
    place, and ``params`` is returned; on a mismatch ``ValueError`` and nothing changes."""
    header, tensors = _read(path)
    checkpoint = _load(
        str(path),
        header,
        tensors,
        params=params,
        optimizer=None,
        like=None,
        map_location=map_location,
        restore_params=params is not None,
        schedule=None,
        callables=None,
        check_state=False,
    )
    if checkpoint.params is None:
        raise ValueError(f"{path!s}: the checkpoint holds no params")
    return checkpoint.params


def load_optimizer(
    path: str | os.PathLike[str],
    *,
    params: PyTree | None = None,
    map_location: torch.device | str | None = None,
    schedule: Callable[[Any], Any] | None = None,
    callables: Mapping[str, Any] | None = None,
) -> tuple[Any, PyTree]:
    """``(optimizer, state)`` rebuilt from a checkpoint written with ``optimizer=``.

    The optimizer comes back with the same registry name, config (enums, dtypes, tuples
    included) and wrappers. A ``schedule`` made by :mod:`optorch.schedule` is rebuilt
    from its recorded arguments; any other schedule (a lambda, a custom class) was
    recorded as missing and must be passed again as ``schedule=`` (or per key in
    ``callables``), otherwise ``ValueError`` lists what is missing. With ``params`` the
    state is checked against ``optimizer.init(params)`` and placed on their device.
    """
    header, tensors = _read(path)
    record = header.get("optimizer")
    if record is None:
        raise ValueError(
            f"{path!s}: the checkpoint records no optimizer (it was saved without "
            "optimizer=); use load() with your optimizer"
        )
    optimizer = rebuild_optimizer(record, schedule=schedule, callables=callables)
    checkpoint = _load(
        str(path),
        header,
        tensors,
        params=params,
        optimizer=optimizer,
        like=None,
        map_location=map_location,
        restore_params=False,
        schedule=None,
        callables=None,
        check_state=True,
    )
    return optimizer, checkpoint.state
