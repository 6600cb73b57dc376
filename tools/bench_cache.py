"""Benchmark: re-predict of N images, cold (empty cache) vs cached, each in a fresh process.

    python tools/bench_cache.py [--n 100] [--model MODEL_DIR] [--json FILE]

A cold run loads the model and embeds every image; a cached run only reads and hashes the files,
reads one checksummed entry per image and never loads the model. Both wall-clock figures include
Python start-up and imports, as a user experiences them; the in-process figures exclude them.
Target (issue 3): cached ≥ 50× faster than cold. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import add_json_argument, write_json  # noqa: E402

RUN = r"""
import json, sys, time
t0 = time.perf_counter()
from rainclf.config import RunOptions
from rainclf.predict import predict
t1 = time.perf_counter()
run = predict(sys.argv[1], sys.argv[2], RunOptions(device="cpu", progress=False, cache_dir=sys.argv[3]))
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "predict_s": t2 - t1, "n": len(run.rows), "errors": run.summary.errors}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: fit one on data/sample)")
    add_json_argument(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = sorted((REPO.parent / "shared" / "weather" / "images").glob("*.jpg"))[: args.n]
        if len(photos) < args.n:
            sys.exit("need ../shared/weather/images beside the checkout")
        folder = tmp / "photos"
        folder.mkdir()
        for p in photos:
            shutil.copy(p, folder / p.name)
        model = args.model
        if model is None:
            model = tmp / "model"
            subprocess.run([sys.executable, "-m", "rainclf.cli", "fit", "--backbone", "glm4v-tiny", str(REPO / "data/sample/train"), "-o",
                            str(model), "--no-cache", "-q"], check=True)
        cache = tmp / "cache"
        results = {}
        for name in ("cold", "cached"):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", RUN, str(folder), str(model), str(cache)],
                                 check=True, capture_output=True, text=True).stdout
            wall = time.perf_counter() - t
            results[name] = dict(json.loads(out.strip().splitlines()[-1]), wall_s=wall)
        c, w = results["cold"], results["cached"]
        print(f"re-predict of {c['n']} real photos (glm4v-tiny, RANDOM weights, vision feature, CPU)")
        print(f"  cold  : predict() {c['predict_s']:.3f} s, process wall {c['wall_s']:.2f} s")
        print(f"  cached: predict() {w['predict_s']:.3f} s, process wall {w['wall_s']:.2f} s")
        print(f"  speed-up predict(): {c['predict_s'] / w['predict_s']:.1f}x (target >= 50x); "
              f"whole process: {c['wall_s'] / w['wall_s']:.1f}x (imports {w['import_s']:.2f} s in both)")
        results["speedup_predict"] = c["predict_s"] / w["predict_s"]
        results["speedup_process"] = c["wall_s"] / w["wall_s"]
        write_json(args.json, "bench_cache.py", {"n": args.n, "model": str(args.model or "fitted on data/sample"),
                                                 "repeats": 1, "device": "cpu"}, results)


if __name__ == "__main__":
    main()
