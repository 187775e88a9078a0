r"""A small character-level decoder-only transformer, in plain ``torch.nn``.

Token and learned position embeddings, ``n_layers`` pre-LayerNorm blocks

.. math::

    h &\leftarrow h + W_o\,\mathrm{Attn}_{\text{causal}}(\mathrm{LN}_1(h)) \\
    h &\leftarrow h + W_2\,\mathrm{GELU}(W_1\,\mathrm{LN}_2(h))

with multi-head causal self-attention computed by
``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)``, a final
LayerNorm and a linear head to the vocabulary (tied to the token embedding with
``tie_embeddings``). Weights start at :math:`\mathcal N(0, 0.02^2)`, the residual
projections at :math:`0.02 / \sqrt{2 L}` (Radford et al. 2019, GPT-2), biases at zero.

Parameter names are stable (``tok_emb.weight``, ``blocks.0.attn.qkv.weight``, ...);
:func:`muon_label` sorts them into Muon's hidden matrices and AdamW's rest.

>>> import torch
>>> config = ModelConfig(vocab_size=10, seq_len=8, d_model=16, n_layers=1, n_heads=2)
>>> model = CharTransformer(config)
>>> model(torch.zeros(3, 8, dtype=torch.long)).shape
torch.Size([3, 8, 10])
>>> muon_label("blocks.0.mlp.fc.weight", model.blocks[0].mlp.fc.weight)
'muon'
>>> muon_label("tok_emb.weight", model.tok_emb.weight)
'adamw'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharTransformer", "ModelConfig", "muon_label"]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model. ``ValueError`` (naming the flag) for impossible shapes."""

    vocab_size: int
    seq_len: int
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for flag, value in (
            ("vocab size", self.vocab_size),
            ("--seq-len", self.seq_len),
            ("--d-model", self.d_model),
            ("--n-layers", self.n_layers),
            ("--n-heads", self.n_heads),
            ("mlp_ratio", self.mlp_ratio),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid {flag}: {value!r} (must be an int >= 1)")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"Invalid --n-heads: {self.n_heads} does not divide --d-model {self.d_model}"
            )


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        qkv = self.qkv(x).view(batch, time, 3, self.n_heads, width // self.n_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, time, width))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharTransformer(nn.Module):
    """Maps ``(B, T)`` character ids (``T <= seq_len``) to ``(B, T, vocab)`` logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                elif name.startswith("blocks") and ".ln_" in name:
                    param.fill_(1.0)
                elif name == "ln_f.weight":
                    param.fill_(1.0)
                elif name.endswith("proj.weight"):
                    param.normal_(0.0, residual_std)
                else:
                    param.normal_(0.0, 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        time = ids.shape[1]
        positions = torch.arange(time, device=ids.device)
        h = self.tok_emb(ids) + self.pos_emb(positions)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


def muon_label(path: str, param: torch.Tensor) -> str:
    """``"muon"`` for the 2-D weights of hidden layers, ``"adamw"`` for everything else
    (embeddings, the output head, biases, LayerNorm gains), as Muon's authors advise."""
    if param.ndim == 2 and path.startswith("blocks."):
        return "muon"
    return "adamw"
