"""The training loop of the LoRA and generative heads, and its data:

    decode_examples   labelled examples → resized RGB images + label indices (bad files skipped
                      and reported)
    minibatches       a seeded endless stream of shuffled index batches
    train_loop        AdamW, gradient accumulation, autocast, validation every N steps, early
                      stopping, best (and last) trainable state kept in memory; under a launcher
                      each rank trains on its part of the global batch, gradients all-reduced
                      (``parallel/ddp.py``)
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rainclf.data.images import decode_paths
from rainclf.heads.adapters import LoraParams, autocast
from rainclf.io import log
from rainclf.parallel.ddp import (
    all_reduce_gradients,
    broadcast_object,
    broadcast_parameters,
    ensure_process_group,
    mean_across_ranks,
    shard_batch,
)

# --------------------------------------------------------------------------- data

def decode_examples(examples, backbone, progress: bool = True):
    """(images, label indices, skipped 'origin: error' strings) for a list of data.Example."""
    from rainclf.labels import label_to_index

    images, errors = decode_paths([e.path for e in examples], backbone.prepare_images)
    keep = [i for i, err in enumerate(errors) if err is None]
    skipped = [f"{examples[i].origin}: {err}" for i, err in enumerate(errors) if err is not None]
    for s in skipped:
        log(f"skipped {s}", progress)
    return [images[i] for i in keep], [label_to_index(examples[i].label) for i in keep], skipped


def minibatches(n: int, batch_size: int, seed: int):
    """Endless index batches: a new shuffle every epoch, deterministic for a seed."""
    rng = random.Random(seed)
    batch_size = min(batch_size, n)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for lo in range(0, n - batch_size + 1, batch_size):  # drop the ragged tail: equal batches
            yield order[lo:lo + batch_size]


# --------------------------------------------------------------------------- training loop

@dataclass
class TrainOutcome:
    history: list             # one dict per validation: step, train_loss, + evaluate()'s keys
    best_step: int
    best_state: dict          # name → CPU tensor of every trainable parameter
    last_state: dict
    steps_done: int
    stopped_early: bool
    train_seconds: float      # optimizer steps only (no validation)
    total_seconds: float
    nonfinite_steps: int = 0  # steps skipped for an inf/nan loss or gradient (fp16 overflow)

    @property
    def steps_per_s(self) -> float:
        return self.steps_done / self.train_seconds if self.train_seconds > 0 else float("inf")


def _snapshot(named_params) -> dict:
    return {n: p.detach().to("cpu", copy=True) for n, p in named_params}


def restore(named_params, state: dict) -> None:
    import torch

    with torch.no_grad():
        for n, p in named_params:
            p.copy_(state[n].to(p.device, p.dtype))


def train_loop(params: LoraParams, named_params: list, n_train: int,
               loss_fn: Callable[[list], object], evaluate: Callable[[], dict] | None,
               modules: list, device: str, dtype, seed: int = 0, progress: bool = True,
               desc: str = "train", start_is_candidate: bool = False) -> TrainOutcome:
    """Generic LoRA training.

    ``loss_fn(indices)`` returns the mean loss of one micro-batch (run under autocast here).
    ``evaluate()`` returns a dict with a ``rank`` tuple, higher is better; it runs before training
    (step 0, recorded only) and every ``eval_every`` steps. The state with the best rank is kept
    (ties keep the earlier one: less drift) and ``patience`` validations without a better rank
    stop training. Without ``evaluate`` (no validation split) the last state is kept.
    ``start_is_candidate``: step 0 competes too — for a start that is already a trained head
    (the LoRA head's probe-initialised score layer), which training must beat to replace.
    ``modules`` are switched to train mode for steps and eval mode for validation.

    Under torchrun / accelerate launch (WORLD_SIZE > 1; the process group is joined here if the
    fitter has not yet): every rank starts from rank 0's weights, draws the same global batch of
    ``train_batch_size × world_size`` indices and computes the loss of its own contiguous part;
    the gradients are averaged over ranks (weighted by part size) before clipping and the step, so
    every replica takes the same step as one process with the whole batch. The logged loss is the
    global one, and rank 0's validation figures decide for all ranks (same best step, same early
    stop). One process: all of this is a no-op.
    """
    import torch
    from tqdm.auto import tqdm

    ctx = ensure_process_group()   # the fitters joined it already; idempotent, no-op in one process
    if n_train < ctx.world_size:
        raise ValueError(f"{n_train} training images for {ctx.world_size} processes: every process needs "
                         "at least one image per step (use fewer processes)")
    trainable = [p for _, p in named_params]
    broadcast_parameters(trainable)   # same start on every rank (no-op in one process)
    opt = torch.optim.AdamW(trainable, lr=params.lr, weight_decay=params.weight_decay)
    # fp16 (forced) needs loss scaling on CUDA, or small gradients underflow to zero
    scaler = torch.amp.GradScaler("cuda") if (dtype == torch.float16 and device.startswith("cuda")) else None
    batches = minibatches(n_train, params.train_batch_size * ctx.world_size, seed)  # same on every rank
    history: list = []
    best = {"rank": None, "step": 0, "state": None}
    # one bar over optimizer steps: the running loss and tqdm's ETA (validations pause it)
    bar = tqdm(total=params.steps, desc=desc, unit="step", disable=not progress, leave=False,
               dynamic_ncols=True)
    start, train_s, running, stopped, step, bad = time.perf_counter(), 0.0, [], False, 0, 0
    nonfinite = 0

    def validate(step: int) -> bool:
        """Record one validation; True when it is the best so far (its state is kept). Step 0
        (before training) is recorded for the "before" figures but is never a candidate: with
        all-zero accuracy at every validation the kept checkpoint is still a trained one."""
        entry = {"step": step}
        if running:
            entry["train_loss"] = round(sum(running) / len(running), 6)
            running.clear()
        for m in modules:
            m.eval()
        with torch.no_grad(), autocast(device, dtype):
            # rank 0's figures on every rank: a one-ulp difference must not split the ranks'
            # early-stopping / best-step decisions
            entry.update(broadcast_object(evaluate()))
        rank = tuple(entry.pop("rank"))
        history.append(entry)
        if progress:   # above the bar, not through it
            bar.write(f"rainclf: {desc} step {step}/{params.steps}: " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "step"),
                file=sys.stderr)
        if step == 0 and not start_is_candidate:
            return False
        if best["rank"] is None or rank > best["rank"]:
            best.update(rank=rank, step=step, state=_snapshot(named_params))
            return True
        return False

    if evaluate is not None:
        validate(0)   # the untrained adapter: the "before" figures (a candidate if start_is_candidate)
    for step in range(1, params.steps + 1):
        t0 = time.perf_counter()
        for m in modules:
            m.train()
        total = 0.0
        for _ in range(params.grad_accum):
            idx = shard_batch(next(batches), ctx)   # this rank's part of the global batch
            with autocast(device, dtype):
                loss = loss_fn(idx) / params.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            total += float(loss.detach())
        if ctx.is_distributed:
            # mean over the global batch: gradients and logged loss weighted by each rank's part
            all_reduce_gradients(trainable, local_count=len(idx))
            total = mean_across_ranks(total * len(idx)) / mean_across_ranks(len(idx))
        if scaler:
            scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(trainable, params.max_grad_norm)
        if not (math.isfinite(total) and torch.isfinite(norm)):
            nonfinite += 1    # overflow (fp16): skip the update rather than write nan into the adapter
        if scaler:
            scaler.step(opt)  # the scaler skips non-finite steps itself and lowers its scale
            scaler.update()
        elif math.isfinite(total) and torch.isfinite(norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        running.append(total)
        train_s += time.perf_counter() - t0
        bar.set_postfix(loss=f"{sum(running) / len(running):.4f}", refresh=False)
        bar.update(1)
        if evaluate is None or (step % params.eval_every and step != params.steps):
            continue
        bad = 0 if validate(step) else bad + 1
        if bad >= params.patience:
            stopped = True
            log(f"{desc}: early stop at step {step} ({bad} validations without improvement; "
                f"best step {best['step']})", progress)
            break
    bar.close()
    for m in modules:
        m.eval()
    last_state = _snapshot(named_params)
    if evaluate is None:
        history.append({"step": step, "train_loss": round(sum(running) / max(len(running), 1), 6)})
        best.update(step=step, state=last_state)
    if nonfinite:
        log(f"{desc}: {nonfinite} of {step} steps had a non-finite loss or gradient and were skipped", progress)
    return TrainOutcome(history, best["step"], best["state"], last_state, step, stopped, train_s,
                        time.perf_counter() - start, nonfinite)


# --------------------------------------------------------------------------- fit set-up and write-out

@dataclass
class TrainingData:
    """What both LoRA fitters start from: checked params, the launcher context, a private
    backbone, and the decoded (resized) train / validation images with label indices."""

    params: LoraParams
    ctx: object
    backbone: object
    tr_im: list
    tr_y: list
    va_im: list
    va_y: list
    skipped: list


def start_lora_fit(train, val, options, layer: int | None = None, what: str = "accuracy") -> TrainingData:
    """Params and fp16 refusal, process group (torchrun / accelerate launch: DDP by hand in
    ``train_loop``), a private backbone on this rank's device, decoded images."""
    from rainclf.backbones.base import BackboneOptions
    from rainclf.heads.adapters import check_precision, private_backbone
    from rainclf.parallel.ddp import ensure_process_group, rank_device

    params = LoraParams.from_dict(options.head_params)
    check_precision(params)
    ctx = ensure_process_group()
    backbone = private_backbone(options.backbone, BackboneOptions(
        device=rank_device(options.device, ctx), image_size=options.image_size,
        trust_remote_code=options.trust_remote_code), layer)
    if backbone.random_weights:
        log(f"backbone {backbone.name} has RANDOM weights: its {what} says nothing about real models",
            options.progress)
    tr_im, tr_y, tr_skip = decode_examples(train, backbone, options.progress)
    va_im, va_y, va_skip = decode_examples(val, backbone, options.progress)
    return TrainingData(params, ctx, backbone, tr_im, tr_y, va_im, va_y, tr_skip + va_skip)


