"""A Triton Inference Server model repository from an export's image → label graph
(``rainclf export MODEL_DIR --include-backbone --triton REPOSITORY``):

    REPOSITORY/<name>/config.pbtxt          onnxruntime backend, dynamic batching
    REPOSITORY/<name>/1/model.onnx          the image graph, taking a batch axis (below)
    REPOSITORY/<name>/1/model.onnx.data     its weights, when the export keeps them apart (> 2 GB)
    REPOSITORY/<name>/rainclf_onnx.json     labels, threshold and the preprocessing (InputSpec)

rainclf's image graph takes the GLM-4V processor's flat layout, ``(B · patches_per_image,
patch_dim)``, whose first axis is not a batch axis, so Triton could not batch requests. The
graph written here takes ``pixel_values`` as ``(B, patches_per_image, patch_dim)`` float32 and
flattens it with one Reshape node in front of the unchanged graph: Triton gathers requests of
one or more images each along B. The client computes those rows in numpy, exactly as
``rainclf.onnx.runtime.pixel_values(images, spec)`` does (one image: a (patches, patch_dim)
array), and turns ``p_rain`` into a label with the threshold in rainclf_onnx.json.

A timm image graph (efficientnet-lite0, the default backbone) already takes ``pixel_values`` as
``(B, 3, S, S)``: it is written unchanged, with ``dims: [3, S, S]`` (the client computes
``rainclf.onnx.runtime.timm_pixel_values`` rows).

Needs the ``onnx`` package only (no torch): the graph is rewritten without loading its weights.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from rainclf.io import atomic_dir
from rainclf.onnx.format import METADATA_FILE, OnnxExportError, find_export_dir, read_metadata

CONFIG_FILE = "config.pbtxt"
VERSION = "1"
INPUT = "pixel_values"
_FLAT = "rainclf_flat_pixel_values"
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# onnx TensorProto element types → Triton DataType names
_TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 11: "TYPE_FP64", 7: "TYPE_INT64", 6: "TYPE_INT32",
                 9: "TYPE_BOOL", 16: "TYPE_BF16"}


def write_triton_repository(export_dir: str | Path, repository: str | Path, name: str = "rainclf",
                            max_batch_size: int = 32, max_queue_delay_us: int = 5000) -> dict:
    """Write ``repository/name`` (atomically; a previous rainclf model there is replaced) from
    the export in ``export_dir`` (an export folder or a model directory). Returns what it wrote."""
    import onnx

    if not _NAME_OK.match(name):
        raise ValueError(f"--triton-name {name!r}: use letters, digits, '_', '.', '-'")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size {max_batch_size}: must be at least 1")
    export_dir = find_export_dir(export_dir)
    meta = read_metadata(export_dir)
    if "image" not in meta.graphs:
        raise OnnxExportError(f"{export_dir} has no image graph, which Triton needs (it receives pixel "
                              "tensors): re-export with --include-backbone")
    graph_entry, spec = meta.graphs["image"], meta.input_spec
    model = onnx.load(str(export_dir / graph_entry["file"]), load_external_data=False)
    if getattr(spec, "kind", None) == "timm":
        image_input(model, spec.image_size)
    else:
        batched_input(model, spec.patches_per_image, spec.patch_dim)
    outputs = _outputs(model, graph_entry.get("outputs", {}))

    dest = Path(repository) / name
    if dest.exists() and not (dest / METADATA_FILE).is_file():
        raise FileExistsError(f"{dest} exists and is not a rainclf Triton model: choose another --triton-name")
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / VERSION).mkdir()
        onnx.save_model(model, str(tmp / VERSION / "model.onnx"))
        data = graph_entry.get("external_data")
        if data:   # weights stay where the graph's external references say: beside it
            _link_or_copy(export_dir / data, tmp / VERSION / data)
        onnx.checker.check_model(str(tmp / VERSION / "model.onnx"))
        (tmp / CONFIG_FILE).write_text(config_pbtxt(name, spec, outputs, max_batch_size, max_queue_delay_us),
                                       encoding="utf-8")
        shutil.copyfile(export_dir / METADATA_FILE, tmp / METADATA_FILE)
    files = [str(p.relative_to(dest)) for p in sorted(dest.rglob("*")) if p.is_file()]
    return {"model_dir": str(dest), "files": files, "outputs": outputs}


def batched_input(model, patches: int, patch_dim: int) -> None:
    """In place: the graph input ``pixel_values`` becomes (batch, patches, patch_dim), reshaped
    to the (batch · patches, patch_dim) the graph computes on, by a Reshape node placed first."""
    from onnx import TensorProto, helper

    g = model.graph
    if [i.name for i in g.input] != [INPUT]:
        raise OnnxExportError(f"the image graph takes {[i.name for i in g.input]}, not [{INPUT!r}]")
    for node in g.node:
        node.input[:] = [_FLAT if x == INPUT else x for x in node.input]
    shape = helper.make_tensor("rainclf_flat_shape", TensorProto.INT64, [2], [-1, patch_dim])
    g.initializer.append(shape)
    g.node.insert(0, helper.make_node("Reshape", [INPUT, shape.name], [_FLAT], name="rainclf_flatten_batch"))
    del g.input[:]
    g.input.append(helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", patches, patch_dim]))


def image_input(model, size: int) -> None:
    """A timm graph's input is already batched: check it is ``pixel_values`` [batch, 3, S, S]."""
    g = model.graph
    dims = [d.dim_value or d.dim_param for d in g.input[0].type.tensor_type.shape.dim] if len(g.input) == 1 else []
    if [i.name for i in g.input] != [INPUT] or len(dims) != 4 or dims[1:] != [3, size, size] or \
            isinstance(dims[0], int):
        raise OnnxExportError(f"the image graph takes {[i.name for i in g.input]} {dims}, not "
                              f"{INPUT!r} [batch, 3, {size}, {size}]: re-run rainclf export --include-backbone")


