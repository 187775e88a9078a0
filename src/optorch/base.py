"""Core types: configs, rules, state, and the step driver.

An optimizer is a value made of three things:

* a **config** (a dataclass of hyperparameters, never written to by a step),
* a **state** (a dict: ``"step"``, a 0-d int64 tensor counting the steps taken, and one
  params-shaped pytree per state field, e.g. ``"exp_avg"``),
* a **step** function ``step(params, grads, state, config) -> (params, state)``.

The update rule of each algorithm is a :class:`Rule`, written once as tensor code.
How the rule is executed over many tensors (a per-tensor loop, ``torch._foreach_*``
over lists, or a compiled single pass) is the engine's business
(:mod:`optorch.engine`), selected by ``config.impl``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import numbers
import operator
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import optree
import torch

from optorch.tree import PyTree, flatten, format_path, same_structure, unflatten

__all__ = [
    "IMPLS",
    "BaseConfig",
    "Optimizer",
    "Rule",
    "apply_step",
    "init_state",
]

IMPLS = ("auto", "reference", "foreach", "compiled")
Number = float | int | torch.Tensor


# --------------------------------------------------------------------------------------
# validation helpers: `not lo <= x` style so that NaN fails every check
# --------------------------------------------------------------------------------------


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def concrete(value: Any) -> float | None:
    """A plain float for checking, or None when the value is a traced/batched tensor."""
    if _is_tensor(value):
        if value.numel() != 1 or value.device.type != "cpu" or torch.compiler.is_compiling():
            # a device value would cost a host sync every step; a value traced by dynamo
            # would become a data-dependent guard (an error under fullgraph=True)
            return None
        try:
            return float(value.detach())
        except Exception:  # under vmap/compile the value is symbolic: nothing to check
            return None
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got a bool ({value!r})")
    if isinstance(value, (int, float)):
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__} ({value!r})")


def _as_checkable(owner: str, name: str, value: Any) -> Any:
    """``value`` as something :func:`check_range` takes: other real numbers
    (``numpy.float32``, ``fractions.Fraction``) as a float."""
    if _is_tensor(value) or isinstance(value, (int, float)):
        return value
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(
        f"{owner}.{name} must be a number or a 0-d tensor, got {type(value).__name__} ({value!r})"
    )


def check_range(
    owner: str,
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``owner.name`` unless ``value`` lies in the range.

    Infinite values are rejected unless the range explicitly allows them. A tensor must
    be 0-d (batched under ``vmap``, it is 0-d per member).
    """
    if _is_tensor(value) and value.dim() != 0:
        raise ValueError(
            f"Invalid {owner}.{name}: a tensor of shape {tuple(value.shape)} (must be a number "
            "or a 0-d tensor; use torch.func.vmap for one value per model)"
        )
    try:
        number = concrete(value)
    except TypeError as exc:
        raise TypeError(f"{owner}.{name}: {exc}") from None
    if number is None:
        return
    lo_ok = (low < number) if low_open else (low <= number)
    hi_ok = (number < high) if high_open else (number <= high)
    # comparisons, not math.isfinite: a float that dynamo has made symbolic (it does when
    # a recompile sees a new value, e.g. the next run of a learning-rate sweep) supports
    # them, and NaN fails both
    finite_ok = allow_inf or -math.inf < number < math.inf
    if not (lo_ok and hi_ok and finite_ok):
        raise ValueError(
            f"Invalid {owner}.{name}: {value!r} (must be "
            f"{_range_text(low, high, low_open, high_open, allow_inf)})"
        )


def _range_text(low: float, high: float, low_open: bool, high_open: bool, allow_inf: bool) -> str:
    """What :func:`check_range` asks of a value, in words: ``finite and >= 0.0``."""
    bounded_low, bounded_high = low > -math.inf, high < math.inf
    if bounded_low and bounded_high:
        where = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif bounded_low:
        where = f"{'>' if low_open else '>='} {low}"
    elif bounded_high:
        where = f"{'<' if high_open else '<='} {high}"
    else:
        return "a number, not NaN" if allow_inf else "finite"
    return f"{where}, not NaN" if allow_inf else f"finite and {where}"


def check_betas(owner: str, betas: Any, count: int = 2) -> None:
    """Each beta must lie in [0, 1)."""
    if not isinstance(betas, (tuple, list)) or len(betas) != count:
        raise ValueError(f"Invalid {owner}.betas: {betas!r} (must be a tuple of {count} numbers)")
    for index, beta in enumerate(betas):
        check_range(owner, f"betas[{index}]", beta, 0.0, 1.0, high_open=True)


def check_bool(owner: str, *names_and_values: tuple[str, Any]) -> None:
    """Each ``(name, value)`` must be a real bool (``TypeError`` naming it otherwise)."""
    for name, value in names_and_values:
        if not isinstance(value, bool):
            raise TypeError(f"{owner}.{name} must be a bool, got {value!r}")


def is_zero(value: Any) -> bool:
    """Whether a hyperparameter is a literal zero; a tensor is never known to be (it may
    change between steps, or be traced), so code paths for it stay in."""
    return not isinstance(value, torch.Tensor) and value == 0


def check_choice(owner: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {owner}.{name}: {value!r} (must be one of {choices})")


# --------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class BaseConfig:
    """Fields every optimizer config has (keyword-only, after the algorithm's own).

    Each algorithm's config also defines ``max_lr``, ``steps`` and ``lr_schedule_value``
    in the seed's positional order.

    * ``schedule``: an optional callable ``step -> multiplier``, evaluated at the number
      of steps taken before this one (0 on the first step). Exclusive with
      ``lr_schedule_value``.
    * ``inplace``: ``True`` updates the given params and state tensors in place and
      returns them; ``False`` leaves every input untouched and returns new tensors
      (differentiable, vmappable).
    * ``impl``: how the rule runs: ``"reference"``, ``"foreach"``, ``"compiled"`` or
      ``"auto"`` (foreach where the rule allows it; never compiles by itself).
    """

    schedule: Callable[[Any], Any] | None = None
    inplace: bool = True
    impl: str = "auto"

    if TYPE_CHECKING:  # declared by every concrete config, in the seed's order
        max_lr: Any = None
        steps: int = 0
        lr_schedule_value: Any = None

    def __post_init__(self) -> None:
        # YAML/Hydra give lists (or ListConfigs) where a config wants a tuple of betas
        betas = getattr(self, "betas", None)
        if isinstance(betas, Sequence) and not isinstance(betas, (str, tuple)):
            object.__setattr__(self, "betas", tuple(betas))
        self.validate()

    @property
    def _owner(self) -> str:
        return type(self).__name__

    def validate(self) -> None:
        """Check every hyperparameter; raise ``ValueError``/``TypeError`` naming it."""
        owner = self._owner
        check_range(owner, "max_lr", self.max_lr, 0.0)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"Invalid {owner}.steps: {self.steps!r} (must be an int >= 0)")
        if self.lr_schedule_value is not None:
            if callable(self.lr_schedule_value) and not _is_tensor(self.lr_schedule_value):
                raise TypeError(
                    f"{owner}.lr_schedule_value must be a number (the multiplier for this "
                    f"step), got the callable {self.lr_schedule_value!r}; pass a schedule "
                    "function as `schedule=` instead"
                )
            check_range(owner, "lr_schedule_value", self.lr_schedule_value, 0.0)
        if self.schedule is not None and not callable(self.schedule):
            raise TypeError(f"{owner}.schedule must be callable, got {self.schedule!r}")
        if self.schedule is not None and self.lr_schedule_value is not None:
            raise ValueError(
                f"{owner}: set either `schedule` or `lr_schedule_value`, not both "
                f"(schedule={self.schedule!r}, lr_schedule_value={self.lr_schedule_value!r})"
            )
        if not isinstance(self.inplace, bool):
            raise TypeError(f"{owner}.inplace must be a bool, got {self.inplace!r}")
        check_choice(owner, "impl", self.impl, IMPLS)

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def lr_multiplier(self, step: Any) -> Any:
        """The schedule multiplier for the step that follows ``step`` steps taken."""
        if self.schedule is not None:
            value = self.schedule(step)
            # checked like ``lr_schedule_value`` (a value on a device or traced is not
            # read: that would cost a host sync); an int step names where it went wrong
            where = f"schedule({step})" if isinstance(step, int) else "schedule(step)"
            check_range(self._owner, where, _as_checkable(self._owner, where, value), 0.0)
            return value
        if self.lr_schedule_value is not None:
            return self.lr_schedule_value
        return 1.0


