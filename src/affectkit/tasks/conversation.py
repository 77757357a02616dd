"""Emotion recognition in conversation: one class per utterance, classification metrics, confusion plots."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from affectkit.config import TrainConfig
from affectkit.data.conversation import (
    IGNORE_INDEX,
    ConversationData,
    ConversationLoader,
    class_counts,
    load_conversations,
)
from affectkit.errors import ConfigError
from affectkit.features.encoder_ref import encoder_reference
from affectkit.metrics import CLASSIFICATION_METRICS, classification_metrics
from affectkit.tasks.base import Task


def inverse_frequency_weights(counts: np.ndarray) -> torch.Tensor:
    """w_c = N / (C * n_c), 0 for an absent class: rare classes weigh more in the loss."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.where(counts > 0, counts.sum() / (len(counts) * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def plot_confusion(matrix: np.ndarray, names: list[str], path: Path, title: str) -> None:
    """A row-normalised confusion matrix as a PNG (counts written in the cells)."""
    import matplotlib

    matrix = np.asarray(matrix)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 0.8 + 0.8 * len(names)))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class ConversationTask(Task):
    name = "conversation"
    splits = ("train", "dev", "test")
    defaults = {"select": "F1_weighted", "loss": "ce", "scheduler": "plateau"}  # the CORECT recipe
    losses = ("ce",)
    metric_names = CLASSIFICATION_METRICS

    def load(self, path: str | Path, model_cfg: Any, data_cfg: Any = None) -> ConversationData:
        classes = getattr(data_cfg, "classes", None)
        return load_conversations(path, getattr(model_cfg, "modalities", None), classes=classes)

    def load_for_checkpoint(self, path: str | Path, model_cfg: Any, info: dict[str, Any]) -> ConversationData:
        data = load_conversations(path, getattr(model_cfg, "modalities", None), classes=info["label_names"],
                                  speakers=info["speakers"])
        if data.n_classes != int(info["n_classes"]):
            raise ConfigError(f"{path}: {data.n_classes} classes, the checkpoint has {info['n_classes']}")
        return data

    def info(self, data: ConversationData) -> dict[str, Any]:
        info = {"dims": {m: int(data.dims[m]) for m in data.kept}, "n_classes": int(data.n_classes),
                "label_names": list(data.label_names), "n_speakers": int(data.n_speakers),
                "speakers": list(data.speakers), "encoder": encoder_reference(data.meta)}
        if "audio" in data.kept and isinstance(data.meta.get("audio_features"), dict):
            info["audio_features"] = dict(data.meta["audio_features"])  # how live audio becomes these features
        return info

    def loader(self, data: ConversationData, split: str, batch_size: int, shuffle: bool) -> Any:
        key = (split, batch_size)
        cache = data.__dict__.setdefault("_loaders", {})
        if key not in cache:  # dialogues become tensors once per (split, batch size)
            cache[key] = ConversationLoader(data.splits[split], data.kept, batch_size, shuffle=False)
        loader = cache[key]
        loader.shuffle = shuffle
        return loader

    def loss_fn(self, cfg: TrainConfig, data: ConversationData, device: torch.device | str = "cpu") -> Any:
        if cfg.loss != "ce":
            raise ConfigError(f"train.loss {cfg.loss!r} is not a classification loss; use ce")
        weight = None
        if cfg.class_weights:
            weight = inverse_frequency_weights(class_counts(data.splits["train"], data.n_classes))
            weight = weight.to(device)
        crit = nn.CrossEntropyLoss(weight=weight, ignore_index=IGNORE_INDEX)
        return lambda logits, batch: crit(logits, batch.labels[batch.mask])

    def targets(self, outputs: torch.Tensor, batch: Any) -> tuple[np.ndarray, np.ndarray, int]:
        truth = batch.labels[batch.mask]
        return outputs.argmax(-1).cpu().numpy(), truth.cpu().numpy(), int(truth.shape[0])

    def metrics(self, pred: np.ndarray, truth: np.ndarray, info: dict[str, Any]) -> dict[str, Any]:
        return classification_metrics(pred, truth, list(info["label_names"]))

    def example_input(self, data: ConversationData) -> Any:
        return None  # graph tracing of PyG layers is not supported by TensorBoard's tracer

    def after_run(self, result: Any, run_dir: Path, info: dict[str, Any]) -> None:
        names = list(info["label_names"])
        for split, metrics in (("dev", result.valid), ("test", result.test)):
            matrix = np.asarray(metrics["confusion"])
            with (run_dir / f"confusion_{split}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["true\\pred", *names])
                for name, row in zip(names, matrix.tolist()):
                    w.writerow([name, *row])
            plot_confusion(matrix, names, run_dir / f"confusion_{split}.png",
                           f"{split}: acc {metrics['Acc']:.3f}, wF1 {metrics['F1_weighted']:.3f}")
