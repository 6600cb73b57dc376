"""The one classifier protocol (heads/base.py) and the static head table (heads/__init__.py),
exercised on the numpy-only fake backbone (tests/fakes.py): no GLM-4V is loaded here."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from helpers import make_red_blue
from PIL import Image

from rainclf import heads
from rainclf.config import FitOptions, RunOptions, check_head_options
from rainclf.fit import fit
from rainclf.heads.base import (
    Classifier,
    ClassifierBase,
    Row,
    rows_in_batches,
    scored_rows,
)
from rainclf.labels import LABELS
from rainclf.model import ModelDirError, load_classifier
from rainclf.predict import predict


@pytest.fixture
def fitted(fake_backbone, tmp_path):
    data = make_red_blue(tmp_path / "data", n_per_class=10, size=40)
    result = fit(data, tmp_path / "model", FitOptions(backbone=fake_backbone, device="cpu", cache_dir=None,
                                                      progress=False, val_split=0.0))
    return data, result


def test_a_linear_model_on_the_fake_backbone_answers_the_protocol(fitted, tmp_path):
    data, result = fitted
    assert result.config.feature == "vision"            # the linear head's default feature
    clf = load_classifier(result.model_dir, RunOptions(device="cpu", cache_dir=None, progress=False))
    assert isinstance(clf, Classifier) and clf.labels == tuple(LABELS)
    paths = sorted(data.rglob("*.png"))
    rows = clf.predict_paths(paths)
    assert [r.path for r in rows] == [str(p) for p in paths]
    assert {r.label for r in rows} == set(LABELS)        # red and blue skies are told apart
    truth = [p.parent.name for p in paths]
    assert np.mean([r.label == t for r, t in zip(rows, truth)]) == 1.0
    # predict_proba on decoded images gives the same p_rain as predict_paths on the files
    images = [Image.open(p).convert("RGB") for p in paths]
    np.testing.assert_allclose(clf.predict_proba(images), [r.p_rain for r in rows], atol=1e-6)
    d = clf.describe()
    assert d["head"] == "linear" and d["engine"] == "torch" and d["decoding"] is None
    assert d["quality_of"] == "emitted label" and d["random_weights"] is False


def test_cached_embeddings_are_counted_and_need_no_model_work(fake_backbone, fitted, tmp_path):
    data, result = fitted
    opts = RunOptions(device="cpu", cache_dir=tmp_path / "cache", progress=False)
    paths = sorted(data.rglob("*.png"))
    cold = load_classifier(result.model_dir, opts)
    first = cold.predict_paths(paths)
    assert cold.describe()["n_cached"] == 0 and cold.backbone.embedded == len(paths)
    warm = load_classifier(result.model_dir, opts)
    again = warm.predict_paths(paths)
    assert warm.describe()["n_cached"] == len(paths) and warm.backbone.embedded == 0
    assert [r.p_rain for r in again] == [r.p_rain for r in first]


def test_predict_writes_the_rows_of_the_protocol(fitted, tmp_path):
    data, result = fitted
    out = tmp_path / "p.csv"
    run = predict(data, result.model_dir, RunOptions(device="cpu", cache_dir=None, progress=False), output=out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path,label,p_rain,source,error" and len(lines) == 1 + 20
    assert run.summary.predicted == 20 and run.summary.errors == 0


def test_rows_in_batches_keeps_order_and_turns_bad_files_into_error_rows(tmp_path):
    good = [tmp_path / f"{i}.png" for i in range(5)]
    for i, p in enumerate(good):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(p)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    paths = [good[0], bad, *good[1:]]
    seen = []

    def answer(images):
        seen.append(len(images))
        return [Row("", LABELS[1], float(im.getpixel((0, 0))[0]) / 255) for im in images]

    rows = rows_in_batches(paths, 2, answer, progress=False)
    assert [r.path for r in rows] == [str(p) for p in paths]
    assert rows[1].error and rows[1].label is None and "bad.png" in rows[1].error
    assert [round(r.p_rain * 255) for r in rows if r.error is None] == [0, 40, 80, 120, 160]
    assert seen == [1, 2, 2]        # batches of two files, the bad one answered by nobody


def test_scored_rows_threshold_and_errors():
    rows = scored_rows(["a", "b", "c"], [None, "b: broken", None], [0.7, 0.2], threshold=0.5)
    assert [(r.label, r.p_rain, r.error) for r in rows] == [
        (LABELS[1], 0.7, None), (None, None, "b: broken"), (LABELS[0], 0.2, None)]


def test_head_table_imports_on_use_and_reports_an_import_error_as_itself(monkeypatch):
    assert set(heads.HEADS) == {"linear", "lora", "generative"}
    assert heads.head_classifier("linear").__name__ == "LinearClassifier"
    with pytest.raises(heads.UnknownHeadError, match="unknown --head 'svm'"):
        heads.head_fitter("svm")
    monkeypatch.setitem(sys.modules, "rainclf_broken_head", None)     # import fails
    monkeypatch.setitem(heads.HEADS, "broken", ("x:y", "x:y", "rainclf_broken_head:Classifier"))
    with pytest.raises(ImportError, match="rainclf_broken_head"):
        heads.head_classifier("broken")


def test_a_model_directory_with_an_unknown_head_is_one_clear_error(fitted):
    _, result = fitted
    cfg = result.model_dir / "config.json"
    cfg.write_text(cfg.read_text(encoding="utf-8").replace('"head": "linear"', '"head": "svm"'), encoding="utf-8")
    with pytest.raises(ModelDirError, match="head type 'svm' is unknown"):
        load_classifier(result.model_dir, RunOptions(device="cpu", cache_dir=None))


def test_options_of_another_head_are_refused():
    check_head_options("lora", ["lora_r", "steps", "feature", "class_weight"])   # all read by lora
    with pytest.raises(ValueError, match="--head linear does not use --lora-r, --steps"):
        check_head_options("linear", ["lora_r", "steps", "C"])
    with pytest.raises(ValueError, match="--head generative does not use --class-weight"):
        check_head_options("generative", ["class_weight"])
    with pytest.raises(ValueError, match="does not use --lora-r"):
        fit("no-such-data", "out", FitOptions(head_params={"lora_r": 4}))   # before the data is read
    with pytest.raises(ValueError, match="reads the answer feature"):
        fit("no-such-data", "out", FitOptions(backbone="glm4v-tiny", head="lora", feature="vision"))


def test_defaults_of_the_base_class_refuse_what_a_head_cannot_do(tmp_path):
    class Minimal(ClassifierBase):
        config = types.SimpleNamespace(head="minimal", backbone={"name": "x"})

    m = Minimal()
    assert m.frozen_backbone() is None and m.adopt_backbone(object()) is False
    with pytest.raises(ModelDirError, match="cannot be exported"):
        Minimal.affine_head(m.config, tmp_path)
    assert m.describe()["backbone_weights_mb"] is None