# --------------------------------------------------------------------------------------
# rules
# --------------------------------------------------------------------------------------


class Hyper:
    """Attribute access to a rule's per-step values (floats, or 0-d tensors)."""

    static: Any
    leaf: Any = None
    #: True inside the compiled engine's own kernels (``impl="compiled"``), where a rule
    #: may take forms that pay off, or trace, only there (Adafactor's ``torch.cond``);
    #: False on every other path, a user's own ``torch.compile`` of a step included.
    kernel: bool = False

    # attribute by attribute, without ``__dict__`` or ``vars``: the dynamo of torch 2.11
    # cannot trace ``__dict__.update``, and the compiled engine builds a Hyper in its
    # kernels
    def __init__(self, values: Mapping[str, Any], static: Any, leaf: Any = None) -> None:
        self._names = tuple(values)
        for name, value in values.items():
            setattr(self, name, value)
        self.static = static
        if leaf is not None:
            self.leaf = leaf

    def values(self) -> dict[str, Any]:
        """The per-step values by name (what the rule's ``scalars`` gave)."""
        return {name: getattr(self, name) for name in self._names}

    def with_leaf(self, leaf: Any) -> Hyper:
        """A copy whose ``leaf`` is the rule's per-leaf key for the tensors at hand."""
        copy = self.replaced({})
        copy.leaf = leaf
        return copy

    def replaced(self, updates: Mapping[str, Any]) -> Hyper:
        """A copy with the per-step values in ``updates`` replaced."""
        copy = Hyper({**self.values(), **updates}, self.static, self.leaf)
        copy.kernel = self.kernel
        return copy

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Hyper({self.values()}, static={self.static!r}, leaf={self.leaf!r})"


def _module_rule(module: str, qualname: str) -> Rule:
    """The instance of rule class ``qualname`` that its module holds (``RULE``), else a
    new one: how a pickled rule comes back."""
    import importlib

    owner = importlib.import_module(module)
    cls: Any = owner
    for part in qualname.split("."):
        cls = getattr(cls, part)
    found = [value for value in vars(owner).values() if type(value) is cls]
    return found[0] if found else cls()


