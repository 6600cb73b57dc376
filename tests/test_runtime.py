"""Tests for rainclf.onnx.runtime: numpy preprocessing vs the transformers processor on real photos,
the torch-free import, providers, bad files, batching, dimension checks, metadata round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rainclf.onnx.format import (
    FORMAT_VERSION,
    InputSpec,
    OnnxExportError,
    OnnxMetadata,
    find_export_dir,
    read_metadata,
)
from rainclf.onnx.runtime import OnnxClassifier, choose_providers, pixel_values

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RAIN = REPO / "data" / "sample" / "train" / "会下雨"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_backbone):
    from test_export import make_linear_model_dir

    from rainclf.onnx.export import export_onnx

    d = make_linear_model_dir(tmp_path_factory.mktemp("runtime") / "model", tiny_backbone)
    export_onnx(d, include_backbone=True)
    return d / "onnx"


@pytest.fixture(scope="module")
def odd_photos(weather_photos):
    """Real photos of odd sizes: landscape, portrait and square, none at the model's 224 × 224."""
    by_shape = {}
    for p in weather_photos:
        with Image.open(p) as im:
            w, h = im.size
        shape = "portrait" if h > w else "landscape" if w > h else "square"
        if (w % 2 or h % 2) and len(by_shape.setdefault(shape, [])) < 3:
            by_shape[shape].append(p)
    assert by_shape.get("portrait") and by_shape.get("landscape")
    return [p for group in by_shape.values() for p in group]


# ------------------------------------------------------------------ preprocessing

@pytest.mark.parametrize("image_size", [224, 168])
def test_numpy_preprocessing_equals_the_processor_on_real_photos(odd_photos, image_size, tiny_backbone):
    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import BackboneOptions
    from rainclf.data.images import load_image
    from rainclf.onnx.export import spec_from_processor

    backbone = tiny_backbone if image_size == 224 else create_backbone(
        "glm4v-tiny", BackboneOptions(device="cpu", image_size=image_size))
    images = [load_image(p) for p in odd_photos]
    expected = backbone.vision_inputs(images)
    spec = spec_from_processor(backbone.load()[1].image_processor, image_size)
    got = pixel_values(images, spec)
    assert got.dtype == np.float32 and got.shape == tuple(expected["pixel_values"].shape)
    assert np.abs(got - expected["pixel_values"].numpy()).max() <= 1e-6
    assert expected["image_grid_thw"].tolist() == [list(spec.grid_thw)] * len(images)


def test_pil_inputs_with_alpha_are_flattened_on_white_like_files(exported, tmp_path):
    rgba = Image.new("RGBA", (90, 70), (10, 20, 30, 0))          # fully transparent → white
    rgba.save(tmp_path / "a.png")
    clf = OnnxClassifier.from_dir(exported)
    # each side runs as its own batch of one: float32 kernels may sum a batch of 2 in another
    # order than a batch of 1 (onnxruntime 1.32 differs by 1.5e-7 there), and this test is about
    # the alpha flattening, not about batching — equal inputs through equal batches give equal bits
    from_pil = clf.predict([rgba])[0]
    from_file = clf.predict([tmp_path / "a.png"])[0]
    assert from_pil["path"] == "<image 0>" and from_pil["error"] is None
    assert from_pil["p_rain"] == pytest.approx(from_file["p_rain"], abs=1e-7)
    white = clf.predict([Image.new("RGB", (90, 70), (255, 255, 255))])[0]
    assert white["p_rain"] == pytest.approx(from_pil["p_rain"], abs=1e-7)
    # batching itself stays within float32 reassociation error (a few ulp of values around 1)
    both = clf.predict([rgba, tmp_path / "a.png"])
    assert both[0]["p_rain"] == pytest.approx(from_pil["p_rain"], abs=1e-6)


def test_pil_inputs_get_the_exif_rotation_files_get(exported, tmp_path):
    """A PIL image a caller opened goes through the same RGB conversion as a decoded file (one
    converter, data/images.to_rgb): an EXIF-rotated portrait photo gives the file's p_rain."""
    arr = np.zeros((60, 90, 3), np.uint8)
    arr[:, :30] = (200, 40, 40)                     # a red band on the left, blue elsewhere
    arr[:, 30:] = (40, 60, 200)
    exif = Image.Exif()
    exif[0x0112] = 6                                # "rotate 90° clockwise to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    clf = OnnxClassifier.from_dir(exported)
    from_file = clf.predict([tmp_path / "rot.jpg"])[0]
    with Image.open(tmp_path / "rot.jpg") as opened:
        from_pil = clf.predict([opened])[0]
    unrotated = clf.predict([Image.fromarray(arr)])[0]
    assert from_pil["error"] is None and from_pil["p_rain"] == pytest.approx(from_file["p_rain"], abs=1e-7)
    assert abs(unrotated["p_rain"] - from_file["p_rain"]) > 1e-6   # the rotation is really applied


# ------------------------------------------------------------------ predicting

