"""Benchmark: the head paths against the generative baseline, on the same images, in one run.

    python tools/bench.py [--backbone glm4v-tiny] [--images 32] [--batch-sizes 1,32] [--layer K]
    python tools/bench.py --full-size-random [--peak-tflops 989]      # one CUDA GPU
    python tools/bench.py --full-size-random --dry-run                # FLOP estimates only, no GPU

Paths (skipped with a note when their module is missing): vision-feature head (vision tower →
mean of merged tokens → linear); answer-feature head (image + question prefill → last hidden state
→ linear), also stopped at half depth (--layer); LoRA head (rainclf.heads.lora); generative greedy
(≤ --max-new-tokens 8) and constrained (rainclf.heads.generative); ONNX vision head (image graph on
onnxruntime; glm4v-tiny only: fit + rainclf export).

Each path starts from decoded RGB images already resized to the backbone's size, so preprocessing
(processor, tokenizer) is timed, file decoding is not. ``--warmup`` calls are excluded; at batch B
a call's time is the latency every image of the call waits, and img/s = B · calls / total time.
Paths are timed interleaved, call by call, so load from other processes spreads over all of them.
Heads get random linear weights and LoRA adapters are freshly initialised: speed does not depend
on the values. ``--full-size-random`` builds a GLM-4.1V-9B-sized model from ``Glm4vConfig()``
defaults with random weights in bf16 on CUDA (tokenizer and processor of glm4v-tiny, whose special
token ids are copied into the config), so real-sized paths are timed without downloading weights.

Targets (issue 6; derived from FLOPs for the full-size model on one GPU): batch 1 latency of the
vision head ≤ 1/10 and of the answer head ≤ 1/2 of generative greedy; batch 32 img/s of the vision
head ≥ 4×, answer head ≥ 1.2×, answer head at half depth ≥ 2× generative greedy; MFU ≥ 40% on the
batch-32 vision path. They are printed next to every ratio; on glm4v-tiny / CPU for reference only.
On a shared CPU pass ``--threads 1``: with torch's default threads, other processes' load makes
the tail latencies swing by 10× and more. Prints numbers, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GREEDY = "generative greedy"
# (path, batch, "latency" | "throughput" | "mfu", bound, is upper bound)
TARGETS = [("vision-feature head", 1, "latency", 0.10, True), ("answer-feature head", 1, "latency", 0.50, True),
           ("vision-feature head", 32, "throughput", 4.0, False), ("answer-feature head", 32, "throughput", 1.2, False),
           ("answer-feature, half depth", 32, "throughput", 2.0, False), ("vision-feature head", 32, "mfu", 0.40, False)]
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12,
             "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
ID_KEYS = ("image_token_id", "image_start_token_id", "image_end_token_id", "video_token_id",
           "video_start_token_id", "video_end_token_id")


# --------------------------------------------------------------------------- backbones

def full_size_backbone(device: str, meta: bool = False):
    """A Glm4vBackbone whose model is GLM-4.1V-9B-sized with random bf16 weights (``meta``: no
    memory at all, for FLOP counting)."""
    import torch
    from transformers import AutoProcessor, Glm4vConfig, Glm4vForConditionalGeneration

    from rainclf.backbones.base import BackboneOptions
    from rainclf.backbones.glm4v import RANDOM_MARKER, Glm4vBackbone, tiny_model_dir

    tiny = tiny_model_dir()
    tmp = Path(tempfile.mkdtemp(prefix="rainclf-fullsize-"))
    for f in tiny.iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "config.json":
            shutil.copy(f, tmp / f.name)
    (tmp / RANDOM_MARKER).write_text("random weights (tools/bench.py --full-size-random)\n")
    config = Glm4vConfig()      # GLM-4.1V-9B: vision 24 × 1536, language 40 × 4096, vocab 151552
    tiny_cfg = json.loads((tiny / "config.json").read_text(encoding="utf-8"))
    for k in ID_KEYS:           # token ids must match the tokenizer that builds the prompts
        setattr(config, k, tiny_cfg[k])
    config.text_config.eos_token_id = config.text_config.pad_token_id = tiny_cfg["eos_token_id"]
    # Glm4vConfig() leaves out what GLM-4.1V-9B's config.json sets: half-rotary M-RoPE (8, 12, 12)
    rope = dict(config.text_config.rope_parameters or {})
    rope.setdefault("partial_rotary_factor", 0.5)
    rope.setdefault("mrope_section", [8, 12, 12])
    config.text_config.rope_parameters = rope
    config.save_pretrained(tmp)
    backbone = Glm4vBackbone("glm4.1v-9b-random", tmp, None, BackboneOptions(device="cpu" if meta else device,
                                                                              image_size=336))
    with torch.device("meta" if meta else device):
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Glm4vForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default)
    model.eval().requires_grad_(False)
    backbone._model, backbone._processor = model, AutoProcessor.from_pretrained(tmp)
    backbone.device = "meta" if meta else device
    return backbone


def bench_images(n: int, backbone):
    """N decoded photos from ../shared/weather (random images without it), resized already."""
    from PIL import Image

    photos = sorted((REPO.parent / "shared" / "weather" / "images").glob("*.jpg"))[:n]
    if len(photos) == n:
        ims, what = [Image.open(p).convert("RGB") for p in photos], "photos from ../shared/weather"
    else:
        rng = np.random.default_rng(0)
        ims, what = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(n)], "random images"
    return backbone.prepare_images(ims), what


# --------------------------------------------------------------------------- FLOPs

def _linear_params(module) -> int:
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))


def flops_per_image(backbone, prompt_tokens: int, layer: int, new_tokens: int, answer_tokens: int) -> dict:
    """Forward FLOPs per image (2 per multiply-add; attention scores counted without the causal
    half, a slight over-estimate) for each path."""
    model = backbone.load()[0]
    vis, lm = model.model.visual, model.model.language_model
    vc, tc = model.config.vision_config, model.config.text_config
    s = backbone.image_size
    p = (s // vc.patch_size) ** 2                     # patch tokens of one image (2 frames → 1)
    merged = p // vc.spatial_merge_size ** 2
    blocks = _linear_params(vis.blocks) + _linear_params(vis.patch_embed)
    merge = _linear_params(vis.merger) + _linear_params(vis.downsample)
    vision = 2 * p * blocks + 2 * merged * merge + len(vis.blocks) * 4 * p * p * vc.hidden_size
    per_layer = _linear_params(lm.layers[0])
    n = len(lm.layers)
    k = layer % (n + 1)

    def prefill(tokens: int, layers: int) -> float:
        return 2 * tokens * per_layer * layers + layers * 4 * tokens * tokens * tc.hidden_size

    vocab = model.lm_head.weight.numel()
    decode = 2 * (per_layer * n + vocab)              # one new token (attention over the cache ignored)
    return {"vision-feature head": vision,
            "answer-feature head": vision + prefill(prompt_tokens, n),
            "answer-feature, half depth": vision + prefill(prompt_tokens, k),
            "LoRA head": vision + prefill(prompt_tokens, n),
            GREEDY: vision + prefill(prompt_tokens, n) + 2 * vocab + new_tokens * decode,
            "generative constrained": 2 * (vision + prefill(prompt_tokens + answer_tokens, n)
                                           + 2 * answer_tokens * vocab),
            "ONNX vision head": vision}


def peak_flops(device: str, override: float | None) -> tuple[float | None, str]:
    if override:
        return override * 1e12, f"--peak-tflops {override}"
    if not device.startswith("cuda"):
        return None, "no peak known for a CPU (pass --peak-tflops)"
    import torch

    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16.items():
        if all(part in name for part in key.split()):
            return value, f"{name}: dense bf16 peak {value / 1e12:.0f} TFLOP/s"
    return None, f"{name}: peak unknown (pass --peak-tflops)"


# --------------------------------------------------------------------------- paths

def build_paths(backbone, args, notes: list) -> dict:
    """name → fn(images) → p_rain or answers. LoRA is attached after the frozen paths are built
    (it wraps the model in place), so frozen paths are timed before it (``order`` below)."""
    import torch

    from rainclf.backbones.base import DEFAULT_PROMPT

    dev = backbone.device
    dtype = backbone.load()[0].dtype
    lin_v = torch.nn.Linear(backbone.vision_dim, 2).to(dev, dtype)
    lin_a = torch.nn.Linear(backbone.hidden_size, 2).to(dev, dtype)
    half = args.layer if args.layer is not None else backbone.num_layers // 2

    def vision(ims):
        return torch.softmax(lin_v(backbone.vision_features(backbone.vision_inputs(ims)).to(dtype)).float(), -1)[:, 1]

    def answer(ims, layer=-1):
        h = backbone.answer_hidden(backbone.chat_inputs(ims, DEFAULT_PROMPT), layer)
        return torch.softmax(lin_a(h.to(dtype)).float(), -1)[:, 1]

    paths = {"vision-feature head": vision, "answer-feature head": answer,
             "answer-feature, half depth": lambda ims: answer(ims, half)}
    notes.append(f"half depth = --layer {half} of {backbone.num_layers} (the forward stops there)")
    return paths


def lora_paths(backbone, args, notes: list) -> dict:
    import torch

    from rainclf.backbones.base import DEFAULT_PROMPT

    try:
        from rainclf.heads.adapters import LoraParams, amp_dtype, attach_lora
        from rainclf.heads.generative import GenerativeModel
        from rainclf.heads.lora import LoraHeadModel
    except ImportError as e:
        notes.append(f"LoRA and generative paths skipped: {e}")
        return {}, []
    torch.manual_seed(0)
    peft_model = attach_lora(backbone, LoraParams())       # r 8, alpha 32, q/k/v/o of every layer
    peft_model.eval()
    dtype = amp_dtype("auto", backbone.device)
    gen = GenerativeModel(backbone, peft_model, DEFAULT_PROMPT, dtype)
    gen.check_tokenisation()
    score = torch.nn.Linear(backbone.hidden_size, 2).to(backbone.device)
    head = LoraHeadModel(backbone, peft_model, score, -1, DEFAULT_PROMPT, dtype)
    counts = []   # decode steps per generate call (the batch runs until its longest answer ends)
    generate = peft_model.generate

    def counting_generate(*a, **kw):
        out = generate(*a, **kw)
        counts.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    peft_model.generate = counting_generate

    def greedy(ims):
        return gen.generate(ims, "greedy", args.max_new_tokens)

    paths = {"LoRA head": lambda ims: head.p_rain(ims, len(ims)), GREEDY: greedy,
             "generative constrained": gen.constrained_p_rain}
    return paths, counts                # counts fill while timing; reported as a note


def onnx_path(backbone, args, notes: list, workdir: Path):
    """Fit a vision linear head on a few labelled photos, export image → label, time onnxruntime."""
    try:
        from rainclf.fit import FitOptions, fit
        from rainclf.onnx.export import export_onnx
        from rainclf.onnx.runtime import OnnxClassifier
    except ImportError as e:
        notes.append(f"ONNX path skipped: {e}")
        return None
    data = workdir / "data"
    for i, label in enumerate(["会下雨", "不会下雨"] * 4):
        d = data / label
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        from PIL import Image

        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{i}.png")
    fit(data, workdir / "vision", FitOptions(backbone=args.backbone, feature="vision", val_split=0.0,
                                             cache_dir=None, progress=False, device="cpu", C=1.0))
    info = export_onnx(workdir / "vision", workdir / "onnx", include_backbone=True)
    if "image" not in info["graphs"]:
        notes.append(f"ONNX path skipped: image graph not exported ({info['not_exported'].get('image')})")
        return None
    clf = OnnxClassifier.from_dir(workdir / "onnx")
    notes.append(f"ONNX: {clf.describe('image')}")
    return clf.p_rain_from_images


# --------------------------------------------------------------------------- timing

def time_paths(paths: dict, images, batch: int, calls: int, warmup: int, device: str) -> list[dict]:
    """Time every path at one batch size, interleaved call by call (path A, B, C, A, B, C, …), so
    a load change on a shared machine hits all paths alike instead of whichever ran then."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    batches = [[images[(i * batch + j) % len(images)] for j in range(batch)] for i in range(calls + warmup)]
    seconds: dict = {name: [] for name in paths}
    with torch.inference_mode():
        for i, b in enumerate(batches):
            for name, fn in paths.items():
                sync()
                t = time.perf_counter()
                fn(b)
                sync()
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - t)
    rows = []
    for name, secs in seconds.items():
        s = np.array(secs)
        rows.append({"path": name, "batch": batch, "calls": calls, "images_per_s": batch * calls / s.sum(),
                     "latency_ms_p50": float(np.percentile(s, 50) * 1e3),
                     "latency_ms_p95": float(np.percentile(s, 95) * 1e3)})
    return rows


