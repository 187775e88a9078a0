r"""Train a small transformer with optorch AdamW on FSDP2: 2 ranks, CPU, gloo, loopback.

Each block and then the whole model go through ``fully_shard`` (FSDP2), so every
parameter is a ``DTensor`` holding one rank's rows. ``optimizer.init(params)`` makes
the AdamW moments ``DTensor`` shards of the same layout, and each step runs on the
local shards in place, with no communication of its own except one all-reduce: the
global gradient norm for clipping, :math:`\lVert g \rVert = (\sum_r \sum_i \lVert
g_i^{(r)} \rVert^2)^{1/2}` over the shards of every rank, the norm of the whole model.
The task is next-token prediction on sequences that follow a hidden permutation of the
vocabulary (:math:`x_{j+1} = \pi(x_j)`), so the loss falls from :math:`\ln V` to near
zero in a few dozen steps. With ``--checkpoint DIR`` the model and optimizer state are
written as a sharded DCP checkpoint, read back into a fresh model, and compared.

Run::

    python examples/fsdp_train.py                          # spawns 2 ranks itself
    torchrun --nproc-per-node 2 examples/fsdp_train.py     # or let torchrun start them
    python examples/fsdp_train.py --steps 100 --checkpoint /tmp/optorch-fsdp
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from optree import tree_leaves
from torch import nn

import optorch
from optorch import wrappers
from optorch.interop.distributed import gather_full, load_sharded, save_sharded

VOCAB = 16
SEQUENCE = 16


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP, each added back to the residual stream."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        normed = self.attention_norm(x)
        x = x + self.attention(normed, normed, normed, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.mlp_norm(x))


class TinyTransformer(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 4, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.position = nn.Parameter(torch.zeros(SEQUENCE, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(blocks))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits at every position, flattened to ``(batch * length, VOCAB)``
        (a fresh tensor: FSDP2 warns when a module returns a view)."""
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).flatten(0, 1))


def make_model() -> nn.Module:
    """The model, sharded: one FSDP2 unit per block, then the rest at the root."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyTransformer()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def make_batch(step: int, rank: int, batch: int) -> torch.Tensor:
    """This rank's sequences for ``step``: random starts, then the hidden permutation."""
    permutation = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(10_000 * step + rank)
    tokens = [torch.randint(VOCAB, (batch,), generator=gen)]
    for _ in range(SEQUENCE - 1):
        tokens.append(permutation[tokens[-1]])
    return torch.stack(tokens, dim=1)


def make_optimizer(steps: int, lr: float, clip: float) -> Any:
    """AdamW (decay on matrices only), warmup + cosine schedule, global-norm clipping."""
    schedule = functools.partial(
        optorch.schedule.cosine_lr,
        total_steps=steps,
        warmup_steps=max(1, steps // 10),
        warmup_start_value=0.0,
        lr_terminal_value=0.1,
    )
    adamw = optorch.get_optimizer(
        "adamw", max_lr=lr, betas=(0.9, 0.95), weight_decay=0.01, schedule=schedule
    )
    optimizer = wrappers.decay_mask(adamw)
    return wrappers.chain(wrappers.clip_by_global_norm(clip), optimizer) if clip else optimizer


def train(
    steps: int,
    *,
    batch: int = 8,
    lr: float = 3e-3,
    clip: float = 1.0,
    checkpoint: str | None = None,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Train on every rank of the current process group; the global loss of each step.

    ``log`` is called on rank 0 only.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    say = log if rank == 0 else (lambda _: None)
    model = make_model()
    params = dict(model.named_parameters())
    optimizer = make_optimizer(steps, lr, clip)
    state = optimizer.init(params)
    weight: Any = params["blocks.0.mlp.0.weight"]  # a DTensor
    say(
        f"{world} ranks; blocks.0.mlp.0.weight {tuple(weight.shape)} holds "
        f"{tuple(weight.to_local().shape)} per rank, placements {weight.placements}"
    )
    losses = []
    for step in range(steps):
        tokens = make_batch(step, rank, batch)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits, tokens[:, 1:].reshape(-1))
        loss.backward()
        grads = {name: p.grad for name, p in params.items()}
        optimizer.step(params, grads, state)  # in place, on the local shards
        for p in params.values():
            p.grad = None
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
        if step % 10 == 0 or step == steps - 1:
            say(f"step {step:4d}  loss {losses[-1]:.4f}")
    if checkpoint is not None:
        save_sharded(checkpoint, {"model": model.state_dict(), "optim": state})
        fresh = make_model()
        template = {
            "model": fresh.state_dict(),
            "optim": optimizer.init(dict(fresh.named_parameters())),
        }
        load_sharded(checkpoint, template)

        def identical(a: Any, b: Any) -> bool:
            leaves = zip(tree_leaves(gather_full(a)), tree_leaves(gather_full(b)), strict=True)
            return all(torch.equal(x, y) for x, y in leaves)

        same = identical(model.state_dict(), template["model"]) and identical(
            state, template["optim"]
        )
        say(
            f"checkpoint {checkpoint}: reloaded into a fresh model and optimizer state, "
            f"identical: {same}"
        )
    return losses


def _rank_main(rank: int, world: int, args: argparse.Namespace) -> None:
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    try:
        torch.set_num_threads(1)
        train(args.steps, batch=args.batch, lr=args.lr, clip=args.clip, checkpoint=args.checkpoint)
        # no rank tears the connection down while another still uses it (under torchrun
        # one rank aborted at exit now and then without this barrier)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clip", type=float, default=1.0, help="global-norm limit; 0: off")
    parser.add_argument("--ranks", type=int, default=2, help="without torchrun")
    parser.add_argument("--checkpoint", default=None, help="a folder for a DCP checkpoint")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # started by torchrun
        _rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args)
        return
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    mp.spawn(_rank_main, args=(args.ranks, args), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
