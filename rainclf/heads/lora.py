"""LoRA classification head: GLM-4V's language model adapted with LoRA, read out by a 2-way linear
score on the ``answer`` feature (hidden state at the last prompt position, the place where the
model would start to answer). It can only ever say 不会下雨 or 会下雨.

    image + question ──GLM-4V (vision tower frozen, LoRA on the LM projections)──▶ h (hidden,)
    h ──score: Linear(hidden, 2)──▶ logits ──softmax──▶ p_rain

Training (``fit_lora``, listed in ``heads.HEADS``): cross-entropy with labels weighted by inverse frequency
(``--class-weight balanced``, the default, as the linear head; ``none`` weighs every image alike),
AdamW, gradient accumulation, bf16 autocast on CUDA / fp32 on CPU, validation every N steps, early
stopping, the best checkpoint kept by validation *balanced* accuracy, log-loss breaking ties.
The score layer starts at a linear probe's solution (``init_score_from_probe``), and that start
is a candidate too: training replaces it only when it does better on validation.
Not by log-loss alone: on ../shared/weather (19% 会下雨) an unweighted head selected by log-loss
answered 不会下雨 for every photo (balanced accuracy 0.500), because the majority answer wins the
log-loss early on. Balanced accuracy cannot be won that way; the log-loss (a proper scoring rule)
still orders checkpoints that tie, which small validation sets do often, and ``--fallback``
routes images by p_rain, so calibration matters.

Model directory: ``adapter/`` (peft ``save_pretrained``, safetensors) + ``score.safetensors`` +
config.json / metrics.json / README.md. ``LoraClassifier`` loads base + adapter + score. The
embedding cache is not used: the features change while LoRA trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from rainclf.backbones.base import BackboneError
from rainclf.config import FitOptions, RunOptions
from rainclf.heads.adapters import (
    ADAPTER_DIR,
    LoraParams,
    amp_dtype,
    attach_lora,
    autocast,
    cuda_devices,
    load_adapter,
    save_adapter,
)
from rainclf.heads.base import (
    ClassifierBase,
    HeadArrays,
    Row,
    label_for,
    rows_in_batches,
)
from rainclf.heads.train import (
    outcome_metrics,
    restore,
    start_lora_fit,
    train_loop,
    write_model,
)
from rainclf.io import log
from rainclf.labels import LABELS
from rainclf.model import (
    FitResult,
    ModelConfig,
    ModelDirError,
    backbone_for,
)
from rainclf.report.metrics import classification_metrics

SCORE_FILE = "score.safetensors"


def lora_layers(backbone, layer: int) -> list[int]:
    """Decoder layers that can influence hidden state ``layer``: LoRA on later ones would be dead
    weight (the forward stops early there)."""
    n = backbone.num_layers
    k = layer % (n + 1)
    if k == 0:
        raise BackboneError("--layer 0 is the embedding output: no decoder layer runs before it, so "
                            "LoRA has nothing to adapt (use --layer -1 or a layer >= 1)")
    return list(range(k))


class LoraHeadModel:
    """A private GLM-4V backbone + its LoRA-wrapped model + the score layer."""

    def __init__(self, backbone, peft_model, score, layer: int, prompt: str, dtype=None):
        self.backbone, self.peft_model, self.score = backbone, peft_model, score
        self.layer, self.prompt, self.dtype = layer, prompt, dtype

    @property
    def modules(self) -> list:
        return [self.peft_model, self.score]

    def named_trainable(self) -> list:
        lora = [(f"lora.{n}", p) for n, p in self.peft_model.named_parameters() if p.requires_grad]
        return lora + [(f"score.{n}", p) for n, p in self.score.named_parameters()]

    def hidden(self, images: Sequence):
        """(N, hidden) float32 answer-position states; images are decoded RGB PIL images."""
        inputs = self.backbone.chat_inputs(images, self.prompt)
        # the unwrapped model: answer_hidden calls model.model (Glm4vModel), which a PeftModel
        # would resolve to the whole ForConditionalGeneration; LoRA layers live inside it anyway
        return self.backbone.answer_hidden(inputs, self.layer, model=self.peft_model.get_base_model()).float()

    def logits(self, images: Sequence):
        """(N, 2) logits, columns LABELS."""
        return self.score(self.hidden(images))

    def init_score_from_probe(self, images: Sequence, y: Sequence[int], class_weight: str | None,
                              batch_size: int = 8, seed: int = 0) -> dict:
        """Start the score layer at the linear head's solution on the untrained states (LoRA's B
        matrices are zero, so these are the frozen model's): standardised logistic regression,
        C by cross-validation, folded into Linear(hidden, 2) as logits (0, z) — softmax of which
        is sigmoid(z). A fresh score layer at lr 1e-4 barely moves in 200 steps (on glm4v-tiny
        and ../shared/weather it ended at balanced accuracy 0.44); from the probe, LoRA only has
        to improve on a working head."""
        import torch

        from rainclf.heads.linear import LinearHead

        with torch.inference_mode(), autocast(self.backbone.device, self.dtype):
            h = np.concatenate([self.hidden(images[lo:lo + batch_size]).float().cpu().numpy()
                                for lo in range(0, len(images), batch_size)])
        probe = LinearHead(class_weight=class_weight, seed=seed).fit(h, np.asarray(y))
        w = probe.coef_ / probe.scale_                          # (hidden,): z = w · h + b
        b = probe.intercept_ - float(np.dot(w, probe.mean_))
        with torch.no_grad():
            self.score.weight.copy_(torch.tensor(np.stack([np.zeros_like(w), w]), dtype=torch.float32))
            self.score.bias.copy_(torch.tensor([0.0, b], dtype=torch.float32))
        pred = (probe.predict_proba(h)[:, 1] >= 0.5).astype(np.int64)
        return {"C": probe.C_, "train_balanced_accuracy": round(balanced_accuracy(np.asarray(y), pred), 6)}

    def p_rain(self, images: Sequence, batch_size: int = 8) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode(), autocast(self.backbone.device, self.dtype):
            for lo in range(0, len(images), batch_size):
                logits = self.logits(images[lo:lo + batch_size]).float()
                out.append(torch.softmax(logits, dim=-1)[:, 1].cpu().numpy())
        return np.concatenate(out).astype(np.float64) if out else np.zeros(0)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_adapter(self.peft_model, directory / ADAPTER_DIR)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.score.state_dict().items()}
        save_file(state, str(directory / SCORE_FILE), metadata={"head": "lora", "labels": ",".join(LABELS)})

    @classmethod
    def load(cls, backbone, directory: Path, layer: int, prompt: str) -> "LoraHeadModel":
        import torch

        from rainclf.weights import check_finite, read_tensors

        path = directory / SCORE_FILE
        if not path.is_file():
            raise ModelDirError(f"{directory} has no {SCORE_FILE}: the model directory is damaged; refit it")
        state, meta = read_tensors(path, framework="pt")
        check_finite(path, {k: v.float().numpy() for k, v in state.items()})
        if meta.get("head") != "lora" or set(state) != {"weight", "bias"} or state["weight"].shape[0] != 2:
            raise ModelDirError(f"{path} is not a rainclf LoRA score layer")
        if state["weight"].shape[1] != backbone.hidden_size:
            raise ModelDirError(f"{path} expects {state['weight'].shape[1]}-d hidden states, backbone "
                                f"{backbone.name} has {backbone.hidden_size}")
        peft_model = load_adapter(backbone, directory / ADAPTER_DIR)
        score = torch.nn.Linear(backbone.hidden_size, 2).to(backbone.device)
        score.load_state_dict({k: v.to(backbone.device) for k, v in state.items()})
        score.eval().requires_grad_(False)
        return cls(backbone, peft_model, score, layer, prompt, amp_dtype("auto", backbone.device))


def build_lora_head(backbone, params: LoraParams, layer: int, prompt: str, seed: int = 0) -> LoraHeadModel:
    """Fresh LoRA adapters + a fresh score layer on a private backbone (deterministic for a seed)."""
    import torch

    backbone.load()   # first: the device decides which RNGs to fork
    with torch.random.fork_rng(devices=cuda_devices(backbone.device)):
        torch.manual_seed(seed)
        peft_model = attach_lora(backbone, params, lora_layers(backbone, layer))
        score = torch.nn.Linear(backbone.hidden_size, 2)
    score.to(backbone.device).eval()
    return LoraHeadModel(backbone, peft_model, score, layer, prompt, amp_dtype(params.precision, backbone.device))


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the labels present in ``y`` (as scikit-learn's)."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in (0, 1) if np.any(y == c)]))


def class_weights(y: list, mode: str | None):
    """Cross-entropy weights per label (LABELS order): n / (2 · n_label) for ``balanced``, else None."""
    import torch

    if mode is None:
        return None
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=2).astype(np.float64)
    return torch.tensor(len(y) / (2.0 * np.maximum(counts, 1.0)), dtype=torch.float32)


def fit_lora(train: list, val: list, out_dir, options: FitOptions) -> FitResult:
    """Fit the LoRA head on DATA and write its model directory to OUT_DIR (atomically)."""
    import torch
    import torch.nn.functional as F

    data = start_lora_fit(train, val, options, options.layer)
    params, ctx, backbone = data.params, data.ctx, data.backbone
    tr_im, tr_y, va_im, va_y = data.tr_im, data.tr_y, data.va_im, data.va_y
    head = build_lora_head(backbone, params, options.layer, options.prompt, options.seed)
    device = backbone.device
    if len(set(tr_y)) < 2:
        raise ValueError("after skipping unreadable images the training part has only one label")
    y_train = torch.tensor(tr_y, device=device)
    yv = np.array(va_y)
    weight = class_weights(tr_y, options.class_weight)
    weight = weight.to(device) if weight is not None else None

    def loss_fn(idx):
        return F.cross_entropy(head.logits([tr_im[i] for i in idx]).float(), y_train[idx], weight=weight)

    def evaluate():
        p = head.p_rain(va_im, options.batch_size)
        pred = (p >= 0.5).astype(np.int64)
        acc, bal = float(np.mean(pred == yv)), balanced_accuracy(yv, pred)
        loss = _log_loss(yv, p)
        return {"val_loss": round(loss, 6), "val_accuracy": round(acc, 6),
                "val_balanced_accuracy": round(bal, 6), "rank": (round(bal, 9), -loss)}

    score_init = None
    if params.score_init == "probe":
        score_init = head.init_score_from_probe(tr_im, tr_y, options.class_weight, options.batch_size, options.seed)
        log(f"score layer initialised from a linear probe on the answer states (C {score_init['C']}, "
            f"train balanced accuracy {score_init['train_balanced_accuracy']:.3f})", options.progress)
    log(f"LoRA head: r {params.lora_r}, alpha {params.lora_alpha}, targets {','.join(params.lora_targets)}, "
        f"class weights {'none' if weight is None else ' / '.join(f'{w:.2f}' for w in weight.tolist())}, "
        f"{params.steps} steps × {params.train_batch_size} × {params.grad_accum}"
        + (f" × {ctx.world_size} processes" if ctx.is_distributed else "") + f" on {device}", options.progress)
    with torch.random.fork_rng(devices=cuda_devices(device)):
        # LoRA dropout: a fit is reproducible for a seed (and each rank draws its own masks)
        torch.manual_seed(options.seed + ctx.rank)
        outcome = train_loop(params, head.named_trainable(), len(tr_im), loss_fn,
                             evaluate if va_im else None, head.modules, device, head.dtype,
                             seed=options.seed, progress=options.progress, desc="lora",
                             start_is_candidate=score_init is not None)
    restore(head.named_trainable(), outcome.best_state)
    p_train = head.p_rain(tr_im, options.batch_size)
    metrics = outcome_metrics(data, outcome, head.dtype)
    metrics.update(train_accuracy=float(np.mean((p_train >= 0.5) == np.array(tr_y))),
                   selection="validation balanced accuracy, then log-loss" if va_im else "last step (no validation split)",
                   class_weight=options.class_weight, score_init=score_init)
    if va_im:
        p = head.p_rain(va_im, options.batch_size)
        pred = [LABELS[1] if q >= 0.5 else LABELS[0] for q in p]
        metrics["validation"] = classification_metrics([LABELS[i] for i in va_y], p.tolist(), pred, 0.5)
    config = ModelConfig(head="lora", backbone=backbone.describe(), feature="answer", layer=options.layer,
                         prompt=options.prompt, dim=backbone.hidden_size, threshold=0.5,
                         head_params=params.to_dict())
    return write_model(out_dir, options, data, config, metrics, head.save, seen=(train, val))


class LoraClassifier(ClassifierBase):
    """A LoRA model directory, predicting image files."""

    def __init__(self, config: ModelConfig, model_dir: Path, options: RunOptions):
        self.config, self.model_dir, self.options = config, Path(model_dir), options
        self.notes: list[str] = []
        # backbone_for builds a new backbone object: the model peft wraps is ours alone
        self.backbone = backbone_for(config, self.model_dir, options)
        self.head = LoraHeadModel.load(self.backbone, self.model_dir, config.layer,
                                       config.prompt or "")

    def predict_proba(self, images) -> np.ndarray:
        return self.head.p_rain(list(images), self.options.batch_size)

    def predict_paths(self, paths: Sequence[str | Path]) -> list[Row]:
        t = self.config.threshold
        return rows_in_batches(paths, self.options.batch_size,
                               lambda ims: [Row("", label_for(p, t), float(p)) for p in self.head.p_rain(ims, len(ims))],
                               self.backbone.prepare_images, self.options.progress)

    @classmethod
    def affine_head(cls, config, model_dir) -> HeadArrays:
        from rainclf.weights import check_finite, read_tensors

        t, _ = read_tensors(Path(model_dir) / SCORE_FILE)
        check_finite(Path(model_dir) / SCORE_FILE, t)
        w = t["weight"].astype(np.float64)
        return HeadArrays(np.zeros(w.shape[1]), np.ones(w.shape[1]), w, t["bias"].astype(np.float64))

    @classmethod
    def head_files(cls, model_dir) -> list[Path]:
        adapter = Path(model_dir) / ADAPTER_DIR
        return [Path(model_dir) / SCORE_FILE] + sorted(p for p in adapter.glob("*") if p.is_file()
                                                       and p.suffix in (".json", ".safetensors"))

    def export_source(self, images):
        """(backbone, plain transformers model with LoRA merged, torch p_rain, None) for the
        image graph: the adapters are folded into the weights, so the graph is a plain GLM-4V."""
        ref_p = self.head.p_rain(images)
        return self.backbone, self.head.peft_model.merge_and_unload(), ref_p, None