def add_ratios(rows: list[dict], flops: dict, peak: float | None) -> None:
    greedy = {r["batch"]: r for r in rows if r["path"] == GREEDY}
    for r in rows:
        g = greedy.get(r["batch"])
        r["latency_ratio"] = r["latency_ms_p50"] / g["latency_ms_p50"] if g else None
        r["throughput_ratio"] = r["images_per_s"] / g["images_per_s"] if g else None
        f = flops.get(r["path"])
        r["tflop_per_image"] = f / 1e12 if f else None
        r["mfu"] = f * r["images_per_s"] / peak if f and peak else None
        r["targets"] = []
        for path, batch, kind, bound, upper in TARGETS:
            if path == r["path"] and batch == r["batch"]:
                value = {"latency": r["latency_ratio"], "throughput": r["throughput_ratio"], "mfu": r["mfu"]}[kind]
                met = None if value is None else bool(value <= bound if upper else value >= bound)
                r["targets"].append({"kind": kind, "bound": bound, "upper": upper, "value": value, "met": met})


def table(rows: list[dict]) -> str:
    head = ("| path | batch | img/s | p50 ms | p95 ms | latency / greedy | img/s / greedy | TFLOP/img | MFU "
            "| target |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    out = [head]
    f = lambda v, spec: "—" if v is None else format(v, spec)   # noqa: E731
    for r in rows:
        tg = "; ".join(f"{t['kind']} {'≤' if t['upper'] else '≥'} {t['bound']:g}: "
                       + ("n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")) for t in r["targets"])
        out.append(f"| {r['path']} | {r['batch']} | {r['images_per_s']:.2f} | {r['latency_ms_p50']:.2f} | "
                   f"{r['latency_ms_p95']:.2f} | {f(r['latency_ratio'], '.3f')} | {f(r['throughput_ratio'], '.2f')}× | "
                   f"{f(r['tflop_per_image'], '.3g')} | {f(None if r['mfu'] is None else 100 * r['mfu'], '.1f')}"
                   f"{'%' if r['mfu'] is not None else ''} | {tg} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="glm4v-tiny")
    ap.add_argument("--full-size-random", action="store_true", help="GLM-4.1V-9B-sized random bf16 model on CUDA")
    ap.add_argument("--dry-run", action="store_true", help="with --full-size-random: FLOP estimates only (no GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--images", type=int, default=32, help="distinct images (batches cycle through them)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per batch size [default: images at batch 1, 4 else]")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layer", type=int, default=None, help="early-exit layer [default: half depth]")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    ap.add_argument("--skip", default="", help="comma-separated: lora,generative,onnx")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions, resolve_device

    notes: list[str] = []
    if args.full_size_random:
        if args.dry_run:
            backbone = full_size_backbone("cpu", meta=True)
        elif not torch.cuda.is_available():
            print("bench: --full-size-random needs a CUDA GPU (a GLM-4.1V-9B-sized model is ~20 GB in bf16) "
                  "and torch sees none. Use --dry-run for the FLOP estimates, or --backbone glm4v-tiny on the CPU.",
                  file=sys.stderr)
            return 2
        else:
            backbone = full_size_backbone(resolve_device("cuda" if args.device == "auto" else args.device))
    else:
        backbone = create_backbone(args.backbone, BackboneOptions(device=args.device))
        backbone.load()
    images, what = bench_images(args.images, backbone)
    # processor only (no forward): the prompt's token count, image tokens included
    prompt_tokens = int(backbone._processor(text=[backbone.chat_text(DEFAULT_PROMPT)], images=images[:1],
                                            return_tensors="pt", images_kwargs=backbone._size_kwargs())
                        ["attention_mask"].sum())
    half = args.layer if args.layer is not None else backbone.num_layers // 2
    flops = flops_per_image(backbone, prompt_tokens, half, args.max_new_tokens, answer_tokens=4)
    n_params = sum(p.numel() for p in backbone.load()[0].parameters())
    print(f"backbone {backbone.name}: {n_params / 1e9:.3g} B parameters, image {backbone.image_size}², "
          f"{prompt_tokens} prompt tokens, {backbone.num_layers} language layers; RANDOM weights: "
          f"{backbone.random_weights}")
    print("FLOPs per image (TFLOP): " + ", ".join(f"{k} {v / 1e12:.3g}" for k, v in flops.items()))
    if args.dry_run:
        return 0
    dev = backbone.device
    peak, peak_note = peak_flops(dev, args.peak_tflops)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    env = (f"{torch.cuda.get_device_name(dev) if dev.startswith('cuda') else 'CPU'}, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads, {os.cpu_count()} cores; {len(images)} {what}")
    print(f"device: {env}; {peak_note}")
    with tempfile.TemporaryDirectory(prefix="rainclf-bench-") as workdir:
        paths = build_paths(backbone, args, notes)
        onnx = None
        if "onnx" not in skip and not args.full_size_random:
            onnx = onnx_path(backbone, args, notes, Path(workdir))
        elif "onnx" not in skip:
            notes.append("ONNX path skipped: exporting needs a model directory with saved weights")
        counts: list = []
        if not ({"lora", "generative"} <= skip):
            more, counts = lora_paths(backbone, args, notes)    # wraps the model: after the frozen paths
            paths.update(more)
        if onnx is not None:
            paths["ONNX vision head"] = onnx
        for s in skip:
            for name in [n for n in paths if n.lower().startswith(s)]:
                paths.pop(name)
        rows = []
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            calls = args.calls or (len(images) if batch == 1 else 4)
            print(f"bench: batch {batch}, {calls} timed calls per path, interleaved", file=sys.stderr)
            rows += time_paths(paths, images, batch, calls, args.warmup, dev)
    if counts:
        notes.append(f"generative: {np.mean(counts):.1f} decode steps per generate call on average "
                     f"(max {args.max_new_tokens}; random weights rarely emit EOS early)")
    add_ratios(rows, flops, peak)
    print()
    print(table(rows))
    print()
    for n in notes:
        print(f"note: {n}")
    if backbone.random_weights:
        print("note: RANDOM weights — speed is meaningful, answers are not")
    if not args.full_size_random:
        print("note: the targets are set for the full-size model on one GPU; on this backbone/device they are "
              "shown for reference only")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "notes": notes, "rows": rows}, indent=2,
                                        ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
