"""Switching library mid-run: torch.optim state -> optorch state -> torch.optim state.

For every optimizer both libraries have, a run of 10 steps in one library is converted
and continued for 20 steps in the other; it must match continuing in the first library
(params and every state field, compared with torch's own state keys written out in the
table below, independently of the converter's mapping).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TOLERANCES, grad_sequence, make_params

import optorch
from optorch.interop import config_from_torch, from_torch_state, to_torch_state
from optorch.interop.convert import TORCH_TWINS, torch_hyperparameters

SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "conv.weight": (2, 3, 2), "gain": ()}
MATRICES = {"a.weight": (4, 3), "b.weight": (3, 5)}
F32 = TOLERANCES[torch.float32]

ADAM = {"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq"}
# (id, registry name, optorch hyperparameters, torch class, torch hyperparameters,
#  optorch field -> torch key, params shapes, (rtol, atol))
CASES: list[
    tuple[
        str,
        str,
        dict[str, Any],
        str,
        dict[str, Any],
        dict[str, str],
        dict[str, Any],
        tuple[float, float],
    ]
] = [
    (
        "sgd",
        "sgd",
        {"max_lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        "SGD",
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        {"momentum": "momentum_buffer"},
        SHAPES,
        (F32["rtol"], F32["atol"]),
    ),
    (
        "sgd-plain",
        "sgd",
        {"max_lr": 0.05, "momentum": 0.0},
        "SGD",
        {"lr": 0.05},
        {},
        SHAPES,
        (F32["rtol"], F32["atol"]),
    ),
    (
        "adam-amsgrad",
        "adam",
        {"max_lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
        "Adam",
        {"lr": 0.01, "amsgrad": True, "weight_decay": 0.01},
        {**ADAM, "max_exp_avg_sq": "max_exp_avg_sq"},
        SHAPES,
        (F32["rtol"], F32["atol"]),
    ),
    (
        "adamw",
        "adamw",
        {"max_lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.99)},
        "AdamW",
        {"lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.99)},
        ADAM,
        SHAPES,
        (F32["rtol"], F32["atol"]),
    ),
    (
        "adamax",
        "adamax",
        {"max_lr": 0.01, "weight_decay": 0.01},
        "Adamax",
        {"lr": 0.01, "weight_decay": 0.01},
        {"exp_avg": "exp_avg", "exp_inf": "exp_inf"},
        SHAPES,
        (F32["rtol"], F32["atol"]),
    ),
    # torch's mu_product is a float32 running product, optorch's a float64 closed form
    (
        "nadam",
        "nadam",
        {"max_lr": 0.01, "weight_decay": 0.01},
        "NAdam",
        {"lr": 0.01, "weight_decay": 0.01},
        ADAM,
        SHAPES,
        (1e-5, 1e-6),
    ),
    (
        "radam",
        "radam",
        {"max_lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1},
        "RAdam",
        {"lr": 0.01, "decoupled_weight_decay": True, "weight_decay": 0.1},
        ADAM,
        SHAPES,
        (1e-5, 1e-6),
    ),
    (
        "rmsprop",
        "rmsprop",
        {"max_lr": 0.01, "momentum": 0.5, "centered": True},
        "RMSprop",
        {"lr": 0.01, "momentum": 0.5, "centered": True},
        {"square_avg": "square_avg", "momentum_buffer": "momentum_buffer", "grad_avg": "grad_avg"},
        SHAPES,
        (1e-5, 1e-6),
    ),
    (
        "adagrad",
        "adagrad",
        {"max_lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
        "Adagrad",
        {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1},
        {"sum": "sum"},
        SHAPES,
        (F32["rtol"], F32["atol"]),
    ),
    (
        "adafactor",
        "adafactor",
        {"max_lr": 0.01},
        "Adafactor",
        {"lr": 0.01},
        {"row_var": "row_var", "col_var": "col_var", "variance": "variance"},
        SHAPES,
        (1e-5, 1e-6),
    ),
    # bfloat16 Newton-Schulz: the two libraries round differently inside it
    (
        "muon",
        "muon",
        {"max_lr": 0.02, "weight_decay": 0.01},
        "Muon",
        {"lr": 0.02, "weight_decay": 0.01},
        {"momentum": "momentum_buffer"},
        MATRICES,
        (1e-4, 1e-5),
    ),
]
BEFORE, AFTER = 10, 20
PARAMS = [
    pytest.param(
        case,
        id=case[0],
        marks=pytest.mark.skipif(
            not hasattr(torch.optim, case[3]),
            reason=f"torch {torch.__version__} has no torch.optim.{case[3]}",
        ),
    )
    for case in CASES
]


def _torch_run(
    case: Any, params: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    torch_class = getattr(torch.optim, case[3])
    tensors = {k: torch.nn.Parameter(v.detach().clone()) for k, v in params.items()}
    extra = {"foreach": False} if "foreach" in torch_class.__init__.__code__.co_varnames else {}
    return tensors, torch_class(list(tensors.values()), **case[4], **extra)


def _torch_steps(
    tensors: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer, grads: list[Any]
) -> None:
    for g in grads:
        for name, p in tensors.items():
            p.grad = g[name].clone()
        opt.step()


def _optorch_steps(
    opt: Any, params: dict[str, torch.Tensor], state: Any, grads: list[Any]
) -> tuple[Any, Any]:
    for g in grads:
        params, state = opt.step(params, g, state)
    return params, state


def _assert_match(
    case: Any, params: Any, state: Any, tensors: Any, torch_opt: Any, steps: int
) -> None:
    rtol, atol = case[7]
    for name, p in tensors.items():
        torch.testing.assert_close(
            params[name], p.detach(), rtol=rtol, atol=atol, msg=f"param {name}"
        )
        torch_state = torch_opt.state[p]
        for field, key in case[5].items():
            if key not in torch_state:
                assert case[1] == "adafactor", f"torch has no {key} for {name}"
                assert state[field][name].numel() == 0, "an Adafactor placeholder"
                continue
            torch.testing.assert_close(
                state[field][name], torch_state[key], rtol=rtol, atol=atol, msg=f"{field} of {name}"
            )
        if "step" in torch_state:
            assert float(torch_state["step"]) == steps
    assert int(state["step"]) == steps


@pytest.mark.parametrize("case", PARAMS)
@pytest.mark.parametrize("source", ["optimizer", "state_dict"])
def test_torch_to_optorch_mid_run(case: Any, source: str) -> None:
    params0 = make_params(0, shapes=case[6])
    grads = grad_sequence(1, params0, BEFORE + AFTER)
    tensors, torch_opt = _torch_run(case, params0)
    _torch_steps(tensors, torch_opt, grads[:BEFORE])
    opt = optorch.get_optimizer(case[1], **case[2])
    assert config_from_torch(case[1], torch_opt) == opt.config
    # torch.optim.SGD and Muon keep no step count: it is given
    step = None if TORCH_TWINS[case[1]].has_step else BEFORE
    if source == "optimizer":
        state = from_torch_state(torch_opt, tensors, case[1], step=step)
    else:
        state = from_torch_state(
            torch_opt.state_dict(), list(tensors.values()), case[1], config=opt.config, step=step
        )
        state = {
            k: (dict(zip(tensors, v, strict=True)) if isinstance(v, list) else v)
            for k, v in state.items()
        }
    params = {k: p.detach().clone() for k, p in tensors.items()}
    _assert_match(case, params, state, tensors, torch_opt, BEFORE)  # converted exactly
    params, state = _optorch_steps(opt, params, state, grads[BEFORE:])
    _torch_steps(tensors, torch_opt, grads[BEFORE:])
    _assert_match(case, params, state, tensors, torch_opt, BEFORE + AFTER)


@pytest.mark.parametrize("case", PARAMS)
def test_optorch_to_torch_mid_run(case: Any) -> None:
    params = make_params(0, shapes=case[6])
    grads = grad_sequence(1, params, BEFORE + AFTER)
    opt = optorch.get_optimizer(case[1], **case[2])
    params, state = _optorch_steps(opt, params, opt.init(params), grads[:BEFORE])
    assert torch_hyperparameters(case[1], opt.config) == {
        **torch_hyperparameters(case[1], opt.config),
        **case[4],
    }
    tensors, torch_opt = _torch_run(case, params)
    torch_opt.load_state_dict(to_torch_state(state, params, case[1], config=opt.config))
    assert torch_opt.param_groups[0]["lr"] == case[4]["lr"]
    _assert_match(case, params, state, tensors, torch_opt, BEFORE)
    params, state = _optorch_steps(opt, params, state, grads[BEFORE:])
    _torch_steps(tensors, torch_opt, grads[BEFORE:])
    _assert_match(case, params, state, tensors, torch_opt, BEFORE + AFTER)


def test_every_twin_is_covered() -> None:
    covered = {c[1] for c in CASES if hasattr(torch.optim, c[3])}
    assert covered == {name for name, twin in TORCH_TWINS.items() if twin.available}


def test_sgd_before_the_first_step_and_explicit_step() -> None:
    params = make_params(0)
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    fresh = torch.optim.SGD(list(tensors.values()), lr=0.1, momentum=0.9)
    state = from_torch_state(fresh, tensors, "sgd")
    assert int(state["step"]) == 0 and all(
        float(m.abs().sum()) == 0 for m in state["momentum"].values()
    )
    assert to_torch_state(state, params, "sgd")["state"] == {}  # torch: no buffer yet
    # SGD keeps no count: an explicit one is taken as given, and a schedule requires it
    assert int(from_torch_state(fresh, tensors, "sgd", step=7)["step"]) == 7
    scheduled = optorch.get_optimizer("sgd", schedule=lambda step: 1.0).config
    with pytest.raises(ValueError, match="keeps no step count and the config has a schedule"):
        from_torch_state(fresh, tensors, "sgd", config=scheduled)


def test_params_torch_never_stepped_get_initial_state() -> None:
    params = make_params(0, shapes=SHAPES)
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    adam = torch.optim.Adam(list(tensors.values()))
    for _ in range(2):
        for name, p in tensors.items():
            p.grad = None if name == "gain" else torch.ones_like(p)
        adam.step()
    assert tensors["gain"] not in adam.state
    state = from_torch_state(adam, tensors, "adam")
    assert int(state["step"]) == 2
    assert float(state["exp_avg"]["gain"]) == 0.0 and float(state["exp_avg_sq"]["gain"]) == 0.0
    # it sat out both steps: its own count is 0, as torch's would be at its first step
    assert {k: int(v) for k, v in state["skipped_steps"].items()} == {
        k: 2 if k == "gain" else 0 for k in tensors
    }
    exported = to_torch_state(state, tensors, "adam")["state"]
    assert sorted(exported) == [0, 1, 2, 3] and float(exported[3]["step"]) == 0.0
    assert [float(exported[i]["step"]) for i in range(3)] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda t, o: from_torch_state(o, t, "lion"), "'lion' has no torch.optim twin"),
        (lambda t, o: from_torch_state(o, list(t.values())[:2], "adam"), "not in params"),
        (
            lambda t, o: from_torch_state(o.state_dict(), list(t.values())[:2], "adam"),
            "has 4 params but params has 2",
        ),
        (
            lambda t, o: from_torch_state(
                o, {k: torch.nn.Parameter(v.detach().clone()) for k, v in t.items()}, "adam"
            ),
            "not in params",
        ),
        (
            lambda t, o: from_torch_state(
                o.state_dict(), [torch.zeros(9), *list(t.values())[1:]], "adam"
            ),
            r"'exp_avg' of param \[0\] has shape \(4, 3\); adam needs \(9,\)",
        ),
        (
            lambda t, o: from_torch_state(o, t, "adam", step=1),
            r"step=1 is fewer steps than a param of the torch state has taken \(2\)",
        ),
        (
            lambda t, o: to_torch_state({"step": torch.tensor(1)}, t, "decoupled_adam"),
            "no torch.optim twin",
        ),
        (
            lambda t, o: torch_hyperparameters(
                "adamw", optorch.get_optimizer("decoupled_adam").config
            ),
            "no fully decoupled Adam",
        ),
        (
            lambda t, o: to_torch_state(
                {"step": torch.tensor(1), "exp_avg": {}, "z": {}}, t, "adam"
            ),
            r"state fields \['z'\] have no torch.optim.Adam equivalent",
        ),
        (
            lambda t, o: to_torch_state(from_torch_state(o, t, "adam"), list(t.values()), "adam"),
            "does not have the structure of params",
        ),
    ],
    ids=[
        "no twin",
        "param missing",
        "count",
        "other tensors",
        "shape",
        "step contradiction",
        "decoupled",
        "decoupled hyper",
        "foreign field",
        "structure",
    ],
)
def test_bad_conversions(make: Any, message: str) -> None:
    params = make_params(0)
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    adam = torch.optim.Adam(list(tensors.values()))
    for _ in range(2):
        for p in tensors.values():
            p.grad = torch.ones_like(p)
        adam.step()
    before = {k: v.clone() for k, v in adam.state_dict()["state"][0].items()}
    with pytest.raises(ValueError, match=message):
        make(tensors, adam)
    for key, value in adam.state_dict()["state"][0].items():
        assert torch.equal(value, before[key]), "the torch state must not change"


def test_different_step_counts_convert_to_skipped_steps() -> None:
    """A param torch stepped fewer times keeps its own count: the optimizer's count is
    the largest, the lag is the param's ``skipped_steps``; both continue alike."""
    params = make_params(0, shapes=SHAPES)
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    adam = torch.optim.Adam(list(tensors.values()))
    for step in range(3):
        for name, p in tensors.items():
            p.grad = torch.ones_like(p) if (name != "gain" or step == 2) else None
        adam.step()
    ours = {k: v.detach().clone() for k, v in tensors.items()}
    state = from_torch_state(adam.state_dict(), ours, "adam")
    assert int(state["step"]) == 3
    assert {k: int(v) for k, v in state["skipped_steps"].items()} == {
        k: 2 if k == "gain" else 0 for k in tensors
    }
    with pytest.raises(ValueError, match=r"step=2 is fewer steps than a param .* \(3\)"):
        from_torch_state(adam.state_dict(), ours, "adam", step=2)
    opt = optorch.get_optimizer("adam", max_lr=1e-3)
    for _ in range(3):
        for p in tensors.values():
            p.grad = torch.full_like(p, 0.5)
        adam.step()
        ours, state = opt.step(ours, {k: torch.full_like(v, 0.5) for k, v in ours.items()}, state)
    for k, p in tensors.items():
        torch.testing.assert_close(ours[k], p.detach(), rtol=1e-6, atol=1e-7)


