"""CORECT speed and memory: our model alone, or side by side with the public reference code.

Default mode: seconds per training epoch, test-set inference and the peak resident memory of a training run
for the text-only and the three-modality preset (each in a fresh subprocess so peaks don't mix):

    python bench/corect.py [--epochs 2] [--threads 1]

Side-by-side mode (``--reference``): one IEMOCAP-sized three-modality file (108 train + 12 dev = 120 and 31
test dialogues of 10..110 utterances, text/audio/visual 768/100/512, the synthetic ``iemocap6`` signal, seed
0) is written once in both layouts (ours: ``affectkit make-synthetic conversation``; the reference's:
``data/iemocap/data_iemocap.pkl`` with audio/visual as lists of rows). Then the reference's ``train.py``
(its ``run_train.sh`` hyper-parameters, see ``bench/corect_reference.py``) and our trainer on
``configs/corect_iemocap6.yaml`` run for the same epochs, one after the other, each in its own process with
the same torch thread count. Printed per side: start-up, seconds per epoch by phase (train / dev / test) once
running, CPU seconds, peak RSS of the child (``os.wait4``), the dev-selected epoch and its test weighted F1,
and the ratios reference/ours.

    python bench/corect.py --reference /work/.mirror/leson502+CORECT_EMNLP2023/repo --epochs 12 --threads 1

``--reference`` takes a git directory (the ``fetch`` tool's mirror, or a clone; commit 96ad012 is exported
to ``--scratch``, default /tmp/corect_ref) or a ready checkout. To run "same hyper-parameters", ours gets
the values the reference uses in effect where our preset differs (``--set`` overrides, printed):
text Transformer 8 heads (the reference picks the first divisor of 768 in 7..14), no P-CM dropout (the
reference's cross-modal Transformers use dropout 0), ReduceLROnPlateau factor 0.1 / patience 10 (torch's
defaults, which the reference uses); ``--preset-as-is`` runs the shipped preset instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys, time, torch
from affectkit.config import load_config
from affectkit.models.registry import model_config
from affectkit.tasks import get_task
from affectkit.train import evaluate, train
data_path, out, epochs, threads, modalities = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
sets = [f"train.epochs={epochs}", "train.progress=false", "train.tensorboard=false", f"out_dir={out}",
        f"model.modalities=[{modalities}]"]
cfg = load_config("configs/corect_iemocap6.yaml", sets)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = train(cfg, data_path)
task = get_task("conversation")
data = task.load(data_path, model_config(cfg.model_name, cfg.model_params))
from affectkit.checkpoint import load_model
model, cfg2, info = load_model(res.run_dir / "best.pt")
loss_fn = task.loss_fn(cfg2.train, data)
evaluate(model, task, data, "test", 10, loss_fn, info)  # warm-up
t = time.perf_counter()
with torch.inference_mode():
    evaluate(model, task, data, "test", 10, loss_fn, info)
infer = time.perf_counter() - t
n_test = sum(len(d) for d in data.splits["test"])
print(json.dumps({"epoch_s": (res.train_seconds - res.profile["evaluate"]) / epochs,
                  "profile": res.profile, "test_inference_s": infer, "test_utterances": n_test,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_training_mib": base_rss / 1024, "params": res.n_params}))
"""

#: Dialogue counts and lengths of the side-by-side file (IEMOCAP: 120 train+dev, 31 test; dev = first 10%).
SIZED_COUNTS = {"train": 108, "dev": 12, "test": 31}
SIZED_LENGTHS = (10, 110)
#: Our preset's values where the reference uses others in effect (see the module docstring).
MATCH_REFERENCE = ["model.text_heads=8", "model.pcm_dropout=0.0", "train.plateau_factor=0.1",
                   "train.plateau_patience=10"]


