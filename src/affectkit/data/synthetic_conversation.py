"""Synthetic conversations in the COGMEN/CORECT layout, with a planted signal that needs context and fusion.

Used for tests, smoke runs and demos where the real IEMOCAP / MOSEI features are not at hand.

Planted signal
--------------
* Each dialogue's labels follow a sticky Markov chain: the emotion of utterance t repeats that of
  t-1 with probability ``stay``, otherwise it is redrawn from the class prior (emotion persists in
  real conversations, so neighbouring utterances are evidence about each other).
* Each modality m gives every class k a prototype direction ``P_m[k]`` (unit norm) and an utterance's
  feature is ``strength_m * P_m[label] + N(0, 1)`` noise (+ a small speaker offset in audio and visual).
  The prototypes of a modality come in *pairs* of classes that share most of their direction, and each
  modality pairs different classes (rounds of a round-robin schedule), so one modality alone confuses
  its pairs while the modalities together separate all classes.
* The strengths are set so that one modality of one utterance is a weak cue (a nearest-centroid
  classifier gets roughly 35-50% on iemocap6), all modalities together give much more, and averaging
  over neighbouring utterances (context) more again.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.data.provenance import MARKER_KEY, synthetic_marker
from affectkit.errors import ConfigError

__all__ = ["PRESETS", "SyntheticPreset", "write_synthetic_conversations"]

_SPLITS: tuple[str, ...] = ("train", "dev", "test")


@dataclass(frozen=True)
class SyntheticPreset:
    """Shape and signal of one synthetic dataset (dims are those of the real CORECT features)."""

    label_names: tuple[str, ...]
    class_prior: tuple[float, ...]
    speakers: tuple[str, ...]
    dims: dict[str, int]
    #: Signal norm per modality, relative to unit-variance noise in every dimension.
    strength: dict[str, float]
    length_range: tuple[int, int]
    n_dialogues: dict[str, int]
    stay: float = 0.9
    #: Share of a prototype's direction common to the two classes of its pair (0: none, 1: identical).
    pair_share: float = 0.8
    #: Probability that the next utterance is spoken by another speaker.
    turn_switch: float = 0.8
    speaker_offset: float = 1.0


_IEMOCAP_DIMS = {"text": 768, "audio": 100, "visual": 512}

PRESETS: dict[str, SyntheticPreset] = {
    # IEMOCAP class frequencies (hap 648, sad 1084, neu 1708, ang 1103, exc 1041, fru 1849).
    "iemocap6": SyntheticPreset(
        label_names=("hap", "sad", "neu", "ang", "exc", "fru"),
        class_prior=(0.087, 0.146, 0.230, 0.148, 0.140, 0.249),
        speakers=("F", "M"),
        dims=dict(_IEMOCAP_DIMS),
        strength={"text": 1.8, "audio": 1.4, "visual": 1.4},
        length_range=(20, 60),
        n_dialogues={"train": 40, "dev": 6, "test": 12},
    ),
    # IEMOCAP-4 merges exc into hap (CORECT's iemocap_4 keeps hap, sad, neu, ang).
    "iemocap4": SyntheticPreset(
        label_names=("hap", "sad", "neu", "ang"),
        class_prior=(0.296, 0.196, 0.309, 0.199),
        speakers=("F", "M"),
        dims=dict(_IEMOCAP_DIMS),
        strength={"text": 1.6, "audio": 1.2, "visual": 1.2},
        length_range=(20, 60),
        n_dialogues={"train": 40, "dev": 6, "test": 12},
    ),
    "mosei2": SyntheticPreset(
        label_names=("negative", "positive"),
        class_prior=(0.35, 0.65),
        speakers=("S",),
        dims={"text": 768, "audio": 80, "visual": 35},
        strength={"text": 1.1, "audio": 0.7, "visual": 0.6},
        length_range=(3, 15),
        n_dialogues={"train": 60, "dev": 10, "test": 20},
        stay=0.85,
        pair_share=0.0,  # two classes form a single pair: no shared direction, only the class's own
    ),
}


def _pair_groups(n_classes: int, round_: int) -> np.ndarray:
    """Group id per class: classes paired by one round of the circle-method round-robin schedule.

    Different rounds pair different classes, so modalities using different rounds confuse different
    pairs.  An odd class count leaves one class alone in its group each round.
    """
    n = n_classes + (n_classes % 2)  # a dummy "bye" class for odd counts
    n_rounds = max(n - 1, 1)
    r = round_ % n_rounds
    groups = np.full(n, -1, dtype=np.int64)
    pairs = [(r, n - 1)] + [((r + i) % (n - 1), (r - i) % (n - 1)) for i in range(1, n // 2)]
    for g, (a, b) in enumerate(pairs):
        groups[a] = groups[b] = g
    return groups[:n_classes]


def _prototypes(rng: np.random.Generator, dim: int, groups: np.ndarray, share: float) -> np.ndarray:
    """(K, dim) unit rows: the two classes of a group share ``share`` of their direction."""
    n_groups = int(groups.max()) + 1
    common = rng.standard_normal((n_groups, dim))
    own = rng.standard_normal((len(groups), dim))
    common /= np.linalg.norm(common, axis=1, keepdims=True)
    own /= np.linalg.norm(own, axis=1, keepdims=True)
    protos = np.sqrt(share) * common[groups] + np.sqrt(1.0 - share) * own
    return protos / np.linalg.norm(protos, axis=1, keepdims=True)


def _sticky_labels(
    rng: np.random.Generator, lengths: np.ndarray, prior: np.ndarray, stay: float
) -> np.ndarray:
    """Labels of all utterances of all dialogues (concatenated): a sticky Markov chain per dialogue."""
    total = int(lengths.sum())
    fresh = rng.choice(len(prior), size=total, p=prior)
    redraw = rng.random(total) >= stay
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    redraw[starts] = True  # a dialogue's first utterance is always a fresh draw
    last = np.maximum.accumulate(np.where(redraw, np.arange(total), 0))
    return fresh[last]


def _turns(rng: np.random.Generator, lengths: np.ndarray, n_speakers: int, switch: float) -> np.ndarray:
    """Speaker index per utterance (concatenated): another speaker takes the turn with prob ``switch``."""
    total = int(lengths.sum())
    if n_speakers == 1:
        return np.zeros(total, dtype=np.int64)
    step = (rng.random(total) < switch) * rng.integers(1, n_speakers, size=total)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    step[starts] = rng.integers(0, n_speakers, size=len(lengths))  # who opens each dialogue
    # per-dialogue cumulative sum of steps: global cumsum minus the sum before the dialogue start
    csum = np.cumsum(step)
    offset = np.repeat(csum[starts] - step[starts], lengths)
    return (csum - offset) % n_speakers


def _check_counts(preset: SyntheticPreset, n_dialogues: Mapping[str, int] | None) -> dict[str, int]:
    counts = dict(preset.n_dialogues)
    for split, n in (n_dialogues or {}).items():
        if split not in _SPLITS:
            raise ConfigError(f"n_dialogues: unknown split {split!r}; valid: {', '.join(_SPLITS)}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ConfigError(f"n_dialogues[{split!r}] must be a positive int, got {n!r}")
        counts[split] = int(n)
    return counts


def write_synthetic_conversations(
    path: str | Path,
    preset: str,
    seed: int,
    n_dialogues: Mapping[str, int] | None = None,
    dims: Mapping[str, int] | None = None,
    command: str | None = None,
) -> None:
    """Write a synthetic conversation pickle (COGMEN/CORECT layout plus ``label_names``/``speakers``).

    ``preset`` is one of :data:`PRESETS` (iemocap6, iemocap4, mosei2); ``n_dialogues`` overrides the
    preset's dialogue count per split; ``dims`` its feature sizes (small ones make fast tests).
    The same seed gives the same arrays. The file carries the generator's provenance marker (``command``
    that made it, preset, seed) under one extra top-level key.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; valid: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    if dims is not None:
        unknown = set(dims) - set(p.dims)
        if unknown or any(int(d) < 1 for d in dims.values()):
            raise ConfigError(f"dims must map {', '.join(p.dims)} to positive sizes, got {dict(dims)}")
        p = dataclasses.replace(p, dims={**p.dims, **{m: int(d) for m, d in dims.items()}})
    counts = _check_counts(p, n_dialogues)
    rng = np.random.default_rng(seed)
    n_classes = len(p.label_names)
    prior = np.asarray(p.class_prior, dtype=np.float64)
    prior /= prior.sum()

    modalities = list(p.dims)
    protos = {
        m: _prototypes(rng, p.dims[m], _pair_groups(n_classes, j), p.pair_share)
        for j, m in enumerate(modalities)
    }
    spk_dirs = {m: rng.standard_normal((len(p.speakers), p.dims[m])) for m in modalities}
    for m in modalities:
        spk_dirs[m] *= p.speaker_offset / np.linalg.norm(spk_dirs[m], axis=1, keepdims=True)
        if m == "text":
            spk_dirs[m][:] = 0.0  # words do not carry the speaker's voice or face

    data: dict[str, Any] = {"label_names": list(p.label_names), "speakers": list(p.speakers)}
    data[MARKER_KEY] = synthetic_marker(
        "conversation", seed, command or f"affectkit make-synthetic conversation OUT --preset {preset} --seed {seed}",
        preset=preset, n_dialogues=dict(n_dialogues) if n_dialogues else None, dims=dict(dims) if dims else None)
    lo, hi = p.length_range
    for split in _SPLITS:
        n = counts[split]
        lengths = rng.integers(lo, hi + 1, size=n)
        labels = _sticky_labels(rng, lengths, prior, p.stay)
        spk = _turns(rng, lengths, len(p.speakers), p.turn_switch)
        feats = {}
        for m in modalities:
            x = rng.standard_normal((int(lengths.sum()), p.dims[m]), dtype=np.float32)
            x += (p.strength[m] * protos[m][labels] + spk_dirs[m][spk]).astype(np.float32)
            feats[m] = x
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        items = []
        for i in range(n):
            a, b = int(bounds[i]), int(bounds[i + 1])
            item: dict[str, Any] = {
                "vid": f"{preset}_{split}_{i:04d}",
                "speakers": [p.speakers[s] for s in spk[a:b]],
                "labels": [int(v) for v in labels[a:b]],
            }
            for m in modalities:
                item[m] = feats[m][a:b].copy()
            item["sentence"] = [f"utt {t} of dlg {i}" for t in range(b - a)]
            items.append(item)
        data[split] = items

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump(data, fh, protocol=4)
    tmp.replace(path)
