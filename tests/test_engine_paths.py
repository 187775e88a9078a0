"""The engine's execution strategies compute what the plain paths compute.

* foreach chunks after the first replay the first chunk's recorded calls
  (:class:`optorch.engine.Program`): equal to evaluating each chunk afresh;
* chunks of CPU tensors below ATen's parallel grain run on worker threads when the
  rule's program is thread-safe (arithmetic only), and on the calling thread when it
  is not (``sqrt`` & co. run through a vector library with threads of its own);
* write-back copies nothing when the results already are the buffers;
* the compiled path's inductor options: no precompiled header on CPU, and inductor's
  ISA check replaced only when the C++ compiler accepts every ISA's flags.

The suite runs with one intra-op thread (conftest); the threaded tests raise it to two
for their duration.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import assert_trees_close, assert_trees_equal, clone_tree, generator

import optorch
from optorch import engine

STEPS = 12


def small_params(seed: int, count: int = 40, size: int = 100) -> dict[str, torch.Tensor]:
    gen = generator(seed)
    return {f"p{i}": torch.randn(size, generator=gen) for i in range(count)}


def grads_for(seed: int, params: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    gen = generator(seed + 1)
    return [
        {k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(STEPS)
    ]


def run(
    name: str, hyper: dict[str, Any], impl: str, params: dict[str, torch.Tensor], grads: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    opt = optorch.get_optimizer(name, impl=impl, **hyper)
    params = clone_tree(params)
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(params, g, state)
    return params, state


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The arguments of every ``engine._compiled_fn`` call made while the test runs."""
    calls: list[tuple[Any, ...]] = []
    original = engine._compiled_fn

    def spy(*args: Any) -> Any:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(engine, "_compiled_fn", spy)
    return calls


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def threaded_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Small chunks (many per group) and a record of the chunk counts sent to threads."""
    monkeypatch.setattr(engine, "FOREACH_CHUNK_NUMEL", 256)
    calls: list[int] = []
    original = engine._run_threaded

    def spy(fn: Any, chunks: list[Any]) -> None:
        calls.append(len(chunks))
        original(fn, chunks)

    monkeypatch.setattr(engine, "_run_threaded", spy)
    return calls


ARITHMETIC_CASES = [
    ("sgd", {"momentum": 0.9, "weight_decay": 0.01, "max_lr": 0.05}),
    ("sgd", {"momentum": 0.9, "nesterov": True, "max_lr": 0.05}),
    ("sgd", {"momentum": 0.0, "max_lr": 0.05}),
    ("lion", {"weight_decay": 0.1, "max_lr": 1e-3}),
]


@pytest.mark.parametrize(("name", "hyper"), ARITHMETIC_CASES, ids=lambda v: str(v))
def test_threaded_chunks_equal_the_reference_bit_for_bit(
    name: str, hyper: dict[str, Any], two_threads: None, threaded_calls: list[int]
) -> None:
    params = small_params(5)
    grads = grads_for(5, params)
    ours = run(name, hyper, "foreach", params, grads)
    assert threaded_calls and all(n > 1 for n in threaded_calls)  # the threaded path ran
    reference = run(name, hyper, "reference", params, grads)
    assert_trees_equal(ours[0], reference[0])
    assert_trees_equal(ours[1], reference[1])


@pytest.mark.parametrize(
    ("name", "hyper"),
    [("adamw", {"weight_decay": 0.1, "max_lr": 0.01}), ("rmsprop", {"centered": True})],
)
def test_rules_with_transcendental_ops_stay_on_the_calling_thread(
    name: str, hyper: dict[str, Any], two_threads: None, threaded_calls: list[int]
) -> None:
    params = small_params(6)
    grads = grads_for(6, params)
    ours = run(name, hyper, "foreach", params, grads)
    assert threaded_calls == []
    reference = run(name, hyper, "reference", params, grads)
    assert_trees_close(ours[0], reference[0], rtol=1e-6, atol=1e-7)
    assert_trees_close(ours[1], reference[1], rtol=1e-6, atol=1e-7)


def test_one_thread_never_uses_workers(threaded_calls: list[int]) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params = small_params(7)
        run("sgd", {"momentum": 0.9}, "foreach", params, grads_for(7, params))
    finally:
        torch.set_num_threads(before)
    assert threaded_calls == []


FOREACH_NAMES = sorted(
    name for name, entry in optorch.REGISTRY.items() if getattr(entry.rule, "foreach_ok", False)
)


@pytest.mark.parametrize("name", FOREACH_NAMES)
def test_replayed_chunks_equal_one_chunk(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many chunks (all but the first replayed) equal a single chunk per group."""
    gen = generator(11)
    params = {
        "matrix": torch.randn(24, 20, generator=gen),  # sliced into several chunks
        **{f"v{i}": torch.randn(30 + i, generator=gen) for i in range(12)},
    }
    grads = grads_for(11, params)
    monkeypatch.setattr(engine, "FOREACH_CHUNK_NUMEL", 1 << 30)
    single = run(name, {}, "foreach", params, grads)
    replays: list[int] = []
    original = engine.Program.replay

    def spy(self: engine.Program, inputs: Any) -> Any:
        replays.append(1)
        return original(self, inputs)

    monkeypatch.setattr(engine.Program, "replay", spy)
    monkeypatch.setattr(engine, "FOREACH_CHUNK_NUMEL", 64)
    chunked = run(name, {}, "foreach", params, grads)
    assert replays, "no chunk was replayed"
    assert_trees_close(chunked[0], single[0], rtol=1e-6, atol=1e-7)
    assert_trees_close(chunked[1], single[1], rtol=1e-6, atol=1e-7)


