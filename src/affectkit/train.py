"""The one trainer, for every model and task.

Adam; a per-batch cosine schedule (the MOSI recipe) or ReduceLROnPlateau on the validation loss (CORECT);
selection of the epoch on a validation metric (never the test split), optionally with early stopping
(``train.patience``); the best weights are reloaded and the test split is evaluated once.  The task supplies
what the config leaves unset (``select``, ``loss``, ``scheduler``).  The model and every batch live on
``train.device`` (``auto`` picks cuda, then mps, then the CPU); checkpoints always hold CPU tensors.
Each run writes a folder: ``config.yaml``, ``metrics.json``, ``best.pt`` and TensorBoard events (losses,
every scalar metric per epoch, the model graph).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from affectkit.checkpoint import save_checkpoint
from affectkit.config import RunConfig, dump_yaml
from affectkit.device import autocast, grad_scaler, resolve_device
from affectkit.errors import ConfigError
from affectkit.models import build_model, get_model_entry
from affectkit.models.registry import model_config
from affectkit.selection import EpochSelection
from affectkit.tasks import Task, get_task

log = logging.getLogger("affectkit")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (the recipe's reproducibility step)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class EvalResult:
    loss: float
    metrics: dict[str, Any]
    pred: np.ndarray
    truth: np.ndarray


@dataclass
class RunResult:
    run_dir: Path
    best_epoch: int  # 1-based
    valid: dict[str, Any]
    test: dict[str, Any]
    history: list[dict[str, Any]]
    train_seconds: float
    n_params: int
    profile: dict[str, float] = field(default_factory=dict)
    epochs_run: int = 0  # epochs actually trained (fewer than train.epochs when early stopping ended the run)
    max_epochs: int = 0  # train.epochs: the most the run was allowed
    stopped_early: bool = False
    select: str = ""  # the validation metric that chose the epoch


def json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the result is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def new_run_dir(cfg: RunConfig) -> Path:
    """``out_dir/name/YYYYmmdd-HHMMSS`` (suffixed when two runs start in the same second)."""
    base = Path(cfg.out_dir) / cfg.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    path.mkdir(parents=True)
    return path


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, data: Any, split: str, batch_size: int, loss_fn: Any,
             info: dict[str, Any], amp: bool = False) -> EvalResult:
    """Loss (mean over samples), predictions and the metric suite on one split (on the model's device)."""
    model.eval()
    device = model_device(model)
    preds, truths, total, count = [], [], 0.0, 0
    for batch in task.loader(data, split, batch_size, shuffle=False):
        batch = task.to_device(batch, device)
        with autocast(device, amp):
            out = model(batch)
        p, t, n = task.targets(out, batch)
        total += float(loss_fn(out, batch)) * n
        count += n
        preds.append(p)
        truths.append(t)
    pred, truth = np.concatenate(preds), np.concatenate(truths)
    return EvalResult(total / max(count, 1), task.metrics(pred, truth, info), pred, truth)


class _GraphAdapter(nn.Module):
    """Lets TensorBoard trace a model whose forward takes a dict of tensors."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.keys, tensors)))


def _add_graph(writer: Any, model: nn.Module, example: Any) -> None:
    if not isinstance(example, dict):
        example = getattr(example, "as_dict", lambda: None)()
    if not isinstance(example, dict):
        return
    keys = [k for k, v in example.items() if isinstance(v, torch.Tensor)]
    was_training = model.training
    model.eval()
    try:
        writer.add_graph(_GraphAdapter(model, keys), tuple(example[k] for k in keys))
    except Exception as exc:  # tracing is a convenience; never fail a run for it
        log.warning("could not trace the model graph for TensorBoard: %s", str(exc).splitlines()[0])
    finally:
        model.train(was_training)


def _scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> tuple[Any, str]:
    kind = cfg.train.scheduler
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs * steps_per_epoch), "batch"
    if kind == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.train.plateau_factor, patience=cfg.train.plateau_patience
        ), "epoch"
    if kind == "none":
        return None, "none"
    raise ConfigError(f"unknown train.scheduler {kind!r}; valid: cosine, plateau, none")


#: Called after each epoch's validation with (epoch, dev score of ``train.select``); may raise to end the run
#: (e.g. ``optuna.TrialPruned``), which then propagates to the caller.
EpochCallback = Callable[[int, float], None]


def resolve_config(cfg: RunConfig) -> tuple[RunConfig, Task]:
    """``cfg`` with the task's defaults filled in and every choice checked, before any data is read."""
    task = get_task(cfg.data.task)
    entry = get_model_entry(cfg.model_name)
    if entry.task != task.name:
        raise ConfigError(f"model {cfg.model_name!r} is for task {entry.task!r}, but data.task is {task.name!r}")
    tc = task.resolve(cfg.train)
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(tc, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(tc, key)}")
    if tc.patience < 0:
        raise ConfigError(f"train.patience must be >= 0 (0 = no early stopping), got {tc.patience}")
    resolve_device(tc.device)  # an unknown or absent device fails here, not after loading the data
    return replace(cfg, train=tc), task


def train(cfg: RunConfig, data_path: str | Path | None = None, run_dir: str | Path | None = None,
          data: Any = None, on_epoch: EpochCallback | None = None) -> RunResult:
    """Train ``cfg`` on a data file, select on validation, test once; returns the run's results."""
    cfg, task = resolve_config(cfg)
    mcfg = model_config(cfg.model_name, cfg.model_params)
    tc = cfg.train
    select = tc.select
    device = resolve_device(tc.device)
    path = data_path or cfg.data.path
    if data is None:
        if path is None:
            raise ConfigError("no data file: pass --data PATH or set data.path")
        data = task.load(path, mcfg, cfg.data)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    info = task.info(data)

    seed_everything(tc.seed)
    model = build_model(cfg.model_name, cfg.model_params, info)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.to(device)
    loss_fn = task.loss_fn(tc, data, device)
    scaler = grad_scaler(device, tc.amp)
    train_loader = task.loader(data, task.splits[0], tc.batch_size, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay,
                                 fused=True if tc.fused and device.type in ("cpu", "cuda") else None)
    scheduler, step_on = _scheduler(cfg, optimizer, len(train_loader))

    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    writer = None
    if tc.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
        if tc.graph:
            # Iterating a DataLoader draws a seed from the global RNG: restore it, or the seeded shuffle
            # (and so every result) would differ from a run without the graph (and from the lab's script).
            with torch.random.fork_rng(devices=[]):
                example = task.example_input(data)
                if example is not None:
                    _add_graph(writer, model, task.to_device(example, device))
    log.info("%s | model %s, %d parameters on %s | run folder %s", task.describe(data), cfg.model_name, n_params,
             device, run_dir)

    selection = EpochSelection(select, tc.patience)
    # The best epoch's weights wait on disk, not in memory (a copy of the model the size of its parameters):
    best_path = run_dir / ".best_state.pt"
    history: list[dict[str, Any]] = []
    prof = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0, "evaluate": 0.0}
    start = time.perf_counter()
    for epoch in range(1, tc.epochs + 1):
        model.train()
        total, count = 0.0, 0
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{tc.epochs}", disable=not tc.progress,
                   leave=False, unit="batch")
        it = iter(train_loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            t1 = time.perf_counter()
            prof["data"] += t1 - t0
            if batch is None:
                break
            batch = task.to_device(batch, device)
            optimizer.zero_grad()
            with autocast(device, tc.amp):
                out = model(batch)
                loss = loss_fn(out, batch)
            t2 = time.perf_counter()
            scaler.scale(loss).backward()
            if tc.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            t3 = time.perf_counter()
            scaler.step(optimizer)
            scaler.update()
            if step_on == "batch":
                scheduler.step()
            t4 = time.perf_counter()
            prof["forward"] += t2 - t1
            prof["backward"] += t3 - t2
            prof["optimizer"] += t4 - t3
            n = task.targets(out, batch)[2]
            total += loss.item() * n
            count += n
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        t5 = time.perf_counter()
        val = evaluate(model, task, data, task.splits[1], tc.eval_batch_size, loss_fn, info, tc.amp)
        prof["evaluate"] += time.perf_counter() - t5
        if step_on == "epoch":
            scheduler.step(val.loss)
        score = float(val.metrics[select])
        if selection.offer(epoch, score):
            torch.save(model.state_dict(), best_path)
        row = {"epoch": epoch, "train_loss": total / max(count, 1), "valid_loss": val.loss,
               "lr": optimizer.param_groups[0]["lr"],
               **{f"valid_{k}": v for k, v in val.metrics.items() if isinstance(v, float)}}
        history.append(row)
        if writer is not None:
            writer.add_scalar("loss/train", row["train_loss"], epoch)
            writer.add_scalar("loss/valid", val.loss, epoch)
            writer.add_scalar("lr", row["lr"], epoch)
            for k, v in val.metrics.items():
                if isinstance(v, float) and math.isfinite(v):
                    writer.add_scalar(f"valid/{k}", v, epoch)
        log.info("epoch %d/%d train loss %.4f valid loss %.4f valid %s %.4f%s", epoch, tc.epochs,
                 row["train_loss"], val.loss, select, score, " *" if selection.best_epoch == epoch else "")
        if on_epoch is not None:
            on_epoch(epoch, score)
        if selection.stop:
            log.info("early stop after epoch %d: no better valid %s for %d epochs", epoch, select, selection.stale)
            break
    train_seconds = time.perf_counter() - start
    epochs_run = len(history)

    model.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))  # epoch 1 always saves
    best_path.unlink()
    best_epoch = selection.best_epoch
    val = evaluate(model, task, data, task.splits[1], tc.eval_batch_size, loss_fn, info, tc.amp)
    test = evaluate(model, task, data, task.splits[2], tc.eval_batch_size, loss_fn, info, tc.amp)
    if writer is not None:
        for k, v in test.metrics.items():
            if isinstance(v, float) and math.isfinite(v):
                writer.add_scalar(f"test/{k}", v, best_epoch)
        writer.close()
    result = RunResult(run_dir, best_epoch, {"loss": val.loss, **val.metrics}, {"loss": test.loss, **test.metrics},
                       history, train_seconds, n_params, prof, epochs_run, tc.epochs, epochs_run < tc.epochs, select)
    save_checkpoint(run_dir / "best.pt", cfg, info, model, {"best_epoch": best_epoch, "select": select})
    (run_dir / "metrics.json").write_text(json.dumps(json_safe({
        "data": str(path) if path is not None else None,
        "model": cfg.model_name, "select": select, "best_epoch": best_epoch, "epochs_run": epochs_run,
        "max_epochs": tc.epochs, "patience": tc.patience, "device": str(device),
        "valid": result.valid, "test": result.test, "train_seconds": train_seconds,
        "n_params": n_params, "profile": prof, "history": history,
    }), indent=2))
    task.after_run(result, run_dir, info)
    return result
