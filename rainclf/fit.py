"""``rainclf fit``: labelled images → a model directory.

Flow: load and validate the dataset (cheap, before any model work) → stratified split →
embed train + validation through the cache → fit the head → validation metrics → write the
model directory atomically. LoRA and generative heads plug in through ``FITTERS``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_dir
from .backbones import DEFAULT_PROMPT, BackboneOptions, create_backbone, default_cache_dir
from .data import Example, check_trainable, load_dataset, stratified_split
from .features import embed_paths, extraction_namespace, open_cache
from .labels import LABELS, label_to_index
from .metrics import classification_metrics
from .model_dir import ModelConfig, write_common_files


@dataclass
class FitOptions:
    """Every choice ``rainclf fit`` exposes; defaults match the CLI."""

    backbone: str = "glm4v-tiny"
    feature: str = "vision"
    layer: int = -1
    prompt: str = DEFAULT_PROMPT
    head: str = "linear"
    val_split: float = 0.2
    seed: int = 0
    batch_size: int = 8
    device: str = "auto"
    image_size: int | None = None
    weights: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | Path | None = field(default_factory=default_cache_dir)
    class_weight: str | None = "balanced"    # "balanced" | None (every image weighs the same)
    C: float | None = None                   # None: chosen by cross-validation
    threshold_from_val: bool = False
    overwrite: bool = False
    progress: bool = True
    head_params: dict = field(default_factory=dict)   # LoRA / generative hyper-parameters

    def __post_init__(self):
        if not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"--val-split must lie in [0, 1), got {self.val_split}")
        if self.feature not in ("vision", "answer"):
            raise ValueError(f"--feature must be vision or answer, not {self.feature!r}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError("--class-weight must be 'balanced' or 'none'")


@dataclass
class FitResult:
    model_dir: Path
    metrics: dict
    config: ModelConfig


def log(msg: str, progress: bool = True) -> None:
    if progress:
        print(f"rainclf: {msg}", file=sys.stderr)


def prepare_data(data: str | Path, options: FitOptions) -> tuple[list[Example], list[Example]]:
    examples = load_dataset(data)
    check_trainable(examples, data)
    train, val = stratified_split(examples, options.val_split, options.seed) if options.val_split else (examples, [])
    log(f"{len(examples)} examples ({sum(e.label == LABELS[1] for e in examples)} {LABELS[1]}): "
        f"{len(train)} train / {len(val)} validation", options.progress)
    return train, val


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


def fit_linear(data, out_dir, options: FitOptions) -> FitResult:
    from .heads.linear import LinearHead

    train, val = prepare_data(data, options)
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
        # config.json is caught at load time (classifier.py), even when the dimensions agree
        namespace = extraction_namespace(backbone, options.feature, options.layer, options.prompt)
        head.save(tmp, metadata={"extraction": json.dumps(namespace, sort_keys=True, ensure_ascii=False)})
        write_common_files(tmp, config, metrics)
    return FitResult(Path(out_dir), metrics, config)


Fitter = Callable[[object, object, FitOptions], FitResult]
FITTERS: dict[str, Fitter] = {"linear": fit_linear}
# heads whose fitter trains data-parallel under torchrun / accelerate launch (lora_common.train_loop)
DISTRIBUTED_HEADS = {"lora", "generative"}


def fit(data: str | Path, out_dir: str | Path, options: FitOptions | None = None) -> FitResult:
    """Fit a classifier on DATA and write it to OUT_DIR (see FitOptions)."""
    options = options or FitOptions()
    fitter = FITTERS.get(options.head)
    if fitter is None and options.head in ("lora", "generative"):
        import importlib

        importlib.import_module(f"rainclf.heads.{options.head}")  # registers its fitter
        fitter = FITTERS.get(options.head)
    if fitter is None:
        raise ValueError(f"unknown --head {options.head!r}: use linear, lora or generative")
    from .distributed import dist_context

    ctx = dist_context()
    if ctx.is_distributed and options.head not in DISTRIBUTED_HEADS:
        # refused before any work: N copies would each embed everything and race for OUT_DIR
        raise ValueError(
            f"--head {options.head} does not train with {ctx.world_size} processes (torchrun / accelerate "
            "launch): the embeddings are the part that scales. Fill the cache with N processes, "
            "`torchrun --nproc-per-node N -m rainclf.cli embed DATA -o /tmp/emb.safetensors` (same "
            "--backbone, --weights, --feature, --layer, --prompt, --cache-dir), then run "
            "`rainclf fit DATA -o OUT` in one process: every embedding is a cache hit")
    if Path(out_dir).exists() and not options.overwrite:
        raise FileExistsError(f"{out_dir} already exists: choose another -o or pass --overwrite")
    if ctx.is_distributed and not ctx.is_main:
        options = replace(options, progress=False)   # one log, from rank 0
    return fitter(data, out_dir, options)
