"""The demo's settings: built-in defaults, a Hydra recipe, and command-line flags.

A setting takes the first value found among: the command-line flag, the recipe's
``model:``/``train:`` section, the built-in default (:data:`DEFAULTS`). Every value is
checked here, and a bad one raises ``ValueError`` naming the flag (or the recipe key),
so the command line reports one line and never a traceback.

A recipe (``--config recipe.yaml``, see ``examples/recipe.yaml`` and ``docs/demo.md``)
is a YAML file with these top-level sections, all optional except ``optimizers``:

``model``
    ``d_model``, ``n_layers``, ``n_heads``, ``tie_embeddings``.
``train``
    ``steps``, ``batch_size``, ``seq_len``, ``seed``, ``precision``, ``device``,
    ``text``, ``eval_every``, ``eval_batches``, ``warmup_steps``, ``lr_terminal``,
    ``sample_chars``, ``temperature``.
``optimizers``
    ``name: {_target_: ..., ...}``: each entry instantiates (``hydra.utils.instantiate``)
    to an optorch optimizer or wrapper. ``${train.steps}`` and the like resolve to the
    final settings (flags included).
``scaler``
    ``{_target_: optorch.amp.init_grad_scaler, ...}``: the loss scaler of
    ``precision: fp16`` runs (``device`` is passed by the demo).
``schedule`` and ``vars``
    free-form nodes for interpolation (``schedule: ${schedule}`` in an optimizer).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEFAULTS", "PRECISIONS", "Recipe", "load_recipe", "parse_device", "resolve"]

PRECISIONS = ("fp32", "bf16", "fp16")

#: Built-in defaults: the five default optimizers take about 90 s on one CPU core.
DEFAULTS: dict[str, Any] = {
    "steps": 250,
    "batch_size": 32,
    "seq_len": 64,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "tie_embeddings": False,
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
    "text": None,
    "eval_every": None,  # steps // 10
    "eval_batches": 8,
    "warmup_steps": None,  # steps // 10
    "lr_terminal": 0.1,
    "sample_chars": 200,
    "temperature": 0.8,
    "threads": 1,  # the default model is too small to gain from more threads
}

MODEL_KEYS = ("d_model", "n_layers", "n_heads", "tie_embeddings")
TRAIN_KEYS = (
    "steps",
    "batch_size",
    "seq_len",
    "seed",
    "precision",
    "device",
    "text",
    "eval_every",
    "eval_batches",
    "warmup_steps",
    "lr_terminal",
    "sample_chars",
    "temperature",
    "threads",
)
RECIPE_SECTIONS = ("model", "train", "optimizers", "scaler", "schedule", "vars")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {_flag(key)}: {value!r} (must be an int >= {minimum})")
    return value


def _float(key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {_flag(key)}: {value!r} (must be a number)")
    if not (low <= value <= high and math.isfinite(value)):
        raise ValueError(f"Invalid {_flag(key)}: {value!r} (must be in [{low}, {high}])")
    return float(value)


def _check(key: str, value: Any) -> Any:
    """The value of setting ``key``, checked (``ValueError`` naming the flag)."""
    if value is None and DEFAULTS.get(key, 0) is None:
        return None
    if key in ("steps", "batch_size", "seq_len", "d_model", "n_layers", "n_heads"):
        return _int(key, value, 1)
    if key in ("eval_every", "eval_batches", "threads"):
        return _int(key, value, 1)
    if key in ("seed", "warmup_steps", "sample_chars"):
        return _int(key, value, 0)
    if key == "lr_terminal":
        return _float(key, value, 0.0, 1.0)
    if key == "temperature":
        return _float(key, value, 0.0, 100.0)
    if key == "tie_embeddings":
        if not isinstance(value, bool):
            raise ValueError(f"Invalid {_flag(key)}: {value!r} (must be true or false)")
        return value
    if key == "precision":
        text = str(value).strip().lower()
        if text not in PRECISIONS:
            raise ValueError(f"Invalid --precision: {value!r} (must be one of {PRECISIONS})")
        return text
    if key in ("device", "text"):
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"Invalid {_flag(key)}: {value!r} (must be a string)")
        return str(value)
    raise ValueError(f"unknown setting {key!r}")  # pragma: no cover - programming error


def parse_device(text: str) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    choice = text.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except RuntimeError:
        raise ValueError(
            f"Invalid --device: {text!r} (must be auto, cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"Invalid --device: {text!r} (the demo runs on cpu or cuda)")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {text}: CUDA is not available (torch {torch.__version__}, "
            f"built with CUDA: {torch.version.cuda is not None}); use --device cpu"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s)"
        )
    return device


# --------------------------------------------------------------------------------------
# recipes
# --------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


@dataclass
class Recipe:
    """A loaded recipe: the OmegaConf tree and the path it came from."""

    path: str
    config: Any  # omegaconf.DictConfig

    @property
    def optimizer_names(self) -> tuple[str, ...]:
        return tuple(str(k) for k in self.config.optimizers)

    def section(self, name: str) -> dict[str, Any]:
        from omegaconf import OmegaConf

        node = self.config.get(name)
        if node is None:
            return {}
        try:
            values = OmegaConf.to_container(node, resolve=True)
        except Exception as exc:  # an interpolation that does not resolve
            raise ValueError(f"{self.path}: section {name!r}: {_one_line(exc)}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{self.path}: section {name!r} must be a mapping, got {values!r}")
        allowed = MODEL_KEYS if name == "model" else TRAIN_KEYS
        unknown = sorted(set(map(str, values)) - set(allowed))
        if unknown:
            raise ValueError(
                f"{self.path}: unknown key(s) {unknown} in section {name!r} (allowed: "
                f"{list(allowed)})"
            )
        return {str(k): v for k, v in values.items()}

    def set_train(self, values: Mapping[str, Any]) -> None:
        """Write the final settings into ``train``/``model`` so interpolations see them."""
        from omegaconf import OmegaConf

        for key, value in values.items():
            section = "model" if key in MODEL_KEYS else "train"
            OmegaConf.update(self.config, f"{section}.{key}", value, force_add=True)

    def instantiate(self, path: str, **kwargs: Any) -> Any:
        """``hydra.utils.instantiate`` of the node at ``path`` (``"optimizers.adamw"``)."""
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        node = OmegaConf.select(self.config, path)
        try:
            return instantiate(node, **kwargs)
        except Exception as exc:  # Hydra wraps the target's own error; report it on one line
            raise ValueError(f"{self.path}: cannot instantiate {path}: {_one_line(exc)}") from None


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read and check a recipe; ``FileNotFoundError``/``ValueError`` naming the problem."""
    file = Path(path)
    if not file.exists():
        raise FileNotFoundError(f"--config: no such file: {str(file)!r}")
    if not file.is_file():
        raise ValueError(f"--config: {str(file)!r} is not a regular file")
    try:
        import hydra.utils  # noqa: F401  # a demo extra: check it is there before parsing
        from omegaconf import DictConfig, OmegaConf
    except ImportError:
        raise ValueError(
            "--config needs hydra-core (a demo extra): pip install 'optorch[demo]'"
        ) from None
    try:
        config = OmegaConf.load(file)
    except Exception as exc:  # yaml.YAMLError, OmegaConf's errors, bad encoding
        raise ValueError(
            f"--config {str(file)!r}: not a valid YAML recipe: {_one_line(exc)}"
        ) from None
    if not isinstance(config, DictConfig):
        raise ValueError(f"--config {str(file)!r}: the recipe must be a mapping of sections")
    unknown = sorted(set(map(str, config)) - set(RECIPE_SECTIONS))
    if unknown:
        raise ValueError(
            f"--config {str(file)!r}: unknown section(s) {unknown} (allowed: "
            f"{list(RECIPE_SECTIONS)})"
        )
    optimizers = config.get("optimizers")
    if not isinstance(optimizers, DictConfig) or len(optimizers) == 0:
        raise ValueError(
            f"--config {str(file)!r}: needs an 'optimizers' section mapping names to "
            "{_target_: ...} nodes"
        )
    for key in optimizers:
        name = str(key)
        node = optimizers[key]
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(
                f"--config {str(file)!r}: optimizers.{name} must be a node with a _target_"
            )
    return Recipe(str(file), config)


