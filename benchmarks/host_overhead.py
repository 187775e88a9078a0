"""Host time of one in-place step, measured on the CPU with tensors too small to matter.

On a GPU the compiled step is bound by host time (docs/benchmarks.md). This script
measures that host time where no GPU is needed: 100 tensors shaped like a model's (50
matrices of 32 x 32, 50 vectors of 768) and small enough that the kernels cost next to
nothing, so what is timed is optorch's own work per step:

* ``compiled``: ``impl="compiled"`` with the CUDA settings (calls of up to
  ``engine.CHUNK_CUDA`` tensors, every tensor through the compiled kernel);
* ``graph bookkeeping``: the same step under ``optorch.graphs`` with a replay that does
  nothing: the input checks, the lookup of the recorded graph and the copies of new
  grads into it (``--new-grads``), which is what a replayed step costs the host on
  top of one graph launch;
* torch.optim's foreach and fused AdamW on the same tensors, for scale.

    python benchmarks/host_overhead.py [--steps 500] [--new-grads]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import optorch
from optorch import base, engine, graphs


class _NoReplay:
    """A recorder whose graph does nothing: only the host's side of a step is timed."""

    def supports(self, device: torch.device) -> bool:
        return True

    def capturing(self, device: torch.device) -> bool:
        return False

    def record(self, device: torch.device, run: Callable[[], None], body: Any) -> Any:
        run()
        return lambda: None


def _time(step: Callable[[], None], steps: int) -> float:
    """Median of five runs of ``steps`` steps, in microseconds per step."""
    for _ in range(5):
        step()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--new-grads", action="store_true", help="new grad tensors each step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    shapes = [(32, 32)] * 50 + [(768,)] * 50
    params = {f"p{i}": torch.randn(shape) for i, shape in enumerate(shapes)}
    grads = {k: torch.randn_like(v) for k, v in params.items()}

    def fresh() -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in grads.items()} if args.new_grads else grads

    engine.COMPILED_MIN_NUMEL = 2  # every tensor through the kernel, as on a GPU
    engine.CHUNK = engine.CHUNK_CUDA
    optimizer = optorch.get_optimizer("adamw", impl="compiled")
    state = optimizer.init(params)
    results = {"compiled": _time(lambda: optimizer.step(params, fresh(), state), args.steps)}

    graphs._RECORDER = _NoReplay()
    base._host_step = lambda step: False  # type: ignore[assignment]  # as on a GPU
    graphed_state = optimizer.init(params)
    with graphs.enabled():
        results["graph bookkeeping"] = _time(
            lambda: optimizer.step(params, fresh(), graphed_state), args.steps
        )
    assert graphs.stats()["replayed"] > 0
    for variant in ("foreach", "fused"):
        tensors = [torch.nn.Parameter(p.clone()) for p in params.values()]
        adamw = torch.optim.AdamW(tensors, **{variant: True})  # type: ignore[arg-type]

        def torch_step(adamw: Any = adamw, tensors: Any = tensors) -> None:
            for p, g in zip(tensors, fresh().values(), strict=True):
                p.grad = g
            adamw.step()

        results[f"torch.optim AdamW {variant}"] = _time(torch_step, args.steps)
    print(f"{len(shapes)} tensors, new grads each step: {args.new_grads}")
    for name, micros in results.items():
        print(f"  {name:<28}{micros:>8.0f} us a step")


if __name__ == "__main__":
    main()
