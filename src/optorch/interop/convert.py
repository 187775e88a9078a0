r"""Optimizer state to and from ``torch.optim``: switch library mid-run.

:func:`from_torch_state` turns a ``torch.optim`` optimizer (or its ``state_dict()``) into
the optorch state of the same algorithm, and :func:`to_torch_state` turns an optorch
state into a ``state_dict`` that the ``torch.optim`` twin loads with
``load_state_dict``. Continuing in either library then gives the same trajectory (up to
the floating point differences of the two implementations).

The twins (:data:`TORCH_TWINS`): ``sgd`` (``torch.optim.SGD``), ``adam``, ``adamw``,
``adamax``, ``nadam``, ``radam``, ``rmsprop``, ``adagrad``, ``adafactor`` and ``muon``
(where this torch has the class). Differences handled:

* **step count**: torch keeps a ``step`` per param (a float tensor), optorch the
  optimizer's ``state["step"]`` (int64) and, for rules that read a param's own count
  (bias corrections: Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, Adafactor), how many
  steps each param sat out (``state["skipped_steps"]``, present once one did). Going to
  optorch, the count is the largest torch count and each param's lag becomes its
  ``skipped_steps`` (RMSprop, whose rule reads no count, takes the largest); ``step=``
  gives the steps taken where every param sat out some (torch keeps no optimizer count,
  and a schedule reads it), at least the largest; going to
  torch, each param's step is ``step - skipped_steps``. ``torch.optim.SGD`` and
  ``Muon`` keep no count: pass ``step=`` (steps taken); without it the count is 1 when a
  momentum buffer exists and 0 otherwise, which is all their update rules read, but not
  what a ``schedule`` needs (so a config with a schedule requires ``step=``).
* **SGD's buffer**: torch starts it at the first gradient (``momentum_buffer`` absent or
  ``None`` before the first step, and no state at all with ``momentum=0``); optorch
  keeps zeros and knows the first step from the count.
* **NAdam's** ``mu_product`` (:math:`\Pi_t = \prod_{i \le t} \mu_i`): torch keeps it per
  param, optorch once for the optimizer's count. Going to optorch it is taken from a
  param at the largest count; going to torch every param at that count gets it, and a
  param that sat out steps the closed form at its own count
  (:func:`optorch.nadam.nadam_mu_product`).
* **Adafactor**: optorch keeps ``row_var``/``col_var``/``variance`` for every param, with
  an empty placeholder where torch has no entry (``variance`` of a matrix, the factors
  of a vector).
* **params torch never stepped** (no gradient yet) get optorch's initial state and, for
  the rules above, an own count of 0 (they sat out every step so far), as in torch.

Params are matched to torch's integer ids by position: ``params`` is a list of tensors,
a dict (its insertion order: ``dict(model.named_parameters())`` is
``model.parameters()``'s order), an ``nn.Module``, or any nested pytree (depth-first in
iteration order); ``None`` leaves (frozen params) take no id. Of an ``nn.Module`` the
trainable params count, as for ``init(module)``; its frozen ones
(``requires_grad=False``) may be held by the torch optimizer too (they get no state).
Given a torch optimizer instead of a ``state_dict``, params are matched by identity,
whatever the order. One optorch state holds one kind of state: torch param groups
that differ in an option deciding which state exists (``amsgrad``, ``centered``) are
refused, as is torch state that the given ``config`` has no field for.

>>> import torch, optorch
>>> from optorch.interop import from_torch_state, to_torch_state
>>> w = torch.nn.Parameter(torch.ones(2))
>>> adamw = torch.optim.AdamW([w], lr=0.1)
>>> w.grad = torch.ones(2)
>>> adamw.step()
>>> state = from_torch_state(adamw, [w], "adamw")
>>> int(state["step"]), state["exp_avg"][0]
(1, tensor([0.1000, 0.1000]))
>>> to_torch_state(state, [w], "adamw")["state"][0]["step"]
tensor(1.)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from optorch.base import SKIPPED
from optorch.tree import PyTree, flatten, format_path, unflatten

__all__ = [
    "TORCH_TWINS",
    "TorchTwin",
    "config_from_torch",
    "from_torch_state",
    "to_torch_state",
    "torch_defaults",
    "torch_hyperparameters",
]


@dataclass(frozen=True)
class TorchTwin:
    """How one registry entry maps to its ``torch.optim`` class."""

    #: The class name in ``torch.optim``.
    torch_class: str
    #: optorch state field -> torch per-param state key.
    fields: Mapping[str, str]
    #: Whether torch keeps a per-param ``step``.
    has_step: bool = True
    #: Config fields whose torch names differ: optorch name -> torch name.
    renamed: Mapping[str, str] = field(default_factory=dict)
    #: Rule-wide optorch state (:meth:`optorch.base.Rule.global_fields`) that torch
    #: keeps per param under the same key (NAdam's ``mu_product``).
    per_param_globals: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return isinstance(getattr(torch.optim, self.torch_class, None), type)


_ADAM_FIELDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}

#: Registry name -> its ``torch.optim`` twin.
TORCH_TWINS: dict[str, TorchTwin] = {
    "sgd": TorchTwin("SGD", {"momentum": "momentum_buffer"}, has_step=False),
    "adam": TorchTwin("Adam", {**_ADAM_FIELDS, "max_exp_avg_sq": "max_exp_avg_sq"}),
    "adamw": TorchTwin("AdamW", {**_ADAM_FIELDS, "max_exp_avg_sq": "max_exp_avg_sq"}),
    "adamax": TorchTwin("Adamax", {"exp_avg": "exp_avg", "exp_inf": "exp_inf"}),
    "nadam": TorchTwin("NAdam", dict(_ADAM_FIELDS), per_param_globals=("mu_product",)),
    "radam": TorchTwin("RAdam", dict(_ADAM_FIELDS)),
    "rmsprop": TorchTwin(
        "RMSprop",
        {"square_avg": "square_avg", "momentum_buffer": "momentum_buffer", "grad_avg": "grad_avg"},
    ),
    "adagrad": TorchTwin("Adagrad", {"sum": "sum"}),
    "adafactor": TorchTwin(
        "Adafactor", {"row_var": "row_var", "col_var": "col_var", "variance": "variance"}
    ),
    "muon": TorchTwin("Muon", {"momentum": "momentum_buffer"}, has_step=False),
}

#: Keys of torch param groups that are not hyperparameters of the algorithm.
_TORCH_IMPLEMENTATION_KEYS = frozenset(
    {"params", "param_names", "foreach", "fused", "capturable", "differentiable", "initial_lr"}
)


def _twin(name: str) -> tuple[Any, TorchTwin]:
    from optorch.builder import _lookup

    entry = _lookup(name)
    twin = TORCH_TWINS.get(entry.name)
    if twin is None:
        raise ValueError(f"{entry.name!r} has no torch.optim twin (twins: {sorted(TORCH_TWINS)})")
    if not twin.available:
        raise ValueError(f"torch {torch.__version__} has no torch.optim.{twin.torch_class}")
    return entry, twin


# --------------------------------------------------------------------------------------
# hyperparameters
# --------------------------------------------------------------------------------------


def config_from_torch(name: str, source: Any) -> Any:
    """The optorch config (for registry ``name``) with the hyperparameters of a torch
    optimizer, its ``state_dict()``, or one of its param groups (the first group of an
    optimizer or state dict). ``lr`` becomes ``max_lr``; implementation flags
    (``foreach``, ``fused``, ``capturable``, ...) are dropped; for ``adam``/``adamw``
    torch's ``decoupled_weight_decay`` chooses the mode.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> config = config_from_torch("adamw", torch.optim.AdamW([w], lr=0.01, betas=(0.8, 0.9)))
    >>> config.max_lr, config.betas, config.mode.name
    (0.01, (0.8, 0.9), 'ADAMW')
    """
    entry, _ = _twin(name)
    return entry.make_config(**_config_kwargs(name, _first_group(source)))


def _config_kwargs(name: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """A torch param group's hyperparameters as optorch config fields."""
    entry, twin = _twin(name)
    config_fields = {f.name for f in fields(entry.rule.config_type)}
    back = {torch_name: ours for ours, torch_name in twin.renamed.items()}
    kwargs: dict[str, Any] = {}
    for key, value in group.items():
        if key in _TORCH_IMPLEMENTATION_KEYS:
            continue
        ours = "max_lr" if key == "lr" else back.get(key, key)
        if ours in config_fields:
            kwargs[ours] = value
    if entry.name in ("adam", "adamw") and "decoupled_weight_decay" in group:
        kwargs["mode"] = "ADAMW" if group["decoupled_weight_decay"] else "ORIGINAL"
    return kwargs


