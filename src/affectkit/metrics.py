"""Every metric, written once: the MOSI regression suite and the classification suite for ERC.

Conventions (the lab's / MMSA's): Acc-7 and Acc-5 clip to [-3, 3] / [-2, 2] and round with ``np.round``
(round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2); Non0 metrics drop samples whose label is exactly 0 and
compare ``> 0``; Has0 metrics keep every sample and compare ``>= 0``; F1 is scikit-learn's ``f1_score(truth,
pred, average="weighted")`` (the standard argument order; the lab's code swaps them), computed here from the
confusion matrix with numpy (importing ``sklearn.metrics`` costs a training process ~145 MiB of memory).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

log = logging.getLogger("affectkit")

REGRESSION_METRICS: tuple[str, ...] = (
    "MAE", "Corr", "Acc7", "Acc5", "Non0_Acc2", "Non0_F1", "Has0_Acc2", "Has0_F1",
)
#: Scalar metrics of the classification suite (``classification_metrics`` also returns per-class F1 and a
#: confusion matrix, which cannot select an epoch).
CLASSIFICATION_METRICS: tuple[str, ...] = ("Acc", "F1_weighted", "F1_macro")
#: Metrics where lower is better (every other metric: higher is better).
LOWER_IS_BETTER: frozenset[str] = frozenset({"MAE", "loss"})


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, labels: list[Any]) -> np.ndarray:
    """Counts (rows = truth, columns = prediction) over ``labels``; samples with another value are ignored."""
    index = {label: i for i, label in enumerate(labels)}
    t = np.array([index.get(v, -1) for v in np.asarray(truth).tolist()], dtype=np.int64)
    p = np.array([index.get(v, -1) for v in np.asarray(pred).tolist()], dtype=np.int64)
    keep = (t >= 0) & (p >= 0)
    n = len(labels)
    return np.bincount(t[keep] * n + p[keep], minlength=n * n).reshape(n, n)


def f1_scores(truth: np.ndarray, pred: np.ndarray, labels: list[Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-label F1 = 2 tp / (predicted + true), 0 where a label is neither predicted nor true, and the support
    (true count) of each label.  ``labels`` None: every value seen in either array, sorted (scikit-learn's)."""
    truth, pred = np.asarray(truth).reshape(-1), np.asarray(pred).reshape(-1)
    if labels is None:
        labels = sorted(set(truth.tolist()) | set(pred.tolist()))
    lab = np.asarray(labels)[:, None]
    is_true, is_pred = truth[None, :] == lab, pred[None, :] == lab  # (labels, samples)
    tp = (is_true & is_pred).sum(1).astype(np.float64)
    support = is_true.sum(1).astype(np.float64)
    denom = support + is_pred.sum(1)
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0), support


def weighted_f1(truth: np.ndarray, pred: np.ndarray, labels: list[Any] | None = None) -> float:
    """F1 averaged over labels weighted by their support (0 when no sample has one of the labels)."""
    f1, support = f1_scores(truth, pred, labels)
    return float(np.dot(f1, support) / support.sum()) if support.sum() > 0 else 0.0


def pearson(pred: np.ndarray, truth: np.ndarray) -> float:
    """Pearson r; NaN (with a log line) when either side is constant, where r is undefined."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1)
    if pred.size < 2 or np.ptp(pred) == 0 or np.ptp(truth) == 0:
        log.warning("Corr undefined: %s are constant", "predictions" if np.ptp(pred) == 0 else "labels")
        return math.nan
    return float(np.corrcoef(pred, truth)[0, 1])


def multiclass_acc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of samples whose rounded prediction equals the rounded label."""
    return float(np.mean(np.round(pred) == np.round(truth)))


def _binary(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    if truth.size == 0:
        return math.nan, math.nan
    return float(np.mean(truth == pred)), weighted_f1(truth, pred)


def regression_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """The full MOSI suite on continuous predictions and labels in [-3, 3]."""
    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=np.float64).reshape(-1)
    if pred.shape != truth.shape or pred.size == 0:
        raise ValueError(f"need equal, non-empty prediction and label vectors, got {pred.shape} and {truth.shape}")
    nonzero = truth != 0
    non0_acc, non0_f1 = _binary(pred[nonzero] > 0, truth[nonzero] > 0)
    has0_acc, has0_f1 = _binary(pred >= 0, truth >= 0)
    return {
        "MAE": float(np.mean(np.abs(pred - truth))),
        "Corr": pearson(pred, truth),
        "Acc7": multiclass_acc(np.clip(pred, -3, 3), np.clip(truth, -3, 3)),
        "Acc5": multiclass_acc(np.clip(pred, -2, 2), np.clip(truth, -2, 2)),
        "Non0_Acc2": non0_acc,
        "Non0_F1": non0_f1,
        "Has0_Acc2": has0_acc,
        "Has0_F1": has0_f1,
    }


def classification_metrics(
    pred: np.ndarray, truth: np.ndarray, label_names: list[str]
) -> dict[str, object]:
    """Accuracy, weighted and macro F1, per-class F1 and the confusion matrix (rows = truth)."""
    pred = np.asarray(pred).reshape(-1)
    truth = np.asarray(truth).reshape(-1)
    if pred.shape != truth.shape or pred.size == 0:
        raise ValueError(f"need equal, non-empty prediction and label vectors, got {pred.shape} and {truth.shape}")
    labels = list(range(len(label_names)))
    per_class, _ = f1_scores(truth, pred, labels)
    return {
        "Acc": float(np.mean(truth == pred)),
        "F1_weighted": weighted_f1(truth, pred, labels),
        "F1_macro": float(per_class.mean()),
        "F1_per_class": {name: float(v) for name, v in zip(label_names, per_class)},
        "confusion": confusion_matrix(truth, pred, labels=labels).tolist(),
    }


def format_number(x: Any, signed: bool = False) -> str:
    """A metric for tables: 4 decimals (with a sign when ``signed``); ``n/a`` for None, NaN and inf; other
    values (ints, text) as they are."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float):
        return f"{x:+.4f}" if signed else f"{x:.4f}"
    return str(x)


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Strict improvement in the metric's direction; NaN never improves."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best
