"""``optorch bench``: optimizer step time against torch.optim, measured side by side.

For each optimizer and implementation it reports the median step time, the first call
(compile included), and the peak extra memory of a step, with ratios to
``torch.optim``'s foreach (or for-loop) implementation measured in the same run, and a
floor: the bytes a step must stream (reads and writes of params, grads and state)
divided by the streaming bandwidth measured on the same machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "param_set", "run"]

HELP = "time optimizer steps against torch.optim (ratios, floor, memory)"
DESCRIPTION = (
    "Time one optimizer step of optorch's implementations (reference, foreach, compiled) "
    "against torch.optim (for-loop, foreach, fused) on the same params in the same run. "
    "Sets: 'gpt' (a GPT-like model, about 51.5M params in 100 tensors) and 'small' "
    "(2,000 tensors of 4,096). Prints a table with ratios to torch.optim foreach and to "
    "the memory-bandwidth floor, and writes bench.json, bench.csv and bench.png to --out."
    "\n\nExample: optorch bench --optimizers adamw,sgd --sets gpt --steps 10"
)

# torch.optim twins: name -> (class, kwargs, bytes streamed per param element / itemsize)
# bytes: reads of p, g and each state field, writes of p and each state field
_TWINS: dict[str, tuple[str, dict[str, Any], int]] = {
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}, 7),
    "adam": ("Adam", {"lr": 1e-3}, 7),
    "sgd": ("SGD", {"lr": 1e-2, "momentum": 0.9}, 5),
    "lars": ("", {}, 5),
    "lion": ("", {}, 5),
    "lamb": ("", {}, 7),
    "adafactor": ("Adafactor", {"lr": 1e-2}, 3),
    "rmsprop": ("RMSprop", {"lr": 1e-3}, 5),
    "adagrad": ("Adagrad", {"lr": 1e-2}, 5),
    "adamax": ("Adamax", {"lr": 1e-3}, 7),
    "nadam": ("NAdam", {"lr": 1e-3}, 7),
    "radam": ("RAdam", {"lr": 1e-3}, 7),
    "muon": ("Muon", {"lr": 1e-3}, 5),
    "schedule_free_adamw": ("", {}, 7),
}
_OPTORCH_KW: dict[str, dict[str, Any]] = {
    "adamw": {"max_lr": 1e-3, "weight_decay": 0.01},
    "adam": {"max_lr": 1e-3},
    "sgd": {"max_lr": 1e-2, "momentum": 0.9},
    "adafactor": {"max_lr": 1e-2},
}


def param_set(
    name: str, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> list[torch.Tensor]:
    """The shapes of a benchmark set, filled with seeded random values."""
    generator = torch.Generator().manual_seed(0)
    if name == "gpt":
        d, vocab, ctx, layers = 704, 4096, 1024, 8
        shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
        for _ in range(layers):
            shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]
            shapes += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
        shapes += [(d,), (d,)]
    elif name == "small":
        shapes = [(4096,)] * 2000
    elif name == "tiny":
        shapes = [(64, 32), (32,), (16, 16), (7,)] * 5
    else:
        raise ValueError(f"unknown param set {name!r} (choose gpt, small, tiny)")
    return [
        torch.randn(s, generator=generator, dtype=torch.float32).to(dtype).to(device)
        for s in shapes
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--optimizers", default="adamw,sgd", help="comma-separated registry names, or 'all'"
    )
    parser.add_argument(
        "--sets", default="gpt,small", help="comma-separated sets: gpt, small, tiny"
    )
    parser.add_argument(
        "--impls", default="reference,foreach,compiled", help="optorch impls to time"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default="bench-out", help="folder for bench.json/csv/png")
    parser.add_argument(
        "--compile-scaling",
        action="store_true",
        help="also time the compiled AdamW first step for 100 vs 1,000 tensors",
    )


@dataclass
class Row:
    set: str
    optimizer: str
    impl: str
    median_ms: float
    first_ms: float
    peak_extra_mb: float
    vs_torch_foreach: float | None = None
    vs_floor: float | None = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _measure(
    step: Callable[[], None], steps: int, warmup: int, device: str
) -> tuple[float, float, float]:
    """(median ms, first ms, peak extra MB) of ``step``."""
    _sync(device)
    start = time.perf_counter()
    step()
    _sync(device)
    first = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_now()
        peak = float("nan")
        if _reset_peak():
            step()
            peak = max(0, _peak_rss() - base) / 2**20
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), first, peak


def bandwidth_gbs(device: str, numel: int = 1 << 25) -> float:
    """Streaming bandwidth (GB/s): best of a few ``z = x + s*y`` passes (12 bytes/elem)."""
    x = torch.randn(numel, device=device)
    y = torch.randn(numel, device=device)
    z = torch.empty_like(x)
    best = float("inf")
    for _ in range(7):
        _sync(device)
        start = time.perf_counter()
        torch.add(x, y, alpha=0.5, out=z)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 3 * 4 * numel / best / 1e9


def _torch_step(name: str, params: list[torch.Tensor], variant: str) -> Callable[[], None] | None:
    cls_name, kwargs, _ = _TWINS.get(name, ("", {}, 0))
    if not cls_name:
        return None
    cls = getattr(torch.optim, cls_name)
    extra: dict[str, Any] = {}
    if variant == "forloop":
        extra["foreach"] = False
    elif variant == "foreach":
        extra["foreach"] = True
    elif variant == "fused":
        extra["fused"] = True
    tensors = [p.clone().requires_grad_() for p in params]
    if name == "muon":
        tensors = [t for t in tensors if t.dim() == 2]
        extra.pop("foreach", None)
    try:
        optimizer = cls(tensors, **kwargs, **extra)
    except (TypeError, RuntimeError, ValueError):
        return None
    for t in tensors:
        t.grad = torch.randn_like(t) * 1e-3
    try:
        optimizer.step()
    except (RuntimeError, NotImplementedError):
        return None
    return optimizer.step


def _optorch_step(name: str, params: list[torch.Tensor], impl: str) -> Callable[[], None]:
    import optorch

    kwargs = dict(_OPTORCH_KW.get(name, {}))
    opt = optorch.get_optimizer(name, impl=impl, **kwargs)
    tensors = [p.clone() for p in params]
    if name == "muon":
        tensors = [t for t in tensors if t.dim() == 2]
    grads = [torch.randn_like(t) * 1e-3 for t in tensors]
    box = {"state": opt.init(tensors)}

    def step() -> None:
        _, box["state"] = opt.step(tensors, grads, box["state"])

    return step


def _compile_scaling(device: str) -> dict[str, float]:
    """First-step time of compiled AdamW for 100 and 1,000 tensors (fresh kernels)."""
    import optorch
    from optorch import engine

    result: dict[str, float] = {}
    for count in (100, 1000):
        torch._dynamo.reset()
        engine._COMPILED.clear()
        params = [torch.randn(1024 + 16 * i, device=device) for i in range(count)]
        grads = [torch.randn_like(p) for p in params]
        opt = optorch.get_optimizer("adamw", impl="compiled", weight_decay=0.01)
        state = opt.init(params)
        start = time.perf_counter()
        opt.step(params, grads, state)
        _sync(device)
        result[f"compile_first_step_s_{count}"] = time.perf_counter() - start
    return result


def run(args: argparse.Namespace) -> int:
    import optorch

    torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    names = sorted(optorch.REGISTRY) if args.optimizers == "all" else args.optimizers.split(",")
    for name in names:
        if name not in optorch.REGISTRY:
            raise ValueError(f"unknown optimizer {name!r}; known: {sorted(optorch.REGISTRY)}")
    impls = [i for i in args.impls.split(",") if i]
    sets = [s for s in args.sets.split(",") if s]
    bandwidth = bandwidth_gbs(device)
    rows: list[Row] = []
    device_name = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else (f"CPU, {torch.get_num_threads()} threads")
    )
    print(
        f"device: {device_name}; torch {torch.__version__}; "
        f"streaming bandwidth {bandwidth:.1f} GB/s"
    )
    for set_name in sets:
        params = param_set(set_name, device=device)
        numel = sum(p.numel() for p in params)
        print(f"\nset {set_name}: {len(params)} tensors, {numel / 1e6:.1f}M params")
        for name in names:
            per_elem = _TWINS.get(name, ("", {}, 7))[2]
            floor_ms = numel * 4 * per_elem / (bandwidth * 1e9) * 1e3
            measured: list[Row] = []
            for variant in ("forloop", "foreach", "fused"):
                step = _torch_step(name, params, variant)
                if step is None:
                    continue
                median, first, peak = _measure(step, args.steps, args.warmup, device)
                measured.append(Row(set_name, name, f"torch-{variant}", median, first, peak))
                del step
            for impl in impls:
                median, first, peak = _measure(
                    _optorch_step(name, params, impl), args.steps, args.warmup, device
                )
                measured.append(Row(set_name, name, impl, median, first, peak))
            baseline = next((r for r in measured if r.impl == "torch-foreach"), None) or next(
                (r for r in measured if r.impl == "torch-forloop"), None
            )
            for row in measured:
                row.vs_torch_foreach = row.median_ms / baseline.median_ms if baseline else None
                row.vs_floor = row.median_ms / floor_ms
            rows.extend(measured)
            _print_table(name, measured, floor_ms, numel * 4 / 2**20)
    extra = _compile_scaling(device) if args.compile_scaling else {}
    if extra:
        print("\ncompile scaling:", {k: round(v, 2) for k, v in extra.items()})
    _write(Path(args.out), rows, bandwidth, device_name, extra)
    return 0


def _print_table(name: str, rows: list[Row], floor_ms: float, param_mb: float) -> None:
    print(f"  {name}: floor {floor_ms:.1f} ms; params {param_mb:.0f} MB")
    print(
        f"  {'impl':<16}{'median ms':>11}{'first ms':>11}{'x torch foreach':>17}{'x floor':>9}"
        f"{'peak extra MB':>15}"
    )
    for r in rows:
        ratio = f"{r.vs_torch_foreach:.2f}" if r.vs_torch_foreach is not None else "-"
        print(
            f"  {r.impl:<16}{r.median_ms:>11.1f}{r.first_ms:>11.0f}{ratio:>17}"
            f"{r.vs_floor or 0:>9.2f}{r.peak_extra_mb:>15.0f}"
        )


def _write(
    out: Path, rows: list[Row], bandwidth: float, device: str, extra: dict[str, float]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": device,
        "torch": torch.__version__,
        "bandwidth_gbs": bandwidth,
        "rows": [asdict(r) for r in rows],
        **extra,
    }
    (out / "bench.json").write_text(json.dumps(payload, indent=2))
    with open(out / "bench.csv", "w", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(asdict(rows[0]).keys()) if rows else ["set"]
        )
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a demo extra
        return
    groups = sorted({(r.set, r.optimizer) for r in rows})
    fig, axes = plt.subplots(
        1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 4), squeeze=False
    )
    for ax, (set_name, name) in zip(axes[0], groups, strict=False):
        sub = [r for r in rows if r.set == set_name and r.optimizer == name]
        ax.bar(
            [r.impl for r in sub],
            [r.median_ms for r in sub],
            color=["#999999" if r.impl.startswith("torch") else "#1f77b4" for r in sub],
        )
        ax.set_title(f"{name} on {set_name}")
        ax.set_ylabel("ms per step (median)")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=100)
    plt.close(fig)
