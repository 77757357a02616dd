"""Real-time emotion recognition in conversation: push one utterance, get its label at once.

A :class:`Stream` is one live conversation (a *session*) on a **causal** CORECT checkpoint
(``model.causal: true``, see ``configs/corect_iemocap6_causal.yaml``).  Each :meth:`Stream.push` runs
only the new utterance through the model, reusing what earlier utterances left behind:

* every causal attention layer (text Transformer, P-CM cross layers, P-CM self-attention stacks) keeps
  its projected keys and values per past utterance (``MultiHeadAttention.project_kv``); the new
  utterance's query attends to them (``attend``), so nothing of the history is recomputed;
* the graph keeps, per modality, the encoded node features and the RGCN outputs of past utterances;
  the new utterance's nodes are computed on a window subgraph of the last ``wp + 1`` utterances
  (``build_graph(torch.tensor([w]), M, wp, 0)`` restricted to the edges into the newest utterance):
  its RGCN output needs the inputs of its past window, its TransformerConv output the RGCN outputs
  of that window.

So the work per utterance is constant apart from attention over the cached keys (O(t), cheap), and the
outputs equal the causal model run on the whole conversation (``model(batch)``), utterance by utterance
(tested to 1e-5).  Two shortcuts keep the step small, each checked against the plain path (the model's
own layers one by one): the RGCN is evaluated at the newest nodes only, and the independent P-CM stacks
run side by side, one batched step per depth (:class:`_LayerGroup`).  A session's caches grow with the
conversation (keys/values of every attention layer, about 36 MB at utterance 1000 for the preset
three-modality model); :meth:`Stream.reset` frees them.

Sessions are independent; :meth:`Stream.new_session` opens another one on the same (shared, read-only)
model; one session is not meant to be pushed from two threads at once.  Bad input raises a one-line
:class:`~affectkit.errors.DataError` and leaves the session as it was.  ``affectkit stream CHECKPOINT``
(see :func:`run_lines`) drives a text-only checkpoint from ``speaker<TAB>sentence`` lines.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from affectkit.errors import ConfigError, DataError
from affectkit.graph import build_graph
from affectkit.models.attention import MultiHeadAttention, TransformerLayer
from affectkit.models.corect import Corect

__all__ = ["Prediction", "Stream", "StreamModel", "embed_text", "format_prediction", "input_lines",
           "run_lines"]

Embedder = Callable[[list[str]], Any]


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one utterance: ``label`` (class name), ``index`` (class index),
    ``probs`` (softmax, one per class in class order), ``logits`` and the utterance's 0-based
    ``position`` in its session."""

    label: str
    index: int
    probs: tuple[float, ...]
    logits: tuple[float, ...]
    position: int

    @property
    def prob(self) -> float:
        """Probability of the predicted class."""
        return self.probs[self.index]


# ------------------------------------------------------------------------------------------- the model


