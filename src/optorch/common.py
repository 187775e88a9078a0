"""Types and helpers shared with the seed's API."""

from __future__ import annotations

from typing import Any

import torch

from optorch.base import params_of, zeros_tree

__all__ = ["OPTIMIZER_STATE_TYPE", "PARAMS_GRADS_TYPE", "zero_init_like"]

#: Params or grads: any pytree of tensors (a list, a dict ``name -> tensor``, nested).
PARAMS_GRADS_TYPE = Any
#: Optimizer state: a dict of ``"step"`` and one params-shaped tree per field.
OPTIMIZER_STATE_TYPE = dict[str, Any]


def zero_init_like(model: torch.nn.Module | Any) -> Any:
    """Zeros like each param: for a module, a dict ``name -> zeros`` of the trainable ones."""
    return zeros_tree(params_of(model), only_trainable=isinstance(model, torch.nn.Module))