def torch_defaults(name: str) -> dict[str, Any]:
    """The defaults of registry ``name``'s torch.optim twin as optorch config fields
    (``{}`` without a twin in this torch): what ``TorchOptimizer(params, name)``
    starts from, so that it stands in for the torch class (``"sgd"``: ``momentum=0``;
    ``"adamw"``: ``weight_decay=0.01``), where the registry keeps the seed's defaults.

    >>> torch_defaults("sgd")["momentum"], torch_defaults("adamw")["weight_decay"]
    (0, 0.01)
    """
    twin = TORCH_TWINS.get(name)
    torch_class = getattr(torch.optim, twin.torch_class, None) if twin is not None else None
    if torch_class is None:
        return {}
    group = {
        key: parameter.default
        for key, parameter in inspect.signature(torch_class.__init__).parameters.items()
        if key not in ("self", "params") and parameter.default is not inspect.Parameter.empty
    }
    return _config_kwargs(name, group)


def _first_group(source: Any) -> Mapping[str, Any]:
    if isinstance(source, torch.optim.Optimizer):
        return source.param_groups[0]
    if isinstance(source, Mapping) and "param_groups" in source:
        groups = source["param_groups"]
        if not groups:
            raise ValueError("the torch state_dict has no param_groups")
        return groups[0]
    if isinstance(source, Mapping):
        return source
    raise TypeError(
        f"expected a torch.optim optimizer, its state_dict() or a param group, got "
        f"{type(source).__name__}"
    )


