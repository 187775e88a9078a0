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
    # momentum is selected (a first step keeps no buffer) and, with nesterov, also used
    # as a factor: inductor kept its first symbolic value (measured before the fix)
    "sgd:nesterov": _configs(
        "max_lr momentum weight_decay nesterov",
        (0.05, 0.9, 0.01, True),
        (0.1, 0.5, 0.02, True),
        (0.2, 0.7, 0.03, True),
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


def _registry_name(case: str) -> str:
    return case.split(":")[0]


def test_every_optimizer_has_a_sweep() -> None:
    assert sorted({_registry_name(case) for case in SWEEPS}) == sorted(optorch.builder.REGISTRY)


class _Problem:
    """A small regression whose grads are a matmul's output (what inductor rewrites)."""

    def __init__(self, name: str) -> None:
        gen = generator(17)
        self.x = torch.randn(32, 16, generator=gen)
        self.y = torch.randn(32, 8, generator=gen)
        self.params0 = {"w": torch.randn(8, 16, generator=gen) / 4}
        if name != "muon":  # Muon steps matrices only
            self.params0["b"] = torch.randn(8, generator=gen)

    def loss(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.x @ params["w"].T
        return ((out + params["b"] if "b" in params else out) - self.y).square().mean()

    def train_step(self, opt: Any) -> Callable[..., Any]:
        def train_step(params: Any, state: Any) -> tuple[Any, Any]:
            return opt.step(params, torch.func.grad(self.loss)(params), state)

        return train_step

    def run(self, opt: Any, step: Callable[..., Any]) -> tuple[Any, Any]:
        params = {key: value.clone() for key, value in self.params0.items()}
        state = opt.init(params)
        for _ in range(STEPS):
            params, state = step(params, state)
        return params, state


def _assert_same_run(got: tuple[Any, Any], want: tuple[Any, Any], what: str) -> None:
    """Params and every state leaf (the step count, rule-wide values) agree."""
    assert_trees_close(got[0], want[0], **TOLERANCE, what=f"{what} params")
    leaves = optree.tree_leaves(got[1])
    eager_leaves = optree.tree_leaves(want[1])
    assert len(leaves) == len(eager_leaves), what
    for leaf, eager_leaf in zip(leaves, eager_leaves, strict=True):
        assert isinstance(leaf, torch.Tensor) == isinstance(eager_leaf, torch.Tensor), what
        if isinstance(eager_leaf, torch.Tensor):
            torch.testing.assert_close(
                leaf, eager_leaf, **TOLERANCE, msg=lambda m, what=what: f"{what}: {m}"
            )


@pytest.mark.parametrize("case", sorted(SWEEPS))
def test_sweep_of_compiled_train_steps_equals_eager(case: str) -> None:
    name = _registry_name(case)
    problem = _Problem(name)
    torch._dynamo.reset()  # before this test's sweep only: the sweep itself never resets
    for hyper in SWEEPS[case]:
        opt = optorch.get_optimizer(name, **hyper, inplace=False)
        train_step = problem.train_step(opt)
        eager = problem.run(opt, train_step)
        compiled = problem.run(opt, torch.compile(train_step, fullgraph=True))
        _assert_same_run(compiled, eager, f"{case} {hyper}")


@pytest.mark.parametrize("name", sorted(optorch.builder.REGISTRY))
def test_compiled_in_place_train_step_keeps_every_state_update(name: str) -> None:
    """In place, a compiled step writes into the state's own tensors. Inductor (torch
    2.13) dropped such a write into a 0-d float64 input: Schedule-Free AdamW's
    ``weight_sum`` and ``lr_max`` stayed 0 while eager moved them (measured before the
    fix), so every rule's in-place compiled run is compared with eager."""
    problem = _Problem(name)
    torch._dynamo.reset()
    opt = optorch.get_optimizer(name, **SWEEPS[name][0])
    train_step = problem.train_step(opt)
    eager = problem.run(opt, train_step)
    compiled = problem.run(opt, torch.compile(train_step, fullgraph=True))
    _assert_same_run(compiled, eager, f"{name} in place")
