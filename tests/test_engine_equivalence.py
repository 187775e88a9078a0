"""Every engine equals the reference loop, on params AND state, for 20 steps.

``impl="foreach"`` (``torch._foreach_*`` over tensor lists) and ``impl="compiled"``
(``torch.compile`` over chunks of flat tensors) must compute what ``impl="reference"``
(one rule call per tensor) computes, in place and pure. The params are 20+ tensors of
varied sizes, including empty, one-element, 0-d and non-contiguous tensors, so that
grouping, chunking, padding and the fallbacks for tensors the fast paths do not take
are all exercised. foreach runs the same kernels in the same order as the reference,
up to fused multiply-adds: within 1e-7. The compiled kernels fuse the math
differently: within 1e-6 in float32.

A last test checks that the compiled path does not recompile over 50 steps whose
learning rate follows a tensor-friendly cosine schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from conftest import assert_trees_close, assert_trees_equal, clone_tree, generator, grad_sequence

import optorch
import optorch.builder

STEPS = 20

MANY_SHAPES: dict[str, tuple[int, ...]] = {
    "empty": (0,),
    "empty_matrix": (3, 0),
    "one": (1,),
    "scalar": (),
    "one_by_one": (1, 1),
    "pair": (2,),
    "bias": (7,),
    "bias_twin": (7,),  # equal sizes in one compiled chunk
    "small_matrix": (3, 4),
    "matrix": (16, 9),
    "tall": (33, 2),
    "cube": (3, 4, 5),
    "vector": (129,),
    "wide": (2, 65),
    "odd": (13,),
    "prime_matrix": (11, 7),
    "four_d": (2, 3, 2, 2),
    "long": (300,),
    "square": (12, 12),
    "row": (1, 40),
    "column": (25, 1),
}


def many_params(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = generator(seed)
    params = {
        name: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        for name, shape in MANY_SHAPES.items()
    }
    # a transposed view: not contiguous, so the flat fast paths must fall back for it
    params["transposed"] = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(dtype).t()
    params["zeros"] = torch.zeros(4, 4, dtype=dtype)  # LARS's zero-norm guard
    return params


ALL_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("sgd-momentum-wd", "sgd", {"momentum": 0.9, "weight_decay": 0.01}),
    ("sgd-plain-wd", "sgd", {"momentum": 0.0, "weight_decay": 0.1}),
    ("sgd-nesterov", "sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.02}),
    ("sgd-dampening-maximize", "sgd", {"momentum": 0.8, "dampening": 0.3, "maximize": True}),
    ("adam-l2", "adam", {"weight_decay": 0.1, "max_lr": 0.01}),
    ("adam-maximize", "adam", {"maximize": True, "max_lr": 0.01}),
    ("adamw", "adamw", {"weight_decay": 0.1, "max_lr": 0.01}),
    ("amsgrad", "adam", {"amsgrad": True, "weight_decay": 0.05, "max_lr": 0.01}),
    ("adamw-amsgrad", "adamw", {"amsgrad": True, "weight_decay": 0.1, "max_lr": 0.01}),
    ("decoupled-adam", "decoupled_adam", {"weight_decay": 0.05, "max_lr": 0.01}),
    ("lars", "lars", {"weight_decay": 0.01, "trust_coefficient": 0.02}),
    (
        "lars-exclude-1d",
        "lars",
        {"weight_decay": 0.01, "trust_coefficient": 0.02, "exclude_1d": True},
    ),
]
#: Compiling costs seconds per distinct (options, mode): a few representative pairs. The
#: recompile test below reuses the first kernel.
COMPILED_CASES = [
    ("adamw-amsgrad", True),
    ("adamw-amsgrad", False),
    ("lars-exclude-1d", True),
    ("sgd-nesterov", False),
]
CASES_BY_ID = {case_id: (name, hyper) for case_id, name, hyper in ALL_CASES}


def schedule(step: Any) -> Any:
    """Warmup then cosine, in torch ops: accepts an int or a tensor step."""
    step = torch.as_tensor(step, dtype=torch.float64)
    warm = torch.clamp((step + 1) / 3, max=1.0)
    return warm * 0.5 * (1 + torch.cos(math.pi * torch.clamp(step / 60, max=1.0)))


def run_engines(
    name: str,
    hyper: dict[str, Any],
    impl: str,
    *,
    inplace: bool,
    dtype: torch.dtype,
    seed: int,
    rtol: float,
    atol: float,
    use_schedule: bool = False,
) -> None:
    params = many_params(seed, dtype)
    grads_per_step = grad_sequence(seed, params, STEPS)
    for grads in grads_per_step:
        grads["zeros"].zero_()
    extra = {"schedule": schedule} if use_schedule else {}
    reference = optorch.get_optimizer(name, **hyper, **extra, impl="reference", inplace=inplace)
    candidate = optorch.get_optimizer(name, **hyper, **extra, impl=impl, inplace=inplace)
    ref_params, ref_state = clone_tree(params), reference.init(params)
    params, state = clone_tree(params), candidate.init(params)
    for k, grads in enumerate(grads_per_step):
        before = clone_tree([params, grads, state])
        new_params, new_state = candidate.step(params, grads, state)
        if inplace:
            for key, tensor in params.items():
                assert new_params[key] is tensor
        else:
            assert_trees_equal([params, grads, state], before, what=f"inputs of pure step {k}")
        params, state = new_params, new_state
        ref_params, ref_state = reference.step(ref_params, grads, ref_state)
        assert_trees_close(params, ref_params, rtol=rtol, atol=atol, what=f"{impl} params step {k}")
        assert sorted(state) == sorted(ref_state)
        for field in ref_state:
            assert_trees_close(
                state[field],
                ref_state[field],
                rtol=rtol,
                atol=atol,
                what=f"{impl} {field} step {k}",
            )
        for key, tensor in params.items():
            assert tensor.shape == MANY_SHAPES.get(key, tensor.shape)
            assert tensor.dtype == dtype


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize(("case_id", "name", "hyper"), ALL_CASES, ids=[c[0] for c in ALL_CASES])
def test_foreach_equals_reference(
    case_id: str, name: str, hyper: dict[str, Any], inplace: bool
) -> None:
    run_engines(
        name, hyper, "foreach", inplace=inplace, dtype=torch.float32, seed=81, rtol=1e-7, atol=1e-7
    )


@pytest.mark.parametrize("case_id", ["sgd-nesterov", "amsgrad", "lars-exclude-1d"])
def test_foreach_equals_reference_float64_scheduled(case_id: str) -> None:
    name, hyper = CASES_BY_ID[case_id]
    run_engines(
        name,
        hyper,
        "foreach",
        inplace=True,
        dtype=torch.float64,
        seed=82,
        rtol=1e-14,
        atol=1e-14,
        use_schedule=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case_id", "inplace"),
    COMPILED_CASES,
    ids=[f"{c}-{'inplace' if i else 'pure'}" for c, i in COMPILED_CASES],
)
def test_compiled_equals_reference(case_id: str, inplace: bool) -> None:
    name, hyper = CASES_BY_ID[case_id]
    run_engines(
        name,
        hyper,
        "compiled",
        inplace=inplace,
        dtype=torch.float32,
        seed=83,
        rtol=1e-6,
        atol=1e-6,
        use_schedule=True,
    )


@pytest.mark.slow
def test_compiled_does_not_recompile_over_50_steps() -> None:
    params = many_params(84, torch.float32)
    name, hyper = CASES_BY_ID["adamw-amsgrad"]  # the kernel of the first compiled case
    optimizer = optorch.get_optimizer(name, **hyper, schedule=schedule, impl="compiled")
    state = optimizer.init(params)
    grads_per_step = grad_sequence(84, params, 50)
    params, state = optimizer.step(params, grads_per_step[0], state)
    graphs_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for grads in grads_per_step[1:]:
            params, state = optimizer.step(params, grads, state)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs_after_first
    assert int(state["step"]) == 50
    assert all(torch.isfinite(p).all() for p in params.values())


@pytest.mark.parametrize("inplace", [False, True], ids=["pure", "inplace"])
def test_compiled_compiles_once_for_tensors_of_many_ranks(
    monkeypatch: pytest.MonkeyPatch, inplace: bool
) -> None:
    """80 tensors of ranks 1 to 3, with None grads that change from step to step: the
    kernel sees flat tensors without a view base, so it compiles once. Pure steps passed
    flat views, whose bases dynamo guards on: a recompile per chunk layout, and
    FailOnRecompileLimitHit on the first step."""
    from optorch import engine

    monkeypatch.setattr(engine, "COMPILED_MIN_NUMEL", 2)
    gen = generator(85)
    sizes = [16, 24, 32, 40, 48] * 16
    shapes = [
        (n,) if i % 3 == 0 else (n // 4, 4) if i % 3 == 1 else (2, n // 8, 4)
        for i, n in enumerate(sizes)
    ]
    params = {f"p{i}": torch.randn(shape, generator=gen) for i, shape in enumerate(shapes)}
    # a weight decay no other test uses: a kernel of its own, compiled in this test
    hyper = {"weight_decay": 0.0123 if inplace else 0.0125, "inplace": inplace}
    optimizer = optorch.get_optimizer("adamw", impl="compiled", **hyper)
    reference = optorch.get_optimizer("adamw", impl="reference", **hyper)
    ours, theirs = clone_tree(params), clone_tree(params)
    state, ref_state = optimizer.init(ours), reference.init(theirs)
    graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step, grads in enumerate(grad_sequence(86, params, 3)):
        grads = {k: None if (i + step) % 4 == 0 else g for i, (k, g) in enumerate(grads.items())}
        ours, state = optimizer.step(ours, grads, state)
        theirs, ref_state = reference.step(theirs, grads, ref_state)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs_before == 1
    assert_trees_close(ours, theirs, rtol=1e-6, atol=1e-6)
    assert_trees_close(state, ref_state, rtol=1e-6, atol=1e-6)


def test_compiled_sends_small_tensors_to_foreach(monkeypatch: pytest.MonkeyPatch) -> None:
    """Below COMPILED_MIN_NUMEL a tensor takes the foreach path; no kernel is compiled."""
    from optorch import engine

    monkeypatch.setattr(engine, "COMPILED_MIN_NUMEL", 1 << 16)
    invoked: list[Any] = []
    monkeypatch.setattr(
        engine, "_compiled_fn", lambda *a, **k: lambda *args, **kw: invoked.append(args)
    )
    params = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    reference = {k: v.clone() for k, v in params.items()}
    opt = optorch.get_optimizer("adamw", impl="compiled", weight_decay=0.1)
    ref_opt = optorch.get_optimizer("adamw", impl="reference", weight_decay=0.1)
    state, ref_state = opt.init(params), ref_opt.init(reference)
    opt.step(params, grads, state)
    ref_opt.step(reference, grads, ref_state)
    for key in params:
        torch.testing.assert_close(params[key], reference[key], rtol=1e-6, atol=1e-7)
    assert invoked == []  # no compiled kernel ran: the update above came from foreach


def _steps_from(opt: Any, params0: dict[str, torch.Tensor], grads: list[Any]) -> tuple[Any, Any]:
    """``opt``'s params and state after one step per entry of ``grads``, from copies of
    ``params0``."""
    params = {k: v.clone() for k, v in params0.items()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(params, g, state)
    return params, state


@pytest.mark.parametrize("name", ["adam", "lamb"])
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
def test_compiled_float16_keeps_the_reference_roundings(
    monkeypatch: pytest.MonkeyPatch, name: str, inplace: bool
) -> None:
    """Eager float16 rounds every op (``(1 - beta2) * g^2`` underflows to 0 for small
    grads, as in torch.optim, and the step then overflows); the compiled kernel must
    round the same way, not keep float32 between ops. Measured before it did: Adam's
    compiled step stayed finite where the reference overflowed, and LAMB's pure
    compiled step (norm pass and update pass rounding differently) moved params by 2.7
    at lr 1e-3."""
    from optorch import engine

    monkeypatch.setattr(engine, "COMPILED_MIN_NUMEL", 2)  # the compiled kernel runs
    gen = torch.Generator().manual_seed(0)
    params0 = {"w": (torch.randn(64, 32, generator=gen) * 0.5).half()}
    grads = [{"w": torch.randn(64, 32, generator=gen).half()} for _ in range(3)]
    opt = optorch.get_optimizer(name, impl="reference", inplace=inplace)
    ref_params, ref_state = _steps_from(opt, params0, grads)
    params, state = _steps_from(opt.replace(impl="compiled"), params0, grads)
    # one float16 rounding (a fused multiply-add, say) is still allowed per element
    torch.testing.assert_close(params["w"], ref_params["w"], rtol=2e-3, atol=2e-3, equal_nan=True)
    for field in opt.rule.fields(opt.config):
        torch.testing.assert_close(
            state[field]["w"], ref_state[field]["w"], rtol=2e-3, atol=2e-3, equal_nan=True
        )


_DECAYING = sorted(
    name
    for name in optorch.builder.REGISTRY
    if name != "muon"  # matrices only
    and "weight_decay" in {f.name for f in dataclasses.fields(optorch.get_optimizer(name).config)}
)


@pytest.mark.parametrize("name", _DECAYING)
@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
def test_a_float64_tensor_hyperparameter_keeps_a_scalar_param_float32(
    name: str, inplace: bool, impl: str
) -> None:
    """A 0-d float32 param (a learnable scale) and a 0-d float64 ``weight_decay`` (a
    tensor hyperparameter, as ``inject_hyperparams`` makes it) promoted each other to
    float64 mid-rule, and Adam's lerp into its float32 state failed. The step must
    equal the one with the same value as a Python float, in float32."""
    gen = torch.Generator().manual_seed(4)
    params0 = {"scale": torch.randn((), generator=gen), "w": torch.randn(3, 2, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params0.items()} for _ in range(5)]
    opt = optorch.get_optimizer(name, weight_decay=0.1, impl=impl, inplace=inplace)
    want, want_state = _steps_from(opt, params0, grads)
    as_tensor = opt.replace(weight_decay=torch.tensor(0.1, dtype=torch.float64))
    got, got_state = _steps_from(as_tensor, params0, grads)
    assert got["scale"].dtype == torch.float32 and got["scale"].shape == ()
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7, what="params")
    assert_trees_close(got_state, want_state, rtol=1e-6, atol=1e-7, what="state")
