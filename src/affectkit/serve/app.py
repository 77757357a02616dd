"""The FastAPI application of ``affectkit serve``: its routes (sessions over HTTP, utterances over a
WebSocket, Prometheus metrics, the browser view) and the checks at the door (hosts, origins, keys, tokens).

FastAPI (on Starlette, served by uvicorn) because it writes the OpenAPI page (``/docs``) from the
routes and their pydantic models, and Starlette's ``TestClient`` drives WebSockets in tests.  The model
is loaded in the lifespan (:class:`~affectkit.serve.service.Service`); handlers only validate and submit
to the one :class:`~affectkit.serve.batcher.Batcher`, whose single worker thread owns the model state and the
store's writes.  Store reads of handlers run in a thread pool, never on the event loop.

WebSocket protocol (``/v1/sessions/{id}/stream``; the token as ``Authorization: Bearer TOKEN``, or from a
browser as the subprotocol ``affectkit.bearer.TOKEN`` beside ``affectkit.v1``; never in the URL): the server
first sends ``{"type": "ready", "position", "speakers", "labels"}``; then every client frame gets exactly one
frame back, in order: ``{"type": "prediction", "position", "speaker", "label", "index", "probs",
"latency_ms"}`` or ``{"type": "error", "error": KIND, "detail"}`` (the session stays open and unchanged),
echoing the client's ``"id"`` if it sent one (:mod:`affectkit.serve.protocol`).  Overload closes with 1013
after an error frame; an idle connection closes with 1001; a session of another model gets an
``other_model`` error frame and 1008; a session another replica wrote to meanwhile gets a ``moved`` error frame
(the utterance was not stored) and 1012: reconnect, and send again from the ready frame's position.  A
``{"type": "audio", "speaker", "format"}`` frame turns the connection into one participant's microphone
(:mod:`affectkit.serve.audio_ws`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Header, HTTPException, Request, WebSocket
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose, WebSocketDisconnect, WebSocketState

from affectkit.serve.access import (
    DENIED,
    PROTOCOL,
    api_key_ok,
    bearer,
    client_address,
    host_allowed,
    origin_allowed,
    plausible_id,
    token_status,
    ws_token,
)
from affectkit.serve.audio_ws import AudioSettings, audio_config, serve_audio
from affectkit.serve.batcher import Overloaded
from affectkit.serve.protocol import SessionCreated, Transcript, answer, error, refusal
from affectkit.serve.reconnect import open_session
from affectkit.serve.service import ServeSettings, Service
from affectkit.serve.sessions import OtherModel, UnknownSession, other_model_message
from affectkit.serve.store import SessionRow, token_digest

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger(__name__)
WEB = Path(__file__).with_name("web")
CSP = "default-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
NO_URL_TOKEN = "tokens never go in a URL (proxy logs, browser history): send Authorization: Bearer TOKEN"


class HostCheck:
    """TrustedHost-style ASGI middleware for HTTP and WebSocket alike: a request whose Host header is not
    allowed gets 400 (a WebSocket upgrade is closed before it opens).  Guards against DNS rebinding."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] | None, refused: Callable[[], None]) -> None:
        self.app, self.allowed, self.refused = app, allowed, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and self.allowed is not None:
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.allowed):
                self.refused()
                if scope["type"] == "http":
                    await PlainTextResponse("host not allowed (see --allowed-host)", 400)(scope, receive, send)
                else:
                    await WebSocketClose(1008, "host not allowed")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(source: Any, store: str | Path = ":memory:", settings: ServeSettings | None = None,
               embed: Any = None, audio: AudioSettings | None = None,
               ready: Callable[[Service], None] | None = None) -> FastAPI:
    """The application over a causal checkpoint (path, or ``(model, info)``), logging to ``store``.
    ``embed`` replaces the sentence encoder (tests); ``audio``: the speech protocol's limits
    (:mod:`affectkit.serve.audio_ws`); ``ready(service)`` is called once the model is loaded and the worker
    runs; the model loads when the app starts, the audio models on the first audio connection."""
    settings = settings or ServeSettings()
    holder: dict[str, Service] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc = Service(source, store, settings, embed)
        svc.audio_settings = audio or AudioSettings()  # type: ignore[attr-defined]
        if svc.embed is not None:
            await asyncio.get_running_loop().run_in_executor(None, svc.embed, ["warm up"])
        svc.batcher.start()
        holder["svc"] = svc
        app.state.service = svc
        try:
            await svc.retention()
            sweeper = asyncio.get_running_loop().create_task(svc.sweeper())
            if ready is not None:
                ready(svc)
        except BaseException:
            await svc.batcher.stop()
            svc.store.close()
            raise
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

    def refused_host() -> None:
        if "svc" in holder:
            holder["svc"].metrics.errors.labels("bad_host").inc()

    app.add_middleware(HostCheck, allowed=settings.allowed_hosts, refused=refused_host)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        if not request.url.path.startswith("/docs"):
            response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    @app.post("/v1/sessions", response_model=SessionCreated, status_code=201, tags=["sessions"],
              responses={401: {}, 429: {}, 507: {}})
    async def create_session(request: Request, authorization: Annotated[str | None, Header()] = None,
                             x_api_key: Annotated[str | None, Header()] = None) -> SessionCreated:
        """Open a session: its id and its token (shown once, stored hashed).  Needs the operator key
        (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) when the server has one."""
        s = svc()
        lim = s.settings
        if not api_key_ok(lim.api_key, authorization, x_api_key):
            s.metrics.errors.labels("auth").inc()
            raise HTTPException(401, "creating a session needs the operator key (Authorization: Bearer KEY or "
                                     "X-API-Key: KEY)", headers={"WWW-Authenticate": "Bearer"})
        client = client_address(request)
        wait = s.creations.take(client)
        if wait:
            s.metrics.errors.labels("rate_limited").inc()
            await s.refuse_slowly(client, wait)
            raise HTTPException(429, f"over {lim.create_per_min:g} new sessions per minute from this address",
                                headers={"Retry-After": str(max(1, math.ceil(wait)))})
        sid, token = secrets.token_urlsafe(16), secrets.token_urlsafe(32)

        def create() -> str | None:
            if s.store.size_bytes() >= lim.max_store_mb * 2**20:
                return "store_full"
            row = s.store.create_session(sid, token, s.identity["hash"], lim.max_sessions)
            if row is None:
                return "too_many_sessions"
            s.rows.put(sid, row)
            return None

        problem = await asyncio.get_running_loop().run_in_executor(None, create)
        if problem is not None:
            s.metrics.errors.labels(problem).inc()
            if problem == "store_full":
                raise HTTPException(507, "the session log is full; nothing new is stored",
                                    headers={"Retry-After": "3600"})
            raise HTTPException(429, f"{lim.max_sessions} sessions exist, the most this server keeps; delete "
                                     "finished sessions", headers={"Retry-After": "60"})
        s.pool.note_created(sid)
        s.metrics.sessions_created.inc()
        return SessionCreated(id=sid, token=token, stream=f"/v1/sessions/{sid}/stream", labels=s.labels,
                              modalities=s.modalities, dims=s.dims, max_speakers=s.max_speakers)

    @app.get("/v1/sessions/{session_id}", response_model=Transcript, tags=["sessions"],
             responses={400: {}, 401: {}, 403: {}, 404: {}})
    def get_session(session_id: str, request: Request,
                    authorization: Annotated[str | None, Header()] = None) -> Transcript:
        """The transcript: every utterance with its prediction, in order (read in one transaction, in the
        thread pool)."""
        s = svc()
        _check_access(s, session_id, request, authorization)
        got = s.store.transcript(session_id)
        if got is None:  # deleted since the token was checked
            raise HTTPException(404, DENIED[404])
        row, records, spoken = got
        model = s.store.model(row.model) if row.model is not None else None
        labels = list(model["labels"]) if model is not None else s.labels  # type: ignore[call-overload]
        utts = [r.public() for r in records]
        for u in utts:
            u["probs"] = dict(zip(labels, u["probs"]))  # type: ignore[call-overload]
            if u["position"] in spoken:  # a spoken utterance: its transcript, times, confidence, prosody
                u["audio"] = spoken[u["position"]]  # type: ignore[index]
                if u["text"] is None:
                    u["text"] = u["audio"].get("text")  # type: ignore[attr-defined]
        speakers: list[str] = []
        for u in utts:
            if u["speaker"] not in speakers:
                speakers.append(str(u["speaker"]))
        return Transcript(id=session_id, created=row.created, model=row.model, labels=labels, speakers=speakers,
                          utterances=utts)

    @app.delete("/v1/sessions/{session_id}", status_code=204, tags=["sessions"],
                responses={400: {}, 401: {}, 403: {}, 404: {}})
    async def delete_session(session_id: str, request: Request,
                             authorization: Annotated[str | None, Header()] = None) -> Response:
        """Close the session's connections and delete it and its transcript."""
        s = svc()
        await asyncio.get_running_loop().run_in_executor(None, _check_access, s, session_id, request, authorization)
        for ws in list(s.connections.get(session_id, ())):
            await _close(ws, 1000, "session deleted")

        def gone() -> None:
            s.pool.drop(session_id)
            s.store.delete_session(session_id)

        try:
            await s.batcher.run_bounded(gone, what="deletes")
        except Overloaded as exc:
            s.metrics.errors.labels("overloaded").inc()
            raise HTTPException(503, f"{exc}; retry in a second", headers={"Retry-After": "1"}) from None
        s.forget(session_id)
        return Response(status_code=204)

    @app.get("/healthz", tags=["operations"])
    def healthz() -> JSONResponse:
        """Liveness and readiness: 200 while the worker runs."""
        s = svc()
        ok = s.batcher.running
        body = {"status": "ok" if ok else "down", "queue": s.batcher.depth, "sessions_live": len(s.pool.live),
                "labels": s.labels, "modalities": s.modalities, "raw_text": s.embed is not None,
                "model": s.identity["hash"]}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
    def metrics() -> Response:
        """Prometheus text format."""
        s = svc()
        s.metrics.queue.set(s.batcher.depth)
        s.metrics.rebuilds_waiting.set(s.batcher.jobs_waiting)
        s.metrics.rebuilds_dropped.set(s.batcher.jobs_dropped)
        s.metrics.connections.set(sum(len(c) for c in s.connections.values()))
        s.metrics.store_bytes.set(s.store.size_bytes())
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.websocket("/v1/sessions/{session_id}/stream")
    async def stream(ws: WebSocket, session_id: str) -> None:
        s = svc()
        denied = await _ws_denial(s, ws, session_id)
        if denied is not None:
            status, detail, row = denied
            if status:
                await ws.send_denial_response(JSONResponse({"detail": detail}, status_code=status))
                return
        else:
            row = None
        wait = s.connects.take(session_id)
        if wait:  # a reconnect loop: refused before any work is done for it
            s.metrics.errors.labels("rate_limited").inc()
            await s.refuse_slowly(client_address(ws), wait)
            await ws.send_denial_response(JSONResponse(
                {"detail": f"over {s.settings.connect_per_min:g} connects per minute to this session"},
                status_code=429, headers={"Retry-After": str(max(1, math.ceil(wait)))}))
            return
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol=PROTOCOL if PROTOCOL in offered else None)
        if row is not None and row.model != s.identity["hash"]:  # refused with a reason the client can read
            s.metrics.errors.labels("other_model").inc()
            await _send(ws, error("other_model", other_model_message(session_id, row.model, s.identity["hash"])))
            await _close(ws, 1008, "session of another model")
            return
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


