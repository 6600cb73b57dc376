"""Which onnxruntime execution provider runs a graph, chosen quietly.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` even on a host without the CUDA libraries, and
asking for it there prints a red onnxruntime error at every session, then falls back to the CPU.
So CUDA is asked for only when its provider library loads here (tried once per process with
``ctypes``, which fails silently); the reason it was not used is kept for the one line that says
which provider runs. numpy-free, torch-free.
"""

from __future__ import annotations

import ctypes
import os
from typing import Sequence

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_cuda_state: dict = {}


def _ort():
    from rainclf.onnx.format import INSTALL_HINT

    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"rainclf.onnx.runtime needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def cuda_unusable_reason() -> str | None:
    """None when onnxruntime's CUDA provider library (and the CUDA libraries it needs) load in
    this process, else why not, in a few words."""
    if "reason" in _cuda_state:
        return _cuda_state["reason"]
    ort = _ort()
    reason = None
    capi = os.path.join(os.path.dirname(ort.__file__), "capi")
    try:
        if hasattr(ort, "preload_dlls"):   # onnxruntime >= 1.21: the nvidia-* wheels' libraries
            try:
                ort.preload_dlls(directory="")
            except Exception:
                pass
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(os.path.join(capi, "libonnxruntime_providers_cuda.so"))
    except OSError as e:
        reason = " ".join(str(e).split())[:200]
    _cuda_state["reason"] = reason
    return reason


def choose_providers(providers: Sequence | None = None) -> list:
    """The providers asked for (names or (name, options) pairs), all of which must exist here,
    else CUDA (when its libraries load) then CPU."""
    from rainclf.onnx.format import OnnxExportError

    available = _ort().get_available_providers()
    if providers:
        names = [p if isinstance(p, str) else p[0] for p in providers]
        missing = [n for n in names if n not in available]
        if missing:
            raise OnnxExportError(f"onnxruntime providers {missing} are not available here "
                                  f"(available: {', '.join(available)})")
        return list(providers)
    chosen = [p for p in (CUDA, CPU) if p in available]
    if CUDA in chosen and cuda_unusable_reason() is not None:
        chosen.remove(CUDA)
    return chosen
