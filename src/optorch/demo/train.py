r"""The training loops: optorch through ``torch.func``, and the ``torch.optim`` twin.

The optorch loop is the research style the seed served::

    params = dict(model.named_parameters())
    grads, loss = torch.func.grad(loss_fn, has_aux=True)(params, x, y)
    params, state = optimizer.step(params, grads, state)   # in place: model is current

with ``loss_fn`` calling the model through ``torch.func.functional_call``. The twin
trains a second copy of the model the usual ``torch.optim`` way (``loss.backward()``,
``optimizer.step()``, ``LambdaLR.step()``) from the same initial weights on the same
batches, so the two loss curves must coincide to float32 rounding.

Both loops record, per step: the minibatch loss, the learning rate(s), the global norms
of the gradient and of the params, timings, and statistics of every optimizer-state
field (its global L2 norm and its mean), plus validation loss every ``eval_every`` steps.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from optorch.tree import flatten

from .corpus import CharVocab, windows_to_batch
from .model import CharTransformer, ModelConfig
from .recipes import OptimizerSpec, TorchTwin, evaluation_params, lr_values

__all__ = [
    "DataPlan",
    "RunResult",
    "TrainSettings",
    "train_optorch",
    "train_torch_twin",
    "warm_up",
]

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    """What every run shares (the optimizer aside)."""

    steps: int
    batch_size: int
    seq_len: int
    eval_every: int
    precision: str  # "fp32", "bf16" or "fp16"
    device: torch.device
    seed: int
    sample_chars: int
    temperature: float
    progress: bool


@dataclass
class DataPlan:
    """The batches every run sees, in the same order, already on the device."""

    train_data: torch.Tensor  # (N_train,) ids on the device
    train_starts: torch.Tensor  # (steps, batch) window offsets into train_data
    val_batches: list[tuple[torch.Tensor, torch.Tensor]]  # fixed validation windows
    train_eval_batches: list[tuple[torch.Tensor, torch.Tensor]]  # fixed train windows
    prompt: str  # the start of every text sample
    vocab: CharVocab
    seq_len: int

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return windows_to_batch(self.train_data, self.train_starts[step], self.seq_len)


@dataclass
class RunResult:
    """One optimizer's run: its per-step rows and its summary numbers."""

    name: str
    kind: str  # "optorch" or "torch"
    rows: list[dict[str, Any]] = field(default_factory=list)
    final_train_loss: float = math.nan
    final_val_loss: float = math.nan
    tokens_per_s: float = math.nan
    opt_step_ms: float = math.nan
    peak_mem_mib: float = math.nan
    state_mib: float = math.nan
    sample: str = ""
    losses: list[float] = field(default_factory=list)  # minibatch loss of every step
    final_params: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped_steps: int = 0  # fp16 steps skipped for non-finite gradients


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def autocast_context(
    precision: str, device: torch.device
) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy in nats, computed in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class MemoryMeter:
    """Peak memory of one run: CUDA's peak allocated bytes on a GPU; on a CPU the growth
    of the process's resident set size (RSS) over the run, sampled every step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.start = 0
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm", "rb") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # not Linux: the high-water mark
            import resource

            scale = 1 if sys.platform == "darwin" else 1024
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = self.peak = self._rss()
        return self

    def sample(self) -> None:
        if self.device.type != "cuda":
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self.sample()

    @property
    def mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return (self.peak - self.start) / 2**20


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.zeros(())
    norms = torch._foreach_norm([t.detach().float() for t in tensors])
    return torch.linalg.vector_norm(torch.stack(norms))


def state_statistics(state: Any, param_names: frozenset[str]) -> dict[str, float]:
    """``{field}_norm`` and ``{field}_mean`` of every params-shaped state field, and the
    value of every other 0-d state tensor (e.g. Schedule-Free's ``weight_sum``).

    Field names are the state's keys with the param names left out, so a partition's
    ``state["groups"]["muon"]["momentum"][...]`` is reported as ``muon/momentum``.
    """
    paths, leaves, _ = flatten(state)
    fields: dict[str, list[torch.Tensor]] = {}
    scalars: dict[str, torch.Tensor] = {}
    for path, leaf in zip(paths, leaves, strict=True):
        if not isinstance(leaf, torch.Tensor):
            continue
        keys = [str(k) for k in path if str(k) not in param_names and str(k) != "groups"]
        name = "/".join(keys) or "state"
        if leaf.ndim == 0 and keys and keys[-1] not in param_names:
            if keys[-1] != "step":  # the step count is the row's step
                scalars[name] = leaf
            continue
        fields.setdefault(name, []).append(leaf)
    values: dict[str, torch.Tensor] = {}
    for name, tensors in fields.items():
        values[f"{name}_norm"] = _global_norm(tensors)
        total = sum(t.detach().float().sum() for t in tensors)
        count = sum(t.numel() for t in tensors)
        values[f"{name}_mean"] = torch.as_tensor(total) / max(count, 1)
    for name, tensor in scalars.items():
        values[name] = tensor.detach().double()
    if not values:
        return {}
    numbers = torch.stack([v.double().cpu().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, numbers, strict=True))


def state_bytes(state: Any) -> int:
    _, leaves, _ = flatten(state)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


@torch.no_grad()
def evaluate(
    forward: Forward, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str
) -> float:
    """Mean cross-entropy over equally sized batches."""
    device = batches[0][0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets in batches:
        with autocast_context(precision, device):
            logits = forward(inputs)
        total += cross_entropy(logits, targets).double()
    return float(total) / len(batches)


@torch.no_grad()
def generate(
    forward: Forward, plan: DataPlan, settings: TrainSettings, *, device: torch.device
) -> str:
    """``settings.sample_chars`` characters after the plan's prompt, sampled at
    ``settings.temperature`` (0 = greedy) with a generator seeded by ``settings.seed``."""
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    ids = plan.vocab.encode(plan.prompt).to(device)[None, :]
    for _ in range(settings.sample_chars):
        context = ids[:, -plan.seq_len :]
        with autocast_context(settings.precision, device):
            logits = forward(context)
        last = logits[0, -1].float().cpu()
        if not bool(torch.isfinite(last).all()):
            return plan.vocab.decode(ids[0].cpu()) + " [stopped: the model's logits are not finite]"
        if settings.temperature <= 0:
            chosen = last.argmax().reshape(1)
        else:
            probs = torch.softmax(last / settings.temperature, dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, chosen.to(device)[None, :]], dim=1)
    return plan.vocab.decode(ids[0].cpu())


def _progress(name: str, settings: TrainSettings) -> Any:
    if not settings.progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a demo extra: run without a bar
        return None
    return tqdm(total=settings.steps, desc=f"{name:>24}", unit="step", leave=True, file=sys.stderr)


def _eval_steps(settings: TrainSettings) -> set[int]:
    every = max(1, settings.eval_every)
    return {0, settings.steps, *range(every, settings.steps, every)}


def _record_eval(result: RunResult, step: int, val_loss: float) -> None:
    """Attach the validation loss after ``step`` steps to that step's row (a row of its
    own for step 0, before any training)."""
    if result.rows and result.rows[-1]["step"] == step:
        result.rows[-1]["val_loss"] = val_loss
    else:
        result.rows.append(
            {"optimizer": result.name, "impl": result.kind, "step": step, "val_loss": val_loss}
        )


def _make_model(
    model_config: ModelConfig, init_state: Mapping[str, torch.Tensor], device: torch.device
) -> CharTransformer:
    model = CharTransformer(model_config)
    model.load_state_dict(init_state)
    return model.to(device)


class _Timer:
    """Wall time of the train steps, excluding evaluation and logging."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.train_seconds = 0.0
        self.step_seconds: list[float] = []
        self.opt_seconds: list[float] = []

    @contextlib.contextmanager
    def measure(self, *, optimizer_step: bool) -> Iterator[None]:
        _sync(self.device)
        start = time.perf_counter()
        yield
        _sync(self.device)
        elapsed = time.perf_counter() - start
        if optimizer_step:
            self.opt_seconds.append(elapsed)
        else:
            self.train_seconds += elapsed
            self.step_seconds.append(elapsed)

    @staticmethod
    def _steady(seconds: list[float]) -> list[float]:
        # the first steps carry one-off costs (state creation, kernel selection, caches)
        return seconds[min(3, len(seconds) - 1) :] if seconds else []

    def opt_step_ms(self) -> float:
        timed = self._steady(self.opt_seconds)
        return 1000.0 * sum(timed) / max(len(timed), 1)

    def tokens_per_s(self, tokens_per_step: int) -> float:
        timed = self._steady(self.step_seconds)
        return len(timed) * tokens_per_step / max(sum(timed), 1e-9)


