"""Pieces shared by the two LoRA heads (``heads/lora.py`` and ``heads/generative.py``).

    LoraParams        the hyper-parameters (``FitOptions.head_params``), checked in __post_init__
    check_precision   the fp16 refusal, before any model is loaded
    private_backbone  a backbone object (and so a model) owned by one head only
    attach_lora       peft LoRA on the language model's projections, never the vision tower
    load_adapter      base model + a saved ``adapter/`` folder
    decode_paths      image files → RGB images, one error string per bad file (decode_examples:
                      the same for labelled examples, bad ones skipped and reported)
    train_loop        AdamW, gradient accumulation, autocast, validation every N steps,
                      early stopping, best (and last) trainable state kept in memory

Why a private backbone: ``get_peft_model`` injects LoRA layers into the model *in place*
(GLM4V_NOTES). ``Glm4vBackbone`` caches its model, so wrapping the model of a backbone that
someone else embeds with would silently change their features. Each LoRA/generative head
therefore builds its own backbone object (a fresh ``from_pretrained``) and never hands it out.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..backbones import BackboneError, BackboneOptions, create_backbone
from ..distributed import (all_reduce_gradients, broadcast_object, broadcast_parameters,
                           ensure_process_group, mean_across_ranks, shard_batch)
from ..fit import log
from ..images import ImageError, decode_image, read_bytes
from ..model_dir import ModelDirError

ADAPTER_DIR = "adapter"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Linear layers of a GLM-4 decoder layer that LoRA may target (attention and MLP).
KNOWN_TARGETS = DEFAULT_TARGETS + ("gate_up_proj", "down_proj")
PRECISIONS = ("auto", "bf16", "fp32", "fp16")

FP16_REFUSAL = (
    "--precision fp16 is refused: GLM-4V is trained in bf16 and its activations exceed fp16's range "
    "(max 65504), so fp16 LoRA training overflows (loss turns inf/nan, gradients are skipped) and, as "
    "users of the generative recipe reported, the model starts mixing English into its Chinese answers. "
    "Use --precision bf16 (auto picks bf16 on CUDA), or pass --force-fp16 to train in fp16 anyway.")


@dataclass
class LoraParams:
    """Hyper-parameters of the LoRA and generative heads; defaults follow the GLM-4 recipe."""

    lora_r: int = 8                      # LoRA rank
    lora_alpha: int = 32                 # scaling = alpha / r
    lora_dropout: float = 0.1
    lora_targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    steps: int = 200                     # optimizer steps (each = grad_accum micro-batches)
    lr: float = 1e-4                     # AdamW learning rate (LoRA and the score layer)
    train_batch_size: int = 4
    grad_accum: int = 1
    eval_every: int = 20                 # validate every N optimizer steps (and at the last one)
    patience: int = 5                    # stop after N validations without improvement
    precision: str = "auto"              # auto | bf16 | fp32 | fp16 (refused unless force_fp16)
    force_fp16: bool = False
    max_new_tokens: int = 16             # generative: greedy answers during validation
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        self.lora_targets = list(self.lora_targets)
        unknown = [t for t in self.lora_targets if t not in KNOWN_TARGETS]
        if not self.lora_targets or unknown:
            raise ValueError(f"--lora-targets {','.join(self.lora_targets)!r}: use a comma-separated "
                             f"subset of {','.join(KNOWN_TARGETS)}")
        for name in ("lora_r", "steps", "train_batch_size", "grad_accum", "eval_every", "patience",
                     "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")

    @classmethod
    def from_dict(cls, params: dict | None) -> "LoraParams":
        params = dict(params or {})
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoRA head parameters {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**params)

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- precision

def check_precision(params: LoraParams) -> None:
    """Refuse fp16 unless forced. Called first thing in a fit, before data or model work."""
    if params.precision == "fp16" and not params.force_fp16:
        raise ValueError(FP16_REFUSAL)


def amp_dtype(precision: str, device: str):
    """The autocast dtype for training/inference, or None for plain fp32."""
    import torch

    cuda = device.startswith("cuda")
    if precision == "auto":
        return torch.bfloat16 if cuda else None
    if precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this GPU has no bf16 support (use --precision fp32)")
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return None


def precision_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def cuda_devices(device: str) -> list:
    """Device indices for ``torch.random.fork_rng`` (which must know the CUDA devices it forks)."""
    if not device.startswith("cuda"):
        return []
    return [int(device.split(":")[1]) if ":" in device else 0]


def autocast(device: str, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# --------------------------------------------------------------------------- model

def private_backbone(name: str, options: BackboneOptions, layer: int | None = None):
    """A new backbone object whose model only this head will touch (see module docstring)."""
    backbone = create_backbone(name, options)
    # the adapters are placed by module path (language_model.layers.N.self_attn.*): GLM-4V only
    if getattr(backbone, "kind", None) != "glm4v" or not hasattr(backbone, "chat_inputs"):
        raise BackboneError(f"backbone {name!r} has no language model: LoRA and generative heads need "
                            "a GLM-4V backbone (glm4v-tiny, a GLM-4.1V/4.5V/4.6V directory or hub id)")
    backbone.check_feature("answer", layer)
    return backbone


def _target_regex(targets: Sequence[str], layers: Sequence[int] | None) -> str:
    # Full-match regex over module names: only the language model's decoder layers qualify. A bare
    # name list would also hit the vision tower, whose blocks have their own down_proj/gate_proj.
    idx = r"\d+" if layers is None else "(?:" + "|".join(str(i) for i in layers) + ")"
    names = "|".join(re.escape(t) for t in targets)
    return rf".*language_model\.layers\.{idx}\.(?:self_attn|mlp)\.(?:{names})"


def lora_config(params: LoraParams, layers: Sequence[int] | None = None):
    from peft import LoraConfig

    return LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                      target_modules=_target_regex(params.lora_targets, layers), bias="none")


def _cast_base(model, precision: str, device: str) -> None:
    """The backbone loads bf16 on CUDA, fp32 on CPU; fp32 / forced-fp16 training on CUDA want
    the frozen base weights in that dtype too."""
    if device.startswith("cuda"):
        if precision == "fp32":
            model.float()
        elif precision == "fp16":
            model.half()


def attach_lora(backbone, params: LoraParams, layers: Sequence[int] | None = None):
    """Wrap the backbone's (private) model with fresh LoRA adapters → PeftModel."""
    from peft import get_peft_model

    model, _ = backbone.load()
    _cast_base(model, params.precision, backbone.device)
    with warnings.catch_warnings():
        # transformers 5.x deprecation warning raised inside peft; nothing for a user to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config(params, layers))
    peft_model.peft_config["default"].base_model_name_or_path = backbone.name  # not a local path
    # new LoRA dropout modules start in train mode even in an eval model: inference must be
    # deterministic until a training loop asks for train mode
    return peft_model.eval()


