"""CORECT: relational temporal graph + pairwise cross-modal attention for emotion recognition in conversation.

Per modality an encoder (text: a Transformer over the dialogue's utterances, then Linear to ``hidden``;
audio/visual: Linear-ReLU-Linear-ReLU), plus a speaker embedding. Then two views, concatenated per utterance:
the relational temporal graph (RGCNConv -> TransformerConv + BatchNorm + LeakyReLU over one node per
(utterance, modality), see :mod:`affectkit.graph`) and P-CM (for every ordered modality pair, queries of one
modality attend to the other, then self-attention per target modality). A classifier per utterance.
``causal: true`` makes every path past-only: ``wf = 0`` and causal masks in the text encoder and P-CM;
``context: N`` narrows those masks to a band (each utterance attends to itself and N - 1 earlier ones).

A causal CORECT also steps: ``model(batch, state)`` with a :class:`~affectkit.models.steps.StepState`
from :meth:`Corect.init_state` runs the next utterance of live sessions through the same layers, each
keeping what later utterances need (attention keys/values, the graph's last ``wp + 1`` node rows) in ring
buffers sized by the model (``context``, ``wp``).  ``affectkit.stream`` is a session on top of that.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from itertools import permutations
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from affectkit.errors import ConfigError
from affectkit.graph import build_graph, n_relations
from affectkit.models.attention import Ragged, TransformerLayer, TransformerStack, mha_init, xavier_init
from affectkit.models.graph_layers import GraphAttention, RelationalConv
from affectkit.models.registry import check_modalities, register_model
from affectkit.models.steps import Ring, StepState

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
    pcm_norm: str = "pre"  # pre: pre-norm layers + a final LayerNorm per stack (MulT, the reference); post
    pcm_scale: bool = True  # P-CM stacks multiply their inputs by sqrt(width) first (MulT, the reference)
    pcm_init: str = "xavier"  # xavier: MulT's Xavier-uniform weights, zero biases; torch: nn.Linear's default
    mask_padding: bool = True  # attention never reads padded utterances (the reference attends to them)
    pad_attention_in_training: bool = False  # with mask_padding: attend to padding while training only (the
    #                                          reference's batch-dependent damping as a regulariser); never when
    #                                          evaluating or serving, so answers stay batch-invariant
    attention_sink: bool = False  # every attention layer (text stack, P-CM) also attends to a learned
    #                               key/value, the same for every dialogue and batch (issue 22: what the
    #                               reference's attention to padding gave, without reading padding)
    pcm_sink: bool = False  # the same learned key/value in P-CM's layers only (the text stack keeps none); a
    #                         text-only model has no P-CM, so this never changes one
    text_init: str = "linear"  # text stack: nn.Linear's default draws; mha: nn.TransformerEncoderLayer's
    #                            (Xavier q/k/v as one matrix, zero attention biases); mha_clone: mha, every
    #                            layer a copy of the first (nn.TransformerEncoder's, the reference's encoder)
    causal: bool = False
    context: int | None = None  # causal attention window (self + N - 1 earlier); None: the whole past
    speaker_mode: str = "tags"  # tags: one embedding per speaker tag of the file; per_dialogue: by order of
    #                             first appearance in each dialogue (live sessions with any names)

    #: Values of later fields that checkpoints written before them were trained with (see checkpoint.load_model).
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {"pcm_norm": "post", "pcm_scale": False, "pcm_init": "torch",
                                                 "mask_padding": True, "text_init": "linear",
                                                 "attention_sink": False, "pad_attention_in_training": False,
                                                 "pcm_sink": False}

    def inert_fields(self) -> set[str]:
        """Fields that change nothing in the model as built with the rest: P-CM's without a P-CM (one modality,
        or ``use_pcm`` false), the text stack's without text (a finished run is still the same model)."""
        inert = set()
        if not (self.use_pcm and len(self.modalities) > 1):
            inert |= {f.name for f in fields(self) if f.name.startswith("pcm_")}
        if "text" not in self.modalities:
            inert |= {f.name for f in fields(self) if f.name.startswith("text_")}
        return inert

    def validate(self) -> None:
        check_modalities(self.modalities, CONVERSATION_MODALITIES)
        if self.wp < 0 or self.wf < 0:
            raise ConfigError(f"model.wp and model.wf must be >= 0, got wp={self.wp}, wf={self.wf}")
        if self.causal and self.wf > 0:
            raise ConfigError(f"a causal model cannot look at later utterances: set model.wf=0 (got {self.wf})")
        if self.hidden < 1:
            raise ConfigError("model.hidden must be >= 1")
        if self.context is not None:
            if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
                raise ConfigError(f"model.context must be null or an integer >= 1, got {self.context!r}")
            if not self.causal:
                raise ConfigError("model.context (an attention window over past utterances) needs model.causal: true")
        if self.pad_attention_in_training and not self.mask_padding:
            raise ConfigError("model.pad_attention_in_training needs model.mask_padding: true (without the mask, "
                              "attention reads padding always)")
        if self.pcm_norm not in ("pre", "post"):
            raise ConfigError(f"model.pcm_norm must be pre or post, got {self.pcm_norm!r}")
        if self.pcm_init not in ("xavier", "torch"):
            raise ConfigError(f"model.pcm_init must be xavier or torch, got {self.pcm_init!r}")
        if self.text_init not in TEXT_INITS:
            raise ConfigError(f"model.text_init must be one of {', '.join(TEXT_INITS)}, got {self.text_init!r}")
        if self.speaker_mode not in SPEAKER_MODES:
            raise ConfigError(f"model.speaker_mode must be one of {', '.join(SPEAKER_MODES)}, "
                              f"got {self.speaker_mode!r}")


