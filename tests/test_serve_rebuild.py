"""Sessions coming back after a restart: rebuilt from the log by prefill in the batcher's rebuild lane,
which never holds live utterances behind it, is bounded (``overloaded`` beyond), and drops the rebuild of
a client that left; the rebuilt sessions continue exactly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402
from test_serve import DIM, INFO, SMALL, _reference, embed  # noqa: E402

from affectkit.models import build_model  # noqa: E402
from affectkit.serve.app import ServeSettings, create_app  # noqa: E402
from affectkit.serve.batcher import Batcher, Overloaded  # noqa: E402
from affectkit.serve.service import identity_of  # noqa: E402
from affectkit.serve.sessions import Item, SessionPool  # noqa: E402
from affectkit.serve.store import Store  # noqa: E402
from affectkit.stream import Stream  # noqa: E402

NAMES = ("Ann", "Bob")


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, dict]:
    """The service tests' text model with a window (context 3), so a rebuild computes only the log's tail."""
    torch.manual_seed(0)
    return build_model("corect", {**SMALL, "context": 3}, INFO).eval(), INFO


def _conversation(n: int, tag: str = "") -> list[tuple[str, str]]:
    return [(NAMES[(k * 7 // 3) % 2], f"utterance {k} of {tag}") for k in range(n)]


def _stored(path: Path, model, sessions: int, n: int) -> list[tuple[str, str]]:
    """A store file holding ``sessions`` sessions of ``n`` answered utterances each (a service that ran,
    then stopped); returns their (id, token)."""
    store = Store(path)
    pool = SessionPool(Stream(model, embed=embed, by_arrival=True), store, embed)
    ids = [(f"session-{k:03d}", f"token-{k}") for k in range(sessions)]
    identity = identity_of(model, embed)
    store.register_model(identity)
    for sid, tok in ids:
        store.create_session(sid, tok, identity["hash"])
    items = [Item(sid, name, text, {}) for sid, _ in ids for name, text in _conversation(n, sid)]
    assert all(isinstance(r, tuple) for r in pool.step(items))
    store.close()
    return ids


def _connect(c: TestClient, stack: contextlib.ExitStack, sid: str, tok: str):
    return stack.enter_context(c.websocket_connect(f"/v1/sessions/{sid}/stream",
                                                   headers={"Authorization": f"Bearer {tok}"}))


def _wait_for(condition, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------- the lane


def test_live_items_wait_behind_at_most_one_piece_of_background_work():
    """Jobs run one piece between live batches: every live item is answered after at most one piece
    begun after it was submitted, while the jobs (two requests each) still all finish, in order."""
    log: list[tuple[str, object]] = []
    lock = threading.Lock()

    def note(*entry) -> None:
        with lock:
            log.append(entry)

    def jobs(requests, alive):
        for name in requests:
            for k in range(6):
                note("piece", (name, k))
                time.sleep(0.004)
                yield
        return [f"{name} done" for name in requests]

    def live(items):
        note("batch", tuple(items))
        return items

    async def main():
        b = Batcher(live, max_batch=4, max_wait_ms=0, jobs=jobs, max_jobs=8, max_job_batch=2)
        b.start()
        requests = [b.submit_job(f"j{k}") for k in range(3)]
        answers = []
        for x in range(10):  # a steady live load while the jobs run
            note("submit", x)
            answers.append(await b.submit(x))
        done = await asyncio.gather(*requests)
        await b.stop()
        return answers, done

    answers, done = asyncio.run(main())
    assert answers == list(range(10)) and done == ["j0 done", "j1 done", "j2 done"]
    pieces = [e[1] for e in log if e[0] == "piece"]
    assert pieces == [(f"j{j}", k) for j in range(3) for k in range(6)]  # first come, first served
    for x in range(10):
        after = log[log.index(("submit", x)):log.index(("batch", (x,)))]
        assert sum(e[0] == "piece" for e in after) <= 1, after


def test_the_lane_is_bounded_and_drops_requests_whose_caller_left():
    ran: list[str] = []
    closed: list[str] = []
    skipped: list[str] = []
    gate = threading.Event()

    def jobs(requests, alive):
        try:
            for i, name in enumerate(requests):
                if not alive(i):
                    skipped.append(name)
                    continue
                ran.append(name)
                gate.wait(5)
                yield
            return [f"{name} done" for name in requests]
        finally:
            closed.append("+".join(requests))

    async def main():
        b = Batcher(lambda items: items, jobs=jobs, max_jobs=2, max_job_batch=1)
        b.start()
        first = b.submit_job("first")
        await asyncio.sleep(0.05)  # the first piece of "first" holds the worker
        second = b.submit_job("second")
        with pytest.raises(Overloaded, match="too many rebuilds waiting \\(2\\)"):
            b.submit_job("third", "rebuilds")
        first.cancel()  # both callers go away: "first" mid-way, "second" before its job began
        second.cancel()
        gate.set()
        while b.jobs_waiting:
            await asyncio.sleep(0.01)
        dropped = b.jobs_dropped
        b.max_jobs = b.max_job_batch = 3  # a job of three requests whose middle caller leaves before its turn
        gate.clear()
        group = [b.submit_job(name) for name in ("a", "b", "c")]
        while "a" not in ran:
            await asyncio.sleep(0.01)
        group[1].cancel()
        gate.set()
        out = await asyncio.gather(group[0], group[2])
        await b.stop()
        return dropped, out

    dropped, out = asyncio.run(main())
    assert dropped == 2 and ran == ["first", "a", "c"] and skipped == ["b"]
    assert closed == ["first", "a+b+c"] and out == ["a done", "c done"]


def test_a_group_rebuild_goes_live_at_once_and_never_replaces_a_stepped_session(model, tmp_path):
    ids = [sid for sid, _ in _stored(tmp_path / "log.db", model, 3, 10)]
    store = Store(tmp_path / "log.db")
    pool = SessionPool(Stream(model, embed=embed, by_arrival=True), store, embed)
    job = pool.rebuild([ids[0], ids[1], ids[2], ids[0]])
    for _ in range(4):  # three logs read, then the first prefill
        next(job)
    assert not pool.live  # nobody is live before all are rebuilt
    # meanwhile a live utterance for ids[1]: rebuilt at once and stepped (position 10 appended)
    (pred, _), = pool.step([Item(ids[1], "Ann", "meanwhile", {})])
    assert pred.position == 10 and list(pool.live) == [ids[1]]
    with pytest.raises(StopIteration) as end:
        while True:
            next(job)
    assert end.value.value == [(10, ["Ann", "Bob"]), (11, ["Ann", "Bob"]), (10, ["Ann", "Bob"]),
                               (10, ["Ann", "Bob"])]
    assert pool.rebuilt == 3 and len(pool.live[ids[1]].stream) == 11  # the stepped state was kept
    np.testing.assert_allclose(pool.step([Item(ids[0], "Bob", "next", {})])[0][0].probs,
                               _reference(model, [*_conversation(10, ids[0]), ("Bob", "next")])[10].probs, atol=1e-5)


# ---------------------------------------------------------------------------------------- the service


def test_sessions_rebuilt_after_a_restart_continue_exactly(model, tmp_path):
    """A log longer than twice the window: the rebuilt session (prefill of its tail, in the lane) answers
    the next utterances as a session that never stopped."""
    conversation = _conversation(40, "session-000")
    want = _reference(model, conversation)
    (sid, tok), = _stored(tmp_path / "log.db", model, 1, 34)
    with TestClient(create_app(model, tmp_path / "log.db", ServeSettings(), embed=embed)) as c:
        with c.websocket_connect(f"/v1/sessions/{sid}/stream", headers={"Authorization": f"Bearer {tok}"}) as ws:
            ready = ws.receive_json()
            assert ready["position"] == 34 and ready["speakers"] == ["Ann", "Bob"]
            for k in range(34, 40):
                name, text = conversation[k]
                ws.send_text(json.dumps({"speaker": name, "text": text}))
                a = ws.receive_json()
                assert a["position"] == k
                np.testing.assert_allclose([a["probs"][n] for n in INFO["label_names"]], want[k].probs, atol=1e-5)
        assert c.app.state.service.pool.rebuilt == 1


def _gated_service(model, path: Path, **settings):
    """An app whose rebuild pieces can be held (``gate``) and whose worker's work is logged in order."""
    gate = threading.Event()
    gate.set()
    log: list[tuple[str, object]] = []
    app = create_app(model, path, ServeSettings(**settings), embed=embed)

    def instrument(svc) -> None:
        jobs, step, submit = svc.batcher.job_fn, svc.batcher.fn, svc.batcher.submit

        def logged_jobs(session_ids, alive):
            inner = jobs(session_ids, alive)
            try:
                while True:
                    log.append(("piece", tuple(session_ids)))
                    gate.wait(10)
                    next(inner)
                    yield
            except StopIteration as stop:
                return stop.value
            finally:
                inner.close()

        def logged_step(items):
            log.append(("batch", tuple(i.session for i in items)))
            return step(items)

        async def logged_submit(item):
            log.append(("submit", item.session))
            return await submit(item)

        svc.batcher.job_fn, svc.batcher.fn, svc.batcher.submit = logged_jobs, logged_step, logged_submit

    return app, gate, log, instrument


