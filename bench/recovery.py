"""Reconnect storm after a restart of ``affectkit serve``: how long until every returning session is
answered, what a fresh session's utterances wait meanwhile, and what a rebuild costs per logged utterance,
stepped utterance by utterance vs prefilled, side by side in one run.

1. Rebuild cost, in-process (the engine alone, ``--threads``): a K-utterance log pushed utterance by
   utterance (how sessions came back before) vs :meth:`Stream.prefill`; median over ``--cost-repeats``.
2. The storm, ``--repeats`` times: a store holding N sessions of K logged utterances each; the server is
   (re)started on it, so no session is in memory; a fresh session sends a raw sentence every 0.5 s; ``--calm``
   seconds after its first answer, all N clients connect at once, each waits for its ``ready`` and sends one
   raw sentence.  Printed: the time from the storm's start until all N are answered, and the fresh session's latency
   during the storm (p50/p99/max, pooled over the repeats) and outside it.

The model is the text-only causal preset (``configs/corect_iemocap6_causal.yaml`` with
``model.modalities=[text]``: window 16, 384-d sentence-encoder features), random weights.  The log is written
straight to the store (random unit vectors as the logged text features; a rebuild reads features and
speakers, never labels).  Bounded: every wait has a timeout; the server is a child process stopped at the end.

    python bench/recovery.py                     # 40 x 100, 3 storms
    python bench/recovery.py --sessions 8 --logged 50 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import HEADERS, Server, make_checkpoint, sentence  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIM = 384


def write_log(path: Path, sessions: int, logged: int, checkpoint: Path, seed: int = 0) -> list[tuple[str, str]]:
    """A store with ``sessions`` sessions of ``logged`` utterances each, answered by ``checkpoint`` (the log
    records its model); returns their (id, token)."""
    from affectkit.serve.service import identity_of
    from affectkit.serve.store import Record, Store

    rng = np.random.default_rng(seed)
    store = Store(path, synchronous="NORMAL")
    ids = [(f"storm-session-{k:04d}", f"storm-token-{k:04d}") for k in range(sessions)]
    identity = identity_of(checkpoint)
    store.register_model(identity)
    from affectkit.stream import Stream

    engine = Stream(checkpoint, embed=lambda s: None).engine
    for sid, tok in ids:
        store.create_session(sid, tok, identity["hash"])
        x = rng.standard_normal((logged, DIM)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        names = [["ana", "ben"][int(rng.random() < 0.4)] for _ in range(logged)]
        rebuilt = Stream(engine)  # the log's last answer must be the model's (the service checks it on replay)
        rebuilt.prefill([{"speaker": engine.speakers[sorted(set(names), key=names.index).index(n)], "text": x[p]}
                         for p, n in enumerate(names)])
        last = rebuilt.replayed
        store.append([Record(sid, p, names[p], f"logged sentence {p}", {"text": x[p]},
                             last.label if p == logged - 1 else "neu",
                             list(last.probs) if p == logged - 1 else [1 / 6] * 6) for p in range(logged)])
    store.close()
    return ids


def rebuild_cost(checkpoint: Path, logged: int, repeats: int) -> dict:
    """Seconds per logged utterance to rebuild a session: pushed one by one vs prefilled (medians)."""
    from affectkit.stream import Stream

    engine = Stream(checkpoint, embed=lambda s: None).engine
    rng = np.random.default_rng(1)
    log = [{"speaker": ["F", "M"][int(rng.random() < 0.4)], "text": rng.standard_normal(DIM).astype(np.float32)}
           for _ in range(logged)]
    stepped, prefilled = [], []
    for k in range(repeats + 1):  # the first of each is a warm-up
        s = Stream(engine)
        t = time.perf_counter()
        for u in log:
            s.push(**u)
        a = time.perf_counter() - t
        p = Stream(engine)
        t = time.perf_counter()
        p.prefill(log)
        b = time.perf_counter() - t
        if k:
            stepped.append(a / logged)
            prefilled.append(b / logged)
        np.testing.assert_allclose(s.push("F", text=log[0]["text"]).logits, p.push("F", text=log[0]["text"]).logits,
                                   atol=1e-5)
    return {"logged": logged, "start": engine.prefill_start(logged), "stepped_ms": 1000 * float(np.median(stepped)),
            "prefill_ms": 1000 * float(np.median(prefilled))}


async def fresh_session(url: str, stop: asyncio.Event, warm: asyncio.Event, out: list[tuple[float, float]],
                        seed: int) -> None:
    """A new session sending one raw sentence every 0.5 s until ``stop``: (sent at, latency) pairs; ``warm``
    is set at its first answer (a server's first WebSocket handshake takes seconds: not part of the storm)."""
    import httpx
    from websockets.asyncio.client import connect

    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=60) as http:
        s = (await http.post(url + "/v1/sessions", headers=HEADERS)).json()  # the bench server has an operator key
    async with connect(url.replace("http://", "ws://") + s["stream"],
                       additional_headers={"Authorization": f"Bearer {s['token']}"}) as ws:
        json.loads(await ws.recv())
        next_at = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            t = time.perf_counter()
            await ws.send(json.dumps({"speaker": "ana", "text": sentence(rng)}))
            answer = json.loads(await asyncio.wait_for(ws.recv(), 60))
            if answer.get("type") != "prediction":
                raise RuntimeError(f"fresh session: {answer}")
            if warm.is_set():
                out.append((t, time.perf_counter() - t))
            warm.set()
            next_at = t + 0.5