def outcome_metrics(data: TrainingData, outcome: TrainOutcome, dtype) -> dict:
    """The metrics both LoRA fitters record about a training run."""
    from rainclf.heads.adapters import precision_name

    metrics = {
        "n_train": len(data.tr_im), "n_val": len(data.va_im), "n_skipped": len(data.skipped),
        "skipped": data.skipped, "random_weights_backbone": data.backbone.random_weights,
        "device": data.backbone.device, "precision": precision_name(dtype),
        "best_step": outcome.best_step, "steps_done": outcome.steps_done,
        "stopped_early": outcome.stopped_early, "nonfinite_steps": outcome.nonfinite_steps,
        "train_seconds": round(outcome.train_seconds, 3),
        "steps_per_s": round(outcome.steps_per_s, 4), "history": outcome.history,
    }
    if data.ctx.is_distributed:   # train_batch_size is per process: the global batch is world_size × larger
        metrics["world_size"] = data.ctx.world_size
    return metrics


def write_model(out_dir, options, data: TrainingData, config, metrics: dict, save_weights, seen=None):
    """Rank 0 writes the model directory atomically (``save_weights(tmp)`` + config, metrics,
    card, and the sha256 of ``seen`` = (train, validation) examples); every rank returns once it is there."""
    from rainclf.io import atomic_dir
    from rainclf.model import FitResult, write_common_files
    from rainclf.parallel.ddp import barrier

    if data.ctx.is_main:   # the replicas are identical: one writer
        with atomic_dir(out_dir, overwrite=options.overwrite) as tmp:
            save_weights(tmp)
            write_common_files(tmp, config, metrics, seen=seen)
    barrier()
    return FitResult(Path(out_dir), metrics, config)
