r"""An optorch optimizer as a ``torch.optim.Optimizer``, for code written against torch.

:class:`TorchOptimizer` is a real ``torch.optim.Optimizer`` subclass: it takes params or
param groups, has ``step(closure=None)``, ``zero_grad``, ``state_dict`` /
``load_state_dict`` in torch's format, and reads every hyperparameter from
``param_groups`` at each step, so ``torch.optim.lr_scheduler`` classes and
``torch.amp.GradScaler`` drive it as they drive ``torch.optim.AdamW``. The update itself
is the optorch rule (:func:`optorch.base.apply_step`, in place, on the params of each
group that have a gradient).

Hyperparameters in ``param_groups`` have the optorch config's field names, which follow
``torch.optim``'s (``betas``, ``eps``, ``weight_decay``, ``momentum``, ``nesterov``, ...),
except that the learning rate is ``"lr"`` (optorch's ``max_lr``). A group's ``"max_lr"``
key belongs to ``OneCycleLR`` (its peak) and is ignored here. If the optorch config has a
``schedule``, its multiplier still applies on top of the group's ``lr`` (usually leave it
unset and use an ``lr_scheduler``).

State, per param as in torch: ``"step"`` (a 0-d CPU tensor in torch's scalar dtype: float32,
float64 when that is the default dtype)
and the optorch rule's fields, under the keys the ``torch.optim`` twin uses where there
is one (:data:`optorch.interop.convert.TORCH_TWINS`: SGD's and Muon's buffer is
``"momentum_buffer"``, NAdam also keeps torch's ``"mu_product"``), so that a
``state_dict()`` loads into the twin and the twin's into this class; other rules keep
their field names (``exp_avg``, ...; rule-wide values such as Schedule-Free's
``weight_sum`` are kept with every param). Params with different step counts (one that
got its first gradient late) are stepped separately, each with its own count, as torch
does. A step that raises (a bad group value, a grad that does not fit) has changed no
param and no state.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(3))
>>> opt = TorchOptimizer([w], "adamw", lr=0.1, weight_decay=0.0)
>>> scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
>>> w.grad = torch.ones(3)
>>> opt.step(); scheduler.step()
>>> w.detach(), opt.param_groups[0]["lr"]
(tensor([0.9000, 0.9000, 0.9000]), 0.05)
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch

from optorch import graphs
from optorch.base import Optimizer, apply_step, prepare

__all__ = ["TorchOptimizer"]

#: Config fields that are not per-group hyperparameters.
_NOT_HYPER = frozenset({"schedule", "inplace", "impl", "steps", "lr_schedule_value", "max_lr"})


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _is_numeric(value: Any) -> bool:
    """A number, a 0-d tensor, or a tuple of them (``betas``): passed per step."""
    if isinstance(value, (tuple, list)):
        return len(value) > 0 and all(_is_number(v) for v in value)
    return _is_number(value)


def _group_value(value: Any) -> Any:
    """A config value as a group holds it: enums by name (``torch.load(weights_only=
    True)`` reads no enum), everything else as it is."""
    return value.name if isinstance(value, enum.Enum) else value


def _in_group(error: Exception, index: int) -> Exception:
    """``error`` with the param group it came from named (and ``max_lr`` as the group's
    ``lr``), of the same type where that type takes a message."""
    text = f"TorchOptimizer: param_groups[{index}]: {str(error).removeprefix('TorchOptimizer: ')}"
    if "max_lr" in str(error):
        text += " (max_lr is the group's 'lr')"
    try:
        return type(error)(text)
    except TypeError:  # pragma: no cover - an exception class with another signature
        return error


@dataclasses.dataclass
class _Bucket:
    """One checked step of a group's params that share a step count."""

    config: Any
    taken: int
    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    grads: list[torch.Tensor]
    state: dict[str, Any]