def test_a_reconnect_storm_never_holds_a_live_session_behind_it(model, tmp_path):
    """Eight sessions reconnect at once; a live session's utterance sent meanwhile runs after at most one
    rebuild piece, and every returning session then answers."""
    ids = _stored(tmp_path / "log.db", model, 8, 12)
    app, gate, log, instrument = _gated_service(model, tmp_path / "log.db")
    with TestClient(app) as c, contextlib.ExitStack() as stack:
        svc = c.app.state.service
        instrument(svc)
        fresh = c.post("/v1/sessions").json()
        live = _connect(c, stack, fresh["id"], fresh["token"])
        assert live.receive_json()["type"] == "ready"
        gate.clear()  # the first rebuild piece will hold the worker until the storm is queued
        sockets = [_connect(c, stack, sid, tok) for sid, tok in ids]
        _wait_for(lambda: svc.batcher.jobs_waiting == 8, "eight rebuilds in the lane")
        live.send_text(json.dumps({"speaker": "Zoe", "text": "still there?"}))
        _wait_for(lambda: ("submit", fresh["id"]) in log, "the live utterance")
        gate.set()
        assert live.receive_json()["type"] == "prediction"
        for ws in sockets:
            ready = ws.receive_json()
            assert ready["type"] == "ready" and ready["position"] == 12
            ws.send_text(json.dumps({"speaker": "Ann", "text": "back"}))
            assert ws.receive_json()["position"] == 12
    between = log[log.index(("submit", fresh["id"])):log.index(("batch", (fresh["id"],)))]
    assert sum(e[0] == "piece" for e in between) <= 1, between
    assert sum(e[0] == "piece" for e in log) >= 16  # each rebuild: read the log, then its prefill
    assert svc.pool.rebuilt == 8 + 1  # and the fresh session, opened from its empty log


