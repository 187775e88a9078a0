"""Hyperparameters in the state: :func:`inject_hyperparams`, :func:`set_hyperparam`.

The config is never written to; an injected hyperparameter is a 0-d tensor in
``state["hyperparams"]`` that every step passes to the inner optimizer through
``hyper_overrides``. Changing it between steps (a hand-written schedule, a
hyperparameter search, a hypergradient) moves no Python number into the step, so a
compiled step is not recompiled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from optorch.tree import PyTree, flatten, unflatten
from optorch.wrappers._core import (
    Wrapper,
    as_gate,
    config_value,
    expect_keys,
    first_device,
    params_tree,
)

__all__ = [
    "InjectHyperparams",
    "get_hyperparams",
    "inject_hyperparams",
    "set_hyperparam",
]


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point()
    return isinstance(value, (int, float))


def _is_numbers(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and bool(value) and all(_is_number(v) for v in value)


def _default_dtype(device: torch.device) -> torch.dtype:
    """float64, as the Python floats of a config (0.999 keeps its digits), where the
    device has it."""
    return torch.float32 if device.type == "mps" else torch.float64


def _keep_dtypes(before: PyTree, after: PyTree) -> PyTree:
    """``after`` with each tensor leaf cast to the dtype of the leaf at the same path in
    ``before``: a 0-d param combined with a wider 0-d hyperparameter is promoted."""
    old_paths, old_leaves, _ = flatten(before)
    dtypes = {
        path: leaf.dtype
        for path, leaf in zip(old_paths, old_leaves, strict=True)
        if isinstance(leaf, torch.Tensor)
    }
    paths, leaves_, spec = flatten(after)
    fixed = [
        leaf.to(dtypes[path])
        if isinstance(leaf, torch.Tensor) and path in dtypes and leaf.dtype != dtypes[path]
        else leaf
        for path, leaf in zip(paths, leaves_, strict=True)
    ]
    return unflatten(spec, fixed)


class InjectHyperparams(Wrapper):
    """Hyperparameters as 0-d tensors in the state. See :func:`inject_hyperparams`."""

    kind = "inject_hyperparams"

    def __init__(self, inner: Any, names: Sequence[str], dtype: torch.dtype | None) -> None:
        super().__init__(inner)
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise TypeError(
                f"inject_hyperparams: names must be a non-empty sequence of field names, got "
                f"{names!r}"
            )
        if dtype is not None and (
            not isinstance(dtype, torch.dtype) or not dtype.is_floating_point
        ):
            raise TypeError(f"inject_hyperparams: dtype must be a floating dtype, got {dtype!r}")
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"inject_hyperparams: a name must be a string, got {name!r}")
            value = config_value(inner.config, name)  # raises naming an unknown field
            if not (_is_number(value) or _is_numbers(value)):
                raise TypeError(
                    f"inject_hyperparams: {name!r} is {value!r}; only numbers (and tuples of "
                    "numbers such as betas) can be injected, structural options cannot"
                )
        self.names = tuple(names)
        self.dtype = dtype

    def init(self, params: Any) -> dict[str, Any]:
        tree = params_tree(params)
        device = first_device(flatten(tree)[1])
        dtype = self.dtype or _default_dtype(device)

        def tensor(value: Any) -> torch.Tensor:
            if isinstance(value, torch.Tensor):
                return value.detach().to(device=device, dtype=dtype).reshape(()).clone()
            return torch.tensor(float(value), dtype=dtype, device=device)

        hyperparams: dict[str, Any] = {}
        for name in self.names:
            value = config_value(self.inner.config, name)
            hyperparams[name] = (
                tuple(tensor(v) for v in value) if _is_numbers(value) else tensor(value)
            )
        return {"inner": self.inner.init(tree), "hyperparams": hyperparams}

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
        expect_keys(who, state, ("inner", "hyperparams"))
        gate = as_gate(who, skip_if)
        injected = state["hyperparams"]
        missing = [name for name in self.names if name not in injected]
        if missing:
            raise ValueError(f"{who}: state['hyperparams'] lacks {missing}")
        extra = sorted(str(name) for name in injected if name not in self.names)
        if extra:
            # a value here that no step reads (a state of another injection): refused
            # rather than ignored
            raise ValueError(
                f"{who}: state['hyperparams'] has {extra}, which this wrapper does not "
                f"inject (it injects {list(self.names)}); is it the state of another "
                "inject_hyperparams?"
            )
        overrides = {name: injected[name] for name in self.names}
        overrides.update(hyper_overrides or {})  # an outer override wins
        new_params, inner_state = self.inner.step(
            params, grads, state["inner"], hyper_overrides=overrides, skip_if=gate
        )
        if not self.inplace:
            new_params = _keep_dtypes(params, new_params)
            inner_state = _keep_dtypes(state["inner"], inner_state)
        params = new_params
        if self.inplace and isinstance(state, dict):
            state["inner"] = inner_state
            return params, state
        return params, {**state, "inner": inner_state}


def inject_hyperparams(
    optimizer: Any, *, names: Sequence[str] = ("max_lr",), dtype: torch.dtype | None = None
) -> InjectHyperparams:
    """Keep the hyperparameters ``names`` in the state, as 0-d tensors of ``dtype``
    (default float64, like the config's Python floats; float32 on MPS), initialised from
    the config and passed to every step.

    Read them in ``state["hyperparams"]``; change them between steps with
    :func:`set_hyperparam` (or ``state["hyperparams"]["max_lr"].fill_(...)``). A tuple
    field such as ``betas`` is a tuple of 0-d tensors. Into a
    :func:`~optorch.wrappers.partition`, ``"weight_decay"`` reaches every group that has
    it and ``"label/weight_decay"`` one group. The step validates the values as it does
    the config's (a negative ``max_lr`` raises ``ValueError``). Only numeric fields can be
    injected; one that changes which state fields exist (SGD's ``momentum`` starting at
    0) creates its buffer on the first step.

    Scaling ``max_lr`` by a multiplier each step gives the same trajectory as a
    ``schedule`` of that multiplier, up to the rounding of the value to ``dtype``.

    >>> import torch, optorch
    >>> from optorch import wrappers
    >>> sgd = optorch.get_optimizer("sgd", max_lr=1.0, momentum=0.0)
    >>> opt = wrappers.inject_hyperparams(sgd, names=["max_lr"])
    >>> params = {"w": torch.zeros(1)}
    >>> state = opt.init(params)
    >>> state = wrappers.set_hyperparam(state, "max_lr", 0.5)
    >>> params, state = opt.step(params, {"w": torch.ones(1)}, state)
    >>> params["w"], state["hyperparams"]["max_lr"]
    (tensor([-0.5000]), tensor(0.5000, dtype=torch.float64))
    """
    return InjectHyperparams(optimizer, names, dtype)


def _find_hyperparams(state: Mapping[str, Any]) -> dict[str, Any]:
    """The outermost ``inject_hyperparams`` state in a wrapper state, found through the
    wrappers' own links only (``inner``, and a partition's ``groups``), never through
    params-shaped trees (params named "inner" and "hyperparams" would look like one, and
    a large tree costs a walk); one found in several groups at once is ambiguous, and
    names them."""
    level: list[tuple[str, Any]] = [("state", state)]
    while level:
        found = [
            (where, node)
            for where, node in level
            if isinstance(node, Mapping) and "hyperparams" in node and "inner" in node
        ]
        if len(found) == 1:
            return found[0][1]["hyperparams"]
        if found:
            raise ValueError(
                "inject_hyperparams states found at "
                f"{', '.join(where for where, _ in found)}: pass the one to use"
            )
        deeper: list[tuple[str, Any]] = []
        for where, node in level:
            if not isinstance(node, Mapping):
                continue
            if isinstance(node.get("inner"), Mapping):
                deeper.append((f"{where}['inner']", node["inner"]))
            groups = node.get("groups")
            if isinstance(groups, Mapping):
                deeper += [(f"{where}['groups'][{k!r}]", v) for k, v in groups.items()]
        level = deeper
    raise ValueError("no inject_hyperparams state found (state['hyperparams'] is missing)")


def get_hyperparams(state: Mapping[str, Any]) -> dict[str, Any]:
    """The injected hyperparameters in ``state`` (found through wrapper states: the
    inner states, a partition's groups; ``ValueError`` naming them where several groups
    have one, then pass ``state["groups"][label]``), as Python floats (tuples for tuple
    fields). Reads the device."""
    out: dict[str, Any] = {}
    for name, value in _find_hyperparams(state).items():
        out[name] = tuple(float(v) for v in value) if isinstance(value, tuple) else float(value)
    return out


def set_hyperparam(state: Mapping[str, Any], name: str, value: Any) -> Mapping[str, Any]:
    """Set the injected hyperparameter ``name`` to ``value`` in place (``fill_`` on its
    0-d tensors, no new tensor, nothing recompiled) and return ``state``.

    ``value`` is a finite number, a 0-d tensor (read without a host sync), or a tuple
    of them for a tuple field. In pure mode the states before and after a step share
    these tensors; build a new ``state["hyperparams"]`` dict instead to keep the old
    state's values (e.g. for a hypergradient with ``torch.func``).
    """
    hyperparams = _find_hyperparams(state)
    if name not in hyperparams:
        raise ValueError(
            f"set_hyperparam: {name!r} is not injected (injected: {sorted(hyperparams)})"
        )
    target = hyperparams[name]
    if isinstance(target, tuple):
        if not isinstance(value, (tuple, list)) or len(value) != len(target):
            raise ValueError(f"set_hyperparam: {name!r} needs {len(target)} values, got {value!r}")
        pairs = list(zip(target, value, strict=True))
    else:
        pairs = [(target, value)]
    for _, item in pairs:
        if not _is_number(item):
            raise TypeError(f"set_hyperparam: {name!r} must be a number, got {item!r}")
        if not isinstance(item, torch.Tensor) and not math.isfinite(item):
            raise ValueError(f"set_hyperparam: {name!r} must be finite, got {item!r}")
    with torch.no_grad():
        for tensor, item in pairs:
            tensor.fill_(item.reshape(()) if isinstance(item, torch.Tensor) else item)
    return state