def own_mode(args: argparse.Namespace) -> None:
    """The default mode: our text-only and three-modality models on a synthetic IEMOCAP-sized file."""
    import torch

    from affectkit.data.synthetic_conversation import write_synthetic_conversations

    print(f"torch {torch.__version__}, threads {args.threads}, epochs {args.epochs}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "iemocap6_sized.pkl"
        write_synthetic_conversations(path, preset="iemocap6", seed=0,
                                      n_dialogues={"train": 108, "dev": 12, "test": 31})
        for mods in ("text", "text,audio,visual"):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), tmp, str(args.epochs), str(args.threads),
                                  mods], capture_output=True, text=True, check=True, cwd=REPO)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            p = r["profile"]
            print(f"modalities {mods:<18} params {r['params']:>9,}  epoch {r['epoch_s']:6.2f} s "
                  f"(forward {p['forward'] / args.epochs:.2f}, backward {p['backward'] / args.epochs:.2f}, "
                  f"optimizer {p['optimizer'] / args.epochs:.2f})  test inference {r['test_inference_s']:.2f} s "
                  f"for {r['test_utterances']} utterances  peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"(before training {r['rss_before_training_mib']:.0f} MiB)  [{time.perf_counter() - t:.0f} s]")


# ------------------------------------------------------------------------------------------ side by side


def write_sized_files(tmp: Path, seed: int) -> tuple[Path, Path]:
    """The side-by-side data once, in our layout (``ours.pkl``) and the reference's (``ref/data/...``)."""
    from corect_reference import write_reference_data

    from affectkit.data import synthetic_conversation as sc

    preset = dataclasses.replace(sc.PRESETS["iemocap6"], length_range=SIZED_LENGTHS, n_dialogues=SIZED_COUNTS)
    sc.PRESETS["iemocap6_sized"] = preset  # this process only: the generator looks presets up by name
    ours = tmp / "ours.pkl"
    sc.write_synthetic_conversations(ours, preset="iemocap6_sized", seed=seed)
    with open(ours, "rb") as fh:  # our own file, just written
        data = pickle.load(fh)
    ref = {split: [{"vid": d["vid"], "speakers": list(d["speakers"]), "labels": list(d["labels"]),
                    "text": d["text"], "audio": list(d["audio"]), "visual": list(d["visual"]),
                    "sentence": list(d["sentence"])} for d in data[split]]
           for split in ("train", "dev", "test")}
    write_reference_data(ref, tmp / "ref")
    return ours, tmp / "ref"


def ours_child(data: Path, out: Path, epochs: int, threads: int, sets: list[str]) -> None:
    """Our trainer on the three-modality preset, in this process; timings and results to ``out`` (JSON)."""
    import torch

    import affectkit.train as trainer
    from affectkit.config import load_config
    from affectkit.data.conversation import ConversationLoader

    torch.set_num_threads(threads)
    marks: list[dict[str, Any]] = []
    original_iter, original_eval = ConversationLoader.__iter__, trainer.evaluate

    def loader_iter(self: ConversationLoader) -> Any:
        if self.shuffle:  # the training pass of an epoch starts here
            marks.append({"phase": "train", "wall0": time.monotonic(), "cpu0": time.process_time()})
        return original_iter(self)

    test_curve: list[float] = []

    def evaluate(model: Any, task: Any, data: Any, split: str, *args: Any) -> Any:
        w0, c0 = time.monotonic(), time.process_time()
        in_epoch = bool(marks) and marks[-1]["phase"] == "train" and "wall1" not in marks[-1]
        if in_epoch:
            marks[-1].update(wall1=w0, cpu1=c0)
        value = original_eval(model, task, data, split, *args)
        marks.append({"phase": split, "wall0": w0, "wall1": time.monotonic(), "cpu0": c0,
                      "cpu1": time.process_time()})
        if in_epoch and os.environ.get("CORECT_TEST_CURVE"):  # test F1 of every epoch, as the reference logs
            # it (eval mode, unshuffled loader: no random draw, so training is the same with or without it)
            test_curve.append(original_eval(model, task, data, task.splits[2], *args).metrics["F1_weighted"])
        return value

    ConversationLoader.__iter__ = loader_iter  # type: ignore[method-assign]
    trainer.evaluate = evaluate
    cfg = load_config(REPO / "configs" / "corect_iemocap6.yaml",
                      [f"train.epochs={epochs}", "train.progress=false", "train.tensorboard=false",
                       f"train.num_threads={threads}", f"out_dir={out.parent / 'runs'}", *sets])
    res = trainer.train(cfg, data)
    dev_f1 = [row["valid_F1_weighted"] for row in res.history]
    out.write_text(json.dumps({
        "best_epoch": res.best_epoch, "dev_f1": dev_f1, "test_f1_selected": res.test["F1_weighted"],
        "train_loss": [row["train_loss"] for row in res.history], "test_f1_curve": test_curve, "marks": marks,
        "end_wall": time.monotonic(), "end_cpu": time.process_time(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": res.n_params,
        "torch": torch.__version__, "threads": threads}))


def _spawn(cmd: list[str], log: Path) -> tuple[float, float, Any]:
    """Run ``cmd`` with output to ``log``; (monotonic spawn time, wall seconds, the child's rusage)."""
    t0 = time.monotonic()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - t0
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"{cmd[1]} {cmd[2]} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return t0, wall, usage


def summarise(r: dict[str, Any], t0: float, wall: float, usage: Any, epochs: int,
              per_epoch: tuple[str, ...]) -> dict[str, Any]:
    """Per-epoch phase times (wall and CPU) from the child's marks; start-up; peak RSS from wait4.

    An epoch runs from the start of its training pass to the start of the next one (so it includes what a
    side does between passes: the reference's checkpoint save, our best-state copy); the last epoch ends
    with its last pass in ``per_epoch``. "Once running" is the mean over epochs 2..N-1 (2..N when N < 3):
    the first carries warm-up, the last lacks the between-epoch work.
    """
    marks = r["marks"]
    starts = [i for i, m in enumerate(marks) if m["phase"] == "train"][:epochs]
    rows = []
    for e, i in enumerate(starts):
        end = starts[e + 1] if e + 1 < len(starts) else len(marks)
        phases: dict[str, dict[str, float]] = {}
        for m in marks[i:end]:  # the first pass of each kind; later ones are the final re-evaluation
            if m["phase"] in per_epoch and m["phase"] not in phases:
                phases[m["phase"]] = m
        nxt = marks[starts[e + 1]] if e + 1 < len(starts) else None
        stop = nxt["wall0"] if nxt else max(m["wall1"] for m in phases.values())
        stop_cpu = nxt["cpu0"] if nxt else max(m["cpu1"] for m in phases.values())
        row = {"epoch": stop - marks[i]["wall0"], "epoch_cpu": stop_cpu - marks[i]["cpu0"]}
        for name, m in phases.items():
            row[name] = m["wall1"] - m["wall0"]
            row[name + "_cpu"] = m["cpu1"] - m["cpu0"]
        rows.append(row)
    steady = rows[1:-1] if len(rows) >= 3 else (rows[1:] or rows)
    final_test = [m for m in marks[starts[-1]:] if m["phase"] == "test"][-1]

    def mean(key: str) -> float:
        return statistics.fmean(row.get(key, 0.0) for row in steady)

    first = marks[starts[0]]
    out = {
        "startup": first["wall0"] - t0, "startup_cpu": first["cpu0"],
        "first_epoch_incl_startup": rows[0]["epoch"] + first["wall0"] - t0,
        "total_wall": wall, "total_cpu": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024, "params": r.get("params"), "rows": rows,
        "test_pass": final_test["wall1"] - final_test["wall0"],
    }
    for key in ("epoch", "train", "dev", "test"):
        out[key] = mean(key)
        out[key + "_cpu"] = mean(key + "_cpu")
    out["train_dev"] = out["train"] + out["dev"]
    out["train_dev_cpu"] = out["train_cpu"] + out["dev_cpu"]
    return out


def side_by_side(args: argparse.Namespace) -> None:
    """Write the file once, run the reference then ours (separate processes), print figures and ratios."""
    import torch
    from corect_reference import REF_COMMIT, prepare

    if args.scratch.resolve().is_relative_to(REPO):
        raise SystemExit(f"--scratch {args.scratch} is inside the repository; third-party code stays outside it")
    ref_root = prepare(args.reference, args.scratch)
    sets = [] if args.preset_as_is else MATCH_REFERENCE
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, threads {args.threads} per side, epochs {args.epochs}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"reference: {ref_root} (commit {REF_COMMIT}), run_train.sh hyper-parameters, seed 24")
    print(f"ours: configs/corect_iemocap6.yaml {' '.join(sets) or '(as shipped)'}, seed 42")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ours_data, ref_data_root = write_sized_files(tmp, args.seed)
        with open(ours_data, "rb") as fh:
            sizes = {s: [len(d["labels"]) for d in v] for s, v in pickle.load(fh).items() if s in SIZED_COUNTS}
        print("data: " + ", ".join(f"{s} {len(v)} dialogues / {sum(v)} utterances" for s, v in sizes.items())
              + f"; lengths {min(min(v) for v in sizes.values())}..{max(max(v) for v in sizes.values())}, "
              f"dims text 768 / audio 100 / visual 512, generator seed {args.seed}")
        me = str(Path(__file__).resolve())
        results = {}
        order = ("reference", "ours") if not args.ours_first else ("ours", "reference")
        for side in order:
            out = tmp / f"{side}.json"
            if side == "reference":
                cmd = [sys.executable, str(REPO / "bench" / "corect_reference.py"), "run", "--reference",
                       str(ref_root), "--root", str(ref_data_root), "--epochs", str(args.epochs),
                       "--threads", str(args.threads), "--out", str(out)]
            else:
                cmd = [sys.executable, me, "--child-ours", str(ours_data), str(out), str(args.epochs),
                       str(args.threads), *sets]
                print(f"  ours starts: {ours_switches(sets)}", flush=True)
            t0, wall, usage = _spawn(cmd, tmp / f"{side}.log")
            r = json.loads(out.read_text())
            s = summarise(r, t0, wall, usage, args.epochs,
                          ("train", "dev", "test") if side == "reference" else ("train", "dev"))
            if side == "reference":
                s["best_epoch"], s["test_f1"] = r["best_epoch"], r["test_f1"][r["best_epoch"] - 1]
                s["dev_f1"] = r["dev_f1"]
            else:
                s["best_epoch"], s["test_f1"], s["dev_f1"] = r["best_epoch"], r["test_f1_selected"], r["dev_f1"]
            results[side] = s
            print(f"  {side} done in {wall:.0f} s (load average {os.getloadavg()[0]:.1f})")
            if args.learning_out is not None:
                save_learning_run(args.learning_out, side, args.epochs, r, s)
    report(results, args.epochs)


def ours_switches(sets: list[str]) -> str:
    """The commit and the attention switches of the model ours trains now (the preset as the tree holds it
    when ours starts, after the reference's run)."""
    from affectkit.config import load_config
    from affectkit.models.registry import model_config

    cfg = load_config(REPO / "configs" / "corect_iemocap6.yaml", list(sets))
    m = model_config(cfg.model_name, dict(cfg.model_params))
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src", "configs"], capture_output=True,
                           text=True).stdout.strip()
    return (f"commit {head.stdout.strip()}{' + uncommitted changes' if dirty else ''}, mask_padding "
            f"{m.mask_padding}, attention_sink {m.attention_sink}, pcm_sink {m.pcm_sink}, "
            f"pad_attention_in_training {m.pad_attention_in_training}")


