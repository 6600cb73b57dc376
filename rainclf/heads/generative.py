"""The generative LoRA baseline (the seeds' recipe), kept honest, and its three decodings.

Training (``fit_generative``, listed in ``heads.HEADS``): each example is a chat
``[gMASK]<sop><|user|>\\n<image>question<|assistant|>\\n…`` followed by the label and the
checkpoint's terminator (``heads/answer_tokens.py``: ``<|user|>`` for released GLM templates,
which write no EOS after an answer); the loss is cross-entropy on the answer tokens only
(every prompt and padding position is -100), with LoRA on the language model (same defaults as
the LoRA head). Every ``eval_every`` steps the validation part gives loss, greedy accuracy and format-valid rate; the kept checkpoint is chosen
by (accuracy, format-valid rate) — never by loss, which keeps falling while answers turn into
descriptions. The last checkpoint is saved as well, for the comparison:

    adapter/        best checkpoint (by validation accuracy, then format-valid rate)
    adapter_last/   the last step
    metrics.json    history of every validation (step 0 = before training)

Decoding (``RunOptions.decoding``):
    greedy       argmax tokens; ``raw`` keeps the text; label only if the text *is* a label
    sample       temperature / top_p; reproducible: an image is sampled with seed (seed, its pixels)
    constrained  log p(label tokens + terminator | prompt) summed for each of the two labels; the
                 larger wins and p_rain = softmax of the two sums. The terminator is included
                 because it is what the checkpoint emits after an answer: the score is "the answer is exactly this
                 label", not "the answer starts with it". It can only emit the two labels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

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
from rainclf.heads.answer_tokens import label_token_ids
from rainclf.heads.base import ClassifierBase, Row, label_for, rows_in_batches
from rainclf.heads.train import (
    outcome_metrics,
    restore,
    start_lora_fit,
    train_loop,
    write_model,
)
from rainclf.io import log
from rainclf.labels import LABELS
from rainclf.model import FitResult, ModelConfig, backbone_for
from rainclf.report.metrics import classification_metrics
from rainclf.report.quality import assess_answer, summarise

LAST_ADAPTER_DIR = "adapter_last"
DECODINGS = ("greedy", "sample", "constrained")
SOURCE = "generative"
IGNORE = -100   # label id that cross-entropy skips


def image_key(image) -> int:
    """A 48-bit integer from an image's pixels: the per-image part of a sampling seed."""
    import hashlib

    return int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:6], "little")


def answer_labels(input_ids, attention_mask, prompt_len: int):
    """Targets for answer-only loss: a copy of ``input_ids`` with -100 on padding and on the first
    ``prompt_len`` real tokens of each row (left or right padding alike); answer + terminator keep ids."""
    rank = attention_mask.cumsum(dim=1)            # 1-based position among the row's real tokens
    labels = input_ids.clone()
    labels[(attention_mask == 0) | (rank <= prompt_len)] = IGNORE
    return labels


