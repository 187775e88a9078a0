"""``optorch demo``: train a small character-level transformer with several optimizers.

The demo trains one small decoder-only transformer (:mod:`optorch.demo.model`) on an
embedded corpus (docstrings of the Python standard library, or ``--text FILE``) once per
optimizer, from the same initial weights on the same batches, the functional way::

    params = dict(model.named_parameters())
    grads, loss = torch.func.grad(loss_fn, has_aux=True)(params, x, y)
    params, state = optimizer.step(params, grads, state)   # in place

and reports, per optimizer, the final train and validation losses against the unigram
baseline, throughput, optimizer-step time and memory; it writes loss curves, a CSV of
every step's metrics (optimizer-state statistics included), a markdown report and a
text sample per model. ``--compare-torch`` also trains each optimizer's
``torch.optim`` twin and checks that the loss curves coincide. See ``docs/demo.md``.

The command line (:mod:`optorch.cli`) uses :data:`HELP`, :data:`DESCRIPTION`,
:func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .corpus import STDLIB_MODULES, Corpus, load_text_file, stdlib_docstrings, unigram_cross_entropy
from .model import CharTransformer, ModelConfig, muon_label
from .recipes import (
    DEFAULT_OPTIMIZERS,
    MUON_ADAMW,
    PRESETS,
    OptimizerSpec,
    build_preset,
    parse_optimizer_names,
    torch_twin,
)
from .report import Comparison, compare, format_table, write_outputs
from .settings import (
    DEFAULTS,
    PRECISIONS,
    Recipe,
    load_recipe,
    parse_device,
    resolve,
    usable_cores,
)
from .train import (
    DataPlan,
    RunResult,
    TrainSettings,
    train_optorch,
    train_torch_twin,
    warm_up,
)

__all__ = [
    "DEFAULT_OPTIMIZERS",
    "DESCRIPTION",
    "HELP",
    "PRESETS",
    "CharTransformer",
    "Corpus",
    "ModelConfig",
    "add_arguments",
    "muon_label",
    "run",
]

HELP = "train a small character-level transformer with several optimizers and compare them"

DESCRIPTION = (
    "Train a small character-level decoder-only transformer once per optimizer (same "
    "initial weights, same batches, a warmup-cosine schedule), with gradients from "
    "torch.func and optorch's functional in-place step. The corpus is embedded (Python "
    "standard library docstrings; --text FILE for your own). Prints, per optimizer, the "
    "final train/validation loss next to the unigram baseline, tokens/s, ms per optimizer "
    "step and memory, and writes loss curves (PNG), every step's metrics with "
    "optimizer-state statistics (CSV), a markdown report and text samples to --out. "
    "--compare-torch also trains the torch.optim twin of each optimizer that has one "
    "and checks that the loss curves coincide. --config takes a Hydra recipe "
    "(examples/recipe.yaml). The defaults take about 90 s on one CPU core."
)

EPILOG = f"""\
default optimizers: {",".join(DEFAULT_OPTIMIZERS)}
  {MUON_ADAMW}: Muon on the hidden 2-D weights, AdamW on embeddings/head/biases/norms
  any other registry name (see optorch.REGISTRY) runs with its registry defaults

examples:
  optorch demo                                   # the five default optimizers, ~90 s
  optorch demo --optimizers adamw,muon_adamw --steps 500 --out runs/muon
  optorch demo --optimizers adamw,sgd --compare-torch --steps 100
  optorch demo --text my_book.txt --seq-len 128 --d-model 128 --n-layers 4
  optorch demo --config examples/recipe.yaml --steps 400
  optorch demo --precision bf16 --device cuda

