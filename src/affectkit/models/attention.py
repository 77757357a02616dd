"""Attention layers shared by the sequence models: multi-head attention with padding, causal and banded
(sliding-window) masks, on padded (B, T, D) sequences or on packed ones (:class:`Ragged`: the rows of every
sequence one after another, no padding anywhere: token-wise layers run on real rows only and attention stays
within each sequence), and a Transformer layer (self- or cross-attention), post-norm (as
``nn.TransformerEncoderLayer``) or pre-norm (as MulT's, whose stacks scale their inputs by sqrt(dim) and end
with a LayerNorm: what CORECT's P-CM uses).

Each layer has one forward that also steps: given a ``cache`` (a :class:`KVCache`, see
:mod:`affectkit.models.steps`) it runs on the newest utterance (or a prefill chunk of utterances) of live
sessions, stores their keys and values and attends to the ones the cache returns; without one it runs on
whole sequences.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from affectkit.errors import ConfigError
from affectkit.models.steps import StepState, in_window


def attention_mask(key_valid: torch.Tensor | None, n_queries: int, n_keys: int, causal: bool,
                   offset: int = 0, context: int | None = None) -> torch.Tensor | None:
    """Boolean mask (B or 1, 1, T, S), True = may attend. ``causal``: query t (at absolute position
    ``offset + t``) sees keys at positions <= its own; with ``context`` N only the N latest of them
    (itself and N - 1 earlier: :func:`~affectkit.models.steps.in_window`)."""
    mask = None
    if key_valid is not None:
        mask = key_valid[:, None, None, :]
    if causal:
        q_pos = torch.arange(n_queries, device=key_valid.device if key_valid is not None else None) + offset
        k_pos = torch.arange(n_keys, device=q_pos.device)
        band = in_window(q_pos[:, None], k_pos[None, :], context)[None, None]
        mask = band if mask is None else mask & band
    return mask


class Ragged:
    """Sequences packed one after another: the rows ``rows`` (B, T) marks in a padded batch, in row-major
    order, and the rule of who attends to whom within a sequence: every position (``causal`` False), the
    earlier ones, or the ``context`` latest.  Token-wise layers run on the packed rows only; attention pads
    its queries, keys and values for one masked scaled-dot-product call and packs the result again."""

    def __init__(self, rows: torch.Tensor, causal: bool = False, context: int | None = None) -> None:
        self.rows, self.causal, self.context = rows, causal, context
        self.index = rows.reshape(-1).nonzero().squeeze(1)
        t = rows.shape[1]
        self.mask = attention_mask(rows, t, t, causal, context=context)

    def pad(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        """Packed (U, D) -> padded (B, heads, T, D / heads), zeros at padding."""
        b, t = self.rows.shape
        full = x.new_zeros((b * t, x.shape[1])).index_copy(0, self.index, x)
        return full.view(b, t, heads, -1).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, dropout: float,
               sink: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled dot-product attention of packed (U, D) queries to the keys/values of their own sequence
        (and to ``sink``, see :func:`with_sink`)."""
        k4, v4, mask = with_sink(self.pad(k, heads), self.pad(v, heads), self.mask, sink)
        y = F.scaled_dot_product_attention(self.pad(q, heads), k4, v4, attn_mask=mask, dropout_p=dropout)
        return y.transpose(1, 2).reshape(-1, q.shape[1])[self.index]


def with_sink(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              sink: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Keys and values (B, heads, S, d) with one more position, the learned ``sink`` (2, heads * d: its key
    and its value), that every query may attend to: a place for attention weight that reads no utterance,
    the same for every dialogue and every batch (None: unchanged)."""
    if sink is None:
        return k, v, mask
    b, h, _, d = k.shape
    sk, sv = (s.view(1, h, 1, d).expand(b, h, 1, d) for s in sink)
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones((*mask.shape[:-1], 1))], dim=-1)
    return torch.cat([k, sk], dim=2), torch.cat([v, sv], dim=2), mask


class KVCache:
    """The keys and values one attention layer keeps for live sessions: rows ``key``.k / ``key``.v of a
    :class:`~affectkit.models.steps.Ring` (keys stored before the split into heads)."""

    __slots__ = ("ring", "key")

    def __init__(self, state: StepState, key: str, group: str = "attention") -> None:
        self.ring, self.key = state.rings[group], key

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's keys/values (B, count, D); return those the step reads (see
        :meth:`~affectkit.models.steps.Ring.write`)."""
        return self.ring.write(self.key + ".k", k), self.ring.write(self.key + ".v", v)

    def mask(self) -> torch.Tensor | None:
        """Which of those keys each of the step's queries may attend to (None for all)."""
        return self.ring.mask()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``heads`` heads."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, sink: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"attention width {dim} is not divisible by {heads} heads")
        self.dim, self.heads, self.dropout = dim, heads, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        # a learned key and value every query may attend to (with_sink); zeros: logit 0, nothing read
        self.sink = nn.Parameter(torch.zeros(2, dim)) if sink else None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, seqs: Ragged | None = None) -> torch.Tensor:
        """``x`` (B, T, dim) attends to ``kv`` (B, S, dim); with ``cache``, ``kv`` is the newest step's and
        is attended to together with the cached ones (``mask`` then comes from the cache).  With ``seqs``,
        ``x`` and ``kv`` are packed rows (U, dim) of those sequences (``mask`` unused)."""
        k, v = self.k(kv), self.v(kv)
        p = self.dropout if self.training else 0.0
        if seqs is not None:
            return self.out(seqs.attend(self.q(x), k, v, self.heads, p, self.sink))
        if cache is not None:
            k, v = cache.update(k, v)
            mask = cache.mask()
        q = self._split(self.q(x))
        k4, v4, mask = with_sink(self._split(k), self._split(v), mask, self.sink)
        y = F.scaled_dot_product_attention(q, k4, v4, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.dim))


