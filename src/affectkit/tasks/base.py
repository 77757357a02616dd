"""The interface between a data format and the one trainer."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from affectkit.config import DataConfig, TrainConfig
from affectkit.errors import ConfigError

SCHEDULERS: tuple[str, ...] = ("cosine", "plateau", "none")


class Task:
    """Subclasses load data, make batches, compute the loss and the metric suite of one kind of problem."""

    name: str = ""
    splits: tuple[str, str, str] = ("train", "valid", "test")
    #: What the task supplies for ``train.select`` / ``train.loss`` / ``train.scheduler`` left unset (None).
    defaults: dict[str, str] = {}
    losses: tuple[str, ...] = ()
    #: Scalar validation metrics that may select the epoch.
    metric_names: tuple[str, ...] = ()

    @property
    def default_select(self) -> str:
        return self.defaults["select"]

    def resolve(self, tc: TrainConfig) -> TrainConfig:
        """``tc`` with the task's defaults filled in and each choice checked, before any training starts."""
        filled = {k: v for k, v in self.defaults.items() if getattr(tc, k) is None}
        tc = dataclasses.replace(tc, **filled)
        for key, valid in (("select", self.metric_names), ("loss", self.losses), ("scheduler", SCHEDULERS)):
            value = getattr(tc, key)
            if value not in valid:
                what = "a metric" if key == "select" else "valid"
                raise ConfigError(f"train.{key} {value!r} is not {what} for task {self.name!r}; "
                                  f"valid: {', '.join(valid)}")
        return tc

    def load(self, path: str | Path, model_cfg: Any, data_cfg: DataConfig | None = None) -> Any:
        """Read and validate a data file; ``data_cfg`` may declare what the file must hold (classes)."""
        raise NotImplementedError

    def load_for_checkpoint(self, path: str | Path, model_cfg: Any, info: dict[str, Any]) -> Any:
        """Read a file for a trained model: the checkpoint's own mappings (classes, speakers) are used, never
        re-derived from the file, and anything the model cannot read is refused."""
        return self.load(path, model_cfg)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        """``batch`` with every tensor on ``device`` (a no-op on the CPU)."""
        if device.type == "cpu":
            return batch
        if isinstance(batch, dict):
            return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                    for k, v in batch.items()}
        return batch.to(device, non_blocking=True)

    def info(self, data: Any) -> dict[str, Any]:
        """What a model needs to know about the data (dims, classes, speakers): stored in checkpoints."""
        raise NotImplementedError

    def loader(self, data: Any, split: str, batch_size: int, shuffle: bool) -> Iterable[Any]:
        raise NotImplementedError

    def loss_fn(self, cfg: TrainConfig, data: Any, device: torch.device | str = "cpu") -> Any:
        """A callable (outputs, batch) -> scalar loss (mean over the batch's samples)."""
        raise NotImplementedError

    def targets(self, outputs: torch.Tensor, batch: Any) -> tuple[np.ndarray, np.ndarray, int]:
        """(predictions, truths, number of samples) of one batch, as numpy, padding removed."""
        raise NotImplementedError

    def metrics(self, pred: np.ndarray, truth: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def example_input(self, data: Any) -> Any:
        """A small batch for tracing the model graph."""
        return next(iter(self.loader(data, self.splits[0], 2, False)))

    def describe(self, data: Any) -> str:
        return str(getattr(data, "summary", lambda: "")())

    def after_run(self, result: Any, run_dir: Path, info: dict[str, Any]) -> None:
        """Extra artefacts for the run folder (e.g. a confusion-matrix plot); nothing by default."""
