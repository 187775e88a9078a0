"""Step time when params sit out steps (experts of a mixture that get no tokens).

A rule that reads each param's own step count (Adam here) runs the params of each
distinct count as a run of their own once some have sat out steps
(``state["skipped_steps"]``, docs/concepts.md). This times an Adam step over a shared
1024 x 1024 weight and ``--experts`` 256 x 256 experts, first with every gradient
present, then with each expert's gradient present with probability 1/2 (the counts
drift apart), and prints how many distinct counts the experts ended with.

Usage: python benchmarks/sitting_out.py [--experts 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch

import optorch


def measure(impl: str, experts: int, steps: int) -> tuple[float, float, int]:
    """(ms a step with every gradient, ms with half the experts', distinct counts)."""
    generator = torch.Generator().manual_seed(0)
    opt = optorch.get_optimizer("adam", max_lr=1e-3, impl=impl)
    params = {f"e{i}": torch.randn(256, 256, generator=generator) for i in range(experts)}
    params["shared"] = torch.randn(1024, 1024, generator=generator)
    state = opt.init(params)
    grads = {k: torch.randn(v.shape, generator=generator) for k, v in params.items()}
    draw = random.Random(0)

    def run(present: Callable[[str], bool], count: int) -> float:
        nonlocal params, state
        start = time.perf_counter()
        for _ in range(count):
            given = {k: (g if present(k) else None) for k, g in grads.items()}
            params, state = opt.step(params, given, state)
        return (time.perf_counter() - start) / count * 1e3

    def every(key: str) -> bool:
        return True

    def half(key: str) -> bool:
        return key == "shared" or draw.random() < 0.5

    run(every, 3)  # compiles
    full = run(every, steps)
    run(half, steps // 2)
    partial = run(half, steps)
    counts = {int(v) for v in state["skipped_steps"].values() if v is not None}
    return full, partial, len(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    for impl in ("foreach", "compiled"):
        full, partial, counts = measure(impl, args.experts, args.steps)
        print(
            f"{impl:9s} every gradient {full:6.1f} ms a step; half the experts' "
            f"{partial:6.1f} ms ({counts} distinct counts)"
        )


if __name__ == "__main__":
    main()
