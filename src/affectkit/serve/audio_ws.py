"""Speech over the session WebSocket: one participant's microphone per connection.

Protocol (after the server's ``ready`` frame, on ``/v1/sessions/{id}/stream``):

1. The client sends a JSON config frame ``{"type": "audio", "speaker": "Ana", "format": {"encoding":
   "s16le", "sample_rate": 16000, "channels": 1}}``; the server answers ``{"type": "audio_ready",
   "speaker", "format", "limits"}`` (or an error frame; the connection stays as it was).  Only 16 kHz
   16-bit little-endian mono is accepted: the browser view resamples in its AudioWorklet, and a server
   that resampled every stream would spend CPU the client has to spare.
2. Then binary frames of raw PCM (about 100 ms each; at most ``max_frame_bytes``; no faster than real
   time beyond a ``burst_s`` allowance).  The server finds the speech itself and sends, per utterance:
   ``{"type": "speech_start", "speaker", "start"}``, ``{"type": "speech_end", "start", "end", "forced"}``,
   ``{"type": "transcript", "start", "end", "text", "confidence"}`` and ``{"type": "prediction",
   "position", "speaker", "label", "index", "probs", "start", "end", "text", "latency_ms"}`` where
   ``latency_ms`` runs from the arrival of the frame in which the end of speech was detected (a pause of
   ``pause_ms`` after the last word) to the prediction being sent.
3. Text utterance frames (``{"speaker", "text"}``) keep working on the same connection (one answer each,
   interleaved with the audio events); ``{"type": "audio_end"}`` ends the track (the utterance in
   progress is finished and classified; ``{"type": "audio_ended"}`` follows the track's last answer), as
   does ``{"type": "audio", ...}`` to switch speakers.

Bad audio gets an error frame and changes nothing: ``bad_format`` (config), ``no_config`` (PCM before a
config), ``bad_frame`` (odd byte count), ``too_large`` (frame over the limit), ``rate_limited`` (faster
than real time: the frame is dropped), ``overloaded`` (too many utterances of this track waiting for the
transcriber: the utterance is dropped and counted as lost).  A track that never pauses is cut every
``max_utterance_s`` (``speech_end`` with ``forced: true`` and an error frame ``forced_cut``); silence
produces nothing.  A connection that closes mid-utterance drops that half utterance: only finished
utterances reach the log.

The log keeps, per spoken utterance, its transcript (as the utterance's text), start/end, confidence and
its 88 prosody numbers (``GET /v1/sessions/{id}`` shows them under ``audio``).  Raw audio is not kept
unless ``store_audio`` is set: a voice is personal data, a minute of it is ~2 MB, and rebuilding a session
needs only the features already in the log.

Work off the event loop: voice activity detection on one thread, Whisper on another (utterances of all
sessions batched, :class:`~affectkit.serve.batcher.Batcher`), prosody on a third, the model on the
service's own worker.  Models load on the first audio connection, never at import time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fastapi import WebSocket
from prometheus_client import Counter, Histogram

from affectkit.errors import AffectkitError
from affectkit.serve.access import client_address
from affectkit.serve.batcher import Batcher, Overloaded
from affectkit.serve.sessions import Item, UnknownSession

__all__ = ["AudioFront", "AudioSettings", "audio_config", "serve_audio"]

log = logging.getLogger(__name__)

FORMAT = {"encoding": "s16le", "sample_rate": 16000, "channels": 1}


@dataclass
class AudioSettings:
    """Limits and knobs of the audio protocol."""

    max_frame_bytes: int = 32000    # one binary frame: 1 s of 16 kHz s16le at most
    burst_s: float = 2.0            # audio a client may send ahead of real time
    pause_ms: int = 500             # silence that ends an utterance
    max_utterance_s: float = 15.0   # an utterance is cut at this length
    max_pending: int = 4            # utterances of one track waiting for transcription, beyond: dropped
    asr_batch: int = 8              # utterances transcribed together (across sessions)
    asr_wait_ms: float = 5.0        # how long the transcriber waits to fill a batch
    asr_threads: int = 1            # CPU threads of one Whisper decode
    store_audio: bool = False       # keep each utterance's PCM in the log

    def __post_init__(self) -> None:
        from affectkit.audio.segmenter import SegmenterConfig
        from affectkit.errors import ConfigError

        SegmenterConfig(pause_ms=self.pause_ms, max_utterance_s=self.max_utterance_s)  # ConfigError if out of range
        if self.max_frame_bytes < 2 or self.burst_s < 0 or self.max_pending < 1 or self.asr_batch < 1 \
                or self.asr_threads < 1:
            raise ConfigError("audio settings: max_frame_bytes >= 2, burst_s >= 0, max_pending, asr_batch and "
                              "asr_threads >= 1")


def audio_config(raw: str | None) -> dict[str, Any] | None:
    """The parsed frame if text frame ``raw`` is an audio control frame (``"type": "audio"`` or
    ``"audio_end"``), else None (a text utterance, for the text protocol)."""
    if raw is None or len(raw) > 4096 or '"type"' not in raw:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if isinstance(data, dict) and data.get("type") in ("audio", "audio_end"):
        return data
    return None


class AudioMetrics:
    def __init__(self, registry: Any) -> None:
        r = registry
        self.seconds = Counter("affectkit_audio_seconds", "seconds of audio received", registry=r)
        self.utterances = Counter("affectkit_audio_utterances", "spoken utterances answered", registry=r)
        self.lost = Counter("affectkit_audio_lost", "spoken utterances dropped (overload)", registry=r)
        self.latency = Histogram("affectkit_audio_latency_seconds", "end of speech detected to prediction sent",
                                 registry=r, buckets=(.05, .1, .2, .3, .5, .75, 1, 1.5, 2, 3, 5))
        self.asr = Histogram("affectkit_asr_batch_seconds", "time to transcribe one batch", registry=r)


class AudioFront:
    """The service's audio front end: shared models, worker threads, metrics (one per app, made on the
    first audio connection; built off the event loop, then :meth:`start` on it)."""

    def __init__(self, svc: Any, settings: AudioSettings) -> None:
        import numpy as np

        from affectkit.audio.inputs import plan_inputs
        from affectkit.audio.prosody import prosody
        from affectkit.audio.segmenter import Segmenter, SegmenterConfig
        from affectkit.audio.transcriber import shared_transcriber

        self.settings = settings
        self.segmenter_config = SegmenterConfig(pause_ms=settings.pause_ms, max_utterance_s=settings.max_utterance_s)
        self.plan = plan_inputs(svc.modalities, svc.dims, svc.embed is not None, svc.info.get("audio_features"))
        self.transcriber = shared_transcriber(cpu_threads=settings.asr_threads)
        self.transcriber.transcribe(np.zeros(8000, dtype=np.float32))  # load and warm up before the first answer
        prosody(np.zeros(8000, dtype=np.float32))
        Segmenter(self.segmenter_config)  # loads the VAD model
        self.vad = ThreadPoolExecutor(1, thread_name_prefix="affectkit-vad")
        self.prosody = ThreadPoolExecutor(1, thread_name_prefix="affectkit-prosody")
        self.metrics = AudioMetrics(svc.metrics.registry)
        self.asr: Batcher[Any] = Batcher(self.transcriber.transcribe_batch, settings.asr_batch, settings.asr_wait_ms,
                                         max_queue=256, on_batch=lambda n, sec: self.metrics.asr.observe(sec))

    def start(self) -> None:
        self.asr.start()

    async def stop(self) -> None:
        await self.asr.stop()
        self.vad.shutdown(wait=True)
        self.prosody.shutdown(wait=True)


async def front(svc: Any, settings: AudioSettings) -> AudioFront:
    """The app's :class:`AudioFront`, made on first use (models loaded off the event loop)."""
    lock = svc.__dict__.setdefault("_audio_lock", asyncio.Lock())
    async with lock:
        if getattr(svc, "audio", None) is None:
            made = await asyncio.get_running_loop().run_in_executor(None, AudioFront, svc, settings)
            made.start()
            svc.audio = made
    return svc.audio


