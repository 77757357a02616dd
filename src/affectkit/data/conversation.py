"""Conversations for emotion recognition in conversation (ERC) in the COGMEN/CORECT pickle layout.

Layout: ``{"train": [dialogue, ...], "dev": [...], "test": [...]}`` plus optional top-level keys
``"label_names"`` (list of str) and ``"speakers"`` (list of tags).  Each dialogue is a dict with ``vid``
(str), ``speakers`` (N tags, str or int), ``labels`` (N ints), any of ``text`` / ``audio`` / ``visual``
((N, D) float arrays, or lists of N 1-D arrays as in the CORECT files) and optionally ``sentence``
(N str).  Feature dims, the class count and the speaker set are read from the file, never assumed.

Every malformed input raises a one-line :class:`~affectkit.errors.DataError` naming the file, split and
dialogue.  The file is read through :func:`~affectkit.safe_pickle.safe_load` (no code runs on load).
Batches pad dialogues to the longest in the batch: features with 0, labels with -100 (the default
``ignore_index`` of ``cross_entropy``), speakers with 0, plus a boolean mask and the lengths.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from affectkit.data.provenance import marker_of
from affectkit.errors import ConfigError, DataError
from affectkit.safe_pickle import safe_load

log = logging.getLogger("affectkit")

__all__ = [
    "IGNORE_INDEX",
    "MODALITIES",
    "SPLITS",
    "ConversationBatch",
    "ConversationData",
    "ConversationLoader",
    "Dialogue",
    "class_counts",
    "collate_dialogues",
    "load_conversations",
]

SPLITS: tuple[str, ...] = ("train", "dev", "test")
#: Canonical modality order; models and batches iterate in this order.
MODALITIES: tuple[str, ...] = ("text", "audio", "visual")
#: Label value at padded positions (``torch.nn.functional.cross_entropy``'s default ``ignore_index``).
IGNORE_INDEX: int = -100


@dataclass(eq=False)
class Dialogue:
    """One validated dialogue: ``speakers``/``labels`` are (N,) int64, ``features[m]`` is (N, D_m) float32."""

    vid: str
    speakers: np.ndarray
    labels: np.ndarray
    features: dict[str, np.ndarray]
    sentences: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ConversationData:
    """The three splits plus what was read from the file.

    ``modalities`` are the modalities the file holds (canonical order) and ``dims`` their feature sizes;
    ``kept`` are the requested ones, i.e. the keys of every ``Dialogue.features``.
    """

    path: Path
    splits: dict[str, list[Dialogue]]
    dims: dict[str, int]
    modalities: tuple[str, ...]
    kept: tuple[str, ...]
    n_classes: int
    label_names: list[str]
    speakers: list[str | int]
    speaker_index: dict[str | int, int]
    #: The generator's marker (:mod:`affectkit.data.provenance`) for a synthetic file; None for real data.
    provenance: dict[str, Any] | None = None
    #: The file's ``meta`` mapping (e.g. which text encoder built the features), {} when absent.
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_speakers(self) -> int:
        return len(self.speakers)

    def summary(self) -> str:
        """One line per split: dialogue and utterance counts and the count of each class."""
        lines = []
        for split in SPLITS:
            dialogues = self.splits[split]
            counts = class_counts(dialogues, self.n_classes)
            per_class = ", ".join(f"{name} {int(c)}" for name, c in zip(self.label_names, counts))
            lines.append(
                f"{split}: {len(dialogues)} dialogues, {int(counts.sum())} utterances; classes: {per_class}"
            )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- loading


def _feature_shape(value: Any, where: str) -> tuple[int, ...]:
    """Shape of a modality value without copying it: an ndarray, or a list of 1-D arrays (CORECT)."""
    if isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise DataError(f"{where}: expected a numeric array, got dtype {value.dtype}")
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        if not value:
            return (0, 0)
        rows = []
        for i, row in enumerate(value):
            row_shape = np.shape(row) if isinstance(row, (np.ndarray, list, tuple)) else None
            if row_shape is None or len(row_shape) != 1:
                got = "a scalar" if row_shape is None else f"shape {row_shape}"
                raise DataError(f"{where}: expected a 2-D array, but utterance {i} holds {got}")
            rows.append(row_shape[0])
        if len(set(rows)) != 1:
            raise DataError(f"{where}: expected a 2-D array, got rows of different sizes {sorted(set(rows))}")
        return (len(value), rows[0])
    raise DataError(f"{where}: expected a 2-D numeric array, got {type(value).__name__}")


def _as_features(value: Any, where: str) -> np.ndarray:
    """A float32 copy of a modality value; refuses non-finite values (no silent repair)."""
    try:
        arr = np.array(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: not a numeric array ({exc})") from None
    bad = ~np.isfinite(arr)
    if bad.any():
        raise DataError(
            f"{where}: {int(bad.sum())} non-finite values (NaN/inf) in {arr.size}; refusing to train"
        )
    return arr


def _as_tag(tag: Any, where: str) -> str | int:
    if isinstance(tag, (str, np.str_)):
        return str(tag)
    if isinstance(tag, (numbers.Integral, np.integer)) and not isinstance(tag, (bool, np.bool_)):
        return int(tag)
    raise DataError(f"{where}: speaker tag {tag!r} is neither a str nor an int")


def _as_sequence(value: Any, key: str, where: str) -> Sequence[Any]:
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise DataError(f"{where}: {key!r} must be 1-D, got shape {value.shape}")
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return value
    raise DataError(f"{where}: {key!r} must be a list, got {type(value).__name__}")


def _as_labels(value: Any, where: str) -> np.ndarray:
    seq = _as_sequence(value, "labels", where)
    for i, lab in enumerate(seq):
        if isinstance(lab, (bool, np.bool_)) or not isinstance(lab, (numbers.Integral, np.integer)):
            raise DataError(f"{where}: label {lab!r} at utterance {i} is not an int")
    labels = np.asarray(seq, dtype=np.int64).reshape(len(seq))
    if labels.size and labels.min() < 0:
        i = int(np.argmax(labels < 0))
        raise DataError(f"{where}: negative label {int(labels[i])} at utterance {i}")
    return labels


def _tag_list(value: Any, key: str, where: str) -> list[str | int]:
    seq = _as_sequence(value, key, where)
    tags = [_as_tag(t, where) for t in seq]
    if len({type(t) for t in tags}) > 1:
        raise DataError(f"{where}: speaker tags mix str and int ({tags[:6]!r}...)")
    return tags


@dataclass
class _RawDialogue:
    """A structurally checked dialogue before the file-wide label and speaker sets are known."""

    where: str
    vid: str
    tags: list[str | int]
    labels: np.ndarray
    present: tuple[str, ...]
    raw: dict[str, Any]


def _our_layout(raw: Any, name: str) -> Any:
    """The field's standard files (DialogueGCN/MMGCN tuples, MMSA dicts) converted to our layout; ours as is."""
    from affectkit.data.mmsa import is_mmsa, mmsa_conversations
    from affectkit.data.upstream import from_upstream, is_upstream

    if is_upstream(raw):
        return from_upstream(raw, name)
    if is_mmsa(raw):
        return mmsa_conversations(raw, name)
    return raw


