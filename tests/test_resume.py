"""Resume exactness: stop at step N, save, load in a fresh process, continue.

For every registered optimizer and for wrappers (accumulation stopped mid-cycle, EMA,
lookahead, a schedule, injected hyperparameters, a partition) and the loss scaler, the
run resumed in a new Python process must end bit-identical (``torch.equal``, params and
every state leaf) to the run that never stopped. All cases share one subprocess (each
``import torch`` costs seconds); both sides run with one thread so that reductions add
in the same order.

The resumed process rebuilds the optimizer from the checkpoint alone
(:func:`optorch.interop.load_optimizer`), restores the params into freshly initialised
tensors of different values, and writes its final params and state to a checkpoint that
this process compares.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_trees_equal, make_grads, make_params

import optorch
from optorch import amp, wrappers
from optorch.interop import checkpoint
from optorch.schedule import LRSchedulerConfig, build_lr_scheduler

TESTS = Path(__file__).resolve().parent
SHAPES = {"layer.weight": (4, 3), "layer.bias": (4,), "gain": ()}
MATRICES = {"a.weight": (4, 3), "b.weight": (3, 3)}


def half(step: Any) -> float:
    """A schedule optorch cannot record (a plain function): passed again on resume."""
    return 0.5


@dataclass
class Case:
    name: str
    build: Callable[[], Any]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(SHAPES))
    before: int = 3  # steps before the checkpoint
    after: int = 4  # steps after it
    scaler: bool = False  # steps through optorch.amp.scaled_step
    nonfinite_at: tuple[int, ...] = ()  # steps whose gradients hold an inf
    callables: dict[str, Any] = field(default_factory=dict)


def _cosine() -> Any:
    return build_lr_scheduler(
        LRSchedulerConfig(warmup_steps=2, total_steps=6, scheduler_type="cosine")
    )


def _muon_label(path: str, p: torch.Tensor) -> str:
    return "muon" if p.ndim == 2 else "adamw"


CASES: list[Case] = [
    Case(
        name, lambda name=name: optorch.get_optimizer(name), MATRICES if name == "muon" else SHAPES
    )
    for name in sorted(optorch.REGISTRY)
] + [
    Case(
        "accumulate mid-cycle",
        lambda: wrappers.accumulate(optorch.get_optimizer("adamw"), every=3),
        before=4,
    ),
    Case(
        "ema warmup",
        lambda: wrappers.ema(optorch.get_optimizer("sgd", momentum=0.9), 0.9, warmup=True),
    ),
    Case(
        "lookahead mid-period",
        lambda: wrappers.lookahead(optorch.get_optimizer("radam"), sync_period=3),
        before=2,
    ),
    Case(
        "schedule + clip + decay mask",
        lambda: wrappers.chain(
            wrappers.clip_by_global_norm(0.5),
            wrappers.decay_mask(
                optorch.get_optimizer("adamw", max_lr=1e-2, weight_decay=0.1, schedule=_cosine())
            ),
        ),
    ),
    Case(
        "unrecorded schedule",
        lambda: optorch.get_optimizer("lion", schedule=half),
        callables={"schedule": half},
    ),
    Case(
        "inject hyperparams + add_noise",
        lambda: wrappers.chain(
            wrappers.add_noise(0.01, seed=5),
            wrappers.inject_hyperparams(optorch.get_optimizer("nadam"), names=["max_lr", "betas"]),
        ),
    ),
    Case(
        "partition muon/adamw",
        lambda: wrappers.partition(
            _muon_label,
            {"muon": optorch.get_optimizer("muon"), "adamw": optorch.get_optimizer("adamw")},
        ),
    ),
    Case("scaler", lambda: optorch.get_optimizer("adamw"), scaler=True, nonfinite_at=(1, 5)),
    Case(
        "scaler + skip_nonfinite + accumulate",
        lambda: wrappers.skip_nonfinite(
            wrappers.accumulate(optorch.get_optimizer("lamb"), every=2)
        ),
        scaler=True,
        nonfinite_at=(2,),
        before=3,
    ),
]
CASES_BY_NAME = {case.name: case for case in CASES}


def grads_at(case: Case, step: int, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = make_grads(10_000 + step, params)
    if case.scaler:
        grads = {k: g * 256.0 for k, g in grads.items()}  # "scaled" gradients
    if step in case.nonfinite_at:
        first = next(iter(grads))
        grads[first] = (
            grads[first]
            .clone()
            .reshape(-1)
            .index_fill(0, torch.tensor([0]), float("inf"))
            .reshape(grads[first].shape)
        )
    return grads


def advance(
    case: Case, opt: Any, params: Any, state: Any, scaler: Any, steps: range
) -> tuple[Any, Any, Any]:
    for step in steps:
        grads = grads_at(case, step, params)
        if case.scaler:
            out = amp.scaled_step(opt, params, grads, state, scaler)
            params, state, scaler = out.params, out.opt_state, out.scaler_state
        else:
            params, state = opt.step(params, grads, state)
    return params, state, scaler


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def resume_main(manifest_path: str) -> None:
    """The fresh process: load each checkpoint, continue, write the result."""
    torch.set_num_threads(1)
    manifest = json.loads(Path(manifest_path).read_text())
    for item in manifest:
        case = CASES_BY_NAME[item["name"]]
        fresh = make_params(99, shapes=case.shapes)  # other values: restored from the file
        loaded = checkpoint.load_checkpoint(
            item["checkpoint"], params=fresh, restore_params=True, callables=case.callables
        )
        scaler = loaded.extra["scaler"] if case.scaler else None
        params, state, scaler = advance(
            case,
            loaded.optimizer,
            loaded.params,
            loaded.state,
            scaler,
            range(case.before, case.before + case.after),
        )
        checkpoint.save(
            item["result"], state, params=params, extra={"scaler": scaler}, format="torch"
        )


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Any, Any]]]:
    """Per case: (the uninterrupted final (params, state, scaler), the resumed one)."""
    folder = tmp_path_factory.mktemp("resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected: dict[str, Any] = {}
        manifest = []
        for case in CASES:
            opt = case.build()
            params = make_params(7, shapes=case.shapes)
            state = opt.init(params)
            scaler = (
                amp.init_grad_scaler(init_scale=256.0, growth_interval=2) if case.scaler else None
            )
            params, state, scaler = advance(case, opt, params, state, scaler, range(case.before))
            path = folder / f"{_slug(case.name)}.safetensors"
            checkpoint.save(path, state, optimizer=opt, params=params, extra={"scaler": scaler})
            params, state, scaler = advance(
                case, opt, params, state, scaler, range(case.before, case.before + case.after)
            )
            expected[case.name] = (params, state, scaler)
            manifest.append(
                {
                    "name": case.name,
                    "checkpoint": str(path),
                    "result": str(folder / f"{_slug(case.name)}.out.pt"),
                }
            )
        manifest_path = folder / "manifest.json"
        manifest_path.write_text(json.dumps(manifest))
        code = (
            f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_resume; "
            f"test_resume.resume_main({str(manifest_path)!r})"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, f"resumed process failed:\n{done.stderr[-4000:]}"
        results = {}
        for item in manifest:
            out = checkpoint.load_checkpoint(item["result"])
            results[item["name"]] = (
                expected[item["name"]],
                (out.params, out.state, out.extra["scaler"]),
            )
        yield results
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_resumed_run_is_bit_identical(resumed: dict[str, tuple[Any, Any]], name: str) -> None:
    (params, state, scaler), (params_r, state_r, scaler_r) = resumed[name]
    assert_trees_equal(params_r, params, what=f"{name}: params")
    assert_trees_equal(state_r, state, what=f"{name}: state")
    assert_trees_equal(scaler_r, scaler, what=f"{name}: scaler")


def test_cases_really_resume_mid_way() -> None:
    """The table must exercise what it claims: a skipped step, a partial cycle."""
    case = CASES_BY_NAME["accumulate mid-cycle"]
    assert case.before % 3 != 0
    assert any(
        step < CASES_BY_NAME["scaler"].before for step in CASES_BY_NAME["scaler"].nonfinite_at
    )
    assert any(
        step >= CASES_BY_NAME["scaler"].before for step in CASES_BY_NAME["scaler"].nonfinite_at
    )
    assert {c.name for c in CASES} >= set(optorch.REGISTRY)