SPEAKER_MODES: tuple[str, ...] = ("tags", "per_dialogue")
TEXT_INITS: tuple[str, ...] = ("linear", "mha", "mha_clone")


def first_appearance_slots(speakers: torch.Tensor, valid: torch.Tensor, n_slots: int) -> torch.Tensor:
    """Each dialogue's speaker indices (B, T) renumbered by order of first appearance (the first to speak
    is 0, the next new one 1, ...); padding gets 0.  ``n_slots``: how many indices there are (>= max + 1)."""
    b, t = speakers.shape
    when = torch.where(valid, torch.arange(t, device=speakers.device).expand(b, t), t)
    first = torch.full((b, n_slots), t, dtype=torch.long, device=speakers.device)
    first = first.scatter_reduce(1, speakers, when, "amin")
    rank = (first[:, None, :] < first[:, :, None]).sum(-1)  # (B, n_slots): speakers seen before this one
    return torch.where(valid, rank.gather(1, speakers), 0)


class PairwiseCrossModal(nn.Module):
    """P-CM: for each target modality j, queries of j attend to every other modality k (a stack per pair);
    the outputs for j are concatenated and passed through self-attention layers.  Each stack is MulT's
    (the reference's) by default: inputs scaled by sqrt(width), pre-norm layers, a final LayerNorm."""

    def __init__(self, modalities: list[str], cfg: CorectConfig) -> None:
        super().__init__()
        h, n = cfg.hidden, len(modalities)
        self.modalities = modalities
        self.pairs = list(permutations(range(n), 2))
        pre = cfg.pcm_norm == "pre"

        def stack(dim: int, layers: int) -> TransformerStack:
            return TransformerStack(dim, cfg.pcm_heads, 4 * dim, cfg.pcm_dropout, layers, pre, cfg.pcm_scale,
                                    sink=cfg.attention_sink or cfg.pcm_sink)

        self.cross = nn.ModuleDict({f"{modalities[j]}<-{modalities[k]}": stack(h, cfg.pcm_layers)
                                    for j, k in self.pairs})
        width = (n - 1) * h
        self.fuse = nn.ModuleDict({m: stack(width, cfg.pcm_self_layers) for m in modalities})
        self.out_dim = n * width
        if cfg.pcm_init == "xavier":
            for module in self.modules():
                if isinstance(module, TransformerLayer):
                    xavier_init(module)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Checkpoints written before the cross stacks were TransformerStacks: ``cross.X<-Y.i.`` -> ``.layers.i.``
        for key in [k for k in state_dict if k.startswith(prefix + "cross.")]:
            pair, rest = key[len(prefix) + 6:].split(".", 1)
            if rest.split(".", 1)[0].isdigit():
                state_dict[f"{prefix}cross.{pair}.layers.{rest}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, feats: list[torch.Tensor], seqs: Ragged | None, state: StepState | None = None) -> torch.Tensor:
        """``feats``: per modality packed rows (U, h) of the sequences ``seqs`` -> (U, M*(M-1)*h).  With
        ``state``: (B, count, h), the newest utterances of each live session; every layer caches under its
        own name."""
        outs = []
        for j, mj in enumerate(self.modalities):
            parts = [self.cross[f"{mj}<-{mk}"](feats[j], None, False, None, state, f"pcm.{mj}<-{mk}", kv=feats[k],
                                                seqs=seqs)
                     for k, mk in enumerate(self.modalities) if k != j]
            outs.append(self.fuse[mj](torch.cat(parts, dim=-1), None, False, None, state, f"pcm.{mj}", seqs=seqs))
        return torch.cat(outs, dim=-1)


class RelationalGraph(nn.Module):
    """RGCN then a graph transformer (+ BatchNorm, LeakyReLU) over the relational temporal graph
    (:mod:`affectkit.models.graph_layers`: PyG's RGCNConv and TransformerConv, computed densely)."""

    def __init__(self, n_modalities: int, cfg: CorectConfig) -> None:
        super().__init__()
        h = cfg.hidden
        self.n_modalities, self.wp, self.wf = n_modalities, cfg.wp, cfg.wf
        self.rgcn = RelationalConv(h, h, n_relations(n_modalities))
        self.gt = GraphAttention(h, h, cfg.graph_heads)
        self.bn = nn.BatchNorm1d(h * cfg.graph_heads)
        self.out_dim = n_modalities * h * cfg.graph_heads

    def forward(self, packed: list[torch.Tensor], lengths: torch.Tensor,
                state: StepState | None = None) -> torch.Tensor:
        """``packed``: per modality (U, h) -> (U, M * heads * h).  With ``state``: U = B * count, the
        step's utterances of each live session; their nodes are computed on the window of the step's
        utterances and up to ``wp`` earlier ones, whose node rows and RGCN outputs the ``graph`` ring keeps."""
        m = self.n_modalities
        if state is None:
            edge_index, edge_type = build_graph(lengths, m, self.wp, self.wf)
            x = self.gt(self.rgcn(torch.cat(packed, dim=0), edge_index, edge_type), edge_index, lengths, m)
            return _by_utterance(F.leaky_relu(self.bn(x)), m)
        ring, pos, c = state.rings["graph"], state.lengths, state.count
        b = pos.shape[0]
        ring.write("nodes", torch.cat(packed, dim=-1).view(b, c, -1))  # (B, count, M * h)
        rows, w = ring.window_rows("nodes", pos)
        edge_index, edge_type, newest = _newest_edges(tuple(w.tolist()), m, self.wp, c, rows.device)
        r = self.rgcn(_by_modality(rows, m), edge_index, edge_type)
        ring.write("rgcn", _by_utterance(r, m)[newest].view(b, c, -1))
        rows, _ = ring.window_rows("rgcn", pos)
        x = self.gt(_by_modality(rows, m), edge_index, w, m)
        x = x.view(m, -1, x.shape[-1])[:, newest].reshape(-1, x.shape[-1])  # newest nodes, modality-major
        return _by_utterance(F.leaky_relu(self.bn(x)), m)


def _by_modality(rows: torch.Tensor, m: int) -> torch.Tensor:
    """(U, M * D) utterance rows -> (M * U, D) graph nodes, modality-major (see :mod:`affectkit.graph`)."""
    u = rows.shape[0]
    return rows.view(u, m, -1).transpose(0, 1).reshape(m * u, -1)


def _by_utterance(nodes: torch.Tensor, m: int) -> torch.Tensor:
    """(M * U, D) modality-major graph nodes -> (U, M * D) utterance rows."""
    u = nodes.shape[0] // m
    return nodes.view(m, u, -1).transpose(0, 1).reshape(u, -1)


@functools.lru_cache(maxsize=256)
def _newest_edges(lengths: tuple[int, ...], m: int, wp: int, count: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The causal graph of windows of ``lengths`` utterances (:func:`build_graph`, wf 0) restricted to the
    edges into each window's ``count`` newest utterances, and those utterances' packed indices."""
    lens = torch.tensor(lengths, device=device)
    edge_index, edge_type = build_graph(lens, m, wp, 0)
    newest = (torch.cumsum(lens, 0)[:, None] - count + torch.arange(count, device=device)).reshape(-1)
    is_newest = torch.zeros(int(lens.sum()), dtype=torch.bool, device=device)
    is_newest[newest] = True
    keep = is_newest.repeat(m)[edge_index[1]]
    return edge_index[:, keep].contiguous(), edge_type[keep].contiguous(), newest


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
                self.text_context = TransformerStack(d, cfg.text_heads, cfg.text_ff, cfg.dropout, cfg.text_layers,
                                                     sink=cfg.attention_sink)
                if cfg.text_init != "linear":
                    for i, layer in enumerate(self.text_context.layers):
                        if i and cfg.text_init == "mha_clone":
                            layer.load_state_dict(self.text_context.layers[0].state_dict())
                        else:
                            mha_init(layer)
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

    def encode(self, batch: Any, state: StepState | None,
               rows: torch.Tensor) -> tuple[list[torch.Tensor], Ragged | None]:
        """Per modality the encoded utterances plus the speaker embedding, and the sequences they form.
        Batch mode: packed rows (U, h) of the (B, T) positions ``rows`` (the real utterances, or every
        position with ``mask_padding`` false), no padding computed anywhere; with ``state``: (B, count, h),
        the step's utterances, and None (``rows`` unused)."""
        cfg = self.cfg
        speakers = batch.speakers
        if self.speaker is not None and cfg.speaker_mode == "per_dialogue" and state is None:
            speakers = first_appearance_slots(speakers, batch.mask, self.speaker.num_embeddings)
        seqs = None
        if state is None:
            seqs = Ragged(rows, cfg.causal, cfg.context)
            speakers = speakers[rows]
        out = []
        for m in self.modalities:
            x = batch.features[m] if state is not None else batch.features[m][rows]
            if m == "text" and self.text_context is not None:
                x = self.text_context(x, None, cfg.causal, cfg.context, state, "text", seqs=seqs)
            x = self.encoders[m](x)
            if self.speaker is not None:
                x = x + self.speaker(speakers)
            out.append(x)
        return out, seqs

    def forward(self, batch: Any, state: StepState | None = None) -> torch.Tensor:
        """A ConversationBatch -> logits (U, n_classes) for the packed real utterances (dialogue-major).

        With ``state`` (causal models, :meth:`init_state`): ``batch`` holds the next utterance of each of
        the state's B sessions (T = 1, speakers already embedding rows), the same layers step it, and the
        state moves on by one utterance when the forward succeeds (a failure leaves it as it was).  T > 1 is
        a prefill chunk: the next T utterances of each session at once, equal to T single steps (a failure
        half-way may leave rows the sessions still read changed: prefill into a state of its own)."""
        if state is not None:
            self._check_step(batch, state)
            state.begin(int(batch.mask.shape[1]))
        # mask_padding false (or pad_attention_in_training while training): the stacks also run on (and attend
        # to) padded positions, as the reference does
        masked = self.cfg.mask_padding and not (self.cfg.pad_attention_in_training and self.training)
        rows = batch.mask if masked or state is not None else torch.ones_like(batch.mask)
        feats, seqs = self.encode(batch, state, rows)
        real = None if rows is batch.mask else batch.mask[rows]

        def packed(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(-1, x.shape[-1])
            return x if real is None else x[real]

        views = []
        if self.graph is not None:
            views.append(self.graph([packed(x) for x in feats], batch.lengths, state))
        if self.pcm is not None:
            views.append(packed(self.pcm(feats, seqs, state)))
        rep = torch.cat(views, dim=-1) if views else torch.cat([packed(x) for x in feats], dim=-1)
        out = self.classifier(rep)
        if state is not None:
            state.advance()
        return out

    def init_state(self, batch: int = 1, rewind: int = 0, device: torch.device | str | None = None) -> StepState:
        """An empty step state for ``batch`` live sessions, bounded by the model: attention caches of
        ``context`` utterances (growing ones when ``context`` is null) and graph rows of the last ``wp + 1``,
        each with ``rewind`` spare slots so a session can step back that many utterances exactly."""
        if not self.cfg.causal or self.cfg.wf:
            raise ConfigError("only a causal model (model.causal: true, wf: 0) can step utterance by utterance")
        if device is None:
            device = next(self.parameters()).device
        device = torch.device(device)
        ctx = self.cfg.context
        rings = {"attention": Ring(batch, ctx, None if ctx is None else ctx + rewind, device)}
        if self.graph is not None:
            rings["graph"] = Ring(batch, self.cfg.wp + 1, self.cfg.wp + 1 + rewind, device)
        return StepState(torch.zeros(batch, dtype=torch.long, device=device), rings)

    def state_reach(self) -> int | None:
        """How many utterances before the oldest row a step state keeps its rows depend on (None: all of
        them, a model without ``context`` that has attention layers).  Each banded attention layer looks
        ``context - 1`` utterances further back, the graph's RGCN ``wp``; the sum along the longest path
        (text stack, then P-CM's cross and self layers, or the graph) bounds it.  So a state rebuilt from
        only the last ``capacity + reach`` utterances of a log holds exactly the rows of the whole log."""
        cfg = self.cfg
        attends = self.text_context is not None or self.pcm is not None
        if cfg.context is None and attends:
            return None
        a = 0 if cfg.context is None else cfg.context - 1
        reach = cfg.text_layers * a if self.text_context is not None else 0
        if self.pcm is not None:
            reach += (cfg.pcm_layers + cfg.pcm_self_layers) * a
        if self.graph is not None:
            reach += cfg.wp
        return reach

    def _check_step(self, batch: Any, state: StepState) -> None:
        if not self.cfg.causal:
            raise ConfigError("only a causal model (model.causal: true) can step utterance by utterance")
        if batch.mask.dim() != 2 or batch.mask.shape[0] != state.batch or not bool(batch.mask.all()):
            raise ConfigError(f"a step takes the same number of utterances from each session: mask of shape "
                              f"({state.batch}, count), all true; got {tuple(batch.mask.shape)}")
