"""Prepare and run the public CORECT reference code (leson502/CORECT_EMNLP2023, commit 96ad012) outside the repo.

Third-party code is never committed here: it is exported at run time from a git mirror into a scratch
folder (default ``/tmp/corect_ref``) and run there, in a child process, by ``bench/corect.py --reference``.

Getting the code (any of):

* the session's ``fetch`` tool on ``github:leson502/CORECT_EMNLP2023`` gives a bare mirror at
  ``/work/.mirror/leson502+CORECT_EMNLP2023/repo``; pass that path as ``--reference``;
* ``git clone https://github.com/leson502/CORECT_EMNLP2023`` anywhere and pass the clone;
* a folder already holding ``train.py`` and ``corect/`` (e.g. a previous ``/tmp/corect_ref``) is used as is.

From a git directory only the code paths of commit 96ad012 are exported (``git archive``): the repository's
data pickles and checkpoints are large objects the mirror may lack, and the bench writes its own data.

What is changed to make it run here, on CPU, with torch 2.13.0+cpu and torch-geometric 2.8 (nothing else is
installed and no file of the reference is edited):

* ``comet_ml`` (imported at module level by ``train.py``, ``corect/Coach.py`` and ``corect/online_log.py``,
  used only with ``--log_in_comet``) is replaced by a two-class stub written to ``<scratch>/_stubs``;
* ``--device=cpu`` (the reference defaults to ``cuda``) and ``torch.set_num_threads(threads)``;
* ``Coach.train_epoch``, ``Coach.evaluate`` and ``Coach.train`` are wrapped in the child (monkeypatching, not
  editing) to record wall and CPU time per phase and the per-epoch dev/test weighted F1.

Everything else is ``run_train.sh``'s command line (IEMOCAP 6-way, atv, 50 -> ``--epochs`` epochs, lr 2.5e-4,
Adam, dropout 0.5, batch 10, transformer text encoder, speaker embedding, temp_multi edges, wp 11, wf 5, RGCN,
graph transformer 7 heads, cross-modal 2 layers / 2 heads, self-attention 3 layers / 2 heads; seed 24, the
reference's default). The data file is read from ``<root>/data/iemocap/data_iemocap.pkl``; each improvement of
the dev F1 saves the whole model to ``<root>/model_checkpoints`` (part of the reference's epoch, kept).

    python bench/corect_reference.py prepare --reference /work/.mirror/leson502+CORECT_EMNLP2023/repo
    python bench/corect_reference.py run --reference /tmp/corect_ref --root DIR --epochs 2 --threads 1 --out r.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REF_REPO = "leson502/CORECT_EMNLP2023"
REF_COMMIT = "96ad012"
CODE_PATHS = ("corect", "train.py", "eval.py", "README.md", "run_train.sh")
#: run_train.sh of the reference, less --epochs (set by the bench), plus --device=cpu.
REF_ARGS = [
    "--dataset=iemocap", "--modalities=atv", "--from_begin", "--learning_rate=0.00025", "--optimizer=adam",
    "--drop_rate=0.5", "--batch_size=10", "--rnn=transformer", "--use_speaker", "--edge_type=temp_multi",
    "--wp=11", "--wf=5", "--gcn_conv=rgcn", "--use_graph_transformer", "--graph_transformer_nheads=7",
    "--use_crossmodal", "--num_crossmodal=2", "--num_self_att=3", "--crossmodal_nheads=2", "--self_att_nheads=2",
    "--device=cpu",
]
COMET_STUB = '''"""Stub of comet_ml for the CORECT reference (affectkit bench): imported at module level, unused
without --log_in_comet."""


class Experiment:
    def __init__(self, *args, **kwargs):
        pass


class Optimizer:
    def __init__(self, *args, **kwargs):
        pass
'''


def _is_checkout(path: Path) -> bool:
    return (path / "train.py").is_file() and (path / "corect" / "Coach.py").is_file()


def _git_dir(path: Path) -> Path | None:
    for cand in (path, path / ".git"):
        if (cand / "HEAD").is_file() and (cand / "objects").is_dir():
            return cand
    return None


def prepare(reference: Path, scratch: Path, commit: str = REF_COMMIT) -> Path:
    """A runnable checkout of the reference: ``reference`` itself if it holds the code, else the code paths of
    ``commit`` exported from the git directory ``reference`` into ``scratch``. Writes the comet_ml stub."""
    reference = reference.expanduser().resolve()
    if _is_checkout(reference):
        root = reference
    else:
        git_dir = _git_dir(reference)
        if git_dir is None:
            raise SystemExit(f"--reference {reference}: neither a checkout of {REF_REPO} (train.py, corect/) "
                             f"nor a git directory; use the fetch tool or git clone (see bench/corect_reference.py)")
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", commit, *CODE_PATHS],
                                 capture_output=True, check=False)
        if archive.returncode:
            raise SystemExit(f"git archive {commit} failed in {git_dir}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive.stdout, check=True)
        root = scratch
    stubs = root / "_stubs"
    stubs.mkdir(exist_ok=True)
    (stubs / "comet_ml.py").write_text(COMET_STUB)
    return root


def write_reference_data(splits: dict[str, list[dict[str, Any]]], root: Path) -> Path:
    """Write ``splits`` where the reference's train.py reads IEMOCAP 6-way: ``root/data/iemocap/data_iemocap.pkl``
    (its layout: per dialogue vid, speakers "M"/"F", labels, text (N, 768) array, audio and visual as lists
    of 1-D arrays, sentence)."""
    path = root / "data" / "iemocap" / "data_iemocap.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    (root / "model_checkpoints").mkdir(exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(splits, fh, protocol=4)
    return path


def run_child(reference: Path, root: Path, epochs: int, threads: int, out: Path, seed: int | None = None) -> None:
    """Run the reference's train.py in this process (the bench starts it as a fresh child) and write the
    timings, per-epoch F1 and peak RSS to ``out`` as JSON.  ``seed``: the reference's ``--seed`` (None: its
    default, 24)."""
    import torch

    torch.set_num_threads(threads)
    sys.path[:0] = [str(reference / "_stubs"), str(reference)]
    import corect  # the reference package

    coach = corect.Coach
    marks: list[dict[str, Any]] = []
    result: dict[str, Any] = {}

    def timed(name: str, fn: Any) -> Any:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            phase = name if name != "evaluate" else ("test" if kwargs.get("test", args[0] if args else False)
                                                     else "dev")
            w0, c0 = time.monotonic(), time.process_time()
            value = fn(self, *args, **kwargs)
            marks.append({"phase": phase, "wall0": w0, "wall1": time.monotonic(),
                          "cpu0": c0, "cpu1": time.process_time()})
            return value
        return wrapper

    original_train = coach.train

    def train(self: Any) -> Any:
        ret = original_train(self)
        best_dev_f1, best_epoch, _, losses, dev_f1s, test_f1s = ret
        result.update(best_epoch=best_epoch, best_dev_f1=float(best_dev_f1), dev_f1=[float(f) for f in dev_f1s],
                      test_f1=[float(f) for f in test_f1s], train_loss=[float(v) for v in losses])
        return ret

    coach.train_epoch = timed("train", coach.train_epoch)
    coach.evaluate = timed("evaluate", coach.evaluate)
    coach.train = train
    n_params: list[int] = []
    original_set = corect.Optim.set_parameters

    def set_parameters(self: Any, params: Any, name: str) -> None:
        original_set(self, params, name)
        n_params.append(sum(p.numel() for p in self.params if p.requires_grad))

    corect.Optim.set_parameters = set_parameters
    sys.argv = ["train.py", *REF_ARGS, f"--epochs={epochs}", f"--data_root={root}",
                *([] if seed is None else [f"--seed={seed}"])]
    runpy.run_path(str(reference / "train.py"), run_name="__main__")
    result.update(marks=marks, end_wall=time.monotonic(), end_cpu=time.process_time(),
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  params=n_params[0] if n_params else None, torch=torch.__version__, threads=threads)
    out.write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="export the reference code into --scratch (or check a checkout)")
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--scratch", type=Path, default=Path("/tmp/corect_ref"))
    r = sub.add_parser("run", help="run the reference's train.py in this process (the bench's child)")
    r.add_argument("--reference", type=Path, required=True, help="a prepared checkout")
    r.add_argument("--root", type=Path, required=True, help="--data_root: holds data/iemocap/data_iemocap.pkl")
    r.add_argument("--epochs", type=int, default=2)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--seed", type=int, default=None, help="the reference's --seed (default: its own, 24)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        print(prepare(args.reference, args.scratch))
    else:
        run_child(args.reference.resolve(), args.root.resolve(), args.epochs, args.threads, args.out, args.seed)


if __name__ == "__main__":
    main()
