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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from rainclf.backbones.base import DEFAULT_PROMPT
from rainclf.config import RunOptions
from rainclf.heads import head_classifier
from rainclf.heads.base import HeadArrays
from rainclf.io import atomic_dir
from rainclf.model import (
    ModelConfig,
    ModelDirError,
    load_classifier,
    read_config,
)
from rainclf.onnx.engine import head_sha256
from rainclf.onnx.format import EXPORT_DIR, METADATA_FILE, OnnxMetadata
from rainclf.onnx.graphs import ExportFailure, HeadGraph, ImageGraph, assemble, spec_from_processor
from rainclf.onnx.quantize import DEFAULT_MIN_AGREEMENT, calibrate_export, calibration_images, check_options
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


def build_image_graph(config: ModelConfig, model_dir: Path, head: HeadArrays):
    """(ImageGraph, InputSpec, prompt token ids, synthetic images, torch p_rain, torch embeddings)."""
    kind = config.backbone.get("kind")
    options = RunOptions(device="cpu", cache_dir=None, progress=False)
    if kind == "timm":   # efficientnet-lite0, timm:NAME (onnx/timm_graph.py)
        from rainclf.onnx.timm_graph import timm_features

        images = synthetic_images()
        features, spec, ref_emb = timm_features(load_classifier(model_dir, options).backbone, images)
        return ImageGraph(features, HeadGraph(head)), spec, None, images, head.p_rain(ref_emb), ref_emb
    if kind != "glm4v":
        raise ExportFailure(f"--include-backbone supports GLM-4V and timm backbones; this one is {kind!r}")
    images, prompt = synthetic_images(), config.prompt or DEFAULT_PROMPT
    backbone, model, ref_p, ref_emb = load_classifier(model_dir, options).export_source(images)
    if ref_p is None:
        ref_p = head.p_rain(ref_emb)
    try:
        built = assemble(config, backbone, model, head, images, prompt)
    except ExportFailure:
        raise
    except Exception as e:   # another architecture than the one this was written for: say what broke
        raise ExportFailure(f"assembling the image graph failed: {type(e).__name__}: {_one_line(e)}") from e
    return built + (images, ref_p, ref_emb)


# ------------------------------------------------------------------ writing

def _onnx():
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the parity check runs it)
    except ImportError:
        raise ImportError("rainclf export needs onnx and onnxruntime: pip install 'rainclf[onnx]'") from None
    return onnx


def _drop_trailing_empty_inputs(model) -> None:
    """Omit optional inputs the exporter wrote as empty names at the end of a node's inputs (the
    same graph in ONNX's terms). onnxruntime's Pad → Conv fusion refuses a Pad whose
    ``constant_value`` input is such an empty name, so without this every constant pad of a timm
    "SAME" convolution stayed a separate Pad (see onnx/timm_graph.py for what it cost)."""
    for node in model.graph.node:
        while node.input and node.input[-1] == "":
            node.input.pop()


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
    _drop_trailing_empty_inputs(model)
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
                opset: int = 18, quantize: str | None = None, precision: str = "fp32",
                calibration: str | Path | None = None, min_agreement: float = DEFAULT_MIN_AGREEMENT) -> dict:
    """Write the head graph (and with ``include_backbone`` the image graph) plus rainclf_onnx.json
    into ``out_dir`` (default MODEL_DIR/onnx), atomically; returns the metadata as a dict with
    ``out_dir`` added. An existing export there is replaced. ``quantize``/``precision``: an int8 /
    fp16 image graph, measured on the ``calibration`` images (rainclf.onnx.quantize)."""
    _onnx()
    convert = check_options(quantize, precision, include_backbone)
    calib = calibration_images(calibration) if convert else None
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"--opset {opset}: the TorchScript exporter supports opsets {MIN_OPSET}..{MAX_OPSET}")
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    head = head_classifier(config.head).affine_head(config, model_dir)
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
        if convert:   # an AgreementError here leaves no export behind
            calibrate_export(tmp, meta, model_dir, calib, quantize, precision, min_agreement)
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
