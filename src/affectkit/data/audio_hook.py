"""The one place the table import touches audio: an utterance's file (and start/end) -> its prosody vector.

The prosody front end (openSMILE eGeMAPSv02 functionals, 88 numbers) lives in ``affectkit.audio``, an
optional part; when it cannot be imported, :func:`prosody_hook` returns None and the import keeps text
only (saying so).  Without it a ``.wav`` file is still checked for readability with the standard library.
As ``affectkit features audio`` does, the numbers are standardised with the train split's means and scales
(``affectkit.audio.prosody.Standardiser``), written into the file's ``meta["audio_features"]``.
"""

from __future__ import annotations

import importlib.util
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.errors import DataError

#: (path, start seconds or None, end seconds or None) -> float32 prosody vector.
ProsodyFn = Callable[[Path, "float | None", "float | None"], np.ndarray]


def wav_seconds(path: Path) -> float | None:
    """The duration of a PCM WAV file (DataError if it is not readable); None for other formats."""
    if path.suffix.lower() != ".wav":
        return None
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes() / float(w.getframerate())
    except (wave.Error, EOFError, OSError, ZeroDivisionError) as exc:
        raise DataError(f"not a readable PCM WAV file ({exc})") from None


def _available() -> bool:
    try:
        return importlib.util.find_spec("affectkit.audio.prosody") is not None and \
            importlib.util.find_spec("opensmile") is not None
    except (ImportError, ValueError):
        return False


def _prosody(path: Path, start: float | None, end: float | None) -> np.ndarray:
    from affectkit.audio import SAMPLE_RATE
    from affectkit.audio.pcm import read_wav
    from affectkit.audio.prosody import prosody
    from affectkit.audio.segmenter import speech_span

    x = read_wav(path)
    lo = int(round((start or 0.0) * SAMPLE_RATE))
    hi = len(x) if end is None else int(round(end * SAMPLE_RATE))
    return prosody(speech_span(x[lo:hi]), SAMPLE_RATE)  # the stretch the live segmenter would cut


def prosody_hook() -> ProsodyFn | None:
    """The prosody function of ``affectkit.audio`` when that part (and openSMILE) is installed, else None."""
    return _prosody if _available() else None


def standardiser() -> Any:
    """``affectkit.audio.prosody.Standardiser`` (fit on train rows, ``to_meta()`` into the file's meta, the
    same transform live), or None when that part is not installed."""
    try:
        from affectkit.audio.prosody import Standardiser
    except ImportError:
        return None
    return Standardiser
