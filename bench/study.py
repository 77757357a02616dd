"""Benchmark: wall time of a study: runs one after another vs a local process pool vs Ray tasks.

Workload (defaults): a synthetic MOSI file with the real sizes and shapes (1284/229/686 clips, 50 steps,
dims 35/300/74, generator seed 0), the lab recipe. Times (time.perf_counter); every comparison gives both
sides the same total number of torch threads (the machine's cores):
  1. ``one``: one baseline run, ``--epochs`` epochs, one thread per core (what ``affectkit train`` does);
  2. ``reduced``: ``--variants`` of configs/studies/ablations.yaml x ``--seeds`` seeds x ``--epochs`` epochs,
     once with workers=1 (one run after another, all cores' threads to torch) and once with workers=cores
     (one thread each); prints the ratio;
  3. ``ray``: the same 16-run study (``--variants`` x ``--ray-seeds`` seeds) with the local pool (workers=cores,
     1 thread each) and with the Ray engine on a local Ray instance (cores CPUs, 1 CPU per run), including
     Ray's start-up, which is also timed alone; prints Ray's overhead ratio and checks the two results.csv
     agree metric by metric;
  4. ``probe``: the cost of one training step of every ablation variant relative to the baseline (forward +
     backward on ``--probe-batches`` batches of 16, one thread), to extrapolate the full 17 x 5 x 20-epoch
     study from the measured baseline epoch. The extrapolation is labelled as such.

Run:  python bench/study.py                                        (about 10-15 minutes on 2 cores)
      python bench/study.py --small --epochs 2 --parts reduced ray  (the figures in bench/README.md)
"""

from __future__ import annotations

import argparse
import math
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
from affectkit.studies import available_cores, load_study, read_results_csv, run_study
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


def write_study(path: Path, variants: list[str], seeds: int) -> int:
    """A study file with the chosen variants of ablations.yaml x ``seeds`` seeds; returns the number of runs."""
    study = load_study(ABLATIONS)
    keep = {v: study.variants[v].overrides for v in variants}
    path.write_text(yaml.safe_dump({
        "name": "bench", "base": str(ROOT / "configs" / "mosi_lab.yaml"), "seeds": list(range(1, seeds + 1)),
        "common": {"train.tensorboard": False}, "variants": keep,
    }))
    return len(keep) * seeds


def timed_study(study: Path, data: Path, out: Path, sets: list[str], **kwargs: object) -> float:
    t0 = time.perf_counter()
    res = run_study(study, data=data, out=out, overrides=sets, progress=False, **kwargs)
    assert not res.failures, res.report()
    return time.perf_counter() - t0


