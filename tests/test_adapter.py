"""The ``torch.optim`` adapter against ``torch.optim`` itself.

The adapter wrapping an optorch optimizer must follow the torch twin step for step when
driven by the same code: ``lr_scheduler`` classes (``OneCycleLR`` cycling ``betas[0]``),
``torch.amp.GradScaler`` with injected overflows, param groups with their own
hyperparameters, params that get their first gradient late, and a ``state_dict`` round
trip through ``torch.save``/``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import inspect
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import TOLERANCES

import optorch
from optorch.interop import TorchOptimizer
from optorch.interop.convert import TORCH_TWINS

TOL = TOLERANCES[torch.float32]
SHAPES = {"w": (5, 3), "b": (5,), "g": ()}


def make_model_params(
    seed: int, shapes: dict[str, tuple[int, ...]] = SHAPES
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes.values()]


def grads_for(step: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def drive(
    make_optimizer: Callable[[list[Any]], torch.optim.Optimizer],
    steps: int,
    *,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    groups: Callable[[list[torch.nn.Parameter]], list[Any]] | None = None,
    has_grad: Callable[[int, int], bool] = lambda step, index: True,
    shapes: dict[str, tuple[int, ...]] = SHAPES,
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = make_model_params(0, shapes)
    optimizer = make_optimizer(groups(params) if groups else params)
    sched = scheduler(optimizer) if scheduler else None
    for step in range(steps):
        for index, (p, g) in enumerate(zip(params, grads_for(step, params), strict=True)):
            p.grad = g if has_grad(step, index) else None
        optimizer.step()
        if sched is not None:
            sched.step()
    return params, optimizer


def assert_same_run(
    ours: tuple[list[torch.nn.Parameter], torch.optim.Optimizer],
    theirs: tuple[list[torch.nn.Parameter], torch.optim.Optimizer],
    fields: dict[str, str],
    *,
    rtol: float = TOL["rtol"],
    atol: float = TOL["atol"],
) -> None:
    """Params, per-param state (optorch field -> torch key, the key both keep it under)
    and step counts agree."""
    for index, (a, b) in enumerate(zip(ours[0], theirs[0], strict=True)):
        torch.testing.assert_close(
            a.detach(), b.detach(), rtol=rtol, atol=atol, msg=f"param {index}"
        )
        state_a, state_b = ours[1].state[a], theirs[1].state[b]
        if "step" in state_b:
            assert float(state_a["step"]) == float(state_b["step"]), f"step of param {index}"
            assert state_a["step"].dtype == state_b["step"].dtype, f"step dtype of {index}"
        for field, key in fields.items():
            if state_b.get(key) is None:
                continue
            torch.testing.assert_close(
                state_a[key], state_b[key], rtol=rtol, atol=atol, msg=f"{field} of param {index}"
            )


ADAM_FIELDS = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}


def test_onecycle_with_cycled_betas_matches_torch_adamw() -> None:
    def scheduler(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=30, cycle_momentum=True, base_momentum=0.8
        )

    ours = drive(
        lambda p: TorchOptimizer(p, "adamw", lr=0.01, weight_decay=0.1), 30, scheduler=scheduler
    )
    theirs = drive(
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=False),
        30,
        scheduler=scheduler,
    )
    assert ours[1].param_groups[0]["betas"][0] != 0.9, "OneCycleLR must have cycled beta1"
    assert ours[1].param_groups[0]["betas"] == theirs[1].param_groups[0]["betas"]
    assert_same_run(ours, theirs, ADAM_FIELDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_onecycle_with_cycled_betas_matches_torch_nadam(dtype: torch.dtype) -> None:
    """NAdam's mu_product is torch's running product over each step's beta1 (the closed
    form from the current beta1 drifted 6e-5-8e-5 relative)."""

    def scheduler(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=30, cycle_momentum=True, base_momentum=0.8
        )

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # params, and torch's mu_product, in dtype
    try:
        ours = drive(lambda p: TorchOptimizer(p, "nadam", lr=0.01), 30, scheduler=scheduler)
        theirs = drive(
            lambda p: torch.optim.NAdam(p, lr=0.01, foreach=False), 30, scheduler=scheduler
        )
    finally:
        torch.set_default_dtype(previous)
    assert ours[1].param_groups[0]["betas"] == theirs[1].param_groups[0]["betas"]
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {}
    assert_same_run(ours, theirs, {**ADAM_FIELDS, "mu_product": "mu_product"}, **tol)
    # the state dict loads into torch.optim.NAdam, which continues as the adapter does
    twin = torch.optim.NAdam(theirs[0], lr=0.01, foreach=False)
    twin.load_state_dict(ours[1].state_dict())
    for index, param in enumerate(theirs[0]):
        torch.testing.assert_close(
            twin.state[param]["mu_product"].double(),
            ours[1].state[ours[0][index]]["mu_product"].double(),
            rtol=1e-6 if dtype == torch.float32 else 1e-13,
            atol=0.0,
        )


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum_turned_on_mid_run_matches_torch(dampening: float) -> None:
    """torch starts a missing buffer at the next gradient, undamped: a momentum written
    into the group after some plain steps (a warm-up callback) starts it then."""

    def run(make: Callable[[list[Any]], torch.optim.Optimizer]) -> Any:
        params = make_model_params(0)
        optimizer = make(params)
        for step in range(12):
            if step == 4:
                for group in optimizer.param_groups:
                    group["momentum"] = 0.9
            for index, (p, g) in enumerate(zip(params, grads_for(step, params), strict=True)):
                p.grad = None if (index == 1 and step in (4, 5)) else g
            optimizer.step()
        return params, optimizer

    ours = run(lambda p: TorchOptimizer(p, "sgd", lr=0.05, dampening=dampening))
    theirs = run(lambda p: torch.optim.SGD(p, lr=0.05, dampening=dampening, foreach=False))
    assert_same_run(ours, theirs, {"momentum": "momentum_buffer"})


def test_params_at_one_count_with_other_histories_keep_their_own_state() -> None:
    """Params are stepped together only where torch's per-param state agrees: NAdam's
    mu_product (two params reaching one count by sitting out different steps while
    beta1 moves), SGD's buffer (one param without a buffer next to one with: torch starts
    the missing one undamped)."""

    def nadam(make: Callable[[list[Any]], torch.optim.Optimizer]) -> Any:
        params = make_model_params(3, {"a": (3,), "b": (3,)})
        optimizer = make(params)
        pattern = [(True, False), (False, True), (True, True), (True, True)]
        for step, (beta1, present) in enumerate(zip([0.9, 0.8, 0.7, 0.95], pattern, strict=True)):
            optimizer.param_groups[0]["betas"] = (beta1, 0.999)
            for p, g, has in zip(params, grads_for(step, params), present, strict=True):
                p.grad = g if has else None
            optimizer.step()
        return params, optimizer

    ours = nadam(lambda p: TorchOptimizer(p, "nadam", lr=0.1))
    theirs = nadam(lambda p: torch.optim.NAdam(p, lr=0.1, foreach=False))
    assert_same_run(ours, theirs, {**ADAM_FIELDS, "mu_product": "mu_product"})

    def sgd(make: Callable[[list[Any]], torch.optim.Optimizer]) -> Any:
        params = make_model_params(4, {"a": (3,), "b": (3,)})
        optimizer = make(params)
        plan = [(0.0, True, True), (0.0, True, False), (0.9, False, True), (0.9, True, True)]
        for step, (momentum, has_a, has_b) in enumerate(plan * 2):
            optimizer.param_groups[0]["momentum"] = momentum
            for p, g, has in zip(params, grads_for(step, params), (has_a, has_b), strict=True):
                p.grad = g if has else None
            optimizer.step()
        return params, optimizer

    ours = sgd(lambda p: TorchOptimizer(p, "sgd", lr=0.1, dampening=0.5))
    theirs = sgd(lambda p: torch.optim.SGD(p, lr=0.1, dampening=0.5, foreach=False))
    assert_same_run(ours, theirs, {"momentum": "momentum_buffer"})


def test_grad_scaler_with_overflows_matches_torch() -> None:
    overflow_at = {2, 6, 7}

    def run(make: Callable[[list[Any]], torch.optim.Optimizer]) -> tuple[Any, Any, list[float]]:
        params = make_model_params(0)
        optimizer = make(params)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=30)
        scales = []
        data = torch.Generator().manual_seed(5)
        for step in range(12):
            optimizer.zero_grad()
            loss = sum((p * torch.randn(p.shape, generator=data)).sum() for p in params)
            scaler.scale(loss).backward()
            if step in overflow_at:
                params[0].grad.view(-1)[0] = float("inf")
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            scales.append(scaler.get_scale())
        return params, optimizer, scales

    ours = run(lambda p: TorchOptimizer(p, "adamw", lr=0.01, weight_decay=0.01))
    theirs = run(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.01, foreach=False))
    assert ours[2] == theirs[2], "loss scale trajectory"
    assert float(ours[1].state[ours[0][0]]["step"]) == 12 - len(overflow_at)
    assert_same_run((ours[0], ours[1]), (theirs[0], theirs[1]), ADAM_FIELDS)


def test_param_groups_with_their_own_hyperparameters() -> None:
    def groups(params: list[torch.nn.Parameter]) -> list[Any]:
        return [
            {"params": [params[0]]},
            {"params": params[1:], "lr": 0.003, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        ]

    def scheduler(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)

    ours = drive(
        lambda g: TorchOptimizer(g, "adamw", lr=0.01, weight_decay=0.1),
        12,
        groups=groups,
        scheduler=scheduler,
    )
    theirs = drive(
        lambda g: torch.optim.AdamW(g, lr=0.01, weight_decay=0.1, foreach=False),
        12,
        groups=groups,
        scheduler=scheduler,
    )
    assert_same_run(ours, theirs, ADAM_FIELDS)


def test_late_gradients_keep_per_param_step_counts() -> None:
    # param 1 gets its first gradient at step 4, param 2 misses steps 2 and 3
    def has_grad(step: int, index: int) -> bool:
        return not ((index == 1 and step < 4) or (index == 2 and step in (2, 3)))

    ours = drive(lambda p: TorchOptimizer(p, "adam", lr=0.01), 10, has_grad=has_grad)
    theirs = drive(lambda p: torch.optim.Adam(p, lr=0.01, foreach=False), 10, has_grad=has_grad)
    assert [float(ours[1].state[p]["step"]) for p in ours[0]] == [10.0, 6.0, 8.0]
    assert_same_run(ours, theirs, ADAM_FIELDS)


# (registry name, optorch hyperparameters, torch class, torch hyperparameters, fields)
TWINS: list[tuple[str, dict[str, Any], str, dict[str, Any], dict[str, str]]] = [
    (
        "sgd",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        "SGD",
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"momentum": "momentum_buffer"},
    ),
    (
        "adam",
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
        "Adam",
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
        {**ADAM_FIELDS, "max_exp_avg_sq": "max_exp_avg_sq"},
    ),
    (
        "rmsprop",
        {"lr": 0.01, "momentum": 0.5, "centered": True},
        "RMSprop",
        {"lr": 0.01, "momentum": 0.5, "centered": True},
        {"square_avg": "square_avg", "momentum_buffer": "momentum_buffer", "grad_avg": "grad_avg"},
    ),
    (
        "adagrad",
        {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
        "Adagrad",
        {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
        {"sum": "sum"},
    ),
    ("adamax", {"lr": 0.01}, "Adamax", {"lr": 0.01}, {"exp_avg": "exp_avg", "exp_inf": "exp_inf"}),
    (
        "nadam",
        {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1},
        "NAdam",
        {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1},
        ADAM_FIELDS,
    ),
    ("radam", {"lr": 0.01}, "RAdam", {"lr": 0.01}, ADAM_FIELDS),
    (
        "adafactor",
        {"lr": 0.01},
        "Adafactor",
        {"lr": 0.01},
        {"row_var": "row_var", "col_var": "col_var", "variance": "variance"},
    ),
]


@pytest.mark.parametrize(
    ("name", "hyper", "torch_name", "torch_hyper", "fields"), TWINS, ids=[t[0] for t in TWINS]
)
def test_registry_optimizers_match_their_torch_twin_under_a_scheduler(
    name: str,
    hyper: dict[str, Any],
    torch_name: str,
    torch_hyper: dict[str, Any],
    fields: dict[str, str],
) -> None:
    def scheduler(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)

    if not hasattr(torch.optim, torch_name):
        pytest.skip(f"torch {torch.__version__} has no torch.optim.{torch_name}")
    torch_class = getattr(torch.optim, torch_name)
    extra = {"foreach": False} if "foreach" in torch_class.__init__.__code__.co_varnames else {}
    ours = drive(lambda p: TorchOptimizer(p, name, **hyper), 10, scheduler=scheduler)
    theirs = drive(lambda p: torch_class(p, **torch_hyper, **extra), 10, scheduler=scheduler)
    assert_same_run(ours, theirs, fields, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9+")
def test_optorch_optimizer_object_and_muon() -> None:
    base = optorch.get_optimizer("muon", max_lr=0.02, weight_decay=0.0, inplace=False)
    shapes = {"a": (4, 3), "b": (3, 3)}
    ours = drive(lambda p: TorchOptimizer(p, base), 5, shapes=shapes)
    theirs = drive(lambda p: torch.optim.Muon(p, lr=0.02, weight_decay=0.0), 5, shapes=shapes)
    assert_same_run(ours, theirs, {"momentum": "momentum_buffer"}, rtol=1e-4, atol=1e-5)
    assert ours[1].functional.config.inplace is True and base.config.inplace is False


@pytest.mark.parametrize("name", ["adamw", "schedule_free_adamw", "adafactor", "sgd"])
def test_state_dict_round_trip_through_weights_only_load(name: str) -> None:
    first = drive(lambda p: TorchOptimizer(p, name, lr=0.01), 5)
    buffer = io.BytesIO()
    torch.save(first[1].state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params = [torch.nn.Parameter(p.detach().clone()) for p in first[0]]
    second = TorchOptimizer(params, name, lr=0.5)  # lr comes back from the state dict
    second.load_state_dict(saved)
    assert second.param_groups[0]["lr"] == 0.01
    for step in range(5, 9):
        for run_params in (first[0], params):
            for p, g in zip(run_params, grads_for(step, run_params), strict=True):
                p.grad = g
        first[1].step()
        second.step()
    for a, b in zip(first[0], params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(first[0], params, strict=True):
        state_a, state_b = first[1].state[a], second.state[b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert state_a[key].dtype == state_b[key].dtype, key
            assert torch.equal(state_a[key], state_b[key]), key


def test_closure_zero_grad_and_no_grad_params() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    frozen = torch.nn.Parameter(torch.ones(2))
    opt = TorchOptimizer([w, frozen], "sgd", lr=0.5, momentum=0.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 2.0
    assert torch.equal(w.detach(), torch.zeros(2)) and torch.equal(frozen.detach(), torch.ones(2))
    assert frozen not in opt.state
    opt.zero_grad()
    assert w.grad is None


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda p: TorchOptimizer(p, "adamqq"), ValueError, "Unknown optimizer 'adamqq'"),
        (lambda p: TorchOptimizer(p, "adamw", lr=-1.0), ValueError, r"max_lr: -1.0"),
        (lambda p: TorchOptimizer(p, "adamw", lr=0.1, max_lr=0.1), TypeError, "lr or max_lr"),
        (
            lambda p: TorchOptimizer(p, optorch.wrappers.ema(optorch.get_optimizer("sgd"), 0.9)),
            TypeError,
            "use param groups instead of wrappers",
        ),
        (lambda p: TorchOptimizer(p, "adamw", betas=(0.9, 1.5)), ValueError, r"betas\[1\]"),
    ],
    ids=["unknown name", "negative lr", "lr and max_lr", "wrapper", "bad betas"],
)
def test_bad_construction(make: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        make([torch.nn.Parameter(torch.ones(2))])


def test_bad_group_value_raises_at_step_and_changes_nothing() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    opt = TorchOptimizer([{"params": [w], "betas": (0.9, 1.5)}], "adam")
    w.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(2))
    assert not opt.state.get(w), "a refused step made state"


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("lr", -1.0, r"max_lr: -1\.0"),
        ("lr", float("nan"), r"max_lr: nan"),
        ("weight_decay", float("inf"), r"weight_decay: inf"),
        ("amsgrad", "yes", r"amsgrad must be a bool"),
    ],
)
def test_a_bad_later_group_leaves_every_group_as_it_was(key: str, value: Any, match: str) -> None:
    """Groups are checked before any is stepped: the good first group is not updated
    when the second is refused (after one good step, so there is state to keep)."""
    a, b = (torch.nn.Parameter(torch.full((3,), float(k))) for k in (1, 2))
    opt = TorchOptimizer([{"params": [a]}, {"params": [b]}], "adam", lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    before = copy.deepcopy((a.detach(), b.detach(), opt.state_dict()))
    opt.param_groups[1][key] = value
    a.grad, b.grad = torch.full((3,), 0.5), torch.full((3,), 0.5)
    with pytest.raises((ValueError, TypeError), match=r"param_groups\[1\]: .*" + match):
        opt.step()
    after = (a.detach(), b.detach(), opt.state_dict())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    for index in (0, 1):
        for name, tensor in before[2]["state"][index].items():
            assert torch.equal(after[2]["state"][index][name], tensor), (index, name)


@pytest.mark.parametrize(
    ("name", "hyper", "shape"),
    [
        ("sgd", {"momentum": 0.9}, (4, 3)),
        ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, (4, 3)),
        ("nadam", {"weight_decay": 0.01}, (4, 3)),
        ("adamw", {"amsgrad": True, "weight_decay": 0.1}, (4, 3)),
        ("rmsprop", {"momentum": 0.5, "centered": True}, (4, 3)),
        ("adagrad", {"lr_decay": 0.01}, (4, 3)),
        ("radam", {}, (4, 3)),
        ("adamax", {}, (4, 3)),
        ("muon", {}, (4, 3)),
    ],
)
def test_state_dicts_move_between_the_adapter_and_the_torch_twin(
    name: str, hyper: dict[str, Any], shape: tuple[int, ...]
) -> None:
    """Three steps in one, the state_dict loaded into the other, three more: equal to six
    steps of the twin, both ways (the state is kept under the twin's keys)."""
    twin = getattr(torch.optim, TORCH_TWINS[name].torch_class)

    def run(first: Callable[[Any], Any], second: Callable[[Any], Any]) -> torch.Tensor:
        w = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
        gen = torch.Generator().manual_seed(1)
        optimizer = first([w])
        for _ in range(3):
            w.grad = torch.randn(shape, generator=gen)
            optimizer.step()
        resumed = second([w])
        resumed.load_state_dict(optimizer.state_dict())
        for _ in range(3):
            w.grad = torch.randn(shape, generator=gen)
            resumed.step()
        return w.detach()

    def theirs(p: Any) -> Any:
        return twin(p, lr=0.05, **hyper)

    def ours(p: Any) -> Any:
        return TorchOptimizer(p, name, lr=0.05, **hyper)

    reference = run(theirs, theirs)
    for first, second in ((ours, theirs), (theirs, ours), (ours, ours)):
        torch.testing.assert_close(run(first, second), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("flags", "impl"),
    [
        ({"foreach": True}, "foreach"),
        ({"foreach": False}, "reference"),
        ({"fused": True}, "compiled"),
        ({"capturable": False, "differentiable": False}, "auto"),
    ],
)
def test_torch_implementation_flags_are_accepted(flags: dict[str, Any], impl: str) -> None:
    """Code that builds ``torch.optim.AdamW(..., foreach=True)`` keeps working: the flag
    picks optorch's engine, and the run still equals torch's with the same flag."""
    ours = drive(lambda p: TorchOptimizer(p, "adamw", lr=0.01, weight_decay=0.1, **flags), 10)
    assert ours[1].functional.config.impl == impl
    theirs = drive(lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, **flags), 10)
    assert_same_run(ours, theirs, ADAM_FIELDS)


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"differentiable": True}, r"differentiable=True is not supported"),
        ({"fused": True, "foreach": True}, r"cannot both be set"),
        ({"foreach": True, "impl": "compiled"}, r"impl='compiled' contradicts foreach=True"),
    ],
)
def test_contradictory_implementation_flags_are_refused(flags: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TorchOptimizer([torch.nn.Parameter(torch.ones(2))], "adamw", **flags)


@pytest.mark.parametrize("name", ["adamw", "schedule_free_adamw"])
def test_state_dicts_keyed_by_param_name_load(name: str) -> None:
    """torch.distributed.checkpoint's get/set_optimizer_state_dict (how FSDP2 and DCP
    save torch.optim optimizers) key the state by param name, not by integer id; the
    rule-wide values (Schedule-Free's weight_sum) must still reach their params."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = TorchOptimizer(model.parameters(), name, lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    saved = get_optimizer_state_dict(model, opt)
    assert sorted(saved["state"]) == ["bias", "weight"]
    before = copy.deepcopy(opt.state_dict())
    resumed = TorchOptimizer(model.parameters(), name, lr=1e-2)
    set_optimizer_state_dict(model, resumed, saved)
    after = resumed.state_dict()
    for index, per_param in before["state"].items():
        for key, value in per_param.items():
            assert torch.equal(after["state"][index][key], value), (index, key)


def test_fused_with_cycled_betas_compiles_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """fused=True (the compiled engine) with OneCycleLR moving beta1 every step: the
    group's changed numbers reach the kernel as tensors, so one kernel serves every step
    (each new beta1 compiled a kernel of its own); the run equals torch.optim.AdamW's."""
    from optorch import engine

    monkeypatch.setattr(engine, "COMPILED_MIN_NUMEL", 2)  # the small params through it too

    def scheduler(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=8, cycle_momentum=True, base_momentum=0.8
        )

    kernels = len(engine._COMPILED)
    # a weight decay no other test uses: this test compiles its own kernel
    ours = drive(
        lambda p: TorchOptimizer(p, "adamw", lr=0.01, weight_decay=0.0731, fused=True),
        8,
        scheduler=scheduler,
    )
    assert len(engine._COMPILED) - kernels == 1
    theirs = drive(
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.0731, foreach=False),
        8,
        scheduler=scheduler,
    )
    assert_same_run(ours, theirs, ADAM_FIELDS)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_a_copied_adapter_steps_like_the_original(how: str) -> None:
    """torch's __getstate__ keeps defaults, state and param_groups only; the copy also
    needs the optorch optimizer it steps with."""
    import pickle

    w = torch.nn.Parameter(torch.ones(3))
    opt = TorchOptimizer([w], "adamw", lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    if how == "deepcopy":
        copied = copy.deepcopy({"w": w, "opt": opt})
    elif how == "pickle":
        copied = pickle.loads(pickle.dumps({"w": w, "opt": opt}))  # noqa: S301 - bytes made here
    else:
        buffer = io.BytesIO()
        torch.save({"w": w, "opt": opt}, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    twin_w, twin = copied["w"], copied["opt"]
    assert repr(twin) == repr(opt)
    w.grad, twin_w.grad = torch.full((3,), 0.5), torch.full((3,), 0.5)
    opt.step()
    twin.step()
    assert torch.equal(w.detach(), twin_w.detach())
    for key, value in opt.state[w].items():
        assert torch.equal(twin.state[twin_w][key], value), key


def _schedule_free_adapter() -> tuple[list[torch.nn.Parameter], TorchOptimizer]:
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = TorchOptimizer(params, "schedule_free_adamw", lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return params, opt


def test_load_hooks_see_and_decide_the_rule_wide_values() -> None:
    """Schedule-Free's float64 weight_sum is taken from the state dict the pre-hooks
    return (a hook's edit is kept; a param whose state a hook dropped gets none), and it
    is float64 again before the post-hooks run."""
    saved = _schedule_free_adapter()[1].state_dict()
    params, opt = _schedule_free_adapter()
    seen: list[torch.Tensor] = []

    def pre(optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state = {key: dict(value) for key, value in state_dict["state"].items()}
        state[0]["weight_sum"] = torch.tensor(123.0, dtype=torch.float64)
        del state[1]  # a re-initialised head, say
        return {**state_dict, "state": state}

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(
        lambda optimizer: seen.append(optimizer.state[params[0]]["weight_sum"])
    )
    opt.load_state_dict(saved)
    assert seen[0].dtype == torch.float64 and float(seen[0]) == 123.0
    assert float(opt.state[params[0]]["weight_sum"]) == 123.0
    assert not opt.state.get(params[1]), "the dropped param got a partial state"
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()  # the dropped param starts afresh
    assert float(opt.state[params[1]]["step"]) == 1.0


def test_schedule_free_train_and_eval_switch_like_the_package() -> None:
    """``eval()`` moves the params to Schedule-Free's average x and ``train()`` back to y,
    as ``schedulefree.AdamWScheduleFree`` does (compared at each switch and after more
    steps); ``step`` in eval mode is refused; other rules treat both as no-ops."""
    schedulefree = pytest.importorskip("schedulefree")
    hyper = {"lr": 0.05, "betas": (0.9, 0.999), "weight_decay": 0.01, "warmup_steps": 3}
    ours = make_model_params(0, SHAPES)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = TorchOptimizer(ours, "schedule_free_adamw", **hyper)
    package = schedulefree.AdamWScheduleFree(theirs, **hyper)
    package.train()

    def run(steps: range) -> None:
        for step in steps:
            for a, b, g in zip(ours, theirs, grads_for(step, ours), strict=True):
                a.grad, b.grad = g.clone(), g.clone()
            opt.step()
            package.step()

    def assert_same(what: str) -> None:
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL, msg=f"{what} {index}")

    run(range(10))
    assert_same("after 10 steps")
    opt.eval()
    package.eval()
    assert_same("at x")
    opt.eval()  # already there: nothing moves
    assert_same("at x, eval() twice")
    with pytest.raises(RuntimeError, match=r"call optimizer\.train\(\) first"):
        opt.step()
    opt.train()
    package.train()
    assert_same("back at y")
    run(range(10, 15))
    assert_same("5 steps later")
    w = torch.nn.Parameter(torch.ones(2))
    adamw = TorchOptimizer([w], "adamw")
    adamw.eval()
    adamw.train()
    assert torch.equal(w.detach(), torch.ones(2))


@pytest.mark.parametrize(
    ("name", "group", "twin_params"),
    [
        ("nadam", {"momentum_decay": 8e-3}, (4, 3)),
        ("muon", {"ns_steps": 3, "eps": 1e-6}, (4, 3)),
        ("sgd", {"momentum": 0.0}, (4, 3)),
        ("adamw", {"weight_decay": 0.0, "betas": (0.0, 0.99)}, (4, 3)),
    ],
)
def test_fused_takes_every_group_value_the_other_engines_take(
    name: str, group: dict[str, Any], twin_params: tuple[int, ...]
) -> None:
    """fused=True passes moved numbers as tensors, but not ints, zeros (a zero decides
    which code runs) or fields the config takes as Python numbers only."""
    runs = []
    for fused in (False, True):
        w = torch.nn.Parameter(torch.ones(twin_params))
        opt = TorchOptimizer([{"params": [w], **group}], name, lr=0.01, fused=fused)
        for step in range(3):
            w.grad = torch.full(twin_params, 0.1 * (step + 1))
            opt.step()
        runs.append((w.detach().clone(), dict(opt.state[w])))
    (plain, plain_state), (fused_w, fused_state) = runs
    torch.testing.assert_close(fused_w, plain, rtol=1e-6, atol=1e-7)
    assert sorted(fused_state) == sorted(plain_state)  # no momentum buffer for momentum 0


def test_schedule_free_eval_with_fused_and_group_betas() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = TorchOptimizer([{"params": [w], "betas": (0.95, 0.999)}], "schedule_free_adamw")
    fused = TorchOptimizer(
        [{"params": [v := torch.nn.Parameter(torch.ones(3))], "betas": (0.95, 0.999)}],
        "schedule_free_adamw",
        fused=True,
    )
    for step in range(3):
        w.grad, v.grad = torch.full((3,), 0.1 * step), torch.full((3,), 0.1 * step)
        opt.step()
        fused.step()
    opt.eval()
    fused.eval()
    torch.testing.assert_close(v.detach(), w.detach(), rtol=1e-6, atol=1e-7)
    fused.train()
    opt.train()
    torch.testing.assert_close(v.detach(), w.detach(), rtol=1e-6, atol=1e-7)


def test_a_copied_adapter_keeps_the_registered_rule() -> None:
    """Checkpoints look rules up by identity: a deepcopy or pickle keeps the module's."""
    import pickle

    opt = TorchOptimizer([torch.nn.Parameter(torch.ones(2))], "adamw")
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):  # noqa: S301 - made here
        assert copied.functional.rule is opt.functional.rule


@pytest.mark.parametrize(
    "shapes", [[(5,)], [(3, 4)], [(5,), (3, 4)]], ids=["vector", "matrix", "both"]
)
def test_adafactor_continues_from_torch_state_whatever_its_params_keep(
    shapes: list[tuple[int, ...]],
) -> None:
    """torch.optim.Adafactor keeps only ``variance`` for a vector and only the factors for
    a matrix; the adapter fills the rest with its placeholders and continues like torch
    (a param that got its first gradient late is a bucket of its own)."""
    gen = torch.Generator().manual_seed(14)
    start = [torch.randn(shape, generator=gen) for shape in shapes]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    reference = torch.optim.Adafactor(theirs, lr=0.01, foreach=False)
    grads = [[torch.randn(shape, generator=gen) for shape in shapes] for _ in range(8)]
    for step, g in enumerate(grads[:3]):
        for index, (p, grad) in enumerate(zip(theirs, g, strict=True)):
            p.grad = None if (index == 0 and step == 0 and len(shapes) > 1) else grad.clone()
        reference.step()
    ours = [torch.nn.Parameter(p.detach().clone()) for p in theirs]
    adapter = TorchOptimizer(ours, "adafactor", lr=0.01)
    # a copy: load_state_dict keeps the given step tensors, as torch's does, and both
    # optimizers go on stepping here
    adapter.load_state_dict(copy.deepcopy(reference.state_dict()))
    for g in grads[3:]:
        for p, q, grad in zip(theirs, ours, g, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        reference.step()
        adapter.step()
    for p, q in zip(theirs, ours, strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
        assert float(adapter.state[q]["step"]) == float(reference.state[p]["step"])


@pytest.mark.parametrize("name", sorted(TORCH_TWINS))
def test_a_registry_name_takes_the_torch_classes_defaults(name: str) -> None:
    """``TorchOptimizer(params, name)`` stands in for the torch class: its defaults, not
    the registry's (the seed's SGD has momentum 0.9 and its AdamW no weight decay)."""
    torch_class = getattr(torch.optim, TORCH_TWINS[name].torch_class, None)
    if torch_class is None:
        pytest.skip(f"torch {torch.__version__} has no torch.optim.{TORCH_TWINS[name].torch_class}")
    ours = TorchOptimizer([torch.nn.Parameter(torch.zeros(3, 2))], name)
    theirs = torch_class([torch.nn.Parameter(torch.zeros(3, 2))])
    shared = [k for k in theirs.param_groups[0] if k in ours.param_groups[0] and k != "params"]
    assert "lr" in shared and len(shared) >= 3
    for key in shared:
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key


@pytest.mark.parametrize(("name", "torch_name"), [("sgd", "SGD"), ("adamw", "AdamW")])
def test_only_lr_given_runs_as_the_torch_class_does(name: str, torch_name: str) -> None:
    ours = drive(lambda p: TorchOptimizer(p, name, lr=0.05), 10)
    theirs = drive(lambda p: getattr(torch.optim, torch_name)(p, lr=0.05, foreach=False), 10)
    fields = {"momentum": "momentum_buffer"} if name == "sgd" else ADAM_FIELDS
    assert_same_run(ours, theirs, fields, rtol=1e-6, atol=1e-7)
    registry = optorch.get_optimizer(name).config  # the registry keeps the seed's defaults
    assert registry.weight_decay == 0.0
    if name == "sgd":
        assert registry.momentum == 0.9


def test_a_group_with_its_own_momentum_may_ask_for_nesterov() -> None:
    """The optimizer-wide SGD momentum is torch's 0; a group's own momentum is what its
    nesterov=True is checked against (in the constructor's groups and added later)."""

    def groups(params: list[torch.nn.Parameter]) -> list[Any]:
        return [{"params": params[:2], "momentum": 0.9, "nesterov": True}, {"params": params[2:]}]

    ours = drive(lambda g: TorchOptimizer(g, "sgd", lr=0.05), 10, groups=groups)
    theirs = drive(lambda g: torch.optim.SGD(g, lr=0.05, foreach=False), 10, groups=groups)
    assert_same_run(ours, theirs, {"momentum": "momentum_buffer"})
    extra = torch.nn.Parameter(torch.ones(3))
    ours[1].add_param_group({"params": [extra], "momentum": 0.5, "nesterov": True})
    extra.grad = torch.ones(3)
    ours[1].step()
    # nesterov with momentum 0.5, first step: buf = g, update g + 0.5 * buf = 1.5 g
    torch.testing.assert_close(extra.detach(), torch.full((3,), 1.0 - 0.05 * 1.5))


@pytest.mark.skipif(
    "decoupled_weight_decay" not in inspect.signature(torch.optim.Adam).parameters,
    reason="this torch's Adam has no decoupled_weight_decay",
)
@pytest.mark.parametrize("decoupled", [True, False])
def test_adams_decoupled_weight_decay_flag_is_the_mode(decoupled: bool) -> None:
    ours = drive(
        lambda p: TorchOptimizer(
            p, "adam", lr=0.01, weight_decay=0.3, decoupled_weight_decay=decoupled
        ),
        10,
    )
    theirs = drive(
        lambda p: torch.optim.Adam(
            p, lr=0.01, weight_decay=0.3, decoupled_weight_decay=decoupled, foreach=False
        ),
        10,
    )
    assert_same_run(ours, theirs, ADAM_FIELDS)
    # the groups hold torch's flag (not optorch's mode), as torch.optim.Adam's do
    assert ours[1].param_groups[0]["decoupled_weight_decay"] is decoupled
    assert "mode" not in ours[1].param_groups[0]
    # a torch Adam state_dict with the flag, loaded into a default "adam" adapter, keeps it
    loaded = TorchOptimizer([p.detach().clone().requires_grad_() for p in theirs[0]], "adam")
    loaded.load_state_dict(copy.deepcopy(theirs[1].state_dict()))
    params = [p for group in loaded.param_groups for p in group["params"]]
    for step in range(3):
        for p, q, g in zip(params, theirs[0], grads_for(10 + step, theirs[0]), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        loaded.step()
        theirs[1].step()
    for p, q in zip(params, theirs[0], strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL)
    with pytest.raises(ValueError, match="decoupled_weight_decay=True contradicts mode"):
        TorchOptimizer(theirs[0], "adam", decoupled_weight_decay=True, mode="ORIGINAL")


@pytest.mark.skipif(
    "decoupled_weight_decay" not in inspect.signature(torch.optim.Adam).parameters,
    reason="this torch's Adam has no decoupled_weight_decay",
)
@pytest.mark.parametrize("decoupled", [True, False])
def test_adapter_adam_state_dict_keeps_its_decay_in_torch_adam(decoupled: bool) -> None:
    """The adapter's state_dict, loaded into a torch Adam built with the other flag,
    carries the adapter's decay (it lost a True flag: L2 decay, 6e-2 apart in 10 steps)."""
    ours = drive(
        lambda p: TorchOptimizer(
            p, "adam", lr=0.05, weight_decay=0.5, decoupled_weight_decay=decoupled
        ),
        10,
    )
    copies = [p.detach().clone().requires_grad_() for p in ours[0]]
    twin = torch.optim.Adam(
        copies, lr=0.05, weight_decay=0.5, decoupled_weight_decay=not decoupled, foreach=False
    )
    twin.load_state_dict(copy.deepcopy(ours[1].state_dict()))
    assert twin.param_groups[0]["decoupled_weight_decay"] is decoupled
    for step in range(10, 20):
        for p, q, g in zip(ours[0], copies, grads_for(step, ours[0]), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours[1].step()
        twin.step()
    assert_same_run(ours, (copies, twin), ADAM_FIELDS)
    # a group given optorch's mode keeps the mode only; both keys must agree
    extra = torch.nn.Parameter(torch.ones(3))
    ours[1].add_param_group({"params": [extra], "mode": "DECOUPLED"})
    assert "decoupled_weight_decay" not in ours[1].param_groups[-1]
    ours[1].param_groups[-1]["decoupled_weight_decay"] = True
    extra.grad = torch.ones(3)
    contradiction = r"^TorchOptimizer: param_groups\[1\]: decoupled_weight_decay=True contradicts"
    with pytest.raises(ValueError, match=contradiction):
        ours[1].step()


def test_adapter_nadam_float64_params_under_float32_default_dtype() -> None:
    """torch keeps NAdam's mu_product in float32 (the default dtype) and steps with the
    product rounded there; float64 params show it (4e-10 apart after one step, 3e-8
    after 20, before the product was advanced in its stored dtype)."""
    assert torch.get_default_dtype() == torch.float32
    shapes = {"w": (5, 3), "b": (5,)}

    def float64(make: Callable[[list[Any]], torch.optim.Optimizer]) -> Any:
        def build(params: list[Any]) -> torch.optim.Optimizer:
            with torch.no_grad():
                for p in params:
                    p.data = p.data.double()
            return make(params)

        return build

    def grads64(step: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        return [g.double() for g in grads_for(step, params)]

    runs = []
    for make in (
        lambda p: TorchOptimizer(p, "nadam", lr=0.01, weight_decay=0.1),
        lambda p: torch.optim.NAdam(p, lr=0.01, weight_decay=0.1, foreach=False),
    ):
        params = make_model_params(0, shapes)
        optimizer = float64(make)(params)
        for step in range(20):
            for p, g in zip(params, grads64(step, params), strict=True):
                p.grad = g
            optimizer.step()
        runs.append((params, optimizer))
    ours, theirs = runs
    assert ours[0][0].dtype == torch.float64
    assert_same_run(ours, theirs, ADAM_FIELDS, rtol=1e-13, atol=1e-15)
    for p, q in zip(ours[0], theirs[0], strict=True):
        mine, torchs = ours[1].state[p]["mu_product"], theirs[1].state[q]["mu_product"]
        assert mine.dtype == torchs.dtype == torch.float32
        assert torch.equal(mine, torchs)
