"""Where a step's time goes on a CUDA device: host syncs, launches, engine settings.

    python benchmarks/gpu_profile.py [OUT]

1. Each optimizer's foreach and compiled steps under ``torch.cuda.set_sync_debug_mode``:
   the first synchronising call's stack, if any.
2. AdamW and SGD on the GPT-like set: ms per step (host loop of 20 steps, one sync at
   the end, so host time and device time overlap as in training) for engine settings
   (compiled tensors per call and size threshold).
3. A torch.profiler table (top ops by self CPU time) of a few AdamW steps per impl.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

import optorch
from optorch import bench, engine

DEVICE = "cuda"


def first_sync(name: str, impl: str) -> str:
    params = [torch.randn(300, 257, device=DEVICE), torch.randn(7, device=DEVICE)]
    grads = [torch.randn_like(p) for p in params]
    opt = optorch.get_optimizer(name, impl=impl)
    state = opt.init(params)
    for _ in range(2):
        _, state = opt.step(params, grads, state)
    torch.cuda.synchronize()
    found: list[str] = []

    def show(*args: object, **kwargs: object) -> None:
        if not found:
            found.append("".join(traceback.format_stack(limit=14)[:-2]))

    old = warnings.showwarning
    warnings.showwarning = show
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        _, state = opt.step(params, grads, state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = old
    return found[0] if found else ""


def time_steps(name: str, impl: str, steps: int = 20) -> tuple[float, float]:
    """(ms per step with one sync at the end, ms of the first step)."""
    params = bench.param_set("gpt", device=DEVICE)
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    kwargs = {"adamw": {"weight_decay": 0.01}, "sgd": {"momentum": 0.9}}.get(name, {})
    opt = optorch.get_optimizer(name, impl=impl, **kwargs)
    state = opt.init(params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    _, state = opt.step(params, grads, state)
    torch.cuda.synchronize()
    first = (time.perf_counter() - start) * 1e3
    for _ in range(3):
        _, state = opt.step(params, grads, state)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        _, state = opt.step(params, grads, state)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, first


def torch_steps(name: str, steps: int = 20) -> dict[str, float]:
    params = bench.param_set("gpt", device=DEVICE)
    out = {}
    for kind in ("foreach", "fused"):
        tensors = [p.clone().requires_grad_() for p in params]
        for t in tensors:
            t.grad = torch.randn_like(t) * 1e-3
        cls = {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
        kw = {"adamw": {"lr": 1e-3, "weight_decay": 0.01}, "sgd": {"lr": 1e-2, "momentum": 0.9}}
        opt = cls(tensors, **kw[name], **{kind: True})
        for _ in range(3):
            opt.step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            opt.step()
        torch.cuda.synchronize()
        out[kind] = (time.perf_counter() - start) / steps * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default="gpu-profile", help="output folder")
    out = Path(parser.parse_args().out)
    if not torch.cuda.is_available():
        sys.exit("gpu_profile.py: no CUDA device (torch.cuda.is_available() is False)")
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"{torch.cuda.get_device_name()} torch {torch.__version__}"]
    for name in ("lamb", "radam", "adamw", "sgd"):
        for impl in ("foreach", "compiled"):
            stack = first_sync(name, impl)
            lines.append(f"sync {name} {impl}: {'none' if not stack else 'FOUND'}")
            if stack:
                lines.append(stack)
    print("\n".join(lines), flush=True)
    rows = []
    for name in ("adamw", "sgd"):
        rows.append(f"{name} torch: {torch_steps(name)}")
        print(rows[-1], flush=True)
        # on CUDA the foreach engine does not split its lists (FOREACH_CHUNK_NUMEL is a
        # CPU setting), and the compiled engine takes CHUNK_CUDA tensors a call
        ms, first = time_steps(name, "foreach")
        rows.append(f"{name} foreach: {ms:.2f} ms ({first:.0f})")
        print(rows[-1], flush=True)
        defaults = engine.CHUNK_CUDA, engine.COMPILED_MIN_NUMEL
        try:
            for width, min_numel in ((8, 1 << 16), (64, 1 << 16), (defaults[0], 2)):
                engine.CHUNK_CUDA, engine.COMPILED_MIN_NUMEL = width, min_numel
                ms, first = time_steps(name, "compiled")
                rows.append(
                    f"{name} compiled {width} tensors a call, min_numel={min_numel}: "
                    f"{ms:.2f} ms ({first:.0f})"
                )
                print(rows[-1], flush=True)
        finally:
            engine.CHUNK_CUDA, engine.COMPILED_MIN_NUMEL = defaults
    from torch.profiler import ProfilerActivity, profile

    for impl in ("foreach", "compiled"):
        params = bench.param_set("gpt", device=DEVICE)
        grads = [torch.randn_like(p) * 1e-3 for p in params]
        opt = optorch.get_optimizer("adamw", impl=impl, weight_decay=0.01)
        state = opt.init(params)
        for _ in range(3):
            _, state = opt.step(params, grads, state)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                _, state = opt.step(params, grads, state)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        (out / f"profile_adamw_{impl}.txt").write_text(table)
        print(f"--- adamw {impl}\n" + "\n".join(table.splitlines()[:30]), flush=True)


if __name__ == "__main__":
    main()
