"""The WebSocket protocol's frames: the wire formats, parsing and checking a client frame, and the one answer
each frame gets (a prediction, or an error frame that leaves the session as it was).

Every frame, valid or not, first spends one token of its session's rate limit, so a flood of junk is
refused as cheaply as a flood of utterances.  Any unexpected exception while answering becomes an
``internal`` error frame (the traceback goes to the server's log); the connection and the session go on.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from affectkit.errors import AffectkitError, ConfigError, DataError
from affectkit.serve.batcher import Overloaded
from affectkit.serve.service import Service
from affectkit.serve.sessions import Item, LogFull, OtherModel, TooManySpeakers, UnknownSession
from affectkit.serve.store import WriterConflict

__all__ = ["Features", "SessionCreated", "Transcript", "Utterance", "answer", "error", "parse_frame"]

log = logging.getLogger(__name__)


class Features(BaseModel):
    """Per-modality feature vectors of one utterance (as many numbers as the model's dims)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    text: list[StrictFloat | StrictInt] | None = None
    audio: list[StrictFloat | StrictInt] | None = None
    visual: list[StrictFloat | StrictInt] | None = None


class Utterance(BaseModel):
    """One client frame: a speaker name and the raw ``text`` and/or ``features``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    speaker: StrictStr = Field(min_length=1)
    text: StrictStr | None = None
    features: Features | None = None
    id: StrictStr | StrictInt | None = Field(default=None, description="echoed back in the answer")


class SessionCreated(BaseModel):
    id: str
    token: str = Field(description="keep it: the only key to this session (stored hashed)")
    stream: str = Field(description="the WebSocket path")
    labels: list[str]
    modalities: list[str]
    dims: dict[str, int]
    max_speakers: int


class Transcript(BaseModel):
    id: str
    created: float
    model: str | None = Field(description="hash of the model that answered this session")
    labels: list[str]
    speakers: list[str]
    utterances: list[dict[str, Any]]


def error(kind: str, detail: str, msg_id: Any = None) -> dict[str, Any]:
    """An error frame (``id`` echoed when the client sent one)."""
    body: dict[str, Any] = {"type": "error", "error": kind, "detail": detail}
    if msg_id is not None:
        body["id"] = msg_id
    return body


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_frame(s: Service, msg: dict[str, Any]) -> Utterance | dict[str, Any]:
    """The frame as an :class:`Utterance`, or an error frame."""
    lim = s.settings
    if msg.get("text") is None:
        return error("binary_frame", "binary frames carry audio only after an audio config frame "
                                     '({"type": "audio", "speaker": ...}); send JSON text frames')
    raw: str = msg["text"]
    if len(raw) > lim.max_message_bytes or len(raw.encode("utf-8", "surrogatepass")) > lim.max_message_bytes:
        return error("too_large", f"message over {lim.max_message_bytes} bytes")
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        return error("bad_json", f"not valid JSON ({str(exc)[:80]})")
    if not isinstance(data, dict):
        return error("invalid", "a frame is a JSON object {\"speaker\": ..., \"text\": ...}")
    msg_id = data.get("id") if isinstance(data.get("id"), str | int) and not isinstance(data.get("id"), bool) else None
    try:
        utt = Utterance.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "frame"
        return error("invalid", f"{where}: {e['msg']}", msg_id)
    return utt


def check_features(s: Service, utt: Utterance) -> dict[str, np.ndarray] | dict[str, Any]:
    """Checked float32 feature vectors of the modalities the model reads (raw text is embedded later), or an
    error frame."""
    lim, out = s.settings, {}
    given = utt.features.model_dump(exclude_none=True) if utt.features is not None else {}
    if utt.text is not None and "text" in given:
        return error("invalid", "send the text either raw (text) or as features.text, not both", utt.id)
    extra = sorted(set(given) - set(s.modalities))
    if extra:
        return error("invalid", f"this model does not read {', '.join(extra)} "
                                f"(modalities: {', '.join(s.modalities)})", utt.id)
    if utt.text is not None:
        if "text" not in s.modalities:
            return error("invalid", "this model does not read text", utt.id)
        if s.embed is None:
            return error("unsupported", "this model's text features are not the sentence encoder's: "
                                        "send features.text", utt.id)
        if not utt.text.strip():
            return error("invalid", "text is empty", utt.id)
        if len(utt.text) > lim.max_text_chars:
            return error("too_large", f"text over {lim.max_text_chars} characters", utt.id)
    for m in s.modalities:
        if m == "text" and utt.text is not None:
            continue
        if m not in given:
            return error("invalid", f"missing {m}: this model reads {', '.join(s.modalities)}", utt.id)
        try:
            v = np.asarray(given[m], dtype=np.float64)
        except OverflowError:  # a JSON integer beyond float64 (pydantic's StrictInt takes any size)
            return error("invalid", f"features.{m} holds a number too large for float32", utt.id)
        if v.shape != (s.dims[m],):
            return error("invalid", f"features.{m} has {v.size} numbers; this model needs {s.dims[m]}", utt.id)
        with np.errstate(over="ignore"):
            v32 = v.astype(np.float32)
        if not np.isfinite(v32).all():
            return error("invalid", f"features.{m} holds values that are not finite in float32", utt.id)
        out[m] = v32
    return out


def refusal(exc: BaseException, msg_id: Any = None) -> dict[str, Any] | None:
    """The error frame of an expected refusal from the worker, else None."""
    if isinstance(exc, Overloaded):
        return error("overloaded", f"{exc}; retry in a second", msg_id)
    if isinstance(exc, TooManySpeakers):
        return error("too_many_speakers", str(exc), msg_id)
    if isinstance(exc, UnknownSession):
        return error("gone", "this session was deleted", msg_id)
    if isinstance(exc, OtherModel):
        return error("other_model", str(exc), msg_id)
    if isinstance(exc, LogFull):
        return error(exc.kind, str(exc), msg_id)
    if isinstance(exc, WriterConflict):
        return error("moved", "another replica wrote to this session; this utterance was not stored: reconnect "
                              "and send again from the ready frame's position", msg_id)
    if isinstance(exc, DataError | ConfigError | AffectkitError):
        return error("invalid", str(exc), msg_id)
    return None


async def answer(s: Service, session_id: str, msg: dict[str, Any], received: float) -> dict[str, Any]:
    """The one answer to a client frame; never raises (an unexpected failure is an ``internal`` frame)."""
    try:
        return await _answer(s, session_id, msg, received)
    except Exception:  # noqa: BLE001 - logged with its traceback; the client gets a short frame, the server goes on
        log.exception("frame of session %s failed", session_id)
        return error("internal", "the frame could not be processed; nothing was stored")


async def _answer(s: Service, session_id: str, msg: dict[str, Any], received: float) -> dict[str, Any]:
    lim = s.settings
    if not s.allow(session_id):  # every frame counts, valid or not
        return error("rate_limited", f"over {lim.rate_per_s:g} frames per second; slow down")
    utt = parse_frame(s, msg)
    if isinstance(utt, dict):
        return utt
    speaker = utt.speaker.strip()
    if not speaker or len(speaker) > lim.max_speaker_chars or not speaker.isprintable():
        return error("invalid", f"speaker must be 1-{lim.max_speaker_chars} printable characters", utt.id)
    feats = check_features(s, utt)
    if "type" in feats:
        return feats  # type: ignore[return-value]
    item = Item(session_id, speaker, utt.text, feats, received)  # type: ignore[arg-type]
    try:
        pred, _rec = await s.batcher.submit(item)
    except Exception as exc:  # noqa: BLE001 - expected refusals get their kind, the rest is internal
        frame = refusal(exc, utt.id)
        if frame is None:
            log.error("batch failed", exc_info=exc)
            return error("internal", "the utterance could not be processed; it was not stored", utt.id)
        return frame
    body: dict[str, Any] = {"type": "prediction", "position": pred.position, "speaker": speaker,
                            "label": pred.label, "index": pred.index,
                            "probs": {n: round(p, 6) for n, p in zip(s.labels, pred.probs)},
                            "latency_ms": round((time.perf_counter() - received) * 1000, 3)}
    if utt.id is not None:
        body["id"] = utt.id
    return body
