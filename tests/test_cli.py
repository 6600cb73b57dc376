"""The click CLI, offline, through CliRunner: thin commands over the library, exit statuses."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_class_folders

from rainclf.cli import main
from rainclf.labels import LABELS


@pytest.fixture(scope="module")
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = write_class_folders(root / "train", n_per_class=8)
    result = CliRunner().invoke(main, ["fit", "--backbone", "glm4v-tiny", str(data), "-o", str(root / "model"), "--no-cache", "-q",
                                       "--device", "cpu", "--seed", "1"])
    assert result.exit_code == 0, result.output
    return root, data, root / "model", result


def test_fit_prints_validation_metrics_and_random_warning(trained):
    _, _, model, result = trained
    assert "validation accuracy" in result.output and "roc_auc" in result.output
    assert "RANDOM" in result.output
    assert (model / "config.json").is_file()


def test_predict_to_stdout_csv(runner, trained):
    _, data, model, _ = trained
    r = runner.invoke(main, ["predict", str(data), "--model", str(model), "--no-cache"])   # -q hides the summary
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 16 and list(rows[0]) == ["path", "label", "p_rain", "source", "error"]
    assert {row["label"] for row in rows} <= set(LABELS)
    assert all(row["source"] == "head" for row in rows)
    assert "16 images: 16 predicted" in r.stderr


def test_predict_jsonl_output_file(runner, trained, tmp_path):
    import json

    _, data, model, _ = trained
    out = tmp_path / "p.jsonl"
    r = runner.invoke(main, ["predict", str(data), "--model", str(model), "-o", str(out), "-q"])
    assert r.exit_code == 0 and r.stdout == ""
    rows = [json.loads(l) for l in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 16 and all(0 <= row["p_rain"] <= 1 for row in rows)
    assert all((row["label"] == LABELS[1]) == (row["p_rain"] >= 0.5) for row in rows)   # default threshold


def test_empty_folder_is_one_line_exit_2(runner, trained, tmp_path):
    _, _, model, _ = trained
    (tmp_path / "empty").mkdir()
    r = runner.invoke(main, ["predict", str(tmp_path / "empty"), "--model", str(model), "-q"])
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "empty" in r.stderr and "error" in r.stderr


def test_only_bad_images_exit_1_with_rows(runner, trained, tmp_path):
    _, _, model, _ = trained
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"")
    (bad / "b.png").write_text("hello")
    out = tmp_path / "o.csv"
    r = runner.invoke(main, ["predict", str(bad), "--model", str(model), "-o", str(out), "-q"])
    assert r.exit_code == 1 and "no image could be predicted" in r.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 2 and all(row["error"] and not row["label"] for row in rows)


def test_bad_output_extension_refused_before_work(runner, trained, tmp_path):
    _, data, model, _ = trained
    r = runner.invoke(main, ["predict", str(data), "--model", str(model), "-o", str(tmp_path / "x.xlsx")])
    assert r.exit_code == 2 and ".csv or .jsonl" in r.stderr


def test_missing_model_dir(runner, trained, tmp_path):
    _, data, _, _ = trained
    r = runner.invoke(main, ["predict", str(data), "--model", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "rainclf fit" in r.stderr


def test_bad_band(runner, trained):
    _, data, model, _ = trained
    r = runner.invoke(main, ["predict", str(data), "--model", str(model), "--band", "0.8,0.2"])
    assert r.exit_code == 2 and "--band" in r.stderr


def test_fit_unknown_label_names_file_and_line(runner, tmp_path):
    bad = tmp_path / "train.jsonl"
    img = tmp_path / "x.jpg"
    from PIL import Image
    Image.new("RGB", (8, 8)).save(img)
    ok = '{"messages":[{"role":"user","content":"q","image":"x.jpg"},{"role":"assistant","content":"会下雨"}]}'
    bad.write_text(ok + "\n" + ok.replace("会下雨", "可能下雨") + "\n", encoding="utf-8")
    r = runner.invoke(main, ["fit", "--backbone", "glm4v-tiny", str(bad), "-o", str(tmp_path / "m"), "-q"])
    assert r.exit_code == 2 and "train.jsonl:2" in r.stderr and "可能下雨" in r.stderr
    assert not (tmp_path / "m").exists()


def test_embed_writes_vectors_with_labels(runner, trained, tmp_path):
    from safetensors import safe_open

    _, data, _, _ = trained
    out = tmp_path / "v.safetensors"
    r = runner.invoke(main, ["embed", "--backbone", "glm4v-tiny", str(data), "-o", str(out), "--feature", "answer", "-q", "--no-cache"])
    assert r.exit_code == 0, r.output
    with safe_open(str(out), "numpy") as f:
        emb, labels = f.get_tensor("embeddings"), f.get_tensor("labels")
        meta = f.metadata()
    assert emb.shape == (16, 64) and sorted(np.bincount(labels)) == [8, 8]
    assert "fingerprint" in meta["backbone"] and '"answer"' in meta["namespace"]


def test_help_documents_exit_statuses(runner):
    r = runner.invoke(main, ["predict", "--help"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "Exit status 0 when at least one image was predicted, 1 when none" in text
    r = runner.invoke(main, ["--help"])
    assert "RANDOM" in r.output
