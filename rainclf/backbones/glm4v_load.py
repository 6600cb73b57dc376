"""Load only what a feature uses from a GLM-4V checkpoint: the modules it runs, and only their
tensors from the safetensors shards.

    vision              model.visual (vision tower + merger)
    answer, layer k<N   model.visual + embed_tokens + decoder layers 0..k-1 (the forward stops at k)
    answer, layer N/-1  the same + all N layers + the final norm (lm_head is never used by a feature)
    anything else       everything: ``Glm4vBackbone.load()`` outside an ``embed`` call (LoRA,
                        generative, export) loads the whole checkpoint with ``from_pretrained``

How: the model is built with its parameters on the meta device (no memory; buffers such as the
rotary frequencies are real), the wanted tensors are read straight from the shard files into
their final tensors (``readinto``, no mmap, so peak RSS stays close to the tensors loaded; the
shard for each tensor comes from ``model.safetensors.index.json``), assigned into the model, and
every module that was not loaded is replaced by ``NotLoaded``, which has no tensors (``.to(device)``
works) and raises if called. A backbone asked later for more than it loaded reloads with the union.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

from rainclf.backbones.base import BackboneError

INDEX_FILE = "model.safetensors.index.json"
VISION = "model.visual"
LM = "model.language_model"
_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
           "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def parts_for(feature: str, layer: int | None, num_layers: int) -> frozenset[str]:
    """Module paths (as in ``model.named_parameters()``) a feature needs."""
    if feature == "vision":
        return frozenset({VISION})
    k = (-1 if layer is None else layer) % (num_layers + 1)
    parts = {VISION, f"{LM}.embed_tokens"} | {f"{LM}.layers.{i}" for i in range(k)}
    if k == num_layers:
        parts.add(f"{LM}.norm")
    return frozenset(parts)


def in_parts(name: str, parts) -> bool:
    return parts is None or any(name == p or name.startswith(p + ".") for p in parts)


# --------------------------------------------------------------------------- the backbone's side

def covers(backbone) -> bool:
    """Whether the loaded model has every part the current call wants (None: everything)."""
    have = getattr(backbone._model, "rainclf_parts", None)
    want = getattr(backbone, "_want_parts", None)
    return have is None or (want is not None and want <= have)


@contextlib.contextmanager
def embedding_parts(backbone, feature: str, layer: int | None):
    """Within an embed call, ``load()`` loads (or keeps) only what ``feature``/``layer`` uses."""
    want = parts_for(feature, layer, backbone.num_layers)
    have = getattr(backbone._model, "rainclf_parts", None) if backbone._model is not None else frozenset()
    if have is not None and not want <= have:
        want = want | have            # a reload keeps what was there
    backbone._want_parts = want
    try:
        yield
    finally:
        backbone._want_parts = None


def load_model(backbone, config, dtype, placement: dict, kwargs: dict):
    """(model, loading info) for ``Glm4vBackbone.load``: a partial model inside ``embedding_parts``
    (on one device), else ``from_pretrained``. ``config`` is the normalised config
    (``glm4v_config.build_config``); the info lists missing and mismatched tensors."""
    from transformers import AutoModelForImageTextToText

    parts = getattr(backbone, "_want_parts", None)
    if parts is not None and not placement:
        model = load_partial(backbone.model_dir, parts, dtype, config=config)
        if model is not None:
            return model, {"missing_keys": [], "mismatched_keys": getattr(model, "rainclf_mismatched", [])}
    return AutoModelForImageTextToText.from_pretrained(
        backbone.model_dir, config=config, dtype=dtype, output_loading_info=True,
        ignore_mismatched_sizes=True, **placement, **kwargs)


# --------------------------------------------------------------------------- building and reading

@contextlib.contextmanager
def empty_parameters():
    """Parameters created on the meta device (no memory), buffers as usual."""
    import torch

    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        if param is not None:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def empty_model(model_dir: Path, dtype, config=None):
    """The checkpoint's model class with every parameter on the meta device."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if config is None:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    with empty_parameters():
        return AutoModelForImageTextToText.from_config(config, dtype=dtype)


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def checkpoint_map(model_dir: Path) -> dict[str, Path]:
    """tensor name → shard file, from the index (or the headers when there is no index)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    out = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        out.update({k: shard for k in _header(shard)[0]})
    return out


def stored_shapes(where: dict[str, Path]) -> dict[str, list[int]]:
    """tensor name → shape, from the shard headers only (no tensor data is read)."""
    shapes = {}
    for path in sorted(set(where.values())):
        shapes.update({k: v["shape"] for k, v in _header(path)[0].items()})
    return shapes


def read_tensors(where: dict[str, Path], names, dtype=None, log: list | None = None) -> dict:
    """{name: tensor} for ``names``, read from their shards with ``readinto`` (one copy, no mmap);
    cast to ``dtype`` when given. Appends every name read to ``log``."""
    import torch

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    out = {}
    for path, group in by_file.items():
        header, start = _header(path)
        with open(path, "rb") as f:
            for name in sorted(group, key=lambda n: header[n]["data_offsets"][0]):
                meta = header[name]
                lo, hi = meta["data_offsets"]
                buf = torch.empty(hi - lo, dtype=torch.uint8)
                f.seek(start + lo)
                if f.readinto(buf.numpy()) != hi - lo:
                    raise BackboneError(f"{path}: tensor {name} is truncated; re-download the checkpoint")
                t = buf.view(getattr(torch, _DTYPES[meta["dtype"]])).reshape(meta["shape"])
                out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
                if log is not None:
                    log.append(name)
    return out


def _legacy(name: str) -> list[str]:
    """Older GLM-4V checkpoints name tensors without the ``language_model``/``model.`` levels."""
    if name.startswith(f"{LM}."):
        return ["model." + name[len(LM) + 1:]]
    if name.startswith(f"{VISION}."):
        return [name[len("model."):]]
    return []


class NotLoaded:
    """Placeholder for a module the feature does not use (made a torch Module in ``stub``)."""


def stub(path: str):
    import torch

    class _NotLoaded(torch.nn.Module, NotLoaded):
        def forward(self, *args, **kwargs):
            raise BackboneError(f"{path} was not loaded for this feature (rainclf loads only what an embed "
                                "uses); call backbone.load() outside embed for the whole model")

    return _NotLoaded()


def load_partial(model_dir: Path, parts: frozenset, dtype, log: list | None = None, config=None):
    """The model with only ``parts`` loaded (see the module docstring); None when the checkpoint's
    tensor names do not match the model's (a conversion transformers would do): load it whole.
    Tensors whose shape differs from the model's are listed in ``model.rainclf_mismatched``
    (and not loaded), as ``from_pretrained``'s ``mismatched_keys``."""
    model = empty_model(model_dir, dtype, config)
    where = checkpoint_map(model_dir)
    source = {}
    for n, _ in model.named_parameters():   # every tensor, loaded or not: the checkpoint must match
        key = n if n in where else next((k for k in _legacy(n) if k in where), None)
        if key is None:
            return None
        source[n] = key
    stored = stored_shapes(where)
    mismatched = [n for n, p in model.named_parameters() if tuple(stored[source[n]]) != tuple(p.shape)]
    if mismatched:
        model.rainclf_mismatched = mismatched   # glm4v.load refuses it in one line
        return model
    source = {n: k for n, k in source.items() if in_parts(n, parts)}
    tensors = read_tensors(where, list(source.values()), dtype, log)
    model.load_state_dict({n: tensors[k] for n, k in source.items()}, strict=False, assign=True)
    _replace_unloaded(model, parts)
    model.rainclf_parts = frozenset(parts)
    return model


def _replace_unloaded(model, parts) -> None:
    """Swap every module whose parameters are still on meta for a tensor-free stub."""
    import torch

    def visit(module, prefix):
        for name, child in list(module.named_children()):
            path = f"{prefix}.{name}" if prefix else name
            params = list(child.parameters())
            if not params or not any(p.is_meta for p in params):
                continue
            # containers stay (layers[k] must exist for the early-exit hook); their items go
            container = isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict))
            inside = any(p.startswith(path + ".") for p in parts)
            if all(p.is_meta for p in params) and not container and not inside:
                setattr(module, name, stub(path))
            else:
                visit(child, path)

    visit(model, "")
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise BackboneError(f"partial load left {len(left)} tensors unread (first: {left[0]}); "
                            "this checkpoint's layout is not the GLM-4V one rainclf knows")
