"""Adamax, NAdam and RAdam against ``torch.optim`` (every option), on params and state.

Every engine (reference, foreach; compiled for a few option sets, each in float32 in
place and float64 pure) and both modes (in place, pure) are compared step by step for 20
steps against the torch class with the same hyperparameters (our configs use torch's
names, ``max_lr`` for ``lr``), in float32 and float64. Then: per-step scalars with a
traced step (the no-host-sync path), a vmapped pure step, the closed-form NAdam momentum
product, validation and the registry (convergence: tests/test_convergence.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import clone_tree, compiled_params
from torch.optim.lr_scheduler import LambdaLR

import optorch
from optorch import adamax, nadam, radam
from optorch.base import Optimizer, Rule

STEPS = 20
SHAPES = {"weight": (4, 3), "bias": (5,), "kernel": (2, 3, 2), "scale": ()}
# (rtol, atol) on params and state after each step
TOLERANCES = {torch.float32: (2e-5, 2e-6), torch.float64: (1e-11, 1e-13)}
# the compiled engine passes every per-step scalar as a 0-d tensor of the param dtype,
# so float32 runs round lr/(1 - beta1^t) etc. once more than torch does
COMPILED_TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-10, 1e-12)}


def _decay(step: int) -> float:
    return 1.0 / (1.0 + 0.1 * step)


@dataclass(frozen=True)
class Case:
    """One optimizer with one set of options, and its torch.optim twin."""

    name: str
    module: Any
    torch_class: type[torch.optim.Optimizer]
    options: dict[str, Any]
    # our state field -> torch state key (the same names by design)
    state_keys: tuple[str, ...]
    compiled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name

    def config(self, **overrides: Any) -> Any:
        return self.module.RULE.config_type(**{**self.options, **overrides})

    def torch_kwargs(self) -> dict[str, Any]:
        kwargs = {
            k: v
            for k, v in self.options.items()
            if k not in ("max_lr", "schedule", "lr_schedule_value")
        }
        lr = self.options.get("max_lr", self.module.RULE.config_type().max_lr)
        kwargs["lr"] = lr * self.options.get("lr_schedule_value", 1.0)
        return kwargs


ADAMAX_KEYS = ("exp_avg", "exp_inf")
ADAM_KEYS = ("exp_avg", "exp_avg_sq")

CASES = [
    # Adamax
    Case("adamax-default", adamax, torch.optim.Adamax, {}, ADAMAX_KEYS),
    Case(
        "adamax-lr-betas-eps",
        adamax,
        torch.optim.Adamax,
        {"max_lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-3},
        ADAMAX_KEYS,
    ),
    Case(
        "adamax-wd-maximize",
        adamax,
        torch.optim.Adamax,
        {"max_lr": 0.01, "weight_decay": 0.1, "maximize": True},
        ADAMAX_KEYS,
        compiled=True,
    ),
    Case(
        "adamax-beta1-zero",
        adamax,
        torch.optim.Adamax,
        {"max_lr": 0.01, "betas": (0.0, 0.9)},
        ADAMAX_KEYS,
    ),
    Case(
        "adamax-schedule",
        adamax,
        torch.optim.Adamax,
        {"max_lr": 0.02, "schedule": _decay, "weight_decay": 0.01},
        ADAMAX_KEYS,
    ),
    # NAdam
    Case("nadam-default", nadam, torch.optim.NAdam, {}, ADAM_KEYS),
    Case(
        "nadam-lr-betas-eps",
        nadam,
        torch.optim.NAdam,
        {"max_lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-4},
        ADAM_KEYS,
    ),
    Case(
        "nadam-l2-maximize",
        nadam,
        torch.optim.NAdam,
        {"max_lr": 0.01, "weight_decay": 0.1, "maximize": True},
        ADAM_KEYS,
    ),
    Case(
        "nadam-decoupled",
        nadam,
        torch.optim.NAdam,
        {"max_lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ADAM_KEYS,
        compiled=True,
    ),
    Case(
        "nadam-momentum-decay",
        nadam,
        torch.optim.NAdam,
        {"max_lr": 0.01, "momentum_decay": 0.5},
        ADAM_KEYS,
    ),
    Case(
        "nadam-no-momentum-decay",
        nadam,
        torch.optim.NAdam,
        {"max_lr": 0.01, "momentum_decay": 0.0},
        ADAM_KEYS,
    ),
    Case(
        "nadam-schedule-value",
        nadam,
        torch.optim.NAdam,
        {
            "max_lr": 0.02,
            "lr_schedule_value": 0.5,
            "weight_decay": 0.05,
            "decoupled_weight_decay": True,
        },
        ADAM_KEYS,
    ),
    Case(
        "nadam-schedule",
        nadam,
        torch.optim.NAdam,
        {"max_lr": 0.02, "schedule": _decay, "weight_decay": 0.05, "decoupled_weight_decay": True},
        ADAM_KEYS,
    ),
    # RAdam: beta2 = 0.9 rectifies from step 6 on; beta2 = 0.6 gives rho_inf = 4 (never)
    Case("radam-default", radam, torch.optim.RAdam, {}, ADAM_KEYS),
    Case(
        "radam-lr-betas-eps",
        radam,
        torch.optim.RAdam,
        {"max_lr": 0.02, "betas": (0.8, 0.9), "eps": 1e-4},
        ADAM_KEYS,
    ),
    Case(
        "radam-never-rectified",
        radam,
        torch.optim.RAdam,
        {"max_lr": 0.01, "betas": (0.9, 0.6)},
        ADAM_KEYS,
    ),
    Case(
        "radam-l2-maximize",
        radam,
        torch.optim.RAdam,
        {"max_lr": 0.01, "weight_decay": 0.1, "maximize": True},
        ADAM_KEYS,
    ),
    Case(
        "radam-decoupled",
        radam,
        torch.optim.RAdam,
        {"max_lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
        ADAM_KEYS,
        compiled=True,
    ),
    Case(
        "radam-schedule",
        radam,
        torch.optim.RAdam,
        {"max_lr": 0.02, "schedule": _decay, "weight_decay": 0.05},
        ADAM_KEYS,
    ),
]


def make_problem(dtype: torch.dtype, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Initial params and STEPS gradients of varying scale (some exact zeros)."""
    generator = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(s, generator=generator, dtype=dtype) for k, s in SHAPES.items()}
    grads = []
    for step in range(STEPS):
        scale = 10.0 ** ((step % 5) - 2)
        grad = {
            k: torch.randn(s, generator=generator, dtype=dtype) * scale for k, s in SHAPES.items()
        }
        grad["bias"][0] = 0.0
        grads.append(grad)
    return params, grads


