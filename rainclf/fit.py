"""``rainclf fit``: labelled images → a model directory.

Flow: load and validate the dataset (cheap, before any model work) → stratified split → the
head's fitter (``rainclf.heads.HEADS``), which embeds or trains, measures on the validation
split and writes the model directory atomically.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rainclf.config import FitOptions
from rainclf.data.datasets import (
    Example,
    check_trainable,
    load_dataset,
    stratified_split,
)
from rainclf.heads import DISTRIBUTED_HEADS, head_fitter, head_options_check
from rainclf.io import log
from rainclf.labels import LABELS
from rainclf.model import FitResult
from rainclf.parallel.ddp import dist_context


def prepare_data(data: str | Path, options: FitOptions) -> tuple[list[Example], list[Example]]:
    """Load and check DATA, then split it (stratified by label) into train and validation."""
    examples = load_dataset(data)
    check_trainable(examples, data)
    train, val = stratified_split(examples, options.val_split, options.seed) if options.val_split else (examples, [])
    log(f"{len(examples)} examples ({sum(e.label == LABELS[1] for e in examples)} {LABELS[1]}): "
        f"{len(train)} train / {len(val)} validation", options.progress)
    return train, val


def fit(data: str | Path, out_dir: str | Path, options: FitOptions | None = None) -> FitResult:
    """Fit a classifier on DATA and write it to OUT_DIR (see FitOptions)."""
    options = options or FitOptions()
    head_options_check(options.head)(options)   # before any data or model work
    fitter = head_fitter(options.head)
    ctx = dist_context()
    if ctx.is_distributed and options.head not in DISTRIBUTED_HEADS:
        # refused before any work: N copies would each embed everything and race for OUT_DIR
        raise ValueError(
            f"--head {options.head} does not train with {ctx.world_size} processes (torchrun / accelerate "
            "launch): the embeddings are the part that scales. Fill the cache with N processes, "
            "`torchrun --nproc-per-node N -m rainclf.cli embed DATA -o /tmp/emb.safetensors` (same "
            "--backbone, --weights, --feature, --layer, --prompt, --cache-dir), then run "
            "`rainclf fit DATA -o OUT` in one process: every embedding is a cache hit")
    if Path(out_dir).exists() and not options.overwrite:
        raise FileExistsError(f"{out_dir} already exists: choose another -o or pass --overwrite")
    if ctx.is_distributed and not ctx.is_main:
        options = replace(options, progress=False)   # one log, from rank 0
    train, val = prepare_data(data, options)
    return fitter(train, val, out_dir, options)