class TransformerLayer(nn.Module):
    """Transformer layer with a ReLU feed-forward; attends to ``kv`` (cross-attention) or to ``x`` itself
    when ``kv`` is None.  Post-norm (``norm_first`` False, as ``nn.TransformerEncoderLayer``): add, then
    LayerNorm.  Pre-norm (as MulT's layer): LayerNorm the branch input (queries and, with the same norm,
    keys/values), add the branch to the untouched residual stream."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float, norm_first: bool = False,
                 sink: bool = False) -> None:
        super().__init__()
        self.norm_first = norm_first
        self.attn = MultiHeadAttention(dim, heads, dropout, sink)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ff, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.drop1 = nn.Dropout(dropout)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor | None = None,
                cache: KVCache | None = None, seqs: Ragged | None = None) -> torch.Tensor:
        if self.norm_first:
            h = self.norm1(x)
            x = x + self.drop1(self.attn(h, h if kv is None else self.norm1(kv), mask, cache, seqs))
            return x + self.drop2(self.ff(self.norm2(x)))
        x = self.norm1(x + self.drop1(self.attn(x, x if kv is None else kv, mask, cache, seqs)))
        return self.norm2(x + self.drop2(self.ff(x)))


def xavier_init(layer: TransformerLayer) -> None:
    """MulT's / fairseq's initialisation of a layer: Xavier-uniform weights (query, key and value as one
    (3 dim, dim) matrix, as its packed projection), zero biases."""
    for lin in (layer.attn.q, layer.attn.k, layer.attn.v, layer.attn.out, layer.ff[0], layer.ff[3]):
        gain = math.sqrt(0.5) if lin in (layer.attn.q, layer.attn.k, layer.attn.v) else 1.0
        nn.init.xavier_uniform_(lin.weight, gain=gain)
        nn.init.zeros_(lin.bias)


def mha_init(layer: TransformerLayer) -> None:
    """``nn.MultiheadAttention``'s initialisation of a layer's attention (as in ``nn.TransformerEncoderLayer``):
    query, key and value Xavier-uniform as one (3 dim, dim) matrix, zero biases for them and the output
    projection (whose weight, like the feed-forward's, keeps ``nn.Linear``'s draw)."""
    for lin in (layer.attn.q, layer.attn.k, layer.attn.v):
        nn.init.xavier_uniform_(lin.weight, gain=math.sqrt(0.5))
        nn.init.zeros_(lin.bias)
    nn.init.zeros_(layer.attn.out.bias)


class TransformerStack(nn.Module):
    """Layers of self-attention (or of cross-attention to ``kv``) over a padded sequence, with optional
    causal (and banded) masking.  ``norm_first``: pre-norm layers and a final LayerNorm; ``scale``: inputs
    multiplied by sqrt(dim) first (MulT's encoder).  With ``state`` it steps the newest utterance of live
    sessions, layer ``i`` caching under ``name.i``.  With ``seqs`` the sequences are packed (:class:`Ragged`,
    which then holds the masking rule: ``valid``, ``causal`` and ``context`` are unused).  ``sink``: every
    attention layer has a learned key/value besides the sequence's (:func:`with_sink`)."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float, layers: int, norm_first: bool = False,
                 scale: bool = False, sink: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, ff, dropout, norm_first, sink)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(dim) if norm_first else None
        self.input_scale = math.sqrt(dim) if scale else 1.0

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, causal: bool, context: int | None = None,
                state: StepState | None = None, name: str = "stack", kv: torch.Tensor | None = None,
                seqs: Ragged | None = None) -> torch.Tensor:
        mask = None if state is not None or seqs is not None else attention_mask(valid, x.shape[1], x.shape[1],
                                                                                  causal, context=context)
        if self.input_scale != 1.0:
            x = x * self.input_scale
            kv = None if kv is None else kv * self.input_scale
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, kv=kv, cache=None if state is None else KVCache(state, f"{name}.{i}"), seqs=seqs)
        return x if self.norm is None else self.norm(x)
