"""PCM and WAV in, float32 16 kHz mono out: the one audio format of the front end.

WAV files are read with the standard library (8, 16, 24 or 32-bit integer PCM; anything else is refused
in one line), channels are averaged and any rate from 8 to 192 kHz is resampled to 16 kHz with a
polyphase filter (``scipy.signal.resample_poly``).
"""

from __future__ import annotations

import wave
from math import gcd
from pathlib import Path

import numpy as np

from affectkit.audio import SAMPLE_RATE
from affectkit.errors import DataError

__all__ = ["float_to_pcm", "pcm_to_float", "read_wav", "resample", "write_wav"]


def pcm_to_float(data: bytes) -> np.ndarray:
    """s16le bytes -> float32 samples in [-1, 1); DataError for an odd byte count."""
    if len(data) % 2:
        raise DataError(f"s16le audio needs an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_pcm(audio: np.ndarray) -> bytes:
    """float32 samples -> s16le bytes (clipped to the 16-bit range)."""
    return (np.clip(np.asarray(audio, dtype=np.float32), -1.0, 32767 / 32768) * 32768).astype("<i2").tobytes()


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """``audio`` at ``rate`` Hz -> ``target`` Hz (float32); unchanged when the rates agree."""
    if rate == target:
        return np.asarray(audio, dtype=np.float32)
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(np.asarray(audio, dtype=np.float64), target // g, rate // g).astype(np.float32)


def read_wav(path: str | Path) -> np.ndarray:
    """A WAV file as float32 16 kHz mono; one-line DataError for a missing or unreadable file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: audio file not found")
    try:
        with wave.open(str(p), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(f"{p}: not a readable PCM WAV file ({exc})") from None
    if rate < 8000 or rate > 192000:
        raise DataError(f"{p}: sample rate {rate} Hz is outside 8000-192000")
    if width == 2:
        x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        x = ((b[:, 0].astype(np.int32) << 8 | b[:, 1].astype(np.int32) << 16 | b[:, 2].astype(np.int32) << 24)
             >> 8).astype(np.float32) / 8388608.0
    elif width == 4:
        x = np.frombuffer(raw, dtype="<i4").astype(np.float32) / 2147483648.0
    elif width == 1:
        x = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        raise DataError(f"{p}: {8 * width}-bit samples are not supported (8, 16, 24 or 32-bit PCM)")
    x = x[: len(x) - len(x) % channels].reshape(-1, channels).mean(axis=1)
    return resample(x, rate)


def write_wav(path: str | Path, audio: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """float32 mono samples -> a 16-bit PCM WAV file."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(float_to_pcm(audio))
