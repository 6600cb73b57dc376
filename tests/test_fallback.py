"""Tests for rainclf.heads.fallback: routing by the head's p_rain, invalid fallback answers never reaching
the output, and the CLI end to end with a real LoRA head + generative directory on glm4v-tiny."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rainclf.heads.base import ClassifierBase, Row
from rainclf.heads.fallback import FallbackClassifier
from rainclf.labels import LABELS, NO_RAIN, RAIN

P_RAIN = [0.0, 0.1, 0.35, 0.5, 0.65, 0.9, 1.0]


class StubHead(ClassifierBase):
    """A head whose p_rain for path i is P_RAIN[i]; 'bad' paths are error rows."""

    config = type("Config", (), {"backbone": {"random_weights": True}})()
    notes: list = []

    def predict_paths(self, paths):
        rows = []
        for p in paths:
            if "bad" in str(p):
                rows.append(Row(path=str(p), error=f"{p}: not an image"))
            else:
                pr = P_RAIN[int(Path(p).stem)]
                rows.append(Row(path=str(p), label=RAIN if pr >= 0.5 else NO_RAIN, p_rain=pr))
        return rows


class StubGen(ClassifierBase):
    """Answers the opposite of the head's label, or free text for the paths listed in ``invalid``."""

    def __init__(self, invalid=()):
        self.invalid, self.asked = set(invalid), []
        self.notes = ["generative (greedy): stub"]

    def predict_paths(self, paths):
        self.asked += [str(p) for p in paths]
        rows = []
        for p in paths:
            i = int(Path(p).stem)
            if i in self.invalid:
                rows.append(Row(path=str(p), source="generative", extra={"raw": "天空很美", "format_valid": False}))
            else:
                label = NO_RAIN if P_RAIN[i] >= 0.5 else RAIN
                rows.append(Row(path=str(p), label=label, p_rain=None, source="generative",
                                extra={"raw": label, "format_valid": True}))
        return rows


PATHS = [f"{i}.jpg" for i in range(len(P_RAIN))]


def test_full_band_sends_every_image():
    gen = StubGen()
    rows = FallbackClassifier(StubHead(), gen, (0.0, 1.0)).predict_paths(PATHS)
    assert gen.asked == PATHS
    assert [r.source for r in rows] == ["fallback"] * len(PATHS)
    assert all(r.label != r.extra["head_label"] for r in rows)          # the stub disagrees


def test_empty_band_sends_nothing():
    gen = StubGen()
    clf = FallbackClassifier(StubHead(), gen, (0.5, 0.5))
    rows = clf.predict_paths(PATHS)
    assert gen.asked == []
    assert [r.source for r in rows] == ["head"] * len(PATHS)
    assert clf.notes[-1].startswith("fallback: 0 of 7 images asked")


def test_band_is_inclusive_and_errors_are_never_routed():
    gen = StubGen()
    rows = FallbackClassifier(StubHead(), gen, (0.35, 0.65)).predict_paths(PATHS + ["bad.jpg"])
    assert gen.asked == ["2.jpg", "3.jpg", "4.jpg"]
    assert [r.source for r in rows] == ["head", "head", "fallback", "fallback", "fallback", "head", "head", "head"]
    assert rows[-1].error and rows[-1].label is None
    assert rows[3].extra["head_p_rain"] == 0.5 and rows[3].extra["head_label"] == RAIN


def test_invalid_fallback_answers_keep_head_label():
    gen = StubGen(invalid={3})
    clf = FallbackClassifier(StubHead(), gen, (0.0, 1.0))
    rows = clf.predict_paths(PATHS)
    assert rows[3].source == "head" and rows[3].label == RAIN and rows[3].p_rain == 0.5
    assert rows[3].extra["raw"] == "天空很美" and rows[3].extra["format_valid"] is False
    assert all(r.label in LABELS for r in rows)
    assert "1 invalid answers kept the head's label" in clf.notes[-1]
    assert "6 answered with a label" in clf.notes[-1]
    assert "generative (greedy): stub" in clf.notes


