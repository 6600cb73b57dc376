"""Tests for rainclf.embed.prefetch and its use in embed_paths: results in input order, bounded
look-ahead, errors where they belong, and the same vectors/errors as the serial path."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from rainclf.backbones import create_backbone
from rainclf.backbones.base import BackboneOptions
from rainclf.embed.extract import embed_paths
from rainclf.embed.prefetch import prefetched


def test_results_keep_input_order_when_later_items_finish_first():
    def slow_first(i):
        time.sleep(0.05 if i % 3 == 0 else 0.0)
        return i * i

    assert list(prefetched(range(10), slow_first, depth=3, workers=3)) == [i * i for i in range(10)]


def test_look_ahead_is_bounded_by_depth():
    started, lock = [], threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        return i

    out = prefetched(range(20), work, depth=2, workers=2)
    seen = []
    for value in out:
        time.sleep(0.01)           # let the workers run as far ahead as they may
        with lock:
            ahead = max(started) - value
        seen.append(ahead)
    assert max(seen) <= 2          # never more than depth items beyond the one being consumed


def test_an_error_is_raised_at_its_position():
    def fail_at_3(i):
        if i == 3:
            raise KeyError("three")
        return i

    got = []
    with pytest.raises(KeyError, match="three"):
        for v in prefetched(range(6), fail_at_3, depth=2):
            got.append(v)
    assert got == [0, 1, 2]


def test_depth_zero_runs_inline():
    names = []
    list(prefetched(range(3), lambda i: names.append(threading.current_thread().name), depth=0))
    assert set(names) == {threading.current_thread().name}


@pytest.mark.usefixtures("one_torch_thread")
def test_embed_paths_prefetched_equals_serial(tmp_path):
    rng = np.random.default_rng(2)
    paths = []
    for i in range(7):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 50, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    paths.insert(3, bad)
    backbone = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    serial = embed_paths(backbone, paths, "vision", batch_size=3, progress=False, prefetch=0)
    ahead = embed_paths(backbone, paths, "vision", batch_size=3, progress=False, prefetch=2)
    assert serial.errors == ahead.errors and serial.errors[3] is not None
    assert sum(e is None for e in ahead.errors) == 7
    ok = serial.ok
    assert np.array_equal(serial.vectors[ok], ahead.vectors[ok])
    assert np.isnan(ahead.vectors[3]).all()
