"""A fake backbone for tests that need no GLM-4V (as simonw/llm's tests register a fake embedder):
numpy only, instant, deterministic. Its vision feature is the mean and standard deviation of each
RGB channel of the image at 32×32 — enough for a head to separate red from blue skies."""

from __future__ import annotations

import hashlib

import numpy as np

from rainclf.backbones.base import Backbone, BackboneOptions

FAKE_NAME = "fake-colour"


class ColourBackbone(Backbone):
    kind = "fake"
    features = ("vision",)
    random_weights = False
    image_size = 32

    def __init__(self, name: str = FAKE_NAME, options: BackboneOptions | None = None):
        self.name = name
        self.fingerprint = hashlib.sha256(f"fake:{name}:v1".encode()).hexdigest()
        self.embedded = 0                     # images embedded (cache tests count model work)

    def dim(self, feature: str) -> int:
        return 6

    def prepare_images(self, images):
        return [im.convert("RGB").resize((32, 32)) for im in images]

    def _embed(self, images, feature, layer, prompt):
        self.embedded += len(images)
        x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in self.prepare_images(images)])
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2))], axis=1).astype(np.float32)


def register(monkeypatch) -> str:
    """Put the fake into the backbone registry for this test; returns its name."""
    from rainclf import backbones

    monkeypatch.setitem(backbones.BACKBONES, FAKE_NAME, lambda name, options: ColourBackbone(name, options))
    return FAKE_NAME
