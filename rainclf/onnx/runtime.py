"""Torch-free runtime for an exported classifier (``rainclf export``): numpy, Pillow, onnxruntime.

    InputSpec, OnnxMetadata   rainclf_onnx.json (``onnx/format.py``; the exporter writes it)
    pixel_values              RGB images → the GLM-4V image processor's flat patches, in numpy
    timm_pixel_values         RGB images → timm's eval transform (resize, centre crop, mean/std), in numpy
    choose_providers          CUDA (only when its libraries load: onnx/providers.py) → CPU, or the
                              providers the caller names
    check_graph               a graph's inputs/outputs against rainclf_onnx.json (at load)
    OnnxClassifier            from_dir(path).predict(images_or_paths) → one dict per input:
                              path, label, p_rain, error (a bad file is an error entry, never a crash)

This module never imports torch or transformers (a service may have neither); ``rainclf.data.images``
and ``rainclf.labels`` import only numpy and Pillow. Install for a service, without torch:

    pip install onnxruntime-gpu numpy Pillow && pip install --no-deps rainclf

(``rainclf[runtime]`` lists the same three, but a plain ``pip install`` of rainclf also pulls its
training dependencies, torch included; onnxruntime-gpu falls back to the CPU when CUDA is absent.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from rainclf.data.images import ImageError, decode_image, read_bytes, to_rgb
from rainclf.labels import LABELS
from rainclf.onnx.format import (
    METADATA_FILE,
    InputSpec,
    OnnxExportError,
    OnnxMetadata,
    TimmInputSpec,
    find_export_dir,
    read_metadata,
)
from rainclf.onnx.providers import _ort, choose_providers  # noqa: F401 (API: rainclf.onnx.runtime.choose_providers)

# ------------------------------------------------------------------ preprocessing (numpy)

def pixel_values(images: Sequence[Image.Image], spec: InputSpec) -> np.ndarray:
    """(B · patches_per_image, patch_dim) float32, equal to the processor's ``pixel_values``."""
    s = spec.image_size
    arr = np.stack([np.asarray(im if im.size == (s, s) else im.resize((s, s), Image.BICUBIC),
                               dtype=np.uint8) for im in map(to_rgb, images)])
    x = arr.astype(np.float32).transpose(0, 3, 1, 2)           # (B, 3, s, s), as torchvision
    if spec.do_rescale and spec.do_normalize:
        # transformers fuses both: (x - mean/r) / (std/r), all in float32
        r = np.float32(1.0 / spec.rescale_factor)
        mean = np.asarray(spec.image_mean, np.float32) * r
        std = np.asarray(spec.image_std, np.float32) * r
        x = (x - mean[:, None, None]) / std[:, None, None]
    elif spec.do_rescale:
        x = x * np.float32(spec.rescale_factor)
    elif spec.do_normalize:
        x = (x - np.asarray(spec.image_mean, np.float32)[:, None, None]) / \
            np.asarray(spec.image_std, np.float32)[:, None, None]
    return patchify(x, spec)


