"""``optorch demo``: end to end on a tiny model, the torch.optim twin comparison, bad
input, ``--help``, Hydra recipes, and the pieces (baseline, model, statistics).

Every run here is tiny (a 1-block, 16-wide model, a few steps) so the file stays fast.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import optorch
from optorch import cli, demo
from optorch.demo import corpus as demo_corpus
from optorch.demo import report as demo_report
from optorch.demo import settings as demo_settings
from optorch.demo import train as demo_train
from optorch.demo.model import CharTransformer, ModelConfig

REPO = Path(__file__).resolve().parents[1]

#: A tiny model and budget: seconds, not minutes.
TINY = [
    "--batch-size", "4",
    "--seq-len", "16",
    "--d-model", "16",
    "--n-layers", "1",
    "--n-heads", "2",
    "--eval-batches", "2",
    "--sample-chars", "12",
    "--threads", "1",
    "--no-progress",
]  # fmt: skip


def run_demo(argv: list[str]) -> int:
    """``optorch.demo.run`` through the demo's own argparse (no subprocess)."""
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return demo.run(parser.parse_args(argv))


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "optorch", "demo", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------


def test_cli_end_to_end_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    steps = 6
    done = run_cli(
        ["--optimizers", "adamw,sgd", "--steps", str(steps), "--eval-every", "3",
         "--warmup-steps", "2", *TINY, "--out", str(out)],
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "unigram baseline" in done.stdout
    for name in ("metrics.csv", "loss_curves.png", "samples.txt", "report.md", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = read_rows(out / "metrics.csv")
    by_optimizer: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_optimizer.setdefault(row["optimizer"], []).append(row)
    assert sorted(by_optimizer) == ["adamw", "sgd"]
    for name, state_fields in (("adamw", ("exp_avg", "exp_avg_sq")), ("sgd", ("momentum",))):
        got = by_optimizer[name]
        assert [int(r["step"]) for r in got] == list(range(steps + 1))
        assert [int(r["step"]) for r in got if r["val_loss"]] == [0, 3, 6]
        for row in got[1:]:
            for column in ("train_loss", "lr", "grad_norm", "param_norm", "opt_step_ms"):
                assert math.isfinite(float(row[column])), (name, column)
            for field in state_fields:
                assert float(row[f"{field}_norm"]) > 0.0, (name, field)
                assert math.isfinite(float(row[f"{field}_mean"]))
        # two warmup steps from 0: the lr of steps 1, 2, 3 is 0, max_lr / 2, max_lr
        lrs = [float(r["lr"]) for r in got[1:4]]
        assert lrs == [0.0, lrs[2] / 2, lrs[2]] and lrs[2] > 0.0

    summary = json.loads((out / "summary.json").read_text())
    assert [r["optimizer"] for r in summary["results"]] == ["adamw", "sgd"]
    report = (out / "report.md").read_text()
    assert "| adamw |" in report and "Unigram baseline" in report
    samples = (out / "samples.txt").read_text()
    assert "===== adamw" in samples and "===== sgd" in samples


# --------------------------------------------------------------------------------------
# --compare-torch
# --------------------------------------------------------------------------------------


#: adamw and sgd (Nesterov, weight decay) with the same warmup-cosine schedule; learning
#: rates in the stable range of the tiny model, where float32 rounding is not amplified
COMPARE_RECIPE = """
schedule:
  _target_: optorch.schedule.build_lr_scheduler
  config:
    _target_: optorch.schedule.LRSchedulerConfig
    warmup_steps: 4
    total_steps: ${train.steps}
    scheduler_type: cosine
    lr_terminal_value: 0.1
optimizers:
  adamw:
    _target_: optorch.get_optimizer
    optimizer_name: adamw
    max_lr: 1.0e-2
    betas: [0.9, 0.95]
    weight_decay: 0.1
    schedule: ${schedule}
  sgd:
    _target_: optorch.get_optimizer
    optimizer_name: sgd
    max_lr: 0.03
    momentum: 0.9
    nesterov: true
    weight_decay: 1.0e-3
    schedule: ${schedule}
"""


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_compare_torch_curves_match(tmp_path: Path, precision: str) -> None:
    steps = 20
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(COMPARE_RECIPE)
    rc = run_demo(
        ["--config", str(recipe), "--steps", str(steps), "--compare-torch",
         "--precision", precision, *TINY, "--out", str(tmp_path)]
    )  # fmt: skip
    assert rc == 0
    rows = read_rows(tmp_path / "metrics.csv")

    def column(name: str, key: str) -> torch.Tensor:
        values = [float(r[key]) for r in rows if r["optimizer"] == name and r[key]]
        return torch.tensor(values, dtype=torch.float64)

    for name in ("adamw", "sgd"):
        ours, theirs = column(name, "train_loss"), column(f"{name} [torch]", "train_loss")
        assert len(ours) == len(theirs) == steps
        assert float(ours[-5:].mean()) < float(ours[:5].mean()) - 0.1  # it trained
        # float32: 1e-5; under half-precision autocast 1e-4 (see COMPARE_TOLERANCE)
        atol, rtol = demo_report.COMPARE_TOLERANCE[precision]
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol / 10)
        # the schedule reached torch through LambdaLR: the same lr at every step
        torch.testing.assert_close(
            column(name, "lr"), column(f"{name} [torch]", "lr"), rtol=1e-12, atol=0.0
        )
        torch.testing.assert_close(
            column(name, "val_loss"),
            column(f"{name} [torch]", "val_loss"),
            rtol=rtol,
            atol=atol / 10,
        )
        # the gradient's norm before the step, unscaled in both (under fp16 optorch's
        # grads come from the scaled loss; torch's are read after GradScaler.unscale_)
        torch.testing.assert_close(
            column(name, "grad_norm"), column(f"{name} [torch]", "grad_norm"), rtol=1e-3, atol=0.0
        )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [c["optimizer"] for c in summary["comparisons"]] == ["adamw", "sgd"]
    for comparison in summary["comparisons"]:
        assert comparison["match"] is True
        assert comparison["max_param_diff"] <= 1e-5
    if precision == "fp16":  # the scaler ran and its scale is logged for both
        for name in ("adamw", "adamw [torch]"):
            scales = column(name, "loss_scale")
            assert len(scales) == steps and bool((scales >= 1.0).all())
        # and so are the skipped steps (GradScaler's backoffs for the twin)
        ours, theirs = column("adamw", "skipped"), column("adamw [torch]", "skipped")
        assert len(theirs) == steps and torch.equal(ours, theirs)
        skipped = {r["optimizer"]: r["skipped_steps"] for r in summary["results"]}
        assert skipped["adamw"] == skipped["adamw [torch]"]


def _available_twins() -> list[str]:
    from optorch.interop.convert import TORCH_TWINS

    return sorted(name for name, twin in TORCH_TWINS.items() if twin.available)


@pytest.mark.parametrize("name", _available_twins())
def test_every_twin_is_built_and_steps_like_optorch(name: str) -> None:
    """--compare-torch has a twin for every optimizer torch.optim has: five steps of the
    twin (with the schedule through LambdaLR) equal five optorch steps."""
    from optorch.demo import recipes
    from optorch.interop.convert import TORCH_TWINS

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3, bias=name != "muon")  # Muon takes matrices only
    twin_model = torch.nn.Linear(4, 3, bias=name != "muon")
    twin_model.load_state_dict(model.state_dict())
    opt = optorch.get_optimizer(name, max_lr=0.01, schedule=lambda step: 1.0 / (1 + step))
    twin = recipes.torch_twin(opt, twin_model)
    assert not isinstance(twin, str), twin
    assert twin.description == f"torch.optim.{TORCH_TWINS[name].torch_class}"
    params = dict(model.named_parameters())
    state = opt.init(params)
    for _ in range(5):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        with torch.no_grad():
            opt.step(params, grads, state)
        for k, p in twin_model.named_parameters():
            p.grad = grads[k].clone()
        twin.step()
    for k, p in twin_model.named_parameters():
        torch.testing.assert_close(params[k].detach(), p.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "options", "reason"),
    [
        ("lion", {}, "no torch twin for lion"),
        ("decoupled_adam", {}, "no fully decoupled Adam"),
        ("adafactor", {"beta1": 0.9}, "has no beta1"),
        ("adamw", {"max_lr": torch.tensor(0.01)}, "a hyperparameter is a tensor"),
    ],
)
def test_no_twin_says_why(name: str, options: dict[str, object], reason: str) -> None:
    from optorch.demo import recipes

    twin = recipes.torch_twin(optorch.get_optimizer(name, **options), torch.nn.Linear(2, 2))
    assert isinstance(twin, str) and reason in twin, twin


