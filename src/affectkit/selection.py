"""Which epoch's weights a run keeps, and when it stops early: on the dev metric only, never on test.

The rule: an epoch is kept when its dev score strictly improves on the best so far in the metric's direction
(``metrics.is_better``: NaN never improves); the first epoch is kept whatever its score, so a run always has
weights to reload. ``stale`` counts the epochs since the kept one; with ``patience`` > 0 the run stops once
``stale`` reaches it (0: never stop early).
"""

from __future__ import annotations

from dataclasses import dataclass

from affectkit.metrics import is_better


@dataclass
class EpochSelection:
    """The kept epoch (1-based; 0 before any), its dev score and the epochs since it, for one run."""

    metric: str
    patience: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    stale: int = 0

    def offer(self, epoch: int, score: float) -> bool:
        """Record ``epoch``'s dev score; True when this epoch's weights are now the ones to keep."""
        improved = is_better(self.metric, score, self.best_score)
        if improved or self.best_epoch == 0:
            if improved:
                self.best_score = score
            self.best_epoch = epoch
            self.stale = 0
            return True
        self.stale += 1
        return False

    @property
    def stop(self) -> bool:
        """Early stopping: ``patience`` epochs in a row without a kept one."""
        return self.patience > 0 and self.stale >= self.patience
