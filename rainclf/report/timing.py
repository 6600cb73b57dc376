"""Running the models of one ``evaluate`` so their speeds can be compared: every model loaded and
warmed fully before any timing, then timed call by call in interleaved order.

    for each model:  load ─► warm-up: ``warmup`` calls at every chunk size the timed pass will use,
                     on synthetic images (the model's fallback too)       ── load_seconds, peak memory
    repeats × for each chunk of the images:  model A, B, C  (next chunk: B, C, A; …)  ── seconds

Why: timing models one after the other lets whatever else the machine does at that moment land on
one of them, and a single warm-up call on one image left first calls at a new batch size (and a
fallback that the warm-up image never reached) inside the timed pass. Interleaving needs every
model in memory at once; ``interleave=False`` loads, warms and times one model at a time instead
(for a GPU that cannot hold them all), and the report says which.

Warm-up images are synthetic (seeded noise written to a temporary folder), so they never enter the
embedding cache under a real image's key and no timed image is served from a warm-up.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rainclf.report.resources import PeakMemory


@dataclass
class ModelRun:
    """What one model did in ``evaluate``: its rows (first timed pass) and its timings."""

    rows: list
    seconds: list                  # per image, every timed pass (len = images × repeats)
    load_seconds: float            # load + warm-up
    peak_mb: float | None          # during load + warm-up
    peak_method: str
    backbone_size_mb: float | None
    n_cached: int                  # images of the first pass served from the embedding cache
    repeats: int = 1
    warm_sizes: list = field(default_factory=list)
    description: dict = field(default_factory=dict)   # the classifier's describe() after timing


def chunk_sizes(n: int, size: int) -> list[int]:
    """The distinct call sizes a pass over ``n`` images in chunks of ``size`` makes."""
    return sorted({min(size, n - lo) for lo in range(0, n, size)}) if n else []


def warmup_images(folder: Path, n: int, like: Path | None = None) -> list[Path]:
    """``n`` seeded-noise PNGs (the size of ``like`` when it is a readable image, else 320×240)."""
    import numpy as np
    from PIL import Image

    size = (320, 240)
    if like is not None:
        try:
            with Image.open(like) as im:
                size = im.size
        except Exception:   # noqa: BLE001 — an unreadable first image is that image's row, not ours
            pass
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"warmup_{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def warm(clf, images: Sequence[Path], sizes: Sequence[int], calls: int) -> None:
    """``calls`` calls at every size in ``sizes``, on the classifier and on its fallback model
    (``clf.gen``, asked only about in-band images when timed, so a warm-up through the head may
    never reach it)."""
    parts = [clf] + [p for p in (getattr(clf, "gen", None),) if p is not None]
    for part in parts:
        for size in sizes:
            for _ in range(calls):
                part.predict_paths(list(images[:size]))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed_passes(models: dict, paths: Sequence[Path], size: int, repeats: int, device: str,
                 progress: bool = False) -> dict[str, tuple[list, list, int]]:
    """Per model name: (rows of the first pass, seconds per image over all passes, embeddings the
    first pass read from the cache). Chunk k of pass r starts with model (k + r) mod M, so every
    model is first, second, … equally often."""
    from tqdm.auto import tqdm

    names = list(models)
    cached_before = {n: models[n].describe()["n_cached"] for n in names}
    chunks = [list(paths[lo:lo + size]) for lo in range(0, len(paths), size)]
    out = {n: ([], [], 0) for n in names}
    bar = tqdm(total=len(paths) * repeats * len(names), desc="timing", unit="img", disable=not progress,
               leave=False)
    for r in range(repeats):
        if r == 1:   # n_cached counts since loading: the first pass's share
            out = {n: (rows, secs, models[n].describe()["n_cached"] - cached_before[n])
                   for n, (rows, secs, _) in out.items()}
        for k, chunk in enumerate(chunks):
            start = (k + r) % len(names)
            for name in names[start:] + names[:start]:
                clf = models[name]
                _sync(device)
                t = time.perf_counter()
                rows = clf.predict_paths(chunk)
                _sync(device)
                dt = time.perf_counter() - t
                if len(rows) != len(chunk):
                    raise RuntimeError(f"{name}: predict_paths returned {len(rows)} rows for {len(chunk)} images")
                got_rows, secs, cached = out[name]
                secs += [dt / len(chunk)] * len(chunk)
                if r == 0:
                    got_rows += rows
                out[name] = (got_rows, secs, cached)
                bar.update(len(chunk))
    bar.close()
    if repeats == 1:
        out = {n: (rows, secs, models[n].describe()["n_cached"] - cached_before[n])
               for n, (rows, secs, _) in out.items()}
    return out


def run_models(openers: dict[str, Callable[[], object]], paths: Sequence[Path], device: str, size: int,
               warmup: int = 1, repeats: int = 1, interleave: bool = True,
               progress: bool = False) -> dict[str, ModelRun]:
    """Load (``openers[name]()``), warm and time every model; see the module docstring."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    sizes = chunk_sizes(len(paths), size)
    loaded: dict = {}
    runs: dict[str, ModelRun] = {}
    with tempfile.TemporaryDirectory(prefix="rainclf-warmup-") as tmp:
        images = warmup_images(Path(tmp), max(sizes, default=0), paths[0] if paths else None)

        def load_and_warm(name):
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                clf = openers[name]()
                warm(clf, images, sizes, warmup)
                _sync(device)
                load_seconds = time.perf_counter() - t0
            loaded[name] = clf
            runs[name] = ModelRun([], [], load_seconds, mem.peak_mb, mem.method,
                                  clf.describe()["backbone_weights_mb"], 0, repeats, list(sizes))

        def record(timed):
            for name, (rows, secs, cached) in timed.items():
                runs[name].rows, runs[name].seconds, runs[name].n_cached = rows, secs, cached
                runs[name].description = loaded[name].describe()

        if interleave:
            for name in openers:
                load_and_warm(name)
            record(timed_passes(loaded, paths, size, repeats, device, progress))
        else:
            for name in openers:
                load_and_warm(name)
                record(timed_passes({name: loaded[name]}, paths, size, repeats, device, progress))
                del loaded[name]
                gc.collect()
    loaded.clear()
    gc.collect()
    return runs
