"""optorch: purely functional, composable, compilable optimizers for PyTorch.

An optimizer is a value: a config dataclass, a state pytree and a step function
``step(params, grads, state, config) -> (params, state)``. See the README.
"""

from optorch import interop, schedule, wrappers
from optorch.adam import AdamConfig, AdamWDMode, adam_step, default_adam_state
from optorch.base import BaseConfig, Optimizer, Rule
from optorch.builder import (
    DEFAULT_OPTIMIZER_CONFIGS,
    DEFAULT_OPTIMIZER_STATES,
    OPTIMIZER_STEP,
    REGISTRY,
    get_optimizer,
    get_optimizer_step,
    init_optimizer_state,
    register,
)
from optorch.engine import TensorList
from optorch.interop import (
    TorchOptimizer,
    build_recipe,
    from_torch_state,
    load_params,
    save,
    to_torch_state,
)
from optorch.interop import load_optimizer as load
from optorch.lars import LARSConfig, lars_step
from optorch.sgd import SGDConfig, default_sgd_state, sgd_step

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_OPTIMIZER_CONFIGS",
    "DEFAULT_OPTIMIZER_STATES",
    "OPTIMIZER_STEP",
    "REGISTRY",
    "AdamConfig",
    "AdamWDMode",
    "BaseConfig",
    "LARSConfig",
    "Optimizer",
    "Rule",
    "SGDConfig",
    "TensorList",
    "TorchOptimizer",
    "__version__",
    "adam_step",
    "build_recipe",
    "default_adam_state",
    "default_sgd_state",
    "from_torch_state",
    "get_optimizer",
    "get_optimizer_step",
    "init_optimizer_state",
    "interop",
    "lars_step",
    "load",
    "load_params",
    "register",
    "save",
    "schedule",
    "sgd_step",
    "to_torch_state",
    "wrappers",
]
