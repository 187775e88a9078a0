"""The registry: every optimizer declared once, by name.

``DEFAULT_OPTIMIZER_CONFIGS``, ``DEFAULT_OPTIMIZER_STATES`` and ``OPTIMIZER_STEP`` are
the seed's three dicts, kept as read-only views of :data:`REGISTRY`, so an optimizer
registered later (:func:`register`) appears in all of them.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from optorch.base import BaseConfig, Optimizer, Rule, apply_step, init_state
from optorch.tree import PyTree

__all__ = [
    "DEFAULT_OPTIMIZER_CONFIGS",
    "DEFAULT_OPTIMIZER_STATES",
    "OPTIMIZER_STEP",
    "REGISTRY",
    "Entry",
    "UnknownOptimizerError",
    "get_optimizer",
    "get_optimizer_step",
    "init_optimizer_state",
    "register",
]


@dataclass(frozen=True)
class Entry:
    """One registered optimizer: its rule, and the defaults its name implies."""

    name: str
    rule: Rule
    defaults: Mapping[str, Any]
    summary: str

    def make_config(self, **overrides: Any) -> BaseConfig:
        """The config with this entry's defaults, then ``overrides``."""
        return self.rule.config_type(**{**self.defaults, **overrides})

    def step(
        self, params: PyTree, grads: PyTree, state: Mapping[str, Any], config: BaseConfig
    ) -> tuple[PyTree, dict[str, Any]]:
        return apply_step(self.rule, config, params, grads, state)

    def init(self, model_or_params: Any, config: BaseConfig | None = None) -> dict[str, Any]:
        return init_state(self.rule, model_or_params, config or self.make_config())


REGISTRY: dict[str, Entry] = {}


