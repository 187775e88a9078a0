"""The demo's outputs: the table on stdout and the files in the output folder.

* ``metrics.csv``: one row per (optimizer, step); see ``docs/demo.md`` for the columns;
* ``loss_curves.png``: training loss per step (smoothed) and validation loss, per optimizer;
* ``samples.txt``: the text each trained model generates from the same prompt;
* ``report.md``: the settings, the table, the baseline, the torch comparison, the samples;
* ``summary.json``: the table's numbers, machine-readable.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .train import RunResult

__all__ = ["Comparison", "compare", "format_table", "write_outputs"]

#: Agreement demanded of an optorch run and its torch.optim twin (float32 rounding that
#: training amplifies over a few hundred steps stays far below this).
COMPARE_RTOL = 1e-5
COMPARE_ATOL = 1e-5
#: Under float16/bfloat16 autocast: a float32-rounding difference in a weight (SGD's
#: one-rounding momentum update, say) can move a half-precision activation by one of
#: its roundings (2**-11 relative in float16), so the losses agree to about 1e-4, still
#: ten times finer than one float16 rounding.
COMPARE_TOLERANCE = {
    "fp32": (COMPARE_ATOL, COMPARE_RTOL),
    "fp16": (1e-4, 1e-4),
    "bf16": (1e-4, 1e-4),
}


def tolerance_text(atol: float, rtol: float) -> str:
    return f"every step's loss within {atol:g} + {rtol:g} x |loss|"


#: Column order of metrics.csv before the optimizer-specific state statistics.
BASE_COLUMNS = (
    "optimizer",
    "impl",
    "step",
    "tokens",
    "train_loss",
    "val_loss",
    "grad_norm",
    "param_norm",
    "opt_step_ms",
    "loss_scale",
    "skipped",
)


@dataclass
class Comparison:
    """An optorch run against its torch.optim twin (or the reason there is none)."""

    name: str
    twin: str  # e.g. "torch.optim.AdamW", or why there is no twin
    max_loss_diff: float = math.nan  # max over steps of |loss_optorch - loss_torch|
    max_rel_loss_diff: float = math.nan
    max_param_diff: float = math.nan  # max over all final param elements
    val_loss_diff: float = math.nan
    ok: bool | None = None  # None: no twin
    atol: float = COMPARE_ATOL
    rtol: float = COMPARE_RTOL

    @property
    def has_twin(self) -> bool:
        return self.ok is not None


def _difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|``, 0 where both are the same non-finite value (two runs that diverged
    identically agree), inf where only one is non-finite."""
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, torch.zeros_like(a), (a - b).abs().nan_to_num(nan=math.inf))


def compare(
    ours: RunResult, theirs: RunResult | str, twin_description: str, precision: str = "fp32"
) -> Comparison:
    """Loss curves and final params of two runs, element by element, at the agreement
    :data:`COMPARE_TOLERANCE` demands for ``precision``."""
    atol, rtol = COMPARE_TOLERANCE[precision]
    if isinstance(theirs, str):
        return Comparison(ours.name, theirs, atol=atol, rtol=rtol)
    mine = torch.tensor(ours.losses, dtype=torch.float64)
    other = torch.tensor(theirs.losses, dtype=torch.float64)
    loss_diff = _difference(mine, other)
    param_diff = max(
        float(_difference(ours.final_params[k].double(), theirs.final_params[k].double()).max())
        for k in ours.final_params
    )
    within = bool((loss_diff <= atol + rtol * other.abs().nan_to_num()).all())
    return Comparison(
        ours.name,
        twin_description,
        max_loss_diff=float(loss_diff.max()),
        max_rel_loss_diff=float(
            (loss_diff / other.abs().nan_to_num(nan=1.0).clamp_min(1e-12)).max()
        ),
        max_param_diff=param_diff,
        val_loss_diff=abs(ours.final_val_loss - theirs.final_val_loss),
        ok=within and math.isfinite(param_diff),
        atol=atol,
        rtol=rtol,
    )


# --------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------


