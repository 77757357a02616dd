"""Scale-out of ``affectkit serve``: replicas on one PostgreSQL behind HAProxy, on this machine.

Three parts, one run, each side by side:
1. **1 vs 2 replicas through the balancer**: the maximum sustained throughput (p99 < 250 ms, no errors,
   nothing lost) of the load of ``bench/serve.py`` (N sessions sending raw sentences, open loop) through
   HAProxy with the sample ``examples/haproxy.cfg`` in front of one replica and in front of two (each replica
   ``--threads 1``; a database each).  Both setups are up at once and take turns at every rate step (the order
   alternating), so a change of the machine's load hits both.  The load generator runs on the same machine.
2. **The log's cost per acknowledged utterance, on its own**: ``append`` of batches of 1, 8 and 32 utterances
   (384-d features, one transaction each, committed before it returns) into SQLite (WAL, ``synchronous=FULL``)
   and into PostgreSQL (``synchronous_commit=on``, ``fsync=on``), alternating batch by batch: wall time per
   batch and per utterance.
3. **The same through the service**: one replica, no balancer, SQLite vs PostgreSQL, at a fixed load:
   p50/p99 latency and the replica's CPU per answered utterance.

PostgreSQL is a throw-away cluster (``initdb`` in a temporary folder, 127.0.0.1, fsync on); every process is
stopped at the end.

    python bench/replicas.py                          # the full run (about 10 minutes)
    python bench/replicas.py --rates 1 2 --step-duration 4 --fixed-duration 5   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from serve import HEADERS, SETUP, load, make_checkpoint, show  # noqa: E402 (bench/ on sys.path)
from server_proc import ServeProcess  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from affectkit.serve.store import Record, open_store  # noqa: E402
from affectkit.serve.throwaway import LocalHAProxy, LocalPostgres, free_port, haproxy_config  # noqa: E402

assert HEADERS  # the sessions are created with the bench's operator key (SETUP passes it to each replica)


def replicas(ckpt: Path, store: str, n: int, threads: int) -> list[ServeProcess]:
    out: list[ServeProcess] = []
    try:
        for _ in range(n):
            out.append(ServeProcess(ckpt, store, [*SETUP, "--threads", str(threads), "--forwarded-allow-ips",
                                                  "127.0.0.1"]))
    except BaseException:
        for r in out:
            r.stop()
        raise
    return out


class Balanced:
    """``n`` replicas on a fresh database behind HAProxy (the sample configuration)."""

    def __init__(self, ckpt: Path, pg: LocalPostgres, n: int, threads: int) -> None:
        self.n = n
        self.servers = replicas(ckpt, pg.create_database(f"scale_{n}"), n, threads)
        port = free_port()
        cfg = haproxy_config((ROOT / "examples" / "haproxy.cfg").read_text(), port,
                             [int(s.url.rsplit(":", 1)[1]) for s in self.servers])
        try:
            self.lb = LocalHAProxy(cfg, port)
        except BaseException:
            self.stop()
            raise
        self.url = self.lb.url

    def cpu(self) -> list[float]:
        return [s.cpu() for s in self.servers]

    def stop(self) -> None:
        if hasattr(self, "lb"):
            self.lb.stop()
        for s in self.servers:
            s.stop()


def side_by_side(ckpt: Path, pg: LocalPostgres, args: argparse.Namespace) -> dict:
    """Part 1: 1 and 2 replicas up at once; at each rate step both run (in alternating order), until both fail."""
    setups = [Balanced(ckpt, pg, 1, args.threads)]
    try:
        setups.append(Balanced(ckpt, pg, 2, args.threads))
        time.sleep(1.5)  # health checks: rise 2 x 500 ms
        for b in setups:
            asyncio.run(load(b.url, 4, 2, 2))  # warm up
        best: dict[int, dict | None] = {1: None, 2: None}
        failed: set[int] = set()
        cpu0 = {b.n: b.cpu() for b in setups}
        for k, rate in enumerate(args.rates):
            for b in (setups if k % 2 == 0 else setups[::-1]):
                if b.n in failed:
                    continue
                r = asyncio.run(load(b.url, args.sessions, rate, args.step_duration))
                ok = r["p99_ms"] < args.p99_ms and r["errors"] == 0 and r["lost"] == 0
                r["load"] = os.getloadavg()[0]
                show(f"{b.n} replica{'s' if b.n > 1 else ''} {'ok' if ok else 'FAIL'} (load {r['load']:.1f})", r)
                if ok:
                    best[b.n] = r
                else:
                    failed.add(b.n)
            if len(failed) == 2:
                break
        for b in setups:
            if best[b.n] is not None:
                best[b.n]["replica_cpu_s"] = [round(c - c0, 1) for c, c0 in zip(b.cpu(), cpu0[b.n])]
        return {"one_replica": best[1], "two_replicas": best[2]}
    finally:
        for b in setups:
            b.stop()


def _record(session: str, position: int, rng: np.random.Generator) -> Record:
    return Record(session, position, "ana", "well I really think that we should talk", {
        "text": rng.standard_normal(384).astype(np.float32)}, "neu", [1 / 6] * 6, 12.5)


def store_cost(targets: dict[str, str], batches: int, size: int) -> list[dict]:
    """Part 2: ``batches`` appends of ``size`` utterances (each over its own session's next positions) into each
    backend, alternating backends batch by batch (side by side under the same load)."""
    rng = np.random.default_rng(0)
    stores = {name: open_store(t) for name, t in targets.items()}
    times: dict[str, list[float]] = {name: [] for name in stores}
    cpu: dict[str, float] = {name: 0.0 for name in stores}
    try:
        sessions = [f"s{k}" for k in range(size)]
        for store in stores.values():
            for sid in sessions:
                store.create_session(sid, "t")
        for b in range(batches):
            recs = [_record(sid, b, rng) for sid in sessions]
            for name in (list(stores) if b % 2 == 0 else list(stores)[::-1]):
                c, t = time.process_time(), time.perf_counter()
                stores[name].append(recs)
                times[name].append(time.perf_counter() - t)
                cpu[name] += time.process_time() - c
    finally:
        for store in stores.values():
            store.close()
    out = []
    for name, ts in times.items():
        ms = np.array(ts) * 1000
        out.append({"backend": name, "batch": size, "batches": batches, "median_ms": float(np.median(ms)),
                    "p99_ms": float(np.percentile(ms, 99)), "per_utt_ms": float(np.median(ms)) / size,
                    "client_cpu_ms_per_utt": cpu[name] * 1000 / (batches * size)})
    return out


def fixed_load(ckpt: Path, store: str, args: argparse.Namespace) -> dict:
    """Part 3: one replica on ``store`` at the fixed load; latency and the replica's CPU per answered utterance."""
    (server,) = replicas(ckpt, store, 1, args.threads)
    try:
        asyncio.run(load(server.url, 4, 2, 2))  # warm up
        cpu0 = server.cpu()
        r = asyncio.run(load(server.url, args.sessions, args.fixed_rate, args.fixed_duration))
        r["server_cpu_ms_per_utt"] = (server.cpu() - cpu0) * 1000 / max(1, r["answered"])
        return r
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=32)
    p.add_argument("--rates", type=float, nargs="+", default=[1, 2, 3, 4, 6, 8, 10, 12, 16],
                   help="per-session rates of part 1, stepped up until p99 fails (both setups)")
    p.add_argument("--step-duration", type=float, default=10.0)
    p.add_argument("--p99-ms", type=float, default=250.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument("--batches", type=int, default=300, help="part 2: appends per batch size and backend")
    p.add_argument("--fixed-rate", type=float, default=1.0, help="part 3: utterances per second per session")
    p.add_argument("--fixed-duration", type=float, default=20.0)
    p.add_argument("--parts", nargs="+", default=["scale", "store", "service"], choices=["scale", "store", "service"])
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    results: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "args": vars(args)}
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs; load average before "
          f"{results['load_before']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, LocalPostgres(fsync=True) as pg:
        ckpt = make_checkpoint(Path(tmp))
        if "scale" in args.parts:
            scale = side_by_side(ckpt, pg, args)
            results.update(scale)
            one, two = scale["one_replica"], scale["two_replicas"]
            if one and two:
                print(f"max sustained through HAProxy at p99 < {args.p99_ms:g} ms: 1 replica {one['throughput']:.1f}/s,"
                      f" 2 replicas {two['throughput']:.1f}/s: {two['throughput'] / one['throughput']:.2f}x "
                      f"(replica CPU s over the steps: {one['replica_cpu_s']} vs {two['replica_cpu_s']})", flush=True)
            else:
                print(f"max sustained: 1 replica {one and one['throughput']}, 2 replicas {two and two['throughput']}")
        if "store" in args.parts:
            rows = []
            for size in (1, 8, 32):
                pair = store_cost({"sqlite": str(Path(tmp) / f"cost{size}.db"),
                                   "postgresql": pg.create_database(f"cost_{size}")}, args.batches, size)
                for r in pair:
                    print(f"append {r['backend']:<10} batch {size:>2}: {r['median_ms']:7.3f} ms/batch (p99 "
                          f"{r['p99_ms']:7.3f}), {r['per_utt_ms']:6.3f} ms per acknowledged utterance; client CPU "
                          f"{r['client_cpu_ms_per_utt']:.3f} ms/utt", flush=True)
                s, g = pair
                print(f"batch {size:>2}: PostgreSQL/SQLite wall per utterance {g['per_utt_ms'] / s['per_utt_ms']:.2f}x",
                      flush=True)
                rows += pair
            results["store"] = rows
        if "service" in args.parts:
            svc = {}
            for name, store in (("sqlite", str(Path(tmp) / "service.db")),
                                ("postgresql", pg.create_database("service"))):
                r = fixed_load(ckpt, store, args)
                show(f"one replica, {name}", r)
                print(f"  replica CPU {r['server_cpu_ms_per_utt']:.2f} ms per answered utterance", flush=True)
                svc[name] = r
            results["service"] = svc
            s, g = svc["sqlite"], svc["postgresql"]
            print(f"through the service: p50 {s['p50_ms']:.1f} vs {g['p50_ms']:.1f} ms, replica CPU/utt "
                  f"{s['server_cpu_ms_per_utt']:.2f} vs {g['server_cpu_ms_per_utt']:.2f} ms (SQLite vs PostgreSQL)")
    results["load_after"] = os.getloadavg()
    print(f"load average after: {results['load_after']} (median of the three: "
          f"{statistics.median(results['load_after']):.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
