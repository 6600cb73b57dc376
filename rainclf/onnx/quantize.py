"""Smaller / faster image graphs for ``rainclf export``: ``--quantize int8`` (CPU services) and
``--precision fp16`` (GPU graphs), each measured against torch on a calibration set and refused
below ``--min-agreement``.

    int8   onnxruntime quantization of the image graph's backbone; the head (``/head/…`` nodes)
           stays fp32. Conv-heavy graphs (timm, efficientnet-lite0): static QDQ, per-channel int8
           weights, uint8 activations calibrated on the calibration images (percentile), reduced
           range (CPUs without VNNI saturate full-range u8·s8 products). MatMul-heavy graphs
           (GLM-4V vision tower / prefill): dynamic quantization (int8 weights, activations
           quantized per call), which needs no calibration statistics.
    fp16   every float tensor and op in fp16 except the head, graph inputs and outputs kept fp32.

The calibration set is the images the user names (``--calibration DIR``); model directories
record only hashes of their training images, not where they are. What the export measures goes
into ``rainclf_onnx.json`` under ``parity["calibration"]``: images, max |Δp_rain| and label
agreement against torch, the method, and the fp32 graph's own agreement for comparison.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np

from rainclf.onnx.format import OnnxExportError

QUANTIZE = ("int8",)
PRECISIONS = ("fp32", "fp16")
DEFAULT_MIN_AGREEMENT = 0.98
HEAD_PREFIX = "/head/"          # ImageGraph.head: the exporter names its nodes /head/…
CALIBRATION_BATCH = 8


class AgreementError(OnnxExportError):
    """The converted graph's labels agree with torch's on fewer calibration images than asked."""


def calibration_images(path, limit: int = 256):
    """Decoded RGB images under ``path`` (recursive, sorted, at most ``limit``); unreadable files
    are skipped. One clear error when there are none."""
    from rainclf.data.images import find_images, load_image

    if path is None:
        raise OnnxExportError("--quantize/--precision fp16 need --calibration DIR: images to measure the "
                              "converted graph against torch on (the model directory records only hashes "
                              "of its training images, not where they are); e.g. the training folder")
    files, _ = find_images(path)
    images = []
    for f in files[:limit]:
        try:
            images.append(load_image(f))
        except Exception:   # bad files are reported by predict; here they only do not count
            continue
    if not images:
        raise OnnxExportError(f"--calibration {path}: no readable image there; point it at a folder of photos")
    return images


def head_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if n.name.startswith(HEAD_PREFIX)]


def _conv_heavy(model) -> bool:
    ops = [n.op_type for n in model.graph.node]
    return ops.count("Conv") > ops.count("MatMul")


class _Reader:
    """onnxruntime CalibrationDataReader over pixel batches."""

    def __init__(self, px: np.ndarray, rows_per_image: int):
        # full batches only: the percentile calibrator stacks per-batch outputs, so a shorter last
        # batch breaks it (fewer images than one batch: one batch of them all)
        step = CALIBRATION_BATCH * rows_per_image
        n = max(step, len(px) // step * step) if len(px) >= step else len(px)
        self._batches = iter([{"pixel_values": px[i:i + step]} for i in range(0, n, step)])

    def get_next(self):
        return next(self._batches, None)


def quantize_int8(src: Path, dst: Path, px: np.ndarray, rows_per_image: int) -> dict:
    """Write the int8 graph of ``src`` to ``dst``; returns what was done (for the metadata)."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(str(src))
    keep = head_nodes(model)
    pre = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre))   # shape inference + folding, as onnxruntime advises
        if _conv_heavy(model):
            with contextlib.redirect_stdout(sys.stderr):   # onnxruntime prints calibration progress
                quantize_static(str(pre), str(dst), _Reader(px, rows_per_image), quant_format=QuantFormat.QDQ,
                                per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.Percentile,
                                nodes_to_exclude=keep)
            method = "static QDQ, per-channel int8 weights, uint8 activations (percentile calibration), reduced range"
        else:
            quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep)
            method = "dynamic, int8 weights, activations quantized per call"
    finally:
        pre.unlink(missing_ok=True)
    return {"quantize": "int8", "method": method, "fp32_nodes_kept": len(keep)}


def convert_fp16(src: Path, dst: Path) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    keep = head_nodes(model)
    half = convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    onnx.save_model(half, str(dst))
    return {"precision": "fp16", "method": "onnxruntime convert_float_to_float16, inputs/outputs fp32",
            "fp32_nodes_kept": len(keep)}