def warm_up(
    model_config: ModelConfig,
    init_state: Mapping[str, torch.Tensor],
    plan: DataPlan,
    settings: TrainSettings,
) -> None:
    """One functional and one autograd gradient, one evaluation: the one-off costs
    (lazy imports, kernel and thread-pool set-up, allocator growth) are paid here, not
    in the first optimizer's time and memory."""
    model = _make_model(model_config, init_state, settings.device)
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    inputs, targets = plan.batch(0)

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast_context(settings.precision, settings.device):
            logits = functional_call(model, p, (inputs,))
        return cross_entropy(logits, targets)

    torch.func.grad(loss_fn)(params)
    loss_fn(params).backward()
    evaluate(model, plan.val_batches[:1], settings.precision)
    if settings.progress:
        with contextlib.suppress(ImportError):
            import tqdm.auto  # noqa: F401  # its import is a one-off cost too


# --------------------------------------------------------------------------------------
# the optorch loop
# --------------------------------------------------------------------------------------


def train_optorch(
    spec: OptimizerSpec,
    *,
    model_config: ModelConfig,
    init_state: Mapping[str, torch.Tensor],
    plan: DataPlan,
    settings: TrainSettings,
    make_scaler: Callable[[], Any] | None = None,
) -> RunResult:
    """Train a fresh copy of the model with ``spec.optimizer`` through ``torch.func``."""
    device = settings.device
    model = _make_model(model_config, init_state, device)
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    names = frozenset(params)
    optimizer = spec.optimizer
    opt_state = optimizer.init(params)
    scaler = make_scaler() if make_scaler is not None else None
    if scaler is not None:
        from optorch.amp import scale_loss, scaled_step

    def loss_fn(
        p: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast_context(settings.precision, device):
            logits = functional_call(model, p, (inputs,))
        loss = cross_entropy(logits, targets)
        objective = scale_loss(loss, scaler) if scaler is not None else loss
        return objective, loss.detach()

    grad_fn = torch.func.grad(loss_fn, has_aux=True)

    def forward_at(p: Mapping[str, torch.Tensor]) -> Forward:
        return lambda inputs: functional_call(model, dict(p), (inputs,))

    result = RunResult(spec.name, "optorch")
    timer = _Timer(device)
    tokens_per_step = settings.batch_size * settings.seq_len
    eval_at = _eval_steps(settings)
    bar = _progress(spec.name, settings)
    with MemoryMeter(device) as memory:
        for step in range(settings.steps + 1):
            if step in eval_at:
                at = evaluation_params(optimizer, params, opt_state)
                val = evaluate(forward_at(at), plan.val_batches, settings.precision)
                _record_eval(result, step, val)
            if step == settings.steps:
                break
            inputs, targets = plan.batch(step)
            lrs = lr_values(optimizer, step)
            skipped: torch.Tensor | None = None
            # the grads of a scaled loss are scaled: their norm is logged unscaled, as the
            # torch twin's (after GradScaler.unscale_)
            grad_scale = float(scaler["scale"]) if scaler is not None else 1.0
            with timer.measure(optimizer_step=False):
                grads, loss = grad_fn(params, inputs, targets)
                with timer.measure(optimizer_step=True):
                    if scaler is not None:
                        out = scaled_step(optimizer, params, grads, opt_state, scaler)
                        params, opt_state, skipped = out.params, out.opt_state, out.found_inf
                    else:
                        params, opt_state = optimizer.step(params, grads, opt_state)
            memory.sample()
            loss_value = float(loss)
            result.losses.append(loss_value)
            row: dict[str, Any] = {"optimizer": spec.name, "impl": "optorch"}
            row.update(
                step=step + 1,
                tokens=(step + 1) * tokens_per_step,
                train_loss=loss_value,
                **lrs,
                grad_norm=float(_global_norm(list(grads.values()))) / grad_scale,
                param_norm=float(_global_norm(list(params.values()))),
                opt_step_ms=1000.0 * timer.opt_seconds[-1],
            )
            if scaler is not None and skipped is not None:
                row["loss_scale"] = float(scaler["scale"])
                row["skipped"] = int(float(skipped) != 0.0)
                result.skipped_steps += row["skipped"]
            row.update(state_statistics(opt_state, names))
            result.rows.append(row)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == settings.steps - 1:
                    rate = (step + 1) * tokens_per_step / max(timer.train_seconds, 1e-9)
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
    if bar is not None:
        bar.close()
    final = evaluation_params(optimizer, params, opt_state)
    forward = forward_at(final)
    result.final_val_loss = result.rows[-1]["val_loss"]
    result.final_train_loss = evaluate(forward, plan.train_eval_batches, settings.precision)
    result.tokens_per_s = timer.tokens_per_s(tokens_per_step)
    result.opt_step_ms = timer.opt_step_ms()
    result.peak_mem_mib = memory.mib
    result.state_mib = state_bytes(opt_state) / 2**20
    result.sample = generate(forward, plan, settings, device=device)
    result.final_params = {k: v.detach().cpu().clone() for k, v in model.named_parameters()}
    return result


# --------------------------------------------------------------------------------------
# the torch.optim loop
# --------------------------------------------------------------------------------------


def _torch_scaler(scaler_state: Mapping[str, Any], device: torch.device) -> Any:
    """``torch.amp.GradScaler`` with the settings of an optorch scaler state."""
    return torch.amp.GradScaler(
        device.type,
        init_scale=float(scaler_state["scale"]),
        growth_factor=float(scaler_state["growth_factor"]),
        backoff_factor=float(scaler_state["backoff_factor"]),
        growth_interval=int(scaler_state["growth_interval"]),
    )


def train_torch_twin(
    name: str,
    twin_factory: Callable[[torch.nn.Module], TorchTwin | str],
    *,
    model_config: ModelConfig,
    init_state: Mapping[str, torch.Tensor],
    plan: DataPlan,
    settings: TrainSettings,
    make_scaler: Callable[[], Any] | None = None,
) -> RunResult | str:
    """Train a fresh copy of the model with its ``torch.optim`` twin (``loss.backward()``
    and ``optimizer.step()``); the reason as a string when there is no twin."""
    device = settings.device
    model = _make_model(model_config, init_state, device)
    twin = twin_factory(model)
    if isinstance(twin, str):
        return twin
    scaler = _torch_scaler(make_scaler(), device) if make_scaler is not None else None
    label = f"{name} [torch]"
    result = RunResult(label, "torch")
    timer = _Timer(device)
    tokens_per_step = settings.batch_size * settings.seq_len
    eval_at = _eval_steps(settings)
    bar = _progress(label, settings)
    with MemoryMeter(device) as memory:
        for step in range(settings.steps + 1):
            if step in eval_at:
                model.eval()
                _record_eval(result, step, evaluate(model, plan.val_batches, settings.precision))
                model.train()
            if step == settings.steps:
                break
            inputs, targets = plan.batch(step)
            # named as the optorch run names them: "lr", or "<partition label>/lr"
            lrs = {
                ("lr" if label is None else f"{label}/lr"): optimizer.param_groups[0]["lr"]
                for label, optimizer in zip(twin.labels, twin.optimizers, strict=True)
            }
            scale_before = float(scaler.get_scale()) if scaler is not None else None
            with timer.measure(optimizer_step=False):
                with autocast_context(settings.precision, device):
                    logits = model(inputs)
                loss = cross_entropy(logits, targets)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                if scaler is not None:
                    for optimizer in twin.optimizers:
                        scaler.unscale_(optimizer)
                with timer.measure(optimizer_step=True):
                    twin.step(scaler)
                if scaler is not None:
                    scaler.update()
            # optimizers leave .grad alone: its norm after the step is the step's
            grad_norm = float(
                _global_norm([p.grad for p in model.parameters() if p.grad is not None])
            )
            twin.zero_grad()
            memory.sample()
            loss_value = float(loss.detach())
            result.losses.append(loss_value)
            row: dict[str, Any] = {
                "optimizer": label,
                "impl": "torch",
                "step": step + 1,
                "tokens": (step + 1) * tokens_per_step,
                "train_loss": loss_value,
                **lrs,
                "grad_norm": grad_norm,
                "param_norm": float(_global_norm(list(model.parameters()))),
                "opt_step_ms": 1000.0 * timer.opt_seconds[-1],
            }
            if scaler is not None:
                row["loss_scale"] = float(scaler.get_scale())
                # GradScaler backs its scale off exactly when it skipped the step
                row["skipped"] = int(row["loss_scale"] < (scale_before or 0.0))
                result.skipped_steps += row["skipped"]
            for field_name, tensors in twin.state_tensors().items():
                row[f"{field_name}_norm"] = float(_global_norm(tensors))
                row[f"{field_name}_mean"] = float(
                    sum(t.float().sum() for t in tensors) / sum(t.numel() for t in tensors)
                )
            result.rows.append(row)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == settings.steps - 1:
                    rate = (step + 1) * tokens_per_step / max(timer.train_seconds, 1e-9)
                    bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
    if bar is not None:
        bar.close()
    model.eval()
    result.final_val_loss = result.rows[-1]["val_loss"]
    result.final_train_loss = evaluate(model, plan.train_eval_batches, settings.precision)
    result.tokens_per_s = timer.tokens_per_s(tokens_per_step)
    result.opt_step_ms = timer.opt_step_ms()
    result.peak_mem_mib = memory.mib
    result.state_mib = (
        sum(sum(t.numel() * t.element_size() for t in ts) for ts in twin.state_tensors().values())
        / 2**20
    )
    result.sample = generate(model, plan, settings, device=device)
    result.final_params = {k: v.detach().cpu().clone() for k, v in model.named_parameters()}
    return result
