"""Embedding cache: hits return identical arrays, namespaces separate settings, damage is recomputed."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_class_folders

from rainclf.embed.cache import EmbeddingCache, decode_entry, encode_entry
from rainclf.embed.extract import embed_paths, extraction_namespace, open_cache


@pytest.fixture()
def photos(tmp_path):
    root = write_class_folders(tmp_path / "imgs", n_per_class=3)
    return sorted(root.rglob("*.jpg"))


def test_entry_round_trip_and_damage_detection():
    v = np.arange(10, dtype=np.float32) / 3
    data = encode_entry(v)
    np.testing.assert_array_equal(decode_entry(data), v)
    assert decode_entry(data[:-1]) is None                      # truncated
    flipped = bytearray(data); flipped[-1] ^= 1
    assert decode_entry(bytes(flipped)) is None                  # bit flip in the payload
    assert decode_entry(b"garbage") is None


def test_second_run_is_served_from_cache_identically(tiny_backbone, photos, tmp_path):
    cache = open_cache(tmp_path / "c", tiny_backbone, "vision", -1, "")
    cold = embed_paths(tiny_backbone, photos, cache=cache, progress=False)
    assert cold.n_cached == 0 and cache.misses == len(photos)
    cache2 = open_cache(tmp_path / "c", tiny_backbone, "vision", -1, "")
    warm = embed_paths(tiny_backbone, photos, cache=cache2, progress=False)
    assert warm.n_cached == len(photos) and cache2.hits == len(photos)
    np.testing.assert_array_equal(warm.vectors, cold.vectors)
    fresh = embed_paths(tiny_backbone, photos, cache=None, progress=False)
    np.testing.assert_array_equal(fresh.vectors, cold.vectors)   # cache vs fresh parity


def test_cached_run_does_not_load_the_model(photos, tmp_path):
    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import BackboneOptions

    first = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    embed_paths(first, photos, cache=open_cache(tmp_path, first, "vision", -1, ""), progress=False)
    second = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    embed_paths(second, photos, cache=open_cache(tmp_path, second, "vision", -1, ""), progress=False)
    assert second._model is None


def test_damaged_entry_is_recomputed_not_trusted(tiny_backbone, photos, tmp_path):
    cache = open_cache(tmp_path, tiny_backbone, "vision", -1, "")
    good = embed_paths(tiny_backbone, photos, cache=cache, progress=False).vectors
    entries = sorted(cache.dir.rglob("*.rce"))
    assert len(entries) == len(photos)
    entries[0].write_bytes(entries[0].read_bytes()[:-8])
    entries[1].write_bytes(b"\x00" * 40)
    cache2 = open_cache(tmp_path, tiny_backbone, "vision", -1, "")
    again = embed_paths(tiny_backbone, photos, cache=cache2, progress=False)
    assert cache2.damaged == 2 and again.n_cached == len(photos) - 2
    np.testing.assert_array_equal(again.vectors, good)
    # and the damaged files were rewritten intact
    assert all(decode_entry(p.read_bytes()) is not None for p in entries)


def test_namespace_covers_every_setting(tiny_backbone):
    base = extraction_namespace(tiny_backbone, "answer", -1, "q1")
    variants = [extraction_namespace(tiny_backbone, "answer", -2, "q1"),
                extraction_namespace(tiny_backbone, "answer", -1, "q2"),
                extraction_namespace(tiny_backbone, "vision", -1, "q1")]
    dirs = {EmbeddingCache("/x", ns).dir for ns in [base] + variants}
    assert len(dirs) == 4
    # the prompt and layer do not matter for the vision feature
    assert extraction_namespace(tiny_backbone, "vision", -1, "a") == extraction_namespace(tiny_backbone, "vision", -3, "b")


def test_identical_bytes_share_an_entry(tiny_backbone, photos, tmp_path):
    dup = tmp_path / "copy.jpg"
    dup.write_bytes(photos[0].read_bytes())
    cache = open_cache(tmp_path / "c", tiny_backbone, "vision", -1, "")
    embed_paths(tiny_backbone, [photos[0], dup], cache=cache, progress=False, batch_size=1)
    assert cache.hits == 1


def test_stale_temporary_files_of_killed_runs_are_swept(tiny_backbone, photos, tmp_path):
    import os
    import time

    cache = open_cache(tmp_path, tiny_backbone, "vision", -1, "")
    embed_paths(tiny_backbone, photos[:1], cache=cache, progress=False)
    sub = next(cache.dir.glob("??"))
    old, fresh = sub / ".rainclf-tmp-x.rce.1.aa", sub / ".rainclf-tmp-y.rce.2.bb"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    past = time.time() - 7200
    os.utime(old, (past, past))
    cache2 = open_cache(tmp_path, tiny_backbone, "vision", -1, "")
    cache2.put("%s" % sub.name + "f" * 62, np.zeros(3, dtype=np.float32))
    assert not old.exists()          # an hour old: a killed run's leftover
    assert fresh.exists()            # may belong to a run still writing