def timm_pixel_values(images: Sequence[Image.Image], spec: TimmInputSpec) -> np.ndarray:
    """(B, 3, S, S) float32, equal to timm's eval transform (Resize(shorter side) → CenterCrop →
    ToTensor → Normalize) on the same PIL images: the same PIL resize call, the same crop offsets,
    the same float32 operations."""
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[spec.interpolation]
    s, out = spec.image_size, []
    for im in map(to_rgb, images):
        w, h = im.size
        # torchvision: the shorter side becomes `resize`, the longer int(resize * long / short)
        size = (spec.resize, int(spec.resize * h / w)) if w <= h else (int(spec.resize * w / h), spec.resize)
        if size != (w, h):
            im = im.resize(size, resample)
        w, h = im.size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        out.append(np.asarray(im.crop((left, top, left + s, top + s)), dtype=np.uint8))
    x = np.stack(out).astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255)   # (B, 3, S, S)
    mean = np.asarray(spec.image_mean, np.float32)[:, None, None]
    std = np.asarray(spec.image_std, np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def preprocess(images: Sequence[Image.Image], spec: InputSpec | TimmInputSpec) -> np.ndarray:
    """The image graph's ``pixel_values`` for the spec the export recorded."""
    if isinstance(spec, TimmInputSpec):
        return timm_pixel_values(images, spec)
    return pixel_values(images, spec)


def patchify(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(B, C, H, W) → (B·gh·gw, C·T·p·p): merge windows kept together, the still frame repeated
    ``temporal_patch_size`` times, exactly the processor's flat layout."""
    b, c, h, w = x.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).transpose(0, 2, 5, 3, 6, 1, 4, 7)
    x = np.broadcast_to(x[:, :, :, :, :, :, None], (b, gh // m, gw // m, m, m, c, t, p, p))
    return np.ascontiguousarray(x, dtype=np.float32).reshape(b * gh * gw, c * t * p * p)


# ------------------------------------------------------------------ onnxruntime

def check_graph(session, entry: dict, path: Path) -> None:
    """The graph's inputs and outputs must be the ones rainclf_onnx.json lists (names, and every
    fixed dimension): a graph swapped for another export's is refused at load."""
    fix = "the export is damaged or its files were swapped: re-run rainclf export"
    for kind, nodes in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        want = entry.get(kind) or {}
        got = {n.name: n.shape for n in nodes}
        if kind == "outputs" and "p_rain" not in got:
            raise OnnxExportError(f"{path}: the graph has no p_rain output (outputs: {', '.join(got)}) — {fix}")
        names = set(want) if kind == "outputs" else set(want) | set(got)
        for name in sorted(names):
            if name not in got or name not in want:
                raise OnnxExportError(f"{path}: {kind} {sorted(got)} differ from {sorted(want)} in "
                                      f"{METADATA_FILE} — {fix}")
            dims_want, dims_got = list(want[name]), list(got[name])
            if len(dims_want) != len(dims_got) or any(
                    isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(dims_want, dims_got)):
                raise OnnxExportError(f"{path}: {kind[:-1]} {name} has shape {dims_got}, {METADATA_FILE} "
                                      f"says {dims_want} — {fix}")


class OnnxClassifier:
    """An exported classifier on onnxruntime; sessions are opened on first use."""

    def __init__(self, directory: str | Path, metadata: OnnxMetadata, providers: Sequence | None = None):
        self.directory, self.metadata = Path(directory), metadata
        self.requested_providers = choose_providers(providers)
        self._sessions: dict = {}
        for graph in metadata.graphs:   # a truncated or swapped graph is refused here, not in predict()
            self.session(graph)

    @classmethod
    def from_dir(cls, path: str | Path, providers: Sequence | None = None) -> "OnnxClassifier":
        """``path``: an export folder, or a model directory whose ``onnx/`` holds one."""
        directory = find_export_dir(path)
        return cls(directory, read_metadata(directory), providers)

    # ------------------------------------------------------------------ facts
    @property
    def threshold(self) -> float:
        return float(self.metadata.threshold)

    @property
    def has_image_graph(self) -> bool:
        return "image" in self.metadata.graphs

    def session(self, graph: str):
        if graph not in self._sessions:
            if graph not in self.metadata.graphs:
                raise OnnxExportError(f"{self.directory} has no {graph} graph")
            ort = _ort()
            options = ort.SessionOptions()
            options.log_severity_level = 3   # CUDA fallback warnings: providers() reports it instead
            path = self.directory / self.metadata.graphs[graph]["file"]
            try:
                session = ort.InferenceSession(str(path), options, providers=self.requested_providers)
            except Exception as e:   # InvalidProtobuf, Fail, NoSuchFile …: onnxruntime's own types
                raise OnnxExportError(f"{path}: onnxruntime cannot load it ({' '.join(str(e).split())[:160]}) "
                                      "— the export is damaged: re-run rainclf export") from None
            check_graph(session, self.metadata.graphs[graph], path)
            self._sessions[graph] = session
        return self._sessions[graph]

    def providers(self, graph: str | None = None) -> list[str]:
        """The providers onnxruntime really uses for ``graph`` (default: the one predict runs)."""
        return list(self.session(graph or ("image" if self.has_image_graph else "head")).get_providers())

    def describe(self, graph: str | None = None) -> str:
        graph = graph or ("image" if self.has_image_graph else "head")
        return (f"onnx {graph} graph {self.metadata.graphs[graph]['file']} on "
                f"{self.providers(graph)[0]}")

    # ------------------------------------------------------------------ embeddings → p_rain
    def p_rain_from_embeddings(self, embeddings) -> np.ndarray:
        x = np.asarray(embeddings, dtype=np.float32)
        dim = self.metadata.dim
        if x.ndim != 2 or x.shape[1] != dim:
            got = x.shape[-1] if x.ndim else "a scalar"
            raise OnnxExportError(
                f"embeddings have dimension {got}, this export expects {dim} "
                f"(backbone {self.metadata.backbone.get('name')}, feature {self.metadata.feature}): "
                "they come from another backbone or feature")
        if len(x) == 0:
            return np.zeros(0, dtype=np.float64)
        return self.session("head").run(["p_rain"], {"embeddings": x})[0].astype(np.float64)

    def predict_embeddings(self, embeddings) -> list[dict]:
        """One ``{"label", "p_rain"}`` per row of an (N, dim) array."""
        return [{"label": self.label(p), "p_rain": float(p)} for p in self.p_rain_from_embeddings(embeddings)]

    # ------------------------------------------------------------------ images → p_rain
    def p_rain_from_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not self.has_image_graph:
            raise OnnxExportError(f"{self.directory} holds only the head graph (embeddings → p_rain): "
                                  "re-export with --include-backbone to predict images, or use "
                                  "predict_embeddings")
        if not images:
            return np.zeros(0, dtype=np.float64)
        return self.p_rain_from_pixels(preprocess(images, self.metadata.input_spec))

    def p_rain_from_pixels(self, px: np.ndarray) -> np.ndarray:
        """(B · patches_per_image, patch_dim) float32 from :func:`pixel_values` → (B,) p_rain.
        The rows of several images may be computed apart and concatenated (``rainclf serve``
        does, one image per request): no step of :func:`pixel_values` mixes images."""
        return self.session("image").run(["p_rain"], {"pixel_values": px})[0].astype(np.float64)

    def predict(self, images_or_paths: Sequence, batch_size: int = 32) -> list[dict]:
        """One dict per input (file path or PIL image): ``path, label, p_rain, error``."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        single = isinstance(images_or_paths, (str, Path, Image.Image))
        items = [images_or_paths] if single else list(images_or_paths)   # one path is not a list of characters
        results = []
        for lo in range(0, len(items), batch_size):
            chunk = [self._load(i, item) for i, item in enumerate(items[lo:lo + batch_size], lo)]
            good = [r for r in chunk if r["error"] is None]
            if good:
                for r, p in zip(good, self.p_rain_from_images([r.pop("_image") for r in good])):
                    r.update(label=self.label(p), p_rain=float(p))
            results.extend(chunk)
        return results

    def _load(self, index: int, item) -> dict:
        row = {"path": None, "label": None, "p_rain": None, "error": None}
        if isinstance(item, Image.Image):
            row["path"] = getattr(item, "filename", "") or f"<image {index}>"
            try:
                item.load()
                row["_image"] = to_rgb(item, row["path"])
            except ImageError as e:
                row["error"] = str(e)
            except Exception as e:  # a lazily opened, broken file
                row["error"] = f"{row['path']}: cannot decode ({' '.join(str(e).split())})"
            return row
        if not isinstance(item, (str, Path)):
            row["path"] = f"<input {index}>"
            row["error"] = f"{row['path']}: unsupported input type {type(item).__name__} (pass a path or a PIL image)"
            return row
        row["path"] = str(item)
        try:
            row["_image"] = decode_image(read_bytes(item), item)
        except ImageError as e:
            row["error"] = str(e)
        return row

    def label(self, p: float) -> str:
        """会下雨 when ``p`` (p_rain) reaches the export's threshold, else 不会下雨."""
        return LABELS[1] if p >= self.threshold else LABELS[0]