def _implementation_flags(hyperparams: dict[str, Any]) -> dict[str, Any]:
    """``hyperparams`` with torch.optim's implementation flags (``foreach``, ``fused``,
    ``capturable``, ``differentiable``) turned into optorch's ``impl`` or dropped."""
    out = dict(hyperparams)
    foreach = out.pop("foreach", None)
    fused = out.pop("fused", None)
    out.pop("capturable", None)
    if out.pop("differentiable", False):
        raise ValueError(
            "TorchOptimizer: differentiable=True is not supported (the adapter steps in "
            "place); differentiate through a pure optorch step (inplace=False) instead"
        )
    if fused and foreach:
        raise ValueError("TorchOptimizer: fused=True and foreach=True cannot both be set")
    chosen = "compiled" if fused else {True: "foreach", False: "reference"}.get(foreach)
    if chosen is not None:
        if out.get("impl", chosen) != chosen:
            raise ValueError(
                f"TorchOptimizer: impl={out['impl']!r} contradicts "
                f"{'fused' if fused else 'foreach'}={fused or foreach!r}"
            )
        out["impl"] = chosen
    return out


def _is_adam(optimizer: Any) -> bool:
    """A registry name or optimizer of the Adam rule (``adam``, ``adamw``)."""
    if isinstance(optimizer, str):
        return optimizer in ("adam", "adamw")
    return optimizer.rule.name == "adam"


def _decoupled_mode(hyperparams: Mapping[str, Any]) -> dict[str, Any]:
    """torch.optim.Adam's ``decoupled_weight_decay`` as optorch's ``mode``: AdamW's decay
    when true, L2 when false; a contradicting ``mode`` is refused."""
    flag = hyperparams["decoupled_weight_decay"]
    mode = "ADAMW" if flag else "ORIGINAL"
    given = hyperparams.get("mode")
    if given is not None and _group_value(given) != mode:
        raise ValueError(
            f"TorchOptimizer: decoupled_weight_decay={flag!r} contradicts mode={given!r}"
        )
    return {"mode": mode}


def _differs(value: Any, default: Any) -> bool:
    """Whether a group's number (or tuple of numbers) is not the config's own."""
    if isinstance(value, (tuple, list)) and isinstance(default, (tuple, list)):
        return len(value) != len(default) or any(
            _differs(v, d) for v, d in zip(value, default, strict=False)
        )
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return True
    return bool(value != default)


def _as_tensors(value: Any) -> Any:
    """A non-zero float as a 0-d float64 tensor, tuples element by element; anything else
    (ints, zeros, tensors) as it is, and ``value`` itself where nothing changed."""
    if isinstance(value, (tuple, list)):
        out = tuple(_as_tensors(v) for v in value)
        return value if all(a is b for a, b in zip(out, value, strict=True)) else out
    if isinstance(value, float) and value != 0.0:
        return torch.tensor(value, dtype=torch.float64)
    return value


def _freeze(value: Any) -> Hashable:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Hashable):
        return value
    return repr(value)


