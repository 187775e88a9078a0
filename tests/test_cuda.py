"""Every optimizer on a CUDA device, against references computed elsewhere.

* every registry optimizer, every impl, in place and pure: 20 float32 steps on the GPU
  equal the reference loop run on the CPU in float64 (params and every state field);
* every optimizer torch.optim has: optorch's foreach and compiled steps on the GPU equal
  torch.optim's foreach and fused steps on the same GPU (params and state);
* Muon with its default bfloat16 Newton-Schulz equals ``torch.optim.Muon`` on the GPU;
* mixed precision: :func:`optorch.amp.scaled_step` follows ``torch.amp.GradScaler("cuda")``
  driving ``torch.optim.AdamW`` through overflows (skipped steps, scale backoff/growth);
* a whole training step (``torch.func.grad`` + optimizer step) compiles with
  ``fullgraph=True`` on the GPU and equals the eager step;
* params that sit out steps keep their own counts (read on the device, never on the
  host) and complex params step as torch.optim's, against torch.optim on the same GPU.

CI has no GPU, so these tests are skipped there (the reason says so). Run them on a CUDA
machine with ``pytest tests/test_cuda.py -p xdist -n 8 --dist load``; results are
recorded in docs/benchmarks.md. ``OPTORCH_TEST_DEVICE=cpu`` runs the same checks on the
CPU (to check the file itself without a GPU).
"""

from __future__ import annotations

import math
import os
from typing import Any

import pytest
import torch
from conftest import assert_trees_close, assert_trees_equal, clone_tree

import optorch
from optorch.amp import init_grad_scaler, scaled_step

DEVICE = os.environ.get("OPTORCH_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE.startswith("cuda") and not torch.cuda.is_available(),
    reason="needs a CUDA device (set OPTORCH_TEST_DEVICE=cpu to run these checks on the CPU)",
)

STEPS = 20
IMPLS = ("reference", "foreach", "compiled")

#: Shapes that reach every path of the engines: 0-d, empty, one element, odd sizes, a
#: matrix above the compiled engine's default size threshold, a non-contiguous view
#: (added in :func:`start_params`).
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "empty": (0,),
    "one": (1,),
    "bias": (7,),
    "matrix": (16, 9),
    "cube": (3, 4, 5),
    "large": (300, 257),
    "column": (25, 1),
}
#: Muon steps 2-D weights only.
MATRIX_SHAPES: dict[str, tuple[int, ...]] = {
    "square": (24, 24),
    "wide": (40, 64),
    "tall": (64, 40),
    "odd": (17, 33),
}

