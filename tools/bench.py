"""Benchmark: the head paths against the generative baseline, on the same images, in one run.

    python tools/bench.py [--backbone glm4v-tiny] [--images 32] [--batch-sizes 1,32] [--layer K] [--json F]
    python tools/bench.py --full-size-random [--peak-tflops 989]      # one CUDA GPU
    python tools/bench.py --full-size-random --dry-run                # FLOP estimates only, no GPU
    python tools/bench.py --full-width --depth K [--batch-sizes 1]    # real widths, CPU, projected
                                      # (--dry-run also prints the bytes each feature reads for the
                                      #  real configs in ../shared/glm4v-real/)

Paths: vision-feature head (vision tower → mean of merged tokens → linear); answer-feature head
(image + question prefill → last hidden state → linear), also stopped at half depth (--layer);
LoRA head (rainclf.heads.lora); generative greedy and constrained (rainclf.heads.generative);
ONNX vision head (image graph on onnxruntime; glm4v-tiny only: fit + rainclf export).

Two copies of the model (tools/bench_models.py builds each): the frozen paths (vision, answer,
half depth) run on one that never gets adapters; LoRA is attached to the other, which runs the
LoRA head and both generative paths. (One copy with LoRA injected in place would time the frozen
paths through the LoRA layers.) The full-size model therefore needs memory for two copies.

Greedy generation is timed with the number of new tokens a trained model emits: the shorter
label's tokens + its terminator (``max_new_tokens`` = that count, so random weights, which never
stop by themselves, decode exactly as long as a trained answer). With ``--max-new-tokens`` larger
than that, "generative greedy, max tokens" is timed too, as random weights run. The decode steps
each greedy path really took are printed.

Each path starts from decoded RGB images already resized to the backbone's size, so preprocessing
(processor, tokenizer) is timed, file decoding is not. ``--warmup`` calls per path and batch size
are excluded; at batch B a call's time is the latency every image of the call waits, and img/s =
B · calls / total time. Paths are timed interleaved, call by call, so load from other processes
spreads over all of them. Heads get random linear weights and LoRA adapters are freshly
initialised: speed does not depend on the values. ``--full-size-random`` builds a
GLM-4.1V-9B-sized model with random bf16 weights on CUDA (see tools/bench_models.py).

Targets (issue 6; derived from FLOPs for the full-size model on one GPU): batch 1 latency of the
vision head ≤ 1/10 and of the answer head ≤ 1/2 of generative greedy; batch 32 img/s of the vision
head ≥ 4×, answer head ≥ 1.2×, answer head at half depth ≥ 2× generative greedy; MFU ≥ 40% on the
batch-32 vision path. They are printed next to every ratio; on glm4v-tiny / CPU for reference only.
On a shared CPU pass ``--threads 1``: with torch's default threads, other processes' load makes
the tail latencies swing by 10× and more. Prints numbers (and ``--json FILE``), asserts nothing.
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
from bench_models import (  # noqa: E402
    GREEDY,
    GREEDY_FULL,
    NeedsGpu,
    add_model_arguments,
    build_backbone,
    flops_per_image,
    peak_flops,
)

# (path, batch, "latency" | "throughput" | "mfu", bound, is upper bound)
TARGETS = [("vision-feature head", 1, "latency", 0.10, True), ("answer-feature head", 1, "latency", 0.50, True),
           ("vision-feature head", 32, "throughput", 4.0, False), ("answer-feature head", 32, "throughput", 1.2, False),
           ("answer-feature, half depth", 32, "throughput", 2.0, False), ("vision-feature head", 32, "mfu", 0.40, False)]


# --------------------------------------------------------------------------- images

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


# --------------------------------------------------------------------------- paths

def frozen_paths(backbone, args, notes: list) -> dict:
    """name → fn(images) → p_rain, on a backbone that has no adapters."""
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


def adapted_paths(backbone, args, notes: list) -> tuple[dict, dict, int]:
    """LoRA head, generative greedy (trained length, and --max-new-tokens when longer) and
    constrained, on a backbone of their own that gets the adapters. Returns (paths, decode steps
    per greedy call by path, trained answer length)."""
    import torch

    from rainclf.backbones.base import DEFAULT_PROMPT
    from rainclf.heads.adapters import LoraParams, amp_dtype, attach_lora
    from rainclf.heads.generative import GenerativeModel
    from rainclf.heads.lora import LoraHeadModel

    torch.manual_seed(0)
    peft_model = attach_lora(backbone, LoraParams())       # r 8, alpha 32, q/k/v/o of every layer
    peft_model.eval()
    dtype = amp_dtype("auto", backbone.device)
    gen = GenerativeModel(backbone, peft_model, DEFAULT_PROMPT, dtype)
    answer_ids = gen.check_tokenisation()                  # label tokens + terminator, per label
    trained = min(len(ids) for ids in answer_ids.values())
    score = torch.nn.Linear(backbone.hidden_size, 2).to(backbone.device)
    head = LoraHeadModel(backbone, peft_model, score, -1, DEFAULT_PROMPT, dtype)
    steps: dict = {GREEDY: [], GREEDY_FULL: []}   # decode steps per call (a batch runs until its longest ends)
    generate = peft_model.generate
    current = [GREEDY]

    def counting_generate(*a, **kw):
        out = generate(*a, **kw)
        steps[current[0]].append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    peft_model.generate = counting_generate

    def greedy(tokens: int, name: str):
        def run(ims):
            current[0] = name
            return gen.generate(ims, "greedy", tokens)
        return run

    paths = {"LoRA head": lambda ims: head.p_rain(ims, len(ims)), GREEDY: greedy(trained, GREEDY),
             "generative constrained": gen.constrained_p_rain}
    if args.max_new_tokens > trained:
        paths[GREEDY_FULL] = greedy(args.max_new_tokens, GREEDY_FULL)
    labels = ", ".join(f"{label} {len(ids)}" for label, ids in answer_ids.items())
    notes.append(f"{GREEDY}: max_new_tokens = {trained}, the new tokens of the shorter trained answer "
                 f"(label + terminator: {labels}); {GREEDY_FULL}: --max-new-tokens {args.max_new_tokens}")
    notes.append("frozen paths ran on a copy of the model without adapters; LoRA and generative paths on "
                 "another copy with LoRA attached")
    return paths, steps, trained


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
    add_model_arguments(ap)
    ap.add_argument("--images", type=int, default=32, help="distinct images (batches cycle through them)")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--calls", type=int, default=None, help="timed calls per batch size [default: images at batch 1, 4 else]")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per path and batch size")
    ap.add_argument("--layer", type=int, default=None, help="early-exit layer [default: half depth]")
    ap.add_argument("--max-new-tokens", type=int, default=8,
                    help="also time greedy with this many new tokens when more than a trained answer's")
    ap.add_argument("--skip", default="", help="comma-separated: lora,generative,onnx")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads [default: torch's]")
    add_json_argument(ap)
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from rainclf.backbones.base import DEFAULT_PROMPT

    if args.full_width:   # real widths, K layers, projected (tools/bench_full_width.py)
        from bench_full_width import run_full_width

        return run_full_width(args)
    notes: list[str] = []
    try:
        backbone = build_backbone(args)
    except NeedsGpu as e:
        print(f"bench: {e}", file=sys.stderr)
        return 2
    images, what = bench_images(args.images, backbone)
    # processor only (no forward): the prompt's token count, image tokens included
    prompt_tokens = int(backbone._processor(text=[backbone.chat_text(DEFAULT_PROMPT)], images=images[:1],
                                            return_tensors="pt", images_kwargs=backbone._size_kwargs())
                        ["attention_mask"].sum())
    half = args.layer if args.layer is not None else backbone.num_layers // 2
    answer_tokens = len(backbone._processor.tokenizer("会下雨", add_special_tokens=False)["input_ids"]) + 1
    flops = flops_per_image(backbone, prompt_tokens, half, answer_tokens, args.max_new_tokens)
    n_params = sum(p.numel() for p in backbone.load()[0].parameters())
    print(f"backbone {backbone.name}: {n_params / 1e9:.3g} B parameters, image {backbone.image_size}², "
          f"{prompt_tokens} prompt tokens, {backbone.num_layers} language layers; RANDOM weights: "
          f"{backbone.random_weights}")
    print("FLOPs per image (TFLOP): " + ", ".join(f"{k} {v / 1e12:.3g}" for k, v in flops.items()))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    settings = {"backbone": backbone.name, "random_weights": backbone.random_weights, "images": len(images),
                "image_source": what, "batch_sizes": batch_sizes, "warmup_calls": args.warmup,
                "layer": half, "max_new_tokens": args.max_new_tokens, "prompt_tokens": prompt_tokens}
    if args.dry_run:
        from bench_load import print_feature_bytes   # bytes each feature reads, real GLM-4V configs

        feature_bytes: list = []
        print_feature_bytes(feature_bytes)
        write_json(args.json, "bench.py", settings, {"flops_per_image": flops, "feature_bytes": feature_bytes}, notes)
        return 0
    dev = backbone.device
    peak, peak_note = peak_flops(dev, args.peak_tflops)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    env = (f"{torch.cuda.get_device_name(dev) if dev.startswith('cuda') else 'CPU'}, torch {torch.__version__}, "
           f"{torch.get_num_threads()} threads, {os.cpu_count()} cores; {len(images)} {what}")
    print(f"device: {env}; {peak_note}")
    steps: dict = {}
    with tempfile.TemporaryDirectory(prefix="rainclf-bench-") as workdir:
        paths = frozen_paths(backbone, args, notes)
        if "onnx" not in skip and not args.full_size_random:
            onnx = onnx_path(backbone, args, notes, Path(workdir))
            if onnx is not None:
                paths["ONNX vision head"] = onnx
        elif "onnx" not in skip:
            notes.append("ONNX path skipped: exporting needs a model directory with saved weights")
        if not ({"lora", "generative"} <= skip):
            more, steps, trained = adapted_paths(build_backbone(args), args, notes)   # a second copy
            paths.update(more)
            if trained != answer_tokens:   # the tokenizer's own answer length (terminator included)
                flops = flops_per_image(backbone, prompt_tokens, half, trained, args.max_new_tokens)
        for s in skip:
            for name in [n for n in paths if n.lower().startswith(s)]:
                paths.pop(name)
        rows = []
        calls_by_batch = {}
        for batch in batch_sizes:
            calls = args.calls or (len(images) if batch == 1 else 4)
            calls_by_batch[batch] = calls
            print(f"bench: batch {batch}, {calls} timed calls per path, interleaved", file=sys.stderr)
            rows += time_paths(paths, images, batch, calls, args.warmup, dev)
    for name, counts in steps.items():
        if counts:
            notes.append(f"{name}: {np.mean(counts):.1f} new tokens per generate call on average "
                         f"(min {min(counts)}, max {max(counts)}, warm-up calls included)")
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
    settings.update(calls=calls_by_batch, device=env, peak=peak_note)
    write_json(args.json, "bench.py", settings, rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
