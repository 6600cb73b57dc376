"""The torch modules traced into ONNX: GLM-4V's vision tower rewritten batch-first, the answer
feature's fixed-prompt prefill, and the affine head, composed as ``ImageGraph`` (pixel_values →
logits, p_rain, embeddings).

Why rewritten: transformers' own forward does not export (see ``export.DIRECT_EXPORT_FAILURES``):
position-dependent tensors (interpolated position embeddings, rotary cos/sin, the first decoder
layer's inputs) are captured from one real forward (``_capture``) and baked in as constants, so
the traced graph holds only batch-independent matrix work at the model's fixed image size.
"""

from __future__ import annotations

import torch

from rainclf.heads.base import HeadArrays
from rainclf.model import ModelConfig
from rainclf.onnx.format import InputSpec


class ExportFailure(RuntimeError):
    """The image graph cannot be built or does not match torch: the head graph is still written."""


class HeadGraph(torch.nn.Module):
    def __init__(self, head: HeadArrays):
        super().__init__()
        for name in ("mean", "scale", "weight", "bias"):
            self.register_buffer(name, torch.tensor(getattr(head, name), dtype=torch.float32))

    def forward(self, x):                                    # x (B, dim)
        logits = ((x - self.mean) / self.scale) @ self.weight.T + self.bias
        return logits, torch.sigmoid(logits[:, 1] - logits[:, 0])


class VisionTokens(torch.nn.Module):
    """GLM-4V's vision tower, batched: [B·P, patch_dim] → merged tokens [B, P/m², out_hidden], or
    with ``pooled`` their mean per image [B, out_hidden] (the ``vision`` feature)."""

    def __init__(self, visual, pos_embed, cos, sin, pooled: bool = False):
        super().__init__()
        self.visual, self.n, self.pooled = visual, int(pos_embed.shape[0]), pooled
        self.register_buffer("pos_embed", pos_embed.detach().clone())    # (P, C)
        self.register_buffer("cos", cos.detach().clone().unsqueeze(-2))  # (P, 1, head_dim)
        self.register_buffer("sin", sin.detach().clone().unsqueeze(-2))

    def attention(self, attn, x):                           # x (B, P, C)
        q, k, v = attn.qkv(x).reshape(-1, self.n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 1, 3, 4)
        q, k = (t * self.cos + _rotate_half(t) * self.sin for t in (q, k))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))     # (B, heads, P, head_dim)
        w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * attn.scaling, dim=-1)
        return attn.proj(torch.matmul(w, v).transpose(1, 2).reshape(-1, self.n, attn.dim))

    def forward(self, pixel_values):
        v = self.visual
        h = v.post_conv_layernorm(v.patch_embed(pixel_values))
        h = h.view(-1, self.n, h.shape[-1]) + self.pos_embed
        for blk in v.blocks:
            h = h + self.attention(blk.attn, blk.norm1(h))
            h = h + blk.mlp(blk.norm2(h))
        h = v.post_layernorm(h)
        m = v.spatial_merge_size
        h = v.downsample(h.reshape(-1, m, m, h.shape[-1]).permute(0, 3, 1, 2))
        h = v.merger(h.view(-1, v.config.out_hidden_size))
        h = h.view(-1, self.n // (m * m), h.shape[-1])
        return h.mean(dim=1) if self.pooled else h


def _rotate_half(t):
    half = t.shape[-1] // 2
    return torch.cat((-t[..., half:], t[..., :half]), dim=-1)


class Prefill(torch.nn.Module):
    """The ``answer`` feature: the fixed chat prompt with the image's tokens spliced in, run through
    the first ``k`` decoder layers (final norm when k is the last) → hidden state at the last position."""

    def __init__(self, tokens: VisionTokens, lm, prefix, suffix, mask, cos, sin, k: int, position_ids=None):
        super().__init__()
        self.tokens, self.layers = tokens, torch.nn.ModuleList(list(lm.layers)[:k])
        self.norm = lm.norm if k == len(lm.layers) else None
        for name, t in dict(prefix=prefix, suffix=suffix, mask=mask, cos=cos, sin=sin).items():
            self.register_buffer(name, t.detach().clone())   # batch 1: broadcast over the batch
        # glm4v_moe's decoder layers take the (fixed) position ids too: a constant like cos/sin
        self.register_buffer("position_ids", None if position_ids is None else position_ids.detach().clone())

    def forward(self, pixel_values):
        img = self.tokens(pixel_values)
        b = img.shape[0]
        x = torch.cat([self.prefix.expand(b, -1, -1), img.to(self.prefix.dtype),
                       self.suffix.expand(b, -1, -1)], dim=1)
        for layer in self.layers:
            x = layer(x, position_embeddings=(self.cos, self.sin), attention_mask=self.mask,
                      position_ids=self.position_ids, cache=None, use_cache=False)
            x = x[0] if isinstance(x, tuple) else x
        return (self.norm(x) if self.norm is not None else x)[:, -1, :]


class ImageGraph(torch.nn.Module):
    def __init__(self, features, head: HeadGraph):
        super().__init__()
        self.features, self.head = features, head

    def forward(self, pixel_values):
        e = self.features(pixel_values).float()
        logits, p = self.head(e)
        return logits, p, e


def _capture(model, inputs: dict, answer: bool) -> dict:
    """Position-only tensors from one real forward: the vision tower's interpolated position
    embeddings and rotary cos/sin, and (answer) what the first decoder layer receives."""
    visual, cap = model.model.visual, {}
    hooks = [visual.embeddings.register_forward_hook(
                 lambda m, a, kw, out: cap.update(emb=(a, kw)), with_kwargs=True),
             visual.blocks[0].register_forward_pre_hook(
                 lambda m, a, kw: cap.update(vision_pe=kw["position_embeddings"]), with_kwargs=True)]
    if answer:
        hooks.append(model.model.language_model.layers[0].register_forward_pre_hook(
            lambda m, a, kw: cap.update(text=(a[0] if a else kw["hidden_states"], kw)), with_kwargs=True))
    try:
        with torch.no_grad():
            if answer:
                model.model(**inputs, use_cache=False)
            else:
                model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                               image_grid_thw=inputs["image_grid_thw"])
            (emb, *rest), kw = cap["emb"]
            cap["pos_embed"] = visual.embeddings(torch.zeros_like(emb), *rest, **kw)
    finally:
        for h in hooks:
            h.remove()
    return cap


