"""CUDA-graph replay of in-place steps (opt-in; not yet measured on a GPU).

On a GPU, an optimizer step over a model's hundred-odd tensors is bound by host time:
dynamo's guards, the compiled wrappers, one kernel launch per tensor and the per-step
values cost milliseconds while the kernels run for a fraction of one (measured on an
H200: compiled AdamW 5.0 ms a step, 0.57 ms of it on the device; see
``docs/benchmarks.md``). A CUDA graph records a step's kernels once and replays them
with one launch.

With graphs on (``OPTORCH_CUDA_GRAPHS=1`` in the environment, ``graphs.ENABLED = True``
or ``with graphs.enabled():``), an in-place step on CUDA params (any ``impl``;
``"compiled"`` has the fewest kernels to replay) is run the normal way the first time it
is seen (which also warms the kernels up), recorded as a graph, and from then on
replayed:

* params and state are the tensors the graph was recorded on: the same tensors in
  place, step after step, as in any training loop. A param or state tensor replaced
  (a loaded checkpoint, ``.data`` swapped, a new state dict) records a new graph;
* grads may be new tensors each step (``zero_grad(set_to_none=True)``,
  ``torch.func.grad``): the first time they move, the step is recorded once more, on
  grads of the graph's own (one grad's worth of memory), into which each step's grads
  are then copied (one foreach copy). Grads given as the same tensors every step are
  read where they are. The caller's grads are never written;
* ``skip_if``, ``hyper_overrides`` given as tensors on the params' device, and the
  config's ``max_lr`` and ``lr_schedule_value`` (:data:`PER_STEP_FIELDS`, which a
  training loop may set each step) are copied into the graph's own 0-d tensors each
  step; another override given as a Python number is a constant of the kernels, and
  such a step is not graphed;
* every per-step value is computed inside the graph from the step count, which lives
  on the device; a ``schedule`` must be one of :mod:`optorch.schedule`'s (a function of
  the step alone) for a step to be graphed: a callable of the user's may return
  something else each step, which a replay would not see;
* the config is compared field by field each step; a changed field records anew;
* the inputs are checked every step as without graphs (``Optimizer.check`` errors,
  nothing changed);
* memory: the temporaries of the recorded step stay reserved for its replays (the
  compiled kernels make next to none; the foreach engine on a GPU, which runs a group
  in one call, up to two param-sized buffers).

A step that cannot be recorded (something in it waits for the device, say) runs the
normal way from then on, with one warning naming the reason; so do the steps of
params that keep recording (more than :data:`MAX_RECORDINGS` graphs in a row without
a replay), and of a rule whose graphs keep being dropped with their params before a
replay (new params every step). One graph is kept per set of params, the latest (up
to :data:`MAX_GRAPHS`); it is dropped when one of the params or state tensors it was
recorded on is freed; :func:`clear` drops every graph (and the grads it holds).

Whether replay reaches the speed above has not been measured yet (the sessions that
wrote this had no GPU). CPU tests (tests/test_graphs.py) run it against two stand-ins
for a CUDA graph: one replays the recorded step on the recorded tensors, the other
only the ATen ops recorded, with the numbers they were given then.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import functools
import itertools
import operator
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

__all__ = ["ENABLED", "MAX_RECORDINGS", "clear", "enabled", "stats"]

#: Whether in-place steps on CUDA are replayed as CUDA graphs.
ENABLED = os.environ.get("OPTORCH_CUDA_GRAPHS", "") == "1"
#: Graphs recorded in a row for one (rule, config) without a replay before its steps
#: stop being graphed.
MAX_RECORDINGS = 4
#: Graphs kept, one per set of params (least recently used dropped first); each holds
#: its pool, and its grads when it owns them (a graph goes with its params, so what is
#: kept is bounded by the live param sets too).
MAX_GRAPHS = 1024


@contextlib.contextmanager
def enabled(flag: bool = True) -> Iterator[None]:
    """Turn graph replay on (or off) inside the block."""
    global ENABLED
    before = ENABLED
    ENABLED = flag
    try:
        yield
    finally:
        ENABLED = before


class _NotGraphable(Exception):
    """A config value whose changes a graph could not see."""


_PLAIN = (int, float, bool, str, type(None), enum.Enum, torch.dtype, torch.device)


def _pure_schedule(value: Any, device: torch.device) -> bool:
    """Whether ``value`` is one of optorch.schedule's schedules (a function of the step)."""
    if not isinstance(value, functools.partial) or value.args:
        return False
    if getattr(value.func, "__module__", None) != "optorch.schedule":
        return False
    return all(_signature_of(v, device) is not None for v in value.keywords.values())


