"""Metrics against hand-computed cases (every expected value below is worked out by hand in the comments)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import f1_score

from affectkit.metrics import (
    REGRESSION_METRICS,
    classification_metrics,
    is_better,
    multiclass_acc,
    pearson,
    regression_metrics,
)

# ---------------------------------------------------------------------------------- regression suite


def test_metric_names_are_the_suite() -> None:
    m = regression_metrics(np.array([0.1, 0.2, -1.0]), np.array([1.0, -1.0, 0.5]))
    assert tuple(m) == REGRESSION_METRICS
    assert REGRESSION_METRICS == ("MAE", "Corr", "Acc7", "Acc5", "Non0_Acc2", "Non0_F1", "Has0_Acc2", "Has0_F1")


def test_mae_by_hand() -> None:
    # |diffs| = 0.5, 1, 1, 1, 0, 0 -> 3.5 / 6
    pred = np.array([0.5, 1.0, 2.0, -0.5, -1.0, -2.0])
    truth = np.array([1.0, 2.0, 3.0, 0.5, -1.0, -2.0])
    assert regression_metrics(pred, truth)["MAE"] == pytest.approx(3.5 / 6)


def test_corr_small_integers() -> None:
    # deviations p: -1 0 1, t: -1 1 0 -> cov 1, var 2 and 2 -> r = 1/2
    assert regression_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))["Corr"] == pytest.approx(0.5)
    # a perfect negative linear relation
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([6.0, 4.0, 2.0])) == pytest.approx(-1.0)


def test_corr_matches_the_textbook_formula() -> None:
    rng = np.random.default_rng(0)
    p, t = rng.normal(size=17).tolist(), rng.normal(size=17).tolist()
    pm, tm = sum(p) / len(p), sum(t) / len(t)
    cov = sum((a - pm) * (b - tm) for a, b in zip(p, t))
    r = cov / math.sqrt(sum((a - pm) ** 2 for a in p) * sum((b - tm) ** 2 for b in t))
    assert regression_metrics(np.array(p), np.array(t))["Corr"] == pytest.approx(r, abs=1e-12)


def test_inputs_of_any_shape_are_flattened() -> None:
    """(N,), (N,1) and (N,1,1) (the file's label shape) give the same numbers."""
    pred = np.array([0.4, -1.2, 2.2, 0.0])
    truth = np.array([1.0, -1.0, 2.0, 0.0])
    flat = regression_metrics(pred, truth)
    assert regression_metrics(pred.reshape(-1, 1), truth.reshape(-1, 1, 1)) == flat


def test_acc7_acc5_clip_and_round_half_to_even() -> None:
    """np.round: 0.5 -> 0, 1.5 -> 2, -0.5 -> -0 (== 0), 2.5 -> 2; clipping before rounding."""
    pred = np.array([0.5, 1.5, -0.5, 2.5, 3.7, -4.0, 0.5, 2.4])
    truth = np.array([0.0, 2.0, 0.0, 2.0, 3.0, -3.0, 1.0, 3.0])
    m = regression_metrics(pred, truth)
    # Acc7, clip [-3, 3]: pred -> 0 2 -0 2 3 -3 0 2 ; truth -> 0 2 0 2 3 -3 1 3 : 6 of 8 equal
    assert m["Acc7"] == pytest.approx(6 / 8)
    # Acc5, clip [-2, 2]: pred -> 0.5 1.5 -0.5 2 2 -2 0.5 2 -> 0 2 -0 2 2 -2 0 2
    #                     truth -> 0 2 0 2 2 -2 1 2 : only the 0.5 vs 1 pair differs: 7 of 8
    assert m["Acc5"] == pytest.approx(7 / 8)


@pytest.mark.parametrize(
    ("pred", "truth"),
    [(0.5, 0.0), (1.5, 2.0), (-0.5, 0.0), (2.5, 2.0), (-2.5, -2.0), (3.5, 3.0), (-1.5, -2.0)],
)
def test_acc7_half_to_even_single(pred: float, truth: float) -> None:
    assert regression_metrics(np.array([pred, 0.3]), np.array([truth, 0.0]))["Acc7"] == 1.0


@pytest.mark.parametrize(("pred", "truth"), [(0.5, 1.0), (2.5, 3.0), (-0.5, -1.0), (1.5, 1.0)])
def test_acc7_half_is_not_rounded_away_from_zero(pred: float, truth: float) -> None:
    assert regression_metrics(np.array([pred, 0.3]), np.array([truth, 0.0]))["Acc7"] == 0.5


def test_multiclass_acc_on_raw_values() -> None:
    # without clipping 3.7 -> 4 != 3 ; -4 -> -4 != -3
    assert multiclass_acc(np.array([3.7, -4.0, 1.2]), np.array([3.0, -3.0, 1.0])) == pytest.approx(1 / 3)


def test_non0_and_has0_by_hand() -> None:
    """Non0 drops y == 0 and compares > 0; Has0 keeps all and compares >= 0 (a prediction of exactly 0 is positive)."""
    pred = np.array([0.0, -0.1, 0.0, 0.0])
    truth = np.array([0.0, 0.0, 1.0, -1.0])
    m = regression_metrics(pred, truth)
    # Has0: pred >= 0 -> T F T T ; truth >= 0 -> T T T F : 2 of 4 agree
    assert m["Has0_Acc2"] == pytest.approx(0.5)
    # Has0 F1: class T: TP 2, FP 1, FN 1 -> 4/6 ; class F: TP 0 -> 0 ; supports 3 and 1 -> (3*2/3)/4
    assert m["Has0_F1"] == pytest.approx(0.5)
    # Non0: keep samples 2, 3 ; pred > 0 -> F F ; truth > 0 -> T F : 1 of 2
    assert m["Non0_Acc2"] == pytest.approx(0.5)
    # Non0 F1: class T: TP 0 -> 0 ; class F: TP 1, FP 1 -> 2/3 ; supports 1 and 1 -> 1/3
    assert m["Non0_F1"] == pytest.approx(1 / 3)


def test_non0_drops_exactly_zero_only() -> None:
    """-0.0 == 0 is dropped; a label of 1e-9 is kept (ties at exactly 0 only)."""
    pred = np.array([1.0, 1.0, -1.0, 1.0])
    truth = np.array([0.0, -0.0, 1e-9, 2.0])
    m = regression_metrics(pred, truth)
    # kept: samples 2, 3 ; pred > 0: F T ; truth > 0: T T -> 1 of 2
    assert m["Non0_Acc2"] == pytest.approx(0.5)
    # Has0 keeps all four: pred >= 0: T T F T ; truth >= 0: T T T T -> 3 of 4
    assert m["Has0_Acc2"] == pytest.approx(0.75)


def test_non0_is_nan_when_every_label_is_zero() -> None:
    m = regression_metrics(np.array([0.5, -0.5]), np.array([0.0, 0.0]))
    assert math.isnan(m["Non0_Acc2"]) and math.isnan(m["Non0_F1"])
    assert m["Has0_Acc2"] == pytest.approx(0.5)


def test_f1_uses_truth_then_prediction() -> None:
    """Weighted F1 weights by the *truth* support: f1_score(truth, pred), not the lab's swapped call."""
    pred = np.array([0.5, 1.0, 2.0, -0.5, -1.0, -2.0])
    truth = np.array([1.0, 2.0, 3.0, 0.5, -1.0, -2.0])
    # classes: pred > 0 -> T T T F F F ; truth > 0 -> T T T T F F
    # class T: TP 3, FP 0, FN 1 -> F1 = 6/7 ; class F: TP 2, FP 1, FN 0 -> F1 = 4/5
    # weighted by truth support (T 4, F 2): (4*6/7 + 2*4/5) / 6 = 176/210
    # swapped (pred support T 3, F 3):      (3*6/7 + 3*4/5) / 6 = 58/70
    expected, swapped = 176 / 210, 58 / 70
    assert expected != pytest.approx(swapped)
    m = regression_metrics(pred, truth)
    assert m["Non0_F1"] == pytest.approx(expected)
    assert m["Has0_F1"] == pytest.approx(expected)
    assert m["Non0_Acc2"] == pytest.approx(5 / 6)
    assert f1_score(truth > 0, pred > 0, average="weighted") == pytest.approx(expected)
    assert f1_score(pred > 0, truth > 0, average="weighted") == pytest.approx(swapped)


@pytest.mark.parametrize("constant", ["pred", "truth"])
def test_constant_side_gives_nan_corr_and_a_warning(constant: str, caplog: pytest.LogCaptureFixture) -> None:
    varying = np.array([-1.0, 0.5, 2.0, 1.0])
    flat = np.full(4, 0.7)
    pred, truth = (flat, varying) if constant == "pred" else (varying, flat)
    with caplog.at_level(logging.WARNING, logger="affectkit"):
        m = regression_metrics(pred, truth)
    assert math.isnan(m["Corr"])
    assert all(not math.isnan(m[k]) for k in REGRESSION_METRICS if k != "Corr")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "Corr" in r.getMessage()]
    assert len(warnings) == 1
    assert ("predictions" if constant == "pred" else "labels") in warnings[0].getMessage()


