"""Tests for rainclf.onnx.export and rainclf.onnx.engine: ONNX graphs of the tiny GLM-4V (random weights)
against torch on real photos, metadata, atomic writing, and ``rainclf predict --engine onnx``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from click.testing import CliRunner  # noqa: E402

from rainclf.cli import main  # noqa: E402
from rainclf.config import RunOptions
from rainclf.model import (  # noqa: E402
    ModelConfig,
    ModelDirError,
    load_classifier,  # noqa: E402
    read_config,
    write_common_files,
)
from rainclf.onnx import export as export_mod  # noqa: E402
from rainclf.onnx.engine import load_onnx_classifier  # noqa: E402
from rainclf.onnx.export import ExportFailure, export_onnx  # noqa: E402
from rainclf.onnx.format import METADATA_FILE, read_metadata
from rainclf.onnx.runtime import OnnxClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TRAIN = REPO / "data" / "sample" / "train"
TOL = 1e-4
TORCH = RunOptions(device="cpu", cache_dir=None, progress=False)


def make_linear_model_dir(out: Path, backbone, feature: str = "vision", layer: int = -1) -> Path:
    """A linear-head model directory fitted on data/sample in-process (no `rainclf fit` run)."""
    from rainclf.backbones.base import DEFAULT_PROMPT
    from rainclf.data.images import load_image
    from rainclf.heads.linear import LinearHead
    from rainclf.labels import LABELS

    paths = sorted(SAMPLE_TRAIN.glob("*/*.jpg"))
    y = np.array([LABELS.index(p.parent.name) for p in paths])
    X = backbone.embed([load_image(p) for p in paths], feature=feature, layer=layer, prompt=DEFAULT_PROMPT)
    head = LinearHead(C=1.0).fit(X, y)
    out.mkdir(parents=True)
    head.save(out)
    config = ModelConfig(head="linear", backbone=backbone.describe(), feature=feature, layer=layer,
                         prompt=DEFAULT_PROMPT if feature == "answer" else None, dim=X.shape[1])
    write_common_files(out, config, {})
    return out


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory, tiny_backbone):
    d = make_linear_model_dir(tmp_path_factory.mktemp("vision") / "model", tiny_backbone)
    export_onnx(d, include_backbone=True)
    return d


@pytest.fixture(scope="module")
def answer_dir(tmp_path_factory, tiny_backbone):
    # layer 1 of 2: the graph must stop early (no final norm), as the torch feature does
    d = make_linear_model_dir(tmp_path_factory.mktemp("answer") / "model", tiny_backbone, "answer", layer=1)
    export_onnx(d, include_backbone=True)
    return d


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    from rainclf.fit import FitOptions, fit

    d = tmp_path_factory.mktemp("lora") / "model"
    # a high learning rate so the LoRA weights are far from zero and merging them matters
    fit(SAMPLE_TRAIN, d, FitOptions(backbone="glm4v-tiny", head="lora", val_split=0, cache_dir=None, progress=False, device="cpu",
                                    head_params=dict(steps=2, lr=0.05, train_batch_size=2)))
    export_onnx(d, include_backbone=True)
    return d


@pytest.fixture(scope="module")
def photos(weather_photos):
    step = max(1, len(weather_photos) // 24)
    chosen = weather_photos[::step][:24]
    assert len(chosen) >= 20
    return chosen


def torch_p(model_dir, paths):
    clf = load_classifier(model_dir, TORCH)
    rows = clf.predict_paths(paths)
    assert all(r.error is None for r in rows)
    return clf, np.array([r.p_rain for r in rows])


# ------------------------------------------------------------------ parity on real photos

@pytest.mark.parametrize("which", ["vision_dir", "answer_dir", "lora_dir"])
def test_image_graph_matches_torch_on_real_photos(which, photos, request):
    model_dir = request.getfixturevalue(which)
    _, expected = torch_p(model_dir, photos)
    rows = OnnxClassifier.from_dir(model_dir, providers=["CPUExecutionProvider"]).predict(photos, batch_size=8)
    got = np.array([r["p_rain"] for r in rows])
    assert [r["error"] for r in rows] == [None] * len(photos)
    assert np.abs(got - expected).max() <= TOL
    assert [r["path"] for r in rows] == [str(p) for p in photos]


@pytest.mark.parametrize("which", ["vision_dir", "answer_dir"])
def test_head_graph_matches_torch_on_real_photo_embeddings(which, photos, request):
    model_dir = request.getfixturevalue(which)
    clf, expected = torch_p(model_dir, photos)
    runtime = OnnxClassifier.from_dir(model_dir)
    got = runtime.p_rain_from_embeddings(clf.last_embed.vectors)
    assert np.abs(got - expected).max() <= TOL
    labels = [r["label"] for r in runtime.predict_embeddings(clf.last_embed.vectors)]
    assert labels == [r.label for r in clf.predict_paths(photos)]


# ------------------------------------------------------------------ what is written

def test_checker_passes_and_graphs_have_the_promised_interface(vision_dir):
    import onnx

    meta = read_metadata(vision_dir / "onnx")
    assert set(meta.graphs) == {"head", "image"}
    assert meta.graphs["image"]["file"] == "model.onnx" and meta.graphs["head"]["file"] == "head.onnx"
    for name, graph in meta.graphs.items():
        path = vision_dir / "onnx" / graph["file"]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in list(model.graph.input) + list(model.graph.output)}
        assert model.opset_import[0].version == 18
        if name == "head":
            assert dims == {"embeddings": ["batch", 64], "logits": ["batch", 2], "p_rain": ["batch"]}
        else:
            assert dims["pixel_values"] == ["patches", 1176]
            assert dims["p_rain"] == ["batch"] and dims["logits"] == ["batch", 2]


def test_metadata_describes_the_model_and_its_input(vision_dir, answer_dir, tiny_backbone):
    config = read_config(vision_dir)
    meta = read_metadata(vision_dir / "onnx")
    assert meta.labels == ["不会下雨", "会下雨"] and meta.threshold == config.threshold
    assert meta.backbone["fingerprint"] == tiny_backbone.fingerprint and meta.backbone["random_weights"]
    assert meta.dim == 64 and meta.feature == "vision" and meta.opset == 18 and meta.not_exported == {}
    proc = tiny_backbone.load()[1].image_processor
    spec = meta.input_spec
    assert (spec.image_size, spec.patch_size, spec.merge_size, spec.temporal_patch_size) == (224, 14, 2, 2)
    assert spec.image_mean == tuple(proc.image_mean) and spec.rescale_factor == proc.rescale_factor
    assert meta.input["grid_thw"] == [1, 16, 16] and meta.graphs["image"]["batch"] == "dynamic"
    assert meta.parity["image"]["max_abs_dp"] <= TOL and meta.prompt_token_ids is None
    answer = read_metadata(answer_dir / "onnx")
    ids = tiny_backbone.chat_inputs(export_mod.synthetic_images(1), answer.prompt)["input_ids"][0].tolist()
    assert answer.prompt_token_ids == ids and answer.layer == 1 and answer.feature == "answer"


def test_head_only_export_is_model_onnx_and_reexport_replaces_it(vision_dir, tmp_path):
    out = tmp_path / "export"
    info = export_onnx(vision_dir, out)
    assert {p.name for p in out.iterdir()} == {METADATA_FILE, "model.onnx"}
    assert set(info["graphs"]) == {"head"} and info["graphs"]["head"]["file"] == "model.onnx"
    assert info["input"]["image_size"] == 224          # the spec is written even without the image graph
    with pytest.raises(Exception, match="only the head graph"):
        OnnxClassifier.from_dir(out).predict([SAMPLE_TRAIN / "会下雨" / "rain_000.jpg"])
    export_onnx(vision_dir, out, include_backbone=True)   # an earlier export is replaced
    assert {p.name for p in out.iterdir()} == {METADATA_FILE, "head.onnx", "model.onnx"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rainclf-tmp")]


def test_export_refuses_to_replace_a_folder_that_is_not_an_export(vision_dir, tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a rainclf ONNX export"):
        export_onnx(vision_dir, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_a_failing_export_leaves_nothing_behind(vision_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(export_mod, "_save_graph", boom)
    with pytest.raises(RuntimeError, match="killed"):
        export_onnx(vision_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_image_graph_failure_ships_the_head_graph_and_says_why(vision_dir, tmp_path, monkeypatch):
    def fail(*args):
        raise ExportFailure("the exporter cannot do X")

    monkeypatch.setattr(export_mod, "build_image_graph", fail)
    info = export_onnx(vision_dir, tmp_path / "out", include_backbone=True)
    assert set(info["graphs"]) == {"head"} and info["graphs"]["head"]["file"] == "model.onnx"
    assert info["not_exported"] == {"image": "the exporter cannot do X"}
    assert read_metadata(tmp_path / "out").not_exported == {"image": "the exporter cannot do X"}


def test_external_data_file_past_the_size_limit(vision_dir, tmp_path, monkeypatch, photos):
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_LIMIT", 0)
    info = export_onnx(vision_dir, tmp_path / "out", include_backbone=True)
    assert info["graphs"]["image"]["external_data"] == "model.onnx.data"
    assert (tmp_path / "out" / "model.onnx.data").stat().st_size > 100_000
    got = [r["p_rain"] for r in OnnxClassifier.from_dir(tmp_path / "out").predict(photos[:4])]
    ref = [r["p_rain"] for r in OnnxClassifier.from_dir(vision_dir).predict(photos[:4])]
    assert np.allclose(got, ref, atol=1e-7)


def test_generative_heads_are_refused(vision_dir, tmp_path):
    d = tmp_path / "gen"
    shutil.copytree(vision_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["head"] = "generative"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match="generative heads cannot be exported"):
        export_onnx(d)


# ------------------------------------------------------------------ --engine onnx

def _csv_rows(text: str) -> dict:
    lines = text.strip().splitlines()
    header = lines[0].split(",")
    return {r[0]: dict(zip(header, r)) for r in (line.split(",") for line in lines[1:])}


@pytest.mark.parametrize("include_backbone", [True, False])
def test_cli_export_then_predict_engine_onnx_gives_torch_labels(vision_dir, tmp_path, photos, include_backbone):
    d = tmp_path / "model"
    shutil.copytree(vision_dir, d, ignore=shutil.ignore_patterns("onnx"))
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        (folder / p.name).symlink_to(p)
    (folder / "broken.jpg").write_bytes(b"not an image")
    runner = CliRunner()
    res = runner.invoke(main, ["predict", str(folder), "--model", str(d), "--engine", "onnx", "-q", "--no-cache"])
    assert res.exit_code == 2 and "rainclf export" in res.output
    args = ["export", str(d)] + (["--include-backbone"] if include_backbone else [])
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert ("image graph" in res.output) == include_backbone
    out = {}
    for engine in ("torch", "onnx"):
        res = runner.invoke(main, ["predict", str(folder), "--model", str(d), "--engine", engine, "-q", "--no-cache"])
        assert res.exit_code == 0, res.output
        out[engine] = _csv_rows(res.stdout)
    assert out["onnx"].keys() == out["torch"].keys() and len(out["onnx"]) == len(photos) + 1
    for path, row in out["torch"].items():
        assert out["onnx"][path]["label"] == row["label"]
        assert abs(float(out["onnx"][path]["p_rain"] or 0) - float(row["p_rain"] or 0)) <= TOL
    assert out["onnx"][str(folder / "broken.jpg")]["error"]


def test_engine_onnx_refuses_an_export_of_another_model(vision_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(vision_dir, d)
    clf = load_onnx_classifier(d, RunOptions(device="cpu", cache_dir=None, progress=False))
    assert "CPUExecutionProvider" in clf.notes[0]
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, threshold=0.4)))
    with pytest.raises(ModelDirError, match="threshold 0.5 in the export, 0.4 in config.json"):
        load_onnx_classifier(d, TORCH)
    (d / "config.json").write_text(json.dumps(dict(cfg, backbone=dict(cfg["backbone"], fingerprint="f" * 64))))
    with pytest.raises(ModelDirError, match="backbone fingerprint"):
        load_onnx_classifier(d, TORCH)
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "head.safetensors"))
    save_file(dict(t, coef=t["coef"] * 2), str(d / "head.safetensors"), metadata={"head": "linear", "C": "1.0"})
    with pytest.raises(ModelDirError, match="other head weights"):
        load_onnx_classifier(d, TORCH)
