"""A context-free baseline for conversations: an MLP on each utterance alone (no neighbours, no speaker).

It answers the question the CORECT table asks: how much does the conversation context add?
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from affectkit.errors import ConfigError
from affectkit.models.corect import CONVERSATION_MODALITIES
from affectkit.models.registry import check_modalities, register_model


@dataclass
class UtteranceMlpConfig:
    modalities: list[str] = field(default_factory=lambda: list(CONVERSATION_MODALITIES))
    hidden: int = 100
    layers: int = 2
    dropout: float = 0.5

    def validate(self) -> None:
        check_modalities(self.modalities, CONVERSATION_MODALITIES)
        if self.layers < 1 or self.hidden < 1:
            raise ConfigError("model.layers and model.hidden must be >= 1")


@register_model("utterance_mlp", UtteranceMlpConfig, task="conversation")
class UtteranceMlp(nn.Module):
    """Context-free baseline: concatenated features of one utterance -> MLP -> class logits."""

    def __init__(self, cfg: UtteranceMlpConfig, info: dict[str, Any]) -> None:
        super().__init__()
        self.modalities = [m for m in CONVERSATION_MODALITIES if m in cfg.modalities]
        dims = info.get("dims", {})
        missing = [m for m in self.modalities if m not in dims]
        if missing:
            raise ConfigError(f"model needs modality {missing[0]!r}; the data holds {', '.join(dims) or 'none'}")
        width = sum(int(dims[m]) for m in self.modalities)
        layers: list[nn.Module] = []
        for _ in range(cfg.layers):
            layers += [nn.Linear(width, cfg.hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = cfg.hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, int(info["n_classes"])))

    def forward(self, batch: Any) -> torch.Tensor:
        """A ConversationBatch -> logits (U, n_classes), each utterance on its own."""
        x = torch.cat([batch.features[m][batch.mask] for m in self.modalities], dim=-1)
        return self.net(x)
