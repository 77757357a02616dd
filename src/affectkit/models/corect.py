"""CORECT: relational temporal graph + pairwise cross-modal attention for emotion recognition in conversation.

Per modality an encoder (text: a Transformer over the dialogue's utterances, then Linear to ``hidden``;
audio/visual: Linear-ReLU-Linear-ReLU), plus a speaker embedding. Then two views, concatenated per utterance:
the relational temporal graph (RGCNConv -> TransformerConv + BatchNorm + LeakyReLU over one node per
(utterance, modality), see :mod:`affectkit.graph`) and P-CM (for every ordered modality pair, queries of one
modality attend to the other, then self-attention per target modality). A classifier per utterance.
``causal: true`` makes every path past-only: ``wf = 0`` and causal masks in the text encoder and P-CM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import permutations
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from affectkit.errors import ConfigError
from affectkit.graph import build_graph, n_relations
from affectkit.models.attention import TransformerLayer, TransformerStack, attention_mask
from affectkit.models.registry import check_modalities, register_model

CONVERSATION_MODALITIES: tuple[str, ...] = ("text", "audio", "visual")


@dataclass
class CorectConfig:
    """Switches for every component; defaults are the CORECT reference recipe (IEMOCAP 6-way)."""

    modalities: list[str] = field(default_factory=lambda: list(CONVERSATION_MODALITIES))
    hidden: int = 100
    dropout: float = 0.5
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 2048
    use_speaker: bool = True
    use_gnn: bool = True
    wp: int = 11
    wf: int = 5
    graph_heads: int = 7
    use_pcm: bool = True
    pcm_layers: int = 2
    pcm_heads: int = 2
    pcm_self_layers: int = 3
    pcm_dropout: float = 0.1
    causal: bool = False

    def validate(self) -> None:
        check_modalities(self.modalities, CONVERSATION_MODALITIES)
        if self.wp < 0 or self.wf < 0:
            raise ConfigError(f"model.wp and model.wf must be >= 0, got wp={self.wp}, wf={self.wf}")
        if self.causal and self.wf > 0:
            raise ConfigError(f"a causal model cannot look at later utterances: set model.wf=0 (got {self.wf})")
        if self.hidden < 1:
            raise ConfigError("model.hidden must be >= 1")


class PairwiseCrossModal(nn.Module):
    """P-CM: for each target modality j, queries of j attend to every other modality k (a stack per pair);
    the outputs for j are concatenated and passed through self-attention layers."""

    def __init__(self, modalities: list[str], cfg: CorectConfig) -> None:
        super().__init__()
        h, n = cfg.hidden, len(modalities)
        self.modalities = modalities
        self.pairs = list(permutations(range(n), 2))
        self.cross = nn.ModuleDict({
            f"{modalities[j]}<-{modalities[k]}": nn.ModuleList(
                TransformerLayer(h, cfg.pcm_heads, 4 * h, cfg.pcm_dropout) for _ in range(cfg.pcm_layers))
            for j, k in self.pairs
        })
        width = (n - 1) * h
        self.fuse = nn.ModuleDict({
            m: TransformerStack(width, cfg.pcm_heads, 4 * width, cfg.pcm_dropout, cfg.pcm_self_layers)
            for m in modalities
        })
        self.out_dim = n * width

    def apply(self, feats: list[torch.Tensor],
              cross: Callable[[TransformerLayer, torch.Tensor, torch.Tensor], torch.Tensor],
              fuse: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The P-CM traversal, shared by the batch model and the streaming engine: for each target modality,
        ``cross(layer, x, kv)`` through each pair's stack, then ``fuse(modality, concatenated parts)``."""
        outs = []
        for j, mj in enumerate(self.modalities):
            parts = []
            for k, mk in enumerate(self.modalities):
                if k == j:
                    continue
                x = feats[j]
                for layer in self.cross[f"{mj}<-{mk}"]:
                    x = cross(layer, x, feats[k])
                parts.append(x)
            outs.append(fuse(mj, torch.cat(parts, dim=-1)))
        return torch.cat(outs, dim=-1)

    def forward(self, feats: list[torch.Tensor], valid: torch.Tensor, causal: bool) -> torch.Tensor:
        """``feats``: per modality (B, T, h) -> (B, T, M*(M-1)*h)."""
        t = feats[0].shape[1]
        mask = attention_mask(valid, t, t, causal)
        return self.apply(feats, lambda layer, x, kv: layer(x, mask, kv=kv),
                          lambda m, x: self.fuse[m](x, valid, causal))


