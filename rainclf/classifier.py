"""A loaded model directory: backbone + head composed, predicting image files.

``load_classifier(dir)`` reads ``config.json``, rebuilds the backbone it names (or the one given),
checks that the backbone is the one the head was trained on, and returns an object whose
``predict_paths`` yields one row per file: ``path, label, p_rain, source, error`` — ``label`` is
always exactly one of the two labels, or empty with an ``error``. Head types register a loader in
``HEAD_LOADERS``; prediction code never branches on the head type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .backbones import Backbone, BackboneOptions, create_backbone
from .features import embed_paths, extraction_namespace, open_cache
from .labels import LABELS
from .model_dir import ModelConfig, ModelDirError, check_backbone, check_extraction, read_config

ROW_FIELDS = ("path", "label", "p_rain", "source", "error")


@dataclass
class Row:
    path: str
    label: str | None = None
    p_rain: float | None = None
    source: str = "head"
    error: str | None = None
    extra: dict = field(default_factory=dict)   # e.g. raw, format_valid for generative models

    def as_dict(self) -> dict:
        d = {"path": self.path, "label": self.label, "p_rain": self.p_rain,
             "source": self.source, "error": self.error}
        d.update(self.extra)
        return d


@dataclass
class RunOptions:
    """How to run a loaded classifier (never changes what it computes)."""

    device: str = "auto"
    batch_size: int = 8
    cache_dir: str | Path | None = None
    progress: bool = True
    backbone: str | None = None      # override the saved backbone location (moved weights)
    # generative model directories (rainclf.heads.generative)
    decoding: str = "greedy"         # greedy | sample | constrained
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 16
    # which engine runs a linear/vision head: torch, or the exported ONNX graph (rainclf.onnx_engine)
    engine: str = "torch"
    providers: list | None = None


def backbone_for(config: ModelConfig, model_dir: Path, options: RunOptions) -> Backbone:
    saved = config.backbone
    name = options.backbone or saved["name"]
    backbone = create_backbone(name, BackboneOptions(
        device=options.device, image_size=saved.get("image_size"), weights=saved.get("weights"),
        trust_remote_code=bool(saved.get("trust_remote_code", False))))
    check_backbone(config, backbone, model_dir)
    return backbone


class LinearClassifier:
    """Frozen backbone embeddings → linear head."""

    def __init__(self, config: ModelConfig, model_dir: Path, options: RunOptions):
        from .heads.linear import LinearHead

        self.config, self.model_dir, self.options = config, model_dir, options
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
        return embed_paths(self.backbone, paths, c.feature, c.layer, c.prompt or "",
                           batch_size=o.batch_size, cache=cache, progress=o.progress, desc="predict")

    def p_rain_from_embeddings(self, vectors: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(vectors)[:, 1]

    def predict_paths(self, paths: Sequence[str | Path]) -> list[Row]:
        result = self.embed(paths)
        rows = [Row(path=str(p), error=e) for p, e in zip(result.paths, result.errors)]
        ok = result.ok
        if ok.any():
            p = self.p_rain_from_embeddings(result.vectors[ok])
            for row, pr in zip((r for r, good in zip(rows, ok) if good), p):
                row.p_rain = float(pr)
                row.label = LABELS[1] if pr >= self.config.threshold else LABELS[0]
        self.last_embed = result
        return rows


Loader = Callable[[ModelConfig, Path, RunOptions], object]
HEAD_LOADERS: dict[str, Loader] = {"linear": LinearClassifier}


def register_head_loader(head: str, loader: Loader) -> None:
    HEAD_LOADERS[head] = loader


def load_classifier(model_dir: str | Path, options: RunOptions | None = None):
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    loader = HEAD_LOADERS.get(config.head)
    if loader is None:
        _import_optional_heads()
        loader = HEAD_LOADERS.get(config.head)
    if loader is None:
        raise ModelDirError(f"{model_dir}: head type {config.head!r} is unknown to this rainclf")
    return loader(config, model_dir, options or RunOptions())


def _import_optional_heads() -> None:
    """LoRA and generative heads need peft; import them only when a directory asks for them."""
    import importlib

    for module in ("rainclf.heads.lora", "rainclf.heads.generative"):
        try:
            importlib.import_module(module)
        except ImportError:
            pass
