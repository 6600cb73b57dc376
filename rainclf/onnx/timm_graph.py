"""The image half of an ONNX image → label graph for a timm backbone (efficientnet-lite0, timm:NAME).

    pixel_values [B, 3, S, S] (timm's eval transform, done in numpy by ``runtime.timm_pixel_values``)
        ──timm model, num_classes=0: forward_features → global pool──▶ embeddings [B, dim]

``onnx/export.py`` puts the head after it (``ImageGraph``) and checks torch against onnxruntime.
A timm model traces as it is (no packed sequences as in GLM-4V), except TF-"SAME" convolutions
(``Conv2dSame``, the five stride-2 convolutions of ``tf_efficientnet_lite0``): they compute their
pads from the input size at run time, which traces to Shape/Ceil/Sub/Pad nodes that onnxruntime
can neither fold nor fuse. The graph's input is a fixed S × S (dynamic batch only), so the export
replaces each by a constant zero pad + a plain convolution (``static_same_padding``; the same
numbers), which onnxruntime fuses into the convolution's own pads. Measured with
``python tools/bench_quantize.py`` (efficientnet-lite0, batch 32, 2 threads): the dynamic pads and
the layout reorders around them were 39 % of the fp32 graph's time and, with their
dequantize/quantize pairs, about half of the int8 graph's. The preprocessing spec comes from the
backbone's data config, the same dict its torch transform was built from.
"""

from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch

from rainclf.onnx.format import OnnxExportError, TimmInputSpec


class TimmFeatures(torch.nn.Module):
    """A loaded timm backbone's pooled features: [B, 3, S, S] → [B, dim]."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values)    # num_classes=0: the pooled pre-logits


class _StaticPadConv(torch.nn.Module):
    """A TF-"SAME" convolution at one known input size: constant zero pad, then the convolution."""

    def __init__(self, conv: torch.nn.Conv2d, pads: tuple[int, int, int, int]):
        super().__init__()
        self.pads = pads                  # F.pad order: left, right, top, bottom
        self.conv = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0,
                                    conv.dilation, conv.groups, conv.bias is not None)
        self.conv.weight, self.conv.bias = conv.weight, conv.bias

    def forward(self, x):
        if any(self.pads):
            x = torch.nn.functional.pad(x, self.pads)
        return self.conv(x)


def static_same_padding(model: torch.nn.Module, size: int) -> tuple[torch.nn.Module, int]:
    """A copy of ``model`` whose ``Conv2dSame`` layers pad by constants computed for an S × S input
    (timm's own ``get_same_padding`` on the sizes each layer sees); returns (copy, layers replaced).
    A model without such layers is returned as it is, with 0."""
    from timm.layers import Conv2dSame, get_same_padding

    if not any(isinstance(m, Conv2dSame) for m in model.modules()):
        return model, 0
    model = copy.deepcopy(model)        # the backbone keeps its own layers
    seen: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, tuple(a[0].shape[-2:])))
             for name, m in model.named_modules() if isinstance(m, Conv2dSame)]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    for name, (ih, iw) in seen.items():
        conv = model.get_submodule(name)
        ph = get_same_padding(ih, conv.kernel_size[0], conv.stride[0], conv.dilation[0])
        pw = get_same_padding(iw, conv.kernel_size[1], conv.stride[1], conv.dilation[1])
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf,
                _StaticPadConv(conv, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))
    return model, len(seen)


def timm_features(backbone, images: Sequence) -> tuple[TimmFeatures, TimmInputSpec, np.ndarray]:
    """(features module on the CPU, input spec, torch embeddings of ``images`` for the parity check)."""
    if getattr(backbone, "kind", None) != "timm":
        raise OnnxExportError(f"backbone {backbone.name!r} is not a timm backbone")
    model = backbone.load()
    spec = TimmInputSpec.from_data_config(backbone.data_config)
    ref = backbone.embed(list(images))                     # timm's own transform, torch
    model, _ = static_same_padding(model.float().cpu().eval(), spec.image_size)
    return TimmFeatures(model), spec, ref
