"""The served model: an export folder's image → label graph on the torch-free runtime.

    open_export(path)        the export folder and its metadata, or ServeError naming the fix
    ServedModel              load() opens the onnxruntime session (and warms it up);
                             preprocess(bytes, name) → one image's pixel rows (numpy, any thread);
                             p_rain(rows) → one onnxruntime call for a whole micro-batch

Imports numpy, Pillow and onnxruntime only (through ``rainclf.onnx.runtime``), never torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rainclf import __version__
from rainclf.data.images import ImageError, decode_image, describe_path
from rainclf.onnx.format import OnnxExportError, OnnxMetadata, find_export_dir, read_metadata
from rainclf.onnx.runtime import OnnxClassifier, preprocess


class ServeError(ValueError):
    """The given path cannot be served (no export, no image graph, damaged metadata)."""


def open_export(path: str | Path) -> tuple[Path, OnnxMetadata]:
    """The export folder for ``path`` (a model directory or an export folder) and its metadata;
    only an export with the image → label graph can answer uploaded images."""
    fix = f"run: rainclf export {path} --include-backbone"
    try:
        directory = find_export_dir(path)
    except OnnxExportError:
        raise ServeError(f"{path} holds no ONNX export (rainclf_onnx.json) — {fix}") from None
    try:
        meta = read_metadata(directory)
    except (OnnxExportError, OSError) as e:
        raise ServeError(f"{directory}: {' '.join(str(e).split())}") from None
    if "image" not in meta.graphs:
        why = meta.not_exported.get("image")
        if Path(directory) != Path(path) or Path(directory).name == "onnx":   # MODEL_DIR/onnx: export MODEL_DIR
            fix = f"run: rainclf export {Path(directory).parent} --include-backbone"
        else:   # an export folder: it cannot be re-exported, its model directory can
            fix = ("run rainclf export MODEL_DIR --include-backbone on the model directory this export "
                   "came from")
        raise ServeError(f"{directory} holds only the head graph (embeddings → p_rain), no image → label graph"
                         + (f" (the image graph failed to export: {why})" if why else "") + f" — {fix}")
    return directory, meta


class ServedModel:
    def __init__(self, path: str | Path, max_image_pixels: int | None = None):
        self.directory, self.metadata = open_export(path)
        self.spec = self.metadata.input_spec
        self.max_image_pixels = max_image_pixels
        self.runtime = OnnxClassifier(self.directory, self.metadata)
        self.name = (self.directory.parent if self.directory.name == "onnx" else self.directory).name

    def load(self) -> None:
        """Open the image graph's session and run it once, so the first request is not the slow one."""
        if self.max_image_pixels is not None:
            # decode_image reads Pillow's process-wide limit; the serving process owns its Pillow
            Image.MAX_IMAGE_PIXELS = self.max_image_pixels
        s = self.spec.image_size
        self.p_rain(preprocess([Image.new("RGB", (s, s))], self.spec))

    @property
    def info(self) -> dict:
        """What every answer says about the model (random weights included: never mistake the
        committed glm4v-tiny's labels for GLM-4V quality)."""
        m, backbone = self.metadata, self.metadata.backbone
        return {"name": self.name, "labels": list(m.labels), "threshold": float(m.threshold), "head": m.head,
                "feature": m.feature, "backbone": backbone.get("name"),
                "random_weights": bool(backbone.get("random_weights")), "image_size": self.spec.image_size,
                "exported": m.created, "rainclf_version": __version__,
                "provider": self.runtime.providers("image")[0]}

    def preprocess(self, data: bytes, name: str) -> np.ndarray:
        """(patches_per_image, patch_dim) float32 rows for one upload; ImageError names ``name``.
        Equal, row for row, to what ``rainclf predict --engine onnx`` computes for the same file."""
        try:
            return preprocess([decode_image(data, name)], self.spec)
        except ImageError as e:
            if "MAX_IMAGE_PIXELS" in e.fix:   # the library's fix names Pillow; here the option decides
                raise ImageError(name, e.problem, "resize it, or start the server with a larger "
                                                  "--max-image-pixels") from None
            raise

    def p_rain(self, rows: np.ndarray) -> np.ndarray:
        """(B · patches_per_image, patch_dim) → (B,) float64, one onnxruntime call."""
        return self.runtime.p_rain_from_pixels(rows)

    def label(self, p: float) -> str:
        return self.runtime.label(p)


def part_name(filename: str | None, index: int) -> str:
    """A printable name for upload ``index``: its filename, else ``<part N>``."""
    return describe_path(filename) if filename else f"<part {index}>"
