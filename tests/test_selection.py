"""Epoch selection and early stopping (``affectkit.selection``): hand-worked cases and a hypothesis check
against a brute-force reading of the rule (first strict best in the metric's direction, NaN never best)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from affectkit.selection import EpochSelection


def run(metric: str, scores: list[float], patience: int = 0) -> tuple[list[bool], EpochSelection, int]:
    """Offer ``scores`` as epochs 1, 2, ...; returns the kept flags, the selection and the epochs run."""
    sel, kept = EpochSelection(metric, patience), []
    for epoch, score in enumerate(scores, start=1):
        kept.append(sel.offer(epoch, score))
        if sel.stop:
            break
    return kept, sel, len(kept)


def test_higher_is_better_keeps_the_first_strict_best():
    kept, sel, n = run("F1_weighted", [0.5, 0.7, 0.7, 0.6, 0.8, 0.8])
    assert kept == [True, True, False, False, True, False]
    assert (sel.best_epoch, sel.best_score, sel.stale, n) == (5, 0.8, 1, 6)


def test_lower_is_better_for_mae_and_loss():
    for metric in ("MAE", "loss"):
        kept, sel, _ = run(metric, [1.0, 0.9, 1.2, 0.9, 0.5])
        assert kept == [True, True, False, False, True] and sel.best_epoch == 5 and sel.best_score == 0.5


def test_nan_never_improves_but_the_first_epoch_is_kept():
    kept, sel, _ = run("Corr", [math.nan, math.nan, 0.1, math.nan, 0.05])
    assert kept == [True, False, True, False, False]
    assert sel.best_epoch == 3 and sel.best_score == 0.1 and sel.stale == 2
    kept, sel, _ = run("Corr", [math.nan, math.nan])
    assert sel.best_epoch == 1 and sel.best_score is None and sel.stale == 1


def test_patience_stops_after_that_many_epochs_without_a_kept_one():
    scores = [0.1, 0.3, 0.2, 0.2, 0.2, 0.9]
    assert run("Acc", scores, patience=3)[2] == 5  # epochs 3, 4, 5 stale -> stop after 5; never sees 0.9
    assert run("Acc", scores, patience=4)[2] == 6
    assert run("Acc", scores, patience=0)[2] == 6  # 0: never stop early
    assert run("Acc", [0.1, 0.05], patience=1)[2] == 2
    assert not EpochSelection("Acc", 1).stop


scores = st.lists(st.one_of(st.floats(-5, 5, allow_nan=False), st.just(math.nan)), min_size=1, max_size=30)


@given(scores, st.sampled_from(["F1_weighted", "MAE", "Corr", "loss"]), st.integers(0, 5))
def test_matches_a_brute_force_reading_of_the_rule(values, metric, patience):
    lower = metric in ("MAE", "loss")
    kept, sel, n = run(metric, values, patience)
    best, best_epoch, stale = None, 0, 0
    for epoch, v in enumerate(values[:n], start=1):
        better = not math.isnan(v) and (best is None or (v < best if lower else v > best))
        if better or best_epoch == 0:
            best = v if better else best
            best_epoch, stale = epoch, 0
        else:
            stale += 1
        assert kept[epoch - 1] == (best_epoch == epoch)
    assert (sel.best_epoch, sel.stale) == (best_epoch, stale)
    assert sel.best_score == best or (sel.best_score is None and best is not None and math.isnan(best))
    stopped_at = next((e for e in range(1, len(values) + 1)
                       if patience and e - max(i for i in range(1, e + 1) if kept_upto(values, metric, i)) >= patience),
                      len(values))
    assert n == stopped_at


def kept_upto(values: list[float], metric: str, epoch: int) -> bool:
    """Whether ``epoch`` is kept when only the first ``epoch`` scores are seen (a second, independent rule)."""
    lower = metric in ("MAE", "loss")
    prior = [v for v in values[:epoch - 1] if not math.isnan(v)]
    v = values[epoch - 1]
    if epoch == 1:
        return True
    if math.isnan(v):
        return False
    return not prior or (v < min(prior) if lower else v > max(prior))


@pytest.mark.parametrize("metric", ["Acc", "MAE"])
def test_patience_counts_from_the_last_kept_epoch(metric):
    up = [0.1, 0.2, 0.2, 0.3, 0.3, 0.3] if metric == "Acc" else [0.9, 0.8, 0.8, 0.7, 0.7, 0.7]
    kept, sel, n = run(metric, up, patience=2)
    assert kept == [True, True, False, True, False, False] and n == 6 and sel.best_epoch == 4
