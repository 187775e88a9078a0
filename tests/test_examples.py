"""The examples run as scripts and print what they claim; the docs' code blocks run.

Each example runs in a subprocess with ``--small`` (the same code path with tiny sizes),
as a user would run it; its output is parsed and checked against its claim: the learned
learning rate lowers the validation loss, each ensemble member trained in one vmapped
call equals the same model trained alone, the compiled step has one graph, no graph
break, and follows the eager trajectory.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOC = ROOT / "docs" / "torch_func.md"


def run_example(name: str, *args: str, timeout: float = 300.0) -> str:
    """Run ``examples/<name>`` with the interpreter running the tests; return stdout."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )
    assert completed.returncode == 0, (
        f"{name} {' '.join(args)} exited with {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr[-4000:]}"
    )
    return completed.stdout


def floats(pattern: str, text: str) -> list[float]:
    """Every number the groups of ``pattern`` capture in ``text``, in order."""
    found: list[float] = []
    for match in re.finditer(pattern, text):
        found.extend(float(group) for group in match.groups())
    return found


def test_hypergradient_example_learns_a_better_learning_rate() -> None:
    out = run_example("hypergradient.py", "--small", "--outer-steps", "3", "--inner-steps", "4")
    lrs = floats(r"outer +\d+ +lr ([0-9.]+)", out)
    val_losses = floats(r"val loss ([0-9.]+) +d val", out)
    assert len(lrs) == len(val_losses) == 4, out  # the start, then one line per outer step
    summary = re.search(
        r"learned lr ([0-9.]+) \(from ([0-9.]+)\): val loss ([0-9.]+) -> ([0-9.]+)", out
    )
    assert summary is not None, out
    learned, initial, loss_before, loss_after = map(float, summary.groups())
    assert (initial, learned) == (lrs[0], lrs[-1])
    assert learned != initial, out
    assert loss_after < loss_before, out
    assert (loss_before, loss_after) == (val_losses[0], val_losses[-1])


def test_ensemble_example_trains_every_model_with_its_own_lr() -> None:
    out = run_example("ensemble.py", "--small", "--optimizer", "lion", "--check")
    rows = re.findall(r"^ *([0-9.e+-]+) +([0-9.]+) +([0-9.]+)$", out, flags=re.MULTILINE)
    assert len(rows) == 8, out
    lrs = [float(row[0]) for row in rows]
    assert lrs == sorted(lrs) and len(set(lrs)) == 8, out  # 8 distinct learning rates
    val_losses = [float(row[2]) for row in rows]
    assert len(set(val_losses)) == 8, out  # ... that led to 8 different models
    assert "state step counts [30]" in out, out
    difference = floats(r"trained alone differs by at most ([0-9.e+-]+)", out)
    assert len(difference) == 1 and difference[0] < 1e-5, out


def test_compiled_train_step_example_has_one_graph_and_follows_eager() -> None:
    out = run_example(
        "compiled_train_step.py", "--small", "--backend", "aot_eager", "--loss-scaling"
    )
    assert "graphs compiled: 1, graph breaks: 0, recompiles: 0" in out, out
    params_difference, loss_difference = floats(
        r"params ([0-9.e+-]+) after \d+ steps, losses ([0-9.e+-]+)", out
    )
    assert params_difference < 1e-5 and loss_difference < 1e-5, out
    first, last = floats(r"loss ([0-9.]+) -> ([0-9.]+); optimizer step count 20", out)
    assert last < first, out


# --------------------------------------------------------------------------------------
# docs/torch_func.md: its code blocks run as written
# --------------------------------------------------------------------------------------


def test_torch_func_doc_examples_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 4, f"{DOC} lost its examples"
    # the graphs are what the examples show; inductor's code generation is too slow here
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    namespace: dict[str, object] = {"__name__": "torch_func_doc"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert re.search(r"d validation loss / d lr: tensor\(-?[0-9.]+\)", printed), printed
    assert "step counts: tensor([20, 20, 20, 20])" in printed, printed
    assert "20 compiled steps, no graph break, one graph" in printed, printed
    assert "an in-place step cannot run on tensors traced by a torch.func transform" in printed