class UnknownOptimizerError(ValueError, KeyError):
    """An unknown registry name: a ``ValueError`` (as the seed raised) that is also a
    ``KeyError``, so the registry views behave like dicts (``in``, ``.get``)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def register(
    name: str, rule: Rule, *, defaults: Mapping[str, Any] | None = None, summary: str = ""
) -> Entry:
    """Declare an optimizer under ``name``; raise if the name is taken."""
    if name in REGISTRY:
        raise ValueError(f"optimizer {name!r} is already registered")
    entry = Entry(name, rule, dict(defaults or {}), summary)
    REGISTRY[name] = entry
    return entry


def _lookup(name: Any) -> Entry:
    if not isinstance(name, str):
        raise TypeError(f"optimizer name must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    entry = REGISTRY.get(key)
    if entry is None:
        known = sorted(REGISTRY)
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ";"
        raise UnknownOptimizerError(f"Unknown optimizer {name!r}{hint} Known optimizers: {known}")
    return entry


class _View(Mapping[str, Any]):
    """A read-only dict over the registry, projecting each entry."""

    def __init__(self, project: Callable[[Entry], Any]) -> None:
        self._project = project

    def __getitem__(self, name: str) -> Any:
        # the names get_optimizer takes ("AdamW", "decoupled-adam"); an unknown one raises
        # UnknownOptimizerError (a KeyError too) with the closest known name
        if not isinstance(name, str):
            raise UnknownOptimizerError(f"optimizer name must be a string, got {name!r}")
        return self._project(_lookup(name))

    def __contains__(self, name: object) -> bool:
        try:
            self[name]  # type: ignore[index]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)

    def __repr__(self) -> str:
        return f"{{{', '.join(repr(k) for k in REGISTRY)}}}"

    def __setitem__(self, name: str, value: Any) -> None:
        # the seed's registry was three dicts filled by hand; this one is a view
        raise TypeError(
            f"the optimizer registry's views are read-only: to add {name!r}, call "
            "optorch.builder.register(name, rule, defaults=...), which fills all three"
        )


def _config_factory(entry: Entry) -> Callable[..., BaseConfig]:
    return functools.partial(entry.rule.config_type, **entry.defaults)


def _state_factory(entry: Entry) -> Callable[[Any], dict[str, Any]]:
    return functools.partial(init_state, entry.rule, config=entry.make_config())


#: name -> config class (with the defaults the name implies), e.g. ``"adamw"``.
DEFAULT_OPTIMIZER_CONFIGS: Mapping[str, Callable[..., BaseConfig]] = _View(_config_factory)
#: name -> ``fn(model_or_params) -> state``.
DEFAULT_OPTIMIZER_STATES: Mapping[str, Callable[[Any], dict[str, Any]]] = _View(_state_factory)
#: name -> ``step(params, grads, state, config) -> (params, state)``.
OPTIMIZER_STEP: Mapping[str, Callable[..., tuple[PyTree, dict[str, Any]]]] = _View(
    lambda entry: entry.step
)


def init_optimizer_state(
    optimizer_name: str, model: Any, config: BaseConfig | None = None
) -> dict[str, Any]:
    """Fresh state for ``model`` (an ``nn.Module`` or a pytree of params).

    State that depends on the config (e.g. amsgrad's running maximum) is created from
    ``config`` when given, otherwise on the first step that needs it.
    """
    entry = _lookup(optimizer_name)
    if config is not None and not isinstance(config, entry.rule.config_type):
        raise TypeError(
            f"{optimizer_name!r} needs a {entry.rule.config_type.__name__}, got "
            f"{type(config).__name__}"
        )
    return entry.init(model, config)


def get_optimizer_step(optimizer_name: str) -> Callable[..., tuple[PyTree, dict[str, Any]]]:
    """``step(params, grads, state, config) -> (params, state)`` for the name."""
    return _lookup(optimizer_name).step


def get_optimizer(optimizer_name: str, **hyperparameters: Any) -> Optimizer:
    """An :class:`~optorch.base.Optimizer` (``.config``, ``.init``, ``.step``) by name.

    >>> import optorch
    >>> opt = optorch.get_optimizer("adamw", max_lr=3e-4, weight_decay=0.1)
    >>> opt.config.mode.name
    'ADAMW'
    """
    entry = _lookup(optimizer_name)
    return Optimizer(entry.rule, entry.make_config(**hyperparameters))


# (registry key, module, defaults the key implies, summary); each module defines RULE
_BUILTINS: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("sgd", "sgd", {}, "SGD with momentum, dampening, Nesterov"),
    ("adam", "adam", {}, "Adam (L2 weight decay), AMSGrad"),
    ("adamw", "adam", {"mode": "ADAMW"}, "AdamW (decoupled weight decay x lr)"),
    ("decoupled_adam", "adam", {"mode": "DECOUPLED"}, "Adam with fully decoupled weight decay"),
    ("lars", "lars", {}, "LARS layer-wise adaptive rate scaling"),
    ("lion", "lion", {}, "Lion (evolved sign momentum)"),
    ("lamb", "lamb", {}, "LAMB layer-wise adaptive Adam"),
    ("adafactor", "adafactor", {}, "Adafactor (factored second moments)"),
    ("muon", "muon", {}, "Muon (orthogonalised momentum, 2-D weights)"),
    ("rmsprop", "rmsprop", {}, "RMSprop (centered, momentum)"),
    ("adagrad", "adagrad", {}, "Adagrad"),
    ("adamax", "adamax", {}, "Adamax (infinity-norm Adam)"),
    ("nadam", "nadam", {}, "NAdam (Nesterov Adam)"),
    ("radam", "radam", {}, "RAdam (rectified Adam)"),
    ("schedule_free_adamw", "schedule_free", {}, "Schedule-Free AdamW"),
)


def _register_builtins() -> None:
    import importlib

    for key, module_name, defaults, summary in _BUILTINS:
        try:
            module = importlib.import_module(f"optorch.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"optorch.{module_name}":
                raise
            continue  # not written yet
        register(key, module.RULE, defaults=defaults, summary=summary)


_register_builtins()
