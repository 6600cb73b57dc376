"""Linear head: fit quality on separable data, numpy-only prediction, safetensors round trip."""

from __future__ import annotations

import numpy as np
import pytest

from rainclf.heads.linear import HEAD_FILE, LinearHead, NotFittedError
from rainclf.labels import LABELS


def _data(n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d) * 5
    w = rng.normal(size=d)
    y = ((X - X.mean(0)) / X.std(0) @ w > 0).astype(int)
    return X.astype(np.float32), y


def test_learns_separable_data_and_matches_sklearn_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    X, y = _data()
    head = LinearHead(C=1.0).fit(X, y)
    assert (head.predict(X) == np.array(LABELS)[y]).mean() > 0.95
    ref = LogisticRegression(C=1.0, max_iter=300).fit(StandardScaler().fit_transform(X), y)
    Z = StandardScaler().fit(X).transform(X)
    np.testing.assert_allclose(head.predict_proba(X), ref.predict_proba(Z), atol=1e-4)


def test_C_is_chosen_by_cross_validation():
    X, y = _data(seed=1)
    head = LinearHead().fit(X, y)
    from rainclf.heads.linear import C_GRID
    assert head.C_ in C_GRID


def test_save_load_identical_probabilities(tmp_path):
    X, y = _data(seed=2)
    head = LinearHead(class_weight="balanced").fit(X, y)
    head.save(tmp_path)
    again = LinearHead.load(tmp_path)
    np.testing.assert_array_equal(again.predict_proba(X), head.predict_proba(X))
    assert again.class_weight == "balanced"
    assert (tmp_path / HEAD_FILE).read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_wrong_dimension_and_unfitted_refused():
    X, y = _data()
    head = LinearHead().fit(X, y)
    with pytest.raises(ValueError, match="dimension 8, this head expects 16"):
        head.predict_proba(X[:, :8])
    with pytest.raises(NotFittedError):
        LinearHead().predict_proba(X)


def test_one_class_and_nan_refused():
    X, y = _data()
    with pytest.raises(ValueError, match="both labels"):
        LinearHead().fit(X, np.zeros_like(y))
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        LinearHead().fit(X, y)


def test_extreme_logits_do_not_overflow():
    X, y = _data()
    head = LinearHead(C=1.0).fit(X, y)
    p = head.predict_proba(X * 1e6)
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
