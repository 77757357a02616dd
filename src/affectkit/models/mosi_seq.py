"""MOSI sequence models: the lab's LSTM baseline (LayerNorm -> Linear+ReLU -> LSTM per modality -> sum ->
fusion LSTM -> last hidden -> Linear -> 6*sigmoid-3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from affectkit.data.mosi import MODALITIES
from affectkit.errors import ConfigError
from affectkit.models.registry import register_model


@dataclass
class MosiSeqConfig:
    """Config of the lab baseline. ``dropout`` is the recipe's LSTM dropout: with one layer it has no effect
    (torch applies it between layers only), so it is passed on only when ``num_layers > 1``."""

    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    hidden: int = 128
    num_layers: int = 1
    dropout: float = 0.1
    layernorm: bool = True

    def validate(self) -> None:
        mods = list(self.modalities)
        if not mods or len(set(mods)) != len(mods) or any(m not in MODALITIES for m in mods):
            raise ConfigError(
                f"model.modalities must be a non-empty subset of {list(MODALITIES)} without repeats, got {mods}"
            )
        if self.hidden < 1 or self.num_layers < 1:
            raise ConfigError("model.hidden and model.num_layers must be >= 1")


def ordered_modalities(modalities: list[str]) -> list[str]:
    """Modalities in the canonical (lab) order: vision, text, audio."""
    return [m for m in MODALITIES if m in modalities]


def check_dims(modalities: list[str], info: dict[str, Any]) -> dict[str, int]:
    dims = info.get("dims", {})
    missing = [m for m in modalities if m not in dims]
    if missing:
        raise ConfigError(f"model needs modality {missing[0]!r} but the data has only {', '.join(dims) or 'none'}")
    return {m: int(dims[m]) for m in modalities}


def _lstm(size: int, cfg: MosiSeqConfig) -> nn.LSTM:
    dropout = cfg.dropout if cfg.num_layers > 1 else 0.0
    return nn.LSTM(size, size, num_layers=cfg.num_layers, dropout=dropout, batch_first=True)


@register_model("lstm_baseline", MosiSeqConfig, task="mosi")
class LstmBaseline(nn.Module):
    """The lab's baseline: per-modality LSTMs, elementwise sum of their output sequences, a fusion LSTM."""

    def __init__(self, cfg: MosiSeqConfig, info: dict[str, Any]) -> None:
        super().__init__()
        self.modalities = ordered_modalities(cfg.modalities)
        dims = check_dims(self.modalities, info)
        h = cfg.hidden
        # Creation order (norms, projections, LSTMs, fusion, head) matches the lab, so a seeded init is equal.
        self.norms = nn.ModuleDict(
            {m: nn.LayerNorm(dims[m]) if cfg.layernorm else nn.Identity() for m in self.modalities}
        )
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], h) for m in self.modalities})
        self.encoders = nn.ModuleDict({m: _lstm(h, cfg) for m in self.modalities})
        self.fusion = _lstm(h, cfg)
        self.head = nn.Linear(h, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, D_m) per modality -> (B,) scores in (-3, 3)."""
        seqs = [self.encoders[m](F.relu(self.proj[m](self.norms[m](batch[m]))))[0] for m in self.modalities]
        fused = seqs[0]
        for seq in seqs[1:]:
            fused = fused + seq
        _, (h, _) = self.fusion(fused)
        return 6.0 * torch.sigmoid(self.head(h[-1])).squeeze(-1) - 3.0
