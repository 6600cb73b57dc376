"""rainclf.report.timing with stub classifiers that log their calls: every model and its fallback
warmed at every call size before the first timed call, calls interleaved in rotating order,
rows from the first of several passes, one model at a time on request."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from rainclf.heads.base import Row
from rainclf.report.timing import chunk_sizes, run_models


class Stub:
    def __init__(self, name: str, log: list, gen=None):
        self.name, self.log, self.config, self.notes = name, log, None, []
        if gen is not None:
            self.gen = gen

    def describe(self):
        return {"n_cached": 0, "backbone_weights_mb": None, "decoding": None}

    def predict_paths(self, paths):
        warm = all(Path(p).name.startswith("warmup_") for p in paths)
        self.log.append((self.name, "warm" if warm else "timed", len(paths)))
        return [Row(path=str(p), label="会下雨", p_rain=0.9) for p in paths]


@pytest.fixture
def images(tmp_path) -> list[Path]:
    out = []
    for i in range(5):
        out.append(tmp_path / f"{i}.png")
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(out[-1])
    return out


def test_chunk_sizes():
    assert chunk_sizes(5, 2) == [1, 2] and chunk_sizes(4, 2) == [2] and chunk_sizes(3, 1) == [1]
    assert chunk_sizes(0, 4) == []


def test_everything_warm_before_any_timing_then_interleaved(images):
    log: list = []
    openers = {"a": lambda: Stub("a", log), "b": lambda: Stub("b", log, gen=Stub("b.gen", log)),
               "c": lambda: Stub("c", log)}
    runs = run_models(openers, images, "cpu", size=2, warmup=2, repeats=2)
    first_timed = next(i for i, e in enumerate(log) if e[1] == "timed")
    warm = log[:first_timed]
    # 2 calls at each size (2 and the last chunk's 1) for a, b, b's fallback and c; nothing later
    for name in ("a", "b", "b.gen", "c"):
        assert sorted(n for m, kind, n in warm if m == name) == [1, 1, 2, 2]
    assert all(kind == "timed" for _, kind, _ in log[first_timed:])
    timed = [m for m, _, _ in log[first_timed:]]
    # chunk k of pass r starts with model (k + r) mod 3
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b",      # pass 0, chunks 0-2
                     "b", "c", "a", "c", "a", "b", "a", "b", "c"]      # pass 1
    for name, run in runs.items():
        assert [r.path for r in run.rows] == [str(p) for p in images]  # the first pass only
        assert len(run.seconds) == 10 and run.repeats == 2 and run.warm_sizes == [1, 2]


def test_one_model_at_a_time(images):
    log: list = []
    opened: list = []

    def opener(name):
        def open_():
            opened.append((name, len(log)))
            return Stub(name, log)
        return open_

    run_models({"a": opener("a"), "b": opener("b")}, images, "cpu", size=5, warmup=1, interleave=False)
    assert [m for m, _, _ in log] == ["a", "a", "b", "b"]                 # warm, timed; warm, timed
    assert opened == [("a", 0), ("b", 2)]                                # b is opened after a is timed