def test_bad_inputs_become_error_entries_and_the_rest_is_predicted(exported, tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    good = sorted(SAMPLE_RAIN.glob("*.jpg"))[:3]
    inputs = [good[0], tmp_path / "empty.jpg", tmp_path / "missing.jpg", good[1], tmp_path / "text.jpg",
              tmp_path, 42, str(good[2])]
    rows = OnnxClassifier.from_dir(exported).predict(inputs, batch_size=2)
    assert [set(r) for r in rows] == [{"path", "label", "p_rain", "error"}] * len(inputs)
    ok = [r["error"] is None for r in rows]
    assert ok == [True, False, False, True, False, False, False, True]
    for r in rows:
        assert (r["label"] in ("会下雨", "不会下雨")) == (r["error"] is None) == (r["p_rain"] is not None)
    assert "empty file" in rows[1]["error"] and "file not found" in rows[2]["error"]
    assert "unsupported input type int" in rows[6]["error"]
    assert rows[0]["path"] == str(good[0]) and rows[7]["path"] == str(good[2])
    single = OnnxClassifier.from_dir(exported).predict(str(good[0]))   # one path, not its characters
    assert len(single) == 1 and single[0]["p_rain"] == pytest.approx(rows[0]["p_rain"], abs=1e-7)


def test_batch_size_does_not_change_predictions(exported):
    paths = sorted(SAMPLE_RAIN.parent.glob("*/*.jpg"))[:11]
    clf = OnnxClassifier.from_dir(exported)
    one = [r["p_rain"] for r in clf.predict(paths, batch_size=1)]
    many = [r["p_rain"] for r in clf.predict(paths, batch_size=7)]
    assert np.allclose(one, many, atol=1e-6)


def test_wrong_dimension_embeddings_are_refused_naming_both(exported):
    clf = OnnxClassifier.from_dir(exported)
    with pytest.raises(OnnxExportError, match="dimension 32, this export expects 64"):
        clf.predict_embeddings(np.zeros((3, 32), dtype=np.float32))
    assert clf.p_rain_from_embeddings(np.zeros((0, 64))).shape == (0,)
    rows = clf.predict_embeddings(np.zeros((2, 64)))
    assert [set(r) for r in rows] == [{"label", "p_rain"}] * 2


def test_providers_fall_back_to_cpu_and_report_what_they_got(exported):
    import onnxruntime as ort

    expected = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    assert choose_providers() == expected
    clf = OnnxClassifier.from_dir(exported, providers=["CPUExecutionProvider"])
    assert clf.providers() == ["CPUExecutionProvider"] and "CPUExecutionProvider" in clf.describe()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(OnnxExportError, match="CUDAExecutionProvider.*not available here"):
            OnnxClassifier.from_dir(exported, providers=["CUDAExecutionProvider"])


def test_runtime_works_where_torch_and_transformers_cannot_be_imported(exported, tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    paths = [str(p) for p in sorted(SAMPLE_RAIN.glob("*.jpg"))[:4]] + [str(tmp_path / "bad.jpg")]
    script = f"""
import json, sys
sys.modules["torch"] = None          # `import torch` now raises ImportError
sys.modules["transformers"] = None
sys.path.insert(0, {str(REPO)!r})
from rainclf.onnx.runtime import OnnxClassifier
rows = OnnxClassifier.from_dir({str(exported.parent)!r}).predict({paths!r})
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "sklearn", "safetensors")
               and sys.modules[m] is not None)
print(json.dumps({{"rows": rows, "heavy": heavy}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["heavy"] == []
    here = OnnxClassifier.from_dir(exported).predict(paths)
    assert [r["label"] for r in result["rows"]] == [r["label"] for r in here]
    assert result["rows"][-1]["error"] and all(r["error"] is None for r in result["rows"][:-1])


# ------------------------------------------------------------------ metadata

def test_metadata_round_trip(exported):
    meta = read_metadata(exported)
    again = OnnxMetadata.from_json(meta.to_json())
    assert again == meta and again.input_spec == meta.input_spec
    spec = meta.input_spec
    assert InputSpec.from_dict(spec.to_dict()) == spec
    assert (spec.patches_per_image, spec.patch_dim, spec.grid_thw) == (256, 1176, (1, 16, 16))


def test_metadata_refuses_newer_formats_unknown_keys_and_foreign_files(exported, tmp_path):
    data = json.loads((exported / "rainclf_onnx.json").read_text())
    with pytest.raises(OnnxExportError, match="newer rainclf"):
        OnnxMetadata.from_json(json.dumps(dict(data, format_version=FORMAT_VERSION + 1)))
    with pytest.raises(OnnxExportError, match="unknown keys"):
        OnnxMetadata.from_json(json.dumps(dict(data, surprise=1)))
    with pytest.raises(OnnxExportError, match="not valid JSON"):
        OnnxMetadata.from_json("{")
    with pytest.raises(OnnxExportError, match="labels"):
        OnnxMetadata.from_json(json.dumps(dict(data, labels=["no", "yes"])))
    with pytest.raises(OnnxExportError, match="rainclf export MODEL_DIR first"):
        find_export_dir(tmp_path)
    assert find_export_dir(exported.parent) == exported == find_export_dir(exported)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "rainclf_onnx.json").write_text(json.dumps(data))   # graphs listed, files absent
    with pytest.raises(OnnxExportError, match="is missing"):
        OnnxClassifier.from_dir(broken)
