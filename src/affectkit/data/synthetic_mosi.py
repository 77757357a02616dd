"""A synthetic CMU-MOSI file in exactly the real on-disk layout, with a planted multimodal signal.

Each clip has three independent latent factors, one per modality; the label is a weighted sum of them
(text 0.5, audio 0.3, vision 0.2 of the variance), rounded to thirds like a mean of three annotators' integer
ratings and clipped to [-3, 3]. A modality shows only its own factor, at a random subset of its word steps
and with noise, so text alone explains about half of the label, and all three together nearly all of it.
Like the real file, sentences are left-padded with zero steps, and a few audio frames hold +-inf.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.data.provenance import MARKER_KEY, synthetic_marker

REAL_SIZES: dict[str, int] = {"train": 1284, "valid": 229, "test": 686}
REAL_DIMS: dict[str, int] = {"vision": 35, "text": 300, "audio": 74}
WEIGHTS: dict[str, float] = {"text": 0.5, "audio": 0.3, "vision": 0.2}


def make_synthetic_mosi(
    seed: int = 0,
    sizes: dict[str, int] | None = None,
    dims: dict[str, int] | None = None,
    seq_len: int = 50,
    noise: float = 1.0,
) -> dict[str, dict[str, np.ndarray]]:
    """The MultiBench dict ``{split: {vision, text, audio, labels (N,1,1), id}}`` with a planted signal."""
    rng = np.random.default_rng(seed)
    sizes = dict(REAL_SIZES if sizes is None else sizes)
    dims = dict(REAL_DIMS if dims is None else dims)
    directions = {m: rng.normal(size=d) / np.sqrt(d) * 3.0 for m, d in dims.items()}
    bias = {m: rng.normal(size=d) * 0.3 for m, d in dims.items()}
    out: dict[str, dict[str, np.ndarray]] = {}
    clip = 0
    for split, n in sizes.items():
        factors = {m: rng.normal(size=n) for m in dims}
        score = sum(np.sqrt(WEIGHTS[m]) * factors[m] for m in dims) * 1.4
        labels = np.clip(np.round(score * 3) / 3, -3, 3).astype(np.float32)
        words = rng.integers(8, seq_len + 1, size=n)  # real sentences are left-padded to seq_len
        steps = np.arange(seq_len)[None, :]
        present = steps >= (seq_len - words)[:, None]  # (n, T)
        part = {"labels": labels.reshape(n, 1, 1)}
        for m, d in dims.items():
            shows = present & (rng.random((n, seq_len)) < 0.3)  # steps where the factor is visible
            x = rng.normal(scale=noise, size=(n, seq_len, d)) + bias[m]
            x += (shows * factors[m][:, None])[:, :, None] * directions[m][None, None, :]
            x *= present[:, :, None]
            part[m] = x.astype(np.float32)
        bad = rng.random(part["audio"].shape) < 2e-4 if "audio" in dims else None
        if bad is not None:
            part["audio"][bad] = np.where(rng.random(int(bad.sum())) < 0.5, np.inf, -np.inf)
        part["id"] = np.array([[f"synth{(clip + i) // 8:04d}", str((clip + i) % 8)] for i in range(n)])
        clip += n
        out[split] = part
    return out


def write_synthetic_mosi(path: str | Path, seed: int = 0, command: str | None = None, **kwargs: Any) -> Path:
    """Write :func:`make_synthetic_mosi` to ``path`` as a pickle of numpy arrays and dicts only, with the
    generator's provenance marker (``command`` that made it, seed, settings) under one extra top-level key."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = dict(make_synthetic_mosi(seed, **kwargs))
    data[MARKER_KEY] = synthetic_marker("mosi", seed, command, **kwargs)
    with path.open("wb") as f:
        pickle.dump(data, f, protocol=4)
    return path
