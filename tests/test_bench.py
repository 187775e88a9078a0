"""``optorch bench`` end to end on the tiny set, and its floors.

Timings are never asserted (machines here are shared and noisy); what is checked is
that every variant runs, that ratios are computed against the right baseline, that the
outputs are written, and that the floors follow their definitions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import optorch
from optorch import bench
from optorch.cli import main


def test_bench_runs_every_variant_and_writes_its_outputs(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--sets",
        "tiny",
        "--optimizers",
        "adamw,lamb,muon",
        "--impls",
        "reference,foreach",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    payload = json.loads((out / "bench.json").read_text())
    rows = {(r["optimizer"], r["impl"]): r for r in payload["rows"]}
    assert {impl for name, impl in rows if name == "adamw"} == {
        "torch-forloop",
        "torch-foreach",
        "torch-fused",
        "reference",
        "foreach",
    }
    # torch.optim.Muon has only a loop: it is the baseline; LAMB has no torch twin
    assert {impl for name, impl in rows if name == "muon"} == {
        "torch-forloop",
        "reference",
        "foreach",
    }
    assert rows[("muon", "torch-forloop")]["vs_torch_foreach"] == pytest.approx(1.0)
    assert rows[("lamb", "foreach")]["vs_torch_foreach"] is None
    adamw = rows[("adamw", "foreach")]
    assert adamw["vs_torch_foreach"] == pytest.approx(
        adamw["median_ms"] / rows[("adamw", "torch-foreach")]["median_ms"]
    )
    assert adamw["vs_floor"] == pytest.approx(adamw["median_ms"] / adamw["floor_ms"])
    assert (out / "bench.csv").read_text().startswith("set,optimizer,impl")
    table = (out / "bench.md").read_text()
    assert "| adamw | torch-foreach |" in table and "| lamb | foreach |" in table


def test_every_registry_optimizer_has_a_traffic_count() -> None:
    assert set(optorch.REGISTRY) <= set(bench.TRAFFIC)
    assert all(units >= 5 for units, _ in bench.TRAFFIC.values())


def test_newton_schulz_flops_follow_the_iteration() -> None:
    # one 2 x 3 matrix, one step: X X^T (2*2*2*3) + A A (2*2^3) + B X (2*2*2*3)
    assert bench.newton_schulz_flops([torch.Size([2, 3])], steps=1) == 24 + 16 + 24
    # a tall matrix is transposed first: the same count
    assert bench.newton_schulz_flops([torch.Size([3, 2])], steps=1) == 64


def test_floor_is_the_larger_of_memory_and_matmul_time() -> None:
    params = [torch.zeros(1000, 1000)]
    bandwidth = 10.0  # GB/s
    memory_ms = 1e6 * 4 * 5 / 10e9 * 1e3
    slow_matmuls = {"bf16_tflops": 1e-3}
    floor, bound = bench._floor_ms("muon", params, bandwidth, "cpu", slow_matmuls)
    assert floor == pytest.approx(bench.newton_schulz_flops([params[0].shape]) / 1e9 * 1e3)
    assert "matmul" in bound
    fast_matmuls = {"bf16_tflops": 1e9}
    floor, bound = bench._floor_ms("muon", params, bandwidth, "cpu", fast_matmuls)
    assert floor == pytest.approx(memory_ms)
    floor, _ = bench._floor_ms("lamb", params, bandwidth, "cpu", {})
    assert floor == pytest.approx(memory_ms * 10 / 5)
    assert math.isfinite(bench.bandwidth_gbs("cpu", numel=1 << 12))