outputs (in --out): metrics.csv, loss_curves.png, samples.txt, report.md, summary.json
(see docs/demo.md for their columns and how to read them)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags. Every setting flag defaults to ``None``: a value not given on
    the command line comes from the recipe (``--config``), else from the built-in
    defaults (shown in each help line)."""
    # raw: keep the epilog's example lines; so the description is wrapped here
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = textwrap.fill(DESCRIPTION, width=88)
    parser.epilog = EPILOG
    d = DEFAULTS
    what = parser.add_argument_group("what to train")
    what.add_argument(
        "--optimizers",
        metavar="NAMES",
        help="comma-separated registry names, the preset 'muon_adamw', or recipe entries "
        f"(default: {','.join(DEFAULT_OPTIMIZERS)}; with --config: the recipe's optimizers)",
    )
    what.add_argument(
        "--config",
        metavar="RECIPE.yaml",
        help="a Hydra recipe: optimizers (with schedule, wrappers), scaler, model and train "
        "settings; flags given on the command line override its model/train values",
    )
    what.add_argument(
        "--compare-torch",
        action="store_true",
        help="also train the torch.optim twin of each optimizer that has one (AdamW, Adam, "
        "SGD, RMSprop, Adagrad, Adamax, NAdam, RAdam, Adafactor, Muon, and partitions of "
        "them such as muon_adamw) and report the max difference of loss curves and final "
        "params",
    )
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--text",
        metavar="FILE",
        help="train on this UTF-8 text file instead of the embedded stdlib docstrings",
    )
    data.add_argument(
        "--seq-len", type=int, metavar="N", help=f"characters per window (default {d['seq_len']})"
    )
    data.add_argument(
        "--d-model", type=int, metavar="N", help=f"model width (default {d['d_model']})"
    )
    data.add_argument(
        "--n-layers", type=int, metavar="N", help=f"transformer blocks (default {d['n_layers']})"
    )
    data.add_argument(
        "--n-heads", type=int, metavar="N", help=f"attention heads (default {d['n_heads']})"
    )
    data.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="share the token embedding with the output head, or not (--no-tie-embeddings, "
        "which also overrides a recipe's true; default: untied)",
    )
    train = parser.add_argument_group("training")
    train.add_argument(
        "--steps", type=int, metavar="N", help=f"optimizer steps per run (default {d['steps']})"
    )
    train.add_argument(
        "--batch-size", type=int, metavar="N", help=f"windows per step (default {d['batch_size']})"
    )
    train.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help=f"seed of init, batches and samples (default {d['seed']})",
    )
    train.add_argument(
        "--warmup-steps",
        type=int,
        metavar="N",
        help="linear warmup of the schedule (default: steps // 10)",
    )
    train.add_argument(
        "--lr-terminal",
        type=float,
        metavar="X",
        help=f"final lr multiplier of the cosine decay (default {d['lr_terminal']})",
    )
    train.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32; bf16 autocast; or fp16 autocast with optorch.amp's dynamic loss "
        "scaling (default fp32)",
    )
    train.add_argument(
        "--device",
        metavar="DEVICE",
        help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)",
    )
    train.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"torch CPU threads (default {d['threads']}: the default model is too small to "
        "gain from more, and waiting threads slow down a busy machine; raise it for "
        f"bigger models, this machine has {usable_cores()} usable cores)",
    )
    out = parser.add_argument_group("evaluation and outputs")
    out.add_argument(
        "--out",
        default="optorch-demo-out",
        metavar="DIR",
        help="output folder (default ./optorch-demo-out)",
    )
    out.add_argument(
        "--eval-every",
        type=int,
        metavar="N",
        help="validation loss every N steps (default: steps // 10)",
    )
    out.add_argument(
        "--eval-batches",
        type=int,
        metavar="N",
        help=f"fixed validation batches per evaluation (default {d['eval_batches']})",
    )
    out.add_argument(
        "--sample-chars",
        type=int,
        metavar="N",
        help=f"characters generated per model (default {d['sample_chars']})",
    )
    out.add_argument(
        "--temperature",
        type=float,
        metavar="X",
        help=f"sampling temperature, 0 = greedy (default {d['temperature']})",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bars (on stderr)")


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------


def check_precision(precision: str, device: torch.device) -> None:
    """``ValueError`` when autocast in ``precision`` does not work on ``device``."""
    if precision == "fp32":
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    reason = ""
    if not torch.amp.is_autocast_available(device.type):
        reason = "autocast is not available"
    else:
        try:
            with torch.autocast(device_type=device.type, dtype=dtype):
                probe = torch.ones(4, 4, device=device)
                product = probe @ probe
            if product.dtype != dtype:
                reason = f"autocast computes a matmul in {product.dtype}, not {dtype}"
        except (RuntimeError, ValueError) as exc:
            reason = " ".join(str(exc).split())
    if reason:
        raise ValueError(
            f"--precision {precision}: {dtype} autocast is not supported on {device.type} by "
            f"torch {torch.__version__} ({reason}); use --precision fp32 or bf16, or a CUDA "
            "device"
        )


def _threads_text() -> str:
    count = torch.get_num_threads()
    return f"{count} thread" if count == 1 else f"{count} threads"


def _load_corpus(text_path: str | None) -> Corpus:
    if text_path is None:
        return Corpus.from_text(
            stdlib_docstrings(),
            source=f"docstrings of {len(STDLIB_MODULES)} Python {sys.version.split()[0]} "
            "standard library modules",
        )
    return Corpus.from_text(load_text_file(text_path), source=f"--text {text_path}")


def _prompt(corpus: Corpus) -> str:
    """The first line start of the validation text, about 32 characters, at a space."""
    head = corpus.vocab.decode(corpus.val[:2000])
    start = head.find("\n") + 1 if "\n" in head[:-40] else 0
    while start < len(head) - 40 and head[start] in " \n":
        start += 1
    prompt = head[start : start + 40]
    cut = prompt.rfind(" ", 16)
    prompt = prompt[: cut + 1] if cut > 0 else prompt
    return prompt or corpus.vocab.chars[0]


def _batches(
    data: torch.Tensor, count: int, batch: int, seq_len: int, seed: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from .corpus import sample_windows, windows_to_batch

    generator = torch.Generator().manual_seed(seed)
    starts = sample_windows(data, count * batch, seq_len, generator).view(count, batch)
    on_device = data.to(device)
    return [windows_to_batch(on_device, s.to(device), seq_len) for s in starts]


def _make_plan(corpus: Corpus, s: dict[str, Any], device: torch.device) -> DataPlan:
    generator = torch.Generator().manual_seed(s["seed"])
    starts = torch.randint(
        0, len(corpus.train) - s["seq_len"], (s["steps"], s["batch_size"]), generator=generator
    )
    # evaluation windows come from their own generator: the same for every --steps
    eval_seed = s["seed"] + 1_000_003
    return DataPlan(
        train_data=corpus.train.to(device),
        train_starts=starts.to(device),
        val_batches=_batches(
            corpus.val, s["eval_batches"], s["batch_size"], s["seq_len"], eval_seed, device
        ),
        train_eval_batches=_batches(
            corpus.train, s["eval_batches"], s["batch_size"], s["seq_len"], eval_seed + 1, device
        ),
        prompt=_prompt(corpus),
        vocab=corpus.vocab,
        seq_len=s["seq_len"],
    )


def _check_optimizer(name: str, optimizer: Any) -> None:
    for attribute in ("init", "step", "config"):
        if not hasattr(optimizer, attribute):
            raise TypeError(
                f"optimizer {name!r} is a {type(optimizer).__name__}, not an optorch optimizer "
                f"(it has no .{attribute}); its _target_ must return one (e.g. "
                "optorch.get_optimizer or an optorch.wrappers function)"
            )


def _preflight(spec: OptimizerSpec, model: CharTransformer) -> None:
    """One step on a scratch copy of the params with zero gradients, so that a bad
    combination (e.g. Muon on 1-D params) fails before any training starts."""
    scratch = {k: v.detach().clone() for k, v in model.named_parameters()}
    zeros = {k: torch.zeros_like(v) for k, v in scratch.items()}
    try:
        spec.optimizer.step(scratch, zeros, spec.optimizer.init(scratch))
    except (ValueError, TypeError) as exc:
        hint = f" (use the preset {MUON_ADAMW!r} for Muon + AdamW)" if spec.name == "muon" else ""
        kind = TypeError if isinstance(exc, TypeError) else ValueError
        raise kind(f"optimizer {spec.name!r}: {exc}{hint}") from None


def _specs(
    names: list[str], recipe: Recipe | None, s: dict[str, Any], muon_ns_dtype: torch.dtype
) -> list[OptimizerSpec]:
    specs = []
    for name in names:
        if recipe is not None and name in recipe.optimizer_names:
            optimizer = recipe.instantiate(f"optimizers.{name}")
            _check_optimizer(name, optimizer)
            specs.append(
                OptimizerSpec(
                    name, optimizer, note=f"from {recipe.path}", description=repr(optimizer)
                )
            )
        else:
            specs.append(
                build_preset(
                    name,
                    total_steps=s["steps"],
                    warmup_steps=s["warmup_steps"],
                    lr_terminal=s["lr_terminal"],
                    muon_ns_dtype=muon_ns_dtype,
                )
            )
    return specs


def _scaler_factory(recipe: Recipe | None, device: torch.device) -> Callable[[], Any]:
    from optorch.amp import init_grad_scaler

    if recipe is not None and recipe.config.get("scaler") is not None:

        def from_recipe() -> Any:
            state = recipe.instantiate("scaler", device=str(device))
            if not hasattr(state, "get") or state.get("scale") is None:
                raise TypeError(
                    f"{recipe.path}: scaler must instantiate to a scaler state (e.g. "
                    f"optorch.amp.init_grad_scaler), got {type(state).__name__}"
                )
            return state

        return from_recipe
    return lambda: init_grad_scaler(
        init_scale=2.0**16, growth_interval=200, precision="fp16", device=device
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``args``; bad input raises ``ValueError``,
    ``FileNotFoundError`` or ``TypeError`` with a one-line message."""
    from optorch.cli import output_folder

    recipe = load_recipe(args.config) if getattr(args, "config", None) else None
    flags = {key: getattr(args, key, None) for key in DEFAULTS}
    s = resolve(flags, recipe)
    device = parse_device(s["device"])
    check_precision(s["precision"], device)
    recipe_names = recipe.optimizer_names if recipe is not None else ()
    if getattr(args, "optimizers", None) is not None:
        names = parse_optimizer_names(args.optimizers, recipe_names)
    elif recipe is not None:
        names = list(recipe_names)
    else:
        names = parse_optimizer_names(",".join(DEFAULT_OPTIMIZERS))
    existed = Path(args.out).exists()
    out = output_folder(args.out)  # before training: a folder that cannot be written fails now
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(s["threads"])
    try:
        return _run(args, s, names, recipe, device)
    except BaseException:
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run refused on the way leaves no empty folder behind
        raise
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    args: argparse.Namespace,
    s: dict[str, Any],
    names: list[str],
    recipe: Recipe | None,
    device: torch.device,
) -> int:
    started = time.perf_counter()
    corpus = _load_corpus(s["text"])
    corpus.check_window(s["seq_len"])
    model_config = ModelConfig(
        vocab_size=corpus.vocab.size,
        seq_len=s["seq_len"],
        d_model=s["d_model"],
        n_layers=s["n_layers"],
        n_heads=s["n_heads"],
        tie_embeddings=s["tie_embeddings"],
    )
    if recipe is not None:
        recipe.set_train({k: v for k, v in s.items() if k != "threads"})
    # bfloat16 Newton-Schulz (torch.optim.Muon's) is emulated, slowly, on most CPUs;
    # the twin comparison needs it, a plain CPU run is better served by float32
    slow_bf16 = device.type == "cpu" and not args.compare_torch
    specs = _specs(names, recipe, s, torch.float32 if slow_bf16 else torch.bfloat16)
    torch.manual_seed(s["seed"])
    template = CharTransformer(model_config)
    init_state = {k: v.detach().clone() for k, v in template.state_dict().items()}
    for spec in specs:
        _preflight(spec, template)
    plan = _make_plan(corpus, s, device)
    val_targets = torch.cat([t.reshape(-1).cpu() for _, t in plan.val_batches])
    baseline = unigram_cross_entropy(corpus.train, val_targets, corpus.vocab.size)
    n_params = sum(p.numel() for p in template.parameters())
    tokens = s["batch_size"] * s["seq_len"]
    print(
        f"corpus: {corpus.source}: {len(corpus.train) + len(corpus.val):,} chars, vocabulary "
        f"{corpus.vocab.size}, train/val {len(corpus.train):,}/{len(corpus.val):,}"
    )
    print(
        f"model: {s['n_layers']} blocks, d_model {s['d_model']}, {s['n_heads']} heads, "
        f"{n_params:,} params; {s['steps']} steps of {s['batch_size']} x {s['seq_len']} = "
        f"{tokens:,} tokens"
    )
    print(
        f"device: {device} ({_threads_text()}), precision {s['precision']}; "
        f"unigram baseline {baseline:.3f} nats/char (uniform: {math.log(corpus.vocab.size):.3f})"
    )
    print("optimizers: " + ", ".join(spec.name for spec in specs), flush=True)

    settings = TrainSettings(
        steps=s["steps"],
        batch_size=s["batch_size"],
        seq_len=s["seq_len"],
        eval_every=s["eval_every"],
        precision=s["precision"],
        device=device,
        seed=s["seed"],
        sample_chars=s["sample_chars"],
        temperature=s["temperature"],
        progress=not args.no_progress,
    )
    make_scaler = _scaler_factory(recipe, device) if s["precision"] == "fp16" else None
    common: dict[str, Any] = {
        "model_config": model_config,
        "init_state": init_state,
        "plan": plan,
        "settings": settings,
        "make_scaler": make_scaler,
    }
    warm_up(model_config, init_state, plan, settings)
    results: list[RunResult] = []
    comparisons: list[Comparison] = []
    for spec in specs:
        ours = train_optorch(spec, **common)
        results.append(ours)
        if args.compare_torch:
            twin_description = ""

            def factory(model: torch.nn.Module, optimizer: Any = spec.optimizer) -> Any:
                nonlocal twin_description
                twin = torch_twin(optimizer, model)
                if not isinstance(twin, str):
                    twin_description = twin.description
                return twin

            theirs = train_torch_twin(spec.name, factory, **common)
            if not isinstance(theirs, str):
                results.append(theirs)
            comparisons.append(compare(ours, theirs, twin_description, s["precision"]))

    if device.type == "cuda":
        memory_label, memory_note = "peak MiB", "`peak MiB` is torch.cuda.max_memory_allocated."
    else:
        memory_label = "RSS +MiB"
        memory_note = (
            "`RSS +MiB` is the growth of the process's resident memory during the run (a "
            "rough CPU measure: the allocator keeps freed memory, so later runs may show less)."
        )
    print()
    print(format_table(results, baseline, memory_label, comparisons))
    settings_lines = [
        f"corpus: {corpus.source} ({len(corpus.train):,} train / {len(corpus.val):,} "
        f"validation characters, vocabulary {corpus.vocab.size})",
        f"model: {s['n_layers']} pre-LN blocks, d_model {s['d_model']}, {s['n_heads']} heads, "
        f"seq_len {s['seq_len']}, tied embeddings: {s['tie_embeddings']}, {n_params:,} params",
        f"training: {s['steps']} steps, batch {s['batch_size']}, seed {s['seed']}, "
        f"precision {s['precision']}, device {device} ({_threads_text()})",
        f"schedule: linear warmup {s['warmup_steps']} steps, cosine to {s['lr_terminal']} x "
        "max_lr (built-in presets; recipe optimizers bring their own)",
        f"evaluation: every {s['eval_every']} steps on {s['eval_batches']} fixed batches",
    ]
    optimizer_lines = [
        f"`{spec.name}`: {spec.description}" + (f" ({spec.note})" if spec.note else "")
        for spec in specs
    ]
    files = write_outputs(
        Path(args.out),
        results=results,
        comparisons=comparisons,
        baseline=baseline,
        memory_label=memory_label,
        memory_note=memory_note,
        settings_lines=settings_lines,
        optimizer_lines=optimizer_lines,
        prompt=plan.prompt,
        steps=s["steps"],
    )
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    print(f"total time {time.perf_counter() - started:.1f} s")
    if comparisons and not all(c.ok for c in comparisons if c.has_twin):
        print("optorch and torch.optim disagree beyond float32 tolerance", file=sys.stderr)
        return 1
    return 0
