"""MMSA's feature pickles (CMU-MOSI, CMU-MOSEI, CH-SIMS; aligned and unaligned) for our MOSI and
conversation tasks, and a writer of that layout.

Layout, as thuiar/MMSA ``src/MMSA/data_loader.py`` (``MMDataset.__init_mosi``, commit
177bc0462a61b355c554812dedd432a21f374130) reads it: ``{"train"|"valid"|"test": {"text": (N, T, Dt),
"audio": (N, Ta, Da), "vision": (N, Tv, Dv), "regression_labels": (N,), "id": (N,) str "video$_$clip",
"raw_text": (N,) str, ...}}``; unaligned files add ``audio_lengths``/``vision_lengths`` (N,) and their
audio/vision have their own step counts; MMSA sets ``-inf`` audio to 0 (we do the same for every modality:
our MOSI loader replaces non-finite values by 0).  SIMS adds ``regression_labels_T/A/V`` (not read).

For the MOSI task the clips keep their steps when aligned; unaligned audio and vision are mean-pooled over
their real frames (``*_lengths``) into as many equal time segments as the text has steps, so every
modality shares one step axis (our MOSI models need it).  Labels become ``(N, 1, 1)``, valid is valid.

For the conversation task each video is a dialogue (ids split at ``$_$``, clips ordered by their number),
each clip an utterance whose features are the mean of its real steps (text: rows not all zero; audio and
vision: ``*_lengths`` when given, else rows not all zero); labels are 2 classes, negative (< 0) and
positive (>= 0), as COGMEN's binary MOSEI; one speaker tag per file (monologues); dev = valid.

The real files cannot be obtained here: tested on files written in this layout by :func:`write_mmsa`.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.errors import DataError

__all__ = ["MMSA_SPLITS", "is_mmsa", "mmsa_conversations", "mmsa_to_mosi", "write_mmsa"]

MMSA_SPLITS: tuple[str, ...] = ("train", "valid", "test")
MODALITIES: tuple[str, ...] = ("text", "audio", "vision")
BINARY: list[str] = ["negative", "positive"]


def is_mmsa(raw: Any) -> bool:
    """Whether a loaded pickle is in MMSA's layout (splits holding ``regression_labels``)."""
    return isinstance(raw, Mapping) and isinstance(raw.get("train"), Mapping) and \
        "regression_labels" in raw["train"]


def _split(raw: Mapping[str, Any], split: str, name: str) -> dict[str, np.ndarray]:
    part = raw.get(split)
    if not isinstance(part, Mapping):
        raise DataError(f"{name}: MMSA layout: split {split!r} missing or not a dict")
    out = {}
    for key in (*MODALITIES, "regression_labels"):
        if key not in part:
            raise DataError(f"{name}[{split}]: MMSA layout: key {key!r} missing (found: {', '.join(map(str, part))})")
        arr = np.asarray(part[key])
        if not np.issubdtype(arr.dtype, np.number):
            raise DataError(f"{name}[{split}][{key}]: expected a numeric array, got dtype {arr.dtype}")
        out[key] = arr
    n = out["regression_labels"].size
    for m in MODALITIES:
        if out[m].ndim != 3 or out[m].shape[0] != n:
            raise DataError(f"{name}[{split}][{m}]: expected ({n}, steps, dims), got shape {out[m].shape}")
    for key in ("audio_lengths", "vision_lengths"):
        if key in part:
            lengths = np.asarray(part[key]).reshape(-1)
            if lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer) or (lengths < 0).any():
                raise DataError(f"{name}[{split}][{key}]: expected {n} lengths >= 0")
            out[key] = lengths
    ids = part.get("id")
    out["id"] = np.asarray([str(i) for i in (ids if ids is not None else range(n))], dtype=object)
    if out["id"].shape != (n,):
        raise DataError(f"{name}[{split}][id]: expected {n} ids")
    return out


def _segments(x: np.ndarray, length: int, steps: int) -> np.ndarray:
    """(T, D) frames whose first ``length`` are real -> (steps, D): the mean of equal time segments."""
    out = np.zeros((steps, x.shape[1]), np.float32)
    if length <= 0:
        return out
    edges = np.linspace(0, length, steps + 1)
    for k in range(steps):
        lo, hi = int(edges[k]), max(int(edges[k + 1]), int(edges[k]) + 1)
        out[k] = x[lo:min(hi, length)].mean(axis=0)
    return out


