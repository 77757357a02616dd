"""Run the service under uvicorn on a socket bound here, so the real port (``--port 0``) is printed.

Every setting is checked before the socket is bound (ConfigError: one line, exit 2); ``serving on URL``
is printed only once the model is loaded and the worker runs, and a startup that fails exits non-zero.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from affectkit.errors import AffectkitError, ConfigError
from affectkit.serve.access import LOOPBACK, is_loopback
from affectkit.serve.app import create_app
from affectkit.serve.service import FLAGS, ServeSettings

log = logging.getLogger(__name__)

API_KEY_ENV = "AFFECTKIT_API_KEY"


class _DenialNoise(logging.Filter):
    """uvicorn's websockets-sansio logs "returned without completing handshake" after every refused upgrade
    (401/403/404/429 sent with ``send_denial_response``: the response goes out, then it logs); under a reconnect
    flood that is one error line per refusal, so it is dropped (refusals are counted in the metrics)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "without completing handshake" not in record.getMessage()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (ConfigError with the reason if it cannot be bound)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError, UnicodeError) as exc:
        sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port} ({reason})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def settings_for(host: str, options: dict[str, Any]) -> ServeSettings:
    """The service's settings from command-line values (checked: ConfigError naming the option).  The operator
    key comes from ``api_key`` or $AFFECTKIT_API_KEY; binding beyond localhost without one is refused.  Allowed
    hosts default to this machine's names plus ``host`` itself."""
    options = {k: v for k, v in options.items() if v is not None}
    unknown = set(options) - set(ServeSettings.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"unknown serve setting(s): {', '.join(sorted(unknown))}")
    options.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
    if not is_loopback(host) and not options.get("api_key"):
        raise ConfigError(f"--host {host} is reachable from other machines: set an operator key (--api-key KEY or "
                          f"${API_KEY_ENV}) so that only you can create sessions")
    if options.get("allowed_hosts") is None:
        names = {*LOOPBACK, "[::1]"}
        if host not in ("0.0.0.0", "::"):
            names.add(host)
        options["allowed_hosts"] = tuple(sorted(names))
    try:
        return ServeSettings(**options)
    except TypeError as exc:
        raise ConfigError(f"serve settings: {exc}") from None


def uvicorn_config(app: Any, cfg: ServeSettings, **options: Any) -> Any:
    """uvicorn's settings for the service (``options``: TLS and proxy settings).  Frames are small JSON or
    PCM, so per-message compression is not offered: it would cost CPU on every frame and let a small
    compressed frame make the server inflate up to ``ws_max_size``.  The event loop and HTTP parser are
    uvicorn's choice: uvloop and httptools (the ``[serve]`` extra) when installed."""
    import uvicorn

    return uvicorn.Config(app, log_level="warning", access_log=False, ws="websockets-sansio",
                          ws_max_size=4 * cfg.max_message_bytes, ws_per_message_deflate=False,
                          timeout_graceful_shutdown=5, lifespan="on", **options)


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000,
          store: str | Path = "affectkit-sessions.db", threads: int | None = 1, audio: Any = None,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, proxy_headers: bool = False,
          forwarded_allow_ips: str | None = None, **settings: Any) -> None:
    """Load ``checkpoint``, open ``store`` and serve until interrupted; prints ``serving on URL`` once ready.
    ``threads``: torch and ONNX Runtime intra-op threads (default 1: with as many threads as cores, torch's
    OpenMP regions wait on any other busy process, 20x slower per sentence here; None: torch's default);
    ``audio``: the speech protocol's
    :class:`~affectkit.serve.audio_ws.AudioSettings` (None: its defaults); ``ssl_certfile``/``ssl_keyfile``:
    TLS by uvicorn; ``proxy_headers``/``forwarded_allow_ips``: trust X-Forwarded-For from these proxies (the
    client address the creation rate limit counts).  Other keywords are :class:`ServeSettings` fields."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("affectkit serve needs the [serve] extra: pip install -e '.[serve]'") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {port}")
    cfg = settings_for(host, settings)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ConfigError("--ssl-certfile and --ssl-keyfile go together")
    for flag, f in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile)):
        if f is not None and not Path(f).is_file():
            raise ConfigError(f"{flag} {f}: no such file")
    if not Path(checkpoint).is_file():
        raise ConfigError(f"{checkpoint}: checkpoint not found")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from affectkit.checkpoint import load_model
    from affectkit.serve.store import open_store
    from affectkit.stream import Stream

    model, _run_cfg, info = load_model(checkpoint)
    Stream((model, info))  # refuses a non-causal checkpoint here, with one line, before the server starts
    log_store = open_store(store)  # and an unusable store (a bad path, URL or server: one line, before listening)
    shown_store = log_store.url
    log_store.close()
    sock = bind(host, port)
    real = sock.getsockname()[1]
    scheme = "https" if ssl_certfile else "http"
    shown = f"[{host}]" if ":" in host else host

    def ready(_svc: Any) -> None:
        if not is_loopback(host) and not ssl_certfile:
            log.warning("listening on %s without TLS: put a TLS proxy in front of it (README: exposure)", host)
        print(f"serving on {scheme}://{shown}:{real}  (store {shown_store}; API docs at /docs)", file=sys.stdout,
              flush=True)

    app = create_app((model, info), store, cfg, audio=audio, ready=ready)
    config = uvicorn_config(app, cfg, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                            proxy_headers=proxy_headers,
                            forwarded_allow_ips=forwarded_allow_ips if proxy_headers else None)
    try:
        config.load()  # TLS files are read here: a bad certificate or key is one line, before listening
    except (OSError, ValueError) as exc:
        sock.close()
        raise ConfigError(f"TLS: cannot use --ssl-certfile/--ssl-keyfile ({exc})") from None
    server = uvicorn.Server(config)
    logging.getLogger("uvicorn.error").addFilter(_DenialNoise())
    try:
        server.run(sockets=[sock])
    except SystemExit as exc:  # uvicorn's way to report a failed startup (the lifespan's error is logged)
        if exc.code not in (0, None):
            raise AffectkitError("the service did not start (the reason is logged above)") from None
        raise
    finally:
        sock.close()
    if not server.started:
        raise AffectkitError("the service did not start (the reason is logged above)")


__all__ = ["API_KEY_ENV", "FLAGS", "bind", "serve", "settings_for", "uvicorn_config"]
