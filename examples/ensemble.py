"""Train 8 MLPs at once, each with its own learning rate: one vmapped call per step.

``torch.func.stack_module_state`` stacks the parameters of ``--models`` independently
initialised MLPs along a new leading dimension. One train step is written for one
model (``functional_call`` for the forward pass, ``torch.func.grad`` for the gradients,
an optorch step in pure mode); ``torch.func.vmap`` runs it for all models in one call.
The learning rate is an argument of that step, so each model gets its own: the optimizer
config is built inside the vmapped function with ``max_lr=lr``, where ``lr`` is a 0-d
slice of the batched tensor of rates (``opt.step(..., hyper_overrides={"max_lr": lr})``
does the same with a config built once). The optimizer state, the int64 step counter
included, is batched like the params.

Run::

    python examples/ensemble.py                       # 8 AdamW models, 200 steps
    python examples/ensemble.py --optimizer lion --steps 500 --check
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import optorch

#: Learning-rate ranges worth sweeping, per optimizer family (log-spaced).
LR_RANGES: dict[str, tuple[float, float]] = {
    "sgd": (1e-3, 0.3),
    "lion": (1e-5, 1e-2),
}
DEFAULT_LR_RANGE = (1e-4, 1.0)


def make_model(dim: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )


def make_data(
    generator: torch.Generator, count: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(count, dim, generator=generator)
    weights = torch.randn(dim, generator=generator) / dim**0.5
    y = torch.sin(2.0 * x @ weights).unsqueeze(1) + 0.05 * torch.randn(
        count, 1, generator=generator
    )
    return x, y


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--optimizer", default="adamw", help="registry name")
    parser.add_argument("--check", action="store_true", help="compare with a separate run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    # tensors this small run fastest on one thread: a thread pool costs more than it saves
    torch.set_num_threads(args.threads)
    if args.small:
        args.steps = min(args.steps, 30)
    dim, hidden, batch = (4, 8, 32) if args.small else (8, 32, 64)

    torch.manual_seed(args.seed)
    models = [make_model(dim, hidden) for _ in range(args.models)]
    stacked, _ = stack_module_state(models)
    params = {name: tensor.detach() for name, tensor in stacked.items()}
    skeleton = copy.deepcopy(models[0]).to("meta")  # the structure only: no storage
    generator = torch.Generator().manual_seed(args.seed + 1)
    x_all, y_all = make_data(generator, args.steps * batch + 512, dim)
    x_train, y_train = x_all[:-512], y_all[:-512]  # a fresh batch every step
    x_val, y_val = x_all[-512:], y_all[-512:]
    low, high = LR_RANGES.get(args.optimizer, DEFAULT_LR_RANGE)
    lrs = torch.logspace(
        torch.log10(torch.tensor(low)), torch.log10(torch.tensor(high)), args.models
    )

    def loss_fn(model_params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Any:
        return ((functional_call(skeleton, model_params, (x,)) - y) ** 2).mean()

    def train_step(model_params: Any, state: Any, lr: torch.Tensor, x: Any, y: Any) -> Any:
        """One model's step; under vmap ``lr`` is this model's 0-d learning rate."""
        loss, grads = torch.func.grad_and_value(loss_fn)(model_params, x, y)[::-1]
        opt = optorch.get_optimizer(args.optimizer, max_lr=lr, inplace=False)
        model_params, state = opt.step(model_params, grads, state)
        return model_params, state, loss

    # every model sees the same batch (in_dims None); params, state and lr are batched
    ensemble_step = vmap(train_step, in_dims=(0, 0, 0, None, None))
    state = vmap(optorch.get_optimizer(args.optimizer, inplace=False).init)(params)
    start = time.perf_counter()
    losses = torch.zeros(args.models)
    for step in range(args.steps):
        x = x_train[step * batch : (step + 1) * batch]
        y = y_train[step * batch : (step + 1) * batch]
        params, state, losses = ensemble_step(params, state, lrs, x, y)
    elapsed = time.perf_counter() - start

    val_losses = vmap(loss_fn, in_dims=(0, None, None))(params, x_val, y_val)
    print(
        f"trained {args.models} models x {args.steps} {args.optimizer} steps in "
        f"{elapsed:.1f} s ({args.steps} vmapped calls); state step counts "
        f"{sorted(set(state['step'].tolist()))}"
    )
    print(f"{'lr':>10}  {'final train loss':>16}  {'val loss':>9}")
    for lr, train_loss, val_loss in zip(
        lrs.tolist(), losses.tolist(), val_losses.tolist(), strict=True
    ):
        print(f"{lr:10.2e}  {train_loss:16.5f}  {val_loss:9.5f}")
    best = int(val_losses.argmin())
    print(f"best lr {lrs[best].item():.2e} (val loss {val_losses[best].item():.5f})")

    result: dict[str, Any] = {"lrs": lrs, "val_losses": val_losses}
    if args.check:
        # the same model trained alone, eagerly, in place, with a Python float lr
        index = args.models // 2
        alone = optorch.get_optimizer(args.optimizer, max_lr=float(lrs[index]))
        own = {name: tensor[index].detach().clone() for name, tensor in stacked.items()}
        own_state = alone.init(own)
        for step in range(args.steps):
            x = x_train[step * batch : (step + 1) * batch]
            y = y_train[step * batch : (step + 1) * batch]
            own, own_state = alone.step(own, grad(loss_fn)(own, x, y), own_state)
        difference = max((params[k][index] - own[k]).abs().max().item() for k in own)
        print(f"check: model {index} trained alone differs by at most {difference:.2e}")
        result["difference"] = difference
    return result


if __name__ == "__main__":
    main()