def run_torch(case: Case, params0: dict[str, torch.Tensor], grads: list[Any]) -> list[Any]:
    """(params, {field: {name: tensor}}) after each step of the torch.optim twin."""
    dtype = next(iter(params0.values())).dtype
    previous = torch.get_default_dtype()
    # torch keeps per-step scalars (NAdam's mu_product) in the default dtype: match ours
    torch.set_default_dtype(dtype)
    try:
        params = {k: torch.nn.Parameter(v.clone()) for k, v in params0.items()}
        optimizer = case.torch_class(list(params.values()), foreach=False, **case.torch_kwargs())
        schedule = case.options.get("schedule")
        scheduler = LambdaLR(optimizer, schedule) if schedule is not None else None
        history = []
        for grad in grads:
            for name, param in params.items():
                param.grad = grad[name].clone()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            state = {
                key: {name: optimizer.state[p][key].clone() for name, p in params.items()}
                for key in case.state_keys
            }
            history.append(({k: p.detach().clone() for k, p in params.items()}, state))
        return history
    finally:
        torch.set_default_dtype(previous)


def assert_trees_equal(actual: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for key in expected:
            assert_trees_equal(actual[key], expected[key])
    else:
        assert actual.dtype == expected.dtype
        assert torch.equal(actual, expected)


def run_ours(
    rule: Rule, config: Any, params0: dict[str, torch.Tensor], grads: list[Any]
) -> list[Any]:
    """(params, state) after each step; checks each mode's contract along the way."""
    optimizer = Optimizer(rule, config)
    params = clone_tree(params0)
    state = optimizer.init(params)
    history = []
    for step, grad in enumerate(grads, start=1):
        if config.inplace:
            storage = {k: v.data_ptr() for k, v in params.items()}
            new_params, new_state = optimizer.step(params, grad, state)
            assert new_params is params
            assert {k: v.data_ptr() for k, v in new_params.items()} == storage
        else:
            before = (clone_tree(params), clone_tree(grad), clone_tree(state))
            new_params, new_state = optimizer.step(params, grad, state)
            # pure mode: every input bit-identical, the results new tensors
            assert_trees_equal(params, before[0])
            assert_trees_equal(grad, before[1])
            assert_trees_equal(state, before[2])
            assert all(new_params[k] is not params[k] for k in params)
        assert int(new_state["step"]) == step
        params, state = new_params, new_state
        history.append((clone_tree(params), clone_tree(state)))
    return history


def compare(
    ours: list[Any], reference: list[Any], state_keys: tuple[str, ...], rtol: float, atol: float
) -> None:
    """Params and the state fields, after each step."""
    assert len(ours) == len(reference) == STEPS
    for step, ((params, state), (ref_params, ref_state)) in enumerate(
        zip(ours, reference, strict=True), start=1
    ):
        pairs = [("params", params, ref_params)]
        pairs += [(key, state[key], ref_state[key]) for key in state_keys]
        _assert_trees_close(pairs, ref_params, rtol, atol, step)


def _assert_trees_close(
    pairs: list[Any], order: dict[str, Any], rtol: float, atol: float, step: int
) -> None:
    """Each (what, tree, expected tree), one comparison per tree: the message names the
    step and the field."""
    for what, actual, expected in pairs:
        assert all(actual[name].dtype == expected[name].dtype for name in order)
        torch.testing.assert_close(
            _flat(actual, order),
            _flat(expected, order),
            rtol=rtol,
            atol=atol,
            msg=lambda m, w=what, s=step: f"{w} after step {s}: {m}",
        )


def _flat(tree: dict[str, torch.Tensor], order: dict[str, Any]) -> torch.Tensor:
    return torch.cat([tree[name].reshape(-1) for name in order])


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_torch_optim(case: Case, dtype: torch.dtype, impl: str, inplace: bool) -> None:
    params0, grads = make_problem(dtype)
    reference = run_torch(case, params0, grads)
    ours = run_ours(case.module.RULE, case.config(impl=impl, inplace=inplace), params0, grads)
    compare(ours, reference, case.state_keys, *TOLERANCES[dtype])


COMPILED = compiled_params([c for c in CASES if c.compiled], lambda case: case.id)


@pytest.mark.parametrize(("case", "dtype", "inplace"), COMPILED)
def test_compiled_matches_torch_optim(case: Case, dtype: torch.dtype, inplace: bool) -> None:
    params0, grads = make_problem(dtype, seed=1)
    reference = run_torch(case, params0, grads)
    ours = run_ours(case.module.RULE, case.config(impl="compiled", inplace=inplace), params0, grads)
    compare(ours, reference, case.state_keys, *COMPILED_TOLERANCES[dtype])


# --------------------------------------------------------------------------------------
# the traced-step path: scalars from a tensor step equal those from a Python step
# --------------------------------------------------------------------------------------

SCALAR_CONFIGS = [
    adamax.AdamaxConfig(max_lr=0.01, betas=(0.8, 0.9)),
    nadam.NAdamConfig(),
    nadam.NAdamConfig(betas=(0.0, 0.9), momentum_decay=0.5),
    nadam.NAdamConfig(momentum_decay=0.0),
    radam.RAdamConfig(),
    radam.RAdamConfig(betas=(0.9, 0.6)),  # rho_inf = 4: a 0/0 in the unused branch
    radam.RAdamConfig(betas=(0.9, 0.0)),
    radam.RAdamConfig(betas=(0.5, 0.9), weight_decay=0.1, decoupled_weight_decay=True),
]
RULES = {
    adamax.AdamaxConfig: adamax.RULE,
    nadam.NAdamConfig: nadam.RULE,
    radam.RAdamConfig: radam.RULE,
}


@pytest.mark.parametrize("config", SCALAR_CONFIGS, ids=repr)
def test_scalars_from_a_tensor_step_match_python_step(config: Any) -> None:
    rule = RULES[type(config)]
    old = {name: 0.3 for name in rule.global_fields(config)}  # a product mid-run
    for t, offset in [(t, offset) for t in range(1, 13) for offset in (0, 2) if offset < t]:
        # the values the step runs with: scalars at the param's own count, combined
        # with what advance() derives from the global fields at the optimizer's count
        own = t - offset
        _, extra = rule.advance(config, t, 0.01, 1.0, old)
        expected = rule.own_scalars(config, rule.scalars(config, own, 0.01, 1.0), extra, offset)
        as_tensor = torch.tensor(float(t), dtype=torch.float64)
        _, traced_extra = rule.advance(
            config,
            as_tensor,
            0.01,
            1.0,
            {k: torch.tensor(v, dtype=torch.float64) for k, v in old.items()},
        )
        traced = rule.own_scalars(
            config,
            rule.scalars(config, as_tensor - offset, 0.01, 1.0),
            traced_extra,
            torch.tensor(offset),
        )
        assert expected.keys() == traced.keys()
        for key, value in expected.items():
            assert math.isfinite(float(traced[key])), (key, t, offset)
            assert float(traced[key]) == pytest.approx(value, rel=1e-12, abs=1e-15), (
                key,
                t,
                offset,
            )


@pytest.mark.parametrize(
    "case", [c for c in CASES if "schedule" not in c.options], ids=lambda c: c.id
)
def test_vmapped_pure_step_matches_single_runs(case: Case) -> None:
    """Under vmap the step is a batched tensor: the rule runs on traced scalars."""
    batch = [make_problem(torch.float64, seed=seed) for seed in range(3)]
    config = case.config(inplace=False)
    optimizer = Optimizer(case.module.RULE, config)
    stacked = {k: torch.stack([params[k] for params, _ in batch]) for k in SHAPES}
    state = optimizer.init({k: v[0] for k, v in stacked.items()})
    state = {
        key: (
            {k: torch.stack([v] * 3) for k, v in value.items()}
            if isinstance(value, dict)
            else torch.stack([value] * 3)
        )
        for key, value in state.items()
    }
    vmapped = torch.func.vmap(lambda p, g, s: optimizer.step(p, g, s))
    steps = 8  # RAdam switches to the rectified update at step 6
    for step in range(steps):
        grads = {k: torch.stack([g[step][k] for _, g in batch]) for k in SHAPES}
        stacked, state = vmapped(stacked, grads, state)
    for index, (params0, grads) in enumerate(batch):
        params, single_state = run_ours(case.module.RULE, config, params0, grads[:steps])[-1]
        for name in SHAPES:
            torch.testing.assert_close(stacked[name][index], params[name], rtol=1e-12, atol=1e-14)
            for key in case.state_keys:
                torch.testing.assert_close(
                    state[key][name][index], single_state[key][name], rtol=1e-12, atol=1e-14
                )
        assert int(state["step"][index]) == steps


# --------------------------------------------------------------------------------------
# NAdam's momentum product in closed form
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("momentum_decay", [0.0, 1e-300, 1e-6, 4e-3, 0.5, 30.0])
def test_nadam_mu_product_equals_running_product(beta1: float, momentum_decay: float) -> None:
    running = 1.0
    checked = 0
    assert nadam.nadam_mu_product(0, beta1, momentum_decay) == 1.0
    for t in range(1, 2001):
        running *= beta1 * (1.0 - 0.5 * 0.96 ** (t * momentum_decay))
        if running < 1e-250:  # the running product itself loses digits near underflow
            break
        if t <= 30 or t % 97 == 0:
            closed = nadam.nadam_mu_product(t, beta1, momentum_decay)
            traced = nadam.nadam_mu_product(torch.tensor(t), beta1, momentum_decay)
            assert closed == pytest.approx(running, rel=1e-12)
            assert traced.dtype == torch.float64
            assert float(traced) == pytest.approx(running, rel=1e-12)
            checked += 1
    if beta1 == 0.0:
        assert nadam.nadam_mu_product(5, beta1, momentum_decay) == 0.0
        assert float(nadam.nadam_mu_product(torch.tensor(5), beta1, momentum_decay)) == 0.0
    else:
        assert checked >= 30


def test_nadam_mu_product_matches_torch_state() -> None:
    """The value torch keeps as ``mu_product`` state, for state conversion."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.NAdam([param], momentum_decay=0.01, betas=(0.95, 0.999))
        for t in range(1, 51):
            param.grad = torch.full((3,), 0.1 * t)
            optimizer.step()
            assert nadam.nadam_mu_product(t, 0.95, 0.01) == pytest.approx(
                float(optimizer.state[param]["mu_product"]), rel=1e-12
            )
    finally:
        torch.set_default_dtype(previous)


def _cycled_beta1(step: int) -> float:
    """A beta1 that moves every step, as OneCycleLR(cycle_momentum=True) moves it."""
    return 0.85 + 0.1 * abs(math.sin(0.7 * step))


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", ["reference", "foreach", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_nadam_with_a_beta1_changed_every_step_matches_torch(
    dtype: torch.dtype, impl: str, inplace: bool
) -> None:
    """torch multiplies mu_product by each step's mu_t, with that step's beta1; the closed
    form from the current beta1 alone drifted 6e-5-8e-5 relative from the sixth step."""
    params0, grads = make_problem(dtype, seed=3)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # torch's mu_product in the params' dtype, as ours
    try:
        tparams = {k: torch.nn.Parameter(v.clone()) for k, v in params0.items()}
        topt = torch.optim.NAdam(list(tparams.values()), lr=0.02, weight_decay=0.01, foreach=False)
        expected = []
        for step, grad in enumerate(grads):
            topt.param_groups[0]["betas"] = (_cycled_beta1(step), 0.999)
            for name, param in tparams.items():
                param.grad = grad[name].clone()
            topt.step()
            expected.append(
                (
                    {k: p.detach().clone() for k, p in tparams.items()},
                    {
                        key: {k: topt.state[p][key].clone() for k, p in tparams.items()}
                        for key in (*ADAM_KEYS, "mu_product")
                    },
                )
            )
    finally:
        torch.set_default_dtype(previous)
    config = nadam.NAdamConfig(max_lr=0.02, weight_decay=0.01, impl=impl, inplace=inplace)
    optimizer = optorch.wrappers.inject_hyperparams(Optimizer(nadam.RULE, config), names=["betas"])
    params = clone_tree(params0)
    state = optimizer.init(params)
    rtol, atol = (COMPILED_TOLERANCES if impl == "compiled" else TOLERANCES)[dtype]
    for step, (grad, (ref_params, ref_state)) in enumerate(zip(grads, expected, strict=True)):
        optorch.wrappers.set_hyperparam(state, "betas", (_cycled_beta1(step), 0.999))
        params, state = optimizer.step(params, grad, state)
        inner = state["inner"]
        pairs = [("params", params, ref_params)]
        pairs += [(key, inner[key], ref_state[key]) for key in ADAM_KEYS]
        _assert_trees_close(pairs, ref_params, rtol, atol, step + 1)
        assert inner["mu_product"].dtype == torch.float64
        for name in ref_params:  # torch keeps one per param; ours is the optimizer's
            assert float(inner["mu_product"]) == pytest.approx(
                float(ref_state["mu_product"][name]), rel=1e-6 if dtype == torch.float32 else 1e-13
            )


def test_nadam_state_saved_without_mu_product_resumes_from_its_closed_form() -> None:
    """A state from before mu_product was kept (step, exp_avg, exp_avg_sq) continues as the
    uninterrupted run, in every impl."""
    params0, grads = make_problem(torch.float64, seed=4)
    for impl in ("reference", "foreach", "compiled"):
        optimizer = Optimizer(nadam.RULE, nadam.NAdamConfig(max_lr=0.01, impl=impl))
        straight = clone_tree(params0)
        state = optimizer.init(straight)
        for grad in grads:
            straight, state = optimizer.step(straight, grad, state)
        resumed = clone_tree(params0)
        saved = optimizer.init(resumed)
        for grad in grads[:7]:
            resumed, saved = optimizer.step(resumed, grad, saved)
        saved = {k: v for k, v in saved.items() if k != "mu_product"}
        for grad in grads[7:]:
            resumed, saved = optimizer.step(resumed, grad, saved)
        for name in SHAPES:
            torch.testing.assert_close(resumed[name], straight[name], rtol=1e-12, atol=1e-14)
        assert float(saved["mu_product"]) == pytest.approx(float(state["mu_product"]), rel=1e-12)


# --------------------------------------------------------------------------------------
# validation and the registry
# --------------------------------------------------------------------------------------

INVALID = [
    (adamax.AdamaxConfig, {"max_lr": -1e-3}, ValueError, r"max_lr"),
    (adamax.AdamaxConfig, {"max_lr": float("nan")}, ValueError, r"max_lr"),
    (adamax.AdamaxConfig, {"betas": (1.0, 0.999)}, ValueError, r"betas\[0\]"),
    (adamax.AdamaxConfig, {"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]"),
    (adamax.AdamaxConfig, {"betas": (0.9,)}, ValueError, r"betas"),
    (adamax.AdamaxConfig, {"eps": -1e-8}, ValueError, r"eps"),
    (adamax.AdamaxConfig, {"weight_decay": float("inf")}, ValueError, r"weight_decay"),
    (adamax.AdamaxConfig, {"maximize": 1}, TypeError, r"maximize"),
    (nadam.NAdamConfig, {"max_lr": float("inf")}, ValueError, r"max_lr"),
    (nadam.NAdamConfig, {"betas": (0.9, float("nan"))}, ValueError, r"betas\[1\]"),
    (nadam.NAdamConfig, {"eps": float("nan")}, ValueError, r"eps"),
    (nadam.NAdamConfig, {"weight_decay": -0.1}, ValueError, r"weight_decay"),
    (nadam.NAdamConfig, {"momentum_decay": -4e-3}, ValueError, r"momentum_decay"),
    (nadam.NAdamConfig, {"momentum_decay": float("nan")}, ValueError, r"momentum_decay"),
    (nadam.NAdamConfig, {"momentum_decay": torch.tensor(4e-3)}, TypeError, r"momentum_decay"),
    (nadam.NAdamConfig, {"decoupled_weight_decay": "yes"}, TypeError, r"decoupled_weight_decay"),
    (nadam.NAdamConfig, {"lr_schedule_value": -0.5}, ValueError, r"lr_schedule_value"),
    (radam.RAdamConfig, {"max_lr": -0.1}, ValueError, r"max_lr"),
    (radam.RAdamConfig, {"betas": (0.9, 1.0)}, ValueError, r"betas\[1\]"),
    (radam.RAdamConfig, {"betas": "0.9,0.999"}, ValueError, r"betas"),
    (radam.RAdamConfig, {"eps": -1.0}, ValueError, r"eps"),
    (radam.RAdamConfig, {"weight_decay": float("nan")}, ValueError, r"weight_decay"),
    (radam.RAdamConfig, {"decoupled_weight_decay": None}, TypeError, r"decoupled_weight_decay"),
    (radam.RAdamConfig, {"impl": "fused"}, ValueError, r"impl"),
]


@pytest.mark.parametrize(
    ("config_type", "kwargs", "error", "pattern"),
    INVALID,
    ids=lambda v: (
        ",".join(f"{k}={v[k]!r}" if not callable(v[k]) else f"{k}=<callable>" for k in v)
        if isinstance(v, dict)
        else None
    ),
)
def test_invalid_hyperparameters_are_rejected(
    config_type: type, kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        config_type(**kwargs)


def test_betas_from_yaml_lists_become_tuples() -> None:
    assert nadam.NAdamConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert radam.RAdamConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)
    assert adamax.AdamaxConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


@pytest.mark.parametrize("name", ["adamax", "nadam", "radam"])
def test_registered_and_steps_by_name(name: str) -> None:
    module = {"adamax": adamax, "nadam": nadam, "radam": radam}[name]
    assert optorch.REGISTRY[name].rule is module.RULE
    optimizer = optorch.get_optimizer(name, max_lr=1e-3)
    assert optimizer.config.max_lr == 1e-3
    params = {"w": torch.ones(3)}
    state = optimizer.init(params)
    params, state = optimizer.step(params, {"w": torch.tensor([1.0, -1.0, 0.0])}, state)
    assert params["w"][0] < 1.0 < params["w"][1]
    assert params["w"][2] == 1.0
    assert int(state["step"]) == 1


@pytest.mark.parametrize(
    ("module", "prefix"), [(adamax, "adamax"), (nadam, "nadam"), (radam, "radam")]
)
def test_seed_style_functions(module: Any, prefix: str) -> None:
    """``default_x_state(model)`` covers trainable params; ``x_step`` takes a config."""
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)
    state = getattr(module, f"default_{prefix}_state")(model)
    assert set(state["exp_avg"]) == {"weight"}
    params = {"weight": model.weight}
    grads = {"weight": torch.ones(2, 3)}
    config = module.RULE.config_type(max_lr=0.1)
    before = model.weight.detach().clone()
    getattr(module, f"{prefix}_step")(params, grads, state, config)
    assert torch.all(model.weight < before)  # in place, on the model's own tensor
    assert int(state["step"]) == 1


# --------------------------------------------------------------------------------------
# NAdam's mu_product state: old states, transforms, validation
# --------------------------------------------------------------------------------------


def _nadam_run(
    optimizer: Any, steps: int, state: Any = None, betas: Any = None
) -> tuple[dict[str, torch.Tensor], Any]:
    params = {"w": torch.linspace(-1.0, 1.0, 6, dtype=torch.float64)}
    state = optimizer.init(params) if state is None else state
    overrides = None if betas is None else {"betas": betas}
    for k in range(steps):
        grad = {"w": torch.sin(torch.arange(6.0, dtype=torch.float64) + k)}
        params, state = optimizer.step(params, grad, state, hyper_overrides=overrides)
    return params, state


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_a_checkpoint_saved_without_mu_product_loads_in_every_checked_loader(
    suffix: str, tmp_path: Any
) -> None:
    from optorch.interop import checkpoint

    optimizer = optorch.get_optimizer("nadam", max_lr=0.01)
    params, state = _nadam_run(optimizer, 4)
    old = {k: v for k, v in state.items() if k != "mu_product"}  # the earlier format
    path = tmp_path / f"old.{suffix}"
    checkpoint.save(path, old, optimizer=optimizer, params=params)
    for loaded in (
        checkpoint.load(path, params=params, optimizer=optimizer),
        checkpoint.load(path, like=optimizer.init(params)),
        checkpoint.load_optimizer(path, params=params)[1],
        optorch.load(path, params=params)[1],
    ):
        assert "mu_product" not in loaded
        resumed = optimizer.step(
            {"w": params["w"].clone()}, {"w": torch.ones(6, dtype=torch.float64)}, loaded
        )[1]
        assert float(resumed["mu_product"]) == pytest.approx(
            float(
                optimizer.step(
                    {"w": params["w"].clone()},
                    {"w": torch.ones(6, dtype=torch.float64)},
                    clone_tree(state),
                )[1]["mu_product"]
            ),
            rel=1e-12,
        )


def test_a_sharded_checkpoint_saved_without_mu_product_resumes(tmp_path: Any) -> None:
    from optorch.interop.distributed import load_sharded, save_sharded

    optimizer = optorch.get_optimizer("nadam", max_lr=0.01)
    straight, _ = _nadam_run(optimizer, 8)
    params, state = _nadam_run(optimizer, 4)
    save_sharded(tmp_path / "ck", {"optim": {k: v for k, v in state.items() if k != "mu_product"}})
    loaded = load_sharded(tmp_path / "ck", {"optim": optimizer.init(params)})["optim"]
    for k in range(4, 8):
        grad = {"w": torch.sin(torch.arange(6.0, dtype=torch.float64) + k)}
        params, loaded = optimizer.step(params, grad, loaded)
    torch.testing.assert_close(params["w"], straight["w"], rtol=1e-12, atol=1e-14)


def test_vmap_over_beta1_from_one_shared_init() -> None:
    """The state's mu_product becomes batched on the second step: not read on the host."""
    optimizer = optorch.get_optimizer("nadam", max_lr=0.01, inplace=False)
    values = torch.tensor([0.8, 0.9], dtype=torch.float64)
    batched = torch.func.vmap(lambda b1: _nadam_run(optimizer, 3, betas=(b1, 0.999))[0]["w"])(
        values
    )
    for index, beta1 in enumerate(values.tolist()):
        single = _nadam_run(optorch.get_optimizer("nadam", max_lr=0.01, betas=(beta1, 0.999)), 3)
        torch.testing.assert_close(batched[index], single[0]["w"], rtol=1e-12, atol=1e-14)


def test_forward_mode_derivative_through_mu_product_matches_a_central_difference() -> None:
    import torch.autograd.forward_ad as fwad

    optimizer = optorch.get_optimizer("nadam", max_lr=0.01, inplace=False)

    def loss(beta1: torch.Tensor) -> torch.Tensor:
        return (_nadam_run(optimizer, 4, betas=(beta1, 0.999))[0]["w"] ** 2).sum()

    x, eps = torch.tensor(0.9, dtype=torch.float64), 1e-6
    central = float((loss(x + eps) - loss(x - eps)) / (2 * eps))
    with fwad.dual_level():
        tangent = fwad.unpack_dual(loss(fwad.make_dual(x, torch.tensor(1.0, dtype=torch.float64))))
        assert float(tangent.tangent) == pytest.approx(central, rel=1e-6)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.tensor(float("nan"), dtype=torch.float64), r"is nan, outside \[0.0, 1.0\]"),
        (torch.tensor(-0.3, dtype=torch.float64), r"is -0.3, outside \[0.0, 1.0\]"),
        (torch.tensor(0), r"must be a floating-point 0-d tensor.*int64"),
        (torch.tensor([0.5], dtype=torch.float64), r"must be a 0-d float64 tensor"),
        ("garbage", r"must be a 0-d float64 tensor, got 'garbage'"),
    ],
    ids=["nan", "negative", "int", "shape", "string"],
)
def test_a_malformed_mu_product_is_refused_and_changes_nothing(value: Any, message: str) -> None:
    optimizer = optorch.get_optimizer("nadam", max_lr=0.01)
    params, state = _nadam_run(optimizer, 2)
    state["mu_product"] = value
    before = clone_tree((params, {k: v for k, v in state.items() if k != "mu_product"}))
    with pytest.raises(ValueError, match=r"nadam: state\['mu_product'\] " + message):
        optimizer.step(params, {"w": torch.ones(6, dtype=torch.float64)}, state)
    assert_trees_equal(params, before[0])
    assert_trees_equal({k: v for k, v in state.items() if k != "mu_product"}, before[1])