class GenerativeModel:
    """A private GLM-4V backbone + its LoRA-wrapped model, as a chat model that answers in text."""

    def __init__(self, backbone, peft_model, prompt: str, dtype=None):
        self.backbone, self.peft_model, self.prompt, self.dtype = backbone, peft_model, prompt, dtype
        self.tokenizer = backbone.load()[1].tokenizer
        eos = self.peft_model.get_base_model().generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        # every id generation stops at: generation config, config.json (both levels), tokenizer EOS
        eos = eos + list(getattr(backbone, "stop_ids", []))
        self.eos_ids = sorted({int(e) for e in eos + [self.tokenizer.eos_token_id] if e is not None})
        self._prompt_len: int | None = None
        self.answer_ids: dict[str, list[int]] = {}

    @property
    def base(self):
        return self.peft_model.get_base_model()

    def _blank(self):
        from PIL import Image

        s = self.backbone.image_size
        return Image.new("RGB", (s, s))

    @property
    def prompt_len(self) -> int:
        """Tokens of the prompt (chat + image tokens): the same for every image, since every image
        is resized to the same square."""
        if self._prompt_len is None:
            self._prompt_len = int(self.backbone.chat_inputs([self._blank()], self.prompt)["attention_mask"].sum())
        return self._prompt_len

    def check_tokenisation(self) -> dict:
        """Each label's answer token ids (label + the checkpoint's terminator, heads/answer_tokens)."""
        self.answer_ids = label_token_ids(self.backbone, self.prompt, self._blank(), self.eos_ids)
        return self.answer_ids

    def named_trainable(self) -> list:
        return [(n, p) for n, p in self.peft_model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ scoring
    def _answer_logprobs(self, images, answers):
        """Per-row (sum of log p over answer tokens, number of answer tokens), both (N,) tensors."""
        import torch

        inputs = self.backbone.chat_inputs(images, self.prompt, answers=answers)
        labels = answer_labels(inputs["input_ids"], inputs["attention_mask"], self.prompt_len)
        hidden = self.base.model(**inputs).last_hidden_state      # (N, L, H)
        target = labels[:, 1:]                                     # token t+1 is predicted at t
        sel = target != IGNORE
        # lm_head only on answer positions: (M, vocab) instead of (N, L, vocab), which for the
        # 151k-token GLM vocabulary would dominate memory
        logits = self.base.lm_head(hidden[:, :-1][sel]).float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, target[sel].unsqueeze(1)).squeeze(1)
        rows = torch.arange(len(images), device=logp.device).unsqueeze(1).expand_as(target)[sel]
        total = torch.zeros(len(images), device=logp.device, dtype=logp.dtype).index_add(0, rows, logp)
        return total, sel.sum(dim=1)

    def loss(self, images, answers):
        """Mean cross-entropy per answer token (the training loss)."""
        total, count = self._answer_logprobs(images, answers)
        return -total.sum() / count.sum()

    def label_logprobs(self, images) -> np.ndarray:
        """(N, 2) float64: log p(label + terminator | image, prompt) for LABELS (不会下雨, 会下雨)."""
        import torch

        from rainclf.heads.constrained import answers_logprobs

        ids = self.answer_ids or self.check_tokenisation()   # one prefill, both continuations
        with torch.inference_mode(), autocast(self.backbone.device, self.dtype):
            total = answers_logprobs(self.base.model, self.base.lm_head,
                                     self.backbone.chat_inputs(images, self.prompt), [ids[lb] for lb in LABELS])
        return total.double().cpu().numpy().reshape(len(images), 2)

    def constrained_p_rain(self, images) -> np.ndarray:
        """p_rain = softmax over the two labels' sequence log-probabilities."""
        lp = self.label_logprobs(images)
        return 1.0 / (1.0 + np.exp(lp[:, 0] - lp[:, 1]))

    # ------------------------------------------------------------------ generation
    def generate(self, images, decoding: str = "greedy", max_new_tokens: int = 16, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, first_index: int = 0) -> list[str]:
        """Raw answers (text up to the first stop id, special tokens such as <think> kept)."""
        import torch
        from transformers import GenerationConfig

        if decoding not in ("greedy", "sample"):
            raise ValueError(f"generate: decoding {decoding!r} is not greedy or sample")
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=decoding == "sample",
                               temperature=temperature if decoding == "sample" else None,
                               top_p=top_p if decoding == "sample" else None,
                               top_k=0 if decoding == "sample" else None,   # 0: no top-k cut, only top_p
                               eos_token_id=self.eos_ids, pad_token_id=self.tokenizer.pad_token_id)
        if decoding == "greedy":
            groups = [list(range(len(images)))]
        else:
            # one image at a time with its own seed: answers do not depend on batch composition
            groups = [[i] for i in range(len(images))]
        texts: list[str] = [""] * len(images)
        dev = self.backbone.device
        for g in groups:
            inputs = self.backbone.chat_inputs([images[i] for i in g], self.prompt)
            with torch.random.fork_rng(devices=cuda_devices(dev)), torch.inference_mode(), \
                    autocast(dev, self.dtype):
                if decoding == "sample":
                    torch.manual_seed((seed * 1_000_003 + first_index + g[0]) % (2 ** 63))
                out = self.peft_model.generate(**inputs, generation_config=cfg)
            for i, ids in zip(g, out[:, inputs["input_ids"].shape[1]:].tolist()):
                cut = next((k for k, t in enumerate(ids) if t in self.eos_ids), len(ids))
                texts[i] = self.tokenizer.decode(ids[:cut], skip_special_tokens=False)
        return texts


def build_generative(backbone, params: LoraParams, prompt: str, seed: int = 0) -> GenerativeModel:
    """Fresh LoRA adapters on every language-model layer of a private backbone."""
    import torch

    backbone.load()   # first: the device decides which RNGs to fork
    with torch.random.fork_rng(devices=cuda_devices(backbone.device)):
        torch.manual_seed(seed)
        peft_model = attach_lora(backbone, params)
    return GenerativeModel(backbone, peft_model, prompt, amp_dtype(params.precision, backbone.device))