def load_conversations(path: str | Path, modalities: Sequence[str] | None = None,
                       classes: Sequence[str] | None = None,
                       speakers: Sequence[str | int] | None = None, labelled: bool = True) -> ConversationData:
    """Load and validate a COGMEN/CORECT-layout conversation pickle; keep only ``modalities``.

    The field's standard files are read too: DialogueRNN/DialogueGCN/MMGCN ``IEMOCAP_features.pkl`` and
    ``MELD_features_raw1.pkl`` (:mod:`affectkit.data.upstream`) and MMSA's MOSI/MOSEI/SIMS pickles
    (:mod:`affectkit.data.mmsa`).

    ``modalities=None`` keeps every modality the file holds.  A requested modality the file lacks, and
    any malformed dialogue, raise a one-line DataError naming the file, split and dialogue vid.
    ``classes`` (a preset's or a checkpoint's class list) fixes the label set: a file whose ``label_names``
    differ, or a label outside it, is refused.  ``speakers`` (a checkpoint's speaker tags) fixes the speaker
    slots: a tag outside it is refused, naming the known ones.  ``labelled=False`` (prediction) reads a file
    without labels (an ``affectkit import`` of an unlabelled table): labels are ignored (every one
    ``IGNORE_INDEX``) and splits may be empty.
    """
    path = Path(path)
    name = str(path)
    raw = safe_load(path, encoding="latin1")
    raw = _our_layout(raw, name)
    if not isinstance(raw, dict):
        raise DataError(f"{name}: expected a dict with splits {', '.join(SPLITS)}, got {type(raw).__name__}")
    for split in SPLITS:
        if split not in raw:
            found = ", ".join(map(str, raw)) or "none"
            raise DataError(f"{name}: split {split!r} missing (found keys: {found})")
    if labelled and isinstance(raw.get("meta"), dict) and raw["meta"].get("labelled") is False:
        raise DataError(f"{name}: imported without labels; it can only be predicted on "
                        "(affectkit predict CHECKPOINT DATA), not trained or evaluated")

    label_names: list[str] | None = None
    if "label_names" in raw:
        names = raw["label_names"]
        if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
            raise DataError(f"{name}: 'label_names' must be a non-empty list of str, got {names!r:.80}")
        label_names = list(names)
    declared: list[str | int] | None = None
    if "speakers" in raw:
        declared = _tag_list(raw["speakers"], "speakers", f"{name}: top-level 'speakers'")
        if not declared or len(set(declared)) != len(declared):
            raise DataError(f"{name}: top-level 'speakers' must be a non-empty list of distinct tags")

    # Pass 1: structure, lengths, shapes and dims of every dialogue (cheap: no feature copies).
    dialogues: dict[str, list[_RawDialogue]] = {}
    file_modalities: tuple[str, ...] | None = None
    dims: dict[str, int] = {}
    for split in SPLITS:
        part = raw[split]
        if not isinstance(part, (list, tuple)):
            raise DataError(f"{name}[{split}]: expected a list of dialogue dicts, got {type(part).__name__}")
        if not part and labelled:
            raise DataError(f"{name}[{split}]: empty split (0 dialogues)")
        dialogues[split] = []
        for i, item in enumerate(part):
            if not isinstance(item, dict):
                raise DataError(f"{name}[{split}] dialogue #{i}: expected a dict, got {type(item).__name__}")
            vid = str(item.get("vid", f"#{i}"))
            where = f"{name}[{split}] dialogue {vid!r}"
            for key in ("labels", "speakers") if labelled else ("speakers",):
                if key not in item:
                    raise DataError(f"{where}: key {key!r} missing (found: {', '.join(map(str, item))})")
            present = tuple(m for m in MODALITIES if m in item)
            if file_modalities is None:
                if not present:
                    raise DataError(f"{where}: no modality array (expected any of {', '.join(MODALITIES)})")
                file_modalities = present
            elif present != file_modalities:
                missing = [m for m in file_modalities if m not in present]
                extra = [m for m in present if m not in file_modalities]
                detail = f"lacks {', '.join(missing)}" if missing else f"has extra {', '.join(extra)}"
                raise DataError(f"{where}: {detail}; other dialogues hold {', '.join(file_modalities)}")
            tags = _tag_list(item["speakers"], "speakers", where)
            labels = _as_labels(item["labels"], where) if labelled else np.full(len(tags), IGNORE_INDEX, np.int64)
            lengths = {"labels": len(labels), "speakers": len(tags)}
            for m in present:
                shape = _feature_shape(item[m], f"{where}[{m}]")
                if len(shape) != 2:
                    raise DataError(
                        f"{where}[{m}]: expected a 2-D array (utterances, dims), got shape {shape}"
                    )
                lengths[m] = shape[0]
                if shape[0] and dims.setdefault(m, shape[1]) != shape[1]:
                    raise DataError(
                        f"{where}[{m}]: feature dim {shape[1]} differs from {dims[m]} in earlier dialogues"
                    )
            if item.get("sentence") is not None:
                lengths["sentence"] = len(_as_sequence(item["sentence"], "sentence", where))
            if len(set(lengths.values())) != 1:
                detail = ", ".join(f"{k} {v}" for k, v in lengths.items())
                raise DataError(f"{where}: lengths differ ({detail})")
            if lengths["labels"] == 0:
                raise DataError(f"{where}: empty dialogue (0 utterances)")
            dialogues[split].append(_RawDialogue(where, vid, tags, labels, present, item))
    if file_modalities is None:
        raise DataError(f"{name}: no dialogue in any split")

    if modalities is None:
        kept = file_modalities
    else:
        wanted = list(dict.fromkeys([modalities] if isinstance(modalities, str) else modalities))
        if not wanted:
            raise DataError(f"{name}: no modality requested; the file holds {', '.join(file_modalities)}")
        lacking = [m for m in wanted if m not in file_modalities]
        if lacking:
            raise DataError(
                f"{name}: modality {', '.join(map(repr, lacking))} not in the file; "
                f"it holds {', '.join(file_modalities)}"
            )
        kept = tuple(m for m in MODALITIES if m in wanted)

    # File-wide label and speaker sets.
    if not labelled:
        label_names = [str(c) for c in classes] if classes is not None else (label_names or [])
        n_classes = len(label_names)
    elif classes is not None:
        classes = [str(c) for c in classes]
        if label_names is not None and label_names != classes:
            raise DataError(f"{name}: the file's label_names {label_names} differ from the expected classes "
                            f"{classes} (set data.classes to match the file, or use the right preset)")
        label_names, source = classes, "the expected classes"
    else:
        source = "the file's label_names"
    if labelled and label_names is not None:
        n_classes = len(label_names)
        for ds in dialogues.values():
            for d in ds:
                if int(d.labels.max()) >= n_classes:
                    i = int(np.argmax(d.labels >= n_classes))
                    raise DataError(
                        f"{d.where}: label {int(d.labels[i])} at utterance {i} outside [0, {n_classes}) "
                        f"({source}: {', '.join(label_names)})"
                    )
    elif labelled:
        n_classes = max(int(d.labels.max()) for ds in dialogues.values() for d in ds) + 1
        label_names = [str(k) for k in range(n_classes)]
    if labelled:
        train_counts = np.bincount(np.concatenate([d.labels for d in dialogues["train"]]), minlength=n_classes)
        missing = [label_names[c] for c in np.flatnonzero(train_counts == 0)]
        if missing:
            log.warning("%s: no training example of class %s", name, ", ".join(missing))
    if speakers is not None:  # a checkpoint's speaker slots
        declared, origin = [_as_tag(t, f"{name}: speakers") for t in speakers], "the model knows"
    else:
        origin = "the file declares"
    if declared is not None:
        speakers = declared
        allowed = set(declared)
        for ds in dialogues.values():
            for d in ds:
                unknown = [t for t in dict.fromkeys(d.tags) if t not in allowed]
                if unknown:
                    raise DataError(
                        f"{d.where}: unknown speaker tag {unknown[0]!r}; {origin} {declared!r}"
                    )
    else:
        union = {t for ds in dialogues.values() for d in ds for t in d.tags}
        if len({type(t) for t in union}) > 1:
            raise DataError(f"{name}: speaker tags mix str and int across dialogues")
        speakers = sorted(union)  # type: ignore[type-var]
    speaker_index = {t: i for i, t in enumerate(speakers)}

    # Pass 2: copy the kept modalities to float32 (refusing non-finite values) and index speakers.
    splits: dict[str, list[Dialogue]] = {}
    for split, ds in dialogues.items():
        out = []
        for d in ds:
            feats = {m: _as_features(d.raw[m], f"{d.where}[{m}]") for m in kept}
            sentence = d.raw.get("sentence")
            sentences = [str(s) for s in sentence] if sentence is not None else None
            spk = np.fromiter((speaker_index[t] for t in d.tags), dtype=np.int64, count=len(d.tags))
            out.append(Dialogue(d.vid, spk, d.labels, feats, sentences))
        splits[split] = out

    return ConversationData(
        path=path,
        splits=splits,
        dims=dims,
        modalities=file_modalities,
        kept=kept,
        n_classes=n_classes,
        label_names=label_names,
        speakers=speakers,
        speaker_index=speaker_index,
        provenance=marker_of(raw),
        meta=dict(raw["meta"]) if isinstance(raw.get("meta"), dict) else {},
    )