def _signature_of(value: Any, device: torch.device) -> Any:
    """A hashable stand-in for a config value, equal exactly when a graph recorded with
    one would compute the same as with the other; None when there is none (a tensor on
    another device than the params': a CPU scalar is read when the kernel is recorded)."""
    if isinstance(value, _PLAIN):
        return (type(value), value)
    if isinstance(value, tuple):
        parts = tuple(_signature_of(v, device) for v in value)
        return None if any(p is None for p in parts) else ("tuple", parts)
    if isinstance(value, torch.Tensor):
        # read by the graph from its memory: the same tensor, still at that memory
        if type(value) is not torch.Tensor or value.requires_grad or value.device != device:
            return None
        return ("tensor", id(value), value.data_ptr(), value.dtype, value.shape, value.stride())
    if isinstance(value, functools.partial) and _pure_schedule(value, device):
        # by value: an id could be a freed schedule's, reused by another
        keywords = tuple(sorted((k, _signature_of(v, device)) for k, v in value.keywords.items()))
        return ("schedule", value.func, keywords)
    return None


def _config_signature(
    config: Any, skip: Mapping[str, Any], device: torch.device
) -> tuple[Any, ...]:
    """Every config field's :func:`_signature_of`, but those in ``skip`` (per-step
    values, copied into the graph each step)."""
    parts = []
    for field in dataclasses.fields(config):
        if field.name in skip:
            continue
        part = _signature_of(getattr(config, field.name), device)
        if part is None:
            raise _NotGraphable(field.name)
        parts.append((field.name, part))
    return (type(config), tuple(parts))


#: Config fields a training loop may change every step (the seed's loops set
#: ``lr_schedule_value`` on the config before each step): given as numbers, they are
#: copied into the graph each step like tensor overrides, not recorded as constants.
PER_STEP_FIELDS = ("max_lr", "lr_schedule_value")


