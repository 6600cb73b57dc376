"""rainclf: a two-label sky classifier (会下雨 / 不会下雨) on frozen GLM-4V embeddings.

The flow is image → embedding (``backbones``, ``features``, ``cache``) → head (``heads``) →
label (``predict``) → report. This file imports nothing heavy on purpose: ``rainclf.onnx.runtime``
must import in a service that has onnxruntime, numpy and Pillow but no torch.
"""

__version__ = "0.1.0"
