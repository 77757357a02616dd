"""Several replicas on one PostgreSQL log.

- Two writers, forced: a replica that holds a session live while another replica appends to it notices at its
  next append (the primary key refuses the position), lets the session go, tells its client ``moved`` and
  closes with 1012; the client reconnects and the session goes on, rebuilt from the shared log, exactly.
- For real: a throw-away PostgreSQL, two ``affectkit serve`` processes and HAProxy with the sample
  ``examples/haproxy.cfg`` on 127.0.0.1; conversations stream through the balancer; one replica is SIGKILLed
  mid-stream; every acknowledged utterance is in the log once, the sessions resume on the survivor with the
  answers of an uninterrupted run, and the clients saw only a reconnect.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("psycopg")
from fastapi.testclient import TestClient  # noqa: E402
from serve_support import (  # noqa: E402
    INFO,
    ROOT,
    ServerProcess,
    embed,
    small_model,
    train_text_checkpoint,
)
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from affectkit.serve.app import ServeSettings, create_app  # noqa: E402
from affectkit.serve.sessions import Item, SessionPool  # noqa: E402
from affectkit.serve.store import WriterConflict, open_store  # noqa: E402
from affectkit.stream import Stream  # noqa: E402


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, dict]:
    return small_model()


CONVERSATION = [("Ann", "Hello there."), ("Bob", "Oh, hi."), ("Ann", "I got the job!"), ("Ann", "Can you believe it?"),
                ("Bob", "That is wonderful."), ("Bob", "I am so happy for you."), ("Ann", "Thanks."),
                ("Bob", "Let's celebrate."), ("Ann", "Tonight?")]


def _reference(model, conversation) -> list:
    s, names, out = Stream(model, embed=embed), [], []
    for name, text in conversation:
        if name not in names:
            names.append(name)
        out.append(s.push_text(INFO["speakers"][names.index(name)], text))
    return out


def _say(ws, speaker: str, text: str) -> dict:
    ws.send_text(json.dumps({"speaker": speaker, "text": text}))
    return ws.receive_json()


def test_a_pool_lets_go_of_a_session_another_writer_took_and_writes_the_rest(model, postgres_url):
    """Pool level: replica A's batch holds a session B wrote to meanwhile and one nobody else touched; the first
    gets WriterConflict and leaves A's memory, the second is written (second transaction) and answered."""
    want = _reference(model, CONVERSATION)
    a_store, b_store = open_store(postgres_url), open_store(postgres_url)
    a = SessionPool(Stream(model, embed=embed, by_arrival=True), a_store, embed)
    b = SessionPool(Stream(model, embed=embed, by_arrival=True), b_store, embed)
    for sid in ("taken", "mine"):
        a_store.create_session(sid, "tok")
    a.step([Item("taken", n, t, {}) for n, t in CONVERSATION[:2]] + [Item("mine", "Ann", "Hello there.", {})])
    b.step([Item("taken", n, t, {}) for n, t in CONVERSATION[2:4]])  # B rebuilds "taken" from the log, appends
    out = a.step([Item("taken", *CONVERSATION[2], {}), Item("mine", "Bob", "Oh, hi.", {})])
    assert isinstance(out[0], WriterConflict) and out[0].sessions == {"taken"} and "taken" not in a.live
    pred, rec = out[1]
    assert rec.session == "mine" and pred.position == 1 and "mine" in a.live
    assert [r.position for r in a_store.records("mine")] == [0, 1]
    (pred, _), = a.step([Item("taken", *CONVERSATION[4], {})])  # rebuilt from the shared log: goes on exactly
    assert pred.position == 4
    np.testing.assert_allclose(pred.probs, want[4].probs, atol=1e-6)
    assert [r.speaker for r in b_store.records("taken")] == [n for n, _ in CONVERSATION[:5]]
    a_store.close()
    b_store.close()


