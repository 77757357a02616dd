"""CMU-MOSI sentiment regression: a score in [-3, 3] per clip, the full MOSI metric suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from affectkit.config import TrainConfig
from affectkit.data.mosi import MosiData, load_mosi, mosi_loader
from affectkit.errors import ConfigError
from affectkit.metrics import REGRESSION_METRICS, regression_metrics
from affectkit.tasks.base import Task

REGRESSION_LOSSES = ("mse", "l1", "huber")


def regression_loss(cfg: TrainConfig) -> nn.Module:
    if cfg.loss == "mse":
        return nn.MSELoss()
    if cfg.loss == "l1":
        return nn.L1Loss()
    if cfg.loss == "huber":
        return nn.SmoothL1Loss(beta=cfg.huber_delta)
    raise ConfigError(f"unknown train.loss {cfg.loss!r} for a regression task; valid: {', '.join(REGRESSION_LOSSES)}")


class MosiTask(Task):
    name = "mosi"
    splits = ("train", "valid", "test")
    defaults = {"select": "Corr", "loss": "mse", "scheduler": "cosine"}  # the lab recipe
    losses = REGRESSION_LOSSES
    metric_names = REGRESSION_METRICS

    def load(self, path: str | Path, model_cfg: Any, data_cfg: Any = None) -> MosiData:
        return load_mosi(path, getattr(model_cfg, "modalities", None))

    def info(self, data: MosiData) -> dict[str, Any]:
        return {"dims": dict(data.dims), "seq_len": data.seq_len}

    def loader(self, data: MosiData, split: str, batch_size: int, shuffle: bool) -> Any:
        return mosi_loader(data.splits[split], batch_size, shuffle)

    def loss_fn(self, cfg: TrainConfig, data: MosiData, device: torch.device | str = "cpu") -> Any:
        crit = regression_loss(cfg)
        return lambda outputs, batch: crit(outputs, batch["labels"])

    def targets(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, int]:
        return outputs.detach().float().cpu().numpy(), batch["labels"].cpu().numpy(), int(batch["labels"].shape[0])

    def metrics(self, pred: np.ndarray, truth: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
        return regression_metrics(pred, truth)