def _step_inputs(
    config: Any, overrides: Mapping[str, Any] | None, device: torch.device
) -> dict[str, Any] | None:
    """The values a replay takes from each step: the config's :data:`PER_STEP_FIELDS`
    that hold numbers, and ``hyper_overrides``. None when a step cannot be graphed: an
    override that is a Python number (other than those fields; a constant of the
    kernels), or a tensor that is not a plain one on the params' device (a CPU scalar
    would be read when the kernel is recorded, and never again)."""
    inputs: dict[str, Any] = {}
    for name in PER_STEP_FIELDS:
        value: Any = getattr(config, name, None)
        if _is_number(value):
            inputs[name] = float(value)
    for name, value in (overrides or {}).items():
        if _is_number(value) and name in PER_STEP_FIELDS:
            inputs[name] = float(value)
        elif type(value) is torch.Tensor and value.device == device and not value.requires_grad:
            inputs[name] = value
        else:
            return None
    return inputs


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> Any:
    """What a per-step value's tensor in the graph must be: a float64 for a number."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.shape)
    return "number"


@dataclasses.dataclass
class _Graph:
    """One recorded step and the tensors it reads and writes."""

    key: Any  # what the step was recorded for (see try_step)
    replay: Callable[[], None]
    layout: Any  # memory, shapes and strides of its params, state, step count, globals
    # weak references to the params, state, step count and global fields: a graph is
    # dropped with the first of them (it would write memory that is no longer theirs),
    # and never keeps a model's tensors alive (the grads, inputs and gate are its own)
    watchers: list[Any]
    # the grads it reads: the caller's first ones, or (``owns_grads``) its own, into
    # which each step's grads are copied (the caller's are never written)
    grads: list[torch.Tensor]
    owns_grads: bool
    grad_pointers: list[int]
    grad_strides: list[tuple[int, ...]]
    inputs: dict[str, torch.Tensor]  # per-step values (see _step_inputs)
    gate: torch.Tensor | None


#: (rule, active leaves, params) -> its graph: one per set of params, the latest
#: recorded (least recently used dropped past MAX_GRAPHS)
_GRAPHS: collections.OrderedDict[Any, _Graph] = collections.OrderedDict()
#: per (rule, active leaves, params): graphs recorded since its last replay, whatever
#: the config or state tensors (one that changes every step records a graph per step)
_RECORDINGS: dict[Any, int] = {}
#: per rule: sets of params freed with a recording never replayed, since the rule's
#: last replay (new params every step)
_UNREPLAYED: dict[int, int] = {}
#: Graphs of one rule dropped unreplayed in a row before the rule's steps stop being
#: graphed
_RULE_RECORDINGS = 4 * MAX_RECORDINGS
#: (rule, config signature)s whose recording failed, (rule, active leaves, params) that
#: kept recording, and rules whose params kept changing: no longer graphed
_OFF: set[Any] = set()
#: (rule, active leaves, params) whose grads were new tensors at some step: recorded on
#: grads of their own
_MOVING_GRADS: set[Any] = set()
#: (rule, active leaves, params) -> weak references to its params, which forget it (in
#: the sets above) when one of them is freed
_WATCHED: dict[Any, list[Any]] = {}
_STATS = {"recorded": 0, "replayed": 0, "grad_copies": 0, "failed": 0}


def clear() -> None:
    """Drop every recorded graph (and the grads it holds), and forget which steps were
    not to be graphed."""
    _GRAPHS.clear()
    _RECORDINGS.clear()
    _UNREPLAYED.clear()
    _OFF.clear()
    _MOVING_GRADS.clear()
    _WATCHED.clear()


def stats() -> dict[str, int]:
    """Counts since import: graphs ``recorded``, steps ``replayed``, grads copied into
    recorded ones (``grad_copies``), recordings that ``failed``."""
    return dict(_STATS)


class _CudaRecorder:
    """Records with ``torch.cuda.CUDAGraph``: the step runs first on a side stream (the
    warm-up CUDA graphs need), then is recorded there."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, Any] = {}

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def record(
        self, device: torch.device, run: Callable[[], None], body: Callable[[], None]
    ) -> Callable[[], None]:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                run()
        finally:
            current.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(device)
        # begun and ended here rather than through torch.cuda.graph, whose exit skips
        # restoring the current stream when ending a failed capture raises.
        # "thread_local": a call that waits for the device in this step fails the
        # recording, while other threads (a DataLoader's pin-memory thread) go on
        # undisturbed ("global", the default, would fail their calls instead)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                body()
            except BaseException:
                with contextlib.suppress(Exception):  # an invalidated capture fails to end
                    graph.capture_end()
                raise
            graph.capture_end()
        return graph.replay

    def capturing(self, device: torch.device) -> bool:
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_RECORDER: Any = _CudaRecorder()


_DATA_PTR = operator.methodcaller("data_ptr")
_SHAPE = operator.attrgetter("shape")
_STRIDE = operator.methodcaller("stride")
_PLAIN_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))


def _plain_on(tensors: list[Any], device: torch.device) -> bool:
    return all(type(t) in _PLAIN_TYPES and t.device == device for t in tensors)


