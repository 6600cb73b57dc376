"""GLM-4V ``config.json`` as released, read into one layout: the sizes the file states, whatever
its layout, are the sizes that get built.

Released GLM-4.1V checkpoints ship a **flat** config (text sizes at the top level, no
``text_config``, legacy ``rope_scaling {type, mrope_section}``). transformers 5 reads such a file
by *ignoring* the top-level text sizes (the language model gets ``Glm4vTextConfig`` defaults, the
9B sizes), so a smaller flat config silently builds a 9B model. :func:`normalise` moves the
top-level text keys into ``text_config`` and the legacy rope fields into ``rope_parameters``;
:func:`build_config` makes the transformers config from that and :func:`check_built` refuses, in
one line, any stated size the built config does not have.

    read_config(dir)   raw JSON (one-line BackboneError when missing or not JSON)
    normalise(raw)     nested layout; the input is not changed
    text_sizes(norm)   {hidden_size, num_hidden_layers, …} as stated
    build_config(dir)  transformers config object, checked against the stated sizes
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from rainclf.backbones.base import BackboneError

CONFIG_FILE = "config.json"
# keys of the multimodal wrapper config; everything else at the top level of a flat config
# belongs to the language model
OUTER_KEYS = frozenset({
    "model_type", "architectures", "vision_config", "text_config", "transformers_version",
    "torch_dtype", "dtype", "tie_word_embeddings", "_name_or_path", "auto_map", "_commit_hash",
    "image_token_id", "image_start_token_id", "image_end_token_id",
    "video_token_id", "video_start_token_id", "video_end_token_id",
})
SHARED_KEYS = ("eos_token_id", "pad_token_id", "bos_token_id")   # stated at both levels
TEXT_MODEL_TYPES = {"glm4v": "glm4v_text", "glm46v": "glm4v_text", "glm4v_moe": "glm4v_moe_text"}
CHECKED_TEXT = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "moe_intermediate_size",
                "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace",
                "head_dim")
CHECKED_VISION = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size",
                  "patch_size", "spatial_merge_size", "temporal_patch_size")


def read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackboneError(f"{path} is missing: point --backbone at a transformers model directory "
                            "(the folder holding config.json and *.safetensors)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackboneError(f"{path} is not readable JSON ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): restore the checkpoint's "
                            "config.json") from None
    if not isinstance(raw, dict):
        raise BackboneError(f"{path} holds a JSON {type(raw).__name__}, not an object: restore the "
                            "checkpoint's config.json")
    return raw


def is_flat(raw: dict) -> bool:
    return "text_config" not in raw and "hidden_size" in raw


def _rope(text: dict) -> None:
    """Legacy ``rope_scaling`` / top-level ``rope_theta`` → ``rope_parameters`` (in place)."""
    legacy = text.pop("rope_scaling", None)
    params = dict(text.get("rope_parameters") or {})
    if isinstance(legacy, dict):
        for k, v in legacy.items():
            params.setdefault("rope_type" if k == "type" else k, v)
    if "rope_theta" in text:
        params.setdefault("rope_theta", text.pop("rope_theta"))
    if "partial_rotary_factor" in text:
        params.setdefault("partial_rotary_factor", text["partial_rotary_factor"])
    if params:
        params.setdefault("rope_type", "default")
        text["rope_parameters"] = params


def normalise(raw: dict) -> dict:
    """The nested layout of ``raw`` (a flat or nested GLM-4V config), rope fields in the current
    form. A nested config comes back with only its rope fields rewritten."""
    cfg = copy.deepcopy(raw)
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        text = {k: cfg.pop(k) for k in list(cfg) if k not in OUTER_KEYS}
        for k in SHARED_KEYS:
            if k in text:
                cfg[k] = text[k]
        mt = TEXT_MODEL_TYPES.get(cfg.get("model_type"))
        if mt:
            text["model_type"] = mt
        cfg["text_config"] = text
    _rope(text)
    return cfg


def text_sizes(norm: dict) -> dict:
    text = norm.get("text_config") or {}
    return {k: text[k] for k in CHECKED_TEXT if k in text}


def _required(norm: dict, path: Path) -> None:
    text = norm.get("text_config") or {}
    missing = [k for k in ("hidden_size", "num_hidden_layers") if not isinstance(text.get(k), int)]
    if missing:
        raise BackboneError(f"{path} states no {' or '.join(missing)} (neither at the top level nor in "
                            "text_config): it is not a GLM-4V config; restore the checkpoint's config.json")


def build_config(model_dir: Path, raw: dict | None = None):
    """The transformers config for ``model_dir`` built from the normalised layout, refused in one
    line if any size it states would not be the size built."""
    from transformers import AutoConfig

    path = Path(model_dir) / CONFIG_FILE
    norm = normalise(raw if raw is not None else read_config(model_dir))
    _required(norm, path)
    kwargs = {k: v for k, v in norm.items() if k not in ("model_type", "transformers_version")}
    try:
        config = AutoConfig.for_model(norm["model_type"], **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise BackboneError(f"{path}: transformers cannot build a {norm.get('model_type')!r} config from it "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    check_built(norm, config, path)
    return config


def check_built(norm: dict, config, path: Path) -> None:
    """BackboneError if a size ``norm`` states differs from ``config``'s."""
    wrong = []
    for part, keys in (("text_config", CHECKED_TEXT), ("vision_config", CHECKED_VISION)):
        stated, built = norm.get(part) or {}, getattr(config, part, None)
        for k in keys:
            if k in stated and built is not None and getattr(built, k, stated[k]) != stated[k]:
                wrong.append(f"{part}.{k} {stated[k]} → {getattr(built, k)}")
    if wrong:
        raise BackboneError(f"{path}: the config states sizes transformers would not build "
                            f"({'; '.join(wrong)}): fix config.json or use a transformers version that reads it")


# --------------------------------------------------------------------------- image-size bounds

PREPROCESSOR_FILE = "preprocessor_config.json"


def pixel_bounds(model_dir: Path) -> tuple[int, int, int] | None:
    """(min pixels, max pixels, temporal patch) of the checkpoint's image processor, or None when
    it states none. The bounds are pixels of area and count the temporal patch: a still image is
    ``temporal_patch`` frames, so an s×s image has t·s² pixels."""
    path = Path(model_dir) / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        pp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BackboneError(f"{path} is not readable JSON ({type(e).__name__}): restore the checkpoint's "
                            "processor file") from None
    size = pp.get("size") or {}
    lo = size.get("shortest_edge", pp.get("min_pixels"))
    hi = size.get("longest_edge", pp.get("max_pixels"))
    if not isinstance(lo, int) or not isinstance(hi, int):
        return None
    return lo, hi, int(pp.get("temporal_patch_size", 2))


def check_image_size(size: int, factor: int, bounds: tuple[int, int, int] | None, name: str) -> None:
    """BackboneError naming the bounds and the nearest allowed sizes when t·size² lies outside the
    processor's [min, max] pixels."""
    if bounds is None:
        return
    lo, hi, t = bounds
    if lo <= t * size * size <= hi:
        return
    smallest = next((s for s in range(factor, 100_000, factor) if t * s * s >= lo), None)
    largest = max((s for s in range(factor, 100_000, factor) if t * s * s <= hi), default=None)
    side = "below" if t * size * size < lo else "above"
    raise BackboneError(
        f"--image-size {size} gives {t}×{size}² = {t * size * size:,} pixels, {side} {name}'s processor "
        f"bounds [{lo:,}, {hi:,}] (preprocessor_config.json size shortest_edge/longest_edge, temporal "
        f"patch {t} counted): use {smallest}..{largest} (multiples of {factor})")
