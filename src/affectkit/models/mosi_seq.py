"""MOSI sequence models: the lab's LSTM baseline and its ablations, one class with switches.

The baseline (all switches at their defaults): LayerNorm -> Linear+ReLU -> LSTM per modality -> elementwise
sum of the output sequences -> fusion LSTM -> last hidden state -> Linear -> 6*sigmoid-3. The switches swap
single parts for the lab's studies: ``encoder`` (LSTM or Transformer for every sequence encoder), ``fusion``
(add + encoder, self-attention over the concatenated modality sequences, MulT-style cross-modal attention),
``pos_encoding``, ``pool``, ``layernorm`` and ``modalities`` (any subset; the model reads only those keys).
With the defaults the modules, their creation order and the forward pass are exactly the lab's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from affectkit.data.mosi import MODALITIES
from affectkit.errors import ConfigError
from affectkit.models.attention import TransformerLayer, TransformerStack, attention_mask
from affectkit.models.registry import check_modalities, register_model

ENCODERS: tuple[str, ...] = ("lstm", "transformer")
FUSIONS: tuple[str, ...] = ("add", "self_attention", "cross_attention")
POS_ENCODINGS: tuple[str, ...] = ("sinusoidal", "learned", "none")
POOLS: tuple[str, ...] = ("last", "mean")


@dataclass
class MosiSeqConfig:
    """Config of the lab baseline and its switches; the defaults are the lab recipe.

    ``dropout`` is the recipe's LSTM dropout: with one layer it has no effect (torch applies it between layers
    only), so LSTMs get it only when ``num_layers > 1``; Transformer and attention layers always use it.
    ``pool``: ``last`` = the last step (the LSTM's last hidden state; MOSI is left-padded, so the last step is
    a real word), ``mean`` = mean over the real (not all-zero) steps. ``pos_encoding`` is added once, to each
    modality's projected input, when ``encoder`` is ``transformer`` (LSTMs know the order by themselves).
    """

    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    hidden: int = 128
    num_layers: int = 1
    dropout: float = 0.1
    layernorm: bool = True
    encoder: str = "lstm"  # lstm | transformer: every sequence encoder (per modality and the "add" fusion's)
    fusion: str = "add"  # add (sum -> fusion encoder) | self_attention | cross_attention
    pos_encoding: str = "sinusoidal"  # sinusoidal | learned | none (Transformer encoders only)
    pool: str = "last"  # last | mean (over real steps)
    heads: int = 4  # attention heads (Transformer encoders, attention fusions)
    ff_mult: int = 2  # feed-forward width = ff_mult * hidden in Transformer layers
    fusion_layers: int = 1  # layers of the attention fusions (per modality pair / per target)
    head_dropout: float = 0.0  # dropout on the pooled vector before the output layer

    def validate(self) -> None:
        check_modalities(self.modalities, MODALITIES)
        if self.hidden < 1 or self.num_layers < 1:
            raise ConfigError("model.hidden and model.num_layers must be >= 1")
        choices = (("encoder", self.encoder, ENCODERS), ("fusion", self.fusion, FUSIONS),
                   ("pos_encoding", self.pos_encoding, POS_ENCODINGS), ("pool", self.pool, POOLS))
        for key, value, valid in choices:
            if value not in valid:
                raise ConfigError(f"model.{key} {value!r} is not one of: {', '.join(valid)}")
        if self.uses_attention and (self.heads < 1 or self.hidden % self.heads):
            raise ConfigError(f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
        if self.ff_mult < 1 or self.fusion_layers < 1:
            raise ConfigError("model.ff_mult and model.fusion_layers must be >= 1")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.head_dropout < 1.0:
            raise ConfigError("model.dropout and model.head_dropout must lie in [0, 1)")

    @property
    def uses_attention(self) -> bool:
        return self.encoder == "transformer" or self.fusion != "add"


def ordered_modalities(modalities: list[str]) -> list[str]:
    """Modalities in the canonical (lab) order: vision, text, audio."""
    return [m for m in MODALITIES if m in modalities]


def check_dims(modalities: list[str], info: dict[str, Any]) -> dict[str, int]:
    dims = info.get("dims", {})
    missing = [m for m in modalities if m not in dims]
    if missing:
        have = ", ".join(dims) or "none"
        raise ConfigError(f"model needs modality {missing[0]!r} but the data has only {have}")
    return {m: int(dims[m]) for m in modalities}


def _lstm(size: int, cfg: MosiSeqConfig) -> nn.LSTM:
    dropout = cfg.dropout if cfg.num_layers > 1 else 0.0
    return nn.LSTM(size, size, num_layers=cfg.num_layers, dropout=dropout, batch_first=True)


def _stack(cfg: MosiSeqConfig, layers: int) -> TransformerStack:
    return TransformerStack(cfg.hidden, cfg.heads, cfg.ff_mult * cfg.hidden, cfg.dropout, layers)


def sinusoidal_encoding(length: int, dim: int) -> torch.Tensor:
    """The Transformer's fixed positional encoding (Vaswani et al. 2017), (length, dim)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