def load_adapter(backbone, adapter_dir: Path):
    """Base model of a private backbone + the adapter saved in ``adapter_dir`` (eval mode)."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelDirError(f"{adapter_dir} has no adapter_config.json: the model directory is damaged; refit it")
    model, _ = backbone.load()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    return peft_model.eval()


# --------------------------------------------------------------------------- data

def decode_paths(paths: Sequence[str | Path], backbone=None):
    """(images, errors): a decoded RGB image or None per path, and the error string or None.
    With ``backbone``, images are resized to its input size right away (less memory)."""
    images, errors = [], []
    for p in paths:
        try:
            im = decode_image(read_bytes(p), p)
            images.append(backbone.prepare_images([im])[0] if backbone is not None else im)
            errors.append(None)
        except ImageError as e:
            images.append(None)
            errors.append(str(e))
    return images, errors


def decode_examples(examples, backbone, progress: bool = True):
    """(images, label indices, skipped 'origin: error' strings) for a list of data.Example."""
    from ..labels import label_to_index

    images, errors = decode_paths([e.path for e in examples], backbone)
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
               desc: str = "train") -> TrainOutcome:
    """Generic LoRA training.

    ``loss_fn(indices)`` returns the mean loss of one micro-batch (run under autocast here).
    ``evaluate()`` returns a dict with a ``rank`` tuple, higher is better; it runs before training
    (step 0, recorded only) and every ``eval_every`` steps. The state with the best rank is kept
    (ties keep the earlier one: less drift) and ``patience`` validations without a better rank
    stop training. Without ``evaluate`` (no validation split) the last state is kept.
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
        log(f"{desc} step {step}/{params.steps}: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if k != "step"),
            progress)
        if step == 0:
            return False
        if best["rank"] is None or rank > best["rank"]:
            best.update(rank=rank, step=step, state=_snapshot(named_params))
            return True
        return False

    if evaluate is not None:
        validate(0)   # the untrained adapter: the "before" figures
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
        if evaluate is None or (step % params.eval_every and step != params.steps):
            continue
        bad = 0 if validate(step) else bad + 1
        if bad >= params.patience:
            stopped = True
            log(f"{desc}: early stop at step {step} ({bad} validations without improvement; "
                f"best step {best['step']})", progress)
            break
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


def save_adapter(peft_model, path: Path) -> None:
    """peft ``save_pretrained`` (adapter_config.json + adapter_model.safetensors). Embedding layers
    are never targeted, and "auto" would look the base model up on the Hub: switch it off."""
    peft_model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
