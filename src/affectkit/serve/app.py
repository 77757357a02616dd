"""The FastAPI application of ``affectkit serve``: sessions over HTTP, utterances over a WebSocket,
Prometheus metrics, and the browser view.

FastAPI (on Starlette, served by uvicorn) because it writes the OpenAPI page (``/docs``) from the
routes and their pydantic models, and Starlette's ``TestClient`` drives WebSockets in tests.  The model
is loaded in the lifespan; handlers only validate and submit to the one :class:`Batcher`, whose single
worker thread owns the model state and the store's writes (see :mod:`affectkit.serve.sessions`).

WebSocket protocol (``/v1/sessions/{id}/stream``, token as ``Authorization: Bearer`` or ``?token=``):
the server first sends ``{"type": "ready", "position", "speakers", "labels"}``; then every client frame
gets exactly one frame back, in order: ``{"type": "prediction", "position", "speaker", "label", "index",
"probs", "latency_ms"}`` or ``{"type": "error", "error": KIND, "detail"}`` (the session stays open and
unchanged), echoing the client's ``"id"`` if it sent one.  Overload closes with 1013 after an error
frame; an idle connection closes with 1001.  A ``{"type": "audio", "speaker", "format"}`` frame turns the
connection into one participant's microphone: binary PCM frames, per-utterance events
(:mod:`affectkit.serve.audio_ws`), typed utterances still answered.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Query, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from affectkit.errors import AffectkitError, ConfigError, DataError
from affectkit.serve.audio_ws import AudioSettings, audio_config, serve_audio
from affectkit.serve.batcher import Batcher, Overloaded
from affectkit.serve.bounded import BoundsCollector, TokenBuckets, service_caches
from affectkit.serve.reconnect import open_session
from affectkit.serve.sessions import Item, SessionPool, TooManySpeakers, UnknownSession
from affectkit.serve.store import Store, token_digest
from affectkit.stream import Stream

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("affectkit.serve")
WEB = Path(__file__).with_name("web")


@dataclass
class ServeSettings:
    """Limits and knobs of the service (``affectkit serve --help`` lists the same)."""

    max_batch: int = 32            # utterances per batch (1: no cross-session batching)
    max_wait_ms: float = 2.0       # how long the worker waits to fill a batch
    max_queue: int = 256           # utterances waiting beyond which new ones are refused (overload)
    idle_evict_s: float = 600.0    # a session unused this long leaves memory (rebuilt from the log)
    max_live_sessions: int = 1024  # sessions kept in memory at most (least recently used leave first)
    idle_timeout_s: float = 300.0  # a WebSocket silent this long is closed
    max_message_bytes: int = 256 * 1024
    max_text_chars: int = 2000
    max_speaker_chars: int = 64
    rate_per_s: float = 20.0       # messages per second per session (token bucket) ...
    rate_burst: float = 40.0       # ... with this burst
    sweep_every_s: float = 10.0    # how often idle sessions are looked for
    max_rebuilds: int = 64         # sessions waiting to be rebuilt from the log beyond which reconnects are refused
    rebuild_slice_ms: float = 30.0  # rebuild work run between two live batches (a live utterance waits this + a piece)


# ------------------------------------------------------------------------------------ wire formats


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
    labels: list[str]
    speakers: list[str]
    utterances: list[dict[str, Any]]


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (no global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.sessions_live = Gauge("affectkit_sessions_live", "sessions held in memory", registry=r)
        self.connections = Gauge("affectkit_connections_open", "open WebSocket connections", registry=r)
        self.sessions_created = Counter("affectkit_sessions_created", "sessions created", registry=r)
        self.utterances = Counter("affectkit_utterances", "utterances answered", registry=r)
        self.errors = Counter("affectkit_errors", "error frames and refusals by kind", ["kind"], registry=r)
        self.latency = Histogram("affectkit_latency_seconds", "frame received to answer sent", registry=r,
                                 buckets=(.005, .01, .025, .05, .075, .1, .15, .25, .5, 1, 2.5, 5))
        self.batch = Histogram("affectkit_batch_size", "utterances per batch", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("affectkit_batch_seconds", "time to run one batch", registry=r)
        self.queue = Gauge("affectkit_queue_depth", "utterances waiting for the worker", registry=r)
        self.rebuilt = Gauge("affectkit_sessions_rebuilt", "sessions rebuilt from the log", registry=r)


class Service:
    """What the routes share: engine, store, pool, batcher, metrics, settings."""

    def __init__(self, source: Any, store_path: str | Path, settings: ServeSettings,
                 embed: Any = None) -> None:
        self.settings = settings
        model, info = _load(source)
        self.base = Stream((model, info), embed=embed)
        self.info = info
        self.modalities = list(self.base.modalities)
        self.dims = {m: int(info["dims"][m]) for m in self.modalities}
        self.labels = list(self.base.label_names)
        tags = info.get("speakers")
        self.tags = list(tags) if tags else list(range(int(info.get("n_speakers", 1))))
        self.embed = _text_embedder(self.dims, embed, self.base.engine)
        self.store = Store(store_path)
        self.pool = SessionPool(self.base, self.store, self.tags, self.embed, settings.idle_evict_s,
                                settings.max_live_sessions)
        self.metrics = Metrics()
        self.batcher: Batcher[Item] = Batcher(self.pool.step, settings.max_batch, settings.max_wait_ms,
                                              settings.max_queue, on_batch=self._on_batch,
                                              jobs=self.pool.rebuild, max_jobs=settings.max_rebuilds,
                                              job_slice_ms=settings.rebuild_slice_ms)
        self.buckets = TokenBuckets(settings.rate_per_s, settings.rate_burst)  # bounded: serve/bounded.py
        self.connections: dict[str, set[WebSocket]] = {}  # open ones only: emptied sets are removed
        self.metrics.registry.register(BoundsCollector(lambda: service_caches(self)))

    def _on_batch(self, size: int, seconds: float) -> None:
        m = self.metrics
        m.batch.observe(size)
        m.batch_seconds.observe(seconds)
        m.sessions_live.set(len(self.pool.live))
        m.rebuilt.set(self.pool.rebuilt)

    def allow(self, session_id: str) -> bool:
        """Token bucket per session: False when the session sends faster than the limit."""
        return self.buckets.allow(session_id)

    def authorize(self, session_id: str, token: str | None) -> int:
        """0 if ``token`` opens ``session_id``, else the HTTP status: 404 unknown, 401 none, 403 wrong (every
        refusal is counted as an ``auth`` error)."""
        row = self.store.session(session_id) if _plausible_id(session_id) else None
        if row is None:
            status = 404
        elif not token:
            status = 401
        else:
            status = 0 if hmac.compare_digest(row.token_sha256, token_digest(token)) else 403
        if status:
            self.metrics.errors.labels("auth").inc()
        return status

    async def sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_every_s)
            await self.batcher.run_sync(self.pool.sweep)
            self.buckets.prune()
            self.metrics.sessions_live.set(len(self.pool.live))


def _load(source: Any) -> tuple[Any, dict[str, Any]]:
    if isinstance(source, tuple):
        return source
    from affectkit.checkpoint import load_model

    model, _cfg, info = load_model(source)
    return model, info


def _text_embedder(dims: dict[str, int], embed: Any, engine: Any = None) -> Any:
    """The embedder of encoder inputs (one string per turn, :meth:`Stream.text_input`), or None when the
    model cannot take raw text. A checkpoint trained on a fine-tuned encoder's features gets that encoder
    (verified when the engine was built); its inputs carry the speaker and past turns when it reads them."""
    if "text" not in dims:
        return None
    if embed is not None:
        return embed
    if engine is not None and engine.text_encoder() is not None:
        return engine.embed_inputs
    try:
        from affectkit.features import text as text_features
    except ImportError:
        return None
    if dims["text"] != text_features.DIM:
        return None
    from affectkit.stream import embed_text

    return embed_text


def _plausible_id(session_id: str) -> bool:
    return 8 <= len(session_id) <= 64 and all(c.isalnum() or c in "-_" for c in session_id)


def _bearer(authorization: str | None, token: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return token


_DENIED = {401: "a token is required (Authorization: Bearer TOKEN or ?token=TOKEN)",
           403: "this token does not open this session", 404: "no such session"}


def _require_access(s: Service, session_id: str, authorization: str | None, token: str | None) -> None:
    """Raise the HTTP error (401/403/404) unless the bearer header or ``?token=`` opens ``session_id``."""
    status = s.authorize(session_id, _bearer(authorization, token))
    if status:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        raise HTTPException(status, _DENIED[status], headers=headers)


def _no_constants(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# ------------------------------------------------------------------------------------ the app


def create_app(source: Any, store: str | Path = ":memory:", settings: ServeSettings | None = None,
               embed: Any = None, audio: AudioSettings | None = None) -> FastAPI:
    """The application over a causal checkpoint (path, or ``(model, info)``), logging to ``store``.
    ``embed`` replaces the sentence encoder (tests); ``audio``: the speech protocol's limits
    (:mod:`affectkit.serve.audio_ws`); the model loads when the app starts, the audio models on the first
    audio connection."""
    settings = settings or ServeSettings()
    holder: dict[str, Service] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = Service(source, store, settings, embed)
        svc.audio_settings = audio or AudioSettings()  # type: ignore[attr-defined]
        if svc.embed is not None:
            await asyncio.get_running_loop().run_in_executor(None, svc.embed, ["warm up"])
        svc.batcher.start()
        sweeper = asyncio.get_running_loop().create_task(svc.sweeper())
        holder["svc"] = svc
        app.state.service = svc
        try:
            yield
        finally:
            sweeper.cancel()
            for conns in list(svc.connections.values()):
                for ws in list(conns):
                    await _close(ws, 1001, "server shutting down")
            if getattr(svc, "audio", None) is not None:
                await svc.audio.stop()
            await svc.batcher.stop()
            svc.store.close()

    app = FastAPI(title="affectkit live emotion service", version="1", lifespan=lifespan,
                  description="Emotion recognition in live conversations over a causal CORECT checkpoint. "
                              "Utterances go over the WebSocket `/v1/sessions/{id}/stream` (see README).")

    def svc() -> Service:
        return holder["svc"]

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if not request.url.path.startswith("/docs"):
            response.headers.setdefault("Content-Security-Policy",
                                        "default-src 'self'; connect-src 'self'; frame-ancestors 'none'")
        return response

    @app.post("/v1/sessions", response_model=SessionCreated, status_code=201, tags=["sessions"])
    def create_session() -> SessionCreated:
        """Open a session: its id and its token (shown once, stored hashed)."""
        s = svc()
        sid, token = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
        s.store.create_session(sid, token)
        s.metrics.sessions_created.inc()
        return SessionCreated(id=sid, token=token, stream=f"/v1/sessions/{sid}/stream", labels=s.labels,
                              modalities=s.modalities, dims=s.dims, max_speakers=len(s.tags))

    @app.get("/v1/sessions/{session_id}", response_model=Transcript, tags=["sessions"],
             responses={401: {}, 403: {}, 404: {}})
    def get_session(session_id: str, authorization: Annotated[str | None, Header()] = None,
                    token: Annotated[str | None, Query()] = None) -> Transcript:
        """The transcript: every utterance with its prediction, in order."""
        s = svc()
        _require_access(s, session_id, authorization, token)
        row = s.store.session(session_id)
        assert row is not None
        utts = [r.public() for r in s.store.records(session_id)]
        spoken = s.store.audio(session_id)
        for u in utts:
            u["probs"] = dict(zip(s.labels, u["probs"]))  # type: ignore[call-overload]
            if u["position"] in spoken:  # a spoken utterance: its transcript, times, confidence, prosody
                u["audio"] = spoken[u["position"]]  # type: ignore[index]
                if u["text"] is None:
                    u["text"] = u["audio"].get("text")  # type: ignore[attr-defined]
        speakers: list[str] = []
        for u in utts:
            if u["speaker"] not in speakers:
                speakers.append(str(u["speaker"]))
        return Transcript(id=session_id, created=row.created, labels=s.labels, speakers=speakers, utterances=utts)

    @app.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"], responses={401: {}, 403: {}, 404: {}})
    async def delete_session(session_id: str, authorization: Annotated[str | None, Header()] = None,
                             token: Annotated[str | None, Query()] = None) -> Response:
        """Close the session's connections and delete it and its transcript."""
        s = svc()
        _require_access(s, session_id, authorization, token)
        for ws in list(s.connections.get(session_id, ())):
            await _close(ws, 1000, "session deleted")

        def gone() -> None:
            s.pool.drop(session_id)
            s.store.delete_session(session_id)

        await s.batcher.run_sync(gone)
        s.buckets.pop(session_id, None)
        return Response(status_code=204)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> JSONResponse:
        """Liveness and readiness: 200 while the worker runs."""
        s = svc()
        ok = s.batcher.running
        body = {"status": "ok" if ok else "down", "queue": s.batcher.depth, "sessions_live": len(s.pool.live),
                "labels": s.labels, "modalities": s.modalities, "raw_text": s.embed is not None}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus text format."""
        s = svc()
        s.metrics.queue.set(s.batcher.depth)
        s.metrics.connections.set(sum(len(c) for c in s.connections.values()))
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/v1/sessions/{session_id}/stream")
    async def stream(ws: WebSocket, session_id: str) -> None:
        s = svc()
        status = s.authorize(session_id, _bearer(ws.headers.get("authorization"), ws.query_params.get("token")))
        if status:
            await ws.send_denial_response(JSONResponse({"detail": _DENIED[status]}, status_code=status))
            return
        await ws.accept()
        s.connections.setdefault(session_id, set()).add(ws)
        try:
            await _serve_connection(s, ws, session_id)
        except WebSocketDisconnect:
            pass
        finally:
            conns = s.connections.get(session_id)
            if conns is not None:
                conns.discard(ws)
                if not conns:
                    s.connections.pop(session_id, None)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB / "index.html")

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    if ws.application_state == WebSocketState.CONNECTED and ws.client_state == WebSocketState.CONNECTED:
        try:
            await ws.close(code, reason)
        except (RuntimeError, WebSocketDisconnect, OSError):
            pass


async def _send(ws: WebSocket, body: dict[str, Any]) -> bool:
    try:
        await ws.send_text(json.dumps(body))
        return True
    except (RuntimeError, WebSocketDisconnect, OSError):
        return False


async def _serve_connection(s: Service, ws: WebSocket, session_id: str) -> None:
    try:
        opened = await open_session(s.batcher, s.pool, ws, session_id)
    except UnknownSession:
        await _close(ws, 1008, "no such session")
        return
    except Overloaded as exc:
        s.metrics.errors.labels("overloaded").inc()
        await _send(ws, _error("overloaded", f"{exc}; retry in a second"))
        await _close(ws, 1013, "overloaded: retry later")
        return
    if opened is None:  # the client left while its session was being rebuilt
        return
    (position, speakers), receiving = opened
    if not await _send(ws, {"type": "ready", "session": session_id, "position": position, "speakers": speakers,
                            "labels": s.labels, "modalities": s.modalities, "raw_text": s.embed is not None}):
        if receiving is not None:
            receiving.cancel()
        return
    while True:
        try:
            msg = await asyncio.wait_for(receiving or ws.receive(), s.settings.idle_timeout_s)
            receiving = None
        except asyncio.TimeoutError:
            s.metrics.errors.labels("idle_timeout").inc()
            await _close(ws, 1001, "idle timeout")
            return
        if msg["type"] == "websocket.disconnect":
            return
        received = time.perf_counter()
        control = audio_config(msg.get("text"))
        if control is not None:  # a participant's microphone: the audio protocol runs this connection from here
            await serve_audio(s, ws, session_id, control, _answer, _send)
            return
        reply = await _answer(s, session_id, msg, received)
        if reply.get("type") == "error":
            s.metrics.errors.labels(reply["error"]).inc()
        else:
            s.metrics.utterances.inc()
            s.metrics.latency.observe(reply["latency_ms"] / 1000)
        if not await _send(ws, reply):
            return
        if reply.get("error") == "overloaded":
            await _close(ws, 1013, "overloaded: retry later")
            return
        if reply.get("error") == "gone":
            await _close(ws, 1000, "session deleted")
            return


def _error(kind: str, detail: str, msg_id: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "error", "error": kind, "detail": detail}
    if msg_id is not None:
        body["id"] = msg_id
    return body


def _parse(s: Service, msg: dict[str, Any]) -> Utterance | dict[str, Any]:
    """The frame as an :class:`Utterance`, or an error frame."""
    lim = s.settings
    if msg.get("text") is None:
        return _error("binary_frame", "binary frames carry audio only after an audio config frame "
                                      '({"type": "audio", "speaker": ...}); send JSON text frames')
    raw: str = msg["text"]
    if len(raw) > lim.max_message_bytes or len(raw.encode("utf-8", "surrogatepass")) > lim.max_message_bytes:
        return _error("too_large", f"message over {lim.max_message_bytes} bytes")
    try:
        data = json.loads(raw, parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        return _error("bad_json", f"not valid JSON ({str(exc)[:80]})")
    if not isinstance(data, dict):
        return _error("invalid", "a frame is a JSON object {\"speaker\": ..., \"text\": ...}")
    msg_id = data.get("id") if isinstance(data.get("id"), str | int) and not isinstance(data.get("id"), bool) else None
    try:
        utt = Utterance.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "frame"
        return _error("invalid", f"{where}: {e['msg']}", msg_id)
    return utt


def _features(s: Service, utt: Utterance) -> dict[str, np.ndarray] | dict[str, Any]:
    """Checked feature vectors of the modalities the model reads (raw text is embedded later), or an
    error frame."""
    lim, out = s.settings, {}
    given = utt.features.model_dump(exclude_none=True) if utt.features is not None else {}
    if utt.text is not None and "text" in given:
        return _error("invalid", "send the text either raw (text) or as features.text, not both", utt.id)
    extra = sorted(set(given) - set(s.modalities))
    if extra:
        return _error("invalid", f"this model does not read {', '.join(extra)} "
                                 f"(modalities: {', '.join(s.modalities)})", utt.id)
    if utt.text is not None:
        if "text" not in s.modalities:
            return _error("invalid", "this model does not read text", utt.id)
        if s.embed is None:
            return _error("unsupported", "this model's text features are not the sentence encoder's: "
                                         "send features.text", utt.id)
        if not utt.text.strip():
            return _error("invalid", "text is empty", utt.id)
        if len(utt.text) > lim.max_text_chars:
            return _error("too_large", f"text over {lim.max_text_chars} characters", utt.id)
    for m in s.modalities:
        if m == "text" and utt.text is not None:
            continue
        if m not in given:
            return _error("invalid", f"missing {m}: this model reads {', '.join(s.modalities)}", utt.id)
        v = np.asarray(given[m], dtype=np.float64)
        if v.shape != (s.dims[m],):
            return _error("invalid", f"features.{m} has {v.size} numbers; this model needs {s.dims[m]}", utt.id)
        with np.errstate(over="ignore"):
            v32 = v.astype(np.float32)
        if not np.isfinite(v32).all():
            return _error("invalid", f"features.{m} holds values that are not finite in float32", utt.id)
        out[m] = v32
    return out


async def _answer(s: Service, session_id: str, msg: dict[str, Any], received: float) -> dict[str, Any]:
    utt = _parse(s, msg)
    if isinstance(utt, dict):
        return utt
    lim = s.settings
    speaker = utt.speaker.strip()
    if not speaker or len(speaker) > lim.max_speaker_chars or not speaker.isprintable():
        return _error("invalid", f"speaker must be 1-{lim.max_speaker_chars} printable characters", utt.id)
    feats = _features(s, utt)
    if "type" in feats:
        return feats  # type: ignore[return-value]
    if not s.allow(session_id):
        return _error("rate_limited", f"over {lim.rate_per_s:g} messages per second; slow down", utt.id)
    item = Item(session_id, speaker, utt.text, feats, received)  # type: ignore[arg-type]
    try:
        pred, _rec = await s.batcher.submit(item)
    except Overloaded as exc:
        return _error("overloaded", f"{exc}; retry in a second", utt.id)
    except TooManySpeakers as exc:
        return _error("too_many_speakers", str(exc), utt.id)
    except UnknownSession:
        return _error("gone", "this session was deleted", utt.id)
    except (DataError, ConfigError) as exc:
        return _error("invalid", str(exc), utt.id)
    except AffectkitError as exc:
        return _error("invalid", str(exc), utt.id)
    except Exception:  # noqa: BLE001 - logged; the client gets a short frame, the server goes on
        log.exception("batch failed")
        return _error("internal", "the utterance could not be processed; it was not stored", utt.id)
    body: dict[str, Any] = {"type": "prediction", "position": pred.position, "speaker": speaker,
                            "label": pred.label, "index": pred.index,
                            "probs": {n: round(p, 6) for n, p in zip(s.labels, pred.probs)},
                            "latency_ms": round((time.perf_counter() - received) * 1000, 3)}
    if utt.id is not None:
        body["id"] = utt.id
    return body
