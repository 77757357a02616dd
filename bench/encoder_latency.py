"""Per-utterance embedding latency of the frozen text encoders, side by side: MiniLM vs mpnet (p50/p99).

What the live service pays per new utterance for its text vector: one sentence at a time (batch of one), one
torch thread, the text-vector cache off (the model is called directly; no sentence is ever embedded twice
by an encoder anyway).  The encoders take turns on each sentence, in an order that rotates, so both see the
same load on a shared machine.  Wall and this thread's CPU time are recorded per call; the CPU time is the
steadier figure when other jobs compete for the cores (a call preempted or stopped shows in wall only).

    python bench/encoder_latency.py --sentences 1000 --json results/encoder_latency/latency.json

Sentences: the real IEMOCAP transcripts when ``--source`` holds them (deduplicated, shuffled with ``--seed``;
only timings are written out), else random word strings.  Another encoder path (e.g. an ONNX or int8 one)
becomes another column by adding it to :func:`encoders`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("i you we they it is was not so very really what why how okay yeah well know think want need "
         "feel happy sad angry tired great fine sorry thanks today tomorrow home work money time people "
         "never always maybe just right wrong good bad love hate leave stay talk listen wait please").split()

Embed = Callable[[str], np.ndarray]


def encoders(names: list[str]) -> dict[str, Embed]:
    """Name -> a callable embedding one sentence (float32 vector), loaded and ready; the bench's columns."""
    from affectkit.features.packaged import packaged_dir
    from affectkit.features.text import SentenceEncoder

    def frozen(folder: Path | None) -> Embed:
        enc = SentenceEncoder(use_cache=False, batch_size=1, encoder=folder)
        return lambda s: enc.encode([s])[0]

    makers: dict[str, Callable[[], Embed]] = {
        "minilm": lambda: frozen(None),  # all-MiniLM-L6-v2 through sentence-transformers, as the service does
        "mpnet": lambda: frozen(packaged_dir("mpnet")),  # all-mpnet-base-v2 through transformers (LocalEncoder)
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise SystemExit(f"unknown encoder(s) {', '.join(unknown)}; known: {', '.join(makers)}")
    return {n: makers[n]() for n in names}


def sentences(source: Path, n: int, seed: int) -> tuple[list[str], str]:
    """``n`` distinct sentences: real IEMOCAP transcripts if found under ``source``, else random words."""
    rng = random.Random(seed)
    try:
        from affectkit.data.cosmic import load_cosmic

        data = load_cosmic("iemocap", source)
        pool = sorted({s.strip() for split in data.splits.values() for d in split for s in d["sentences"]
                       if s.strip()})
        if len(pool) >= n:
            rng.shuffle(pool)
            return pool[:n], "IEMOCAP transcripts (all splits, deduplicated, shuffled)"
    except Exception:  # noqa: BLE001 (any reason the real file is not usable: fall back)
        pass
    out: set[str] = set()
    while len(out) < n:
        out.add(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 25))))
    return sorted(out), "random word strings, 3-25 words"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(embed: dict[str, Embed], texts: list[str], warmup: int) -> dict[str, dict[str, list[float]]]:
    """Wall and thread-CPU milliseconds per call, per encoder; the first ``warmup`` sentences are not kept."""
    names = list(embed)
    out = {n: {"wall_ms": [], "cpu_ms": []} for n in names}
    for i, text in enumerate(texts):
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotate who goes first
            c0, t0 = time.thread_time(), time.perf_counter()
            v = embed[name](text)
            t1, c1 = time.perf_counter(), time.thread_time()
            if v.ndim != 1 or not np.isfinite(v).all():
                raise SystemExit(f"{name}: bad vector for sentence {i}")
            if i >= warmup:
                out[name]["wall_ms"].append((t1 - t0) * 1e3)
                out[name]["cpu_ms"].append((c1 - c0) * 1e3)
    return out


STATS = (("p50", 50), ("p90", 90), ("p99", 99))
#: A call whose wall time exceeds its CPU time by this much waited for a CPU (another job, or a stopped process).
STALL_MS = 1000.0


def summary(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {**{k: float(np.percentile(a, q)) for k, q in STATS}, "mean": float(a.mean()), "max": float(a.max())}


def table(results: dict[str, dict[str, list[float]]]) -> str:
    """One row per statistic, one column per encoder, then each other encoder's ratio to the first."""
    names = list(results)
    first = names[0]
    head = f"{'':>10}" + "".join(f"{n + ' ms':>14}" for n in names) + "".join(
        f"{n + '/' + first:>16}" for n in names[1:])
    lines = [head]
    for clock in ("wall_ms", "cpu_ms"):
        s = {n: summary(results[n][clock]) for n in names}
        for stat in [k for k, _ in STATS] + ["mean", "max"]:
            row = f"{clock[:-3] + ' ' + stat:>10}" + "".join(f"{s[n][stat]:>14.2f}" for n in names)
            row += "".join(f"{s[n][stat] / s[first][stat]:>15.2f}x" for n in names[1:])
            lines.append(row)
    stalls = {n: sum(w - c > STALL_MS for w, c in zip(results[n]["wall_ms"], results[n]["cpu_ms"])) for n in names}
    lines.append(f"calls that waited > {STALL_MS / 1e3:.0f} s for a CPU (stopped or starved): "
                 + ", ".join(f"{n} {k}" for n, k in stalls.items()))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoders", nargs="+", default=["minilm", "mpnet"], help="columns, first is the reference")
    p.add_argument("--sentences", type=int, default=1000, help="timed sentences per encoder (default %(default)s)")
    p.add_argument("--warmup", type=int, default=30, help="untimed sentences first (default %(default)s)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default=os.environ.get("AFFECTKIT_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--json", help="also write the figures and every per-call time here")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    before = uptime()
    t_load = time.perf_counter()
    embed = encoders(a.encoders)
    t_load = time.perf_counter() - t_load
    texts, kind = sentences(Path(a.source), a.warmup + a.sentences, a.seed)
    words = np.array([len(t.split()) for t in texts[a.warmup:]])
    t0 = time.perf_counter()
    results = measure(embed, texts, a.warmup)
    run_s = time.perf_counter() - t0
    after = uptime()

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [
        f"encoder latency, {now}: one sentence at a time, {torch.get_num_threads()} torch thread(s), "
        f"text-vector cache off",
        f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{sys.platform}",
        f"sentences: {a.sentences} timed per encoder after {a.warmup} warm-up, {kind}; words per sentence "
        f"median {np.median(words):.0f}, p99 {np.percentile(words, 99):.0f}, max {words.max()}",
        f"uptime before: {before}",
        f"uptime after:  {after}",
        f"encoders loaded in {t_load:.1f} s; timed loop {run_s:.1f} s",
    ]
    text = "\n".join(header) + "\n\n" + table(results)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        blob: dict[str, Any] = {
            "date": now, "threads": torch.get_num_threads(), "sentences": a.sentences, "warmup": a.warmup,
            "sentence_kind": kind, "uptime_before": before, "uptime_after": after, "cpu": cpu_model(),
            "torch": torch.__version__, "encoders": list(results),
            "summary": {n: {c: summary(results[n][c]) for c in ("wall_ms", "cpu_ms")} for n in results},
            "per_call": results, "words": words.tolist(),
        }
        Path(a.json).write_text(json.dumps(blob, indent=1))


if __name__ == "__main__":
    main()