@pytest.mark.parametrize(
    ("pred", "truth"),
    [(np.zeros(3), np.zeros(4)), (np.zeros((2, 3)), np.zeros(5)), (np.array([]), np.array([]))],
)
def test_mismatched_or_empty_is_value_error(pred: np.ndarray, truth: np.ndarray) -> None:
    with pytest.raises(ValueError):
        regression_metrics(pred, truth)


# ------------------------------------------------------------------------------------ property tests

_value = st.floats(min_value=-4.0, max_value=4.0, allow_nan=False, allow_subnormal=False)


@st.composite
def _pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(min_value=1, max_value=40))
    pred = draw(st.lists(_value, min_size=n, max_size=n))
    # labels like the file's: multiples of 1/3 in [-3, 3] (zeros are common)
    truth = draw(st.lists(st.integers(min_value=-9, max_value=9), min_size=n, max_size=n))
    return np.array(pred), np.array(truth) / 3.0


@settings(max_examples=150, deadline=None)
@given(_pairs())
def test_metric_ranges(pair: tuple[np.ndarray, np.ndarray]) -> None:
    pred, truth = pair
    m = regression_metrics(pred, truth)
    assert m["MAE"] >= 0
    assert math.isnan(m["Corr"]) or abs(m["Corr"]) <= 1.0
    for k in ("Acc7", "Acc5", "Has0_Acc2", "Has0_F1"):
        assert 0.0 <= m[k] <= 1.0, k
    for k in ("Non0_Acc2", "Non0_F1"):
        assert math.isnan(m[k]) == bool(np.all(truth == 0)), k
        assert math.isnan(m[k]) or 0.0 <= m[k] <= 1.0, k
    # Acc5 is never below Acc7: clipping to [-2, 2] can only merge classes
    assert m["Acc5"] >= m["Acc7"]