class StreamModel:
    """A causal CORECT model prepared for streaming; shared, read-only, by any number of sessions.

    ``source``: a checkpoint path, or ``(model, info)`` with ``info`` the data info the model was built
    with (dims, n_classes, label_names, speakers).  The model is put in eval mode.  ``embed`` turns raw
    sentences into text features for :meth:`Stream.push_text` (default :func:`embed_text`, the offline
    sentence encoder).
    """

    def __init__(self, source: str | Path | tuple[nn.Module, dict[str, Any]],
                 embed: Embedder | None = None) -> None:
        if isinstance(source, tuple):
            model, info = source
            where = "model"
        else:
            from affectkit.checkpoint import load_model

            model, cfg, info = load_model(source)
            where = str(source)
            if cfg.model_name != "corect":
                raise ConfigError(f"{where}: streaming needs a CORECT checkpoint, "
                                  f"got model {cfg.model_name!r}")
        if not isinstance(model, Corect):
            raise ConfigError(f"{where}: streaming needs a CORECT model, got {type(model).__name__}")
        if not model.cfg.causal or model.cfg.wf != 0:
            raise ConfigError(
                f"{where}: not a causal model (model.causal: {str(model.cfg.causal).lower()}, "
                f"wf: {model.cfg.wf}); "
                "streaming it would silently differ from it: train a causal preset, "
                "e.g. configs/corect_iemocap6_causal.yaml")
        if any(p.device.type != "cpu" for p in model.parameters()):
            raise ConfigError(f"{where}: streaming runs on the CPU; move the model there with model.cpu()")
        self.model = model.eval()
        self.info = dict(info)
        self.embed = embed
        self.modalities: tuple[str, ...] = tuple(model.modalities)
        self.dims: dict[str, int] = {m: int(info["dims"][m]) for m in self.modalities}
        n_classes = int(info["n_classes"])
        names = info.get("label_names") or [str(k) for k in range(n_classes)]
        self.label_names: list[str] = [str(n) for n in names]
        self.speakers: list[Any] | None = list(info["speakers"]) if info.get("speakers") is not None else None
        self.n_speakers = int(info.get("n_speakers", len(self.speakers or []) or 1))
        self.wp = int(model.cfg.wp)
        # Every causal attention layer, in the order the step visits them (one key/value cache each).
        layers: list[TransformerLayer] = []
        if model.text_context is not None:
            layers += list(model.text_context.layers)
        if model.pcm is not None:
            for j, mj in enumerate(model.pcm.modalities):
                for k, mk in enumerate(model.pcm.modalities):
                    if k != j:
                        layers += list(model.pcm.cross[f"{mj}<-{mk}"])
                layers += list(model.pcm.fuse[mj].layers)
        self.n_attention = len(layers)
        # P-CM side by side: the M(M-1) cross stacks are independent of each other, and so are the M
        # self-attention stacks, so each depth runs as one batched step (same math, far fewer ops).
        self.pcm_groups: list[_LayerGroup] | None = None
        if model.pcm is not None:
            pcm = model.pcm
            cross = [pcm.cross[f"{pcm.modalities[j]}<-{pcm.modalities[k]}"] for j, k in pcm.pairs]
            fuse = [pcm.fuse[m].layers for m in pcm.modalities]
            groups = [list(depth) for depth in zip(*cross)] + [list(depth) for depth in zip(*fuse)]
            if all(_LayerGroup.supports(g) for g in groups):
                self.pcm_groups = [_LayerGroup(g) for g in groups]
            self.n_cross = len(cross[0]) if cross else 0
        rgcn = model.graph.rgcn if model.graph is not None else None
        # RGCN for the newest nodes only, straight from its weights (PyG's layer loops over all 3M + M(M-1)
        # relations); only for the plain mean-aggregating layer CORECT builds, else the layer itself runs.
        self.fast_rgcn = (rgcn is not None and getattr(rgcn, "aggr", None) == "mean"
                          and rgcn.num_bases is None and rgcn.num_blocks is None)
        self._windows: dict[int, _Window] = {}

    def window_graph(self, w: int) -> _Window:
        """The subgraph of a ``w``-utterance window (``w <= wp + 1``) restricted to the edges into its
        newest utterance, whose node rows (one per modality) are ``rows``."""
        if w not in self._windows:
            self._windows[w] = _Window(w, len(self.modalities), self.wp)
        return self._windows[w]

    def speaker_index(self, speaker: Any) -> int:
        """The embedding row of a speaker tag; DataError for an unknown one."""
        if isinstance(speaker, (bool, np.bool_)) or not isinstance(speaker, (str, int, np.integer)):
            raise DataError(f"speaker must be a str or int tag, got {type(speaker).__name__}")
        if self.speakers is None:
            if not isinstance(speaker, str) and 0 <= int(speaker) < self.n_speakers:
                return int(speaker)
            raise DataError(f"unknown speaker {speaker!r}; "
                            f"this checkpoint knows speakers 0..{self.n_speakers - 1}")
        for i, tag in enumerate(self.speakers):
            if type(speaker) is type(tag) and speaker == tag:
                return i
            if isinstance(speaker, np.integer) and isinstance(tag, int) and int(speaker) == tag:
                return i
        if isinstance(speaker, str):  # "1" from a text line for an int tag 1
            for i, tag in enumerate(self.speakers):
                if str(tag) == speaker:
                    return i
        known = ", ".join(map(repr, self.speakers))
        raise DataError(f"unknown speaker {speaker!r}; this checkpoint knows {known}")

    def check_text_encoder(self) -> None:
        """ConfigError unless raw text can be fed: the model reads text and its dim is the encoder's."""
        if "text" not in self.modalities:
            raise ConfigError(f"this checkpoint does not read text "
                              f"(modalities: {', '.join(self.modalities)})")
        if self.embed is not None:
            return
        dim = _encoder_dim()
        if self.dims["text"] != dim:
            raise ConfigError(
                f"this checkpoint's text features are {self.dims['text']}-d but the sentence encoder "
                f"(all-MiniLM-L6-v2) gives {dim}-d: it was trained on other text features; "
                "pass them with push(text=...)")


