"""Benchmark: cold predict throughput (no embedding cache) with image decoding/resizing serial
before each forward pass (before) and prefetched in a thread while the model runs (after,
rainclf.embed.prefetch), on the same photos and model, in one run.

    python tools/bench_predict.py --model MODEL_DIR [--images 300] [--batch-size 8] [--rounds 2]
                                  [--threads 2] [--json F]

MODEL_DIR: a fitted vision-feature model (e.g. ``rainclf fit data/weather-mini/train -o M``, the
default efficientnet-lite0). Photos: ../shared/weather/images. Each round runs serial then
prefetched over all photos (``embed_paths`` + the head, as ``predict`` does, cache off); the model
is loaded and warmed up first. img/s = images · rounds / total seconds. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_json import add_json_argument, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8, help="predict's default batch size")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    add_json_argument(ap)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rainclf.config import RunOptions
    from rainclf.embed.extract import embed_paths
    from rainclf.model import load_classifier

    clf = load_classifier(args.model, RunOptions(device="cpu", cache_dir=None, progress=False))
    c = clf.config
    paths = sorted((REPO.parent / "shared" / "weather" / "images").glob("*.jpg"))[: args.images]
    embed_paths(clf.backbone, paths[:8], c.feature, c.layer, c.prompt or "", args.batch_size, progress=False)
    modes = {"serial decode (before)": 0, "prefetched decode (after)": 2}
    seconds = {m: 0.0 for m in modes}
    for _ in range(args.rounds):
        for mode, depth in modes.items():
            t0 = time.perf_counter()
            r = embed_paths(clf.backbone, paths, c.feature, c.layer, c.prompt or "", args.batch_size,
                            progress=False, prefetch=depth)
            clf.p_rain_from_embeddings(r.vectors[r.ok])
            seconds[mode] += time.perf_counter() - t0
    rows = [{"mode": m, "img_per_s": round(len(paths) * args.rounds / s, 2), "seconds": round(s, 2)}
            for m, s in seconds.items()]
    ratio = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    print(f"cold predict, {c.backbone.get('name')} ({c.feature}), {len(paths)} photos × {args.rounds} rounds, "
          f"batch {args.batch_size}, torch {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    for r in rows:
        print(f"  {r['mode']:<26} {r['img_per_s']:8.2f} img/s")
    print(f"speed-up: {ratio:.2f}x (target >= 1.3x)")
    write_json(args.json, "bench_predict.py", {"model": str(args.model), "images": len(paths), "rounds": args.rounds,
                                               "batch_size": args.batch_size}, {"rows": rows, "speedup": round(ratio, 3)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
