"""Measuring a model while it runs: peak memory (CUDA allocator, or the process's peak RSS on the
CPU) and size on disk. Used by rainclf.report.evaluate; stdlib only (torch imported when on CUDA).

Why VmHWM: tracemalloc sees only Python objects, not torch's tensors, and ``ru_maxrss`` is a
high-water mark for the whole process life, so after a big model every later one would show 0.
Writing "5" to /proc/self/clear_refs resets VmHWM (Linux >= 4.0), giving a per-model peak.
"""

from __future__ import annotations

import gc
from pathlib import Path


class PeakMemory:
    """Peak memory of one block: CUDA allocator peak, else the process's peak RSS over the block."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            # minus what was allocated before: models loaded earlier in the same run stay resident
            self.method = "torch.cuda.max_memory_allocated increase over the block"
            return self
        gc.collect()
        self.base_rss = self._status_kb("VmRSS")
        try:  # writing 5 resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.method = ("peak RSS (VmHWM) minus RSS before loading; memory an earlier model freed "
                           "is reused, so a later model can show less than it needs alone")
        except OSError:
            import resource

            self.base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "ru_maxrss increase (a lower bound: earlier peaks hide this one)"
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        elif self.method.startswith("peak RSS"):
            peak = self._status_kb("VmHWM")
            self.peak_mb = (peak - self.base_rss) / 1024 if peak and self.base_rss else None
        else:
            import resource

            self.peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base_rss) / 1024
        return False


def dir_size_mb(path: Path | None, suffixes: tuple[str, ...] | None = None) -> float | None:
    """Bytes of every file under ``path`` (or only those with ``suffixes``), in MiB."""
    if path is None or not Path(path).exists():
        return None
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    if suffixes:
        files = [p for p in files if p.suffix in suffixes]
    return sum(p.stat().st_size for p in files) / 2**20
