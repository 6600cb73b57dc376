"""Groups of images that must stay on one side of a train/validation split, and label conflicts.

A validation photo whose near-copy (the same photo recropped, recoloured, re-encoded) sits in the
training part measures memory, not generalisation. Three sources of groups, merged (union-find):

    exact       identical bytes (sha256) are one group, always
    perceptual  imagehash's pHash (64-bit DCT of a 32×32 greyscale thumbnail): two images whose
                hashes differ in at most ``threshold`` of 64 bits are one group, chained (A~B, B~C:
                one group). ``DEFAULT_THRESHOLD`` was measured on ../shared/weather against its
                near_duplicate_groups.csv (``python tools/measure_groups.py``): the smallest
                threshold that finds every listed group. Its false merges (mostly sunsets with a
                central sun, and some near-duplicates the list missed) only make a few groups
                larger; a missed group leaks into validation, so recall comes first
    given       a ``group,file`` CSV (``--groups FILE``, like near_duplicate_groups.csv)

Identical bytes under both labels are a *conflict*: the head would be taught noise.
``check_conflicts`` names them and ``fit`` refuses unless ``--allow-conflicts``.

Every image is read once here (sha256 + decode + hash); an unreadable one gets an ``error`` and no
hash, and ``fit`` skips it later as before. Pairwise comparison is numpy over 64-bit hashes:
O(N²) bit operations, about 1 s for 10,000 images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rainclf.data.datasets import DataError
from rainclf.data.images import ImageError, decode_image, describe_path, read_bytes

#: max Hamming distance (of 64 bits) between pHashes of two near-duplicates; see module docstring
DEFAULT_THRESHOLD = 14


class ConflictError(DataError):
    """Identical images carry both labels (one line naming two of them and the fix)."""


@dataclass(frozen=True)
class ImageFacts:
    """What the split and the data checks need to know about one image file."""

    path: Path
    sha256: str | None = None     # of the file's bytes; None when the file cannot be read
    phash: int | None = None      # 64-bit pHash; None when the file cannot be decoded
    size: tuple[int, int] | None = None   # (width, height) after EXIF rotation
    error: str | None = None


def image_facts(paths: Sequence[str | Path], progress: bool = False, desc: str = "hashing") -> list[ImageFacts]:
    """sha256, pHash and size of every path (a bad file gets ``error``, never raises)."""
    import imagehash
    from tqdm.auto import tqdm

    out = []
    for p in tqdm([Path(p) for p in paths], desc=desc, unit="img", disable=not progress, leave=False):
        try:
            data = read_bytes(p)
        except ImageError as e:
            out.append(ImageFacts(p, error=str(e)))
            continue
        sha = hashlib.sha256(data).hexdigest()
        try:
            im = decode_image(data, p)
        except ImageError as e:
            out.append(ImageFacts(p, sha, error=str(e)))
            continue
        out.append(ImageFacts(p, sha, int(str(imagehash.phash(im)), 16), im.size))
    return out


_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.uint8)


def _distances(h: np.ndarray, a: int) -> np.ndarray:
    """Hamming distances from hash ``a`` to every later one: (N - a - 1,) int32."""
    x = (h[a + 1:] ^ h[a]).view(np.uint8).reshape(-1, 8)        # (N - a - 1, 8) bytes of the XOR
    return _POPCOUNT[x].sum(axis=1, dtype=np.int32)


def near_pairs(facts: Sequence[ImageFacts], threshold: int) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for i < j whose pHashes differ in at most ``threshold`` bits."""
    idx = [i for i, f in enumerate(facts) if f.phash is not None]
    if threshold < 0 or len(idx) < 2:
        return []
    h = np.array([facts[i].phash for i in idx], dtype=np.uint64)
    pairs = []
    for a in range(len(idx) - 1):
        d = _distances(h, a)
        for k in np.flatnonzero(d <= threshold):
            pairs.append((idx[a], idx[a + 1 + int(k)], int(d[k])))
    return pairs


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)


@dataclass
class Grouping:
    """Groups of two or more images (indices into the facts list) and where each link came from."""

    groups: list[list[int]]        # each sorted, groups sorted by their first member
    exact_pairs: list[tuple[int, int]]
    near_pairs: list[tuple[int, int, int]]
    given_pairs: int

    def by_path(self, facts: Sequence[ImageFacts]) -> dict[Path, str]:
        """``{path: group id}`` for ``data.datasets.stratified_split(groups=)``."""
        return {facts[i].path: f"g{n}" for n, members in enumerate(self.groups) for i in members}

    def n_images(self) -> int:
        return sum(len(g) for g in self.groups)


def find_groups(facts: Sequence[ImageFacts], threshold: int | None = DEFAULT_THRESHOLD,
                given: dict[Path, str] | None = None) -> Grouping:
    """Merge exact duplicates, perceptual near-duplicates (``threshold`` None: off) and ``given``
    groups (``{absolute path: group}``, from ``datasets.load_groups``) into one grouping."""
    uf = _UnionFind(len(facts))
    exact: list[tuple[int, int]] = []
    first: dict[str, int] = {}
    for i, f in enumerate(facts):
        if f.sha256 is None:
            continue
        j = first.setdefault(f.sha256, i)
        if j != i:
            exact.append((j, i))
            uf.union(j, i)
    near = near_pairs(facts, threshold) if threshold is not None else []
    for i, j, _ in near:
        uf.union(i, j)
    n_given = 0
    if given:
        seen: dict[str, int] = {}
        for i, f in enumerate(facts):
            g = given.get(Path(os.path.abspath(f.path)))
            if g is not None:
                j = seen.setdefault(g, i)
                if j != i:
                    uf.union(j, i)
                    n_given += 1
    members: dict[int, list[int]] = {}
    for i in range(len(facts)):
        members.setdefault(uf.find(i), []).append(i)
    groups = sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])
    return Grouping(groups, exact, near, n_given)


def find_conflicts(facts: Sequence[ImageFacts], labels: Sequence[str]) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of byte-identical images with different labels (first occurrence, other)."""
    first: dict[str, int] = {}
    out = []
    for i, f in enumerate(facts):
        if f.sha256 is None:
            continue
        j = first.setdefault(f.sha256, i)
        if j != i and labels[j] != labels[i]:
            out.append((j, i))
    return out


def check_conflicts(facts: Sequence[ImageFacts], examples: Sequence) -> None:
    """Raise ``ConflictError`` (one line) when identical images carry both labels."""
    pairs = find_conflicts(facts, [e.label for e in examples])
    if pairs:
        i, j = pairs[0]
        more = f" (and {len(pairs) - 1} more pair(s); `rainclf check-data DATA` lists them)" if len(pairs) > 1 else ""
        raise ConflictError(
            f"{describe_path(facts[i].path)} ({examples[i].label}, {examples[i].origin}) and "
            f"{describe_path(facts[j].path)} ({examples[j].label}, {examples[j].origin}) are byte-identical "
            f"images with different labels{more} — fix the label, remove one copy, or pass "
            "--allow-conflicts to train on both")
