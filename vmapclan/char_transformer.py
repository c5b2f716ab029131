"""A small causal character transformer: the model of the ``stdlib-chars`` task."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CharTransformer", "Block"]


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformer(nn.Module):
    """A small causal character transformer: token and position embeddings, blocks, a linear head.

    Args:
        vocab: Number of token ids.
        d_model: Width.
        n_layers: Blocks.
        n_heads: Attention heads.
        max_len: Longest sequence.
        dropout: Dropout probability.

    Example:
        >>> CharTransformer(128, 32, 1, 4, 16)(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 128])
    """

    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int, max_len: int, dropout: float = 0.0):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.Sequential(*[Block(d_model, n_heads, dropout) for _ in range(n_layers)])
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        with torch.no_grad():  # GPT-2 style small init keeps the first losses near log(vocab)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02)
            for block in self.blocks:
                block.proj.weight.mul_(1 / math.sqrt(2 * n_layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for token ids ``[B, T]``."""
        positions = torch.arange(idx.shape[-1], device=idx.device)
        return self.head(self.ln(self.blocks(self.tok(idx) + self.pos(positions))))


#: The built-in tasks by short name; ``config.task`` names one of them or a ``"module:ClassName"``.
