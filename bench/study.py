"""Benchmark: wall time of a study, runs one after another (workers=1) vs in parallel processes (workers=2).

Workload (defaults): a synthetic MOSI file with the real sizes and shapes (1284/229/686 clips, 50 steps,
dims 35/300/74, generator seed 0), the lab recipe. Times (time.perf_counter):
  1. one baseline run, ``--epochs`` epochs, torch's default threads (what ``affectkit train`` does);
  2. a reduced study, ``--variants`` of configs/studies/ablations.yaml x ``--seeds`` seeds x ``--epochs`` epochs,
     once with workers=1 (one run after another, all cores to torch: the naive way) and once with
     workers=2 (two processes, one thread each); prints the ratio;
  3. the cost of one training step of every ablation variant relative to the baseline (forward + backward on
     ``--probe-batches`` batches of 16, one thread), to extrapolate the full 17 x 5 x 20-epoch study from the
     measured baseline epoch. The extrapolation is labelled as such.

Run:  python bench/study.py                       (about 5-10 minutes on 2 cores)
      python bench/study.py --small --epochs 1    (a smoke run on the 240/60/120 file)
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

from affectkit.config import config_from_dict, load_config
from affectkit.data.synthetic_mosi import write_synthetic_mosi
from affectkit.models import build_model
from affectkit.studies import available_cores, load_study, run_study
from affectkit.tasks.mosi import regression_loss
from affectkit.train import train

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "configs" / "studies" / "ablations.yaml"


def probe_costs(batches: int) -> dict[str, float]:
    """Seconds per training step (batch 16, real dims, 1 thread) of every variant of the ablations study."""
    study = load_study(ABLATIONS)
    info = {"dims": {"vision": 35, "text": 300, "audio": 74}, "seq_len": 50}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    costs = {}
    try:
        for name, variant in study.variants.items():
            cfg = config_from_dict(variant.raw)
            mods = cfg.model_params.get("modalities", list(info["dims"]))
            model = build_model(cfg.model_name, cfg.model_params, {**info, "dims": {m: info["dims"][m] for m in mods}})
            opt = torch.optim.Adam(model.parameters())
            loss_fn = regression_loss(cfg.train)
            x = {m: torch.randn(16, 50, info["dims"][m]) for m in mods}
            y = torch.rand(16) * 6 - 3
            for step in range(batches + 1):
                if step == 1:
                    t0 = time.perf_counter()  # after one warm-up step
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
            costs[name] = (time.perf_counter() - t0) / batches
    finally:
        torch.set_num_threads(before)
    return costs


def main(argv: list[str] | None = None) -> None:
    """Time one run, the reduced study with 1 and 2 workers, probe the variants, print figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a MOSI file (default: write a real-sized synthetic file, seed 0)")
    parser.add_argument("--small", action="store_true", help="use the 240/60/120 synthetic file instead")
    parser.add_argument("--variants", nargs="+", default=["baseline", "no_layernorm"])
    parser.add_argument("--seeds", type=int, default=2, help="seeds in the reduced study")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--probe-batches", type=int, default=8)
    parser.add_argument("--full-variants", type=int, default=17)
    parser.add_argument("--full-seeds", type=int, default=5)
    parser.add_argument("--full-epochs", type=int, default=20)
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_study_"))
    if args.data:
        data = Path(args.data)
    else:
        data = tmp / ("synth_small_seed0.pkl" if args.small else "synth_full_seed0.pkl")
        write_synthetic_mosi(data, seed=0, sizes={"train": 240, "valid": 60, "test": 120} if args.small else None)
    cores = available_cores()
    print(f"# affectkit study bench, {date.today()}, {platform.processor() or platform.machine()}, {cores} cores, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at start")
    print(f"data: {data.name}")

    sets = [f"train.epochs={args.epochs}", "train.progress=false", "train.tensorboard=false"]
    cfg = load_config(ROOT / "configs" / "mosi_lab.yaml", sets)
    t0 = time.perf_counter()
    one = train(cfg, data_path=data, run_dir=tmp / "one")
    t_one = time.perf_counter() - t0
    epoch = one.train_seconds / args.epochs
    print(f"one baseline run, {args.epochs} epochs, {torch.get_num_threads()} threads: {t_one:.1f} s wall "
          f"({epoch:.1f} s per training epoch incl. validation)")

    # a reduced study: the chosen variants of ablations.yaml
    study = load_study(ABLATIONS)
    reduced = tmp / "reduced.yaml"
    keep = {v: study.variants[v].overrides for v in args.variants}
    reduced.write_text(yaml.safe_dump({
        "name": "bench", "base": str(ROOT / "configs" / "mosi_lab.yaml"), "seeds": list(range(1, args.seeds + 1)),
        "common": {"train.tensorboard": False}, "variants": keep,
    }))
    n_runs = len(keep) * args.seeds
    times = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        res = run_study(reduced, data=data, workers=workers, out=tmp / f"w{workers}", overrides=sets[:1],
                        progress=False)
        times[workers] = time.perf_counter() - t0
        assert not res.failures, res.report()
        print(f"reduced study ({len(keep)} variants x {args.seeds} seeds x {args.epochs} epochs = {n_runs} runs), "
              f"workers={workers}: {times[workers]:.1f} s")
    ratio = times[1] / times[2]
    print(f"ratio workers=1 / workers=2: {ratio:.2f}x")

    costs = probe_costs(args.probe_batches)
    base = costs["baseline"]
    rel = {k: v / base for k, v in costs.items()}
    print("relative cost of a training step (1 thread, batch 16): "
          + ", ".join(f"{k} {v:.2f}" for k, v in rel.items()))
    per_run = epoch * args.full_epochs  # one baseline run of the full recipe, extrapolated from this run
    full_1 = per_run * args.full_seeds * sum(rel.values()) * args.full_variants / len(rel)
    full_2 = full_1 / ratio
    print(f"EXTRAPOLATED full ablations study ({args.full_variants} variants x {args.full_seeds} seeds x "
          f"{args.full_epochs} epochs = {args.full_variants * args.full_seeds} runs) on this data: "
          f"workers=1 ~{full_1 / 3600:.1f} h, workers=2 ~{full_2 / 3600:.1f} h "
          f"(baseline epoch x relative variant costs x measured parallel ratio)")


if __name__ == "__main__":
    main()
