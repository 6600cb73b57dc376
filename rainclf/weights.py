"""Reading the safetensors files of a model directory so that every way they can be wrong —
missing, unreadable, truncated, a malformed or impossible header, non-finite numbers — is one
``ModelDirError`` line naming the file and the fix, never a library's traceback.
"""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import numpy as np

from rainclf.model import ModelDirError

DAMAGED_FIX = "the model directory is damaged: restore it from a copy or refit it"


def check_header(path: Path) -> None:
    """The 8-byte header length and the JSON header must fit the file, and every tensor's offsets
    must lie inside it (safetensors reports some of these as a Rust panic)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelDirError(f"{path}: truncated ({size} bytes, not a safetensors file) — {DAMAGED_FIX}")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelDirError(f"{path}: header claims {n} bytes but the file has {size} — truncated; {DAMAGED_FIX}")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise ModelDirError(f"{path}: malformed safetensors header — {DAMAGED_FIX}") from None
    if not isinstance(header, dict):
        raise ModelDirError(f"{path}: malformed safetensors header — {DAMAGED_FIX}")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise ModelDirError(f"{path}: tensor {name!r} lies outside the file (offsets {offsets}, "
                                f"{data} data bytes) — {DAMAGED_FIX}")


def read_tensors(path: str | Path, framework: str = "numpy") -> tuple[dict, dict]:
    """(tensors by name, header metadata) of one safetensors file of a model directory."""
    from safetensors import safe_open

    path = Path(path)
    try:
        check_header(path)
        with safe_open(str(path), framework=framework) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ModelDirError:
        raise
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise ModelDirError(f"{path} is missing — the model directory is incomplete: restore it or refit") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ModelDirError(f"{path}: permission denied — make it readable (chmod a+r) or run as its owner") from None
        raise ModelDirError(f"{path}: cannot read ({e.strerror or e})") from None
    except BaseException as e:   # safetensors' own error types (and a Rust panic) for damaged files
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise ModelDirError(f"{path}: not a valid safetensors file ({reason}) — {DAMAGED_FIX}") from None
    return tensors, meta


def check_finite(path, arrays: dict) -> None:
    """Refuse weights holding NaN or infinity: such a head answers p_rain=nan with a label."""
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ModelDirError(f"{path}: tensor {name!r} holds NaN or infinite values — {DAMAGED_FIX}")
