"""``tools/bench.py --full-width --depth K``: the head-vs-generative speed table at the real
GLM-4.1V-9B widths (vision 1536, text 4096, vocabulary 151552; random fp32 weights on the CPU)
with only K layers per tower, timed per layer and projected to the full 24 vision / 40 text layers.

Every decoder layer and vision block gets forward hooks that add up the seconds spent inside them;
for a call of T seconds with V in vision blocks and L in text layers at depth K,

    projected = (T − V − L) + V · 24/K + L · n/K        n = 40 (20 for the half-depth answer head)

which holds because every layer of a tower has the same shape and the same inputs' shapes: what
is outside the layers (embeddings, merger, norm, lm_head, processor, generate's bookkeeping) is
paid once whatever the depth. Each projected figure is labelled "projected" and printed next to
the FLOP ratio of the full-size model (tools/bench_models.py ``flops_per_image``). One model copy:
the frozen paths are timed first, then LoRA is attached and the LoRA/generative paths are timed
(their figures include the LoRA layers, as they would in use). Memory: ~5 GB for the embedding
and lm_head tables plus ~0.9 GB per text layer (fp32). Asserts nothing.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
FULL_VISION, FULL_TEXT = 24, 40


def full_width_backbone(depth: int):
    """A Glm4vBackbone with the real GLM-4.1V widths and ``depth`` layers per tower, CPU fp32."""
    import torch
    from transformers import Glm4vForConditionalGeneration

    from bench_models import full_size_backbone
    from rainclf.backbones.glm4v_load import empty_parameters

    meta = full_size_backbone("cpu", meta=True)          # the full config, tokenizer and processor
    config = meta.load()[0].config
    config.vision_config.depth = depth
    config.text_config.num_hidden_layers = depth
    with empty_parameters():                             # parameters on meta, rotary buffers real
        model = Glm4vForConditionalGeneration(config)
    g = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            real = torch.empty(p.shape, dtype=torch.float32)
            real.fill_(1.0) if p.ndim == 1 and "norm" in type(module).__name__.lower() else real.normal_(0, 0.02, generator=g)
            setattr(module, name, torch.nn.Parameter(real, requires_grad=False))
    model.eval().requires_grad_(False)
    meta._model, meta.device, meta.num_layers = model, "cpu", depth
    meta.name = f"glm4.1v-widths-random-depth{depth}"
    return meta


class LayerClock:
    """Seconds spent inside vision blocks and text decoder layers (forward hooks)."""

    def __init__(self, model):
        self.seconds = {"vision": 0.0, "text": 0.0}
        self._start: dict = {}
        self.handles = []
        for kind, layers in (("vision", model.model.visual.blocks), ("text", model.model.language_model.layers)):
            for layer in layers:
                self.handles.append(layer.register_forward_pre_hook(self._enter(kind, layer)))
                self.handles.append(layer.register_forward_hook(self._leave(kind, layer)))

    def _enter(self, kind, layer):
        def hook(*_):
            self._start[id(layer)] = time.perf_counter()
        return hook

    def _leave(self, kind, layer):
        def hook(*_):
            self.seconds[kind] += time.perf_counter() - self._start.pop(id(layer))
        return hook

    def reset(self):
        self.seconds = {"vision": 0.0, "text": 0.0}
        self._start.clear()   # an early exit leaves its layer's start behind


def time_projected(paths: dict, images, batch: int, calls: int, clock: LayerClock, depth: int) -> list[dict]:
    import torch

    rows = []
    b = [images[j % len(images)] for j in range(batch)]
    with torch.inference_mode():
        for name, fn in paths.items():
            fn(b)                                         # warm-up
            total = vis = txt = 0.0
            for _ in range(calls):
                clock.reset()
                t = time.perf_counter()
                fn(b)
                total += time.perf_counter() - t
                vis, txt = vis + clock.seconds["vision"], txt + clock.seconds["text"]
            total, vis, txt = total / calls, vis / calls, txt / calls
            text_layers = FULL_TEXT // 2 if "half depth" in name else FULL_TEXT
            proj = (total - vis - txt) + vis * FULL_VISION / depth + txt * text_layers / depth
            rows.append({"path": name, "batch": batch, "calls": calls, "measured_ms_at_depth": total * 1e3,
                         "vision_layers_ms": vis * 1e3, "text_layers_ms": txt * 1e3,
                         "projected_latency_ms": proj * 1e3, "projected_images_per_s": batch / proj})
    return rows


def run_full_width(args) -> int:
    """Build, time, project and print; ``args`` are bench.py's."""
    import types

    import torch

    from bench import GREEDY, adapted_paths, bench_images, frozen_paths
    from bench_json import write_json
    from bench_models import flops_per_image, full_size_backbone
    from rainclf.backbones.base import DEFAULT_PROMPT

    if args.threads:
        torch.set_num_threads(args.threads)
    depth, notes = args.depth, []
    backbone = full_width_backbone(depth)
    images, what = bench_images(args.images, backbone)
    prompt_tokens = int(backbone._processor(text=[backbone.chat_text(DEFAULT_PROMPT)], images=images[:1],
                                            return_tensors="pt", images_kwargs=backbone._size_kwargs())
                        ["attention_mask"].sum())
    clock = LayerClock(backbone.load()[0])
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    calls = args.calls or 2
    frozen = frozen_paths(backbone, types.SimpleNamespace(layer=depth), [])   # half depth: projected with 20
    frozen["answer-feature, half depth"] = frozen["answer-feature head"]
    rows = []
    for batch in batch_sizes:
        rows += time_projected(frozen, images, batch, calls, clock, depth)
    adapted, _, trained = adapted_paths(backbone, types.SimpleNamespace(max_new_tokens=0), notes)
    for batch in batch_sizes:
        rows += time_projected(adapted, images, batch, calls, clock, depth)
    flops = flops_per_image(full_size_backbone("cpu", meta=True), prompt_tokens, FULL_TEXT // 2, trained, trained)
    for batch in batch_sizes:
        greedy = next(r for r in rows if r["path"] == GREEDY and r["batch"] == batch)
        for r in (r for r in rows if r["batch"] == batch):
            r["projected_speed_vs_greedy"] = greedy["projected_latency_ms"] / r["projected_latency_ms"]
            r["flop_ratio_greedy_over_path"] = flops[GREEDY] / flops[r["path"]] if r["path"] in flops else None
    print(f"real GLM-4.1V widths, RANDOM fp32 weights, {depth} layer(s) per tower timed on CPU "
          f"({torch.get_num_threads()} threads), projected to {FULL_VISION} vision / {FULL_TEXT} text layers; "
          f"{prompt_tokens} prompt tokens, {len(images)} {what}")
    head = (f"{'path':<28}{'batch':>6}{'measured ms':>13}{'projected ms':>14}{'projected img/s':>17}"
            f"{'projected × greedy':>20}{'FLOP ratio':>12}")
    print(head)
    for r in rows:
        fr = r["flop_ratio_greedy_over_path"]
        print(f"{r['path']:<28}{r['batch']:>6}{r['measured_ms_at_depth']:>13.0f}{r['projected_latency_ms']:>14.0f}"
              f"{r['projected_images_per_s']:>17.3f}{r['projected_speed_vs_greedy']:>20.2f}"
              f"{'' if fr is None else f'{fr:.2f}':>12}")
    print("note: 'projected' columns are extrapolated from per-layer timings at depth "
          f"{depth}, not measured on a full-depth model; 'FLOP ratio' = greedy FLOPs / path FLOPs (full size)")
    notes = [n for n in notes if not n.startswith(("frozen paths ran", "generative greedy: max_new_tokens"))]
    notes += [f"generative greedy: {trained} new tokens (the shorter label + its terminator)",
              "one model copy: frozen paths timed first, then LoRA attached for the LoRA/generative paths"]
    for n in notes:
        print(f"note: {n}")
    write_json(args.json, "bench.py --full-width", {"depth": depth, "batch_sizes": batch_sizes, "calls": calls,
                                                    "prompt_tokens": prompt_tokens, "images": what}, rows,
               notes + ["projected figures are extrapolations from per-layer timings"])
    return 0


if __name__ == "__main__":
    sys.exit("run it as: python tools/bench.py --full-width --depth K")
