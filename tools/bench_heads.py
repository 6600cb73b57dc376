"""Benchmark: training speed of each head.

    python tools/bench_heads.py [--steps 20] [--batch-size 4] [--threads 1] [--json FILE]
    python tools/bench_heads.py --full-size-random --device cuda [--batch-sizes 1,4] [--steps 5]

Default (CPU, glm4v-tiny, RANDOM weights, 112 px): linear head fit time (answer-feature embedding
+ logistic regression), LoRA head and generative baseline optimizer steps/s through the real
``train_loop``, and prediction img/s (LoRA head, greedy, constrained). Pipeline figures, not
real-model ones.

``--full-size-random``: one training step of a GLM-4.1V-9B-sized model (``Glm4vConfig()`` sizes:
text 4096 × 40 layers, vision depth 24; rope as in the GLM-4.1V-9B-Thinking checkpoint, since the
bare defaults do not run) with RANDOM weights in bf16, for the LoRA head and the generative
baseline at each batch size (336 px images, 144 image tokens each): seconds per step and peak
memory. Nothing is downloaded: the tiny tokenizer/processor stand in (their special-token ids are
written into the big config), so sequence lengths are close to the real ones. ``--smoke`` shrinks
the text model (hidden 512, 2 layers) and the vision depth (2) to check this path on a small
machine. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import add_json_argument, write_json  # noqa: E402

PROMPT = "根据图片判断：会下雨还是不会下雨？"


def synthetic(n: int, size: int, seed: int = 0):
    """n red-ish / blue-ish images (label i % 2: 1 = 会下雨) of size × size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        base = (200, 60, 50) if i % 2 else (50, 70, 200)
        arr = np.clip(np.array(base) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr))
        labels.append(i % 2)
    return images, labels


def timed_steps(params, named, n_train, loss_fn, modules, device, dtype, steps: int) -> float:
    """steps/s of the real training loop (no validation), after a 2-step warm-up."""
    from dataclasses import replace

    from rainclf.heads.train import train_loop

    train_loop(replace(params, steps=2), named, n_train, loss_fn, None, modules, device, dtype, progress=False)
    out = train_loop(replace(params, steps=steps), named, n_train, loss_fn, None, modules, device, dtype,
                     progress=False)
    return out.steps_per_s


# --------------------------------------------------------------------------- CPU, glm4v-tiny

def bench_tiny(args) -> dict:
    import torch
    import torch.nn.functional as F

    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import BackboneOptions
    from rainclf.heads.adapters import LoraParams, private_backbone
    from rainclf.heads.generative import build_generative
    from rainclf.heads.linear import LinearHead
    from rainclf.heads.lora import build_lora_head
    from rainclf.labels import LABELS

    images, labels = synthetic(args.images, 112)
    bs = args.batch_size
    print(f"glm4v-tiny (RANDOM weights), CPU, torch threads {torch.get_num_threads()}, {args.images} images "
          f"112 px, batch {bs}, {args.steps} timed steps")

    backbone = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    backbone.load()
    backbone.embed(images[:bs], "answer")          # warm-up
    t = time.perf_counter()
    X = np.concatenate([backbone.embed(images[i:i + bs], "answer") for i in range(0, len(images), bs)])
    t_embed = time.perf_counter() - t
    t = time.perf_counter()
    LinearHead().fit(X, np.array(labels))
    t_fit = time.perf_counter() - t
    print(f"  linear head     fit {t_fit:.3f} s on {len(images)} embeddings (+ {t_embed:.2f} s embedding, "
          f"{len(images) / t_embed:.0f} img/s); LogisticRegressionCV, no optimizer steps")
    results = {"linear": {"fit_s": t_fit, "embed_s": t_embed, "embed_images_per_s": len(images) / t_embed}}

    params = LoraParams(lr=1e-3, train_batch_size=bs)
    head = build_lora_head(private_backbone("glm4v-tiny", BackboneOptions(device="cpu")), params, -1, PROMPT)
    y = torch.tensor(labels)
    sps = timed_steps(params, head.named_trainable(), len(images),
                      lambda idx: F.cross_entropy(head.logits([images[i] for i in idx]), y[idx]),
                      head.modules, "cpu", None, args.steps)
    t = time.perf_counter()
    head.p_rain(images, bs)
    predict_ips = len(images) / (time.perf_counter() - t)
    print(f"  LoRA head       {sps:6.2f} steps/s ({sps * bs:.0f} img/s training); predict {predict_ips:.0f} img/s")
    results["lora"] = {"steps_per_s": sps, "predict_images_per_s": predict_ips}

    gen = build_generative(private_backbone("glm4v-tiny", BackboneOptions(device="cpu")), params, PROMPT)
    answers = [LABELS[v] for v in labels]
    sps = timed_steps(params, gen.named_trainable(), len(images),
                      lambda idx: gen.loss([images[i] for i in idx], [answers[i] for i in idx]),
                      [gen.peft_model], "cpu", None, args.steps)
    t = time.perf_counter()
    for i in range(0, len(images), bs):
        gen.generate(images[i:i + bs], "greedy", max_new_tokens=16)
    greedy = len(images) / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(0, len(images), bs):
        gen.constrained_p_rain(images[i:i + bs])
    constrained = len(images) / (time.perf_counter() - t)
    print(f"  generative      {sps:6.2f} steps/s ({sps * bs:.0f} img/s training); predict greedy "
          f"(16 new tokens max) {greedy:.0f} img/s, constrained {constrained:.0f} img/s")
    results["generative"] = {"steps_per_s": sps, "greedy_16_tokens_images_per_s": greedy,
                             "constrained_images_per_s": constrained}
    return results


