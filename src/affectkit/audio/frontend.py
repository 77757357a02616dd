"""The audio front end: segments of speech -> :class:`Utterance` (transcript + prosody), and a
:class:`Track` that turns one participant's stream of audio into them.

Used the same way by ``affectkit transcribe`` (WAV files) and by the service (live PCM frames).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from affectkit.audio.segmenter import Segment, Segmenter, SegmenterConfig, SpeechStart

__all__ = ["Track", "Utterance", "analyse", "normalise_words", "word_errors"]


@dataclass
class Utterance:
    """One participant's utterance: ``start``/``end`` in seconds of their track, the transcript, its
    ``confidence`` (and ``words`` where the transcriber gives them), the 88 eGeMAPS ``prosody`` numbers,
    ``forced`` when it was cut at the maximum length."""

    speaker: str
    start: float
    end: float
    text: str
    confidence: float
    prosody: np.ndarray = field(repr=False)
    words: list[dict[str, Any]] | None = None
    forced: bool = False

    def public(self) -> dict[str, Any]:
        """JSON-ready (prosody as a list of floats)."""
        d = asdict(self)
        d["prosody"] = [round(float(v), 6) for v in self.prosody]
        d["start"], d["end"], d["confidence"] = round(self.start, 3), round(self.end, 3), round(self.confidence, 4)
        return d


def analyse(speaker: str, segments: Sequence[Segment], transcriber: Any) -> list[Utterance]:
    """Transcribe (as one batch) and measure the prosody of ``segments`` of one speaker."""
    from affectkit.audio.prosody import prosody

    if not segments:
        return []
    texts = transcriber.transcribe_batch([s.audio for s in segments])
    out = []
    for s, t in zip(segments, texts):
        words = [asdict(w) for w in t.words] if t.words is not None else None
        out.append(Utterance(speaker, s.start, s.end, t.text, t.confidence, prosody(s.audio), words, s.forced))
    return out


class Track:
    """One participant's audio: :meth:`push` float32 16 kHz samples, get speech starts and segments."""

    def __init__(self, speaker: str, config: SegmenterConfig | None = None) -> None:
        self.speaker = speaker
        self.segmenter = Segmenter(config)

    def push(self, audio: np.ndarray) -> list[SpeechStart | Segment]:
        return self.segmenter.push(audio)

    def flush(self) -> list[SpeechStart | Segment]:
        return self.segmenter.flush()


_CONTRACTIONS = {"i'm": "i am", "it's": "it is", "don't": "do not", "can't": "can not", "cannot": "can not",
                 "won't": "will not", "you're": "you are", "that's": "that is", "let's": "let us",
                 "we're": "we are", "i'll": "i will", "isn't": "is not", "didn't": "did not"}


def normalise_words(text: str) -> list[str]:
    """Lower case, punctuation out, a few contractions spelled out (a small Whisper-style normaliser)."""
    words = re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()
    out: list[str] = []
    for w in words:
        out.extend(_CONTRACTIONS.get(w, w.strip("'")).split())
    return [w for w in out if w]


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference words) after :func:`normalise_words`."""
    r, h = normalise_words(reference), normalise_words(hypothesis)
    d = list(range(len(h) + 1))
    for i in range(1, len(r) + 1):
        prev, d[0] = d[:], i
        for j in range(1, len(h) + 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r[i - 1] != h[j - 1]))
    return d[len(h)], len(r)
