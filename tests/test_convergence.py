"""The convergence table: every registered optimizer drives the same small MLP
(:func:`convergence.mlp_problem`, a 4-32-1 tanh network on a fixed synthetic regression
task, initial loss 1.43, best affine fit 1.05) below a stated loss, and the 2-D
Rosenbrock function from the classic start (-1.2, 1), 2.2 away from its minimum (1, 1),
below a stated distance, within stated steps. The rows here are the table printed in
``docs/optimizers/index.md`` (a test renders them and compares), so the documentation
states exactly what is tested.

Muon updates matrices only: on the MLP it takes the two weight matrices and AdamW the
biases (the partition wrapper, as its authors recommend), and on Rosenbrock the point
is one 1 x 2 matrix. Schedule-Free AdamW is measured at its evaluation point x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from convergence import minimise_rosenbrock, rosenbrock_grad, train_mlp

import optorch
import optorch.builder
from optorch import wrappers
from optorch.schedule_free import eval_params

DOCS = Path(__file__).resolve().parents[1] / "docs" / "optimizers" / "index.md"
BEGIN, END = "<!-- convergence table: tests/test_convergence.py -->", "<!-- end -->"


@dataclass(frozen=True)
class Run:
    """Settings, steps and the bar of one task."""

    hyper: dict[str, Any]
    steps: int
    bar: float
    schedule: str = ""  # "" (constant), "cosine" (to 0 over the run) or "warmup N"
    note: str = ""  # how the task is posed to this optimizer, where it differs

    def config(self) -> dict[str, Any]:
        hyper = dict(self.hyper)
        if self.schedule == "cosine":
            steps = self.steps
            hyper["schedule"] = lambda k: 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / steps))
        elif self.schedule.startswith("warmup "):
            warmup = int(self.schedule.split()[1])
            hyper["schedule"] = lambda k: min(1.0, (k + 1) / warmup)
        return hyper

    def settings(self) -> str:
        parts = [f"{k}={v}" for k, v in self.hyper.items()]
        if self.schedule == "cosine":
            parts.append("cosine to 0")
        elif self.schedule:
            parts.append(f"linear {self.schedule}")
        text = ", ".join(parts) if parts else "defaults"
        return f"{text} ({self.note})" if self.note else text


@dataclass(frozen=True)
class Row:
    name: str  # the registry key
    mlp: Run
    rosenbrock: Run
    label: str = ""

    @property
    def id(self) -> str:
        return self.label or self.name


MLP_BAR = 0.05  # below the best affine fit (1.05) by 20x: the hidden layer is used
COSINE_ADAM = {"max_lr": 0.02, "betas": (0.9, 0.99)}

TABLE = [
    Row("sgd", Run({"max_lr": 0.1, "momentum": 0.9}, 400, MLP_BAR),
        Run({"max_lr": 1e-3, "momentum": 0.9}, 3000, 1e-4)),
    Row("adam", Run({"max_lr": 0.01}, 400, MLP_BAR),
        Run(COSINE_ADAM, 3000, 1e-6, "cosine")),
    Row("adamw", Run({"max_lr": 0.01, "weight_decay": 0.01}, 400, MLP_BAR),
        Run({**COSINE_ADAM, "weight_decay": 0.0}, 3000, 1e-6, "cosine")),
    Row("decoupled_adam", Run({"max_lr": 0.01}, 400, MLP_BAR),
        Run(COSINE_ADAM, 3000, 1e-6, "cosine")),
    Row("lars", Run({"max_lr": 1.0, "momentum": 0.9}, 400, MLP_BAR),
        Run({"max_lr": 1.0, "momentum": 0.9, "weight_decay": 0.0}, 3000, 5e-3)),
    Row("lion", Run({"max_lr": 0.01}, 400, MLP_BAR, "cosine"),
        Run({"max_lr": 0.02}, 2000, 5e-3, "cosine")),
    Row("lamb", Run({"max_lr": 0.02}, 400, MLP_BAR, "cosine"),
        Run({"max_lr": 0.05}, 1500, 1e-2, "cosine")),
    Row("adafactor", Run({"max_lr": 0.1}, 400, 0.1),
        Run({"max_lr": 0.1}, 3000, 0.2)),
    Row("adafactor", Run({"max_lr": 0.1, "beta1": 0.9}, 400, MLP_BAR),
        Run({"max_lr": 0.1, "beta1": 0.9}, 2000, 1e-2), label="adafactor-momentum"),
    Row("muon", Run({"max_lr": 0.02, "weight_decay": 0.0}, 400, MLP_BAR,
                    note="the weight matrices; biases: AdamW, max_lr=0.003"),
        Run({"max_lr": 0.02, "weight_decay": 0.0}, 2000, 1e-4, "cosine",
            note="the point as a 1 x 2 matrix")),
    Row("rmsprop", Run({"max_lr": 2e-3, "momentum": 0.9}, 400, MLP_BAR),
        Run({"max_lr": 1e-3, "momentum": 0.9}, 1500, 2e-3)),
    Row("adagrad", Run({"max_lr": 0.1}, 400, MLP_BAR),
        Run({"max_lr": 1.5}, 3000, 0.08)),
    Row("adamax", Run({"max_lr": 0.02}, 400, MLP_BAR),
        Run({"max_lr": 0.3}, 2000, 5e-3)),
    Row("nadam", Run({"max_lr": 0.01}, 400, MLP_BAR),
        Run(COSINE_ADAM, 2500, 2e-2, "cosine")),
    Row("radam", Run({"max_lr": 0.02}, 400, MLP_BAR),
        Run({"max_lr": 0.2}, 2000, 1e-3, "warmup 100")),
    Row("schedule_free_adamw", Run({"max_lr": 0.02, "warmup_steps": 20}, 400, MLP_BAR,
                                   note="loss at x"),
        Run({"max_lr": 0.05, "betas": (0.9, 0.9), "r": 4.0}, 1000, 2e-2,
            note="distance of x")),
]  # fmt: skip

#: Muon on the MLP: its matrices; the biases go to AdamW.
MUON_MATRICES = ("w1", "w2")
MUON_ADAMW = {"max_lr": 0.003}


def _optimizer(row: Row, run: Run, mlp: bool) -> Any:
    optimizer = optorch.get_optimizer(row.name, **run.config())
    if row.name == "muon" and mlp:
        return wrappers.partition(
            lambda path, _: "muon" if path in MUON_MATRICES else "adamw",
            {"muon": optimizer, "adamw": optorch.get_optimizer("adamw", **MUON_ADAMW)},
        )
    return optimizer


def _readout(row: Row, optimizer: Any) -> Any:
    """Where a task reads the params: Schedule-Free's evaluation point x, else as they are."""
    if row.name != "schedule_free_adamw":
        return lambda params, state: params
    pure = optimizer.config.replace(inplace=False)
    return lambda params, state: eval_params(params, state, pure)


