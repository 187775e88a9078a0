"""optorch.graphs' bookkeeping, on the CPU, with an emulated graph.

A CUDA graph replays the kernels it recorded on the memory it recorded them on; nothing
of the Python code that ran during the recording runs again. The emulation below keeps
that contract for memory: a replay runs the recorded step on the recorded tensors (the
grads, overrides and gate of the recording, into which each new step's values must have
been copied). What it cannot emulate (a recording that fails on the device) is covered
by the failure tests here and by tests/test_cuda.py on a GPU.

The step count lives on the device on CUDA, so every per-step value is a tensor computed
from it; the fixture makes the CPU do the same (``base._host_step`` returns False), and
graphed steps are compared with ungraphed ones that also run that way (to float32
rounding: see ``REPLAY_VS_PLAIN``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import NON_DEFAULT_OPTIONS, assert_trees_close, assert_trees_equal, clone_tree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import optorch
from optorch import base, graphs
from optorch.schedule import step_decay

STEPS = 12
#: Recordings when every step gives new grad tensors: on the caller's first grads, then,
#: once they moved, on grads of the graph's own (the caller's are never written)
NEW_GRADS_RECORDINGS = 2


class EmulatedRecorder:
    """Records by keeping the step's closure; a replay runs it again."""

    def __init__(self) -> None:
        self.recordings = 0
        self.fail_with: Exception | None = None

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def capturing(self, device: torch.device) -> bool:
        return False

    def record(
        self, device: torch.device, run: Callable[[], None], body: Callable[[], None]
    ) -> Callable[[], None]:
        run()
        if self.fail_with is not None:
            raise self.fail_with
        self.recordings += 1
        return body


def _installed(monkeypatch: pytest.MonkeyPatch, recorder_: Any) -> Iterator[Any]:
    """``recorder_`` in place of CUDA's, and the step counter read as on a device."""
    monkeypatch.setattr(graphs, "_RECORDER", recorder_)
    monkeypatch.setattr(base, "_host_step", lambda step: False)
    graphs.clear()
    yield recorder_
    graphs.clear()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[EmulatedRecorder]:
    yield from _installed(monkeypatch, EmulatedRecorder())


def params_of(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(24, 16, generator=generator),
        "b": torch.randn(16, generator=generator),
        "s": torch.randn((), generator=generator),
    }


def grads_for(params: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(p.shape, generator=generator) for k, p in params.items()}


def test_cases_cover_the_registry() -> None:
    assert sorted(NON_DEFAULT_OPTIONS) == sorted(optorch.REGISTRY)