def save_learning_run(work: Path, side: str, epochs: int, raw: dict[str, Any], s: dict[str, Any]) -> None:
    """One more seed for ``bench/corect_learning.py``'s table: this run's side as variant reference / ours."""
    seed = 24 if side == "reference" else 42
    out = work / "runs" / side / f"seed{seed}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out.write_text(json.dumps({
        "variant": side, "seed": seed, "epochs": epochs, "best_epoch": s["best_epoch"], "test_f1": s["test_f1"],
        "dev_f1": s["dev_f1"], "cpu_s": s["total_cpu"], "wall_s": s["total_wall"], "peak_rss_mib": s["peak_rss_mib"],
        "sets": [], "load_end": os.getloadavg()[0], "commit": os.environ.get("CORECT_LEARNING_COMMIT")
        or head.stdout.strip(), "from": "bench/corect.py --reference"}, indent=1))


def report(results: dict[str, dict[str, Any]], epochs: int) -> None:
    ref, ours = results["reference"], results["ours"]
    print(f"\n{'':38} {'reference':>10} {'ours':>10} {'ref/ours':>9}")

    def line(label: str, a: float, b: float, unit: str = "s") -> None:
        print(f"{label:38} {a:9.2f}{unit} {b:9.2f}{unit} {a / b:8.2f}x")

    line("start-up (spawn -> first batch)", ref["startup"], ours["startup"])
    line("first epoch incl. start-up", ref["first_epoch_incl_startup"], ours["first_epoch_incl_startup"])
    line("epoch as each runs it (wall)", ref["epoch"], ours["epoch"])
    line("  train pass", ref["train"], ours["train"])
    line("  dev pass", ref["dev"], ours["dev"])
    print(f"{'  test pass (reference: every epoch)':38} {ref['test']:9.2f}s {'-':>10}")
    line("  final test pass (after training)", ref["test_pass"], ours["test_pass"])
    line("train + dev (like for like, wall)", ref["train_dev"], ours["train_dev"])
    line("train + dev (CPU time)", ref["train_dev_cpu"], ours["train_dev_cpu"])
    line("epoch as each runs it (CPU time)", ref["epoch_cpu"], ours["epoch_cpu"])
    line(f"whole run, {epochs} epochs (wall)", ref["total_wall"], ours["total_wall"])
    line(f"whole run, {epochs} epochs (CPU)", ref["total_cpu"], ours["total_cpu"])
    print(f"{'peak RSS':38} {ref['peak_rss_mib']:8.0f}Mi {ours['peak_rss_mib']:8.0f}Mi "
          f"{ours['peak_rss_mib'] / ref['peak_rss_mib']:8.2f}x (ours/ref)")
    print(f"{'parameters':38} {ref['params'] or 0:10,} {ours['params'] or 0:10,}")
    print(f"{'dev-selected epoch':38} {ref['best_epoch']:10d} {ours['best_epoch']:10d}")
    print(f"{'test weighted F1 at that epoch':38} {ref['test_f1']:10.4f} {ours['test_f1']:10.4f}")
    print("dev weighted F1 per epoch:")
    for side in ("reference", "ours"):
        print(f"  {side:9}: " + " ".join(f"{f:.3f}" for f in results[side]["dev_f1"]))
    print("per-epoch wall seconds (train/dev/test):")
    for side in ("reference", "ours"):
        print(f"  {side:9}: " + "  ".join(
            "/".join(f"{row[k]:.1f}" for k in ("train", "dev", "test") if k in row) for row in results[side]["rows"]))
    print("(means over epochs 2..N-1 are the 'once running' figures; the reference also evaluates test every "
          "epoch and saves its whole model when dev F1 improves)")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-ours":
        sys.path.insert(0, str(REPO / "src"))
        data, out, epochs, threads, *sets = sys.argv[2:]
        ours_child(Path(data), Path(out), int(epochs), int(threads), sets)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reference", type=Path, help="side by side with the reference code (git dir or checkout)")
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "corect_ref",
                    help="where a git --reference is exported (never inside the repo)")
    ap.add_argument("--seed", type=int, default=0, help="generator seed of the side-by-side file")
    ap.add_argument("--preset-as-is", action="store_true", help="ours without the reference-matching --set")
    ap.add_argument("--ours-first", action="store_true", help="run ours before the reference")
    ap.add_argument("--learning-out", type=Path, help="also record each side's run (reference seed 24, ours seed "
                    "42) as a run of bench/corect_learning.py's table in this work folder")
    args = ap.parse_args()
    sys.path[:0] = [str(REPO / "src"), str(REPO / "bench")]
    if args.reference is None:
        own_mode(args)
    else:
        side_by_side(args)


if __name__ == "__main__":
    main()