@settings(max_examples=100, deadline=None)
@given(_pairs())
def test_truth_against_itself(pair: tuple[np.ndarray, np.ndarray]) -> None:
    _, truth = pair
    m = regression_metrics(truth, truth)
    assert m["MAE"] == 0.0
    assert m["Acc7"] == m["Acc5"] == m["Has0_Acc2"] == m["Has0_F1"] == 1.0
    assert math.isnan(m["Corr"]) == (np.ptp(truth) == 0)
    assert math.isnan(m["Corr"]) or m["Corr"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------- classification suite


def test_classification_by_hand() -> None:
    truth = np.array([0, 0, 1, 2, 2, 2])
    pred = np.array([0, 1, 1, 2, 2, 0])
    m = classification_metrics(pred, truth, ["a", "b", "c"])
    assert m["Acc"] == pytest.approx(4 / 6)
    # a: TP 1, FP 1, FN 1 -> 1/2 ; b: TP 1, FP 1, FN 0 -> 2/3 ; c: TP 2, FP 0, FN 1 -> 4/5
    assert m["F1_per_class"] == pytest.approx({"a": 0.5, "b": 2 / 3, "c": 0.8})
    assert m["F1_macro"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert m["F1_weighted"] == pytest.approx((2 * 0.5 + 1 * 2 / 3 + 3 * 0.8) / 6)
    # rows = truth, columns = prediction
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_classification_absent_class_keeps_its_row() -> None:
    m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 0]), ["x", "y", "z"])
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    assert m["F1_per_class"]["z"] == 0.0
    # x: TP 1, FN 1 -> 2/3 ; y: TP 1, FP 1 -> 2/3 ; supports 2, 1, 0
    assert m["F1_weighted"] == pytest.approx(2 / 3)
    assert m["Acc"] == pytest.approx(2 / 3)