async def returning(url: str, sid: str, token: str, rng: random.Random) -> float:
    """Reconnect, wait for ready, send one sentence: the time its answer arrives."""
    from websockets.asyncio.client import connect

    async with connect(f"{url.replace('http://', 'ws://')}/v1/sessions/{sid}/stream",
                       additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60) as ws:
        ready = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if ready.get("type") != "ready":
            raise RuntimeError(f"{sid}: {ready}")
        await ws.send(json.dumps({"speaker": "ben", "text": sentence(rng)}))
        answer = json.loads(await asyncio.wait_for(ws.recv(), 60))
        if answer.get("type") != "prediction" or answer["position"] != ready["position"]:
            raise RuntimeError(f"{sid}: {answer}")
        return time.perf_counter()


async def storm(url: str, ids: list[tuple[str, str]], calm: float, seed: int) -> dict:
    stop, warm, fresh = asyncio.Event(), asyncio.Event(), []
    fresh_task = asyncio.create_task(fresh_session(url, stop, warm, fresh, seed))
    await asyncio.wait_for(warm.wait(), 120)
    await asyncio.sleep(calm)
    rng = random.Random(seed)
    t0 = time.perf_counter()
    done = await asyncio.wait_for(asyncio.gather(*(returning(url, sid, tok, rng) for sid, tok in ids)), 120)
    t1 = max(done)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.wait_for(fresh_task, 60)
    during = [lat for sent, lat in fresh if sent + lat >= t0 and sent <= t1]
    outside = [lat for sent, lat in fresh if sent + lat < t0 or sent > t1]
    return {"all_answered_s": t1 - t0, "fresh_during_ms": [1000 * x for x in during],
            "fresh_outside_ms": [1000 * x for x in outside]}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=40, help="returning sessions (N)")
    p.add_argument("--logged", type=int, default=100, help="logged utterances per returning session (K)")
    p.add_argument("--repeats", type=int, default=3, help="storms, each on a freshly started server")
    p.add_argument("--calm", type=float, default=3.0, help="seconds of the fresh session alone before each storm")
    p.add_argument("--cost-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and of part 1")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}", flush=True)
    results: dict = {"args": vars(args), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp))
        cost = results["cost"] = rebuild_cost(ckpt, args.logged, args.cost_repeats)
        print(f"rebuild cost per logged utterance ({args.logged} logged, engine in-process, {args.threads} thread): "
              f"step-by-step {cost['stepped_ms']:.3f} ms, prefill {cost['prefill_ms']:.3f} ms "
              f"(computes utterances {cost['start']}..{args.logged - 1}): "
              f"{cost['stepped_ms'] / cost['prefill_ms']:.1f}x cheaper", flush=True)
        storms = []
        for r in range(args.repeats):
            store = Path(tmp) / f"storm{r}.db"
            ids = write_log(store, args.sessions, args.logged, ckpt, seed=r)
            server = Server(ckpt, store, 32, args.threads)
            try:
                s = asyncio.run(storm(server.url, ids, args.calm, seed=r))
            finally:
                server.stop()
            storms.append(s)
            d = s["fresh_during_ms"]
            print(f"storm {r + 1}: {args.sessions} x {args.logged} logged: all answered in "
                  f"{s['all_answered_s']:.2f} s; fresh session during it: {len(d)} utterances, "
                  f"max {max(d) if d else float('nan'):.1f} ms", flush=True)
        results["storms"] = storms
    during = [x for s in storms for x in s["fresh_during_ms"]]
    outside = [x for s in storms for x in s["fresh_outside_ms"]]
    worst = max(s["all_answered_s"] for s in storms)
    print(f"all {args.sessions} returning sessions answered within: worst {worst:.2f} s, "
          f"median {float(np.median([s['all_answered_s'] for s in storms])):.2f} s (target < 3 s)")
    print(f"fresh session during the storms ({len(during)} utterances): p50 {pct(during, 50):.1f} ms, "
          f"p99 {pct(during, 99):.1f} ms, max {max(during) if during else float('nan'):.1f} ms (target max < 250 ms); "
          f"outside: p50 {pct(outside, 50):.1f} ms ({len(outside)} utterances)")
    print(f"prefill vs step-by-step per logged utterance: {cost['stepped_ms'] / cost['prefill_ms']:.1f}x "
          "(target >= 20x)")
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