def _error(kind: str, detail: str) -> dict[str, Any]:
    return {"type": "error", "error": kind, "detail": detail}


class _Track:
    """One connection's audio state: its speaker, segmenter, rate allowance and pending utterances."""

    def __init__(self, speaker: str, fe: AudioFront) -> None:
        from affectkit.audio.frontend import Track

        self.speaker = speaker
        self.track = Track(speaker, fe.segmenter_config)
        self.started = time.monotonic()
        self.received_s = 0.0
        self.pending = 0


Say = Callable[[dict[str, Any]], Awaitable[bool]]


async def serve_audio(s: Any, ws: WebSocket, session_id: str, first: dict[str, Any],
                      answer: Callable[..., Awaitable[dict[str, Any]]],
                      send: Callable[[WebSocket, dict[str, Any]], Awaitable[bool]],
                      close: Callable[[WebSocket, int, str], Awaitable[None]] | None = None) -> None:
    """Run the connection from its first audio control frame ``first`` on (the text protocol's loop hands
    it over); returns when the client leaves or the connection is closed.  ``close(ws, code, reason)``
    ends the connection after a ``moved`` frame (1012, as on a text connection: the client reconnects)."""
    settings: AudioSettings = getattr(s, "audio_settings", None) or AudioSettings()
    lock = asyncio.Lock()
    jobs: list[asyncio.Future[Any]] = []

    async def say(body: dict[str, Any]) -> bool:
        if body.get("type") == "error":
            s.metrics.errors.labels(body["error"]).inc()
        async with lock:
            sent = await send(ws, body)
        if body.get("error") == "moved" and close is not None:  # another replica holds the session now
            await close(ws, 1012, "session moved: reconnect")
        return sent

    fe: AudioFront | None = None
    try:
        fe = await front(s, settings)
    except AffectkitError as exc:
        await say(_error("unsupported", str(exc)))
    except ImportError:
        await say(_error("unsupported", "this server has no audio front end: pip install 'affectkit[audio]'"))
    track: _Track | None = None
    control: dict[str, Any] | None = first
    msg: dict[str, Any] = {}
    try:
        while True:
            received = time.perf_counter()
            if control is None:
                try:
                    msg = await asyncio.wait_for(ws.receive(), s.settings.idle_timeout_s)
                except asyncio.TimeoutError:
                    s.metrics.errors.labels("idle_timeout").inc()
                    return
                if msg["type"] == "websocket.disconnect":
                    return
                received = time.perf_counter()
                control = audio_config(msg.get("text"))
                if control is None and msg.get("text") is not None:  # a typed utterance, as on a text connection
                    reply = await answer(s, session_id, msg, received)
                    if reply.get("type") != "error":
                        s.metrics.utterances.inc()
                    await say(reply)
                    if reply.get("error") == "rate_limited":  # as on a text connection
                        await s.refuse_slowly(client_address(ws), s.frames.wait(session_id))
                    continue
            if control is not None:
                ctl, control = control, None
                if fe is None:
                    await say(_error("unsupported", "audio is not available on this server"))
                    continue
                if track is not None:  # the track so far ends here: its open utterance is finished
                    for ev in await _events(fe, track, None):
                        _utterance(s, fe, session_id, track, ev, received, say, jobs)
                    track = None
                if ctl["type"] == "audio_end":  # answered once every utterance of the track is
                    await asyncio.gather(*jobs, return_exceptions=True)
                    await say({"type": "audio_ended"})
                    continue
                track, reply = await _configure(s, fe, session_id, ctl)
                await say(reply)
                continue
            data = msg.get("bytes")
            if fe is None or track is None or data is None:
                await say(_error("no_config", 'send {"type": "audio", "speaker": ..., "format": {...}} before PCM'))
                continue
            problem = _check_frame(settings, track, data)
            if problem is not None:
                await say(problem)
                if problem["error"] == "rate_limited":  # nothing more is read until the audio would be accepted
                    await s.refuse_slowly(client_address(ws), _ahead_s(settings, track, len(data) / 32000))
                continue
            fe.metrics.seconds.inc(len(data) / 32000)
            for ev in await _events(fe, track, data):
                if hasattr(ev, "audio"):
                    _utterance(s, fe, session_id, track, ev, received, say, jobs)
                else:
                    await say({"type": "speech_start", "speaker": track.speaker, "start": round(ev.start, 3)})
    finally:
        if jobs:  # finished utterances complete (they go to the log); a half-spoken one is dropped
            await asyncio.gather(*jobs, return_exceptions=True)


