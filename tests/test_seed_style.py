"""The seed's research code, as its users wrote it, still runs and still means the same.

The snippet trains an ``nn.Module`` the way the attention-simulator code did: params
from ``dict(model.named_parameters())``, grads from ``torch.func``, state from
``init_optimizer_state``, the config from ``DEFAULT_OPTIMIZER_CONFIGS``, the schedule
multiplier written on the config by the loop each step, and the step from
``OPTIMIZER_STEP``. The model object itself must be trained (in-place update), the loss
must fall, and the run must match ``torch.optim.AdamW`` + ``LambdaLR`` of the same
multipliers on params and state for 20 steps.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any

import pytest
import torch
from conftest import TOLERANCES, assert_trees_close

import optorch
from optorch.builder import DEFAULT_OPTIMIZER_CONFIGS, OPTIMIZER_STEP, init_optimizer_state

STEPS = 20


class TinyRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(3, 16)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def regression_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(51)
    x = torch.randn(64, 3, generator=gen)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    return x, y


def test_seed_training_loop_matches_torch_adamw_with_lambda_lr() -> None:
    from optorch.schedule import LRSchedulerConfig, build_lr_scheduler

    torch.manual_seed(52)
    model = TinyRegressor()
    torch_model = copy.deepcopy(model)
    x, y = regression_data()

    scheduler = build_lr_scheduler(
        LRSchedulerConfig(
            warmup_steps=5,
            warmup_start_value=0.1,
            total_steps=STEPS,
            scheduler_type="cosine",
            lr_terminal_value=0.1,
        )
    )
    multipliers = [float(scheduler(step)) for step in range(STEPS + 1)]
    assert len(set(multipliers)) > 5, f"the schedule should vary: {multipliers}"

    # --- the seed's way ------------------------------------------------------------
    params = dict(model.named_parameters())
    state = init_optimizer_state("adamw", model)
    config = DEFAULT_OPTIMIZER_CONFIGS["adamw"](max_lr=0.05, weight_decay=0.1)
    step_fn = OPTIMIZER_STEP["adamw"]

    def loss_of(named: dict[str, torch.Tensor]) -> torch.Tensor:
        prediction = torch.func.functional_call(model, named, (x,))
        return torch.nn.functional.mse_loss(prediction, y)

    # --- torch.optim with the same multipliers ----------------------------------------
    torch_optimizer = torch.optim.AdamW(
        torch_model.parameters(), lr=0.05, weight_decay=0.1, foreach=False
    )
    torch_scheduler = torch.optim.lr_scheduler.LambdaLR(torch_optimizer, lambda k: multipliers[k])

    losses = []
    logged_norms = []
    for step in range(STEPS):
        loss, vjp_fn = torch.func.vjp(loss_of, params)
        (grads,) = vjp_fn(torch.ones_like(loss))
        losses.append(float(loss.detach()))
        config.lr_schedule_value = scheduler(step)
        params, state = step_fn(params, grads, state, config)
        # the research code read the state every step to log statistics of it
        logged_norms.append(sum(float(v.norm()) for v in state["exp_avg"].values()))

        torch_optimizer.zero_grad()
        torch.nn.functional.mse_loss(torch_model(x), y).backward()
        torch_optimizer.step()
        torch_scheduler.step()

        tolerance = TOLERANCES[torch.float32]
        torch_params = {k: v.detach() for k, v in torch_model.named_parameters()}
        assert_trees_close(params, torch_params, what=f"params step {step}", **tolerance)
        for field in ("exp_avg", "exp_avg_sq"):
            torch_state = {
                k: torch_optimizer.state[v][field] for k, v in torch_model.named_parameters()
            }
            assert_trees_close(state[field], torch_state, what=f"{field} step {step}", **tolerance)
        assert int(state["step"]) == step + 1

    # the model object itself was trained
    for name, tensor in model.named_parameters():
        assert params[name] is tensor
    with torch.no_grad():
        final_loss = float(torch.nn.functional.mse_loss(model(x), y))
    assert final_loss < 0.5 * losses[0], (losses[0], final_loss)
    assert all(norm > 0 for norm in logged_norms)


# --------------------------------------------------------------------------------------
# the seed's names
# --------------------------------------------------------------------------------------


def _positional_fields(config_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(config_type) if not f.kw_only]


def _defaults(config_type: type) -> dict[str, Any]:
    return dataclasses.asdict(config_type())


def test_common_names() -> None:
    from optorch.common import OPTIMIZER_STATE_TYPE, PARAMS_GRADS_TYPE, zero_init_like

    assert PARAMS_GRADS_TYPE is not None and OPTIMIZER_STATE_TYPE is not None
    model = TinyRegressor()
    zeros = zero_init_like(model)
    assert set(zeros) == {name for name, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert zeros[name].shape == param.shape and zeros[name].dtype == param.dtype
        assert not zeros[name].any() and not zeros[name].requires_grad


SEED_CONFIGS = [
    (
        "optorch.sgd",
        "SGDConfig",
        ["momentum", "weight_decay", "max_lr", "steps", "lr_schedule_value"],
        {
            "momentum": 0.9,
            "weight_decay": 0.0,
            "max_lr": 0.1,
            "steps": 0,
            "lr_schedule_value": None,
        },
    ),
    (
        "optorch.adam",
        "AdamConfig",
        ["max_lr", "betas", "eps", "weight_decay", "mode", "steps", "lr_schedule_value"],
        {
            "max_lr": 1e-3,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
            "weight_decay": 0.0,
            "mode": "ORIGINAL",
            "steps": 0,
            "lr_schedule_value": None,
        },
    ),
    (
        "optorch.lars",
        "LARSConfig",
        [
            "max_lr",
            "momentum",
            "weight_decay",
            "trust_coefficient",
            "eps",
            "steps",
            "lr_schedule_value",
        ],
        {
            "max_lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "trust_coefficient": 0.001,
            "eps": 1e-8,
            "steps": 0,
            "lr_schedule_value": None,
        },
    ),
]


@pytest.mark.parametrize(("module_name", "class_name", "order", "defaults"), SEED_CONFIGS)
def test_seed_config_defaults_and_order(
    module_name: str, class_name: str, order: list[str], defaults: dict[str, Any]
) -> None:
    import importlib

    config_type = getattr(importlib.import_module(module_name), class_name)
    assert _positional_fields(config_type)[: len(order)] == order
    actual = _defaults(config_type)
    for key, value in defaults.items():
        if key == "mode":
            assert actual[key] is optorch.adam.AdamWDMode[value]
        else:
            assert actual[key] == value, (key, actual[key])
    # the seed's positional construction still means the same fields
    positional = config_type(*[defaults[k] for k in order[:2]])
    assert dataclasses.asdict(positional) == actual


def test_adam_wd_mode_members() -> None:
    from optorch.adam import AdamWDMode

    assert {m.name for m in AdamWDMode} == {"ORIGINAL", "ADAMW", "DECOUPLED"}


@pytest.mark.parametrize(
    ("module_name", "names"),
    [
        ("optorch.sgd", ["SGDConfig", "default_sgd_state", "sgd", "sgd_step"]),
        ("optorch.adam", ["AdamWDMode", "AdamConfig", "default_adam_state", "adam", "adam_step"]),
        ("optorch.lars", ["LARSConfig", "lars", "lars_step"]),
        (
            "optorch.builder",
            [
                "DEFAULT_OPTIMIZER_CONFIGS",
                "DEFAULT_OPTIMIZER_STATES",
                "OPTIMIZER_STEP",
                "init_optimizer_state",
                "get_optimizer_step",
            ],
        ),
    ],
)
def test_seed_module_names_exist(module_name: str, names: list[str]) -> None:
    import importlib

    module = importlib.import_module(module_name)
    for name in names:
        assert hasattr(module, name), f"{module_name}.{name} is missing"


SEED_FUNCTIONS = [
    ("optorch.sgd", "sgd", ["params", "grads", "momentum", "config"]),
    ("optorch.sgd", "sgd_step", ["params", "grads", "opt_state", "config"]),
    ("optorch.adam", "adam", ["params", "grads", "exp_avg", "exp_avg_sq", "config"]),
    ("optorch.adam", "adam_step", ["params", "grads", "opt_state", "config"]),
    ("optorch.lars", "lars", ["params", "grads", "momentum", "config"]),
    ("optorch.lars", "lars_step", ["params", "grads", "opt_state", "config"]),
]


@pytest.mark.parametrize(("module_name", "name", "parameters"), SEED_FUNCTIONS)
def test_seed_function_signatures(module_name: str, name: str, parameters: list[str]) -> None:
    import importlib

    function = getattr(importlib.import_module(module_name), name)
    positional = [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    assert positional == parameters


@pytest.mark.parametrize(
    ("state_fn", "fields"),
    [
        ("optorch.sgd.default_sgd_state", {"momentum"}),
        ("optorch.adam.default_adam_state", {"exp_avg", "exp_avg_sq"}),
    ],
)
def test_seed_default_states(state_fn: str, fields: set[str]) -> None:
    import importlib

    module_name, name = state_fn.rsplit(".", 1)
    state = getattr(importlib.import_module(module_name), name)(TinyRegressor())
    assert fields <= set(state)
    for field in fields:
        assert set(state[field]) == {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}
        assert all(not v.any() for v in state[field].values())


def _one_step_problem() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(53)
    params = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64)}
    grads = {"w": torch.randn(3, 2, generator=gen, dtype=torch.float64)}
    return params, grads


@pytest.mark.parametrize("kind", ["sgd", "lars"])
def test_seed_momentum_update_functions_equal_their_step(kind: str) -> None:
    """``sgd``/``lars`` (params, grads, momentum, config) -> (params, momentum) = one step."""
    import importlib

    module = importlib.import_module(f"optorch.{kind}")
    config_type = module.SGDConfig if kind == "sgd" else module.LARSConfig
    config = config_type(weight_decay=0.01, inplace=False)
    update = module.sgd if kind == "sgd" else module.lars
    step = module.sgd_step if kind == "sgd" else module.lars_step
    params, grads = _one_step_problem()
    state = init_optimizer_state(kind, params, config)
    for _ in range(3):
        want_params, want_state = step(params, grads, state, config)
        got_params, got_momentum = update(
            params, grads, state["momentum"], config.replace(steps=int(state["step"]))
        )
        assert_trees_close(got_params, want_params, rtol=0, atol=0, what=f"{kind} params")
        assert_trees_close(got_momentum, want_state["momentum"], rtol=0, atol=0, what="momentum")
        params, state = want_params, want_state


def test_seed_adam_update_function_equals_adam_step() -> None:
    from optorch.adam import AdamConfig, adam, adam_step

    config = AdamConfig(mode="ADAMW", weight_decay=0.1, max_lr=0.01, inplace=False)
    params, grads = _one_step_problem()
    state = init_optimizer_state("adamw", params, config)
    for k in range(3):
        want_params, want_state = adam_step(params, grads, state, config)
        got_params, got_exp_avg, got_exp_avg_sq = adam(
            params, grads, state["exp_avg"], state["exp_avg_sq"], config, step=k
        )
        assert_trees_close(got_params, want_params, rtol=0, atol=0, what="params")
        assert_trees_close(got_exp_avg, want_state["exp_avg"], rtol=0, atol=0, what="exp_avg")
        assert_trees_close(got_exp_avg_sq, want_state["exp_avg_sq"], rtol=0, atol=0, what="v")
        params, state = want_params, want_state


@pytest.mark.parametrize("name", ["adam", "adamw", "decoupled_adam", "lars", "sgd"])
def test_seed_registry_keys(name: str) -> None:
    from optorch.builder import DEFAULT_OPTIMIZER_STATES, get_optimizer_step

    assert name in DEFAULT_OPTIMIZER_CONFIGS
    assert name in DEFAULT_OPTIMIZER_STATES
    assert name in OPTIMIZER_STEP
    config = DEFAULT_OPTIMIZER_CONFIGS[name]()
    model = TinyRegressor()
    state = DEFAULT_OPTIMIZER_STATES[name](model)
    params = dict(model.named_parameters())
    grads = {k: torch.ones_like(v) for k, v in params.items()}
    before = {k: v.detach().clone() for k, v in params.items()}
    params, state = get_optimizer_step(name)(params, grads, state, config)
    assert any(not torch.equal(params[k], before[k]) for k in params)
    with pytest.raises(ValueError, match="Unknown optimizer"):
        init_optimizer_state("no_such_optimizer", model)


def test_seed_sgd_function_carries_its_momentum_as_the_seed_called_it() -> None:
    """The seed's loop called ``sgd(params, grads, momentum, config)`` with
    ``config.steps`` left at 0: every call read as a first step and the buffer was
    thrown away (1.0, 1.0, 1.0 where torch has 1.0, 1.9, 2.71). 20 calls against
    torch.optim.SGD, params and buffer."""
    from optorch.sgd import SGDConfig, sgd

    config = SGDConfig(max_lr=0.05, momentum=0.9, weight_decay=0.01, inplace=False)
    params, _ = _one_step_problem()
    theirs = params["w"].clone().requires_grad_()
    reference = torch.optim.SGD([theirs], lr=0.05, momentum=0.9, weight_decay=0.01)
    momentum = {"w": torch.zeros_like(params["w"])}
    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        grad = torch.randn(params["w"].shape, generator=gen, dtype=torch.float64)
        params, momentum = sgd(params, {"w": grad}, momentum, config)
        theirs.grad = grad.clone()
        reference.step()
    tol = TOLERANCES[torch.float64]
    assert_trees_close(params["w"], theirs.detach(), **tol, what="params")
    buffer = reference.state[theirs]["momentum_buffer"]
    assert_trees_close(momentum["w"], buffer, **tol, what="momentum buffer")


def test_seed_sgd_state_without_a_count_keeps_its_buffer() -> None:
    """A state saved by the seed has no "step": its momentum buffer carries on, as a
    buffer loaded into torch.optim.SGD does (it was replaced by the gradient)."""
    from optorch.sgd import SGDConfig, sgd_step

    params, grads = _one_step_problem()
    buffer = torch.full_like(params["w"], 5.0)
    state = {"momentum": {"w": buffer.clone()}}
    config = SGDConfig(max_lr=0.1, momentum=0.9, inplace=False)
    params_after, state = sgd_step(params, grads, state, config)
    theirs = params["w"].clone().requires_grad_()
    reference = torch.optim.SGD([theirs], lr=0.1, momentum=0.9)
    reference.state[theirs]["momentum_buffer"] = buffer.clone()
    theirs.grad = grads["w"].clone()
    reference.step()
    tol = TOLERANCES[torch.float64]
    assert_trees_close(params_after["w"], theirs.detach(), **tol, what="params")
    expected = reference.state[theirs]["momentum_buffer"]
    assert_trees_close(state["momentum"]["w"], expected, **tol, what="buffer")


def test_seed_yaml_schedule_node_without_a_target_builds() -> None:
    """The seed's YAML: ``lr_scheduler: {_target_: optorch.schedule.build_lr_scheduler,
    config: {warmup_steps: ..., scheduler_type: cosine}}`` (no ``_target_`` on the
    nested config) raised ``TypeError``; a mapping of the fields is taken, an unknown
    key named."""
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    from optorch.schedule import LRSchedulerConfig, build_lr_scheduler

    fields = {
        "warmup_steps": 100,
        "total_steps": 1000,
        "scheduler_type": "cosine",
        "lr_terminal_value": 1e-5,
        "warmup_start_value": 1e-5,
    }
    node = omegaconf.OmegaConf.create(
        {"_target_": "optorch.schedule.build_lr_scheduler", "config": fields}
    )
    schedule = hydra_utils.instantiate(node)
    expected = build_lr_scheduler(LRSchedulerConfig(**fields))
    for step in (0, 50, 100, 550, 1000, 2000):
        assert schedule(step) == expected(step)
    assert build_lr_scheduler(dict(fields))(550) == expected(550)
    with pytest.raises(TypeError, match=r"\['warmup'\] are not LRSchedulerConfig fields"):
        build_lr_scheduler({"warmup": 3})


def test_seed_registry_views_refuse_assignment_pointing_to_register() -> None:
    from optorch.builder import DEFAULT_OPTIMIZER_STATES

    for view in (DEFAULT_OPTIMIZER_CONFIGS, DEFAULT_OPTIMIZER_STATES, OPTIMIZER_STEP):
        with pytest.raises(TypeError, match=r"read-only: to add 'mine', call .*register"):
            view["mine"] = object()  # type: ignore[index]
