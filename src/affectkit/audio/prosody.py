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

__all__ = ["DIM", "KIND", "Standardiser", "feature_names", "prosody"]

#: eGeMAPSv02 functionals per utterance.
DIM = 88
#: The name a feature file and a checkpoint give these features.
KIND = "eGeMAPSv02-functionals"
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


class Standardiser:
    """Per-feature centring and scaling fitted on a training split (the raw numbers span 0.01 to 100s,
    which the model does not learn from as they are).  Written into the feature file's ``meta``, carried
    into the checkpoint's info, and applied live to the same numbers: one transform, offline and live."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.maximum(np.asarray(std, dtype=np.float32).reshape(-1), 1e-6)
        if self.mean.shape != (DIM,) or self.std.shape != (DIM,):
            raise DataError(f"a prosody standardiser needs {DIM} means and scales")

    @classmethod
    def fit(cls, rows: np.ndarray) -> Standardiser:
        return cls(rows.mean(axis=0), rows.std(axis=0))

    def __call__(self, v: np.ndarray) -> np.ndarray:
        return ((np.asarray(v, dtype=np.float32) - self.mean) / self.std).astype(np.float32)

    def to_meta(self) -> dict[str, object]:
        return {"kind": KIND, "dim": DIM, "mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std]}

    @classmethod
    def from_meta(cls, meta: object) -> Standardiser | None:
        """From a checkpoint's ``info["audio_features"]``; None when absent (features used as they are)."""
        if not isinstance(meta, dict) or meta.get("kind") != KIND:
            return None
        return cls(np.asarray(meta["mean"]), np.asarray(meta["std"]))
