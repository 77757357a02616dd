"""Real-time emotion recognition in conversation: a session that pushes one utterance and gets its label.

A :class:`Stream` is one live conversation (a *session*) on a **causal** CORECT checkpoint
(``model.causal: true``).  It holds no layer math of its own: each :meth:`Stream.push` runs the model's
own forward in step mode (``model(batch, state)``, see :mod:`affectkit.models.steps`), which equals the
causal model run on the whole conversation, utterance by utterance (tested to 1e-5).

What a session keeps is bounded by the model: with ``model.context: N`` every attention layer caches the
keys/values of the last N utterances and the graph the rows of the last ``wp + 1`` (ring buffers, plus
``max_rewind`` spare slots), so memory and work per utterance are constant however long the call.  With
``context: null`` the attention caches keep every past utterance: they grow with the call (doubling), and
:attr:`Stream.state_bytes` crossing ``max_state_bytes`` raises :class:`SessionFullError` instead.

Speakers: a model trained with ``model.speaker_mode: per_dialogue`` maps any speaker names (str or int) to
its speaker slots by order of first appearance in the session, as in training; a name beyond its slots
is a :class:`~affectkit.errors.DataError`.  Otherwise (``tags``) names must be the training file's tags.

Sessions are independent; :meth:`Stream.new_session` opens another one on the same (shared, read-only)
model; :func:`push_batch` steps several sessions' next utterances in one batched forward.

Rebuilding a session from its log (:meth:`Stream.prefill`) runs the logged utterances through the same
forward in chunks of many utterances (a *prefill*), not one forward per utterance.  With ``context: N`` only
the log's tail is computed: the rows the state keeps (its ring capacity) plus the utterances those rows can
depend on (:meth:`~affectkit.models.corect.Corect.state_reach`); older utterances cannot change them, so
the state, and every later prediction, equals that of a session stepped through the whole log.

A session is not meant to be pushed from two threads at once.  Bad input raises a one-line DataError and
leaves the session as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from affectkit.errors import ConfigError, DataError
from affectkit.models.corect import Corect
from affectkit.models.steps import StepState

__all__ = ["Prediction", "SessionFullError", "Stream", "StreamModel", "TooManySpeakers", "embed_text", "push_batch"]

Embedder = Callable[[list[str]], Any]
#: Default cap on one session's state (bytes); a model with ``context`` stays far below it.
MAX_STATE_BYTES = 256 * 2**20
#: Default number of utterances a session can step back exactly with :meth:`Stream.rewind`.
MAX_REWIND = 8
#: Utterances per forward when :meth:`Stream.prefill` rebuilds a session (bounds its memory: a chunk's
#: attention reads the state's rows plus the chunk's own).
PREFILL_CHUNK = 256


class SessionFullError(DataError):
    """A session's state would grow past its cap (``max_state_bytes``)."""


class TooManySpeakers(DataError):
    """A new speaker name beyond the model's speaker slots (names mapped by arrival)."""


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


@dataclass
class _Step:
    """The next utterance of B sessions, shaped like a ConversationBatch of one-utterance dialogues."""

    features: dict[str, torch.Tensor]
    speakers: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


