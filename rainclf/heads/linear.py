"""Linear head: standardisation + logistic regression (scikit-learn to fit, numpy to predict).

Fitted state ends in ``_`` (scikit-learn's convention) and is saved as safetensors
(``coef``, ``intercept``, ``mean``, ``scale``), never pickled, so predicting needs neither
scikit-learn nor torch: p_rain = sigmoid(((x - mean) / scale) · coef + intercept).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from rainclf.backbones import create_backbone
from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions
from rainclf.config import FitOptions, RunOptions, check_head_options
from rainclf.embed.extract import embed_paths, extraction_namespace, open_cache
from rainclf.heads.base import ClassifierBase, HeadArrays, Row, scored_rows
from rainclf.io import atomic_dir, log
from rainclf.labels import LABELS, label_to_index
from rainclf.model import (
    FitResult,
    ModelConfig,
    ModelDirError,
    backbone_for,
    check_extraction,
    write_common_files,
)
from rainclf.report.metrics import classification_metrics

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
        from rainclf.weights import DAMAGED_FIX, check_finite, read_tensors

        path = Path(directory) / HEAD_FILE
        t, meta = read_tensors(path)
        if meta.get("head") != "linear" or set(t) != {"coef", "intercept", "mean", "scale"}:
            raise ModelDirError(f"{path} is not a rainclf linear head — {DAMAGED_FIX}")
        check_finite(path, t)
        n = t["coef"].shape[0] if t["coef"].ndim == 1 else -1
        if (n < 1 or t["mean"].shape != (n,) or t["scale"].shape != (n,) or t["intercept"].shape != (1,)
                or not (t["scale"] > 0).all()):
            raise ModelDirError(f"{path}: coef, mean, scale, intercept have inconsistent shapes or a "
                                f"non-positive scale — {DAMAGED_FIX}")
        try:
            params = json.loads(meta.get("params", "{}"))
            trained_on = json.loads(meta["extraction"]) if "extraction" in meta else None
        except (ValueError, RecursionError):
            raise ModelDirError(f"{path}: malformed header metadata — {DAMAGED_FIX}") from None
        if not isinstance(params, dict) or not isinstance(trained_on, (dict, type(None))):
            raise ModelDirError(f"{path}: malformed header metadata — {DAMAGED_FIX}")
        head = cls(class_weight=params.get("class_weight"), cv=params.get("cv", 3))
        head.coef_, head.mean_, head.scale_ = t["coef"], t["mean"], t["scale"]
        head.intercept_ = float(t["intercept"][0])
        head.C_ = float(meta.get("C", "nan"))
        # what the embeddings were extracted with (embed.extract.extraction_namespace); None if not recorded
        head.trained_on_ = trained_on
        head.n_features_in_ = head.coef_.shape[0]
        head.classes_ = np.array(LABELS)
        return head


class LinearClassifier(ClassifierBase):
    """Frozen backbone embeddings (through the cache) → linear head."""

    frozen_embeddings = True

    def __init__(self, config: ModelConfig, model_dir: Path, options: RunOptions):
        self.config, self.model_dir, self.options = config, model_dir, options
        self.notes: list[str] = []
        self.head = LinearHead.load(model_dir)
        if config.dim is not None and self.head.n_features_in_ != config.dim:
            raise ModelDirError(f"{model_dir}: head.safetensors expects {self.head.n_features_in_}-d "
                                f"embeddings but config.json says {config.dim}: the directory is damaged "
                                "— restore it or refit")
        self.backbone = backbone_for(config, model_dir, options)
        if self.backbone.dim(config.feature) != self.head.n_features_in_:
            raise ModelDirError(f"{model_dir}: head expects {self.head.n_features_in_}-d embeddings, "
                                f"backbone {self.backbone.name} gives {self.backbone.dim(config.feature)}-d "
                                f"for feature {config.feature!r} — the head was trained on another backbone "
                                "or feature: use that one or refit with this backbone")
        check_extraction(self.head.trained_on_, extraction_namespace(
            self.backbone, config.feature, config.layer, config.prompt or ""), model_dir)

    def embed(self, paths: Sequence[Path]):
        o, c = self.options, self.config
        cache = open_cache(o.cache_dir, self.backbone, c.feature, c.layer, c.prompt or "")
        result = embed_paths(self.backbone, paths, c.feature, c.layer, c.prompt or "",
                             batch_size=o.batch_size, cache=cache, progress=o.progress, desc="predict")
        self.n_cached += result.n_cached
        self.last_embed = result   # the vectors of the last call (tests compare engines on them)
        return result

    def p_rain_from_embeddings(self, vectors: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(vectors)[:, 1]

    def predict_proba(self, images) -> np.ndarray:
        c = self.config
        return self.p_rain_from_embeddings(self.backbone.embed(list(images), c.feature, c.layer, c.prompt or ""))

    def predict_paths(self, paths: Sequence[str | Path]) -> list[Row]:
        result = self.embed(paths)
        ok = result.ok
        p = self.p_rain_from_embeddings(result.vectors[ok]) if ok.any() else []
        return scored_rows(result.paths, result.errors, p, self.config.threshold)

    def adopt_backbone(self, backbone) -> bool:
        """Embed through ``backbone`` (a generative fallback's base model with its adapters off)
        when it is the backbone this head was trained on and ours is not loaded yet."""
        if (self.backbone.loaded or backbone.fingerprint != self.backbone.fingerprint
                or backbone.image_size != self.backbone.image_size):
            return False
        self.backbone = backbone
        return True

    def export_source(self, images):
        """(backbone, transformers model to trace, None, torch embeddings) for the image graph:
        the frozen backbone as it is; the exporter applies the affine head to the embeddings."""
        c = self.config
        emb = self.backbone.embed(images, c.feature, c.layer, c.prompt or DEFAULT_PROMPT)
        return self.backbone, self.backbone.load()[0], None, emb

    @classmethod
    def affine_head(cls, config, model_dir) -> HeadArrays:
        h = LinearHead.load(model_dir)
        return HeadArrays(h.mean_, h.scale_, np.stack([np.zeros_like(h.coef_), h.coef_]),
                          np.array([0.0, h.intercept_]))

    @classmethod
    def head_files(cls, model_dir) -> list[Path]:
        return [Path(model_dir) / HEAD_FILE]


# --------------------------------------------------------------------------- fit

def check_options(options: FitOptions) -> None:
    """The linear head has no LoRA/generative hyper-parameters: refuse them instead of ignoring."""
    check_head_options("linear", options.head_params)


def best_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The threshold that maximises balanced accuracy on (y, p); midpoint between scores."""
    cands = np.unique(p)
    if len(cands) < 2:
        return 0.5
    mids = (cands[:-1] + cands[1:]) / 2
    best, best_score = 0.5, -1.0
    for t in mids:
        pred = p >= t
        score = np.mean([np.mean(pred[y == c] == c) for c in (0, 1) if np.any(y == c)])
        if score > best_score + 1e-12:
            best, best_score = float(t), score
    return float(min(max(best, 1e-6), 1 - 1e-6))


def fit_linear(train: list, val: list, out_dir, options: FitOptions) -> FitResult:
    """Embed train + validation through the cache, fit ``LinearHead``, write the model directory."""
    options = replace(options, feature=options.feature or "vision")
    backbone = create_backbone(options.backbone, BackboneOptions(
        device=options.device, image_size=options.image_size, weights=options.weights,
        trust_remote_code=options.trust_remote_code))
    backbone.check_feature(options.feature, options.layer)
    if backbone.random_weights:
        log(f"backbone {backbone.name} has RANDOM weights: its accuracy says nothing about real models",
            options.progress)
    cache = open_cache(options.cache_dir, backbone, options.feature, options.layer, options.prompt)
    every = train + val
    res = embed_paths(backbone, [e.path for e in every], options.feature, options.layer, options.prompt,
                      batch_size=options.batch_size, cache=cache, progress=options.progress, desc="fit")
    bad = [(e, err) for e, err in zip(every, res.errors) if err is not None]
    for e, err in bad:
        log(f"skipped {e.origin}: {err}", options.progress)
    ok = res.ok
    X, y = res.vectors, np.array([label_to_index(e.label) for e in every])
    n_train = len(train)
    tr, va = ok[:n_train], ok[n_train:]
    Xtr, ytr = X[:n_train][tr], y[:n_train][tr]
    if len(np.unique(ytr)) < 2:
        raise ValueError("after skipping unreadable images the training part has only one label")
    head = LinearHead(C=options.C, class_weight=options.class_weight, seed=options.seed).fit(Xtr, ytr)
    threshold = 0.5
    metrics: dict = {"n_train": int(tr.sum()), "n_val": int(va.sum()), "n_skipped": len(bad),
                     "skipped": [f"{e.origin}: {err}" for e, err in bad], "C": head.C_,
                     "random_weights_backbone": backbone.random_weights,
                     "embed_seconds": round(res.seconds, 3), "embed_cached": res.n_cached}
    if va.any():
        Xva, yva = X[n_train:][va], y[n_train:][va]
        p = head.predict_proba(Xva)[:, 1]
        if options.threshold_from_val:
            threshold = best_threshold(yva, p)
        labels_true = [LABELS[i] for i in yva]
        pred = [LABELS[1] if q >= threshold else LABELS[0] for q in p]
        metrics["validation"] = classification_metrics(labels_true, p.tolist(), pred, threshold)
    ident = backbone.describe()
    if options.weights:
        ident["weights"] = str(Path(options.weights).resolve())
    config = ModelConfig(head="linear", backbone=ident, feature=options.feature,
                         layer=options.layer if options.feature == "answer" else -1,
                         prompt=options.prompt if options.feature == "answer" else None,
                         dim=int(X.shape[1]), threshold=threshold,
                         head_params={"C": head.C_, "class_weight": options.class_weight})
    with atomic_dir(out_dir, overwrite=options.overwrite) as tmp:
        # recorded in the head too, so a head copied into another directory or an edited
        # config.json is caught at load time (LinearClassifier), even when the dimensions agree
        namespace = extraction_namespace(backbone, options.feature, options.layer, options.prompt)
        head.save(tmp, metadata={"extraction": json.dumps(namespace, sort_keys=True, ensure_ascii=False)})
        write_common_files(tmp, config, metrics, seen=(train, val))
    return FitResult(Path(out_dir), metrics, config)