def input_dims(spec) -> list[int]:
    """Per-image dims of ``pixel_values`` (Triton leaves the batch axis out)."""
    if getattr(spec, "kind", None) == "timm":
        return [3, spec.image_size, spec.image_size]
    return [spec.patches_per_image, spec.patch_dim]


def _outputs(model, declared: dict) -> list[dict]:
    """name, Triton type, per-image dims of every graph output, the dims from rainclf_onnx.json
    (``["batch", 2]`` → ``[2]``; the traced graph leaves some of them symbolic)."""
    out = []
    for o in model.graph.output:
        elem, dims = o.type.tensor_type.elem_type, list(declared.get(o.name, [None]))[1:]
        if elem not in _TRITON_TYPES or not all(isinstance(d, int) and d > 0 for d in dims):
            raise OnnxExportError(f"graph output {o.name}: type {elem} / dims {dims} have no fixed "
                                  "Triton equivalent: re-run rainclf export")
        out.append({"name": o.name, "data_type": _TRITON_TYPES[elem], "dims": dims})
    return out


def config_pbtxt(name: str, spec, outputs: list[dict], max_batch_size: int, max_queue_delay_us: int) -> str:
    """Triton's model configuration (protobuf text format, ``inference.ModelConfig``)."""
    def tensor(o: dict) -> str:
        # a per-image scalar (p_rain: shape (batch,)) is dims [1] reshaped to [] for the backend
        dims = o["dims"] or [1]
        reshape = "\n    reshape: { shape: [ ] }" if not o["dims"] else ""
        return (f'  {{\n    name: "{o["name"]}"\n    data_type: {o["data_type"]}\n'
                f'    dims: [ {", ".join(map(str, dims))} ]{reshape}\n  }}')

    layout = ("3 channels, timm preprocessing" if getattr(spec, "kind", None) == "timm" else
              f"{spec.patches_per_image} patches of {spec.patch_dim}")
    return (f'# rainclf image -> p_rain ({spec.image_size} px, {layout} per image; preprocessing in '
            f'rainclf_onnx.json "input")\n'
            f'name: "{name}"\nbackend: "onnxruntime"\nmax_batch_size: {max_batch_size}\n'
            f'input [\n  {{\n    name: "{INPUT}"\n    data_type: TYPE_FP32\n'
            f'    dims: [ {", ".join(map(str, input_dims(spec)))} ]\n  }}\n]\n'
            f'output [\n{(","+chr(10)).join(tensor(o) for o in outputs)}\n]\n'
            f'dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}\n')


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)         # GBs of weights: a hard link when on one file system
    except OSError:
        shutil.copyfile(src, dst)
