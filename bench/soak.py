"""Soak test of ``affectkit serve``: a rotating population of sessions for many distinct utterances, with
the server's resident memory, open file descriptors, threads and store size printed at every tenth.

Each of ``--concurrency`` clients loops: take a session (a new one, or now and then one left earlier, which
the server rebuilds from its log if it was evicted), open its WebSocket, send a few utterances (each text
distinct: a running number in it), close; then delete the session (``--delete`` of them) or leave it (it is
evicted after ``--idle-evict`` seconds idle and may be resumed later).  The run stops by itself after
``--utterances`` answers (or ``--max-minutes``).  Target: from the first tenth (warm-up) to the end, resident
memory grows by at most 5%; file descriptors and threads stay constant.  Descriptors are counted apart from
the TCP sockets (one per open connection, which come and go with the clients); threads include the web
framework's worker pool (AnyIO: threads start on demand, at most 40, and leave after 10 s idle) and SQLite
opens its WAL files as needed, so the check is that neither goes higher in the second half than in the first.

The server is a child process (``affectkit serve --port 0 --threads 1``, 127.0.0.1 only) stopped at the end;
its checkpoint is the text-only causal preset with the shipped MiniLM encoder (random weights: memory does
not depend on them), or ``--finetuned``: the same carrying a fine-tuned MiniLM encoder (trained here for one
epoch on a tiny synthetic IEMOCAP, input recipe: speaker + 2 past turns), or ``--checkpoint PATH``.

    python bench/soak.py                                    # 100,000 utterances, MiniLM preset
    python bench/soak.py --utterances 5000 --finetuned      # a quicker look, fine-tuned encoder
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

from server_proc import ServeProcess  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("well I really think that we should talk about what happened yesterday at the office because it "
         "was not fair to anyone and you know it so please just listen to me for a minute okay").split()


def make_checkpoint(folder: Path, encoder: Path | None = None) -> Path:
    """The text-only causal preset (random weights, 384-d), recording ``encoder`` when given."""
    import torch

    from affectkit.checkpoint import save_checkpoint
    from affectkit.config import load_config
    from affectkit.features.encoder_ref import encoder_record
    from affectkit.models import build_model

    cfg = load_config(ROOT / "configs" / "corect_iemocap6_causal.yaml", ["model.modalities=[text]"])
    info = {"dims": {"text": 384}, "n_classes": 6, "label_names": ["hap", "sad", "neu", "ang", "exc", "fru"],
            "n_speakers": 2, "speakers": ["F", "M"]}
    if encoder is not None:
        info["encoder"] = encoder_record(encoder)
    torch.manual_seed(0)
    model = build_model(cfg.model_name, cfg.model_params, info)
    path = folder / ("causal_text_finetuned.pt" if encoder is not None else "causal_text.pt")
    save_checkpoint(path, cfg, info, model)
    return path


def make_finetuned_encoder(folder: Path) -> Path:
    """MiniLM fine-tuned for one epoch on a tiny synthetic IEMOCAP (speaker + 2 past turns): a real-sized
    fine-tuned encoder, as ``affectkit finetune-text`` writes it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from finetune_helpers import write_tiny_iemocap

    from affectkit.features.finetune import FinetuneConfig, finetune_text

    data = write_tiny_iemocap(folder / "data", n_train=8, n_valid=2, n_test=2)
    cfg = FinetuneConfig(context=2, speaker=True, epochs=1, batch_size=8, max_length=64)
    finetune_text("iemocap", data, folder / "enc", cfg, progress=False, threads=1)
    return folder / "enc"


class Server(ServeProcess):
    def __init__(self, checkpoint: Path, store: Path, idle_evict: float) -> None:
        # one client address stands for many users here: the creation rate limit is lifted (the sessions'
        # own limits stay as they are)
        super().__init__(checkpoint, store, ["--threads", "1", "--idle-evict", str(idle_evict),
                                             "--create-rate", "60000", "--create-burst", "1000"],
                         env={"OMP_NUM_THREADS": "1"})


def store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.parent.glob(store.name + "*"))


