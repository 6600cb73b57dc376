"""Tests for rainclf.heads.generative on glm4v-tiny (CPU): answer-only masks, training makes greedy
answers exact labels, constrained decoding, sampling, and the fp16 refusal (library and CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import helpers
import numpy as np
import pytest
from PIL import Image

from click.testing import CliRunner  # noqa: E402

from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions  # noqa: E402
from rainclf.cli import main  # noqa: E402
from rainclf.config import RunOptions
from rainclf.fit import FitOptions, fit  # noqa: E402
from rainclf.heads.adapters import FP16_REFUSAL, LoraParams, private_backbone  # noqa: E402
from rainclf.heads.generative import (  # noqa: E402
    GenerativeClassifier,
    answer_labels,
    build_generative,
)
from rainclf.labels import LABELS, RAIN  # noqa: E402
from rainclf.model import (
    ModelConfig,  # noqa: E402
    load_classifier,  # noqa: E402
)
from rainclf.report.quality import summarise  # noqa: E402

SIZE = 112
LONG = "图片中天气晴朗，没有乌云，所以不会下雨。"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_red_blue(root: Path, n_per_class: int = 10, seed: int = 0) -> Path:
    return helpers.make_red_blue(root, n_per_class, seed, SIZE)


def gen_options(**kw) -> FitOptions:
    params = dict(steps=30, lr=1e-2, train_batch_size=4, eval_every=10, patience=5, max_new_tokens=8)
    params.update(kw.pop("head_params", {}))
    base = dict(backbone="glm4v-tiny", head="generative", device="cpu", cache_dir=None, progress=False,
                val_split=0.2, head_params=params)
    base.update(kw)
    return FitOptions(**base)


@pytest.fixture(scope="module")
def red_blue(tmp_path_factory) -> Path:
    return make_red_blue(tmp_path_factory.mktemp("redblue"))


@pytest.fixture(scope="module")
def train_images(red_blue):
    paths = sorted(red_blue.glob("*/*.png"))
    return paths, [Image.open(p).convert("RGB") for p in paths], [p.parent.name for p in paths]


@pytest.fixture(scope="module")
def untrained():
    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    return build_generative(backbone, LoraParams(), DEFAULT_PROMPT, seed=0)


@pytest.fixture(scope="module")
def fitted(red_blue, tmp_path_factory):
    return fit(red_blue, tmp_path_factory.mktemp("gen") / "model", gen_options())


def config_for(model) -> ModelConfig:
    return ModelConfig(head="generative", backbone=model.backbone.describe(), feature="answer",
                       prompt=DEFAULT_PROMPT, dim=model.backbone.hidden_size)


# ----------------------------------------------------------------------------- masks

def test_answer_only_mask_token_by_token(untrained, train_images):
    """Two answers of different lengths (so one row is padded): every prompt and padding position
    is -100, every answer token and the EOS keep their ids, and they decode to answer + EOS."""
    gen = untrained
    _, images, _ = train_images
    answers = [RAIN, LONG]
    inputs = gen.backbone.chat_inputs(images[:2], DEFAULT_PROMPT, answers=answers)
    labels = answer_labels(inputs["input_ids"], inputs["attention_mask"], gen.prompt_len)
    prompt_ids = gen.backbone.chat_inputs(images[:1], DEFAULT_PROMPT)["input_ids"][0].tolist()
    assert len(prompt_ids) == gen.prompt_len
    tok = gen.tokenizer
    for row, answer in enumerate(answers):
        ids, mask, lab = (t[row].tolist() for t in (inputs["input_ids"], inputs["attention_mask"], labels))
        answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        n_pad = mask.count(0)
        assert n_pad == (0 if answer == LONG else len(ids) - len(prompt_ids) - len(answer_ids))
        for j in range(len(ids)):
            k = j - n_pad                    # position among the row's real tokens (left padding)
            if k < 0:
                assert mask[j] == 0 and lab[j] == -100, (row, j)
            elif k < len(prompt_ids):
                assert ids[j] == prompt_ids[k] and lab[j] == -100, (row, j)
            else:
                assert lab[j] == ids[j] == answer_ids[k - len(prompt_ids)], (row, j)
        kept = [t for t in lab if t != -100]
        assert kept == answer_ids
        assert tok.decode(kept, skip_special_tokens=False) == answer + tok.eos_token


def test_answer_labels_right_padding():
    import torch

    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    lab = answer_labels(ids, mask, prompt_len=3)
    assert lab.tolist() == [[-100, -100, -100, 8, -100, -100], [-100, -100, -100, 8, 9, 10]]


# ----------------------------------------------------------------------------- training

def test_training_makes_greedy_answers_exact_labels(untrained, fitted, train_images):
    paths, images, labels = train_images
    before = summarise(untrained.generate(images, "greedy", max_new_tokens=8))["format_valid_rate"]
    clf = load_classifier(fitted.model_dir, RunOptions(device="cpu", progress=False, decoding="greedy",
                                                       max_new_tokens=8))
    rows = clf.predict_paths(paths)
    after = np.mean([r.extra["format_valid"] for r in rows])
    assert after > before, (before, after)
    assert after >= 0.9
    assert np.mean([r.label == y for r, y in zip(rows, labels)]) >= 0.9
    assert {r.source for r in rows} == {"generative"}
    assert all(r.extra["raw"] is not None for r in rows)


def test_checkpoints_and_history(fitted):
    d, m = fitted.model_dir, fitted.metrics
    for sub in ("adapter", "adapter_last"):
        assert (d / sub / "adapter_model.safetensors").is_file()
    assert [h["step"] for h in m["history"]] == [0, 10, 20, 30]
    for h in m["history"]:
        assert {"val_loss", "val_accuracy", "val_format_valid"} <= set(h)
    assert m["best_step"] > 0                              # step 0 (untrained) is only recorded
    best = next(h for h in m["history"] if h["step"] == m["best_step"])
    # chosen by (accuracy, format-valid), never by loss: no validation beats the kept one on that key
    assert all((h["val_accuracy"], h["val_format_valid"]) <= (best["val_accuracy"], best["val_format_valid"])
               for h in m["history"])
    assert "not loss" in m["selection"]
    assert m["answer_token_ids"][RAIN][-1] == 0           # EOS closes every answer
    assert json.loads((d / "config.json").read_text(encoding="utf-8"))["head"] == "generative"


def test_last_checkpoint_loads(fitted, train_images):
    paths, _, _ = train_images
    config = load_classifier(fitted.model_dir, RunOptions(device="cpu", progress=False)).config
    last = GenerativeClassifier(config, fitted.model_dir, RunOptions(device="cpu", progress=False,
                                                                      decoding="constrained"),
                                checkpoint="adapter_last")
    rows = last.predict_paths(paths[:3])
    assert all(r.label in LABELS for r in rows)


# ----------------------------------------------------------------------------- constrained

def _randomise(model, seed: int, scale: float) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_trainable():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_constrained_always_returns_a_label(seed, train_images):
    """Any model, untrained (seed 0: LoRA B = 0) or randomly perturbed, answers one of two labels."""
    _, images, _ = train_images
    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    model = build_generative(backbone, LoraParams(), DEFAULT_PROMPT, seed=seed)
    if seed:
        _randomise(model, seed, scale=0.5 * seed)
    clf = GenerativeClassifier.from_model(config_for(model), model,
                                          RunOptions(device="cpu", decoding="constrained"))
    for a in clf.answer(images[::4]):
        assert a["label"] in LABELS and a["format_valid"] is True and a["raw"] == a["label"]
        assert 0.0 <= a["p_rain"] <= 1.0 and np.isfinite(a["p_rain"])
        assert (a["label"] == RAIN) == (a["p_rain"] >= 0.5)              # the label follows the score


def test_constrained_answers_even_when_greedy_says_nothing(train_images):
    """A model that wants to stop at once (EOS first): greedy gives an empty, invalid answer,
    constrained still picks a label."""
    import torch

    _, images, _ = train_images
    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    model = build_generative(backbone, LoraParams(), DEFAULT_PROMPT)
    boost = torch.zeros(model.base.lm_head.out_features)
    boost[model.eos_ids[0]] = 50.0                     # EOS dominates every position
    model.base.lm_head.register_forward_hook(lambda module, args, out: out + boost)
    assert model.generate(images[:2], "greedy") == ["", ""]
    clf = GenerativeClassifier.from_model(config_for(model), model, RunOptions(decoding="constrained"))
    for a in clf.answer(images[:2]):
        assert a["label"] in LABELS and np.isfinite(a["p_rain"])


def test_constrained_p_rain_matches_hand_computation(train_images):
    """p_rain = softmax of the two sequence log-probabilities, each summed token by token with a
    full forward pass per prefix (no masks, no batching, no shortcut)."""
    import torch

    _, images, _ = train_images
    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    model = build_generative(backbone, LoraParams(), DEFAULT_PROMPT, seed=7)
    _randomise(model, 7, scale=0.3)
    answer_ids = model.check_tokenisation()
    image = images[3]
    prompt = backbone.chat_inputs([image], DEFAULT_PROMPT)
    by_hand = []
    with torch.no_grad():
        for label in LABELS:
            total = 0.0
            for k, target in enumerate(answer_ids[label]):
                extra = torch.tensor([answer_ids[label][:k]], dtype=torch.long)
                inputs = dict(prompt)
                inputs["input_ids"] = torch.cat([prompt["input_ids"], extra], dim=1)
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
                inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(extra)], 1)
                logits = model.peft_model(**inputs).logits[0, -1].double()
                total += float(torch.log_softmax(logits, dim=-1)[target])
            by_hand.append(total)
    lp = model.label_logprobs([image])[0]
    np.testing.assert_allclose(lp, by_hand, rtol=0, atol=1e-4)
    expected = np.exp(by_hand[1]) / (np.exp(by_hand[0]) + np.exp(by_hand[1]))
    assert model.constrained_p_rain([image])[0] == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_reproducible_for_a_seed(untrained, train_images):
    _, images, _ = train_images
    model = untrained
    clf = lambda seed: GenerativeClassifier.from_model(  # noqa: E731
        config_for(model), model, RunOptions(decoding="sample", seed=seed, temperature=1.5, max_new_tokens=6))
    a = [x["raw"] for x in clf(3).answer(images[:4])]
    b = [x["raw"] for x in clf(3).answer(images[:4])]
    c = [x["raw"] for x in clf(4).answer(images[:4])]
    assert a == b
    assert a != c
    # image i is sampled with its own seed: the same answer alone as in a batch
    assert clf(3).answer(images[2:3], first_index=2)[0]["raw"] == a[2]


def test_sampled_answer_follows_the_image_not_its_position(untrained, train_images, tmp_path):
    """predict and evaluate (one image at a time) must sample the same answer for the same photo."""
    from dataclasses import replace

    _, images, _ = train_images
    paths = []
    for i, im in enumerate(images[:3]):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    opts = RunOptions(decoding="sample", seed=7, temperature=1.5, max_new_tokens=6, batch_size=2, progress=False)
    clf = GenerativeClassifier.from_model(config_for(untrained), untrained, opts)
    forward = {r.path: r.extra["raw"] for r in clf.predict_paths(paths)}
    clf.options = replace(opts, batch_size=1)
    backward = {r.path: r.extra["raw"] for r in clf.predict_paths(paths[::-1])}
    single = {str(p): clf.predict_paths([p])[0].extra["raw"] for p in paths}
    assert forward == backward == single


# ----------------------------------------------------------------------------- fp16

def test_fp16_refused_by_library(tmp_path):
    with pytest.raises(ValueError) as e:
        fit(tmp_path / "missing", tmp_path / "out", gen_options(head_params={"precision": "fp16"}))
    msg = str(e.value)
    assert msg == FP16_REFUSAL and "overflow" in msg and "English" in msg and "--force-fp16" in msg
    assert not (tmp_path / "out").exists()


def test_fp16_forced_trains(red_blue, tmp_path, train_images):
    """--force-fp16 really trains in fp16: finite steps, LoRA B (zero at start) moved away from
    zero in the saved adapter, and the saved model scores images differently from the base."""
    from safetensors.numpy import load_file

    result = fit(red_blue, tmp_path / "out", gen_options(
        val_split=0.0, head_params={"precision": "fp16", "force_fp16": True, "steps": 2}))
    assert result.metrics["precision"] == "fp16"
    assert result.metrics["nonfinite_steps"] == 0 and result.metrics["steps_done"] == 2
    weights = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(np.isfinite(w).all() for w in lora_b)
    assert max(float(np.abs(w).max()) for w in lora_b) > 1e-4            # the steps changed the adapter
    _, images, _ = train_images
    opts = RunOptions(device="cpu", progress=False, decoding="constrained")
    trained = load_classifier(tmp_path / "out", opts).model.constrained_p_rain(images[:4])
    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    base = build_generative(backbone, LoraParams(), DEFAULT_PROMPT).constrained_p_rain(images[:4])  # B = 0
    assert np.isfinite(trained).all() and np.abs(trained - base).max() > 1e-4


@pytest.mark.parametrize("head", ["generative", "lora"])
def test_fp16_refused_by_cli(head, red_blue, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["fit", "--backbone", "glm4v-tiny", str(red_blue), "-o", str(out), "--head", head, "--feature",
                                       "answer", "--precision", "fp16", "--no-cache", "-q"])
    assert result.exit_code == 2, result.output
    assert "fp16 is refused" in result.output and "overflow" in result.output
    assert "--force-fp16" in result.output
    assert not out.exists()
