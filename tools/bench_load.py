"""Benchmark: memory of loading a GLM-4V checkpoint for each feature (rainclf.backbones.glm4v_load),
against loading the whole model (what every feature did before), one fresh process per case.

    python tools/bench_load.py --build /tmp/rainclf-load-ckpt [--json F]   # build (once), then measure
    python tools/bench_load.py --model DIR [--layer 4] [--json F]          # an existing checkpoint
    python tools/bench_load.py --dry-run                                   # bytes per feature, real configs

The built checkpoint: glm4v-tiny's tokenizer, processor and vision tower widths, with a language
model of 16 layers × 2048 wide (≈1.9 GB in bf16 as real GLM-4V checkpoints ship, 3.8 GB once
loaded in fp32 on the CPU; two shards + model.safetensors.index.json), random weights. Each case runs `backbone.embed` of two real photos (../shared/weather) in a new
Python process and reports VmHWM (peak RSS) and VmRSS before the embed (imports done, nothing
loaded); "load overhead" = (peak − before) / bytes of the tensors the model holds afterwards.
Targets (issue 15): vision peak ≤ 0.45 × answer's; answer --layer 4 of 16 ≤ 0.5 × --layer -1;
load overhead ≤ 1.2. ``--dry-run`` prints, from the configs in ../shared/glm4v-real/ alone (a
model built on the meta device, no weights), the bytes each feature reads. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_json import add_json_argument, write_json  # noqa: E402

REAL_CONFIGS = REPO.parent / "shared" / "glm4v-real"
TEXT = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
            num_key_value_heads=2)


# --------------------------------------------------------------------------- --dry-run

def feature_bytes(config_dir: Path) -> list[dict]:
    """Bytes each feature reads, at the checkpoint's dtype, from a config alone."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from rainclf.backbones.glm4v_load import in_parts, parts_for

    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    dtype = getattr(config, "dtype", None) or torch.bfloat16
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    sizes = [(n, p.numel() * p.element_size()) for n, p in model.named_parameters()]
    n = config.text_config.num_hidden_layers
    total = sum(b for _, b in sizes)
    cases = [("vision", "vision", None), (f"answer --layer {n // 2}", "answer", n // 2),
             ("answer --layer -1", "answer", -1), ("LoRA / generative (whole model)", None, None)]
    rows = []
    for label, feature, layer in cases:
        parts = None if feature is None else parts_for(feature, layer, n)
        b = sum(size for name, size in sizes if in_parts(name, parts))
        rows.append({"model": config_dir.name, "model_type": config.model_type, "feature": label,
                     "bytes": b, "GB": round(b / 1e9, 3), "share_of_whole": round(b / total, 4)})
    return rows


def print_feature_bytes(json_rows: list | None = None) -> None:
    """What tools/bench.py --dry-run prints: bytes per feature for every config in ../shared/glm4v-real/."""
    for d in sorted(p for p in REAL_CONFIGS.iterdir() if (p / "config.json").is_file()):
        rows = feature_bytes(d)
        print(f"bytes read per feature, {d.name} ({rows[0]['model_type']}, from its config.json, no weights):")
        for r in rows:
            print(f"  {r['feature']:<34} {r['GB']:9.3f} GB  ({100 * r['share_of_whole']:5.1f}% of the checkpoint)")
        if json_rows is not None:
            json_rows += rows


# --------------------------------------------------------------------------- the checkpoint

def build_checkpoint(out: Path) -> Path:
    """glm4v-tiny with a ≥ 1 GB language model (TEXT), random bf16 weights, two shards + index."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    from rainclf.backbones.glm4v import RANDOM_MARKER, tiny_model_dir
    from rainclf.backbones.glm4v_load import INDEX_FILE

    if (out / INDEX_FILE).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tiny = tiny_model_dir()
    for f in tiny.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out / f.name)
    config = AutoConfig.from_pretrained(tiny)
    for k, v in TEXT.items():
        setattr(config.text_config, k, v)
    config.vision_config.out_hidden_size = TEXT["hidden_size"]
    config.text_config.rope_parameters = dict(config.text_config.rope_parameters, mrope_section=[8, 12, 12])
    config.dtype = "bfloat16"
    config.save_pretrained(out)
    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in AutoModelForImageTextToText.from_config(config).named_parameters()]
    g = torch.Generator().manual_seed(0)
    half = len(shapes) // 2
    weight_map = {}
    for i, group in enumerate((shapes[:half], shapes[half:]), start=1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in group}, str(out / shard),
                  metadata={"format": "pt"})
        weight_map.update({n: shard for n, _ in group})
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / RANDOM_MARKER).write_text("random weights (tools/bench_load.py)\n")
    return out


# --------------------------------------------------------------------------- one case per process

CHILD = r"""
import json, sys
from PIL import Image
from rainclf.backbones import create_backbone
from rainclf.backbones.base import BackboneOptions
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
model_dir, feature, layer, whole, photos = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5:]
ims = [Image.open(p).convert("RGB") for p in photos]
b = create_backbone(model_dir, BackboneOptions(device="cpu"))
import torch, transformers.models.glm4v.modeling_glm4v  # noqa: imported before the baseline
before = status("VmRSS")
if whole:
    b.load()                 # the whole checkpoint, as every feature loaded before issue 15