def evaluate_answers(gen: GenerativeModel, images, labels: Sequence[str], batch_size: int,
                     max_new_tokens: int) -> dict:
    """Validation figures: answer-token loss, greedy accuracy (an invalid answer is wrong),
    format-valid rate and mean length."""
    loss_sum, tokens, texts = 0.0, 0, []
    for lo in range(0, len(images), batch_size):
        ims, labs = images[lo:lo + batch_size], list(labels[lo:lo + batch_size])
        total, count = gen._answer_logprobs(ims, labs)
        loss_sum -= float(total.sum())
        tokens += int(count.sum())
        texts += gen.generate(ims, "greedy", max_new_tokens)
    q = summarise(texts)
    # exact answers only (rainclf.report.quality): the accuracy evaluate reports without --lenient
    acc = float(np.mean([assess_answer(t).label == y for t, y in zip(texts, labels)]))
    return {"val_loss": round(loss_sum / max(tokens, 1), 6), "val_accuracy": round(acc, 6),
            "val_format_valid": round(q["format_valid_rate"], 6), "val_mean_length": round(q["mean_length"], 3),
            "rank": (acc, q["format_valid_rate"]), "_texts": texts}


def fit_generative(train: list, val: list, out_dir, options: FitOptions) -> FitResult:
    """Fit the generative baseline on DATA and write its model directory to OUT_DIR (atomically)."""
    import torch

    data = start_lora_fit(train, val, options, what="answers")
    params, ctx, backbone = data.params, data.ctx, data.backbone
    tr_im, tr_y, va_im, va_y = data.tr_im, data.tr_y, data.va_im, data.va_y
    gen = build_generative(backbone, params, options.prompt, options.seed)
    answer_ids = gen.check_tokenisation()
    device = backbone.device
    tr_lab, va_lab = [LABELS[i] for i in tr_y], [LABELS[i] for i in va_y]
    if not tr_im:
        raise ValueError("no readable training image")

    def loss_fn(idx):
        return gen.loss([tr_im[i] for i in idx], [tr_lab[i] for i in idx])

    def evaluate():
        out = evaluate_answers(gen, va_im, va_lab, options.batch_size, params.max_new_tokens)
        out.pop("_texts")
        return out

    log(f"generative baseline: r {params.lora_r}, alpha {params.lora_alpha}, targets "
        f"{','.join(params.lora_targets)}, {params.steps} steps × {params.train_batch_size} × "
        f"{params.grad_accum}" + (f" × {ctx.world_size} processes" if ctx.is_distributed else "")
        + f" on {device}, loss on {len(answer_ids[LABELS[0]])}/{len(answer_ids[LABELS[1]])} "
        "answer tokens", options.progress)
    with torch.random.fork_rng(devices=cuda_devices(device)):
        torch.manual_seed(options.seed + ctx.rank)   # LoRA dropout: each rank draws its own masks
        outcome = train_loop(params, gen.named_trainable(), len(tr_im), loss_fn,
                             evaluate if va_im else None, [gen.peft_model], device, gen.dtype,
                             seed=options.seed, progress=options.progress, desc="generative")
    named = gen.named_trainable()
    restore(named, outcome.best_state)
    metrics = outcome_metrics(data, outcome, gen.dtype)
    metrics.update(
        answer_token_ids=answer_ids,
        selection=("validation greedy accuracy, then format-valid rate (not loss)" if va_im
                   else "last step (no validation split)"),
        checkpoints={ADAPTER_DIR: f"best (step {outcome.best_step})",
                     LAST_ADAPTER_DIR: f"last (step {outcome.steps_done})"})
    if va_im:
        with torch.no_grad(), autocast(device, gen.dtype):
            ev = evaluate_answers(gen, va_im, va_lab, options.batch_size, params.max_new_tokens)
        preds = [assess_answer(t).label for t in ev["_texts"]]
        metrics["validation"] = classification_metrics(va_lab, None, preds)           # greedy
        metrics["validation_quality"] = summarise(ev["_texts"])
        p = gen.constrained_p_rain(va_im)
        metrics["validation_constrained"] = classification_metrics(va_lab, p.tolist(), None, 0.5)
    config = ModelConfig(head="generative", backbone=backbone.describe(), feature="answer",
                         prompt=options.prompt, dim=backbone.hidden_size, threshold=0.5,
                         head_params=params.to_dict())

    def save_weights(tmp: Path) -> None:
        save_adapter(gen.peft_model, tmp / ADAPTER_DIR)
        restore(named, outcome.last_state)
        save_adapter(gen.peft_model, tmp / LAST_ADAPTER_DIR)
        restore(named, outcome.best_state)

    return write_model(out_dir, options, data, config, metrics, save_weights, seen=(train, val))


