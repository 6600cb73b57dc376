"""``rainclf fit``: labelled images → a model directory.

Flow: load and validate the dataset (cheap, before any model work) → hash every image (sha256 +
pHash, ``data/groups.py``): refuse identical images under both labels, group exact and near
duplicates (+ ``--groups FILE``) → stratified split that keeps each group on one side → the
head's fitter (``rainclf.heads.HEADS``), which embeds or trains, measures on the validation
split and writes the model directory atomically → a warning if the head collapsed.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from rainclf.config import FitOptions
from rainclf.data.datasets import (
    DataError,
    Example,
    check_trainable,
    load_dataset,
    load_groups,
    stratified_split,
)
from rainclf.data.groups import check_conflicts, find_groups, image_facts
from rainclf.heads import DISTRIBUTED_HEADS, head_fitter, head_options_check
from rainclf.io import check_target, log
from rainclf.labels import LABELS
from rainclf.model import FitResult
from rainclf.parallel.ddp import dist_context
from rainclf.report.collapse import collapse_message


def prepare_data(data: str | Path, options: FitOptions) -> tuple[list[Example], list[Example]]:
    """Load and check DATA, then split it (stratified by label, groups of duplicates kept on one
    side) into train and validation."""
    examples = load_dataset(data)
    check_trainable(examples, data)
    given = load_groups(options.groups) if options.groups else None
    facts = image_facts([e.path for e in examples], options.progress)
    if not options.allow_conflicts:
        check_conflicts(facts, examples)
    if given is not None and not any(e.path in given for e in examples):
        raise DataError(f"--groups {options.groups}: none of its files is in {data} — paths in it are "
                        "relative to the CSV's folder; fix them or drop --groups")
    grouping = find_groups(facts, options.near_dup_threshold, given)
    train, val = (stratified_split(examples, options.val_split, options.seed, groups=grouping.by_path(facts))
                  if options.val_split else (examples, []))
    log(f"{len(examples)} examples ({sum(e.label == LABELS[1] for e in examples)} {LABELS[1]}): "
        f"{len(train)} train / {len(val)} validation; {len(grouping.groups)} groups of duplicates "
        f"({grouping.n_images()} images: {len(grouping.exact_pairs)} exact copies, "
        f"{'near-duplicates off' if options.near_dup_threshold is None else f'pHash ≤ {options.near_dup_threshold} bits'}"
        f"{', ' + str(options.groups) if options.groups else ''}) kept on one side", options.progress)
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
    check_target(out_dir, is_dir=True)   # before the long part, not after it
    if ctx.is_distributed and not ctx.is_main:
        options = replace(options, progress=False)   # one log, from rank 0
    train, val = prepare_data(data, options)
    result = fitter(train, val, out_dir, options)
    warning = collapse_message(result.metrics)
    if warning and ctx.is_main:   # printed even with --quiet: the model's labels say little
        print(f"rainclf: warning: {warning}", file=sys.stderr)
    return result