class StreamModel:
    """A causal CORECT model prepared for streaming; shared, read-only, by any number of sessions.

    ``source``: a checkpoint path, or ``(model, info)`` with ``info`` the data info the model was built
    with (dims, n_classes, label_names, speakers).  The model is put in eval mode.  ``embed`` turns raw
    sentences into text features for :meth:`Stream.push_text` (default :func:`embed_text`).
    ``max_state_bytes``: cap per session; ``max_rewind``: spare ring slots for :meth:`Stream.rewind`;
    ``text_runtime``: what runs the sentence encoder for raw text (``torch``, ``onnx``, ``onnx-int8``:
    :mod:`affectkit.features.fast_encoder`).
    """

    def __init__(self, source: str | Path | tuple[nn.Module, dict[str, Any]], embed: Embedder | None = None,
                 max_state_bytes: int = MAX_STATE_BYTES, max_rewind: int = MAX_REWIND,
                 text_runtime: str = "torch") -> None:
        if isinstance(source, tuple):
            model, info = source
            where = "model"
        else:
            from affectkit.checkpoint import load_model

            model, cfg, info = load_model(source)
            where = str(source)
            if cfg.model_name != "corect":
                raise ConfigError(f"{where}: streaming needs a CORECT checkpoint, got model {cfg.model_name!r}")
        if not isinstance(model, Corect):
            raise ConfigError(f"{where}: streaming needs a CORECT model, got {type(model).__name__}")
        if not model.cfg.causal or model.cfg.wf != 0:
            raise ConfigError(
                f"{where}: not a causal model (model.causal: {str(model.cfg.causal).lower()}, "
                f"wf: {model.cfg.wf}); streaming it would silently differ from it: train a causal preset, "
                "e.g. configs/corect_iemocap6_causal.yaml")
        for name, value in (("max_state_bytes", max_state_bytes), ("max_rewind", max_rewind)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        from affectkit.features.fast_encoder import check_runtime

        self.text_runtime = check_runtime(text_runtime)
        self.model = model.eval()
        self.info = dict(info)
        self.embed = embed
        #: The fine-tuned text encoder that built the training features (None = the shipped one); checked
        #: now, so a checkpoint whose encoder is missing or changed is refused at once, in one line.
        self.encoder_ref = info.get("encoder") if embed is None else None
        self._encoder: Any = None
        if self.encoder_ref is not None:
            from affectkit.features.encoder_ref import verify_encoder

            verify_encoder(self.encoder_ref)
        self.max_state_bytes, self.max_rewind = max_state_bytes, max_rewind
        self.device = next(model.parameters()).device
        self.modalities: tuple[str, ...] = tuple(model.modalities)
        self.dims: dict[str, int] = {m: int(info["dims"][m]) for m in self.modalities}
        n_classes = int(info["n_classes"])
        names = info.get("label_names") or [str(k) for k in range(n_classes)]
        self.label_names: list[str] = [str(n) for n in names]
        self.speakers: list[Any] | None = list(info["speakers"]) if info.get("speakers") is not None else None
        self.n_speakers = int(model.speaker.num_embeddings) if model.speaker is not None else \
            int(info.get("n_speakers", len(self.speakers or []) or 1))
        self.per_dialogue = model.cfg.speaker_mode == "per_dialogue"

    def new_state(self) -> StepState:
        return self.model.init_state(1, rewind=self.max_rewind, device=self.device)

    def prefill_start(self, n: int) -> int:
        """The first of ``n`` logged utterances a rebuild must compute: the state keeps rows of the last
        ``capacity`` positions (its largest ring), and those depend on at most ``state_reach`` earlier ones;
        0 when the model keeps every past utterance (``context: null``)."""
        reach = self.model.state_reach()
        rings = self.new_state().rings.values()
        if reach is None or not all(r.fixed for r in rings):
            return 0
        return max(0, n - max(r.capacity for r in rings) - reach)

    def speaker_index(self, speaker: Any) -> int:
        """The embedding row of a speaker tag (``tags`` models); DataError for an unknown one."""
        _check_name(speaker)
        if self.speakers is None:
            if not isinstance(speaker, str) and 0 <= int(speaker) < self.n_speakers:
                return int(speaker)
            raise DataError(f"unknown speaker {speaker!r}; this checkpoint knows speakers 0..{self.n_speakers - 1}")
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
        raise DataError(f"unknown speaker {speaker!r}; this checkpoint knows {known} "
                        "(a model trained with model.speaker_mode: per_dialogue takes any names)")

    def features(self, text: Any, audio: Any, visual: Any) -> dict[str, torch.Tensor]:
        """One utterance's inputs as (1, 1, dim) tensors on the model's device; DataError for bad ones."""
        given = {"text": text, "audio": audio, "visual": visual}
        feats = {}
        for m in self.modalities:
            if given[m] is None:
                raise DataError(f"missing {m} features: this checkpoint reads {', '.join(self.modalities)}")
            feats[m] = _as_features(given[m], m, self.dims[m]).to(self.device)
        return feats

    def features_of(self, utterances: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Many utterances' inputs as one (n, dim) tensor per modality, checked at once (a rebuild's log);
        DataError naming the first bad utterance."""
        out = {}
        for m in self.modalities:
            try:
                x = np.stack([np.asarray(u.get(m), dtype=np.float32).reshape(-1) for u in utterances])
                ok = x.shape[1] == self.dims[m] and bool(np.isfinite(x).all())
            except (TypeError, ValueError):
                ok = False
            if not ok:  # find the culprit and say what is wrong with it
                for i, u in enumerate(utterances):
                    try:
                        self.features(u.get("text"), u.get("audio"), u.get("visual"))
                    except DataError as exc:
                        raise type(exc)(f"utterance {i}: {exc}") from None
                raise DataError(f"{m} features: not one {self.dims[m]}-d vector per utterance")
            out[m] = torch.from_numpy(x).to(self.device)
        return out

    def check_text_encoder(self) -> None:
        """ConfigError unless raw text can be fed: the model reads text and its dim is the encoder's."""
        if "text" not in self.modalities:
            raise ConfigError(f"this checkpoint does not read text (modalities: {', '.join(self.modalities)})")
        if self.embed is not None or self.encoder_ref is not None:
            return
        dim = _encoder_dim()
        if self.dims["text"] != dim:
            raise ConfigError(
                f"this checkpoint's text features are {self.dims['text']}-d but the sentence encoder "
                f"(all-MiniLM-L6-v2) gives {dim}-d: it was trained on other text features; "
                "pass them with push(text=...)")

    def text_encoder(self) -> Any:
        """The checkpoint's own fine-tuned encoder (loaded once, verified); None for the shipped encoder.
        A live process keeps its vectors in memory only, at most ``LIVE_CACHE_ENTRIES`` (no cache file:
        a turn's vector is needed once, for its own push, and a session's log keeps it for a rebuild)."""
        if self.encoder_ref is not None and self._encoder is None:
            from affectkit.features.encoder_ref import load_reference_encoder
            from affectkit.features.text import LIVE_CACHE_ENTRIES

            self._encoder = load_reference_encoder(self.encoder_ref, use_cache=False, max_entries=LIVE_CACHE_ENTRIES,
                                                   runtime=self.text_runtime)
        return self._encoder

    def text_cache(self) -> Any:
        """The in-memory vector cache raw text goes through (its ``stats()`` for metrics): the fine-tuned
        encoder's or the shipped encoder's; None when ``embed`` was given or the model reads no text."""
        if self.embed is not None or "text" not in self.modalities:
            return None
        enc = self.text_encoder()
        if enc is not None:
            return enc.cache
        try:
            return _sentence_encoder(self.text_runtime).cache
        except ImportError:
            return None

    @property
    def encoder_reads_turns(self) -> bool:
        """Whether the checkpoint's fine-tuned encoder reads the speaker tag or past turns (so a lone sentence
        cannot be embedded without its session)."""
        enc = self.text_encoder()
        return enc is not None and bool(enc.recipe.context or enc.recipe.speaker)

    def embed_sentences(self, sentences: list[str]) -> np.ndarray:
        """Text features of lone raw sentences (``embed`` if given, the checkpoint's fine-tuned encoder when
        its input is the utterance alone, else :func:`embed_text`)."""
        if self.encoder_reads_turns:
            raise ConfigError("this checkpoint's text encoder reads the speaker and past turns: embed each "
                              "turn in its session (Stream.push_text, or Stream.text_input + embed_inputs)")
        return self.embed_inputs(sentences)

    def embed_inputs(self, inputs: list[str]) -> np.ndarray:
        """Text features of encoder input strings (:meth:`Stream.text_input` of each turn), in one call."""
        enc = self.text_encoder()
        if enc is not None:
            return np.asarray(enc.embed(list(inputs), save=False))
        if self.embed is not None:
            return np.asarray(self.embed(list(inputs)))
        return embed_text(list(inputs), runtime=self.text_runtime)

    def prediction(self, logits: torch.Tensor, position: int) -> Prediction:
        probs = torch.softmax(logits.double(), dim=-1)
        index = int(torch.argmax(logits))
        return Prediction(self.label_names[index], index, tuple(probs.tolist()), tuple(logits.tolist()), position)


def _check_name(speaker: Any) -> None:
    if isinstance(speaker, (bool, np.bool_)) or not isinstance(speaker, (str, int, np.integer)):
        raise DataError(f"speaker must be a str or int tag, got {type(speaker).__name__}")


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


def _encoder_dim() -> int:
    try:
        from affectkit.features import text as text_features
    except ImportError as exc:
        raise ConfigError(f"raw text needs the sentence encoder ({exc}); "
                          "install with pip install -e '.[text]'") from None
    return int(text_features.DIM)


@lru_cache(maxsize=3)
def _sentence_encoder(runtime: str = "torch") -> Any:
    from affectkit.features import text as text_features

    return text_features.SentenceEncoder(use_cache=False, max_entries=text_features.LIVE_CACHE_ENTRIES,
                                         runtime=runtime)


def embed_text(sentences: list[str], runtime: str = "torch") -> np.ndarray:
    """Embed raw sentences with the offline encoder that builds the training text features
    (``affectkit.features.text``, all-MiniLM-L6-v2, 384-d), without touching its on-disk cache; the last
    ``LIVE_CACHE_ENTRIES`` distinct sentences are kept in memory (least recently used leave first).
    ``runtime``: ``torch``, or ONNX Runtime (``onnx``: the same vectors, faster; ``onnx-int8``: faster
    again, vectors within cosine ~0.99; :mod:`affectkit.features.fast_encoder`)."""
    _encoder_dim()
    return _sentence_encoder(runtime).embed(list(sentences), save=False)


class Stream:
    """One live conversation on a causal CORECT model: :meth:`push` an utterance, get its prediction.

    ``source``: a checkpoint path, ``(model, info)``, or a :class:`StreamModel` (shared by sessions);
    ``embed``: optional raw-sentence embedder for :meth:`push_text` (default: the offline encoder);
    ``by_arrival``: map any participant names to the model's speaker slots by order of first appearance,
    whatever its speaker mode (the i-th participant takes slot i: for a ``tags`` model, the embedding of its
    i-th training tag), as a live service or a recording does with people's names; a name beyond the slots
    is :class:`TooManySpeakers`.  ``per_dialogue`` models always map names so;
    ``options``: :class:`StreamModel` options (``max_state_bytes``, ``max_rewind``, ``text_runtime``) when it
    is built here.
    """

    def __init__(self, source: str | Path | tuple[nn.Module, dict[str, Any]] | StreamModel,
                 embed: Embedder | None = None, by_arrival: bool = False, **options: Any) -> None:
        self.engine = source if isinstance(source, StreamModel) else StreamModel(source, embed, **options)
        self.by_arrival = bool(by_arrival)
        self.reset()

    def reset(self) -> None:
        """Forget the conversation: the next push is utterance 0 (and the state is freed)."""
        self._state = self.engine.new_state()
        self._names: dict[Any, tuple[int, int]] = {}  # names mapped by arrival: name -> (slot, first position)
        #: (position, speaker, sentence) of the last turns pushed as text, for a fine-tuned encoder that reads
        #: past turns (bounded: its context plus the rewind slots).
        self._turns: list[tuple[int, str, str]] = []
        #: after :meth:`prefill`: the prediction for the log's last utterance, computed by the prefill's last
        #: forward (a service compares it with the logged answer: a log replayed through another model differs).
        self.replayed: Prediction | None = None

    def new_session(self) -> Stream:
        """A new, empty, independent session on the same model (names mapped as in this one)."""
        return Stream(self.engine, by_arrival=self.by_arrival)

    def __len__(self) -> int:
        """Utterances pushed so far."""
        return int(self._state.lengths[0])

    def rewind(self, n: int) -> None:
        """Forget utterances ``n, n+1, ...`` (e.g. a revised speech-recognition hypothesis); exact, since
        nothing before ``n`` depended on them.  The state keeps ``max_rewind`` utterances beyond the
        model's windows, so a session can step back that far (further: DataError; :meth:`reset` and
        push again)."""
        length = len(self)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= length:
            raise DataError(f"rewind: n must be an int in [0, {length}], got {n!r}")
        if n == 0:
            self.reset()
            return
        if not self._state.can_rewind(n):
            raise DataError(f"rewind: this session keeps the last utterances only (max_rewind "
                            f"{self.engine.max_rewind}); it cannot go back from {length} to {n}: reset and push again")
        self._state.lengths = torch.full_like(self._state.lengths, n)
        self._names = {k: v for k, v in self._names.items() if v[1] < n}

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.engine.modalities

    @property
    def label_names(self) -> list[str]:
        return self.engine.label_names

    @property
    def state_bytes(self) -> int:
        """Bytes this session's state holds (caches and graph rows); constant for a model with ``context``."""
        return self._state.nbytes()

    @property
    def maps_names(self) -> bool:
        """Whether speaker names are mapped to slots by first appearance (``per_dialogue`` or ``by_arrival``)."""
        return self.engine.per_dialogue or self.by_arrival

    @property
    def speaker_slots(self) -> dict[Any, int]:
        """Names mapped by arrival: the session's speaker names and the slots they were given."""
        return {k: v[0] for k, v in self._names.items()}

    @property
    def participants(self) -> list[Any]:
        """Names mapped by arrival: the session's speakers in order of first appearance (= slot order)."""
        return list(self._names)

    def speaker_slot(self, speaker: Any) -> int:
        """The speaker embedding row of ``speaker`` for the next push (not recorded until it succeeds);
        :class:`TooManySpeakers` for a new name beyond the model's slots."""
        eng = self.engine
        if not self.maps_names:
            return eng.speaker_index(speaker)
        _check_name(speaker)
        key = int(speaker) if isinstance(speaker, np.integer) else speaker
        if key in self._names:
            return self._names[key][0]
        if len(self._names) >= eng.n_speakers:
            raise TooManySpeakers(f"speaker {speaker!r} would be the session's speaker number {len(self._names) + 1}; "
                                  f"this model has {eng.n_speakers} speaker slots (taken by "
                                  f"{', '.join(map(repr, self._names))})")
        return len(self._names)

    def _record(self, speaker: Any, slot: int, position: int, sentence: str | None = None) -> None:
        """Note a successful push: a new name's slot, and a turn pushed as text for the encoder's later inputs."""
        if self.maps_names:
            key = int(speaker) if isinstance(speaker, np.integer) else speaker
            self._names.setdefault(key, (slot, position))
        if sentence is not None:
            self._remember_turn(position, speaker, sentence)

    def _check_room(self) -> None:
        """SessionFullError if the next step would grow the state past the cap."""
        grow = sum(r.nbytes() for r in self._state.rings.values()
                   if not r.fixed and int(self._state.lengths.max()) >= r.capacity)
        size = self.state_bytes
        if size + grow > self.engine.max_state_bytes:
            raise SessionFullError(
                f"session state would grow to {(size + grow) / 2**20:.1f} MiB at utterance {len(self)}, over "
                f"max_state_bytes ({self.engine.max_state_bytes / 2**20:.1f} MiB): this model keeps every past "
                "utterance (model.context: null); reset the session or use a model trained with model.context")

    def prefill(self, utterances: Sequence[Mapping[str, Any]], chunk: int = PREFILL_CHUNK) -> None:
        """Rebuild this empty session from its logged utterances (see :meth:`prefill_steps`) at once."""
        for _ in self.prefill_steps(utterances, chunk):
            pass

    def prefill_steps(self, utterances: Sequence[Mapping[str, Any]],
                      chunk: int = PREFILL_CHUNK) -> Iterator[int]:
        """Rebuild this empty session from its logged utterances (each with :meth:`push`'s arguments) in
        a few batched forwards of up to ``chunk`` utterances, through the same layers as :meth:`push`.

        With ``context: N`` only the tail from :meth:`StreamModel.prefill_start` is run (as a session of its
        own, then its ring slots relabelled to their true positions); it holds every row the state keeps,
        and those rows cannot depend on older utterances, so the session then answers exactly as one pushed
        utterance by utterance (tested to 1e-5), and can rewind as far.  Every input is checked first: bad
        input raises DataError (naming its index) and the session stays empty.  No predictions are made for
        the logged utterances (the log holds them).

        A generator, so a service can interleave a rebuild with live work: it checks the log and runs the
        first chunk, then yields how many utterances are left before each further chunk; the session takes its
        new state when the generator ends.  Abandoned before that, the session stays empty."""
        if len(self):
            raise DataError(f"prefill rebuilds an empty session; this one has {len(self)} utterances (reset first)")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise DataError(f"prefill: chunk must be an int >= 1, got {chunk!r}")
        eng, n = self.engine, len(utterances)
        if n == 0:
            return
        slots = []
        try:
            for i, u in enumerate(utterances):
                _check_keys(u)
                slots.append(self.speaker_slot(u["speaker"]))
                self._record(u["speaker"], slots[-1], i, _sentence(u))
        except DataError as exc:
            self.reset()
            raise type(exc)(f"utterance {i}: {exc}") from None
        try:
            feats = eng.features_of(utterances)
        except DataError:
            self.reset()
            raise
        names, self._names = self._names, {}  # the session stays empty until the state is complete
        turns, self._turns = self._turns, []
        start = eng.prefill_start(n)
        state = eng.new_state()
        for a in range(start, n, chunk):
            b = min(a + chunk, n)
            step = _Step({m: x[None, a:b] for m, x in feats.items()},
                         torch.tensor(slots[a:b], device=eng.device).view(1, -1),
                         torch.ones(1, b - a, dtype=torch.bool, device=eng.device),
                         torch.tensor([b - a], device=eng.device))
            with torch.inference_mode():
                last = eng.model(step, state)
            if b < n:
                yield n - b
        with torch.inference_mode():
            state.shift(start)
        if state.nbytes() > eng.max_state_bytes:
            raise SessionFullError(
                f"session state would be {state.nbytes() / 2**20:.1f} MiB after {n} utterances, over "
                f"max_state_bytes ({eng.max_state_bytes / 2**20:.1f} MiB): this model keeps every past "
                "utterance (model.context: null)")
        if len(self):
            raise DataError("prefill: the session was pushed while it was being rebuilt")
        self._state, self._names, self._turns = state, names, turns
        self.replayed = eng.prediction(last.reshape(-1, last.shape[-1])[-1].cpu(), n - 1)  # checks a log's last answer

    def push(self, speaker: Any, text: Any = None, audio: Any = None, visual: Any = None) -> Prediction:
        """Classify the next utterance from its features (one 1-D vector per modality the model reads;
        others are ignored).  Bad input raises DataError and changes nothing."""
        return push_batch([self], [{"speaker": speaker, "text": text, "audio": audio, "visual": visual}])[0]

    def push_text(self, speaker: Any, sentence: str, audio: Any = None, visual: Any = None) -> Prediction:
        """Classify the next utterance from its raw sentence, embedded by the offline sentence encoder
        (the ``[text]`` extra) that built the training features."""
        eng = self.engine
        eng.check_text_encoder()
        self.speaker_slot(speaker)  # cheap checks before the encoder runs
        if not isinstance(sentence, str) or not sentence.strip():
            raise DataError(f"sentence must be a non-empty str, got {sentence!r:.60}")
        vector = eng.embed_inputs([self.text_input(speaker, sentence)])[0]
        return push_batch([self], [{"speaker": speaker, "text": vector, "audio": audio, "visual": visual,
                                    "sentence": sentence}])[0]

    def text_input(self, speaker: Any, sentence: str) -> str:
        """What the checkpoint's text encoder reads for this session's next turn: the sentence itself, or, for
        a fine-tuned encoder that reads them, the speaker tag and the last turns pushed as text (embed it
        with ``engine.embed_inputs``; a service batches many sessions' inputs in one call)."""
        enc = self.engine.text_encoder()
        if enc is None:
            return sentence
        past = [(spk, text) for pos, spk, text in self._turns if pos < len(self)]
        return str(enc.turn_input(past, str(speaker), sentence))

    def _remember_turn(self, position: int, speaker: Any, sentence: str) -> None:
        """Keep the turn at ``position`` for the encoder inputs of later turns (only what the encoder reads:
        its context plus the rewind slots): a push or prefill given the utterance's ``sentence`` calls it."""
        enc = self.engine.text_encoder()
        if enc is None or not enc.recipe.context:
            return
        keep = enc.recipe.context + self.engine.max_rewind
        self._turns = [t for t in self._turns if t[0] < position][-keep:]
        self._turns.append((position, str(speaker), sentence))


def _check_keys(u: Mapping[str, Any]) -> None:
    extra = set(u) - {"speaker", "text", "audio", "visual", "sentence"}
    if extra or "speaker" not in u:
        raise DataError(f"an utterance needs 'speaker' (and features); got keys {sorted(u)}")
    _sentence(u)


def _sentence(u: Mapping[str, Any]) -> str | None:
    """An utterance's raw ``sentence`` (optional, beside its embedded ``text``): kept by the session for the
    inputs a fine-tuned encoder reads with later turns."""
    sentence = u.get("sentence")
    if sentence is not None and not isinstance(sentence, str):
        raise DataError(f"an utterance's sentence must be a str, got {type(sentence).__name__}")
    return sentence


def push_batch(sessions: Sequence[Stream], utterances: Sequence[Mapping[str, Any]]) -> list[Prediction]:
    """Step the next utterance of several sessions in one batched forward (for a service with many
    sessions): ``utterances[i]`` holds :meth:`Stream.push`'s arguments (``speaker``, ``text``, ``audio``,
    ``visual``) for ``sessions[i]``, and optionally the raw ``sentence`` its ``text`` embeds (the session
    keeps it for a fine-tuned encoder's later inputs, :meth:`Stream.text_input`).  The sessions must be
    distinct and share one :class:`StreamModel`.
    Every input is checked before anything runs: one bad utterance raises DataError (naming its index
    when there are several) and no session changes.  Returns one Prediction per session, equal to what
    :meth:`Stream.push` would give."""
    if len(sessions) != len(utterances) or not sessions:
        raise DataError(f"push_batch: {len(sessions)} sessions but {len(utterances)} utterances")
    eng = sessions[0].engine
    if any(s.engine is not eng for s in sessions) or len({id(s) for s in sessions}) != len(sessions):
        raise DataError("push_batch: the sessions must be distinct and share one StreamModel")
    slots, feats = [], []
    for i, (session, u) in enumerate(zip(sessions, utterances)):
        try:
            _check_keys(u)
            slots.append(session.speaker_slot(u["speaker"]))
            feats.append(eng.features(u.get("text"), u.get("audio"), u.get("visual")))
            session._check_room()
        except DataError as exc:
            if len(sessions) == 1:
                raise
            raise type(exc)(f"utterance {i}: {exc}") from None
    step = _Step({m: torch.cat([f[m] for f in feats]) for m in eng.modalities},
                 torch.tensor(slots, device=eng.device).view(-1, 1),
                 torch.ones(len(sessions), 1, dtype=torch.bool, device=eng.device),
                 torch.ones(len(sessions), dtype=torch.long, device=eng.device))
    single = len(sessions) == 1
    state = sessions[0]._state if single else StepState.stack([s._state for s in sessions])
    with torch.inference_mode():
        logits = eng.model(step, state).cpu()
    states = [state] if single else state.split()
    out = []
    for session, new, u, slot, row in zip(sessions, states, utterances, slots, logits):
        session._state = new
        position = len(session) - 1
        session._record(u["speaker"], slot, position, u.get("sentence"))
        out.append(eng.prediction(row, position))
    return out