def mmsa_to_mosi(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Our MOSI layout (MultiBench: ``vision``/``text``/``audio`` (N, T, D), ``labels`` (N, 1, 1), ``id``)."""
    out: dict[str, Any] = {}
    for split in MMSA_SPLITS:
        part = _split(raw, split, name)
        steps = part["text"].shape[1]
        feats = {}
        for m in ("audio", "vision"):
            x = np.asarray(part[m], np.float32)
            if x.shape[1] != steps:
                if f"{m}_lengths" not in part:
                    raise DataError(f"{name}[{split}][{m}]: {x.shape[1]} steps but text has {steps}, and no "
                                    f"{m}_lengths (an unaligned file needs them)")
                x = np.stack([_segments(c, int(n), steps) for c, n in zip(x, part[f"{m}_lengths"])])
            feats[m] = x
        n = part["regression_labels"].size
        out[split] = {"vision": feats["vision"], "text": np.asarray(part["text"], np.float32),
                      "audio": feats["audio"], "labels": part["regression_labels"].reshape(n, 1, 1).astype(np.float32),
                      "id": part["id"]}
    return out


def _clip_key(clip_id: str) -> tuple[str, tuple[int, ...] | str]:
    """(video, order key) of an MMSA id such as ``03bSnISJMiM$_$11``."""
    video, sep, clip = clip_id.rpartition("$_$")
    if not sep:
        video, clip = clip_id, ""
    numbers = re.findall(r"\d+", clip)
    return video, tuple(int(x) for x in numbers) if numbers else clip


def _utterance(x: np.ndarray, length: int | None) -> np.ndarray:
    """Mean of a clip's real rows (the first ``length``, or the rows not all zero)."""
    x = np.asarray(x, np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    real = x[:length] if length is not None else x[np.abs(x).sum(axis=1) > 0]
    return (real.mean(axis=0) if len(real) else np.zeros(x.shape[1])).astype(np.float32)


def mmsa_conversations(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Our conversation layout: one dialogue per video, one utterance per clip, 2 sentiment classes."""
    ours = {"text": "text", "audio": "audio", "visual": "vision"}
    out: dict[str, Any] = {}
    for split, target in zip(MMSA_SPLITS, ("train", "dev", "test")):
        part = _split(raw, split, name)
        videos: dict[str, list[tuple[Any, int]]] = {}
        for i, clip_id in enumerate(part["id"]):
            video, key = _clip_key(str(clip_id))
            videos.setdefault(video, []).append((key, i))
        dialogues = []
        for video, clips in videos.items():
            rows = [i for _, i in sorted(clips, key=lambda c: (isinstance(c[0], str), c[0]))]
            d: dict[str, Any] = {"vid": video, "speakers": ["0"] * len(rows),
                                 "labels": [int(part["regression_labels"].reshape(-1)[i] >= 0) for i in rows]}
            for m, theirs in ours.items():
                lengths = part.get(f"{theirs}_lengths")
                d[m] = np.stack([_utterance(part[theirs][i], None if lengths is None else int(lengths[i]))
                                 for i in rows])
            dialogues.append(d)
        out[target] = dialogues
    out["label_names"] = list(BINARY)
    out["meta"] = {"layout": "MMSA", "notes": "MMSA pickle: one dialogue per video, clip features averaged over "
                                              "their real steps, labels negative (< 0) / positive (>= 0), dev = valid"}
    return out


def write_mmsa(mosi: Mapping[str, Any], path: str | Path, unaligned: Mapping[str, int] | None = None) -> None:
    """Write our MOSI layout ``mosi`` as an MMSA pickle.  ``unaligned`` ({"audio": r, "vision": r}) writes an
    unaligned file instead: each audio/vision step repeated ``r`` times (so the frames pool back to the
    originals), then 5 zero frames of padding, with ``*_lengths``."""
    out: dict[str, Any] = {}
    for split in MMSA_SPLITS:
        part = mosi[split]
        n = part["labels"].shape[0]
        ids = part.get("id")
        ids = ["$_$".join(map(str, np.asarray(i).reshape(-1))) for i in ids] if ids is not None else \
            [f"video{k // 3}$_${k % 3 + 1}" for k in range(n)]
        labels = np.asarray(part["labels"], np.float32).reshape(n)
        entry: dict[str, Any] = {"text": np.asarray(part["text"], np.float32), "regression_labels": labels,
                                 "id": np.asarray(ids, dtype=object),
                                 "raw_text": np.asarray([f"clip {i}" for i in ids], dtype=object),
                                 "classification_labels": (labels >= 0).astype(np.float32)}
        for m in ("audio", "vision"):
            x = np.asarray(part[m], np.float32)
            if unaligned:
                real = np.repeat(x, unaligned[m], axis=1)
                entry[m] = np.concatenate([real, np.zeros((n, 5, x.shape[2]), np.float32)], axis=1)
                entry[f"{m}_lengths"] = np.full(n, real.shape[1], np.int64)
            else:
                entry[m] = x
        out[split] = entry
    Path(path).write_bytes(pickle.dumps(out, protocol=4))
