"""The service's access checks (``affectkit.serve.access``) by hand: ids, bearer tokens, the operator key,
allowed hosts and origins, and the token buckets' arithmetic."""

from __future__ import annotations

import hashlib
import math

import pytest

from affectkit.serve.access import (
    TokenBucket,
    api_key_ok,
    bearer,
    host_allowed,
    is_loopback,
    origin_allowed,
    plausible_id,
    token_status,
    ws_token,
)


def test_loopback_hosts():
    for host in ("localhost", "127.0.0.1", "127.8.9.10", "::1", "[::1]"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.com", "", "localhost.example", "X127.0.0.1X"):
        assert not is_loopback(host), host


def test_plausible_ids():
    assert plausible_id("a" * 8) and plausible_id("a" * 64) and plausible_id("Ab-_09xyZ")
    for bad in ("a" * 7, "a" * 65, "abcdefg!", "abc def gh", "abcdefg/", ""):
        assert not plausible_id(bad), bad


def test_bearer_and_websocket_tokens():
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc" and bearer("BEARER x") == "x"
    for none in (None, "", "Basic abc", "Bearer ", "Bearer    ", "Bearerabc"):
        assert bearer(none) is None, none
    assert ws_token("Bearer h", ["affectkit.bearer.s"]) == "h"  # the header first
    assert ws_token(None, ["affectkit.v1", "affectkit.bearer.s3cret"]) == "s3cret"
    assert ws_token(None, ["affectkit.bearer."]) is None and ws_token(None, ["other.bearer.x"]) is None
    assert ws_token("Bearer ", []) is None


def test_token_status_codes():
    digest = lambda t: hashlib.sha256(t.encode()).hexdigest()  # noqa: E731
    stored = digest("right")
    assert token_status(stored, "right", digest) == 0
    assert token_status(stored, "wrong", digest) == 403
    assert token_status(stored, None, digest) == 401 and token_status(stored, "", digest) == 401
    assert token_status(None, "right", digest) == 404


def test_operator_key():
    assert api_key_ok(None, None, None) and api_key_ok("", None, None)
    assert api_key_ok("k3y", None, "k3y") and api_key_ok("k3y", "Bearer k3y", None)
    assert not api_key_ok("k3y", None, None) and not api_key_ok("k3y", "Bearer nope", None)
    assert not api_key_ok("k3y", None, "k3y ") and not api_key_ok("k3y", "Bearer k3", "")
    for key in ("k3y", "XXXX", "-"):  # no key sent never matches, whatever the operator's key is
        assert not api_key_ok(key, None, None) and not api_key_ok(key, "Basic x", "")


@pytest.mark.parametrize(("host", "allowed", "ok"), [
    ("example.com", None, True), ("anything", ["*"], True),
    ("example.com", ["example.com"], True), ("EXAMPLE.com:8443", ["example.com"], True),
    ("api.example.com", ["*.example.com"], True), ("example.com", ["*.example.com"], False),
    ("evil.com", ["example.com"], False), ("badexample.com", ["*.example.com"], False),
    ("[::1]:8000", ["::1"], True), ("[::1]", ["[::1]"], True), ("127.0.0.1:8000", ["127.0.0.1"], True),
    ("::1", ["::1"], True), ("fe80::1", ["fe80::1"], True),  # unbracketed IPv6: no port to take off
    ("[::1", ["[::1"], True), ("[::1", ["::1"], False),      # an unterminated bracket is kept as it is
    ("[::1]]", ["::1"], True), ("[::1]:80]", ["[::1]:80]"], False),  # the name ends at the first "]"
    (None, ["example.com"], False), ("", ["example.com"], False), ("example.com", [], False),
])
def test_allowed_hosts(host, allowed, ok):
    assert host_allowed(host, allowed) is ok


@pytest.mark.parametrize(("origin", "host", "allowed", "ok"), [
    (None, "h:1", None, True),                                   # not a browser
    ("http://h:1", "h:1", None, True), ("http://H:1/", "h:1", None, True),  # same origin
    ("http://evil:1", "h:1", None, False), ("http://h:2", "h:1", None, False),
    ("https://app.example", "h:1", ["https://app.example"], True),
    ("https://app.example", "h:1", ["https://app.example/"], True),
    ("https://other.example", "h:1", ["https://app.example"], False),
    ("https://app.example/", "h:1", ["https://app.example"], True),    # a trailing slash either side
    ("https://app.exampleX", "h:1", ["https://app.example"], False),   # one more letter: another origin
    ("https://app.example", "h:1", ["https://app.exampleX"], False),
    ("https://any", "h:1", ["*"], True), ("null", "h:1", None, False), ("http://h:1", None, None, False),
])
def test_allowed_origins(origin, host, allowed, ok):
    assert origin_allowed(origin, host, allowed) is ok


def test_token_bucket_wait_takes_nothing():
    now = [0.0]
    b = TokenBucket(rate=4.0, burst=2.0, clock=lambda: now[0])
    assert b.wait("a") == 0.0 and "a" not in b  # unknown: full, and asking keeps no bucket
    b.take("a")
    assert b.wait("a") == 0.0  # one token left
    b.take("a")
    assert b.wait("a") == pytest.approx(0.25) and b.wait("a") == pytest.approx(0.25)  # 1 / rate; nothing taken
    now[0] = 0.125
    assert b.wait("a") == pytest.approx(0.125)  # half a token back
    assert b.wait("a", now=0.25) == 0.0 and b.wait("a", now=0.2) == pytest.approx(0.05)
    now[0] = 0.25
    assert b.take("a") == 0.0  # the token wait announced is there
    now[0] = 0.625
    assert b.wait("a") == 0.0  # 1.5 tokens back since: one may go now
    slow = TokenBucket(0.5, 1.0, clock=lambda: 0.0)  # under one per second
    slow.take("s")
    assert slow.wait("s") == pytest.approx(2.0)
    never = TokenBucket(0.0, 1.0, clock=lambda: 0.0)  # rate 0: once empty, never again
    assert never.wait("x") == 0.0  # exactly one token (the full bucket of one): it may go now
    never.take("x")
    assert math.isinf(never.wait("x"))


def test_token_bucket_arithmetic_and_retry_after():
    now = [0.0]
    b = TokenBucket(rate=2.0, burst=3.0, max_keys=2, clock=lambda: now[0])
    assert [b.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("a") == pytest.approx(0.5)  # empty: one token comes back in 1 / rate s
    now[0] = 0.25
    assert b.take("a") == pytest.approx(0.25)  # half a token back: a quarter second to go
    now[0] = 0.5
    assert b.allow("a") and not b.allow("a")
    assert (b.hits, b.misses) == (6, 1)
    b.take("b")
    b.take("c")  # a third key: the least recently used ("a") leaves
    assert "a" not in b and len(b) == 2 and b.stats().evictions == 1 and b.misses == 3
    b.take("a")  # and again: "b" leaves
    assert "b" not in b and b.stats().evictions == 2 and b.misses == 4
    assert b.stats().limit == 2 and b.max_keys == 2
    zero = TokenBucket(0.0, 1.0)
    assert zero.take("x") == 0.0 and math.isinf(zero.take("x"))
    now[0] = 100.0
    assert b.prune() == 2 and len(b) == 0  # refilled buckets are the same as none
    b.take("d")
    assert b.prune() == 0
    b.take("e")
    b.forget("e")
    assert "e" not in b and "d" in b
    # an explicit time wins over the clock (the sweeper and tests pass one)
    frozen = TokenBucket(rate=1.0, burst=1.0, clock=lambda: 0.0)
    assert frozen.take("k", now=0.0) == 0.0 and frozen.take("k", now=0.25) == pytest.approx(0.75)
    assert frozen.take("k", now=10.0) == 0.0  # refilled by then, though the clock still says 0
    assert frozen.prune(now=0.0) == 0 and frozen.prune(now=20.0) == 1


def test_client_address_of_a_request_or_websocket():
    from types import SimpleNamespace

    from affectkit.serve.access import client_address

    assert client_address(SimpleNamespace(client=SimpleNamespace(host="10.1.2.3"))) == "10.1.2.3"
    assert client_address(SimpleNamespace(client=None)) == "unknown"  # e.g. a test transport