def test_write_back_skips_lists_that_are_already_the_buffers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    copied: list[Any] = []
    monkeypatch.setattr(engine, "_copy", lambda dst, src: copied.append((dst, src)))
    tensors = [torch.zeros(3), torch.ones(2)]
    engine._write_back([(tensors, list(tensors))])  # same tensors, another list
    assert copied == []
    other = [torch.full((3,), 2.0), torch.full((2,), 3.0)]
    engine._write_back([(tensors, other)])
    assert len(copied) == 1


def test_evaluate_reports_a_graph_it_cannot_replay() -> None:
    a = engine.TensorList([torch.ones(2)])
    foreign = engine.TensorList([torch.full((2,), 3.0)])  # not among the declared inputs
    program = engine.evaluate([a * 2 + foreign], inputs=[a])
    assert program is None
    b = engine.TensorList([torch.ones(2)])
    out = b * 2 + 1
    program = engine.evaluate([out], inputs=[b])
    assert program is not None and not program.serial
    (result,) = program.replay([[torch.full((2,), 5.0)]])
    torch.testing.assert_close(result[0], torch.full((2,), 11.0), rtol=0, atol=0)
    c = engine.TensorList([torch.ones(2)])
    assert engine.evaluate([c.sqrt()], inputs=[c]).serial  # type: ignore[union-attr]


# compiled path: inductor options ------------------------------------------------------


@pytest.fixture
def fresh_options() -> Iterator[None]:
    engine._inductor_options.cache_clear()
    yield
    engine._inductor_options.cache_clear()


def test_inductor_options_are_for_cpu_only(fresh_options: None) -> None:
    from torch._inductor import config as inductor_config

    assert engine._inductor_options("cuda") == {}
    if hasattr(inductor_config, "cpp_cache_precompile_headers"):  # torch >= 2.5
        assert engine._inductor_options("cpu")["cpp_cache_precompile_headers"] is False
    # loops parallel whatever sizes the kernel was first compiled for (padded calls)
    assert engine._inductor_options("cpu")["cpp.dynamic_threads"] is True


class _OlderConfig:
    """A torch config module of an older release: some settings missing, and ``patch``
    refusing a name it does not know (as torch 2.4's does, with a KeyError)."""

    def __init__(self, **settings: Any) -> None:
        self.__dict__.update(settings)

    def patch(self, **changes: Any) -> Any:
        for name in changes:
            if name not in self.__dict__:
                raise KeyError(name)
        return contextlib.nullcontext()


