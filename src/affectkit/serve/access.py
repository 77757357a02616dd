"""Who may do what: session tokens, the operator key, allowed hosts and origins, and rate limits.

Plain functions and one small class, below the service container: they take what they need as arguments
and import nothing of the service, so routes and the WebSocket protocol can use them without circles.

Where a token travels: the ``Authorization: Bearer TOKEN`` header (HTTP and WebSocket clients that can set
headers), or, for browsers (whose WebSocket API cannot set headers), the WebSocket subprotocol
``affectkit.bearer.TOKEN`` beside ``affectkit.v1`` (the server answers with ``affectkit.v1`` only, so the
token is not echoed).  Never in a URL: a URL lands in proxy logs and browser history, so ``?token=`` is
refused with a 400 that says where to put it.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from affectkit.cache import CacheStats

__all__ = ["LOOPBACK", "MAX_BUCKETS", "PROTOCOL", "TokenBucket", "api_key_ok", "bearer", "host_allowed", "is_loopback",
           "origin_allowed", "plausible_id", "token_status", "ws_token"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Token buckets kept at most per limit (about 200 bytes each: ~13 MB at the limit).
MAX_BUCKETS = 65536
PROTOCOL = "affectkit.v1"          # the WebSocket subprotocol the server speaks
BEARER_PROTOCOL = "affectkit.bearer."  # + token: how a browser sends its token on the upgrade

DENIED = {401: "a token is required (Authorization: Bearer TOKEN, or the WebSocket subprotocol "
               "affectkit.bearer.TOKEN)",
          403: "this token does not open this session", 404: "no such session"}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine."""
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def plausible_id(session_id: str) -> bool:
    """Whether ``session_id`` could be one of ours (checked before any store read)."""
    return 8 <= len(session_id) <= 64 and all(c.isalnum() or c in "-_" for c in session_id)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


def ws_token(authorization: str | None, subprotocols: list[str]) -> str | None:
    """The token of a WebSocket upgrade: the bearer header, else an ``affectkit.bearer.TOKEN`` subprotocol."""
    token = bearer(authorization)
    if token:
        return token
    for p in subprotocols:
        if p.startswith(BEARER_PROTOCOL) and len(p) > len(BEARER_PROTOCOL):
            return p[len(BEARER_PROTOCOL):]
    return None


def token_status(stored_sha256: str | None, token: str | None, digest: object) -> int:
    """0 if ``token`` hashes (``digest``) to ``stored_sha256``; else 404 (no session), 401 (no token), 403."""
    if stored_sha256 is None:
        return 404
    if not token:
        return 401
    return 0 if hmac.compare_digest(stored_sha256, digest(token)) else 403  # type: ignore[operator]


def api_key_ok(expected: str | None, authorization: str | None, x_api_key: str | None) -> bool:
    """Whether a session-creating request carries the operator key (any request when no key is set)."""
    if not expected:
        return True
    given = x_api_key or bearer(authorization) or ""
    return hmac.compare_digest(given.encode(), expected.encode())


def _hostname(host: str) -> str:
    """``host[:port]`` without the port, lower case (IPv6 in brackets keeps them)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host_header: str | None, allowed: list[str] | tuple[str, ...] | None) -> bool:
    """TrustedHost-style check of the Host header (None: every host; ``*.example.com`` matches subdomains).
    The defence against DNS rebinding: a page on evil.example whose name now points at 127.0.0.1 still
    sends ``Host: evil.example``."""
    if allowed is None or "*" in allowed:
        return True
    if not host_header:
        return False
    name = _hostname(host_header)
    for a in allowed:
        a = a.lower()
        if name == a or (a.startswith("*.") and name.endswith(a[1:])) or name == f"[{a}]":
            return True
    return False


def origin_allowed(origin: str | None, host_header: str | None, allowed: list[str] | tuple[str, ...] | None) -> bool:
    """Whether a WebSocket upgrade's ``Origin`` may open a session: none (not a browser), the page's own host
    (same origin), or one of ``allowed`` (``scheme://host[:port]``, or ``*``)."""
    if origin is None:
        return True
    if allowed is not None and ("*" in allowed or origin.rstrip("/") in [a.rstrip("/") for a in allowed]):
        return True
    netloc = urlsplit(origin).netloc.lower()
    return bool(netloc) and host_header is not None and netloc == host_header.strip().lower()


def client_address(conn: Any) -> str:
    """The client's address of a request or WebSocket (the key of per-address limits)."""
    return conn.client.host if conn.client else "unknown"


class TokenBucket:
    """A token bucket per key (a session, a client address): ``rate`` per second, ``burst`` at most, at most
    ``max_keys`` keys kept (least recently used leave first: such a key starts again full, which only errs on
    the lenient side). :meth:`take` returns 0 when allowed, else the seconds until one more is (Retry-After).
    A bucket that has refilled is the same as none: :meth:`prune` (the sweeper) drops those. Thread-safe."""

    def __init__(self, rate: float, burst: float, max_keys: int = MAX_BUCKETS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.max_keys, self.clock = rate, burst, max_keys, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self.buckets)

    def __contains__(self, key: object) -> bool:
        return key in self.buckets

    def _level(self, tokens: float, at: float, now: float) -> float:
        return min(self.burst, tokens + (now - at) * self.rate)

    def take(self, key: str, now: float | None = None) -> float:
        now = self.clock() if now is None else now
        with self._lock:
            old = self.buckets.pop(key, None)
            if old is None:
                self.misses += 1
                tokens = self.burst
            else:
                self.hits += 1
                tokens = self._level(*old, now)
            ok = tokens >= 1
            self.buckets[key] = (tokens - 1 if ok else tokens, now)
            while len(self.buckets) > self.max_keys:
                self.buckets.popitem(last=False)
                self.evictions += 1
        return 0.0 if ok else self._until_one(tokens)

    def wait(self, key: str, now: float | None = None) -> float:
        """Seconds until ``key`` may take a token (0: now); takes nothing."""
        now = self.clock() if now is None else now
        with self._lock:
            old = self.buckets.get(key)
        tokens = self.burst if old is None else self._level(*old, now)
        return 0.0 if tokens >= 1 else self._until_one(tokens)

    def _until_one(self, tokens: float) -> float:
        """Seconds until a bucket holding ``tokens`` (< 1) holds one (Retry-After)."""
        return (1 - tokens) / self.rate if self.rate > 0 else math.inf

    def allow(self, key: str) -> bool:
        """Take a token from ``key``'s bucket: False (and nothing taken) when it is empty."""
        return self.take(key) == 0

    def prune(self, now: float | None = None) -> int:
        """Drop the buckets that have refilled (the same as having none); returns how many."""
        now = self.clock() if now is None else now
        with self._lock:
            full = [k for k, (tokens, at) in self.buckets.items() if self._level(tokens, at, now) >= self.burst]
            for k in full:
                del self.buckets[k]
        return len(full)

    def forget(self, key: str) -> None:
        with self._lock:
            self.buckets.pop(key, None)

    def stats(self) -> CacheStats:
        return CacheStats(len(self.buckets), self.max_keys, self.hits, self.misses, self.evictions)
