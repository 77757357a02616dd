"""A short soak of the live service (a few thousand distinct utterances, seconds): every cache and
per-key record it holds stays within its own limit while sessions come and go, and ``/metrics`` reports
them.  The long soak, with memory figures, is ``bench/soak.py``."""

from __future__ import annotations

import random
import secrets

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client import generate_latest  # noqa: E402
from starlette.testclient import WebSocketDenialResponse  # noqa: E402

from affectkit.cache import LRUCache, lru_stats  # noqa: E402
from affectkit.graph import _slot_tables  # noqa: E402
from affectkit.models import build_model  # noqa: E402
from affectkit.models.corect import _newest_edges  # noqa: E402
from affectkit.serve.access import TokenBucket  # noqa: E402
from affectkit.serve.app import ServeSettings, Service, create_app  # noqa: E402
from affectkit.serve.sessions import Item  # noqa: E402

SMALL = {"hidden": 8, "text_ff": 16, "text_layers": 1, "text_heads": 2, "graph_heads": 2, "wp": 3, "wf": 0,
         "causal": True, "modalities": ["text"], "context": 8}
TEXT_LIMIT = 64


def _model(dim: int) -> tuple[torch.nn.Module, dict]:
    info = {"dims": {"text": dim}, "n_classes": 4, "label_names": ["hap", "sad", "neu", "ang"], "n_speakers": 2,
            "speakers": ["F", "M"]}
    torch.manual_seed(0)
    return build_model("corect", SMALL, info).eval(), info


@pytest.fixture
def live_encoder(monkeypatch):
    """The shipped encoder as a live process makes it (``stream._sentence_encoder``), with a small
    ``LIVE_CACHE_ENTRIES`` and a fake model (no weights are loaded)."""
    from serve_support import fake_embed

    import affectkit.features.text as ft
    import affectkit.stream as stream_mod
    from affectkit.serve.service import ServeSettings

    monkeypatch.setattr(ft, "LIVE_CACHE_ENTRIES", TEXT_LIMIT)
    stream_mod._sentence_encoder.cache_clear()
    enc = stream_mod._sentence_encoder(ServeSettings().text_runtime)  # the service's default runtime
    monkeypatch.setattr(enc, "encode", lambda sentences, progress=False: fake_embed(list(sentences), ft.DIM))
    yield enc
    stream_mod._sentence_encoder.cache_clear()


def test_lru_cache_keeps_the_most_recently_used_and_counts():
    c: LRUCache[str, int] = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recently used
    c.put("c", 3)
    assert "b" not in c and c.get("c") == 3 and c.get("b") is None
    s = c.stats()
    assert (s.size, s.limit, s.hits, s.misses, s.evictions) == (2, 2, 2, 1, 1)
    with pytest.raises(ValueError):
        LRUCache(-1)


def test_token_buckets_limit_refill_prune_and_cap():
    now = [0.0]
    b = TokenBucket(rate=1.0, burst=2.0, max_keys=3, clock=lambda: now[0])
    assert [b.allow("a") for _ in range(3)] == [True, True, False]
    now[0] = 1.0
    assert b.allow("a") and not b.allow("a")  # one token back after a second
    for k in "bcd":
        b.allow(k)
    assert len(b) == 3 and "a" not in b and b.stats().evictions == 1  # the least recently used left
    now[0] = 1.5
    assert b.prune() == 0  # b, c, d are still refilling
    now[0] = 3.0
    assert b.prune() == 3 and len(b) == 0  # a full bucket is the same as none