def test_inductor_options_name_only_settings_this_torch_has(
    fresh_options: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch._inductor

    # torch 2.4's inductor: no precompiled headers, no realize_cpu_opcount_threshold;
    # torch.compile refuses an options dict that names a setting it lacks
    older = _OlderConfig(
        cpp=types.SimpleNamespace(dynamic_threads=False), realize_reads_threshold=4
    )
    monkeypatch.setattr(torch._inductor, "config", older)
    options = engine._inductor_options("cpu")
    assert "cpp_cache_precompile_headers" not in options
    assert options["cpp.dynamic_threads"] is True
    assert engine._known_options(engine._RECOMPUTE) == {"realize_reads_threshold": 10_000}
    assert engine._known_options({"cpp.nothing": 1, "nothing.at_all": 2}) == {}


def test_tracing_settings_skip_settings_this_torch_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.fx.experimental

    # torch 2.4: no use_duck_shape, and patch raises KeyError for it
    monkeypatch.setattr(torch.fx.experimental, "_config", _OlderConfig())
    monkeypatch.setattr(torch._dynamo, "config", _OlderConfig())
    with engine._tracing_settings():
        pass


def test_round_to_float32_equals_torchs_conversion() -> None:
    gen = generator(5)
    values = [
        0.0,
        -0.0,
        math.inf,
        -math.inf,
        float(torch.finfo(torch.float32).max),
        3.4028235677973366e38,  # rounds up past the largest float32: inf
        -3.4028235677973362e38,  # rounds down to the largest float32
        2.0**-149 * 2.5,  # a tie between subnormals: to even
        2.0**-149 * 1.5,
        2.0**-126 * (1 - 2**-24),
        -1e-47,  # underflows to -0.0
        0.1,
        1 - 0.9,
        1 - 0.999,
    ]
    # random magnitudes from subnormal to overflow, and values a half-ulp from a tie
    values += (
        torch.randn(20_000, generator=gen, dtype=torch.float64)
        * 10 ** (torch.rand(20_000, generator=gen, dtype=torch.float64) * 90 - 50)
    ).tolist()
    near = torch.randn(5_000, generator=gen).double()
    values += (near * (1 + 2**-24)).tolist() + (near * (1 - 2**-24)).tolist()
    expected = torch.tensor(values, dtype=torch.float64).float().double().tolist()
    for value, want in zip(values, expected, strict=True):
        got = engine.round_to_float32(value)
        assert got == want and math.copysign(1, got) == math.copysign(1, want), value
    assert math.isnan(engine.round_to_float32(math.nan))


def test_isa_check_is_kept_when_the_compiler_says_no(
    fresh_options: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise subprocess.CalledProcessError(1, args[0])

    monkeypatch.setattr(engine.subprocess, "run", refuse)
    assert engine._compiler_takes_cpu_isas() is False
    assert "cpp.vec_isa_ok" not in engine._inductor_options("cpu")


def test_isa_check_is_skipped_only_when_the_compiler_takes_every_isa(
    fresh_options: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    monkeypatch.setattr(engine, "_compiler_takes_cpu_isas", lambda: True)
    assert engine._inductor_options("cpu")["cpp.vec_isa_ok"] is True


def test_users_isa_setting_wins(fresh_options: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "0")
    monkeypatch.setattr(engine, "_compiler_takes_cpu_isas", lambda: True)
    assert "cpp.vec_isa_ok" not in engine._inductor_options("cpu")


def test_scalar_pack_holds_every_value_and_the_gate() -> None:
    from optorch.base import Hyper

    h = Hyper({"lr": 0.1, "flag": True, "beta": torch.tensor(0.5), "mode": "x"}, static=())
    names, pack, others, constants = engine._scalar_pack(h, torch.tensor(True), torch.device("cpu"))
    assert constants == ()
    assert names == ("lr", "flag", "beta", engine._GATE)
    assert pack.dtype == torch.float64 and pack.shape == (4,)
    torch.testing.assert_close(
        pack, torch.tensor([0.1, 1.0, 0.5, 1.0], dtype=torch.float64), rtol=0, atol=0
    )
    assert others == {"mode": "x"}


def test_threaded_chunks_work_under_inference_mode(
    two_threads: None, threaded_calls: list[int]
) -> None:
    """Worker threads enter inference mode too: in-place updates of inference tensors are
    refused outside it."""
    with torch.inference_mode():
        params = small_params(8)
        grads = grads_for(8, params)
        ours = run("sgd", {"momentum": 0.9}, "foreach", params, grads)
    assert threaded_calls
    reference = run("sgd", {"momentum": 0.9}, "reference", params, grads)
    assert_trees_equal(ours[0], reference[0])


def test_gradient_reaches_a_hyperparameter_through_the_packed_scalars() -> None:
    """A pure compiled step is differentiable in an injected learning rate: the packed
    float64 scalars keep the autograd graph of the tensors they are made from."""
    gen = generator(12)
    params = {"w": torch.randn(1 << 16, generator=gen)}  # large enough to be compiled
    grads = {"w": torch.randn(1 << 16, generator=gen)}
    found = {}
    for impl in ("reference", "compiled"):
        lr = torch.tensor(0.1, requires_grad=True)
        opt = optorch.get_optimizer("sgd", impl=impl, momentum=0.0, inplace=False)
        new, _ = opt.step(params, grads, opt.init(params), hyper_overrides={"max_lr": lr})
        (found[impl],) = torch.autograd.grad(new["w"].sum(), lr)
    # d/dlr sum(p - lr g) = -sum(g)
    expected = -grads["w"].double().sum()
    torch.testing.assert_close(found["reference"].double(), expected, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(found["compiled"], found["reference"], rtol=1e-5, atol=1e-3)


def test_each_dtype_gets_its_own_compiled_function(made: list[tuple[Any, ...]]) -> None:
    """float32 and float64 params of one optimizer use two compiled functions, not two
    graphs of one (which count towards dynamo's recompile limit, an error under
    fullgraph)."""
    gen = generator(13)
    params = {
        "single": torch.randn(1 << 16, generator=gen),
        "double": torch.randn(1 << 16, generator=gen, dtype=torch.float64),
    }
    grads = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    opt = optorch.get_optimizer("sgd", impl="compiled", momentum=0.9)
    reference = optorch.get_optimizer("sgd", impl="reference", momentum=0.9)
    ours, theirs = clone_tree(params), clone_tree(params)
    state, ref_state = opt.init(ours), reference.init(theirs)
    for _ in range(3):
        ours, state = opt.step(ours, grads, state)
        theirs, ref_state = reference.step(theirs, grads, ref_state)
    assert {args[7] for args in made} == {torch.float32, torch.float64}  # the dtype
    functions = {id(engine._compiled_fn(*args)) for args in list(made)}
    assert len(functions) == 2
    assert_trees_close(ours, theirs, rtol=1e-6, atol=1e-6)  # compiled fuses differently


class _AtenCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen ops run under it, by overload name (``aten.add.out``)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("dtype", "size", "out_adds"),
    [
        (torch.float32, 40_000, 3),
        (torch.float64, 40_000, 3),
        (torch.float32, 100, 0),
        (torch.bfloat16, 40_000, 0),
    ],
    ids=["float32", "float64", "float32-small", "bfloat16"],
)
def test_momentum_buffer_is_updated_in_one_pass_in_place(
    dtype: torch.dtype, size: int, out_adds: int
) -> None:
    """In-place foreach SGD writes ``grad + momentum * buf`` straight into the dead
    buffer (``add(..., out=buf)``, one kernel per tensor) instead of ``_foreach_mul_``
    then ``_foreach_add_``. Tensors below ATen's grain take one foreach add and a copy
    (a Python loop would cost more), half precision the two exact passes (ATen's
    ``alpha`` would be rounded to bfloat16). The buffers stay the same tensors and the
    result is bit-equal to the reference impl."""
    params = {k: v.to(dtype) for k, v in small_params(5, count=3, size=size).items()}
    grads = [{k: v.to(dtype) for k, v in g.items()} for g in grads_for(5, params)]
    hyper = {"max_lr": 0.1, "momentum": 0.9}
    opt = optorch.get_optimizer("sgd", impl="foreach", **hyper)
    mine = clone_tree(params)
    state = opt.init(mine)
    mine, state = opt.step(mine, grads[0], state)
    buffers = dict(state["momentum"])
    for g in grads[1:-1]:
        mine, state = opt.step(mine, g, state)
    with _AtenCalls() as calls:
        mine, state = opt.step(mine, grads[-1], state)
    counts = calls.counts
    muls = counts.get("aten._foreach_mul_.Scalar", 0) + counts.get("aten._foreach_mul_.Tensor", 0)
    assert counts.get("aten.add.out", 0) == out_adds, counts
    assert muls == (1 if dtype is torch.bfloat16 else 0), counts
    assert all(state["momentum"][k] is buffers[k] for k in params)
    reference = run("sgd", hyper, "reference", params, grads)
    assert_trees_equal((mine, state), reference)


@pytest.mark.parametrize("name", sorted(optorch.REGISTRY))
def test_config_scalars_do_not_move_with_the_step_or_the_schedule(name: str) -> None:
    """A rule's ``config_scalars`` are built into its compiled kernel as constants, so
    they must not depend on the step count, the learning rate or the multiplier."""
    entry = optorch.REGISTRY[name]
    rule, config = entry.rule, entry.make_config()
    names = rule.config_scalars
    seen = [
        {key: rule.scalars(config, t, lr, multiplier)[key] for key in names}
        for t, lr, multiplier in [(1, 0.1, 1.0), (2, 0.05, 0.5), (1000, 1e-4, 0.01)]
    ]
    assert all(values == seen[0] for values in seen), seen


def test_config_scalars_are_kernel_constants(made: list[tuple[Any, ...]]) -> None:
    """AdamW's betas, eps and weight decay reach the compiled function as constants (one
    function per value), the per-step values through the pack; two configs that differ
    only in ``beta2`` get two functions and each its own result."""
    params = small_params(8, count=2, size=300)
    grads = grads_for(8, params)
    for beta2 in (0.999, 0.95):
        hyper = {"max_lr": 0.01, "weight_decay": 0.1, "betas": (0.9, beta2)}
        mine = run("adamw", hyper, "compiled", params, grads)
        assert_trees_close(
            mine, run("adamw", hyper, "reference", params, grads), rtol=1e-6, atol=1e-6
        )
    constants = {dict(args[8])["beta2"] for args in made}
    assert constants == {0.999, 0.95}
    assert all("beta2" not in args[5] and "step_size" in args[5] for args in made)


def test_flat_aliases_follow_the_tensors_memory() -> None:
    """The compiled engine's flat aliases are kept from step to step, remade when a
    tensor's memory changes (``.data =``, ``set_``) and dropped with the tensor."""
    import gc

    big = 1 << 16
    gen = generator(21)
    params = {"w": torch.randn(big, generator=gen), "v": torch.randn(4, big // 4, generator=gen)}
    hyper = {"max_lr": 0.1, "momentum": 0.9}
    opt = optorch.get_optimizer("sgd", impl="compiled", **hyper)
    ref = optorch.get_optimizer("sgd", impl="reference", **hyper)
    mine, theirs = clone_tree(params), clone_tree(params)
    state, ref_state = opt.init(mine), ref.init(theirs)
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(4)]
    mine, state = opt.step(mine, grads[0], state)
    theirs, ref_state = ref.step(theirs, grads[0], ref_state)
    first = engine._flat_alias(mine["w"])
    assert engine._flat_alias(mine["w"]) is first  # kept
    # new memory behind the same tensor objects: the step must write into it
    mine["w"].data = mine["w"].clone()
    mine["v"].set_(mine["v"].clone())
    assert engine._flat_alias(mine["w"]) is not first
    for g in grads[1:]:
        mine, state = opt.step(mine, g, state)
        theirs, ref_state = ref.step(theirs, g, ref_state)
    assert_trees_close(mine, theirs, rtol=1e-6, atol=1e-6)
    keys = {id(t) for t in mine.values()}
    assert keys <= set(engine._ALIASES)
    del mine, state, first
    gc.collect()
    assert not keys & set(engine._ALIASES)


def test_config_scalars_given_as_tensors_share_one_kernel(made: list[tuple[Any, ...]]) -> None:
    """Given as tensors, betas travel in the pack: two values, one compiled function,
    and each run equals the reference impl."""
    params = small_params(9, count=2, size=300)
    grads = grads_for(9, params)
    for beta2 in (0.999, 0.95):
        betas = (torch.tensor(0.9, dtype=torch.float64), torch.tensor(beta2, dtype=torch.float64))
        hyper = {"max_lr": 0.01, "weight_decay": 0.1, "betas": betas}
        mine = run("adamw", hyper, "compiled", params, grads)
        reference = run("adamw", hyper, "reference", params, grads)
        assert_trees_close(mine, reference, rtol=1e-6, atol=1e-6)
    assert {args[8] for args in made} == {(("eps", 1e-8), ("weight_decay", 0.1))}
    assert len({id(engine._compiled_fn(*args)) for args in list(made)}) == 1


@pytest.mark.parametrize(("name", "recompute"), [("lamb", True), ("lars", True), ("adamw", False)])
def test_rules_with_norms_recompute_instead_of_storing(
    name: str, recompute: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU, kernels of rules with per-tensor norms are compiled with inductor told to
    recompute the update in its second loop rather than store it in a full-size buffer
    allocated at every call; elementwise rules keep the defaults."""
    seen: list[dict[str, Any]] = []
    real = torch.compile

    def spy(fn: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("options") or {})
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setattr(engine, "_COMPILED", {})
    params = small_params(10, count=2, size=300)
    run(name, {"max_lr": 0.01}, "compiled", params, grads_for(10, params)[:2])
    assert seen
    for options in seen:
        assert ("realize_reads_threshold" in options) is recompute
        assert options["cpp.dynamic_threads"] is True


def test_per_tensor_numbers_run_once_stacked_and_equal_the_plain_ops() -> None:
    """``engine.per_tensor`` on TensorLists of per-tensor numbers (norms) runs its
    function once on them stacked, and gives, tensor by tensor, what the function gives
    on each tensor's own numbers, bit for bit (elementwise ops on a 1-D tensor round as
    on its elements); with plain tensors it is a plain call."""
    gen = generator(7)
    tensors = [torch.randn(n, generator=gen) for n in (3, 50, 7, 1, 128)]
    others = [torch.randn(n, generator=gen) for n in (3, 50, 7, 1, 128)]

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a.clamp(min=0.5) * 0.3 / (b / 2.0).clamp(min=1.0)).to(torch.float64)

    calls: list[int] = []

    def counted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(a.numel())
        return fn(a, b)

    node = engine.per_tensor(
        counted, engine.TensorList(tensors).norm(), engine.TensorList(others).norm()
    )
    got = node.items
    expected = [fn(t.norm(), o.norm()) for t, o in zip(tensors, others, strict=True)]
    assert calls == [len(tensors)]  # one call on 1-D tensors of 5 numbers
    assert [g.dim() for g in got] == [0] * len(tensors)
    assert_trees_equal(got, expected)
    direct = engine.per_tensor(fn, tensors[0].norm(), others[0].norm())
    assert_trees_equal(direct, fn(tensors[0].norm(), others[0].norm()))


def accelerator_like_steps(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """``(opt, run)``: ``name``'s foreach optimizer and ``run()``, which takes six steps
    from fixed params and grads and returns ``(params, state)``. The step count is a
    tensor, as on an accelerator (where it is not read to the host), and so is the
    learning rate: every per-step value derived from them is a 0-d float64 tensor."""
    shapes = {"w": (6, 5), "v": (5, 6)} if name == "muon" else {"w": (6, 5), "b": (7,)}
    gen = generator(29)
    start = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    grads = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(6)]
    monkeypatch.setattr(optorch.base, "_host_step", lambda step: False)
    default_lr = optorch.get_optimizer(name).config.max_lr
    opt = optorch.get_optimizer(
        name, impl="foreach", max_lr=torch.tensor(default_lr, dtype=torch.float64)
    )

    def run() -> tuple[Any, Any]:
        params, state = clone_tree(start), opt.init(start)
        for g in grads:
            params, state = opt.step(params, g, state)
        return params, state

    return opt, run


@pytest.mark.parametrize("name", sorted(optorch.builder.REGISTRY))
def test_per_step_scalars_in_the_list_dtype_change_nothing(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA the foreach engine hands float32 lists their per-step float64 scalar
    tensors in float32 (ATen's one-launch route needs the list's dtype). Forced on for
    CPU here: every optimizer's foreach steps equal those without the cast, params and
    state, to float32 rounding (the kernels cast the scalar to float32 either way)."""
    opt, run = accelerator_like_steps(name, monkeypatch)
    plain = run()
    casts: list[int] = []
    real = engine._scalars_in_list_dtype

    def counting(h: Any, device: torch.device, dtype: torch.dtype) -> Any:
        out = real(h, device, dtype)
        casts.append(sum(isinstance(v, torch.Tensor) for v in out.values().values()))
        assert all(
            v.dtype == torch.float32
            for v in out.values().values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        )
        return out

    monkeypatch.setattr(engine, "_casts_scalars", lambda device, dtype: dtype == torch.float32)
    monkeypatch.setattr(engine, "_scalars_in_list_dtype", counting)
    cast = run()
    if engine.resolve_impl(opt.rule, opt.config) == "foreach":  # Muon: the reference loop
        assert sum(casts) > 0, f"{name}: no per-step tensor was cast"
    assert_trees_close(cast, plain, rtol=1e-6, atol=1e-7, what=name)


@pytest.mark.parametrize("name", sorted(optorch.builder.REGISTRY))
def test_device_scalars_are_never_read_to_the_host(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``torch._foreach_*`` op other than mul/div given a 0-d tensor as its scalar
    reads it to the host (its ``Scalar`` overload), which on a GPU waits for the device;
    on an accelerator the step counter and the values derived from it are such tensors.
    With every 0-d tensor treated as a device one (``engine._device_scalar``), every
    optimizer's foreach program reads none (no ``aten._local_scalar_dense``) and steps as
    before."""
    from torch.utils._python_dispatch import TorchDispatchMode

    opt, run = accelerator_like_steps(name, monkeypatch)
    plain = run()
    reads: list[str] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(str(args[0].shape))
            return func(*args, **(kwargs or {}))

    real_evaluate = engine.evaluate
    evaluated: list[int] = []

    def watched(*args: Any, **kwargs: Any) -> Any:
        evaluated.append(1)
        with Reads():
            return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(
        engine, "_device_scalar", lambda v: isinstance(v, torch.Tensor) and v.dim() == 0
    )
    monkeypatch.setattr(engine, "evaluate", watched)
    moved = run()
    if engine.resolve_impl(opt.rule, opt.config) == "foreach":  # Muon: the reference loop
        assert evaluated, f"{name}: no foreach program ran"
    assert reads == [], f"{name}: the foreach program read {len(reads)} scalars to the host"
    assert_trees_close(moved, plain, rtol=1e-6, atol=1e-7, what=name)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lion", "rmsprop"])
@pytest.mark.parametrize("where", ["grad", "state"])
def test_chunked_foreach_with_a_transposed_grad_or_state_equals_reference(
    monkeypatch: pytest.MonkeyPatch, name: str, where: str
) -> None:
    """A contiguous param above the chunk size is cut into flat slices of it, its grad
    and its state; a transposed grad (or a state loaded in another layout) has no flat
    view, and the step failed with the chunks before it already written."""
    monkeypatch.setattr(engine, "FOREACH_CHUNK_NUMEL", 64)
    gen = generator(12)
    params = {"big": torch.randn(24, 20, generator=gen), "v": torch.randn(30, generator=gen)}
    grads = [
        {"big": torch.randn(20, 24, generator=gen).t(), "v": torch.randn(30, generator=gen)}
        for _ in range(10)
    ]
    if where == "state":
        grads = [{k: v.contiguous() for k, v in g.items()} for g in grads]
    results = []
    for impl in ("reference", "foreach"):
        opt = optorch.get_optimizer(name, impl=impl)
        current = clone_tree(params)
        state = opt.init(current)
        if where == "state":
            field = opt.rule.fields(opt.config)[0]
            state[field]["big"] = torch.zeros(20, 24).t()  # as a checkpoint might load it
        for g in grads:
            current, state = opt.step(current, g, state)
        results.append((current, state))
    if where == "state":  # written in place: the caller's layout is kept
        assert not results[1][1][opt.rule.fields(opt.config)[0]]["big"].is_contiguous()
    assert_trees_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7, what="params")
    assert_trees_close(results[1][1], results[0][1], rtol=1e-6, atol=1e-7, what="state")


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
def test_an_int32_step_count_stays_int32_with_skip_if(inplace: bool) -> None:
    """The gated increment takes the count's dtype (a pure step made it int64)."""
    opt = optorch.get_optimizer("adamw", inplace=inplace)
    params = {"w": torch.ones(3)}
    state = {**opt.init(params), "step": torch.tensor(0, dtype=torch.int32)}
    for skip in (False, True, False):
        params, state = opt.step(params, {"w": torch.ones(3)}, state, skip_if=torch.tensor(skip))
    assert state["step"].dtype == torch.int32 and int(state["step"]) == 2


# compiled path: per-step values as tensors -------------------------------------------

IMPLS3 = ("reference", "foreach", "compiled")


def test_compiled_radam_has_no_nan_before_rectification_where_the_denominator_is_zero() -> None:
    """Before its rectification starts (step 6 with the default betas) RAdam steps on the
    momentum alone; the compiled kernel also evaluated adaptive_step / (sqrt(v) + eps),
    0/0 = NaN on a row whose gradient is always 0 with eps=0 (float16 underflows eps
    and g^2 the same way). torch.optim.RAdam and the reference loop stay finite."""
    gen = generator(61)
    params = {"w": torch.randn(300, 300, generator=gen)}  # compiled, not the foreach path
    grads = []
    for _ in range(5):
        g = torch.randn(300, 300, generator=gen)
        g[7] = 0.0  # an unused embedding row
        grads.append({"w": g})
    found = {impl: run("radam", {"eps": 0.0}, impl, params, grads) for impl in IMPLS3}
    theirs = params["w"].clone().requires_grad_()
    reference = torch.optim.RAdam([theirs], eps=0.0, foreach=False)
    for g in grads:
        theirs.grad = g["w"].clone()
        reference.step()
    for impl, (got, state) in found.items():
        assert torch.isfinite(got["w"]).all(), impl
        torch.testing.assert_close(got["w"], theirs.detach(), rtol=1e-6, atol=1e-7, msg=impl)
        buffer = reference.state[theirs]["exp_avg"]
        torch.testing.assert_close(state["exp_avg"]["w"], buffer, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compiled_sgd_momentum_in_low_precision_equals_torch_optim(dtype: torch.dtype) -> None:
    """A bfloat16 kernel rounded the momentum, a per-step tensor there, to bfloat16
    (0.8984375 for 0.9): 78% of the buffer differed from torch.optim.SGD's after 20 steps
    and the params were 1.46x further from a float64 run. The buffer is now torch's bit
    for bit; the params within a rounding per op (compiled kernels round the learning
    rate as a tensor, where eager ATen rounds add's alpha)."""
    gen = generator(67)
    start = torch.randn(300, 300, generator=gen).to(dtype)
    grads = [{"w": torch.randn(300, 300, generator=gen).to(dtype)} for _ in range(20)]
    got, state = run("sgd", {"max_lr": 0.05, "momentum": 0.9}, "compiled", {"w": start}, grads)
    theirs = start.clone().requires_grad_()
    reference = torch.optim.SGD([theirs], lr=0.05, momentum=0.9, foreach=False)
    for g in grads:
        theirs.grad = g["w"].clone()
        reference.step()
    assert torch.equal(state["momentum"]["w"], reference.state[theirs]["momentum_buffer"])
    exact = start.double()
    buffer = torch.zeros_like(exact)
    for g in grads:
        buffer = 0.9 * buffer + g["w"].double()
        exact = exact - 0.05 * buffer
    ours_error = (got["w"].double() - exact).abs().mean()
    torch_error = (theirs.detach().double() - exact).abs().mean()
    assert ours_error <= 1.05 * torch_error, (float(ours_error), float(torch_error))


def test_muon_with_a_tensor_momentum_equals_torch_with_the_same_tensor() -> None:
    """engine.lerp with a tensor weight took two roundings (start + (end - start) * w)
    where torch.lerp takes its own: Muon's bfloat16 Newton-Schulz made that 5e-5 apart
    from torch.optim.Muon given the same tensor."""
    gen = generator(71)
    start = torch.randn(64, 32, generator=gen)
    grads = [torch.randn(64, 32, generator=gen) for _ in range(10)]
    momentum = torch.tensor(0.95, dtype=torch.float64)
    for impl in ("reference", "foreach"):
        opt = optorch.get_optimizer("muon", max_lr=0.02, momentum=momentum, impl=impl)
        params = {"w": start.clone()}
        state = opt.init(params)
        theirs = start.clone().requires_grad_()
        reference = torch.optim.Muon([theirs], lr=0.02, momentum=momentum)
        for g in grads:
            params, state = opt.step(params, {"w": g}, state)
            theirs.grad = g.clone()
            reference.step()
        assert torch.equal(state["momentum"]["w"], reference.state[theirs]["momentum_buffer"])
        assert torch.equal(params["w"], theirs.detach()), impl
