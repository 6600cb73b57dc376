"""Classification metrics for reports: accuracy, per-label P/R/F1, ROC AUC, calibration, latency.

Everything is computed with numpy (no scikit-learn at run time; the tests check against it).
``p_rain`` is always the probability of RAIN (会下雨), matching column 1 of ``LABELS``.

Invalid answers: the generative baseline sometimes produces no usable label (``y_pred`` is
None). Dropping those rows would flatter it, so they count as wrong: accuracy is over all ``n``
rows, and per-label recall (hence balanced accuracy) counts an invalid row as a miss for its true
class. They cannot be placed in a 2×2 confusion matrix, so they are left out of it and reported
as ``n_invalid``; precision only looks at rows that predicted that label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rainclf.labels import LABELS, NO_RAIN, RAIN


def _check_labels(values: Sequence[str | None], name: str, allow_none: bool) -> None:
    for v in values:
        if v is None and allow_none:
            continue
        if v not in LABELS:
            raise ValueError(f"{name} contains {v!r}; expected one of {LABELS}")


def _as_probs(p: Sequence[float] | np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(p, dtype=float).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"p_rain has {arr.shape[0]} values, expected {n}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr > 1):
        raise ValueError("p_rain must be finite probabilities in [0, 1]")
    return arr


def _bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    # Equal-width bins [k/n, (k+1)/n); p == 1.0 goes into the last bin.
    return np.minimum(np.floor(p * n_bins).astype(int), n_bins - 1)


def reliability_bins(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray,
                     n_bins: int = 10) -> list[dict]:
    """Per-bin data for a reliability diagram: ``n_bins`` equal-width bins over ``p`` (the
    probability of the positive class), each ``{"lo", "hi", "count", "mean_p", "frac_pos"}``.
    Empty bins are kept (so the list always has ``n_bins`` entries) with ``mean_p`` and
    ``frac_pos`` None."""
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    y_arr = np.asarray(y, dtype=float).reshape(-1)
    p_arr = _as_probs(p, y_arr.shape[0])
    idx = _bin_index(p_arr, n_bins)
    out = []
    for k in range(n_bins):
        mask = idx == k
        count = int(mask.sum())
        out.append({
            "lo": k / n_bins,
            "hi": (k + 1) / n_bins,
            "count": count,
            "mean_p": float(p_arr[mask].mean()) if count else None,
            "frac_pos": float(y_arr[mask].mean()) if count else None,
        })
    return out


def expected_calibration_error(y: Sequence[int] | np.ndarray, p: Sequence[float] | np.ndarray,
                               n_bins: int = 10) -> float:
    """Binary reliability ECE: equal-width bins over ``p`` (probability of the positive class),
    ECE = sum over bins of (count / N) * |fraction of positives − mean p|.

    This is the binary definition (bins over p_rain), not the "confidence of the predicted
    class" variant used for multi-class models; the two differ for p < 0.5.
    """
    bins = reliability_bins(y, p, n_bins)
    total = sum(b["count"] for b in bins)
    if total == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    return float(sum(b["count"] / total * abs(b["frac_pos"] - b["mean_p"])
                     for b in bins if b["count"]))


def _roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    # Mann–Whitney U with average ranks for ties: AUC = P(score of a positive > a negative),
    # ties counting one half. Equal to the area under the ROC curve.
    order = np.argsort(p, kind="mergesort")
    sorted_p = p[order]
    ranks = np.empty(len(p), dtype=float)
    i = 0
    while i < len(p):
        j = i
        while j + 1 < len(p) and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # 1-based average rank of the tie group
        i = j + 1
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_points(y01: np.ndarray, p: np.ndarray) -> dict:
    """ROC curve (fpr, tpr lists from (0,0) to (1,1)), one point per distinct threshold."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y01[order], p[order]
    distinct = np.r_[np.where(np.diff(ps))[0], len(ps) - 1]  # last index of each tie group
    tps, fps = np.cumsum(ys)[distinct], np.cumsum(1 - ys)[distinct]
    n_pos, n_neg = max(ys.sum(), 1), max((1 - ys).sum(), 1)
    return {"fpr": [0.0] + (fps / n_neg).round(6).tolist(), "tpr": [0.0] + (tps / n_pos).round(6).tolist()}


