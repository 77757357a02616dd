"""Benchmark: per-utterance latency of the streaming engine vs recomputing the causal model on the prefix.

Models: causal CORECT at the preset sizes (``configs/corect_iemocap6_causal.yaml``: hidden 100, text
Transformer 2 layers ff 2048, wp 11, graph heads 7, P-CM 2 cross + 3 self layers), random weights (latency
does not depend on training): a text-only model (384-d text, the sentence encoder's size) and a
three-modality model (text 768, audio 100, visual 512).  For each dialogue position p (default 10, 100,
1000) it reports the median and p99 wall time of

* ``stream``: ``Stream.push`` of utterance p on a session holding utterances 0..p-1 (each sample is
  followed by ``rewind(p)``, so every sample is at position p exactly);
* ``recompute``: ``model(batch)`` on the whole prefix 0..p (what a live system without the engine
  would run at each new utterance),

checks that both give the same logits for utterance p, and prints two tables: wall time (what a caller
waits, including time the OS gives to other jobs on a shared machine) and the calling thread's CPU time
(``time.thread_time``: the engine's own cost, still slowed by other jobs' use of caches and memory).
``torch.inference_mode`` and ``--threads`` (default 1) intra-op threads for both.

Run:  PYTHONPATH=src python bench/stream.py
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from affectkit.config import load_config
from affectkit.data.conversation import ConversationBatch
from affectkit.models import build_model
from affectkit.stream import Stream

MODELS = {
    "text-only (384)": {"text": 384},
    "text+audio+visual (768/100/512)": {"text": 768, "audio": 100, "visual": 512},
}


def _batch(feats: dict[str, torch.Tensor], speakers: torch.Tensor, n: int) -> ConversationBatch:
    """The prefix 0..n-1 of one dialogue as a batch of one."""
    return ConversationBatch(
        features={m: x[:n].unsqueeze(0) for m, x in feats.items()},
        lengths=torch.tensor([n]),
        mask=torch.ones(1, n, dtype=torch.bool),
        speakers=speakers[:n].unsqueeze(0),
        labels=torch.zeros(1, n, dtype=torch.long),
        vids=["bench"],
    )


def _stats(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99))


def bench_model(name: str, dims: dict[str, int], positions: list[int], samples: int, recompute: int,
                seed: int) -> list[dict[str, object]]:
    """Time streaming and recomputation of one model at each position; one row per position."""
    cfg = load_config("configs/corect_iemocap6_causal.yaml", [f"model.modalities={list(dims)}"])
    info = {"dims": dims, "n_classes": 6, "label_names": ["hap", "sad", "neu", "ang", "exc", "fru"],
            "n_speakers": 2, "speakers": ["F", "M"]}
    torch.manual_seed(seed)
    model = build_model(cfg.model_name, cfg.model_params, info).eval()
    gen = torch.Generator().manual_seed(seed)
    total = max(positions) + samples + 1
    feats = {m: torch.randn(total, d, generator=gen) for m, d in dims.items()}
    speakers = torch.randint(0, 2, (total,), generator=gen)
    tags = ["F", "M"]

    def utterance(t: int) -> dict[str, object]:
        return {"speaker": tags[int(speakers[t])], **{m: x[t] for m, x in feats.items()}}

    session = Stream((model, info))
    rows = []
    with torch.inference_mode():
        for p in sorted(positions):
            while len(session) < p:
                session.push(**utterance(len(session)))
            # Samples at position p: utterance p itself first (checked against recomputation), then others.
            stream_s, stream_cpu = [], []
            first = None
            for s in range(samples + 1):  # +1: a warm-up push, not timed
                x = utterance(p if s <= 1 else p + s)
                c0, t0 = time.thread_time(), time.perf_counter()
                pred = session.push(**x)
                dt, dc = time.perf_counter() - t0, time.thread_time() - c0
                session.rewind(p)
                if s == 1:
                    first = torch.tensor(pred.logits)
                if s:
                    stream_s.append(dt)
                    stream_cpu.append(dc)
            batch = _batch(feats, speakers, p + 1)
            full = model(batch)  # warm-up, and the reference logits
            recompute_s, recompute_cpu = [], []
            for _ in range(recompute):
                c0, t0 = time.thread_time(), time.perf_counter()
                model(batch)
                recompute_s.append(time.perf_counter() - t0)
                recompute_cpu.append(time.thread_time() - c0)
            diff = float((full[-1] - first).abs().max())
            sm, sp = _stats(stream_s)
            rm, rp = _stats(recompute_s)
            cm, cp = _stats(stream_cpu)
            rcm = _stats(recompute_cpu)[0]
            rows.append({"model": name, "position": p, "stream_median": sm, "stream_p99": sp,
                         "recompute_median": rm, "recompute_p99": rp, "speedup": rm / sm, "diff": diff,
                         "stream_cpu_median": cm, "stream_cpu_p99": cp, "recompute_cpu_median": rcm})
            print(f"  {name} @ {p}: stream {sm:.2f} ms (p99 {sp:.2f}), recompute {rm:.1f} ms "
                  f"(p99 {rp:.1f}), {rm / sm:.0f}x, max |logit diff| {diff:.1e}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every model at every position, print the table and the targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--samples", type=int, default=200, help="timed stream pushes per position")
    parser.add_argument("--recompute", type=int, default=20, help="timed prefix recomputations per position")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.positions) < 0 or args.samples < 1 or args.recompute < 1:
        parser.error("positions must be >= 0, --samples and --recompute >= 1")

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), python {platform.python_version()}, "
          f"{args.samples} stream samples and {args.recompute} recomputations per position")
    rows = []
    for name, dims in MODELS.items():
        rows += bench_model(name, dims, args.positions, args.samples, args.recompute, args.seed)

    print()
    print("Wall time (what a caller waits):")
    print("| model | position | stream median | stream p99 | recompute median | recompute p99 | speed-up "
          "(median) | max abs logit diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['position']} | {r['stream_median']:.2f} ms | {r['stream_p99']:.2f} ms | "
              f"{r['recompute_median']:.1f} ms | {r['recompute_p99']:.1f} ms | {r['speedup']:.0f}x | "
              f"{r['diff']:.1e} |")
    print()
    print("CPU time of the calling thread (time.thread_time: excludes time the OS gave to other jobs):")
    print("| model | position | stream median | stream p99 | recompute median | speed-up (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['position']} | {r['stream_cpu_median']:.2f} ms | "
              f"{r['stream_cpu_p99']:.2f} ms | {r['recompute_cpu_median']:.1f} ms | "
              f"{r['recompute_cpu_median'] / r['stream_cpu_median']:.0f}x |")
    top = max(args.positions)
    print()
    for r in rows:
        if r["position"] == top:
            ok_p99 = "ok" if r["stream_p99"] < 20 else "MISSED"
            ok_x = "ok" if r["speedup"] >= 10 else "MISSED"
            print(f"{r['model']} @ {top}: p99 {r['stream_p99']:.2f} ms (target < 20 ms: {ok_p99}); "
                  f"{r['speedup']:.0f}x faster than recomputing (target >= 10x: {ok_x})")


if __name__ == "__main__":
    main()