def _cell(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool) -> str:
    if markdown:

        def line(cells: Sequence[str]) -> str:
            # a "|" inside a cell ("max |d loss|") would end it: escaped
            return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

        lines = [line(header), "|" + "|".join("---" for _ in header) + "|"]
        lines += [line(row) for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    out = [
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    out.append("  ".join("-" * w for w in widths))
    for row in rows:
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(out)


def results_table(
    results: Sequence[RunResult], baseline: float, memory_label: str, *, markdown: bool = False
) -> str:
    header = [
        "optimizer",
        "train loss",
        "val loss",
        "val - unigram",
        "tokens/s",
        "ms/opt step",
        memory_label,
        "state MiB",
    ]
    rows = [
        [
            r.name,
            _cell(r.final_train_loss),
            _cell(r.final_val_loss),
            _cell(r.final_val_loss - baseline),
            _cell(r.tokens_per_s, 0),
            _cell(r.opt_step_ms, 2),
            _cell(r.peak_mem_mib, 1),
            _cell(r.state_mib, 2),
        ]
        for r in results
    ]
    return _table(header, rows, markdown=markdown)


def comparison_table(comparisons: Sequence[Comparison], *, markdown: bool = False) -> str:
    header = ["optimizer", "torch twin", "max |d loss|", "max rel d loss", "max |d param|", "match"]
    rows = []
    for c in comparisons:
        if not c.has_twin:
            rows.append([c.name, c.twin, "-", "-", "-", "no torch twin"])
            continue
        rows.append(
            [
                c.name,
                c.twin,
                f"{c.max_loss_diff:.2e}",
                f"{c.max_rel_loss_diff:.2e}",
                f"{c.max_param_diff:.2e}",
                "yes" if c.ok else "NO",
            ]
        )
    return _table(header, rows, markdown=markdown)


def _finite_or_none(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts and lists) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def format_table(
    results: Sequence[RunResult],
    baseline: float,
    memory_label: str,
    comparisons: Sequence[Comparison] = (),
) -> str:
    """The text printed at the end of a run."""
    parts = [results_table(results, baseline, memory_label)]
    parts.append(f"unigram baseline (validation cross-entropy, nats/char): {baseline:.3f}")
    ours = [r for r in results if r.kind == "optorch"]
    below = [r for r in ours if math.isfinite(r.final_val_loss)]
    if ours and not below:
        parts.append("best: none (every optimizer's validation loss is not finite)")
    if below:
        best = min(below, key=lambda r: r.final_val_loss)
        gap = baseline - best.final_val_loss
        verdict = (
            f"{gap:.3f} below the unigram baseline"
            if gap > 0
            else f"{-gap:.3f} above the unigram baseline (not beaten: train longer)"
        )
        parts.append(f"best: {best.name} at {best.final_val_loss:.3f} nats/char, {verdict}")
    if comparisons:
        parts.append("")
        first = comparisons[0]
        parts.append(f"optorch vs torch.optim (match: {tolerance_text(first.atol, first.rtol)}):")
        parts.append(comparison_table(comparisons))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------


def write_csv(path: Path, results: Sequence[RunResult]) -> None:
    columns = list(BASE_COLUMNS)
    for result in results:
        for row in result.rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for result in results:
            for row in result.rows:
                writer.writerow(
                    {k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()}
                )


def _smoothed(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with bias correction (no lag at the start)."""
    decay = 1.0 - 2.0 / (span + 1)
    out, average, weight = [], 0.0, 0.0
    for value in values:
        average = decay * average + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        out.append(average / weight)
    return out


def write_plot(path: Path, results: Sequence[RunResult], baseline: float, steps: int) -> bool:
    """The loss curves as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, (train_axes, val_axes) = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    base_names = [r.name for r in results if r.kind == "optorch"]
    span = max(5, steps // 20)
    for result in results:
        base = result.name.removesuffix(" [torch]")
        color = colors[base_names.index(base) % len(colors)] if base in base_names else "gray"
        twin = result.kind == "torch"
        style = {"linestyle": "--", "linewidth": 1.0} if twin else {"linewidth": 1.6}
        step_numbers = list(range(1, len(result.losses) + 1))
        if not twin:
            train_axes.plot(step_numbers, result.losses, color=color, alpha=0.15, linewidth=0.8)
        train_axes.plot(
            step_numbers, _smoothed(result.losses, span), color=color, label=result.name, **style
        )
        evals = [(r["step"], r["val_loss"]) for r in result.rows if "val_loss" in r]
        val_axes.plot(
            [s for s, _ in evals],
            [v for _, v in evals],
            color=color,
            marker="x" if twin else "o",
            markersize=4,
            label=result.name,
            **style,
        )
    # a diverged run (inf, 1e5) must not squash the others: clip at the initial loss
    finite = [v for r in results for v in r.losses if math.isfinite(v)]
    first = [r.losses[0] for r in results if r.losses and math.isfinite(r.losses[0])]
    top = max(first) * 1.05 if first else None
    bottom = min([*finite, baseline]) - 0.1 if finite else None
    for axes, title in (
        (train_axes, f"training loss (minibatch; EMA over ~{span} steps)"),
        (val_axes, "validation loss"),
    ):
        axes.axhline(
            baseline, color="black", linestyle=":", linewidth=1.0, label="unigram baseline"
        )
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylabel("cross-entropy (nats/char)")
        if top is not None and bottom is not None and bottom < top:
            axes.set_ylim(bottom, top)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def write_samples(path: Path, results: Sequence[RunResult], prompt: str) -> None:
    parts = [f"prompt: {prompt!r}\n"]
    for result in results:
        parts.append(f"===== {result.name} (val loss {result.final_val_loss:.3f}) =====")
        parts.append(result.sample)
        parts.append("")
    path.write_text("\n".join(parts), encoding="utf-8")


def write_outputs(
    out: Path,
    *,
    results: Sequence[RunResult],
    comparisons: Sequence[Comparison],
    baseline: float,
    memory_label: str,
    memory_note: str,
    settings_lines: Sequence[str],
    optimizer_lines: Sequence[str],
    prompt: str,
    steps: int,
) -> list[Path]:
    """Write every output file; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    csv_path = out / "metrics.csv"
    write_csv(csv_path, results)
    files.append(csv_path)
    png_path = out / "loss_curves.png"
    if write_plot(png_path, results, baseline, steps):
        files.append(png_path)
    samples_path = out / "samples.txt"
    write_samples(samples_path, results, prompt)
    files.append(samples_path)
    summary_path = out / "summary.json"
    summary = {
        "unigram_baseline": baseline,
        "results": [
            {
                "optimizer": r.name,
                "impl": r.kind,
                "final_train_loss": r.final_train_loss,
                "final_val_loss": r.final_val_loss,
                "tokens_per_s": r.tokens_per_s,
                "opt_step_ms": r.opt_step_ms,
                "peak_mem_mib": r.peak_mem_mib,
                "state_mib": r.state_mib,
                "skipped_steps": r.skipped_steps,
            }
            for r in results
        ],
        "comparisons": [
            {
                "optimizer": c.name,
                "twin": c.twin,
                "max_loss_diff": None if not c.has_twin else c.max_loss_diff,
                "max_rel_loss_diff": None if not c.has_twin else c.max_rel_loss_diff,
                "max_param_diff": None if not c.has_twin else c.max_param_diff,
                "match": c.ok,
            }
            for c in comparisons
        ],
    }
    # strict JSON: a diverged run's NaN or inf losses as null
    summary_path.write_text(
        json.dumps(_finite_or_none(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    files.append(summary_path)
    report_path = out / "report.md"
    files.append(report_path)
    lines = ["# optorch demo report", "", "## Settings", ""]
    lines += [f"- {line}" for line in settings_lines]
    lines += ["", "## Optimizers", ""]
    lines += [f"- {line}" for line in optimizer_lines]
    lines += ["", "## Results", "", results_table(results, baseline, memory_label, markdown=True)]
    lines += [
        "",
        f"Unigram baseline (cross-entropy of the train split's character frequencies on the "
        f"validation windows): **{baseline:.3f} nats/char**. `train loss` and `val loss` are "
        "measured after training on fixed windows of each split. "
        f"{memory_note} `state MiB` is the exact size of the optimizer state tensors.",
    ]
    if comparisons:
        lines += [
            "",
            "## optorch vs torch.optim",
            "",
            "Same initial weights, batches and schedule (`LambdaLR` with the same multiplier); "
            "the twin trains through `loss.backward()` and `optimizer.step()`. A match: "
            f"{tolerance_text(comparisons[0].atol, comparisons[0].rtol)}.",
            "",
            comparison_table(comparisons, markdown=True),
        ]
    lines += ["", "## Samples", "", f"Prompt: `{prompt!r}`", ""]
    for result in results:
        lines += [f"### {result.name}", "", "```text", result.sample, "```", ""]
    lines += ["## Files", ""]
    descriptions = {
        "metrics.csv": "every step's metrics (loss, lr, norms, optimizer-state statistics)",
        "loss_curves.png": "training and validation loss curves",
        "samples.txt": "text generated by each trained model",
        "summary.json": "the numbers of the tables above",
        "report.md": "this report",
    }
    lines += [f"- `{path.name}`: {descriptions[path.name]}" for path in files]
    report_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return files
