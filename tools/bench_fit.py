"""Benchmark: linear-head fit time and glm4v-tiny extraction throughput on the CPU.

    python tools/bench_fit.py [--n 10000 --dim 4096] [--images 200] [--json FILE]

Prints numbers, asserts nothing. Target (issue 3): linear fit on 10,000 × 4,096 under 10 s on
2 cores. glm4v-tiny has RANDOM weights; its img/s is a pipeline figure, not a real-model one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import add_json_argument, write_json  # noqa: E402


def bench_linear(n: int, dim: int, seed: int = 0) -> float:
    from rainclf.heads.linear import LinearHead

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim)).astype(np.float32)
    y = (X @ rng.normal(size=dim) + rng.normal(size=n) * 20 > 0).astype(int)
    t = time.perf_counter()
    head = LinearHead(seed=seed).fit(X, y)
    seconds = time.perf_counter() - t
    acc = (head.predict_proba(X)[:, 1] >= 0.5).astype(int)
    print(f"linear head fit  {n} x {dim}: {seconds:.2f} s (C={head.C_}, train acc {np.mean(acc == y):.3f}, "
          f"target < 10 s: {'met' if seconds < 10 else 'MISSED'})")
    return seconds


def images_for(n: int):
    from PIL import Image

    shared = REPO.parent / "shared" / "weather" / "images"
    paths = sorted(shared.glob("*.jpg"))[:n] if shared.is_dir() else []
    if len(paths) >= n:
        return [Image.open(p).convert("RGB") for p in paths], "real photos from ../shared/weather"
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(n)], "random images"


def bench_extraction(n: int, batch_size: int) -> dict:
    import torch

    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import BackboneOptions

    images, what = images_for(n)
    backbone = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    t = time.perf_counter()
    backbone.load()
    print(f"glm4v-tiny (RANDOM weights) load incl. imports: {time.perf_counter() - t:.2f} s; "
          f"{n} {what}, batch {batch_size}, torch threads {torch.get_num_threads()}")
    out = {"images": n, "image_source": what, "batch_size": batch_size}
    for feature in ("vision", "answer"):
        backbone.embed(images[:batch_size], feature)  # warm-up
        t = time.perf_counter()
        for i in range(0, n, batch_size):
            backbone.embed(images[i:i + batch_size], feature)
        s = time.perf_counter() - t
        print(f"  {feature:6s} feature: {n / s:8.1f} img/s ({1000 * s / n:.2f} ms/img, decode excluded)")
        out[f"{feature}_images_per_s"] = n / s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    add_json_argument(ap)
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}")
    fit_s = bench_linear(args.n, args.dim)
    extraction = bench_extraction(args.images, args.batch_size)
    write_json(args.json, "bench_fit.py", {"n": args.n, "dim": args.dim, "images": args.images,
                                           "batch_sizes": [args.batch_size], "repeats": 1},
               {"linear_fit_seconds": fit_s, "extraction": extraction})


if __name__ == "__main__":
    main()