class Rule:
    """An update rule, written once as tensor code.

    Subclasses set ``name`` and ``config_type`` and implement:

    * :meth:`fields` - the names of the per-param state fields for a config;
    * :meth:`static` - the structural options (bools, enums), hashable; a change
      selects a different compiled kernel;
    * :meth:`scalars` - per-step values from the config, the step number ``t`` (1 on the
      first step), the scheduled learning rate and the schedule multiplier, as floats
      or 0-d tensors;
    * :meth:`update` - ``(param, grad, *state, h) -> (new_param, *new_state)``, written
      with tensor operators and methods only, so that the engine can run it on one
      tensor or on a :class:`~optorch.engine.TensorList` of many.

    ``elementwise`` rules touch each element independently (the engine may flatten and
    chunk them freely); ``per_tensor_reduction`` rules take norms of each whole tensor
    (flattening is still fine); other rules need the tensor's shape.
    """

    name: ClassVar[str] = ""
    config_type: ClassVar[type[BaseConfig]]
    elementwise: ClassVar[bool] = True
    flattenable: ClassVar[bool] = True
    foreach_ok: ClassVar[bool] = True
    #: Names among :meth:`scalars` whose value depends on the config alone (never on
    #: ``t``, ``lr`` or the multiplier). The compiled engine builds them into its kernel
    #: as constants when they are Python numbers (one kernel per config): a value read
    #: from memory is reloaded for every vector of the loop, a constant is not. So a
    #: sweep over, say, ``betas`` as Python floats compiles a kernel per value; given as
    #: tensors, they travel with the per-step values and share one kernel.
    config_scalars: ClassVar[tuple[str, ...]] = ()
    #: Inductor options the compiled engine adds for this rule's kernels (on every
    #: device); names this torch's inductor does not know are left out.
    inductor_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: Whether complex params are taken, as torch.optim takes them: each complex number
    #: two real coordinates (``torch.view_as_real``), for rules whose update is
    #: elementwise on those coordinates and whose norms are the complex ones.
    complex_ok: ClassVar[bool] = False
    #: Whether the per-step values depend on each param's own step count (bias
    #: corrections), which torch.optim keeps per param: a param that sits out a step (a
    #: ``None`` gradient) does not advance its count. The state then records how many
    #: steps each param sat out (``"skipped_steps"``, made on the first such step).
    per_leaf_step: ClassVar[bool] = False
    #: Whether a state field created after the first step (a config that now needs it:
    #: SGD's momentum turned on mid-run) starts its params' own counts again, as
    #: torch.optim starts a missing buffer at its next gradient (needs ``per_leaf_step``).
    new_fields_restart_count: ClassVar[bool] = False
    #: Global fields (:meth:`global_fields`) a state may lack, :meth:`resume_global`
    #: giving their value at the state's count (a state saved before the rule kept
    #: them); checkpoint loaders accept such states.
    resumable_globals: ClassVar[tuple[str, ...]] = ()
    #: The closed range of each global field's values (checked where it is read on the
    #: host): a value outside it is not a state this rule can have made.
    global_bounds: ClassVar[Mapping[str, tuple[float, float]]] = MappingProxyType({})
    #: Global fields advanced in the dtype a state holds them in, as torch.optim's twin
    #: does (NAdam's ``mu_product *= mu`` on a float32 tensor): where one is held
    #: narrower than float64 (``TorchOptimizer`` keeps torch's per-param layout), the
    #: step's values come from the rounded product, as torch's do. :meth:`advance` then
    #: gets the held tensor and returns the new one, which is read back as a number.
    stored_dtype_globals: ClassVar[tuple[str, ...]] = ()

    # a rule holds no data: copies (``copy.deepcopy`` or pickling of an optimizer, of a
    # TorchOptimizer) keep the module's own instance, which checkpoints look up by
    # identity and compiled kernels and CUDA graphs are keyed by
    def __copy__(self) -> Rule:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Rule:
        return self

    def __reduce__(self) -> Any:
        return (_module_rule, (type(self).__module__, type(self).__qualname__))

    def fields(self, config: Any) -> tuple[str, ...]:
        raise NotImplementedError

    def foreach_leaf(self, leaf: Hashable) -> bool:
        """Whether the params of leaf key ``leaf`` (see :meth:`leaf_key`) can run as one
        foreach program: their update uses only elementwise ops and per-tensor norms.
        Lets a rule that is not ``foreach_ok`` as a whole (Adafactor: row and column
        means of matrices) run its other leaves (vectors) as one program of a few
        kernels instead of a loop over tensors. Default: ``foreach_ok``."""
        return self.foreach_ok

    def init_field(self, name: str, param: torch.Tensor, config: Any) -> torch.Tensor:
        """Initial value of state field ``name`` for ``param`` (zeros by default)."""
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    def static(self, config: Any) -> Hashable:
        return ()

    def scalars(self, config: Any, t: Any, lr: Any, multiplier: Any) -> dict[str, Any]:
        raise NotImplementedError

    def update(self, param: Any, grad: Any, *state_and_h: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def state_shape(self, name: str, param: torch.Tensor, config: Any) -> torch.Size:
        """The shape state field ``name`` has for ``param`` (the param's, by default)."""
        return param.shape

    def tracks_own_count(self, config: Any) -> bool:
        """Whether, with ``config``, a param that sits out a step keeps a count of its own
        (``"skipped_steps"``); only where the update reads it. Default:
        :attr:`per_leaf_step`."""
        return self.per_leaf_step

    def global_fields(self, config: Any) -> dict[str, float]:
        """Non-params-shaped state: name -> initial value, kept as 0-d float64 tensors.

        For values shared by all leaves that evolve step to step (e.g. Schedule-Free's
        ``weight_sum``). Updated by :meth:`advance`.
        """
        return {}

    def advance(
        self, config: Any, t: Any, lr: Any, multiplier: Any, old: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Update the global fields: ``old -> (new, extra per-step values for h)``.

        Values are Python floats in eager CPU steps and 0-d tensors otherwise.
        """
        return {}, {}

    def resume_global(self, config: Any, name: str, taken: int | torch.Tensor) -> Any:
        """The value of global field ``name`` for a state that lacks it after ``taken``
        steps (a state saved before the rule kept the field). Default: its initial
        value, which is exact at step 0."""
        return self.global_fields(config)[name]

    def own_scalars(
        self, config: Any, values: dict[str, Any], extra: dict[str, Any], offset: Any
    ) -> dict[str, Any]:
        """The per-step values of params whose own count lags the optimizer's by
        ``offset`` steps (``0``, an int, or a 0-d tensor on the device path):
        ``values`` are :meth:`scalars` at their own count, ``extra`` what
        :meth:`advance` derived from the global fields for the optimizer's count.
        Default: ``values`` updated with ``extra``."""
        return {**values, **extra}

    def leaf_key(self, param: torch.Tensor, config: Any) -> Hashable:
        """A per-leaf class the rule branches on (e.g. "is 1-D"), seen as ``h.leaf``."""
        return None

    def validate_leaf(self, path: str, param: torch.Tensor, config: Any) -> None:
        """Extra per-leaf checks (e.g. complex support); raise naming ``path``."""
        if param.is_complex() and not self.complex_ok:
            raise TypeError(
                f"{self.name}: param {path} is complex ({param.dtype}), which {self.name} does "
                "not support (its rule is not elementwise on real and imaginary parts); view "
                "it as real with torch.view_as_real if that is what you mean"
            )


# --------------------------------------------------------------------------------------
# state
# --------------------------------------------------------------------------------------

STEP = "step"
#: Per param, how many of the optimizer's steps it sat out (a ``None`` gradient while it
#: had state), for rules with :attr:`Rule.per_leaf_step`: its own count is
#: ``step - skipped_steps``, as torch.optim's per-param ``step``.
SKIPPED = "skipped_steps"


def _trainable(param: Any) -> bool:
    return isinstance(param, torch.Tensor) and param.requires_grad


def params_of(model_or_params: Any) -> PyTree:
    """``dict(model.named_parameters())`` for a module, the tree itself otherwise."""
    if isinstance(model_or_params, torch.nn.Module):
        return dict(model_or_params.named_parameters())
    return model_or_params


def zeros_tree(params: PyTree, *, only_trainable: bool) -> PyTree:
    """Zeros shaped like every param; for a module, only params with requires_grad."""
    if isinstance(params, Mapping) and only_trainable:
        return {k: torch.zeros_like(v).detach() for k, v in params.items() if _trainable(v)}
    _, leaves_, spec = flatten(params)
    return unflatten(spec, [None if p is None else torch.zeros_like(p).detach() for p in leaves_])


def init_state(rule: Rule, model_or_params: Any, config: Any | None = None) -> dict[str, Any]:
    """Fresh optimizer state for ``model_or_params``.

    For an ``nn.Module`` (the seed's usage) state is created only for params with
    ``requires_grad=True``, keyed by name. Without ``config`` the default config decides
    which fields exist; fields a later config needs (e.g. amsgrad's running max) are then
    created on the first step.
    """
    is_module = isinstance(model_or_params, torch.nn.Module)
    params = params_of(model_or_params)
    cfg = config if config is not None else rule.config_type()
    leaves_ = flatten(params)[1]
    first = next((p for p in leaves_ if isinstance(p, torch.Tensor)), None)
    device = first.device if first is not None else torch.device("cpu")
    state: dict[str, Any] = {STEP: torch.zeros((), dtype=torch.int64, device=device)}
    for name in rule.fields(cfg):
        state[name] = _field_tree(rule, name, params, cfg, only_trainable=is_module)
    for name, value in rule.global_fields(cfg).items():
        state[name] = torch.tensor(value, dtype=torch.float64, device=device)
    return state


def _field_tree(rule: Rule, name: str, params: PyTree, cfg: Any, *, only_trainable: bool) -> Any:
    # a pure (differentiable) config keeps a state made from the params (Schedule-Free's
    # z_0 = x_0) connected to them, for gradients w.r.t. the initial params; in place,
    # the state is the optimizer's own leaf tensors
    differentiable = not getattr(cfg, "inplace", True)

    def make(p: Any) -> Any:
        if not isinstance(p, torch.Tensor):
            return None
        if differentiable:
            return rule.init_field(name, p, cfg)
        with torch.no_grad():
            return rule.init_field(name, p.detach(), cfg)

    if isinstance(params, Mapping) and only_trainable:
        return {k: make(v) for k, v in params.items() if _trainable(v)}
    _, leaves_, spec = flatten(params)
    return unflatten(spec, [make(p) for p in leaves_])


# --------------------------------------------------------------------------------------
# structure checks
# --------------------------------------------------------------------------------------


def _kind(node: Any) -> str:
    if isinstance(node, Mapping):
        return "dict"
    if isinstance(node, (list, tuple)):
        return type(node).__name__
    return type(node).__name__


def _first_structure_difference(a: PyTree, b: PyTree, path: tuple[Any, ...] = ()) -> str:
    """Describe where two trees first differ (for messages)."""
    a_leaf = isinstance(a, torch.Tensor) or a is None
    b_leaf = isinstance(b, torch.Tensor) or b is None
    if a_leaf and b_leaf:
        return ""
    if a_leaf or b_leaf:
        return f"at {format_path(path)}: {_kind(a)} vs {_kind(b)}"
    # a container of another type (an OrderedDict for a dict, a tuple for a list, a
    # namedtuple for a tuple) is another tree: named after the differences inside it
    kinds = f"at {format_path(path)}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in a:
            if key not in b:
                return f"key {format_path((*path, key))} is missing"
        for key in b:
            if key not in a:
                return f"unexpected key {format_path((*path, key))}"
        for key in a:
            diff = _first_structure_difference(a[key], b[key], (*path, key))
            if diff:
                return diff
        return kinds if type(a) is not type(b) else ""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"at {format_path(path)}: length {len(a)} vs {len(b)}"
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = _first_structure_difference(x, y, (*path, index))
            if diff:
                return diff
        return kinds if type(a) is not type(b) else ""
    if type(a) is not type(b):
        return kinds
    return f"at {format_path(path)}: containers differ"


def _align_field(name: str, tree: PyTree, spec: Any, params: PyTree) -> list[Any]:
    """Leaves of state field ``name`` in params order (None where a param has no state)."""
    leaves_, field_spec = _flat(tree)
    if same_structure(field_spec, spec):
        return leaves_
    paths, leaves_, _ = flatten(tree)
    index = {path: i for i, path in enumerate(spec.paths())}
    out: list[Any] = [None] * len(index)
    for path, leaf in zip(paths, leaves_, strict=True):
        position = index.get(path)
        if position is None:
            diff = _first_structure_difference(params, tree)
            raise ValueError(
                f"optimizer state {name!r} has a leaf at {format_path(path)} that params do "
                f"not have (params vs state: {diff})"
            )
        out[position] = leaf
    return out


def _check_tensor_pair(
    what: str, path: str, param: torch.Tensor, other: Any, *, same_dtype: bool = True
) -> None:
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{what} at {path} must be a tensor or None, got {type(other).__name__}")
    if other.shape != param.shape:
        raise ValueError(
            f"{what} at {path} has shape {tuple(other.shape)} but the param has shape "
            f"{tuple(param.shape)}"
        )
    if same_dtype and other.dtype != param.dtype:
        raise TypeError(
            f"{what} at {path} has dtype {other.dtype} but the param has dtype {param.dtype}"
        )
    if other.device != param.device:
        raise ValueError(
            f"{what} at {path} is on {other.device} but the param is on {param.device}"
        )
    _check_same_mesh(what, path, param, other)


def _is_dtensor(tensor: Any) -> bool:
    return type(tensor).__name__ == "DTensor"


def _check_same_mesh(what: str, path: str, param: torch.Tensor, other: torch.Tensor) -> None:
    """A ``DTensor`` param (FSDP2) needs ``DTensor`` grads and state on its mesh (any
    placements); a plain tensor next to it fails deep inside torch's dispatch."""
    if _is_dtensor(param) == _is_dtensor(other):
        if _is_dtensor(param) and other.device_mesh != param.device_mesh:  # type: ignore[attr-defined]
            raise ValueError(
                f"{what} at {path} is a DTensor on mesh {other.device_mesh} but the param's "  # type: ignore[attr-defined]
                f"mesh is {param.device_mesh}"  # type: ignore[attr-defined]
            )
        return
    if _is_dtensor(param):
        hint = (
            "create the state with init() after sharding the model"
            if what.startswith("state")
            else "take the grads of the sharded model"
        )
        raise ValueError(f"{what} at {path} is a plain tensor but the param is a DTensor; {hint}")
    raise ValueError(f"{what} at {path} is a DTensor but the param is a plain tensor")


def check_dense(what: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor of any layout but the dense (strided) one, naming ``what``: the
    steps' arithmetic and in-place writes are for dense tensors (a sparse COO, CSR, CSC
    or BSR gradient, as ``nn.Embedding(sparse=True)`` makes, would fail partway or do
    nothing)."""
    layout = tensor.layout
    if layout is torch.strided:
        return
    kind = "sparse" if tensor.is_sparse or "sparse" in str(layout) else "not dense"
    raise TypeError(
        f"{what} is {kind} (layout {layout}), which is not supported: optorch steps dense "
        "tensors (for a sparse gradient, .to_dense() it)"
    )


def _check_state_leaf(
    rule: Rule, config: Any, name: str, path: str, param: torch.Tensor, leaf: Any
) -> None:
    what = f"state {name!r}"
    if not isinstance(leaf, torch.Tensor):
        raise TypeError(f"{what} at {path} must be a tensor, got {type(leaf).__name__}")
    check_dense(f"{what} at {path}", leaf)
    expected = tuple(rule.state_shape(name, param, config))
    if tuple(leaf.shape) != expected:
        raise ValueError(
            f"{what} at {path} has shape {tuple(leaf.shape)} but {rule.name} expects "
            f"{expected} for a param of shape {tuple(param.shape)}"
        )
    if leaf.dtype != param.dtype:
        raise TypeError(
            f"{what} at {path} has dtype {leaf.dtype} but the param has dtype {param.dtype}"
        )
    if leaf.device != param.device:
        raise ValueError(f"{what} at {path} is on {leaf.device} but the param is on {param.device}")
    _refuse_conj_view(f"{what} at {path}", leaf, config)
    _check_same_mesh(what, path, param, leaf)


def _refuse_conj_view(what: str, tensor: torch.Tensor, config: Any) -> None:
    """A conjugate view (``z.conj()``) cannot be written through: refused in place (a
    pure step only reads it). Dynamo cannot trace ``is_conj``: a compiled step relies
    on the eager steps' check."""
    if (
        config.inplace
        and tensor.is_complex()
        and not torch.compiler.is_compiling()
        and tensor.is_conj()
    ):
        raise TypeError(
            f"{what} is a conjugate view (z.conj()), which an in-place step cannot write "
            "through; give it a tensor of its own (z.conj().resolve_conj()) or build the "
            "config with inplace=False"
        )


# --------------------------------------------------------------------------------------
# the step driver
# --------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A step's inputs, flattened, checked and aligned (nothing modified yet)."""

    spec: Any
    params: list[Any]
    grads: list[Any]
    fields: dict[str, list[Any]]
    active: list[int]
    step: torch.Tensor
    #: the ``"skipped_steps"`` leaves in params order (None: no such field, or a 0)
    skipped: list[Any] | None = None

    # computed only when needed (messages, re-assembling a differently shaped state);
    # not functools.cached_property, whose lock torch.compile cannot trace
    _raw_paths: list[Any] | None = None

    @property
    def raw_paths(self) -> list[Any]:
        """optree paths of the params' leaves."""
        if self._raw_paths is None:
            self._raw_paths = list(self.spec.paths())
        return self._raw_paths

    @property
    def paths(self) -> list[str]:
        """The leaves' paths as text, for messages."""
        return [format_path(path) for path in self.raw_paths]


_SHAPE = operator.attrgetter("shape")
_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")
_LAYOUT = operator.attrgetter("layout")
_GRAD_FN = operator.attrgetter("grad_fn")


class _CheckedInputs:
    """Params and state whose per-leaf checks passed, remembered by tensor identity.

    A training loop passes the same param and (in-place) state tensors every step; their
    checks (dtypes, shapes, the rule's own) are done once. An entry holds weak references
    to its tensors and is dropped the moment any of them is freed, so a new tensor that
    reuses a freed one's id can never match it.
    """

    def __init__(self, size: int = 64) -> None:
        self.size = size
        self.entries: collections.OrderedDict[Any, tuple[list[Any], Any]] = (
            collections.OrderedDict()
        )

    def get(self, key: Any) -> Any:
        """The layout checked for a remembered ``key`` (the params' shapes, dtypes and devices,
        the state's shapes), else None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.entries.move_to_end(key)
        return entry[1]

    def add(self, key: Any, tensors: list[torch.Tensor], layout: Any) -> None:
        def forget(_: Any) -> None:
            self.entries.pop(key, None)

        self.entries[key] = ([weakref.ref(t, forget) for t in tensors], layout)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


_CHECKED = _CheckedInputs()


def _flat(tree: PyTree) -> tuple[list[Any], Any]:
    if torch.compiler.is_compiling():  # None leaves as optorch.tree.flatten takes them
        _, leaves_, spec = flatten(tree)
        return leaves_, spec
    # tensors are not pytree nodes, so they are leaves without an is_leaf callback
    leaves_, spec = optree.tree_flatten(tree, none_is_leaf=True)
    return leaves_, spec


def _all_tensor_types(types: set[type]) -> bool:
    return all(issubclass(kind, torch.Tensor) for kind in types)


def _input_key(
    rule: Rule,
    config: Any,
    names: tuple[str, ...],
    param_leaves: list[Any],
    fields: dict[str, list[Any]],
    active: list[int],
) -> Any:
    columns = tuple(
        tuple(id(fields[name][i]) for i in active) if fields[name] else () for name in names
    )
    params_ = [param_leaves[i] for i in active]
    return (rule.name, names, rule.static(config), tuple(map(id, params_)), columns)


def _fast_active(
    rule: Rule,
    config: Any,
    names: tuple[str, ...],
    param_leaves: list[Any],
    grad_leaves: list[Any],
    fields: dict[str, list[Any]],
) -> list[int] | None:
    """The active leaves when every per-leaf check is known to pass, else None.

    Grads are new every step and are compared with the params each time (in C-level
    loops); params and state that passed before are not checked again (see
    :class:`_CheckedInputs`). Anything unusual goes to the full check, which names the
    offending leaf.
    """
    active = [i for i, grad in enumerate(grad_leaves) if grad is not None]
    params_ = [param_leaves[i] for i in active]
    grads_ = [grad_leaves[i] for i in active]
    # type checks over sets of types: C-level loops, no Python call per leaf
    if not _all_tensor_types(set(map(type, grads_))) or not _all_tensor_types(
        set(map(type, param_leaves)) - {type(None)}
    ):
        return None
    checked = _CHECKED.get(_input_key(rule, config, names, param_leaves, fields, active))
    if checked is None or any(layout is not torch.strided for layout in map(_LAYOUT, grads_)):
        return None
    # the params must still have the layout they were checked with: ``model.double()``
    # or ``.to(device)`` keeps each Parameter object and swaps its data, and the state
    # made for the old layout would no longer fit
    *param_layout, state_shapes = checked
    for attribute, known in zip((_SHAPE, _DTYPE, _DEVICE), param_layout, strict=True):
        if list(map(attribute, params_)) != known or list(map(attribute, grads_)) != known:
            return None
    # the same holds for the state (``.data`` swapped, say, for another dtype or shape)
    for name in names:
        if fields[name]:
            column = [fields[name][i] for i in active]
            if (
                list(map(_DTYPE, column)) != param_layout[1]
                or list(map(_DEVICE, column)) != param_layout[2]
                or list(map(_SHAPE, column)) != state_shapes.get(name)
            ):
                return None
    return active


def _remember_checked(
    rule: Rule,
    config: Any,
    names: tuple[str, ...],
    param_leaves: list[Any],
    fields: dict[str, list[Any]],
    active: list[int],
) -> None:
    params_ = [param_leaves[i] for i in active]
    state_ = [fields[name][i] for name in names if fields[name] for i in active]
    key = _input_key(rule, config, names, param_leaves, fields, active)
    layout = tuple(list(map(attribute, params_)) for attribute in (_SHAPE, _DTYPE, _DEVICE))
    state_shapes = {
        name: [_SHAPE(fields[name][i]) for i in active] for name in names if fields[name]
    }
    _CHECKED.add(key, [*params_, *state_], (*layout, state_shapes))


#: the dtypes a step count may have: wide enough never to wrap around
_STEP_DTYPES = (torch.int64, torch.int32)


def prepare(
    rule: Rule, config: Any, params: PyTree, grads: PyTree, state: Mapping[str, Any]
) -> Prepared:
    """Check and align the inputs of a step; raise before anything is modified."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{rule.name}: optimizer state must be a dict (from init), got {type(state).__name__}"
        )
    if not isinstance(config, rule.config_type):
        raise TypeError(
            f"{rule.name}: the config must be of type {rule.config_type.__name__}, got "
            f"{type(config).__name__}"
        )
    config.validate()
    param_leaves, spec = _flat(params)
    grad_leaves, grad_spec = _flat(grads)
    if not same_structure(grad_spec, spec):
        diff = _first_structure_difference(params, grads)
        raise ValueError(f"{rule.name}: grads do not match params ({diff})")
    names = rule.fields(config)
    known = {STEP, *names, *rule.global_fields(config)}
    if rule.per_leaf_step:
        known.add(SKIPPED)
    foreign = [key for key in state if key not in known and key not in rule_optional_fields(rule)]
    if foreign:
        raise ValueError(
            f"{rule.name}: optimizer state has unexpected field(s) {foreign} (expected "
            f"{sorted(known)}); is it the state of another optimizer?"
        )
    optional = rule_optional_fields(rule)
    present = [name for name in names if name in state]
    lacking = [name for name in names if name not in state and name not in optional]
    if present and lacking:
        raise ValueError(
            f"{rule.name}: optimizer state lacks field(s) {lacking} (has {sorted(state)}); "
            "is it the state of another optimizer?"
        )
    fields: dict[str, list[Any]] = {}
    for name in names:
        if name in state:
            fields[name] = _align_field(name, state[name], spec, params)
        else:
            fields[name] = []  # created below for the active leaves
    # under torch.compile the checks are traced once into guards: no cache needed there
    compiling = torch.compiler.is_compiling()
    active = (
        None if compiling else _fast_active(rule, config, names, param_leaves, grad_leaves, fields)
    )
    if active is None:
        active = _checked_active(rule, config, names, spec, param_leaves, grad_leaves, fields)
        if config.inplace and not compiling:  # the same tensors come back next step
            _remember_checked(rule, config, names, param_leaves, fields, active)
    step = state.get(STEP)
    if step is None:
        first = next((p for p in param_leaves if isinstance(p, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        step = torch.zeros((), dtype=torch.int64, device=device)
    elif not isinstance(step, torch.Tensor) or step.dim() != 0:
        if isinstance(step, int) and not isinstance(step, bool) and step >= 0:
            step = torch.tensor(step, dtype=torch.int64)
        else:
            raise ValueError(f"{rule.name}: state['step'] must be a 0-d tensor, got {step!r}")
    elif step.dtype not in _STEP_DTYPES:
        # narrower integers would wrap around (a uint8 count restarts bias correction)
        raise ValueError(
            f"{rule.name}: state['step'] must be an int64 (or int32) tensor (the number of "
            f"steps taken), got dtype {step.dtype} ({step!r})"
        )
    elif step.device.type != "cpu" and not any(
        isinstance(p, torch.Tensor) and p.device == step.device for p in param_leaves
    ):
        raise ValueError(
            f"{rule.name}: state['step'] is on {step.device}, a device none of the params "
            "is on (it belongs on the params' device, or on the CPU)"
        )
    skipped = None
    if rule.per_leaf_step and state.get(SKIPPED) is not None:
        skipped = _align_field(SKIPPED, state[SKIPPED], spec, params)
        _check_skipped(rule, spec, skipped, step)
    _check_globals(rule, config, state)
    return Prepared(spec, param_leaves, grad_leaves, fields, active, step, skipped)


def _check_globals(rule: Rule, config: Any, state: Mapping[str, Any]) -> None:
    """Each global field present: a 0-d floating tensor, finite where it can be read on
    the host (a missing one is resumed, see :meth:`Rule.resume_global`)."""
    for name in rule.global_fields(config):
        value = state.get(name)
        if value is None:
            if name in rule.resumable_globals:
                continue
            raise ValueError(
                f"{rule.name}: optimizer state lacks {name!r} (a 0-d float64 tensor; "
                f"init() makes it)"
            )
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise ValueError(
                f"{rule.name}: state[{name!r}] must be a 0-d float64 tensor, got {value!r}"
            )
        if not value.is_floating_point():
            raise ValueError(
                f"{rule.name}: state[{name!r}] must be a floating-point 0-d tensor (float64), "
                f"got dtype {value.dtype} ({value!r})"
            )
        if _plain_number(value):
            number = float(value)
            low, high = rule.global_bounds.get(name, (-math.inf, math.inf))
            if not (math.isfinite(number) and low <= number <= high):
                raise ValueError(
                    f"{rule.name}: state[{name!r}] is {number}, outside [{low}, {high}] (finite)"
                )


def _check_skipped(rule: Rule, spec: Any, skipped: list[Any], step: torch.Tensor) -> None:
    """Each ``"skipped_steps"`` leaf: None or a 0-d integer tensor in [0, step]."""
    host = _host_readable(step)
    for path, leaf in zip(spec.paths(), skipped, strict=True):
        if leaf is None:
            continue
        if not isinstance(leaf, torch.Tensor) or leaf.dim() != 0 or leaf.dtype not in _STEP_DTYPES:
            raise ValueError(
                f"{rule.name}: state[{SKIPPED!r}] at {format_path(path)} must be a 0-d int64 "
                f"tensor (the steps that param sat out), got {leaf!r}"
            )
        if host and _host_readable(leaf) and not 0 <= int(leaf) <= int(step):
            raise ValueError(
                f"{rule.name}: state[{SKIPPED!r}] at {format_path(path)} is {int(leaf)}, "
                f"outside [0, {int(step)}] (the optimizer's step count)"
            )


def _checked_active(
    rule: Rule,
    config: Any,
    names: tuple[str, ...],
    spec: Any,
    param_leaves: list[Any],
    grad_leaves: list[Any],
    fields: dict[str, list[Any]],
) -> list[int]:
    """Check every leaf, raising on the first problem with its path; the active leaves."""
    text_paths = [format_path(path) for path in spec.paths()]
    active: list[int] = []
    for i, (path, param, grad) in enumerate(
        zip(text_paths, param_leaves, grad_leaves, strict=True)
    ):
        if param is None:
            if grad is not None:
                raise ValueError(f"{rule.name}: grad at {path} is set but the param is None")
            continue
        if not isinstance(param, torch.Tensor):
            raise TypeError(
                f"{rule.name}: param at {path} must be a tensor, got {type(param).__name__}"
            )
        if grad is None:
            continue
        if not (param.is_floating_point() or param.is_complex()):
            raise TypeError(
                f"{rule.name}: param at {path} has dtype {param.dtype}; only floating point "
                "params can be optimized"
            )
        rule.validate_leaf(path, param, config)
        _refuse_conj_view(f"{rule.name}: param at {path}", param, config)
        check_dense(f"{rule.name}: param at {path}", param)
        if isinstance(grad, torch.Tensor):
            check_dense(f"{rule.name}: grad at {path}", grad)
        _check_tensor_pair("grad", path, param, grad)
        for name in names:
            leaves_ = fields[name]
            if not leaves_:
                continue
            leaf = leaves_[i]
            if leaf is None:
                raise ValueError(
                    f"{rule.name}: param at {path} has a gradient but no {name!r} state (was it "
                    "frozen when the state was created?)"
                )
            _check_state_leaf(rule, config, name, path, param, leaf)
        active.append(i)
    if config.inplace:
        _check_no_aliases(rule, text_paths, param_leaves, active)
    return active


def _check_no_aliases(
    rule: Rule, paths: list[str], param_leaves: list[Any], active: list[int]
) -> None:
    """In place, one tensor given twice (tied weights listed twice) would be updated
    twice; two params on the same memory are refused, naming both."""
    if torch.compiler.is_compiling():
        return  # dynamo cannot trace a data pointer; the eager steps have checked
    seen: dict[tuple[Any, ...], int] = {}
    for i in active:
        param = param_leaves[i]
        # plain tensors only: a wrapper subclass (FSDP2's DTensor) has no memory of its
        # own (its data_ptr is 0 for every param), nor has a torch.func-wrapped tensor
        if type(param) not in (torch.Tensor, torch.nn.Parameter) or param.numel() == 0:
            continue
        try:
            address = param.data_ptr()
        except RuntimeError:
            continue
        if param.device.type == "meta" or address == 0:
            continue
        key = (param.device, address, param.shape, param.stride(), param.dtype)
        first = seen.setdefault(key, i)
        if first != i:
            raise ValueError(
                f"{rule.name}: params at {paths[first]} and {paths[i]} are the same memory "
                "(a tied weight given twice?): an in-place step would update it twice; "
                "give each tensor once"
            )


def rule_optional_fields(rule: Rule) -> tuple[str, ...]:
    """Fields a rule may carry under some config (kept when the config drops them)."""
    return getattr(rule, "optional_fields", ())


def _host_step(step: torch.Tensor) -> bool:
    """Whether the step count can be read as a Python int without a device sync.

    A name of its own beside :func:`_host_readable`: the CPU stand-ins for a GPU (tests,
    ``benchmarks/host_overhead.py``) replace it to act as if the count lived on a
    device, which must not change how a gate given on the CPU is read."""
    return _host_readable(step)


def _host_readable(value: torch.Tensor) -> bool:
    """Whether a 0-d tensor can be read on the host without a device sync."""
    if value.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover - older torch
        return True
    return not is_functorch_wrapped_tensor(value)


def _plain_number(value: torch.Tensor) -> bool:
    """Whether a 0-d tensor may be read as a Python number, losing nothing: on the host,
    not batched or traced, and carrying no derivative (autograd's, or a forward-mode
    tangent)."""
    if value.requires_grad or not _host_readable(value):
        return False
    return torch.autograd.forward_ad.unpack_dual(value).tangent is None


def transform_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is running: O(1), no tensor scan."""
    try:
        from torch._C._functorch import peek_interpreter_stack
    except ImportError:  # pragma: no cover - older torch
        return True
    return peek_interpreter_stack() is not None


def _check_transform_mode(rule: Rule, config: Any, prepared: Prepared) -> None:
    if not config.inplace or torch.compiler.is_compiling():
        return
    params_ = [prepared.params[i] for i in prepared.active]
    if transform_active():
        from torch._C._functorch import is_functorch_wrapped_tensor

        for i in prepared.active:
            if is_functorch_wrapped_tensor(prepared.params[i]) or is_functorch_wrapped_tensor(
                prepared.grads[i]
            ):
                raise RuntimeError(
                    f"{rule.name}: an in-place step cannot run on tensors traced by a "
                    f"torch.func transform (param {prepared.paths[i]}); build the config with "
                    "inplace=False for grad/vmap/jacrev"
                )
    if any(map(_GRAD_FN, params_)):
        i = next(i for i in prepared.active if prepared.params[i].grad_fn is not None)
        raise RuntimeError(
            f"{rule.name}: an in-place step would overwrite param {prepared.paths[i]}, "
            "which is the output of an autograd graph (not a leaf): the update would not "
            "be differentiated; build the config with inplace=False to differentiate "
            "through the step, or pass leaf tensors"
        )


def apply_step(
    rule: Rule,
    config: Any,
    params: PyTree,
    grads: PyTree,
    state: Mapping[str, Any],
    *,
    hyper_overrides: Mapping[str, Any] | None = None,
    skip_if: Any = None,
) -> tuple[PyTree, dict[str, Any]]:
    """Run one step of ``rule``. See :class:`BaseConfig` for ``inplace`` and ``impl``.

    ``hyper_overrides``: config fields to use for this step instead of the config's
    (floats or 0-d tensors, e.g. an injected ``max_lr``); the config is not modified.
    With ``impl="compiled"``, a rule's config-only values (``betas``, ``eps``,
    ``weight_decay``, ...) given as Python floats are constants of the kernel, so a
    float that changes from step to step compiles a kernel per value: pass values that
    change as 0-d tensors (as ``inject_hyperparams`` does); ``max_lr`` may be either.
    ``skip_if``: a 0-d bool tensor; where true, params and state (the step count
    included) come back bit-identical, decided on the device without a host sync.
    """
    from optorch import graphs

    gate = _check_gate(rule, skip_if)
    base_config = config
    if hyper_overrides:
        config = _overridden(config, hyper_overrides)
    prepared = prepare(rule, config, params, grads, state)
    _check_transform_mode(rule, config, prepared)
    names = rule.fields(config)
    step = prepared.step
    _check_count(rule, config, step, schedule=False)

    new_state: dict[str, Any] = dict(state) if not config.inplace else state  # type: ignore[assignment]
    # into the state once the step has run: a step refused on the way (a schedule
    # returning NaN) leaves the caller's state as it was
    created = _missing_fields(rule, config, prepared, names)
    if gate is not None and _host_readable(gate) and bool(gate):
        # a skip decided on the host: every check above has run (the schedule's value
        # too, which a step reads when it advances), and nothing changes, in place or
        # pure (which returns its inputs: the same values, and the same state fields;
        # it added zero per-param counts where the state had none)
        _check_count(rule, config, step, schedule=True)
        return params, new_state

    restarted = bool(created) and rule.new_fields_restart_count
    if restarted:
        restarted = _restart_counts(rule, config, prepared, tuple(created))
    resting = _resting(rule, config, prepared, names)
    tracked = rule.per_leaf_step and (prepared.skipped is not None or bool(resting))

    def advance(config: Any, prepared: Prepared, gate: torch.Tensor | None) -> Any:
        return _advance(rule, config, prepared, state, new_state, gate)

    if (
        graphs.ENABLED
        and config.inplace
        and not tracked
        and graphs.try_step(rule, base_config, hyper_overrides, prepared, state, gate, advance)
    ):
        new_state.update(created)
        return params, new_state
    new_p, new_s = advance(config, prepared, gate)
    if tracked:
        skipped = _count_skipped(
            prepared, resting, names, state, gate, config.inplace, restarted=restarted
        )
        if config.inplace:
            created[SKIPPED] = skipped
        else:
            new_state[SKIPPED] = skipped
    if config.inplace:
        if not isinstance(new_state, dict):  # a read-only mapping was passed
            new_state = dict(new_state)
        new_state.update(created)
        return params, new_state

    param_leaves = list(prepared.params)
    for i, tensor in zip(prepared.active, new_p, strict=True):
        param_leaves[i] = tensor
    out_params = unflatten(prepared.spec, param_leaves)
    for name, tensors in zip(names, new_s, strict=True):
        leaves_ = list(prepared.fields[name])
        for i, tensor in zip(prepared.active, tensors, strict=True):
            leaves_[i] = tensor
        source = state.get(name)
        if source is not None:
            new_state[name] = _rebuild_like(source, prepared, leaves_)
        else:
            new_state[name] = unflatten(prepared.spec, leaves_)
    return out_params, new_state


def _missing_fields(
    rule: Rule, config: Any, prepared: Prepared, names: tuple[str, ...]
) -> dict[str, Any]:
    """Create the fields a config needs that the state lacks (seed-style dicts, amsgrad
    turned on): in ``prepared``, and returned as trees for the new state.

    A leaf gets the new field where it has state already (another field's leaf), or,
    when no field says which leaves carry state, where it is a tensor: also the leaves
    without a gradient this step, which would otherwise be refused later for having
    none (measured: SGD's momentum injected after init, a param unused on that step).
    """
    missing = [name for name in names if not prepared.fields[name]]
    if not missing:
        return {}
    existing = [prepared.fields[name] for name in names if prepared.fields[name]]
    active = set(prepared.active)
    carries = [
        i in active
        or (
            isinstance(p, torch.Tensor)
            and (not existing or any(column[i] is not None for column in existing))
        )
        for i, p in enumerate(prepared.params)
    ]
    created = {}
    with torch.no_grad():
        for name in missing:
            leaves_ = [
                rule.init_field(name, p.detach(), config) if carried else None
                for p, carried in zip(prepared.params, carries, strict=True)
            ]
            prepared.fields[name] = leaves_
            created[name] = unflatten(prepared.spec, leaves_)
    return created


def _restart_counts(rule: Rule, config: Any, prepared: Prepared, created: tuple[str, ...]) -> bool:
    """The params that just got fields (``created``) start their own counts: each sat
    out the steps before this one (a ``"skipped_steps"`` of ``step``). Nothing where the
    count is known to be 0 on the host, or the rule reads no own count."""
    step = prepared.step
    if not rule.tracks_own_count(config) or (_host_readable(step) and int(step) == 0):
        return False
    skipped = list(prepared.skipped or [None] * len(prepared.params))
    for i in range(len(prepared.params)):
        if any(prepared.fields[name][i] is not None for name in created):
            skipped[i] = step.detach().to(torch.int64, copy=True)
    prepared.skipped = skipped
    return True


def _advance(
    rule: Rule,
    config: Any,
    prepared: Prepared,
    state: Mapping[str, Any],
    new_state: dict[str, Any],
    gate: torch.Tensor | None,
) -> Any:
    """The step itself, on checked inputs: the per-step values, the engine, the global
    fields and the step count. In place, writes the tensors and (for fields the state
    did not hold as tensors) ``new_state``; returns the engine's (params, states)."""
    from optorch import engine

    names = rule.fields(config)
    step = prepared.step
    host = _host_step(step)
    taken: Any = int(step) if host else step
    multiplier = config.lr_multiplier(taken)
    lr = config.max_lr * multiplier
    t = taken + 1
    t_value = t if host else t.to(torch.float64)
    values = rule.scalars(config, t_value, lr, multiplier)
    global_init = rule.global_fields(config)
    old_globals: dict[str, torch.Tensor] = {}
    for name in global_init:
        current = state.get(name)
        if current is None:
            initial = rule.resume_global(config, name, taken)
            current = torch.as_tensor(initial, dtype=torch.float64, device=step.device)
        old_globals[name] = current
    new_globals: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if global_init:
        # read as numbers where that is free (no sync) and loses nothing: not when
        # autograd records them (a differentiable Schedule-Free run through its lr)
        readable = {k for k, v in old_globals.items() if host and _plain_number(v)}
        narrow = {
            k
            for k in readable.intersection(rule.stored_dtype_globals)
            if old_globals[k].dtype != torch.float64
        }
        seen = {
            k: (float(v) if k in readable and k not in narrow else v)
            for k, v in old_globals.items()
        }
        new_globals, extra = rule.advance(config, t_value, lr, multiplier, seen)
        if narrow:
            # read back as numbers only where the new value is itself plain (a beta that
            # autograd tracks or vmap batches makes it a tensor that must stay one)
            extra = {
                k: (
                    float(v)
                    if k in narrow and isinstance(v, torch.Tensor) and _plain_number(v)
                    else v
                )
                for k, v in extra.items()
            }
    h = Hyper(rule.own_scalars(config, values, extra, 0), rule.static(config))

    p_active = [prepared.params[i] for i in prepared.active]
    g_active = [prepared.grads[i] for i in prepared.active]
    s_active = [[prepared.fields[name][i] for i in prepared.active] for name in names]
    offsets = _offsets(prepared, host)
    if offsets is None:
        result = engine.run(rule, config, h, p_active, g_active, s_active, gate)
    else:
        # params whose own count lags the optimizer's: one run per count, each with the
        # per-step values of its t (every param at its own count on the device)
        new_params: list[Any] = [None] * len(p_active)
        new_fields: list[list[Any]] = [[None] * len(p_active) for _ in names]
        result = (new_params, new_fields)
        for offset, members in _by_offset(offsets).items():
            own_offset = offset if isinstance(offset, int) else offsets[members[0]]
            own_t = t - own_offset
            if isinstance(own_t, torch.Tensor):
                own_t = own_t.to(torch.float64)
            own_values = rule.scalars(config, own_t, lr, multiplier)
            new_p, new_s = engine.run(
                rule,
                config,
                Hyper(rule.own_scalars(config, own_values, extra, own_offset), rule.static(config)),
                [p_active[k] for k in members],
                [g_active[k] for k in members],
                [[column[k] for k in members] for column in s_active],
                gate,
            )
            for j, k in enumerate(members):
                new_params[k] = new_p[j]
                for column, new_column in zip(new_fields, new_s, strict=True):
                    column[k] = new_column[j]
    increment: Any = 1 if gate is None else (~gate).to(step.dtype)
    for name, old in old_globals.items():
        new = torch.as_tensor(new_globals[name], dtype=torch.float64, device=old.device)
        if gate is not None:
            new = torch.where(gate, old, new)
        # while compiling, the new value takes the old one's place in the dict: inductor
        # (torch 2.13) drops an in-place write to a 0-d float64 graph input, and these
        # fields are exactly that (measured: Schedule-Free's weight_sum stayed 0)
        if config.inplace and state.get(name) is old and not torch.compiler.is_compiling():
            with torch.no_grad():
                old.copy_(new)
        else:
            new_state[name] = new
    if config.inplace and STEP in state and state[STEP] is step:
        with torch.no_grad():
            step.add_(increment)
    else:
        new_state[STEP] = step + increment
    return result


def _offsets(prepared: Prepared, host: bool) -> list[Any] | None:
    """Per active param, the steps it sat out (an int where the count is read on the
    host, else a 0-d tensor); None when every one is 0."""
    if prepared.skipped is None:
        return None
    out: list[Any] = []
    for i in prepared.active:
        leaf = prepared.skipped[i]
        if leaf is None:
            out.append(0)
        elif host and _host_readable(leaf):
            out.append(int(leaf))
        else:
            out.append(leaf.to(prepared.step.device))
    if all(isinstance(value, int) and value == 0 for value in out):
        return None
    return out


def _by_offset(offsets: list[Any]) -> dict[Any, list[int]]:
    """Positions grouped by offset: one group per int value, one per tensor offset."""
    groups: dict[Any, list[int]] = {}
    for k, value in enumerate(offsets):
        groups.setdefault(value if isinstance(value, int) else ("tensor", k), []).append(k)
    return groups


def _has_state(prepared: Prepared, names: tuple[str, ...]) -> Callable[[int], bool]:
    """Whether param ``i`` holds state: a tensor with a leaf in some field (or a count)."""
    columns = [prepared.fields[name] for name in names if prepared.fields[name]]
    if prepared.skipped is not None:
        columns.append(prepared.skipped)
    return lambda i: (
        isinstance(prepared.params[i], torch.Tensor)
        and any(column[i] is not None for column in columns)
    )


def _resting(rule: Rule, config: Any, prepared: Prepared, names: tuple[str, ...]) -> list[int]:
    """Params that have state but no gradient this step (their own count stays)."""
    if not rule.per_leaf_step or len(prepared.active) == len(prepared.params):
        return []
    if prepared.skipped is None and not rule.tracks_own_count(config):
        return []  # the update reads no own count (SGD without dampening)
    active = set(prepared.active)
    has_state = _has_state(prepared, names)
    return [i for i in range(len(prepared.params)) if i not in active and has_state(i)]


def _count_skipped(
    prepared: Prepared,
    resting: list[int],
    names: tuple[str, ...],
    state: Mapping[str, Any],
    gate: torch.Tensor | None,
    inplace: bool,
    *,
    restarted: bool = False,
) -> PyTree:
    """The ``"skipped_steps"`` tree after this step: +1 for the resting params (none
    when the step is skipped by ``gate``); a 0 for every other param with state (a
    tensor, not None: ``torch.func.vmap`` returns tensors only), None for params
    without state. ``restarted``: some counts were restarted (:func:`_restart_counts`)."""
    source = state.get(SKIPPED)
    if (
        not resting
        and not restarted
        and source is not None
        and prepared.skipped is not None
        and all(prepared.skipped[i] is not None for i in prepared.active)
    ):
        return source  # every count as it was (the common step once the field exists)
    leaves_ = list(prepared.skipped or [None] * len(prepared.params))
    device = prepared.step.device
    increment: Any = 1 if gate is None else (~gate).to(dtype=torch.int64, device=device)
    active = set(prepared.active)
    has_state = _has_state(prepared, names)
    for i in range(len(prepared.params)):
        if leaves_[i] is None and (i in active or has_state(i)):
            leaves_[i] = torch.zeros((), dtype=torch.int64, device=device)
    with torch.no_grad():
        for i in resting:  # each has state, so a count (made above if it was new)
            old = leaves_[i]
            add = increment if isinstance(increment, int) else increment.to(old.device)
            if inplace:
                old.add_(add)
            else:
                leaves_[i] = old + add
    if source is not None:
        return _rebuild_like(source, prepared, leaves_)
    return unflatten(prepared.spec, leaves_)


def _check_count(rule: Rule, config: Any, step: torch.Tensor, *, schedule: bool) -> None:
    """A count read on the host must not be negative; with ``schedule``, the schedule's
    value at it is checked too (as the step checks it where it reads it)."""
    if not _host_step(step):
        return
    taken = int(step)
    if taken < 0:
        raise ValueError(f"{rule.name}: state['step'] must not be negative, got {step!r}")
    if schedule:
        config.lr_multiplier(taken)


def _check_gate(rule: Rule, skip_if: Any) -> torch.Tensor | None:
    if skip_if is None:
        return None
    if isinstance(skip_if, bool):
        return torch.tensor(skip_if)
    if not isinstance(skip_if, torch.Tensor) or skip_if.numel() != 1:
        raise TypeError(f"{rule.name}: skip_if must be a bool or a 0-d tensor, got {skip_if!r}")
    if skip_if.device.type == "meta":
        raise ValueError(f"{rule.name}: skip_if is on the meta device, which holds no value")
    return skip_if.reshape(()).to(torch.bool)


def _overridden(config: Any, overrides: Mapping[str, Any]) -> Any:
    """A shallow copy of ``config`` with ``overrides`` set (not re-validated for tensors)."""
    unknown = [k for k in overrides if not hasattr(config, k)]
    if unknown:
        raise ValueError(f"{type(config).__name__} has no field(s) {unknown} to override")
    view = copy.copy(config)
    for key, value in overrides.items():
        object.__setattr__(view, key, value)
    return view


def _rebuild_like(source: PyTree, prepared: Prepared, aligned: list[Any]) -> PyTree:
    """Put aligned (params-ordered) leaves back into the structure of ``source``."""
    paths, _, spec = flatten(source)
    if paths == prepared.raw_paths:
        return unflatten(spec, aligned)
    index = {path: i for i, path in enumerate(prepared.raw_paths)}
    return unflatten(spec, [aligned[index[path]] for path in paths])


# --------------------------------------------------------------------------------------
# the optimizer value
# --------------------------------------------------------------------------------------


class Optimizer:
    """An optimizer as a value: ``config`` plus ``init`` and ``step``.

    >>> import torch, optorch
    >>> opt = optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.0)
    >>> params = {"w": torch.ones(2)}
    >>> state = opt.init(params)
    >>> params, state = opt.step(params, {"w": torch.ones(2)}, state)
    >>> params["w"]
    tensor([0.9000, 0.9000])
    """

    def __init__(self, rule: Rule, config: Any) -> None:
        if not isinstance(config, rule.config_type):
            raise TypeError(
                f"{rule.name} needs a {rule.config_type.__name__}, got {type(config).__name__}"
            )
        self.rule = rule
        self.config = config

    @property
    def name(self) -> str:
        return self.rule.name

    def init(self, params: Any) -> dict[str, Any]:
        """State for ``params`` (a pytree of tensors or an ``nn.Module``)."""
        return init_state(self.rule, params, self.config)

    def step(
        self, params: PyTree, grads: PyTree, state: Mapping[str, Any], **kwargs: Any
    ) -> tuple[PyTree, dict[str, Any]]:
        """One step: ``(params, grads, state) -> (params, state)``."""
        return apply_step(self.rule, self.config, params, grads, state, **kwargs)

    def check(
        self,
        params: PyTree,
        grads: PyTree,
        state: Mapping[str, Any],
        *,
        hyper_overrides: Mapping[str, Any] | None = None,
        skip_if: Any = None,
    ) -> None:
        """Raise what :meth:`step` would raise for these inputs; change nothing (its
        checks do not depend on ``skip_if``, which is checked too)."""
        _check_gate(self.rule, skip_if)
        config = _overridden(self.config, hyper_overrides) if hyper_overrides else self.config
        prepared = prepare(self.rule, config, params, grads, state)
        _check_count(self.rule, config, prepared.step, schedule=True)

    def replace(self, **changes: Any) -> Optimizer:
        """The same optimizer with config fields changed."""
        return Optimizer(self.rule, self.config.replace(**changes))

    def __repr__(self) -> str:
        return f"Optimizer({self.rule.name!r}, {self.config!r})"
