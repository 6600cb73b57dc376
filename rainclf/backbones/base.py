"""The frozen-backbone interface every backbone implements (``Backbone``), its errors and options,
device choice and the default cache directory (fingerprints: ``backbones/fingerprint.py``).

A backbone turns decoded RGB images into one float32 vector each for a named *feature*
(``vision`` or ``answer``). Builders are cheap: they read configs and compute the fingerprint,
but load weights only on the first ``embed`` call, so a run whose embeddings are all cached
never loads the model. Implementations import this module, never the registry
(``backbones/__init__.py``).

    efficientnet-lite0         ImageNet EfficientNet-Lite0 (the default; backbones/efficientnet.py)
    glm4v-tiny                 the committed random-weight GLM-4V in models/glm4v-tiny
    PATH or HUB_ID             any GLM-4V-family checkpoint (glm4v, glm46v, glm4v_moe)
    timm:NAME                  a timm image model (vision feature only)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

FEATURES = ("vision", "answer")
DEFAULT_PROMPT = "根据图片判断：会下雨还是不会下雨？"
TINY_NAME = "glm4v-tiny"
DEFAULT_BACKBONE = "efficientnet-lite0"   # pretrained and offline: the default of fit and embed


class BackboneError(RuntimeError):
    """A backbone cannot be found, loaded or used as asked (one-line message with the fix)."""


@dataclass
class BackboneOptions:
    """How to build a backbone; everything here is a user choice, nothing is fitted."""

    device: str = "auto"            # auto | cpu | cuda | cuda:N
    image_size: int | None = None   # None: the backbone's default
    weights: str | None = None      # timm: a local safetensors checkpoint
    trust_remote_code: bool = False
    extra: dict = field(default_factory=dict)


class Backbone:
    """Frozen feature extractor. Subclasses set the attributes and implement ``_embed``."""

    name: str                 # what the user typed (registry name, path or hub id)
    kind: str                 # "glm4v" | "timm" | "chatglm"
    fingerprint: str          # sha256 hex: id + config meaning + weight contents + tokenizer/template
    random_weights: bool
    image_size: int
    features: tuple[str, ...]
    _model = None             # set by load(): nothing is read from disk before the first embed

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def dim(self, feature: str) -> int:
        raise NotImplementedError

    def prepare_images(self, images: Sequence) -> list:
        """Decoded RGB images resized to the input size (default: as they are)."""
        return list(images)

    def weight_files(self) -> list[Path]:
        """The weight files this backbone reads (for sizes in reports); [] when it has none."""
        return []

    def weights_mb(self) -> float | None:
        files = self.weight_files()
        return sum(p.stat().st_size for p in files) / 2**20 if files else None

    def describe(self) -> dict:
        """JSON-able identity, stored in model directories and cache namespaces."""
        return {"name": self.name, "kind": self.kind, "fingerprint": self.fingerprint,
                "random_weights": self.random_weights, "image_size": self.image_size}

    def check_feature(self, feature: str, layer: int | None) -> None:
        if feature not in self.features:
            raise BackboneError(f"backbone {self.name!r} has no {feature!r} feature "
                                f"(it has: {', '.join(self.features)})")

    def embed(self, images: Sequence, feature: str = "vision", layer: int = -1,
              prompt: str = DEFAULT_PROMPT):
        """(N, D) float32 numpy array for N decoded RGB PIL images."""
        self.check_feature(feature, layer)
        if not images:
            import numpy as np
            return np.zeros((0, self.dim(feature)), dtype=np.float32)
        return self._embed(list(images), feature, layer, prompt)

    def _embed(self, images, feature, layer, prompt):
        raise NotImplementedError


# --------------------------------------------------------------------------- device

def resolve_device(device: str) -> str:
    """``auto`` → cuda if torch sees a GPU, else cpu; ``multi`` (one model split over this node's
    GPUs) → cuda, where its inputs go; an unusable choice → BackboneError naming the fix."""
    import torch

    if device == "multi":
        device = "cuda"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError("--device cuda was asked for but torch sees no CUDA GPU "
                            "(use --device cpu, or install a CUDA build of torch)")
    if device != "cpu" and not device.startswith("cuda"):
        raise BackboneError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


# --------------------------------------------------------------------------- fingerprints
# Content fingerprints of checkpoint directories live in backbones/fingerprint.py.

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def default_cache_dir() -> Path:
    """$RAINCLF_CACHE_DIR, else $XDG_CACHE_HOME/rainclf, else ~/.cache/rainclf."""
    env = os.environ.get("RAINCLF_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rainclf"
