"""Benchmark: torch vs onnxruntime for an exported classifier, head-only and image → label.

    python tools/bench_onnx.py [--features vision,answer] [--batch-sizes 1,32] [--calls 30]
    python tools/bench_onnx.py --gpu      # one CUDA GPU: torch bf16 and fp32 vs onnxruntime CUDA (fp32 graph)
    python tools/bench_onnx.py --json results.json

For each feature a linear head is fitted on data/sample with glm4v-tiny (random weights) and
exported with ``--include-backbone`` into a temporary folder; the photos are real ones from
../shared/weather/images when present (else data/sample), decoded once before timing.

    image → label   decoded RGB images → p_rain. torch: Glm4vBackbone.embed (processor +
                    model) + the numpy linear head, exactly what ``--engine torch`` runs;
                    onnxruntime: numpy preprocessing + the image graph (rainclf.onnx.runtime).
    head only       (N, dim) float32 embeddings → p_rain. torch engine: LinearHead (numpy
                    float64); onnxruntime: the head graph.

Latency is per call of ``batch`` images (p50, p95 over ``--calls`` after ``--warmup``); img/s =
batch / mean call time. Ratio = torch p50 / onnxruntime p50 (> 1: onnxruntime is faster), always
between rows of the same precision: the exported graphs are fp32, so with ``--gpu`` torch runs the
image path twice — in bf16 (what ``--engine torch`` runs on CUDA) and cast to fp32, the row the
ratio uses — and every row prints its precision. Thread counts are each library's default and
are printed. Prints numbers (and ``--json FILE``), asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_json import add_json_argument, write_json  # noqa: E402

WEATHER = REPO.parent / "shared" / "weather" / "images"
SAMPLE = REPO / "data" / "sample"


def load_photos(n: int) -> list:
    from rainclf.data.images import load_image

    paths = sorted(WEATHER.glob("*.jpg")) if WEATHER.is_dir() else sorted(SAMPLE.glob("**/*.jpg"))
    paths = paths[:: max(1, len(paths) // n)][:n]
    while len(paths) < n:
        paths = paths + paths
    return [load_image(p) for p in paths[:n]], ("../shared/weather" if WEATHER.is_dir() else "data/sample")


def timed(fn, items, batch: int, calls: int, warmup: int, sync=lambda: None) -> dict:
    """Latency of ``fn(items[i:i+batch])`` calls, cycling through ``items``."""
    chunks = [items[i:i + batch] for i in range(0, len(items) - batch + 1, batch)] or [items[:batch]]
    for i in range(warmup):
        fn(chunks[i % len(chunks)])
    sync()
    times = []
    for i in range(calls):
        t = time.perf_counter()
        fn(chunks[i % len(chunks)])
        sync()
        times.append(time.perf_counter() - t)
    t = np.array(times)
    return {"p50": 1e3 * float(np.percentile(t, 50)), "p95": 1e3 * float(np.percentile(t, 95)),
            "img_s": batch / float(t.mean())}


def build(feature: str, workdir: Path):
    """A fitted linear model directory for ``feature`` and its export (image graph + head graph)."""
    from rainclf.fit import FitOptions, fit
    from rainclf.onnx.export import export_onnx

    model_dir = workdir / feature
    fit(SAMPLE / "train", model_dir, FitOptions(backbone="glm4v-tiny", feature=feature, cache_dir=None, progress=False,
                                                device="cpu", val_split=0.0, C=1.0))
    info = export_onnx(model_dir, include_backbone=True)
    return model_dir, info


def bench_feature(feature: str, args, photos, workdir: Path, rows: list, notes: list) -> None:
    import torch

    from rainclf.config import RunOptions
    from rainclf.heads.linear import LinearHead
    from rainclf.model import backbone_for, read_config
    from rainclf.onnx.runtime import OnnxClassifier

    model_dir, info = build(feature, workdir)
    config = read_config(model_dir)
    head = LinearHead.load(model_dir)
    device = "cuda" if args.gpu else "cpu"
    backbone = backbone_for(config, model_dir, RunOptions(device=device, progress=False, cache_dir=None))
    providers = ["CUDAExecutionProvider"] if args.gpu else ["CPUExecutionProvider"]
    try:
        onnx = OnnxClassifier.from_dir(model_dir, providers=providers)
    except Exception as e:   # onnxruntime without CUDA: say so and time torch only
        notes.append(f"{feature}: onnxruntime {providers[0]} unavailable ({e}); onnxruntime rows skipped")
        onnx = None
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    torch_dtype = str(backbone.load()[0].dtype).replace("torch.", "").replace("bfloat16", "bf16").replace(
        "float32", "fp32")
    torch_name = f"torch {'cuda' if args.gpu else 'cpu'}"
    ort_name = f"onnxruntime {'cuda' if args.gpu else 'cpu'}"

    def image_fn(bb):
        return lambda ims: head.predict_proba(bb.embed(ims, feature, config.layer, config.prompt or ""))[:, 1]

    torch_image = image_fn(backbone)
    fp32_image = None
    if torch_dtype != "fp32":   # like with like: the same model in fp32, beside what --engine torch runs
        backbone32 = backbone_for(config, model_dir, RunOptions(device=device, progress=False, cache_dir=None))
        backbone32.load()[0].float()
        fp32_image = image_fn(backbone32)

    embeddings = backbone.embed(photos, feature, config.layer, config.prompt or "").astype(np.float32)
    if "image" not in info["graphs"]:
        notes.append(f"{feature}: image graph not exported: {info['not_exported'].get('image')}")
    elif onnx is not None:
        notes.append(f"{feature}: {onnx.describe('image')}, {onnx.describe('head')}")
    for batch in args.batch_sizes:
        cases = [("image → label", torch_name, torch_dtype, torch_image, photos, sync)]
        if fp32_image is not None:
            cases.append(("image → label", torch_name, "fp32", fp32_image, photos, sync))
        if onnx is not None and "image" in info["graphs"]:
            cases.append(("image → label", ort_name, "fp32", onnx.p_rain_from_images, photos, lambda: None))
        cases.append(("head only", "torch engine (numpy head)", "fp64", lambda x: head.predict_proba(x)[:, 1],
                      embeddings, lambda: None))
        if onnx is not None:
            cases.append(("head only", ort_name, "fp32", onnx.p_rain_from_embeddings, embeddings, lambda: None))
        for graph, engine, precision, fn, items, s in cases:
            r = timed(fn, items, batch, args.calls, args.warmup, s)
            rows.append(dict(feature=feature, graph=graph, engine=engine, precision=precision, batch=batch, **r))


def add_ratios(rows: list) -> None:
    """torch p50 / onnxruntime p50 for each onnxruntime row, against the torch row of the same
    feature, graph, batch and precision (else the first torch row, with both precisions named)."""
    for r in rows:
        r["ratio"] = r["ratio_vs"] = None
        if not r["engine"].startswith("onnxruntime"):
            continue
        same = [x for x in rows if (x["feature"], x["graph"], x["batch"]) == (r["feature"], r["graph"], r["batch"])
                and not x["engine"].startswith("onnx")]
        ref = next((x for x in same if x["precision"] == r["precision"]), same[0] if same else None)
        if ref is not None:
            r["ratio"] = ref["p50"] / r["p50"]
            r["ratio_vs"] = f"torch {ref['precision']} / onnxruntime {r['precision']}"


def print_table(rows: list) -> None:
    print(f"{'feature':<8} {'graph':<14} {'engine':<26} {'prec':<5} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} "
          f"{'img/s':>10} {'torch/onnx p50':>15}  compared")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        print(f"{r['feature']:<8} {r['graph']:<14} {r['engine']:<26} {r['precision']:<5} {r['batch']:>5} "
              f"{r['p50']:>9.3f} {r['p95']:>9.3f} {r['img_s']:>10.1f} {ratio:>15}  {r['ratio_vs'] or ''}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="vision,answer", help="comma-separated: vision,answer")
    ap.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    ap.add_argument("--calls", type=int, default=15, help="timed calls per row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls before each row")
    ap.add_argument("--gpu", action="store_true", help="torch (bf16 and fp32) on CUDA vs onnxruntime CUDA provider")
    add_json_argument(ap)
    args = ap.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime as ort
    import torch

    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu: torch sees no CUDA GPU")
    photos, source = load_photos(max(64, 2 * max(args.batch_sizes)))
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="rainclf-bench-onnx-") as tmp:
        for feature in args.features.split(","):
            bench_feature(feature.strip(), args, photos, Path(tmp), rows, notes)
    from rainclf.backbones.glm4v import tiny_model_dir

    size = json.loads((tiny_model_dir() / "config.json").read_text())["vision_config"]["image_size"]
    print(f"glm4v-tiny (random weights), {len(photos)} photos from {source}, image size {size}; "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__} "
          f"(default intra-op threads), {os.cpu_count()} CPUs")
    add_ratios(rows)
    print_table(rows)
    for n in notes:
        print(f"note: {n}")
    write_json(args.json, "bench_onnx.py", {"features": args.features.split(","), "batch_sizes": args.batch_sizes,
                                            "calls": args.calls, "warmup": args.warmup, "gpu": args.gpu,
                                            "photos": len(photos), "photo_source": source, "image_size": size,
                                            "onnxruntime_intra_op_threads": "default"}, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
