"""Regenerate ``data/sample/``: tiny SYNTHETIC sky pictures for demos, docs and fast tests.

Written (all 96×72 JPEGs, about 200 KB in total):

* ``train/会下雨/``   24 grey/dark skies with dark cloud blobs and rain streaks;
* ``train/不会下雨/`` 24 blue skies with white clouds, or orange sunrises;
* ``train.jsonl``     the train images in the GLM-4 fine-tuning format (paths relative to it);
* ``predict/``        10 unlabelled images of both kinds, named so the name gives nothing away;
* ``predict_truth.csv`` the labels of ``predict/`` (a ``path,label`` CSV, for evaluation demos).

These are drawn by numpy, not photographed: they show the flow end to end and nothing about real
accuracy (real photos are in ``../shared/weather/``). Deterministic: the same seed and library
versions write byte-identical files (``--check`` verifies the committed copy).

    python tools/make_sample_data.py [--out data/sample] [--check]
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 20251125
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "data" / "sample"
W, H = 96, 72
N_TRAIN = 24  # per label
N_PREDICT = 10
RAIN, NO_RAIN = "会下雨", "不会下雨"  # same strings as rainclf.labels (kept standalone: no import path games)
PROMPT = "根据图片判断：会下雨还是不会下雨？"  # the prompt of shared/weather/train.jsonl

_YY, _XX = np.mgrid[0:H, 0:W].astype(np.float64)


def _gradient(top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, H)[:, None, None]
    return (1 - t) * np.array(top, float) + t * np.array(bottom, float) + np.zeros((H, W, 3))


def _blob(img: np.ndarray, rng: np.random.Generator, colour, strength: float, size: float) -> None:
    """Blend a soft elliptical cloud of ``colour`` into ``img`` in place."""
    cx, cy = rng.uniform(-10, W + 10), rng.uniform(-5, H * 0.6)
    rx, ry = size * rng.uniform(0.8, 1.6), size * rng.uniform(0.4, 0.8)
    a = strength * np.exp(-(((_XX - cx) / rx) ** 2 + ((_YY - cy) / ry) ** 2))[..., None]
    img *= 1 - a
    img += a * np.array(colour, float)


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> Image.Image:
    img = img + rng.normal(0.0, noise, img.shape)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), "RGB")


def rainy(rng: np.random.Generator) -> Image.Image:
    """Low dark overcast, darker cloud masses, light diagonal streaks of rain, a dim ground."""
    g = rng.uniform(60, 110)
    img = _gradient((g, g + 3, g + 8), (g + 40, g + 42, g + 45))
    for _ in range(rng.integers(3, 7)):
        d = rng.uniform(25, 60)
        _blob(img, rng, (d, d, d + 5), rng.uniform(0.5, 0.9), rng.uniform(15, 35))
    img[int(H * rng.uniform(0.75, 0.88)):] *= 0.55  # wet, dark ground
    pic = _finish(img, rng, 6.0)
    draw = ImageDraw.Draw(pic)
    slant = rng.uniform(-6, 2)
    for _ in range(rng.integers(25, 50)):
        x, y = rng.uniform(-10, W), rng.uniform(0, H)
        length = rng.uniform(6, 14)
        v = int(rng.uniform(150, 200))
        draw.line([(x, y), (x + slant, y + length)], fill=(v, v, v + 8), width=1)
    return pic


def clear_sky(rng: np.random.Generator) -> Image.Image:
    """Blue gradient with a few white fair-weather clouds."""
    img = _gradient((rng.uniform(20, 60), rng.uniform(80, 120), rng.uniform(180, 230)),
                    (rng.uniform(140, 180), rng.uniform(190, 220), rng.uniform(235, 255)))
    for _ in range(rng.integers(1, 5)):
        w = rng.uniform(235, 255)
        _blob(img, rng, (w, w, w), rng.uniform(0.6, 0.95), rng.uniform(8, 20))
    return _finish(img, rng, 3.0)


def sunrise(rng: np.random.Generator) -> Image.Image:
    """Violet-to-orange gradient, a bright sun near the horizon, a dark land silhouette."""
    img = _gradient((rng.uniform(40, 90), rng.uniform(30, 60), rng.uniform(90, 140)),
                    (rng.uniform(230, 255), rng.uniform(120, 170), rng.uniform(30, 70)))
    sx, sy, r = rng.uniform(15, W - 15), H * rng.uniform(0.55, 0.7), rng.uniform(5, 9)
    sun = np.exp(-(((_XX - sx) ** 2 + (_YY - sy) ** 2) / (2 * r * r)))[..., None]
    img = img * (1 - sun) + sun * np.array([255.0, 240.0, 190.0])
    horizon = H * rng.uniform(0.72, 0.82) + 3 * np.sin(_XX[0] / rng.uniform(6, 12))
    img[_YY > horizon[None, :]] = rng.uniform(15, 35)
    return _finish(img, rng, 3.0)


def _jpeg(pic: Image.Image) -> bytes:
    buf = io.BytesIO()
    pic.save(buf, "JPEG", quality=85)  # no EXIF, no ICC: only pixels, so bytes are reproducible
    return buf.getvalue()


def write(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    files: dict[str, bytes] = {}
    train: list[tuple[str, str]] = []
    for label, prefix, makers in ((RAIN, "rain", (rainy,)), (NO_RAIN, "norain", (clear_sky, sunrise))):
        for i in range(N_TRAIN):
            rel = f"train/{label}/{prefix}_{i:03d}.jpg"
            files[rel] = _jpeg(makers[i % len(makers)](rng))
            train.append((rel, label))
    truth = []
    # Half of each label, in a shuffled order so a file's number says nothing about its label.
    kinds = [(RAIN, rainy), (NO_RAIN, clear_sky), (RAIN, rainy), (NO_RAIN, sunrise)]
    kinds = [kinds[i % len(kinds)] for i in range(N_PREDICT)]
    for i, k in enumerate(rng.permutation(N_PREDICT)):
        label, maker = kinds[k]
        rel = f"predict/sky_{i:03d}.jpg"
        files[rel] = _jpeg(maker(rng))
        truth.append((rel, label))

    # A fixed shuffle, like shared/weather/train.jsonl, so any prefix holds both labels.
    order = rng.permutation(len(train))
    lines = [json.dumps({"messages": [{"role": "user", "content": PROMPT, "image": train[k][0]},
                                      {"role": "assistant", "content": train[k][1]}]},
                        ensure_ascii=False, separators=(",", ":")) for k in order]
    files["train.jsonl"] = ("\n".join(lines) + "\n").encode("utf-8")
    files["predict_truth.csv"] = ("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in truth)).encode("utf-8")
    files["README.md"] = (
        "# data/sample: SYNTHETIC sky pictures\n\n"
        "Made by `python tools/make_sample_data.py` (numpy + Pillow, seed %d); do not edit by hand.\n"
        "They exist to run the flow end to end in seconds, and say nothing about real accuracy:\n"
        "real photos are in `../shared/weather/`.\n\n"
        "- `train/会下雨/`, `train/不会下雨/`: %d images each (a folder dataset)\n"
        "- `train.jsonl`: the same images in the GLM-4 fine-tuning format\n"
        "- `predict/`: %d unlabelled images; their labels are in `predict_truth.csv`\n"
        % (SEED, N_TRAIN, N_PREDICT)).encode("utf-8")

    for rel, data in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main(argv=None) -> int:
    from regen import main as regen_main  # tools/ is on sys.path when run as a script

    return regen_main(__doc__, DEFAULT_OUT, write, f"synthetic, seed {SEED}", argv)


if __name__ == "__main__":
    sys.exit(main())
