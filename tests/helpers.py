"""Small image factories shared by the tests (imported as `helpers`; tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def solid_images(n: int, seed: int = 0, size=(80, 60)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def write_class_folders(root: Path, n_per_class: int = 8, seed: int = 0, size=(64, 48)) -> Path:
    """A separable synthetic dataset: grey-blue dark skies = 会下雨, bright blue/orange = 不会下雨."""
    rng = np.random.default_rng(seed)
    for label, base in (("会下雨", (70, 75, 85)), ("不会下雨", (90, 160, 235))):
        d = root / label
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.clip(np.array(base) + rng.normal(0, 18, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"{i:03d}.jpg", quality=90)
    return root


def make_red_blue(root: Path, n_per_class: int = 12, seed: int = 0, size: int = 112) -> Path:
    """Red-ish skies = 会下雨, blue-ish = 不会下雨 (separable by colour), size×size PNGs."""
    rng = np.random.default_rng(seed)
    for label, base in (("会下雨", (200, 60, 50)), ("不会下雨", (50, 70, 200))):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            arr = np.clip(np.array(base) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / label / f"{i:03d}.png")
    return root
