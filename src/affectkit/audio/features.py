"""``affectkit features audio``: a labelled corpus of utterance audio -> the conversation layout with the
88 eGeMAPS numbers of each utterance as its ``audio`` modality (and its transcript as ``sentence``), so a
model can be trained on exactly the features the live front end measures.  The numbers are standardised
with the train split's means and scales, which ride in the file's ``meta`` into the checkpoint, so the
live front end applies the same transform.

Input: a manifest CSV, or a folder holding ``manifest.csv`` (what ``affectkit make-synthetic spoken``
writes).  Columns: ``file`` (relative to the manifest's folder), ``dialogue``, ``speaker``, ``label``;
optional ``position`` (order in the dialogue; default: row order), ``split`` (train/dev/test; default: a
seeded 70/15/15 split by dialogue), ``text``, ``start``/``end`` (seconds within the file).
"""

from __future__ import annotations

import csv
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.audio import SAMPLE_RATE
from affectkit.audio.pcm import read_wav
from affectkit.data.provenance import MARKER_KEY
from affectkit.errors import DataError

__all__ = ["build_audio_features", "read_manifest"]

REQUIRED = ("file", "dialogue", "speaker", "label")
SPLITS = ("train", "dev", "test")


def read_manifest(source: str | Path) -> tuple[Path, list[dict[str, str]]]:
    """(the manifest's folder, its rows); one-line DataError naming the line for a bad row."""
    p = Path(source)
    manifest = p / "manifest.csv" if p.is_dir() else p
    if not manifest.is_file():
        raise DataError(f"{manifest}: manifest not found (a CSV, or a folder holding manifest.csv)")
    with manifest.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{manifest}: missing column(s) {', '.join(missing)} (needs {', '.join(REQUIRED)})")
        rows = list(reader)
    if not rows:
        raise DataError(f"{manifest}: no rows")
    for line, r in enumerate(rows, 2):
        for c in REQUIRED:
            if not (r.get(c) or "").strip():
                raise DataError(f"{manifest}:{line}: column {c} is empty")
        if r.get("split") and r["split"] not in SPLITS:
            raise DataError(f"{manifest}:{line}: split {r['split']!r} is not one of {', '.join(SPLITS)}")
        if not (manifest.parent / r["file"]).is_file():
            raise DataError(f"{manifest}:{line}: audio file {r['file']} not found")
    return manifest.parent, rows


def build_audio_features(source: str | Path, out: str | Path, classes: list[str] | None = None, seed: int = 0,
                         progress: bool = True, trim: bool = True) -> dict[str, Any]:
    """Write the conversation pickle ``out``; returns a summary (counts, classes, seconds of audio).
    ``trim``: cut each file to its speech as the live segmenter would (silero-vad, the same padding), so
    the features a model trains on are measured on the same stretch of audio as live ones."""
    from tqdm import tqdm

    from affectkit.audio.prosody import Standardiser, prosody
    from affectkit.audio.segmenter import speech_span

    root, rows = read_manifest(source)
    labels = classes or _corpus_classes(root) or sorted({r["label"] for r in rows})
    unknown = sorted({r["label"] for r in rows} - set(labels))
    if unknown:
        raise DataError(f"label(s) {', '.join(unknown)} not in the classes {', '.join(labels)}")
    dialogues: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        dialogues.setdefault(r["dialogue"], []).append(r)
    split_of = _splits(dialogues, seed)
    out_data: dict[str, Any] = {s: [] for s in SPLITS}
    speakers: list[str] = []
    seconds = 0.0
    with tqdm(total=len(rows), unit="utt", desc="prosody", disable=not progress, file=sys.stderr) as bar:
        for vid, turns in dialogues.items():
            if all(t.get("position") for t in turns):
                turns = sorted(turns, key=lambda t: int(t["position"]))
            feats = []
            for t in turns:
                x = read_wav(root / t["file"])
                if t.get("start") or t.get("end"):
                    a = int(float(t.get("start") or 0) * SAMPLE_RATE)
                    b = int(float(t["end"]) * SAMPLE_RATE) if t.get("end") else len(x)
                    x = x[a:b]
                    if not len(x):
                        raise DataError(f"{t['file']}: start/end {t.get('start')}-{t.get('end')} select no audio")
                if trim:
                    x = speech_span(x)
                seconds += len(x) / SAMPLE_RATE
                feats.append(prosody(x))
                bar.update(1)
            for t in turns:
                if t["speaker"] not in speakers:
                    speakers.append(t["speaker"])
            out_data[split_of[vid]].append({
                "vid": vid, "speakers": [t["speaker"] for t in turns],
                "labels": np.array([labels.index(t["label"]) for t in turns], dtype=np.int64),
                "audio": np.stack(feats).astype(np.float32), "sentence": [t.get("text") or "" for t in turns]})
    train = [d["audio"] for d in out_data["train"]]
    if not train:
        raise DataError("no training dialogues: the standardiser is fitted on the train split")
    norm = Standardiser.fit(np.concatenate(train))
    for split in SPLITS:
        for d in out_data[split]:
            d["audio"] = norm(d["audio"])
    out_data["meta"] = {"audio_features": norm.to_meta()}
    out_data["label_names"] = list(labels)
    out_data["speakers"] = speakers
    marker = _corpus_marker(root)
    if marker:
        out_data[MARKER_KEY] = marker
    Path(out).write_bytes(pickle.dumps(out_data))
    return {"out": str(out), "utterances": len(rows), "dialogues": {s: len(out_data[s]) for s in SPLITS},
            "classes": list(labels), "seconds": round(seconds, 1), "synthetic": bool(marker)}


def _splits(dialogues: dict[str, list[dict[str, str]]], seed: int) -> dict[str, str]:
    given = {vid: {t.get("split") or "" for t in turns} for vid, turns in dialogues.items()}
    for vid, s in given.items():
        if len(s) > 1:
            raise DataError(f"dialogue {vid}: its rows name different splits {sorted(s)}")
    if all(s != {""} for s in given.values()):
        return {vid: s.pop() for vid, s in given.items()}
    vids = sorted(dialogues)
    order = np.random.default_rng(seed).permutation(len(vids))
    n_dev = n_test = max(1, round(0.15 * len(vids))) if len(vids) >= 3 else 0
    return {vids[i]: "test" if k < n_test else "dev" if k < n_test + n_dev else "train" for k, i in enumerate(order)}


def _corpus_meta(root: Path) -> dict[str, Any] | None:
    p = root / "corpus.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError:
        return None


def _corpus_classes(root: Path) -> list[str] | None:
    meta = _corpus_meta(root)
    return list(meta["classes"]) if meta and meta.get("classes") else None


def _corpus_marker(root: Path) -> dict[str, Any] | None:
    """The provenance marker for a SYNTHETIC spoken corpus (plain values only)."""
    meta = _corpus_meta(root)
    if not meta or not meta.get("synthetic"):
        return None
    from affectkit.data.provenance import synthetic_marker

    marker = synthetic_marker("spoken", int(meta.get("seed", 0)), str(meta.get("command") or "") or None)
    marker["note"] = str(meta.get("note", ""))
    return marker