# --------------------------------------------------------------------------- full size, random

def full_size_config(smoke: bool):
    import json

    from transformers import Glm4vConfig

    tiny = json.loads((REPO / "models" / "glm4v-tiny" / "config.json").read_text())
    ids = {k: tiny[k] for k in ("image_token_id", "image_start_token_id", "image_end_token_id",
                                "video_token_id", "video_start_token_id", "video_end_token_id")}
    text = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": [8, 12, 12]}, "eos_token_id": 0, "pad_token_id": 0}
    vision = {}
    if smoke:   # head_dim stays 128, so the rope geometry is the real one
        text.update(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4)
        vision.update(depth=2, out_hidden_size=512)
    config = Glm4vConfig(text_config=text, vision_config=vision, **ids)
    config.vision_config.image_size = 336
    return config


def bench_full_size(args) -> dict:
    import shutil

    import torch
    import torch.nn.functional as F
    from transformers import AutoProcessor, Glm4vForConditionalGeneration

    from rainclf.backbones.base import BackboneOptions, resolve_device
    from rainclf.backbones.glm4v import Glm4vBackbone
    from rainclf.heads.adapters import LoraParams, amp_dtype, attach_lora
    from rainclf.heads.generative import GenerativeModel
    from rainclf.heads.lora import build_lora_head
    from rainclf.labels import LABELS

    device = resolve_device(args.device)
    cuda = device.startswith("cuda")
    config = full_size_config(args.smoke)
    dtype = torch.bfloat16 if cuda else torch.float32
    t = time.perf_counter()
    with torch.device(device):
        model = Glm4vForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{'smoke-size' if args.smoke else 'GLM-4.1V-9B-size'} Glm4v, RANDOM weights, {n_params / 1e9:.2f} B params, "
          f"{dtype}, {device}, built in {time.perf_counter() - t:.1f} s")
    processor = AutoProcessor.from_pretrained(REPO / "models" / "glm4v-tiny")

    class RandomBackbone(Glm4vBackbone):
        """The rainclf backbone class around the in-memory random model (nothing to load)."""

        def load(self):
            return model, processor

    tmp = Path(tempfile.mkdtemp(prefix="rainclf-bench-"))
    config.save_pretrained(tmp)
    backbone = RandomBackbone("full-size-random", tmp, None, BackboneOptions(device=device, image_size=336))
    backbone.device = device
    shutil.rmtree(tmp, ignore_errors=True)
    params = LoraParams(lr=1e-4)
    amp = amp_dtype(params.precision, device)
    results: dict = {"model": "smoke-size" if args.smoke else "GLM-4.1V-9B-size", "params": n_params,
                     "dtype": str(dtype), "device": device, "steps": []}
    for what in ("lora", "generative"):
        if what == "lora":
            head = build_lora_head(backbone, params, -1, PROMPT)
            named, modules, peft_model = head.named_trainable(), head.modules, head.peft_model
        else:
            peft_model = attach_lora(backbone, params)
            gen = GenerativeModel(backbone, peft_model, PROMPT, amp)
            named, modules = gen.named_trainable(), [peft_model]
        for bs in args.batch_sizes:
            images, labels = synthetic(max(bs, 4), 336)
            y = torch.tensor(labels, device=device)
            answers = [LABELS[v] for v in labels]
            if what == "lora":
                loss_fn = lambda idx: F.cross_entropy(head.logits([images[i] for i in idx]), y[idx])  # noqa: E731
            else:
                loss_fn = lambda idx: gen.loss([images[i] for i in idx], [answers[i] for i in idx])  # noqa: E731
            from dataclasses import replace

            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            sps = timed_steps(replace(params, train_batch_size=bs), named, len(images), loss_fn, modules,
                              device, amp, args.steps)
            if cuda:
                peak_gib = torch.cuda.max_memory_allocated() / 2**30
                peak = f"peak GPU memory {peak_gib:.1f} GiB"
            else:
                peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                peak = f"peak RSS {peak_gib:.1f} GiB"
            print(f"  {what:10s} batch {bs}: {1 / sps:7.3f} s/step ({sps:.2f} steps/s), {peak}")
            results["steps"].append({"head": what, "batch": bs, "steps_per_s": sps, "peak_gib": peak_gib,
                                     "peak_kind": "cuda max_memory_allocated" if cuda else "process ru_maxrss"})
        peft_model.unload()   # take the adapters out again: the next head starts from the bare model
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per head")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (the tiny model runs "
                    "fastest on 1, especially on a busy machine)")
    ap.add_argument("--full-size-random", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="with --full-size-random: a shrunken text model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-sizes", default="1,4")
    add_json_argument(ap)
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"cores: {os.cpu_count()}, torch {torch.__version__}")
    results = bench_full_size(args) if args.full_size_random else bench_tiny(args)
    write_json(args.json, "bench_heads.py", {"steps": args.steps, "images": args.images,
                                             "batch_sizes": args.batch_sizes if args.full_size_random
                                             else [args.batch_size], "full_size_random": args.full_size_random,
                                             "smoke": args.smoke, "repeats": args.steps}, results)


if __name__ == "__main__":
    main()
