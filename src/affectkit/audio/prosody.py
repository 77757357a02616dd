"""Prosody of an utterance: openSMILE's eGeMAPSv02 functionals, 88 numbers (pitch, loudness, jitter,
shimmer, formants, spectral balance, rate of voiced segments...), the standard small acoustic set of
affective computing.  A checkpoint whose audio modality is 88-d was trained on these (``affectkit
features audio``) and reads them live; for any other checkpoint they are only logged.

One ``opensmile.Smile`` is made on first use and shared; calls are serialised by a lock (the openSMILE
wrapper keeps per-call state), which costs nothing on the one prosody worker of the service.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from affectkit.audio import SAMPLE_RATE
from affectkit.errors import DataError

__all__ = ["DIM", "feature_names", "prosody"]

#: eGeMAPSv02 functionals per utterance.
DIM = 88
#: Shorter audio is padded with silence to this many seconds (openSMILE needs a few frames).
MIN_SECONDS = 0.1

_lock = threading.Lock()
_smile: Any = None


def _extractor() -> Any:
    global _smile
    if _smile is None:
        import opensmile

        _smile = opensmile.Smile(feature_set=opensmile.FeatureSet.eGeMAPSv02,
                                 feature_level=opensmile.FeatureLevel.Functionals)
    return _smile


def prosody(audio: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The 88 eGeMAPSv02 functionals of one utterance (float32, finite)."""
    x = np.asarray(audio, dtype=np.float32).reshape(-1)
    if not np.isfinite(x).all():
        raise DataError("audio holds values that are not finite")
    need = int(MIN_SECONDS * rate)
    if len(x) < need:
        x = np.concatenate([x, np.zeros(need - len(x), dtype=np.float32)])
    with _lock:
        frame = _extractor().process_signal(x, rate)
    v = np.asarray(frame.values, dtype=np.float32).reshape(-1)
    if v.shape != (DIM,):
        raise DataError(f"openSMILE returned {v.size} eGeMAPS values, expected {DIM}")
    return np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)


def feature_names() -> list[str]:
    """The 88 feature names, in order."""
    with _lock:
        return [str(n) for n in _extractor().feature_names]