def class_counts(dialogues: Sequence[Dialogue], n_classes: int) -> np.ndarray:
    """Utterances per class, (n_classes,) int64, e.g. for inverse-frequency class weights."""
    if not dialogues:
        return np.zeros(n_classes, dtype=np.int64)
    labels = np.concatenate([d.labels for d in dialogues])
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}), found [{labels.min()}, {labels.max()}]")
    return np.bincount(labels, minlength=n_classes).astype(np.int64)


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class ConversationBatch:
    """B dialogues padded to T utterances.

    ``features[m]`` (B, T, D_m) float32, zero at padding; ``lengths`` (B,) long; ``mask`` (B, T) bool,
    True at real utterances; ``speakers`` (B, T) long, 0 at padding; ``labels`` (B, T) long,
    ``IGNORE_INDEX`` (-100) at padding; ``vids`` the B dialogue ids.
    """

    features: dict[str, torch.Tensor]
    lengths: torch.Tensor
    mask: torch.Tensor
    speakers: torch.Tensor
    labels: torch.Tensor
    vids: list[str]

    def __len__(self) -> int:
        return len(self.vids)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ConversationBatch:
        """A copy with every tensor on ``device``."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return ConversationBatch(
            features={m: move(x) for m, x in self.features.items()},
            lengths=move(self.lengths),
            mask=move(self.mask),
            speakers=move(self.speakers),
            labels=move(self.labels),
            vids=list(self.vids),
        )


@dataclass
class _DialogueTensors:
    vid: str
    features: dict[str, torch.Tensor]
    speakers: torch.Tensor
    labels: torch.Tensor


def _to_tensors(dialogue: Dialogue, modalities: Sequence[str]) -> _DialogueTensors:
    lacking = [m for m in modalities if m not in dialogue.features]
    if lacking:
        raise ConfigError(
            f"dialogue {dialogue.vid!r}: modality {lacking[0]!r} was not loaded "
            f"(loaded: {', '.join(dialogue.features) or 'none'})"
        )
    return _DialogueTensors(
        vid=dialogue.vid,
        features={m: torch.as_tensor(dialogue.features[m], dtype=torch.float32) for m in modalities},
        speakers=torch.as_tensor(dialogue.speakers, dtype=torch.long),
        labels=torch.as_tensor(dialogue.labels, dtype=torch.long),
    )


def _collate(items: Sequence[_DialogueTensors], modalities: Sequence[str]) -> ConversationBatch:
    if not items:
        raise ValueError("cannot collate an empty list of dialogues")
    lengths = torch.tensor([int(it.labels.shape[0]) for it in items], dtype=torch.long)
    t_max = int(lengths.max())
    mask = torch.arange(t_max).unsqueeze(0) < lengths.unsqueeze(1)
    return ConversationBatch(
        features={m: pad_sequence([it.features[m] for it in items], batch_first=True) for m in modalities},
        lengths=lengths,
        mask=mask,
        speakers=pad_sequence([it.speakers for it in items], batch_first=True, padding_value=0),
        labels=pad_sequence([it.labels for it in items], batch_first=True, padding_value=IGNORE_INDEX),
        vids=[it.vid for it in items],
    )


def collate_dialogues(dialogues: Sequence[Dialogue], modalities: Sequence[str]) -> ConversationBatch:
    """Pad ``dialogues`` into one batch holding ``modalities`` (see :class:`ConversationBatch`)."""
    return _collate([_to_tensors(d, modalities) for d in dialogues], modalities)


class ConversationLoader:
    """Batches of whole dialogues; each dialogue becomes tensors once, here, not every epoch.

    With ``shuffle`` each pass draws a fresh order with ``torch.randperm(n, generator=generator)``
    (the global torch RNG when ``generator`` is None), so a seeded generator gives a reproducible order.
    """

    def __init__(
        self,
        dialogues: Sequence[Dialogue],
        modalities: Sequence[str],
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.modalities = tuple(modalities)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self._items = [_to_tensors(d, self.modalities) for d in dialogues]

    @property
    def n_dialogues(self) -> int:
        return len(self._items)

    def __len__(self) -> int:
        return (len(self._items) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[ConversationBatch]:
        n = len(self._items)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).tolist()
        else:
            order = list(range(n))
        for start in range(0, n, self.batch_size):
            chunk = [self._items[i] for i in order[start : start + self.batch_size]]
            yield _collate(chunk, self.modalities)