def ray_startup_seconds(cores: int) -> float:
    """Start and stop an empty local Ray instance: the fixed cost of ``--engine ray`` on one machine."""
    import ray

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.shutdown()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    """Time the chosen parts and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a MOSI file (default: write a real-sized synthetic file, seed 0)")
    parser.add_argument("--small", action="store_true", help="use the 240/60/120 synthetic file instead")
    parser.add_argument("--parts", nargs="+", default=["one", "reduced", "ray", "probe"],
                        choices=["one", "reduced", "ray", "probe"])
    parser.add_argument("--variants", nargs="+", default=["baseline", "no_layernorm"])
    parser.add_argument("--seeds", type=int, default=2, help="seeds in the reduced study")
    parser.add_argument("--ray-seeds", type=int, default=8, help="seeds in the local-vs-Ray study (x variants)")
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
    print(f"data: {data.name}; every comparison: {cores} torch threads in total on each side")

    sets = [f"train.epochs={args.epochs}", "train.progress=false", "train.tensorboard=false"]
    epoch = None
    if "one" in args.parts or "probe" in args.parts:
        cfg = load_config(ROOT / "configs" / "mosi_lab.yaml", sets)
        torch.set_num_threads(cores)
        t0 = time.perf_counter()
        one = train(cfg, data_path=data, run_dir=tmp / "one")
        t_one = time.perf_counter() - t0
        epoch = one.train_seconds / args.epochs
        print(f"one baseline run, {args.epochs} epochs, {cores} threads: {t_one:.1f} s wall "
              f"({epoch:.1f} s per training epoch incl. validation)")

    ratio = None
    if "reduced" in args.parts:
        reduced = tmp / "reduced.yaml"
        n_runs = write_study(reduced, args.variants, args.seeds)
        times = {w: timed_study(reduced, data, tmp / f"w{w}", sets[:1], workers=w, threads=cores // w)
                 for w in (1, cores)}
        for w, t in times.items():
            print(f"reduced study ({len(args.variants)} variants x {args.seeds} seeds x {args.epochs} epochs = "
                  f"{n_runs} runs), workers={w} x {cores // w} thread(s): {t:.1f} s")
        ratio = times[1] / times[cores]
        print(f"ratio workers=1 / workers={cores}: {ratio:.2f}x")

    if "ray" in args.parts:
        study = tmp / "ray16.yaml"
        n_runs = write_study(study, args.variants, args.ray_seeds)
        t_local = timed_study(study, data, tmp / "local16", sets[:1], workers=cores, threads=1)
        t_ray = timed_study(study, data, tmp / "ray16", sets[:1], engine="ray", threads=1)
        t_start = ray_startup_seconds(cores)
        a, b = (read_results_csv(tmp / d / "results.csv") for d in ("local16", "ray16"))
        same = [{k: v for k, v in r.items() if k != "train_seconds"} for r in a] == \
            [{k: v for k, v in r.items() if k != "train_seconds"} for r in b]
        per_run = sum(r["train_seconds"] for r in a) / len(a)
        print(f"{n_runs}-run study ({len(args.variants)} variants x {args.ray_seeds} seeds x {args.epochs} epochs): "
              f"local pool {cores} workers x 1 thread {t_local:.1f} s; ray engine {cores} CPUs x 1 per run "
              f"{t_ray:.1f} s (Ray start + stop alone {t_start:.1f} s)")
        print(f"ray / local: {t_ray / t_local:.3f}x with Ray's start-up, {(t_ray - t_start) / t_local:.3f}x without; "
              f"results.csv identical metric by metric: {'yes' if same else 'NO'}")
        print(f"mean training time per run {per_run:.1f} s; ideal wall on N nodes of {cores} CPUs ~ "
              f"ceil({n_runs} / ({cores}N)) x {per_run:.1f} s + start-up "
              f"(N=1: {math.ceil(n_runs / cores) * per_run:.0f} s, "
              f"N=4: {math.ceil(n_runs / (4 * cores)) * per_run:.0f} s, "
              f"N={math.ceil(n_runs / cores)}: {per_run:.0f} s)")

    if "probe" in args.parts:
        costs = probe_costs(args.probe_batches)
        base = costs["baseline"]
        rel = {k: v / base for k, v in costs.items()}
        print("relative cost of a training step (1 thread, batch 16): "
              + ", ".join(f"{k} {v:.2f}" for k, v in rel.items()))
        per_run = epoch * args.full_epochs  # one baseline run of the full recipe, extrapolated from this run
        full_1 = per_run * args.full_seeds * sum(rel.values()) * args.full_variants / len(rel)
        line = (f"EXTRAPOLATED full ablations study ({args.full_variants} variants x {args.full_seeds} seeds x "
                f"{args.full_epochs} epochs = {args.full_variants * args.full_seeds} runs) on this data: "
                f"workers=1 ~{full_1 / 3600:.1f} h")
        if ratio:
            line += f", workers={cores} ~{full_1 / ratio / 3600:.1f} h (x the measured parallel ratio)"
        print(line + " (baseline epoch x relative variant costs)")


if __name__ == "__main__":
    main()