def session(path: Path, threads: int | None = None):
    """A CPU session set up deliberately: all graph optimisations, ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_p_rain(path: Path, px: np.ndarray, rows_per_image: int, batch: int = 32) -> np.ndarray:
    s, step = session(path), batch * rows_per_image
    return np.concatenate([s.run(["p_rain"], {"pixel_values": px[i:i + step]})[0]
                           for i in range(0, len(px), step)]).astype(np.float64)


def agreement(p: np.ndarray, ref: np.ndarray, threshold: float) -> dict:
    return {"max_abs_dp": float(np.abs(p - ref).max()),
            "label_agreement": float(np.mean((p >= threshold) == (ref >= threshold)))}


def convert_image_graph(graph: Path, px: np.ndarray, rows_per_image: int, torch_p: np.ndarray,
                        threshold: float, quantize: str | None, precision: str, min_agreement: float) -> dict:
    """Replace the fp32 image graph at ``graph`` by its int8 / fp16 version, measured against
    ``torch_p`` on the calibration pixels ``px``; raises AgreementError (leaving the caller to
    discard the export) when label agreement < ``min_agreement``. Returns the calibration entry."""
    if quantize not in (None, *QUANTIZE):
        raise OnnxExportError(f"--quantize {quantize!r}: use {', '.join(QUANTIZE)}")
    if precision not in PRECISIONS:
        raise OnnxExportError(f"--precision {precision!r}: use {', '.join(PRECISIONS)}")
    if quantize and precision != "fp32":
        raise OnnxExportError("--quantize int8 and --precision fp16 are two different graphs: pick one")
    fp32 = agreement(graph_p_rain(graph, px, rows_per_image), torch_p, threshold)
    out = graph.with_name(graph.stem + ".converted.onnx")
    info = quantize_int8(graph, out, px, rows_per_image) if quantize else convert_fp16(graph, out)
    measured = agreement(graph_p_rain(out, px, rows_per_image), torch_p, threshold)
    entry = {"n_images": int(len(torch_p)), **info, **measured, "min_agreement": min_agreement,
             "fp32_graph": fp32}
    if measured["label_agreement"] < min_agreement:
        out.unlink(missing_ok=True)
        raise AgreementError(
            f"the {quantize or precision} image graph agrees with torch on {measured['label_agreement']:.1%} of "
            f"{len(torch_p)} calibration images (max |Δp_rain| {measured['max_abs_dp']:.3f}), below "
            f"--min-agreement {min_agreement}: nothing was written; export fp32, or lower --min-agreement")
    out.replace(graph)
    return entry


def check_options(quantize: str | None, precision: str, include_backbone: bool) -> bool:
    """Validate the options before any work; True when a conversion is asked for."""
    if quantize not in (None, *QUANTIZE):
        raise OnnxExportError(f"--quantize {quantize!r}: use {', '.join(QUANTIZE)}")
    if precision not in PRECISIONS:
        raise OnnxExportError(f"--precision {precision!r}: use {', '.join(PRECISIONS)}")
    wanted = bool(quantize) or precision != "fp32"
    if wanted and not include_backbone:
        raise OnnxExportError("--quantize/--precision convert the image graph: add --include-backbone")
    return wanted


def calibrate_export(tmp: Path, meta, model_dir: Path, images, quantize: str | None, precision: str,
                     min_agreement: float) -> None:
    """Convert ``tmp``'s image graph in place, measured on ``images`` against torch; records the
    figures in ``meta.parity["calibration"]`` and the graph entry."""
    from rainclf.config import RunOptions
    from rainclf.model import load_classifier
    from rainclf.onnx.runtime import preprocess

    if "image" not in meta.graphs:
        raise OnnxExportError(f"--quantize/--precision: the image graph was not exported "
                              f"({meta.not_exported.get('image', 'unknown reason')})")
    clf = load_classifier(model_dir, RunOptions(device="cpu", cache_dir=None, progress=False))
    torch_p = np.concatenate([np.asarray(clf.predict_proba(images[i:i + 32]), dtype=np.float64)
                              for i in range(0, len(images), 32)])
    spec = meta.input_spec
    entry = convert_image_graph(tmp / meta.graphs["image"]["file"], preprocess(images, spec), spec.rows_per_image,
                                torch_p, meta.threshold, quantize, precision, min_agreement)
    meta.parity["calibration"] = entry
    meta.graphs["image"]["precision"] = quantize or precision
