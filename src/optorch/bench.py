"""``optorch bench``: optimizer step time against torch.optim, measured side by side.

For each optimizer it builds every variant (torch.optim's for-loop, foreach and fused
steps where they exist; optorch's impls) on copies of the same params, times each one's
first call (compile included) and the peak extra memory of a step, then times the
variants in turns, one step each per round, so that all of them see the same
background load on a shared machine. Ratios are to ``torch.optim``'s foreach step (its
for-loop where it has no foreach) and to a floor: the least memory traffic of the step
(:data:`TRAFFIC`) at the streaming bandwidth measured in the same run, or for Muon the
Newton-Schulz matmuls at the measured bfloat16 matmul throughput when that is larger.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DESCRIPTION",
    "HELP",
    "TRAFFIC",
    "add_arguments",
    "bandwidth_gbs",
    "markdown",
    "matmul_tflops",
    "newton_schulz_flops",
    "param_set",
    "run",
]

HELP = "time optimizer steps against torch.optim (ratios, floor, memory)"
DESCRIPTION = (
    "Time one optimizer step of optorch's implementations (reference, foreach, compiled) "
    "against torch.optim (for-loop, foreach, fused) on the same params in the same run, "
    "in turns (one step of each variant per round). "
    "Sets: 'gpt' (a GPT-like model, 51.3M params in 100 tensors), 'small' (2,000 "
    "tensors of 4,096) and 'tiny' (20 tensors, about 12K params: a quick check of the "
    "command). Prints a table with ratios to torch.optim foreach and to "
    "the floor, and writes bench.json, bench.csv, bench.md and bench.png to --out. "
    "For example: optorch bench --optimizers adamw,sgd --sets gpt --steps 10"
)

# torch.optim twins: name -> class; timed with the hyperparameters of the optorch
# optimizer they are compared with (converted by interop.convert.torch_hyperparameters:
# one source, so the two sides cannot drift apart)
_TWINS: dict[str, str] = {
    "adamw": "AdamW",
    "adam": "Adam",
    "sgd": "SGD",
    "adafactor": "Adafactor",
    "rmsprop": "RMSprop",
    "adagrad": "Adagrad",
    "adamax": "Adamax",
    "nadam": "NAdam",
    "radam": "RAdam",
    "muon": "Muon",
}
# optorch's settings where the registry's defaults are not the ones benchmarked
_OPTORCH_KW: dict[str, dict[str, Any]] = {
    "adamw": {"max_lr": 1e-3, "weight_decay": 0.01},
    "adam": {"max_lr": 1e-3},
    "sgd": {"max_lr": 1e-2, "momentum": 0.9},
    "adafactor": {"max_lr": 1e-2},
}

#: The least memory traffic of one step, in param-sized units (one read or one write of
#: a tensor the size of the params), for the configuration benchmarked. Rules that need a
#: whole-tensor statistic before they can update a tensor (a norm, an RMS, row and column
#: means) must read some operands once more: those passes are counted.
TRAFFIC: dict[str, tuple[int, str]] = {
    "sgd": (5, "read p, g, momentum; write p, momentum"),
    "lion": (5, "read p, g, exp_avg; write p, exp_avg"),
    "rmsprop": (5, "read p, g, square_avg; write p, square_avg"),
    "adagrad": (5, "read p, g, sum; write p, sum"),
    "muon": (5, "read p, g, momentum; write p, momentum (plus the Newton-Schulz matmuls)"),
    "adam": (7, "read p, g, exp_avg, exp_avg_sq; write p, exp_avg, exp_avg_sq"),
    "adamw": (7, "as adam"),
    "decoupled_adam": (7, "as adam"),
    "adamax": (7, "read p, g, exp_avg, exp_inf; write p, exp_avg, exp_inf"),
    "nadam": (7, "as adam"),
    "radam": (7, "as adam"),
    "schedule_free_adamw": (7, "read p, g, z, exp_avg_sq; write p, z, exp_avg_sq"),
    "lars": (7, "pass 1 reads p, g for their norms; pass 2 as sgd"),
    "lamb": (
        10,
        "pass 1 reads p, g, exp_avg, exp_avg_sq, writes the moments and takes the norms "
        "of p and of the update; pass 2 reads p and the moments again and writes p",
    ),
    "adafactor": (
        6,
        "matrices: pass 1 reads p (its RMS) and g (row and column means of g^2); pass 2 "
        "reads g (the RMS of the update, for clipping); pass 3 reads p, g and writes p. "
        "Vectors: 8 (ADAFACTOR_VECTOR_UNITS)",
    ),
}
_DEFAULT_TRAFFIC = (7, "assumed: read p, g and two state tensors; write p and the state")
#: Adafactor's units for 0-d and 1-d params, which keep a full-size second moment: pass 1
#: reads p, g and the variance and writes the variance (and takes the RMS of p and of the
#: update); pass 2 reads p, g and the variance and writes p.
ADAFACTOR_VECTOR_UNITS = 8


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
        "--optimizers",
        default="adamw,sgd",
        help="comma-separated registry names, or 'all' (default: adamw,sgd)",
    )
    parser.add_argument(
        "--sets", default="gpt,small", help="comma-separated: gpt, small, tiny (default: gpt,small)"
    )
    parser.add_argument(
        "--impls",
        default="reference,foreach,compiled",
        help=(
            "optorch impls to time: reference, foreach, compiled, and on CUDA 'graphed' and "
            "'graphed-foreach' (compiled or foreach, replayed as CUDA graphs: "
            "optorch.graphs) "
            "(default: reference,foreach,compiled)"
        ),
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per measurement (default: 10)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps after the first (default: 2)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument(
        "--out",
        default="bench-out",
        help="folder for bench.json, bench.csv, bench.md and bench.png (default: bench-out)",
    )
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
    #: ratio to torch.optim's foreach step, or to its for-loop where it has no foreach
    vs_torch_foreach: float | None = None
    vs_floor: float | None = None
    floor_ms: float | None = None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory() -> None:
    """Hand the allocator's free pages back to the system (glibc ``malloc_trim``), so
    that a step's temporaries raise the resident size even where they reuse memory the
    process freed before (2,000 small tensors of an earlier step, say); without it their
    peak read as 0 MB."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the resident size as it is
        pass


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