def test_partition_twins_log_their_groups_learning_rates_by_label() -> None:
    from optorch.demo import recipes

    model = CharTransformer(ModelConfig(vocab_size=8, seq_len=4, d_model=8, n_layers=1, n_heads=2))
    spec = recipes.build_preset(recipes.MUON_ADAMW, total_steps=10, warmup_steps=1, lr_terminal=0.1)
    twin = recipes.torch_twin(spec.optimizer, model)
    assert not isinstance(twin, str), twin
    assert twin.labels == ["muon", "adamw"]


def test_a_diverged_run_is_not_best_and_the_summary_stays_json(tmp_path: Path) -> None:
    diverged = _result([float("nan")], 1.0)
    diverged.name = "diverged"
    trained = _result([3.0], 1.0)
    text = demo_report.format_table([diverged, trained], 3.5, "RSS")
    assert "best: x at 3.000" in text
    assert "best: none" in demo_report.format_table([diverged], 3.5, "RSS")
    assert demo_report._finite_or_none({"a": [float("nan"), 1.0, float("inf")]}) == {
        "a": [None, 1.0, None]
    }


def _result(losses: list[float], param: float) -> demo_train.RunResult:
    result = demo_train.RunResult("x", "optorch", losses=losses, final_val_loss=losses[-1])
    result.final_params = {"w": torch.tensor([param])}
    return result


