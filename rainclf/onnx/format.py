"""The export folder's file format: ``rainclf_onnx.json`` (labels, threshold, fingerprint, input
spec — GLM-4V patches or a timm resize/crop/normalise —, prompt token ids, head hash, parity) as dataclasses. numpy only: the torch-free runtime and
the exporter both read it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rainclf import __version__
from rainclf.jsonfile import read_versioned
from rainclf.labels import LABELS

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

    @property
    def rows_per_image(self) -> int:
        """Rows of ``pixel_values`` one image becomes."""
        return self.patches_per_image

    def graph_facts(self) -> dict:
        """What the image graph's entry in rainclf_onnx.json says about its input."""
        return {"inputs": {"pixel_values": [f"batch*{self.patches_per_image}", self.patch_dim]},
                "image_size": self.image_size, "patches_per_image": self.patches_per_image}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(image_mean=list(self.image_mean), image_std=list(self.image_std),
                 grid_thw=list(self.grid_thw), patches_per_image=self.patches_per_image,
                 patch_dim=self.patch_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(frozen=True)
class TimmInputSpec:
    """How an image becomes a timm image graph's ``pixel_values`` [batch, 3, S, S]: timm's eval
    transform from the model's data config, in numpy (``runtime.timm_pixel_values``): resize the
    shorter side to ``resize`` (the longer to ``int(resize · long / short)``; skipped when the
    image has that size already) with PIL ``interpolation``, centre crop S × S (offsets rounded as
    torchvision does), scale to [0, 1], subtract ``image_mean``, divide by ``image_std``."""

    image_size: int                  # S, the centre crop
    resize: int                      # shorter side before the crop: floor(S / crop_pct)
    image_mean: tuple
    image_std: tuple
    interpolation: str = "bicubic"
    kind: str = "timm"

    def __post_init__(self):
        if self.kind != "timm" or self.interpolation not in TIMM_INTERPOLATIONS:
            raise OnnxExportError(f"unsupported timm input spec: kind {self.kind}, interpolation {self.interpolation}")
        if not 0 < self.image_size <= self.resize:
            raise OnnxExportError(f"timm input spec: crop {self.image_size} must lie in (0, resize {self.resize}]")
        object.__setattr__(self, "image_mean", tuple(float(x) for x in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(x) for x in self.image_std))

    @classmethod
    def from_data_config(cls, cfg: dict) -> "TimmInputSpec":
        """From ``timm.data.resolve_data_config`` (centre crop mode, square input)."""
        import math

        size = int(cfg["input_size"][-1])
        if cfg.get("crop_mode", "center") != "center" or int(cfg["input_size"][-2]) != size:
            raise OnnxExportError(f"timm data config {cfg}: only a square centre crop is supported")
        return cls(image_size=size, resize=math.floor(size / float(cfg.get("crop_pct") or 0.875)),
                   image_mean=tuple(cfg["mean"]), image_std=tuple(cfg["std"]),
                   interpolation=str(cfg.get("interpolation", "bilinear")))

    @property
    def rows_per_image(self) -> int:
        return 1

    def graph_facts(self) -> dict:
        return {"inputs": {"pixel_values": ["batch", 3, self.image_size, self.image_size]},
                "image_size": self.image_size}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(image_mean=list(self.image_mean), image_std=list(self.image_std))
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TimmInputSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


TIMM_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


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
    def input_spec(self) -> InputSpec | TimmInputSpec | None:
        if not self.input:
            return None
        return (TimmInputSpec if self.input.get("kind") == "timm" else InputSpec).from_dict(self.input)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = METADATA_FILE) -> "OnnxMetadata":
        meta = read_versioned(cls, text, source, OnnxExportError, FORMAT_VERSION, "rainclf ONNX export",
                              "re-run rainclf export")
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


