"""Tests for rainclf.report.metrics: checked against scikit-learn and against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from rainclf.labels import LABELS, NO_RAIN, RAIN
from rainclf.report.metrics import (
    classification_metrics,
    expected_calibration_error,
    latency_summary,
    reliability_bins,
)


def _random_case(seed: int, n: int = 200, ties: bool = False):
    rng = np.random.default_rng(seed)
    y01 = rng.integers(0, 2, n)
    # Informative but noisy scores so AUC is neither 0.5 nor 1.
    p = np.clip(0.5 + 0.3 * (y01 - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    if ties:
        p = np.round(p, 1)  # many tied scores exercise the average-rank AUC
    y_true = [LABELS[i] for i in y01]
    return y01, p, y_true


@pytest.mark.parametrize("seed,ties", [(0, False), (1, False), (2, True), (3, True)])
def test_matches_sklearn_on_random_data(seed, ties):
    y01, p, y_true = _random_case(seed, ties=ties)
    y_pred = [RAIN if v >= 0.5 else NO_RAIN for v in p]
    pred01 = (p >= 0.5).astype(int)
    m = classification_metrics(y_true, p, y_pred)

    assert m["n"] == m["n_predicted"] == len(y_true)
    assert m["n_invalid"] == 0
    assert m["coverage"] == 1.0
    assert m["accuracy"] == pytest.approx(accuracy_score(y01, pred01))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y01, pred01))
    assert m["f1"] == pytest.approx(f1_score(y01, pred01))
    assert m["f1_macro"] == pytest.approx(f1_score(y01, pred01, average="macro"))
    for k, lab in enumerate(LABELS):
        assert m["precision"][lab] == pytest.approx(precision_score(y01, pred01, pos_label=k))
        assert m["recall"][lab] == pytest.approx(recall_score(y01, pred01, pos_label=k))
        assert m["f1_per_label"][lab] == pytest.approx(f1_score(y01, pred01, pos_label=k))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y01, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y01, p))
    assert m["confusion_matrix"]["labels"] == [NO_RAIN, RAIN]
    assert m["confusion_matrix"]["matrix"] == confusion_matrix(y01, pred01, labels=[0, 1]).tolist()


def test_y_pred_derived_from_threshold_when_missing():
    y01, p, y_true = _random_case(5)
    m = classification_metrics(y_true, p, None, threshold=0.7)
    pred01 = (p >= 0.7).astype(int)
    assert m["threshold"] == 0.7
    assert m["accuracy"] == pytest.approx(accuracy_score(y01, pred01))
    assert m["confusion_matrix"]["matrix"] == confusion_matrix(y01, pred01).tolist()


def test_ece_hand_computed():
    # Four predictions in two bins: {0.12, 0.18} in [0.1, 0.2) and {0.82, 0.88} in [0.8, 0.9).
    y = np.array([0, 1, 1, 1])
    p = np.array([0.12, 0.18, 0.82, 0.88])
    # bin 1: mean p 0.15, frac pos 0.5 -> gap 0.35, weight 2/4
    # bin 8: mean p 0.85, frac pos 1.0 -> gap 0.15, weight 2/4
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.35 + 0.5 * 0.15)


def test_reliability_bins_layout():
    y = np.array([0, 1, 1, 1])
    p = np.array([0.12, 0.18, 0.82, 1.0])  # 1.0 belongs to the last bin
    bins = reliability_bins(y, p)
    assert len(bins) == 10
    assert [b["count"] for b in bins] == [0, 2, 0, 0, 0, 0, 0, 0, 1, 1]
    assert bins[1]["lo"] == pytest.approx(0.1) and bins[1]["hi"] == pytest.approx(0.2)
    assert bins[1]["mean_p"] == pytest.approx(0.15)
    assert bins[1]["frac_pos"] == pytest.approx(0.5)
    assert bins[9]["mean_p"] == 1.0 and bins[9]["frac_pos"] == 1.0
    assert bins[0]["mean_p"] is None and bins[0]["frac_pos"] is None


def test_ece_is_zero_when_perfectly_calibrated_and_in_metrics():
    y = np.array([0, 1, 0, 1])
    p = np.array([0.5, 0.5, 0.5, 0.5])
    assert expected_calibration_error(y, p) == pytest.approx(0.0)
    y_true = [LABELS[i] for i in y]
    m = classification_metrics(y_true, p, [RAIN] * 4)
    assert m["ece"] == pytest.approx(0.0)
    assert m["roc_auc"] == pytest.approx(0.5)


def test_invalid_answers_count_as_wrong():
    y_true = [RAIN, RAIN, NO_RAIN, NO_RAIN, RAIN]
    y_pred = [RAIN, None, NO_RAIN, None, NO_RAIN]
    m = classification_metrics(y_true, None, y_pred)
    assert m["n"] == 5
    assert m["n_predicted"] == 3
    assert m["n_invalid"] == 2
    assert m["coverage"] == pytest.approx(3 / 5)
    assert m["accuracy"] == pytest.approx(2 / 5)  # over all rows, not over the 3 answered
    # recall RAIN = 1/3 (one hit, one invalid, one wrong), recall NO_RAIN = 1/2.
    assert m["recall"][RAIN] == pytest.approx(1 / 3)
    assert m["recall"][NO_RAIN] == pytest.approx(1 / 2)
    assert m["balanced_accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    # Precision only counts rows that gave that label.
    assert m["precision"][RAIN] == pytest.approx(1.0)
    assert m["precision"][NO_RAIN] == pytest.approx(1 / 2)
    assert m["confusion_matrix"]["matrix"] == [[1, 0], [1, 1]]
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == 3
    assert m["roc_auc"] is None and m["ece"] is None and m["brier"] is None


def test_invalid_answers_match_sklearn_with_invalid_as_always_wrong():
    # Replacing None by "the other label" must give the same accuracy/balanced accuracy.
    rng = np.random.default_rng(7)
    y01 = rng.integers(0, 2, 100)
    pred01 = rng.integers(0, 2, 100)
    invalid = rng.random(100) < 0.3
    y_true = [LABELS[i] for i in y01]
    y_pred = [None if bad else LABELS[q] for q, bad in zip(pred01, invalid)]
    wrong_instead = np.where(invalid, 1 - y01, pred01)
    m = classification_metrics(y_true, None, y_pred)
    assert m["accuracy"] == pytest.approx(accuracy_score(y01, wrong_instead))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y01, wrong_instead))
    assert m["n_invalid"] == int(invalid.sum())


def test_single_class_y_true_has_no_auc():
    y_true = [RAIN] * 4
    p = [0.9, 0.8, 0.3, 0.6]
    m = classification_metrics(y_true, p, [RAIN, RAIN, NO_RAIN, RAIN])
    assert m["roc_auc"] is None
    assert m["brier"] == pytest.approx(np.mean((np.array(p) - 1) ** 2))
    assert m["balanced_accuracy"] == pytest.approx(3 / 4)  # only RAIN's recall exists
    assert m["precision"][NO_RAIN] == 0.0  # predicted once, never right


def test_empty_input_gives_none_rates():
    m = classification_metrics([], [], [])
    assert m["n"] == 0
    assert m["accuracy"] is None and m["roc_auc"] is None and m["f1"] is None


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        classification_metrics([RAIN], [0.5], ["rain"])  # not an exact label
    with pytest.raises(ValueError):
        classification_metrics([RAIN, NO_RAIN], [0.5], [RAIN, RAIN])  # length mismatch
    with pytest.raises(ValueError):
        classification_metrics([RAIN], [1.5], [RAIN])  # not a probability
    with pytest.raises(ValueError):
        classification_metrics([RAIN], None, None)


def test_latency_percentiles_exclude_warmup():
    rng = np.random.default_rng(3)
    steady = rng.uniform(0.01, 0.05, 50)
    seconds = np.concatenate([[2.0, 1.5], steady])  # two slow warm-up items
    s = latency_summary(seconds.tolist(), warmup=2)
    assert s["n"] == 50
    assert s["latency_ms_p50"] == pytest.approx(np.percentile(steady, 50) * 1000)
    assert s["latency_ms_p95"] == pytest.approx(np.percentile(steady, 95) * 1000)
    assert s["latency_ms_mean"] == pytest.approx(steady.mean() * 1000)
    assert s["images_per_s"] == pytest.approx(50 / steady.sum())
    # Without excluding the warm-up the tail is dominated by it.
    assert latency_summary(seconds.tolist())["latency_ms_p95"] > s["latency_ms_p95"]


def test_latency_empty_after_warmup():
    s = latency_summary([0.1, 0.2], warmup=2)
    assert s["n"] == 0
    assert s["latency_ms_p50"] is None and s["images_per_s"] is None
