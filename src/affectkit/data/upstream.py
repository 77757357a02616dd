"""The DialogueRNN / DialogueGCN / MMGCN feature pickles, read into (and written from) our conversation layout.

Layouts, as the public loaders unpack them:

* ``IEMOCAP_features.pkl``, a tuple of 9 (declare-lab/conv-emotion ``DialogueGCN/dataloader.py``
  ``IEMOCAPDataset``, commit 6951f5a7415ba25a588806bc96559573ba9f8ea2; the same in hujingwen6666/MMGCN
  ``dataloader.py``, commit 85732d984f70c1c84dd47c81aa97f1271397b899): ``videoIDs, videoSpeakers,
  videoLabels, videoText, videoAudio, videoVisual, videoSentence, trainVid, testVid``; every ``video*`` a
  dict keyed by dialogue id: speakers ``"M"``/``"F"`` per utterance, labels 0-5 (hap, sad, neu, ang, exc,
  fru), text/audio/visual (N, D) per dialogue (100/100/512 in the released file), sentences (N str).
  Read with ``encoding="latin1"`` (a Python 2 pickle).
* ``MELD_features_raw1.pkl``, a tuple of 10 (MMGCN ``dataloader.py`` ``MELDDataset``, same commit):
  ``videoIDs, videoSpeakers, videoLabels, videoText, videoAudio, videoVisual, videoSentence, trainVid,
  testVid, _``; speakers are one-hot vectors of 9 per utterance, labels 0-6 (neutral, surprise, fear,
  sadness, joy, disgust, anger), dims 600/300/342; the tenth item is not read by MMGCN and is ignored here.

Neither has a dev split: the loaders hold out ``idx[:int(0.1 * len(trainVid))]`` of the train list
(``get_train_valid_sampler``), so dev here is the first ``int(0.1 * n)`` train ids in the file's order
(sorted first when the file stores a set, whose order is not reproducible).  MELD speakers become the
tags "0".."8" (the one-hot index).  The real files cannot be obtained on our machines: this is tested
on files written in exactly these layouts by :func:`write_iemocap_features` / :func:`write_meld_features`.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.data.cosmic import IEMOCAP_LABELS, MELD_LABELS, fix_cp1252
from affectkit.errors import DataError

__all__ = ["IEMOCAP_ITEMS", "MELD_ITEMS", "from_upstream", "is_upstream", "write_iemocap_features",
           "write_meld_features"]

IEMOCAP_ITEMS: tuple[str, ...] = ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio",
                                  "videoVisual", "videoSentence", "trainVid", "testVid")
MELD_ITEMS: tuple[str, ...] = (*IEMOCAP_ITEMS, "_")
MELD_SPEAKERS = 9
#: Fraction of the train list the upstream loaders hold out for validation.
VALID_FRACTION = 0.1


def is_upstream(raw: Any) -> bool:
    """Whether a loaded pickle is one of these tuples (9: IEMOCAP, 10: MELD) rather than our dict."""
    return isinstance(raw, (list, tuple)) and len(raw) in (len(IEMOCAP_ITEMS), len(MELD_ITEMS))


def _ids(value: Any, name: str, where: str) -> list[Any]:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, (list, tuple, np.ndarray)):
        return list(value)
    raise DataError(f"{where}: {name} must be a list of dialogue ids, got {type(value).__name__}")


def _speaker(value: Any, meld: bool, where: str) -> str:
    if not meld:
        if isinstance(value, bytes):
            value = value.decode("latin1")
        if not isinstance(value, str) or not value:
            raise DataError(f"{where}: speaker {value!r} is not a non-empty string")
        return value
    row = np.asarray(value, dtype=np.float64).reshape(-1) if isinstance(value, (list, tuple, np.ndarray)) else None
    if row is None or row.shape != (MELD_SPEAKERS,) or sorted(row.tolist()) != [0.0] * (MELD_SPEAKERS - 1) + [1.0]:
        raise DataError(f"{where}: speaker {value!r:.60} is not a one-hot vector of {MELD_SPEAKERS}")
    return str(int(np.argmax(row)))


def from_upstream(raw: Any, name: str) -> dict[str, Any]:
    """Our conversation layout (a dict for :func:`~affectkit.data.conversation.load_conversations`) from an
    ``IEMOCAP_features.pkl`` (9 items) or ``MELD_features_raw1.pkl`` (10 items) tuple."""
    meld = len(raw) == len(MELD_ITEMS)
    layout = "MELD_features_raw1.pkl (10 items)" if meld else "IEMOCAP_features.pkl (9 items)"
    tables = {}
    for key, value in zip(IEMOCAP_ITEMS[1:7], raw[1:7]):
        if not isinstance(value, Mapping):
            raise DataError(f"{name}: {layout}: {key} must be a dict keyed by dialogue id, got {type(value).__name__}")
        tables[key] = value
    train, test = _ids(raw[7], "trainVid", name), _ids(raw[8], "testVid", name)
    both = set(map(str, train)) & set(map(str, test))
    if both:
        raise DataError(f"{name}: dialogue {sorted(both)[0]!r} is in both trainVid and testVid")
    n_dev = int(VALID_FRACTION * len(train))
    splits = {"train": train[n_dev:], "dev": train[:n_dev], "test": test}
    out: dict[str, Any] = {}
    for split, vids in splits.items():
        dialogues = []
        for vid in vids:
            where = f"{name}: dialogue {vid!r}"
            missing = [k for k, t in tables.items() if vid not in t]
            if missing:
                raise DataError(f"{where} is listed in a split but has no {missing[0]}")
            sentences = [fix_cp1252(s.decode("cp1252", "replace") if isinstance(s, bytes) else str(s))
                         for s in tables["videoSentence"][vid]]
            dialogues.append({
                "vid": str(vid),
                "speakers": [_speaker(s, meld, where) for s in tables["videoSpeakers"][vid]],
                "labels": list(tables["videoLabels"][vid]),
                "text": tables["videoText"][vid], "audio": tables["videoAudio"][vid],
                "visual": tables["videoVisual"][vid], "sentence": sentences,
            })
        out[split] = dialogues
    out["label_names"] = list(MELD_LABELS if meld else IEMOCAP_LABELS)
    out["meta"] = {"dataset": "meld" if meld else "iemocap", "layout": layout,
                   "notes": f"{layout}; dev = the first {n_dev} of {len(train)} trainVid ids (the upstream "
                            f"loaders' {VALID_FRACTION:.0%} hold-out)"}
    return out


def _tuple(data: Mapping[str, Any], meld: bool) -> tuple[Any, ...]:
    """The upstream tuple of our layout ``data`` (train then dev in trainVid, so dev is read back as dev when
    it is the first ``int(0.1 * n)`` of them)."""
    tables: dict[str, dict[str, Any]] = {k: {} for k in IEMOCAP_ITEMS[:7]}
    train, test = [], []
    for split in ("dev", "train", "test"):
        for d in data[split]:
            vid = d["vid"]
            (test if split == "test" else train).append(vid)
            tables["videoIDs"][vid] = [f"{vid}_{i}" for i in range(len(d["labels"]))]
            if meld:
                order: dict[Any, int] = {}
                slots = [order.setdefault(s, int(s) if str(s).isdigit() else len(order)) for s in d["speakers"]]
                tables["videoSpeakers"][vid] = [np.eye(MELD_SPEAKERS)[k].tolist() for k in slots]
            else:
                tables["videoSpeakers"][vid] = list(d["speakers"])
            tables["videoLabels"][vid] = [int(y) for y in d["labels"]]
            for key, m in (("videoText", "text"), ("videoAudio", "audio"), ("videoVisual", "visual")):
                tables[key][vid] = np.asarray(d[m])
            tables["videoSentence"][vid] = list(d.get("sentence") or [""] * len(d["labels"]))
    items = [tables[k] for k in IEMOCAP_ITEMS[:7]] + [train, test]
    return tuple(items + ([None] if meld else []))


def write_iemocap_features(data: Mapping[str, Any], path: str | Path) -> None:
    """Write our layout ``data`` (text, audio, visual; IEMOCAP labels) as an ``IEMOCAP_features.pkl`` tuple
    (protocol 2, as Python 2 wrote it)."""
    Path(path).write_bytes(pickle.dumps(_tuple(data, meld=False), protocol=2))


def write_meld_features(data: Mapping[str, Any], path: str | Path) -> None:
    """Write our layout ``data`` as a ``MELD_features_raw1.pkl`` tuple (speakers one-hot of 9)."""
    Path(path).write_bytes(pickle.dumps(_tuple(data, meld=True), protocol=4))
