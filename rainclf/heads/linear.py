"""Linear head: standardisation + logistic regression (scikit-learn to fit, numpy to predict).

Fitted state ends in ``_`` (scikit-learn's convention) and is saved as safetensors
(``coef``, ``intercept``, ``mean``, ``scale``), never pickled, so predicting needs neither
scikit-learn nor torch: p_rain = sigmoid(((x - mean) / scale) · coef + intercept).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..labels import LABELS

HEAD_FILE = "head.safetensors"
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


class NotFittedError(RuntimeError):
    pass


class LinearHead:
    """Logistic regression on standardised embeddings; ``C`` by cross-validation unless given."""

    def __init__(self, C: float | None = None, class_weight: str | None = None, cv: int = 3,
                 max_iter: int = 300, seed: int = 0):
        self.C, self.class_weight, self.cv, self.max_iter, self.seed = C, class_weight, cv, max_iter, seed

    # ------------------------------------------------------------------ fit / predict
    def fit(self, X: np.ndarray, y: np.ndarray) -> "LinearHead":
        """X (N, D) float, y (N,) of 0 (不会下雨) / 1 (会下雨)."""
        from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y, dtype=np.int64)
        if X.ndim != 2 or len(X) != len(y) or not np.isfinite(X).all():
            raise ValueError("LinearHead.fit needs a finite (N, D) matrix and N labels")
        counts = np.bincount(y, minlength=2)
        if counts.min() == 0:
            raise ValueError("LinearHead.fit needs examples of both labels")
        self.mean_ = X.mean(axis=0)
        scale = X.std(axis=0)
        self.scale_ = np.where(scale > 1e-12, scale, 1.0)
        Z = (X - self.mean_) / self.scale_
        folds = int(min(self.cv, counts.min()))
        if self.C is None and folds >= 2:
            model = LogisticRegressionCV(Cs=list(C_GRID), cv=folds, class_weight=self.class_weight,
                                         max_iter=self.max_iter, scoring="neg_log_loss", l1_ratios=(0.0,),
                                         use_legacy_attributes=False,
                                         random_state=self.seed)
            model.fit(Z, y)
            self.C_ = float(np.ravel(model.C_)[0])
        else:
            self.C_ = float(self.C if self.C is not None else 1.0)
            model = LogisticRegression(C=self.C_, class_weight=self.class_weight, max_iter=self.max_iter)
            model.fit(Z, y)
        self.coef_ = model.coef_.ravel().astype(np.float64)
        self.intercept_ = float(np.ravel(model.intercept_)[0])
        self.n_features_in_ = X.shape[1]
        self.classes_ = np.array(LABELS)
        return self

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise NotFittedError("this LinearHead is not fitted yet: call fit() or load()")

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        self._check_fitted()
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"embeddings have dimension {X.shape[-1]}, this head expects "
                             f"{self.n_features_in_}: the model directory belongs to another backbone/feature")
        return ((X - self.mean_) / self.scale_) @ self.coef_ + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, 2): columns (p(不会下雨), p(会下雨))."""
        z = self.decision_function(X)
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # a sigmoid that cannot overflow
        return np.stack([1.0 - p, p], axis=1)

    def predict(self, X: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return np.where(self.predict_proba(X)[:, 1] >= threshold, LABELS[1], LABELS[0])

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, metadata: dict[str, str] | None = None) -> None:
        """``metadata``: extra strings for the file header (fit records the extraction here)."""
        from safetensors.numpy import save_file

        self._check_fitted()
        save_file({"coef": self.coef_.astype(np.float64), "intercept": np.array([self.intercept_]),
                   "mean": self.mean_.astype(np.float64), "scale": self.scale_.astype(np.float64)},
                  str(Path(directory) / HEAD_FILE),
                  metadata={"head": "linear", "C": repr(self.C_),
                            "params": json.dumps({"class_weight": self.class_weight, "cv": self.cv}),
                            **(metadata or {})})

    @classmethod
    def load(cls, directory: str | Path) -> "LinearHead":
        from safetensors import safe_open

        path = Path(directory) / HEAD_FILE
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("head") != "linear" or set(t) != {"coef", "intercept", "mean", "scale"}:
            raise ValueError(f"{path} is not a rainclf linear head")
        params = json.loads(meta.get("params", "{}"))
        head = cls(class_weight=params.get("class_weight"), cv=params.get("cv", 3))
        head.coef_, head.mean_, head.scale_ = t["coef"], t["mean"], t["scale"]
        head.intercept_ = float(t["intercept"][0])
        head.C_ = float(meta.get("C", "nan"))
        # what the embeddings were extracted with (features.extraction_namespace); None if not recorded
        head.trained_on_ = json.loads(meta["extraction"]) if "extraction" in meta else None
        head.n_features_in_ = head.coef_.shape[0]
        head.classes_ = np.array(LABELS)
        return head