def classification_metrics(y_true: Sequence[str], p_rain: Sequence[float] | None,
                           y_pred: Sequence[str | None] | None,
                           threshold: float = 0.5) -> dict:
    """Metrics for one model on one split.

    ``y_pred`` may hold None for invalid answers (counted as wrong, see module docstring). If
    ``y_pred`` itself is None, predictions are derived from ``p_rain >= threshold``; otherwise
    ``threshold`` is unused (it is still reported so a report row says how labels were made).

    Keys: ``n``, ``n_predicted``, ``n_invalid``, ``coverage``, ``accuracy``,
    ``balanced_accuracy``, ``precision``/``recall``/``f1_per_label`` (dicts keyed by label),
    ``f1`` (binary F1 of RAIN), ``f1_macro``, ``roc_auc``, ``ece``, ``brier``,
    ``confusion_matrix`` ({"labels": [NO_RAIN, RAIN], "matrix": [[tn, fp], [fn, tp]]}, rows =
    true, columns = predicted, invalid rows excluded), ``threshold``.

    Precision for a label nobody predicted is 0.0 (scikit-learn's ``zero_division=0``), and so
    is F1 when precision and recall are both 0. ``roc_auc`` is None without ``p_rain`` or when
    ``y_true`` has only one class; ``ece``/``brier`` are None without ``p_rain``. With n = 0
    every rate is None.
    """
    y_true = list(y_true)
    n = len(y_true)
    _check_labels(y_true, "y_true", allow_none=False)
    p = _as_probs(p_rain, n) if p_rain is not None else None
    if y_pred is None:
        if p is None:
            raise ValueError("need y_pred or p_rain")
        y_pred = [RAIN if v >= threshold else NO_RAIN for v in p]
    y_pred = list(y_pred)
    if len(y_pred) != n:
        raise ValueError(f"y_pred has {len(y_pred)} values, expected {n}")
    _check_labels(y_pred, "y_pred", allow_none=True)

    n_predicted = sum(v is not None for v in y_pred)
    # Confusion matrix over the rows that gave a label; rows = true, cols = predicted.
    cm = [[0, 0], [0, 0]]
    for t, q in zip(y_true, y_pred):
        if q is not None:
            cm[LABELS.index(t)][LABELS.index(q)] += 1

    result: dict = {
        "n": n,
        "n_predicted": n_predicted,
        "n_invalid": n - n_predicted,
        "threshold": threshold,
        "confusion_matrix": {"labels": list(LABELS), "matrix": cm},
    }
    if n == 0:
        result.update({
            "coverage": None, "accuracy": None, "balanced_accuracy": None,
            "precision": {lab: None for lab in LABELS}, "recall": {lab: None for lab in LABELS},
            "f1_per_label": {lab: None for lab in LABELS}, "f1": None, "f1_macro": None,
            "roc_auc": None, "ece": None, "brier": None,
        })
        return result

    correct = sum(cm[k][k] for k in range(2))
    precision: dict[str, float] = {}
    recall: dict[str, float | None] = {}
    f1: dict[str, float] = {}
    for k, lab in enumerate(LABELS):
        n_true = sum(t == lab for t in y_true)  # includes invalid rows: they are misses
        n_pred = cm[0][k] + cm[1][k]
        tp = cm[k][k]
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_true if n_true else None
        precision[lab] = prec
        recall[lab] = rec
        r = rec or 0.0
        f1[lab] = 2 * prec * r / (prec + r) if prec + r else 0.0

    # Balanced accuracy = mean recall over the classes present in y_true (as scikit-learn).
    present = [r for r in recall.values() if r is not None]

    if p is not None:
        y01 = np.array([t == RAIN for t in y_true], dtype=float)
        brier = float(np.mean((p - y01) ** 2))
        ece = expected_calibration_error(y01, p)
        both = 0 < y01.sum() < n
        roc_auc = _roc_auc(y01, p) if both else None
    else:
        brier = ece = roc_auc = None

    result.update({
        "coverage": n_predicted / n,
        "accuracy": correct / n,
        "balanced_accuracy": float(np.mean(present)),
        "precision": precision,
        "recall": {lab: (r if r is not None else 0.0) for lab, r in recall.items()},
        "f1_per_label": f1,
        "f1": f1[RAIN],
        "f1_macro": (f1[NO_RAIN] + f1[RAIN]) / 2,
        "roc_auc": roc_auc,
        "ece": ece,
        "brier": brier,
    })
    return result


def latency_summary(seconds_per_item: Sequence[float], warmup: int = 0) -> dict:
    """Latency over items after dropping the first ``warmup`` (model load, compilation, caches
    warming up would otherwise dominate the tail).

    Keys: ``n`` (items measured), ``latency_ms_p50``, ``latency_ms_p95`` (numpy's linear
    percentile), ``latency_ms_mean``, ``images_per_s`` (items / total seconds, i.e. sequential
    throughput). All but ``n`` are None when no items remain.
    """
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    s = np.asarray(list(seconds_per_item), dtype=float)[warmup:]
    if s.size == 0:
        return {"n": 0, "latency_ms_p50": None, "latency_ms_p95": None,
                "latency_ms_mean": None, "images_per_s": None}
    if np.any(s < 0) or not np.all(np.isfinite(s)):
        raise ValueError("latencies must be finite and non-negative")
    total = float(s.sum())
    return {
        "n": int(s.size),
        "latency_ms_p50": float(np.percentile(s, 50) * 1000),
        "latency_ms_p95": float(np.percentile(s, 95) * 1000),
        "latency_ms_mean": float(s.mean() * 1000),
        "images_per_s": s.size / total if total > 0 else None,
    }