def test_bad_band_is_refused():
    with pytest.raises(ValueError):
        FallbackClassifier(StubHead(), StubGen(), (0.7, 0.3))


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A LoRA head and a generative directory, a few steps each (what they learned is not the point)."""
    import torch

    from rainclf.fit import FitOptions, fit
    from rainclf.labels import NO_RAIN, RAIN

    n = torch.get_num_threads()
    torch.set_num_threads(1)   # the tiny model is faster on one thread, a lot on a busy machine
    root = tmp_path_factory.mktemp("fb")
    rng = np.random.default_rng(0)
    for label, base in ((RAIN, (200, 60, 50)), (NO_RAIN, (50, 70, 200))):
        (root / "data" / label).mkdir(parents=True)
        for i in range(6):
            arr = np.clip(np.array(base) + rng.normal(0, 25, (112, 112, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "data" / label / f"{i}.png")
    common = dict(backbone="glm4v-tiny", feature="answer", device="cpu", cache_dir=None, progress=False,
                  val_split=0.0)
    hp = dict(steps=3, lr=1e-2, max_new_tokens=4)
    fit(root / "data", root / "head", FitOptions(head="lora", head_params=hp, **common))
    fit(root / "data", root / "gen", FitOptions(head="generative", head_params=hp, **common))
    yield root
    torch.set_num_threads(n)


@pytest.mark.parametrize("band, source", [("0,1", "fallback"), ("0.5,0.5", "head")])
def test_cli_fallback_routing(dirs, band, source):
    from click.testing import CliRunner

    from rainclf.cli import main

    result = CliRunner().invoke(main, ["predict", str(dirs / "data"), "--model", str(dirs / "head"),
                                       "--fallback", str(dirs / "gen"), "--band", band,
                                       "--fallback-decoding", "constrained", "--no-cache", "-q"])
    assert result.exit_code == 0, result.output
    text = result.output[result.output.index("path,label"):]
    rows = list(csv.DictReader(io.StringIO(text)))[:12]
    assert len(rows) == 12
    assert {r["source"] for r in rows} == {source}
    assert all(r["label"] in LABELS for r in rows)
    asked = 12 if source == "fallback" else 0
    assert f"fallback: {asked} of 12 images asked" in result.output


@pytest.mark.parametrize("feature", ["vision", "answer"])
def test_linear_head_shares_the_generative_base_model(dirs, feature, tmp_path):
    """A linear head + generative fallback on one backbone keep one model in memory: the head
    embeds through the generative model with its adapters off, with unchanged probabilities."""
    from rainclf.config import RunOptions
    from rainclf.fit import FitOptions, fit
    from rainclf.model import load_classifier
    from rainclf.predict import open_classifier

    lin = tmp_path / "lin"
    fit(dirs / "data", lin, FitOptions(backbone="glm4v-tiny", feature=feature, device="cpu", cache_dir=None, progress=False, val_split=0.0))
    paths = sorted((dirs / "data").rglob("*.png"))
    opts = RunOptions(device="cpu", progress=False)
    alone = [r.p_rain for r in load_classifier(lin, opts).predict_paths(paths)]
    combo = open_classifier(lin, opts, fallback=dirs / "gen", band=(0.5, 0.5))
    assert combo.shared_base
    gen_before = [r.p_rain for r in combo.gen.predict_paths(paths[:3])]
    rows = combo.predict_paths(paths)
    np.testing.assert_allclose([r.p_rain for r in rows], alone, rtol=0, atol=1e-6)
    assert combo.head.backbone._model is combo.gen.backbone._model   # one base model, not two
    # the generative model's adapters are back on afterwards: its answers are unchanged
    assert [r.p_rain for r in combo.gen.predict_paths(paths[:3])] == gen_before
