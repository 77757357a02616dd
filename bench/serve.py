"""Load test of ``affectkit serve``: N concurrent WebSocket sessions on localhost, each sending raw
sentences at a fixed rate (open loop: sends are scheduled, not paced by answers), bounded in count and
duration; prints p50/p99 latency, throughput, errors and lost utterances.

Two parts, one run:
1. the target load (default 32 sessions x 2 utterances/s x 60 s), side by side on the server with engine
   batching (the sessions of a batch step in one forward) and with encoder-only batching
   (``--no-engine-batch``: one sentence-encoder call per batch, then one push per session);
2. the maximum sustained throughput (p99 < 250 ms, no errors, nothing lost) with engine batching, with
   encoder-only batching, and without batching (``--max-batch 1``): the per-session rate steps up until a
   step fails.

``--abuse`` runs instead the target load while one client attacks the same server with the operator key
(a leaked key, or an abusive tenant): it floods session creation, sends invalid frames as fast as the
server answers, and reconnects over and over; both sides are printed.  ``--attack junk`` (or ``flood``,
``churn``) runs one part alone; ``--refusal-delay 0 1`` compares servers that answer rate-limit refusals at
once with ones that hold them back (``affectkit serve --refusal-delay``), side by side.

The model is the text-only causal preset (``configs/corect_iemocap6_causal.yaml`` with
``model.modalities=[text]``, 384-d sentence-encoder features), randomly initialised: speed does not
depend on the weights.  Each server is a child process (``affectkit serve --port 0``) stopped at the end.

    python bench/serve.py                      # the full run (about 4 minutes)
    python bench/serve.py --duration 5 --step-duration 3 --rates 2 4   # a quick look
    python bench/serve.py --abuse --duration 30                        # under attack (about 1 minute)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from server_proc import ServeProcess  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("well I really think that we should talk about what happened yesterday at the office because it "
         "was not fair to anyone and you know it so please just listen to me for a minute okay").split()


def make_checkpoint(folder: Path, encoder_base: str = "minilm") -> Path:
    """The text-only causal preset with random weights, on MiniLM's 384-d vectors or (``mpnet``) on the
    assembled all-mpnet-base-v2's 768-d ones, recorded in the checkpoint as its encoder."""
    import torch

    from affectkit.checkpoint import save_checkpoint
    from affectkit.config import load_config
    from affectkit.models import build_model

    cfg = load_config(ROOT / "configs" / "corect_iemocap6_causal.yaml", ["model.modalities=[text]"])
    info: dict[str, Any] = {"dims": {"text": 384}, "n_classes": 6, "n_speakers": 2, "speakers": ["F", "M"],
                            "label_names": ["hap", "sad", "neu", "ang", "exc", "fru"]}
    if encoder_base == "mpnet":
        from affectkit.features.encoder_ref import encoder_record
        from affectkit.features.packaged import packaged_dir

        info["encoder"] = encoder_record(packaged_dir("mpnet"))
        info["dims"] = {"text": 768}
    torch.manual_seed(0)
    model = build_model(cfg.model_name, cfg.model_params, info)
    path = folder / f"causal_text_{encoder_base}.pt"
    save_checkpoint(path, cfg, info, model)
    return path


KEY = "bench-operator-key-0123456789"
SETUP = ["--create-burst", "200", "--api-key", KEY]  # the bench's sessions are made at once, with the key
HEADERS = {"X-API-Key": KEY}


class Server(ServeProcess):
    def __init__(self, checkpoint: Path, store: Path, max_batch: int, threads: int | None,
                 args: tuple[str, ...] = ()) -> None:
        extra = ["--threads", str(threads)] if threads else []
        super().__init__(checkpoint, store, ["--max-batch", str(max_batch), *SETUP, *extra, *args])


