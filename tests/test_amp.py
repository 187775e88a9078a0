"""optorch.amp: dynamic loss scaling checked against torch.amp.GradScaler.

References used here, all independent of optorch: ``torch.amp.GradScaler`` driving the
``torch.optim`` twin of each optimizer, and torch's own kernels for the scale update
(``torch._amp_update_scale_``) and for unscaling
(``torch._amp_foreach_non_finite_check_and_unscale_``).
"""

from __future__ import annotations

import builtins
import copy
import functools
import itertools
import math
import pathlib
import re
from typing import Any

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import optorch
from optorch.amp import (
    PRECISIONS,
    init_grad_scaler,
    inverse_scale,
    needs_loss_scaling,
    next_scaler_state,
    parse_precision,
    scale_loss,
    scaled_step,
    unscale_grads,
    update_scale,
)
from optorch.tree import flatten

INF, NAN = math.inf, math.nan
STEPS = 60
#: step index -> the value planted in one gradient entry at that step
POISON = {5: INF, 6: INF, 17: INF, 30: -INF, 11: NAN, 40: NAN}
SHAPES = {"w": (3, 4), "b": (4,)}


def _clone(tree: Any) -> Any:
    return copy.deepcopy(tree)


def _assert_trees_equal(actual: Any, expected: Any) -> None:
    """Bit-identical leaves (NaN == NaN), same structure."""
    a_paths, a_leaves, _ = flatten(actual)
    e_paths, e_leaves, _ = flatten(expected)
    assert a_paths == e_paths
    for path, a, e in zip(a_paths, a_leaves, e_leaves, strict=True):
        if not isinstance(e, torch.Tensor):  # None, or a scaler's float/int/dtype entry
            assert type(a) is type(e) and a == e, path
            continue
        assert a.dtype == e.dtype, path
        assert torch.equal(a.view(-1).view(torch.uint8), e.view(-1).view(torch.uint8)), path