def _mlp_loss(row: Row) -> tuple[float, float]:
    optimizer = _optimizer(row, row.mlp, mlp=True)
    return train_mlp(optimizer, row.mlp.steps, _readout(row, optimizer))


def _rosenbrock_distance(row: Row) -> float:
    optimizer = _optimizer(row, row.rosenbrock, mlp=False)
    shape = (1, 2) if row.name == "muon" else (2,)  # Muon: the point as one 1 x 2 matrix
    xy = minimise_rosenbrock(optimizer, row.rosenbrock.steps, _readout(row, optimizer), shape)
    return float(torch.linalg.vector_norm(xy - 1.0))


ROWS = [pytest.param(row, id=row.id) for row in TABLE]


@pytest.mark.parametrize("row", ROWS)
def test_trains_the_mlp(row: Row) -> None:
    initial, final = _mlp_loss(row)
    assert initial > 1.4
    assert final < row.mlp.bar, (
        f"{row.id}: loss {initial:.4f} -> {final:.4g} after {row.mlp.steps} steps "
        f"(bar {row.mlp.bar})"
    )


@pytest.mark.parametrize("row", ROWS)
def test_minimises_rosenbrock(row: Row) -> None:
    distance = _rosenbrock_distance(row)
    assert distance < row.rosenbrock.bar, (
        f"{row.id}: {distance:.3g} from (1, 1) after {row.rosenbrock.steps} steps "
        f"(bar {row.rosenbrock.bar})"
    )


def test_every_registered_optimizer_has_a_row() -> None:
    assert {row.name for row in TABLE} == set(optorch.builder.REGISTRY)


def render(rows: list[Row]) -> str:
    """The table as markdown, as the documentation prints it."""
    lines = [
        "| optimizer | MLP settings | steps | loss below | Rosenbrock settings | steps | "
        "distance below |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"`{row.name}`" + (" (momentum)" if row.label else "")
        lines.append(
            f"| {name} | {row.mlp.settings()} | {row.mlp.steps} | {row.mlp.bar:g} | "
            f"{row.rosenbrock.settings()} | {row.rosenbrock.steps} | {row.rosenbrock.bar:g} |"
        )
    return "\n".join(lines)


def test_the_documentation_prints_this_table() -> None:
    text = DOCS.read_text()
    assert BEGIN in text and END in text, f"{DOCS} lacks the convergence table markers"
    printed = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert printed == render(TABLE), "docs/optimizers/index.md: regenerate with render(TABLE)"


def test_rosenbrock_gradient() -> None:
    """The hand-written gradient the table uses equals autograd's."""
    xy = torch.tensor([-1.2, 1.0], dtype=torch.float64, requires_grad=True)
    (expected,) = torch.autograd.grad((1.0 - xy[0]) ** 2 + 100.0 * (xy[1] - xy[0] ** 2) ** 2, [xy])
    torch.testing.assert_close(rosenbrock_grad(xy.detach()), expected, rtol=1e-14, atol=0.0)