class TorchOptimizer(torch.optim.Optimizer):
    """An optorch optimizer behind the ``torch.optim.Optimizer`` interface.

    ``params_or_groups``: params or param groups, as for any ``torch.optim`` class (a
    group's keys override the defaults for its params). ``optimizer``: a registry name
    (``"adamw"``, ``"lion"``, ...) or an :class:`optorch.Optimizer` (wrappers are not
    supported: param groups take their place). ``hyperparams``: config fields
    (``lr`` or ``max_lr`` for the learning rate), applied to the optimizer's config. A
    registry name with a torch.optim twin starts from the twin's defaults
    (:func:`~optorch.interop.convert.torch_defaults`: ``"sgd"`` has ``momentum=0``,
    ``"adamw"`` ``weight_decay=0.01``, as torch's), not the registry's.

    torch.optim's implementation flags are accepted, so that code constructing a torch
    optimizer keeps working: ``foreach=True`` selects ``impl="foreach"`` and
    ``foreach=False`` ``impl="reference"`` (the per-tensor loop), ``fused=True`` selects
    ``impl="compiled"`` (one generated kernel per chunk of tensors), ``capturable`` has
    no effect (optorch's steps never read device values to the host), and
    ``differentiable=True`` is refused (the adapter steps in place; use a pure optorch
    step, ``inplace=False``, to differentiate through it).

    Raises ``ValueError``/``TypeError`` from the config's validation for bad values, at
    construction for the defaults and at each step for group values.
    """

    def __init__(
        self,
        params_or_groups: Iterable[Any],
        optimizer: str | Optimizer = "adamw",
        **hyperparams: Any,
    ) -> None:
        hyperparams = _implementation_flags(hyperparams)
        if "lr" in hyperparams:
            if "max_lr" in hyperparams:
                raise TypeError("TorchOptimizer: give the learning rate as lr or max_lr, not both")
            hyperparams["max_lr"] = hyperparams.pop("lr")
        if "decoupled_weight_decay" in hyperparams and _is_adam(optimizer):
            # torch.optim.Adam's flag is optorch's mode (NAdam and RAdam have the field)
            hyperparams.update(_decoupled_mode(hyperparams))
            del hyperparams["decoupled_weight_decay"]
        if isinstance(optimizer, str):
            from optorch.builder import get_optimizer
            from optorch.interop.convert import torch_defaults

            # a stand-in for the torch class: its defaults, not the registry's (the
            # seed's SGD has momentum 0.9, torch's none)
            functional = get_optimizer(optimizer, **{**torch_defaults(optimizer), **hyperparams})
        elif isinstance(optimizer, Optimizer):
            functional = optimizer.replace(**hyperparams) if hyperparams else optimizer
        else:
            raise TypeError(
                "TorchOptimizer: optimizer must be a registry name or an optorch.Optimizer "
                f"(use param groups instead of wrappers), got {type(optimizer).__name__}"
            )
        if not functional.config.inplace:
            functional = functional.replace(inplace=True)
        self.functional: Optimizer = functional
        self._config_cache: dict[Hashable, Any] = {}
        #: config field -> whether the config accepts it as a 0-d tensor (fused=True)
        self._takes_tensor: dict[str, bool] = {}
        from optorch.interop.convert import TORCH_TWINS

        twin = TORCH_TWINS.get(functional.rule.name)
        #: optorch field -> the key of the per-param state (the torch twin's name)
        self._keys: dict[str, str] = dict(twin.fields) if twin is not None else {}
        self._keeps_step = twin is None or twin.has_step
        #: rule-wide values the twin keeps per param in its scalar dtype (NAdam's
        #: mu_product); the others (Schedule-Free's weight_sum) stay float64
        self._twin_globals: tuple[str, ...] = twin.per_param_globals if twin is not None else ()
        config = functional.config
        self._hyper_names = tuple(
            f.name for f in dataclasses.fields(config) if f.name not in _NOT_HYPER
        )
        defaults: dict[str, Any] = {"lr": config.max_lr}
        for name in self._hyper_names:
            defaults[name] = _group_value(getattr(config, name))
        if _is_adam(functional) and defaults.get("mode") in ("ORIGINAL", "ADAMW"):
            # groups hold torch.optim.Adam's flag, not optorch's mode: a state_dict loaded
            # into torch's Adam would otherwise take the flag as False (L2 decay)
            defaults["decoupled_weight_decay"] = defaults.pop("mode") == "ADAMW"
        super().__init__(params_or_groups, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; a group that names only one of Adam's
        ``decoupled_weight_decay`` and ``mode`` keeps only that one (the other, filled in
        from the defaults, would contradict it)."""
        given = set(param_group) if isinstance(param_group, dict) else set()
        super().add_param_group(param_group)
        for own, other in (("mode", "decoupled_weight_decay"), ("decoupled_weight_decay", "mode")):
            if own in given and other not in given:
                self.param_groups[-1].pop(other, None)

    def __repr__(self) -> str:
        return f"TorchOptimizer({self.functional!r}, groups={len(self.param_groups)})"

    def __getstate__(self) -> dict[str, Any]:
        # torch's keeps only defaults, state and param_groups: a deepcopy or an unpickled
        # copy would have lost the optorch optimizer it steps with
        state: dict[str, Any] = super().__getstate__()
        for name in ("functional", "_keys", "_keeps_step", "_twin_globals", "_hyper_names"):
            state[name] = getattr(self, name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_twin_globals", ())  # pickled before NAdam kept it
        self._config_cache = {}
        self._takes_tensor = {}

    # ----------------------------------------------------------------------------------

    def _group_config(self, group: Mapping[str, Any], *, literal: bool = False) -> Any:
        """The config for ``group``: structural fields through a cached validated config,
        numbers (which schedulers change every step) set on a shallow copy; for the
        compiled engine the numbers that moved as tensors, unless ``literal``."""
        base = self.functional.config
        structural: dict[str, Any] = {}
        numeric: dict[str, Any] = {"max_lr": group["lr"]}
        if "decoupled_weight_decay" in group and _is_adam(self.functional):
            # torch.optim.Adam's flag is the mode (a mode in the same group must agree)
            group = {**group, **_decoupled_mode(group)}
        for name in self._hyper_names:
            if name not in group:
                continue
            value = group[name]
            if _is_numeric(value):
                numeric[name] = tuple(value) if isinstance(value, list) else value
            elif value != _group_value(getattr(base, name)):
                structural[name] = value
        key = tuple(sorted((k, _freeze(v)) for k, v in structural.items()))
        config = self._config_cache.get(key)
        if config is None:
            # validated with the group's numbers (a group's own momentum is what lets
            # it ask for nesterov); each step's view takes the step's numbers
            config = base.replace(**structural, **numeric) if structural else base
            self._config_cache[key] = config
        view = copy.copy(config)
        for name, value in numeric.items():
            object.__setattr__(view, name, value)
        if literal or config.impl != "compiled":
            return view
        # the compiled kernels hold a config's numbers as literals: a float a scheduler
        # moves every step (OneCycleLR's beta1) goes in as a tensor, read at each call,
        # instead of compiling a kernel per value. Not zeros (a zero decides which code
        # runs: no decay, no momentum buffer), not ints (step counts), and not fields
        # the config takes as Python numbers only (checked once per field)
        for name, value in numeric.items():
            if name == "max_lr" or not _differs(value, getattr(base, name)):
                continue
            tensors = _as_tensors(value)
            if tensors is value or self._takes_tensor.get(name) is False:
                continue
            object.__setattr__(view, name, tensors)
            if name not in self._takes_tensor:
                try:
                    view.validate()
                except (TypeError, ValueError):
                    self._takes_tensor[name] = False
                    object.__setattr__(view, name, value)
                else:
                    self._takes_tensor[name] = True
        return view

    def _new_param_state(self, param: torch.Tensor, config: Any) -> dict[str, Any]:
        from optorch.interop import convert

        rule = self.functional.rule
        # torch's per-param step: a CPU tensor in its scalar dtype (float64 when the
        # default dtype is float64)
        state: dict[str, Any] = {"step": torch.zeros((), dtype=convert.torch_scalar_dtype())}
        with torch.no_grad():
            for name in rule.fields(config):
                state[self._keys.get(name, name)] = rule.init_field(name, param.detach(), config)
            for name, initial in rule.global_fields(config).items():
                if name in self._twin_globals:  # as the twin keeps it: on the CPU
                    state[name] = torch.tensor(initial, dtype=convert.torch_scalar_dtype())
                else:
                    state[name] = torch.tensor(initial, dtype=torch.float64, device=param.device)
        return state

    @torch.no_grad()
    def train(self) -> None:
        """Put the params at the training point (Schedule-Free: :math:`y`), as
        ``schedulefree``'s optimizers do; a no-op for every other rule and when already
        there. Training loops (Hugging Face's ``Trainer``) call it where it exists."""
        self._switch(train=True)

    @torch.no_grad()
    def eval(self) -> None:
        """Put the params at the evaluation point (Schedule-Free: the average :math:`x`,
        :func:`optorch.schedule_free.eval_params`) until :meth:`train`; a no-op for every
        other rule. ``step`` refuses to run in between."""
        self._switch(train=False)

    def _switch(self, *, train: bool) -> None:
        from optorch import schedule_free

        if not isinstance(self.functional.rule, schedule_free.ScheduleFreeAdamWRule):
            return
        move = schedule_free.train_params if train else schedule_free.eval_params
        for group in self.param_groups:
            if group.get("train_mode", True) == train:
                continue
            members = [p for p in group["params"] if "z" in self.state.get(p, {})]
            if members:
                zs = [self.state[p]["z"] for p in members]
                move(members, {"z": zs}, self._group_config(group, literal=True))
            group["train_mode"] = train

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step of every group on its params that have a gradient; returns the
        closure's loss (the closure runs with gradients enabled) or ``None``.

        Every group's inputs are checked before any group is stepped: a step that raises
        leaves every param and every state as it was."""
        if not all(group.get("train_mode", True) for group in self.param_groups):
            raise RuntimeError(
                "TorchOptimizer: step() while the params are at the evaluation point; "
                "call optimizer.train() first"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []
        for index, group in enumerate(self.param_groups):
            try:
                plans.append(self._plan(group))
            except (ValueError, TypeError) as exc:
                raise _in_group(exc, index) from exc
        for plan in plans:
            self._apply(plan)
        return loss

    def _plan(self, group: Mapping[str, Any]) -> list[_Bucket]:
        """The checked inputs of one group's steps, one bucket per step count; state for
        params without any is made here but stored only by :meth:`_apply`."""
        members = [p for p in group["params"] if p.grad is not None]
        if not members:
            return []
        rule = self.functional.rule
        config = self._group_config(group)
        names = rule.fields(config)
        global_names = tuple(rule.global_fields(config))
        buckets: dict[tuple[Any, ...], list[tuple[torch.Tensor, dict[str, Any]]]] = {}
        for param in members:
            state = self.state.get(param) or self._new_param_state(param, config)
            buckets.setdefault(self._bucket_key(state, names), []).append((param, state))
        plans = []
        for (taken, *_), members_ in buckets.items():
            bucket = [param for param, _ in members_]
            states = [state for _, state in members_]
            opt_state: dict[str, Any] = {
                "step": torch.tensor(taken, dtype=torch.int64, device=bucket[0].device)
            }
            # a field none of the bucket's params has: one this group's config adds
            # (created by the step), unless the params have other state (a torch
            # Adafactor's vectors keep only "variance": the factors are placeholders)
            has_state = any(s.get(self._keys.get(n, n)) is not None for n in names for s in states)
            for name in names:
                leaves = [s.get(self._keys.get(name, name)) for s in states]
                if all(leaf is None for leaf in leaves) and not has_state:
                    continue
                opt_state[name] = [
                    rule.init_field(name, p.detach(), config) if leaf is None else leaf
                    for p, leaf in zip(bucket, leaves, strict=True)
                ]
            for name in global_names:
                if name in states[0]:
                    opt_state[name] = states[0][name]
            grads = [p.grad for p in bucket if p.grad is not None]  # all: see members
            prepare(rule, config, bucket, grads, opt_state)  # raises before any change
            plans.append(_Bucket(config, taken, bucket, states, grads, opt_state))
        return plans

    def _bucket_key(self, state: Mapping[str, Any], names: tuple[str, ...]) -> tuple[Any, ...]:
        """Params stepped together: the same count and, as torch keeps them per param,
        the same rule-wide values (NAdam's ``mu_product``, on the CPU: no sync); for a
        rule that starts a missing buffer anew (SGD), the same fields present."""
        key: list[Any] = [int(state["step"])]
        for name in self._twin_globals:
            value = state.get(name)
            key.append(None if value is None else float(value))
        if self.functional.rule.new_fields_restart_count:
            key.extend(state.get(self._keys.get(name, name)) is not None for name in names)
        return tuple(key)

    def _apply(self, plan: list[_Bucket]) -> None:
        rule = self.functional.rule
        for bucket in plan:
            config = bucket.config
            names = rule.fields(config)
            global_names = tuple(rule.global_fields(config))
            # never graphed (optorch.graphs): each step's count is a new tensor here,
            # so a graph of this step could never be replayed
            with graphs.enabled(False):
                _, new_state = apply_step(rule, config, bucket.params, bucket.grads, bucket.state)
            for index, (param, state) in enumerate(zip(bucket.params, bucket.states, strict=True)):
                state["step"].add_(1)
                for name in names:
                    state[self._keys.get(name, name)] = new_state[name][index]
                for name in global_names:
                    value = new_state[name]
                    if index == 0 or name not in state:
                        state[name] = value if index == 0 else value.clone()
                    else:
                        state[name].copy_(value)
                self.state[param] = state

    # ----------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """torch's ``load_state_dict``, taking the twin's per-param keys and keeping
        rule-wide float64 values (Schedule-Free's ``weight_sum``) in float64 where torch
        would cast them to the param's dtype.

        Both happen on the state dict the load pre-hooks return (after every hook
        registered with ``register_load_state_dict_pre_hook``), and the float64 values
        are back before the post-hooks run, as torch's hook contract has it."""
        global_names = tuple(self.functional.rule.global_fields(self.functional.config))
        kept: dict[Any, dict[str, torch.Tensor]] = {}
        saved: list[Any] = []

        def convert(optimizer: Any, loaded: dict[str, Any]) -> dict[str, Any]:
            loaded = {**loaded, "state": self._from_twin(loaded.get("state", {}))}
            for key, per_param in loaded["state"].items():
                values = {
                    n: per_param[n]
                    for n in global_names
                    if isinstance(per_param.get(n), torch.Tensor)
                }
                if values:
                    kept[key] = {n: v.detach().clone() for n, v in values.items()}
            saved.extend(key for group in loaded["param_groups"] for key in group["params"])
            return loaded

        def restore(optimizer: Any) -> None:
            # saved keys are matched to the params by position in the saved groups, as
            # torch does: integer ids, or the names torch.distributed.checkpoint's
            # get/set_optimizer_state_dict use
            ordered = [p for group in self.param_groups for p in group["params"]]
            position = dict(zip(saved, ordered, strict=False))
            for key, values in kept.items():
                param = position[key]
                for name, value in values.items():
                    # the twin's per-param values stay on the CPU, as it keeps them
                    device = "cpu" if name in self._twin_globals else param.device
                    self.state[param][name] = value.to(device=device)

        last_pre = self.register_load_state_dict_pre_hook(convert)  # after the user's
        first_post = self.register_load_state_dict_post_hook(restore, prepend=True)
        try:
            super().load_state_dict(dict(state_dict))
        finally:
            last_pre.remove()
            first_post.remove()

    def _from_twin(self, state: Mapping[Any, Any]) -> dict[Any, Any]:
        """Per-param states as this class keeps them: an earlier version's optorch field
        names under the twin's keys, and a ``step`` for twins that keep none (SGD, Muon:
        1 once the buffer exists, which is all their rules read)."""
        out: dict[Any, Any] = {}
        for key, per_param in state.items():
            if not isinstance(per_param, Mapping):
                out[key] = per_param
                continue
            entry = {self._keys.get(name, name): value for name, value in per_param.items()}
            entry = {name: value for name, value in entry.items() if value is not None}
            if "step" not in entry and not self._keeps_step:
                has_buffer = any(isinstance(v, torch.Tensor) for v in entry.values())
                entry["step"] = torch.tensor(1.0 if has_buffer else 0.0)
            out[key] = entry
        return out
