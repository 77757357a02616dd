"""IEMOCAP and MELD transcripts in the COSMIC pickle layouts (declare-lab/conv-emotion): reading, validation.

IEMOCAP ``iemocap.pkl`` is a list of 6: ``[speakers{vid: ["M"/"F", ...]}, labels{vid: [0..5]},
sentences{vid: [str]}, train_vids, test_vids, valid_vids]``.
MELD ``meld.pkl`` is a list of 7: ``[speakers{vid: [one-hot 9]}, emotion{vid: [0..6]}, sentiment{vid: [0..2]},
sentences{vid: [str]}, train_vids, test_vids, valid_vids]``.

Both become the same plain structure: per split (train/dev/test) a list of dialogues, each a dict with
``vid`` (str), ``speakers`` (list of str tags), ``labels`` (list of int) and ``sentences`` (list of str).
The files are Python-2 pickles, read with the restricted unpickler and ``encoding="latin1"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from affectkit.data.conversation import SPLITS
from affectkit.errors import DataError
from affectkit.safe_pickle import safe_load

DATASETS: tuple[str, ...] = ("iemocap", "iemocap4", "meld")

#: IEMOCAP's usual abbreviations (happy, sad, neutral, angry, excited, frustrated), as the presets name them.
IEMOCAP_LABELS: list[str] = ["hap", "sad", "neu", "ang", "exc", "fru"]
IEMOCAP4_LABELS: list[str] = IEMOCAP_LABELS[:4]
MELD_LABELS: list[str] = ["neutral", "surprise", "fear", "sadness", "joy", "disgust", "anger"]

#: Where each dataset's pickle lives under a data root (``--source DIR``), and its bare file name.
_FILES: dict[str, tuple[str, str]] = {
    "iemocap": ("iemocap_cosmic", "iemocap.pkl"),
    "iemocap4": ("iemocap_cosmic", "iemocap.pkl"),
    "meld": ("meld_cosmic", "meld.pkl"),
}
#: Fraction of the train dialogues held out as dev when a file has no (or an empty) valid list.
DEV_FRACTION = 0.1
MELD_SPEAKER_DIM = 9


class Dialogue(TypedDict):
    """One conversation: parallel per-utterance lists."""

    vid: str
    speakers: list[str]
    labels: list[int]
    sentences: list[str]


@dataclass
class CosmicData:
    """The three splits of one dataset plus how they were made (``notes`` is meant for users and logs)."""

    dataset: str
    path: Path
    splits: dict[str, list[Dialogue]]
    label_names: list[str]
    notes: str

    def utterances(self, split: str) -> int:
        return sum(len(d["labels"]) for d in self.splits[split])

    @property
    def speaker_tags(self) -> list[str]:
        """All speaker tags in use, sorted (numeric tags by value)."""
        tags = {s for dialogues in self.splits.values() for d in dialogues for s in d["speakers"]}
        return sort_tags(tags)

    def summary(self) -> str:
        dia = "/".join(str(len(self.splits[s])) for s in SPLITS)
        utt = "/".join(str(self.utterances(s)) for s in SPLITS)
        return f"{self.dataset}: {dia} dialogues, {utt} utterances (train/dev/test)"


def sort_tags(tags: set[str] | Sequence[str]) -> list[str]:
    """Sort speaker tags; digit-only tags by their value so "10" follows "9"."""
    return sorted(set(tags), key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))


def fix_cp1252(text: str) -> str:
    """Turn C1 controls left by decoding cp1252 text as latin1 (``\\x92``) into the intended characters."""
    if not any("\x80" <= c <= "\x9f" for c in text):
        return text
    out = []
    for c in text:
        if "\x80" <= c <= "\x9f":
            try:
                c = bytes([ord(c)]).decode("cp1252")
            except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d are undefined in cp1252
                pass
        out.append(c)
    return "".join(out)


def find_file(dataset: str, source: str | Path) -> Path:
    """Locate a dataset's pickle given the data root, the dataset's folder, or the file itself."""
    if dataset not in _FILES:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    source = Path(source)
    folder, name = _FILES[dataset]
    if source.is_file():
        return source
    for candidate in (source / folder / name, source / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{source}: no {folder}/{name} or {name} found for dataset {dataset!r}")


def load_cosmic(dataset: str, source: str | Path) -> CosmicData:
    """Read ``dataset`` ("iemocap", "iemocap4" or "meld") from a data root, folder or pickle file."""
    path = find_file(dataset, source)
    if dataset == "meld":
        return read_meld(path)
    return read_iemocap(path, four_way=dataset == "iemocap4")


def read_iemocap(path: str | Path, four_way: bool = False) -> CosmicData:
    """Read the COSMIC IEMOCAP pickle (6-way labels; ``four_way`` keeps only happy/sad/neutral/angry).

    4-way rule: only utterances labelled 0..3 (happy, sad, neutral, angry) are kept; excited (4) and
    frustrated (5) utterances are dropped, not merged into happy/angry, and dialogues left empty are dropped.
    Dropping utterances also drops them from the conversation context a model sees.
    """
    path = Path(path)
    raw = _read_list(path, 6, "[speakers, labels, sentences, train_vids, test_vids, valid_vids]")
    speakers, labels, sentences = (
        _as_dict(raw[i], path, name) for i, name in enumerate(("speakers", "labels", "sentences"))
    )
    train, test, valid = (
        _as_vids(raw[i], path, name) for i, name in ((3, "train_vids"), (4, "test_vids"), (5, "valid_vids"))
    )
    n_labels = len(IEMOCAP_LABELS)

    def dialogue(vid: Any) -> Dialogue:
        spk, lab, sen = _parallel(path, vid, speakers, labels, sentences)
        return _dialogue(path, vid, [_speaker_tag(s, path, vid) for s in spk], lab, n_labels, sen)

    splits, notes = _make_splits(path, dialogue, train, valid, test)
    label_names = list(IEMOCAP_LABELS)
    dataset = "iemocap"
    if four_way:
        dataset = "iemocap4"
        label_names = list(IEMOCAP4_LABELS)
        dropped_utt = dropped_dia = 0
        for split, dialogues in splits.items():
            kept: list[Dialogue] = []
            for d in dialogues:
                keep = [i for i, y in enumerate(d["labels"]) if y < 4]
                dropped_utt += len(d["labels"]) - len(keep)
                if not keep:
                    dropped_dia += 1
                    continue
                kept.append(
                    Dialogue(
                        vid=d["vid"],
                        speakers=[d["speakers"][i] for i in keep],
                        labels=[d["labels"][i] for i in keep],
                        sentences=[d["sentences"][i] for i in keep],
                    )
                )
            splits[split] = kept
        notes += (
            f"; 4-way: kept labels 0-3 (happy, sad, neutral, angry), dropped {dropped_utt} excited/"
            f"frustrated utterances (not merged) and {dropped_dia} dialogues left empty"
        )
    return CosmicData(dataset, path, splits, label_names, notes)


def read_meld(path: str | Path) -> CosmicData:
    """Read the COSMIC MELD pickle: 7 emotions (sentiment is ignored), per-dialogue speaker tags.

    One-hot speakers become tags "0", "1", ... in order of first appearance within each dialogue;
    cp1252 bytes decoded as latin1 (``\\x92``) are turned into the intended characters (``’``).
    """
    path = Path(path)
    raw = _read_list(path, 7, "[speakers, emotion, sentiment, sentences, train_vids, test_vids, valid_vids]")
    speakers, emotion, sentences = (
        _as_dict(raw[i], path, name) for i, name in ((0, "speakers"), (1, "emotion"), (3, "sentences"))
    )
    train, test, valid = (
        _as_vids(raw[i], path, name) for i, name in ((4, "train_vids"), (5, "test_vids"), (6, "valid_vids"))
    )
    n_labels = len(MELD_LABELS)

    def dialogue(vid: Any) -> Dialogue:
        spk, lab, sen = _parallel(path, vid, speakers, emotion, sentences)
        order: dict[int, str] = {}
        tags = []
        for s in spk:
            who = _one_hot(s, path, vid)
            tags.append(order.setdefault(who, str(len(order))))
        return _dialogue(path, vid, tags, lab, n_labels, sen)

    splits, notes = _make_splits(path, dialogue, train, valid, test)
    notes += "; speakers: per-dialogue tags in order of first appearance"
    return CosmicData("meld", path, splits, list(MELD_LABELS), notes)


# --- validation helpers -------------------------------------------------------------------------------


def _read_list(path: Path, n: int, layout: str) -> list[Any]:
    raw = safe_load(path, encoding="latin1")
    if not isinstance(raw, (list, tuple)) or len(raw) != n:
        got = f"{type(raw).__name__} of {len(raw)}" if isinstance(raw, (list, tuple)) else type(raw).__name__
        raise DataError(f"{path}: expected a list of {n} {layout}, got {got}")
    return list(raw)


def _as_dict(value: Any, path: Path, name: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise DataError(f"{path}: {name} must be a dict keyed by dialogue id, got {type(value).__name__}")
    return value


def _as_vids(value: Any, path: Path, name: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise DataError(f"{path}: {name} must be a list of dialogue ids, got {type(value).__name__}")
    return list(value)


def _parallel(path: Path, vid: Any, *tables: Mapping[Any, Any]) -> list[list[Any]]:
    """The per-utterance lists of one dialogue; all present and of the same length."""
    names = ("speakers", "labels", "sentences")
    out = []
    for name, table in zip(names, tables):
        if vid not in table:
            raise DataError(f"{path}: dialogue {vid!r} is listed in a split but has no {name}")
        seq = table[vid]
        if isinstance(seq, (str, bytes)) or not hasattr(seq, "__len__"):
            raise DataError(f"{path}: dialogue {vid!r}: {name} must be a list, got {type(seq).__name__}")
        out.append(list(seq))
    lengths = [len(x) for x in out]
    if len(set(lengths)) != 1:
        detail = ", ".join(f"{n} {k}" for n, k in zip(lengths, names))
        raise DataError(f"{path}: dialogue {vid!r}: lengths disagree ({detail})")
    return out


def _dialogue(path: Path, vid: Any, tags: list[str], labels: list[Any], n_labels: int,
              sentences: list[Any]) -> Dialogue:
    """One checked dialogue from its speaker tags and its raw label and sentence lists."""
    return Dialogue(vid=str(vid), speakers=tags, labels=_labels(labels, n_labels, path, vid),
                    sentences=_sentences(sentences, path, vid))


def _labels(values: list[Any], n_labels: int, path: Path, vid: Any) -> list[int]:
    out = []
    for y in values:
        try:
            i = int(y)
            ok = i == y and 0 <= i < n_labels and not isinstance(y, bool)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"{path}: dialogue {vid!r}: label {y!r} is not an integer in 0..{n_labels - 1}")
        out.append(i)
    return out


def _sentences(values: list[Any], path: Path, vid: Any) -> list[str]:
    out = []
    for s in values:
        if isinstance(s, bytes):
            s = s.decode("cp1252", errors="replace")
        if not isinstance(s, str):
            raise DataError(f"{path}: dialogue {vid!r}: sentence {s!r} is not a string")
        out.append(fix_cp1252(s))
    return out


def _speaker_tag(value: Any, path: Path, vid: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("latin1")
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}: dialogue {vid!r}: speaker {value!r} is not a non-empty string")
    return value


def _one_hot(value: Any, path: Path, vid: Any) -> int:
    try:
        row = [float(x) for x in value]
    except (TypeError, ValueError):
        row = []
    if len(row) != MELD_SPEAKER_DIM or sorted(row) != [0.0] * (MELD_SPEAKER_DIM - 1) + [1.0]:
        raise DataError(
            f"{path}: dialogue {vid!r}: speaker {value!r} is not a one-hot vector of {MELD_SPEAKER_DIM}"
        )
    return row.index(1.0)


def _make_splits(
    path: Path, dialogue: Any, train: list[Any], valid: list[Any], test: list[Any]
) -> tuple[dict[str, list[Dialogue]], str]:
    """Build train/dev/test; dev is the file's valid list, or the first 10% of train when it has none (the
    spec's rule)."""
    seen: dict[Any, str] = {}
    for name, vids in (("train_vids", train), ("valid_vids", valid), ("test_vids", test)):
        for vid in vids:
            if vid in seen:
                raise DataError(f"{path}: dialogue {vid!r} is listed in both {seen[vid]} and {name}")
            seen[vid] = name
    if valid:
        notes = f"dev = the file's valid list ({len(valid)} dialogues)"
    else:
        n_dev = max(1, math.ceil(DEV_FRACTION * len(train))) if len(train) > 1 else 0
        valid, train = train[:n_dev], train[n_dev:]
        notes = (
            f"the file has no valid dialogues: dev = the first {n_dev} of {len(train) + n_dev} "
            f"train dialogues in file order ({DEV_FRACTION:.0%})"
        )
    splits: dict[str, list[Dialogue]] = {}
    empty = 0
    for split, vids in (("train", train), ("dev", valid), ("test", test)):
        dialogues = [dialogue(vid) for vid in vids]
        empty += sum(1 for d in dialogues if not d["labels"])
        splits[split] = [d for d in dialogues if d["labels"]]
    if empty:
        notes += f"; dropped {empty} empty dialogues"
    return splits, notes