def test_classification_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        classification_metrics(np.array([0, 1]), np.array([0, 1, 1]), ["a", "b"])


# ------------------------------------------------------------------------------------------ is_better


def test_is_better_directions() -> None:
    assert is_better("MAE", 0.5, 0.6) and not is_better("MAE", 0.7, 0.6)
    assert is_better("loss", 0.1, 0.2) and not is_better("loss", 0.3, 0.2)
    assert is_better("Corr", 0.7, 0.6) and not is_better("Corr", 0.5, 0.6)
    assert is_better("Acc7", 0.4, 0.3) and is_better("F1_weighted", 0.9, 0.8)


def test_is_better_is_strict_and_nan_safe() -> None:
    """Ties do not improve (the first best epoch is kept); NaN never improves; anything beats None/NaN."""
    assert not is_better("Corr", 0.5, 0.5) and not is_better("MAE", 0.5, 0.5)
    assert not is_better("Corr", math.nan, 0.1) and not is_better("Corr", math.nan, None)
    assert not is_better("MAE", math.nan, math.nan)
    assert is_better("Corr", -0.9, None) and is_better("MAE", 10.0, None)
    assert is_better("Corr", -0.9, math.nan) and is_better("MAE", 10.0, math.nan)


# ------------------------------------------------------------------ edges found by mutation testing


def test_pearson_flattens_casts_and_needs_two_points(caplog: pytest.LogCaptureFixture) -> None:
    """r of column vectors equals r of flat ones; booleans are numbers; two distinct points give r = +-1;
    a constant side gives NaN with one exact log line naming it."""
    x, y = np.array([0.3, 1.2, -0.7, 2.0]), np.array([1.0, 2.0, 0.0, 1.5])
    r = pearson(x, y)
    assert pearson(x.reshape(-1, 1), y.reshape(-1, 1)) == pytest.approx(r, abs=1e-15)
    assert pearson(x.reshape(2, 2), y.reshape(-1)) == pytest.approx(r, abs=1e-15)
    assert pearson(np.array([True, False, True]), np.array([1.0, 0.0, 1.0])) == pytest.approx(1.0)
    assert pearson(np.array([1.0, 0.0, 1.0]), np.array([True, False, True])) == pytest.approx(1.0)
    assert pearson(np.array([0.0, 1.0]), np.array([5.0, 2.0])) == pytest.approx(-1.0)
    assert math.isnan(pearson(np.array([1.0]), np.array([2.0])))
    for pred, truth, side in ((np.ones(3), x[:3], "predictions"), (x[:3], np.ones(3), "labels")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="affectkit"):
            assert math.isnan(pearson(pred, truth))
        assert [r.getMessage() for r in caplog.records] == [f"Corr undefined: {side} are constant"]


def test_regression_suite_computes_in_float64() -> None:
    """Half-precision inputs are widened first: MAE equals the float64 mean of the same values."""
    pred = np.array([0.1, 0.2, 0.7], dtype=np.float16)
    truth = np.array([0.0, 0.0, 0.0], dtype=np.float16)
    exact = float(np.mean(np.abs(pred.astype(np.float64) - truth.astype(np.float64))))
    assert regression_metrics(pred, truth)["MAE"] == pytest.approx(exact, abs=1e-12)
    assert regression_metrics(truth, pred)["MAE"] == pytest.approx(exact, abs=1e-12)