def caches(metrics: str) -> dict[str, int]:
    """``affectkit_cache_entries`` per cache from the /metrics text."""
    return {m.group(1): int(float(m.group(2)))
            for m in re.finditer(r'^affectkit_cache_entries\{cache="([^"]+)"\} (\S+)$', metrics, re.M)}


class Soak:
    """The client side: a rotating population of sessions, counting answers and errors."""

    def __init__(self, url: str, total: int, concurrency: int, delete: float, resume: float, seed: int) -> None:
        self.url, self.total, self.concurrency = url, total, concurrency
        self.delete, self.resume = delete, resume
        self.rng = random.Random(seed)
        self.sent = self.answered = self.created = self.deleted = self.resumed = 0
        self.errors: dict[str, int] = {}
        self.left: list[tuple[str, str, int]] = []  # sessions left open: (id, token, utterances so far)

    def text(self) -> str:
        start = self.rng.randrange(len(WORDS) - 4)
        n = self.sent
        self.sent += 1
        return f"{' '.join(WORDS[start:start + self.rng.randint(3, 20)])} (number {n})"

    async def client(self, http: object) -> None:
        from websockets.asyncio.client import connect

        while self.sent < self.total:
            if self.left and self.rng.random() < self.resume:
                sid, token, count = self.left.pop(self.rng.randrange(len(self.left)))
                self.resumed += 1
            else:
                r = await http.post(self.url + "/v1/sessions")  # type: ignore[attr-defined]
                if r.status_code != 201:  # a refusal is counted, never a crash of the client
                    self.errors[f"create {r.status_code}"] = self.errors.get(f"create {r.status_code}", 0) + 1
                    await asyncio.sleep(1.0)
                    continue
                s = r.json()
                sid, token, count = s["id"], s["token"], 0
                self.created += 1
            async with connect(f"{self.url.replace('http://', 'ws://')}/v1/sessions/{sid}/stream",
                               additional_headers={"Authorization": f"Bearer {token}"}, max_size=2**20) as ws:
                ready = json.loads(await ws.recv())
                if ready.get("position") != count:
                    self.errors["bad_resume"] = self.errors.get("bad_resume", 0) + 1
                for _ in range(self.rng.randint(5, 40)):
                    if self.sent >= self.total:
                        break
                    t0 = time.perf_counter()
                    await ws.send(json.dumps({"speaker": self.rng.choice(["ana", "ben"]), "text": self.text()}))
                    a = json.loads(await ws.recv())
                    if a.get("type") == "prediction":
                        self.answered += 1
                        count += 1
                    else:
                        self.errors[a.get("error", "?")] = self.errors.get(a.get("error", "?"), 0) + 1
                    await asyncio.sleep(max(0.0, 1 / 15 - (time.perf_counter() - t0)))  # under the 20/s rate limit
            if self.rng.random() < self.delete:
                r = await http.delete(f"{self.url}/v1/sessions/{sid}",  # type: ignore[attr-defined]
                                      headers={"Authorization": f"Bearer {token}"})
                self.deleted += r.status_code == 204
            else:
                self.left.append((sid, token, count))
                del self.left[:-500]  # sessions never resumed stay in the store (retention's business)

    async def run(self, report: object, max_seconds: float) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=120) as http:
            clients = [asyncio.create_task(self.client(http)) for _ in range(self.concurrency)]
            watcher = asyncio.create_task(report(http))  # type: ignore[operator]
            try:
                await asyncio.wait_for(asyncio.gather(*clients), max_seconds)
            except asyncio.TimeoutError:
                print(f"stopped by --max-minutes after {self.answered} answers", flush=True)
            finally:
                for t in clients:
                    t.cancel()
                await asyncio.gather(*clients, return_exceptions=True)
                await report(http, final=True)  # type: ignore[operator]
                watcher.cancel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utterances", type=int, default=100_000, help="distinct utterances to send (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="sessions talking at once")
    p.add_argument("--delete", type=float, default=0.6, help="share of sessions deleted when their client leaves")
    p.add_argument("--resume", type=float, default=0.2, help="chance a client takes up a session left earlier")
    p.add_argument("--idle-evict", type=float, default=5.0, help="the server's --idle-evict (seconds)")
    p.add_argument("--max-minutes", type=float, default=180.0, help="stop after this long whatever the count")
    p.add_argument("--finetuned", action="store_true", help="a checkpoint carrying a fine-tuned MiniLM encoder")
    p.add_argument("--checkpoint", help="serve this causal text checkpoint instead")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import psutil

    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            t0 = time.perf_counter()
            enc = make_finetuned_encoder(root) if args.finetuned else None
            ckpt = make_checkpoint(root, enc)
            print(f"checkpoint {ckpt.name} ({'fine-tuned encoder' if enc else 'shipped MiniLM'}) made in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
        store = root / "soak.db"
        server = Server(ckpt, store, args.idle_evict)
        proc = psutil.Process(server.proc.pid)
        soak = Soak(server.url, args.utterances, args.concurrency, args.delete, args.resume, args.seed)
        rows: list[dict] = []
        start = time.perf_counter()

        async def report(http: object, final: bool = False) -> None:
            step = max(1, args.utterances // 10)
            next_at = step
            while True:
                if not final:
                    while soak.answered < next_at:
                        await asyncio.sleep(0.2)
                metrics = (await http.get(server.url + "/metrics")).text  # type: ignore[attr-defined]
                sockets = len(getattr(proc, "net_connections", proc.connections)(kind="inet"))
                row = {"answered": soak.answered, "s": time.perf_counter() - start, "sockets": sockets,
                       "rss_mib": proc.memory_info().rss / 2**20, "fds": proc.num_fds() - sockets,
                       "threads": proc.num_threads(),
                       "store_mib": store_bytes(store) / 2**20, "caches": caches(metrics)}
                if not rows or rows[-1]["answered"] != row["answered"]:
                    rows.append(row)
                    c = row["caches"]
                    print(f"{row['answered']:>8} utt {row['s']:>7.0f} s  rss {row['rss_mib']:7.1f} MiB  "
                          f"fds {row['fds']:>3} + {row['sockets']:>2} sockets  threads {row['threads']:>3}  "
                          f"store {row['store_mib']:7.1f} MiB  "
                          f"text_vectors {c.get('text_vectors', '-')}  live {c.get('sessions_live')}  "
                          f"buckets {c.get('rate_buckets')}  connections {c.get('connections')}", flush=True)
                if final:
                    return
                next_at += step

        try:
            asyncio.run(soak.run(report, args.max_minutes * 60))
        finally:
            server.stop()
    print(f"sessions created {soak.created}, deleted {soak.deleted}, resumed {soak.resumed}; answers "
          f"{soak.answered} in {time.perf_counter() - start:.0f} s; errors {soak.errors or 0}")
    if len(rows) >= 2:
        warm, end = rows[0], rows[-1]
        growth = end["rss_mib"] / warm["rss_mib"] - 1
        peak = max(r["rss_mib"] for r in rows[1:]) / warm["rss_mib"] - 1
        fds, threads = [r["fds"] for r in rows], [r["threads"] for r in rows]
        half = len(rows) // 2
        ok = growth <= 0.05 and peak <= 0.05 and max(fds[half:]) <= max(fds[:half]) and \
            max(threads[half:]) <= max(threads[:half])
        print(f"after warm-up ({warm['answered']} utt): rss {warm['rss_mib']:.1f} -> {end['rss_mib']:.1f} MiB "
              f"({growth:+.1%}, peak {peak:+.1%}); fds besides sockets {min(fds)}-{max(fds)} (max {max(fds[:half])} "
              f"in the first half, {max(fds[half:])} in the second); threads {min(threads)}-{max(threads)} "
              f"(max {max(threads[:half])} / {max(threads[half:])}): {'target met' if ok else 'TARGET MISSED'} "
              "(rss <= +5%; fds and threads no higher in the second half than in the first)")


if __name__ == "__main__":
    main()
