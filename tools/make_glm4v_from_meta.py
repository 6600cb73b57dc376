"""Build a small RANDOM-weight GLM-4V checkpoint from the metadata of a released one.

Takes a metadata folder of ``../shared/glm4v-real/`` (``config.json``, and where it has them the
released tokenizer, chat template and processor files) and writes a model directory that looks
like the release in every way except size: the sizes are shrunk (text hidden 32, 2 layers; vision
depth 2), every token id, the vocabulary size, the template and the processor settings are kept,
and a **flat config stays flat** (shrunk sizes written at the top level, legacy ``rope_scaling``
kept) while the weights are built from its nested equivalent. A glm4v_moe config keeps its MoE
layout (first layer dense, the rest with a few routed experts + a shared one).

A folder with only ``config.json`` (GLM-4.5V) takes tokenizer, template and processor from
``--tokenizer-from`` (default: the GLM-4.1V-9B-Thinking folder beside it); where the config's
image/video token ids differ from that tokenizer's, they are set to the tokenizer's ids (printed,
and listed in ``RAINCLF_RANDOM_WEIGHTS``). ``generation_config.json`` gets the config's
``eos_token_id`` list, as the releases ship it.

    python tools/make_glm4v_from_meta.py ../shared/glm4v-real/GLM-4.1V-9B-Thinking -o /tmp/g41
    python tools/make_glm4v_from_meta.py ../shared/glm4v-real/GLM-4.5V -o /tmp/g45moe

Importable by tests: ``build(meta_dir, out_dir, seed=0) -> Path``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from rainclf.backbones.glm4v_config import is_flat, normalise, read_config  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "processor_config.json")
TEXT_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16)
MOE_SIZES = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                 first_k_dense_replace=1, n_group=1, topk_group=1)
VISION_SIZES = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2)
# rotary dim = head_dim 16 × partial_rotary_factor 0.5 = 8; mrope_section sums to 8 / 2
MROPE = [1, 1, 2]
TOKEN_KEYS = {"image_token_id": "<|image|>", "image_start_token_id": "<|begin_of_image|>",
              "image_end_token_id": "<|end_of_image|>", "video_token_id": "<|video|>",
              "video_start_token_id": "<|begin_of_video|>", "video_end_token_id": "<|end_of_video|>"}


def shrink(raw: dict) -> dict:
    """``raw`` with shrunk sizes, in its own layout (flat stays flat)."""
    cfg = json.loads(json.dumps(raw))
    text = cfg if is_flat(cfg) else cfg["text_config"]
    moe = cfg.get("model_type") == "glm4v_moe"
    sizes = dict(TEXT_SIZES, **(MOE_SIZES if moe else {}))
    if "head_dim" not in text and not moe:
        sizes.pop("head_dim")   # glm4v derives head_dim = hidden / heads = 16
    text.update(sizes)
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(text.get(key), dict) and "mrope_section" in text[key]:
            text[key]["mrope_section"] = list(MROPE)
    cfg["vision_config"].update(VISION_SIZES, out_hidden_size=TEXT_SIZES["hidden_size"])
    return cfg


def _token_ids(cfg: dict, tokenizer) -> list[str]:
    """Set the config's image/video token ids to the tokenizer's where they differ; the changes."""
    changed = []
    for key, token in TOKEN_KEYS.items():
        tid = tokenizer.convert_tokens_to_ids(token)
        for part in (cfg, cfg.get("text_config") or {}):
            if key in part and part[key] != tid:
                changed.append(f"{key} {part[key]} -> {tid} ({token} in the tokenizer)")
                part[key] = tid
    return changed


def build(meta_dir, out_dir, seed: int = 0, tokenizer_from=None) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer

    meta, out = Path(meta_dir), Path(out_dir)
    files_from = meta if (meta / "tokenizer.json").is_file() else Path(
        tokenizer_from or meta.parent / "GLM-4.1V-9B-Thinking")
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (files_from / name).is_file():
            shutil.copyfile(files_from / name, out / name)
    cfg = shrink(read_config(meta))
    changed = _token_ids(cfg, AutoTokenizer.from_pretrained(out))
    norm = normalise(cfg)
    config = AutoConfig.for_model(norm["model_type"], **{k: v for k, v in norm.items()
                                                        if k not in ("model_type", "transformers_version")})
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():   # wider than the default 0.02 init, so inputs stay visible in features
        gen = torch.Generator().manual_seed(seed)
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1] ** 0.5))
    model.save_pretrained(out, safe_serialization=True)
    text = norm["text_config"]
    eos = text.get("eos_token_id", cfg.get("eos_token_id"))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos, "pad_token_id": text.get("pad_token_id", cfg.get("pad_token_id"))}, indent=2))
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    note = [f"Random weights (seed {seed}) in the layout of {meta.name}, made by tools/make_glm4v_from_meta.py.",
            "Its outputs mean nothing about GLM-4V quality."] + [f"changed: {c}" for c in changed]
    (out / "RAINCLF_RANDOM_WEIGHTS").write_text("\n".join(note) + "\n", encoding="utf-8")
    for c in changed:
        print(f"make_glm4v_from_meta: {c}", file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("meta_dir")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-from", default=None)
    a = ap.parse_args(argv)
    print(build(a.meta_dir, a.out, a.seed, a.tokenizer_from))
    return 0


if __name__ == "__main__":
    sys.exit(main())