def _prepare(step: Callable[[], None], warmup: int, device: str) -> tuple[float, float]:
    """(first call ms, peak extra MB of one step) of ``step``, after ``warmup`` steps."""
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
        return first, (torch.cuda.max_memory_allocated() - base) / 2**20
    _release_free_memory()
    base = _rss_now()
    peak = float("nan")
    if _reset_peak():
        step()
        peak = max(0, _peak_rss() - base) / 2**20
    return first, peak


def _round_robin(steps: list[Callable[[], None]], count: int, device: str) -> list[float]:
    """Median ms per step of each of ``steps``, timed in turns (one step of each, then
    again, ``count`` times): on a shared machine every variant sees the same load."""
    times: list[list[float]] = [[] for _ in steps]
    for round_ in range(count):
        order = range(len(steps)) if round_ % 2 == 0 else reversed(range(len(steps)))
        for k in order:
            _sync(device)
            start = time.perf_counter()
            steps[k]()
            _sync(device)
            times[k].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def bandwidth_gbs(device: str, numel: int = 1 << 25) -> float:
    """Streaming bandwidth (GB/s): the best of a few passes of two kinds, 12 bytes/elem each.

    ``z = x + s*y`` into a separate buffer, and ``x += s*y`` in place. The in-place pass
    is the shape of an optimizer step; on CPUs it is also the faster one, because a store
    to a line that was just read needs no extra read for ownership, so it is the fairer
    basis of a floor (a lower bandwidth would flatter every ratio to the floor).
    """
    x = torch.randn(numel, device=device)
    y = torch.randn(numel, device=device)
    z = torch.empty_like(x)
    best = float("inf")
    for _ in range(7):
        for kind in ("out", "inplace"):
            _sync(device)
            start = time.perf_counter()
            if kind == "out":
                torch.add(x, y, alpha=0.5, out=z)
            else:
                x.add_(y, alpha=1e-9)
            _sync(device)
            best = min(best, time.perf_counter() - start)
    return 3 * 4 * numel / best / 1e9


