"""optorch foreach against torch.optim foreach, alternating steps in one process.

On a shared machine, timing the two back to back in alternation is fairer than two
separate runs: both see the same background load. Prints the median of each.

Usage: python benchmarks/interleaved.py --optimizer sgd --set small --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import optorch
from optorch import bench

TWINS = {
    "sgd": (torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}, {"max_lr": 1e-2, "momentum": 0.9}),
    "adamw": (
        torch.optim.AdamW,
        {"lr": 1e-3, "weight_decay": 0.01},
        {"max_lr": 1e-3, "weight_decay": 0.01},
    ),
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--optimizer", default="sgd", choices=sorted(TWINS))
    parser.add_argument("--set", default="small", choices=["gpt", "small", "tiny"])
    parser.add_argument("--impl", default="foreach", choices=["reference", "foreach", "compiled"])
    parser.add_argument("--steps", type=_positive, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cls, torch_kwargs, our_kwargs = TWINS[args.optimizer]
    params = bench.param_set(args.set)
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    for tensor, grad in zip(theirs, grads, strict=True):
        tensor.grad = grad.clone()
    torch_opt = cls(theirs, foreach=True, **torch_kwargs)
    opt = optorch.get_optimizer(args.optimizer, impl=args.impl, **our_kwargs)
    state = opt.init(params)
    torch_opt.step()
    opt.step(params, grads, state)
    ours, torchs = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        opt.step(params, grads, state)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        torch_opt.step()
        torchs.append(time.perf_counter() - start)
    mine, base = statistics.median(ours) * 1e3, statistics.median(torchs) * 1e3
    print(
        f"{args.optimizer} on {args.set}: optorch {args.impl} {mine:.1f} ms, "
        f"torch.optim foreach {base:.1f} ms, ratio {mine / base:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
