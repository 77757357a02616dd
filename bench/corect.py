"""CORECT speed and memory on a synthetic IEMOCAP-sized file: seconds per training epoch, test-set inference
and the peak resident memory of a training run (each measured in a fresh subprocess so peaks don't mix).

    python bench/corect.py [--epochs 2] [--threads 1]

Data: `write_synthetic_conversations(preset="iemocap6")` with IEMOCAP's split sizes (108/12/31 dialogues of
20..60 utterances, text/audio/visual 768/100/512), the full CORECT preset (configs/corect_iemocap6.yaml).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
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
                                  mods], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            p = r["profile"]
            print(f"modalities {mods:<18} params {r['params']:>9,}  epoch {r['epoch_s']:6.2f} s "
                  f"(forward {p['forward'] / args.epochs:.2f}, backward {p['backward'] / args.epochs:.2f}, "
                  f"optimizer {p['optimizer'] / args.epochs:.2f})  test inference {r['test_inference_s']:.2f} s "
                  f"for {r['test_utterances']} utterances  peak RSS {r['peak_rss_mib']:.0f} MiB "
                  f"(before training {r['rss_before_training_mib']:.0f} MiB)  [{time.perf_counter() - t:.0f} s]")


if __name__ == "__main__":
    main()