def matmul_tflops(device: str, dtype: torch.dtype, size: int = 1024) -> float:
    """Matmul throughput (TFLOP/s) in ``dtype``: the best of a few ``size``-square products."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def newton_schulz_flops(shapes: list[torch.Size], steps: int = 5) -> float:
    """FLOPs of Muon's quintic Newton-Schulz iteration over matrices of ``shapes``.

    Per step on an ``m x n`` matrix (``m <= n`` after the transpose): ``X X^T``
    (``2 m^2 n``), ``A A`` (``2 m^3``) and ``B X`` (``2 m^2 n``).
    """
    total = 0.0
    for shape in shapes:
        m, n = sorted((int(shape[0]), int(shape[1])))
        total += steps * (4.0 * m * m * n + 2.0 * m**3)
    return total


def _torch_step(name: str, params: list[torch.Tensor], variant: str) -> Callable[[], None] | None:
    import optorch
    from optorch.interop.convert import torch_hyperparameters

    cls_name = _TWINS.get(name, "")
    if not cls_name:
        return None
    cls = getattr(torch.optim, cls_name)
    config = optorch.get_optimizer(name, **_OPTORCH_KW.get(name, {})).config
    kwargs = torch_hyperparameters(name, config)
    extra: dict[str, Any] = {}
    if variant == "forloop":
        extra["foreach"] = False
    elif variant == "foreach":
        extra["foreach"] = True
    elif variant == "fused":
        extra["fused"] = True
    if name == "muon" and variant != "forloop":
        return None  # torch.optim.Muon has one implementation, a loop over params
    if name == "muon":
        extra.pop("foreach", None)
    tensors = [p.clone().requires_grad_() for p in params]
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


#: The bench's own impls: an optorch impl replayed as CUDA graphs (optorch.graphs).
GRAPHED = {"graphed": "compiled", "graphed-foreach": "foreach"}


def _optorch_step(name: str, params: list[torch.Tensor], impl: str) -> Callable[[], None]:
    import optorch
    from optorch import graphs

    kwargs = dict(_OPTORCH_KW.get(name, {}))
    opt = optorch.get_optimizer(name, impl=GRAPHED.get(impl, impl), **kwargs)
    tensors = [p.clone() for p in params]
    grads = [torch.randn_like(t) * 1e-3 for t in tensors]
    box = {"state": opt.init(tensors)}

    def step() -> None:
        with graphs.enabled(impl in GRAPHED):
            _, box["state"] = opt.step(tensors, grads, box["state"])

    return step


#: One count's cold first compiled step, run in a child process (argv: count, device).
_COMPILE_CHILD = r"""
import sys, time, torch, optorch
from optorch import engine
count, device, threads = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
# every tensor through the compiled kernel: tensors this small would take the foreach path
engine.COMPILED_MIN_NUMEL = 2
params = [torch.randn(1024 + 16 * i, device=device) for i in range(count)]
grads = [torch.randn_like(p) for p in params]
opt = optorch.get_optimizer("adamw", impl="compiled", weight_decay=0.01)
state = opt.init(params)
start = time.perf_counter()
opt.step(params, grads, state)
if device.startswith("cuda"):
    torch.cuda.synchronize()
elapsed = time.perf_counter() - start
if not engine._COMPILED:
    raise SystemExit("the compiled kernel was not used")
