"""Sharded ``embed`` / ``predict``: several processes (``torchrun`` / ``accelerate launch``), one
result. ``predict()`` and ``embed_to_file()`` call these when the launcher's RANK / WORLD_SIZE are
set; the process-group helpers they build on are in ``parallel/ddp.py``.

    embed_sharded / predict_sharded      each rank writes one shard file, rank 0 merges into the
                                         same output one process writes (same rows, order, numbers)

Inputs are listed in the order one process would use (``find_images`` is sorted, a dataset keeps
its file order); rank r owns one contiguous block, cut on batch boundaries so every batch holds
the same images as in a one-process run. Its shard file goes, atomically, to
``.shards/<output name>-<run key>/`` beside the output, where the run key hashes the inputs (path,
size, mtime), the model and the settings. Rank 0 computes its own block, then waits for the other
files (a file barrier: no process group is needed, and a dead rank leaves every finished shard on
disk), merges, writes the output and removes the shard folder. A rerun of the same command skips
every shard that is already there and valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np

from rainclf.heads.base import ClassifierBase
from rainclf.io import atomic_file
from rainclf.parallel.ddp import DistContext, dist_context, rank_device, shard_range

SHARDS_DIR = ".shards"
TIMEOUT_ENV = "RAINCLF_SHARD_TIMEOUT"     # seconds rank 0 waits for the other shards
DEFAULT_TIMEOUT = 6 * 3600.0
# RunOptions fields that never change a prediction, so they stay out of the run key
_NOT_IN_KEY = ("device", "progress", "cache_dir", "providers")


def _log(ctx: DistContext, msg: str, progress: bool) -> None:
    if progress:
        print(f"rainclf: [rank {ctx.rank}/{ctx.world_size}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- sharding

def run_key(kind: str, paths: Sequence[Path], settings: dict) -> str:
    """Hash of what a run computes: the inputs (path, size, mtime) and every setting."""
    h = hashlib.sha256(json.dumps({"kind": kind, "settings": settings}, sort_keys=True,
                                  ensure_ascii=False, default=str).encode())
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{p}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def tree_stamp(path) -> list:
    """(relative path, size, mtime) of every file under a model directory: a refit changes it."""
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [[str(p.relative_to(root) if root.is_dir() else p), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files if p.exists()]


class ShardStore:
    """The shard files of one run, beside its output: ``.shards/<name>-<key>/shard-RRRRR-of-WWWWW``."""

    def __init__(self, output, key: str, world: int, suffix: str):
        output = Path(output)
        self.root = output.parent / SHARDS_DIR
        self.dir = self.root / f"{output.name}-{key}"
        self.key, self.world, self.suffix, self.output_name = key, world, suffix, output.name

    def path(self, rank: int) -> Path:
        return self.dir / f"shard-{rank:05d}-of-{self.world:05d}{self.suffix}"

    def write(self, rank: int, data: bytes) -> None:
        with atomic_file(self.path(rank), "wb") as f:
            f.write(data)

    def wait(self, ranks: Sequence[int], ready: Callable[[int], bool], timeout: float | None = None) -> None:
        """Block until ``ready(rank)`` holds for every rank, or fail naming the missing shards."""
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT)
        pending, start, pause = list(ranks), time.monotonic(), 0.05
        while True:
            pending = [r for r in pending if not ready(r)]
            if not pending:
                return
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"shard(s) {', '.join(map(str, pending))} of {self.world} did not appear in {self.dir} "
                    f"within {timeout:.0f} s (${TIMEOUT_ENV}); the finished shards are kept: rerun the same "
                    "command to compute only the missing ones")
            time.sleep(pause)
            pause = min(pause * 1.5, 2.0)

    def clean(self) -> None:
        """Remove this run's shards and stale ones of earlier runs for the same output."""
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return
        for d in entries:   # exactly "<output name>-<16 hex>": never another output's shards
            stem, _, key = d.name.rpartition("-")
            if stem == self.output_name and len(key) == 16 and all(c in "0123456789abcdef" for c in key):
                shutil.rmtree(d, ignore_errors=True)
        try:
            self.root.rmdir()
        except OSError:
            pass   # other outputs in the same folder still have shards


# --------------------------------------------------------------------------- sharded embed

