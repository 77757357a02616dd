"""A streaming segmenter: 16 kHz float32 audio in (any chunk size), speech events out.

silero-vad's ``VADIterator`` decides speech on fixed 512-sample (32 ms) chunks and says where speech
starts and where it ended (after ``pause_ms`` of silence); this class feeds it, keeps the audio of the
utterance in progress (plus a little before its start) and cuts an utterance that runs past
``max_utterance_s`` (the rest goes on as a new utterance).  Times are seconds from the track's start.

The ONNX model ships inside the ``silero-vad`` package; one inference session is loaded once and shared
(its ``run`` is thread-safe); each segmenter keeps its own recurrent state in a shallow copy.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from affectkit.audio import SAMPLE_RATE
from affectkit.errors import ConfigError

__all__ = ["CHUNK", "Segment", "Segmenter", "SegmenterConfig", "SpeechStart", "speech_span"]

#: Samples per VAD decision (silero-vad at 16 kHz).
CHUNK = 512

_lock = threading.Lock()
_shared: Any = None


def _vad_model() -> Any:
    """The shared silero-vad ONNX model (loaded on first use; the package ships it)."""
    global _shared
    with _lock:
        if _shared is None:
            from silero_vad import load_silero_vad

            _shared = load_silero_vad(onnx=True)
    return _shared


@dataclass(frozen=True)
class SegmenterConfig:
    """``threshold``: speech probability; ``pause_ms``: silence that ends an utterance; ``pad_ms``: audio
    kept either side of the speech; ``min_speech_ms``: shorter blips (not counting the pads) are dropped;
    ``max_utterance_s``: an utterance is cut at this length."""

    threshold: float = 0.5
    pause_ms: int = 500
    pad_ms: int = 100
    min_speech_ms: int = 250
    max_utterance_s: float = 15.0

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ConfigError(f"VAD threshold must be in (0, 1), got {self.threshold}")
        if self.pause_ms < 32 or self.pad_ms < 0 or self.min_speech_ms < 0:
            raise ConfigError("pause_ms must be >= 32 (one VAD chunk); pad_ms and min_speech_ms >= 0")
        if self.max_utterance_s < 1:
            raise ConfigError(f"max_utterance_s must be >= 1, got {self.max_utterance_s}")


@dataclass(frozen=True)
class SpeechStart:
    """Speech began at ``start`` seconds."""

    start: float


@dataclass(frozen=True)
class Segment:
    """One utterance's audio (float32 16 kHz) from ``start`` to ``end`` seconds; ``forced`` when it was
    cut at the maximum length rather than ended by a pause."""

    start: float
    end: float
    audio: np.ndarray = field(repr=False)
    forced: bool = False

    @property
    def duration(self) -> float:
        return self.end - self.start


Event = SpeechStart | Segment


class Segmenter:
    """Feed audio with :meth:`push`; get :class:`SpeechStart` and :class:`Segment` events in order."""

    def __init__(self, config: SegmenterConfig | None = None) -> None:
        from silero_vad import VADIterator

        self.config = c = config or SegmenterConfig()
        model = copy.copy(_vad_model())  # shared ONNX session, own recurrent state
        model.reset_states()
        self._vad = VADIterator(model, threshold=c.threshold, sampling_rate=SAMPLE_RATE,
                                min_silence_duration_ms=c.pause_ms, speech_pad_ms=c.pad_ms)
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet a whole chunk
        self._buf = np.zeros(0, dtype=np.float32)      # audio from sample self._base on
        self._base = 0                                  # track sample of self._buf[0]
        self._done = 0                                  # samples given to the VAD
        self._start: int | None = None                  # track sample where the open utterance starts
        self._max = int(c.max_utterance_s * SAMPLE_RATE)
        self._keep = int((c.pad_ms + 64) / 1000 * SAMPLE_RATE) + CHUNK  # history kept while silent

    @property
    def seconds(self) -> float:
        """Audio received so far (seconds)."""
        return (self._done + len(self._pending)) / SAMPLE_RATE

    @property
    def in_speech(self) -> bool:
        return self._start is not None

    def push(self, audio: np.ndarray) -> list[Event]:
        """Take more samples (float32, 16 kHz mono); return the events they complete."""
        x = np.concatenate([self._pending, np.asarray(audio, dtype=np.float32).reshape(-1)])
        n = len(x) - len(x) % CHUNK
        self._pending = x[n:]
        if not n:
            return []
        self._buf = np.concatenate([self._buf, x[:n]])
        events: list[Event] = []
        for k in range(0, n, CHUNK):
            chunk = torch.from_numpy(x[k:k + CHUNK])
            said = self._vad(chunk)
            self._done += CHUNK
            if said and "start" in said:
                self._start = max(int(said["start"]), self._base)
                events.append(SpeechStart(self._start / SAMPLE_RATE))
            elif said and "end" in said and self._start is not None:
                seg = self._cut(min(int(said["end"]), self._done), forced=False)
                if seg is not None:
                    events.append(seg)
            if self._start is not None and self._done - self._start >= self._max:
                cut = self._start + self._max
                seg = self._cut(cut, forced=True)
                if seg is not None:
                    events.append(seg)
                self._start = cut  # the VAD is still in speech: the rest is a new utterance
                events.append(SpeechStart(self._start / SAMPLE_RATE))
        if self._start is None and len(self._buf) > self._keep:
            drop = len(self._buf) - self._keep
            self._buf, self._base = self._buf[drop:], self._base + drop
        return events

    def flush(self) -> list[Event]:
        """End of the track: the utterance in progress (if long enough) as a last segment."""
        if self._start is None:
            return []
        seg = self._cut(self._done, forced=False)
        return [seg] if seg is not None else []

    def _cut(self, end: int, forced: bool) -> Segment | None:
        start = self._start
        assert start is not None
        self._start = None
        end = max(end, start)
        audio = self._buf[start - self._base:end - self._base].copy()
        self._buf, self._base = self._buf[end - self._base:], end  # what follows is history (or the next cut)
        if not forced and len(audio) < (self.config.min_speech_ms + 2 * self.config.pad_ms) * SAMPLE_RATE / 1000:
            return None
        return Segment(start / SAMPLE_RATE, end / SAMPLE_RATE, audio, forced)


def speech_span(audio: np.ndarray, config: SegmenterConfig | None = None) -> np.ndarray:
    """The stretch of one utterance's recording that the live segmenter would cut: first speech start to last
    speech end, with its padding (silence around the file stands in for the track's audio); the audio itself
    if no speech is found.  Features for training are measured on this stretch so that they match live ones
    (on the SYNTHETIC corpus, untrimmed training features cost 23 points of label accuracy from raw tracks)."""
    c = config or SegmenterConfig()
    c = SegmenterConfig(c.threshold, c.pause_ms, c.pad_ms, c.min_speech_ms, max_utterance_s=3600)
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    before = np.zeros(int((c.pad_ms + 64) / 1000 * SAMPLE_RATE), dtype=np.float32)
    after = np.zeros(int((c.pause_ms + 200) / 1000 * SAMPLE_RATE), dtype=np.float32)
    y = np.concatenate([before, x, after])
    seg = Segmenter(c)
    found = [e for e in seg.push(y) + seg.flush() if isinstance(e, Segment)]
    if not found:
        return x
    return y[int(round(found[0].start * SAMPLE_RATE)):int(round(found[-1].end * SAMPLE_RATE))]
