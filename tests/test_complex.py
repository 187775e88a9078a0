"""Complex params, taken as torch.optim takes them: each complex number two real coordinates.

* The optimizers torch.optim has (SGD, Adam, AdamW, Adagrad, Adamax, NAdam, RAdam,
  RMSprop) against their torch.optim classes on complex params: params AND state after
  each of 20 steps, complex64 and complex128, every impl, in place and pure, with a real
  param in the same step.
* The others that take complex params (LAMB, LARS, Lion, Schedule-Free AdamW; no
  reference package takes complex params) against themselves on the real view of the
  same numbers (``torch.view_as_real``), which their own reference tests verify; a
  complex vector stays a vector for LARS's ``exclude_1d``.
* Adafactor and Muon refuse complex params, as torch.optim does, naming the leaf and
  leaving params and state as they were.
* Wrappers (norms of complex gradients as torch.nn.utils.clip_grad_norm_ takes them,
  clipping and noise per coordinate, accumulation and averaging), torch.func,
  a user's torch.compile, conjugate-view gradients and the torch.optim interop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import optorch
from optorch import interop, wrappers

STEPS = 20
IMPLS = ("reference", "foreach", "compiled")
TOL = {
    torch.complex64: {"rtol": 2e-6, "atol": 2e-6},
    torch.complex128: {"rtol": 1e-12, "atol": 1e-12},
}
REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}

#: (optorch name, torch.optim class, options): every option that changes the rule
TORCH_CASES: list[tuple[str, type[torch.optim.Optimizer], dict[str, Any]]] = [
    ("sgd", torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("sgd", torch.optim.SGD, {"momentum": 0.8, "dampening": 0.3, "maximize": True}),
    ("adam", torch.optim.Adam, {"amsgrad": True, "weight_decay": 0.01}),
    ("adam", torch.optim.Adam, {"betas": (0.8, 0.95), "eps": 1e-6, "maximize": True}),
    ("adamw", torch.optim.AdamW, {"weight_decay": 0.1, "amsgrad": True}),
    (
        "adagrad",
        torch.optim.Adagrad,
        {"initial_accumulator_value": 0.1, "lr_decay": 0.01, "weight_decay": 0.01},
    ),
    ("adamax", torch.optim.Adamax, {"weight_decay": 0.01, "maximize": True}),
    ("nadam", torch.optim.NAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("nadam", torch.optim.NAdam, {"weight_decay": 0.01, "momentum_decay": 0.01}),
    ("radam", torch.optim.RAdam, {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("rmsprop", torch.optim.RMSprop, {"centered": True, "momentum": 0.9, "weight_decay": 0.01}),
    ("rmsprop", torch.optim.RMSprop, {"alpha": 0.9, "maximize": True}),
]

#: a matrix, a vector above the compiled engine's smallest tensor (65,536 elements once
#: seen as real), a small vector, a 0-d scalar
SHAPES = {"w": (4, 3), "big": (40_000,), "b": (5,), "s": ()}


def _lr(name: str) -> float:
    return {"sgd": 0.05, "adagrad": 0.1}.get(name, 0.01)


def _params(dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(shape, dtype=dtype, generator=gen) for k, shape in SHAPES.items()}
    out["real"] = torch.randn(6, dtype=REAL[dtype], generator=gen)  # mixed in the same step
    return out


def _grads(params: dict[str, torch.Tensor], seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(p.shape, dtype=p.dtype, generator=gen) for k, p in params.items()}
        for _ in range(STEPS)
    ]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: dict[str, float], what: str) -> None:
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    real_a = torch.view_as_real(actual.detach()) if actual.is_complex() else actual.detach()
    real_e = torch.view_as_real(expected.detach()) if expected.is_complex() else expected
    torch.testing.assert_close(real_a, real_e.detach(), **tol, msg=lambda m: f"{what}: {m}")


def _compiled_only_first(cases: list[Any]) -> list[Any]:
    """Every case in reference and foreach; compiled for each optimizer's first row, in
    complex64 (each compiled kernel is a few seconds of the suite)."""
    out = []
    seen: set[str] = set()
    for case in cases:
        first = case[0] not in seen
        seen.add(case[0])
        for dtype in (torch.complex64, torch.complex128):
            for impl in IMPLS:
                if impl == "compiled" and not (first and dtype == torch.complex64):
                    continue
                for inplace in (True, False):
                    out.append(pytest.param(case, dtype, impl, inplace))
    return out


def _case_id(case: Any) -> str:
    name, _, options = case
    return name + "-" + "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize(
    ("case", "dtype", "impl", "inplace"),
    _compiled_only_first(TORCH_CASES),
    ids=lambda v: _case_id(v) if isinstance(v, tuple) and len(v) == 3 else None,
)
def test_complex_params_match_torch_optim(
    case: tuple[str, type[torch.optim.Optimizer], dict[str, Any]],
    dtype: torch.dtype,
    impl: str,
    inplace: bool,
) -> None:
    name, torch_class, options = case
    lr = _lr(name)
    start = _params(dtype, seed=3)
    grads = _grads(start, seed=4)
    # torch keeps per-step scalars (the step, NAdam's mu_product) in the default dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(REAL[dtype])
    try:
        _run_against_torch(name, torch_class, options, lr, dtype, impl, inplace, start, grads)
    finally:
        torch.set_default_dtype(previous)


def _run_against_torch(
    name: str,
    torch_class: type[torch.optim.Optimizer],
    options: dict[str, Any],
    lr: float,
    dtype: torch.dtype,
    impl: str,
    inplace: bool,
    start: dict[str, torch.Tensor],
    grads: list[dict[str, torch.Tensor]],
) -> None:
    torch_params = {k: torch.nn.Parameter(p.clone()) for k, p in start.items()}
    reference = torch_class(list(torch_params.values()), lr=lr, foreach=False, **options)
    opt = optorch.get_optimizer(name, max_lr=lr, impl=impl, inplace=inplace, **options)
    params = {k: p.clone() for k, p in start.items()}
    state = opt.init(params)
    # fused kernels round float32 differently (as in the real-param reference tests)
    tol = (
        {"rtol": 1e-4, "atol": 1e-5}
        if (impl, dtype) == ("compiled", torch.complex64)
        else TOL[dtype]
    )
    for step, g in enumerate(grads, start=1):
        for k, p in torch_params.items():
            p.grad = g[k].clone()
        reference.step()
        params, state = opt.step(params, {k: v.clone() for k, v in g.items()}, state)
        for k, p in torch_params.items():
            _close(params[k], p, tol, f"step {step} param {k}")
            for field, value in reference.state[p].items():
                if field == "step" or field == "mu_product":
                    continue
                # SGD's buffer is "momentum" here (the seed's name); the rest as torch's
                mine = state["momentum" if name == "sgd" else field]
                _close(mine[k], value, tol, f"step {step} state {field!r} at {k}")
        assert int(state["step"]) == step


#: rules no reference package takes complex params for: checked on the real view
REAL_VIEW_CASES: list[tuple[str, dict[str, Any]]] = [
    ("lamb", {"weight_decay": 0.01}),
    ("lamb", {"clamp_value": 2.0, "maximize": True}),
    ("lars", {"weight_decay": 0.01, "momentum": 0.9, "exclude_1d": True}),
    ("lars", {"weight_decay": 0.01, "trust_coefficient": 0.01, "exclude_1d": False}),
    ("lion", {"weight_decay": 0.1, "betas": (0.9, 0.95)}),
    ("decoupled_adam", {"weight_decay": 0.01, "amsgrad": True}),
    ("schedule_free_adamw", {"weight_decay": 0.01, "warmup_steps": 3}),
]


def _real_view(z: torch.Tensor) -> torch.Tensor:
    """The same numbers as a real tensor with as many dims (a vector stays a vector): the
    real view of a matrix has one dim more, that of a vector is flattened back."""
    viewed = torch.view_as_real(z)
    return viewed.reshape(-1) if z.dim() <= 1 else viewed


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize(("name", "options"), REAL_VIEW_CASES, ids=lambda v: str(v))
def test_complex_params_match_the_same_rule_on_their_real_view(
    name: str, options: dict[str, Any], impl: str, inplace: bool
) -> None:
    start = {k: v for k, v in _params(torch.complex64, seed=5).items() if k != "real"}
    grads = _grads(start, seed=6)
    opt = optorch.get_optimizer(name, max_lr=0.01, impl=impl, inplace=inplace, **options)
    params = {k: p.clone() for k, p in start.items()}
    state = opt.init(params)
    real = {k: _real_view(p.clone()).clone() for k, p in start.items()}
    real_state = opt.init(real)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for step, g in enumerate(grads, start=1):
        params, state = opt.step(params, g, state)
        real, real_state = opt.step(real, {k: _real_view(v) for k, v in g.items()}, real_state)
        for k, p in params.items():
            assert p.dtype == torch.complex64
            _close(_real_view(p), real[k], tol, f"{name} step {step} param {k}")
            for field, value in state.items():
                if isinstance(value, dict):
                    _close(_real_view(value[k]), real_state[field][k], tol, f"{field} {k}")
                else:
                    _close(value, real_state[field], tol, f"{field}")


@pytest.mark.parametrize("name", ["adafactor", "muon"])
@pytest.mark.parametrize("inplace", [True, False])
def test_rules_that_need_real_params_refuse_complex_ones_and_change_nothing(
    name: str, inplace: bool
) -> None:
    opt = optorch.get_optimizer(name, max_lr=0.01, inplace=inplace)
    params = {"a": torch.randn(4, 3), "b": torch.randn(4, 3, dtype=torch.complex64)}
    state = opt.init(params)
    grads = {k: torch.randn_like(v) for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}
    state_before = {
        k: {i: t.clone() for i, t in v.items()} if isinstance(v, dict) else v.clone()
        for k, v in state.items()
    }
    with pytest.raises(TypeError, match=rf"{name}: param \['b'\] is complex \(torch.complex64\)"):
        opt.step(params, grads, state)
    for k, v in params.items():
        assert torch.equal(v, before[k])
    for k, v in state.items():
        if isinstance(v, dict):
            for i, t in v.items():
                assert t is None or torch.equal(t, state_before[k][i])
        else:
            assert torch.equal(v, state_before[k])


def _complex_grads(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": 3 * torch.randn(4, 3, dtype=torch.complex128, generator=gen),
        "b": torch.randn(5, dtype=torch.complex128, generator=gen),
        "r": torch.randn(2, dtype=torch.float64, generator=gen),
    }


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_by_global_norm_of_complex_grads_matches_clip_grad_norm(max_norm: float) -> None:
    grads = _complex_grads(0)
    tensors = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads.values()]
    for t, g in zip(tensors, grads.values(), strict=True):
        t.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(tensors, max_norm, foreach=False)
    clip = wrappers.clip_by_global_norm(max_norm)
    clipped, new_state, _ = clip.update(grads, clip.init(grads), grads)
    torch.testing.assert_close(new_state["grad_norm"], total, rtol=1e-12, atol=0)
    torch.testing.assert_close(wrappers.global_norm(list(grads.values())), total)
    for t, k in zip(tensors, grads, strict=True):
        assert t.grad is not None
        # torch clips by max_norm / (norm + 1e-6), as optorch does
        _close(clipped[k], t.grad, {"rtol": 1e-12, "atol": 1e-12}, k)


def test_clip_by_norm_per_param_and_by_value_take_complex_grads_as_two_coordinates() -> None:
    grads = _complex_grads(1)
    per = wrappers.clip_by_norm_per_param(1.0).update(grads, {}, grads)[0]
    for k, g in grads.items():
        norm = torch.sqrt((g.abs() ** 2).sum())
        expected = g * min(1.0, 1.0 / (float(norm) + 1e-6))
        _close(per[k], expected, {"rtol": 1e-12, "atol": 1e-12}, k)
    by_value = wrappers.clip_by_value(0.7).update(grads, {}, grads)[0]
    w = grads["w"]
    expected_w = torch.complex(w.real.clamp(-0.7, 0.7), w.imag.clamp(-0.7, 0.7))
    assert torch.equal(by_value["w"], expected_w)
    assert (by_value["w"].imag.abs() == 0.7).any() and (by_value["w"].real.abs() == 0.7).any()


def test_add_noise_gives_each_coordinate_of_a_complex_grad_its_own_noise() -> None:
    eta = 0.25
    noise = wrappers.add_noise(eta, gamma=0.0, seed=3)
    zeros = {"z": torch.zeros(200_000, dtype=torch.complex64)}
    out = noise.update(zeros, noise.init(zeros), zeros)[0]["z"]
    std = eta**0.5
    for part in (out.real, out.imag):
        assert abs(float(part.std()) / std - 1) < 0.01
        assert abs(float(part.mean())) < 0.01 * std
    # the two coordinates are independent, not one value twice
    assert abs(float(torch.corrcoef(torch.stack([out.real, out.imag]))[0, 1])) < 0.01


#: wrapped optimizers on complex params against the same wrapper on their real views
WRAPPED: dict[str, Callable[[], Any]] = {
    "accumulate": lambda: wrappers.accumulate(optorch.get_optimizer("adam", max_lr=0.01), every=3),
    "ema": lambda: wrappers.ema(optorch.get_optimizer("sgd", max_lr=0.1, momentum=0.9), 0.9),
    "lookahead": lambda: wrappers.lookahead(
        optorch.get_optimizer("adamw", max_lr=0.01), sync_period=3, alpha=0.5
    ),
    "chain": lambda: wrappers.chain(
        wrappers.clip_by_global_norm(1.0), optorch.get_optimizer("nadam", max_lr=0.01)
    ),
    "skip_nonfinite": lambda: wrappers.skip_nonfinite(optorch.get_optimizer("rmsprop")),
    "partition": lambda: wrappers.partition(
        {"w": "a", "b": "b"},
        {"a": optorch.get_optimizer("lamb", max_lr=0.01), "b": optorch.get_optimizer("radam")},
    ),
}


@pytest.mark.parametrize("wrapper", sorted(WRAPPED))
def test_wrappers_on_complex_params_match_their_real_views(wrapper: str) -> None:
    opt = WRAPPED[wrapper]()
    gen = torch.Generator().manual_seed(7)
    params = {
        "w": torch.randn(4, 3, dtype=torch.complex64, generator=gen),
        "b": torch.randn(5, dtype=torch.complex64, generator=gen),
    }
    real = {k: _real_view(v).clone() for k, v in params.items()}
    state, real_state = opt.init(params), opt.init(real)
    for step in range(12):
        g = {k: torch.randn(v.shape, dtype=v.dtype, generator=gen) for k, v in params.items()}
        if step == 5 and wrapper == "skip_nonfinite":
            g["b"][0] = complex(float("nan"), 0.0)
        params, state = opt.step(params, g, state)
        real, real_state = opt.step(real, {k: _real_view(v) for k, v in g.items()}, real_state)
        for k, p in params.items():
            _close(_real_view(p), real[k], {"rtol": 1e-5, "atol": 1e-6}, f"step {step} {k}")


def test_a_conjugate_view_gradient_is_read_as_its_values() -> None:
    opt = optorch.get_optimizer("adam", max_lr=0.1)
    z = torch.randn(6, dtype=torch.complex64)
    g = torch.randn(6, dtype=torch.complex64)
    a, b = {"z": z.clone()}, {"z": z.clone()}
    sa, sb = opt.init(a), opt.init(b)
    a, sa = opt.step(a, {"z": g.conj()}, sa)
    b, sb = opt.step(b, {"z": g.conj().resolve_conj()}, sb)
    assert torch.equal(a["z"], b["z"]) and torch.equal(sa["exp_avg"]["z"], sb["exp_avg"]["z"])


def test_torch_func_grad_and_vmap_through_a_pure_step_on_complex_params() -> None:
    opt = optorch.get_optimizer("adam", max_lr=0.1, inplace=False)
    gen = torch.Generator().manual_seed(8)
    z = torch.randn(5, dtype=torch.complex128, generator=gen)
    g = torch.randn(5, dtype=torch.complex128, generator=gen)

    def loss_after(lr: torch.Tensor, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        new, _ = opt.step({"p": p}, {"p": grad}, opt.init({"p": p}), hyper_overrides={"max_lr": lr})
        return (new["p"].abs() ** 2).sum()

    def real_loss_after(lr: torch.Tensor) -> torch.Tensor:
        p, grad = torch.view_as_real(z).reshape(-1), torch.view_as_real(g).reshape(-1)
        new, _ = opt.step({"p": p}, {"p": grad}, opt.init({"p": p}), hyper_overrides={"max_lr": lr})
        return (new["p"] ** 2).sum()

    lr = torch.tensor(0.1, dtype=torch.float64)
    hyper = torch.func.grad(loss_after)(lr, z, g)
    torch.testing.assert_close(hyper, torch.func.grad(real_loss_after)(lr), rtol=1e-12, atol=0)
    # the same as a central difference, in float64
    h = 1e-6
    numeric = (loss_after(lr + h, z, g) - loss_after(lr - h, z, g)) / (2 * h)
    torch.testing.assert_close(hyper, numeric, rtol=1e-6, atol=0)

    batch = torch.randn(3, 5, dtype=torch.complex128, generator=gen)
    batch_g = torch.randn(3, 5, dtype=torch.complex128, generator=gen)

    def one(p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        new, _ = opt.step({"p": p}, {"p": grad}, opt.init({"p": p}))
        return new["p"]

    mapped = torch.vmap(one)(batch, batch_g)
    looped = torch.stack([one(batch[i], batch_g[i]) for i in range(3)])
    _close(mapped, looped, {"rtol": 1e-12, "atol": 1e-12}, "vmap")


@pytest.mark.parametrize("inplace", [True, False])
def test_a_users_torch_compile_of_a_step_on_complex_params_matches_eager(inplace: bool) -> None:
    opt = optorch.get_optimizer("adamw", max_lr=0.1, inplace=inplace)
    gen = torch.Generator().manual_seed(9)
    start = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
    compiled_params, eager_params = {"w": start.clone()}, {"w": start.clone()}
    compiled_state, eager_state = opt.init(compiled_params), opt.init(eager_params)
    step = torch.compile(opt.step, fullgraph=True)
    for _ in range(4):
        g = {"w": torch.randn(4, 3, dtype=torch.complex64, generator=gen)}
        compiled_params, compiled_state = step(compiled_params, g, compiled_state)
        eager_params, eager_state = opt.step(eager_params, g, eager_state)
    _close(compiled_params["w"], eager_params["w"], {"rtol": 1e-5, "atol": 1e-6}, "compiled")


def test_torch_optimizer_twin_on_complex_params_matches_torch_and_its_state_loads_there() -> None:
    gen = torch.Generator().manual_seed(10)
    start = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
    theirs = torch.nn.Parameter(start.clone())
    ours = torch.nn.Parameter(start.clone())
    reference = torch.optim.AdamW([theirs], lr=0.01, weight_decay=0.1, foreach=False)
    twin = interop.TorchOptimizer([ours], "adamw", lr=0.01, weight_decay=0.1)
    for _ in range(10):
        g = torch.randn(4, 3, dtype=torch.complex64, generator=gen)
        theirs.grad, ours.grad = g.clone(), g.clone()
        reference.step()
        twin.step()
    _close(ours, theirs, TOL[torch.complex64], "param")
    saved = twin.state_dict()
    for field in ("exp_avg", "exp_avg_sq"):
        _close(
            saved["state"][0][field], reference.state[theirs][field], TOL[torch.complex64], field
        )
    loaded = torch.optim.AdamW([torch.nn.Parameter(ours.detach().clone())], lr=0.01)
    loaded.load_state_dict(saved)
    assert next(iter(loaded.state.values()))["exp_avg"].dtype == torch.complex64


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_checkpoints_keep_complex_state_and_resume_bit_identically(fmt: str, tmp_path: Any) -> None:
    opt = optorch.get_optimizer("adam", max_lr=0.01, amsgrad=True)
    gen = torch.Generator().manual_seed(11)
    params = {"w": torch.randn(4, 3, dtype=torch.complex64, generator=gen)}
    state = opt.init(params)
    grads = [{"w": torch.randn(4, 3, dtype=torch.complex64, generator=gen)} for _ in range(6)]
    for g in grads[:3]:
        params, state = opt.step(params, g, state)
    path = optorch.save(tmp_path / f"ckpt.{fmt}", state, optimizer=opt, params=params, format=fmt)
    resumed_params = {"w": params["w"].clone()}
    resumed_opt, resumed_state = optorch.load(path, params=resumed_params)
    for g in grads[3:]:
        params, state = opt.step(params, g, state)
        resumed_params, resumed_state = resumed_opt.step(resumed_params, g, resumed_state)
    assert torch.equal(resumed_params["w"], params["w"])
    for field in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert resumed_state[field]["w"].dtype == torch.complex64
        assert torch.equal(resumed_state[field]["w"], state[field]["w"])


def test_a_conjugate_view_param_is_refused_in_place_before_anything_changes() -> None:
    """A param given as ``z.conj()`` cannot be written through; refused naming it, with
    the other params (here one whose own count lags) and the state untouched."""
    opt = optorch.get_optimizer("adam", max_lr=0.1)
    gen = torch.Generator().manual_seed(12)
    params = {
        "r": torch.randn(3, generator=gen),
        "z": torch.randn(3, dtype=torch.complex64, generator=gen),
    }
    state = opt.init(params)
    params, state = opt.step(params, {"r": torch.ones(3), "z": None}, state)  # "z" sits out
    params["z"] = params["z"].conj()
    grads = {"r": torch.ones(3), "z": torch.ones(3, dtype=torch.complex64)}
    before = {k: v.clone() for k, v in params.items()}
    moments = {k: v.clone() for k, v in state["exp_avg"].items()}
    with pytest.raises(TypeError, match=r"param at \['z'\] is a conjugate view"):
        opt.step(params, grads, state)
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert all(torch.equal(state["exp_avg"][k], moments[k]) for k in moments)
    assert int(state["step"]) == 1
    # a pure step only reads it: the same as on the resolved values
    pure = optorch.get_optimizer("adam", max_lr=0.1, inplace=False)
    pure_state = pure.init(before)
    got, _ = pure.step(params, grads, pure_state)
    want, _ = pure.step({k: v.resolve_conj() for k, v in params.items()}, grads, pure_state)
    assert torch.equal(got["z"], want["z"])


def test_zero_nans_zeroes_only_the_nan_part_of_a_complex_grad() -> None:
    nan = float("nan")
    g = torch.tensor([complex(nan, 2.0), complex(1.0, nan), complex(3.0, 4.0)])
    cleaned, state, _ = wrappers.zero_nans().update({"g": g}, wrappers.zero_nans().init({}), None)
    assert torch.equal(cleaned["g"], torch.tensor([2j, complex(1.0, 0.0), complex(3.0, 4.0)]))
    assert bool(state["found_nan"])
