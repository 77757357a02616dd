"""Predictions for every utterance of a conversation file, labels not needed (``affectkit predict``).

The model is rebuilt from the checkpoint alone and reads the file with the checkpoint's own classes and
speaker handling (``tags``: the training tags, an unknown one is refused; ``per_dialogue``: any names, by
order of first appearance in each dialogue).  A causal checkpoint predicts as the live service does: every
dialogue is a :class:`~affectkit.stream.Stream` session pushed one utterance at a time (sessions stepped
together with :func:`~affectkit.stream.push_batch`); any other checkpoint runs on whole dialogues.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from affectkit.checkpoint import load_model
from affectkit.data.conversation import (
    SPLITS,
    ConversationData,
    ConversationLoader,
    Dialogue,
    load_conversations,
)
from affectkit.device import resolve_device
from affectkit.errors import ConfigError, DataError
from affectkit.features.encoder_ref import encoder_reference

__all__ = ["UtterancePrediction", "format_predictions", "predict_checkpoint", "write_predictions"]

#: Dialogues stepped together in one batched forward (causal checkpoints).
SESSIONS_PER_STEP = 64


@dataclass(frozen=True)
class UtterancePrediction:
    """One utterance's answer: where it is, who said what, the predicted class and every class probability."""

    split: str
    dialogue: str
    position: int
    speaker: str
    text: str
    label: str
    probs: tuple[float, ...]

    @property
    def prob(self) -> float:
        return max(self.probs)


def _check_features(data: ConversationData, info: dict[str, Any], data_path: str | Path) -> None:
    """The file's features are what the checkpoint was trained on: same dims, same text encoder."""
    for m, d in data.dims.items():
        if m in data.kept and int(info["dims"][m]) != int(d):
            raise ConfigError(f"{data_path}: {m} features have dim {d}, the checkpoint was trained on "
                              f"{info['dims'][m]} (import the table with the checkpoint's encoder)")
    if "text" in data.kept:
        theirs, ours = encoder_reference(data.meta), info.get("encoder")
        if (theirs or {}).get("sha256") != (ours or {}).get("sha256"):
            name = lambda ref: ref["name"] or ref["folder"] if ref else "the shipped all-MiniLM-L6-v2"  # noqa: E731
            raise ConfigError(f"{data_path}: text vectors come from {name(theirs)}, the checkpoint was trained on "
                              f"vectors of {name(ours)}; import with --encoder matching the checkpoint")


def _match_audio_transform(data: ConversationData, info: dict[str, Any], data_path: str | Path) -> None:
    """Prosody as the checkpoint was trained on it: a file of raw prosody numbers (an unlabelled import has
    no train split to fit a standardiser on) gets the checkpoint's standardiser, as live audio does; a file
    standardised with other statistics is refused (its numbers mean something else to this model)."""
    trained = info.get("audio_features")
    if "audio" not in data.kept or not isinstance(trained, dict):
        return
    have = data.meta.get("audio_features")
    if have is None:
        from affectkit.audio.prosody import Standardiser

        norm = Standardiser.from_meta(trained)
        if norm is not None:
            for split in SPLITS:
                for d in data.splits[split]:
                    d.features["audio"] = norm(d.features["audio"])
    elif have != trained:
        raise DataError(f"{data_path}: its audio features were standardised with other statistics than the "
                        "checkpoint's; import the audio again without a train split (raw prosody) to predict")


def _first_appearance(data: ConversationData, n_slots: int) -> None:
    """``per_dialogue`` models on whole dialogues: speaker indices renumbered 0, 1, ... by first appearance
    (what the model does itself), refusing a dialogue with more speakers than the model has slots."""
    for dialogues in data.splits.values():
        for d in dialogues:
            order: dict[int, int] = {}
            slots = [order.setdefault(int(s), len(order)) for s in d.speakers]
            if len(order) > n_slots:
                raise DataError(f"{data.path}: dialogue {d.vid!r} has {len(order)} speakers; this model has "
                                f"{n_slots} speaker slots")
            d.speakers = np.asarray(slots, dtype=np.int64)


def _whole_dialogues(model: torch.nn.Module, dialogues: list[Dialogue], kept: Sequence[str], batch_size: int,
                     device: torch.device) -> list[np.ndarray]:
    """Softmax probabilities (N, C) per dialogue from the model's batch forward."""
    out = []
    loader = ConversationLoader(dialogues, kept, batch_size, shuffle=False)
    with torch.inference_mode():
        for batch in loader:
            probs = torch.softmax(model(batch.to(device)).double(), dim=-1).cpu().numpy()
            start = 0
            for n in batch.lengths.tolist():
                out.append(probs[start:start + n])
                start += n
    return out