def test_a_storm_beyond_the_bound_is_told_overloaded_and_a_left_client_drops_its_rebuild(model, tmp_path):
    ids = _stored(tmp_path / "log.db", model, 3, 5)
    app, gate, log, instrument = _gated_service(model, tmp_path / "log.db", max_rebuilds=2)
    with TestClient(app) as c, contextlib.ExitStack() as stack:
        svc = c.app.state.service
        instrument(svc)
        gate.clear()
        first = _connect(c, stack, *ids[0])
        _wait_for(lambda: ("piece", (ids[0][0],)) in log, "the first rebuild to start")
        with c.websocket_connect(f"/v1/sessions/{ids[1][0]}/stream", headers={"Authorization": f"Bearer {ids[1][1]}"}):
            _wait_for(lambda: svc.batcher.jobs_waiting == 2, "two rebuilds in the lane")
            refused = _connect(c, stack, *ids[2])
            assert refused.receive_json()["error"] == "overloaded"
            with pytest.raises(WebSocketDisconnect) as closed:
                refused.receive_json()
            assert closed.value.code == 1013
        # the second client left before its session was ready: its rebuild is dropped, never run
        _wait_for(lambda: ids[1][0] not in svc.connections, "the handler of the client that left to end")
        # a session created now opens though the lane is full: its log is empty, it needs no rebuild
        position = svc.pool.position
        svc.pool.position = lambda sid: log.append(("open", sid)) or position(sid)
        new = c.post("/v1/sessions").json()
        late = _connect(c, stack, new["id"], new["token"])
        gate.set()
        ready = late.receive_json()
        assert ready["type"] == "ready" and ready["position"] == 0 and ("open", new["id"]) in log
        assert not any(new["id"] in e[1] for e in log if e[0] == "piece")  # never in the rebuild lane
        assert first.receive_json()["position"] == 5
        _wait_for(lambda: svc.batcher.jobs_waiting == 0, "the lane to empty")
        assert svc.batcher.jobs_dropped == 1
        assert not any(ids[1][0] in e[1] for e in log) and set(svc.pool.live) == {ids[0][0], new["id"]}
        metrics = c.get("/metrics").text
        assert 'affectkit_errors_total{kind="overloaded"} 1.0' in metrics
        assert "affectkit_rebuilds_dropped 1.0" in metrics and "affectkit_rebuilds_waiting 0.0" in metrics


def test_a_wave_of_sessions_is_stepped_in_one_forward_and_a_bad_item_fails_alone(model, monkeypatch):
    """The sessions of one live batch (e.g. sessions just rebuilt together) step in one batched forward,
    with the answers each would get alone; a bad utterance gets its own error, the others their answers."""
    import affectkit.serve.sessions as sessions_mod

    calls: list[int] = []
    real = sessions_mod.push_batch
    monkeypatch.setattr(sessions_mod, "push_batch", lambda ss, us: calls.append(len(ss)) or real(ss, us))
    store = Store(":memory:")
    pool = SessionPool(Stream(model, embed=embed, by_arrival=True), store, embed)
    for k in range(3):
        store.create_session(f"wave-{k}", "tok")
    talk = [Item(f"wave-{k}", name, text, {}) for k in range(3) for name, text in _conversation(5, f"wave-{k}")]
    out = pool.step(talk)
    assert calls and max(calls) == 3
    for k in range(3):
        want = _reference(model, _conversation(5, f"wave-{k}"))
        got = [o[0] for o in out[5 * k:5 * k + 5]]
        np.testing.assert_allclose([g.probs for g in got], [w.probs for w in want], atol=1e-5)
    bad = Item("wave-1", "Ann", None, {"text": np.zeros(DIM + 1, np.float32)})
    out = pool.step([Item("wave-0", "Ann", "fine", {}), bad, Item("wave-2", "Bob", "also fine", {})])
    assert isinstance(out[1], Exception) and "shape" in str(out[1])
    assert [o[0].position for o in (out[0], out[2])] == [5, 5] and len(pool.live["wave-1"].stream) == 5