class PositionalEncoding(nn.Module):
    """Adds a sinusoidal (a buffer, not saved) or learned (a parameter) encoding of the step index."""

    def __init__(self, kind: str, max_len: int, dim: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        else:
            self.register_buffer("table", sinusoidal_encoding(max_len, dim), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.table.shape[0]:
            if self.kind == "learned":
                raise ConfigError(f"sequence of {x.shape[1]} steps is longer than the learned encoding "
                                  f"({self.table.shape[0]})")
            return x + sinusoidal_encoding(x.shape[1], x.shape[2]).to(x)
        return x + self.table[: x.shape[1]]


def real_steps(batch: dict[str, torch.Tensor], modalities: list[str]) -> torch.Tensor:
    """(B, T) bool: steps where any of ``modalities`` is non-zero (MOSI pads with all-zero steps). A clip with
    no real step counts every step as real, so attention always has a key."""
    valid = torch.stack([batch[m].abs().sum(-1) > 0 for m in modalities]).any(0)
    return valid | ~valid.any(1, keepdim=True)


def pool_steps(seq: torch.Tensor, valid: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, H) -> (B, H): the last step, or the mean over the real steps."""
    if how == "last":
        return seq[:, -1]
    w = valid.to(seq.dtype)[..., None]
    return (seq * w).sum(1) / w.sum(1).clamp_min(1.0)


class CrossModalStack(nn.Module):
    """Layers where the target sequence queries a source sequence (MulT's cross-modal transformer)."""

    def __init__(self, cfg: MosiSeqConfig, layers: int) -> None:
        super().__init__()
        ff = cfg.ff_mult * cfg.hidden
        self.layers = nn.ModuleList(TransformerLayer(cfg.hidden, cfg.heads, ff, cfg.dropout)
                                    for _ in range(layers))

    def forward(self, x: torch.Tensor, source: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask, kv=source)
        return x


@register_model("mosi_seq", MosiSeqConfig, task="mosi")
@register_model("lstm_baseline", MosiSeqConfig, task="mosi")
class MosiSeq(nn.Module):
    """The lab's baseline (per-modality LSTMs, sum, fusion LSTM) with switches: encoders, fusion, pooling."""

    def __init__(self, cfg: MosiSeqConfig, info: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = ordered_modalities(cfg.modalities)
        dims = check_dims(self.modalities, info)
        h = cfg.hidden
        # Creation order (norms, projections, LSTMs, fusion, head) matches the lab, so a seeded init is equal;
        # modules that only variants have (positional table, modality embeddings) never exist in the baseline.
        self.norms = nn.ModuleDict(
            {m: nn.LayerNorm(dims[m]) if cfg.layernorm else nn.Identity() for m in self.modalities}
        )
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], h) for m in self.modalities})
        self.pos: PositionalEncoding | None = None
        if cfg.encoder == "transformer" and cfg.pos_encoding != "none":
            self.pos = PositionalEncoding(cfg.pos_encoding, int(info.get("seq_len") or 50), h)
        if cfg.encoder == "lstm":
            self.encoders = nn.ModuleDict({m: _lstm(h, cfg) for m in self.modalities})
        else:
            self.encoders = nn.ModuleDict({m: _stack(cfg, cfg.num_layers) for m in self.modalities})
        self.fusion: nn.Module
        if cfg.fusion == "add":
            self.fusion = _lstm(h, cfg) if cfg.encoder == "lstm" else _stack(cfg, cfg.num_layers)
        elif cfg.fusion == "self_attention":
            self.modality_embedding = nn.Parameter(torch.randn(len(self.modalities), h) * 0.02)
            self.fusion = _stack(cfg, cfg.fusion_layers)
        else:
            self.fusion = nn.ModuleDict({f"{s}_to_{t}": CrossModalStack(cfg, cfg.fusion_layers)
                                         for t in self.modalities for s in self._sources(t)})
            self.fusion_self = nn.ModuleDict({m: _stack(cfg, cfg.fusion_layers) for m in self.modalities})
        self.head_drop = nn.Dropout(cfg.head_dropout) if cfg.head_dropout > 0 else nn.Identity()
        self.head = nn.Linear(h, 1)

    def _sources(self, target: str) -> list[str]:
        """The modalities a target attends to in cross-modal fusion (itself when it is alone)."""
        return [m for m in self.modalities if m != target] or [target]

    def _encode(self, batch: dict[str, torch.Tensor], valid: torch.Tensor | None) -> list[torch.Tensor]:
        if self.cfg.encoder == "lstm":
            return [self.encoders[m](F.relu(self.proj[m](self.norms[m](batch[m]))))[0]
                    for m in self.modalities]
        seqs = []
        for m in self.modalities:
            x = F.relu(self.proj[m](self.norms[m](batch[m])))
            seqs.append(self.encoders[m](x if self.pos is None else self.pos(x), valid, False))
        return seqs

    def _fuse(self, seqs: list[torch.Tensor], valid: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        if cfg.fusion == "add":
            fused = seqs[0]
            for seq in seqs[1:]:
                fused = fused + seq
            if cfg.encoder == "lstm":
                out, (h, _) = self.fusion(fused)
                return h[-1] if cfg.pool == "last" else pool_steps(out, valid, "mean")
            return pool_steps(self.fusion(fused, valid, False), valid, cfg.pool)
        t = seqs[0].shape[1]
        mask = attention_mask(valid, t, t, False)
        if cfg.fusion == "self_attention":
            tokens = torch.cat([s + self.modality_embedding[i] for i, s in enumerate(seqs)], dim=1)
            out = self.fusion(tokens, valid.repeat(1, len(seqs)), False)
            parts = out.split(t, dim=1)
        else:
            by_name = dict(zip(self.modalities, seqs))
            parts = []
            for target in self.modalities:
                sources = self._sources(target)
                z = sum(self.fusion[f"{s}_to_{target}"](by_name[target], by_name[s], mask) for s in sources)
                parts.append(self.fusion_self[target](z / len(sources), valid, False))
        pooled = [pool_steps(p, valid, cfg.pool) for p in parts]
        return torch.stack(pooled).mean(0)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, D_m) per modality -> (B,) scores in (-3, 3); reads only its own modalities."""
        needs_mask = self.cfg.uses_attention or self.cfg.pool == "mean"
        valid = real_steps(batch, self.modalities) if needs_mask else None
        pooled = self._fuse(self._encode(batch, valid), valid)
        return 6.0 * torch.sigmoid(self.head(self.head_drop(pooled))).squeeze(-1) - 3.0


#: The lab baseline's class under its historical name (the same class; defaults = the recipe).
LstmBaseline = MosiSeq
