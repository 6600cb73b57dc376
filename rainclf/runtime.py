"""Torch-free runtime for an exported classifier (``rainclf export``): numpy, Pillow, onnxruntime.

    InputSpec, OnnxMetadata   rainclf_onnx.json (``rainclf.export`` writes it, this file reads it)
    pixel_values              RGB images → the GLM-4V image processor's flat patches, in numpy
    choose_providers          CUDA → CPU, or the providers the caller names
    OnnxClassifier            from_dir(path).predict(images_or_paths) → one dict per input:
                              path, label, p_rain, error (a bad file is an error entry, never a crash)

This module never imports torch or transformers (a service may have neither); ``rainclf.images``
and ``rainclf.labels`` import only numpy and Pillow. Install for a service, without torch:

    pip install onnxruntime-gpu numpy Pillow && pip install --no-deps rainclf

(``rainclf[runtime]`` lists the same three, but a plain ``pip install`` of rainclf also pulls its
training dependencies, torch included; onnxruntime-gpu falls back to the CPU when CUDA is absent.)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from . import __version__
from .images import ImageError, decode_image, read_bytes
from .labels import LABELS

METADATA_FILE = "rainclf_onnx.json"
EXPORT_DIR = "onnx"                 # default export folder inside a model directory
FORMAT = "rainclf-onnx"
FORMAT_VERSION = 1
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
INSTALL_HINT = "install onnxruntime-gpu (or onnxruntime) with numpy and Pillow: pip install 'rainclf[runtime]'"


class OnnxExportError(ValueError):
    """An export folder is missing, damaged, too new, or fed inputs it cannot take."""


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the image graph's ``pixel_values`` (the GLM-4V processor's output).

    The image is first resized to ``image_size`` × ``image_size`` with PIL bicubic (skipped when
    it already has that size), exactly as ``Glm4vBackbone.prepare_images`` does; the processor's
    pixel bounds are then set so that it does not resize again."""

    image_size: int
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    rescale_factor: float = 1 / 255
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    do_rescale: bool = True
    do_normalize: bool = True
    resample: str = "bicubic"       # PIL resampling of the first resize
    channel_order: str = "RGB"

    def __post_init__(self):
        factor = self.patch_size * self.merge_size
        if self.image_size <= 0 or self.image_size % factor:
            raise OnnxExportError(f"image_size {self.image_size} must be a positive multiple of {factor}")
        if self.resample != "bicubic" or self.channel_order != "RGB":
            raise OnnxExportError(f"unsupported input spec: resample {self.resample}, {self.channel_order}")
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        g = self.image_size // self.patch_size
        return (1, g, g)

    @property
    def patches_per_image(self) -> int:
        return self.grid_thw[1] * self.grid_thw[2]

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(image_mean=list(self.image_mean), image_std=list(self.image_std),
                 grid_thw=list(self.grid_thw), patches_per_image=self.patches_per_image,
                 patch_dim=self.patch_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class OnnxMetadata:
    """Contents of rainclf_onnx.json: what the graphs compute and what they must be fed."""

    labels: list
    threshold: float
    head: str                          # linear | lora
    feature: str                       # vision | answer
    dim: int                           # embedding dimension the head graph takes
    backbone: dict                     # name, kind, fingerprint, random_weights, image_size
    graphs: dict                       # "head" (always) / "image": file, inputs, outputs, batch
    opset: int
    head_sha256: str                   # of the head weights the graphs were built from
    layer: int | None = None
    prompt: str | None = None
    prompt_token_ids: list | None = None   # answer/LoRA image graph: the baked-in chat prompt
    input: dict | None = None          # InputSpec.to_dict(); None when the backbone gave none
    not_exported: dict = field(default_factory=dict)   # graph → exactly what failed
    parity: dict = field(default_factory=dict)         # graph → torch vs onnxruntime at export
    rainclf_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def __post_init__(self):
        if self.format != FORMAT:
            raise OnnxExportError(f"not a rainclf ONNX export (format {self.format!r})")
        if list(self.labels) != list(LABELS):
            raise OnnxExportError(f"labels must be {list(LABELS)}, got {self.labels}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise OnnxExportError(f"threshold must lie in (0, 1), got {self.threshold}")

    @property
    def input_spec(self) -> InputSpec | None:
        return InputSpec.from_dict(self.input) if self.input else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = METADATA_FILE) -> "OnnxMetadata":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OnnxExportError(f"{source}: not valid JSON ({e.msg}); re-run rainclf export") from None
        if not isinstance(data, dict) or not isinstance(data.get("format_version"), int):
            raise OnnxExportError(f"{source}: no format_version — not a rainclf ONNX export")
        if data["format_version"] > FORMAT_VERSION:
            raise OnnxExportError(f"{source}: format {data['format_version']} was written by a newer "
                                  f"rainclf ({data.get('rainclf_version')}); this is {__version__}: upgrade")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise OnnxExportError(f"{source}: unknown keys {sorted(unknown)}")
        try:
            meta = cls(**data)
        except TypeError as e:
            raise OnnxExportError(f"{source}: {e}") from None
        if "head" not in meta.graphs or ("image" in meta.graphs and not meta.input):
            raise OnnxExportError(f"{source}: no head graph, or an image graph without its input spec")
        return meta


def find_export_dir(path: str | Path) -> Path:
    """``path`` itself if it holds rainclf_onnx.json, else ``path/onnx`` (a model directory)."""
    path = Path(path)
    for d in (path, path / EXPORT_DIR):
        if (d / METADATA_FILE).is_file():
            return d
    raise OnnxExportError(f"{path} holds no {METADATA_FILE} (nor {EXPORT_DIR}/{METADATA_FILE}): "
                          f"run rainclf export MODEL_DIR first")


def read_metadata(directory: str | Path) -> OnnxMetadata:
    path = Path(directory) / METADATA_FILE
    meta = OnnxMetadata.from_json(path.read_text(encoding="utf-8"), str(path))
    for name, graph in meta.graphs.items():
        if not (Path(directory) / graph["file"]).is_file():
            raise OnnxExportError(f"{Path(directory) / graph['file']} ({name} graph) is missing: "
                                  "re-run rainclf export")
    return meta


# ------------------------------------------------------------------ preprocessing (numpy)

def to_rgb(im: Image.Image) -> Image.Image:
    """An RGB copy; transparency is composited over white, as ``rainclf.images`` does for files."""
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")


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

def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"rainclf.runtime needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def choose_providers(providers: Sequence | None = None) -> list:
    """The providers asked for (names or (name, options) pairs), all of which must exist here,
    else CUDA then CPU, whichever this onnxruntime build has."""
    available = _ort().get_available_providers()
    if providers:
        names = [p if isinstance(p, str) else p[0] for p in providers]
        missing = [n for n in names if n not in available]
        if missing:
            raise OnnxExportError(f"onnxruntime providers {missing} are not available here "
                                  f"(available: {', '.join(available)})")
        return list(providers)
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxClassifier:
    """An exported classifier on onnxruntime; sessions are opened on first use."""

    def __init__(self, directory: str | Path, metadata: OnnxMetadata, providers: Sequence | None = None):
        self.directory, self.metadata = Path(directory), metadata
        self.requested_providers = choose_providers(providers)
        self._sessions: dict = {}

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
            self._sessions[graph] = ort.InferenceSession(str(path), options,
                                                         providers=self.requested_providers)
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
        return [{"label": self._label(p), "p_rain": float(p)} for p in self.p_rain_from_embeddings(embeddings)]

    # ------------------------------------------------------------------ images → p_rain
    def p_rain_from_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not self.has_image_graph:
            raise OnnxExportError(f"{self.directory} holds only the head graph (embeddings → p_rain): "
                                  "re-export with --include-backbone to predict images, or use "
                                  "predict_embeddings")
        if not images:
            return np.zeros(0, dtype=np.float64)
        px = pixel_values(images, self.metadata.input_spec)
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
                    r.update(label=self._label(p), p_rain=float(p))
            results.extend(chunk)
        return results

    def _load(self, index: int, item) -> dict:
        row = {"path": None, "label": None, "p_rain": None, "error": None}
        if isinstance(item, Image.Image):
            row["path"] = getattr(item, "filename", "") or f"<image {index}>"
            try:
                item.load()
                row["_image"] = to_rgb(item)
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

    def _label(self, p: float) -> str:
        return LABELS[1] if p >= self.threshold else LABELS[0]
