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
    feature: str = "vision"
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
        if self.feature not in ("vision", "answer"):
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
    # which engine runs a linear/vision head: torch, or the exported ONNX graph (rainclf.onnx.engine)
    engine: str = "torch"
    providers: list | None = None