def _grad_sequence(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Unscaled gradients per step, with inf/NaN planted at the POISON steps."""
    generator = torch.Generator().manual_seed(seed)
    sequence = []
    for step in range(STEPS):
        grads = {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()}
        if step in POISON:
            grads["w"][1, 2] = POISON[step]
        sequence.append(grads)
    return sequence


def _initial_params(seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=generator) for k, s in SHAPES.items()}


# --------------------------------------------------------------------------------------
# 1. the whole loop against torch.amp.GradScaler + torch.optim
# --------------------------------------------------------------------------------------

# (registry name, optorch hyperparameters, torch.optim factory, optorch field -> torch key)
TWINS = [
    (
        "adamw",
        {"max_lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1},
        lambda ps: torch.optim.AdamW(
            ps, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, foreach=False
        ),
        {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"},
    ),
    (
        "sgd",
        {"max_lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False),
        {"momentum": "momentum_buffer"},
    ),
]


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize(
    ("name", "hyper", "make_torch_opt", "field_map"), TWINS, ids=["adamw", "sgd"]
)
def test_matches_torch_grad_scaler(
    name: str, hyper: dict[str, Any], make_torch_opt: Any, field_map: dict[str, str], inplace: bool
) -> None:
    init_scale, interval = 16.0, 3
    grad_sequence = _grad_sequence()
    start = _initial_params()

    torch_params = [torch.nn.Parameter(start[k].clone()) for k in SHAPES]
    torch_opt = make_torch_opt(torch_params)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=interval)

    opt = optorch.get_optimizer(name, **hyper, inplace=inplace, impl="reference")
    params = _clone(start)
    opt_state = opt.init(params)
    scaler = init_grad_scaler(init_scale=init_scale, growth_interval=interval, precision="fp16")

    torch_scales, scales, torch_skipped, skipped = [], [], set(), set()
    for step, grads in enumerate(grad_sequence):
        assert float(scaler["scale"]) == torch_scaler.get_scale(), step
        # the gradients that backward of a scaled loss gives, scaled by each side
        scaled = {k: g * scaler["scale"] for k, g in grads.items()}
        before = [p.detach().clone() for p in torch_params]
        for p, k in zip(torch_params, SHAPES, strict=True):
            p.grad = torch_scaler.scale(grads[k])
            _assert_trees_equal(p.grad, scaled[k])
        torch_scaler.step(torch_opt)
        torch_scaler.update()
        torch_scales.append(torch_scaler.get_scale())
        if all(torch.equal(p.detach(), b) for p, b in zip(torch_params, before, strict=True)):
            torch_skipped.add(step)

        params_before = _clone(params)
        out = scaled_step(opt, params, scaled, opt_state, scaler)
        params, opt_state, scaler = out.params, out.opt_state, out.scaler_state
        scales.append(float(scaler["scale"]))
        if bool(out.found_inf):
            skipped.add(step)
            _assert_trees_equal(params, params_before)

    assert skipped == set(POISON) == torch_skipped
    assert scales == torch_scales
    # the sequence exercised both directions of the rule
    assert max(scales) >= init_scale * 2**8 and any(b < a for a, b in itertools.pairwise(scales))
    assert int(opt_state["step"]) == STEPS - len(POISON)
    for p, k in zip(torch_params, SHAPES, strict=True):
        torch.testing.assert_close(params[k], p.detach(), atol=1e-6, rtol=1e-5)
        torch_state = torch_opt.state[p]
        for ours, theirs in field_map.items():
            torch.testing.assert_close(
                opt_state[ours][k], torch_state[theirs], atol=1e-6, rtol=1e-5
            )
        if "step" in torch_state:
            assert float(torch_state["step"]) == int(opt_state["step"])


# (scale, tracker, found_inf, growth_factor, backoff_factor, growth_interval)
UPDATE_CASES = [
    (65536.0, 0, 0.0, 2.0, 0.5, 2000),
    (65536.0, 1999, 0.0, 2.0, 0.5, 2000),
    (1.3, 2, 0.0, 1.7, 0.3, 3),  # odd factors: the float64-then-float32 rounding
    (1.3, 1, 1.0, 1.7, 0.3, 3),
    (1.3, 1, NAN, 1.7, 0.3, 3),  # a NaN flag counts as an overflow
    (3.0e38, 2, 0.0, 2.0, 0.5, 3),  # never grows into inf, tracker still resets
    (2.0**-20, 0, 0.0, 3.0, 0.25, 1),
    (0.1, 4, 0.0, 1.000001, 0.999999, 5),
]


@pytest.mark.parametrize("case", UPDATE_CASES)
def test_update_matches_torch_kernel(case: tuple[Any, ...]) -> None:
    scale, tracker, found, growth, backoff, interval = case
    expected_scale = torch.tensor(scale, dtype=torch.float32)
    expected_tracker = torch.tensor(tracker, dtype=torch.int32)
    torch._amp_update_scale_(
        expected_scale, expected_tracker, torch.tensor(found), growth, backoff, interval
    )
    state = init_grad_scaler(scale, growth, backoff, interval)
    state["growth_tracker"].fill_(tracker)
    snapshot = _clone(state)

    pure = next_scaler_state(state, torch.tensor(found))
    _assert_trees_equal(state, snapshot)  # the pure form left its input alone
    returned = update_scale(state, torch.tensor(found))
    assert returned is state
    from_flag = next_scaler_state(snapshot, bool(found) if not math.isnan(found) else found)
    for result in (pure, state, from_flag):
        _assert_trees_equal(result["scale"], expected_scale)
        _assert_trees_equal(result["growth_tracker"], expected_tracker)


def test_update_sequence_matches_torch_kernel() -> None:
    generator = torch.Generator().manual_seed(3)
    flags = (torch.rand(300, generator=generator) < 0.15).float()
    state = init_grad_scaler(
        init_scale=2.0**10, growth_factor=1.5, backoff_factor=0.6, growth_interval=2
    )
    scale = torch.tensor(2.0**10)
    tracker = torch.tensor(0, dtype=torch.int32)
    for flag in flags:
        torch._amp_update_scale_(scale, tracker, flag, 1.5, 0.6, 2)
        update_scale(state, flag)
        _assert_trees_equal(state["scale"], scale)
        _assert_trees_equal(state["growth_tracker"], tracker)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unscale_matches_torch_kernel(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(4)
    scaler = init_grad_scaler(init_scale=3.0 * 2**12)  # 1/S is inexact in binary
    grads = {
        "layer": [(torch.randn(5, generator=generator) * 3e4).to(dtype), None],
        "bias": (torch.randn(3, generator=generator) * 3e4).to(dtype),
    }
    expected = [grads["layer"][0].clone(), grads["bias"].clone()]
    found = torch.zeros(())
    torch._amp_foreach_non_finite_check_and_unscale_(
        expected, found, scaler["scale"].double().reciprocal().float()
    )
    unscaled, found_inf = unscale_grads(grads, scaler, None, dtype == torch.float16)
    assert unscaled["layer"][1] is None
    _assert_trees_equal([unscaled["layer"][0], unscaled["bias"]], expected)
    _assert_trees_equal(found_inf, found)
    assert found_inf.dtype == torch.float32 and found_inf.shape == ()
    _assert_trees_equal(inverse_scale(scaler), torch.tensor(1.0 / (3.0 * 2**12)))

    before = [grads["layer"][0], grads["bias"]]
    in_place, _ = unscale_grads(grads, scaler, allow_fp16=True, inplace=True)
    assert in_place["bias"] is before[1]
    _assert_trees_equal([in_place["layer"][0], in_place["bias"]], expected)


@pytest.mark.parametrize(
    ("value", "found"),
    [(1.0, 0.0), (INF, 1.0), (-INF, 1.0), (NAN, 1.0), (3.0e38, 0.0)],
)
def test_found_inf_flags_inf_and_nan(value: float, found: float) -> None:
    """Seed defect 8: NaN must count as non-finite (the seed checked only inf)."""
    scaler = init_grad_scaler(init_scale=1.0)
    grads = [torch.ones(3), None, {"deep": torch.tensor([2.0, value])}]
    _, found_inf = unscale_grads(grads, scaler, "cpu")
    assert float(found_inf) == found
    update_scale(scaler, found_inf)
    # after a NaN the scale must back off, not keep growing
    assert float(scaler["scale"]) == (0.5 if found else 1.0)


def test_unscale_overflow_of_unscaled_value_is_caught() -> None:
    """A scale below 1 can push a finite scaled gradient to inf; that step is skipped."""
    scaler = init_grad_scaler(init_scale=0.5)
    _, found_inf = unscale_grads([torch.tensor([3.0e38])], scaler)
    assert float(found_inf) == 1.0


# --------------------------------------------------------------------------------------
# 2. a non-finite step changes nothing, in every mode
# --------------------------------------------------------------------------------------

# (inplace, impl, bad value): one compiled case (compiling costs seconds)
MODES = [
    (inplace, impl, bad)
    for inplace in (True, False)
    for impl in ("reference", "foreach")
    for bad in (INF, NAN)
] + [(True, "compiled", NAN)]


@pytest.mark.parametrize(
    ("inplace", "impl", "bad"), MODES, ids=[f"{i}-{m}-{b}" for i, m, b in MODES]
)
def test_nonfinite_step_is_bit_identical(inplace: bool, impl: str, bad: float) -> None:
    opt = optorch.get_optimizer(
        "adamw", max_lr=1e-2, weight_decay=0.1, amsgrad=True, inplace=inplace, impl=impl
    )
    params = _initial_params()
    opt_state = opt.init(params)
    scaler = init_grad_scaler(init_scale=2.0**8, growth_interval=100)
    for grads in _grad_sequence()[:3]:  # finite steps first, so the state is not zeros
        scaled = {k: g * scaler["scale"] for k, g in grads.items()}
        params, opt_state, scaler, found_inf = scaled_step(opt, params, scaled, opt_state, scaler)
        assert float(found_inf) == 0.0
    assert int(opt_state["step"]) == 3 and int(scaler["growth_tracker"]) == 3

    params_before, state_before, scaler_before = _clone(params), _clone(opt_state), _clone(scaler)
    grads = {k: torch.full(s, 2.0) for k, s in SHAPES.items()}
    grads["b"][0] = bad  # one entry of one leaf is enough to skip the whole step
    out = scaled_step(opt, params, grads, opt_state, scaler)

    assert float(out.found_inf) == 1.0
    _assert_trees_equal(out.params, params_before)
    _assert_trees_equal(out.opt_state, state_before)
    assert int(out.opt_state["step"]) == 3
    assert float(out.scaler_state["scale"]) == 2.0**7
    assert int(out.scaler_state["growth_tracker"]) == 0
    if inplace:  # the scaler follows the optimizer's mode
        assert out.scaler_state is scaler and out.params["w"] is params["w"]
    else:
        _assert_trees_equal(scaler, scaler_before)
        _assert_trees_equal(params, params_before)


def test_scaled_step_accepts_any_stepper() -> None:
    """Anything with ``.step(params, grads, state, skip_if=...)`` works, wrappers included."""
    inner = optorch.get_optimizer("sgd", max_lr=0.5, momentum=0.0)
    seen: list[Any] = []

    class Recording:
        def step(self, params: Any, grads: Any, state: Any, *, skip_if: Any) -> Any:
            seen.append(skip_if)
            return inner.step(params, grads, state, skip_if=skip_if)

    params = {"w": torch.ones(2)}
    scaler = init_grad_scaler(init_scale=4.0)
    out = scaled_step(
        Recording(), params, {"w": torch.tensor([4.0, 8.0])}, inner.init(params), scaler
    )
    torch.testing.assert_close(out.params["w"], torch.tensor([0.5, 0.0]), atol=0, rtol=0)
    assert seen[0].dtype == torch.bool and seen[0].shape == () and not bool(seen[0])
    assert out.scaler_state is scaler  # no config: in place, like the seed


# --------------------------------------------------------------------------------------
# 3. a whole train step under torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _batches(count: int, seed: int = 5) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(16, 4, generator=generator)
        out.append((x, x.sum(dim=1, keepdim=True).sin()))
    return out


# aot_eager also runs AOTAutograd's functionalization of the in-place writes; inductor
# would add its code generation but costs about a minute to compile on 2 CPU cores
@pytest.mark.parametrize(
    ("inplace", "backend"), [(True, "aot_eager"), (False, "eager")], ids=["inplace", "pure"]
)
def test_train_step_compiles_fullgraph_and_matches_eager(inplace: bool, backend: str) -> None:
    model = _mlp()
    opt = optorch.get_optimizer("adamw", max_lr=1e-2, weight_decay=0.1, inplace=inplace)

    def loss_of(params: Any, x: torch.Tensor, y: torch.Tensor, scaler: Any) -> torch.Tensor:
        prediction = torch.func.functional_call(model, params, (x,))
        return scale_loss(((prediction - y) ** 2).mean(), scaler)

    def train_step(params: Any, opt_state: Any, scaler: Any, x: Any, y: Any) -> Any:
        grads = torch.func.grad(loss_of)(params, x, y, scaler)
        return scaled_step(opt, params, grads, opt_state, scaler)

    counter = CompileCounterWithBackend(backend)
    compiled_step = torch.compile(train_step, backend=counter, fullgraph=True)
    batches = _batches(6)
    batches[2][0][0, 0] = NAN  # a poisoned batch: skipped inside the graph

    results = []
    for step_fn in (train_step, compiled_step):
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt_state = opt.init(params)
        scaler = init_grad_scaler(init_scale=2.0**4, growth_interval=2)
        flags = []
        for x, y in batches:
            params, opt_state, scaler, found_inf = step_fn(params, opt_state, scaler, x, y)
            flags.append(float(found_inf))
        results.append((params, opt_state, scaler, flags))

    assert counter.frame_count == 1  # one graph, no break, no recompilation
    (eager_p, eager_s, eager_scaler, eager_flags), (comp_p, comp_s, comp_scaler, flags) = results
    assert eager_flags == flags == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert int(comp_s["step"]) == int(eager_s["step"]) == 5
    _assert_trees_equal(comp_scaler, eager_scaler)
    assert float(comp_scaler["scale"]) == 2.0**5  # 16 -> 16 -> 8 (skip) -> 8 -> 16 -> 16 -> 32
    for name in eager_p:
        torch.testing.assert_close(comp_p[name], eager_p[name], atol=1e-6, rtol=1e-5)
        for field in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                comp_s[field][name], eager_s[field][name], atol=1e-6, rtol=1e-5
            )


# --------------------------------------------------------------------------------------
# 4. CPU autocast training loops
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "init_scale"),
    [("bf16", 1.0), ("fp16", 2.0**16)],
    ids=["bf16-autocast", "fp16-autocast"],
)
def test_autocast_training_loop(precision: str, init_scale: float) -> None:
    model = _mlp(seed=2)
    opt = optorch.get_optimizer("adamw", max_lr=2e-2)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt_state = opt.init(params)
    scaler = init_grad_scaler(init_scale=init_scale, growth_interval=5, precision=precision)
    x, y = _batches(1, seed=6)[0]

    def scaled_loss(params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=scaler["precision"]):
            prediction = torch.func.functional_call(model, params, (x,))
            assert prediction.dtype == scaler["precision"]
            loss = ((prediction - y) ** 2).mean()
        return scale_loss(loss, scaler), loss.detach().float()

    losses, skipped = [], 0
    for _ in range(40):
        grads, loss = torch.func.grad(scaled_loss, has_aux=True)(params)
        losses.append(float(loss))
        params, opt_state, scaler, found_inf = scaled_step(opt, params, grads, opt_state, scaler)
        skipped += int(found_inf)
    for name, tensor in params.items():
        assert tensor.dtype == torch.float32 and torch.isfinite(tensor).all(), name
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(opt_state["step"]) == 40 - skipped


def test_fp16_params_with_allow_fp16() -> None:
    """float16 params and grads directly (no master copy): needs allow_fp16=True."""
    generator = torch.Generator().manual_seed(7)
    target = torch.randn(8, generator=generator).half()
    params = {"w": torch.zeros(8, dtype=torch.float16)}
    opt = optorch.get_optimizer("sgd", max_lr=0.2, momentum=0.5)
    opt_state = opt.init(params)
    scaler = init_grad_scaler(init_scale=2.0**16, growth_interval=4, precision=torch.float16)

    def scaled_loss(params: Any) -> torch.Tensor:
        return scale_loss(((params["w"] - target) ** 2).sum().float(), scaler)

    first = float(((params["w"] - target) ** 2).sum())
    skipped = 0
    for _ in range(30):
        grads = torch.func.grad(scaled_loss)(params)
        assert grads["w"].dtype == torch.float16
        with pytest.raises(ValueError, match=r"grad at \['w'\] is float16"):
            scaled_step(opt, params, grads, opt_state, scaler)
        params, opt_state, scaler, found_inf = scaled_step(
            opt, params, grads, opt_state, scaler, allow_fp16=True
        )
        skipped += int(found_inf)
    last = float(((params["w"] - target) ** 2).sum())
    assert params["w"].dtype == torch.float16 and torch.isfinite(params["w"]).all()
    assert last < 0.05 * first
    # 2**16 times gradients of a few units overflows float16: the first steps back off
    assert skipped >= 1 and int(opt_state["step"]) == 30 - skipped


# --------------------------------------------------------------------------------------
# 5. bad arguments
# --------------------------------------------------------------------------------------

BAD_ARGS = [
    ({"init_scale": 0.0}, ValueError, r"init_scale: 0\.0 \(must be"),
    ({"init_scale": -1.0}, ValueError, r"init_scale: -1\.0"),
    ({"init_scale": INF}, ValueError, r"init_scale: inf"),
    ({"init_scale": NAN}, ValueError, r"init_scale: nan"),
    ({"init_scale": 1e39}, ValueError, r"init_scale: 1e\+39 \(must be finite in float32"),
    ({"init_scale": "big"}, TypeError, r"init_scale must be a number"),
    ({"growth_factor": 1.0}, ValueError, r"growth_factor: 1\.0 \(must be finite and > 1\)"),
    ({"growth_factor": 0.5}, ValueError, r"growth_factor: 0\.5"),
    ({"growth_factor": NAN}, ValueError, r"growth_factor: nan"),
    ({"backoff_factor": 1.0}, ValueError, r"backoff_factor: 1\.0 \(must be in \(0, 1\)\)"),
    ({"backoff_factor": 0.0}, ValueError, r"backoff_factor: 0\.0"),
    ({"backoff_factor": NAN}, ValueError, r"backoff_factor: nan"),
    ({"growth_interval": 0}, ValueError, r"growth_interval: 0 \(must be an int >= 1\)"),
    ({"growth_interval": 2.5}, ValueError, r"growth_interval: 2\.5"),
    ({"growth_interval": True}, ValueError, r"growth_interval: True"),
    ({"precision": "float64"}, ValueError, r"precision: 'float64' \(must be .*'bf16'"),
    ({"precision": torch.int8}, ValueError, r"precision: torch\.int8"),
    ({"precision": "__import__('os')"}, ValueError, r"precision: \"__import__"),
]


@pytest.mark.parametrize(("kwargs", "error", "message"), BAD_ARGS)
def test_bad_arguments(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        init_grad_scaler(**kwargs)


def test_bad_grads_and_state() -> None:
    scaler = init_grad_scaler()
    with pytest.raises(ValueError, match=r"grad at \['enc'\]\[1\] is float16.*allow_fp16"):
        unscale_grads({"enc": [torch.ones(2), torch.ones(2, dtype=torch.float16)]}, scaler)
    with pytest.raises(TypeError, match=r"grad at \[0\] must be a dense floating point"):
        unscale_grads([torch.ones(2, dtype=torch.int64)], scaler)
    with pytest.raises(KeyError, match=r"lacks.*growth_tracker"):
        update_scale({k: v for k, v in scaler.items() if k != "growth_tracker"}, torch.zeros(()))
    with pytest.raises(TypeError, match="must be the dict from init_grad_scaler"):
        scale_loss(torch.ones(()), [1.0])


# --------------------------------------------------------------------------------------
# 6. precision names (seed defect 8: dtype from a string, without eval) and loss scaling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "dtype"), sorted(PRECISIONS.items()))
def test_precision_names_need_no_eval(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("precision parsing must not evaluate code")

    monkeypatch.setattr(builtins, "eval", refuse)
    monkeypatch.setattr(builtins, "exec", refuse)
    assert init_grad_scaler(precision=name)["precision"] == dtype
    assert parse_precision(f"  {name.upper()} ") == dtype
    assert parse_precision(dtype) == dtype
    assert needs_loss_scaling(name) == (dtype == torch.float16)


def test_seed_defaults_and_layout() -> None:
    state = init_grad_scaler()
    assert set(state) == {
        "scale",
        "growth_factor",
        "backoff_factor",
        "growth_interval",
        "growth_tracker",
        "precision",
    }
    assert state["scale"].dtype == torch.float32 and state["scale"].shape == ()
    assert float(state["scale"]) == 2.0**16
    assert state["growth_tracker"].dtype == torch.int32 and int(state["growth_tracker"]) == 0
    assert (state["growth_factor"], state["backoff_factor"], state["growth_interval"]) == (
        2.0,
        0.5,
        2000,
    )
    assert state["precision"] == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_scale_loss(dtype: torch.dtype) -> None:
    scaler = init_grad_scaler(init_scale=2.0**16)
    loss = torch.tensor(3.0, dtype=dtype)
    scaled = scale_loss(loss, scaler)
    # a float16 loss is upcast: 3 * 2**16 is above float16's maximum of 65504
    assert scaled.dtype == torch.promote_types(dtype, torch.float32)
    assert float(scaled) == 3.0 * 2.0**16


# --------------------------------------------------------------------------------------
# the examples in docs/mixed_precision.md run as written
# --------------------------------------------------------------------------------------

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "mixed_precision.md"


def test_doc_examples_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) == 4
    # the graph is what the example shows; inductor's code generation is too slow here
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), {"__name__": "doc_example"})  # noqa: S102
    printed = capsys.readouterr().out
    bf16_loss = float(re.search(r"bf16 loss ([0-9.]+)", printed).group(1))  # type: ignore[union-attr]
    fp16_loss = float(re.search(r"fp16 loss ([0-9.]+)", printed).group(1))  # type: ignore[union-attr]
    assert bf16_loss < 0.8 and fp16_loss < 0.8, printed