async def _configure(s: Any, fe: AudioFront, session_id: str, ctl: dict[str, Any]) -> tuple[_Track | None, dict]:
    """The track an audio config frame opens, or (None, error frame)."""
    lim = s.settings
    speaker = ctl.get("speaker")
    if not isinstance(speaker, str) or not speaker.strip() or len(speaker.strip()) > lim.max_speaker_chars \
            or not speaker.strip().isprintable():
        return None, _error("invalid", f"speaker must be 1-{lim.max_speaker_chars} printable characters")
    speaker = speaker.strip()
    fmt = ctl.get("format", FORMAT)
    if not isinstance(fmt, dict) or set(fmt) - set(FORMAT):
        return None, _error("bad_format", f"format is an object with keys {', '.join(FORMAT)}")
    got = {**FORMAT, **fmt}
    if got != FORMAT:
        return None, _error("bad_format", f"only s16le, 16000 Hz, 1 channel is accepted (got {got['encoding']}, "
                                          f"{got['sample_rate']} Hz, {got['channels']} channel(s)); resample "
                                          "on the client")
    extra = sorted(set(ctl) - {"type", "speaker", "format", "id"})
    if extra:
        return None, _error("invalid", f"unknown field(s) in the audio config: {', '.join(extra)}")
    try:
        _pos, speakers = await s.batcher.run_sync(s.pool.position, session_id)
    except UnknownSession:
        return None, _error("gone", "this session was deleted")
    if speaker not in speakers and len(speakers) >= s.max_speakers:
        return None, _error("too_many_speakers", f"this model tells {s.max_speakers} speakers apart and the session "
                                                 f"already has {', '.join(map(repr, speakers))}")
    st = fe.settings
    return _Track(speaker, fe), {
        "type": "audio_ready", "speaker": speaker, "format": FORMAT,
        "limits": {"max_frame_bytes": st.max_frame_bytes, "burst_s": st.burst_s, "pause_ms": st.pause_ms,
                   "max_utterance_s": st.max_utterance_s},
        "prosody": "model" if fe.plan.prosody else "logged"}


