"""Image files → embedding matrix, through the cache, in batches, with a progress bar.

Bad files never stop the run: each becomes an error string in ``EmbedResult.errors`` and a row of
NaN in ``vectors``. Image bytes are read once: hashed for the cache key, decoded only on a miss,
so a fully cached run neither decodes images nor loads the model.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rainclf.backbones.base import DEFAULT_PROMPT, Backbone
from rainclf.data.images import ImageError, decode_image, read_bytes
from rainclf.embed.cache import EmbeddingCache
from rainclf.embed.prefetch import DEFAULT_DEPTH, prefetched


@dataclass
class EmbedResult:
    paths: list[Path]
    vectors: np.ndarray          # (N, D) float32; NaN rows where errors[i] is not None
    errors: list[str | None]
    n_cached: int
    seconds: float

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def extraction_namespace(backbone: Backbone, feature: str, layer: int, prompt: str) -> dict:
    """Everything besides the image bytes that an embedding depends on (the cache namespace)."""
    return {"backbone": backbone.fingerprint, "feature": feature,
            "layer": layer if feature == "answer" else None,
            "image_size": backbone.image_size,
            "prompt": prompt if feature == "answer" else None}


def open_cache(cache_dir, backbone: Backbone, feature: str, layer: int, prompt: str) -> EmbeddingCache | None:
    from rainclf.config import resolve_cache_dir

    cache_dir = resolve_cache_dir(cache_dir)
    if cache_dir is None:
        return None
    return EmbeddingCache(cache_dir, extraction_namespace(backbone, feature, layer, prompt))


def embed_paths(backbone: Backbone, paths: Sequence[str | Path], feature: str = "vision",
                layer: int = -1, prompt: str = DEFAULT_PROMPT, batch_size: int = 8,
                cache: EmbeddingCache | None = None, progress: bool = True,
                desc: str = "embedding", prefetch: int | None = None) -> EmbedResult:
    """Embed every path; errors are collected per file, never raised. ``prefetch``: batches read
    and decoded ahead in a thread while the model runs (0: serially, as before; None: 2 with 4
    cores or more, else 0 — on 2 loaded cores the decode thread measured 0.89x, see
    tools/bench_predict.py)."""
    if prefetch is None:
        prefetch = DEFAULT_DEPTH if (os.cpu_count() or 1) >= 4 else 0
    from tqdm.auto import tqdm

    backbone.check_feature(feature, layer)
    if batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    paths = [Path(p) for p in paths]
    start = time.perf_counter()
    rows: list[np.ndarray | None] = [None] * len(paths)
    errors: list[str | None] = [None] * len(paths)
    n_cached = 0
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)

    put: set[str] = set()

    def load(lo: int):
        """Read, hash, look up, decode and resize one batch (in a prefetch thread): cache hits,
        misses (index, sha, image) and errors (index, message)."""
        hits, todo, bad = [], [], []
        for i in range(lo, min(lo + batch_size, len(paths))):
            try:
                data = read_bytes(paths[i])
                sha = hashlib.sha256(data).hexdigest()
                hit = cache.get(sha) if cache is not None else None
                if hit is not None:
                    hits.append((i, hit))
                    continue
                todo.append((i, sha, decode_image(data, paths[i])))
            except ImageError as e:
                bad.append((i, str(e)))
        if todo:   # resizing overlaps the previous batch's forward too (a no-op when embed resizes)
            resized = backbone.prepare_images([im for _, _, im in todo])
            todo = [(i, sha, im) for (i, sha, _), im in zip(todo, resized)]
        return lo, hits, todo, bad

    for lo, hits, todo, bad in prefetched(range(0, len(paths), batch_size), load, prefetch):
        for i, hit in hits:
            rows[i] = hit
        n_cached += len(hits)
        for i, message in bad:
            errors[i] = message
        if put:   # looked up ahead, before an earlier batch of this run stored the same bytes
            again = {i: h for i, sha, _ in todo if sha in put and (h := cache.get(sha)) is not None}
            for i, hit in again.items():
                rows[i] = hit
            n_cached += len(again)
            todo = [t for t in todo if t[0] not in again]
        if todo:
            vecs = backbone.embed([im for _, _, im in todo], feature=feature, layer=layer, prompt=prompt)
            for (i, sha, _), vec in zip(todo, vecs):
                rows[i] = vec
                if cache is not None:
                    cache.put(sha, vec)
                    put.add(sha)
        bar.update(min(lo + batch_size, len(paths)) - lo)
    bar.close()
    dim = next((r.shape[0] for r in rows if r is not None), None)
    if dim is None:
        dim = backbone.dim(feature)
    vectors = np.full((len(paths), dim), np.nan, dtype=np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            vectors[i] = r
    return EmbedResult(paths, vectors, errors, n_cached, time.perf_counter() - start)
