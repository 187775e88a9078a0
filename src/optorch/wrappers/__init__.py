"""Composable wrappers: each takes an optimizer and returns one.

A wrapper accepts an :class:`optorch.Optimizer` (as :func:`optorch.get_optimizer`
returns) or another wrapper, and offers the same interface: ``.config``, ``.name``,
``.init(params) -> state`` and
``.step(params, grads, state, *, hyper_overrides=None, skip_if=None) -> (params, state)``.
So they nest freely, with every optimizer, in place or pure (the inner config's
``inplace`` decides; in pure mode no input is ever modified), on every ``impl``.

Each wrapper keeps its own state next to the inner one in a dict (``{"inner": ...,
"ema": ..., "count": ...}``), all tensors (0-d int64 counters), so checkpoints and
inspection see everything, and each honours ``skip_if`` for its own state too.

* gradient transformations, applied by :func:`chain`: :func:`clip_by_global_norm`,
  :func:`clip_by_value`, :func:`clip_by_norm_per_param`, :func:`adaptive_clip`,
  :func:`scale`, :func:`add_noise`, :func:`zero_nans`;
* which leaves: :func:`masked`, :func:`freeze`, :func:`partition`, :func:`decay_mask`,
  :func:`no_weight_decay_on`;
* whether to step: :func:`accumulate`, :func:`skip_nonfinite`;
* averaging: :func:`ema` (:func:`ema_params`), :func:`lookahead`;
* hyperparameters in the state: :func:`inject_hyperparams`, :func:`set_hyperparam`.

>>> import torch, optorch
>>> from optorch import wrappers
>>> adamw = optorch.get_optimizer("adamw", max_lr=1e-3, weight_decay=0.1)
>>> opt = wrappers.skip_nonfinite(
...     wrappers.accumulate(
...         wrappers.chain(wrappers.clip_by_global_norm(1.0), wrappers.decay_mask(adamw)),
...         every=4,
...     )
... )
>>> params = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.ones(2)}
>>> state = opt.init(params)
>>> sorted(state), sorted(state["inner"])
(['inner', 'skipped_consecutive', 'skipped_total'], ['count', 'grad_mean', 'grad_seen', 'inner'])
"""

from optorch.wrappers._core import GroupsConfig, Wrapper, commit
from optorch.wrappers.averaging import EMA, Lookahead, ema, ema_params, lookahead
from optorch.wrappers.control import Accumulate, SkipNonfinite, accumulate, skip_nonfinite
from optorch.wrappers.grouping import (
    Masked,
    Partition,
    decay_mask,
    freeze,
    masked,
    no_weight_decay_on,
    partition,
)
from optorch.wrappers.hyperparams import (
    InjectHyperparams,
    get_hyperparams,
    inject_hyperparams,
    set_hyperparam,
)
from optorch.wrappers.transforms import (
    Chain,
    GradientTransformation,
    adaptive_clip,
    add_noise,
    chain,
    clip_by_global_norm,
    clip_by_norm_per_param,
    clip_by_value,
    global_norm,
    scale,
    zero_nans,
)

__all__ = [
    "EMA",
    "Accumulate",
    "Chain",
    "GradientTransformation",
    "GroupsConfig",
    "InjectHyperparams",
    "Lookahead",
    "Masked",
    "Partition",
    "SkipNonfinite",
    "Wrapper",
    "accumulate",
    "adaptive_clip",
    "add_noise",
    "chain",
    "clip_by_global_norm",
    "clip_by_norm_per_param",
    "clip_by_value",
    "commit",
    "decay_mask",
    "ema",
    "ema_params",
    "freeze",
    "get_hyperparams",
    "global_norm",
    "inject_hyperparams",
    "lookahead",
    "masked",
    "no_weight_decay_on",
    "partition",
    "scale",
    "set_hyperparam",
    "skip_nonfinite",
    "zero_nans",
]
