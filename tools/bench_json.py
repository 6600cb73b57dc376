"""What every benchmark in tools/ writes with ``--json FILE``: the machine (CPU, cores, load, GPU),
library versions and thread settings, the tool's own settings (batch sizes, repeats, …) and its
results, so a figure can be traced to where and how it was measured.

    from bench_json import add_json_argument, write_json
    add_json_argument(ap)
    write_json(args.json, "bench.py", {"batch_sizes": [1, 32], "calls": 4}, rows, notes)
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "peft", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "timm",
             "scikit-learn", "accelerate", "Pillow")


def versions() -> dict:
    """Installed versions of the libraries a benchmark may use (without importing them)."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    sys.path.insert(0, str(REPO))
    try:
        from rainclf import __version__

        out["rainclf"] = __version__
    finally:
        sys.path.remove(str(REPO))
    return out


def machine() -> dict:
    """CPU, cores (and the ones this process may use), load average, thread settings, GPU."""
    out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        out["usable_cores"] = len(os.sched_getaffinity(0))
    if hasattr(os, "getloadavg"):
        out["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    out["thread_env"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    torch = sys.modules.get("torch")     # only if the benchmark imported it: never import it here
    if torch is not None:
        out["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    ort = sys.modules.get("onnxruntime")
    if ort is not None:
        out["onnxruntime_providers"] = ort.get_available_providers()
    return out


def add_json_argument(ap) -> None:
    ap.add_argument("--json", type=Path, default=None, metavar="FILE",
                    help="also write the results as JSON (machine, versions, threads, settings, results)")


def write_json(path: Path | None, tool: str, settings: dict, results, notes=()) -> None:
    """Write ``{tool, created, machine, versions, settings, results, notes}`` to ``path``
    atomically (nothing when ``path`` is None)."""
    if path is None:
        return
    sys.path.insert(0, str(REPO))
    try:
        from rainclf.io import atomic_file
    finally:
        sys.path.remove(str(REPO))
    doc = {"tool": tool, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": sys.argv,
           "machine": machine(), "versions": versions(), "settings": settings, "results": results,
           "notes": list(notes)}
    with atomic_file(path) as f:
        f.write(json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
    print(f"wrote {path}", file=sys.stderr)
