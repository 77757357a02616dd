"""Evaluate a saved checkpoint on a data file: the model is rebuilt from the checkpoint alone, and the data is
read with the checkpoint's own class list and speaker slots (never re-derived from the new file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from affectkit.checkpoint import load_model
from affectkit.device import resolve_device
from affectkit.errors import ConfigError
from affectkit.models.registry import model_config
from affectkit.tasks import get_task
from affectkit.train import evaluate


def evaluate_checkpoint(checkpoint: str | Path, data_path: str | Path, splits: list[str] | None = None,
                        device: str = "auto") -> dict[str, dict[str, Any]]:
    """Metrics (with loss) per split for a checkpoint on ``data_path``, on ``device``."""
    dev = resolve_device(device)
    model, cfg, info = load_model(checkpoint, dev)
    task = get_task(cfg.data.task)
    for split in splits or []:
        if split not in task.splits:
            raise ConfigError(f"unknown split {split!r}; valid: {', '.join(task.splits)}")
    data = task.load_for_checkpoint(data_path, model_config(cfg.model_name, cfg.model_params), info)
    for m, d in task.info(data).get("dims", {}).items():
        if m in info.get("dims", {}) and info["dims"][m] != d:
            raise ConfigError(f"{data_path}: {m} features have dim {d}, "
                              f"the checkpoint was trained on {info['dims'][m]}")
    loss_fn = task.loss_fn(task.resolve(cfg.train), data, dev)
    out: dict[str, dict[str, Any]] = {}
    for split in splits or list(task.splits):
        res = evaluate(model, task, data, split, cfg.train.eval_batch_size, loss_fn, info)
        out[split] = {"loss": res.loss, **res.metrics}
    return out
