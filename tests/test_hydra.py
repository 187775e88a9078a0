"""Configs built by Hydra from YAML-like OmegaConf nodes, as the seed's users wrote them.

YAML gives strings for enums (``mode: ADAMW``) and lists for tuples (``betas: [0.9,
0.95]``); the configs must normalise both, and reject a bad mode with ``ValueError``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_trees_equal, grad_sequence, make_params

hydra_utils = pytest.importorskip("hydra.utils")
omegaconf = pytest.importorskip("omegaconf")

import optorch  # noqa: E402
from optorch.adam import AdamConfig, AdamWDMode  # noqa: E402
from optorch.lars import LARSConfig  # noqa: E402
from optorch.sgd import SGDConfig  # noqa: E402

CASES: list[tuple[str, dict[str, Any], Any, str]] = [
    (
        "adamw",
        {
            "_target_": "optorch.adam.AdamConfig",
            "mode": "ADAMW",
            "max_lr": 0.001,
            "betas": [0.9, 0.95],
            "weight_decay": 0.1,
        },
        AdamConfig(mode=AdamWDMode.ADAMW, max_lr=0.001, betas=(0.9, 0.95), weight_decay=0.1),
        "adamw",
    ),
    (
        "decoupled",
        {"_target_": "optorch.adam.AdamConfig", "mode": "DECOUPLED", "weight_decay": 0.01},
        AdamConfig(mode=AdamWDMode.DECOUPLED, weight_decay=0.01),
        "decoupled_adam",
    ),
    (
        "sgd",
        {
            "_target_": "optorch.sgd.SGDConfig",
            "momentum": 0.8,
            "weight_decay": 0.01,
            "max_lr": 0.05,
        },
        SGDConfig(momentum=0.8, weight_decay=0.01, max_lr=0.05),
        "sgd",
    ),
    (
        "lars",
        {
            "_target_": "optorch.lars.LARSConfig",
            "max_lr": 0.2,
            "weight_decay": 0.001,
            "trust_coefficient": 0.01,
        },
        LARSConfig(max_lr=0.2, weight_decay=0.001, trust_coefficient=0.01),
        "lars",
    ),
]


def instantiate(node: dict[str, Any]) -> Any:
    return hydra_utils.instantiate(omegaconf.OmegaConf.create(node))


@pytest.mark.parametrize(("case_id", "node", "expected", "name"), CASES, ids=[c[0] for c in CASES])
def test_instantiate_gives_a_working_config(
    case_id: str, node: dict[str, Any], expected: Any, name: str
) -> None:
    config = instantiate(node)
    assert type(config) is type(expected)
    assert config == expected
    if isinstance(config, AdamConfig):
        assert isinstance(config.mode, AdamWDMode) and config.mode is expected.mode
        assert type(config.betas) is tuple
        assert all(type(beta) is float for beta in config.betas)
    # it steps, exactly as the config built in Python does
    params = make_params(95, torch.float32)
    grads_per_step = grad_sequence(95, params, 3)
    results = []
    for candidate in (config, expected):
        p = {k: v.clone() for k, v in params.items()}
        state = optorch.init_optimizer_state(name, p, candidate)
        for grads in grads_per_step:
            p, state = optorch.OPTIMIZER_STEP[name](p, grads, state, candidate)
        results.append((p, state))
    assert_trees_equal(results[0], results[1], what=case_id)
    assert not torch.equal(results[0][0]["layer.weight"], params["layer.weight"])


def test_bad_mode_string_is_a_value_error() -> None:
    node = {"_target_": "optorch.adam.AdamConfig", "mode": "ADAMX"}
    with pytest.raises(Exception, match="ADAMX") as info:
        instantiate(node)
    # Hydra wraps the error of the target; the cause is the config's ValueError
    error: BaseException | None = info.value
    while error is not None and not isinstance(error, ValueError):
        error = error.__cause__
    assert isinstance(error, ValueError), repr(info.value)
    assert "ORIGINAL" in str(error) and "DECOUPLED" in str(error)
    with pytest.raises(ValueError, match=r"Invalid AdamConfig\.mode: 'ADAMX'"):
        AdamConfig(mode="ADAMX")


@pytest.mark.parametrize("spelling", ["ADAMW", "adamw", "AdamWDMode.ADAMW", 1])
def test_mode_spellings(spelling: Any) -> None:
    assert AdamConfig(mode=spelling).mode is AdamWDMode.ADAMW


def test_bad_betas_from_yaml() -> None:
    with pytest.raises(Exception, match="betas") as info:
        instantiate({"_target_": "optorch.adam.AdamConfig", "betas": [0.9, 1.5]})
    error: BaseException | None = info.value
    while error is not None and not isinstance(error, ValueError):
        error = error.__cause__
    assert isinstance(error, ValueError)
