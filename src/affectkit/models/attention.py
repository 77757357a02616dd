"""Attention layers shared by the sequence models: multi-head attention with padding and causal masks,
and a post-norm Transformer layer (self- or cross-attention) whose keys/values can be cached for streaming.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from affectkit.errors import ConfigError


def attention_mask(key_valid: torch.Tensor | None, n_queries: int, n_keys: int, causal: bool,
                   offset: int = 0) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S), True = may attend. ``causal``: query t (at absolute position
    ``offset + t``) sees keys at positions <= its own."""
    mask = None
    if key_valid is not None:
        mask = key_valid[:, None, None, :]
    if causal:
        q_pos = torch.arange(n_queries, device=key_valid.device if key_valid is not None else None) + offset
        k_pos = torch.arange(n_keys, device=q_pos.device)
        tri = (k_pos[None, :] <= q_pos[:, None])[None, None]
        mask = tri if mask is None else mask & tri
    return mask


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``heads`` heads; ``project_kv`` exposes keys/values for caching."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"attention width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dim // self.heads).transpose(1, 2)

    def project_kv(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, dim) -> keys and values (B, heads, S, dim/heads)."""
        return self._split(self.k(kv)), self._split(self.v(kv))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = self._split(self.q(x))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        k, v = self.project_kv(kv)
        return self.attend(x, k, v, mask)


class TransformerLayer(nn.Module):
    """Post-norm Transformer layer (as ``nn.TransformerEncoderLayer``, ReLU feed-forward); attends to ``kv``
    (cross-attention) or to ``x`` itself when ``kv`` is None."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ff(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor | None = None) -> torch.Tensor:
        return self.finish(x, self.attn(x, x if kv is None else kv, mask))


class TransformerStack(nn.Module):
    """Layers of self-attention over a padded sequence, with optional causal masking."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, ff, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, causal: bool) -> torch.Tensor:
        mask = attention_mask(valid, x.shape[1], x.shape[1], causal)
        for layer in self.layers:
            x = layer(x, mask)
        return x