def resolve(flags: Mapping[str, Any], recipe: Recipe | None) -> dict[str, Any]:
    """Every setting of :data:`DEFAULTS`: flag, else recipe, else default; checked."""
    from_recipe: dict[str, Any] = {}
    where: dict[str, str] = {}  # a recipe key -> how its error names it
    if recipe is not None:
        for section in ("model", "train"):
            values = recipe.section(section)
            from_recipe.update(values)
            where.update({key: f"{section}.{key} of --config" for key in values})
    settings: dict[str, Any] = {}
    for key, default in DEFAULTS.items():
        value = flags.get(key)
        if value is None:
            value = from_recipe.get(key, default)
        try:
            settings[key] = _check(key, value)
        except ValueError as exc:
            if flags.get(key) is None and key in where:  # the recipe's value, not a flag
                text = str(exc).replace(f"Invalid {_flag(key)}:", f"Invalid {where[key]}:", 1)
                raise ValueError(text) from None
            raise
    steps = settings["steps"]
    if settings["eval_every"] is None:
        settings["eval_every"] = max(1, steps // 10)
    if settings["warmup_steps"] is None:
        settings["warmup_steps"] = steps // 10
    if settings["warmup_steps"] > steps:

        def named(key: str) -> str:
            flag = "--" + key.replace("_", "-")
            given = flags.get(key) is not None or key not in from_recipe
            return flag if given else f"train.{key} of --config"

        raise ValueError(
            f"Invalid {named('warmup_steps')}: {settings['warmup_steps']} (must be <= "
            f"{named('steps')} {steps})"
        )
    if settings["d_model"] % settings["n_heads"]:
        raise ValueError(
            f"Invalid --n-heads: {settings['n_heads']} does not divide --d-model "
            f"{settings['d_model']}"
        )
    return settings


def usable_cores() -> int:
    """The cores this process may use (for ``--threads``' help)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
