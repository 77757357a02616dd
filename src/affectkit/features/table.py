"""``affectkit import``: a table of utterances (:mod:`affectkit.data.table`) -> the conversation pickle layout.

Text becomes vectors with the shipped sentence encoder or a fine-tuned one (``encoder=DIR``), through the
same cache as ``features text``; audio paths become the prosody vectors of ``affectkit.audio`` when that
part is installed (:mod:`affectkit.data.audio_hook`), else the import keeps text only and says so.
Everything is checked before the file is written (atomically): a refused input leaves nothing behind.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.data.audio_hook import ProsodyFn, prosody_hook, standardiser, wav_seconds
from affectkit.data.table import DEFAULT_FRACTIONS, SPLITS, Columns, Table, assign_splits, read_table
from affectkit.errors import DataError
from affectkit.features.inputs import InputRecipe, dialogue_inputs
from affectkit.features.text import SentenceEncoder, _atomic_write

log = logging.getLogger("affectkit")

Embedder = Callable[[list[str]], np.ndarray]


def check_audio(table: Table) -> None:
    """Every audio file readable (WAV: by its header) and every ``end`` within the file; DataError naming
    the file, line and column otherwise."""
    for d in table.dialogues:
        for line, (path, _start, end) in zip(d.lines, d.audio or []):
            try:
                seconds = wav_seconds(path)
            except DataError as exc:
                raise DataError(f"{d.file}:{line}: column 'audio': {path.name}: {exc}") from None
            if seconds is not None and end is not None and end > seconds + 1e-3:
                raise DataError(f"{d.file}:{line}: column 'end': {end:g} s is past the end of {path.name} "
                                f"({seconds:.3f} s)")


def audio_features(table: Table, prosody: ProsodyFn) -> list[np.ndarray]:
    """One (N, D) float32 array per dialogue from ``prosody``; a failure names the file and line."""
    out = []
    for d in table.dialogues:
        rows = []
        for line, (path, start, end) in zip(d.lines, d.audio or []):
            try:
                rows.append(np.asarray(prosody(path, start, end), dtype=np.float32).reshape(-1))
            except DataError as exc:
                raise DataError(f"{d.file}:{line}: column 'audio': {exc}") from None
        out.append(np.stack(rows))
    return out


def standardise_audio(layout: dict[str, Any]) -> str:
    """Standardise every dialogue's audio with ``affectkit.audio``'s Standardiser fitted on the train split
    (its meta into ``layout["meta"]``, read by the live front end); returns a note saying what was done."""
    cls = standardiser()
    train = [d["audio"] for d in layout["train"]]
    if cls is None or not train:
        why = "no train split (predict applies the checkpoint's transform)" if cls is not None else \
            "affectkit.audio is not installed"
        return f"audio: raw prosody numbers, not standardised ({why})"
    norm = cls.fit(np.concatenate(train))
    for split in SPLITS:
        for d in layout[split]:
            d["audio"] = norm(d["audio"])
    layout.setdefault("meta", {})["audio_features"] = norm.to_meta()
    return "audio: standardised with the train split's means and scales (meta audio_features)"


def import_table(source: str | Path, out: str | Path, *, columns: Mapping[str, str] | None = None,
                 classes: Sequence[str] | None = None, labelled: bool | None = None, encoding: str = "auto",
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0, audio: bool = True,
                 cache_dir: str | Path | None = None, encoder: str | Path | None = None, batch_size: int = 64,
                 embed: Embedder | None = None, prosody: ProsodyFn | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Read, check, split and embed ``source``; write the conversation pickle ``out``; return a summary.

    ``columns`` maps fields to the table's column names; ``classes`` declares the class list (else the
    labels found, sorted); ``fractions``/``seed`` make the split when the table has no split column;
    ``audio=False`` ignores an audio column.  ``embed`` (tests) replaces the sentence encoder and
    ``prosody`` the audio hook.
    """
    start_time = time.perf_counter()
    cols, mapped = Columns.mapped(dict(columns or {}))
    table = read_table(source, cols, mapped, classes=classes, encoding=encoding, labelled=labelled)
    split_note = assign_splits(table, fractions, seed)
    notes = [split_note, *table.notes]

    use_audio = audio and table.has_audio
    if use_audio:
        check_audio(table)
        prosody = prosody or prosody_hook()
        if prosody is None:
            use_audio = False
            notes.append("audio column ignored: the prosody front end (affectkit.audio, openSMILE) is not "
                         "installed; text only")
            log.warning("%s", notes[-1])
    audio_arrays = audio_features(table, prosody) if use_audio and prosody is not None else None

    # Text last: the encoder is the slow part, and everything else has been checked by now.
    recipe, enc = InputRecipe(), None
    if embed is None:
        enc = SentenceEncoder(cache_dir, batch_size=batch_size, encoder=encoder)
        recipe = enc.recipe
    inputs = [t for d in table.dialogues for t in dialogue_inputs(d.speakers, d.sentences, recipe)]
    vectors = enc.embed(inputs, progress=progress) if enc is not None else np.asarray(embed(inputs), np.float32)
    if vectors.shape[0] != len(inputs):
        raise DataError(f"the text encoder returned {vectors.shape[0]} vectors for {len(inputs)} utterances")

    index = {c: i for i, c in enumerate(table.classes or [])}
    layout: dict[str, Any] = {s: [] for s in SPLITS}
    row = 0
    for k, d in enumerate(table.dialogues):
        item: dict[str, Any] = {"vid": d.vid, "speakers": list(d.speakers),
                                "text": np.ascontiguousarray(vectors[row:row + len(d)], dtype=np.float32),
                                "sentence": list(d.sentences)}
        row += len(d)
        if table.labelled:
            item["labels"] = [index[y] for y in d.labels or []]
        if audio_arrays is not None:
            item["audio"] = audio_arrays[k]
        layout[d.split or "test"].append(item)
    if audio_arrays is not None:
        notes.append(standardise_audio(layout))
    if table.classes:
        layout["label_names"] = list(table.classes)
    layout["speakers"] = table.speakers
    meta: dict[str, Any] = {
        "dataset": "table", "files": [p.name for p in table.files], "labelled": table.labelled,
        "encoder": enc.model_name if enc is not None else "custom", "dim": int(vectors.shape[1]),
        "notes": "; ".join(notes), "split": split_note,
    }
    if enc is not None and enc.ref is not None:
        meta["encoder_ref"] = enc.ref
    layout["meta"] = {**meta, **layout.get("meta", {})}

    out = Path(out)
    _atomic_write(out, lambda f: pickle.dump(layout, f, protocol=4))
    return {
        "out": str(out), "files": [str(p) for p in table.files], "labelled": table.labelled,
        "classes": list(table.classes or []), "speakers": len(table.speakers),
        "dialogues": {s: len(layout[s]) for s in SPLITS},
        "utterances": {s: sum(len(d["sentence"]) for d in layout[s]) for s in SPLITS},
        "modalities": ["text", *(["audio"] if audio_arrays is not None else [])],
        "embedded": enc.embedded if enc is not None else len(inputs),
        "cached": enc.cached if enc is not None else 0,
        "seconds": round(time.perf_counter() - start_time, 3), "notes": "; ".join(notes),
    }
