"""``rainclf export``: a model directory → ONNX graphs + ``rainclf_onnx.json`` for the torch-free
runtime (``rainclf.onnx.runtime``) and ``rainclf predict --engine onnx``.

    head   embeddings [batch, dim] → logits [batch, 2], p_rain [batch]                  (always)
    image  pixel_values [batch·P, 3·T·p·p] (the GLM-4V processor's flat patches at the model's
           fixed image size, P patches per image) → vision tower → vision: mean of the merged
           tokens | answer, LoRA: prefill of the chat prompt up to the head's layer
           → head → logits, p_rain, embeddings [batch, dim]          (--include-backbone)
           timm backbones (efficientnet-lite0): pixel_values [batch, 3, S, S] → pooled features
           → head (onnx/timm_graph.py)

``model.onnx`` is the image graph when there is one, else the head graph; ``head.onnx`` holds the
head graph beside an image graph. Weights move to ``model.onnx.data`` past protobuf's 2 GB.
Both graphs have a dynamic batch; the image size is fixed. Legacy TorchScript exporter
(``dynamo=False``) throughout.

Why the image graph re-assembles transformers' submodules instead of tracing the model:
tracing ``model.model(...)`` fails (see ``DIRECT_EXPORT_FAILURES``) and the vision tower packs a
batch into one sequence split by ``cu_seqlens.tolist()``, which tracing freezes to one batch size.
So the same submodules and weights run batched ([B, P, C]); what depends on positions only
(rotary cos/sin, interpolated position embeddings, the causal mask, the prompt's embeddings) is
captured from one real forward at the fixed size and stored as constants. Attention is eager.
Each image graph is compared with torch on synthetic images before it is kept; one that cannot be
exported or does not match is left out, with the reason in ``not_exported``.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rainclf.backbones.base import DEFAULT_PROMPT
from rainclf.config import RunOptions
from rainclf.io import atomic_dir
from rainclf.model import ModelConfig, ModelDirError, backbone_for, read_config
from rainclf.onnx.engine import head_sha256
from rainclf.onnx.format import EXPORT_DIR, METADATA_FILE, InputSpec, OnnxMetadata
from rainclf.onnx.runtime import preprocess

EXTERNAL_DATA_LIMIT = 2 * 1024 ** 3 - 64 * 1024 ** 2   # protobuf caps a file at 2 GB
PARITY_TOL = 1e-4                                      # max |Δp_rain| torch vs onnxruntime
MIN_OPSET = 14                                         # scaled_dot_product_attention, Trilu
MAX_OPSET = getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
DIRECT_EXPORT_FAILURES = (
    "tracing transformers' own forward (transformers 5.24, torch 2.14): dynamo=True fails in "
    "torch.export on the vision attention's torch.split(lengths.tolist()) (GuardOnDataDependentSymNode, "
    "modeling_glm4v.py:379); dynamo=False on model.model(...) fails with 'All tensors must have the "
    "same rank' at aten::cat in the text apply_rotary_pos_emb (modeling_glm4v.py:531); with that patched, "
    "'conversion of scaled_dot_product_attention not implemented if enable_gqa is True'; with eager "
    "attention the graph exports but onnxruntime refuses it: Split in lm/rotary_emb (M-RoPE "
    "recomposition) 'Mismatch between the sum of split (4) and the split dimension of the input (35)'")


class ExportFailure(RuntimeError):
    """The image graph cannot be built or does not match torch (the head graph is still written)."""


@dataclass
class HeadArrays:
    """Any rainclf head as one affine map: logits = ((x - mean) / scale) @ weight.T + bias."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray      # (2, dim), rows in LABELS order
    bias: np.ndarray        # (2,)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def p_rain(self, x: np.ndarray) -> np.ndarray:
        logits = ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight.T + self.bias
        return 1.0 / (1.0 + np.exp(-(logits[:, 1] - logits[:, 0])))


