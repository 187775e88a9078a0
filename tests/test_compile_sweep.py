"""A hyperparameter sweep in one process, each run's train step under ``torch.compile``.

The common research loop: for each configuration, build an optimizer, compile the train
step (forward, ``torch.func.grad``, optimizer step) with ``fullgraph=True``, train. With
torch's default unspecialized floats, dynamo makes a config float that a recompile saw
change (the second run's learning rate, betas, ...) a symbolic input of the graph, and the
third run reuses that graph. Measured on torch 2.13 before optorch handled it: the config
check failed to trace (``math.isfinite`` of a symbol), inductor could not lower a lerp
with a symbolic weight, NAdam's series length was sized by a loop over a symbol (a
dynamo guard error), and inductor silently kept the *first* value of a symbolic number
in ``where(lr < x, lr, x)`` (Adafactor's relative step) and in ``addcmul(..., value=1 -
alpha)`` (RMSprop): wrong params with no error. Here every registered optimizer runs
three configurations that differ in every float hyperparameter, compiled with inductor
one after another (no ``torch._dynamo.reset()`` between them), and each run must equal
the same steps run eagerly: params and every state tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import pytest
import torch
import torch._dynamo
from conftest import assert_trees_close, generator

import optorch

STEPS = 4
#: inductor fuses differently from eager (float32 rounding; centered RMSprop's
#: ``E[g^2] - E[g]^2`` amplifies it); a stale hyperparameter moves params by 1e-2 or more
TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def _configs(names: str, *rows: tuple[Any, ...]) -> list[dict[str, Any]]:
    """One config per row: ``names`` (space-separated) paired with the row's values."""
    return [dict(zip(names.split(), row, strict=True)) for row in rows]


_ADAM_LIKE = _configs(
    "max_lr betas weight_decay eps",
    (0.01, (0.9, 0.99), 0.01, 1e-8),
    (0.02, (0.8, 0.98), 0.02, 1e-7),
    (0.03, (0.7, 0.97), 0.03, 1e-6),
)

#: registry name -> three configurations, every float hyperparameter changing
SWEEPS: dict[str, list[dict[str, Any]]] = {
    "sgd": _configs(
        "max_lr momentum weight_decay dampening",
        (0.05, 0.9, 0.01, 0.0),
        (0.1, 0.8, 0.02, 0.1),
        (0.2, 0.5, 0.03, 0.2),
    ),
    **dict.fromkeys(("adam", "adamw", "decoupled_adam", "adamax", "radam", "lamb"), _ADAM_LIKE),
    "nadam": _configs(
        "max_lr betas weight_decay momentum_decay",
        (0.01, (0.9, 0.99), 0.01, 0.004),
        (0.02, (0.8, 0.98), 0.02, 0.005),
        (0.03, (0.7, 0.97), 0.03, 0.006),
    ),
    "lion": _configs(
        "max_lr betas weight_decay",
        (0.01, (0.9, 0.99), 0.01),
        (0.02, (0.8, 0.98), 0.02),
        (0.03, (0.7, 0.97), 0.03),
    ),
    "lars": _configs(
        "max_lr momentum weight_decay trust_coefficient",
        (0.05, 0.9, 0.01, 0.01),
        (0.1, 0.8, 0.02, 0.02),
        (0.2, 0.5, 0.03, 0.03),
    ),
    "muon": _configs(
        "max_lr momentum weight_decay ns_dtype",
        (0.05, 0.9, 0.01, None),
        (0.1, 0.8, 0.02, None),
        (0.2, 0.7, 0.03, None),
    ),
    "rmsprop": _configs(
        "max_lr alpha weight_decay momentum eps centered",
        (0.01, 0.9, 0.01, 0.9, 1e-8, True),
        (0.02, 0.8, 0.02, 0.8, 1e-7, True),
        (0.03, 0.7, 0.03, 0.7, 1e-6, True),
    ),
    "adagrad": _configs(
        "max_lr lr_decay weight_decay eps",
        (0.01, 0.01, 0.01, 1e-10),
        (0.02, 0.02, 0.02, 1e-9),
        (0.03, 0.03, 0.03, 1e-8),
    ),
    "adafactor": _configs(
        "max_lr beta2_decay weight_decay d",
        (0.01, -0.8, 0.01, 1.0),
        (0.05, -0.7, 0.02, 1.5),
        (0.2, -0.6, 0.03, 2.0),
    ),
    "schedule_free_adamw": _configs(
        "max_lr betas weight_decay r weight_lr_power",
        (0.01, (0.9, 0.99), 0.01, 0.0, 2.0),
        (0.02, (0.8, 0.98), 0.02, 0.5, 1.5),
        (0.03, (0.7, 0.97), 0.03, 1.0, 1.0),
    ),
}


def test_every_optimizer_has_a_sweep() -> None:
    assert sorted(SWEEPS) == sorted(optorch.builder.REGISTRY)


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_sweep_of_compiled_train_steps_equals_eager(name: str) -> None:
    gen = generator(17)
    x = torch.randn(32, 16, generator=gen)
    y = torch.randn(32, 8, generator=gen)
    params0 = {"w": torch.randn(8, 16, generator=gen) / 4}
    if name != "muon":  # Muon steps matrices only
        params0["b"] = torch.randn(8, generator=gen)

    def loss_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = x @ params["w"].T
        return ((out + params["b"] if "b" in params else out) - y).square().mean()

    def make_train_step(opt: Any) -> Callable[..., Any]:
        def train_step(params: Any, state: Any) -> tuple[Any, Any]:
            return opt.step(params, torch.func.grad(loss_fn)(params), state)

        return train_step

    def run(opt: Any, step: Callable[..., Any]) -> tuple[Any, Any]:
        params = dict(params0)
        state = opt.init(params)
        for _ in range(STEPS):
            params, state = step(params, state)
        return params, state

    torch._dynamo.reset()  # before this test's sweep only: the sweep itself never resets
    for hyper in SWEEPS[name]:
        opt = optorch.get_optimizer(name, **hyper, inplace=False)
        train_step = make_train_step(opt)
        eager_params, eager_state = run(opt, train_step)
        params, state = run(opt, torch.compile(train_step, fullgraph=True))
        what = f"{name} {hyper}"
        assert_trees_close(params, eager_params, **TOLERANCE, what=f"{what} params")
        leaves = optree.tree_leaves(state)
        eager_leaves = optree.tree_leaves(eager_state)
        assert len(leaves) == len(eager_leaves), what
        for got, want in zip(leaves, eager_leaves, strict=True):
            assert isinstance(got, torch.Tensor) == isinstance(want, torch.Tensor), what
            if isinstance(want, torch.Tensor):
                torch.testing.assert_close(
                    got, want, **TOLERANCE, msg=lambda m, what=what: f"{what}: {m}"
                )
