"""Opening a session on a WebSocket: a session in memory (or just created, with an empty log) opens at once;
one that must be rebuilt from the log waits in the batcher's bounded rebuild lane (never ahead of live utterances, see
:mod:`affectkit.serve.batcher`) while the handler keeps listening to the socket, so a client that leaves
before its session is ready drops its rebuild instead of leaving work behind.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.websockets import WebSocket

from affectkit.serve.batcher import Batcher
from affectkit.serve.sessions import SessionPool, UnknownSession

__all__ = ["open_session"]


async def open_session(batcher: Batcher[Any], pool: SessionPool, ws: WebSocket,
                       session_id: str) -> tuple[tuple[int, list[str]], asyncio.Task[Any] | None] | None:
    """``((next position, participants), receiving)`` once the session is live, where ``receiving`` is the
    socket's pending (or finished) first receive, to be awaited in place of ``ws.receive()``; None if the
    client left while its session was being rebuilt (the rebuild is dropped).  Raises
    :class:`~affectkit.serve.batcher.Overloaded` at once when the rebuild lane is full, and
    :class:`~affectkit.serve.sessions.UnknownSession` for a deleted session."""
    if pool.is_fresh(session_id):  # live, or new and empty: no rebuild to wait for (a stale answer: get rebuilds)
        return await batcher.run_bounded(pool.position, session_id, what="session openings"), None
    rebuilt = batcher.submit_job(session_id, "session rebuilds")
    receiving = asyncio.ensure_future(ws.receive())
    try:
        await asyncio.wait({rebuilt, receiving}, return_when=asyncio.FIRST_COMPLETED)
        if receiving.done() and receiving.result()["type"] == "websocket.disconnect":
            rebuilt.cancel()
            return None
        opened = await rebuilt
        if opened is None:  # nobody waited for it any more (the rebuild was skipped)
            raise UnknownSession(f"session {session_id} was not opened")
        return opened, receiving
    except BaseException:
        rebuilt.cancel()
        receiving.cancel()
        raise
