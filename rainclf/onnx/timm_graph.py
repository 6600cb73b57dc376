"""The image half of an ONNX image → label graph for a timm backbone (efficientnet-lite0, timm:NAME).

    pixel_values [B, 3, S, S] (timm's eval transform, done in numpy by ``runtime.timm_pixel_values``)
        ──timm model, num_classes=0: forward_features → global pool──▶ embeddings [B, dim]

``onnx/export.py`` puts the head after it (``ImageGraph``) and checks torch against onnxruntime.
A timm model traces as it is (no packed sequences as in GLM-4V); TF-"SAME" padding
(``tf_efficientnet_lite0``) computes its pads from the input size, so the graph is exported at the
model's fixed S with a dynamic batch. The preprocessing spec comes from the backbone's data
config, the same dict its torch transform was built from.
"""

from __future__ import annotations

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


def timm_features(backbone, images: Sequence) -> tuple[TimmFeatures, TimmInputSpec, np.ndarray]:
    """(features module on the CPU, input spec, torch embeddings of ``images`` for the parity check)."""
    if getattr(backbone, "kind", None) != "timm":
        raise OnnxExportError(f"backbone {backbone.name!r} is not a timm backbone")
    model = backbone.load()
    spec = TimmInputSpec.from_data_config(backbone.data_config)
    ref = backbone.embed(list(images))                     # timm's own transform, torch
    return TimmFeatures(model.float().cpu().eval()), spec, ref
