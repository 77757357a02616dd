"""Benchmark: one MOSI training epoch and one validation pass, our trainer vs the lab's literal loop.

Ours: ``affectkit.train.train`` on ``configs/mosi_lab.yaml`` with ``train.epochs=1`` (our batch-slicing
loader, the LstmBaseline, Adam and the per-batch cosine step), its epoch time (``train_seconds`` minus its
validation pass) and its profile (data / forward / backward / optimizer); then a separately timed
``affectkit.train.evaluate`` on the valid split. Lab: ``tests/lab_reference.py`` (per-item Dataset, DataLoader
with shuffle=True, the lab's model), one call of its epoch loop and one ``validate_model`` on valid.
Both sides are seeded with 42 and use the same thread count; the repeats alternate which side runs first, and
the medians are reported, after one untimed warm-up run of each side. Loading the file is not timed.
``--clock cpu`` measures process CPU time instead of wall time on both sides (our trainer's own timer is
pointed at it too): on a machine shared with other jobs it counts only this process's work, not its waits.
After one epoch both sides must give the same validation metrics (printed; the lab rounds to 4 decimals and
swaps the F1 arguments).

Run:  python bench/mosi_train.py --repeats 3 [--data mosi_raw.pkl] [--threads N] [--clock wall|cpu]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import affectkit.train as trainer_module
from affectkit.config import load_config
from affectkit.data.synthetic_mosi import write_synthetic_mosi
from affectkit.models import build_model
from affectkit.tasks import get_task
from affectkit.train import evaluate, seed_everything, train

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import lab_reference as lab  # noqa: E402

PRESET = ROOT / "configs" / "mosi_lab.yaml"
PARTS = ("data", "forward", "backward", "optimizer")
SEED = 42
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock: Callable[[], float] = time.perf_counter


def use_clock(name: str) -> None:
    """Time both sides with ``name``'s clock; our trainer's profile timer (``time.perf_counter``) too."""
    global clock
    clock = CLOCKS[name]
    trainer_module.time = types.SimpleNamespace(perf_counter=clock)  # type: ignore[assignment]


def time_ours(data_path: Path, data: Any, threads: int, tmp: Path) -> dict[str, Any]:
    """One epoch of our trainer (with its profile) and one separately timed validation pass."""
    cfg = load_config(str(PRESET), ["train.epochs=1", "train.progress=false", "train.tensorboard=false",
                                    f"train.num_threads={threads}", f"train.seed={SEED}"])
    res = train(cfg, data_path, tmp / "ours_run", data=data)
    task = get_task(cfg.data.task)
    info = task.info(data)
    seed_everything(SEED)
    model = build_model(cfg.model_name, cfg.model_params, info)
    loss_fn = task.loss_fn(cfg.train, data)
    t0 = clock()
    evaluate(model, task, data, "valid", cfg.train.eval_batch_size, loss_fn, info)
    eval_s = clock() - t0
    return {"epoch": res.train_seconds - res.profile["evaluate"], "eval": eval_s,
            **{p: res.profile[p] for p in PARTS}, "valid": res.valid}


def time_lab(data_path: Path) -> dict[str, Any]:
    """One epoch of the lab's loop and one ``validate_model`` pass on valid."""
    s = lab.setup(str(data_path), epochs=1, seed=SEED)
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = clock()
        lab.train_one_epoch(s["model"], s["train_loader"], s["criterion"], s["optimizer"], s["scheduler"],
                            s["device"])
        t1 = clock()
        valid = lab.validate_model(s["model"], s["valid_loader"], s["criterion"], s["device"],
                                   return_all=True)
        t2 = clock()
    return {"epoch": t1 - t0, "eval": t2 - t1, "valid": valid}