#: (registry name, hyperparameters): options away from the defaults where there are some.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {"max_lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("adam", {"max_lr": 0.01, "amsgrad": True, "weight_decay": 0.05}),
    ("adamw", {"max_lr": 0.01, "weight_decay": 0.1}),
    ("decoupled_adam", {"max_lr": 0.01, "weight_decay": 0.05}),
    ("lars", {"max_lr": 0.1, "weight_decay": 0.01, "trust_coefficient": 0.02}),
    ("lion", {"max_lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.99)}),
    ("lamb", {"max_lr": 0.01, "weight_decay": 0.01}),
    ("adafactor", {"max_lr": 0.01, "weight_decay": 0.01}),
    ("muon", {"max_lr": 0.02, "weight_decay": 0.1, "ns_dtype": None}),
    ("rmsprop", {"max_lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
    ("adagrad", {"max_lr": 0.05, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("adamax", {"max_lr": 0.01, "weight_decay": 0.01}),
    ("nadam", {"max_lr": 0.01, "weight_decay": 0.05, "decoupled_weight_decay": True}),
    ("radam", {"max_lr": 0.01, "weight_decay": 0.05, "decoupled_weight_decay": True}),
    ("schedule_free_adamw", {"max_lr": 0.01, "warmup_steps": 5, "weight_decay": 0.01}),
]
HYPER = dict(CASES)

#: float32 on the GPU against float64 on the CPU, after 20 steps (atol: state such as
#: RMSprop's momentum buffer reaches tens, where float32 rounding is ~1e-6)
F32_VS_F64 = {"rtol": 2e-5, "atol": 1e-5}
#: float32 against float32 (torch.optim on the same GPU)
F32_VS_F32 = {"rtol": 1e-5, "atol": 1e-6}


def start_params(
    seed: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str
) -> dict[str, torch.Tensor]:
    """Seeded standard-normal params (drawn in float64 on the CPU, then converted)."""
    generator = torch.Generator().manual_seed(seed)
    params = {
        name: torch.randn(shape, generator=generator, dtype=torch.float64)
        for name, shape in shapes.items()
    }
    if shapes is SHAPES:
        params["transposed"] = torch.randn(6, 5, generator=generator, dtype=torch.float64).t()
    return {name: p.to(dtype).to(device) for name, p in params.items()}


def grad_steps(seed: int, params: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """STEPS seeded gradient dicts shaped like ``params`` (float64, CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            name: torch.randn(p.shape, generator=generator, dtype=torch.float64)
            for name, p in params.items()
        }
        for _ in range(STEPS)
    ]


def on(tree: Any, dtype: torch.dtype, device: str) -> Any:
    return {
        k: (
            {n: t.to(device=device, dtype=dtype) for n, t in v.items()}
            if isinstance(v, dict)
            else v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        )
        for k, v in tree.items()
    }


def shapes_for(name: str) -> dict[str, tuple[int, ...]]:
    return MATRIX_SHAPES if name == "muon" else SHAPES


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "hyper"), CASES, ids=[c[0] for c in CASES])
def test_every_impl_on_gpu_equals_cpu_float64_reference(
    name: str, hyper: dict[str, Any], impl: str, inplace: bool
) -> None:
    start = start_params(3, shapes_for(name), torch.float64, "cpu")
    grads = grad_steps(4, start)
    reference = optorch.get_optimizer(name, **hyper, impl="reference", inplace=False)
    ref_params, ref_state = clone_tree(start), reference.init(start)
    candidate = optorch.get_optimizer(name, **hyper, impl=impl, inplace=inplace)
    params = on(start, torch.float32, DEVICE)
    if "transposed" in start:
        params["transposed"] = params["transposed"].t().contiguous().t()  # keep it a view
        assert not params["transposed"].is_contiguous()
    state = candidate.init(params)
    for k, grad in enumerate(grads):
        what = f"{name} {impl} inplace={inplace} step {k + 1}"
        device_grad = on(grad, torch.float32, DEVICE)
        before = clone_tree([params, device_grad, state])
        new_params, new_state = candidate.step(params, device_grad, state)
        if inplace:
            assert all(new_params[n] is params[n] for n in params), f"{what}: params replaced"
        else:
            assert_trees_equal([params, device_grad, state], before, what=f"{what} inputs")
        params, state = new_params, new_state
        ref_params, ref_state = reference.step(ref_params, grad, ref_state)
        for n, p in params.items():
            assert p.device.type == torch.device(DEVICE).type, f"{what}: {n} on {p.device}"
            assert p.dtype == torch.float32, f"{what}: {n} is {p.dtype}"
        assert_trees_close(
            on(params, torch.float64, "cpu"), ref_params, **F32_VS_F64, what=f"{what} params"
        )
        assert sorted(state) == sorted(ref_state), what
        for field, value in ref_state.items():
            ours = state[field]
            if isinstance(value, dict):
                ours = {n: t.to("cpu", torch.float64) for n, t in ours.items()}
            else:
                ours = ours.to("cpu", value.dtype)
            assert_trees_close(ours, value, **F32_VS_F64, what=f"{what} state {field!r}")


# torch.optim on the same device ----------------------------------------------------------

#: registry name -> (torch.optim class, optorch state field -> torch state key)
TWINS: dict[str, tuple[str, dict[str, str]]] = {
    "sgd": ("SGD", {"momentum": "momentum_buffer"}),
    "adam": ("Adam", {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
    "adamw": ("AdamW", {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
    "adafactor": (
        "Adafactor",
        {"row_var": "row_var", "col_var": "col_var", "variance": "variance"},
    ),
    "muon": ("Muon", {"momentum": "momentum_buffer"}),
    "rmsprop": (
        "RMSprop",
        {"square_avg": "square_avg", "momentum_buffer": "momentum_buffer", "grad_avg": "grad_avg"},
    ),
    "adagrad": ("Adagrad", {"sum": "sum"}),
    "adamax": ("Adamax", {"exp_avg": "exp_avg", "exp_inf": "exp_inf"}),
    "nadam": ("NAdam", {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
    "radam": ("RAdam", {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}),
}
#: Looser than F32_VS_F32 where the rule amplifies float32 rounding: Muon's bfloat16
#: matmuls round differently once their inputs differ in the last bit (the compiled
#: kernel fuses the momentum average differently); centered RMSprop takes the square root
#: of ``E[g^2] - E[g]^2``, which cancels on some of 77,100 elements.
TWIN_TOLERANCE: dict[tuple[str, str], dict[str, float]] = {
    ("muon", "compiled"): {"rtol": 1e-3, "atol": 1e-4},
    ("rmsprop", ""): {"rtol": 1e-4, "atol": 1e-5},
}
#: torch.optim classes with a fused (single-kernel) CUDA step (Adagrad's is CPU-only)
FUSED = {"SGD", "Adam", "AdamW"}


def torch_kwargs(name: str) -> dict[str, Any]:
    """The case's hyperparameters under torch.optim's names (the same, lr aside)."""
    hyper = {("lr" if k == "max_lr" else k): v for k, v in HYPER[name].items()}
    if name == "muon":
        hyper.pop("ns_dtype")  # torch.optim.Muon always iterates in bfloat16
    return hyper


def twin_variants() -> list[Any]:
    out = []
    for name, (cls, _) in TWINS.items():
        kinds = ["loop"] if name == "muon" else ["foreach", *(["fused"] if cls in FUSED else [])]
        for kind in kinds:
            for impl in ("foreach", "compiled"):
                out.append(pytest.param(name, kind, impl, id=f"{name}-torch_{kind}-{impl}"))
    return out


@pytest.mark.parametrize(("name", "torch_kind", "impl"), twin_variants())
def test_matches_torch_optim_on_the_same_device(name: str, torch_kind: str, impl: str) -> None:
    cls, fields = TWINS[name]
    hyper = dict(HYPER[name])
    if name == "muon":
        hyper["ns_dtype"] = torch.bfloat16  # as torch.optim.Muon
    params = start_params(5, shapes_for(name), torch.float32, DEVICE)
    params.pop("transposed", None)
    if name == "adafactor":
        params.pop("empty")  # torch.optim.Adafactor's step fails on an empty tensor
    grads = [on(g, torch.float32, DEVICE) for g in grad_steps(6, params)]
    tensors = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    kind = {"foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {}}[torch_kind]
    reference = getattr(torch.optim, cls)(list(tensors.values()), **torch_kwargs(name), **kind)
    optimizer = optorch.get_optimizer(name, **hyper, impl=impl)
    state = optimizer.init(params)
    tolerance = TWIN_TOLERANCE.get((name, impl), TWIN_TOLERANCE.get((name, ""), F32_VS_F32))
    for k, grad in enumerate(grads):
        for n, t in tensors.items():
            t.grad = grad[n].clone()
        reference.step()
        params, state = optimizer.step(params, grad, state)
        what = f"{name} {impl} vs torch {torch_kind} step {k + 1}"
        expected = {n: t.detach() for n, t in tensors.items()}
        assert_trees_close(params, expected, **tolerance, what=f"{what} params")
        for ours, theirs in fields.items():
            if ours not in state:
                continue
            torch_state = {
                n: reference.state[t][theirs]
                for n, t in tensors.items()
                if isinstance(reference.state[t].get(theirs), torch.Tensor)
            }
            assert torch_state, f"{what}: torch keeps no {theirs!r}"
            mine = {n: state[ours][n] for n in torch_state}
            assert_trees_close(mine, torch_state, **tolerance, what=f"{what} {ours}")
        assert int(state["step"]) == k + 1


# mixed precision ---------------------------------------------------------------------------

POISON = {4: math.inf, 5: math.inf, 13: -math.inf, 9: math.nan}


@pytest.mark.parametrize("impl", ["foreach", "compiled"])
def test_scaled_step_follows_torch_grad_scaler_on_gpu(impl: str) -> None:
    init_scale, interval = 16.0, 3
    params = start_params(7, {"w": (64, 33), "b": (33,)}, torch.float32, DEVICE)
    generator = torch.Generator().manual_seed(8)
    sequence = []
    for step in range(30):
        grads = {k: torch.randn(p.shape, generator=generator).to(DEVICE) for k, p in params.items()}
        if step in POISON:
            grads["w"][3, 7] = POISON[step]
        sequence.append(grads)
    tensors = [torch.nn.Parameter(p.clone()) for p in params.values()]
    torch_opt = torch.optim.AdamW(tensors, lr=1e-2, weight_decay=0.1)
    torch_scaler = torch.amp.GradScaler(DEVICE, init_scale=init_scale, growth_interval=interval)
    opt = optorch.get_optimizer("adamw", max_lr=1e-2, weight_decay=0.1, impl=impl)
    state = opt.init(params)
    scaler = init_grad_scaler(
        init_scale=init_scale, growth_interval=interval, precision="fp16", device=DEVICE
    )
    skipped, torch_skipped, scales, torch_scales = set(), set(), [], []
    for step, grads in enumerate(sequence):
        before = [t.detach().clone() for t in tensors]
        for t, g in zip(tensors, grads.values(), strict=True):
            t.grad = torch_scaler.scale(g)
        torch_scaler.step(torch_opt)
        torch_scaler.update()
        torch_scales.append(torch_scaler.get_scale())
        if all(torch.equal(t.detach(), b) for t, b in zip(tensors, before, strict=True)):
            torch_skipped.add(step)
        scaled = {k: g * scaler["scale"] for k, g in grads.items()}
        out = scaled_step(opt, params, scaled, state, scaler)
        params, state, scaler = out.params, out.opt_state, out.scaler_state
        scales.append(float(scaler["scale"]))
        if bool(out.found_inf):
            skipped.add(step)
    assert skipped == torch_skipped == set(POISON)
    assert scales == torch_scales
    expected = dict(zip(params, (t.detach() for t in tensors), strict=True))
    assert_trees_close(params, expected, **F32_VS_F32, what="params")
    for n, t in zip(params, tensors, strict=True):
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(state[field][n], torch_opt.state[t][field], **F32_VS_F32)


# a compiled training step ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_training_step_compiles_fullgraph_on_gpu(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    model = model.to(DEVICE)
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(128, 32, generator=generator).to(DEVICE)
    y = torch.randn(128, 1, generator=generator).to(DEVICE)
    opt = optorch.get_optimizer(name, **HYPER[name], impl="foreach", inplace=False)

    def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return ((torch.func.functional_call(model, params, (x,)) - y) ** 2).mean()

    def train_step(params: Any, state: Any) -> Any:
        grads, loss = torch.func.grad_and_value(loss_fn)(params)
        params, state = opt.step(params, grads, state)
        return params, state, loss

    compiled = torch.compile(train_step, fullgraph=True)
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    eager_params, eager_state = start, opt.init(start)
    params, state = clone_tree(start), opt.init(start)
    losses = []
    for k in range(12):
        eager_params, eager_state, eager_loss = train_step(eager_params, eager_state)
        params, state, loss = compiled(params, state)
        losses.append(float(loss))
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert_trees_close(params, eager_params, **F32_VS_F32, what=f"{name} step {k + 1}")
    assert losses[-1] < losses[0], losses


# no host synchronisation -------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_steps_never_wait_for_the_device(name: str, impl: str) -> None:
    """A step queues its kernels and returns: no host-device synchronisation (a copy of
    per-step values from pageable memory, a ``.item()``), which would stall the host
    until the GPU has finished all earlier work, every step. (On the H200 run LAMB's and
    RAdam's foreach steps failed here: ``_foreach_add_`` given a 0-d device tensor reads
    it to the host. Fixed after that run and checked on the CPU by
    tests/test_engine_paths.py; not re-run on a GPU since.)"""
    if not torch.device(DEVICE).type == "cuda":
        pytest.skip("a CPU step has no device to wait for")
    params = start_params(11, shapes_for(name), torch.float32, DEVICE)
    grads = on(grad_steps(12, params)[0], torch.float32, DEVICE)
    optimizer = optorch.get_optimizer(name, **HYPER[name], impl=impl)
    state = optimizer.init(params)
    for _ in range(2):  # the first steps compile, and create state fields
        params, state = optimizer.step(params, grads, state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            params, state = optimizer.step(params, grads, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(state["step"]) == 5


# CUDA graphs (optorch.graphs) ------------------------------------------------------------


@pytest.mark.parametrize("impl", ["compiled", "foreach"])
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_graph_replays_equal_plain_steps(name: str, impl: str) -> None:
    """In-place steps replayed as CUDA graphs (new grad tensors every step, an
    lr schedule, an injected lr, a skip that alternates) equal the same steps without
    graphs; the
    replays never wait for the device. Not yet run on a GPU: written without one."""
    if not torch.device(DEVICE).type == "cuda":
        pytest.skip("CUDA graphs need a CUDA device (tests/test_graphs.py emulates them)")
    from optorch import graphs
    from optorch.schedule import step_decay

    graphs.clear()
    optimizer = optorch.get_optimizer(
        name, **HYPER[name], impl=impl, schedule=step_decay(step_size=5, gamma=0.5)
    )
    start = start_params(21, shapes_for(name), torch.float32, DEVICE)
    plain, graphed = clone_tree(start), clone_tree(start)
    plain_state, graphed_state = optimizer.init(plain), optimizer.init(graphed)
    sequence = grad_steps(22, start)
    before = graphs.stats()
    for k, grads in enumerate(sequence):
        grads = on(grads, torch.float32, DEVICE)
        skip = torch.tensor(k % 7 == 3, device=DEVICE)
        lr = {"max_lr": torch.tensor(HYPER[name]["max_lr"] / (1 + k % 4), device=DEVICE)}
        optimizer.step(plain, grads, plain_state, skip_if=skip, hyper_overrides=lr)
        with graphs.enabled():
            if k >= STEPS - 3:  # recorded, replayed since: no waiting now
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            try:
                optimizer.step(
                    graphed,
                    clone_tree(grads),
                    graphed_state,
                    skip_if=skip.clone(),
                    hyper_overrides={"max_lr": lr["max_lr"].clone()},
                )
            finally:
                torch.cuda.set_sync_debug_mode("default")
    after = graphs.stats()
    assert after["failed"] == before["failed"]
    # new grads every step: recorded on them, then once more on grads of its own
    assert after["replayed"] - before["replayed"] == STEPS - 2
    assert_trees_close(graphed, plain, **F32_VS_F32, what=f"{name} params")
    assert_trees_close(graphed_state, plain_state, **F32_VS_F32, what=f"{name} state")
    graphs.clear()


#: the optimizers torch.optim has whose rules read each param's own count
PER_PARAM_COUNTS: list[tuple[str, str, dict[str, Any]]] = [
    ("adam", "Adam", {"amsgrad": True, "weight_decay": 0.05}),
    ("nadam", "NAdam", {"decoupled_weight_decay": True, "weight_decay": 0.05}),
    ("radam", "RAdam", {"weight_decay": 0.05}),
    ("adagrad", "Adagrad", {"lr_decay": 0.01}),
    ("adafactor", "Adafactor", {}),
    # a damped buffer's first step is undamped: SGD reads the count then
    ("sgd", "SGD", {"momentum": 0.9, "dampening": 0.5}),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("name", "torch_name", "options"), PER_PARAM_COUNTS)
def test_params_sitting_out_steps_keep_their_own_counts_on_the_device(
    name: str, torch_name: str, options: dict[str, Any], impl: str
) -> None:
    """On a GPU the counts are never read on the host: each lagging param runs with its
    own count as a device tensor. Against torch.optim (single-tensor) on the same device,
    with "b" sitting out every third step and "c" its first four."""
    gen = torch.Generator().manual_seed(21)
    shapes = {"w": (16, 9), "b": (7,), "c": (300, 257)}
    start = {k: torch.randn(s, generator=gen).to(DEVICE) for k, s in shapes.items()}
    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    reference = getattr(torch.optim, torch_name)(
        list(theirs.values()), lr=0.01, foreach=False, **options
    )
    opt = optorch.get_optimizer(name, max_lr=0.01, impl=impl, **options)
    params = {k: v.clone() for k, v in start.items()}
    state = opt.init(params)
    state["step"] = state["step"].to(DEVICE)
    for step in range(STEPS):
        grads: dict[str, Any] = {
            k: torch.randn(s, generator=gen).to(DEVICE) for k, s in shapes.items()
        }
        grads["b"] = None if step % 3 == 1 else grads["b"]
        grads["c"] = None if step < 4 else grads["c"]
        for k, p in theirs.items():
            p.grad = None if grads[k] is None else grads[k].clone()
        reference.step()
        params, state = opt.step(params, grads, state)
    for k, p in theirs.items():
        torch.testing.assert_close(params[k], p.detach(), rtol=1e-5, atol=1e-6)
        own = STEPS - int(state["skipped_steps"][k])
        if "step" in reference.state[p]:  # torch's SGD keeps none
            assert own == int(reference.state[p]["step"])


@pytest.mark.parametrize("impl", IMPLS)
def test_nadam_with_beta1_cycled_by_onecycle_matches_torch_on_the_device(impl: str) -> None:
    """NAdam's running mu_product through TorchOptimizer on the device, against
    torch.optim.NAdam under OneCycleLR(cycle_momentum=True)."""
    gen = torch.Generator().manual_seed(23)
    shapes = {"w": (16, 9), "c": (300, 257)}
    start = {k: torch.randn(s, generator=gen).to(DEVICE) for k, s in shapes.items()}
    flag = {"reference": False, "foreach": True, "compiled": None}[impl]
    runs = []
    for make in (
        lambda p: optorch.TorchOptimizer(
            p, "nadam", lr=0.01, foreach=flag, fused=impl == "compiled"
        ),
        lambda p: torch.optim.NAdam(p, lr=0.01, foreach=False),
    ):
        params = [torch.nn.Parameter(v.clone()) for v in start.values()]
        optimizer = make(params)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.02, total_steps=STEPS)
        data = torch.Generator().manual_seed(24)
        for _ in range(STEPS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=data).to(DEVICE)
            optimizer.step()
            scheduler.step()
        runs.append(params)
    for ours, theirs in zip(*runs, strict=True):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace", [True, False])
def test_complex_params_match_torch_optim_on_the_device(impl: str, inplace: bool) -> None:
    gen = torch.Generator().manual_seed(22)
    shapes = {"w": (16, 9), "big": (300, 257), "s": ()}
    start = {
        k: torch.randn(s, dtype=torch.complex64, generator=gen).to(DEVICE)
        for k, s in shapes.items()
    }
    theirs = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    reference = torch.optim.AdamW(list(theirs.values()), lr=0.01, weight_decay=0.1, foreach=False)
    opt = optorch.get_optimizer("adamw", max_lr=0.01, weight_decay=0.1, impl=impl, inplace=inplace)
    params = {k: v.clone() for k, v in start.items()}
    state = opt.init(params)
    for _ in range(STEPS):
        grads = {
            k: torch.randn(s, dtype=torch.complex64, generator=gen).to(DEVICE)
            for k, s in shapes.items()
        }
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        reference.step()
        params, state = opt.step(params, grads, state)
    for k, p in theirs.items():
        real = torch.view_as_real
        torch.testing.assert_close(real(params[k]), real(p.detach()), rtol=1e-5, atol=1e-6)
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                real(state[field][k]), real(reference.state[p][field]), rtol=1e-5, atol=1e-6
            )


def test_accumulate_with_none_gradients_runs_without_a_sync_on_the_device() -> None:
    """On an accelerator the flags of which leaves had a gradient are not read (that
    would sync): a None gradient counts as zero, and no step syncs with the host."""
    if DEVICE == "cpu":
        pytest.skip("a CPU step has no device to wait for")
    opt = optorch.wrappers.accumulate(optorch.get_optimizer("adamw", max_lr=0.05), every=2)
    params = {"expert": torch.ones(4, device=DEVICE), "shared": torch.ones(3, device=DEVICE)}
    state = opt.init(params)
    assert state["count"].device == params["shared"].device
    params, state = opt.step(params, {k: torch.ones_like(v) for k, v in params.items()}, state)
    torch.cuda.synchronize()  # the first step creates state fields
    torch.cuda.set_sync_debug_mode("error")
    try:
        for micro in range(6):
            grads = {
                "expert": None if micro % 2 else torch.ones(4, device=DEVICE),
                "shared": torch.ones(3, device=DEVICE),
            }
            params, state = opt.step(params, grads, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(state["inner"]["step"]) == 3  # 7 calls, every=2