def test_a_replica_that_lost_a_session_tells_its_client_to_reconnect(model, postgres_url):
    """Two services on one database; the client's session is live on A when B appends to it (forced: the
    client's second connection went to B).  A's next append is refused by the key: the client gets ``moved``
    (that utterance not stored) and close 1012; it reconnects, is told the position, and the conversation goes
    on with the answers of an uninterrupted run.  The log holds every position once."""
    want = _reference(model, CONVERSATION)
    settings = ServeSettings()
    with TestClient(create_app(model, postgres_url, settings, embed=embed)) as a, \
            TestClient(create_app(model, postgres_url, settings, embed=embed)) as b:
        created = a.post("/v1/sessions").json()
        sid, auth = created["id"], {"Authorization": f"Bearer {created['token']}"}
        got: list[dict] = []
        with a.websocket_connect(f"/v1/sessions/{sid}/stream", headers=auth) as on_a:
            assert on_a.receive_json()["position"] == 0
            got += [_say(on_a, *u) for u in CONVERSATION[:3]]
            with b.websocket_connect(f"/v1/sessions/{sid}/stream", headers=auth) as on_b:
                assert on_b.receive_json()["position"] == 3  # B rebuilt it from the shared log
                got += [_say(on_b, *u) for u in CONVERSATION[3:5]]
            moved = _say(on_a, *CONVERSATION[5])
            assert moved["type"] == "error" and moved["error"] == "moved", moved
            with pytest.raises(WebSocketDisconnect) as closed:
                on_a.receive_json()
            assert closed.value.code == 1012
        assert sid not in a.app.state.service.pool.live
        with a.websocket_connect(f"/v1/sessions/{sid}/stream", headers=auth) as on_a:
            assert on_a.receive_json()["position"] == 5  # the refused utterance was not stored: send it again
            got += [_say(on_a, *u) for u in CONVERSATION[5:]]
        assert [g["position"] for g in got] == list(range(len(CONVERSATION)))
        np.testing.assert_allclose([[g["probs"][n] for n in INFO["label_names"]] for g in got],
                                   [w.probs for w in want], atol=1e-6)
        rows = list(a.app.state.service.store.records(sid))
        assert [(r.position, r.speaker, r.text) for r in rows] == [(k, n, t) for k, (n, t) in enumerate(CONVERSATION)]


def test_a_reconnect_to_a_replica_whose_memory_is_stale_is_told_the_true_position(model, postgres_url):
    """The session is live on A; the client moves to B and goes on there; then it comes back to A (the balancer
    sent it there again).  A checks its memory against the shared log at the connect: the ready frame gives the
    log's position (5, not A's 3), and the next utterance is answered, not ``moved``."""
    want = _reference(model, CONVERSATION)
    with TestClient(create_app(model, postgres_url, ServeSettings(), embed=embed)) as a, \
            TestClient(create_app(model, postgres_url, ServeSettings(), embed=embed)) as b:
        created = a.post("/v1/sessions").json()
        sid, auth = created["id"], {"Authorization": f"Bearer {created['token']}"}
        with a.websocket_connect(f"/v1/sessions/{sid}/stream", headers=auth) as on_a:
            on_a.receive_json()
            got = [_say(on_a, *u) for u in CONVERSATION[:3]]
        with b.websocket_connect(f"/v1/sessions/{sid}/stream", headers=auth) as on_b:
            on_b.receive_json()
            got += [_say(on_b, *u) for u in CONVERSATION[3:5]]
        assert sid in a.app.state.service.pool.live  # A still holds it, 2 utterances behind
        with a.websocket_connect(f"/v1/sessions/{sid}/stream", headers=auth) as on_a:
            assert on_a.receive_json()["position"] == 5
            got += [_say(on_a, *u) for u in CONVERSATION[5:]]
        assert [g.get("position") for g in got] == list(range(len(CONVERSATION))), got
        np.testing.assert_allclose([[g["probs"][n] for n in INFO["label_names"]] for g in got],
                                   [w.probs for w in want], atol=1e-6)


