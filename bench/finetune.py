"""Fine-tuning cost of the text encoder on a real train split: time per epoch, utterances per second, peak RSS.

Runs ``affectkit.features.finetune.finetune_text`` (the shipped all-MiniLM-L6-v2, or ``--encoder-base mpnet``;
the real transcripts) for
``--epochs`` epochs and prints per-epoch wall and CPU time (training only; dev evaluation timed apart in the
total), training utterances per second, the process's peak RSS, the load average, and how many epochs fit in
the issue's 20-minute budget.  The CPU time is the steadier figure on a shared machine.

    python bench/finetune.py --dataset iemocap --epochs 1 --threads 2

``--summaries DIR ...`` reads instead the per-epoch times that ``affectkit finetune-text`` recorded while it
trained the given encoders (``DIR/training_summary.json``): the cost of the encoders behind the tables.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from affectkit.features.finetune import FinetuneConfig, finetune_text

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="iemocap", choices=["iemocap", "iemocap4", "meld"])
    p.add_argument("--source", default=os.environ.get("AFFECTKIT_DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=0)
    p.add_argument("--speaker", action="store_true")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--encoder-base", default="minilm", help="base encoder by name: minilm or mpnet")
    p.add_argument("--out", help="output folder (default: a temporary folder, removed)")
    p.add_argument("--summaries", nargs="+", metavar="DIR", help="report finished encoders instead of training")
    a = p.parse_args()
    if a.summaries:
        report_summaries(a.summaries)
        return

    cfg = FinetuneConfig(context=a.context, speaker=a.speaker, epochs=a.epochs, max_length=a.max_length,
                         batch_size=a.batch_size, seed=a.seed)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out) if a.out else Path(tmp) / "encoder"
        wall, cpu = time.perf_counter(), time.process_time()
        from affectkit.features.packaged import base_dir

        s = finetune_text(a.dataset, a.source, out, cfg, progress=True, threads=a.threads,
                          base=base_dir(a.encoder_base))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    n = s["utterances"]["train"]
    print(f"torch {torch.__version__}, threads {a.threads}, {os.cpu_count()} CPUs, load average {load0:.1f} at "
          f"start / {os.getloadavg()[0]:.1f} at end; {sys.platform}")
    print(f"{a.dataset} train {n} utterances (dev {s['utterances']['dev']}, test {s['utterances']['test']}), "
          f"base {a.encoder_base}; "
          f"context {a.context}, speaker {a.speaker}, max_length {a.max_length}, batch {a.batch_size}")
    for e, (w, c) in enumerate(zip(s["epoch_seconds"], s["epoch_cpu_seconds"]), 1):
        print(f"  epoch {e}: {w:.1f} s wall ({n / w:.1f} utt/s), {c:.1f} s CPU ({n / c:.1f} utt/s per CPU-second)")
    per_epoch = sorted(s["epoch_seconds"])[len(s["epoch_seconds"]) // 2]
    print(f"whole run {wall:.1f} s wall, {cpu:.1f} s CPU (load, tokenise, train, dev eval, test eval, save); "
          f"peak RSS {rss:.0f} MiB")
    print(f"epochs of this size in 20 min at this wall rate: {1200 / per_epoch:.1f}")
    print(f"classifier weighted F1 dev {s['dev']['F1_weighted']:.4f} test {s['test']['F1_weighted']:.4f} "
          f"(best epoch {s['best_epoch']})")


def report_summaries(folders: list[str]) -> None:
    """One line per finished encoder: recipe, threads, per-epoch wall and CPU seconds, the whole fine-tuning's
    CPU time (what fits the 20-minute budget on 2 cores: CPU seconds / 2 with both cores busy), dev/test."""
    import json

    print("encoder | dataset | recipe | threads | epochs | s/epoch wall (CPU) | train CPU min | utt/CPU-s | "
          "dev / test wF1 (distilled: agreement with the teacher)")
    for folder in folders:
        s = json.loads((Path(folder) / "training_summary.json").read_text())
        r, n = s["recipe"], s["utterances"]["train"]
        cpu = [c for c in s["epoch_cpu_seconds"] if c is not None]
        recipe = f"context {r['context']}" + (", speaker" if r["speaker"] else "")
        recipe += ", class weights" if s.get("config", {}).get("class_weights") else ""
        wall = sorted(s["epoch_seconds"])[len(s["epoch_seconds"]) // 2]
        per_cpu = sorted(cpu)[len(cpu) // 2] if cpu else float("nan")
        if "distilled_from" in s:  # affectkit distil-text: agreement with the teacher, not a classifier
            recipe += f", distilled from {s['distilled_from']['name']}"
            scores = (f"R^2 {s['dev']['r2']:.3f} / {s['test']['r2']:.3f}, cosine {s['dev']['cosine']:.3f} / "
                      f"{s['test']['cosine']:.3f}")
        else:
            scores = f"{s['dev']['F1_weighted']:.4f} / {s['test']['F1_weighted']:.4f}"
        print(f"{folder} | {s['dataset']} ({n} train) | {recipe} | {s.get('threads')} | "
              f"{len(s['epoch_seconds'])} (best {s['best_epoch']}) | {wall:.0f} ({per_cpu:.0f}) | "
              f"{sum(cpu) / 60:.1f} | {n / per_cpu:.1f} | {scores}")


if __name__ == "__main__":
    main()