def _check_access(s: Service, session_id: str, request: Request, authorization: str | None) -> SessionRow:
    """The session's row, or the HTTP error: 400 token in the URL, 404 unknown, 401 no token, 403 wrong.
    Reads the store: call it from the thread pool, not the event loop."""
    if "token" in request.query_params:
        s.metrics.errors.labels("auth").inc()
        raise HTTPException(400, NO_URL_TOKEN)
    row = s.store.session(session_id) if plausible_id(session_id) else None
    status = token_status(row.token_sha256 if row else None, bearer(authorization), token_digest)
    if status:
        s.metrics.errors.labels("auth").inc()
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        raise HTTPException(status, DENIED[status], headers=headers)
    assert row is not None
    return row


async def _ws_denial(s: Service, ws: WebSocket, session_id: str) -> tuple[int, str, SessionRow | None] | None:
    """(0, "", row) if the upgrade may open the session, else (HTTP status, reason, None); the row comes from
    the service's cache or a store read off the event loop."""
    if not origin_allowed(ws.headers.get("origin"), ws.headers.get("host"), s.settings.allowed_origins):
        s.metrics.errors.labels("bad_origin").inc()
        return 403, "this origin may not open sessions (see --allowed-origin)", None
    if "token" in ws.query_params:
        s.metrics.errors.labels("auth").inc()
        return 400, NO_URL_TOKEN + " or the subprotocol affectkit.bearer.TOKEN", None
    token = ws_token(ws.headers.get("authorization"), ws.scope.get("subprotocols") or [])
    row = await s.session_row(session_id) if plausible_id(session_id) else None
    status = token_status(row.token_sha256 if row else None, token, token_digest)
    if status:
        s.metrics.errors.labels("auth").inc()
        return status, DENIED[status], None
    return 0, "", row


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
        await _send(ws, error("overloaded", f"{exc}; retry in a second"))
        await _close(ws, 1013, "overloaded: retry later")
        return
    except OtherModel as exc:
        s.metrics.errors.labels("other_model").inc()
        await _send(ws, error("other_model", str(exc)))
        await _close(ws, 1008, "session of another model")
        return
    except Exception as exc:  # noqa: BLE001 - logged; the client is told, the server goes on
        frame = refusal(exc)
        if frame is None:
            log.error("opening session %s failed", session_id, exc_info=exc)
            frame = error("internal", "the session could not be opened")
        s.metrics.errors.labels(frame["error"]).inc()
        await _send(ws, frame)
        await _close(ws, 1011, "session could not be opened")
        return
    if opened is None:  # the client left while its session was being rebuilt
        return
    (position, speakers), receiving = opened
    refused = 0  # strikes for rate_limited answers: a client that ignores them is disconnected
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
            await serve_audio(s, ws, session_id, control, answer, _send, _close)
            return
        reply = await answer(s, session_id, msg, received)
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
        # refused frames add a strike, answered ones take one away: a client sending at several times the
        # limit piles up strikes, one that bursts now and then does not
        refused = refused + 1 if reply.get("error") == "rate_limited" else max(0, refused - 1)
        if refused >= s.settings.rate_burst:
            await _close(ws, 1008, "rate limit ignored")
            return
        if refused:  # nothing more is read from this connection before the session may send again
            await s.refuse_slowly(client_address(ws), s.frames.wait(session_id))
        if reply.get("error") == "moved":  # another replica holds the session now: the client reconnects
            await _close(ws, 1012, "session moved: reconnect")
            return
        if reply.get("error") in ("gone", "other_model"):
            await _close(ws, 1000 if reply["error"] == "gone" else 1008, "session deleted")
            return
