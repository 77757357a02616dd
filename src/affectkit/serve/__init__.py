"""The live service: ``affectkit serve CHECKPOINT`` (see :mod:`affectkit.serve.app`).

``store`` keeps every utterance and its prediction durably (SQLite, WAL) and replays a session's log;
``batcher`` groups utterances from different sessions into one encoder call off the event loop;
``sessions`` holds the live :class:`~affectkit.stream.Stream` per session and rebuilds evicted ones;
``app`` is the FastAPI application (routes, WebSocket stream, metrics, the browser view in ``web/``).
Nothing here runs on import; FastAPI/uvicorn come from the ``[serve]`` extra.
"""
