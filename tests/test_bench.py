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


def test_adafactor_floor_counts_vectors_at_their_full_size_moment() -> None:
    """A matrix's factored moment makes 6 units; a vector's full-size one 8."""
    bandwidth = 10.0  # GB/s
    unit_ms = 1e6 * 4 / 10e9 * 1e3  # one read or write of a million float32 elements
    matrix, vector = [torch.zeros(1000, 1000)], [torch.zeros(1_000_000)]
    floor, _ = bench._floor_ms("adafactor", matrix, bandwidth, "cpu", {})
    assert floor == pytest.approx(6 * unit_ms)
    floor, bound = bench._floor_ms("adafactor", vector, bandwidth, "cpu", {})
    assert floor == pytest.approx(8 * unit_ms) and "100% of elements in vectors" in bound
    floor, _ = bench._floor_ms("adafactor", matrix + vector, bandwidth, "cpu", {})
    assert floor == pytest.approx(14 * unit_ms)


def test_muon_on_a_set_without_matrices_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The set's other optimizers are measured and written (a 0 ms floor crashed the run
    after the fact, losing every result)."""
    vectors = [torch.randn(64) for _ in range(4)]
    monkeypatch.setattr(bench, "param_set", lambda name, **kwargs: vectors)
    argv = ["bench", "--sets", "tiny", "--optimizers", "sgd,muon", "--impls", "foreach"]
    argv += ["--steps", "1", "--warmup", "0", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "muon: skipped, the set has no 2-D params" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert {r["optimizer"] for r in rows} == {"sgd"}


def test_peak_extra_memory_sees_temporaries_in_reused_memory() -> None:
    """2,000 small temporaries alive at once, in memory an earlier step freed: the
    resident size rises by their size (it read 0 MB before the allocator's free pages
    were handed back)."""
    tensors = [torch.randn(4096) for _ in range(2000)]
    temporaries_mb = sum(t.numel() * 4 for t in tensors) / 2**20

    def step() -> None:
        temps = torch._foreach_mul(tensors, 2.0)
        torch._foreach_add_(temps, 1.0)

    _, peak = bench._prepare(step, 2, "cpu")
    if math.isnan(peak):
        pytest.skip("this kernel lets no process reset its peak resident size")
    assert 0.8 * temporaries_mb <= peak <= 1.5 * temporaries_mb


@pytest.mark.parametrize("name", sorted(bench._TWINS))
def test_torch_twins_are_timed_with_the_optorch_optimizers_hyperparameters(name: str) -> None:
    """RMSprop, Adamax and NAdam's twins ran at lr 1e-3 against optorch's 1e-2 and 2e-3."""
    params = [torch.randn(8, 6), torch.randn(6, 4)]
    step = bench._torch_step(name, params, "forloop")
    assert step is not None
    group = step.__self__.param_groups[0]  # type: ignore[attr-defined]
    config = optorch.get_optimizer(name, **bench._OPTORCH_KW.get(name, {})).config
    assert group["lr"] == config.max_lr
    for key in ("betas", "eps", "weight_decay", "momentum", "alpha", "nesterov", "lr_decay"):
        if key in group and hasattr(config, key):
            assert group[key] == getattr(config, key), key


def test_a_name_listed_twice_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """It was timed twice and printed as two rows with the same label."""
    assert (
        main(["bench", "--sets", "tiny", "--optimizers", "sgd,sgd", "--out", "/nonexistent"]) == 2
    )
    assert "Invalid --optimizers: 'sgd' is listed twice" in capsys.readouterr().err


def test_compile_scaling_compiles_each_count_in_a_fresh_process_and_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In one process the 1,000-tensor step reused the 100-tensor step's kernels from
    inductor's caches (0.7 s measured for a cold 11.9 s)."""
    import subprocess

    seen: list[tuple[str, str]] = []

    def fake_run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        env = kwargs["env"]
        assert isinstance(env, dict)
        seen.append((command[3], env["TORCHINDUCTOR_CACHE_DIR"]))
        return subprocess.CompletedProcess(command, 0, stdout="1.5\n", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_run)
    result = bench._compile_scaling("cpu")
    assert result == {"compile_first_step_s_100": 1.5, "compile_first_step_s_1000": 1.5}
    assert [count for count, _ in seen] == ["100", "1000"]
    assert seen[0][1] != seen[1][1]