def run_pair(
    optimizer: optorch.Optimizer,
    steps: int = STEPS,
    *,
    params: dict[str, torch.Tensor] | None = None,
    between: Callable[[int, dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None,
    step_kwargs: Callable[[int], dict[str, Any]] = lambda k: {},
) -> tuple[Any, Any, Any, Any]:
    """``steps`` steps without graphs and the same steps with them (new grad tensors
    every step); returns (plain params, plain state, graphed params, graphed state)."""
    start = params if params is not None else params_of(0)
    plain_p, graphed_p = clone_tree(start), clone_tree(start)
    plain_s, graphed_s = optimizer.init(plain_p), optimizer.init(graphed_p)
    for k in range(steps):
        grads = grads_for(plain_p, 100 + k)
        optimizer.step(plain_p, grads, plain_s, **step_kwargs(k))
        with graphs.enabled():
            optimizer.step(graphed_p, clone_tree(grads), graphed_s, **step_kwargs(k))
        if between is not None:
            plain_s = between(k, plain_p, plain_s)
            graphed_s = between(k, graphed_p, graphed_s)
    return plain_p, plain_s, graphed_p, graphed_s


#: A replay takes ``max_lr`` as a float64 tensor where the plain step multiplies by a
#: Python float (an op of another form): the two may differ in the last bit of float32
#: per step. Stale values (a grad or an lr not copied in) differ by far more.
REPLAY_VS_PLAIN = {"rtol": 2e-6, "atol": 1e-6}


def assert_same_run(plain_p: Any, plain_s: Any, graphed_p: Any, graphed_s: Any) -> None:
    assert_trees_close(graphed_p, plain_p, **REPLAY_VS_PLAIN, what="params")
    assert_trees_close(graphed_s, plain_s, **REPLAY_VS_PLAIN, what="state")
    assert int(graphed_s["step"]) == int(plain_s["step"])


@pytest.mark.parametrize("name", sorted(NON_DEFAULT_OPTIONS))
def test_replayed_steps_equal_plain_steps(name: str, recorder: EmulatedRecorder) -> None:
    """Every optimizer, with an lr schedule: recorded, then replays that read each
    step's grads (new tensors every step, copied in) and compute each step's values."""
    params = params_of(1)
    if name == "muon":
        params = {"w": params["w"], "v": torch.randn(16, 24)}
    schedule = step_decay(step_size=4, gamma=0.5)
    options = NON_DEFAULT_OPTIONS[name]
    optimizer = optorch.get_optimizer(name, impl="compiled", schedule=schedule, **options)
    before = graphs.stats()
    run = run_pair(optimizer, params=params)
    assert_same_run(*run)
    after = graphs.stats()
    assert recorder.recordings == NEW_GRADS_RECORDINGS
    replays = STEPS - NEW_GRADS_RECORDINGS
    assert after["replayed"] - before["replayed"] == replays
    assert after["grad_copies"] - before["grad_copies"] == replays * len(params)
    assert int(run[3]["step"]) == STEPS


def test_compiled_kernels_replay_too(recorder: EmulatedRecorder) -> None:
    """A param large enough for the compiled kernel (the small ones run as foreach)."""
    params = {"big": torch.randn(256, 257), "b": torch.randn(7)}
    optimizer = optorch.get_optimizer("adamw", impl="compiled", weight_decay=0.1)
    assert_same_run(*run_pair(optimizer, 6, params=params))
    assert recorder.recordings == NEW_GRADS_RECORDINGS


def test_grads_updated_in_place_are_not_copied(recorder: EmulatedRecorder) -> None:
    optimizer = optorch.get_optimizer("adam", impl="compiled")
    params, reference = params_of(2), params_of(2)
    grads = grads_for(params, 0)
    state, reference_state = optimizer.init(params), optimizer.init(reference)
    before = graphs.stats()
    for k in range(6):
        new = grads_for(params, k)
        for name in grads:
            grads[name].copy_(new[name])
        with graphs.enabled():
            optimizer.step(params, grads, state)
        optimizer.step(reference, new, reference_state)
    assert graphs.stats()["grad_copies"] == before["grad_copies"]
    assert graphs.stats()["replayed"] - before["replayed"] == 5
    assert_same_run(reference, reference_state, params, state)


def test_skip_if_and_tensor_overrides_are_read_each_step(recorder: EmulatedRecorder) -> None:
    """A gate that alternates and an injected lr that changes every step: both copied
    into the graph's own tensors before each replay."""
    optimizer = optorch.get_optimizer("adamw", impl="compiled", weight_decay=0.1)

    def kwargs(k: int) -> dict[str, Any]:
        return {
            "skip_if": torch.tensor(k % 3 == 1),
            "hyper_overrides": {"max_lr": torch.tensor(1e-2 / (k + 1), dtype=torch.float64)},
        }

    run = run_pair(optimizer, step_kwargs=kwargs)
    assert_same_run(*run)
    assert int(run[3]["step"]) == STEPS - len([k for k in range(STEPS) if k % 3 == 1])
    assert recorder.recordings == NEW_GRADS_RECORDINGS


def test_per_step_config_numbers_are_copied_in(recorder: EmulatedRecorder) -> None:
    """The seed's loop sets ``lr_schedule_value`` on the config before every step, and
    a float ``max_lr`` override may change too: one recording, then replays."""
    optimizer = optorch.get_optimizer("adamw", impl="compiled", weight_decay=0.1)
    plain_p, graphed_p = params_of(7), params_of(7)
    plain_s, graphed_s = optimizer.init(plain_p), optimizer.init(graphed_p)
    before = graphs.stats()
    for k in range(STEPS):
        optimizer.config.lr_schedule_value = 1.0 - k / STEPS
        overrides = {"max_lr": 1e-2 / (1 + k)}
        grads = grads_for(plain_p, k)
        optimizer.step(plain_p, grads, plain_s, hyper_overrides=overrides)
        with graphs.enabled():
            optimizer.step(graphed_p, clone_tree(grads), graphed_s, hyper_overrides=overrides)
    assert recorder.recordings == NEW_GRADS_RECORDINGS
    assert graphs.stats()["replayed"] - before["replayed"] == STEPS - NEW_GRADS_RECORDINGS
    assert_same_run(plain_p, plain_s, graphed_p, graphed_s)


@pytest.mark.parametrize(
    ("what", "build", "kwargs"),
    [
        (
            "float override of a kernel constant",
            {"weight_decay": 0.1},
            lambda k: {"hyper_overrides": {"weight_decay": 1e-3 * (k + 1)}},
        ),
        ("user schedule", {"schedule": lambda step: 0.5}, lambda k: {}),
    ],
)
def test_steps_a_replay_could_not_follow_are_not_graphed(
    what: str, build: dict[str, Any], kwargs: Callable[[int], dict[str, Any]], recorder: Any
) -> None:
    optimizer = optorch.get_optimizer("adamw", impl="compiled", **build)
    assert_same_run(*run_pair(optimizer, 5, step_kwargs=kwargs))
    assert recorder.recordings == 0, what


@pytest.mark.parametrize("impl", ["reference", "foreach", "auto"])
def test_every_impl_replays(impl: str, recorder: EmulatedRecorder) -> None:
    optimizer = optorch.get_optimizer("nadam", impl=impl, decoupled_weight_decay=True)
    assert_same_run(*run_pair(optimizer, 6))
    assert recorder.recordings == NEW_GRADS_RECORDINGS


def test_pure_steps_are_not_graphed(recorder: EmulatedRecorder) -> None:
    optimizer = optorch.get_optimizer("adamw", impl="compiled", inplace=False)
    params = params_of(3)
    state = optimizer.init(params)
    with graphs.enabled():
        for k in range(3):
            params, state = optimizer.step(params, grads_for(params, k), state)
    assert recorder.recordings == 0


def test_new_state_tensors_record_anew(recorder: EmulatedRecorder) -> None:
    """A state replaced by a copy (a loaded checkpoint) is recorded again; the old
    graph, which writes the old tensors, is never replayed on it."""

    def reload(k: int, params: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(state) if k == 5 else state

    optimizer = optorch.get_optimizer("nadam", impl="compiled")
    assert_same_run(*run_pair(optimizer, between=reload))
    assert recorder.recordings == NEW_GRADS_RECORDINGS + 1


def test_param_memory_swapped_records_anew(recorder: EmulatedRecorder) -> None:
    def swap(k: int, params: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        if k == 4:
            params["w"].data = params["w"].data.clone()
        return state

    optimizer = optorch.get_optimizer("rmsprop", impl="compiled", momentum=0.9)
    assert_same_run(*run_pair(optimizer, between=swap))
    assert recorder.recordings == NEW_GRADS_RECORDINGS + 1


def test_config_changed_in_place_records_anew(recorder: EmulatedRecorder) -> None:
    optimizer = optorch.get_optimizer("sgd", impl="compiled", momentum=0.9)

    def retune(k: int, params: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        if k == 3:  # after each run's step 3: both step with it from step 4
            optimizer.config.momentum = 0.5
        return state

    assert_same_run(*run_pair(optimizer, 8, params=params_of(4), between=retune))
    assert recorder.recordings == NEW_GRADS_RECORDINGS + 1


def test_a_failed_recording_warns_once_and_steps_run_plainly(
    recorder: EmulatedRecorder,
) -> None:
    recorder.fail_with = RuntimeError("operation not permitted when stream is capturing")
    optimizer = optorch.get_optimizer("lion", impl="compiled")
    with pytest.warns(RuntimeWarning, match="could not be recorded.*operation not permitted"):
        run = run_pair(optimizer, 6)
    assert_same_run(*run)  # the step that was being recorded was taken once
    assert recorder.recordings == 0


def test_a_step_that_records_every_time_stops_being_graphed(
    recorder: EmulatedRecorder,
) -> None:
    """New state tensors every step: after MAX_RECORDINGS recordings in a row without
    a replay, one warning, and the steps run plainly."""

    def fresh(k: int, params: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(state)

    optimizer = optorch.get_optimizer("adagrad", impl="compiled")
    with pytest.warns(RuntimeWarning, match="recorded 5 times in a row"):
        run = run_pair(optimizer, 9, between=fresh)
    assert_same_run(*run)
    assert recorder.recordings == graphs.MAX_RECORDINGS + 1


def test_bad_input_is_refused_before_anything_changes(recorder: EmulatedRecorder) -> None:
    optimizer = optorch.get_optimizer("adamw", impl="compiled")
    params = params_of(5)
    state = optimizer.init(params)
    with graphs.enabled():
        for k in range(3):
            optimizer.step(params, grads_for(params, k), state)
        kept_p, kept_s = clone_tree(params), clone_tree(state)
        bad = grads_for(params, 9)
        bad["w"] = bad["w"][:3]
        with pytest.raises(ValueError, match="w"):
            optimizer.step(params, bad, state)
    assert_trees_equal(params, kept_p, what="params")
    assert_trees_equal(state, kept_s, what="state")


def test_graphs_are_off_unless_turned_on(recorder: EmulatedRecorder) -> None:
    assert graphs.ENABLED is False  # the default (OPTORCH_CUDA_GRAPHS unset in tests)
    optimizer = optorch.get_optimizer("adamw", impl="compiled")
    params = params_of(6)
    state = optimizer.init(params)
    for k in range(3):
        optimizer.step(params, grads_for(params, k), state)
    assert recorder.recordings == 0


class NoReplayRecorder(EmulatedRecorder):
    """Records like a CUDA graph does as far as memory goes: the replay holds no
    reference to the step's tensors."""

    def record(
        self, device: torch.device, run: Callable[[], None], body: Callable[[], None]
    ) -> Callable[[], None]:
        super().record(device, run, body)
        return lambda: None


def test_a_graph_is_dropped_with_its_params(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph never keeps a model alive, and is never replayed onto memory its params
    or state no longer own."""
    monkeypatch.setattr(graphs, "_RECORDER", NoReplayRecorder())
    graphs.clear()
    optimizer = optorch.get_optimizer("adamw", impl="compiled")
    params = params_of(8)
    state = optimizer.init(params)
    with graphs.enabled():
        optimizer.step(params, grads_for(params, 0), state)
    assert len(graphs._GRAPHS) == 1
    watched = weakref.ref(params["w"])
    del params, state
    gc.collect()
    assert watched() is None
    assert len(graphs._GRAPHS) == 0


def test_the_callers_grads_are_never_written(recorder: EmulatedRecorder) -> None:
    """New grads every step are copied into grads the graph owns, never into the
    caller's first ones (which the caller may still hold)."""
    optimizer = optorch.get_optimizer("adamw", impl="compiled")
    params = params_of(9)
    state = optimizer.init(params)
    given = []
    with graphs.enabled():
        for k in range(5):
            grads = grads_for(params, k)
            given.append((grads, clone_tree(grads)))
            optimizer.step(params, grads, state)
    for k, (grads, copy_) in enumerate(given):
        assert_trees_equal(grads, copy_, what=f"grads of step {k}")


def test_schedules_are_compared_by_value(recorder: EmulatedRecorder) -> None:
    """An equal schedule (another object) replays; another schedule records anew."""
    optimizer = optorch.get_optimizer("adam", impl="compiled", schedule=step_decay(step_size=3))

    def reschedule(k: int, params: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        # after each run's step k, so both runs take the new schedule from step k + 1
        if k == 4:
            optimizer.config.schedule = step_decay(step_size=3)
        if k == 7:
            optimizer.config.schedule = step_decay(step_size=1, gamma=0.5)
        return state

    assert_same_run(*run_pair(optimizer, between=reschedule))
    assert recorder.recordings == NEW_GRADS_RECORDINGS + 1


def test_a_config_value_changing_every_step_stops_being_graphed(
    recorder: EmulatedRecorder,
) -> None:
    """A config field other than max_lr and lr_schedule_value, a new tensor every step:
    each step is another graph; after MAX_RECORDINGS in a row, no more."""
    optimizer = optorch.get_optimizer("adamw", impl="compiled")

    def retune(k: int, params: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        optimizer.config.weight_decay = torch.tensor(0.01 * (k + 1), dtype=torch.float64)
        return state

    with pytest.warns(RuntimeWarning, match="recorded 5 times in a row"):
        run = run_pair(optimizer, 9, between=retune)
    assert_same_run(*run)
    assert recorder.recordings == graphs.MAX_RECORDINGS + 1


def test_new_params_every_step_stop_the_rule_being_graphed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step's graph is dropped with its params before a replay; after
    ``_RULE_RECORDINGS`` of them, the rule's steps are no longer recorded."""
    recorder = NoReplayRecorder()
    monkeypatch.setattr(graphs, "_RECORDER", recorder)
    graphs.clear()
    optimizer = optorch.get_optimizer("lion", impl="compiled")
    params = params_of(11)
    state = optimizer.init(params)
    limit = graphs._RULE_RECORDINGS
    with graphs.enabled(), pytest.warns(RuntimeWarning, match=f"recorded {limit} times"):
        for k in range(limit + 3):
            params, state = clone_tree(params), clone_tree(state)
            optimizer.step(params, grads_for(params, k), state)
    assert recorder.recordings == limit
    graphs.clear()


def test_scratch_tensors_are_never_replaced() -> None:
    """A graph recorded with the compiled engine's padding tensors reads and writes
    them at every replay: asking for more keeps the ones handed out."""
    from optorch import engine

    key = ("test-scratch", torch.float32)
    first = engine._scratch(key, 2, torch.float32, torch.device("cpu"))
    more = engine._scratch(key, 5, torch.float32, torch.device("cpu"))
    assert all(a is b for a, b in zip(first, more[:2], strict=False))
    assert len(more) == 5
    del engine._SCRATCH[key]


# a recorder that keeps a CUDA graph's contract for values too ---------------------------


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an ATen op writes (its mutable arguments)."""
    out = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        if argument.kwarg_only or i >= len(args):
            value = kwargs.get(argument.name)
        else:
            value = args[i]
        flat, _ = tree_flatten(value)
        out.extend(t for t in flat if isinstance(t, torch.Tensor))
    return out


class _OpRecorder(TorchDispatchMode):
    """Records every ATen op with its arguments as they were (Python numbers fixed,
    tensors by object, so by memory) and what it wrote before, so that the writes can
    be undone: a CUDA capture executes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[Any, tuple[Any, ...], dict[str, Any], Any, str]] = []
        self.before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        name = str(func)
        if "_local_scalar_dense" in name or name.startswith(("aten.is_nonzero", "aten.equal")):
            raise RuntimeError(f"emulated capture: {name} would wait for the device")
        written = _written(func, args, kwargs)
        for tensor in written:
            base = tensor._base if tensor._base is not None else tensor
            if base.numel():
                self.before.setdefault(id(base), (base, base.detach().clone()))
        out = func(*args, **kwargs)
        returns = func._schema.returns
        if written:
            kind = "write"
        elif returns and all(r.alias_info is not None for r in returns):
            kind = "view"
        else:
            kind = "fresh"
        self.ops.append((func, args, kwargs, out, kind))
        return out


class FaithfulRecorder(EmulatedRecorder):
    """Replays the recorded ATen ops on the recorded tensors, with the recorded Python
    numbers, running none of the step's Python: a value the step computed on the host
    while it was recorded stays what it was then, as in a CUDA graph. (Compiled kernels
    do not dispatch through ATen: steps here use tensors small enough for the foreach
    engine.)"""

    def record(
        self, device: torch.device, run: Callable[[], None], body: Callable[[], None]
    ) -> Callable[[], None]:
        run()
        recording = _OpRecorder()
        try:
            with recording, torch.no_grad():
                body()
        finally:
            with torch.no_grad():
                for base, before in recording.before.values():
                    base.copy_(before)
        self.recordings += 1
        ops = recording.ops

        def replay() -> None:
            with torch.no_grad():
                for func, args, kwargs, out, kind in ops:
                    if kind == "view":
                        continue  # the view recorded still looks at the same memory
                    new = func(*args, **kwargs)
                    if kind == "fresh":  # into the recorded output's memory
                        pairs = zip(tree_flatten(out)[0], tree_flatten(new)[0], strict=True)
                        for old, value in pairs:
                            if isinstance(old, torch.Tensor) and old is not value:
                                old.copy_(value)

        return replay


@pytest.fixture
def faithful(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaithfulRecorder]:
    from optorch import engine

    # every 0-d tensor taken as a device one, as on CUDA (no host read of a scalar)
    monkeypatch.setattr(
        engine, "_device_scalar", lambda v: isinstance(v, torch.Tensor) and v.dim() == 0
    )
    yield from _installed(monkeypatch, FaithfulRecorder())


@pytest.mark.parametrize("impl", ["foreach", "reference"])
@pytest.mark.parametrize("name", sorted(NON_DEFAULT_OPTIONS))
def test_replays_of_fixed_ops_equal_plain_steps(
    name: str, impl: str, faithful: FaithfulRecorder
) -> None:
    """No value of a step is fixed when it is recorded that should change from step to
    step: replaying the recorded ops alone equals running every step (with an lr
    schedule, an injected lr, a skip every fourth step, new grads every step)."""
    params = params_of(12)
    if name == "muon":
        params = {"w": params["w"], "v": torch.randn(16, 24)}
    options = NON_DEFAULT_OPTIONS[name]
    schedule = step_decay(step_size=3, gamma=0.5)
    optimizer = optorch.get_optimizer(name, impl=impl, schedule=schedule, **options)

    def kwargs(k: int) -> dict[str, Any]:
        lr = torch.tensor(0.02 / (1 + k % 5), dtype=torch.float64)
        return {"skip_if": torch.tensor(k % 4 == 2), "hyper_overrides": {"max_lr": lr}}

    assert_same_run(*run_pair(optimizer, params=params, step_kwargs=kwargs))
    assert faithful.recordings == NEW_GRADS_RECORDINGS


def test_the_faithful_recorder_fixes_what_the_host_computed() -> None:
    """The property the test above relies on: a number the step's Python computes
    while it is recorded is replayed as it was then (the recording itself changes
    nothing), and a tensor it reads is read anew."""
    recorder = FaithfulRecorder()
    x, y = torch.zeros(3), torch.ones(3)
    numbers = iter(range(1, 100))
    replay = recorder.record(
        torch.device("cpu"), lambda: None, lambda: x.add_(y, alpha=float(next(numbers)))
    )
    assert torch.equal(x, torch.zeros(3))
    replay()
    y.fill_(10.0)
    replay()
    assert torch.equal(x, torch.full((3,), 11.0))  # 1 x 1, then 1 x 10: alpha stayed 1


def test_many_param_sets_of_one_rule_each_replay(recorder: EmulatedRecorder) -> None:
    """Ten groups stepped in turn (partition with ten labels, one optimizer per layer):
    a graph each, all replayed; none dropped for another."""
    optimizer = optorch.get_optimizer("adam", impl="compiled")
    groups = [params_of(20 + g) for g in range(10)]
    states = [optimizer.init(p) for p in groups]
    with graphs.enabled():
        for k in range(4):
            for params, state in zip(groups, states, strict=True):
                grads = grads_for(params, k)
                for name in grads:  # the same grad tensors every step
                    params[name].grad = params[name].grad if k else grads[name]
                    params[name].grad.copy_(grads[name])
                optimizer.step(params, {n: p.grad for n, p in params.items()}, state)
    assert recorder.recordings == 10
    assert len(graphs._GRAPHS) == 10


def test_a_param_reshaped_in_place_records_anew(recorder: EmulatedRecorder) -> None:
    """The same memory under another shape (``p.data = p.data.view(...)``, the state
    reshaped alike) is another step for rules that read shapes: recorded again."""

    def reshape(k: int, params: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        if k == 4:
            params["w"].data = params["w"].data.view(16, 24)
            state["momentum"]["w"].data = state["momentum"]["w"].data.view(16, 24)
        return state

    optimizer = optorch.get_optimizer("muon", impl="compiled")
    start = {"w": torch.randn(24, 16, generator=torch.Generator().manual_seed(3))}
    assert_same_run(*run_pair(optimizer, 8, params=start, between=reshape))
    assert recorder.recordings == NEW_GRADS_RECORDINGS + 1


def test_grads_with_autograd_history_are_not_kept_with_it(recorder: EmulatedRecorder) -> None:
    """Grads from ``autograd.grad(create_graph=True)``: the graph's own grads carry no
    history (a chain of copies would keep every step's autograd graph alive)."""
    optimizer = optorch.get_optimizer("sgd", impl="compiled", momentum=0.9)
    params = params_of(13)
    state = optimizer.init(params)
    leaf = torch.ones((), requires_grad=True)
    with graphs.enabled():
        for k in range(4):
            grads = {n: g * leaf for n, g in grads_for(params, k).items()}
            optimizer.step(params, grads, state)
    (graph,) = graphs._GRAPHS.values()
    assert graph.owns_grads
    assert not any(g.requires_grad for g in graph.grads)


def test_a_first_step_under_inference_mode(recorder: EmulatedRecorder) -> None:
    """The graph's own tensors are plain ones even when the step that recorded them
    ran under ``torch.inference_mode`` (later steps write them outside it)."""
    optimizer = optorch.get_optimizer("adamw", impl="compiled", weight_decay=0.1)

    def kwargs(k: int) -> dict[str, Any]:
        return {"skip_if": torch.tensor(k == 5), "hyper_overrides": {"max_lr": 1e-2 / (k + 1)}}

    plain_p, graphed_p = params_of(14), params_of(14)
    plain_s, graphed_s = optimizer.init(plain_p), optimizer.init(graphed_p)
    grads = grads_for(plain_p, 0)  # the same tensors every step: the first graph replays
    for k in range(8):
        for name, new in grads_for(plain_p, k).items():
            grads[name].copy_(new)
        mode = torch.inference_mode() if k == 0 else contextlib.nullcontext()
        with mode:
            optimizer.step(plain_p, grads, plain_s, **kwargs(k))
            with graphs.enabled():
                optimizer.step(graphed_p, grads, graphed_s, **kwargs(k))
    assert_same_run(plain_p, plain_s, graphed_p, graphed_s)
    assert recorder.recordings == 1


def test_a_changing_set_of_params_with_grads_is_bounded(recorder: EmulatedRecorder) -> None:
    """Experts that get no tokens on some steps: another set of grads every step records
    every step; after MAX_RECORDINGS in a row for those params, no more (one graph at a
    time is kept for them, and nothing else grows). RMSprop: a rule that reads each
    param's own count (Adam) is not graphed once a param has sat out a step."""
    optimizer = optorch.get_optimizer("rmsprop", impl="compiled")
    generator = torch.Generator().manual_seed(0)
    experts = {f"e{i}": torch.randn(8, generator=generator) for i in range(6)}
    state = optimizer.init(experts)
    with graphs.enabled(), pytest.warns(RuntimeWarning, match="recorded 5 times in a row"):
        for _ in range(40):
            used = torch.rand(6, generator=generator) < 0.5
            used[0] = True
            grads = {n: torch.randn(8) if used[i] else None for i, n in enumerate(experts)}
            optimizer.step(experts, grads, state)
            assert len(graphs._GRAPHS) <= 1
    assert recorder.recordings == graphs.MAX_RECORDINGS + 1
    assert len(graphs._RECORDINGS) <= 1 and len(graphs._WATCHED) <= 1


def test_a_replaced_graph_is_freed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """No reference cycle keeps a dropped graph (its pool and grads on a GPU) until the
    cycle collector runs."""
    recorder_ = NoReplayRecorder()
    monkeypatch.setattr(graphs, "_RECORDER", recorder_)
    graphs.clear()
    optimizer = optorch.get_optimizer("sgd", impl="compiled", momentum=0.9)
    params = params_of(15)
    state = optimizer.init(params)
    gc.disable()
    try:
        with graphs.enabled():
            optimizer.step(params, grads_for(params, 0), state)
            (first,) = graphs._GRAPHS.values()
            watched = weakref.ref(first)
            del first
            state = copy.deepcopy(state)  # a loaded state: recorded anew
            optimizer.step(params, grads_for(params, 1), state)
        assert recorder_.recordings == 2
        assert watched() is None
    finally:
        gc.enable()
        graphs.clear()


def test_the_torch_optim_adapter_is_not_graphed(recorder: EmulatedRecorder) -> None:
    """Its steps make a new step-count tensor per bucket every step: a graph of them
    could never be replayed, and recording would only cost."""
    params = [torch.nn.Parameter(p) for p in params_of(16).values()]
    adapter = optorch.TorchOptimizer(params, "adamw", lr=1e-2)
    with graphs.enabled():
        for k in range(4):
            for p, g in zip(params, grads_for(dict(enumerate(params)), k).values(), strict=True):
                p.grad = g
            adapter.step()
    assert recorder.recordings == 0
