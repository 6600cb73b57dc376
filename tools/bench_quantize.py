"""Benchmark: int8 (and fp16) ONNX image graphs against the fp32 one, CPU img/s at batch 32 and
label agreement with torch on real photos, in one run.

    python tools/bench_quantize.py --model MODEL_DIR [--calibration DIR] [--images 160] [--batch 32]
                                   [--threads 2] [--fp16] [--json F]

MODEL_DIR: a fitted model (default backbone efficientnet-lite0, e.g. ``rainclf fit
data/weather-mini/train -o M``). The tool exports fp32 and ``--quantize int8`` (and with --fp16
``--precision fp16``) into a temporary folder with ``rainclf.onnx.export``, calibrating on
``--calibration`` (default: data/weather-mini/train). It then times each graph on the same
preprocessed photos from ../shared/weather/images that are not in the calibration folder
(interleaved calls, onnxruntime CPU, ORT_ENABLE_ALL, ``--threads`` intra-op threads) and compares
every graph's labels with torch's (the model directory's own classifier) on those photos.
Prints numbers (and --json FILE), asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_json import add_json_argument, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--calibration", type=Path, default=REPO / "data" / "weather-mini" / "train")
    ap.add_argument("--images", type=int, default=160, help="held-out photos timed and compared")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp16", action="store_true", help="also the fp16 graph (CPU speed is not its point)")
    add_json_argument(ap)
    args = ap.parse_args(argv)

    from PIL import Image

    from rainclf.config import RunOptions
    from rainclf.data.images import find_images
    from rainclf.model import load_classifier
    from rainclf.onnx.export import export_onnx
    from rainclf.onnx.quantize import agreement, session
    from rainclf.onnx.runtime import OnnxClassifier, preprocess

    calib_names = {p.name for p in find_images(args.calibration)[0]}
    photos = [p for p in sorted((REPO.parent / "shared" / "weather" / "images").glob("*.jpg"))
              if p.name not in calib_names][: args.images]
    images = [Image.open(p).convert("RGB") for p in photos]
    clf = load_classifier(args.model, RunOptions(device="cpu", cache_dir=None, progress=False))
    torch_p = np.concatenate([np.asarray(clf.predict_proba(images[i:i + 32]), dtype=np.float64)
                              for i in range(0, len(images), 32)])
    variants = {"fp32": {}, "int8": {"quantize": "int8"}}
    if args.fp16:
        variants["fp16"] = {"precision": "fp16"}
    rows, sessions, px = [], {}, None
    with tempfile.TemporaryDirectory(prefix="rainclf-bench-q-") as tmp:
        for name, kw in variants.items():
            t0 = time.perf_counter()
            info = export_onnx(args.model, Path(tmp) / name, include_backbone=True, calibration=args.calibration
                               if kw else None, min_agreement=0.0, **kw)
            export_s = time.perf_counter() - t0
            onnx_clf = OnnxClassifier.from_dir(info["out_dir"])
            spec = onnx_clf.metadata.input_spec
            px = preprocess(images, spec) if px is None else px
            path = Path(info["out_dir"]) / info["graphs"]["image"]["file"]
            sessions[name] = session(path, args.threads)
            step = args.batch * spec.rows_per_image
            p = np.concatenate([sessions[name].run(["p_rain"], {"pixel_values": px[i:i + step]})[0]
                                for i in range(0, len(px), step)]).astype(np.float64)
            rows.append({"graph": name, "file_MB": round(path.stat().st_size / 2**20, 2), "export_s": round(export_s, 1),
                         **agreement(p, torch_p, clf.config.threshold),
                         "calibration": info["parity"].get("calibration")})
        x = px[: args.batch * spec.rows_per_image]
        times = {n: [] for n in sessions}
        for s in sessions.values():
            s.run(["p_rain"], {"pixel_values": x})             # warm-up
        for _ in range(args.calls):
            for n, s in sessions.items():
                t0 = time.perf_counter()
                s.run(["p_rain"], {"pixel_values": x})
                times[n].append(time.perf_counter() - t0)
    for r in rows:
        r["img_per_s"] = round(args.batch * args.calls / sum(times[r["graph"]]), 2)
    base = rows[0]["img_per_s"]
    print(f"{clf.config.backbone.get('name')} image graph, batch {args.batch}, {args.threads} onnxruntime threads, "
          f"{len(images)} held-out photos from ../shared/weather (not in {args.calibration}), load "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    for r in rows:
        print(f"  {r['graph']:<5} {r['img_per_s']:8.2f} img/s ({r['img_per_s'] / base:4.2f}x fp32)  "
              f"agreement with torch {r['label_agreement']:.1%}, max |Δp_rain| {r['max_abs_dp']:.3f}, "
              f"{r['file_MB']} MB")
    write_json(args.json, "bench_quantize.py", {"model": str(args.model), "batch": args.batch, "calls": args.calls,
                                                "threads": args.threads, "images": len(images),
                                                "calibration": str(args.calibration)}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