b.embed(ims, feature, layer)
held = sum(t.numel() * t.element_size() for t in list(b._model.parameters()) + list(b._model.buffers()))
print(json.dumps({"before": before, "peak": status("VmHWM"), "held": held}))
"""


def measure(model_dir: Path, feature: str, layer: int, whole: bool, photos: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), feature, str(layer), "1" if whole else "0",
                          *photos], capture_output=True, text=True, env=env, check=False)
    if out.returncode:
        raise SystemExit(f"bench_load: case {feature} {layer} failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {**r, "overhead": round((r["peak"] - r["before"]) / r["held"], 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, default=None, help="build the test checkpoint here (outside the repo)")
    ap.add_argument("--model", type=Path, default=None, help="measure this checkpoint directory")
    ap.add_argument("--layer", type=int, default=4, help="the early-exit layer measured")
    ap.add_argument("--dry-run", action="store_true", help="bytes per feature for ../shared/glm4v-real/ configs")
    add_json_argument(ap)
    args = ap.parse_args(argv)
    if args.dry_run:
        rows: list = []
        print_feature_bytes(rows)
        write_json(args.json, "bench_load.py", {"dry_run": True}, rows)
        return 0
    model_dir = args.model or (build_checkpoint(args.build) if args.build else None)
    if model_dir is None:
        ap.error("pass --build DIR (outside the repo) or --model DIR")
    photos = [str(p) for p in sorted((REPO.parent / "shared" / "weather" / "images").glob("*.jpg"))[:2]]
    cases = [("vision", "vision", -1), (f"answer --layer {args.layer}", "answer", args.layer),
             ("answer --layer -1", "answer", -1)]
    rows = []
    for label, feature, layer in cases:
        for whole in (False, True):
            r = measure(model_dir, feature, layer, whole, photos)
            rows.append({"case": label, "load": "whole model (before)" if whole else "partial (issue 15)", **r})
            print(f"  {label:<20} {rows[-1]['load']:<22} peak RSS {r['peak'] / 2**30:6.3f} GiB  "
                  f"(before embed {r['before'] / 2**30:5.3f}, tensors held {r['held'] / 2**30:6.3f} GiB, "
                  f"load overhead {r['overhead']:.2f}x)", flush=True)
    peak = {(r["case"], r["load"]): r["peak"] for r in rows}
    part = "partial (issue 15)"
    v = peak[("vision", part)] / peak[("answer --layer -1", part)]
    k = peak[(f"answer --layer {args.layer}", part)] / peak[("answer --layer -1", part)]
    print(f"vision / answer peak RSS: {v:.3f} (target <= 0.45); answer --layer {args.layer} / --layer -1: "
          f"{k:.3f} (target <= 0.5)")
    write_json(args.json, "bench_load.py", {"model": str(model_dir), "layer": args.layer, "photos": photos},
               {"rows": rows, "vision_over_answer": round(v, 4), "layer_over_last": round(k, 4)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
