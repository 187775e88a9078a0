"""Which optimizers the demo trains, with what hyperparameters, and their torch twins.

Three sources, in this order of precedence for a name:

1. a Hydra recipe (``--config recipe.yaml``): every entry under ``optimizers:`` is
   instantiated with :func:`hydra.utils.instantiate` (see ``examples/recipe.yaml``);
2. the demo's presets (:data:`PRESETS`), hyperparameters tuned so that each optimizer
   trains the default model well in the default budget, including ``"muon_adamw"``
   (Muon on the hidden matrices, AdamW on the rest, through
   :func:`optorch.wrappers.partition`);
3. any other name of the registry (:data:`optorch.REGISTRY`), with its defaults.

Every optimizer except Schedule-Free gets the demo's warmup-cosine schedule
(:func:`warmup_cosine`) as its config's ``schedule=``; Schedule-Free replaces the decay
by iterate averaging, so it gets only its own built-in warmup.

:func:`torch_twin` builds the ``torch.optim`` equivalent of an optimizer from its config
(every optimizer that has one: :data:`optorch.interop.convert.TORCH_TWINS`, and
partitions of them), with the same schedule through
``torch.optim.lr_scheduler.LambdaLR``.
"""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

import optorch
from optorch.adam import AdamConfig, AdamWDMode
from optorch.builder import _BUILTINS, REGISTRY

from .model import muon_label

__all__ = [
    "MUON_ADAMW",
    "PRESETS",
    "OptimizerSpec",
    "TorchTwin",
    "build_preset",
    "evaluation_params",
    "parse_optimizer_names",
    "torch_twin",
    "warmup_cosine",
]

#: The preset name for Muon on hidden matrices + AdamW on the rest.
MUON_ADAMW = "muon_adamw"

#: The optimizers ``optorch demo`` trains when ``--optimizers`` is not given.
DEFAULT_OPTIMIZERS: tuple[str, ...] = (
    "adamw",
    "lion",
    "sgd",
    MUON_ADAMW,
    "schedule_free_adamw",
)

