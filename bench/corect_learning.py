"""CORECT learning, ours vs the reference code: several seeds per variant on the side-by-side file, one table.

The file is ``bench/corect.py --reference``'s (108 + 12 / 31 IEMOCAP-sized dialogues of 10..110 utterances,
768/100/512-d, synthetic ``iemocap6`` signal, generator seed 0), written once under ``--work``.  Each run is
its own niced child process with one torch thread: the reference's ``train.py`` (``run_train.sh``
hyper-parameters, ``--seed S``) or our trainer on ``configs/corect_iemocap6.yaml`` with the reference-matching
overrides of ``bench/corect.py`` plus the variant's (``train.seed=S``).  A finished run leaves
``WORK/runs/VARIANT/seedS.json`` (with the per-epoch dev F1 and, from issue 22 item 1 on, the per-epoch test F1
and train loss: our child then also evaluates test after each epoch, as the reference does, which draws no
random number, so training is unchanged, but adds its CPU) and is never rerun (rerun the command after an
interruption).  ``--table``
writes the table (mean +- std of the test weighted F1 at the dev-selected epoch, per-seed values, chosen
epochs, CPU seconds per run) to ``WORK/table.md`` and, with ``--readme``, between the markers in
``bench/README.md``.

    python bench/corect_learning.py --reference /work/.mirror/leson502+CORECT_EMNLP2023/repo \\
        --variants reference ours --seeds 1 2 3 4 5 --epochs 12 --jobs 2
    python bench/corect_learning.py --table --readme
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"

#: Ablations: our model with one difference from the reference changed at a time (``--set`` overrides on top
#: of bench/corect.py's MATCH_REFERENCE).  ``before``: the model as it was before issue 22.
BEFORE = ["model.pcm_norm=post", "model.pcm_scale=false", "model.pcm_init=torch"]
VARIANTS: dict[str, list[str]] = {
    "ours": [],
    "before": BEFORE,
    "before+prenorm": ["model.pcm_norm=pre", "model.pcm_scale=false", "model.pcm_init=torch"],
    "before+scale": ["model.pcm_norm=post", "model.pcm_scale=true", "model.pcm_init=torch"],
    "before+xavier": ["model.pcm_norm=post", "model.pcm_scale=false", "model.pcm_init=xavier"],
    "before+nomask": [*BEFORE, "model.mask_padding=false"],
    "before+refgraph": [*BEFORE, "model.wp=4", "model.wf=11"],
    "ours+nomask": ["model.mask_padding=false"],
    "ours+refgraph": ["model.wp=4", "model.wf=11"],
    "ours+torchinit": ["model.pcm_init=torch"],
    "ours+curve": [],  # ours again, for its per-epoch test F1 (the runs of "ours" predate the curve)
    # issue 22 item 1: the text encoder initialised as the reference's nn.TransformerEncoder (Xavier q/k/v,
    # zero attention biases; mhaclone: both layers the same draw), and every remaining difference at once
    "ours+mhainit": ["model.text_init=mha"],
    "ours+mhaclone": ["model.text_init=mha_clone"],
    "ours+asref": ["model.text_init=mha_clone", "model.mask_padding=false", "model.wp=4", "model.wf=11"],
    "ours+mhaclone+nomask": ["model.text_init=mha_clone", "model.mask_padding=false"],
    "ours+mhaclone+refgraph": ["model.text_init=mha_clone", "model.wp=4", "model.wf=11"],
    # what attending to padding gave the reference, without reading padding: a learned key/value in every
    # attention layer (batch-invariant, stream = batch)
    "ours+sink": ["model.attention_sink=true"],
    # the same in P-CM's layers only: a text-only model (no P-CM) is unchanged by it
    "ours+pcmsink": ["model.pcm_sink=true"],
    # the reference's attention to padding as a training-time regulariser only: evaluation (dev selection,
    # test, serving) masked, so answers stay batch-invariant
    "ours+padtrain": ["model.pad_attention_in_training=true"],
}
README_BEGIN = "<!-- corect-learning:begin (bench/corect_learning.py --table --readme) -->"
README_END = "<!-- corect-learning:end -->"


def prepare_data(work: Path) -> tuple[Path, Path]:
    """The side-by-side file in both layouts under ``work/data`` (written once)."""
    data = work / "data"
    ours, ref = data / "ours.pkl", data / "ref"
    if not ours.exists():
        data.mkdir(parents=True, exist_ok=True)
        sys.path[:0] = [str(REPO / "src"), str(BENCH)]
        from corect import write_sized_files

        write_sized_files(data, seed=0)
    return ours, ref


def run_one(variant: str, seed: int, args: argparse.Namespace, ours: Path, ref: Path, ref_code: Path) -> str:
    """One (variant, seed) run in a niced child; its JSON result to ``WORK/runs/VARIANT/seedS.json``."""
    out_dir = args.work / "runs" / variant
    out = out_dir / f"seed{seed}.json"
    if out.exists():
        return f"{variant} seed {seed}: done before"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"seed{seed}.raw.json"
    if variant == "reference":
        root = out_dir / f"root{seed}"  # its own data root: the reference saves checkpoints there
        (root / "data" / "iemocap").mkdir(parents=True, exist_ok=True)
        (root / "model_checkpoints").mkdir(exist_ok=True)
        link = root / "data" / "iemocap" / "data_iemocap.pkl"
        if not link.exists():
            link.symlink_to((ref / "data" / "iemocap" / "data_iemocap.pkl").resolve())
        cmd = [sys.executable, str(BENCH / "corect_reference.py"), "run", "--reference", str(ref_code),
               "--root", str(root), "--epochs", str(args.epochs), "--threads", "1", "--out", str(raw),
               "--seed", str(seed)]
    else:
        sys.path[:0] = [str(BENCH)]
        from corect import MATCH_REFERENCE

        cmd = [sys.executable, str(BENCH / "corect.py"), "--child-ours", str(ours), str(raw), str(args.epochs), "1",
               *MATCH_REFERENCE, *VARIANTS[variant], f"train.seed={seed}"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "CORECT_TEST_CURVE": "1"}
    t0 = time.monotonic()
    if raw.exists():  # the child finished but this driver did not (interrupted): its own figures
        r = json.loads(raw.read_text())
        cpu, rss, wall = r["end_cpu"], r["peak_rss_mib"], float("nan")
    else:
        with open(out_dir / f"seed{seed}.log", "w") as fh:
            proc = subprocess.Popen(["nice", "-n", "19", *cmd], stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=env)
            _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            return f"{variant} seed {seed}: FAILED (see {out_dir / f'seed{seed}.log'})"
        r = json.loads(raw.read_text())
        cpu, rss, wall = usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, time.monotonic() - t0
    if variant == "reference":
        best = r["best_epoch"]
        test_f1 = r["test_f1"][best - 1]
        curve = r["test_f1"]
    else:
        best, test_f1 = r["best_epoch"], r["test_f1_selected"]
        curve = r.get("test_f1_curve")
    result = {"variant": variant, "seed": seed, "epochs": args.epochs, "best_epoch": best, "test_f1": test_f1,
              "dev_f1": r["dev_f1"], "test_f1_curve": curve, "train_loss": r.get("train_loss"), "cpu_s": cpu,
              "wall_s": wall, "peak_rss_mib": rss,
              "sets": VARIANTS.get(variant, []),
              "load_end": os.getloadavg()[0], "commit": os.environ.get("CORECT_LEARNING_COMMIT") or _commit()}
    out.write_text(json.dumps(result, indent=1))
    raw.unlink()
    return f"{variant} seed {seed}: test wF1 {test_f1:.4f} at epoch {best}, {result['cpu_s']:.0f} s CPU"


def _commit() -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "src"], capture_output=True, text=True)
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def table(work: Path) -> str:
    """The markdown table of every finished run under ``work/runs``."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((work / "runs").glob("*/seed*.json")):
        if path.name.endswith(".raw.json"):
            continue
        r = json.loads(path.read_text())
        rows.setdefault(r["variant"], []).append(r)
    order = ["reference", *[v for v in VARIANTS if v in rows]]
    lines = ["| variant | overrides (on top of the reference-matching ones) | seeds | test wF1 mean +- std | "
             "per seed (dev-selected epoch) | CPU s / run | commit |", "|---|---|---:|---:|---|---:|---|"]
    for v in order:
        rs = sorted(rows.get(v, []), key=lambda r: r["seed"])
        if not rs:
            continue
        f1 = [r["test_f1"] for r in rs]
        sd = statistics.stdev(f1) if len(f1) > 1 else float("nan")
        per = ", ".join(f"{r['seed']}: {r['test_f1']:.3f} ({r['best_epoch']})" for r in rs)
        sets = "reference code" if v == "reference" else (" ".join(f"`{s}`" for s in VARIANTS.get(v, [])) or "-")
        commits = "96ad012 (theirs)" if v == "reference" else ", ".join(sorted({r["commit"] for r in rs}))
        lines.append(f"| {v} | {sets} | {len(rs)} | {statistics.fmean(f1):.4f} +- {sd:.4f} | {per} | "
                     f"{statistics.fmean(r['cpu_s'] for r in rs):.0f} | {commits} |")
    epochs = sorted({r["epochs"] for rs in rows.values() for r in rs})
    return "\n".join([f"Epochs per run: {', '.join(map(str, epochs))}; generated by `python bench/corect_learning.py "
                      f"--table` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "", *lines])


def write_readme(text: str, marker: str = "corect-learning") -> None:
    """``text`` between the ``marker`` comments of bench/README.md (a table per set of runs: the ablations
    of one session stay where they are when another session's runs get their own marker)."""
    begin = README_BEGIN if marker == "corect-learning" else \
        f"<!-- {marker}:begin (bench/corect_learning.py --table --readme --readme-marker {marker}) -->"
    end = README_END if marker == "corect-learning" else f"<!-- {marker}:end -->"
    readme = BENCH / "README.md"
    s = readme.read_text()
    if begin not in s:
        raise SystemExit(f"bench/README.md lacks the marker {begin!r}")
    head, rest = s.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "corect_learning",
                    help="data, logs and runs/VARIANT/seedS.json (the table reads runs/)")
    ap.add_argument("--reference", type=Path, help="git dir or checkout of the reference (needed for its runs)")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/corect_ref"))
    ap.add_argument("--variants", nargs="+", default=["reference", "ours"],
                    help=f"reference and/or: {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each one thread, niced)")
    ap.add_argument("--table", action="store_true", help="only write the table of finished runs")
    ap.add_argument("--readme", action="store_true", help="with --table: also into bench/README.md")
    ap.add_argument("--readme-marker", default="corect-learning",
                    help="with --readme: between which markers of bench/README.md (default %(default)s)")
    args = ap.parse_args()
    if args.table:
        text = table(args.work)
        (args.work / "table.md").write_text(text + "\n")
        print(text)
        if args.readme:
            write_readme(text, args.readme_marker)
        return
    unknown = [v for v in args.variants if v != "reference" and v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: reference, {', '.join(VARIANTS)}")
    ours, ref = prepare_data(args.work)
    ref_code = Path()
    if "reference" in args.variants:
        if args.reference is None:
            raise SystemExit("--reference is needed to run the reference")
        sys.path[:0] = [str(BENCH)]
        from corect_reference import prepare

        ref_code = prepare(args.reference, args.scratch)
    todo = [(v, s) for s in args.seeds for v in args.variants]
    with ThreadPoolExecutor(args.jobs) as pool:
        for line in pool.map(lambda vs: run_one(*vs, args, ours, ref, ref_code), todo):
            print(line, flush=True)


if __name__ == "__main__":
    main()
