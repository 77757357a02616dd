"""Recorded meetings: one WAV per participant (or one single-speaker WAV) -> the timeline of utterances
with transcript and emotion, through the same segmenter, transcriber and causal model as the live service.

Utterances enter the conversation in the order they end (as they would live), whoever speaks.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from affectkit.audio import SAMPLE_RATE
from affectkit.audio.frontend import Track, Utterance, analyse
from affectkit.audio.inputs import plan_inputs
from affectkit.audio.pcm import read_wav
from affectkit.audio.segmenter import Segment, SegmenterConfig
from affectkit.errors import DataError

__all__ = ["timeline", "write_timeline"]

#: Utterances decoded together by the transcriber.
BATCH = 8
_FRAME = SAMPLE_RATE // 10


def timeline(source: Any, tracks: Mapping[str, str | Path], config: SegmenterConfig | None = None,
             transcriber: Any = None, embed: Any = None,
             progress: bool = True) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, class names): rows (speaker, start, end, text, confidence, label, probs, position, prosody) in
    conversation order.  ``source``: a causal checkpoint path or ``(model, info)``; ``tracks``: participant
    -> WAV file.  An utterance transcribed as nothing is kept with no label when the model reads text."""
    from tqdm import tqdm

    from affectkit.audio.transcriber import shared_transcriber
    from affectkit.stream import Stream

    if not tracks:
        raise DataError("no audio: give --audio NAME=FILE.wav (one per participant)")
    stream = Stream(source, embed=embed, by_arrival=True)  # participants take the model's slots in turn
    eng = stream.engine
    can_embed = embed is not None or eng.text_encoder() is not None or _has_text_encoder(eng.dims)
    plan = plan_inputs(stream.modalities, eng.dims, can_embed, eng.info.get("audio_features"))
    audio = {name: read_wav(path) for name, path in tracks.items()}  # every file checked before any work
    total = sum(len(a) for a in audio.values()) / SAMPLE_RATE
    segments: list[tuple[str, Segment]] = []
    with tqdm(total=round(total, 1), unit="s", desc="speech", disable=not progress, file=sys.stderr) as bar:
        for name, x in audio.items():
            track = Track(name, config)
            for k in range(0, len(x), _FRAME):
                segments += [(name, e) for e in track.push(x[k:k + _FRAME]) if isinstance(e, Segment)]
                bar.update(round(min(_FRAME, len(x) - k) / SAMPLE_RATE, 1))
            segments += [(name, e) for e in track.flush() if isinstance(e, Segment)]
    tr = transcriber or shared_transcriber()
    utts: list[Utterance] = []
    with tqdm(total=len(segments), unit="utt", desc="transcribe", disable=not progress, file=sys.stderr) as bar:
        for name in audio:
            mine = [s for n, s in segments if n == name]
            for k in range(0, len(mine), BATCH):
                utts += analyse(name, mine[k:k + BATCH], tr)
                bar.update(len(mine[k:k + BATCH]))
    utts.sort(key=lambda u: (u.end, u.start))
    rows = []
    for u in utts:
        row: dict[str, Any] = {"speaker": u.speaker, "start": round(u.start, 3), "end": round(u.end, 3),
                               "text": u.text, "confidence": round(u.confidence, 4), "label": None, "position": None,
                               "probs": None, "forced": u.forced}
        if plan.classifiable(u):
            text, feats = plan.inputs(u)
            pred = stream.push_text(u.speaker, text, **feats) if text is not None else stream.push(u.speaker, **feats)
            row.update(label=pred.label, position=pred.position,
                       probs={n: round(p, 6) for n, p in zip(stream.label_names, pred.probs)})
        row["prosody"] = [round(float(v), 6) for v in u.prosody]
        rows.append(row)
    return rows, list(stream.label_names)


def _has_text_encoder(dims: Mapping[str, int]) -> bool:
    if "text" not in dims:
        return False
    try:
        from affectkit.features import text as text_features
    except ImportError:
        return False
    return int(dims["text"]) == text_features.DIM


def write_timeline(rows: list[dict[str, Any]], out: str | Path, labels: list[str]) -> None:
    """JSONL (one object per utterance, with prosody) or CSV (probabilities as ``p_LABEL`` columns,
    prosody left out) by the file's suffix."""
    p = Path(out)
    if p.suffix == ".jsonl":
        with p.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        return
    if p.suffix != ".csv":
        raise DataError(f"{p}: the timeline is written as .csv or .jsonl")
    with p.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["position", "speaker", "start", "end", "text", "confidence", "label"] + [f"p_{n}" for n in labels])
        for r in rows:
            probs = r["probs"] or {}
            w.writerow([r["position"], r["speaker"], r["start"], r["end"], r["text"], r["confidence"], r["label"]]
                       + [probs.get(n, "") for n in labels])
