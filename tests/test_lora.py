"""Tests for rainclf.heads.lora (and the shared pieces in heads/adapters.py, heads/train.py) on glm4v-tiny, CPU."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions  # noqa: E402
from rainclf.config import RunOptions
from rainclf.fit import FitOptions, fit  # noqa: E402
from rainclf.heads.adapters import FP16_REFUSAL, LoraParams, private_backbone
from rainclf.heads.lora import LoraHeadModel, build_lora_head  # noqa: E402
from rainclf.heads.train import minibatches
from rainclf.labels import LABELS, RAIN  # noqa: E402
from rainclf.model import (  # noqa: E402
    ModelConfig,
    load_classifier,  # noqa: E402
    write_common_files,
)

SIZE = 112


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_red_blue(root: Path, n_per_class: int = 12, seed: int = 0) -> Path:
    return helpers.make_red_blue(root, n_per_class, seed, SIZE)


def all_paths(root: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(root.glob("*/*.png"))
    return paths, [p.parent.name for p in paths]


def lora_options(**kw) -> FitOptions:
    params = dict(steps=30, lr=1e-2, train_batch_size=4, eval_every=10, patience=5)
    params.update(kw.pop("head_params", {}))
    base = dict(backbone="glm4v-tiny", feature="answer", head="lora", device="cpu", cache_dir=None,
                progress=False, val_split=0.25, head_params=params)
    base.update(kw)
    return FitOptions(**base)


@pytest.fixture(scope="module")
def red_blue(tmp_path_factory) -> Path:
    return make_red_blue(tmp_path_factory.mktemp("redblue"))


@pytest.fixture(scope="module")
def fitted(red_blue, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "model"
    return fit(red_blue, out, lora_options())


def test_lora_head_learns_separable_task(fitted, red_blue):
    """≥95% training accuracy within 30 steps on CPU, read back through the saved directory."""
    paths, labels = all_paths(red_blue)
    clf = load_classifier(fitted.model_dir, RunOptions(device="cpu", progress=False))
    rows = clf.predict_paths(paths)
    acc = np.mean([r.label == y for r, y in zip(rows, labels)])
    assert acc >= 0.95, acc
    assert {r.source for r in rows} == {"head"}
    assert all(r.label in LABELS and 0.0 <= r.p_rain <= 1.0 and r.error is None for r in rows)
    assert fitted.metrics["train_accuracy"] >= 0.95


def test_model_directory_layout_and_metrics(fitted):
    d = fitted.model_dir
    assert (d / "adapter" / "adapter_config.json").is_file()
    assert (d / "adapter" / "adapter_model.safetensors").is_file()
    assert (d / "score.safetensors").is_file()
    assert not list(d.rglob("*.bin")) and not list(d.rglob("*.pkl"))
    config = json.loads((d / "config.json").read_text(encoding="utf-8"))
    assert config["head"] == "lora" and config["feature"] == "answer"
    assert config["head_params"]["lora_r"] == 8 and config["head_params"]["lora_targets"] == [
        "q_proj", "k_proj", "v_proj", "o_proj"]
    adapter = json.loads((d / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "glm4v-tiny"   # not a local path
    m = fitted.metrics
    steps = [h["step"] for h in m["history"]]
    assert steps[0] == 0 and steps[1:] == [10, 20, 30]          # step 0 = before training
    assert m["best_step"] in steps[1:] and m["precision"] == "fp32"   # step 0 is never kept
    assert m["validation"]["n"] == m["n_val"] > 0


def test_save_load_gives_identical_probabilities(red_blue, tmp_path):
    """An adapter with non-zero weights: in-memory p_rain == p_rain after save → load_classifier."""
    import torch

    paths, _ = all_paths(red_blue)
    paths = paths[::3]
    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    head = build_lora_head(backbone, LoraParams(), -1, DEFAULT_PROMPT, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in head.named_trainable():     # LoRA B starts at zero: make the adapter matter
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    images = [Image.open(p).convert("RGB") for p in paths]
    p_mem = head.p_rain(images)
    head.save(tmp_path)
    write_common_files(tmp_path, ModelConfig(head="lora", backbone=backbone.describe(), feature="answer",
                                             prompt=DEFAULT_PROMPT, dim=backbone.hidden_size), {})
    clf = load_classifier(tmp_path, RunOptions(device="cpu", progress=False, batch_size=3))
    p_load = np.array([r.p_rain for r in clf.predict_paths(paths)])
    np.testing.assert_allclose(p_load, p_mem, rtol=0, atol=1e-6)
    assert np.ptp(p_mem) > 1e-4       # the comparison is not between two constants
    assert isinstance(clf.head, LoraHeadModel)


def test_lora_never_touches_a_shared_backbone(tiny_backbone, fitted, red_blue):
    """get_peft_model works in place: the session's backbone must keep its own, LoRA-free model."""
    paths, _ = all_paths(red_blue)
    images = [Image.open(p).convert("RGB") for p in paths[:4]]
    before = tiny_backbone.embed(images, feature="answer")
    clf = load_classifier(fitted.model_dir, RunOptions(device="cpu", progress=False))
    clf.predict_paths(paths[:4])
    after = tiny_backbone.embed(images, feature="answer")
    np.testing.assert_array_equal(before, after)
    assert clf.backbone is not tiny_backbone
    assert not any("lora_" in n for n, _ in tiny_backbone.load()[0].named_modules())