def _streamed(model: torch.nn.Module, info: dict[str, Any], dialogues: list[Dialogue],
              who: list[list[Any]]) -> list[np.ndarray]:
    """Probabilities per dialogue from live sessions, one utterance at a time (as ``affectkit serve``)."""
    from affectkit.stream import Stream, StreamModel, push_batch

    def no_text(_: list[str]) -> np.ndarray:
        raise ConfigError("predict feeds the file's features; it embeds no raw text")

    engine = StreamModel((model, info), embed=no_text)
    out: list[np.ndarray] = []
    for lo in range(0, len(dialogues), SESSIONS_PER_STEP):
        group, names = dialogues[lo:lo + SESSIONS_PER_STEP], who[lo:lo + SESSIONS_PER_STEP]
        sessions = [Stream(engine) for _ in group]
        probs = [np.zeros((len(d), len(engine.label_names))) for d in group]
        for t in range(max(len(d) for d in group)):
            live = [k for k, d in enumerate(group) if t < len(d)]
            utterances = [{"speaker": names[k][t],
                           **{m: group[k].features[m][t] for m in engine.modalities}} for k in live]
            for k, pred in zip(live, push_batch([sessions[k] for k in live], utterances)):
                probs[k][t] = pred.probs
        out.extend(probs)
    return out


def predict_checkpoint(checkpoint: str | Path, data_path: str | Path, splits: Sequence[str] | None = None,
                       device: str = "auto") -> tuple[list[str], list[UtterancePrediction]]:
    """(class names, one prediction per utterance) of a conversation checkpoint on ``data_path``.

    The file's labels, if any, are ignored; ``splits`` (default all) picks which splits to read.
    """
    dev = resolve_device(device)
    model, cfg, info = load_model(checkpoint, dev)
    if cfg.data.task != "conversation":
        raise ConfigError(f"{checkpoint}: predict reads conversation checkpoints; this one is {cfg.data.task!r} "
                          "(use affectkit eval)")
    for split in splits or []:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    mcfg = getattr(model, "cfg", None)
    per_dialogue = getattr(mcfg, "speaker_mode", "tags") == "per_dialogue"
    data = load_conversations(data_path, list(info["dims"]), classes=info["label_names"],
                              speakers=None if per_dialogue else info["speakers"], labelled=False)
    _check_features(data, info, data_path)
    _match_audio_transform(data, info, data_path)
    names = [str(n) for n in info["label_names"]]
    causal = bool(getattr(mcfg, "causal", False)) and getattr(mcfg, "wf", 1) == 0
    who = {s: [[data.speakers[int(i)] for i in d.speakers] for d in data.splits[s]] for s in SPLITS}
    if per_dialogue and not causal and getattr(model, "speaker", None) is not None:
        _first_appearance(data, int(model.speaker.num_embeddings))
    rows: list[UtterancePrediction] = []
    for split in splits or SPLITS:
        dialogues = data.splits[split]
        if not dialogues:
            continue
        if causal:
            probs = _streamed(model, info, dialogues, who[split])
        else:
            probs = _whole_dialogues(model, dialogues, data.kept, int(cfg.train.eval_batch_size), dev)
        for d, p, tags in zip(dialogues, probs, who[split]):
            for t in range(len(d)):
                rows.append(UtterancePrediction(
                    split, d.vid, t, str(tags[t]), d.sentences[t] if d.sentences else "",
                    names[int(np.argmax(p[t]))], tuple(float(x) for x in p[t])))
    return names, rows


# ------------------------------------------------------------------------------------------------ output

FORMATS: tuple[str, ...] = (".csv", ".jsonl")


def format_predictions(names: Sequence[str], rows: Sequence[UtterancePrediction], fmt: str = ".csv") -> str:
    """CSV (``split,dialogue,position,speaker,text,label,prob,p_<class>...``) or JSONL (one object per
    utterance, ``probs`` a {class: p} mapping) text."""
    if fmt == ".jsonl":
        return "".join(json.dumps({"split": r.split, "dialogue": r.dialogue, "position": r.position,
                                   "speaker": r.speaker, "text": r.text, "label": r.label, "prob": r.prob,
                                   "probs": dict(zip(names, r.probs))}, ensure_ascii=False) + "\n"
                       for r in rows)
    if fmt != ".csv":
        raise ConfigError(f"unknown predictions format {fmt!r}; use {' or '.join(FORMATS)}")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["split", "dialogue", "position", "speaker", "text", "label", "prob", *(f"p_{n}" for n in names)])
    for r in rows:
        w.writerow([r.split, r.dialogue, r.position, r.speaker, r.text, r.label, f"{r.prob:.6f}",
                    *(f"{p:.6f}" for p in r.probs)])
    return buf.getvalue()


def write_predictions(names: Sequence[str], rows: Sequence[UtterancePrediction], out: str | Path) -> Path:
    """Write predictions to ``out`` (.csv or .jsonl, by its suffix), atomically."""
    from affectkit.features.text import _atomic_write

    out = Path(out)
    text = format_predictions(names, rows, out.suffix.lower())
    _atomic_write(out, lambda f: f.write(text.encode("utf-8")))
    return out
