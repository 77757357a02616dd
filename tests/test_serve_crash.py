"""Kill -9 under load, restart on the same store: every answered utterance is there, the file is sound,
and each session resumes exactly where a run that never stopped would be."""

from __future__ import annotations

import json
import sqlite3
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("websockets")
from serve_support import ServerProcess, train_text_checkpoint  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from affectkit.checkpoint import load_model  # noqa: E402
from affectkit.stream import Stream  # noqa: E402

DIM = 16
N_SESSIONS, N_UTT = 4, 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_text_checkpoint(tmp_path_factory.mktemp("crash_ckpt"), DIM)


def _conversations() -> list[list[tuple[str, list[float]]]]:
    rng = np.random.default_rng(7)
    return [[(["ana", "ben"][int(rng.random() < 0.5)], rng.standard_normal(DIM).astype(np.float32).tolist())
             for _ in range(N_UTT)] for _ in range(N_SESSIONS)]


def _reference(checkpoint, conv) -> list[tuple[float, ...]]:
    model, _cfg, info = load_model(checkpoint)
    s, names, out = Stream((model, info)), [], []
    for name, vec in conv:
        if name not in names:
            names.append(name)
        out.append(s.push(info["speakers"][names.index(name)], text=np.asarray(vec, np.float32)).probs)
    return out


def _post(url: str) -> dict:
    import httpx

    return httpx.post(url + "/v1/sessions", timeout=30).json()


def _drive(ws_url: str, conv, start: int, answered: list, stop_after: int | None = None) -> None:
    try:
        url, token = ws_url.split("#")  # the token goes in a header, never in the URL
        with connect(url, open_timeout=30, close_timeout=2,
                     additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            ready = json.loads(ws.recv(timeout=30))
            assert ready["position"] == start
            for k in range(start, len(conv) if stop_after is None else min(len(conv), stop_after)):
                name, vec = conv[k]
                ws.send(json.dumps({"speaker": name, "features": {"text": vec}, "id": k}))
                a = json.loads(ws.recv(timeout=30))
                assert a["type"] == "prediction" and a["position"] == k == a["id"], a
                answered.append(a)
    except (ConnectionClosed, ConnectionError, TimeoutError, OSError):
        pass  # the server was killed under us


def test_kill_9_under_load_then_resume_exactly(checkpoint, tmp_path):
    store = tmp_path / "sessions.db"
    convs = _conversations()
    want = [_reference(checkpoint, c) for c in convs]
    answered: list[list[dict]] = [[] for _ in convs]
    server = ServerProcess(checkpoint, store)
    try:
        sessions = [_post(server.url) for _ in convs]
        ws_base = server.url.replace("http://", "ws://")
        urls = [f"{ws_base}/v1/sessions/{s['id']}/stream#{s['token']}" for s in sessions]
        threads = [threading.Thread(target=_drive, args=(u, c, 0, a), daemon=True)
                   for u, c, a in zip(urls, convs, answered)]
        for t in threads:
            t.start()
        while sum(map(len, answered)) < N_SESSIONS * N_UTT // 3 and any(t.is_alive() for t in threads):
            threading.Event().wait(0.005)
        server.kill()  # SIGKILL mid-conversation, with utterances in flight
        for t in threads:
            t.join(30)
    finally:
        server.stop()
    done = sum(map(len, answered))
    assert N_SESSIONS <= done < N_SESSIONS * N_UTT, "the kill did not land mid-run"

    db = sqlite3.connect(store)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    for s, got in zip(sessions, answered):
        rows = dict(db.execute("SELECT position, probs FROM utterances WHERE session = ?", (s["id"],)).fetchall())
        for a in got:  # every answered utterance is in the log, with the answer it got
            assert a["position"] in rows
            np.testing.assert_allclose(json.loads(rows[a["position"]]), list(a["probs"].values()), atol=1e-6)
        assert sorted(rows) == list(range(len(rows)))  # no gaps
    db.close()

    server = ServerProcess(checkpoint, store)
    try:
        ws_base = server.url.replace("http://", "ws://")
        a, b = sessions[:2]  # over the real server too: another session's token is refused with 403
        with pytest.raises(InvalidStatus) as denied:
            connect(f"{ws_base}/v1/sessions/{a['id']}/stream", open_timeout=30,
                    additional_headers={"Authorization": f"Bearer {b['token']}"})
        assert denied.value.response.status_code == 403
        for s, conv, w in zip(sessions, convs, want):
            import httpx

            t = httpx.get(f"{server.url}/v1/sessions/{s['id']}", headers={"Authorization": f"Bearer {s['token']}"},
                          timeout=30).json()
            stored = len(t["utterances"])
            rest: list[dict] = []
            _drive(f"{ws_base}/v1/sessions/{s['id']}/stream#{s['token']}", conv, stored, rest)
            assert [a["position"] for a in rest] == list(range(stored, N_UTT))
            got = [list(u["probs"].values()) for u in t["utterances"]] + [list(a["probs"].values()) for a in rest]
            np.testing.assert_allclose(got, w, atol=1e-5)
    finally:
        server.stop()
    assert server.proc.poll() is not None