def try_step(
    rule: Any,
    base_config: Any,
    overrides: Mapping[str, Any] | None,
    prepared: Any,
    state: Any,
    gate: torch.Tensor | None,
    advance: Callable[[Any, Any, torch.Tensor | None], Any],
) -> bool:
    """Run an in-place step as a graph replay (recording it first when new).

    ``advance(config, prepared, gate)`` runs the step the normal way. False when this
    step cannot be graphed: the caller then runs it itself.
    """
    from optorch.base import STEP, _overridden

    step = prepared.step
    device = step.device
    if not _RECORDER.supports(device) or _RECORDER.capturing(device):
        return False
    if torch.compiler.is_compiling() or not isinstance(state, dict) or state.get(STEP) is not step:
        return False
    if not prepared.active:
        return False
    inputs = _step_inputs(base_config, overrides, device)
    if inputs is None:
        return False
    if gate is not None and gate.device != device:
        return False
    globals_ = [state.get(name) for name in rule.global_fields(base_config)]
    if not all(isinstance(g, torch.Tensor) and g.device == device for g in globals_):
        return False
    active = prepared.active
    params = [prepared.params[i] for i in active]
    grads = [prepared.grads[i] for i in active]
    if not _PLAIN_TYPES.issuperset(map(type, grads)):
        return False
    columns = [[column[i] for i in active] for column in prepared.fields.values()]
    try:
        family = (id(rule), _config_signature(base_config, inputs, device))
    except _NotGraphable:
        return False
    kept = [*params, *itertools.chain.from_iterable(columns), step, *globals_]
    # the same params (all of them: which have a grad is part of the key), whatever
    # the config and state tensors
    lineage = (id(rule), tuple(map(id, prepared.params)))
    key = (
        family,
        tuple(sorted((k, _kind(v)) for k, v in inputs.items())),
        None if gate is None else (gate.dtype, gate.shape),
        tuple(active),
        tuple(map(id, kept)),
    )
    if family in _OFF or lineage in _OFF or id(rule) in _OFF:
        return False
    layout = (tuple(map(_DATA_PTR, kept)), tuple(map(_SHAPE, kept)), tuple(map(_STRIDE, kept)))
    graph = _GRAPHS.get(lineage)
    own = lineage in _MOVING_GRADS
    if graph is not None and graph.key == key and graph.layout == layout:
        with torch.no_grad():
            loaded = _load(graph, grads, inputs, gate)
        if loaded:
            _GRAPHS.move_to_end(lineage)
            graph.replay()
            _RECORDINGS[lineage] = _UNREPLAYED[id(rule)] = 0
            _STATS["replayed"] += 1
            return True
        # new grad tensors, and the graph reads the caller's first ones, which it must
        # not overwrite: recorded anew on grads of its own, copied into from now on
        # (and so are later recordings for these params)
        own = True
        _MOVING_GRADS.add(lineage)

    # new: run the step, then record it, on tensors of the graph's own for the values
    # that change from step to step. (A replay needs no type or device check: prepare()
    # holds grads to their params' device and dtype, and the tensors it reads are the
    # ones checked here, with the same memory and layout.)
    if not _plain_on([*kept, *grads], device):
        return False
    if _UNREPLAYED.get(id(rule), 0) >= _RULE_RECORDINGS:
        _turn_off(id(rule), rule, _UNREPLAYED[id(rule)], "new params every step?")
        return False
    _GRAPHS.pop(lineage, None)  # one graph per set of params: the latest
    _watch(lineage, [p for p in prepared.params if isinstance(p, torch.Tensor)])
    # the graph's tensors: no autograd history, and plain ones even when this step runs
    # under torch.inference_mode (later steps write them outside it)
    with torch.no_grad(), torch.inference_mode(False):
        static_inputs = {
            k: v.detach().clone()
            if isinstance(v, torch.Tensor)
            else torch.tensor(v, dtype=torch.float64, device=device)
            for k, v in inputs.items()
        }
        static_gate = None if gate is None else gate.detach().clone()
        static_grads = [g.detach().clone() if own else g.detach() for g in grads]
    config = _overridden(base_config, static_inputs) if static_inputs else base_config
    if own:
        leaves = list(prepared.grads)
        for i, grad in zip(active, static_grads, strict=True):
            leaves[i] = grad
        prepared = dataclasses.replace(prepared, grads=leaves)
    done: list[bool] = []

    def run() -> None:
        # the step itself, with the values the replays will take (the same kernels
        # warmed up as the recording launches)
        advance(config, prepared, static_gate)
        done.append(True)

    try:
        replay = _RECORDER.record(device, run, lambda: advance(config, prepared, static_gate))
    except Exception as error:
        if not done:
            raise  # the step itself failed: the caller sees its error
        # recorded badly (something in the step waits for the device, ...): the step is
        # done; this config runs without graphs from now on
        _STATS["failed"] += 1
        _OFF.add(family)
        for other in list(_GRAPHS):  # never replayed again: their memory goes too
            found = _GRAPHS.get(other)
            if found is not None and found.key[0] == family:
                _GRAPHS.pop(other, None)
        warnings.warn(
            f"optorch.graphs: {rule.name}'s step could not be recorded as a CUDA graph "
            f"({type(error).__name__}: {error}); its steps run without graphs from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        return True
    _STATS["recorded"] += 1
    entry = _GRAPHS[lineage] = _Graph(
        key=key,
        replay=replay,
        layout=layout,
        watchers=[],
        grads=static_grads,
        owns_grads=own,
        # where the graph reads its grads: a grad given anywhere else is copied there
        grad_pointers=list(map(_DATA_PTR, static_grads)),
        grad_strides=list(map(_STRIDE, static_grads)),
        inputs=static_inputs,
        gate=static_gate,
    )
    held = weakref.ref(entry)  # not the entry itself: no cycle keeps a dropped graph

    def forget(_: Any) -> None:  # may run inside garbage collection: no iteration here
        graph = held()
        if graph is not None and _GRAPHS.get(lineage) is graph:
            _GRAPHS.pop(lineage, None)

    entry.watchers = [weakref.ref(t, forget) for t in kept]
    while len(_GRAPHS) > MAX_GRAPHS:
        _GRAPHS.popitem(last=False)
    recorded = _RECORDINGS[lineage] = _RECORDINGS.get(lineage, 0) + 1
    if recorded > MAX_RECORDINGS:
        # these params keep recording: new state tensors, or a config field other than
        # the per-step ones, every step
        _turn_off(
            lineage,
            rule,
            recorded,
            "new state tensors, or a config field other "
            f"than {' or '.join(PER_STEP_FIELDS)} changed, every step?",
        )
    return True


def _turn_off(what: Any, rule: Any, recorded: int, why: str) -> None:
    """Stop graphing ``what`` (a set of params, or a rule), with one warning."""
    _OFF.add(what)
    for lineage in list(_GRAPHS):
        if what in (lineage, lineage[0]):
            _GRAPHS.pop(lineage, None)
    warnings.warn(
        f"optorch.graphs: {rule.name}'s step was recorded {recorded} times in a row "
        f"without a replay ({why}); its steps run without graphs from now on",
        RuntimeWarning,
        stacklevel=5,
    )


def _watch(lineage: Any, params: list[torch.Tensor]) -> None:
    """Forget ``lineage`` (whether it is graphed, how often it recorded) once one of
    its params is freed: a new param could be given its id."""
    if lineage in _WATCHED:
        return

    def forget(_: Any) -> None:  # may run inside garbage collection: no iteration here
        if _WATCHED.pop(lineage, None) is None:
            return  # another of its params went first
        if _RECORDINGS.pop(lineage, 0):  # its last recording was never replayed
            rule = lineage[0]
            _UNREPLAYED[rule] = _UNREPLAYED.get(rule, 0) + 1
        _MOVING_GRADS.discard(lineage)
        _OFF.discard(lineage)

    _WATCHED[lineage] = [weakref.ref(p, forget) for p in params]


def _load(
    graph: _Graph,
    grads: list[torch.Tensor],
    inputs: Mapping[str, Any],
    gate: torch.Tensor | None,
) -> bool:
    """Copy this step's grads, per-step values and gate into the graph's tensors. False
    (nothing copied) when grads moved and the graph reads the caller's own."""
    pointers, strides = list(map(_DATA_PTR, grads)), list(map(_STRIDE, grads))
    if pointers != graph.grad_pointers or strides != graph.grad_strides:
        if not graph.owns_grads:
            return False
        moved = [
            i
            for i, (pointer, stride) in enumerate(zip(pointers, strides, strict=True))
            if pointer != graph.grad_pointers[i] or stride != graph.grad_strides[i]
        ]
        torch._foreach_copy_([graph.grads[i] for i in moved], [grads[i] for i in moved])
        _STATS["grad_copies"] += len(moved)
    for name, tensor in graph.inputs.items():
        value = inputs[name]
        if isinstance(value, torch.Tensor):
            tensor.copy_(value)
        else:
            tensor.fill_(value)  # a kernel that holds the number: no copy, no wait
    if graph.gate is not None:
        graph.gate.copy_(gate)  # type: ignore[arg-type]
    return True