@pytest.mark.parametrize(
    ("theirs", "param", "match"),
    [
        ([3.0, 2.5, 2.0], 1.0, True),
        ([3.0, 2.5, 2.0 * (1 + 3e-6)], 1.0, True),  # within 1e-5 relative
        ([3.0, 2.5, 2.001], 1.0, False),
        ([3.0, float("nan"), 2.0], 1.0, False),
        ([3.0, 2.5, 2.0], float("nan"), False),
    ],
)
def test_compare_detects_differences(theirs: list[float], param: float, match: bool) -> None:
    comparison = demo_report.compare(_result([3.0, 2.5, 2.0], 1.0), _result(theirs, param), "t")
    assert comparison.ok is match


def test_compare_without_twin() -> None:
    comparison = demo_report.compare(_result([1.0], 1.0), "no torch twin for lion", "")
    assert comparison.ok is None and comparison.twin == "no torch twin for lion"


# --------------------------------------------------------------------------------------
# bad input: one line on stderr, exit code 2, no traceback
# --------------------------------------------------------------------------------------


BAD_YAML = "optimizers:\n  adamw: [unclosed\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "adamw,nosuchopt"], r"Unknown optimizer 'nosuchopt'"),
        (["--text", "missing-file.txt"], r"--text: no such file: 'missing-file.txt'"),
        (["--config", "bad.yaml"], r"not a valid YAML recipe"),
    ],
)
def test_bad_input_subprocess(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.yaml").write_text(BAD_YAML)
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("optorch demo: error: ")
    assert re.search(message, lines[0]), lines[0]


@pytest.mark.parametrize(
    ("args", "recipe", "message"),
    [
        (["--device", "tpu"], None, r"Invalid --device: 'tpu'"),
        (["--steps", "0"], None, r"Invalid --steps: 0"),
        (["--d-model", "30", "--n-heads", "4"], None, r"--n-heads: 4 does not divide"),
        (["--optimizers", "adamw,adamw"], None, r"'adamw' is listed twice"),
        (["--optimizers", "muon"], None, r"optimizer 'muon': .*muon_adamw"),
        (["--warmup-steps", "50", "--steps", "10"], None, r"--warmup-steps: 50"),
        (
            ["--config", "recipe.yaml"],
            "optimizers:\n  a: {_target_: no.such.thing}\n",
            r"cannot instantiate optimizers.a",
        ),
        (
            ["--config", "recipe.yaml"],
            "optimizers:\n  a: {_target_: builtins.dict}\n",
            r"optimizer 'a' is a dict, not an optorch optimizer",
        ),
        (["--config", "recipe.yaml"], "optimizers: {}\n", r"needs an 'optimizers' section"),
        (
            ["--config", "recipe.yaml"],
            "trian: {}\noptimizers:\n  a: {_target_: x}\n",
            r"unknown section\(s\) \['trian'\]",
        ),
        (
            ["--config", "recipe.yaml"],
            "train: {stepz: 3}\noptimizers:\n  a: {_target_: x}\n",
            r"unknown key\(s\) \['stepz'\]",
        ),
        (
            ["--config", "recipe.yaml"],
            "train: {steps: -1}\noptimizers:\n  a: {_target_: x}\n",
            r"Invalid train\.steps of --config: -1",
        ),
        (
            ["--config", "recipe.yaml"],
            "train: {seed: abc}\noptimizers:\n  a: {_target_: x}\n",
            r"Invalid train\.seed of --config: 'abc'",
        ),
        (
            ["--config", "recipe.yaml", "--steps", "0"],
            "train: {steps: 5}\noptimizers:\n  a: {_target_: x}\n",
            r"Invalid --steps: 0",
        ),
        (["--config", "nowhere.yaml"], None, r"--config: no such file"),
    ],
)
def test_bad_input_in_process(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    recipe: str | None,
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    if recipe is not None:
        (tmp_path / "recipe.yaml").write_text(recipe)
    assert cli.main(["demo", *TINY, *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("optorch demo: error: ")
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists(), "a refused run left its --out folder behind"


def test_text_too_short(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "short.txt"
    text.write_text("tiny text")
    assert cli.main(["demo", "--text", str(text), *TINY]) == 2
    assert "too short for --seq-len 16" in capsys.readouterr().err


def test_text_file_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 ".encode("latin-1") * 500)
    assert cli.main(["demo", "--text", str(text), *TINY]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_text_file_keeps_unicode_and_trains(tmp_path: Path) -> None:
    words = ["Grüße", "世界", "naïve", "café", "λ", "x", "the", "end."]
    generator = torch.Generator().manual_seed(3)
    picks = torch.randint(0, len(words), (3000,), generator=generator).tolist()
    text = tmp_path / "mine.txt"
    text.write_text(" ".join(words[i] for i in picks), encoding="utf-8")
    out = tmp_path / "out"
    rc = run_demo(["--text", str(text), "--optimizers", "adamw", "--steps", "3", *TINY,
                   "--out", str(out)])  # fmt: skip
    assert rc == 0
    report = (out / "report.md").read_text(encoding="utf-8")
    vocabulary = len(set(" ".join(words)))
    assert f"vocabulary {vocabulary})" in report
    samples = (out / "samples.txt").read_text(encoding="utf-8")
    assert any(word in samples for word in ("世界", "Grüße", "naïve", "café"))


def test_help_explains_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--optimizers", "--config", "--compare-torch", "--text", "--precision",
                 "--device", "--steps", "--out", "--seed", "--batch-size", "--seq-len",
                 "--d-model", "examples:", "muon_adamw"):  # fmt: skip
        assert flag in text, flag


# --------------------------------------------------------------------------------------
# Hydra recipes
# --------------------------------------------------------------------------------------


RECIPE = """
model: {d_model: 16, n_layers: 1, n_heads: 2}
train: {steps: 50, batch_size: 4, seq_len: 16, eval_batches: 2, sample_chars: 8}
schedule:
  _target_: optorch.schedule.build_lr_scheduler
  config:
    _target_: optorch.schedule.LRSchedulerConfig
    warmup_steps: 2
    total_steps: ${train.steps}
    scheduler_type: cosine
    lr_terminal_value: 0.25
optimizers:
  my_adamw:
    _target_: optorch.get_optimizer
    optimizer_name: adamw
    max_lr: 3.0e-3
    betas: [0.9, 0.95]
    weight_decay: 0.05
    schedule: ${schedule}
  split:
    _target_: optorch.wrappers.partition
    labels: {_target_: optorch.demo.muon_label, _partial_: true}
    optimizers:
      muon: {_target_: optorch.get_optimizer, optimizer_name: sgd, max_lr: 0.05}
      adamw: {_target_: optorch.get_optimizer, optimizer_name: adamw, max_lr: 1.0e-3}
"""


def test_recipe_instantiates_with_flag_overrides(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    recipe = demo_settings.load_recipe(path)
    resolved = demo_settings.resolve({"steps": 8}, recipe)  # --steps 8 beats the recipe's 50
    assert (resolved["steps"], resolved["d_model"], resolved["batch_size"]) == (8, 16, 4)
    recipe.set_train(resolved)
    adamw = recipe.instantiate("optimizers.my_adamw")
    assert isinstance(adamw, optorch.Optimizer)
    config = adamw.config
    assert (config.max_lr, config.betas, config.weight_decay) == (3e-3, (0.9, 0.95), 0.05)
    assert config.mode is optorch.AdamWDMode.ADAMW
    # ${train.steps} resolved to the flag's 8: warmup 2 steps, cosine to 0.25 at step 8
    assert [config.schedule(s) for s in (0, 1, 2, 8, 20)] == [0.0, 0.5, 1.0, 0.25, 0.25]
    split = recipe.instantiate("optimizers.split")
    assert sorted(split.optimizers) == ["adamw", "muon"]


def test_recipe_trains_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    rc = run_demo(["--config", str(path), "--steps", "6", "--threads", "1", "--no-progress",
                   "--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["optimizer"] for r in summary["results"]] == ["my_adamw", "split"]
    rows = read_rows(tmp_path / "out" / "metrics.csv")
    split_rows = [r for r in rows if r["optimizer"] == "split" and r["train_loss"]]
    assert len(split_rows) == 6
    # the partition's groups are logged separately
    assert float(split_rows[-1]["muon/momentum_norm"]) > 0.0
    assert float(split_rows[-1]["adamw/exp_avg_sq_mean"]) > 0.0
    assert float(split_rows[2]["muon/lr"]) == pytest.approx(0.05)


def test_example_recipe_instantiates() -> None:
    recipe = demo_settings.load_recipe(REPO / "examples" / "recipe.yaml")
    recipe.set_train(demo_settings.resolve({}, recipe))
    model = CharTransformer(ModelConfig(vocab_size=11, seq_len=8, d_model=16, n_heads=2))
    params = dict(model.named_parameters())
    for name in recipe.optimizer_names:
        optimizer = recipe.instantiate(f"optimizers.{name}")
        state = optimizer.init(params)
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        optimizer.step(params, grads, state)
    scaler = recipe.instantiate("scaler", device="cpu")
    assert scaler["precision"] is torch.float16 and float(scaler["scale"]) == 65536.0


# --------------------------------------------------------------------------------------
# pieces
# --------------------------------------------------------------------------------------


def test_unigram_baseline_matches_formula() -> None:
    vocab = demo_corpus.CharVocab.from_text("abc")
    train, val = vocab.encode("aab"), vocab.encode("abcc")
    # add-one smoothing over 3 characters: p(a) = 3/6, p(b) = 2/6, p(c) = 1/6
    expected = -(math.log(3 / 6) + math.log(2 / 6) + 2 * math.log(1 / 6)) / 4
    got = demo_corpus.unigram_cross_entropy(train, val, vocab.size)
    assert got == pytest.approx(expected, rel=1e-12)


def test_corpus_is_deterministic_and_split_by_chunks() -> None:
    text = demo_corpus.stdlib_docstrings(("json", "textwrap"))
    assert text == demo_corpus.stdlib_docstrings(("json", "textwrap"))
    assert all(c == "\n" or " " <= c <= "~" for c in text)
    corpus = demo_corpus.Corpus.from_text(text * 4, val_fraction=0.1)
    assert len(corpus.train) + len(corpus.val) == len(text) * 4
    assert 0.05 < len(corpus.val) / (len(text) * 4) < 0.15


def test_model_is_causal() -> None:
    torch.manual_seed(0)
    model = CharTransformer(ModelConfig(vocab_size=7, seq_len=8, d_model=16, n_heads=2))
    ids = torch.randint(0, 7, (2, 8))
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 7
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :5], after[:, :5], rtol=0, atol=0)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_state_statistics_match_direct_computation() -> None:
    params = {"a": torch.randn(3, 2, generator=torch.Generator().manual_seed(1)),
              "b": torch.randn(4, generator=torch.Generator().manual_seed(2))}  # fmt: skip
    opt = optorch.get_optimizer("adamw", max_lr=0.1)
    state = opt.init(params)
    grads = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    opt.step(params, grads, state)
    stats = demo_train.state_statistics(state, frozenset(params))
    for field in ("exp_avg", "exp_avg_sq"):
        flat = torch.cat([state[field][k].reshape(-1).double() for k in params])
        assert stats[f"{field}_norm"] == pytest.approx(float(flat.norm()), rel=1e-6)
        assert stats[f"{field}_mean"] == pytest.approx(float(flat.mean()), rel=1e-6)
    assert "step" not in stats


def test_recipe_values_are_checked() -> None:
    with pytest.raises(ValueError, match=r"Invalid --precision: 'fp8'"):
        demo_settings.resolve({"precision": "fp8"}, None)
    with pytest.raises(ValueError, match=r"Invalid --lr-terminal: 2"):
        demo_settings.resolve({"lr_terminal": 2}, None)
    with pytest.raises(ValueError, match=r"Invalid --device: 'gpu0'"):
        demo_settings.parse_device("gpu0")


@pytest.mark.parametrize(("flag", "tied"), [([], True), (["--no-tie-embeddings"], False)])
def test_tie_embeddings_flag_overrides_the_recipe_both_ways(
    tmp_path: Path, flag: list[str], tied: bool
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {tie_embeddings: true}\noptimizers:\n  a: {_target_: x}\n")
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--config", str(recipe), *flag])
    flags = {key: getattr(args, key, None) for key in demo_settings.DEFAULTS}
    loaded = demo_settings.load_recipe(str(recipe))
    assert demo_settings.resolve(flags, loaded)["tie_embeddings"] is tied


def test_an_unknown_name_with_a_recipe_lists_the_recipe_entries_too() -> None:
    from optorch.demo import recipes

    with pytest.raises(ValueError, match=r"did you mean the recipe's 'adamw_clipped'\?"):
        recipes.parse_optimizer_names("adamw_clippd", ("adamw_clipped", "lion"))
    with pytest.raises(ValueError, match=r"Unknown optimizer 'nope'") as raised:
        recipes.parse_optimizer_names("nope")
    assert "recipe" not in str(raised.value)
