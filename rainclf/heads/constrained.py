"""Constrained scoring with one prefill: log p(answer tokens | image, prompt) for several fixed
answers (the two labels, each with its terminator), sharing one image + prompt forward pass.

The old way duplicated every image and ran the vision tower and the whole prompt once per label.
Here the prompt (chat + image tokens, identical length for every image since images are resized to
one square) runs once with a KV cache; the cache is repeated once per answer and all answers'
tokens are scored in one batched continuation step:

    prefill   input (N, P)            → hidden (N, P, H), cache of P positions
    cache     repeat_interleave(A)    → N·A rows (row n·A + a: image n, answer a)
    continue  answer tokens (N·A, T)  → hidden (N·A, T, H), T = longest answer, right-padded

log p(answer_a[0]) comes from the prefill's last position; log p(answer_a[j]) for j ≥ 1 from the
continuation's position j-1. Right padding sits after every real token, so causal attention keeps
it out of every score.
"""

from __future__ import annotations

import inspect
from typing import Sequence


def _cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    raise RuntimeError("the model returned no KV cache for the prompt (use_cache=True)")


def answers_logprobs(model, lm_head, inputs: dict, answer_ids: Sequence[Sequence[int]]):
    """(N, A) float32 tensor: sum over each answer's tokens of log p(token | image, prompt, earlier
    answer tokens). ``model``: the multimodal body (``Glm4vModel``, LoRA layers active if any);
    ``inputs``: the processor's prompt-only batch (no padding: every prompt has the same length);
    ``answer_ids``: A token-id lists (label + terminator), as the two-pass scorer appended them."""
    import torch

    mask = inputs["attention_mask"]
    n, plen = mask.shape
    if not bool(mask.all()):
        raise ValueError("one-prefill scoring needs prompts of one length (images resized to one square)")
    a = len(answer_ids)
    lengths = [len(ids) for ids in answer_ids]
    if min(lengths) < 1:
        raise ValueError("every answer needs at least one token")
    dev = mask.device

    out = model(**inputs, use_cache=True)
    first = lm_head(out.last_hidden_state[:, -1]).float().log_softmax(-1)          # (N, vocab)
    cache = _returned_cache(out)

    # M-RoPE: text after the image continues from the prompt's last position in all 3 axes;
    # computed here rather than left to the model, which would infer it from cached rope deltas
    accepted = inspect.signature(model.get_rope_index).parameters
    rope_args = {k: inputs[k] for k in ("image_grid_thw", "mm_token_type_ids") if k in inputs and k in accepted}
    positions, _ = model.get_rope_index(inputs["input_ids"], attention_mask=mask, **rope_args)
    last = positions[:, :, -1].to(dev)                                               # (3, N)

    t = max(lengths)
    ids = torch.zeros(n * a, t, dtype=torch.long, device=dev)
    valid = torch.zeros(n * a, t, dtype=torch.bool, device=dev)
    for k, seq in enumerate(answer_ids):
        ids[k::a, :len(seq)] = torch.tensor(list(seq), device=dev)
        valid[k::a, :len(seq)] = True
    total = first.repeat_interleave(a, dim=0).gather(1, ids[:, :1]).squeeze(1)       # (N·A,)
    if t > 1:
        cache.batch_repeat_interleave(a)
        step = ids[:, :-1]                                                          # inputs j = 0..T-2
        pos = last.repeat_interleave(a, dim=1).unsqueeze(-1) + 1 + torch.arange(t - 1, device=dev)
        full_mask = torch.cat([mask.repeat_interleave(a, dim=0), valid[:, :-1].long()], dim=1)
        kwargs = {_cache_kwarg(model.language_model): cache}
        hidden = model.language_model(input_ids=step, attention_mask=full_mask, position_ids=pos,
                                      use_cache=True, **kwargs).last_hidden_state  # (N·A, T-1, H)
        sel = valid[:, 1:]                                                          # token j+1 at j
        logp = lm_head(hidden[sel]).float().log_softmax(-1).gather(1, ids[:, 1:][sel].unsqueeze(1)).squeeze(1)
        rows = torch.arange(n * a, device=dev).unsqueeze(1).expand_as(sel)[sel]
        total = total.index_add(0, rows, logp)
    return total.view(n, a)


def two_pass_logprobs(gen, images, answers: Sequence[str]):
    """(N, A) float64 numpy: the scorer this module replaces, kept as the reference for tests and
    ``tools/bench_constrained.py``: every image repeated once per answer, one full forward pass
    (vision tower + prompt + answer) per (image, answer) row. ``gen``: a GenerativeModel."""
    import torch

    from rainclf.heads.adapters import autocast

    rows = [im for im in images for _ in answers]
    texts = [ans for _ in images for ans in answers]
    with torch.inference_mode(), autocast(gen.backbone.device, gen.dtype):
        total, _ = gen._answer_logprobs(rows, texts)
    return total.double().cpu().numpy().reshape(len(images), len(answers))
