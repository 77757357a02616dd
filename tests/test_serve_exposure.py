"""The service, safe to expose (issue 20): settings checked before listening, nothing crashes a connection,
races with a delete, the model's identity in the log, abuse limits, retention, hosts, origins and tokens."""

from __future__ import annotations

import json
import logging
import sqlite3
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from serve_support import DIM, INFO, SMALL  # noqa: E402
from starlette.testclient import WebSocketDenialResponse  # noqa: E402
from starlette.websockets import WebSocketDisconnect  # noqa: E402

from affectkit.errors import ConfigError  # noqa: E402
from affectkit.models import build_model  # noqa: E402
from affectkit.serve.app import ServeSettings, create_app  # noqa: E402
from affectkit.serve.run import settings_for  # noqa: E402
from affectkit.serve.sessions import Item, SessionPool  # noqa: E402
from affectkit.serve.store import Record, Store  # noqa: E402
from affectkit.stream import Stream  # noqa: E402

KEY = "operator-key-0123456789"


def embed(sentences: list[str]) -> np.ndarray:
    from serve_support import fake_embed

    return fake_embed(sentences, DIM)


def _model(seed: int = 0) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    return build_model("corect", SMALL, INFO).eval(), INFO


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, dict]:
    return _model(0)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _client(model, store=":memory:", **kw) -> TestClient:
    return TestClient(create_app(model, store, ServeSettings(**kw), embed=embed))


def _open(c: TestClient, **headers: str) -> tuple[str, str]:
    r = c.post("/v1/sessions", headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["token"]


def _say(ws, speaker: str, text: str) -> dict:
    ws.send_text(json.dumps({"speaker": speaker, "text": text}))
    return ws.receive_json()


def _ws(c: TestClient, sid: str, tok: str, **kw):
    return c.websocket_connect(f"/v1/sessions/{sid}/stream", headers=_auth(tok), **kw)


# ---------------------------------------------------------------------------------------- settings


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model):
    from affectkit.checkpoint import save_checkpoint
    from affectkit.config import config_from_dict

    path = tmp_path_factory.mktemp("ckpt") / "causal.pt"
    cfg = config_from_dict({"name": "x", "data": {"task": "conversation"}, "model": {"name": "corect", **SMALL}})
    save_checkpoint(path, cfg, INFO, model[0])
    return path


