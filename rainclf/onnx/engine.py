"""``rainclf predict --engine onnx``: a model directory's ONNX export behind the classifier API.

``load_onnx_classifier(model_dir, options)`` reads ``MODEL_DIR/onnx/rainclf_onnx.json``, refuses an
export that does not belong to the directory (backbone fingerprint, embedding dimension,
threshold, feature, head weights), then returns an object with ``config`` and
``predict_paths(paths) -> list[Row]``:

    image graph present   files → numpy preprocessing → onnxruntime, no torch model at all
    head graph only       torch backbone embeddings (through the cache, as LinearClassifier) →
                          onnxruntime head
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from rainclf.config import RunOptions
from rainclf.heads.base import ClassifierBase, Row
from rainclf.heads.linear import LinearClassifier
from rainclf.model import ModelConfig, ModelDirError, read_config
from rainclf.onnx.format import (
    EXPORT_DIR,
    METADATA_FILE,
    OnnxExportError,
    read_metadata,
)
from rainclf.onnx.runtime import OnnxClassifier


def head_sha256(config: ModelConfig, model_dir: Path) -> str:
    h = hashlib.sha256()
    from rainclf.heads import head_classifier

    for path in head_classifier(config.head).head_files(Path(model_dir)):
        if not path.is_file():
            raise ModelDirError(f"{path} is missing: the model directory is damaged; refit it")
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def check_export(meta, config: ModelConfig, model_dir: Path, export_dir: Path) -> None:
    """Refuse an export made from another model directory (or from an older fit of this one)."""
    saved, fix = config.backbone, f"re-run: rainclf export {model_dir}"
    checks = [
        ("backbone fingerprint", str(meta.backbone.get("fingerprint"))[:12], str(saved.get("fingerprint"))[:12]),
        ("embedding dimension", meta.dim, config.dim if config.dim is not None else meta.dim),
        ("threshold", meta.threshold, config.threshold),
        ("feature", meta.feature, config.feature),
        ("head", meta.head, config.head),
        ("image size", meta.backbone.get("image_size"), saved.get("image_size")),
        # an image graph bakes the answer feature's layer and prompt in (None: not recorded)
        ("layer", meta.layer, config.layer if meta.layer is not None else None),
        ("prompt", meta.prompt, config.prompt if config.feature == "answer" else None),
    ]
    for what, got, want in checks:
        if got != want:
            raise ModelDirError(f"{export_dir} does not match {model_dir}: {what} {got} in the export, "
                                f"{want} in config.json — {fix}")
    if meta.head_sha256 != head_sha256(config, model_dir):
        raise ModelDirError(f"{export_dir} was exported from other head weights than {model_dir} holds "
                            f"(the model was refitted?) — {fix}")


class OnnxImageClassifier(ClassifierBase):
    """Image files → the exported image graph on onnxruntime (no torch model at all)."""

    engine = "onnx"

    def __init__(self, config: ModelConfig, runtime: OnnxClassifier, options: RunOptions):
        self.config, self.runtime, self.options = config, runtime, options
        self.notes = [runtime.describe("image")]

    def predict_paths(self, paths: Sequence[str | Path]) -> list[Row]:
        out = self.runtime.predict([Path(p) for p in paths], batch_size=self.options.batch_size)
        return [Row(path=r["path"], label=r["label"], p_rain=r["p_rain"], error=r["error"]) for r in out]

    def predict_proba(self, images) -> np.ndarray:
        out = self.runtime.predict(list(images), batch_size=self.options.batch_size)
        bad = [r["error"] for r in out if r["error"]]
        if bad:
            raise ValueError(bad[0])
        return np.array([r["p_rain"] for r in out], dtype=float)


class OnnxHeadClassifier(LinearClassifier):
    """Torch backbone embeddings (cached) → the exported head graph on onnxruntime."""

    engine = "onnx"

    def __init__(self, config: ModelConfig, model_dir: Path, options: RunOptions, runtime: OnnxClassifier):
        super().__init__(config, model_dir, options)
        self.runtime = runtime
        self.notes = [runtime.describe("head") + f" (embeddings from torch {self.backbone.name})"]

    def p_rain_from_embeddings(self, vectors):
        return self.runtime.p_rain_from_embeddings(vectors)


def load_onnx_classifier(model_dir: str | Path, options: RunOptions | None = None):
    options = options or RunOptions()
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    export_dir = model_dir / EXPORT_DIR
    if not (export_dir / METADATA_FILE).is_file():
        raise ModelDirError(f"{model_dir} has no ONNX export ({export_dir}/{METADATA_FILE}): "
                            f"run rainclf export {model_dir} first")
    try:
        meta = read_metadata(export_dir)
        check_export(meta, config, model_dir, export_dir)
        runtime = OnnxClassifier(export_dir, meta, providers=options.providers)
    except OnnxExportError as e:
        raise ModelDirError(str(e)) from None
    if runtime.has_image_graph:
        return OnnxImageClassifier(config, runtime, options)
    from rainclf.heads import head_classifier

    if not head_classifier(config.head).frozen_embeddings:
        raise ModelDirError(f"{export_dir} holds only the head graph, whose inputs only the torch "
                            f"{config.head} model computes: rainclf export {model_dir} --include-backbone, "
                            "or use --engine torch")
    return OnnxHeadClassifier(config, model_dir, options, runtime)
