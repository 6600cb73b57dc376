"""Backbone registry and the GLM-4V feature extractors on the committed tiny GLM-4V."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import solid_images

from rainclf.backbones import BACKBONES, create_backbone
from rainclf.backbones.base import BackboneError, BackboneOptions
from rainclf.backbones.glm4v import Glm4vBackbone, tiny_model_dir


def test_registry_names_builders():
    assert "glm4v-tiny" in BACKBONES and "timm:" in BACKBONES


def test_tiny_is_a_real_glm4v_loaded_through_auto_classes(tiny_backbone):
    model, processor = tiny_backbone.load()
    assert type(model).__name__ == "Glm4vForConditionalGeneration"
    assert type(processor).__name__ == "Glm4vProcessor"
    n_params = sum(p.numel() for p in model.parameters())
    assert 100_000 < n_params < 400_000
    assert tiny_backbone.random_weights is True
    assert all(not p.requires_grad for p in model.parameters())


def test_tiny_is_deterministic_across_loads(tiny_backbone):
    images = solid_images(3, seed=1)
    again = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    assert again.fingerprint == tiny_backbone.fingerprint
    for feature in ("vision", "answer"):
        np.testing.assert_array_equal(tiny_backbone.embed(images, feature), again.embed(images, feature))


@pytest.mark.parametrize("feature,dim", [("vision", 64), ("answer", 64)])
def test_embedding_shapes_and_batch_invariance(tiny_backbone, feature, dim):
    images = solid_images(4, seed=2)
    batch4 = tiny_backbone.embed(images, feature)
    batch1 = np.concatenate([tiny_backbone.embed([im], feature) for im in images])
    assert batch4.shape == (4, dim) and batch4.dtype == np.float32
    np.testing.assert_allclose(batch1, batch4, rtol=1e-5, atol=1e-6)
    assert not np.allclose(batch4[0], batch4[1])  # different images, different vectors


def test_vision_feature_is_mean_of_merged_tokens(tiny_backbone):
    images = solid_images(2, seed=3)
    model, _ = tiny_backbone.load()
    inputs = tiny_backbone.vision_inputs(images)
    with torch.inference_mode():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                             image_grid_thw=inputs["image_grid_thw"])
    expected = np.stack([t.mean(0).numpy() for t in out.pooler_output])
    np.testing.assert_allclose(tiny_backbone.embed(images, "vision"), expected, rtol=1e-6, atol=1e-7)
    # 224 px / 14 = 16 patches a side, merged 2x2 → 64 tokens an image
    assert [t.shape[0] for t in out.pooler_output] == [64, 64]


@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2, -3])
def test_answer_layers_match_output_hidden_states(tiny_backbone, layer):
    """Early exit at an intermediate layer gives exactly hidden_states[layer] of a full forward."""
    images = solid_images(2, seed=4)
    model, _ = tiny_backbone.load()
    inputs = tiny_backbone.chat_inputs(images)
    with torch.inference_mode():
        full = model.model(**inputs, output_hidden_states=True).hidden_states
    expected = full[layer][:, -1, :].numpy()
    np.testing.assert_allclose(tiny_backbone.embed(images, "answer", layer=layer), expected, rtol=1e-5, atol=1e-6)


def test_prompt_changes_answer_feature(tiny_backbone):
    images = solid_images(1, seed=5)
    a = tiny_backbone.embed(images, "answer", prompt="根据图片判断：会下雨还是不会下雨？")
    b = tiny_backbone.embed(images, "answer", prompt="天空怎么样？")
    assert not np.allclose(a, b)


def test_chat_prompt_switches_thinking_off_and_ends_at_answer(tiny_backbone):
    text = tiny_backbone.chat_text()
    assert text.startswith("[gMASK]<sop><|user|>")
    assert text.endswith("<|assistant|>\n<think></think>")
    assert "根据图片判断：会下雨还是不会下雨？" in text


def test_layer_out_of_range(tiny_backbone):
    with pytest.raises(BackboneError, match="out of range"):
        tiny_backbone.embed(solid_images(1), "answer", layer=7)


def test_image_size_must_fit_patch_grid():
    with pytest.raises(BackboneError, match="multiple of 28"):
        create_backbone("glm4v-tiny", BackboneOptions(image_size=100))


def test_offline_hub_id_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(BackboneError) as e:
        create_backbone("zai-org/GLM-4.1V-9B-Thinking")
    msg = str(e.value)
    assert "not available locally" in msg and "--backbone" in msg and "\n" not in msg


def test_unknown_name_and_missing_config(tmp_path):
    with pytest.raises(BackboneError, match="neither a directory nor a hub id"):
        create_backbone("no-such-backbone")
    with pytest.raises(BackboneError, match="no config.json"):
        create_backbone(str(tmp_path))


def _copy_tiny(tmp_path, edit):
    d = tmp_path / "model"
    shutil.copytree(tiny_model_dir(), d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_chatglm_remote_code_refused_without_flag(tmp_path):
    d = _copy_tiny(tmp_path, lambda c: c.update(model_type="chatglm"))
    with pytest.raises(BackboneError, match="--trust-remote-code"):
        create_backbone(str(d))


def test_non_glm4v_model_type_refused(tmp_path):
    d = _copy_tiny(tmp_path, lambda c: c.update(model_type="llama"))
    with pytest.raises(BackboneError, match="not a GLM-4V-family"):
        create_backbone(str(d))


def test_local_copy_loads_and_matches_fingerprint(tmp_path, tiny_backbone):
    """A checkpoint directory anywhere goes through the same path; identical files, same fingerprint."""
    d = _copy_tiny(tmp_path, lambda c: None)
    (d / "RAINCLF_RANDOM_WEIGHTS").unlink()
    copy = create_backbone(str(d), BackboneOptions(device="cpu"))
    assert isinstance(copy, Glm4vBackbone) and copy.random_weights is False
    assert copy.fingerprint == tiny_backbone.fingerprint
    images = solid_images(2, seed=6)
    np.testing.assert_array_equal(copy.embed(images), tiny_backbone.embed(images))


def test_changed_weights_change_fingerprint(tmp_path, tiny_backbone):
    from safetensors.torch import load_file, save_file

    d = _copy_tiny(tmp_path, lambda c: None)
    state = load_file(str(d / "model.safetensors"))
    key = sorted(state)[0]
    state[key] = state[key] + 1.0
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    assert create_backbone(str(d)).fingerprint != tiny_backbone.fingerprint


def test_timm_backbone_random_and_with_weights(tmp_path):
    from safetensors.torch import save_file

    b = create_backbone("timm:resnet10t", BackboneOptions(device="cpu", image_size=64))
    assert b.random_weights and b.features == ("vision",)
    images = solid_images(3, seed=7)
    v = b.embed(images)
    assert v.shape == (3, b.dim("vision"))
    np.testing.assert_array_equal(v, create_backbone("timm:resnet10t", BackboneOptions(image_size=64)).embed(images))
    with pytest.raises(BackboneError, match="no 'answer' feature"):
        b.embed(images, "answer")
    state = {k: t.clone() * 0.5 for k, t in b.load().state_dict().items()}
    w = tmp_path / "w.safetensors"
    save_file(state, str(w))
    bw = create_backbone("timm:resnet10t", BackboneOptions(image_size=64, weights=str(w)))
    assert not bw.random_weights and bw.fingerprint != b.fingerprint
    assert not np.allclose(bw.embed(images), v)
    with pytest.raises(BackboneError, match="timm has no model"):
        create_backbone("timm:not_a_model")


def test_chatglm_with_flag_goes_to_remote_code_loader(tmp_path):
    """With --trust-remote-code the ChatGLM path is taken; loading fails cleanly without its code."""
    d = _copy_tiny(tmp_path, lambda c: c.update(model_type="chatglm", hidden_size=64, num_layers=2,
                                                  vision_config={"hidden_size": 32, "image_size": 112}))
    b = create_backbone(str(d), BackboneOptions(trust_remote_code=True, device="cpu"))
    assert b.kind == "chatglm" and b.dim("vision") == 32 and b.dim("answer") == 64
    with pytest.raises(BackboneError, match="cannot load ChatGLM"):
        b.embed(solid_images(1), "vision")


def test_device_multi_needs_cuda_gpus(monkeypatch):
    import torch

    # what a machine without CUDA sees, on any machine (the GPU side is tests/test_gpu.py)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackboneError, match="--device multi"):
        create_backbone("glm4v-tiny", BackboneOptions(device="multi")).load()