@pytest.mark.parametrize("args, says", [
    (["--max-batch", "0"], "--max-batch must be a whole number >= 1, got 0"),
    (["--port", "70000"], "--port must be 0-65535, got 70000"),
    (["--batch-wait-ms", "-1"], "--batch-wait-ms must be >= 0"),
    (["--max-queue", "0"], "--max-queue must be"),
    (["--rate", "0"], "--rate must be > 0"),
    (["--retain", "0"], "--retain must be a number of days > 0"),
    (["--refusal-delay", "-1"], "--refusal-delay must be >= 0"),
    (["--max-store-mb", "nan"], "--max-store-mb must be a finite number"),
    (["--host", "0.0.0.0"], "set an operator key"),
    (["--api-key", "short"], "--api-key must be at least 16 characters"),
    (["--ssl-certfile", "cert.pem"], "--ssl-certfile and --ssl-keyfile go together"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--pause-ms", "5"], "pause"),
])
def test_every_bad_setting_is_one_line_before_listening(checkpoint, tmp_path, capsys, args, says):
    from affectkit.cli import main

    assert main(["serve", str(checkpoint), "--store", str(tmp_path / "s.db"), *args]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("affectkit: error:") and says in err and len(err.strip().splitlines()) == 1, err
    assert "serving on" not in out


def test_tls_files_reach_uvicorn_and_a_bad_pair_is_one_line(checkpoint, tmp_path, capsys):
    from affectkit.cli import main

    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    assert main(["serve", str(checkpoint), "--port", "0", "--store", str(tmp_path / "s.db"), "--ssl-certfile",
                 str(tmp_path / "cert.pem"), "--ssl-keyfile", str(tmp_path / "key.pem")]) == 2
    out, err = capsys.readouterr()
    assert "TLS: cannot use --ssl-certfile/--ssl-keyfile" in err and len(err.strip().splitlines()) == 1
    assert "serving on" not in out


def test_a_failed_startup_exits_non_zero_and_never_says_serving(checkpoint, tmp_path, capsys, monkeypatch):
    import affectkit.serve.app as app_mod
    from affectkit.cli import main

    def broken(*a, **k):
        raise RuntimeError("the model could not be moved")

    monkeypatch.setattr(app_mod, "Service", broken)
    assert main(["serve", str(checkpoint), "--port", "0", "--store", str(tmp_path / "s.db")]) == 2
    out, err = capsys.readouterr()
    assert "serving on" not in out and "did not start" in err


def test_beyond_localhost_needs_a_key_from_the_flag_or_the_environment(monkeypatch):
    with pytest.raises(ConfigError, match="reachable from other machines"):
        settings_for("0.0.0.0", {})
    monkeypatch.setenv("AFFECTKIT_API_KEY", KEY)
    s = settings_for("0.0.0.0", {})
    assert s.api_key == KEY and "localhost" in s.allowed_hosts
    assert settings_for("127.0.0.1", {"api_key": None}).allowed_hosts is not None  # loopback: hosts still checked


# ---------------------------------------------------------------------------------------- nothing crashes


def test_a_huge_json_integer_is_an_error_frame_not_a_crash(model):
    with _client(model) as c:
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            huge = "1" + "0" * 400  # a JSON integer: pydantic's StrictInt takes it, float64 cannot
            ws.send_text('{"speaker": "Ann", "features": {"text": [' + huge + ', 0, 0, 0, 0, 0, 0, 0]}}')
            a = ws.receive_json()
            assert (a["type"], a["error"]) == ("error", "invalid") and "too large" in a["detail"]
            assert _say(ws, "Ann", "still here")["position"] == 0


def test_an_unexpected_exception_is_an_internal_frame_and_the_session_goes_on(model, monkeypatch, caplog):
    import affectkit.serve.protocol as protocol

    real, calls = protocol.check_features, []

    def flaky(s, utt):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")
        return real(s, utt)

    monkeypatch.setattr(protocol, "check_features", flaky)
    with _client(model) as c, caplog.at_level(logging.ERROR):
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            a = _say(ws, "Ann", "first")
            assert (a["type"], a["error"]) == ("error", "internal") and "a bug" not in a["detail"]
            assert _say(ws, "Ann", "second")["position"] == 0
        assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)
        assert 'affectkit_errors_total{kind="internal"} 1.0' in c.get("/metrics").text


def test_a_delete_racing_a_read_or_a_stream(model, monkeypatch):
    with _client(model) as c:
        svc = c.app.state.service
        sid, tok = _open(c)
        real = svc.store.transcript

        def deleted_meanwhile(session_id):  # the session goes between the token check and the read
            svc.store.delete_session(session_id)
            return real(session_id)

        monkeypatch.setattr(svc.store, "transcript", deleted_meanwhile)
        assert c.get(f"/v1/sessions/{sid}", headers=_auth(tok)).status_code == 404
        monkeypatch.undo()

        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:  # a delete while a stream is open: closed with 1000, never a 500
            ws.receive_json()
            _say(ws, "Ann", "hello")
            assert c.delete(f"/v1/sessions/{sid}", headers=_auth(tok)).status_code == 204
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1000
        assert c.get(f"/v1/sessions/{sid}", headers=_auth(tok)).status_code == 404

        # deleted behind this process's back (another replica, or between the upgrade's token check and the
        # session's opening): the upgrade passes on the cached row, the opening finds no session: 1008
        sid, tok = _open(c)
        assert sid in svc.rows
        svc.store.delete_session(sid)
        with _ws(c, sid, tok) as ws:
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1008
        assert c.get("/healthz").status_code == 200


# ---------------------------------------------------------------------------------------- model identity


def test_a_session_is_continued_only_by_the_model_that_logged_it(model, tmp_path, caplog):
    store = tmp_path / "log.db"
    with _client(model, store) as c:
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            first = _say(ws, "Ann", "hello")
    retrained = _model(seed=1)  # same dims, other weights: would silently answer differently
    with caplog.at_level(logging.WARNING), _client(retrained, store) as c:
        assert any("1 session(s)" in r.getMessage() and "another model" in r.getMessage() for r in caplog.records)
        with _ws(c, sid, tok) as ws:
            a = ws.receive_json()
            assert (a["type"], a["error"]) == ("error", "other_model") and "serve that checkpoint" in a["detail"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1008
        t = c.get(f"/v1/sessions/{sid}", headers=_auth(tok)).json()  # the transcript stays readable
        assert t["utterances"][0]["label"] == first["label"] and t["model"] != c.get("/healthz").json()["model"]
        sid2, tok2 = _open(c)  # and the new model's sessions work
        with _ws(c, sid2, tok2) as ws:
            assert ws.receive_json()["type"] == "ready"
    with _client(model, store) as c:  # the first model again: the session goes on
        with _ws(c, sid, tok) as ws:
            assert ws.receive_json()["position"] == 1
    db = sqlite3.connect(store)
    assert db.execute("SELECT count(*) FROM models").fetchone()[0] == 2
    (dims, labels, enc), = db.execute("SELECT dims, labels, text_encoder FROM models LIMIT 1").fetchall()
    assert json.loads(dims) == {"text": DIM} and json.loads(labels) == INFO["label_names"] and enc


def test_a_log_whose_labels_are_not_the_models_is_refused(model):
    store = Store(":memory:")
    pool = SessionPool(Stream(model, embed=embed, by_arrival=True), store, embed, model="m1")
    store.create_session("session-1", "tok", "m1")
    store.append([Record("session-1", 0, "Ann", None, {"text": np.zeros(DIM, np.float32)}, "joy",
                         [0.1, 0.2, 0.3, 0.4])])
    (out,) = pool.step([Item("session-1", "Ann", "hi", {})])
    assert "label 'joy'" in str(out) and "does not belong to this model" in str(out)
    store.create_session("legacy-1", "tok", None)  # logged before sessions recorded their model
    (out,) = pool.step([Item("legacy-1", "Ann", "hi", {})])
    assert "before the log recorded its model" in str(out)


def test_a_replay_that_does_not_give_the_logged_answer_is_an_error(model, tmp_path):
    """The prefill recomputes the log's last answer; a log whose answer differs (other weights under the same
    identity, or a log edited by hand) is refused on connect, never continued silently."""
    store = tmp_path / "log.db"
    with _client(model, store) as c:
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            said = [_say(ws, name, text) for name, text in (("Ann", "hello"), ("Bob", "hi"), ("Ann", "bye"))]
    with _client(model, store) as c:  # untouched: it goes on
        with _ws(c, sid, tok) as ws:
            assert ws.receive_json()["position"] == 3
    other = next(n for n in INFO["label_names"] if n != said[-1]["label"])
    db = sqlite3.connect(store)
    db.execute("UPDATE utterances SET label = ? WHERE session = ? AND position = 2", (other, sid))
    db.commit()
    db.close()
    with _client(model, store) as c:
        with _ws(c, sid, tok) as ws:
            a = ws.receive_json()
            assert (a["type"], a["error"]) == ("error", "other_model") and "replaying its log gives" in a["detail"]
        assert sid not in c.app.state.service.pool.live


# ---------------------------------------------------------------------------------------- engine batching


def test_engine_batching_equals_pushing_each_session(model, monkeypatch):
    """One batch of utterances of different sessions: with engine batching the wave is one push_batch call,
    without it one push per session; the answers are the same (within 1e-5)."""
    import affectkit.serve.sessions as sessions_mod

    calls: list[int] = []
    real = sessions_mod.push_batch
    monkeypatch.setattr(sessions_mod, "push_batch", lambda ss, us: calls.append(len(ss)) or real(ss, us))
    talk = [(f"s-{k:06d}", name, f"{name} says {k}.{j}") for j in range(3) for k in range(4)
            for name in (("Ann", "Bob")[j % 2],)]
    out = {}
    for engine_batch in (True, False):
        store = Store(":memory:")
        pool = SessionPool(Stream(model, embed=embed, by_arrival=True), store, embed, engine_batch=engine_batch)
        for k in range(4):
            store.create_session(f"s-{k:06d}", "tok")
        calls.clear()
        got = []
        for j in range(3):  # three live batches of four sessions each
            got += pool.step([Item(sid, name, text, {}) for sid, name, text in talk[4 * j:4 * j + 4]])
        out[engine_batch] = [g[0].probs for g in got]
        assert (max(calls) if calls else 1) == (4 if engine_batch else 1)
    np.testing.assert_allclose(out[True], out[False], atol=1e-5)


# ---------------------------------------------------------------------------------------- abuse limits


def test_creating_sessions_needs_the_key_and_is_limited(model):
    with _client(model, api_key=KEY, create_per_min=60, create_burst=3, max_sessions=4) as c:
        r = c.post("/v1/sessions")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert c.post("/v1/sessions", headers={"X-API-Key": "wrong-key-0123456789"}).status_code == 401
        _open(c, **{"X-API-Key": KEY})
        _open(c, Authorization=f"Bearer {KEY}")
        _open(c, **{"X-API-Key": KEY})
        r = c.post("/v1/sessions", headers={"X-API-Key": KEY})  # the fourth in a burst of three
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 2
        time.sleep(1.05)
        _open(c, **{"X-API-Key": KEY})  # one more a second later (60 per minute)
        svc = c.app.state.service
        svc.creations.forget("testclient")
        r = c.post("/v1/sessions", headers={"X-API-Key": KEY})  # four exist: the cap
        assert r.status_code == 429 and "4 sessions exist" in r.json()["detail"] and r.headers["Retry-After"]
        assert svc.store.count_sessions() == 4
        assert 'affectkit_errors_total{kind="too_many_sessions"} 1.0' in c.get("/metrics").text


def test_caps_on_a_session_and_on_the_store_write_nothing_half(model):
    with _client(model, max_utterances=2) as c:
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            assert [_say(ws, "Ann", f"u{k}").get("error", "ok") for k in range(3)] == ["ok", "ok", "session_full"]
        assert len(c.get(f"/v1/sessions/{sid}", headers=_auth(tok)).json()["utterances"]) == 2
    with _client(model, max_store_mb=1e-9) as c:  # already over: nothing new is written
        svc = c.app.state.service
        assert c.post("/v1/sessions").status_code == 507
        svc.settings.max_store_mb = 1e6
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            a = _say(ws, "Ann", "hello")
            assert a["error"] == "store_full"
        assert svc.store.count_utterances() == 0 and not len(svc.pool.live[sid].stream)


def test_invalid_frames_spend_the_rate_limit(model):
    with _client(model, rate_per_s=0.01, rate_burst=3) as c:
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            for _ in range(3):
                ws.send_text("{junk")
                assert ws.receive_json()["error"] == "bad_json"
            assert _say(ws, "Ann", "a valid one")["error"] == "rate_limited"


def test_a_flood_is_disconnected_and_a_reconnect_loop_refused(model):
    with _client(model, rate_per_s=0.01, rate_burst=3, connect_per_min=60, connect_burst=3,
                 refusal_delay_s=0) as c:
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            kinds = []
            with pytest.raises(WebSocketDisconnect) as closed:
                for _ in range(10):
                    ws.send_text("{junk")
                    kinds.append(ws.receive_json()["error"])
            assert kinds == ["bad_json"] * 3 + ["rate_limited"] * 3 and closed.value.code == 1008
        for _ in range(2):  # three connects in a burst (the first was above), then 429
            with _ws(c, sid, tok) as ws:
                assert ws.receive_json()["type"] == "ready"
        with pytest.raises(WebSocketDenialResponse) as denied:
            with _ws(c, sid, tok):
                pass
        assert denied.value.status_code == 429 and int(denied.value.headers["Retry-After"]) >= 1


def test_a_rate_limited_connection_is_not_read_until_it_may_send_again(model):
    # 5 frames/s, burst 2: the third frame at once is refused, and the server reads nothing more for 0.2 s,
    # so the fourth, sent at once, finds a token again (answered, not refused; one strike, no close)
    with _client(model, rate_per_s=5, rate_burst=2) as c:
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
            for _ in range(4):
                ws.send_text("{junk")
            kinds = [ws.receive_json()["error"] for _ in range(4)]
            assert kinds == ["bad_json", "bad_json", "rate_limited", "bad_json"]


def test_a_refused_creation_is_answered_after_its_retry_after(model):
    with _client(model, create_per_min=60, create_burst=1, refusal_delay_s=0.4) as c:
        _open(c)
        t = time.perf_counter()
        r = c.post("/v1/sessions")
        assert r.status_code == 429 and time.perf_counter() - t >= 0.4  # held back: min(1 s wait, 0.4 s)


def test_refusals_held_back_are_bounded_per_address(model):
    import asyncio

    from affectkit.serve.service import HELD_PER_CLIENT

    with _client(model, refusal_delay_s=0.05) as c:
        svc = c.app.state.service
        assert asyncio.run(svc.refuse_slowly("10.0.0.1", 3.0)) == 0.05  # the wait, at most the delay
        assert asyncio.run(svc.refuse_slowly("10.0.0.1", 0.01)) == 0.01
        assert svc.held == {}  # released
        svc.held["10.0.0.1"] = HELD_PER_CLIENT  # as many held as allowed: the next is answered at once
        assert asyncio.run(svc.refuse_slowly("10.0.0.1", 3.0)) == 0.0
        assert asyncio.run(svc.refuse_slowly("10.0.0.2", 3.0)) == 0.05  # another address is not affected
    with _client(model, refusal_delay_s=0) as c:
        assert asyncio.run(c.app.state.service.refuse_slowly("10.0.0.1", 3.0)) == 0.0


def test_retention_deletes_unused_sessions_with_their_log(model, tmp_path):
    with _client(model, tmp_path / "log.db", retain_days=1) as c:
        svc = c.app.state.service
        old_id, old_tok = _open(c)
        busy_id, busy_tok = _open(c)
        new_id, new_tok = _open(c)
        for sid, tok in ((old_id, old_tok), (busy_id, busy_tok)):
            with _ws(c, sid, tok) as ws:
                ws.receive_json()
                _say(ws, "Ann", "hello")
        two_days_ago = time.time() - 2 * 86400
        svc.store._db.execute("UPDATE sessions SET created = ? WHERE id IN (?, ?)", (two_days_ago, old_id, busy_id))
        svc.store._db.execute("UPDATE utterances SET created = ? WHERE session = ?", (two_days_ago, old_id))
        assert old_id in svc.rows  # its row was cached by the upgrade
        assert c.portal.call(svc.retention) == 1
        assert c.get(f"/v1/sessions/{old_id}", headers=_auth(old_tok)).status_code == 404
        with pytest.raises(WebSocketDenialResponse) as denied:  # not let in from a stale cached row
            with _ws(c, old_id, old_tok):
                pass
        assert denied.value.status_code == 404 and old_id not in svc.rows
        assert old_id not in svc.pool.live and not list(svc.store.records(old_id))
        for sid, tok in ((busy_id, busy_tok), (new_id, new_tok)):  # used within the day, or new: kept
            assert c.get(f"/v1/sessions/{sid}", headers=_auth(tok)).status_code == 200
        assert "affectkit_sessions_expired_total 1.0" in c.get("/metrics").text


def test_opening_and_deleting_wait_in_a_bounded_line(model):
    """A storm of connects to live sessions or of deletes is refused at once beyond the bound (503 / 1013),
    never queued without end in front of the worker."""
    with _client(model, max_rebuilds=2) as c:
        svc = c.app.state.service
        sid, tok = _open(c)
        with _ws(c, sid, tok) as ws:
            ws.receive_json()
        svc.batcher.side_waiting = 2  # two such requests wait already
        r = c.delete(f"/v1/sessions/{sid}", headers=_auth(tok))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        with _ws(c, sid, tok) as ws:
            assert ws.receive_json()["error"] == "overloaded"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1013
        svc.batcher.side_waiting = 0
        assert c.delete(f"/v1/sessions/{sid}", headers=_auth(tok)).status_code == 204
        assert svc.batcher.side_waiting == 0


# ---------------------------------------------------------------------------------------- browsers


def test_hosts_origins_and_tokens_out_of_urls(model):
    app = create_app(model, ":memory:", ServeSettings(allowed_hosts=("localhost",),
                                                      allowed_origins=("https://app.example",)), embed=embed)
    with TestClient(app, base_url="http://localhost") as c:
        sid, tok = _open(c)
        r = c.get("/")
        csp = r.headers["Content-Security-Policy"]
        assert "base-uri 'none'" in csp and "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
        assert c.get("/healthz", headers={"Host": "evil.example"}).status_code == 400  # DNS rebinding
        path = f"ws://localhost/v1/sessions/{sid}/stream"
        with pytest.raises(WebSocketDisconnect) as closed:  # an upgrade with another Host: closed before it opens
            with c.websocket_connect(f"ws://evil.example/v1/sessions/{sid}/stream", headers=_auth(tok)):
                pass
        assert closed.value.code == 1008
        for origin, ok in (("http://evil.example", False), ("http://localhost", True), ("https://app.example", True)):
            headers = {**_auth(tok), "Origin": origin}
            if ok:
                with c.websocket_connect(path, headers=headers) as ws:
                    assert ws.receive_json()["type"] == "ready"
            else:
                with pytest.raises(WebSocketDenialResponse) as denied:
                    with c.websocket_connect(path, headers=headers):
                        pass
                assert denied.value.status_code == 403
        # a browser: the token as a subprotocol, answered with affectkit.v1 only (the token is not echoed)
        with c.websocket_connect(path, subprotocols=["affectkit.v1", f"affectkit.bearer.{tok}"]) as ws:
            assert ws.accepted_subprotocol == "affectkit.v1" and ws.receive_json()["type"] == "ready"
        r = c.get(f"/v1/sessions/{sid}", params={"token": tok})
        assert r.status_code == 400 and "never go in a URL" in r.json()["detail"]
