"""The interface between a data format and the one trainer."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from affectkit.config import TrainConfig


class Task:
    """Subclasses load data, make batches, compute the loss and the metric suite of one kind of problem."""

    name: str = ""
    splits: tuple[str, str, str] = ("train", "valid", "test")
    default_select: str = ""

    def load(self, path: str | Path, model_cfg: Any) -> Any:
        raise NotImplementedError

    def info(self, data: Any) -> dict[str, Any]:
        """What a model needs to know about the data (dims, classes, speakers): stored in checkpoints."""
        raise NotImplementedError

    def loader(self, data: Any, split: str, batch_size: int, shuffle: bool) -> Iterable[Any]:
        raise NotImplementedError

    def loss_fn(self, cfg: TrainConfig, data: Any) -> Any:
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