# ------------------------------------------------------------------ for real: PostgreSQL, 2 replicas, HAProxy

N_SESSIONS, N_UTT, FEAT = 6, 24, 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return train_text_checkpoint(tmp_path_factory.mktemp("replica_ckpt"), FEAT)


def _conversations() -> list[list[tuple[str, list[float]]]]:
    rng = np.random.default_rng(11)
    return [[(["ana", "ben"][int(rng.random() < 0.5)], rng.standard_normal(FEAT).astype(np.float32).tolist())
             for _ in range(N_UTT)] for _ in range(N_SESSIONS)]


def _uninterrupted(checkpoint, conv) -> list[list[float]]:
    from affectkit.checkpoint import load_model

    model, _cfg, info = load_model(checkpoint)
    s, names, out = Stream((model, info)), [], []
    for name, vec in conv:
        if name not in names:
            names.append(name)
        out.append(list(s.push(info["speakers"][names.index(name)], text=np.asarray(vec, np.float32)).probs))
    return out


class Client:
    """One conversation through the balancer, reconnecting when the connection drops: after a reconnect it
    reads the ready frame's position and sends from there (an utterance committed but not acknowledged before
    the drop is not sent twice).  Records what it saw."""

    def __init__(self, url: str, session: dict, conv: list, stop: threading.Event) -> None:
        self.url = url.replace("http://", "ws://") + f"/v1/sessions/{session['id']}/stream"
        self.auth = {"Authorization": f"Bearer {session['token']}"}
        self.conv, self.stop = conv, stop
        self.acked: dict[int, list[float]] = {}
        self.connects = 0
        self.drops = 0
        self.errors: list[object] = []
        self.readies: list[tuple[int, int]] = []  # (position told, acknowledged so far)
        self.committed_unanswered: list[int] = []  # sent, stored, the connection dropped before the answer
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect

        deadline = time.monotonic() + 90
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                with connect(self.url, open_timeout=10, close_timeout=2, additional_headers=self.auth) as ws:
                    self.connects += 1
                    ready = json.loads(ws.recv(timeout=30))
                    if ready.get("type") != "ready":
                        self.errors.append(ready)
                        return
                    k = ready["position"]
                    self.readies.append((k, len(self.acked) + len(self.committed_unanswered)))
                    self.committed_unanswered += [p for p in range(k) if p not in self.acked
                                                  and p not in self.committed_unanswered]
                    while k < len(self.conv):
                        name, vec = self.conv[k]
                        ws.send(json.dumps({"speaker": name, "features": {"text": vec}, "id": k}))
                        a = json.loads(ws.recv(timeout=30))
                        if a.get("type") != "prediction" or a["position"] != k:
                            self.errors.append(a)
                            return
                        self.acked[k] = list(a["probs"].values())
                        k += 1
                        time.sleep(0.01)
                    return
            except InvalidStatus as exc:  # 502/503 from the balancer while the dead replica is still listed
                if exc.response.status_code not in (502, 503, 504):
                    self.errors.append(f"refused with {exc.response.status_code}")
                    return
                self.drops += 1
                time.sleep(0.2)
            except (ConnectionClosed, OSError, TimeoutError):
                self.drops += 1
                time.sleep(0.2)
            except InvalidHandshake as exc:
                self.errors.append(repr(exc))
                return
        self.errors.append("did not finish in time")


def _held(url: str) -> int:
    import httpx

    return int(httpx.get(url + "/healthz", timeout=10).json()["sessions_live"])


