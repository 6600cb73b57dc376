"""On-disk embedding cache: one small checksummed file per (image bytes, extraction setting).

Key = sha256 of the image bytes, inside a namespace that hashes everything else the vector
depends on: backbone fingerprint (id, config, weights hash or revision), feature, layer, image
size and prompt. Files are written to a temporary name and renamed, so a killed run or two runs
sharing the directory never leave a half-written entry; every read verifies a sha256 of the
payload, so a damaged file is recomputed, never trusted.

File layout (little-endian): b"RCE1" | uint32 dim | 32-byte sha256(payload) | float32[dim].
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

from rainclf.io import sweep_stale, tmp_name

MAGIC = b"RCE1"
_HEADER = struct.Struct("<4sI32s")


def namespace_key(namespace: dict) -> str:
    return hashlib.sha256(json.dumps(namespace, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:32]


class EmbeddingCache:
    """Get/put float32 vectors by image sha256 within one extraction namespace."""

    def __init__(self, root: str | Path, namespace: dict):
        self.root = Path(root)
        self.namespace = namespace
        self.dir = self.root / "embeddings" / namespace_key(namespace)
        self.hits = self.misses = self.damaged = 0
        self._described = False
        self._swept: set[Path] = set()

    def _path(self, image_sha: str) -> Path:
        return self.dir / image_sha[:2] / f"{image_sha}.rce"

    def get(self, image_sha: str) -> np.ndarray | None:
        path = self._path(image_sha)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        vec = decode_entry(data)
        if vec is None:
            self.damaged += 1
            self.misses += 1
            return None
        self.hits += 1
        return vec

    def put(self, image_sha: str, vector: np.ndarray) -> None:
        path = self._path(image_sha)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not self._described:
                self._write_atomic(self.dir / "namespace.json",
                                   json.dumps(self.namespace, indent=2, ensure_ascii=False).encode())
                self._described = True
            self._write_atomic(path, encode_entry(vector))
        except OSError:
            pass  # a full or read-only cache slows the next run down; it must not fail this one

    def _write_atomic(self, path: Path, data: bytes) -> None:
        if path.parent not in self._swept:
            sweep_stale(path.parent)  # temporary files a killed run left here (older than an hour)
            self._swept.add(path.parent)
        tmp = tmp_name(path)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


def encode_entry(vector: np.ndarray) -> bytes:
    payload = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return _HEADER.pack(MAGIC, vector.size, hashlib.sha256(payload).digest()) + payload


def decode_entry(data: bytes) -> np.ndarray | None:
    """The stored vector, or None when the bytes are not an intact entry."""
    if len(data) < _HEADER.size:
        return None
    magic, dim, digest = _HEADER.unpack_from(data)
    payload = data[_HEADER.size:]
    if magic != MAGIC or len(payload) != 4 * dim or hashlib.sha256(payload).digest() != digest:
        return None
    return np.frombuffer(payload, dtype="<f4").astype(np.float32)
