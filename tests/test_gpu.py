"""Checks that need a CUDA GPU, run with one command on a GPU machine: ``python -m pytest -m gpu``
(the default run deselects them; without a GPU they skip, an allowed skip). They compare numbers:
CUDA bf16 against CPU fp32 for the embeddings and a LoRA-trained generative model, onnxruntime's
CUDA provider against its CPU provider, and ``--device multi`` against one device. onnxruntime's
CUDA provider needs ``pip install onnxruntime-gpu`` (the dev extra installs the CPU build): without
it the ONNX check fails and says so."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_red_blue, solid_images

from rainclf.backbones import create_backbone
from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions
from rainclf.config import RunOptions

pytestmark = pytest.mark.gpu


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("feature", ["vision", "answer"])
def test_cuda_bf16_embeddings_match_cpu_fp32(cuda, feature):
    import torch

    images = solid_images(4, seed=3)
    gpu = create_backbone("glm4v-tiny", BackboneOptions(device=cuda))
    assert gpu.load()[0].dtype == torch.bfloat16                 # what --device cuda runs
    cpu = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    a = gpu.embed(images, feature, -1, DEFAULT_PROMPT)
    b = cpu.embed(images, feature, -1, DEFAULT_PROMPT)
    assert a.shape == b.shape and np.isfinite(a).all()
    assert _cosine(a, b).min() > 0.99, _cosine(a, b)             # bf16 keeps ~3 significant digits


def test_generative_trained_in_bf16_on_cuda_scores_like_on_cpu(cuda, tmp_path):
    """precision auto = bf16 on CUDA; the saved adapter loads on the CPU and gives p_rain within
    0.05 of the CUDA run (constrained decoding), and the labels agree on at least 5 of 6 images."""
    from rainclf.fit import FitOptions, fit
    from rainclf.model import load_classifier

    data = make_red_blue(tmp_path / "data", n_per_class=6)
    params = dict(steps=20, lr=1e-2, train_batch_size=4, eval_every=10, max_new_tokens=4)
    result = fit(data, tmp_path / "gen", FitOptions(head="generative", feature="answer", device=cuda,
                                                    cache_dir=None, progress=False, val_split=0.0,
                                                    head_params=params))
    assert result.metrics["precision"] == "bf16" and result.metrics["nonfinite_steps"] == 0
    paths = sorted(data.rglob("*.png"))[::2]
    rows = {}
    for device in (cuda, "cpu"):
        clf = load_classifier(tmp_path / "gen", RunOptions(device=device, progress=False, decoding="constrained"))
        rows[device] = clf.predict_paths(paths)
    p_gpu = np.array([r.p_rain for r in rows[cuda]])
    p_cpu = np.array([r.p_rain for r in rows["cpu"]])
    assert np.isfinite(p_gpu).all() and np.abs(p_gpu - p_cpu).max() < 0.05, (p_gpu, p_cpu)
    assert sum(a.label == b.label for a, b in zip(rows[cuda], rows["cpu"])) >= len(paths) - 1


def test_onnxruntime_cuda_provider_matches_cpu(cuda, tmp_path, tiny_backbone):
    import onnxruntime as ort
    from test_export import make_linear_model_dir

    from rainclf.onnx.export import export_onnx
    from rainclf.onnx.runtime import OnnxClassifier

    assert "CUDAExecutionProvider" in ort.get_available_providers(), (
        "onnxruntime has no CUDA provider here: pip install onnxruntime-gpu (the dev extra installs the CPU build)")
    d = make_linear_model_dir(tmp_path / "model", tiny_backbone)
    export_onnx(d, include_backbone=True)
    images = solid_images(6, seed=5)
    on_gpu = OnnxClassifier.from_dir(d / "onnx", providers=["CUDAExecutionProvider"])
    on_cpu = OnnxClassifier.from_dir(d / "onnx", providers=["CPUExecutionProvider"])
    assert "CUDAExecutionProvider" in on_gpu.describe("image")
    np.testing.assert_allclose(on_gpu.p_rain_from_images(images), on_cpu.p_rain_from_images(images),
                               rtol=0, atol=1e-4)


def test_device_multi_splits_over_the_gpus_and_matches_one_device(cuda):
    import torch

    images = solid_images(3, seed=9)
    multi = create_backbone("glm4v-tiny", BackboneOptions(device="multi"))
    model = multi.load()[0]
    devices = {str(p.device) for p in model.parameters()}
    assert all(d.startswith("cuda") for d in devices) and len(devices) <= torch.cuda.device_count()
    assert multi.device.startswith("cuda")
    one = create_backbone("glm4v-tiny", BackboneOptions(device=cuda))
    for feature in ("vision", "answer"):
        a, b = multi.embed(images, feature, -1, DEFAULT_PROMPT), one.embed(images, feature, -1, DEFAULT_PROMPT)
        assert _cosine(a, b).min() > 0.999, (feature, _cosine(a, b))   # both bf16: the same numbers, moved