def torch_hyperparameters(name: str, config: Any) -> dict[str, Any]:
    """The keyword arguments of the ``torch.optim`` twin for an optorch ``config``
    (``max_lr`` as ``lr``; ``ValueError`` for a config torch cannot express).

    >>> import optorch
    >>> hyper = torch_hyperparameters("sgd", optorch.get_optimizer("sgd", momentum=0.5).config)
    >>> hyper["lr"], hyper["momentum"], hyper["nesterov"]
    (0.1, 0.5, False)
    """
    entry, twin = _twin(name)
    torch_class = getattr(torch.optim, twin.torch_class)
    accepted = [p for p in inspect.signature(torch_class.__init__).parameters if p != "self"]
    kwargs: dict[str, Any] = {}
    for key in accepted:
        if key in _TORCH_IMPLEMENTATION_KEYS:
            continue
        ours = "max_lr" if key == "lr" else twin.renamed.get(key, key)
        if hasattr(config, ours) and not key.startswith("_"):
            value = getattr(config, ours)
            if isinstance(value, torch.Tensor):
                value = value.item()
            kwargs[key] = value
    mode = getattr(config, "mode", None)
    if entry.name in ("adam", "adamw") and mode is not None:
        if mode.name == "DECOUPLED":
            raise ValueError("torch.optim has no fully decoupled Adam (mode DECOUPLED)")
        if "decoupled_weight_decay" in accepted and twin.torch_class == "Adam":
            kwargs["decoupled_weight_decay"] = mode.name == "ADAMW"
        elif (mode.name == "ADAMW") != (twin.torch_class == "AdamW"):
            raise ValueError(
                f"mode {mode.name} does not match torch.optim.{twin.torch_class}; use the "
                f"registry name {'adamw' if mode.name == 'ADAMW' else 'adam'!r}"
            )
    if entry.name == "adafactor" and getattr(config, "beta1", None) is not None:
        raise ValueError("torch.optim.Adafactor has no beta1 (momentum of the update)")
    if entry.name == "muon" and getattr(config, "ns_dtype", torch.bfloat16) is not torch.bfloat16:
        raise ValueError("torch.optim.Muon orthogonalises in bfloat16 only (ns_dtype)")
    return kwargs


# --------------------------------------------------------------------------------------
# params in torch's order
# --------------------------------------------------------------------------------------