print(elapsed)
"""


def _compile_scaling(device: str) -> dict[str, float]:
    """First-step time of compiled AdamW for 100 and 1,000 tensors, each in a fresh
    process with a fresh inductor cache, so that each compiles from nothing (in one
    process the second count reused the first's kernels from inductor's caches and read
    0.7 s for 11.9 s), every tensor through the compiled kernel."""
    import subprocess
    import sys
    import tempfile

    result: dict[str, float] = {}
    for count in (100, 1000):
        with tempfile.TemporaryDirectory(prefix="optorch-compile-") as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            arguments = [str(count), device, str(torch.get_num_threads())]
            done = subprocess.run(
                [sys.executable, "-c", _COMPILE_CHILD, *arguments],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"--compile-scaling: the {count}-tensor run failed: {last}")
        result[f"compile_first_step_s_{count}"] = float(done.stdout.split()[-1])
    return result


def _floor_ms(
    name: str, params: list[torch.Tensor], bandwidth: float, device: str, cache: dict[str, float]
) -> tuple[float, str]:
    """The least time a step of ``name`` can take here, and what bounds it."""
    units, _ = TRAFFIC.get(name, _DEFAULT_TRAFFIC)
    itemsize = params[0].element_size() if params else 4
    numel = sum(p.numel() for p in params)
    traffic = numel * units
    described = f"{units} units of memory traffic"
    if name == "adafactor":
        # 0-d and 1-d params keep a full-size second moment: 8 units, not 6
        vectors = sum(p.numel() for p in params if p.dim() < 2)
        traffic += vectors * (ADAFACTOR_VECTOR_UNITS - units)
        if vectors:
            described = (
                f"{units} units of memory traffic ({ADAFACTOR_VECTOR_UNITS} for the "
                f"{vectors / numel:.0%} of elements in vectors)"
            )
    memory_ms = traffic * itemsize / (bandwidth * 1e9) * 1e3
    if name != "muon":
        return memory_ms, described
    if "bf16_tflops" not in cache:
        cache["bf16_tflops"] = matmul_tflops(device, torch.bfloat16)
    flops = newton_schulz_flops([p.shape for p in params])
    compute_ms = flops / (cache["bf16_tflops"] * 1e12) * 1e3
    if compute_ms > memory_ms:
        return compute_ms, f"bf16 matmuls at {cache['bf16_tflops']:.2f} TFLOP/s"
    return memory_ms, f"{units} units of memory traffic"


def run(args: argparse.Namespace) -> int:
    from optorch.cli import output_folder

    names, impls, sets = _checked_arguments(args)
    out = output_folder(args.out)
    torch.set_num_threads(args.threads)
    device = args.device
    bandwidth = bandwidth_gbs(device)
    cache: dict[str, float] = {}
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
            own = [p for p in params if p.dim() == 2] if name == "muon" else params
            if not own:
                print(f"\n{name}: skipped, the set has no 2-D params (Muon takes matrices)")
                continue
            floor_ms, bound = _floor_ms(name, own, bandwidth, device, cache)
            variants: list[tuple[str, Callable[[], None]]] = []
            for variant in ("forloop", "foreach", "fused"):
                step = _torch_step(name, own, variant)
                if step is not None:
                    variants.append((f"torch-{variant}", step))
            variants += [(impl, _optorch_step(name, own, impl)) for impl in impls]
            prepared = [_prepare(step, args.warmup, device) for _, step in variants]
            medians = _round_robin([step for _, step in variants], args.steps, device)
            measured = [
                Row(set_name, name, label, median, first, peak, floor_ms=floor_ms)
                for (label, _), (first, peak), median in zip(
                    variants, prepared, medians, strict=True
                )
            ]
            del variants
            baseline = next((r for r in measured if r.impl == "torch-foreach"), None) or next(
                (r for r in measured if r.impl == "torch-forloop"), None
            )
            for row in measured:
                row.vs_torch_foreach = row.median_ms / baseline.median_ms if baseline else None
                row.vs_floor = row.median_ms / floor_ms
            rows.extend(measured)
            own_mb = sum(p.numel() * p.element_size() for p in own) / 2**20
            _print_table(name, measured, floor_ms, bound, own_mb)
    extra = _compile_scaling(device) if args.compile_scaling else {}
    if extra:
        print("\ncompile scaling:", {k: round(v, 2) for k, v in extra.items()})
    _write(out, rows, bandwidth, device_name, extra)
    return 0


#: the param sets of :func:`param_set`
SETS = ("gpt", "small", "tiny")


def _checked_arguments(args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """Every argument checked before any work (``ValueError`` naming the flag); the
    optimizer names, impls and sets, as lists."""
    import optorch
    from optorch.base import IMPLS

    for flag, value, least in (("steps", args.steps, 1), ("warmup", args.warmup, 0)):
        if value < least:
            raise ValueError(f"Invalid --{flag}: {value} (must be >= {least})")
    if args.threads < 1:
        raise ValueError(f"Invalid --threads: {args.threads} (must be >= 1)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"Invalid --device: {args.device!r} (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Invalid --device: {args.device!r} (cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    known = sorted(optorch.REGISTRY)
    names = known if args.optimizers == "all" else _listed("optimizers", args.optimizers, known)
    impls = _listed("impls", args.impls, [*(i for i in IMPLS if i != "auto"), *GRAPHED])
    graphed = [i for i in impls if i in GRAPHED]
    if graphed and device.type != "cuda":
        raise ValueError(f"Invalid --impls: {graphed[0]!r} (CUDA graphs) needs --device cuda")
    sets = _listed("sets", args.sets, list(SETS))
    return names, impls, sets


def _listed(flag: str, text: str, known: list[str]) -> list[str]:
    """A comma-separated flag value as a list of known names (no empty ones)."""
    items = [item.strip() for item in text.split(",")]
    for index, item in enumerate(items):
        if item not in known:
            what = "an empty name" if not item else repr(item)
            raise ValueError(f"Invalid --{flag}: {what} in {text!r} (choose from {known})")
        if item in items[:index]:
            raise ValueError(f"Invalid --{flag}: {item!r} is listed twice in {text!r}")
    return items


def _print_table(name: str, rows: list[Row], floor_ms: float, bound: str, param_mb: float) -> None:
    base = "torch-foreach" if any(r.impl == "torch-foreach" for r in rows) else "torch-forloop"
    has_base = any(r.impl == base for r in rows)
    print(f"  {name}: floor {floor_ms:.1f} ms ({bound}); params {param_mb:.0f} MB")
    header = f"x {base}" if has_base else "x torch"
    print(
        f"  {'impl':<16}{'median ms':>11}{'first ms':>11}{header:>17}{'x floor':>9}"
        f"{'peak extra MB':>15}"
    )
    for r in rows:
        ratio = f"{r.vs_torch_foreach:.2f}" if r.vs_torch_foreach is not None else "-"
        print(
            f"  {r.impl:<16}{r.median_ms:>11.1f}{r.first_ms:>11.0f}{ratio:>17}"
            f"{r.vs_floor or 0:>9.2f}{r.peak_extra_mb:>15.0f}"
        )


def markdown(rows: list[Row], bandwidth: float, device: str) -> str:
    """The rows as markdown tables, one per param set (what docs and README quote)."""
    lines = [f"{device}; torch {torch.__version__}; streaming bandwidth {bandwidth:.1f} GB/s"]
    for set_name in dict.fromkeys(r.set for r in rows):
        lines += [
            "",
            f"Set `{set_name}`; median ms per step (variants timed in turns):",
            "",
            "| optimizer | impl | ms | x torch | x floor | floor ms | first step s "
            "| peak extra MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.set != set_name:
                continue
            ratio = "-" if r.vs_torch_foreach is None else f"{r.vs_torch_foreach:.2f}"
            floor = "-" if r.floor_ms is None else f"{r.floor_ms:.1f}"
            lines.append(
                f"| {r.optimizer} | {r.impl} | {r.median_ms:.1f} | {ratio} | "
                f"{r.vs_floor or 0:.2f} | {floor} | {r.first_ms / 1e3:.1f} | "
                f"{r.peak_extra_mb:.0f} |"
            )
    lines += [
        "",
        "x torch: to torch.optim's foreach step (its for-loop where it has no foreach).",
        "",
    ]
    return "\n".join(lines)


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
    (out / "bench.md").write_text(markdown(rows, bandwidth, device))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a demo extra
        print("bench.png not written: matplotlib is not installed (pip install 'optorch[demo]')")
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
