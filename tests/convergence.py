"""Convergence problems shared by the tests: a small MLP regression and the 2-D
Rosenbrock function (every optimizer's bars on them: tests/test_convergence.py), and a
teacher-student task for Muon's and Schedule-Free's own convergence claims."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def mlp_problem() -> tuple[dict[str, torch.Tensor], Callable[[dict[str, torch.Tensor]], Any]]:
    """A 4-32-1 tanh MLP and a smooth synthetic regression target (fixed seed).

    The initial loss is 1.43; the best affine fit reaches 1.05 (the target's variance is
    1.09), so a loss below 0.05 means the network fits the nonlinearity.
    """
    generator = torch.Generator().manual_seed(1234)
    inputs = torch.randn(128, 4, generator=generator)
    targets = torch.sin(inputs @ torch.tensor([1.0, -2.0, 0.5, 1.5])) + 0.5 * inputs[:, 0] ** 2
    params = {
        "w1": torch.randn(4, 32, generator=generator) * 0.5,
        "b1": torch.zeros(32),
        "w2": torch.randn(32, 1, generator=generator) * 0.2,
        "b2": torch.zeros(1),
    }

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = torch.tanh(inputs @ p["w1"] + p["b1"])
        return ((hidden @ p["w2"] + p["b2"]).squeeze(1) - targets).pow(2).mean()

    return params, loss


def _same(params: Any, state: Any) -> Any:
    return params


def train_mlp(
    optimizer: Any, steps: int, readout: Callable[[Any, Any], Any] = _same
) -> tuple[float, float]:
    """(initial, final) loss of :func:`mlp_problem` after ``steps`` steps of ``optimizer``;
    the final loss at ``readout(params, state)`` (Schedule-Free: its evaluation point)."""
    params, loss = mlp_problem()
    initial = float(loss(params))
    params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    state = optimizer.init(params)
    for _ in range(steps):
        value = loss(params)
        grads = dict(zip(params, torch.autograd.grad(value, list(params.values())), strict=True))
        params, state = optimizer.step(params, grads, state)
    with torch.no_grad():
        return initial, float(loss(readout(params, state)))


def rosenbrock_grad(xy: torch.Tensor) -> torch.Tensor:
    """The gradient of (1 - x)^2 + 100 (y - x^2)^2, by hand (cheaper than autograd)."""
    x, y = xy[0], xy[1]
    return torch.stack([-2.0 * (1.0 - x) - 400.0 * x * (y - x * x), 200.0 * (y - x * x)])


def minimise_rosenbrock(
    optimizer: Any,
    steps: int,
    readout: Callable[[Any, Any], Any] = _same,
    shape: tuple[int, ...] = (2,),
) -> torch.Tensor:
    """Where ``optimizer`` ends from the classic start (-1.2, 1), in float64, as a
    2-vector: the point read by ``readout(params, state)``, and held in the param as a
    tensor of ``shape`` (Muon: a 1 x 2 matrix)."""
    params = {"xy": torch.tensor([-1.2, 1.0], dtype=torch.float64).reshape(shape)}
    state = optimizer.init(params)
    for _ in range(steps):
        grad = rosenbrock_grad(params["xy"].reshape(2)).reshape(shape)
        params, state = optimizer.step(params, {"xy": grad}, state)
    return readout(params, state)["xy"].reshape(2)


def teacher_problem(
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], Callable[[dict[str, Any]], Any]]:
    """Fit a random tanh teacher (8 -> 16 -> 1) with an 8 -> 32 -> 32 -> 1 student on 128
    fixed points; targets have unit variance, so a constant predictor scores 1. Two
    hidden matrices (for Muon's tests, which compare it with AdamW on them)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(128, 8, generator=gen)
    teacher_in = torch.randn(16, 8, generator=gen) / math.sqrt(8)
    teacher_bias = 0.5 * torch.randn(16, generator=gen)
    teacher_out = torch.randn(1, 16, generator=gen) / 4
    targets = torch.tanh(inputs @ teacher_in.T + teacher_bias) @ teacher_out.T
    targets = (targets - targets.mean()) / targets.std()
    params = {
        "w1": torch.randn(32, 8, generator=gen) / math.sqrt(8),
        "b1": torch.zeros(32),
        "w2": torch.randn(32, 32, generator=gen) / math.sqrt(32),
        "b2": torch.zeros(32),
        "w3": torch.randn(1, 32, generator=gen) / math.sqrt(32),
        "b3": torch.zeros(1),
    }

    def loss(p: dict[str, Any]) -> Any:
        hidden = torch.tanh(inputs @ p["w1"].T + p["b1"])
        hidden = torch.tanh(hidden @ p["w2"].T + p["b2"])
        return ((hidden @ p["w3"].T + p["b3"] - targets) ** 2).mean()

    return params, loss
