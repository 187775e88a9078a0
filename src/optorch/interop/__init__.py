"""Fitting optorch into existing code: checkpoints, a ``torch.optim`` adapter, state
conversion to and from ``torch.optim``, and Hydra recipes.

* :mod:`~optorch.interop.checkpoint`: :func:`save`, :func:`load`,
  :func:`load_optimizer`, :func:`load_params`, :func:`load_checkpoint` (safetensors or
  ``torch.save`` files, never unpickling code);
* :mod:`~optorch.interop.torch_optim`: :class:`TorchOptimizer`, an optorch optimizer as
  a ``torch.optim.Optimizer`` (param groups, ``lr_scheduler``, ``GradScaler``);
* :mod:`~optorch.interop.convert`: :func:`from_torch_state` and :func:`to_torch_state`
  between optorch state and ``torch.optim`` state dicts;
* :mod:`~optorch.interop.recipe`: :func:`build_recipe` for Hydra YAML recipes.

See ``docs/interop.md``.
"""

from optorch.interop.checkpoint import (
    Checkpoint,
    describe_optimizer,
    info,
    load,
    load_checkpoint,
    load_optimizer,
    load_params,
    rebuild_optimizer,
    save,
)
from optorch.interop.convert import (
    TORCH_TWINS,
    config_from_torch,
    from_torch_state,
    to_torch_state,
    torch_defaults,
)
from optorch.interop.recipe import Recipe, build_recipe
from optorch.interop.torch_optim import TorchOptimizer

__all__ = [
    "TORCH_TWINS",
    "Checkpoint",
    "Recipe",
    "TorchOptimizer",
    "build_recipe",
    "config_from_torch",
    "describe_optimizer",
    "from_torch_state",
    "info",
    "load",
    "load_checkpoint",
    "load_optimizer",
    "load_params",
    "rebuild_optimizer",
    "save",
    "to_torch_state",
    "torch_defaults",
]
