r"""Learn a learning rate by gradient descent on a validation loss.

The inner loop trains a small MLP for ``--inner-steps`` steps with an optorch optimizer
in pure mode (``inplace=False``): each step returns new tensors, so the whole training
run is a differentiable function of its learning rate :math:`\eta`,

.. math::

    \theta_K(\eta) = \operatorname{step}(\cdots\operatorname{step}(\theta_0, g_0; \eta)
    \cdots; \eta), \qquad L_{\text{val}}(\eta) = \ell(\theta_K(\eta); D_{\text{val}}).

``torch.func.grad`` differentiates :math:`L_{\text{val}}` through all ``K`` steps (the
hypergradient of Maclaurin et al. 2015, arXiv:1502.03492; Baydin et al. 2017,
arXiv:1703.04782). The outer loop descends on :math:`\log\eta` (so the rate stays
positive) with optorch's Adam, in place on a plain tensor. The learning rate is passed
to the inner optimizer as a 0-d tensor (``max_lr=lr``) and flows through the schedule
and the update like any other tensor.

Run::

    python examples/hypergradient.py                 # 15 outer x 20 inner steps
    python examples/hypergradient.py --outer-steps 30 --inner-steps 40 --optimizer adamw
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch.func import grad, grad_and_value

import optorch

Params = dict[str, torch.Tensor]


def init_mlp(generator: torch.Generator, sizes: tuple[int, int, int]) -> Params:
    """A tanh MLP ``sizes[0] -> sizes[1] -> sizes[2]`` with 1/sqrt(fan-in) weights."""
    fan_in, hidden, out = sizes
    return {
        "w1": torch.randn(hidden, fan_in, generator=generator) / fan_in**0.5,
        "b1": torch.zeros(hidden),
        "w2": torch.randn(out, hidden, generator=generator) / hidden**0.5,
        "b2": torch.zeros(out),
    }


def mlp(params: Params, x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ params["w1"].T + params["b1"]) @ params["w2"].T + params["b2"]


def mse(params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((mlp(params, x) - y) ** 2).mean()


def make_data(
    generator: torch.Generator, batches: int, batch_size: int, dim: int
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """Training batches and a validation set from one noisy nonlinear target."""
    direction = torch.randn(dim, generator=generator) / dim**0.5

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(count, dim, generator=generator)
        noise = 0.05 * torch.randn(count, 1, generator=generator)
        return x, torch.sin(2.0 * x @ direction).unsqueeze(1) + noise

    return [sample(batch_size) for _ in range(batches)], sample(4 * batch_size)


def validation_loss_after_training(
    log_lr: torch.Tensor,
    params0: Params,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    validation: tuple[torch.Tensor, torch.Tensor],
    optimizer: str,
) -> torch.Tensor:
    """Train from ``params0`` with lr = exp(log_lr) for one pass over ``batches``."""
    inner = optorch.get_optimizer(optimizer, max_lr=log_lr.exp(), inplace=False)
    params, state = params0, inner.init(params0)
    for x, y in batches:
        params, state = inner.step(params, grad(mse)(params, x, y), state)
    return mse(params, *validation)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outer-steps", type=int, default=15, help="updates of the lr")
    parser.add_argument("--inner-steps", type=int, default=20, help="training steps unrolled")
    parser.add_argument("--optimizer", default="sgd", help="inner optimizer (registry name)")
    parser.add_argument("--init-lr", type=float, default=0.01)
    parser.add_argument("--meta-lr", type=float, default=0.2, help="outer Adam lr on log(lr)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    # tensors this small run fastest on one thread: a thread pool costs more than it saves
    torch.set_num_threads(args.threads)
    if args.small:
        args.outer_steps, args.inner_steps = min(args.outer_steps, 4), min(args.inner_steps, 5)

    generator = torch.Generator().manual_seed(args.seed)
    dim = 4 if args.small else 8
    params0 = init_mlp(generator, (dim, 8 if args.small else 32, 1))
    batches, validation = make_data(generator, args.inner_steps, 32, dim)

    # the outer optimizer is optorch too: Adam, in place, on {"log_lr": 0-d tensor}
    hyper = {"log_lr": torch.tensor(args.init_lr).log()}
    outer = optorch.get_optimizer("adam", max_lr=args.meta_lr)
    outer_state = outer.init(hyper)
    hypergradient = grad_and_value(validation_loss_after_training)

    start = time.perf_counter()
    history = []
    for outer_step in range(args.outer_steps + 1):
        d_log_lr, val_loss = hypergradient(
            hyper["log_lr"], params0, batches, validation, args.optimizer
        )
        lr = float(hyper["log_lr"].exp())
        history.append((lr, float(val_loss)))
        print(
            f"outer {outer_step:3d}  lr {lr:.5f}  val loss {float(val_loss):.5f}  "
            f"d val / d log lr {float(d_log_lr):+.4f}"
        )
        if outer_step < args.outer_steps:
            outer.step(hyper, {"log_lr": d_log_lr}, outer_state)
    (first_lr, first_loss), (last_lr, last_loss) = history[0], history[-1]
    print(
        f"learned lr {last_lr:.5f} (from {first_lr:.5f}): val loss {first_loss:.5f} -> "
        f"{last_loss:.5f} after {args.outer_steps} outer steps of {args.inner_steps} "
        f"{args.optimizer} steps ({time.perf_counter() - start:.1f} s)"
    )
    return {"history": history}


if __name__ == "__main__":
    main()