def head_arrays(config: ModelConfig, model_dir: Path) -> HeadArrays:
    if config.head == "linear":
        from rainclf.heads.linear import LinearHead

        h = LinearHead.load(model_dir)
        return HeadArrays(h.mean_, h.scale_, np.stack([np.zeros_like(h.coef_), h.coef_]),
                          np.array([0.0, h.intercept_]))
    if config.head == "lora":
        from safetensors.numpy import load_file

        t = load_file(str(model_dir / "score.safetensors"))
        w = t["weight"].astype(np.float64)
        return HeadArrays(np.zeros(w.shape[1]), np.ones(w.shape[1]), w, t["bias"].astype(np.float64))
    raise ModelDirError(f"{model_dir}: {config.head} heads cannot be exported to ONNX (only linear and "
                        "lora heads; a generative head answers through a decoding loop)")


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

    def __init__(self, tokens: VisionTokens, lm, prefix, suffix, mask, cos, sin, k: int):
        super().__init__()
        self.tokens, self.layers = tokens, torch.nn.ModuleList(list(lm.layers)[:k])
        self.norm = lm.norm if k == len(lm.layers) else None
        for name, t in dict(prefix=prefix, suffix=suffix, mask=mask, cos=cos, sin=sin).items():
            self.register_buffer(name, t.detach().clone())   # batch 1: broadcast over the batch

    def forward(self, pixel_values):
        img = self.tokens(pixel_values)
        b = img.shape[0]
        x = torch.cat([self.prefix.expand(b, -1, -1), img.to(self.prefix.dtype),
                       self.suffix.expand(b, -1, -1)], dim=1)
        for layer in self.layers:
            x = layer(x, position_embeddings=(self.cos, self.sin), attention_mask=self.mask,
                      position_ids=None, cache=None, use_cache=False)
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


# ------------------------------------------------------------------ building the image graph

