"""Benchmark: constrained scoring of the generative head, two passes (today's scorer: every image
run once per label, vision tower and prompt included) against one prefill + batched continuations
(rainclf.heads.constrained), on the same model and images, in one run.

    python tools/bench_constrained.py [--backbone glm4v-tiny | --full-size-random] [--batch 32]
                                      [--calls 4] [--threads 1] [--json F]

Both scorers get the same decoded photos (../shared/weather, random images without it), resized
already; calls are interleaved (old, new, old, new, …) so load from other processes spreads over
both. img/s = batch · calls / total time. Also prints max |Δ log p| between the two. LoRA adapters
are attached with random B (non-zero), so the scores go through them as in a trained model.
Prints numbers (and --json FILE), asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_json import add_json_argument, write_json  # noqa: E402
from bench_models import NeedsGpu, add_model_arguments, build_backbone  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calls", type=int, default=4, help="timed calls per scorer")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    add_json_argument(ap)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bench import bench_images

    from rainclf.backbones.base import DEFAULT_PROMPT
    from rainclf.heads.adapters import LoraParams
    from rainclf.heads.constrained import two_pass_logprobs
    from rainclf.heads.generative import build_generative
    from rainclf.labels import LABELS

    try:
        backbone = build_backbone(args)
    except NeedsGpu as e:
        print(f"bench_constrained: {e}", file=sys.stderr)
        return 2
    gen = build_generative(backbone, LoraParams(), DEFAULT_PROMPT, seed=0)
    with torch.no_grad():
        for name, p in gen.named_trainable():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    ids = gen.check_tokenisation()
    images, what = bench_images(args.batch, backbone)
    scorers = {"two passes (old)": lambda ims: two_pass_logprobs(gen, ims, list(LABELS)),
               "one prefill (new)": gen.label_logprobs}
    sync = torch.cuda.synchronize if str(backbone.device).startswith("cuda") else (lambda: None)
    outs = {}
    for name, fn in scorers.items():
        for _ in range(args.warmup):
            outs[name] = fn(images)
    times = {name: [] for name in scorers}
    for _ in range(args.calls):
        for name, fn in scorers.items():
            sync()
            t0 = time.perf_counter()
            fn(images)
            sync()
            times[name].append(time.perf_counter() - t0)
    diff = float(np.abs(outs["two passes (old)"] - outs["one prefill (new)"]).max())
    rows = []
    for name, ts in times.items():
        rows.append({"scorer": name, "batch": args.batch, "calls": args.calls,
                     "img_per_s": round(args.batch * len(ts) / sum(ts), 3),
                     "p50_call_s": round(float(np.median(ts)), 4)})
    ratio = rows[1]["img_per_s"] / rows[0]["img_per_s"]
    env = (f"{torch.cuda.get_device_name(backbone.device) if str(backbone.device).startswith('cuda') else 'CPU'}, "
           f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"backbone {backbone.name} (random weights: {backbone.random_weights}), {env}; "
          f"{len(images)} {what}; answer tokens {ids}")
    for r in rows:
        print(f"  {r['scorer']:<20} batch {r['batch']:>3}: {r['img_per_s']:8.2f} img/s  "
              f"(p50 call {r['p50_call_s']:.3f} s, {r['calls']} calls)")
    print(f"speed-up one prefill / two passes: {ratio:.2f}x (target >= 1.7x); max |delta log p| {diff:.2e}")
    settings = {"backbone": backbone.name, "random_weights": backbone.random_weights, "batch": args.batch,
                "calls": args.calls, "warmup": args.warmup, "images": what, "device": env}
    write_json(args.json, "bench_constrained.py", settings,
               {"rows": rows, "speedup": round(ratio, 3), "max_abs_logp_diff": diff})
    return 0


if __name__ == "__main__":
    sys.exit(main())