class _LayerGroup:
    """G independent post-norm :class:`TransformerLayer` s of one width, stepped together for the newest
    position: batched matmuls over weights stacked from the layers (eval mode: no dropout).

    The stacked copy is rebuilt whenever a layer's parameter changes in place (``load_state_dict``,
    an optimizer step), so the engine never runs stale weights.
    """

    _LINEARS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.out", "f1": "ff.0", "f2": "ff.3"}
    _NORMS = {"1": "norm1", "2": "norm2"}

    def __init__(self, layers: list[TransformerLayer]) -> None:
        self.layers = layers
        self.g, self.dim, self.heads = len(layers), layers[0].attn.dim, layers[0].attn.heads
        self.eps = (layers[0].norm1.eps, layers[0].norm2.eps)
        self._params = [p for layer in layers for p in layer.parameters()]
        self._versions: list[int] = []
        self._w: dict[str, torch.Tensor] = {}

    @staticmethod
    def supports(layers: list[TransformerLayer]) -> bool:
        """Whether ``layers`` have the structure the batched step mirrors (else the layers run one by one)."""
        first = layers[0]
        return all(
            isinstance(layer, TransformerLayer) and layer.attn.dim == first.attn.dim
            and layer.attn.heads == first.attn.heads and len(layer.ff) == 4
            and isinstance(layer.ff[0], nn.Linear) and isinstance(layer.ff[1], nn.ReLU)
            and isinstance(layer.ff[3], nn.Linear) and layer.norm1.elementwise_affine
            and layer.norm2.elementwise_affine and layer.norm1.eps == first.norm1.eps
            and layer.norm2.eps == first.norm2.eps and layer.ff[0].out_features == first.ff[0].out_features
            and all(layer.get_submodule(path).bias is not None for path in _LayerGroup._LINEARS.values())
            for layer in layers)

    def weights(self) -> dict[str, torch.Tensor]:
        """Stacked weights: ``q``.. (G, in, out) transposed Linear weights, ``bq``.. (G, 1, out) biases,
        ``g1``/``n1``, ``g2``/``n2`` (G, 1, D) LayerNorm scales and shifts."""
        versions = [p._version for p in self._params]
        if versions != self._versions:
            w: dict[str, torch.Tensor] = {}
            for key, path in self._LINEARS.items():
                mods = [layer.get_submodule(path) for layer in self.layers]
                w[key] = torch.stack([m.weight.detach().t() for m in mods])
                w["b" + key] = torch.stack([m.bias.detach()[None] for m in mods])
            for key, path in self._NORMS.items():
                mods = [layer.get_submodule(path) for layer in self.layers]
                w["g" + key] = torch.stack([m.weight.detach()[None] for m in mods])
                w["n" + key] = torch.stack([m.bias.detach()[None] for m in mods])
            self._w, self._versions = w, versions
        return self._w

    def step(self, x: torch.Tensor, kv: torch.Tensor, caches: tuple[_Growing, _Growing], n: int) -> torch.Tensor:
        """Queries ``x`` (G, 1, D) attend to the cached keys/values plus those of ``kv`` (G, 1, D), which
        are written at position ``n``; then the residual, norm and feed-forward parts of each layer."""
        w, g, d, h = self.weights(), self.g, self.dim, self.heads
        q = torch.baddbmm(w["bq"], x, w["q"]).view(g, 1, h, d // h).transpose(1, 2)
        k = torch.baddbmm(w["bk"], kv, w["k"]).view(g, 1, h, d // h).transpose(1, 2)
        v = torch.baddbmm(w["bv"], kv, w["v"]).view(g, 1, h, d // h).transpose(1, 2)
        keys, values = caches[0].write(n, k), caches[1].write(n, v)  # (G, heads, n + 1, d / heads)
        a = F.scaled_dot_product_attention(q, keys, values).transpose(1, 2).reshape(g, 1, d)
        x = torch.addcmul(w["n1"], F.layer_norm(x + torch.baddbmm(w["bo"], a, w["o"]), (d,), eps=self.eps[0]),
                          w["g1"])
        y = torch.baddbmm(w["bf2"], torch.relu(torch.baddbmm(w["bf1"], x, w["f1"])), w["f2"])
        return torch.addcmul(w["n2"], F.layer_norm(x + y, (d,), eps=self.eps[1]), w["g2"])


class _Window:
    """Edges into the newest utterance of a ``w``-utterance window and, for the RGCN fast path, their
    (target, relation) segments: ``seg`` per edge, ``seg_type``/``seg_target``/``seg_count`` per segment."""

    def __init__(self, w: int, n_modalities: int, wp: int) -> None:
        edge_index, edge_type = build_graph(torch.tensor([w]), n_modalities, wp, 0)
        keep = edge_index[1] % w == w - 1
        self.edge_index = edge_index[:, keep].contiguous()
        self.edge_type = edge_type[keep].contiguous()
        self.rows = torch.arange(n_modalities) * w + (w - 1)
        target = self.edge_index[1] // w  # modality of the target node
        key = target * (int(self.edge_type.max()) + 1) + self.edge_type
        uniq, self.seg = torch.unique(key, return_inverse=True)
        first = torch.zeros(len(uniq), dtype=torch.long).scatter_(0, self.seg, torch.arange(len(key)))
        self.seg_type = self.edge_type[first]
        self.seg_target = target[first]
        self.seg_count = torch.bincount(self.seg, minlength=len(uniq)).to(torch.float32).unsqueeze(1)
        self.src = self.edge_index[0]


def _rgcn_newest(rgcn: nn.Module, x: torch.Tensor, win: _Window) -> torch.Tensor:
    """RGCNConv (mean aggregation, full weights) evaluated at the window's newest nodes only:
    ``x_i @ root + bias + sum_r mean_{j in N_r(i)} x_j @ W_r``."""
    agg = x.new_zeros(len(win.seg_type), x.shape[1]).index_add_(0, win.seg, x[win.src]) / win.seg_count
    msg = torch.bmm(agg.unsqueeze(1), rgcn.weight[win.seg_type]).squeeze(1)
    out = x[win.rows] @ rgcn.root if rgcn.root is not None else x.new_zeros(len(win.rows), msg.shape[1])
    if rgcn.bias is not None:
        out = out + rgcn.bias
    return out.index_add_(0, win.seg_target, msg)


def _encoder_dim() -> int:
    try:
        from affectkit.features import text as text_features
    except ImportError as exc:
        raise ConfigError(f"raw text needs the sentence encoder ({exc}); "
                          "install with pip install -e '.[text]'") from None
    return int(text_features.DIM)


@lru_cache(maxsize=1)
def _sentence_encoder() -> Any:
    from affectkit.features import text as text_features

    return text_features.SentenceEncoder(use_cache=False)


def embed_text(sentences: list[str]) -> np.ndarray:
    """Embed raw sentences with the offline encoder that builds the training text features
    (``affectkit.features.text``, all-MiniLM-L6-v2, 384-d), without touching its on-disk cache."""
    _encoder_dim()
    return _sentence_encoder().encode(sentences)


# ------------------------------------------------------------------------------------------- the session


class _Growing:
    """A tensor that grows by one row at a time along ``dim`` (capacity doubles: amortised O(1))."""

    __slots__ = ("dim", "buf")

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.buf: torch.Tensor | None = None

    def write(self, pos: int, row: torch.Tensor) -> torch.Tensor:
        """Write ``row`` (size 1 along ``dim``) at ``pos``; return the rows ``[0, pos]``.  Rows after
        the session's committed length are scratch, so a failed step leaves nothing behind."""
        buf = self.buf
        if buf is None or buf.shape[self.dim] <= pos:
            shape = list(row.shape)
            shape[self.dim] = max(16, 2 * pos)
            grown = row.new_empty(shape)
            if buf is not None and pos:
                grown.narrow(self.dim, 0, pos).copy_(buf.narrow(self.dim, 0, pos))
            self.buf = buf = grown
        buf.narrow(self.dim, pos, 1).copy_(row)
        return buf.narrow(self.dim, 0, pos + 1)


def _as_features(value: Any, modality: str, dim: int) -> torch.Tensor:
    """One utterance's features as a (1, 1, dim) float32 tensor, or a one-line DataError."""
    try:
        x = torch.as_tensor(np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value,
                                       dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{modality} features: not a numeric vector ({exc})") from None
    if x.dim() == 2 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 1 or x.shape[0] != dim:
        raise DataError(f"{modality} features have shape {tuple(x.shape)}; this checkpoint needs ({dim},)")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise DataError(f"{modality} features hold {bad} non-finite values (NaN/inf)")
    return x.view(1, 1, dim)


class Stream:
    """One live conversation on a causal CORECT model: :meth:`push` an utterance, get its prediction.

    ``source``: a checkpoint path, ``(model, info)``, or a :class:`StreamModel` (shared by sessions);
    ``embed``: optional raw-sentence embedder for :meth:`push_text` (default: the offline encoder).
    """

    def __init__(self, source: str | Path | tuple[nn.Module, dict[str, Any]] | StreamModel,
                 embed: Embedder | None = None) -> None:
        self.engine = source if isinstance(source, StreamModel) else StreamModel(source, embed)
        self.reset()

    # -- state

    def reset(self) -> None:
        """Forget the conversation: the next push is utterance 0."""
        eng = self.engine
        self._n = 0
        self._kv = [(_Growing(1), _Growing(1)) for _ in range(eng.n_attention)]  # (heads, t, d/heads)
        self._group_kv = [(_Growing(2), _Growing(2)) for _ in eng.pcm_groups or []]  # (G, heads, t, d/heads)
        self._nodes = _Growing(1)  # (M, t, h): encoded node features
        self._rgcn = _Growing(1)  # (M, t, h): RGCN outputs

    def new_session(self) -> Stream:
        """A new, empty, independent session on the same model."""
        return Stream(self.engine)

    def __len__(self) -> int:
        """Utterances pushed so far."""
        return self._n

    def rewind(self, n: int) -> None:
        """Forget utterances ``n, n+1, ...`` (e.g. a revised speech-recognition hypothesis); exact, since
        nothing before ``n`` depended on them."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self._n:
            raise DataError(f"rewind: n must be an int in [0, {self._n}], got {n!r}")
        self._n = n

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.engine.modalities

    @property
    def label_names(self) -> list[str]:
        return self.engine.label_names

    # -- pushing

    def push(self, speaker: Any, text: Any = None, audio: Any = None, visual: Any = None) -> Prediction:
        """Classify the next utterance from its features (one 1-D vector per modality the model reads;
        others are ignored).  Bad input raises DataError and changes nothing."""
        eng = self.engine
        spk = eng.speaker_index(speaker)
        given = {"text": text, "audio": audio, "visual": visual}
        feats: dict[str, torch.Tensor] = {}
        for m in eng.modalities:
            if given[m] is None:
                raise DataError(f"missing {m} features: this checkpoint reads {', '.join(eng.modalities)}")
            feats[m] = _as_features(given[m], m, eng.dims[m])
        with torch.inference_mode():
            logits = self._step(spk, feats)
        self._n += 1  # commit: the rows written at position n become part of the history
        probs = torch.softmax(logits.double(), dim=-1)
        index = int(torch.argmax(logits))
        return Prediction(eng.label_names[index], index, tuple(probs.tolist()), tuple(logits.tolist()),
                          self._n - 1)

    def push_text(self, speaker: Any, sentence: str, audio: Any = None, visual: Any = None) -> Prediction:
        """Classify the next utterance from its raw sentence, embedded by the offline sentence encoder
        (the ``[text]`` extra) that built the training features."""
        eng = self.engine
        eng.check_text_encoder()
        eng.speaker_index(speaker)  # cheap checks before the encoder runs
        if not isinstance(sentence, str) or not sentence.strip():
            raise DataError(f"sentence must be a non-empty str, got {sentence!r:.60}")
        vectors = (eng.embed or embed_text)([sentence])
        return self.push(speaker, text=np.asarray(vectors)[0], audio=audio, visual=visual)

    # -- the incremental forward pass (mirrors Corect.forward for the newest utterance)

    def _attend(self, slot: int, layer: TransformerLayer, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """``layer`` for the newest position: query ``x`` (1, 1, D) over the cached keys/values plus
        those of ``kv`` (1, 1, D), which are appended to the cache."""
        attn: MultiHeadAttention = layer.attn
        k, v = attn.project_kv(kv)  # (1, heads, 1, d)
        kc, vc = self._kv[slot]
        keys = kc.write(self._n, k[0]).unsqueeze(0)
        values = vc.write(self._n, v[0]).unsqueeze(0)
        return layer.finish(x, attn.attend(x, keys, values, None))

    def _step(self, spk: int, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        eng, model = self.engine, self.engine.model
        slot = 0
        feats = []
        speaker = model.speaker(torch.tensor([[spk]])) if model.speaker is not None else None
        for m in eng.modalities:
            x = inputs[m]
            if m == "text" and model.text_context is not None:
                for layer in model.text_context.layers:
                    x = self._attend(slot, layer, x, x)
                    slot += 1
            x = model.encoders[m](x)
            if speaker is not None:
                x = x + speaker
            feats.append(x)  # (1, 1, h)
        views = []
        if model.graph is not None:
            views.append(self._graph_step(model.graph, feats))
        if model.pcm is not None and eng.pcm_groups is not None:
            views.append(self._pcm_step(model.pcm, feats))
        elif model.pcm is not None:  # layers one by one, in the model's own traversal order
            pcm, slots = model.pcm, itertools.count(slot)

            def fuse(m: str, x: torch.Tensor) -> torch.Tensor:
                for layer in pcm.fuse[m].layers:
                    x = self._attend(next(slots), layer, x, x)
                return x

            views.append(pcm.apply(feats, lambda layer, x, kv: self._attend(next(slots), layer, x, kv), fuse)[0])
        rep = torch.cat(views, dim=-1) if views else torch.cat(feats, dim=-1)[0]
        return model.classifier(rep)[0]

    def _pcm_step(self, pcm: nn.Module, feats: list[torch.Tensor]) -> torch.Tensor:
        """P-CM for the newest utterance, each depth of the cross and self-attention stacks as one
        batched step (``StreamModel.pcm_groups``)."""
        groups, n, m = self.engine.pcm_groups, self._n, len(feats)
        assert groups is not None
        x = torch.cat([feats[j] for j, _ in pcm.pairs])  # (M(M-1), 1, h): pairs grouped by target j
        kv = torch.cat([feats[k] for _, k in pcm.pairs])
        n_cross = self.engine.n_cross
        for group, caches in zip(groups[:n_cross], self._group_kv[:n_cross]):
            x = group.step(x, kv, caches, n)
        x = x.view(m, m - 1, 1, -1).transpose(1, 2).reshape(m, 1, -1)  # per target: its parts, concatenated
        for group, caches in zip(groups[n_cross:], self._group_kv[n_cross:]):
            x = group.step(x, x, caches, n)
        return x.reshape(1, -1)

    def _graph_step(self, graph: nn.Module, feats: list[torch.Tensor]) -> torch.Tensor:
        """The graph view of the newest utterance: RGCN then TransformerConv on its past window."""
        n, m = self._n, len(feats)
        lo = max(0, n - self.engine.wp)
        w = n - lo + 1
        win = self.engine.window_graph(w)
        nodes = self._nodes.write(n, torch.cat(feats, dim=0))[:, lo:].reshape(m * w, -1)  # (M * w, h)
        if self.engine.fast_rgcn:
            r = _rgcn_newest(graph.rgcn, nodes, win)  # (M, h)
        else:
            r = graph.rgcn(nodes, win.edge_index, win.edge_type)[win.rows]
        window = self._rgcn.write(n, r.unsqueeze(1))[:, lo:]
        g = graph.gt(window.reshape(m * w, -1), win.edge_index)[win.rows]  # (M, heads * h)
        return F.leaky_relu(graph.bn(g)).reshape(1, -1)


# ------------------------------------------------------------------------------------------- the CLI


def format_prediction(pred: Prediction, speaker: str, names: Sequence[str]) -> str:
    """``position<TAB>speaker<TAB>label<TAB>prob<TAB>name=p name=p ...`` (one line)."""
    probs = " ".join(f"{name}={p:.3f}" for name, p in zip(names, pred.probs))
    return f"{pred.position}\t{speaker}\t{pred.label}\t{pred.prob:.3f}\t{probs}"


def input_lines(path: str | Path | None = None) -> Iterator[str]:
    """Lines of stdin as they arrive, or of the file ``path`` (DataError now if it does not exist)."""
    if path is None:
        return iter(sys.stdin.readline, "")
    if not Path(path).is_file():
        raise DataError(f"{path}: input file not found")
    return _file_lines(Path(path))


def _file_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        yield from f


def run_lines(session: Stream, lines: Iterable[str], out: TextIO | None = None,
              err: TextIO | None = None) -> tuple[int, int]:
    """Classify ``speaker<TAB>sentence`` lines as they come, printing (and flushing) one prediction per
    line to ``out``; a malformed line prints an error line to ``err`` and the stream goes on.  Blank
    lines are skipped.  Returns (predictions, errors)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if session.modalities != ("text",):
        raise ConfigError(f"affectkit stream reads text lines only; this checkpoint reads "
                          f"{', '.join(session.modalities)}: use Stream.push with features")
    session.engine.check_text_encoder()
    (session.engine.embed or embed_text)(["warm up"])  # load the encoder before the first line arrives
    done = failed = 0
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        speaker, tab, sentence = line.partition("\t")
        try:
            if not tab:
                raise DataError("expected 'speaker<TAB>sentence'")
            pred = session.push_text(speaker.strip(), sentence.strip())
        except DataError as exc:
            failed += 1
            print(f"line {lineno}: error: {exc}", file=err, flush=True)
            continue
        done += 1
        print(format_prediction(pred, speaker.strip(), session.label_names), file=out, flush=True)
    return done, failed