def test_failover_through_haproxy_after_sigkill(checkpoint, postgres_server, tmp_path):
    """The whole scale-out path on localhost, bounded in time, leaving no process behind."""
    import httpx
    import psutil

    from affectkit.serve.throwaway import LocalHAProxy, free_port, haproxy_config, haproxy_missing

    reason = haproxy_missing()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    url = postgres_server.create_database("failover")
    convs = _conversations()
    want = [_uninterrupted(checkpoint, c) for c in convs]
    replicas: list[ServerProcess] = []
    balancer = None
    stop = threading.Event()
    clients: list[Client] = []
    try:
        replicas = [ServerProcess(checkpoint, url, "--threads", "1") for _ in range(2)]
        ports = [int(r.url.rsplit(":", 1)[1]) for r in replicas]
        port = free_port()
        balancer = LocalHAProxy(haproxy_config((ROOT / "examples" / "haproxy.cfg").read_text(), port, ports), port)
        for _ in range(100):  # both replicas pass their health checks
            if all(httpx.get(r.url + "/healthz", timeout=5).status_code == 200 for r in replicas):
                break
            time.sleep(0.1)
        time.sleep(1.2)  # rise 2 x inter 500 ms
        sessions = [httpx.post(balancer.url + "/v1/sessions", timeout=30).json() for _ in convs]
        clients = [Client(balancer.url, s, c, stop) for s, c in zip(sessions, convs)]
        for c in clients:
            c.thread.start()
        while sum(len(c.acked) for c in clients) < N_SESSIONS * N_UTT // 3:
            time.sleep(0.005)
        held = [_held(r.url) for r in replicas]
        assert all(held), f"the balancer did not spread the sessions: {held}"
        victim = replicas[0]
        victim.kill()  # SIGKILL, utterances in flight
        for c in clients:
            c.thread.join(90)
        assert not any(c.thread.is_alive() for c in clients), "a client did not finish"
        affected = [c for c in clients if c.drops or c.connects > 1]
        assert len(affected) == held[0], "every session of the dead replica reconnected, no other one"
        for c in clients:
            assert c.errors == [], c.errors  # a reconnect is all a client saw
            assert sorted([*c.acked, *c.committed_unanswered]) == list(range(N_UTT))
            for told, had in c.readies:  # told where to go on: what it had, or one more committed unanswered
                assert told in (had, had + 1)
        survivor = replicas[1]
        assert _held(survivor.url) == N_SESSIONS  # every session lives on the survivor now
    finally:
        stop.set()
        for c in clients:
            c.thread.join(30)
        if balancer is not None:
            balancer.stop()
        for r in replicas:
            r.stop()
    store = open_store(url)
    try:
        for s, c, w, conv in zip(sessions, clients, want, convs):
            rows = list(store.records(s["id"]))
            assert [r.position for r in rows] == list(range(N_UTT))  # every utterance once, no gap
            for r, (name, vec) in zip(rows, conv):
                assert r.speaker == name and np.array_equal(r.features["text"], np.asarray(vec, np.float32))
            np.testing.assert_allclose([list(r.probs) for r in rows], w, atol=1e-5)  # = an uninterrupted run
            np.testing.assert_allclose([c.acked[k] for k in sorted(c.acked)], [w[k] for k in sorted(c.acked)],
                                       atol=1e-5)  # what each client was told
    finally:
        store.close()
    pids = [r.proc.pid for r in replicas] + ([balancer.proc.pid] if balancer else [])
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert time.monotonic() - started < 120


def test_a_bad_store_url_is_one_line_before_anything_listens(checkpoint):
    """``affectkit serve --store`` with an unreachable server or an unknown scheme: one line, exit 2, no socket."""
    import os
    import subprocess
    import sys

    from affectkit.serve.throwaway import free_port

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    for store, says in ((f"postgresql://u:secret@127.0.0.1:{free_port()}/db", "cannot use this PostgreSQL database"),
                        ("mysql://u@127.0.0.1/db", "unknown kind of store")):
        out = subprocess.run([sys.executable, "-m", "affectkit.cli", "serve", str(checkpoint), "--port", str(port),
                              "--store", store], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2 and out.stdout == "", (out.stdout, out.stderr[-500:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and says in lines[0] and "secret" not in lines[0], lines