def test_lora_targets_only_language_model_layers_that_run():
    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    head = build_lora_head(backbone, LoraParams(lora_targets=["q_proj", "v_proj"]), 1, DEFAULT_PROMPT)
    names = [n for n, _ in head.peft_model.named_modules() if n.endswith("lora_A")]
    assert names, "no LoRA module was created"
    assert all("language_model.layers.0.self_attn." in n for n in names), names   # --layer 1: layer 0 only
    assert {n.split(".")[-2] for n in names} == {"q_proj", "v_proj"}
    assert not any("visual" in n for n, _ in head.peft_model.named_modules() if "lora_" in n)


def test_unreadable_file_becomes_error_row(fitted, red_blue, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    good, _ = all_paths(red_blue)
    clf = load_classifier(fitted.model_dir, RunOptions(device="cpu", progress=False, batch_size=2))
    rows = clf.predict_paths([good[0], bad, good[-1]])
    assert [r.error is None for r in rows] == [True, False, True]
    assert rows[1].label is None and rows[1].p_rain is None and "broken.jpg" in rows[1].error
    assert rows[0].label in LABELS and rows[2].label in LABELS


@pytest.mark.parametrize("damage", ["truncated weights", "garbage config", "other rank", "no config",
                                    "nan weights"])
def test_damaged_adapter_is_one_line_exit_2(fitted, red_blue, tmp_path, damage):
    """A damaged adapter/ (the peft files, not the score) stops predict with one line naming the
    adapter and the fix; no traceback, no output written."""
    import shutil

    from click.testing import CliRunner
    from safetensors.numpy import load_file, save_file

    from rainclf.cli import main

    model = tmp_path / "m"
    shutil.copytree(fitted.model_dir, model)
    adapter = model / "adapter"
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage config":
        config.write_text("{ this is not json", encoding="utf-8")
    elif damage == "other rank":   # shapes no longer match the saved tensors
        c = json.loads(config.read_text(encoding="utf-8"))
        c["r"] = c["r"] * 2
        config.write_text(json.dumps(c), encoding="utf-8")
    elif damage == "no config":
        config.unlink()
    else:
        t = load_file(str(weights))
        k = next(iter(t))
        t[k] = np.full_like(t[k], np.nan)
        save_file(t, str(weights))
    out = tmp_path / "p.csv"
    good, _ = all_paths(red_blue)
    result = CliRunner().invoke(main, ["predict", str(good[0]), "--model", str(model), "-o", str(out),
                                       "--device", "cpu", "--no-cache", "-q"])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("rainclf: error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert str(adapter) in lines[0] or str(weights) in lines[0] or str(config) in lines[0], lines[0]
    assert "refit" in lines[0] or "restore" in lines[0] or "re-download" in lines[0], lines[0]
    assert not out.exists()


def test_fit_skips_unreadable_training_images(tmp_path):
    data = make_red_blue(tmp_path / "data", n_per_class=4)
    (data / RAIN / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = fit(data, tmp_path / "out", lora_options(val_split=0.0, head_params={"steps": 2}))
    assert result.metrics["n_skipped"] == 1 and "zz_broken.png" in result.metrics["skipped"][0]
    assert result.metrics["n_train"] == 8
    assert result.metrics["selection"].startswith("last step")


def test_fp16_is_refused_before_any_work(tmp_path):
    opts = lora_options(head_params={"precision": "fp16"})
    with pytest.raises(ValueError) as e:
        fit(tmp_path / "no-such-data", tmp_path / "out", opts)   # refused before reading data
    assert str(e.value) == FP16_REFUSAL
    assert not (tmp_path / "out").exists()


def test_params_are_checked():
    with pytest.raises(ValueError, match="lora-targets"):
        LoraParams(lora_targets=["vision_proj"])
    with pytest.raises(ValueError, match="unknown LoRA head parameters"):
        LoraParams.from_dict({"lora_rank": 4})
    assert LoraParams.from_dict({"lora_targets": "q_proj, o_proj"}).lora_targets == ["q_proj", "o_proj"]


def test_minibatches_cover_each_epoch_once():
    it = minibatches(10, 4, seed=1)
    first_epoch = [i for _ in range(2) for i in next(it)]
    assert len(first_epoch) == len(set(first_epoch)) == 8        # ragged tail dropped, no repeats
    assert [next(minibatches(10, 4, 1)) for _ in range(2)] == [next(minibatches(10, 4, 1))] * 2