def _iteration_paths(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if node is None or isinstance(node, torch.Tensor):
        yield path
    elif isinstance(node, Mapping):
        for key, value in node.items():
            yield from _iteration_paths(value, (*path, key))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            yield from _iteration_paths(value, (*path, index))
    else:
        raise TypeError(
            f"params at {format_path(path)}: expected tensors in dicts, lists and tuples, "
            f"got {type(node).__name__}"
        )


def _as_tree(params: Any) -> PyTree:
    if isinstance(params, torch.nn.Module):
        # as ``init(module)`` makes state: for the trainable params only
        return {n: p for n, p in params.named_parameters() if p.requires_grad}
    if isinstance(params, (Iterator,)) or (
        not isinstance(params, (Mapping, list, tuple, torch.Tensor)) and hasattr(params, "__iter__")
    ):
        return list(params)
    return params


class _Layout:
    """The params flattened (optree order) and their torch ids."""

    def __init__(self, params: Any) -> None:
        tree = _as_tree(params)
        self.paths, self.leaves, self.spec = flatten(tree)
        index_of = {path: i for i, path in enumerate(self.paths)}
        # torch order: iteration order of the containers, tensors only
        self.order = [
            index_of[path]
            for path in _iteration_paths(tree)
            if isinstance(self.leaves[index_of[path]], torch.Tensor)
        ]
        self.text = [format_path(p) for p in self.paths]
        #: a module's frozen params, which a torch optimizer may hold (they never get a
        #: gradient, so no state) and optorch's state leaves out
        self.frozen: list[torch.Tensor] = []
        #: for a module, the leaf index (None: frozen) of each of ``module.parameters()``
        self.module_order: list[int | None] | None = None
        if isinstance(params, torch.nn.Module):
            position = {id(leaf): i for i, leaf in enumerate(self.leaves)}
            self.frozen = [p for p in params.parameters() if not p.requires_grad]
            self.module_order = [position.get(id(p)) for p in params.parameters()]

    def torch_ids(self, count: int) -> list[int | None]:
        """Leaf index for each of ``count`` torch ids, matched by position (``None``: a
        frozen param of a module, when the torch optimizer holds every module param)."""
        if count == len(self.order):
            return list(self.order)
        if self.module_order is not None and count == len(self.module_order):
            return list(self.module_order)
        frozen = f" ({len(self.module_order or ())} with the frozen ones)" if self.frozen else ""
        raise ValueError(
            f"the torch state_dict has {count} params but params has {len(self.order)} "
            f"trainable tensors{frozen}"
        )

    def by_identity(self, optimizer: torch.optim.Optimizer) -> list[int | None]:
        """Leaf index for each torch id, matching the optimizer's params by identity."""
        position = {id(leaf): i for i, leaf in enumerate(self.leaves) if leaf is not None}
        frozen = {id(p) for p in self.frozen}
        out: list[int | None] = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                index = position.get(id(param))
                if index is None and id(param) in frozen:
                    out.append(None)
                    continue
                if index is None:
                    raise ValueError(
                        f"the torch optimizer has a param of shape {tuple(param.shape)} that "
                        "is not in params"
                    )
                out.append(index)
        managed = set(out)
        missing = [self.text[i] for i in self.order if i not in managed]
        if missing:
            raise ValueError(f"params {missing} are not managed by the torch optimizer")
        return out


def _state_dict_of(source: Any) -> Mapping[str, Any]:
    if isinstance(source, torch.optim.Optimizer):
        return source.state_dict()
    if isinstance(source, Mapping) and "state" in source and "param_groups" in source:
        return source
    raise TypeError(
        "expected a torch.optim optimizer or its state_dict() (a dict with 'state' and "
        f"'param_groups'), got {type(source).__name__}"
    )


def torch_scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps per-param scalars in (``step``, NAdam's
    ``mu_product``): float64 when the default dtype is float64, float32 otherwise."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# torch -> optorch
# --------------------------------------------------------------------------------------


def from_torch_state(
    source: Any,
    params: Any,
    name: str,
    *,
    config: Any = None,
    step: int | None = None,
) -> dict[str, Any]:
    """The optorch state of registry ``name`` equal to a torch optimizer's state.

    ``source`` is a ``torch.optim`` optimizer (its params are matched to ``params`` by
    identity) or its ``state_dict()`` (matched by position, see the module docstring).
    ``config`` decides which fields the state has (e.g. ``amsgrad``); by default it is
    :func:`config_from_torch` of the first param group. ``step`` sets the count for
    torch optimizers that keep none (SGD, Muon), see the module docstring. The new
    tensors are on the params' devices, in their dtypes; ``source`` is not modified.

    Raises ``ValueError`` naming the param for: a shape that does not fit, a step that
    is not a count, or a ``step`` that contradicts torch's.
    """
    entry, twin = _twin(name)
    rule = entry.rule
    layout = _Layout(params)
    state_dict = _state_dict_of(source)
    if isinstance(source, torch.optim.Optimizer):
        id_to_leaf = layout.by_identity(source)
    else:
        id_to_leaf = layout.torch_ids(sum(len(g["params"]) for g in state_dict["param_groups"]))
    if config is None:
        config = _one_config(name, state_dict)
    per_param: dict[int, Mapping[str, Any]] = {}
    for key, value in state_dict["state"].items():
        torch_id = int(key)
        if not 0 <= torch_id < len(id_to_leaf):
            raise ValueError(f"the torch state has an entry for param id {torch_id}, unknown")
        leaf = id_to_leaf[torch_id]
        if leaf is None:
            if value:
                raise ValueError(
                    f"the torch state has an entry for param id {torch_id}, a frozen param "
                    "(requires_grad=False) of the module, which optorch keeps no state for"
                )
            continue
        per_param[leaf] = value
    _check_fields_kept(entry.name, twin, rule, config, layout, per_param)

    taken, own = _common_step(twin, layout, per_param, step, config)
    names = rule.fields(config)
    first = next((x for x in layout.leaves if isinstance(x, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    state: dict[str, Any] = {"step": torch.tensor(taken, dtype=torch.int64, device=device)}
    if rule.per_leaf_step and rule.tracks_own_count(config):
        # a param's own count: torch's, or 0 where torch never stepped it
        lags = [
            taken - own.get(index, 0) if isinstance(param, torch.Tensor) else None
            for index, param in enumerate(layout.leaves)
        ]
        if any(lags):
            state[SKIPPED] = unflatten(
                layout.spec,
                [
                    None if lag is None else torch.tensor(lag, dtype=torch.int64, device=device)
                    for lag in lags
                ],
            )
    for field_name in names:
        torch_key = twin.fields.get(field_name)
        leaves: list[Any] = []
        for index, param in enumerate(layout.leaves):
            if not isinstance(param, torch.Tensor):
                leaves.append(None)
                continue
            entry_state = per_param.get(index, {})
            value = entry_state.get(torch_key) if torch_key is not None else None
            expected = tuple(rule.state_shape(field_name, param, config))
            if value is None:
                with torch.no_grad():
                    value = rule.init_field(field_name, param.detach(), config)
            elif not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"torch state {torch_key!r} of param {layout.text[index]} is "
                    f"{type(value).__name__}, not a tensor"
                )
            elif tuple(value.shape) != expected:
                raise ValueError(
                    f"torch state {torch_key!r} of param {layout.text[index]} has shape "
                    f"{tuple(value.shape)}; {entry.name} needs {expected}"
                )
            else:
                value = value.detach().to(device=param.device, dtype=param.dtype, copy=True)
            leaves.append(value)
        state[field_name] = unflatten(layout.spec, leaves)
    for global_name in rule.global_fields(config):
        # a rule-wide value torch keeps per param (NAdam's mu_product): a param at the
        # largest count has the optimizer's; with none, it is resumed from the count
        kept = [
            per_param[index][global_name]
            for index in sorted(per_param)
            if own.get(index, 0) == taken and per_param[index].get(global_name) is not None
        ]
        value = kept[0] if kept else rule.resume_global(config, global_name, taken)
        state[global_name] = torch.as_tensor(value, dtype=torch.float64).to(device).clone()
    return state


def _one_config(name: str, state_dict: Mapping[str, Any]) -> Any:
    """The config of the torch param groups; ``ValueError`` when they differ in an
    option that decides which state exists (``amsgrad``, ``centered``, ...), which one
    optorch state cannot hold."""
    groups = state_dict["param_groups"]
    configs = [config_from_torch(name, group) for group in groups] or [
        config_from_torch(name, state_dict)
    ]
    rule = _twin(name)[0].rule
    first = rule.fields(configs[0])
    for index, config in enumerate(configs[1:], start=1):
        if rule.fields(config) != first:
            raise ValueError(
                f"torch param groups 0 and {index} keep different state ({list(first)} vs "
                f"{list(rule.fields(config))}: an option such as amsgrad or centered differs); "
                "one optorch state holds one kind: convert each group's params separately, "
                "with config="
            )
    return configs[0]


def _check_fields_kept(
    name: str,
    twin: TorchTwin,
    rule: Any,
    config: Any,
    layout: _Layout,
    per_param: Mapping[int, Mapping[str, Any]],
) -> None:
    """``ValueError`` for torch state the config keeps no field for (it would be lost)."""
    kept = {
        twin.fields[field_name] for field_name in rule.fields(config) if field_name in twin.fields
    }
    known = set(twin.fields.values())
    for index, entry_state in per_param.items():
        for key, value in entry_state.items():
            if key in known and key not in kept and value is not None:
                raise ValueError(
                    f"torch state {key!r} of param {layout.text[index]} has no place in the "
                    f"{name} state of this config (fields {list(rule.fields(config))}); is an "
                    "option such as amsgrad or centered off in the config?"
                )


def _common_step(
    twin: TorchTwin,
    layout: _Layout,
    per_param: Mapping[int, Mapping[str, Any]],
    step: int | None,
    config: Any,
) -> tuple[int, dict[int, int]]:
    """The optimizer's count and each param's own count (by leaf index)."""
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not twin.has_step:
        # a param with a buffer has taken every step; one without (SGD: it never had a
        # gradient with momentum on) has taken none, as torch starts its buffer next
        buffered = [
            index
            for index, s in per_param.items()
            if any(isinstance(value, torch.Tensor) for value in s.values())
        ]
        if step is None:
            if getattr(config, "schedule", None) is not None:
                raise ValueError(
                    f"torch.optim.{twin.torch_class} keeps no step count and the config has "
                    "a schedule: pass step= (the number of steps taken)"
                )
            step = 1 if buffered else 0
        return step, dict.fromkeys(buffered, step)
    own: dict[int, int] = {}
    for index, entry_state in per_param.items():
        value = entry_state.get("step")
        if value is None:
            continue
        number = float(value)
        if number != int(number) or number < 0:
            raise ValueError(f"torch step {number} of param {layout.text[index]} is not a count")
        own[index] = int(number)
    found = max(own.values(), default=0)
    if step is not None and step < found:
        raise ValueError(
            f"step={step} is fewer steps than a param of the torch state has taken ({found})"
        )
    # torch keeps no optimizer count: every param may have sat out the last steps, so the
    # largest param count may be short of the steps taken (which a schedule reads); a
    # step= given counts them, each param lagging it by what it sat out
    return (step if step is not None else found), own


# --------------------------------------------------------------------------------------
# optorch -> torch
# --------------------------------------------------------------------------------------


def _skipped_leaves(state: Mapping[str, Any], layout: _Layout, taken: int) -> list[int]:
    """Per leaf, the steps it sat out (0 where the state records none)."""
    tree = state.get(SKIPPED)
    if tree is None:
        return [0] * len(layout.leaves)
    paths, leaves, _ = flatten(tree)
    at = dict(zip(paths, leaves, strict=True))
    unknown = [format_path(path) for path in paths if path not in set(layout.paths)]
    if unknown:
        raise ValueError(f"state {SKIPPED!r} has leaves {unknown} that params do not have")
    out = []
    for path, text in zip(layout.paths, layout.text, strict=True):
        leaf = at.get(path)
        lag = 0 if leaf is None else int(leaf)
        if not 0 <= lag <= taken:
            raise ValueError(
                f"state {SKIPPED!r} at {text} is {lag}, outside [0, {taken}] (the step count)"
            )
        out.append(lag)
    return out


def _uses(name: str, field_name: str, param: torch.Tensor) -> bool:
    """Whether torch keeps ``field_name`` for ``param`` (Adafactor: factored or not)."""
    if name != "adafactor":
        return True
    if field_name == "variance":
        return param.dim() < 2
    return param.dim() >= 2


def to_torch_state(
    state: Mapping[str, Any],
    params: Any,
    name: str,
    *,
    config: Any = None,
    param_groups: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A ``state_dict`` for the ``torch.optim`` twin of registry ``name`` holding the
    optorch ``state`` (tensors are copied; ``state`` is not modified).

    ``param_groups``: the twin's groups to put in the dict (e.g.
    ``twin.state_dict()["param_groups"]``, so that ``load_state_dict`` keeps its
    hyperparameters); by default one group with all params and the hyperparameters of
    ``config`` (default: the registry's config for ``name``), as
    :func:`torch_hyperparameters` maps them.
    """
    entry, twin = _twin(name)
    rule = entry.rule
    if config is None:
        config = entry.make_config()
    if not isinstance(state, Mapping) or "step" not in state:
        raise ValueError(f"expected an optorch {entry.name} state (a dict with 'step')")
    layout = _Layout(params)
    taken = int(state["step"])
    names = [n for n in rule.fields(config) if n in state]
    foreign = [
        k
        for k in state
        if k not in ("step", SKIPPED)
        and k not in twin.fields
        and k not in rule.global_fields(config)
    ]
    if foreign:
        raise ValueError(
            f"state fields {foreign} have no torch.optim.{twin.torch_class} equivalent "
            f"(expected {sorted(twin.fields)})"
        )
    trees: dict[str, list[Any]] = {}
    for field_name in names:
        paths, leaves, _ = flatten(state[field_name])
        if paths != layout.paths:
            raise ValueError(
                f"state {field_name!r} does not have the structure of params "
                f"({[format_path(p) for p in paths][:5]} vs {layout.text[:5]})"
            )
        trees[field_name] = leaves
    lags = _skipped_leaves(state, layout, taken)
    scalar_dtype = torch_scalar_dtype()
    out_state: dict[int, dict[str, Any]] = {}
    for torch_id, index in enumerate(layout.order):
        param = layout.leaves[index]
        per: dict[str, Any] = {}
        own = taken - lags[index]
        if twin.has_step:
            per["step"] = torch.tensor(float(own), dtype=scalar_dtype)
        if entry.name == "sgd" and own == 0:
            continue  # torch starts the buffer at the param's first gradient
        for field_name in names:
            value = trees[field_name][index]
            if value is None or not _uses(entry.name, field_name, param):
                continue
            if tuple(value.shape) != tuple(rule.state_shape(field_name, param, config)):
                raise ValueError(
                    f"state {field_name!r} at {layout.text[index]} has shape "
                    f"{tuple(value.shape)}, not what {entry.name} keeps for this param"
                )
            per[twin.fields[field_name]] = value.detach().clone()
        for global_name in twin.per_param_globals:
            # the optimizer's value where the param is at its count; else (it sat out
            # steps) the value at its own count, as when resuming without one
            value = state.get(global_name) if own == taken else None
            if value is None:
                value = rule.resume_global(config, global_name, own)
            per[global_name] = torch.as_tensor(value).detach().to(dtype=scalar_dtype, copy=True)
        if per:
            out_state[torch_id] = per
    if param_groups is None:
        hyper = torch_hyperparameters(entry.name, config)
        groups = [{**_torch_group(twin, hyper), "params": list(range(len(layout.order)))}]
    else:
        groups = [dict(g) for g in param_groups]
        count = sum(len(g.get("params", ())) for g in groups)
        if count != len(layout.order):
            raise ValueError(
                f"param_groups hold {count} params but params has {len(layout.order)} tensors"
            )
    return {"state": out_state, "param_groups": groups}


def _torch_group(twin: TorchTwin, hyper: Mapping[str, Any]) -> dict[str, Any]:
    """The param group the twin builds for ``hyper`` (every key its own ``state_dict()``
    has, implementation flags included), without ``params``."""
    torch_class = getattr(torch.optim, twin.torch_class)
    probe = torch.zeros(1, 1, requires_grad=True)  # 2-D: Muon takes matrices only
    group = dict(torch_class([probe], **hyper).param_groups[0])
    group.pop("params")
    return group
