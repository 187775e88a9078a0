"""A whole train step under ``torch.compile(fullgraph=True)``: one graph, no recompiles.

The step does everything a training loop does between two batches:

1. the forward pass and the gradients, with ``torch.func.grad_and_value`` over
   ``functional_call`` (no ``.backward()``, no ``.grad`` fields);
2. optionally, dynamic loss scaling (:mod:`optorch.amp`): the loss is scaled, the
   gradients unscaled and checked for ``inf``/``NaN`` on the device, and a non-finite
   step is skipped with ``skip_if`` (params and state come back unchanged), all without
   a host sync;
3. the optimizer step, with a warmup + cosine schedule evaluated at the step count kept
   in the optimizer state (a 0-d int64 tensor).

Everything that changes from step to step (the step count, hence the scheduled learning
rate and the bias corrections; the loss scale) is a tensor, so dynamo traces the step
once and never recompiles. The script checks that (no graph break, one graph) and that
the compiled run reproduces an eager run of the same function.

Run::

    python examples/compiled_train_step.py                       # inductor, 60 steps
    python examples/compiled_train_step.py --backend aot_eager --loss-scaling --pure
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.utils
from torch.func import functional_call, grad_and_value

import optorch
from optorch import amp
from optorch.schedule import LRSchedulerConfig, build_lr_scheduler


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--optimizer", default="adamw", help="registry name")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--impl", default="auto", help="optorch engine (see docs/torch_func.md)")
    parser.add_argument("--pure", action="store_true", help="inplace=False: return new tensors")
    parser.add_argument("--loss-scaling", action="store_true", help="use optorch.amp")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # tiny tensors: a thread pool costs more than it saves
    if args.small:
        args.steps = min(args.steps, 20)
    dim, hidden, batch = (4, 8, 16) if args.small else (16, 64, 64)

    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    generator = torch.Generator().manual_seed(args.seed + 1)
    weights = torch.randn(dim, generator=generator) / dim**0.5
    x_all = torch.randn(args.steps, batch, dim, generator=generator)
    y_all = torch.sin(2.0 * x_all @ weights).unsqueeze(-1)

    schedule = build_lr_scheduler(
        LRSchedulerConfig(
            warmup_steps=max(1, args.steps // 10),
            total_steps=args.steps,
            scheduler_type="cosine",
            warmup_start_value=0.1,
            lr_terminal_value=0.1,
        )
    )
    opt = optorch.get_optimizer(
        args.optimizer, max_lr=args.lr, schedule=schedule, inplace=not args.pure, impl=args.impl
    )

    def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
        return ((functional_call(model, params, (x,)) - y) ** 2).mean()

    def train_step(params: Any, state: Any, scaler: Any, x: Any, y: Any) -> Any:
        if args.loss_scaling:

            def scaled_loss(p: Any) -> tuple[torch.Tensor, torch.Tensor]:
                loss = loss_fn(p, x, y)
                return amp.scale_loss(loss, scaler), loss

            grads, (_, loss) = grad_and_value(scaled_loss, has_aux=True)(params)
            out = amp.scaled_step(opt, params, grads, state, scaler)
            return out.params, out.opt_state, out.scaler_state, loss
        grads, loss = grad_and_value(loss_fn)(params, x, y)
        params, state = opt.step(params, grads, state)
        return params, state, scaler, loss

    def train(step_fn: Callable[..., Any], label: str) -> tuple[Any, Any, list[float]]:
        # copies of the model's tensors: each run starts from the same weights
        params = {k: v.detach().clone() for k, v in model.named_parameters()}
        state = opt.init(params)
        scaler = amp.init_grad_scaler(init_scale=2.0**10, growth_interval=10)
        losses = []
        start = time.perf_counter()
        for step in range(args.steps):
            params, state, scaler, loss = step_fn(params, state, scaler, x_all[step], y_all[step])
            losses.append(float(loss))
            if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
                lr = args.lr * float(schedule(state["step"] - 1))
                print(f"  [{label}] step {step + 1:4d}  lr {lr:.5f}  loss {float(loss):.5f}")
        print(f"  [{label}] {args.steps} steps in {time.perf_counter() - start:.1f} s")
        return params, state, losses

    mode = "pure" if args.pure else "in place"
    scaling = " + loss scaling" if args.loss_scaling else ""
    print(f"{args.optimizer} ({mode}, impl={args.impl}){scaling}, warmup + cosine schedule")
    eager_params, _, eager_losses = train(train_step, "eager")

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled_step = torch.compile(train_step, backend=args.backend, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile would raise
        params, state, losses = train(compiled_step, f"compiled, {args.backend}")

    graphs = counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    difference = max((params[k] - eager_params[k]).abs().max().item() for k in params)
    loss_difference = max(abs(a - b) for a, b in zip(losses, eager_losses, strict=True))
    # error_on_recompile=True above: reaching this line means nothing recompiled
    print(f"graphs compiled: {graphs}, graph breaks: {breaks}, recompiles: 0")
    print(
        f"max |compiled - eager|: params {difference:.2e} after {args.steps} steps, "
        f"losses {loss_difference:.2e}"
    )
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f}; optimizer step count {int(state['step'])}")
    return {"graphs": graphs, "breaks": breaks, "difference": difference, "losses": losses}


if __name__ == "__main__":
    main()