class RelationalGraph(nn.Module):
    """RGCNConv then TransformerConv (+ BatchNorm, LeakyReLU) over the relational temporal graph."""

    def __init__(self, n_modalities: int, cfg: CorectConfig) -> None:
        super().__init__()
        from torch_geometric.nn import RGCNConv, TransformerConv

        h = cfg.hidden
        self.n_modalities, self.wp, self.wf = n_modalities, cfg.wp, cfg.wf
        self.rgcn = RGCNConv(h, h, n_relations(n_modalities))
        self.gt = TransformerConv(h, h, heads=cfg.graph_heads, concat=True)
        self.bn = nn.BatchNorm1d(h * cfg.graph_heads)
        self.out_dim = n_modalities * h * cfg.graph_heads

    def forward(self, packed: list[torch.Tensor], lengths: torch.Tensor) -> torch.Tensor:
        """``packed``: per modality (U, h) -> (U, M * heads * h)."""
        u = packed[0].shape[0]
        edge_index, edge_type = build_graph(lengths, self.n_modalities, self.wp, self.wf)
        x = self.rgcn(torch.cat(packed, dim=0), edge_index, edge_type)
        x = F.leaky_relu(self.bn(self.gt(x, edge_index)))
        return x.view(self.n_modalities, u, -1).transpose(0, 1).reshape(u, -1)


@register_model("corect", CorectConfig, task="conversation")
class Corect(nn.Module):
    """CORECT (EMNLP 2023): relational temporal graph + pairwise cross-modal attention, one label per utterance."""

    def __init__(self, cfg: CorectConfig, info: dict[str, Any]) -> None:
        super().__init__()
        self.cfg = cfg
        self.modalities = [m for m in CONVERSATION_MODALITIES if m in cfg.modalities]
        dims = info.get("dims", {})
        missing = [m for m in self.modalities if m not in dims]
        if missing:
            raise ConfigError(f"model needs modality {missing[0]!r}; the data holds {', '.join(dims) or 'none'}")
        h = cfg.hidden
        self.encoders = nn.ModuleDict()
        self.text_context: TransformerStack | None = None
        for m in self.modalities:
            d = int(dims[m])
            if m == "text":
                self.text_context = TransformerStack(d, cfg.text_heads, cfg.text_ff, cfg.dropout, cfg.text_layers)
                self.encoders[m] = nn.Linear(d, h)
            else:
                self.encoders[m] = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.speaker = nn.Embedding(max(int(info.get("n_speakers", 1)), 1), h) if cfg.use_speaker else None
        self.graph = RelationalGraph(len(self.modalities), cfg) if cfg.use_gnn else None
        self.pcm = PairwiseCrossModal(self.modalities, cfg) if cfg.use_pcm and len(self.modalities) > 1 else None
        width = (self.graph.out_dim if self.graph else 0) + (self.pcm.out_dim if self.pcm else 0)
        if width == 0:  # neither view: classify the encoded features directly
            width = len(self.modalities) * h
        n_classes = int(info["n_classes"])
        self.classifier = nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout),
                                        nn.Linear(h, n_classes))

    def encode(self, batch: Any) -> list[torch.Tensor]:
        """Per modality (B, T, h): encoders + speaker embedding."""
        out = []
        for m in self.modalities:
            x = batch.features[m]
            if m == "text" and self.text_context is not None:
                x = self.text_context(x, batch.mask, self.cfg.causal)
            x = self.encoders[m](x)
            if self.speaker is not None:
                x = x + self.speaker(batch.speakers)
            out.append(x)
        return out

    def forward(self, batch: Any) -> torch.Tensor:
        """A ConversationBatch -> logits (U, n_classes) for the packed real utterances (dialogue-major)."""
        feats = self.encode(batch)
        packed = [x[batch.mask] for x in feats]
        views = []
        if self.graph is not None:
            views.append(self.graph(packed, batch.lengths))
        if self.pcm is not None:
            views.append(self.pcm(feats, batch.mask, self.cfg.causal)[batch.mask])
        rep = torch.cat(views, dim=-1) if views else torch.cat(packed, dim=-1)
        return self.classifier(rep)