#: Tuned hyperparameters (registry keyword arguments) per preset name, chosen by sweeping
#: ``max_lr`` (and Lion's betas) at the default model and budget (250 steps, seed 0):
#: final validation loss about 2.7 (adamw), 2.9 (lion), 2.8 (sgd), 2.2 (muon_adamw) and
#: 2.5 (schedule_free_adamw) nats/char against a unigram baseline of 3.35. For
#: ``muon_adamw``: one dict per partition group.
PRESETS: dict[str, dict[str, Any]] = {
    "adamw": {"max_lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1},
    # Lion wants a smaller lr than AdamW and, here, the paper's (0.95, 0.98) for stability
    "lion": {"max_lr": 5e-4, "betas": (0.95, 0.98), "weight_decay": 0.1},
    "sgd": {"max_lr": 0.1, "momentum": 0.9, "nesterov": True},
    MUON_ADAMW: {
        "muon": {"max_lr": 0.05, "momentum": 0.95, "nesterov": True, "weight_decay": 0.0},
        "adamw": {"max_lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1},
    },
    "schedule_free_adamw": {"max_lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.0},
}


@dataclass
class OptimizerSpec:
    """One optimizer of the comparison: its display name and the optimizer value."""

    name: str
    optimizer: Any  # an optorch Optimizer or a wrapper: .init, .step, .config
    note: str = ""  # shown in the report (e.g. "built-in warmup, no cosine decay")
    description: str = ""  # the hyperparameters, for the report
    schedule: Callable[[int], Any] | None = field(default=None, repr=False)


def warmup_cosine(total_steps: int, warmup_steps: int, terminal: float) -> Callable[[int], Any]:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``terminal`` at
    ``total_steps`` (:func:`optorch.schedule.build_lr_scheduler`, ``"cosine"``)."""
    from optorch.schedule import LRSchedulerConfig, build_lr_scheduler

    return build_lr_scheduler(
        LRSchedulerConfig(
            warmup_steps=warmup_steps,
            warmup_start_value=0.0,
            total_steps=total_steps,
            scheduler_type="cosine",
            lr_terminal_value=terminal,
        )
    )


def _planned_module(name: str) -> str | None:
    for key, module, _, _ in _BUILTINS:
        if key == name:
            return module
    return None


def _check_available(name: str) -> None:
    """``ValueError`` for a name that is neither registered nor a preset."""
    if name in REGISTRY:
        return
    module = _planned_module(name)
    if module is not None:
        raise ValueError(
            f"optimizer {name!r} is not available in this build: its module "
            f"optorch.{module} is missing"
        )
    try:
        optorch.get_optimizer(name)
    except ValueError as exc:  # the registry's message, with its "did you mean"
        raise ValueError(f"{exc} (or the preset {MUON_ADAMW!r})") from None


def parse_optimizer_names(text: str, recipe_names: tuple[str, ...] = ()) -> list[str]:
    """``"adamw, Lion,muon-adamw"`` -> ``["adamw", "lion", "muon_adamw"]``, checked.

    A name is a recipe entry, a preset, or a registry name; ``ValueError`` for an
    unknown or unavailable name, an empty list, or a repeated name.
    """
    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            raise ValueError(f"--optimizers: an empty name in {text!r}")
        if name not in recipe_names:
            name = name.lower().replace("-", "_")
        if name in names:
            raise ValueError(f"--optimizers: {name!r} is listed twice")
        if name not in recipe_names:
            if name == MUON_ADAMW:
                _check_available("muon")
                _check_available("adamw")
            else:
                try:
                    _check_available(name)
                except ValueError as exc:
                    if not recipe_names:
                        raise
                    close = difflib.get_close_matches(raw.strip(), recipe_names, n=1)
                    hint = f"; did you mean the recipe's {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"{exc}; the recipe's optimizers: {list(recipe_names)}{hint}"
                    ) from None
        names.append(name)
    if not names:
        raise ValueError(f"--optimizers: no optimizer named in {text!r}")
    return names


def _format_hyper(hyper: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in hyper.items())


def build_preset(
    name: str,
    *,
    total_steps: int,
    warmup_steps: int,
    lr_terminal: float,
    muon_ns_dtype: torch.dtype | None = torch.bfloat16,
) -> OptimizerSpec:
    """The optimizer for a preset or registry ``name``, with the demo's schedule.

    ``muon_ns_dtype``: the dtype of Muon's Newton-Schulz iteration in ``"muon_adamw"``
    (bfloat16 as ``torch.optim.Muon``; float32 is much faster on CPUs without native
    bfloat16 matmuls).
    """
    schedule = warmup_cosine(total_steps, warmup_steps, lr_terminal)
    if name == MUON_ADAMW:
        groups = {label: dict(hyper) for label, hyper in PRESETS[MUON_ADAMW].items()}
        groups["muon"]["ns_dtype"] = muon_ns_dtype
        from optorch.wrappers import partition

        optimizer: Any = partition(
            muon_label,
            {
                label: optorch.get_optimizer(label, schedule=schedule, **hyper)
                for label, hyper in groups.items()
            },
        )
        description = "; ".join(f"{label}: {_format_hyper(h)}" for label, h in groups.items())
        return OptimizerSpec(
            name,
            optimizer,
            note="Muon on blocks.* matrices, AdamW on embeddings/head/biases/norms",
            description=description,
            schedule=schedule,
        )
    if name == "schedule_free_adamw":
        hyper = {**PRESETS[name], "warmup_steps": warmup_steps}
        optimizer = optorch.get_optimizer(name, **hyper)
        return OptimizerSpec(
            name,
            optimizer,
            note="built-in warmup, no decay schedule; evaluated at the averaged x",
            description=_format_hyper(hyper),
        )
    hyper = dict(PRESETS.get(name, {}))
    optimizer = optorch.get_optimizer(name, schedule=schedule, **hyper)
    note = "" if name in PRESETS else "registry defaults (not tuned for the demo)"
    if not hyper:
        hyper = {"max_lr": optimizer.config.max_lr}
    return OptimizerSpec(name, optimizer, note, _format_hyper(hyper), schedule)


# --------------------------------------------------------------------------------------
# Schedule-Free: evaluate at the average x, not at the gradient point y
# --------------------------------------------------------------------------------------


def evaluation_params(optimizer: Any, params: dict[str, Any], state: Any) -> dict[str, Any]:
    """The params to evaluate: ``params`` itself, or for Schedule-Free the average
    :math:`x` (new tensors; the training params keep :math:`y`)."""
    try:
        schedule_free = importlib.import_module("optorch.schedule_free")
    except ModuleNotFoundError:
        return params
    config = getattr(optimizer, "config", None)
    if isinstance(config, schedule_free.ScheduleFreeAdamWConfig) and "z" in state:
        evaluated: dict[str, Any] = schedule_free.eval_params(
            params, state, config.replace(inplace=False)
        )
        return evaluated
    return params


# --------------------------------------------------------------------------------------
# torch.optim twins
# --------------------------------------------------------------------------------------


class NoTwin(Exception):
    """Raised while building a twin: torch.optim has no equivalent (message says why)."""


@dataclass
class TorchTwin:
    """``torch.optim`` optimizers (one per group) and their ``LambdaLR`` schedulers."""

    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    description: str
    #: each optimizer's partition label (None outside a partition), as the optorch run
    #: names its groups' learning rates
    labels: list[Any] = field(default_factory=list)

    def step(self, scaler: Any = None) -> None:
        for optimizer in self.optimizers:
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        for scheduler in self.schedulers:
            scheduler.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Per-param state tensors by field name (``exp_avg``, ``momentum_buffer``...)."""
        found: dict[str, list[torch.Tensor]] = {}
        for optimizer in self.optimizers:
            for param_state in optimizer.state.values():
                for key, value in param_state.items():
                    if isinstance(value, torch.Tensor) and value.ndim > 0:
                        found.setdefault(key, []).append(value)
        return found


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        raise NoTwin("a hyperparameter is a tensor")
    return float(value)


def _lambda(config: Any) -> Callable[[int], float] | None:
    schedule = getattr(config, "schedule", None)
    if schedule is not None:
        return lambda step: float(schedule(step))
    value = getattr(config, "lr_schedule_value", None)
    if value is not None:
        constant = _number(value)
        return lambda step: constant
    return None


def _twin_name(optimizer: Any) -> str:
    """The registry name whose torch.optim twin ``optimizer`` has (Adam's mode decides
    between ``adam`` and ``adamw``)."""
    config = optimizer.config
    if isinstance(config, AdamConfig):
        if config.mode is AdamWDMode.DECOUPLED:
            raise NoTwin("torch.optim has no fully decoupled Adam")
        return "adamw" if config.mode is AdamWDMode.ADAMW else "adam"
    return str(optimizer.rule.name)


def _twin_of_single(optimizer: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The torch.optim twin of one optimizer (:data:`optorch.interop.convert.TORCH_TWINS`),
    with the hyperparameters :func:`~optorch.interop.convert.torch_hyperparameters` maps."""
    from optorch.interop.convert import TORCH_TWINS, torch_hyperparameters

    name = _twin_name(optimizer)
    twin = TORCH_TWINS.get(name)
    if twin is None:
        raise NoTwin(f"no torch twin for {name}")
    if not twin.available:
        raise NoTwin(f"torch {torch.__version__} has no torch.optim.{twin.torch_class}")
    if any(isinstance(value, torch.Tensor) for value in vars(optimizer.config).values()):
        raise NoTwin("a hyperparameter is a tensor")
    try:
        hyperparameters = torch_hyperparameters(name, optimizer.config)
    except ValueError as exc:  # an option torch cannot express
        raise NoTwin(str(exc)) from None
    torch_class: type[torch.optim.Optimizer] = getattr(torch.optim, twin.torch_class)
    return torch_class(params, **hyperparameters)


def _labels_of(partition: Any, named: Mapping[str, torch.nn.Parameter]) -> dict[str, Any]:
    labels = partition.labels
    if callable(labels):
        return {name: labels(name, param) for name, param in named.items()}
    if isinstance(labels, Mapping):
        return {name: labels.get(name) for name in named}
    raise NoTwin("partition labels are neither a function nor a dict")


def _build_twins(
    optimizer: Any,
    named: Mapping[str, torch.nn.Parameter],
    twins: list[torch.optim.Optimizer],
    schedulers: list[torch.optim.lr_scheduler.LRScheduler],
    names: list[str],
    labels_out: list[Any],
    label: Any = None,
) -> None:
    groups = getattr(optimizer, "optimizers", None)
    if isinstance(groups, Mapping) and hasattr(optimizer, "labels"):  # a partition
        labels = _labels_of(optimizer, named)
        for group_label, inner in groups.items():
            members = {n: p for n, p in named.items() if labels[n] == group_label}
            if members:
                path = group_label if label is None else f"{label}/{group_label}"
                _build_twins(inner, members, twins, schedulers, names, labels_out, path)
        return
    if not hasattr(optimizer, "rule"):
        raise NoTwin(f"no torch twin for {getattr(optimizer, 'name', type(optimizer).__name__)}")
    twin = _twin_of_single(optimizer, list(named.values()))
    twins.append(twin)
    names.append(type(twin).__name__)
    labels_out.append(label)
    multiplier = _lambda(optimizer.config)
    if multiplier is not None:
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(twin, multiplier))


def torch_twin(optimizer: Any, model: torch.nn.Module) -> TorchTwin | str:
    """The ``torch.optim`` equivalent of ``optimizer`` on ``model``'s params, or the
    reason there is none (a string, e.g. ``"no torch twin for lion"``)."""
    twins: list[torch.optim.Optimizer] = []
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = []
    names: list[str] = []
    labels: list[Any] = []
    try:
        _build_twins(optimizer, dict(model.named_parameters()), twins, schedulers, names, labels)
    except NoTwin as exc:
        return str(exc)
    description = " + ".join(f"torch.optim.{n}" for n in names)
    return TorchTwin(twins, schedulers, description, labels)


def lr_values(optimizer: Any, steps_taken: int, prefix: str = "") -> dict[str, float]:
    """The learning rate of this step (``max_lr`` times the schedule), per group."""
    groups = getattr(optimizer, "optimizers", None)
    if isinstance(groups, Mapping):
        found: dict[str, float] = {}
        for label, inner in groups.items():
            found.update(lr_values(inner, steps_taken, f"{prefix}{label}/"))
        return found
    inner = getattr(optimizer, "inner", None)
    if inner is not None:
        return lr_values(inner, steps_taken, prefix)
    config = getattr(optimizer, "config", None)
    if config is None or not hasattr(config, "max_lr"):
        return {}
    try:
        value = float(config.max_lr * config.lr_multiplier(steps_taken))
    except (TypeError, ValueError, RuntimeError):
        return {}
    return {f"{prefix}lr": value if math.isfinite(value) else float("nan")}
