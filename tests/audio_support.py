"""Speech for the audio tests: espeak-ng sentences laid out on a track with known silences."""

from __future__ import annotations

import numpy as np

from affectkit.audio import SAMPLE_RATE


def layout(pieces: list[tuple[float, np.ndarray | None]], noise: float = 3e-4,
           seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A track from ``(silence_before_s, speech)`` pieces (speech None: only the silence) with a faint
    noise floor; returns the track and each speech's (start, end) in seconds."""
    parts, spans, t = [], [], 0
    for gap, speech in pieces:
        parts.append(np.zeros(int(gap * SAMPLE_RATE), dtype=np.float32))
        t += int(gap * SAMPLE_RATE)
        if speech is not None:
            parts.append(speech.astype(np.float32))
            spans.append((t / SAMPLE_RATE, (t + len(speech)) / SAMPLE_RATE))
            t += len(speech)
    track = np.concatenate(parts)
    track += np.random.default_rng(seed).standard_normal(len(track)).astype(np.float32) * noise
    return track, spans


def feed(segmenter, audio: np.ndarray, frame: int = 1600) -> list:
    """Push ``audio`` in frames of ``frame`` samples (100 ms by default); all events, then the flush."""
    events = []
    for k in range(0, len(audio), frame):
        events += segmenter.push(audio[k:k + frame])
    return events