def test_nadam_mu_product_with_a_changed_beta1_converts_both_ways() -> None:
    """torch's mu_product after steps with different beta1s is no closed form of the
    count: it is carried over (both ways), and the runs continue alike; a param that sat
    out steps gets the closed form at its own count."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        params = make_params(0, shapes=SHAPES, dtype=torch.float64)
        tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
        nadam = torch.optim.NAdam(list(tensors.values()), lr=0.01, foreach=False)
        grads = grad_sequence(3, params, 16)
        for step in range(8):
            nadam.param_groups[0]["betas"] = (0.8 + 0.02 * step, 0.999)
            for name, p in tensors.items():
                # "gain" sits out the first three steps: its own count is 5
                p.grad = None if (name == "gain" and step < 3) else grads[step][name].clone()
            nadam.step()
        ours = {k: v.detach().clone() for k, v in tensors.items()}
        state = from_torch_state(nadam.state_dict(), ours, "nadam")
        weight = tensors["layer.weight"]
        assert float(state["mu_product"]) == float(nadam.state[weight]["mu_product"])
        assert int(state["skipped_steps"]["gain"]) == 3
        config = optorch.nadam.NAdamConfig(max_lr=0.01, betas=(0.94, 0.999))
        groups = nadam.state_dict()["param_groups"]
        back = to_torch_state(state, ours, "nadam", config=config, param_groups=groups)
        for index, (name, p) in enumerate(tensors.items()):
            expected = nadam.state[p]["mu_product"]
            if name == "gain":  # the closed form at its own count, the current beta1
                expected = torch.tensor(
                    optorch.nadam.nadam_mu_product(5, 0.94, 0.004), dtype=torch.float64
                )
            torch.testing.assert_close(back["state"][index]["mu_product"], expected, rtol=0, atol=0)
        opt = optorch.Optimizer(optorch.nadam.RULE, config)
        for step in range(8, 16):
            for name, p in tensors.items():
                p.grad = grads[step][name].clone()
            nadam.step()
            ours, state = opt.step(ours, {k: grads[step][k].clone() for k in ours}, state)
            # the params at the optimizer's count continue torch's product exactly ("gain"
            # continues the closed form, torch its product over beta1s 0.86 to 0.94)
            for name, p in tensors.items():
                if name != "gain":
                    torch.testing.assert_close(
                        ours[name], p.detach(), rtol=1e-12, atol=1e-14, msg=name
                    )
            assert float(state["mu_product"]) == pytest.approx(
                float(nadam.state[weight]["mu_product"]), rel=1e-14
            )
    finally:
        torch.set_default_dtype(previous)


def test_sgd_params_without_a_buffer_start_it_undamped_after_conversion() -> None:
    """A torch SGD param that has no momentum buffer yet (no gradient so far) starts it
    at its next gradient, undamped: after conversion, as in torch; exported back, it
    has no buffer."""
    params = make_params(0, shapes=SHAPES)
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    options = {"lr": 0.05, "momentum": 0.9, "dampening": 0.5}
    sgd = torch.optim.SGD(list(tensors.values()), foreach=False, **options)
    grads = grad_sequence(5, params, 10)
    for step in range(4):
        for name, p in tensors.items():
            p.grad = None if name == "gain" else grads[step][name].clone()
        sgd.step()
    ours = {k: v.detach().clone() for k, v in tensors.items()}
    state = from_torch_state(sgd.state_dict(), ours, "sgd", step=4)
    assert int(state["skipped_steps"]["gain"]) == 4
    back = to_torch_state(state, ours, "sgd", config=config_from_torch("sgd", sgd.param_groups[0]))
    assert 3 not in back["state"]  # "gain" (torch id 3): no buffer, as in torch
    opt = optorch.get_optimizer("sgd", max_lr=0.05, momentum=0.9, dampening=0.5)
    for step in range(4, 10):
        for name, p in tensors.items():
            p.grad = grads[step][name].clone()
        sgd.step()
        ours, state = opt.step(ours, {k: grads[step][k].clone() for k in ours}, state)
        for name, p in tensors.items():
            torch.testing.assert_close(ours[name], p.detach(), rtol=1e-6, atol=1e-7, msg=name)


def _frozen_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    return model


@pytest.mark.parametrize("holds", ["trainable", "all"])
@pytest.mark.parametrize("source", ["optimizer", "state_dict"])
def test_a_module_with_frozen_params_converts_both_ways(holds: str, source: str) -> None:
    """Frozen params of a module get no state, as ``init(module)`` makes it, whether the
    torch optimizer holds them (they never get a grad) or only the trainable ones."""
    model = _frozen_model()
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    chosen = [p for p in model.parameters() if p.requires_grad or holds == "all"]
    adamw = torch.optim.AdamW(chosen, lr=0.01, weight_decay=0.1)
    for _ in range(3):
        adamw.zero_grad()
        model(x).square().mean().backward()
        adamw.step()
    state = from_torch_state(adamw if source == "optimizer" else adamw.state_dict(), model, "adamw")
    opt = optorch.get_optimizer("adamw", max_lr=0.01, weight_decay=0.1)
    assert sorted(state["exp_avg"]) == sorted(opt.init(model)["exp_avg"])
    twin = torch.optim.AdamW(chosen, lr=0.01, weight_decay=0.1)
    twin.load_state_dict(adamw.state_dict())
    clone = _frozen_model()
    clone.load_state_dict(model.state_dict())
    params = {n: p for n, p in clone.named_parameters() if p.requires_grad}
    for _ in range(5):
        twin.zero_grad()
        model(x).square().mean().backward()
        twin.step()
        grads = torch.func.grad(
            lambda ps: torch.func.functional_call(clone, ps, (x,)).square().mean()
        )(params)
        params, state = opt.step(params, grads, state)
    for name, tensor in model.named_parameters():
        torch.testing.assert_close(dict(clone.named_parameters())[name], tensor, **F32)
    back = to_torch_state(state, model, "adamw", config=opt.config)
    torch_ids = [i for i, p in enumerate(chosen) if p.requires_grad]
    for key, per in zip(torch_ids, back["state"].values(), strict=True):
        torch.testing.assert_close(
            per["exp_avg"], twin.state_dict()["state"][key]["exp_avg"], **F32
        )


def test_groups_that_keep_different_state_are_refused() -> None:
    """One optorch state holds one kind of state: torch groups with and without amsgrad
    cannot be one state (the later group's max_exp_avg_sq would be lost)."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    adam = torch.optim.Adam([{"params": [a]}, {"params": [b], "amsgrad": True}], lr=0.1)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    adam.step()
    with pytest.raises(ValueError, match=r"groups 0 and 1 keep different state"):
        from_torch_state(adam, [a, b], "adam")
    config = optorch.get_optimizer("adam").config  # amsgrad off: b's maximum has no place
    with pytest.raises(ValueError, match=r"'max_exp_avg_sq' of param \[1\] has no place"):
        from_torch_state(adam, [a, b], "adam", config=config)
    amsgrad = optorch.get_optimizer("adam", amsgrad=True).config
    state = from_torch_state(adam, [a, b], "adam", config=amsgrad)
    assert torch.equal(state["max_exp_avg_sq"][1], adam.state[b]["max_exp_avg_sq"])


def test_steps_taken_beyond_every_params_count_are_given_by_step() -> None:
    """torch keeps no optimizer count: after 3 steps in which each param sat out one, the
    largest param count is 2, and a schedule read that (1e-3 to 4e-2 apart); step=3 was
    refused as a contradiction. Given, each param lags it by what it sat out."""
    params = make_params(0, shapes={"a": (3,), "b": (2, 2)})
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}

    def schedule(step: int) -> float:
        return 1.0 / (1.0 + step)

    adam = torch.optim.Adam(list(tensors.values()), lr=0.1)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(adam, schedule)
    gen = torch.Generator().manual_seed(4)
    sits_out = {0: "a", 1: "b", 2: None}
    for step in range(3):
        for name, p in tensors.items():
            p.grad = None if sits_out[step] == name else torch.randn(p.shape, generator=gen)
        adam.step()
        lambda_lr.step()
    ours = {k: v.detach().clone() for k, v in tensors.items()}
    state = from_torch_state(adam.state_dict(), ours, "adam", step=3)
    assert int(state["step"]) == 3
    assert {k: int(v) for k, v in state["skipped_steps"].items()} == {"a": 1, "b": 1}
    opt = optorch.get_optimizer("adam", max_lr=0.1, schedule=schedule)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in tensors.items()}
        for name, p in tensors.items():
            p.grad = grads[name].clone()
        adam.step()
        lambda_lr.step()
        ours, state = opt.step(ours, grads, state)
    for name, p in tensors.items():
        torch.testing.assert_close(ours[name], p.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["exp_avg"][name], adam.state[p]["exp_avg"])
