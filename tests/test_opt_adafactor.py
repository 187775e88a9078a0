"""Adafactor against ``torch.optim.Adafactor``: params AND state after each of 20 steps.

Every row of the option table runs in float32 and float64, in place and pure, through
the reference loop and the foreach engine (vectors as one foreach program; matrices,
whose row and column means need their shape, one by one); three rows also run compiled,
one of them on matrices whose rows make whole blocks (the compiled column mean sums by
blocks), and compiled kernels must not recompile from step to step. The params are a
dict pytree with a 0-d scalar, a 1-D bias, a matrix and a 3-D tensor (a batch of
matrices), so both the factored (``row_var``, ``col_var``) and the full (``variance``)
second moments are compared with torch's, under torch's names and shapes; the unused
fields of each leaf must be empty placeholders. The ``beta1`` momentum variant (not in
torch) is compared with a float64 formula written here from the paper, which is itself
checked against torch with ``beta1=None``. Then: bad hyperparameters, state shapes, the
registry and the seed-style functions (convergence: tests/test_convergence.py).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from conftest import (
    DEFAULT_SHAPES,
    TOLERANCES,
    TorchReference,
    assert_no_aliasing,
    assert_trees_close,
    assert_unchanged,
    grad_sequence,
    make_grads,
    make_params,
    snapshot,
)

import optorch
from optorch import engine
from optorch.adafactor import (
    RULE,
    UNFACTORED,
    AdafactorConfig,
    adafactor_step,
    default_adafactor_state,
)

STEPS = 20
MOMENTS = ("row_var", "col_var", "variance")
PLACEHOLDER = (0,)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny tensors: a second intra-op thread only spins (20x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def halving_every_five(step: int) -> float:
    """A schedule multiplier that changes during the run (0.5 ** (step // 5))."""
    return 0.5 ** (step // 5)


@dataclass(frozen=True)
class Case:
    id: str
    hyper: dict[str, Any]
    torch_hyper: dict[str, Any]
    seed: int
    multiplier: Callable[[int], float] | None = None


def _case(
    case_id: str, seed: int, *, multiplier: Callable[[int], float] | None = None, **hyper: Any
) -> Case:
    torch_hyper = {"lr": hyper.get("max_lr", 1e-2)}
    torch_hyper.update({k: v for k, v in hyper.items() if k != "max_lr"})
    if multiplier is not None:
        hyper = {**hyper, "schedule": multiplier}
    return Case(case_id, hyper, torch_hyper, seed, multiplier)


CASES = [
    _case("defaults", 1),
    _case("lr-caps-rho", 2, max_lr=0.05),
    _case("rho-decays", 3, max_lr=0.5),  # min(lr, 1/sqrt(t)) switches at t = 4
    _case("beta2-decay", 4, max_lr=0.05, beta2_decay=-0.5),
    _case("eps1-eps2", 5, max_lr=0.05, eps=(1e-3, 1e-2)),
    _case("d-2", 6, max_lr=0.05, d=2.0),
    _case("weight-decay", 7, max_lr=0.05, weight_decay=0.1),
    _case("maximize", 8, max_lr=0.05, maximize=True),
    _case("schedule-wd", 9, max_lr=0.1, weight_decay=0.2, multiplier=halving_every_five),
    _case(
        "all",
        10,
        max_lr=0.2,
        beta2_decay=-0.6,
        eps=(1e-6, 5e-3),
        d=1.25,
        weight_decay=0.05,
        maximize=True,
    ),
]
DTYPES = [torch.float32, torch.float64]


def expected_moments(reference: TorchReference, params: dict[str, torch.Tensor]) -> Any:
    """torch's row_var/col_var/variance per param; an empty placeholder where it has none."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for field in MOMENTS:
        torch_field = reference.state_field(field)
        out[field] = {
            name: value if value is not None else params[name].new_zeros(PLACEHOLDER)
            for name, value in torch_field.items()
        }
    return out


def assert_follows_torch(
    reference: TorchReference,
    params: dict[str, torch.Tensor],
    state: dict[str, Any],
    tolerance: dict[str, float],
    what: str,
) -> None:
    """Params and the three moments equal torch's (under torch's names and shapes)."""
    assert_trees_close(params, reference.params(), **tolerance, what=f"{what} params")
    expected = expected_moments(reference, params)
    for field in MOMENTS:
        assert_trees_close(state[field], expected[field], **tolerance, what=f"{what} {field}")


def run_against_torch(
    case: Case,
    dtype: torch.dtype,
    impl: str,
    *,
    inplace: bool,
    shapes: dict[str, tuple[int, ...]] = DEFAULT_SHAPES,
) -> None:
    params = make_params(case.seed, dtype, shapes)
    grads = grad_sequence(case.seed, params, STEPS)
    reference = TorchReference(
        torch.optim.Adafactor, params, multiplier=case.multiplier, **case.torch_hyper
    )
    optimizer = optorch.get_optimizer("adafactor", impl=impl, inplace=inplace, **case.hyper)
    state = optimizer.init(params)
    assert sorted(state) == sorted(("step", *MOMENTS))
    tolerance = TOLERANCES[dtype]
    for step, grad in enumerate(grads, start=1):
        what = f"{case.id} {dtype} {impl} inplace={inplace} step {step}"
        before = snapshot(params, grad, state)
        new_params, new_state = optimizer.step(params, grad, state)
        if inplace:
            assert_unchanged([grad], before[1:2], what=f"{what} grads")
            assert all(new_params[k] is params[k] for k in params), f"{what}: params replaced"
            for field in MOMENTS:
                assert all(new_state[field][k] is state[field][k] for k in params), what
        else:
            assert_unchanged([params, grad, state], before, what=what)
            assert_no_aliasing(new_params, (params, grad, state), what=f"{what} params")
            assert_no_aliasing(
                {k: new_state[k] for k in MOMENTS}, (params, grad, state), what=f"{what} state"
            )
        params, state = new_params, new_state
        reference.step(grad)
        assert_follows_torch(reference, params, state, tolerance, what)
        for field in MOMENTS:
            assert all(t.dtype == dtype for t in state[field].values()), what
        assert state["step"].dtype == torch.int64 and int(state["step"]) == step, what
        assert reference.steps_taken() == [step] * len(params)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("impl", ["reference", "foreach"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_matches_torch_optim(case: Case, dtype: torch.dtype, impl: str, inplace: bool) -> None:
    run_against_torch(case, dtype, impl, inplace=inplace)


# compiling costs seconds per kernel (one per leaf kind and rank): three rows, one mode
# each; the last one's matrices have rows in whole blocks of ROW_BLOCK, whose compiled
# column means sum block by block
COMPILED_CASES = [
    pytest.param(CASES[6], True, {"w": (4, 3), "b": (5,), "s": ()}, id="weight-decay-inplace"),
    pytest.param(CASES[9], False, {"t": (2, 3, 2), "s": ()}, id="all-pure"),
    pytest.param(
        CASES[8], True, {"w": (64, 48), "t": (2, 96, 5), "b": (48,)}, id="row-blocks-inplace"
    ),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("case", "inplace", "shapes"), COMPILED_CASES)
def test_compiled_matches_torch_optim(
    case: Case, inplace: bool, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype
) -> None:
    run_against_torch(case, dtype, "compiled", inplace=inplace, shapes=shapes)


def test_compiled_kernels_split_by_row_blocks_and_never_recompile() -> None:
    """A factored param whose rows make two or more whole blocks of ``ROW_BLOCK`` gets a
    kernel of its own (its leaf key), so that no kernel branches on the row count: after
    the first step, 20 steps whose learning rate moves compile nothing, and every param
    and moment equals the reference loop's."""
    shapes = {"blocks": (64, 8), "column": (96, 1), "odd": (33, 7), "one_block": (32, 4)}
    shapes |= {"bias": (8,)}
    keys = [RULE.leaf_key(torch.empty(shape), AdafactorConfig()) for shape in shapes.values()]
    assert keys == [(True, True), (True, True), (True, False), (True, False), (False, False)]
    params = make_params(71, torch.float32, shapes)
    grads = grad_sequence(71, params, STEPS)
    hyper = {"max_lr": 0.1, "weight_decay": 0.2, "schedule": halving_every_five}
    compiled = optorch.get_optimizer("adafactor", impl="compiled", **hyper)
    reference = optorch.get_optimizer("adafactor", impl="reference", **hyper)
    state, ref_params = compiled.init(params), {k: v.clone() for k, v in params.items()}
    ref_state = reference.init(ref_params)
    params, state = compiled.step(params, grads[0], state)
    ref_params, ref_state = reference.step(ref_params, grads[0], ref_state)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for grad in grads[1:]:
            params, state = compiled.step(params, grad, state)
            ref_params, ref_state = reference.step(ref_params, grad, ref_state)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    tolerance = TOLERANCES[torch.float32]
    assert_trees_close(params, ref_params, **tolerance, what="params")
    for field in MOMENTS:
        assert_trees_close(state[field], ref_state[field], **tolerance, what=field)


def test_compiled_vectors_run_as_one_foreach_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the library's default size threshold (the tests lower it to compile small
    tensors), compiled Adafactor runs its small vectors as one foreach program: no
    kernel is compiled for them, only for the matrices; params and moments follow
    torch.optim.Adafactor for 20 steps."""
    monkeypatch.setattr(engine, "COMPILED_MIN_NUMEL", 1 << 16)
    shapes = {"w": (40, 24), "b": (24,), "c": (7,), "s": ()}
    params = make_params(84, torch.float32, shapes)
    grads = grad_sequence(84, params, STEPS)
    reference = TorchReference(torch.optim.Adafactor, params, lr=0.05)
    optimizer = optorch.get_optimizer("adafactor", impl="compiled", max_lr=0.05)
    state = optimizer.init(params)
    before = set(engine._COMPILED)
    tolerance = TOLERANCES[torch.float32]
    for step, grad in enumerate(grads, start=1):
        params, state = optimizer.step(params, grad, state)
        reference.step(grad)
        assert_follows_torch(reference, params, state, tolerance, f"step {step}")
    leaves = {key[2] for key in set(engine._COMPILED) - before if key[0] is type(RULE)}
    assert UNFACTORED not in leaves
    assert leaves <= {(True, False), (True, True)}


def _clamp_active(reference: TorchReference, name: str, eps1: float) -> bool:
    """Whether torch's variance estimate of matrix ``name`` has an element below eps1^2
    (so that its update's denominator is clamped)."""
    row = reference.state_field("row_var")[name]
    col = reference.state_field("col_var")[name]
    assert row is not None and col is not None
    estimate = row @ col / row.mean(dim=-2, keepdim=True).clamp(min=eps1)
    return bool((estimate < eps1 * eps1).any())


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
def test_compiled_direction_norm_with_and_without_clamped_elements(inplace: bool) -> None:
    """Compiled, a matrix's update RMS comes from sums taken in the row pass when no
    element of its denominator is clamped to eps1, and from the elements themselves when
    some are (torch.cond). Gradients with whole rows and columns of zeros in some steps
    (an embedding's unused rows) make the clamp active at those steps only; params and
    moments must follow torch.optim.Adafactor at every step, on both branches."""
    shapes = {"blocks": (64, 48), "odd": (33, 7), "b": (48,)}
    params = make_params(81, torch.float32, shapes)
    grads = grad_sequence(81, params, STEPS)
    for k, grad in enumerate(grads):
        if k % 3 == 0:  # zero rows and a zero column in the first and every third step
            for name in ("blocks", "odd"):
                grad[name][1::4] = 0.0
                grad[name][:, 2] = 0.0
    hyper = {"max_lr": 0.05, "weight_decay": 0.1}
    reference = TorchReference(torch.optim.Adafactor, params, lr=0.05, weight_decay=0.1)
    optimizer = optorch.get_optimizer("adafactor", impl="compiled", inplace=inplace, **hyper)
    state = optimizer.init(params)
    eps1 = torch.finfo(torch.float32).eps
    clamped_steps = []
    tolerance = TOLERANCES[torch.float32]
    for step, grad in enumerate(grads, start=1):
        params, state = optimizer.step(params, grad, state)
        reference.step(grad)
        clamped_steps.append(_clamp_active(reference, "blocks", eps1))
        assert_follows_torch(reference, params, state, tolerance, f"step {step}")
    # both branches ran: the zeroed rows' second moment decays towards eps1^2 and below
    assert any(clamped_steps) and not all(clamped_steps), clamped_steps


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("impl", ["reference", "compiled"])
def test_a_non_finite_gradient_element_makes_every_element_nan(impl: str, bad: float) -> None:
    """One inf or NaN in a matrix's gradient reaches every row's scale (the mean of the
    row moments), so the whole new param is NaN, in every impl (the compiled param RMS
    adds 0 * grad^2, NaN there, which therefore changes nothing); other params are
    untouched by it."""
    params = make_params(82, torch.float32, {"w": (64, 8), "v": (64, 8)})
    grads = make_grads(82, params)
    grads["w"][3, 5] = bad
    optimizer = optorch.get_optimizer("adafactor", impl=impl)
    new, _ = optimizer.step(params, grads, optimizer.init(params))
    assert bool(new["w"].isnan().all())
    assert bool(new["v"].isfinite().all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_compiled_half_precision_matches_the_reference_loop(dtype: torch.dtype) -> None:
    """Compiled in bfloat16 and float16 (sums of squares in float32), 10 steps against
    the reference loop: agreement to a few roundings of the dtype."""
    shapes = {"blocks": (64, 48), "odd": (33, 7), "b": (48,)}
    params = make_params(83, dtype, shapes)
    grads = grad_sequence(83, params, 10)
    compiled = optorch.get_optimizer("adafactor", impl="compiled", max_lr=0.05)
    reference = optorch.get_optimizer("adafactor", impl="reference", max_lr=0.05)
    state, ref_params = compiled.init(params), {k: v.clone() for k, v in params.items()}
    ref_state = reference.init(ref_params)
    for grad in grads:
        params, state = compiled.step(params, grad, state)
        ref_params, ref_state = reference.step(ref_params, grad, ref_state)
    eps = torch.finfo(dtype).eps
    assert_trees_close(params, ref_params, rtol=8 * eps, atol=8 * eps, what="params")
    for field in MOMENTS:
        assert_trees_close(state[field], ref_state[field], rtol=8 * eps, atol=0, what=field)


# --------------------------------------------------------------------------------------
# the beta1 (momentum) variant against a float64 formula
# --------------------------------------------------------------------------------------


def formula_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    moments: dict[str, torch.Tensor],
    t: int,
    *,
    machine_eps: float,
    max_lr: float = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
    beta1: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One Adafactor step in float64, from the paper's Algorithms 4/5 with torch's eps,
    relative step and weight decay conventions, plus momentum of the scaled update."""
    eps1 = machine_eps if eps[0] is None else eps[0]
    g = -grad if maximize else grad
    beta2_t = 1.0 - t**beta2_decay
    rho = min(max_lr, 1.0 / math.sqrt(t))
    alpha = max(eps[1], math.sqrt(float((param * param).mean()))) * rho
    decayed = param * (1.0 - max_lr * weight_decay)
    new = dict(moments)
    if param.dim() >= 2:
        new["row_var"] = beta2_t * moments["row_var"] + (1 - beta2_t) * (g * g).mean(-1, True)
        new["col_var"] = beta2_t * moments["col_var"] + (1 - beta2_t) * (g * g).mean(-2, True)
        normalizer = torch.clamp(new["row_var"].mean(-2, True), min=eps1)
        v_hat = new["row_var"] * new["col_var"] / normalizer
    else:
        new["variance"] = beta2_t * moments["variance"] + (1 - beta2_t) * g * g
        v_hat = new["variance"]
    u = g / torch.clamp(v_hat.sqrt(), min=eps1)
    u_hat = u / max(1.0, math.sqrt(float((u * u).mean())) / d)
    if beta1 is None:
        return decayed - alpha * u_hat, new
    new["exp_avg"] = beta1 * moments["exp_avg"] + (1 - beta1) * alpha * u_hat
    return decayed - new["exp_avg"], new


def formula_run(
    params: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]], **hyper: Any
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """All steps of :func:`formula_step` in float64; returns params and moments."""
    machine_eps = torch.finfo(next(iter(params.values())).dtype).eps
    current = {k: v.to(torch.float64) for k, v in params.items()}
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in current.items():
        factored = p.dim() >= 2
        moments[name] = {
            "row_var": torch.zeros((*p.shape[:-1], 1) if factored else PLACEHOLDER),
            "col_var": torch.zeros((*p.shape[:-2], 1, p.shape[-1]) if factored else PLACEHOLDER),
            "variance": torch.zeros(PLACEHOLDER if factored else p.shape),
            "exp_avg": torch.zeros(p.shape),
        }
        moments[name] = {k: v.to(torch.float64) for k, v in moments[name].items()}
    for t, grad in enumerate(grads, start=1):
        for name in current:
            current[name], moments[name] = formula_step(
                current[name],
                grad[name].to(torch.float64),
                moments[name],
                t,
                machine_eps=machine_eps,
                **hyper,
            )
    return current, moments


FORMULA_CASES = [
    ("defaults", 31, {}),
    ("options", 32, {"max_lr": 0.3, "eps": (1e-4, 1e-2), "d": 1.5, "weight_decay": 0.1}),
    ("maximize", 33, {"max_lr": 0.05, "beta2_decay": -0.5, "maximize": True}),
]


@pytest.mark.parametrize(("case_id", "seed", "hyper"), FORMULA_CASES, ids=lambda x: str(x))
def test_formula_matches_torch(case_id: str, seed: int, hyper: dict[str, Any]) -> None:
    """The test's own formula agrees with torch.optim.Adafactor (so it can judge beta1)."""
    params = make_params(seed, torch.float64)
    grads = grad_sequence(seed, params, STEPS)
    torch_hyper = {("lr" if k == "max_lr" else k): v for k, v in hyper.items()}
    reference = TorchReference(torch.optim.Adafactor, params, **torch_hyper)
    for grad in grads:
        reference.step(grad)
    expected_params, moments = formula_run(params, grads, **hyper)
    assert_trees_close(reference.params(), expected_params, rtol=1e-12, atol=1e-12, what="params")
    torch_moments = expected_moments(reference, params)
    for field in MOMENTS:
        assert_trees_close(
            torch_moments[field],
            {name: moments[name][field] for name in params},
            rtol=1e-12,
            atol=1e-12,
            what=field,
        )


BETA1_CASES = [
    ("beta1-0.9", 41, {"beta1": 0.9, "max_lr": 0.05}),
    ("beta1-0-options", 42, {"beta1": 0.0, "max_lr": 0.5, "weight_decay": 0.1, "d": 1.5}),
    ("beta1-maximize", 43, {"beta1": 0.5, "maximize": True, "eps": (1e-5, 1e-2)}),
]


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "pure"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("case_id", "seed", "hyper"), BETA1_CASES, ids=lambda x: str(x))
def test_beta1_variant_matches_formula(
    case_id: str, seed: int, hyper: dict[str, Any], dtype: torch.dtype, inplace: bool
) -> None:
    params = make_params(seed, dtype)
    grads = grad_sequence(seed, params, STEPS)
    optimizer = optorch.get_optimizer("adafactor", inplace=inplace, **hyper)
    state = optimizer.init(params)
    assert sorted(state) == sorted(("step", *MOMENTS, "exp_avg"))
    current = {k: v.clone() for k, v in params.items()}
    for grad in grads:
        before = snapshot(grad)
        current, state = optimizer.step(current, grad, state)
        assert_unchanged([grad], before, what="grads")
    expected_params, moments = formula_run(params, grads, **hyper)
    # float32 runs accumulate rounding of their own trajectory against the float64 one
    tolerance = (
        {"rtol": 1e-12, "atol": 1e-12}
        if dtype == torch.float64
        else {
            "rtol": 2e-5,
            "atol": 2e-6,
        }
    )
    assert_trees_close(current, expected_params, **tolerance, what=f"{case_id} params")
    for field in (*MOMENTS, "exp_avg"):
        assert_trees_close(
            state[field],
            {name: moments[name][field].to(dtype) for name in params},
            **tolerance,
            what=f"{case_id} {field}",
        )
    assert int(state["step"]) == STEPS


def test_beta1_zero_is_plain_adafactor_with_an_extra_buffer() -> None:
    params = make_params(51, torch.float64)
    grads = grad_sequence(51, params, STEPS)
    plain = optorch.get_optimizer("adafactor", max_lr=0.1)
    zero = optorch.get_optimizer("adafactor", max_lr=0.1, beta1=0.0)
    p_plain, s_plain = {k: v.clone() for k, v in params.items()}, plain.init(params)
    p_zero, s_zero = {k: v.clone() for k, v in params.items()}, zero.init(params)
    for grad in grads:
        p_plain, s_plain = plain.step(p_plain, grad, s_plain)
        p_zero, s_zero = zero.step(p_zero, grad, s_zero)
    assert_trees_close(p_zero, p_plain, rtol=1e-14, atol=1e-15, what="params")


# --------------------------------------------------------------------------------------
# state shapes
# --------------------------------------------------------------------------------------


def test_state_shapes_match_torch_and_placeholders_are_empty() -> None:
    params = make_params(61, torch.float32)
    state = optorch.get_optimizer("adafactor").init(params)
    reference = TorchReference(torch.optim.Adafactor, params)
    reference.step(grad_sequence(61, params, 1)[0])
    for name, param in params.items():
        torch_state = reference.optimizer.state[reference.tensors[name]]
        for field in MOMENTS:
            leaf = state[field][name]
            assert leaf.dtype == param.dtype and not leaf.any()
            if field in torch_state:
                assert leaf.shape == torch_state[field].shape, (name, field)
            else:
                assert leaf.shape == PLACEHOLDER, (name, field)
    assert state["row_var"]["conv.weight"].shape == (2, 3, 1)
    assert state["col_var"]["conv.weight"].shape == (2, 1, 2)
    assert state["variance"]["scale"].shape == ()


WRONG_STATE = [
    ("row_var", "layer.weight", (4, 3), r"'row_var' at .*layer\.weight.* expects \(4, 1\)"),
    ("col_var", "conv.weight", (2, 3, 1), r"'col_var' at .*conv\.weight.* expects \(2, 1, 2\)"),
    ("variance", "layer.weight", (4, 3), r"'variance' at .*layer\.weight.* expects \(0,\)"),
    ("variance", "layer.bias", (0,), r"'variance' at .*layer\.bias.* expects \(4,\)"),
]


@pytest.mark.parametrize(("field", "name", "shape", "message"), WRONG_STATE)
def test_wrongly_shaped_state_is_rejected_before_anything_changes(
    field: str, name: str, shape: tuple[int, ...], message: str
) -> None:
    params = make_params(62, torch.float32)
    state = optorch.get_optimizer("adafactor").init(params)
    state[field][name] = torch.zeros(shape)
    before = snapshot(params, state)
    with pytest.raises(ValueError, match=message):
        adafactor_step(params, grad_sequence(62, params, 1)[0], state, AdafactorConfig())
    assert_unchanged([params, state], before)


# --------------------------------------------------------------------------------------
# config validation, registry, seed-style functions
# --------------------------------------------------------------------------------------

BAD_CONFIGS = [
    ({"max_lr": -0.01}, ValueError, r"max_lr: -0\.01"),
    ({"max_lr": math.nan}, ValueError, r"max_lr: nan"),
    ({"beta2_decay": 0.1}, ValueError, r"beta2_decay: 0\.1"),
    ({"beta2_decay": -math.inf}, ValueError, r"beta2_decay: -inf"),
    ({"eps": (-1e-30, 1e-3)}, ValueError, r"eps\[0\]: -1e-30"),
    ({"eps": (None, -1e-3)}, ValueError, r"eps\[1\]: -0\.001"),
    ({"eps": (None, math.nan)}, ValueError, r"eps\[1\]: nan"),
    ({"eps": 1e-3}, ValueError, r"eps: 0\.001 \(must be a tuple"),
    ({"eps": (1e-3,)}, ValueError, r"eps: \(0\.001,\)"),
    ({"d": 0.5}, ValueError, r"\.d: 0\.5"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay: -0\.1"),
    ({"beta1": 1.0}, ValueError, r"beta1: 1\.0"),
    ({"beta1": -0.1}, ValueError, r"beta1: -0\.1"),
    ({"maximize": "no"}, TypeError, r"maximize must be a bool"),
    ({"d": "1"}, TypeError, r"\.d: expected a number"),
]


@pytest.mark.parametrize(
    ("hyper", "error", "message"),
    BAD_CONFIGS,
    ids=[f"{next(iter(hyper))}-{i}" for i, (hyper, _, _) in enumerate(BAD_CONFIGS)],
)
def test_bad_hyperparameters_are_rejected(
    hyper: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        optorch.get_optimizer("adafactor", **hyper)


def test_eps_as_a_list_from_yaml_is_accepted() -> None:
    config = AdafactorConfig(eps=[None, 1e-3])  # type: ignore[arg-type]
    assert config.eps == (None, 1e-3)


def test_registered_with_torch_defaults() -> None:
    assert "adafactor" in optorch.REGISTRY
    optimizer = optorch.get_optimizer("adafactor")
    assert isinstance(optimizer.config, AdafactorConfig)
    torch_defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(torch.optim.Adafactor.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    assert optimizer.config.max_lr == torch_defaults["lr"]
    for key in ("beta2_decay", "eps", "d", "weight_decay", "maximize"):
        assert getattr(optimizer.config, key) == torch_defaults[key], key
    assert optimizer.config.beta1 is None
    assert isinstance(optorch.DEFAULT_OPTIMIZER_CONFIGS["adafactor"](), AdafactorConfig)


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_seed_style_functions_on_a_module() -> None:
    torch.manual_seed(3)
    model = TinyNet()
    frozen_before = snapshot(dict(model.frozen.named_parameters()))
    state = default_adafactor_state(model)
    assert sorted(state["row_var"]) == ["layer.bias", "layer.weight"]
    config = AdafactorConfig(max_lr=0.1, weight_decay=0.01)
    twin_tensors = [p.detach().clone().requires_grad_() for p in model.layer.parameters()]
    twin = torch.optim.Adafactor(twin_tensors, lr=0.1, weight_decay=0.01, foreach=False)
    params = {k: v for k, v in model.named_parameters() if v.requires_grad}
    generator = torch.Generator().manual_seed(5)
    for _ in range(5):
        grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
        params, state = adafactor_step(params, grads, state, config)
        for tensor, key in zip(twin_tensors, grads, strict=True):
            tensor.grad = grads[key].clone()
        twin.step()
    assert_trees_close(
        dict(model.layer.named_parameters(prefix="layer")),
        dict(zip(["layer.weight", "layer.bias"], (t.detach() for t in twin_tensors), strict=True)),
        rtol=1e-6,
        atol=1e-6,
        what="module params",
    )
    assert_unchanged([dict(model.frozen.named_parameters())], frozen_before, what="frozen")
    assert "frozen.weight" not in state["row_var"]


def test_foreach_rms_of_a_long_float32_vector_is_the_reference_s() -> None:
    """ATen's CPU foreach norm sums a float32 vector in float32 (9e-6 off at 700,000
    elements); the foreach RMS accumulates in float64, as accurate as the reference's."""
    gen = torch.Generator().manual_seed(3)
    param = torch.randn(700_001, generator=gen)
    grads = [torch.randn(700_001, generator=gen) for _ in range(2)]
    results = []
    for impl in ("reference", "foreach"):
        opt = optorch.get_optimizer("adafactor", impl=impl)
        params = {"v": param.clone()}
        state = opt.init(params)
        for grad in grads:
            params, state = opt.step(params, {"v": grad}, state)
        results.append((params, state))
    (ref_params, ref_state), (ours, our_state) = results
    torch.testing.assert_close(ours["v"], ref_params["v"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        our_state["variance"]["v"], ref_state["variance"]["v"], rtol=1e-5, atol=1e-7
    )
