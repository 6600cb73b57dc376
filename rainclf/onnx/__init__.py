"""ONNX: the exporter (``export.py``, ``graphs.py``), its file format (``format.py``), the
torch-free runtime (``runtime.py``, numpy + Pillow + onnxruntime only) and ``--engine onnx``
(``engine.py``). Importing this package imports nothing heavy."""
