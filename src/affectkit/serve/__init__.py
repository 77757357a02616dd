"""The live service: ``affectkit serve CHECKPOINT`` (see :mod:`affectkit.serve.app`).

Layout, each module importing only those above it (no circles):

- ``store``: every utterance, its prediction and the answering model's identity, durably (SQLite, WAL);
- ``batcher``: cross-session micro-batching on one worker thread, plus the bounded rebuild lane;
- ``sessions``: the live :class:`~affectkit.stream.Stream` per session, stepped together, rebuilt by prefill;
- ``access``: tokens, the operator key, allowed hosts and origins, token buckets (plain functions);
- ``metrics``: the Prometheus registry;
- ``service``: the container (settings, model and its identity, store, pool, batcher, metrics, limiters);
- ``protocol``: WebSocket frames (wire formats, parsing, checking, the one answer per frame);
- ``reconnect`` and ``audio_ws``: opening a session on a socket; speech over the socket;
- ``app``: the routes and the checks at the door; ``run``: settings checked, then uvicorn.

Nothing here runs on import; FastAPI/uvicorn come from the ``[serve]`` extra.
"""
