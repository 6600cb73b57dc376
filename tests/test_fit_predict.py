"""fit → model directory → predict, through the library functions the CLI calls."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import write_class_folders

from rainclf.config import RunOptions
from rainclf.fit import FitOptions, fit
from rainclf.heads.linear import best_threshold
from rainclf.labels import LABELS
from rainclf.model import CONFIG_FILE, ModelDirError, load_classifier, read_config
from rainclf.predict import predict


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("data") / "train", n_per_class=10)


@pytest.fixture(scope="module")
def model_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "m"
    fit(dataset, out, FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None))
    return out


def test_model_directory_contents(model_dir):
    names = sorted(p.name for p in model_dir.iterdir())
    assert names == ["README.md", "config.json", "data_sha256.safetensors", "head.safetensors", "metrics.json"]
    cfg = read_config(model_dir)
    assert cfg.head == "linear" and cfg.feature == "vision" and cfg.dim == 64
    assert cfg.backbone["name"] == "glm4v-tiny" and cfg.backbone["random_weights"] is True
    assert len(cfg.backbone["fingerprint"]) == 64 and cfg.labels == list(LABELS)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["n_train"] == 16 and metrics["n_val"] == 4
    # the validation figures are those of its own confusion matrix (4 images: 2 per label)
    val = metrics["validation"]
    (tn, fp), (fn, tp) = val["confusion_matrix"]["matrix"]
    assert tn + fp + fn + tp == val["n"] == 4
    assert val["accuracy"] == pytest.approx((tn + tp) / 4)
    assert val["balanced_accuracy"] == pytest.approx((tn / (tn + fp) + tp / (tp + fn)) / 2)
    assert val["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    assert (val["roc_auc"] * 8) == pytest.approx(round(val["roc_auc"] * 8))  # 2 × 2 pairs, ties count ½
    assert "RANDOM" in (model_dir / "README.md").read_text()


def test_fit_predict_round_trip_identical_probabilities(model_dir, dataset):
    paths = sorted(dataset.rglob("*.jpg"))
    clf = load_classifier(model_dir, RunOptions(device="cpu", progress=False))
    rows = clf.predict_paths(paths)
    direct = clf.head.predict_proba(clf.backbone.embed([__import__("PIL.Image", fromlist=["x"]).open(p).convert("RGB")
                                                       for p in paths]))[:, 1]
    np.testing.assert_allclose([r.p_rain for r in rows], direct, rtol=1e-6)
    # the synthetic task is separable by colour: training-set accuracy well above chance
    truth = [p.parent.name for p in paths]
    assert np.mean([r.label == t for r, t in zip(rows, truth)]) >= 0.9


def test_reload_in_a_new_process_gives_identical_probabilities(model_dir, dataset, tmp_path):
    out1, out2 = tmp_path / "a.csv", tmp_path / "b.jsonl"
    predict(dataset, model_dir, RunOptions(device="cpu", progress=False), output=out1)
    code = ("import sys; from rainclf.predict import predict; from rainclf.config import RunOptions;"
            f"predict({str(dataset)!r}, {str(model_dir)!r}, RunOptions(device='cpu', progress=False, cache_dir=None),"
            f" output={str(out2)!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    a = {r["path"]: float(r["p_rain"]) for r in csv.DictReader(out1.open(encoding="utf-8"))}
    b = {json.loads(l)["path"]: json.loads(l)["p_rain"] for l in out2.read_text(encoding="utf-8").splitlines()}
    assert a.keys() == b.keys() and len(a) == 20
    for k in a:
        assert abs(a[k] - b[k]) < 1e-6


def test_bad_files_become_error_rows_and_the_rest_is_predicted(model_dir, dataset, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(dataset.rglob("*.jpg"))[:3]
    for i, p in enumerate(good):
        (folder / f"good{i}.JPG").write_bytes(p.read_bytes())
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "cut.jpg").write_bytes(good[0].read_bytes()[:200])
    (folder / "notes.txt").write_text("ignored: not an image extension")
    run = predict(folder, model_dir, RunOptions(device="cpu", progress=False), output=tmp_path / "o.csv")
    by_name = {r.path.rsplit("/", 1)[-1]: r for r in run.rows}
    assert set(by_name) == {"good0.JPG", "good1.JPG", "good2.JPG", "empty.jpg", "text.png", "cut.jpg"}
    for name in ("empty.jpg", "text.png", "cut.jpg"):
        assert by_name[name].label is None and name in by_name[name].error
    assert all(by_name[f"good{i}.JPG"].label in LABELS for i in range(3))
    assert run.summary.predicted == 3 and run.summary.errors == 3
    rows = list(csv.DictReader((tmp_path / "o.csv").open(encoding="utf-8")))
    assert [r["label"] for r in rows if r["error"]] == ["", "", ""]


def test_real_photos_only_two_labels(model_dir, weather_photos, tmp_path):
    photos = weather_photos[:40]
    run = predict(photos, model_dir, RunOptions(device="cpu", progress=False), output=tmp_path / "p.csv")
    assert len(run.rows) == 40 and {r.label for r in run.rows} <= set(LABELS)
    threshold = read_config(model_dir).threshold
    assert all(0.0 <= r.p_rain <= 1.0 and (r.label == LABELS[1]) == (r.p_rain >= threshold) for r in run.rows)


def test_fit_on_shared_jsonl(weather_dir, tmp_path):
    res = fit(weather_dir / "train.jsonl", tmp_path / "w", FitOptions(backbone="glm4v-tiny", device="cpu", progress=False,
                                                                       cache_dir=tmp_path / "cache"))
    val = res.metrics["validation"]
    assert res.metrics["n_train"] + res.metrics["n_val"] == 877
    # random-weight features still carry colour statistics: clearly above chance (0.5)
    assert val["balanced_accuracy"] > 0.6


def test_moved_or_changed_backbone_refused(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from rainclf.backbones.glm4v import tiny_model_dir

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir(), other)
    state = load_file(str(other / "model.safetensors"))
    k = sorted(state)[0]
    state[k] = state[k] * 2
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelDirError, match="fingerprint"):
        load_classifier(model_dir, RunOptions(device="cpu", backbone=str(other)))


def test_newer_format_and_damaged_config_refused(model_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / CONFIG_FILE).read_text())
    cfg["format_version"] = 99
    (d / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="newer rainclf"):
        load_classifier(d)
    (d / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelDirError, match="damaged"):
        load_classifier(d)


def test_existing_output_dir_not_overwritten_without_flag(model_dir, dataset):
    before = (model_dir / "head.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        fit(dataset, model_dir, FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None))
    assert (model_dir / "head.safetensors").read_bytes() == before


def test_answer_feature_model(dataset, tmp_path):
    res = fit(dataset, tmp_path / "a", FitOptions(backbone="glm4v-tiny", device="cpu", feature="answer", layer=-2, progress=False,
                                                  cache_dir=None))
    cfg = read_config(tmp_path / "a")
    assert cfg.feature == "answer" and cfg.layer == -2 and cfg.prompt
    rows = load_classifier(tmp_path / "a", RunOptions(device="cpu", progress=False)).predict_paths(
        sorted(dataset.rglob("*.jpg"))[:4])
    assert all(r.label in LABELS for r in rows) and res.config.dim == 64


def test_best_threshold_maximises_balanced_accuracy():
    y = np.array([0, 0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.7, 0.8, 0.9])
    t = best_threshold(y, p)
    assert 0.7 < t <= 0.8
