"""Speech over the service's WebSocket (a real uvicorn server on 127.0.0.1, websockets clients): two
participants on their own connections, transcripts and prosody in the log, the audio errors (format,
odd bytes, oversize, faster than real time, never-ending talk, silence), text frames alongside, a
half-spoken utterance dropped when the connection goes, and an 88-d audio model reading the prosody."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("silero_vad")
pytest.importorskip("faster_whisper")
pytest.importorskip("opensmile")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (.ci/run installs it)", allow_module_level=True)

import httpx  # noqa: E402
from audio_support import layout  # noqa: E402
from serve_support import fake_embed, thread_server  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from affectkit.audio.frontend import word_errors  # noqa: E402
from affectkit.audio.pcm import float_to_pcm  # noqa: E402
from affectkit.audio.prosody import Standardiser  # noqa: E402
from affectkit.audio.synthetic import speak  # noqa: E402
from affectkit.models import build_model  # noqa: E402
from affectkit.serve.app import ServeSettings, create_app  # noqa: E402
from affectkit.serve.audio_ws import AudioSettings  # noqa: E402

INFO = {"dims": {"text": 8}, "n_classes": 4, "label_names": ["hap", "sad", "neu", "ang"], "n_speakers": 2,
        "speakers": ["F", "M"]}
SMALL = {"hidden": 8, "text_ff": 16, "text_layers": 1, "text_heads": 2, "graph_heads": 2, "wp": 3, "wf": 0,
         "causal": True, "modalities": ["text"]}
ANA = ["I am so happy to see you today.", "We won the game last night."]
BEN = ["Please send me the report.", "I will call you after lunch."]
CONFIG = {"type": "audio", "speaker": "Ana", "format": {"encoding": "s16le", "sample_rate": 16000, "channels": 1}}
FRAME = 3200  # bytes: 100 ms


def embed(sentences: list[str]) -> np.ndarray:
    return fake_embed(sentences, 8)


@pytest.fixture(scope="module")
def voices() -> dict[str, np.ndarray]:
    return {s: speak(s, "en-us" if s in ANA else "en-gb") for s in ANA + BEN}


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    return build_model("corect", SMALL, INFO).eval(), INFO


@pytest.fixture(scope="module")
def server(text_model, tmp_path_factory):
    app = create_app(text_model, tmp_path_factory.mktemp("db") / "s.db", ServeSettings(),
                     embed=embed, audio=AudioSettings(burst_s=1e6, max_utterance_s=4.0))
    with thread_server(app) as url:
        yield url, app


def _session(url: str) -> tuple[str, str, str]:
    s = httpx.post(url + "/v1/sessions").json()
    return s["id"], s["token"], url.replace("http://", "ws://") + s["stream"] + f"#{s['token']}"


def _connect(ws_url: str):
    """A WebSocket to ``URL#TOKEN`` (the token goes in the Authorization header, never in the URL)."""
    url, token = ws_url.split("#")
    return connect(url, max_size=2**22, additional_headers={"Authorization": f"Bearer {token}"})


def _open(ws_url: str, speaker: str | None = "Ana"):
    ws = _connect(ws_url)
    assert json.loads(ws.recv(timeout=30))["type"] == "ready"
    if speaker is not None:
        ws.send(json.dumps({**CONFIG, "speaker": speaker}))
        ready = json.loads(ws.recv(timeout=120))
        assert ready["type"] == "audio_ready", ready
    return ws


def _stream(ws, audio: np.ndarray, pace: float = 0.0) -> None:
    pcm = float_to_pcm(audio)
    for k in range(0, len(pcm), FRAME):
        ws.send(pcm[k:k + FRAME])
        if pace:
            time.sleep(pace * FRAME / 32000)


def _frames(ws, until, timeout: float = 60) -> list[dict]:
    """Frames until ``until(frames)`` is true (TimeoutError past ``timeout``)."""
    out, end = [], time.monotonic() + timeout
    while not until(out):
        out.append(json.loads(ws.recv(timeout=max(0.1, end - time.monotonic()))))
    return out