class GenerativeClassifier(ClassifierBase):
    """A generative model directory, answering for image files. ``checkpoint``: ``adapter``
    (best, default) or ``adapter_last``. greedy/sample answers are text, mapped to a label only
    when the text *is* one; constrained decoding scores both labels and can answer nothing else."""

    decodings = DECODINGS

    def __init__(self, config: ModelConfig, model_dir: Path, options: RunOptions,
                 checkpoint: str = ADAPTER_DIR):
        if options.decoding not in DECODINGS:
            raise ValueError(f"--decoding {options.decoding!r}: use {', '.join(DECODINGS)}")
        self.config, self.model_dir, self.options = config, Path(model_dir), options
        self.backbone = backbone_for(config, self.model_dir, options)   # a new object: ours alone
        peft_model = load_adapter(self.backbone, self.model_dir / checkpoint)
        self.model = GenerativeModel(self.backbone, peft_model, config.prompt or "",
                                     amp_dtype("auto", self.backbone.device))
        self.notes: list[str] = []

    @classmethod
    def from_model(cls, config: ModelConfig, model: GenerativeModel, options: RunOptions) -> "GenerativeClassifier":
        """Wrap an in-memory GenerativeModel (tests, reports) without a model directory."""
        self = cls.__new__(cls)
        self.config, self.model_dir, self.options = config, None, options
        self.backbone, self.model, self.notes = model.backbone, model, []
        return self

    @property
    def decoding(self) -> str:
        return self.options.decoding

    emits = "text"   # every decoding keeps the model's answer text in ``raw``

    def answer(self, images, first_index: int = 0) -> list[dict]:
        """One dict per image: label (or None), p_rain (constrained only), raw, format_valid."""
        o = self.options
        if o.decoding == "constrained":
            p = self.model.constrained_p_rain(images)
            out = []
            for pr in p:
                label = label_for(pr, self.config.threshold)
                out.append({"label": label, "p_rain": float(pr), "raw": label, "format_valid": True})
            return out
        texts = self.model.generate(images, o.decoding, o.max_new_tokens, o.temperature, o.top_p,
                                    o.seed, first_index)
        out = []
        for t in texts:
            q = assess_answer(t)
            out.append({"label": q.label, "p_rain": None, "raw": t, "format_valid": q.format_valid})
        return out

    def predict_proba(self, images) -> np.ndarray | None:
        """p_rain from the two label sequences' scores under constrained decoding; greedy and
        sample decoding give text, not a probability (None)."""
        if self.decoding != "constrained":
            return None
        return np.asarray(self.model.constrained_p_rain(list(images)), dtype=float)

    def predict_paths(self, paths: Sequence[str | Path]) -> list[Row]:
        o = self.options
        rows = rows_in_batches(paths, o.batch_size, self._answer_rows, self.backbone.prepare_images,
                               o.progress, desc=f"predict ({o.decoding})", source=SOURCE)
        answered = [r for r in rows if r.error is None]
        invalid = sum(not r.extra["format_valid"] for r in answered)
        self.notes = [f"generative ({o.decoding}): {invalid} of {len(answered)} answers were not exactly a "
                      "label (format_valid=false, no label given)"] if answered else []
        return rows

    def _answer_rows(self, images) -> list[Row]:
        # sampling seeds follow the image's pixels, not its position: the same photo gets the same
        # sampled answer for a given --seed whatever the order, batch size, or command (predict,
        # evaluate's one-at-a-time timing, a torchrun shard)
        if self.options.decoding == "sample":
            answers = [self.answer([im], first_index=image_key(im))[0] for im in images]
        else:
            answers = self.answer(images)
        return [Row("", a["label"], a["p_rain"], SOURCE,
                    extra={"raw": a["raw"], "format_valid": a["format_valid"],
                           "answer_length": assess_answer(a["raw"]).length}) for a in answers]

    def frozen_backbone(self):
        """This model's backbone seen with its LoRA adapters off: the frozen weights a head on
        the same backbone was trained on, so one copy of a 9B model serves head and fallback."""
        return AdapterOffBackbone(self.backbone, self.model.peft_model)


class AdapterOffBackbone:
    """A generative model's backbone with its LoRA adapters switched off while embedding."""

    def __init__(self, backbone, peft_model):
        self._backbone, self._peft_model = backbone, peft_model

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def embed(self, *args, **kwargs):
        with self._peft_model.disable_adapter():
            return self._backbone.embed(*args, **kwargs)