def test_non0_prediction_of_exactly_zero_is_negative() -> None:
    """Non0 compares ``pred > 0``: a prediction of exactly 0 on a positive label is wrong."""
    m = regression_metrics(np.array([0.0, 1.0, -1.0]), np.array([1.0, 1.0, -1.0]))
    assert m["Non0_Acc2"] == pytest.approx(2 / 3)
    assert m["Has0_Acc2"] == 1.0  # Has0 compares ``>= 0``: the same prediction counts as positive


def test_acc7_clips_labels_too() -> None:
    """Both sides are clipped to [-3, 3] (Acc-7) and [-2, 2] (Acc-5) before rounding."""
    pred, truth = np.array([-3.0, 3.0]), np.array([-3.6, 3.6])
    m = regression_metrics(pred, truth)
    assert m["Acc7"] == 1.0 and m["Acc5"] == 1.0
    m = regression_metrics(np.array([-2.0, 2.0]), np.array([-2.6, 2.6]))
    assert m["Acc5"] == 1.0 and m["Acc7"] == 0.0


@pytest.mark.parametrize("fn", [regression_metrics, lambda p, t: classification_metrics(p, t, ["a", "b"])])
def test_bad_shapes_name_both_shapes(fn) -> None:
    with pytest.raises(ValueError, match=r"need equal, non-empty prediction and label vectors, got \(2,\) and \(1,\)"):
        fn(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match=r"got \(0,\) and \(0,\)"):
        fn(np.array([]), np.array([]))


def test_classification_flattens_and_takes_one_sample() -> None:
    m = classification_metrics(np.array([[0], [1], [1]]), np.array([0, 1, 0]), ["a", "b"])
    assert m["Acc"] == pytest.approx(2 / 3)
    assert classification_metrics(np.array([1]), np.array([[1]]), ["a", "b"])["Acc"] == 1.0


def test_classification_absent_class_counts_zero_in_macro_without_warnings() -> None:
    """A class absent from truth and prediction has F1 0 (``zero_division=0``), silently: macro F1 averages
    over every declared class, weighted F1 gives it weight 0."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(np.array([0, 1, 1]), np.array([0, 1, 1]), ["x", "y", "z"])
    assert m["F1_per_class"] == {"x": 1.0, "y": 1.0, "z": 0.0}
    assert m["F1_macro"] == pytest.approx(2 / 3)
    assert m["F1_weighted"] == pytest.approx(1.0)


def test_format_number_for_tables() -> None:
    from affectkit.metrics import format_number

    assert format_number(0.12345) == "0.1235" and format_number(2.0) == "2.0000"
    assert format_number(0.12345, signed=True) == "+0.1235" and format_number(-0.5, signed=True) == "-0.5000"
    assert format_number(0.0, signed=True) == "+0.0000"
    for missing in (None, math.nan, math.inf, -math.inf):
        assert format_number(missing) == "n/a" and format_number(missing, signed=True) == "n/a"
    assert format_number(7) == "7" and format_number(7, signed=True) == "7" and format_number("abc") == "abc"


def test_f1_and_confusion_equal_scikit_learn_on_random_labels():
    """The numpy F1 / confusion matrix are scikit-learn's (labels outside the list, absent labels, booleans)."""
    sk = pytest.importorskip("sklearn.metrics")
    from affectkit.metrics import confusion_matrix, f1_scores, weighted_f1

    rng = np.random.default_rng(0)
    for _ in range(300):
        n, k = int(rng.integers(1, 40)), int(rng.integers(1, 7))
        t, p = rng.integers(0, k + 1, n), rng.integers(0, k + 1, n)
        labels = list(range(k))
        np.testing.assert_allclose(f1_scores(t, p, labels)[0],
                                   sk.f1_score(t, p, labels=labels, average=None, zero_division=0), atol=1e-12)
        assert weighted_f1(t, p, labels) == pytest.approx(
            sk.f1_score(t, p, labels=labels, average="weighted", zero_division=0), abs=1e-12)
        if np.isin(t, labels).any():
            assert (confusion_matrix(t, p, labels) == sk.confusion_matrix(t, p, labels=labels)).all()
        tb, pb = t > k // 2, p > k // 2
        assert weighted_f1(tb, pb) == pytest.approx(sk.f1_score(tb, pb, average="weighted", zero_division=0),
                                                    abs=1e-12)
