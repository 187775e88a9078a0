"""Hydra recipes: ``examples/recipe_train.yaml`` builds, trains, and equals the optimizer
written in Python; the demo's recipe layout is accepted both ways; bad recipes raise
naming the node."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_trees_equal, grad_sequence, make_params

hydra_utils = pytest.importorskip("hydra.utils")
omegaconf = pytest.importorskip("omegaconf")

import optorch  # noqa: E402
from optorch import amp, wrappers  # noqa: E402
from optorch.interop import build_recipe, checkpoint  # noqa: E402
from optorch.schedule import LRSchedulerConfig, build_lr_scheduler  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RECIPE = EXAMPLES / "recipe_train.yaml"


def by_hand(steps: int = 200, warmup: int = 20) -> Any:
    """The optimizer recipe_train.yaml describes, written in Python."""
    schedule = build_lr_scheduler(
        LRSchedulerConfig(
            warmup_steps=warmup,
            total_steps=steps,
            scheduler_type="cosine",
            lr_terminal_value=0.1,
        )
    )
    adamw = optorch.get_optimizer(
        "adamw", max_lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, schedule=schedule
    )
    return wrappers.ema(
        wrappers.chain(wrappers.clip_by_global_norm(1.0), wrappers.decay_mask(adamw)),
        0.99,
        warmup=True,
    )


def test_example_recipe_equals_the_optimizer_written_in_python() -> None:
    recipe = build_recipe(RECIPE)
    expected = by_hand()
    assert recipe.optimizer.name == expected.name
    assert recipe.train["steps"] == 200
    assert recipe.scaler is not None and recipe.scaler["precision"] is torch.float16
    assert float(recipe.scaler["scale"]) == 1024.0 and recipe.scaler["growth_interval"] == 100
    params_a, params_b = make_params(0), make_params(0)
    state_a, state_b = recipe.init(params_a), expected.init(params_b)
    for grads in grad_sequence(3, params_a, 25):
        params_a, state_a, _ = recipe.step(params_a, grads, state_a)
        params_b, state_b = expected.step(params_b, grads, state_b)
    assert_trees_equal(params_a, params_b, what="params")
    assert_trees_equal(state_a, state_b, what="state")


def test_recipe_trains_with_the_scaler_and_loss_falls() -> None:
    recipe = build_recipe(
        RECIPE, overrides=["train.steps=60", "train.warmup_steps=5", "vars.max_lr=0.05"]
    )
    assert recipe.train["steps"] == 60
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 6, generator=gen)
    targets = inputs @ torch.randn(6, 2, generator=gen) + 0.5
    model = torch.nn.Linear(6, 2)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    state = recipe.init(params)
    scaler = recipe.scaler
    losses = []
    for step in range(60):
        prediction = torch.func.functional_call(model, params, (inputs,))
        loss = torch.nn.functional.mse_loss(prediction, targets)
        losses.append(float(loss.detach()))
        scaled = amp.scale_loss(loss, scaler)
        grads = dict(zip(params, torch.autograd.grad(scaled, list(params.values())), strict=True))
        if step == 10:  # an overflow: the step is skipped and the scale backs off
            grads["weight"] = torch.full_like(grads["weight"], float("inf"))
        with torch.no_grad():
            params, state, scaler = recipe.step(params, grads, state, scaler)
    assert float(scaler["scale"]) == 512.0
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def test_hydra_instantiate_builds_each_node() -> None:
    config = omegaconf.OmegaConf.load(RECIPE)
    optimizer = hydra_utils.instantiate(config.optimizers.adamw)
    assert isinstance(optimizer, wrappers.EMA)
    adamw = optimizer.inner.inner.optimizers["decay"]
    assert adamw.config.betas == (0.9, 0.95) and adamw.config.mode.name == "ADAMW"
    assert adamw.config.schedule(20) == 1.0
    scaler = hydra_utils.instantiate(config.scaler, device="cpu")
    assert scaler["scale"].device.type == "cpu"


def test_recipe_optimizer_survives_a_checkpoint(tmp_path: Path) -> None:
    recipe = build_recipe(RECIPE)
    params = make_params(0)
    state = recipe.init(params)
    grads = grad_sequence(4, params, 6)
    for g in grads[:3]:
        params, state, _ = recipe.step(params, g, state)
    path = checkpoint.save(
        tmp_path / "run.safetensors", state, optimizer=recipe.optimizer, params=params
    )
    rebuilt, loaded = checkpoint.load_optimizer(path, params=params)
    params_r = {k: v.clone() for k, v in params.items()}
    for g in grads[3:]:
        params, state, _ = recipe.step(params, g, state)
        params_r, loaded = rebuilt.step(params_r, g, loaded)
    assert_trees_equal(params_r, params)
    assert_trees_equal(loaded, state)


def test_demo_layouts_are_compatible() -> None:
    settings = pytest.importorskip("optorch.demo.settings")
    demo_recipe = settings.load_recipe(RECIPE)  # the demo accepts this file
    assert demo_recipe.optimizer_names == ("adamw",)
    settings.resolve({}, demo_recipe)
    # and the demo's own example builds here, once its runtime settings are given
    recipe = build_recipe(
        EXAMPLES / "recipe.yaml",
        name="adamw_clipped",
        overrides=["+train.warmup_steps=25", "+train.lr_terminal=0.1"],
    )
    assert recipe.optimizer.name.startswith("chain(clip_by_global_norm")


def test_single_optimizer_node_and_overrides() -> None:
    recipe = build_recipe(
        {"optimizer": {"_target_": "optorch.get_optimizer", "optimizer_name": "lion"}},
        overrides=["+optimizer.max_lr=0.5"],
    )
    assert recipe.optimizer.config.max_lr == 0.5 and recipe.scaler is None and recipe.train == {}


def test_overrides_follow_hydras_command_line_grammar() -> None:
    """key=value sets a key the recipe has (a misspelled one raises), +key=value adds
    one (an existing one raises), ++key=value adds or sets, ~key removes."""
    source = {
        "optimizer": {"_target_": "optorch.get_optimizer", "optimizer_name": "adamw"},
        "train": {"steps": 200, "warmup_steps": 10},
    }
    recipe = build_recipe(
        source,
        overrides=[
            "train.steps=999",
            "+optimizer.max_lr=0.01",
            "++optimizer.weight_decay=0.2",
            "++train.steps=1000",
            "~train.warmup_steps",
        ],
    )
    assert recipe.train == {"steps": 1000}
    assert recipe.optimizer.config.max_lr == 0.01
    assert recipe.optimizer.config.weight_decay == 0.2
    refused = [
        ("train.stepz=999", r"the recipe has no key 'train.stepz' \(to add one, write '\+train"),
        ("+train.steps=5", r"already has 'train.steps' \(to set it, write 'train.steps=5'"),
        ("~train.lr", r"no key 'train.lr' to remove"),
        ("~train.steps=3", r"'train.steps' is 200, not '3'"),
        ("+++train.steps=5", r"at most two '\+'"),
    ]
    for override, message in refused:
        with pytest.raises(ValueError, match=message):
            build_recipe(source, overrides=[override])


def test_overrides_through_list_indices_and_unresolved_interpolations() -> None:
    """As Hydra's command line: a path through ``_args_`` (a list) sets that element's
    key (a dotlist merge made "0" a dict key: ConfigTypeError), ``~`` removes a list
    element, and a key whose value is an interpolation that does not resolve yet can be
    set (it read as absent); ``betas=[0.8,0.9]`` is read as YAML."""
    chain = "optimizers.adamw.optimizer._args_"
    recipe = build_recipe(
        RECIPE,
        overrides=[
            f"{chain}.0.max_norm=0.5",
            f"{chain}.1.optimizer.betas=[0.8,0.9]",
            f"++{chain}.1.optimizer.amsgrad=true",
        ],
    )
    outer = recipe.optimizer.inner  # ema -> chain(clip, decay_mask(adamw))
    assert outer.transforms[0].max_norm == 0.5
    adams = list(outer.inner.optimizers.values())  # decay_mask: two groups of adamw
    assert adams and all(a.config.betas == (0.8, 0.9) and a.config.amsgrad for a in adams)
    demo = build_recipe(
        EXAMPLES / "recipe.yaml",
        name="adamw_clipped",
        overrides=[
            "schedule.config.warmup_steps=10",
            "schedule.config.lr_terminal_value=0.2",
            "+train.warmup_steps=25",  # other nodes still interpolate it
            "+train.lr_terminal=0.1",
        ],
    )
    assert demo.config.schedule.config.warmup_steps == 10
    with pytest.raises(ValueError, match=rf"no key '{chain}\.5\.max_norm' \(to add one"):
        build_recipe(RECIPE, overrides=[f"{chain}.5.max_norm=0.5"])
    with pytest.raises(ValueError, match=r"_args_\.5\.max_norm=0\.5': list index out of range"):
        build_recipe(RECIPE, overrides=[f"+{chain}.5.max_norm=0.5"])
    removed = build_recipe(RECIPE, overrides=[f"~{chain}.0"])  # the clip goes
    assert removed.optimizer.inner.transforms == ()


def test_an_override_whose_value_is_an_interpolation_resolves_in_the_recipe() -> None:
    """``key=${train.steps}`` (quoted or not) is kept as an interpolation, as Hydra keeps
    it; it raised InterpolationKeyError, resolved against the override alone."""
    source = {
        "optimizer": {"_target_": "optorch.get_optimizer", "optimizer_name": "adamw"},
        "train": {"steps": 10, "warmup": 0},
    }
    for text in ("${train.steps}", "'${train.steps}'"):
        recipe = build_recipe(source, overrides=[f"train.warmup={text}"])
        assert recipe.train == {"steps": 10, "warmup": 10}


def test_a_dictconfig_given_is_not_changed_by_the_build() -> None:
    """A '~key' override removed the key from the caller's config, and the build
    resolved its interpolations in place: a later build from it, after the caller
    changed train.steps, used the old schedule."""
    config = omegaconf.OmegaConf.load(RECIPE)
    before = omegaconf.OmegaConf.to_container(config, resolve=False)
    build_recipe(config, overrides=["~train.precision"])
    assert omegaconf.OmegaConf.to_container(config, resolve=False) == before
    config.train.steps = 1000
    rebuilt = build_recipe(config)
    fresh = build_recipe(RECIPE, overrides=["train.steps=1000"])
    assert rebuilt.config.schedule.config.total_steps == 1000
    assert rebuilt.config == fresh.config


ADAMW = {"_target_": "optorch.get_optimizer", "optimizer_name": "adamw"}


@pytest.mark.parametrize(
    ("source", "kwargs", "error", "message"),
    [
        ("missing.yaml", {}, FileNotFoundError, "no recipe file"),
        ({"train": {"steps": 3}}, {}, ValueError, "needs an 'optimizer' node"),
        ({"optimizer": ADAMW, "optimizers": {"a": ADAMW}}, {}, ValueError, "not both"),
        (
            {"optimizers": {"a": ADAMW, "b": ADAMW}},
            {},
            ValueError,
            r"several optimizers \['a', 'b'\]",
        ),
        ({"optimizers": {"a": ADAMW}}, {"name": "c"}, ValueError, "no optimizer 'c'"),
        (
            {"optimizer": ADAMW},
            {"overrides": ["optimizer.max_lr"]},
            ValueError,
            r"\['optimizer\.max_lr'\] are not",
        ),
        ({"optimizer": ADAMW}, {"overrides": ["=3"]}, ValueError, r"\['=3'\] are not"),
        (
            {"optimizer": {**ADAMW, "optimizer_name": "adamqq"}},
            {},
            ValueError,
            "recipe node optimizer: .*Unknown optimizer 'adamqq'",
        ),
        (
            {"optimizer": {**ADAMW, "max_lr": -1.0}},
            {},
            ValueError,
            r"recipe node optimizer: .*max_lr: -1.0",
        ),
        (
            {"optimizer": {"_target_": "optorch.schedule.LRSchedulerConfig"}},
            {},
            TypeError,
            "expected an optimizer",
        ),
        (
            {"optimizer": ADAMW, "scaler": {"_target_": "optorch.schedule.LRSchedulerConfig"}},
            {},
            TypeError,
            "must build a loss scaler state",
        ),
        (42, {}, TypeError, "expected a path, a dict or a DictConfig"),
    ],
    ids=[
        "missing file",
        "no optimizer",
        "both layouts",
        "ambiguous",
        "unknown entry",
        "override without a value",
        "override without a key",
        "unknown optimizer",
        "bad value",
        "not an optimizer",
        "not a scaler",
        "bad source",
    ],
)
def test_bad_recipes(
    tmp_path: Path, source: Any, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    if source == "missing.yaml":
        source = tmp_path / source
    with pytest.raises(error, match=message):
        build_recipe(source, **kwargs)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("optimizer: [unclosed\n")
    with pytest.raises(ValueError, match="not a valid YAML recipe"):
        build_recipe(path)
