"""The sentence encoder's runtimes side by side: per-sentence latency and what each does to accuracy.

Runtimes (:mod:`affectkit.features.fast_encoder`): ``torch`` (sentence-transformers, the vectors every
training file is built from), ``onnx`` (ONNX Runtime, float32) and ``onnx-int8`` (dynamic int8).

1. **Latency**: one sentence at a time (as a live turn arrives), one thread, every sentence new (the test
   split's real transcripts when ``--source`` has them, else random words), p50/p99 per runtime and the
   ratio to torch; all three measured in one run, interleaved sentence by sentence.
2. **Accuracy** (needs ``--source`` with IEMOCAP; of ``--encoder``'s vectors when given): a causal
   text-only CORECT (``corect_iemocap6_causal.yaml`` with ``model.modalities=[text]``: the model the README
   serves) trained on the torch vectors, one run per seed; its test weighted F1 and the share of test
   utterances whose predicted label changes when the test vectors come from each runtime instead (the live
   service embeds new turns with the runtime, the model was trained on torch vectors).

    python bench/text_runtime.py --source ../shared/data --work results/text_runtime --seeds 42 43 44

Runs are resumable: finished trainings (``WORK/runs/seedS/best.pt``) and feature files are reused.  Prints
everything and writes ``WORK/summary.json`` (``summary_latency.json`` / ``summary_accuracy.json`` with
``--skip-accuracy`` / ``--skip-latency``: the latency part wants a quiet machine, the accuracy part does not).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("torch", "onnx", "onnx-int8")


def test_sentences(source: Path | None, n: int) -> tuple[list[str], str]:
    if source is not None:
        from affectkit.data.cosmic import load_cosmic

        data = load_cosmic("iemocap", source)
        sentences = list(dict.fromkeys(s for d in data.splits["test"] for s in d["sentences"]))
        return sentences[:n], f"IEMOCAP test transcripts ({min(n, len(sentences))} distinct)"
    words = "well I really think we should talk about what happened at the office yesterday okay".split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 25))) for _ in range(n)], "random words"


def latency(sentences: list[str], cache: Path, encoder: str | None = None) -> dict[str, dict[str, float]]:
    import torch

    from affectkit.features.text import SentenceEncoder

    torch.set_num_threads(1)
    encoders = {rt: SentenceEncoder(cache, use_cache=False, runtime=rt, batch_size=1, encoder=encoder)
                for rt in RUNTIMES}
    for e in encoders.values():
        e.encode(["warm up", "a second warm-up sentence"])
    times: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
    cpu: dict[str, float] = dict.fromkeys(RUNTIMES, 0.0)
    for s in sentences:  # interleaved: a slow moment of the machine hits every runtime alike
        for rt, e in encoders.items():
            c0, t0 = time.process_time(), time.perf_counter()
            e.encode([s])
            times[rt].append(time.perf_counter() - t0)
            cpu[rt] += time.process_time() - c0
    out = {}
    for rt in RUNTIMES:
        a = np.array(times[rt]) * 1000
        out[rt] = {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
                   "mean_ms": float(a.mean()), "cpu_ms": 1000 * cpu[rt] / len(sentences)}
    return out


def train_seed(feats: Path, run_dir: Path, seed: int) -> Path:
    from affectkit.config import load_config
    from affectkit.train import train

    best = run_dir / "best.pt"
    if best.is_file() and (run_dir / "metrics.json").is_file():
        return best
    cfg = load_config(ROOT / "configs" / "corect_iemocap6_causal.yaml", [
        "model.modalities=[text]", f"train.seed={seed}",
        "train.num_threads=1", "train.progress=false", "train.tensorboard=false"])
    train(cfg, data_path=feats, run_dir=run_dir)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", help="data root with iemocap_cosmic/ (real transcripts); without it: latency only")
    p.add_argument("--work", default="results/text_runtime")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p.add_argument("--sentences", type=int, default=600, help="sentences of the latency part")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--encoder", help="this encoder folder's runtimes instead of the shipped MiniLM's (e.g. the "
                                     "assembled all-mpnet-base-v2): latency, and accuracy with its own feature "
                                     "files and trainings (WORK/iemocap_NAME_RUNTIME.pkl, WORK/runs_NAME/)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    source = Path(args.source) if args.source else None
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": os.getloadavg()}
    print(f"load average before: {summary['load_before']}", flush=True)
    if not args.skip_latency:
        sentences, what = test_sentences(source, args.sentences)
        lat = latency(sentences, cache, args.encoder)
        name = Path(args.encoder).name if args.encoder else "all-MiniLM-L6-v2"
        summary["latency"] = {"sentences": what, "encoder": name, **lat}
        print(f"per-sentence embedding latency of {name}, one thread, batch 1, {what}:")
        for rt in RUNTIMES:
            r = lat[rt]
            print(f"  {rt:9s} p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  mean {r['mean_ms']:6.2f} ms  "
                  f"CPU {r['cpu_ms']:6.2f} ms  ({lat['torch']['mean_ms'] / r['mean_ms']:.2f}x torch's speed)",
                  flush=True)
    if source is not None and not args.skip_accuracy:
        from affectkit.evaluate import evaluate_checkpoint
        from affectkit.features.text import build_text_features
        from affectkit.predict import predict_checkpoint

        tag = f"_{Path(args.encoder).name}" if args.encoder else ""
        feats = {}
        for rt in RUNTIMES:
            feats[rt] = work / f"iemocap{tag}_{rt}.pkl"
            if not feats[rt].is_file():
                build_text_features("iemocap", source, feats[rt], cache_dir=cache, progress=False, runtime=rt,
                                    encoder=args.encoder)
        rows = []
        for seed in args.seeds:
            t0 = time.process_time()
            ckpt = train_seed(feats["torch"], work / f"runs{tag}" / f"seed{seed}", seed)
            row: dict = {"seed": seed, "train_cpu_s": round(time.process_time() - t0, 1)}
            labels = {}
            for rt in RUNTIMES:
                row[rt] = evaluate_checkpoint(ckpt, feats[rt], splits=["test"], device="cpu")["test"]
                _, preds = predict_checkpoint(ckpt, feats[rt], splits=["test"], device="cpu")
                labels[rt] = [r.label for r in preds]
            for rt in RUNTIMES[1:]:
                row[f"changed_{rt}"] = float(np.mean([a != b for a, b in zip(labels["torch"], labels[rt])]))
            rows.append(row)
            print(f"seed {seed}: test wF1 " + "  ".join(
                f"{rt} {row[rt]['F1_weighted']:.4f}" for rt in RUNTIMES) + "   labels changed: " + "  ".join(
                f"{rt} {100 * row[f'changed_{rt}']:.2f}%" for rt in RUNTIMES[1:]), flush=True)
        summary["accuracy"] = rows
        for rt in RUNTIMES:
            f1 = [r[rt]["F1_weighted"] for r in rows]
            print(f"  {rt:9s} test wF1 mean {np.mean(f1):.4f} over {len(f1)} seed(s)"
                  + (f"; labels changed vs torch {100 * np.mean([r[f'changed_{rt}'] for r in rows]):.2f}%"
                     if rt != "torch" else ""))
    summary["load_after"] = os.getloadavg()
    name = "summary" + ("_latency" if args.skip_accuracy else "_accuracy" if args.skip_latency else "")
    if args.encoder:
        name += "_" + Path(args.encoder).name
    (work / f"{name}.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"load average after: {summary['load_after']}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    main()
