"""Run the service under uvicorn on a socket bound here, so the real port (``--port 0``) is printed."""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Any

from affectkit.errors import ConfigError
from affectkit.serve.app import ServeSettings, create_app

log = logging.getLogger("affectkit.serve")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (ConfigError with the reason if it cannot be bound)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000,
          store: str | Path = "affectkit-sessions.db", threads: int | None = None, audio: Any = None,
          **settings: float) -> None:
    """Load ``checkpoint``, open ``store`` and serve until interrupted; prints ``serving on URL``.
    ``threads``: torch intra-op threads (None: torch's default); ``audio``: the speech protocol's
    :class:`~affectkit.serve.audio_ws.AudioSettings` (None: its defaults)."""
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("affectkit serve needs the [serve] extra: pip install -e '.[serve]'") from None
    if not Path(checkpoint).is_file():
        raise ConfigError(f"{checkpoint}: checkpoint not found")
    cfg = ServeSettings(**{k: type(getattr(ServeSettings, k))(v) for k, v in settings.items()})
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    from affectkit.checkpoint import load_model
    from affectkit.serve.store import Store
    from affectkit.stream import Stream

    model, _run_cfg, info = load_model(checkpoint)
    Stream((model, info))  # refuses a non-causal checkpoint here, with one line, before the server starts
    Store(store).close()  # and an unusable store
    app = create_app((model, info), store, cfg, audio=audio)
    sock = bind(host, port)
    real = sock.getsockname()[1]
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: reachable from other machines; put TLS in front of it", host)
    config = uvicorn.Config(app, log_level="warning", access_log=False, ws="websockets-sansio",
                            ws_max_size=4 * cfg.max_message_bytes, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{real}  (store {store}; API docs at /docs)", file=sys.stdout, flush=True)
    server.run(sockets=[sock])