def _of(frames, kind):
    return [f for f in frames if f.get("type") == kind]


def _transcript(url, sid, token):
    return httpx.get(f"{url}/v1/sessions/{sid}", headers={"Authorization": f"Bearer {token}"}).json()


def test_two_participants_stream_at_once(server, voices):
    url, _app = server
    sid, token, ws_url = _session(url)
    tracks = {"Ana": layout([(0.5, voices[ANA[0]]), (3.0, None), (0.2, voices[ANA[1]]), (1.0, None)])[0],
              "Ben": layout([(2.5, voices[BEN[0]]), (2.5, None), (0.3, voices[BEN[1]]), (1.0, None)], seed=1)[0]}
    got: dict[str, list[dict]] = {}

    def talk(name: str) -> None:
        with _open(ws_url, name) as ws:
            _stream(ws, tracks[name], pace=0.25)  # four times real time (the limit is off here)
            got[name] = _frames(ws, lambda f: len(_of(f, "prediction")) == 2)

    threads = [threading.Thread(target=talk, args=(n,)) for n in tracks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert set(got) == {"Ana", "Ben"}
    for name, script in (("Ana", ANA), ("Ben", BEN)):
        frames = got[name]
        kinds = [f["type"] for f in frames]
        assert kinds.count("speech_start") == 2 and kinds.count("speech_end") == 2 and kinds.count("transcript") == 2
        assert kinds.index("speech_start") < kinds.index("speech_end") < kinds.index("transcript") \
            < kinds.index("prediction")
        for p, ref in zip(_of(frames, "prediction"), script):
            assert p["speaker"] == name and p["label"] in INFO["label_names"] and p["latency_ms"] > 0
            assert word_errors(ref, p["text"])[0] <= 2, p["text"]
            assert sum(p["probs"].values()) == pytest.approx(1, abs=1e-4)
    t = _transcript(url, sid, token)
    assert [u["position"] for u in t["utterances"]] == [0, 1, 2, 3] and set(t["speakers"]) == {"Ana", "Ben"}
    for u in t["utterances"]:
        a = u["audio"]
        assert len(a["prosody"]) == 88 and a["end"] > a["start"] and a["text"] == u["text"]
        assert a["audio_bytes"] == 0  # raw audio is not kept by default
    order = [u["speaker"] for u in t["utterances"]]
    assert order.count("Ana") == 2 and order.count("Ben") == 2


def test_audio_errors_leave_the_session_as_it_was(server, voices):
    url, app = server
    sid, token, ws_url = _session(url)
    with _open(ws_url, speaker=None) as ws:
        ws.send(b"\x00\x00" * 800)  # PCM before any config: the text protocol refuses binary frames
        assert json.loads(ws.recv(timeout=30))["error"] == "binary_frame"
        for fmt, what in (({"sample_rate": 8000}, "16000 Hz"), ({"encoding": "f32le"}, "s16le"),
                          ({"channels": 2}, "1 channel"), ({"bitrate": 1}, "keys")):
            ws.send(json.dumps({**CONFIG, "format": {**CONFIG["format"], **fmt}}))
            e = json.loads(ws.recv(timeout=120))
            assert e["error"] == "bad_format" and what in e["detail"], e
        ws.send(json.dumps({**CONFIG, "speaker": ""}))
        assert json.loads(ws.recv(timeout=30))["error"] == "invalid"
        ws.send(b"\x00\x00" * 800)  # still no track
        assert json.loads(ws.recv(timeout=30))["error"] == "no_config"
        ws.send(json.dumps(CONFIG))
        assert json.loads(ws.recv(timeout=30))["type"] == "audio_ready"
        ws.send(b"\x00" * 3201)
        assert json.loads(ws.recv(timeout=30))["error"] == "bad_frame"
        ws.send(b"\x00" * 64002)
        assert json.loads(ws.recv(timeout=30))["error"] == "too_large"
        _stream(ws, np.zeros(16000 * 3, dtype=np.float32))  # silence: nothing comes back ...
        ws.send(json.dumps({"speaker": "Ana", "text": "Typed while the microphone is on."}))
        p = json.loads(ws.recv(timeout=30))  # ... so the next frame is the typed utterance's answer
        assert p["type"] == "prediction" and p["position"] == 0
        ws.send(json.dumps({"type": "audio_end"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "audio_ended"
        ws.send(json.dumps({"speaker": "Ben", "text": "And I typed this."}))
        assert json.loads(ws.recv(timeout=30))["position"] == 1
        ws.send(json.dumps({**CONFIG, "speaker": "Cy"}))  # a third participant: the model tells 2 apart
        e = json.loads(ws.recv(timeout=30))
        assert e["error"] == "too_many_speakers" and "'Ana', 'Ben'" in e["detail"]
    t = _transcript(url, sid, token)
    assert [u["text"] for u in t["utterances"]] == ["Typed while the microphone is on.", "And I typed this."]
    assert "audio" not in t["utterances"][0]
    metrics = httpx.get(url + "/metrics").text
    for kind in ("bad_format", "bad_frame", "too_large", "no_config"):
        assert f'affectkit_errors_total{{kind="{kind}"}}' in metrics


def test_faster_than_real_time_is_refused(text_model, voices, tmp_path):
    app = create_app(text_model, tmp_path / "s.db", ServeSettings(), embed=embed, audio=AudioSettings(burst_s=1.0))
    with thread_server(app) as url:
        sid, token, ws_url = _session(url)
        with _open(ws_url) as ws:
            _stream(ws, np.zeros(16000 * 6, dtype=np.float32))  # 6 s at once: 1 s burst + the time it takes
            errors = []
            with pytest.raises(TimeoutError):
                while True:
                    errors.append(json.loads(ws.recv(timeout=1.5)))
            assert {e["error"] for e in errors} == {"rate_limited"}
            # the burst lets 10 of the 60 frames in; after each refusal the server reads nothing more until the
            # audio would be accepted, so about every other later frame is (answered at once: ~50 refusals)
            assert 10 <= len(errors) <= 40
            time.sleep(1.0)  # after a pause the allowance is back
            ws.send(json.dumps({"speaker": "Ana", "text": "hello"}))
            assert json.loads(ws.recv(timeout=30))["type"] in ("prediction", "error")
        assert _transcript(url, sid, token)["utterances"][0]["text"] == "hello"


def test_a_session_moved_to_another_replica_closes_the_audio_connection(text_model, voices, tmp_path, monkeypatch):
    """A spoken utterance whose append another replica refused (the writer key) gets the ``moved`` frame and
    the connection closes with 1012, as a typed one does: the client reconnects to the session's new home."""
    from websockets.exceptions import ConnectionClosed

    from affectkit.serve.store import WriterConflict

    app = create_app(text_model, tmp_path / "s.db", ServeSettings(), embed=embed,
                     audio=AudioSettings(burst_s=1e6, max_utterance_s=4.0))
    with thread_server(app) as url:
        async def taken(_item):
            raise WriterConflict("session s was written by another replica")

        monkeypatch.setattr(app.state.service.batcher, "submit", taken)
        sid, token, ws_url = _session(url)
        with _open(ws_url) as ws:
            _stream(ws, np.concatenate([voices[ANA[0]], np.zeros(16000, np.float32)]))
            frames = _frames(ws, lambda f: any(x.get("error") == "moved" for x in f), timeout=120)
            assert _of(frames, "transcript")  # heard and transcribed; only the model's step was refused
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(timeout=30)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        assert _transcript(url, sid, token)["utterances"] == []  # nothing half-written


def test_never_ending_talk_is_cut(server, voices):
    url, _app = server  # max_utterance_s = 4 s
    sid, token, ws_url = _session(url)
    talk = np.concatenate([voices[ANA[0]], voices[BEN[0]], voices[ANA[1]], voices[BEN[1]]])  # ~8 s, no pause
    with _open(ws_url) as ws:
        _stream(ws, layout([(0.3, talk), (1.0, None)])[0])
        frames = _frames(ws, lambda f: sum(1 for x in f if x["type"] in ("prediction", "transcript")
                                           and x["type"] == "prediction") >= 2 and len(_of(f, "speech_end")) ==
                         len(_of(f, "prediction")))
    ends = _of(frames, "speech_end")
    assert ends[0]["forced"] and ends[0]["end"] - ends[0]["start"] == pytest.approx(4.0, abs=0.01)
    assert any(e.get("error") == "forced_cut" for e in _of(frames, "error"))
    assert len(_transcript(url, sid, token)["utterances"]) == len(_of(frames, "prediction"))


def test_audio_end_finishes_the_utterance_in_progress(server, voices):
    url, _app = server
    sid, token, ws_url = _session(url)
    with _open(ws_url) as ws:
        _stream(ws, np.concatenate([np.zeros(8000, dtype=np.float32), voices[BEN[1]]]))  # no pause at the end
        ws.send(json.dumps({"type": "audio_end"}))
        frames = _frames(ws, lambda f: bool(_of(f, "audio_ended")))
    assert [f["type"] for f in frames][-2:] == ["prediction", "audio_ended"]
    assert word_errors(BEN[1], _of(frames, "prediction")[0]["text"])[0] <= 2
    assert len(_transcript(url, sid, token)["utterances"]) == 1


def test_a_half_spoken_utterance_is_dropped_when_the_connection_goes(server, voices):
    url, _app = server
    sid, token, ws_url = _session(url)
    first = voices[ANA[0]]
    with _open(ws_url) as ws:
        _stream(ws, np.concatenate([np.zeros(8000, dtype=np.float32), first[:len(first) // 2]]))
        assert _of(_frames(ws, lambda f: any(x["type"] == "speech_start" for x in f)), "speech_start")
    # the client (or its network) went mid-sentence: nothing of it reaches the log; the next connection
    # goes on at position 0 with a whole utterance
    with _open(ws_url) as ws:
        _stream(ws, layout([(0.3, voices[ANA[1]]), (1.0, None)])[0])
        (p,) = _of(_frames(ws, lambda f: bool(_of(f, "prediction"))), "prediction")
    assert p["position"] == 0
    t = _transcript(url, sid, token)
    assert len(t["utterances"]) == 1 and word_errors(ANA[1], t["utterances"][0]["text"])[0] <= 2


@pytest.mark.parametrize("modalities", [["audio"], ["text", "audio"]])
def test_an_audio_model_reads_the_prosody(tmp_path, voices, modalities):
    dims = {"text": 8, "audio": 88} if "text" in modalities else {"audio": 88}
    info = {"dims": dims, "n_classes": 4, "label_names": ["hap", "sad", "neu", "ang"], "n_speakers": 2,
            "speakers": ["F", "M"]}
    rng = np.random.default_rng(0)
    norm = Standardiser(rng.normal(size=88), rng.uniform(0.5, 2, size=88))
    info["audio_features"] = norm.to_meta()
    torch.manual_seed(0)
    model = build_model("corect", {**SMALL, "modalities": modalities}, info).eval()
    app = create_app((model, info), tmp_path / "s.db", ServeSettings(), embed=embed,
                     audio=AudioSettings(burst_s=1e6, store_audio=True))
    with thread_server(app) as url:
        sid, token, ws_url = _session(url)
        with _open(ws_url) as ws:
            ready_check = layout([(0.3, voices[ANA[0]]), (1.0, None)])[0]
            _stream(ws, ready_check)
            (p,) = _of(_frames(ws, lambda f: bool(_of(f, "prediction"))), "prediction")
        u = _transcript(url, sid, token)["utterances"][0]
        assert u["text"] == p["text"] and word_errors(ANA[0], u["text"])[0] <= 2  # transcript logged
        assert u["audio"]["audio_bytes"] > 16000  # store_audio keeps the PCM
        (rec,) = app.state.service.store.records(sid)
        np.testing.assert_allclose(rec.features["audio"], norm(np.array(u["audio"]["prosody"])), rtol=1e-4,
                                   atol=1e-4)  # the model read the standardised prosody
        if "text" in modalities:  # ... and the transcript, embedded like typed text
            assert rec.text == p["text"]
            np.testing.assert_allclose(rec.features["text"], embed([p["text"]])[0], atol=1e-6)


def test_a_model_speech_cannot_feed_says_so(tmp_path):
    info = {"dims": {"audio": 100}, "n_classes": 2, "label_names": ["a", "b"], "n_speakers": 2, "speakers": ["F", "M"]}
    model = build_model("corect", {**SMALL, "modalities": ["audio"]}, info).eval()
    with thread_server(create_app((model, info), tmp_path / "s.db")) as url:
        _sid, _token, ws_url = _session(url)
        with _open(ws_url, speaker=None) as ws:
            ws.send(json.dumps(CONFIG))
            e = json.loads(ws.recv(timeout=60))
            assert e["error"] == "unsupported" and "88 eGeMAPS" in e["detail"]


def test_kill_9_mid_utterance_and_resume(tmp_path, voices):
    """SIGKILL while a participant is half-way through a sentence: after the restart the session holds the
    finished utterance only, the file is sound, and the next spoken utterance goes on at the next position."""
    import sqlite3

    from serve_support import ServerProcess

    from affectkit.checkpoint import save_checkpoint
    from affectkit.config import load_config

    info = {"dims": {"audio": 88}, "n_classes": 4, "label_names": ["hap", "sad", "neu", "ang"], "n_speakers": 2,
            "speakers": ["F", "M"], "audio_features": Standardiser(np.zeros(88), np.ones(88)).to_meta()}
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "corect_iemocap4_causal.yaml", ["model.modalities=[audio]", "model.hidden=8",
                                                                        "model.graph_heads=2"])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "audio.pt", cfg, info, build_model(cfg.model_name, cfg.model_params, info))
    store = tmp_path / "s.db"
    server = ServerProcess(tmp_path / "audio.pt", store)
    try:
        sid, token, ws_url = _session(server.url)
        with _open(ws_url) as ws:
            _stream(ws, layout([(0.3, voices[ANA[0]]), (1.0, None)])[0], pace=1.0)
            (p,) = _of(_frames(ws, lambda f: bool(_of(f, "prediction"))), "prediction")
            assert p["position"] == 0
            half = voices[ANA[1]][: len(voices[ANA[1]]) // 2]
            _stream(ws, half, pace=1.0)
            _frames(ws, lambda f: bool(_of(f, "speech_start")))
            server.kill()  # mid-sentence
    finally:
        server.stop()
    assert sqlite3.connect(store).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    server = ServerProcess(tmp_path / "audio.pt", store)
    try:
        ws = _connect(server.url.replace("http://", "ws://") + f"/v1/sessions/{sid}/stream#{token}")
        with ws:
            assert json.loads(ws.recv(timeout=30))["position"] == 1  # the half sentence never became one
            ws.send(json.dumps({**CONFIG, "speaker": "Ana"}))
            assert json.loads(ws.recv(timeout=120))["type"] == "audio_ready"
            _stream(ws, layout([(0.3, voices[BEN[0]]), (1.0, None)])[0], pace=1.0)
            (p,) = _of(_frames(ws, lambda f: bool(_of(f, "prediction"))), "prediction")
            assert p["position"] == 1
        t = _transcript(server.url, sid, token)
    finally:
        server.stop()
    texts = [u["text"] for u in t["utterances"]]
    assert len(texts) == 2 and word_errors(ANA[0], texts[0])[0] <= 2 and word_errors(BEN[0], texts[1])[0] <= 2