def test_a_short_soak_keeps_every_cache_within_its_limit(live_encoder):
    """3,000 distinct sentences over a rotating population of sessions (created, streamed into, abandoned,
    deleted, evicted and resumed from the log): the text vectors, live sessions and rate buckets each fill
    up to their limit and never pass it."""
    model = _model(384)
    svc = Service(model, ":memory:", ServeSettings(max_live_sessions=8, max_batch=8))
    svc.frames.max_keys = 16
    cache = svc.base.engine.text_cache()
    assert cache is live_encoder.cache and cache.limit == TEXT_LIMIT
    rng = random.Random(0)
    active: dict[str, int] = {}  # session -> utterances still to send before it leaves
    abandoned: list[str] = []
    said = resumed = deleted = 0
    peak = {"text": 0, "live": 0, "buckets": 0}
    while said < 3000:
        while len(active) < 8:
            if abandoned and rng.random() < 0.3:  # an old session comes back: rebuilt from its log
                sid = abandoned.pop(rng.randrange(len(abandoned)))
                resumed += 1
            else:
                sid = secrets.token_urlsafe(12)
                svc.store.create_session(sid, secrets.token_urlsafe(16), svc.identity["hash"])
            active[sid] = rng.randint(3, 20)
        batch = list(active)
        items = []
        for sid in batch:
            svc.allow(sid)
            items.append(Item(sid, rng.choice(["Ann", "Bob"]), f"utterance {said} of the soak, number {said * 7}", {}))
            said += 1
        out = svc.pool.step(items)
        assert all(isinstance(o, tuple) for o in out), [o for o in out if not isinstance(o, tuple)][:1]
        for sid in batch:
            active[sid] -= 1
            if active[sid] <= 0:
                del active[sid]
                if rng.random() < 0.4:
                    svc.pool.drop(sid)
                    svc.store.delete_session(sid)
                    svc.frames.forget(sid)
                    deleted += 1
                else:
                    abandoned.append(sid)
        if said % 400 < 8:  # the sweeper: idle sessions leave memory, refilled buckets are dropped
            svc.pool.sweep(now=svc.pool.live[next(iter(svc.pool.live))].used + svc.pool.idle_s)
            svc.frames.prune(now=1e12)
        peak = {"text": max(peak["text"], len(cache)), "live": max(peak["live"], len(svc.pool.live)),
                "buckets": max(peak["buckets"], len(svc.frames))}
        assert len(cache) <= TEXT_LIMIT and len(svc.pool.live) <= 8 and len(svc.frames) <= 16
    assert peak == {"text": TEXT_LIMIT, "live": 8, "buckets": 16}
    assert cache.stats().evictions >= said - TEXT_LIMIT and resumed and deleted and svc.pool.evicted
    assert svc.frames.stats().evictions > 0
    for fn in (_newest_edges, _slot_tables):  # the model's own lru_caches stay within theirs
        s = lru_stats(fn)
        assert s.limit is not None and s.size <= s.limit
    text = generate_latest(svc.metrics.registry).decode()
    assert f'affectkit_cache_entries{{cache="text_vectors"}} {TEXT_LIMIT}.0' in text
    assert f'affectkit_cache_limit{{cache="text_vectors"}} {TEXT_LIMIT}.0' in text
    assert 'affectkit_cache_limit{cache="sessions_live"} 8.0' in text
    assert 'affectkit_cache_evictions_total{cache="rate_buckets"}' in text
    svc.store.close()


def test_connections_and_buckets_of_finished_sessions_are_not_kept(monkeypatch):
    """Through the app: sessions connect, talk and leave (some deleted); no connection record stays, the
    sweep drops their refilled buckets, and /metrics shows the figures."""
    from serve_support import fake_embed

    app = create_app(_model(8), ":memory:", ServeSettings(sweep_every_s=3600),
                     embed=lambda s: fake_embed(s, 8))
    with TestClient(app) as c:
        svc = app.state.service
        for i in range(6):
            r = c.post("/v1/sessions").json()
            auth = {"Authorization": f"Bearer {r['token']}"}
            with c.websocket_connect(f"/v1/sessions/{r['id']}/stream", headers=auth) as ws:
                assert ws.receive_json()["type"] == "ready"
                for j in range(3):
                    ws.send_json({"speaker": "Ann", "text": f"hello {i} {j}"})
                    assert ws.receive_json()["type"] == "prediction"
            if i % 2:
                assert c.delete(f"/v1/sessions/{r['id']}", headers=auth).status_code == 204
                with pytest.raises(WebSocketDenialResponse) as denied:  # its cached row went with it
                    with c.websocket_connect(f"/v1/sessions/{r['id']}/stream", headers=auth):
                        pass
                assert denied.value.status_code == 404
        assert svc.connections == {} and len(svc.rows) == 3  # rows of deleted sessions are not kept
        assert len(svc.frames) == 3  # the deleted sessions' buckets went with them
        svc.frames.prune(now=np.inf)
        assert len(svc.frames) == 0
        text = c.get("/metrics").text
        assert 'affectkit_cache_entries{cache="connections"} 0.0' in text
        assert 'affectkit_cache_entries{cache="session_rows"} 3.0' in text
        assert 'affectkit_cache_hits_total{cache="session_rows"} 6.0' in text  # upgrades checked without a read
        assert 'affectkit_cache_misses_total{cache="rate_buckets"} 6.0' in text