def _check_frame(st: AudioSettings, track: _Track, data: bytes) -> dict[str, Any] | None:
    """An error frame for a PCM frame that breaks a rule, else None (and the frame is counted)."""
    if len(data) > st.max_frame_bytes:
        return _error("too_large", f"audio frame of {len(data)} bytes, over {st.max_frame_bytes}; send ~100 ms frames")
    if len(data) % 2:
        return _error("bad_frame", f"s16le frames hold whole 2-byte samples; got {len(data)} bytes")
    seconds = len(data) / 32000
    if _ahead_s(st, track, seconds) > 0:
        return _error("rate_limited", f"audio arrives faster than real time ({track.received_s + seconds:.1f} s "
                                      f"of audio in {time.monotonic() - track.started:.1f} s); frame dropped")
    track.received_s += seconds
    return None


def _ahead_s(st: AudioSettings, track: _Track, seconds: float) -> float:
    """How far ``seconds`` more of the track's audio would run ahead of real time plus the burst (> 0:
    refused; it is also how long until they would be accepted)."""
    return track.received_s + seconds - (time.monotonic() - track.started + st.burst_s)


async def _events(fe: AudioFront, track: _Track, data: bytes | None) -> list[Any]:
    """Segmenter events of a PCM frame (None: the end of the track), computed on the VAD thread."""
    from affectkit.audio.pcm import pcm_to_float

    loop = asyncio.get_running_loop()
    if data is None:
        return await loop.run_in_executor(fe.vad, track.track.flush)
    return await loop.run_in_executor(fe.vad, track.track.push, pcm_to_float(data))