def synthetic_images(n: int = 3, seed: int = 0):
    """Photos-like test inputs of odd sizes (noise over gradients) for the export's parity check."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate([(131, 97), (77, 149), (112, 112), (203, 64)][:n]):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200 + 30 * i
        out.append(Image.fromarray(np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)))
    return out


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


def build_image_graph(config: ModelConfig, model_dir: Path, head: HeadArrays):
    """(ImageGraph, InputSpec, prompt token ids, synthetic images, torch p_rain, torch embeddings)."""
    kind = config.backbone.get("kind")
    options = RunOptions(device="cpu", cache_dir=None, progress=False)
    if kind == "timm" and config.head == "linear":   # efficientnet-lite0, timm:NAME (onnx/timm_graph.py)
        from rainclf.onnx.timm_graph import timm_features

        images = synthetic_images()
        features, spec, ref_emb = timm_features(backbone_for(config, model_dir, options), images)
        return ImageGraph(features, HeadGraph(head)), spec, None, images, head.p_rain(ref_emb), ref_emb
    if kind != "glm4v":
        raise ExportFailure(f"--include-backbone supports GLM-4V and timm backbones; this one is {kind!r}")
    images, prompt = synthetic_images(), config.prompt or DEFAULT_PROMPT
    ref_emb = None
    if config.head == "lora":
        from rainclf.heads.lora import LoraClassifier

        clf = LoraClassifier(config, model_dir, options)
        backbone, ref_p = clf.backbone, clf.head.p_rain(images)
        model = clf.head.peft_model.merge_and_unload()        # LoRA folded into the weights
    else:
        backbone = backbone_for(config, model_dir, options)
        ref_emb = backbone.embed(images, config.feature, config.layer, prompt)
        ref_p, model = head.p_rain(ref_emb), backbone.load()[0]
    try:
        built = _assemble(config, backbone, model, head, images, prompt)
    except ExportFailure:
        raise
    except Exception as e:   # another architecture than the one this was written for: say what broke
        raise ExportFailure(f"assembling the image graph failed: {type(e).__name__}: {_one_line(e)}") from e
    return built + (images, ref_p, ref_emb)


def _assemble(config: ModelConfig, backbone, model, head: HeadArrays, images, prompt: str):
    """(ImageGraph, InputSpec, prompt token ids or None) from a loaded GLM-4V model."""
    model.set_attn_implementation("eager")   # sdpa with GQA has no legacy ONNX conversion
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
    extra = [k for k, v in kw.items() if torch.is_tensor(v) and k != "attention_mask"]
    if extra or kw.get("attention_mask") is None:
        raise ExportFailure(f"the decoder layers take tensors this export does not handle: {extra}, "
                            f"attention_mask {'missing' if kw.get('attention_mask') is None else 'present'}")
    k = config.layer % (backbone.num_layers + 1)
    prefill = Prefill(tokens, model.model.language_model, h0[:, :start], h0[:, start + n_img:],
                      kw["attention_mask"], *kw["position_embeddings"], k)
    return ImageGraph(prefill, HeadGraph(head)), spec, ids.tolist()


# ------------------------------------------------------------------ writing

def _onnx():
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the parity check runs it)
    except ImportError:
        raise ImportError("rainclf export needs onnx and onnxruntime: pip install 'rainclf[onnx]'") from None
    return onnx


def _save_graph(module, example, path: Path, input_name: str, outputs: list[str], opset: int,
                config: ModelConfig) -> dict:
    """Legacy export to a scratch folder, then one file (+ one .data file past 2 GB), checked."""
    onnx = _onnx()
    raw = path.parent / f"raw-{path.stem}"   # the exporter may write one file per tensor past 2 GB
    raw.mkdir()
    axes = {input_name: {0: "patches" if input_name == "pixel_values" else "batch"}}
    axes.update({name: {0: "batch"} for name in outputs})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # TracerWarnings: sizes are meant to be constants here
            torch.onnx.export(module.eval(), (example,), str(raw / path.name), dynamo=False,
                              opset_version=opset, input_names=[input_name], output_names=outputs,
                              dynamic_axes=axes, do_constant_folding=True)
        model = onnx.load(str(raw / path.name))
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    model.producer_name, model.doc_string = "rainclf", f"rainclf {config.head} head, labels {config.labels}"
    external = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_LIMIT
    data = path.name + ".data" if external else None
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    return {"file": path.name, "external_data": data, "opset": opset,
            "exporter": "torch.onnx.export(dynamo=False)"}


def _run(path: Path, feed: dict, outputs: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(outputs, feed)


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or
                             (any(out_dir.iterdir()) and not (out_dir / METADATA_FILE).is_file())):
        raise FileExistsError(f"{out_dir} exists and is not a rainclf ONNX export: choose another -o")


def export_onnx(model_dir: str | Path, out_dir: str | Path | None = None, include_backbone: bool = False,
                opset: int = 18) -> dict:
    """Write the head graph (and with ``include_backbone`` the image graph) plus rainclf_onnx.json
    into ``out_dir`` (default MODEL_DIR/onnx), atomically; returns the metadata as a dict with
    ``out_dir`` added. An existing export there is replaced."""
    _onnx()
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset}: the TorchScript exporter supports opsets {MIN_OPSET}..{MAX_OPSET}")
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    head = head_arrays(config, model_dir)
    if config.dim is not None and head.dim != config.dim:
        raise ModelDirError(f"{model_dir}: the head takes {head.dim}-d inputs but config.json says {config.dim}")
    out_dir = Path(out_dir) if out_dir else model_dir / EXPORT_DIR
    _check_replaceable(out_dir)
    meta = OnnxMetadata(labels=list(config.labels), threshold=config.threshold, head=config.head,
                        feature=config.feature, dim=head.dim,
                        backbone=dict(config.backbone), graphs={}, opset=opset,
                        head_sha256=head_sha256(config, model_dir), layer=config.layer,
                        prompt=config.prompt if config.feature == "answer" else None)
    built = None
    if include_backbone:
        try:
            built = build_image_graph(config, model_dir, head)
        except ExportFailure as e:
            meta.not_exported["image"] = str(e)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        if built is not None:
            _write_image_graph(tmp, built, meta, opset, config)
        head_file = "head.onnx" if "image" in meta.graphs else "model.onnx"
        entry = _save_graph(HeadGraph(head), torch.zeros(2, head.dim), tmp / head_file, "embeddings",
                            ["logits", "p_rain"], opset, config)
        entry.update(inputs={"embeddings": ["batch", head.dim]},
                     outputs={"logits": ["batch", 2], "p_rain": ["batch"]}, batch="dynamic")
        meta.graphs["head"] = entry
        rng = np.random.default_rng(0)
        x = (head.mean + head.scale * rng.normal(0, 1.5, (16, head.dim))).astype(np.float32)
        meta.parity["head"] = {"n_rows": 16, "max_abs_dp": float(np.abs(
            _run(tmp / head_file, {"embeddings": x}, ["p_rain"])[0] - head.p_rain(x)).max())}
        if meta.input is None:
            meta.input = _input_spec_if_known(config)
        (tmp / METADATA_FILE).write_text(meta.to_json(), encoding="utf-8")
    return {"out_dir": str(out_dir), **asdict(meta)}


def _write_image_graph(tmp: Path, built: tuple, meta: OnnxMetadata, opset: int, config: ModelConfig) -> None:
    """model.onnx, kept only if onnxruntime gives torch's p_rain on the synthetic images."""
    graph, spec, ids, images, ref_p, ref_emb = built
    px = preprocess(images, spec)
    try:
        entry = _save_graph(graph, torch.from_numpy(px[: 2 * spec.rows_per_image]), tmp / "model.onnx",
                            "pixel_values", ["logits", "p_rain", "embeddings"], opset, config)
        p, emb = _run(tmp / "model.onnx", {"pixel_values": px}, ["p_rain", "embeddings"])
    except Exception as e:   # the exporter's own errors vary: keep the head graph, say why
        meta.not_exported["image"] = f"{type(e).__name__}: {_one_line(e)}"
    else:
        dp = float(np.abs(p.astype(np.float64) - ref_p).max())
        meta.parity["image"] = {"n_images": len(images), "max_abs_dp": dp, "max_abs_d_embedding":
                                None if ref_emb is None else float(np.abs(emb - ref_emb).max())}
        if dp <= PARITY_TOL:
            entry.update(outputs={"logits": ["batch", 2], "p_rain": ["batch"], "embeddings": ["batch", meta.dim]},
                         batch="dynamic", **spec.graph_facts())
            meta.graphs["image"], meta.input, meta.prompt_token_ids = entry, spec.to_dict(), ids
            return
        meta.not_exported["image"] = (f"onnxruntime differs from torch by {dp:.2e} in p_rain on "
                                      f"synthetic images (tolerance {PARITY_TOL})")
    for f in tmp.glob("model.onnx*"):
        f.unlink()


def _one_line(e: Exception, limit: int = 600) -> str:
    return " ".join(str(e).split())[:limit]


def _input_spec_if_known(config: ModelConfig) -> dict | None:
    """The backbone's preprocessing for the metadata of a head-only export (no model loaded)."""
    if config.backbone.get("kind") != "glm4v":
        return None
    try:
        from transformers import AutoImageProcessor

        from rainclf.backbones.glm4v import resolve_model_dir

        proc = AutoImageProcessor.from_pretrained(resolve_model_dir(config.backbone["name"])[0],
                                                  local_files_only=True)
        return spec_from_processor(proc, config.image_size).to_dict()
    except Exception:   # the backbone moved or is not downloaded: the head graph does not need it
        return None


def spec_from_processor(proc, image_size: int) -> InputSpec:
    return InputSpec(image_size=image_size, patch_size=proc.patch_size, merge_size=proc.merge_size,
                     temporal_patch_size=proc.temporal_patch_size, rescale_factor=proc.rescale_factor,
                     image_mean=tuple(proc.image_mean), image_std=tuple(proc.image_std),
                     do_rescale=proc.do_rescale, do_normalize=proc.do_normalize)
