r"""Training recipes in Hydra YAML: optimizer, schedule, wrappers and loss scaler.

A recipe is a YAML file (or dict, or OmegaConf node) whose nodes carry a ``_target_``
naming a callable by import path, as Hydra's ``instantiate`` builds them; every part of
optorch is such a callable:

* ``optorch.get_optimizer`` (``optimizer_name`` plus config fields) for the optimizer;
* ``optorch.schedule.build_lr_scheduler`` (with an ``optorch.schedule.LRSchedulerConfig``
  node) or any builder of :mod:`optorch.schedule` for its ``schedule``;
* ``optorch.wrappers.chain``, ``clip_by_global_norm``, ``decay_mask``, ``accumulate``,
  ``skip_nonfinite``, ``ema``, ... around it;
* ``optorch.amp.init_grad_scaler`` for the loss scaler state.

:func:`build_recipe` instantiates the ``optimizer`` node (or one entry of an
``optimizers`` mapping: the layout of ``optorch demo --config``, so a demo recipe is also
a recipe here) and the ``scaler`` node, and returns a :class:`Recipe`. Other top-level
nodes (``train``, ``schedule``, ``vars``, ``model``) are free: they exist to be
interpolated (``${train.steps}``). See ``examples/recipe_train.yaml``.

>>> recipe = build_recipe({
...     "optimizer": {"_target_": "optorch.get_optimizer", "optimizer_name": "sgd",
...                   "max_lr": 0.1, "momentum": 0.0},
... })
>>> import torch
>>> params = {"w": torch.ones(2)}
>>> state = recipe.init(params)
>>> params, state, _ = recipe.step(params, {"w": torch.ones(2)}, state)
>>> params["w"]
tensor([0.9000, 0.9000])
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optorch.tree import PyTree

__all__ = ["Recipe", "build_recipe"]


@dataclass
class Recipe:
    """An instantiated recipe."""

    #: The optimizer (an :class:`optorch.Optimizer` or a wrapper).
    optimizer: Any
    #: The loss scaler's initial state (:func:`optorch.amp.init_grad_scaler`), or ``None``.
    scaler: dict[str, Any] | None = None
    #: The ``train`` section, resolved to plain values (``{}`` when absent).
    train: dict[str, Any] = field(default_factory=dict)
    #: The whole recipe (an OmegaConf ``DictConfig``).
    config: Any = field(default=None, repr=False)

    def init(self, params: PyTree) -> dict[str, Any]:
        """``optimizer.init(params)``."""
        return dict(self.optimizer.init(params))

    def step(
        self,
        params: PyTree,
        grads: PyTree,
        state: Any,
        scaler_state: Mapping[str, Any] | None = None,
    ) -> tuple[PyTree, Any, Any]:
        """One step: ``-> (params, state, scaler_state)``.

        With ``scaler_state`` (start from :attr:`scaler`), ``grads`` are the gradients of
        the scaled loss (:func:`optorch.amp.scale_loss`) and the step is
        :func:`optorch.amp.scaled_step` (skipped, bit for bit, on non-finite gradients);
        otherwise it is ``optimizer.step``.
        """
        if scaler_state is None:
            params, state = self.optimizer.step(params, grads, state)
            return params, state, None
        from optorch.amp import scaled_step

        out = scaled_step(self.optimizer, params, grads, state, scaler_state)
        return out.params, out.opt_state, out.scaler_state


def _load_config(source: Any, overrides: Sequence[str]) -> Any:
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:
        raise ValueError("recipes need hydra-core (pip install hydra-core)") from None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no recipe file at {str(path)!r}")
        try:
            config = OmegaConf.load(path)
        except Exception as exc:  # YAML or OmegaConf errors
            raise ValueError(f"{str(path)!r} is not a valid YAML recipe: {exc}") from None
    elif isinstance(source, DictConfig):
        # a copy: overrides (a '~key' removes it) and the resolution of interpolations
        # while building would change the caller's config, and a later build from it
        config = copy.deepcopy(source)
    elif isinstance(source, Mapping):
        config = OmegaConf.create(dict(source))
    else:
        raise TypeError(
            f"build_recipe: expected a path, a dict or a DictConfig, got {type(source).__name__}"
        )
    if not isinstance(config, DictConfig):
        raise ValueError("a recipe must be a mapping of sections")
    if overrides:
        if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
            raise TypeError(f"overrides must be a list of 'key=value' strings, got {overrides!r}")
        # OmegaConf reads "key" alone as "key: null"; Hydra's command line refuses it
        bare = [
            o
            for o in overrides
            if not o.startswith("~") and ("=" not in o or not o.split("=", 1)[0].lstrip("+"))
        ]
        if bare:
            raise ValueError(
                f"overrides must be 'key=value' strings; {bare} are not (write 'key=null' "
                "to set a value to None)"
            )
        for override in overrides:
            config = _apply_override(config, override)
    return config


_ABSENT = object()


def _apply_override(config: Any, override: str) -> Any:
    """One override in the grammar of Hydra's command line: ``key=value`` sets a key the
    recipe has, ``+key=value`` adds one it does not have, ``++key=value`` sets it either
    way, ``~key`` (or ``~key=value``, when it holds that value) removes it. A key that
    is not there for ``key=`` (a misspelling) or already there for ``+key=`` raises
    ``ValueError``, as Hydra does."""
    from omegaconf import ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def lookup(key: str) -> Any:
        # the value as written, unresolved: a key whose value is an interpolation that
        # does not resolve (yet) is there all the same, and may be what the override mends
        node: Any = OmegaConf.to_container(config, resolve=False)
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return _ABSENT
        return node

    if override.startswith("~"):
        key, _, expected = override[1:].partition("=")
        current = lookup(key)
        if current is _ABSENT:
            raise ValueError(f"override {override!r}: the recipe has no key {key!r} to remove")
        if expected and OmegaConf.from_dotlist([f"v={expected}"]).v != current:
            raise ValueError(f"override {override!r}: {key!r} is {current!r}, not {expected!r}")
        parent_key, _, last = key.rpartition(".")
        parent = OmegaConf.select(config, parent_key) if parent_key else config
        del parent[int(last) if isinstance(parent, ListConfig) else last]
        return config
    plus = len(override) - len(override.lstrip("+"))
    if plus > 2:
        raise ValueError(f"override {override!r}: at most two '+' (++key=value)")
    assignment = override[plus:]
    key, _, text = assignment.partition("=")
    key = key.strip()
    present = lookup(key) is not _ABSENT
    if plus == 0 and not present:
        raise ValueError(
            f"override {override!r}: the recipe has no key {key!r} (to add one, write "
            f"'+{assignment}')"
        )
    if plus == 1 and present:
        raise ValueError(
            f"override {override!r}: the recipe already has {key!r} (to set it, write "
            f"'{assignment}', or '++{assignment}')"
        )
    # the value as Hydra reads it (YAML: numbers, lists, null); set through the key's
    # path, list indices included (a merge of a dotlist would make "0" a dict key)
    # (unresolved: an interpolation, "${train.steps}", is kept to resolve in the recipe)
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]), resolve=False)
    value = parsed["value"] if isinstance(parsed, dict) else None
    try:
        OmegaConf.update(config, key, value, merge=True, force_add=True)
    except OmegaConfBaseException as exc:  # a list index past the end, a type clash
        raise ValueError(f"override {override!r}: {str(exc).splitlines()[0]}") from None
    return config


def _optimizer_node(config: Any, name: str | None) -> tuple[str, Any]:
    from omegaconf import DictConfig

    if "optimizer" in config and "optimizers" in config:
        raise ValueError("a recipe has either 'optimizer' or 'optimizers', not both")
    if "optimizer" in config:
        if name is not None:
            raise ValueError(f"name={name!r} needs an 'optimizers' mapping in the recipe")
        return "optimizer", config.optimizer
    optimizers = config.get("optimizers")
    if not isinstance(optimizers, DictConfig) or len(optimizers) == 0:
        raise ValueError(
            "a recipe needs an 'optimizer' node ({_target_: ...}) or an 'optimizers' mapping "
            "of names to such nodes"
        )
    names = [str(k) for k in optimizers]
    if name is None:
        if len(names) != 1:
            raise ValueError(f"the recipe has several optimizers {names}: pass name=")
        name = names[0]
    if name not in names:
        raise ValueError(f"the recipe has no optimizer {name!r} (it has {names})")
    return f"optimizers.{name}", optimizers[name]


def _instantiate(where: str, node: Any, **kwargs: Any) -> Any:
    from hydra.utils import instantiate

    try:
        return instantiate(node, _convert_="all", **kwargs)
    except Exception as exc:  # Hydra wraps the target's error: report it with the node
        cause = exc.__cause__ or exc
        message = " ".join(str(cause).split())
        if isinstance(cause, (ValueError, TypeError)):
            raise type(cause)(f"recipe node {where}: {message}") from exc
        raise ValueError(f"recipe node {where}: {message}") from exc


def build_recipe(
    source: Any,
    *,
    name: str | None = None,
    overrides: Sequence[str] = (),
    device: torch.device | str | None = None,
) -> Recipe:
    """Instantiate a recipe (a YAML path, a dict or a ``DictConfig``).

    * ``name``: which entry of ``optimizers`` to build (optional when there is one);
    * ``overrides``: ``"key=value"`` strings applied first, in the grammar of Hydra's
      command line (``["optimizer.max_lr=1e-3", "train.steps=100"]``; ``+key=value``
      adds a key, ``++key=value`` adds or sets one, ``~key`` removes one; a ``key=`` the
      recipe lacks raises ``ValueError``);
    * ``device``: passed to the ``scaler`` node (``init_grad_scaler(device=...)``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError``/``TypeError``
    naming the node for an invalid one (including the optimizer's own validation).
    """
    from omegaconf import OmegaConf

    from optorch.wrappers._core import check_optimizer

    config = _load_config(source, overrides)
    where, node = _optimizer_node(config, name)
    optimizer = _instantiate(where, node)
    try:
        check_optimizer(f"recipe node {where}", optimizer)
    except TypeError as exc:
        raise TypeError(f"{exc} (check its _target_)") from None
    scaler = None
    scaler_node = config.get("scaler")
    if scaler_node is not None:
        extra = {} if device is None else {"device": str(device)}
        scaler = _instantiate("scaler", scaler_node, **extra)
        if not isinstance(scaler, Mapping) or "scale" not in scaler:
            raise TypeError(
                "recipe node scaler must build a loss scaler state (_target_: "
                f"optorch.amp.init_grad_scaler), got {type(scaler).__name__}"
            )
        scaler = dict(scaler)
    train: dict[str, Any] = {}
    if config.get("train") is not None:
        resolved = OmegaConf.to_container(config.train, resolve=True)
        if not isinstance(resolved, dict):
            raise ValueError(f"recipe section train must be a mapping, got {resolved!r}")
        train = {str(k): v for k, v in resolved.items()}
    return Recipe(optimizer, scaler, train, config)
