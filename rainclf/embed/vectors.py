"""The embeddings file (``rainclf embed``): one safetensors file of vectors.

Tensors: ``embeddings`` (N, D) float32 for the images that could be read, ``labels`` (N,) int64
(0 = 不会下雨, 1 = 会下雨) when the input is labelled. Metadata: ``paths`` (JSON list, same order),
``skipped`` (JSON list of "path: reason"), and the extraction namespace (backbone fingerprint,
feature, layer, image size, prompt), so a file always says what it holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rainclf.data.datasets import DataError, load_dataset
from rainclf.data.images import find_images
from rainclf.embed.extract import extraction_namespace
from rainclf.io import atomic_file
from rainclf.labels import label_to_index


def dataset_or_images(data: str | Path) -> tuple[list[Path], list[str] | None, list]:
    """(paths, labels or None, problems): a labelled dataset if DATA is one, else a folder of images."""
    src = Path(data)
    try:
        examples = load_dataset(src)
        return [e.path for e in examples], [e.label for e in examples], []
    except DataError:
        if src.is_file() and src.suffix.lower() in (".jsonl", ".json", ".csv"):
            raise
    paths, problems = find_images(src)
    return paths, None, problems


def write_embed_file(out_file, res, labels, problems, backbone, feature: str, layer: int, prompt: str) -> dict:
    """The safetensors file for an ``EmbedResult`` (also what rank 0 writes after merging the
    shards of a multi-process run, see ``rainclf.parallel``)."""
    from safetensors.numpy import save

    ok = res.ok
    tensors = {"embeddings": np.ascontiguousarray(res.vectors[ok])}
    if labels is not None:
        tensors["labels"] = np.array([label_to_index(l) for l, good in zip(labels, ok) if good], dtype=np.int64)
    skipped = [f"{p}: {e}" for p, e in zip(res.paths, res.errors) if e] + [f"{p}: {m}" for p, m in problems]
    meta = {"paths": json.dumps([str(p) for p, good in zip(res.paths, ok) if good], ensure_ascii=False),
            "skipped": json.dumps(skipped, ensure_ascii=False),
            "namespace": json.dumps(extraction_namespace(backbone, feature, layer, prompt), ensure_ascii=False),
            "backbone": json.dumps(backbone.describe(), ensure_ascii=False)}
    with atomic_file(out_file, "wb") as f:
        f.write(save(tensors, metadata=meta))
    return {"n": int(ok.sum()), "dim": int(res.vectors.shape[1]), "errors": len(skipped),
            "random_weights": backbone.random_weights}