def assemble(config: ModelConfig, backbone, model, head: HeadArrays, images, prompt: str):
    """(ImageGraph, InputSpec, prompt token ids or None) from a loaded GLM-4V model."""
    model.set_attn_implementation("eager")   # sdpa with GQA has no legacy ONNX conversion
    if hasattr(model.config.get_text_config(), "n_routed_experts"):
        # glm4v_moe: the eager experts loop over the experts *this* input hits, which a trace would
        # bake in; batched_mm gathers each token's experts by index, the same graph for any image
        model.set_experts_implementation("batched_mm")
    spec = spec_from_processor(backbone.load()[1].image_processor, backbone.image_size)
    answer = config.feature == "answer"
    inputs = backbone.chat_inputs(images[:1], prompt) if answer else backbone.vision_inputs(images[:1])
    cap = _capture(model, inputs, answer)
    tokens = VisionTokens(model.model.visual, cap["pos_embed"], *cap["vision_pe"], pooled=not answer)
    if not answer:
        return ImageGraph(tokens, HeadGraph(head)), spec, None
    ids = inputs["input_ids"][0]
    where = (ids == model.config.image_token_id).nonzero().flatten()
    start, n_img = int(where[0]), len(where)
    if n_img != spec.patches_per_image // spec.merge_size ** 2 or int(where[-1]) != start + n_img - 1:
        raise ExportFailure(f"the chat prompt holds {n_img} image tokens, not one run of "
                            f"{spec.patches_per_image // spec.merge_size ** 2}")
    h0, kw = cap["text"]
    extra = [k for k, v in kw.items() if torch.is_tensor(v) and k not in ("attention_mask", "position_ids")]
    if extra or kw.get("attention_mask") is None:
        raise ExportFailure(f"the decoder layers take tensors this export does not handle: {extra}, "
                            f"attention_mask {'missing' if kw.get('attention_mask') is None else 'present'}")
    k = config.layer % (backbone.num_layers + 1)
    prefill = Prefill(tokens, model.model.language_model, h0[:, :start], h0[:, start + n_img:],
                      kw["attention_mask"], *kw["position_embeddings"], k, kw.get("position_ids"))
    return ImageGraph(prefill, HeadGraph(head)), spec, ids.tolist()



def spec_from_processor(proc, image_size: int) -> InputSpec:
    return InputSpec(image_size=image_size, patch_size=proc.patch_size, merge_size=proc.merge_size,
                     temporal_patch_size=proc.temporal_patch_size, rescale_factor=proc.rescale_factor,
                     image_mean=tuple(proc.image_mean), image_std=tuple(proc.image_std),
                     do_rescale=proc.do_rescale, do_normalize=proc.do_normalize)
