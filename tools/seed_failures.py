"""Reproduce, on glm4v-tiny and ../shared/weather, what the seeds report about generative LoRA on
GLM-4V, and say plainly what reproduces at tiny scale and what does not.

    python tools/seed_failures.py [-o out/seed_failures] [--steps 48] [--quick]

Experiments (all on the same stratified subset of ../shared/weather: --train / --val photos):
  steps      format-valid rate, contains-label rate, answer length, loss against training steps,
             with EOS after the label (the rainclf recipe) and without (label only: the model
             never learns to stop)
  batch      batch 1 vs batch 4 at equal epochs (same samples seen, same lr: 4× the updates), and
             whether greedy answers change with the inference batch size
  sampling   answer variance across seeds: do_sample (temperature 1, top_p 1) vs greedy
  precision  fp32 / bf16 / fp16 training (autocast on the CPU): loss curve, non-finite steps, max
             |activation|, language mixing of the answers; once as is, once with activations
             above fp16's range injected (layer 0's MLP output scaled), because the tiny model's
             own activations are far too small to overflow

Writes report.md, results.json and plots/*.png (atomically). The generative model is
rainclf.heads.generative's GenerativeModel (answer-only loss, label + EOS); the training loop
here is a plain AdamW loop that, like a GradScaler, skips a step whose loss or gradient is not
finite and counts it. glm4v-tiny has RANDOM weights: it has no pretrained habit of describing
images, no real activation outliers and no language prior beyond its tiny BPE vocabulary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
FP16_MAX = 65504.0


# --------------------------------------------------------------------------- data and model

def load_subset(n_train: int, n_val: int, seed: int):
    from rainclf.data.datasets import load_dataset, stratified_split

    weather = REPO.parent / "shared" / "weather"
    source = weather / "train.jsonl" if (weather / "train.jsonl").is_file() else weather / "manifest.csv"
    if not source.is_file():
        raise SystemExit(f"seed_failures: {weather} not found (../shared/weather beside the checkout)")
    examples = load_dataset(source)
    _, subset = stratified_split(examples, (n_train + n_val) / len(examples), seed)
    train, val = stratified_split(subset, n_val / len(subset), seed)
    return train, val, source


def new_model(seed: int):
    """The generative LoRA model on its own glm4v-tiny (r 8, alpha 32, q/k/v/o), built once; every
    run starts from ``fresh(gen)``, the adapter as initialised (B = 0: the base model)."""
    from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions
    from rainclf.heads.adapters import LoraParams, private_backbone
    from rainclf.heads.generative import build_generative
    from rainclf.heads.train import _snapshot

    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    gen = build_generative(backbone, LoraParams(), DEFAULT_PROMPT, seed)
    gen.check_tokenisation()
    gen.initial_state = _snapshot(gen.named_trainable())
    return gen


def fresh(gen, state: dict | None = None):
    """Put the adapter back to its initial (or the given) state; returns ``gen``."""
    from rainclf.heads.train import restore

    restore(gen.named_trainable(), state or gen.initial_state)
    return gen


def snapshot(gen) -> dict:
    from rainclf.heads.train import _snapshot

    return _snapshot(gen.named_trainable())


def decode(gen, examples):
    from rainclf.data.images import decode_paths
    from rainclf.labels import LABELS

    images, errors = decode_paths([e.path for e in examples], gen.backbone.prepare_images)
    keep = [i for i, e in enumerate(errors) if e is None]
    return [images[i] for i in keep], [examples[i].label for i in keep if examples[i].label in LABELS]


def loss_without_eos(gen, images, answers):
    """Answer-only cross-entropy like GenerativeModel.loss, but the EOS after the label is not a
    target: what a recipe that forgets EOS trains."""
    import torch
    import torch.nn.functional as F

    from rainclf.heads.generative import IGNORE, answer_labels

    inputs = gen.backbone.chat_inputs(images, gen.prompt, answers=answers)
    labels = answer_labels(inputs["input_ids"], inputs["attention_mask"], gen.prompt_len)
    labels[torch.isin(labels, torch.tensor(gen.eos_ids))] = IGNORE
    hidden = gen.base.model(**inputs).last_hidden_state
    target = labels[:, 1:]
    sel = target != IGNORE
    return F.cross_entropy(gen.base.lm_head(hidden[:, :-1][sel]).float(), target[sel])


def validate(gen, images, labels, max_new_tokens: int) -> dict:
    import torch

    from rainclf.labels import normalise_label
    from rainclf.report.quality import summarise

    gen.peft_model.eval()
    with torch.no_grad():
        texts = gen.generate(images, "greedy", max_new_tokens)
    q = summarise(texts)
    acc = float(np.mean([normalise_label(t) == y for t, y in zip(texts, labels)]))
    return {"format_valid": q["format_valid_rate"], "contains_label": q["contains_label_rate"],
            "mean_length": q["mean_length"], "mixed_language": q["mixed_language_rate"], "accuracy": acc,
            "example": texts[0][:40]}


def train(gen, data, steps: int, batch: int, lr: float, eval_every: int, precision: str = "fp32",
          eos: bool = True, seed: int = 0, max_new_tokens: int = 16, watch: bool = False) -> dict:
    """AdamW on the LoRA weights; returns per-step losses, validations, non-finite steps, and with
    ``watch`` the largest |activation| seen in the language model."""
    import torch

    from rainclf.heads.train import minibatches

    tr_im, tr_y, va_im, va_y = data
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    params = [p for _, p in gen.named_trainable()]
    opt = torch.optim.AdamW(params, lr=lr)
    batches = minibatches(len(tr_im), batch, seed)
    peak = {"max_abs": 0.0}
    hooks = []
    if watch:
        def hook(_m, _a, out):
            t = out[0] if isinstance(out, tuple) else out
            peak["max_abs"] = max(peak["max_abs"], float(t.detach().abs().float().nan_to_num(posinf=math.inf).max()))
        for layer in gen.base.model.language_model.layers:
            hooks += [layer.mlp.register_forward_hook(hook), layer.self_attn.register_forward_hook(hook)]
    result = {"losses": [], "evals": [{"step": 0, **validate(gen, va_im, va_y, max_new_tokens)}], "nonfinite": 0}
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        gen.peft_model.train()
        idx = next(batches)
        ims, ys = [tr_im[i] for i in idx], [tr_y[i] for i in idx]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = gen.loss(ims, ys) if eos else loss_without_eos(gen, ims, ys)
        value = float(loss.detach())
        result["losses"].append(value)
        ok = math.isfinite(value)
        if ok:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            ok = bool(torch.isfinite(norm))
        if ok:
            opt.step()
        else:
            result["nonfinite"] += 1      # skipped, as a GradScaler would
        opt.zero_grad(set_to_none=True)
        if step % eval_every == 0 or step == steps:
            result["evals"].append({"step": step, **validate(gen, va_im, va_y, max_new_tokens)})
    for h in hooks:
        h.remove()
    result["seconds"] = time.perf_counter() - t0
    result["max_abs_activation"] = peak["max_abs"] if watch else None
    return result


def inject_outliers(gen, factor: float) -> None:
    """Scale layer 0's MLP down-projection so its output reaches ``factor`` × fp16's maximum on
    the first validation image: a stand-in for the large activations of a real 9B model."""
    import torch

    layer = gen.base.model.language_model.layers[0].mlp.down_proj
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("max", float(out.abs().max())))
    with torch.no_grad():
        gen.backbone.answer_hidden(gen.backbone.chat_inputs([gen._blank()], gen.prompt), -1, model=gen.base)
    handle.remove()
    with torch.no_grad():
        layer.weight.mul_(factor * FP16_MAX / seen["max"])


# --------------------------------------------------------------------------- experiments

def exp_steps(gen, data, args) -> dict:
    """With EOS for --steps (past the seeds' ~600 samples); without EOS for --short-steps."""
    out = {}
    for name, eos, steps in (("with EOS (rainclf recipe)", True, args.steps),
                             ("without EOS", False, args.short_steps)):
        out[name] = train(fresh(gen), data, steps, 4, args.lr, args.eval_every, eos=eos,
                          seed=args.seed, max_new_tokens=args.max_new_tokens)
        if eos:
            gen.trained_state = snapshot(gen)
    return out


def exp_batch(gen, data, args, long_run: dict) -> dict:
    """Batch 1 for 4 × --short-steps against the first --short-steps of the batch-4 run."""
    n = args.short_steps
    batch4 = {"losses": long_run["losses"][:n], "evals": [e for e in long_run["evals"] if e["step"] <= n],
              "nonfinite": long_run["nonfinite"]}
    b1 = train(fresh(gen), data, 4 * n, 1, args.lr, 4 * args.eval_every, seed=args.seed,
               max_new_tokens=args.max_new_tokens)
    fresh(gen, gen.trained_state)          # the trained batch-4 model of the steps experiment
    va_im = data[2]
    one = [t for im in va_im for t in gen.generate([im], "greedy", args.max_new_tokens)]
    four = [t for lo in range(0, len(va_im), 4) for t in gen.generate(va_im[lo:lo + 4], "greedy", args.max_new_tokens)]
    same = float(np.mean([a == b for a, b in zip(one, four)]))
    return {"batch 1": b1, "batch 4": batch4, "inference_batch_identical": same}


def exp_sampling(gen, data, args) -> dict:
    from rainclf.labels import normalise_label
    from rainclf.report.quality import summarise

    fresh(gen, gen.trained_state)
    va_im, va_y = data[2][:args.sample_images], data[3][:args.sample_images]
    per_seed, greedy = {}, {}
    for seed in range(args.seeds):
        per_seed[seed] = gen.generate(va_im, "sample", args.max_new_tokens, 1.0, 1.0, seed)
        greedy[seed] = gen.generate(va_im, "greedy", args.max_new_tokens)

    def distinct(runs):
        return float(np.mean([len({runs[s][i] for s in runs}) for i in range(len(va_im))]))

    def stats(runs):
        return [{"format_valid": summarise(t)["format_valid_rate"],
                 "accuracy": float(np.mean([normalise_label(a) == y for a, y in zip(t, va_y)]))} for t in runs.values()]

    return {"sample": {"distinct_answers_per_image": distinct(per_seed), "per_seed": stats(per_seed),
                       "examples": [per_seed[s][0][:40] for s in per_seed]},
            "greedy": {"distinct_answers_per_image": distinct(greedy), "per_seed": stats(greedy),
                       "examples": [greedy[s][0][:40] for s in greedy]}}


def exp_precision(gen, data, args) -> dict:
    import torch

    out = {}
    down = gen.base.model.language_model.layers[0].mlp.down_proj.weight
    original = down.detach().clone()
    for injected in (False, True):
        for precision in ("fp32", "bf16", "fp16"):
            fresh(gen)
            with torch.no_grad():
                down.copy_(original)
            if injected:
                inject_outliers(gen, 2.0)
            out[f"{precision}{' + outliers' if injected else ''}"] = train(
                gen, data, args.precision_steps, 4, args.lr, args.precision_steps, precision=precision,
                seed=args.seed, max_new_tokens=args.max_new_tokens, watch=True)
    with torch.no_grad():
        down.copy_(original)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--out", type=Path, default=REPO / "out" / "seed_failures")
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--val", type=int, default=32)
    ap.add_argument("--steps", type=int, default=160, help="batch-4 steps with EOS (160 × 4 = 640 samples)")
    ap.add_argument("--short-steps", type=int, default=48,
                    help="batch-4 steps without EOS, and of the batch 1 vs 4 comparison")
    ap.add_argument("--eval-every", type=int, default=8)
    ap.add_argument("--sample-images", type=int, default=16, help="validation images of the sampling experiment")
    ap.add_argument("--precision-steps", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3, help="higher than the 1e-4 default: the tiny model learns slowly")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run (a minute): tiny sizes everywhere")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.val, args.steps, args.short_steps, args.eval_every = 16, 8, 8, 4, 4
        args.precision_steps, args.seeds, args.sample_images = 3, 2, 4

    import platform

    import torch
    from seed_failures_report import markdown, plots, verdicts

    from rainclf.io import atomic_dir

    start = time.perf_counter()
    train_ex, val_ex, source = load_subset(args.train, args.val, args.seed)
    gen = new_model(args.seed)
    data = (*decode(gen, train_ex), *decode(gen, val_ex))
    results: dict = {"majority_rate": max(data[3].count(y) for y in set(data[3])) / len(data[3])}
    for name in ("steps", "batch", "sampling", "precision"):
        t = time.perf_counter()
        if name == "steps":
            results["steps"] = exp_steps(gen, data, args)
        elif name == "batch":
            results["batch"] = exp_batch(gen, data, args, results["steps"]["with EOS (rainclf recipe)"])
        elif name == "sampling":
            results["sampling"] = exp_sampling(gen, data, args)
        else:
            results["precision"] = exp_precision(gen, data, args)
        print(f"seed_failures: {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    meta = {"data": str(source), "n_train": len(data[0]), "n_val": len(data[2]), "lr": args.lr,
            "max_new_tokens": args.max_new_tokens, "seconds": time.perf_counter() - start,
            "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"}
    with atomic_dir(args.out, overwrite=True) as tmp:
        files = plots(results, tmp)
        (tmp / "results.json").write_text(json.dumps({"meta": meta, **results}, indent=2, ensure_ascii=False),
                                          encoding="utf-8")
        (tmp / "report.md").write_text(markdown(results, files, meta), encoding="utf-8")
    for v in verdicts(results):
        print(f"- {v}")
    print(f"wrote {args.out}/report.md ({meta['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