def compare_metrics(ours: dict[str, Any], labs: dict[str, Any]) -> tuple[list[str], bool]:
    """Rows 'name ours lab same?' and whether every metric both sides compute alike agrees to 4 decimals."""
    pairs = (("MAE", "MAE"), ("Corr", "Corr"), ("Acc7", "Mult_acc_7"), ("Acc5", "Mult_acc_5"),
             ("Non0_Acc2", "Non0_acc_2"), ("Non0_F1", "Non0_F1_score"), ("loss", "loss"))
    rows, all_same = [], True
    for key, lab_key in pairs:
        a, b = float(ours[key]), float(labs[lab_key])
        if key == "loss":  # ours: mean over samples; the lab: mean of the batch means (last batch is short)
            same = "(lab: mean of batch means)"
        elif key == "Non0_F1":
            same = "(lab swaps f1_score arguments)"
        else:
            same = "same" if round(a, 4) == round(b, 4) else "DIFFERENT"
            all_same = all_same and same == "same"
        rows.append(f"  {key:<10} ours {a:.6f}  lab {b:.6f}  {same}")
    return rows, all_same


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, time both sides alternately, print the figures; 1 if the metrics differ."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a MOSI pickle (default: real-sized synthetic, seed 0)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads, both sides (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (steadier on a busy machine)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    use_clock(args.clock)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data_path = args.data or write_synthetic_mosi(tmp / "mosi_synthetic.pkl", seed=0)
        data = get_task("mosi").load(data_path, None)
        print(f"torch {torch.__version__}, threads {args.threads}, repeats {args.repeats}, seed {SEED}, "
              f"clock {args.clock}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(data.summary())
        time_lab(data_path), time_ours(data_path, data, args.threads, tmp)  # warm-up, not timed
        ours_runs: list[dict[str, Any]] = []
        lab_runs: list[dict[str, Any]] = []
        for r in range(args.repeats):
            order = ("lab", "ours") if r % 2 == 0 else ("ours", "lab")
            for side in order:
                if side == "lab":
                    lab_runs.append(time_lab(data_path))
                else:
                    ours_runs.append(time_ours(data_path, data, args.threads, tmp))
            lr, our = lab_runs[-1], ours_runs[-1]
            print(f"  repeat {r + 1}: epoch lab {lr['epoch']:.2f} s / ours {our['epoch']:.2f} s,"
                  f" valid pass lab {lr['eval']:.3f} s / ours {our['eval']:.3f} s")

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    epoch_o, epoch_l = med(ours_runs, "epoch"), med(lab_runs, "epoch")
    eval_o, eval_l = med(ours_runs, "eval"), med(lab_runs, "eval")
    print(f"train epoch   lab {epoch_l:8.3f} s   ours {epoch_o:8.3f} s   lab/ours {epoch_l / epoch_o:.2f}x")
    print(f"valid pass    lab {eval_l:8.3f} s   ours {eval_o:8.3f} s   lab/ours {eval_l / eval_o:.2f}x")
    total_l, total_o = epoch_l + eval_l, epoch_o + eval_o
    verdict = "ok" if total_l / total_o >= 0.95 else "BELOW TARGET"
    print(f"epoch + valid lab {total_l:8.3f} s   ours {total_o:8.3f} s   lab/ours {total_l / total_o:.2f}x "
          f"(target >= 0.95: {verdict})")
    print("our epoch, by part (median over repeats):")
    for part in PARTS:
        sec = med(ours_runs, part)
        print(f"  {part:<10} {sec:8.3f} s  {100 * sec / epoch_o:5.1f} %")
    rest = epoch_o - sum(med(ours_runs, p) for p in PARTS)
    print(f"  {'other':<10} {rest:8.3f} s  {100 * rest / epoch_o:5.1f} %  (loss.item, bookkeeping)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("valid metrics after 1 epoch (ours vs lab):")
    rows, all_same = compare_metrics(ours_runs[0]["valid"], lab_runs[0]["valid"])
    print("\n".join(rows))
    return 0 if all_same else 1


if __name__ == "__main__":
    sys.exit(main())