def _utterance(s: Any, fe: AudioFront, session_id: str, track: _Track, seg: Any, received: float, say: Say,
               jobs: list[asyncio.Future[Any]]) -> None:
    """Start the work on a finished segment (in order with this track's earlier ones)."""
    if track.pending >= fe.settings.max_pending:
        fe.metrics.lost.inc()
        jobs.append(asyncio.ensure_future(say(_error(
            "overloaded", f"{track.pending} utterances of this track wait for the transcriber; this one "
                          f"({seg.start:.1f}-{seg.end:.1f} s) is dropped"))))
        return
    track.pending += 1
    prev = jobs[-1] if jobs else None
    jobs[:] = [j for j in jobs if not j.done()]
    jobs.append(asyncio.ensure_future(_answer_speech(s, fe, session_id, track, seg, received, say, prev)))


async def _answer_speech(s: Any, fe: AudioFront, session_id: str, track: _Track, seg: Any, received: float,
                         say: Say, prev: asyncio.Future[Any] | None) -> None:
    from affectkit.audio.frontend import Utterance
    from affectkit.audio.pcm import float_to_pcm
    from affectkit.audio.prosody import prosody

    speaker = track.speaker
    try:
        await say({"type": "speech_end", "speaker": speaker, "start": round(seg.start, 3), "end": round(seg.end, 3),
                   "forced": seg.forced})
        if seg.forced:
            await say(_error("forced_cut", f"speech longer than {fe.settings.max_utterance_s:g} s without a pause: "
                                           "cut there; the rest goes on as the next utterance"))
        loop = asyncio.get_running_loop()
        stages: dict[str, float] = {}

        async def timed(name: str, work: Awaitable[Any]) -> Any:
            start = time.perf_counter()
            try:
                return await work
            finally:
                stages[name] = round((time.perf_counter() - start) * 1000, 1)

        try:
            said, numbers = await asyncio.gather(timed("transcribe", fe.asr.submit(seg.audio)),
                                                 timed("prosody", loop.run_in_executor(fe.prosody, prosody, seg.audio)))
        except Overloaded as exc:
            fe.metrics.lost.inc()
            await say(_error("overloaded", f"{exc}; the utterance {seg.start:.1f}-{seg.end:.1f} s is dropped"))
            return
        utt = Utterance(speaker, seg.start, seg.end, said.text, said.confidence, numbers, None, seg.forced)
        if prev is not None:  # this track's utterances enter the conversation in the order they ended
            await timed("order", asyncio.wait([prev]))
        span = {"speaker": speaker, "start": round(seg.start, 3), "end": round(seg.end, 3)}
        await say({"type": "transcript", **span, "text": utt.text, "confidence": round(utt.confidence, 4)})
        if not fe.plan.classifiable(utt):
            return
        text, feats = fe.plan.inputs(utt)
        try:
            pred, _rec = await timed("model", s.batcher.submit(Item(session_id, speaker, text, feats, received)))
        except Exception as exc:  # the refusals a typed utterance gets, with the same kinds (moved, store_full...)
            from affectkit.serve.protocol import refusal

            frame = refusal(exc)
            if frame is None:
                raise
            if frame["error"] == "overloaded":
                fe.metrics.lost.inc()
            await say(frame)
            return
        meta = {**span, "text": utt.text, "confidence": round(utt.confidence, 4), "forced": seg.forced,
                "source": "audio"}
        pcm = float_to_pcm(seg.audio) if fe.settings.store_audio else None
        await s.batcher.run_sync(s.store.append_audio, session_id, pred.position, meta, numbers, pcm)
        latency = time.perf_counter() - received
        fe.metrics.utterances.inc()
        fe.metrics.latency.observe(latency)
        s.metrics.utterances.inc()
        await say({"type": "prediction", "position": pred.position, **span, "label": pred.label, "index": pred.index,
                   "probs": {n: round(p, 6) for n, p in zip(s.labels, pred.probs)}, "text": utt.text,
                   "latency_ms": round(latency * 1000, 3), "stages_ms": stages})
    except Exception:  # noqa: BLE001 - logged; the client gets a short frame, the server goes on
        log.exception("spoken utterance failed")
        await say(_error("internal", "the utterance could not be processed; it was not stored"))
    finally:
        track.pending -= 1