def _embed_shard_bytes(ctx, key, paths, res) -> bytes:
    from safetensors.numpy import save

    meta = {"run_key": key, "rank": str(ctx.rank), "world": str(ctx.world_size),
            "paths": json.dumps([str(p) for p in paths]),
            "errors": json.dumps(res.errors), "seconds": f"{res.seconds:.6f}",
            "n_cached": str(res.n_cached)}
    return save({"vectors": np.ascontiguousarray(res.vectors, dtype=np.float32)}, metadata=meta)


def _read_embed_shard(path: Path, key: str, paths: list[str], with_vectors: bool = True):
    """(vectors, errors, meta) of an intact shard of this run holding exactly ``paths``; else None."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("run_key") != key or json.loads(meta.get("paths", "null")) != paths:
                return None
            vectors = f.get_tensor("vectors") if with_vectors else None
        errors = json.loads(meta["errors"])
    except Exception:   # missing, half-copied by hand, not safetensors: recompute
        return None
    if len(errors) != len(paths) or (vectors is not None and vectors.shape[0] != len(paths)):
        return None
    return vectors, errors, meta


def embed_sharded(data, out_file, backbone_name: str, backbone_options=None, feature: str = "vision",
                  layer: int = -1, prompt: str | None = None, batch_size: int = 8, cache_dir=None,
                  progress: bool = True, ctx: DistContext | None = None, timeout: float | None = None):
    """``embed_to_file`` with one shard per rank. Returns its summary dict on rank 0 (plus
    ``shard_seconds`` and ``shards_reused``), None on the other ranks."""
    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions
    from rainclf.embed.extract import (
        EmbedResult,
        embed_paths,
        extraction_namespace,
        open_cache,
    )
    from rainclf.embed.vectors import dataset_or_images, write_embed_file

    ctx = ctx or dist_context()
    prompt = DEFAULT_PROMPT if prompt is None else prompt
    start = time.perf_counter()
    paths, labels, problems = dataset_or_images(data)
    options = backbone_options or BackboneOptions()
    backbone = create_backbone(backbone_name, replace(options, device=rank_device(options.device, ctx)))
    backbone.check_feature(feature, layer)
    key = run_key("embed", paths, {"namespace": extraction_namespace(backbone, feature, layer, prompt),
                                   "batch_size": batch_size})
    store = ShardStore(out_file, key, ctx.world_size, ".safetensors")

    def block(rank):
        return [str(paths[i]) for i in shard_range(len(paths), rank, ctx.world_size, batch_size)]

    mine = block(ctx.rank)
    reused = _read_embed_shard(store.path(ctx.rank), key, mine, with_vectors=False) is not None
    if reused:
        _log(ctx, f"shard {ctx.rank} reused ({len(mine)} inputs, from an earlier run)", progress)
    else:
        res = embed_paths(backbone, mine, feature, layer, prompt, batch_size=batch_size,
                          cache=open_cache(cache_dir, backbone, feature, layer, prompt), progress=progress,
                          desc=f"embed [rank {ctx.rank}]")
        store.write(ctx.rank, _embed_shard_bytes(ctx, key, mine, res))
        _log(ctx, f"shard {ctx.rank} computed ({len(mine)} inputs, {res.seconds:.2f} s)", progress)
    if not ctx.is_main:
        return None
    others = range(1, ctx.world_size)
    store.wait(others, lambda r: _read_embed_shard(store.path(r), key, block(r), False) is not None, timeout)
    shards = [_read_embed_shard(store.path(r), key, block(r)) for r in range(ctx.world_size)]
    if any(s is None for s in shards):
        raise RuntimeError(f"a shard in {store.dir} changed while merging: rerun the same command")
    vectors = np.concatenate([s[0] for s in shards]) if paths else np.zeros((0, backbone.dim(feature)), np.float32)
    errors = [e for s in shards for e in s[1]]
    res = EmbedResult(paths, vectors, errors, sum(int(s[2].get("n_cached", 0)) for s in shards),
                      time.perf_counter() - start)
    result = write_embed_file(out_file, res, labels, problems, backbone, feature, layer, prompt)
    store.clean()
    result.update(shard_seconds=[float(s[2]["seconds"]) for s in shards], shards_reused=reused)
    return result


# --------------------------------------------------------------------------- sharded predict

def _row_dict(r) -> dict:
    return {"path": r.path, "label": r.label, "p_rain": r.p_rain, "source": r.source, "error": r.error,
            "extra": r.extra}


def _read_predict_shard(path: Path, key: str, paths: list[str]) -> dict | None:
    try:
        shard = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(shard, dict) or shard.get("run_key") != key or shard.get("paths") != paths \
            or len(shard.get("rows", ())) != len(paths):
        return None
    return shard


class _MergedRows(ClassifierBase):
    """Stands in for the classifier on rank 0: answers with the merged shard rows, so the output
    is written by the very same ``predict`` code as in one process."""

    def __init__(self, rows, paths: list[str], random_weights: bool, notes: list[str]):
        self.rows, self.paths, self.notes = rows, paths, notes
        self.config = SimpleNamespace(backbone={"random_weights": random_weights})

    def predict_paths(self, paths):
        if [str(p) for p in paths] != self.paths:
            raise RuntimeError("the input folder changed while the shards were computed: rerun the command")
        return self.rows


def predict_sharded(inputs, model_dir, options=None, output=None, classifier=None, fallback=None,
                    band: tuple[float, float] = (0.35, 0.65), fallback_decoding: str = "constrained",
                    run_local=None, ctx: DistContext | None = None, timeout: float | None = None):
    """``predict`` with one shard per rank (same signature). ``run_local`` is the one-process
    predict (``rainclf.predict.predict_local``): it computes this rank's shard and, on rank 0,
    writes the merged rows. Returns the PredictRun on rank 0, None on the other ranks. Needs
    ``output``: the shards are kept beside it."""
    from rainclf.config import RunOptions
    from rainclf.data.images import find_images
    from rainclf.heads.base import Row
    from rainclf.outputs import output_format

    if run_local is None:
        raise TypeError("predict_sharded needs run_local (rainclf.predict.predict_local)")
    predict = run_local

    ctx = ctx or dist_context()
    options = options or RunOptions()
    if output is None:
        raise ValueError(f"with {ctx.world_size} processes pass -o FILE (.csv or .jsonl): each process "
                         "writes a shard beside it and rank 0 merges them there")
    output_format(output)
    start = time.perf_counter()
    if isinstance(inputs, (str, Path)):
        paths, _ = find_images(inputs)
    else:
        paths = [Path(p) for p in inputs]
    settings = {"model": tree_stamp(model_dir),
                "fallback": tree_stamp(fallback) if fallback else None, "band": list(band),
                "fallback_decoding": fallback_decoding,
                "options": {k: v for k, v in asdict(options).items() if k not in _NOT_IN_KEY}}
    key = run_key("predict", paths, settings)
    store = ShardStore(output, key, ctx.world_size, ".json")

    def block(rank):
        return [str(paths[i]) for i in shard_range(len(paths), rank, ctx.world_size, options.batch_size)]

    mine = block(ctx.rank)
    reused = _read_predict_shard(store.path(ctx.rank), key, mine) is not None
    if reused:
        _log(ctx, f"shard {ctx.rank} reused ({len(mine)} images, from an earlier run)", options.progress)
    else:
        shard = {"run_key": key, "rank": ctx.rank, "world": ctx.world_size, "paths": mine, "rows": [],
                 "random_weights": False, "notes": []}
        if mine:
            t0 = time.perf_counter()
            opts = replace(options, device=rank_device(options.device, ctx))
            run = predict(mine, model_dir, opts, classifier=classifier, fallback=fallback, band=band,
                          fallback_decoding=fallback_decoding)
            shard.update(rows=[_row_dict(r) for r in run.rows], random_weights=run.summary.random_weights,
                         notes=run.summary.notes, seconds=time.perf_counter() - t0)
        store.write(ctx.rank, json.dumps(shard).encode("ascii"))  # ASCII: survives non-UTF-8 names
        _log(ctx, f"shard {ctx.rank} computed ({len(mine)} images)", options.progress)
    if not ctx.is_main:
        return None
    store.wait(range(1, ctx.world_size),
               lambda r: _read_predict_shard(store.path(r), key, block(r)) is not None, timeout)
    shards = [_read_predict_shard(store.path(r), key, block(r)) for r in range(ctx.world_size)]
    if any(s is None for s in shards):
        raise RuntimeError(f"a shard in {store.dir} changed while merging: rerun the same command")
    rows = [Row(**d) for s in shards for d in s["rows"]]
    notes = list(dict.fromkeys(n for s in shards for n in s["notes"]))
    merged = _MergedRows(rows, [str(p) for p in paths], any(s["random_weights"] for s in shards), notes)
    run = predict(inputs, model_dir, options, output=output, classifier=merged)
    run.summary.seconds = time.perf_counter() - start
    store.clean()
    return run