def sentence(rng: random.Random) -> str:
    """3-25 words drawn at random: practically never the same sentence twice, as in a meeting (the server's
    text-vector cache then saves nothing, unlike a bench that repeats its sentences)."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25)))


async def session(url: str, rate: float, duration: float, seed: int, out: dict, created: Any = None) -> None:
    import httpx
    from websockets.asyncio.client import connect

    rng = random.Random(seed)
    sent: dict[int, float] = {}
    try:
        async with httpx.AsyncClient(timeout=60) as http:
            s = (await http.post(url + "/v1/sessions", headers=HEADERS)).json()
        out["created"] += 1
        if created is not None and out["created"] == out["sessions"]:
            created.set()  # every legitimate session exists: the attacker's flood may start
        async with connect(url.replace("http://", "ws://") + s["stream"],
                           additional_headers={"Authorization": f"Bearer {s['token']}"}) as ws:
            json.loads(await ws.recv())

            async def receive() -> None:
                async for raw in ws:
                    a = json.loads(raw)
                    if a.get("type") == "error":
                        out["errors"].append(a.get("error"))
                        sent.pop(a.get("id"), None)
                    else:
                        out["latency"].append(time.perf_counter() - sent.pop(a["id"]))
                        out["server_ms"].append(a["latency_ms"])
                    if not sent and out["done_sending"] >= out["sessions"]:
                        return

            reader = asyncio.create_task(receive())
            start = time.perf_counter() + rng.random() / rate  # spread the sessions' phases
            n = int(duration * rate)
            for k in range(n):
                await asyncio.sleep(max(0.0, start + k / rate - time.perf_counter()))
                sent[k] = time.perf_counter()
                out["sent"] += 1
                await ws.send(json.dumps({"speaker": ["ana", "ben"][rng.random() < 0.4], "text": sentence(rng),
                                          "id": k}))
            out["done_sending"] += 1
            try:
                await asyncio.wait_for(reader, timeout=10)  # drain: what is still unanswered then is lost
            except asyncio.TimeoutError:
                reader.cancel()
    except Exception as exc:  # noqa: BLE001 - a failed connection counts as an error, the run goes on
        out["errors"].append(type(exc).__name__)
    out["lost"] += len(sent)


_LOADS = itertools.count()  # every load() sends sentences never sent before (the server caches text vectors)


async def load(url: str, sessions: int, rate: float, duration: float, created: Any = None) -> dict:
    salt = next(_LOADS) * 100_000
    out = {"latency": [], "server_ms": [], "errors": [], "sent": 0, "lost": 0, "done_sending": 0,
           "sessions": sessions, "created": 0}
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(session(url, rate, duration, salt + k, out, created) for k in range(sessions)))
    lat = np.array(out["latency"]) * 1000
    return {"sessions": sessions, "rate": rate, "offered": sessions * rate, "sent": out["sent"],
            "client_cpu_per_s": (time.process_time() - c0) / (time.perf_counter() - t0),
            "answered": len(lat), "throughput": len(lat) / duration, "wall": time.perf_counter() - t0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
            "server_p50_ms": float(np.percentile(out["server_ms"], 50)) if len(lat) else float("nan"),
            "server_p99_ms": float(np.percentile(out["server_ms"], 99)) if len(lat) else float("nan"),
            "errors": len(out["errors"]), "error_kinds": sorted(set(out["errors"])), "lost": out["lost"]}


def show(name: str, r: dict) -> None:
    print(f"{name:<28} {r['sessions']:>3} x {r['rate']:>4g}/s  offered {r['offered']:>6.1f}/s  "
          f"answered {r['throughput']:>6.1f}/s  p50 {r['p50_ms']:>7.1f} ms  p99 {r['p99_ms']:>7.1f} ms  "
          f"(server side p50 {r['server_p50_ms']:.1f} p99 {r['server_p99_ms']:.1f})  "
          f"errors {r['errors']} {','.join(r['error_kinds'])}  lost {r['lost']}", flush=True)


def max_sustained(url: str, sessions: int, rates: list[float], step: float, p99_ms: float, name: str) -> dict | None:
    best = None
    for rate in rates:
        r = asyncio.run(load(url, sessions, rate, step))
        ok = r["p99_ms"] < p99_ms and r["errors"] == 0 and r["lost"] == 0
        show(f"{name} {'ok' if ok else 'FAIL'}", r)
        if not ok:
            break
        best = r
    return best


async def attacker(url: str, duration: float, out: dict, go: Any,
                   parts: tuple[str, ...] = ("flood", "junk", "churn")) -> None:
    """One client, for ``duration`` s: floods session creation, sends invalid frames on 4 sessions as fast as
    they are answered, and reconnects to 4 sessions over and over; counts what it got back."""
    import httpx
    from websockets.asyncio.client import connect

    end = time.perf_counter() + duration
    async with httpx.AsyncClient(timeout=30) as http:
        own = [(await http.post(url + "/v1/sessions", headers=HEADERS)).json() for _ in range(8)]

        async def flood() -> None:  # once the legitimate sessions exist (they come from the same address here)
            await asyncio.get_running_loop().run_in_executor(None, go.wait, 120)
            while time.perf_counter() < end:
                r = await http.post(url + "/v1/sessions", headers=HEADERS)
                out["create"][r.status_code] = out["create"].get(r.status_code, 0) + 1

        def count(what: str, kind: str) -> None:
            out[what][kind] = out[what].get(kind, 0) + 1

        async def junk(s: dict) -> None:  # invalid frames as fast as answered; reconnects when closed
            k = 0
            while time.perf_counter() < end:
                try:
                    async with connect(url.replace("http://", "ws://") + s["stream"],
                                       additional_headers={"Authorization": f"Bearer {s['token']}"}) as ws:
                        await ws.recv()
                        while time.perf_counter() < end:
                            frame = ["{not json", json.dumps({"speaker": 7}), json.dumps({"speaker": "x", "features": {
                                "text": [10**400] * 384}}), b"\x00" * 64][k % 4]
                            k += 1
                            await ws.send(frame)
                            a = json.loads(await ws.recv())
                            count("frames", a.get("error", a["type"]))
                except Exception as exc:  # noqa: BLE001 - closed or refused: counted, then again
                    count("frames", "closed: " + (str(getattr(exc, "rcvd", None) and exc.rcvd.code)
                                                  if hasattr(exc, "rcvd") else type(exc).__name__))
                    await asyncio.sleep(0.05)

        async def churn(s: dict) -> None:
            while time.perf_counter() < end:
                try:
                    async with connect(url.replace("http://", "ws://") + s["stream"],
                                       additional_headers={"Authorization": f"Bearer {s['token']}"}) as ws:
                        a = json.loads(await ws.recv())
                        kind = a.get("error", a["type"])
                except Exception as exc:  # noqa: BLE001 - a refused upgrade is an outcome, counted
                    response = getattr(exc, "response", None)
                    kind = f"HTTP {response.status_code}" if response is not None else type(exc).__name__
                count("reconnects", kind)

        await asyncio.gather(*([flood()] if "flood" in parts else []),
                             *(junk(s) for s in own[:4] if "junk" in parts),
                             *(churn(s) for s in own[4:] if "churn" in parts))


def _attack_process(url: str, duration: float, queue: Any, go: Any, cpus: set[int] | None,
                    parts: tuple[str, ...]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    attack: dict = {"create": {}, "frames": {}, "reconnects": {}}
    asyncio.run(attacker(url, duration, attack, go, parts))
    attack["cpu_s"] = time.process_time()  # the attacker's own CPU, which the server's machine paid here
    queue.put(attack)


def under_attack(url: str, sessions: int, rate: float, duration: float, cpus: set[int] | None = None,
                 parts: tuple[str, ...] = ("flood", "junk", "churn")) -> tuple[dict, dict]:
    """The target load while the attacker (a process of its own, on ``cpus`` if given, so its client work
    does not delay the legitimate clients' event loop) runs from 1 s before to 2 s after it."""
    import multiprocessing

    queue: Any = multiprocessing.Queue()
    go = multiprocessing.Event()
    proc = multiprocessing.Process(target=_attack_process, args=(url, duration + 3, queue, go, cpus, parts))
    proc.start()
    try:
        time.sleep(1.0)
        legit = asyncio.run(load(url, sessions, rate, duration, go))
        attack = queue.get(timeout=duration + 60)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return legit, attack


def finish(results: dict, json_path: str | None) -> None:
    """The load average after the run, printed and kept; the figures written to ``json_path`` if given."""
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after']}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))


def target_and_steps(server: Server, name: str, args: Any, results: dict, target: bool) -> None:
    """On a started ``server``: a warm-up, the target load (when ``target``), then the rate steps of the
    maximum sustained throughput; figures into ``results`` under ``name``; the server is stopped."""
    try:
        asyncio.run(load(server.url, 4, 2, 2))  # warm up
        if target:
            r = asyncio.run(load(server.url, args.sessions, args.rate, args.duration))
            show(f"target ({name})", r)
            results[f"target {name}"] = r
        results[name] = max_sustained(server.url, args.sessions, args.rates, args.step_duration, args.p99_ms, name)
    finally:
        server.stop()


def abuse_run(ckpt: Path, store: Path, runtime: str, args: Any, attacker_cpus: set[int] | None,
              refusal_delay: float = 1.0) -> dict:
    """The target load on a fresh server (text encoder on ``runtime``, refusals held back up to
    ``refusal_delay`` s), first alone, then under attack."""
    burst = str(2 * args.sessions + 16)  # the bench's own sessions; the flood meets the limit
    print(f"--- server with --text-runtime {runtime} --refusal-delay {refusal_delay:g}", flush=True)
    server = Server(ckpt, store, 32, args.threads, ("--create-burst", burst, "--text-runtime", runtime,
                                                    "--refusal-delay", str(refusal_delay)))
    try:
        asyncio.run(load(server.url, 4, 2, 2))  # warm up
        cpu0 = server.cpu()
        calm = asyncio.run(load(server.url, args.sessions, args.rate, args.duration))
        cpu1 = server.cpu()
        show("legitimate, no attack", calm)
        legit, attack = under_attack(server.url, args.sessions, args.rate, args.duration, attacker_cpus,
                                     tuple(args.attack))
        cpu2 = server.cpu()
    finally:
        server.stop()
    calm["server_cpu_per_s"] = (cpu1 - cpu0) / calm["wall"]
    # the attack runs from 1 s before the legitimate load to about 3 s after it
    legit["server_cpu_per_s"] = (cpu2 - cpu1) / (legit["wall"] + 4)
    show("legitimate, under attack", legit)
    print(f"attacker: session creations {attack['create']}; invalid frames answered {attack['frames']}; "
          f"reconnects {attack['reconnects']}", flush=True)
    print(f"CPU seconds per second: server {calm['server_cpu_per_s']:.2f} calm, "
          f"{legit['server_cpu_per_s']:.2f} under attack; legitimate clients {calm['client_cpu_per_s']:.2f} calm, "
          f"{legit['client_cpu_per_s']:.2f} under attack; the attacker's own client "
          f"{attack['cpu_s'] / (args.duration + 3):.2f} (all on the same {os.cpu_count()} cores here)", flush=True)
    return {"calm": calm, "legit": legit, "attack": attack}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a causal text checkpoint (default: the preset, random weights)")
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--rate", type=float, default=2.0, help="utterances per second per session (part 1)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of part 1")
    p.add_argument("--step-duration", type=float, default=10.0, help="seconds per step of part 2")
    p.add_argument("--rates", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12])
    p.add_argument("--p99-ms", type=float, default=250.0)
    p.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--abuse", action="store_true", help="the target load while one client attacks (see above)")
    p.add_argument("--servers", nargs="+", default=["batched", "encoder-only", "unbatched"],
                   choices=["batched", "encoder-only", "unbatched"], help="which servers the load runs on")
    p.add_argument("--encoder-base", nargs="+", default=["minilm"], choices=["minilm", "mpnet"],
                   help="the checkpoint's text encoder (default: the preset on MiniLM); several: one after another")
    p.add_argument("--text-runtime", nargs="+", default=["onnx"], choices=["torch", "onnx", "onnx-int8"],
                   help="the servers' sentence-encoder runtime (--abuse: one server each, side by side; "
                        "otherwise the first)")
    p.add_argument("--attack", nargs="+", default=["flood", "junk", "churn"], choices=["flood", "junk", "churn"],
                   help="with --abuse: what the attacker does (default: all three; one at a time finds what costs)")
    p.add_argument("--refusal-delay", type=float, nargs="+", default=[1.0],
                   help="with --abuse: the servers' --refusal-delay (several: one server each, side by side)")
    p.add_argument("--pin", action="store_true",
                   help="with --abuse: the attacker alone on the last CPU, the server and the legitimate clients on "
                        "the others (the attacker's client CPU stands for a remote machine's)")
    args = p.parse_args()
    attacker_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        attacker_cpus = {cpus[-1]}
        os.sched_setaffinity(0, set(cpus[:-1]))  # the server (a child) inherits it
        print(f"pinned: attacker on CPU {cpus[-1]}, server and legitimate clients on CPU(s) {cpus[:-1]}")
    print(f"load average before: {os.getloadavg()}", flush=True)
    results: dict = {"load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(Path(tmp), args.encoder_base[0])
        if args.abuse:
            runs = [(rt, d) for rt in args.text_runtime for d in args.refusal_delay]
            for runtime, delay in runs:
                key = runtime if len(args.refusal_delay) == 1 else f"{runtime} delay {delay:g}"
                results[key] = abuse_run(ckpt, Path(tmp) / f"abuse-{runtime}-{delay:g}.db", runtime, args,
                                         attacker_cpus, delay)
            if len(runs) > 1:
                print("side by side (p99 ms: no attack / under attack, client-measured and server-side; server "
                      "CPU s per s under attack; attack answers per s):")
                for key in (k for k in results if isinstance(results[k], dict) and "legit" in results[k]):
                    r = results[key]
                    answers = sum(sum(v.values()) for v in r["attack"].values() if isinstance(v, dict))
                    print(f"  {key:22s} client {r['calm']['p99_ms']:7.1f} / {r['legit']['p99_ms']:7.1f}   "
                          f"server {r['calm']['server_p99_ms']:7.1f} / {r['legit']['server_p99_ms']:7.1f}   "
                          f"lost {r['calm']['lost']} / {r['legit']['lost']}   CPU {r['legit']['server_cpu_per_s']:.2f}"
                          f"   attack answers {answers / (args.duration + 3):.0f}/s")
            finish(results, args.json)
            return
        if len(args.encoder_base) > 1 or len(args.text_runtime) > 1:  # encoders x runtimes, batched, side by side
            for base in args.encoder_base:  # the first base's checkpoint is the one made (or given) above
                base_ckpt = ckpt if base == args.encoder_base[0] else make_checkpoint(Path(tmp), base)
                for runtime in args.text_runtime:
                    key = f"{base} {runtime}"
                    server = Server(base_ckpt, Path(tmp) / f"store-{base}-{runtime}.db", 32, args.threads,
                                    ("--text-runtime", runtime))
                    target_and_steps(server, key, args, results, target=True)
            print(f"max sustained at p99 < {args.p99_ms:g} ms (batched server, every sentence new):")
            for base in args.encoder_base:
                for runtime in args.text_runtime:
                    r = results.get(f"{base} {runtime}")
                    print(f"  {base:6s} {runtime:9s} {r['throughput'] if r else 0:.1f}/s")
            finish(results, args.json)
            return
        servers = [(n, b, e) for n, b, e in (("batched", 32, ()), ("encoder-only", 32, ("--no-engine-batch",)),
                                               ("unbatched", 1, ())) if n in args.servers]
        for name, batch, extra in servers:
            server = Server(ckpt, Path(tmp) / f"store-{name}.db", batch, args.threads,
                            (*extra, "--text-runtime", args.text_runtime[0]))
            target_and_steps(server, name, args, results, target=batch > 1)
    b, e, u = results.get("batched"), results.get("encoder-only"), results.get("unbatched")
    if b and e:
        print(f"engine batching vs encoder-only at p99 < {args.p99_ms:g} ms: {b['throughput']:.1f}/s vs "
              f"{e['throughput']:.1f}/s ({b['throughput'] / e['throughput']:.2f}x)")
    if b and u:
        print(f"max sustained throughput at p99 < {args.p99_ms:g} ms: batched {b['throughput']:.1f}/s, "
              f"unbatched {u['throughput']:.1f}/s, ratio {b['throughput'] / u['throughput']:.2f}x")
    else:
        print(f"max sustained throughput at p99 < {args.p99_ms:g} ms: batched "
              f"{b['throughput'] if b else 'none'}, unbatched {u['throughput'] if u else 'none'}")
    finish(results, args.json)


if __name__ == "__main__":
    main()
