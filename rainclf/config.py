"""Option dataclasses: every user choice of ``fit`` (``FitOptions``) and of running a loaded
model (``RunOptions``); the CLI fills them, the library reads them. Nothing here is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rainclf.backbones.base import DEFAULT_BACKBONE, DEFAULT_PROMPT, default_cache_dir
from rainclf.data.groups import DEFAULT_THRESHOLD


@dataclass
class FitOptions:
    """Every choice ``rainclf fit`` exposes; defaults match the CLI."""

    backbone: str = DEFAULT_BACKBONE
    feature: str | None = None               # None: the head's own (linear: vision, lora: answer)
    layer: int = -1
    prompt: str = DEFAULT_PROMPT
    head: str = "linear"
    val_split: float = 0.2
    seed: int = 0
    # leak-free validation split (data/groups.py): these stay on one side
    groups: str | Path | None = None          # CSV group,file (like near_duplicate_groups.csv)
    near_dup_threshold: int | None = DEFAULT_THRESHOLD   # pHash bits; None: no automatic groups
    allow_conflicts: bool = False             # identical images under both labels: refuse unless set
    batch_size: int = 8
    device: str = "auto"
    image_size: int | None = None
    weights: str | None = None
    trust_remote_code: bool = False
    cache_dir: str | Path | None = field(default_factory=default_cache_dir)
    class_weight: str | None = "balanced"    # linear and LoRA heads: "balanced" | None (every image alike)
    C: float | None = None                   # None: chosen by cross-validation
    threshold_from_val: bool = False
    overwrite: bool = False
    progress: bool = True
    head_params: dict = field(default_factory=dict)   # LoRA / generative hyper-parameters

    def __post_init__(self):
        if not 0.0 <= self.val_split < 1.0:
            raise ValueError(f"--val-split must lie in [0, 1), got {self.val_split}")
        if self.feature not in (None, "vision", "answer"):
            raise ValueError(f"--feature must be vision or answer, not {self.feature!r}")
        if self.class_weight not in (None, "balanced"):
            raise ValueError("--class-weight must be 'balanced' or 'none'")
        if self.near_dup_threshold is not None and not 0 <= self.near_dup_threshold <= 64:
            raise ValueError(f"--near-dup-threshold must lie in [0, 64] bits, got {self.near_dup_threshold}")


@dataclass
class RunOptions:
    """How to run a loaded classifier (never changes what it computes)."""

    device: str = "auto"
    batch_size: int = 8
    cache_dir: str | Path | None = None
    progress: bool = True
    backbone: str | None = None      # override the saved backbone location (moved weights)
    # generative model directories (rainclf.heads.generative)
    decoding: str = "greedy"         # greedy | sample | constrained
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_new_tokens: int = 16
    # which engine runs the model: torch, or its exported ONNX graph (rainclf.onnx.engine: the image
    # graph of a linear or LoRA head, or the head graph behind torch embeddings)
    engine: str = "torch"
    providers: list | None = None
    # only this run's command line (--trust-remote-code) may let a checkpoint run its own Python
    # code; a model directory's config.json never can (it is data a user downloads)
    trust_remote_code: bool = False


#: fit options only some heads read (FitOptions field → heads). ``fit --help`` lists them under
#: their heads, and an option given for a head that would ignore it is refused, not dropped.
HEAD_OPTIONS: dict[str, tuple[str, ...]] = {
    "feature": ("linear", "lora", "generative"), "layer": ("linear", "lora"), "class_weight": ("linear", "lora"),
    "C": ("linear",), "threshold_from_val": ("linear",), "weights": ("linear",),
    **{name: ("lora", "generative") for name in (
        "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "steps", "lr", "train_batch_size",
        "grad_accum", "eval_every", "patience", "precision", "force_fp16")},
}


def check_head_options(head: str, given) -> None:
    """Refuse options (FitOptions / head_params names) that ``head`` does not read."""
    ignored = [n for n in given if n in HEAD_OPTIONS and head not in HEAD_OPTIONS[n]]
    if ignored:
        flags = ", ".join("--" + n.replace("_", "-") for n in ignored)
        users = sorted({h for n in ignored for h in HEAD_OPTIONS[n]})
        raise ValueError(f"--head {head} does not use {flags} (options of --head {'|'.join(users)}): "
                         "drop them or pick that head")


#: ``cache_dir`` value meaning "the default cache folder" ($RAINCLF_CACHE_DIR or ~/.cache/rainclf),
#: kept distinct from an explicit folder because ``evaluate`` reads the cache only when asked
DEFAULT_CACHE = "default"


def cache_choice(cache_dir: str | Path | None, no_cache: bool = False) -> str | Path | None:
    """What the cache options say: None (no cache), an explicit folder, or ``DEFAULT_CACHE``."""
    if no_cache:
        return None
    return Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE


def resolve_cache_dir(cache_dir: str | Path | None) -> Path | None:
    if cache_dir is None:
        return None
    return default_cache_dir() if cache_dir == DEFAULT_CACHE else Path(cache_dir)
