"""Which model a benchmark in tools/ times, and its FLOPs: the backbone named on the command line
(glm4v-tiny by default), or a GLM-4.1V-9B-sized model with random bf16 weights
(``--full-size-random``, one CUDA GPU; ``--dry-run`` builds it on the meta device for the FLOP
estimates only). ``build_backbone(args)`` returns a fresh, loaded backbone each call, so a
benchmark can time frozen paths on one copy and attach LoRA to another.

Other model builders (e.g. real widths at reduced depth) belong here too: register their flags in
``add_model_arguments`` and build them in ``build_backbone``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

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


# --------------------------------------------------------------------------- FLOPs

def _linear_params(module) -> int:
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)))


# Path names shared by the FLOP estimates and bench.py's timings.
GREEDY = "generative greedy"                  # as many new tokens as a trained answer (label + terminator)
GREEDY_FULL = "generative greedy, max tokens"  # --max-new-tokens: what random weights do


def flops_per_image(backbone, prompt_tokens: int, layer: int, answer_tokens: int, max_new_tokens: int) -> dict:
    """Forward FLOPs per image (2 per multiply-add; attention scores counted without the causal
    half, a slight over-estimate) for each path. Greedy generation of t tokens = the prefill (which
    gives the first) + t − 1 decode steps; ``answer_tokens`` is a trained answer's length."""
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
            GREEDY: vision + prefill(prompt_tokens, n) + 2 * vocab + (answer_tokens - 1) * decode,
            GREEDY_FULL: vision + prefill(prompt_tokens, n) + 2 * vocab + (max_new_tokens - 1) * decode,
            # one prefill (rainclf.heads.constrained), then both labels' answer tokens but the last
            # through the layers, and lm_head at every scored position of both
            "generative constrained": (vision + prefill(prompt_tokens, n) + 2 * (answer_tokens - 1) * 2 * per_layer * n
                                       + 2 * answer_tokens * 2 * vocab),
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


def add_model_arguments(ap) -> None:
    ap.add_argument("--backbone", default="glm4v-tiny")
    ap.add_argument("--full-size-random", action="store_true", help="GLM-4.1V-9B-sized random bf16 model on CUDA")
    ap.add_argument("--dry-run", action="store_true", help="with --full-size-random: FLOP estimates only (no GPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    ap.add_argument("--full-width", action="store_true",
                    help="real GLM-4.1V widths, --depth layers per tower, CPU; projected to full depth "
                         "(tools/bench_full_width.py)")
    ap.add_argument("--depth", type=int, default=1, help="with --full-width: layers per tower actually built")


class NeedsGpu(RuntimeError):
    """--full-size-random without a CUDA GPU."""


def build_backbone(args):
    """A fresh, loaded backbone for ``args`` (see the module docstring)."""
    import torch

    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import BackboneOptions, resolve_device

    if args.full_size_random:
        if args.dry_run:
            return full_size_backbone("cpu", meta=True)
        if not torch.cuda.is_available():
            raise NeedsGpu("--full-size-random needs a CUDA GPU (a GLM-4.1V-9B-sized model is ~20 GB in bf16) "
                           "and torch sees none. Use --dry-run for the FLOP estimates, or --backbone glm4v-tiny "
                           "on the CPU.")
        return full_size_backbone(resolve_device("cuda" if args.device == "auto" else args.device))
    backbone = create_backbone(args.backbone, BackboneOptions(device=args.device))
    backbone.load()
    return backbone
