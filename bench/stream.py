"""Benchmark: push latency and session state of the streaming engine, to 10,000 utterances, vs recomputing.

Models: causal CORECT at the preset sizes (``configs/corect_iemocap6_causal.yaml``: hidden 100, text
Transformer 2 layers / 4 heads / ff 2048, wp 11, graph heads 7, P-CM 2 cross + 3 self layers, 2 heads),
random weights (latency does not depend on training), with ``--context`` (default: the causal presets' window,
``configs/corect_causal.yaml``): a text-only model (384-d text, the sentence encoder's size) and a three-modality
model (text 768, audio 100, visual 512); plus the text-only model with ``context: null`` (full causal attention,
growing caches) for comparison, without recomputation.

One session per model pushes utterances 0, 1, 2, ... to the largest position, **every push timed**
(``time.perf_counter``; including the pushes that grow a cache).  When the session holds p utterances
(p in ``--positions``, default 10, 100, 1000, 10000) it also takes ``--samples`` timed pushes at position
p exactly (each followed by ``rewind(p)``), reports their median, p99 and p99.9 and ``Stream.state_bytes``,
and times ``--recompute`` calls of the batch model on the prefix 0..p (what a live system without the
engine would run at each new utterance), checking that both give the same logits for utterance p.

Run:  PYTHONPATH=src python bench/stream.py          (about 15 minutes on a loaded 2-core machine)
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from affectkit.data.conversation import ConversationBatch
from affectkit.models import build_model
from affectkit.stream import Stream

PRESET = {"hidden": 100, "text_layers": 2, "text_heads": 4, "text_ff": 2048, "wp": 11, "wf": 0, "graph_heads": 7,
          "pcm_layers": 2, "pcm_heads": 2, "pcm_self_layers": 3, "causal": True}
MODELS = {
    "text-only (384)": {"text": 384},
    "text+audio+visual (768/100/512)": {"text": 768, "audio": 100, "visual": 512},
}


def _batch(feats: dict[str, torch.Tensor], speakers: torch.Tensor, n: int) -> ConversationBatch:
    """The prefix 0..n-1 of one dialogue as a batch of one."""
    return ConversationBatch(features={m: x[:n].unsqueeze(0) for m, x in feats.items()}, lengths=torch.tensor([n]),
                             mask=torch.ones(1, n, dtype=torch.bool), speakers=speakers[:n].unsqueeze(0),
                             labels=torch.zeros(1, n, dtype=torch.long), vids=["bench"])


def _pct(seconds: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(seconds) * 1e3
    return float(np.median(ms)), float(np.percentile(ms, 99)), float(np.percentile(ms, 99.9))


def bench_model(name: str, dims: dict[str, int], context: int | None, positions: list[int], samples: int,
                recompute: int, seed: int) -> tuple[list[dict[str, object]], list[float]]:
    info = {"dims": dims, "n_classes": 6, "n_speakers": 2, "speakers": ["F", "M"]}
    torch.manual_seed(seed)
    model = build_model("corect", {**PRESET, "modalities": list(dims), "context": context}, info).eval()
    top = max(positions)
    rng = np.random.default_rng(seed)
    feats = {m: torch.from_numpy(rng.standard_normal((top + 1, d)).astype(np.float32)) for m, d in dims.items()}
    speakers = torch.from_numpy(rng.integers(0, 2, top + 1))
    session = Stream((model, info))

    cpu: list[float] = []

    def push(t: int) -> tuple[float, tuple[float, ...]]:
        kwargs = {m: x[t] for m, x in feats.items()}
        start, start_cpu = time.perf_counter(), time.thread_time()
        pred = session.push(["F", "M"][int(speakers[t])], **kwargs)
        cpu.append(time.thread_time() - start_cpu)
        return time.perf_counter() - start, pred.logits

    rows, every = [], []
    for p in range(top + 1):
        if p in positions:
            times = []
            cpu.clear()
            for _ in range(samples):
                dt, logits = push(p)
                times.append(dt)
                session.rewind(p)
            row: dict[str, object] = {"model": name, "context": context, "position": p,
                                      "stream": _pct(times), "state": session.state_bytes,
                                      "cpu": _pct(cpu)}
            if recompute:
                calls = recompute if p < 5000 else 1
                batch = _batch(feats, speakers, p + 1)
                with torch.inference_mode():
                    want = model(batch)[-1]
                    rtimes = []
                    for _ in range(calls):
                        start = time.perf_counter()
                        model(batch)
                        rtimes.append(time.perf_counter() - start)
                row["recompute"] = float(np.median(rtimes)) * 1e3
                row["diff"] = float((torch.tensor(logits) - want).abs().max())
            rows.append(row)
            print(_line(row), flush=True)
        if p < top:
            every.append(push(p)[0])
    return rows, every


def _line(r: dict[str, object]) -> str:
    med, p99, p999 = r["stream"]  # type: ignore[misc]
    ctx = "null" if r["context"] is None else r["context"]
    text = (f"  {r['model']} context {ctx} @ {r['position']}: stream median {med:.2f} ms, p99 {p99:.2f}, "
            f"p99.9 {p999:.2f} (CPU {r['cpu'][0]:.2f} / {r['cpu'][1]:.2f} / {r['cpu'][2]:.2f}), "  # type: ignore[index]
            f"state {r['state']:,} B")
    if "recompute" in r:
        text += f"; recompute {r['recompute']:.1f} ms ({r['recompute'] / med:.0f}x), max |logit diff| {r['diff']:.1e}"
    return text


def preset_context() -> int:
    """The attention window of the causal presets (what a live session runs by default)."""
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "corect_causal.yaml"
    return int(yaml.safe_load(path.read_text())["model"]["context"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", default="10,100,1000,10000")
    ap.add_argument("--samples", type=int, default=1000, help="timed pushes at each position")
    ap.add_argument("--recompute", type=int, default=5, help="timed recomputations per position (1 from 5000)")
    ap.add_argument("--context", type=int, default=preset_context())
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-null", action="store_true", help="skip the context: null comparison")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    positions = [int(p) for p in args.positions.split(",")]
    print(f"torch {torch.__version__}, {args.threads} thread(s), python {platform.python_version()}, "
          f"{args.samples} pushes per position, every push timed")
    runs = [(name, dims, args.context, args.recompute) for name, dims in MODELS.items()]
    if not args.no_null:
        runs.append(("text-only (384)", MODELS["text-only (384)"], None, 0))
    table, summary = [], []
    for name, dims, context, recompute in runs:
        rows, every = bench_model(name, dims, context, positions, args.samples, recompute, args.seed)
        table += rows
        med, p99, p999 = _pct(every)
        summary.append(f"| {name} | {'null' if context is None else context} | {len(every):,} | {med:.2f} | "
                       f"{p99:.2f} | {p999:.2f} | {max(every) * 1e3:.2f} |")
    print("\nWall time (what a caller waits); CPU time of the calling thread (time.thread_time) in brackets:\n")
    print("| model | context | position | median | p99 | p99.9 | CPU median / p99 / p99.9 | state bytes | "
          "recompute median | speed-up | max abs logit diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        med, p99, p999 = r["stream"]  # type: ignore[misc]
        rec = f"{r['recompute']:.1f} ms | {r['recompute'] / med:.0f}x | {r['diff']:.1e}" if "recompute" in r \
            else "- | - | -"
        ctx = "null" if r["context"] is None else r["context"]
        c = r["cpu"]
        print(f"| {r['model']} | {ctx} | {r['position']:,} | {med:.2f} ms | {p99:.2f} ms | {p999:.2f} ms | "
              f"{c[0]:.2f} / {c[1]:.2f} / {c[2]:.2f} ms | {r['state']:,} | {rec} |")  # type: ignore[index]
    print("\nEvery push of the run from utterance 0 to the last position (ms):\n")
    print("| model | context | pushes | median | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(summary))
    for name in MODELS:
        by = {r["position"]: r for r in table if r["model"] == name and r["context"] == args.context}
        lo, hi = by.get(100), by.get(max(positions))
        if lo and hi:
            ratio = hi["stream"][1] / lo["stream"][1]  # type: ignore[index]
            same = hi["state"] == by.get(1000, hi)["state"]
            cpu = hi["cpu"][1] / lo["cpu"][1]  # type: ignore[index]
            speed = hi.get("recompute", 0) / hi["stream"][0]  # type: ignore[index, operator]
            print(f"\n{name}: p99 at {hi['position']} / p99 at 100 = {ratio:.2f} wall, {cpu:.2f} CPU "
                  f"(target <= 1.2); state at 1000 == at {hi['position']}: {same}; "
                  f"{speed:.0f}x faster than recomputing (target >= 100x)")


if __name__ == "__main__":
    main()
