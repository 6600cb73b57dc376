"""Tests for rainclf.heads.constrained on glm4v-tiny (CPU): one prefill + batched continuations
gives the same log-probabilities as the two-pass scorer (every image run once per label)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions
from rainclf.heads.adapters import LoraParams, private_backbone
from rainclf.heads.constrained import answers_logprobs, two_pass_logprobs
from rainclf.heads.generative import build_generative
from rainclf.labels import LABELS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gen():
    import torch

    backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    model = build_generative(backbone, LoraParams(), DEFAULT_PROMPT, seed=0)
    # non-zero LoRA B: the adapters change the scores, so both paths must go through them
    with torch.no_grad():
        for name, p in model.named_trainable():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model


def photos(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40 + 9 * i, 64, 3), dtype=np.uint8)) for i in range(n)]


def answer_ids(gen, texts):
    """Token ids each answer adds after the prompt (label + terminator), as check_tokenisation."""
    blank = photos(1)[0]
    prompt = gen.backbone.chat_inputs([blank], gen.prompt)["input_ids"][0].tolist()
    out = []
    for t in texts:
        ids = gen.backbone.chat_inputs([blank], gen.prompt, answers=[t])["input_ids"][0].tolist()
        assert ids[:len(prompt)] == prompt
        out.append(ids[len(prompt):])
    return out


@pytest.mark.parametrize("n", [1, 3])
def test_label_logprobs_equal_two_pass(gen, n):
    images = photos(n, seed=n)
    old = two_pass_logprobs(gen, images, list(LABELS))
    new = gen.label_logprobs(images)
    assert new.shape == (n, 2)
    assert np.abs(new - old).max() < 1e-5
    # the scores are real log-probabilities of multi-token answers, not zeros
    assert (new < -1.0).all()
    # and they differ between images (the image reaches the scores)
    if n > 1:
        assert np.abs(new[0] - new[1]).max() > 1e-4


def test_unequal_answer_lengths_match_two_pass(gen):
    """Answers of different token counts: the shorter one's right padding must not leak in."""
    import torch

    texts = [LABELS[1], LABELS[0] * 3]
    ids = answer_ids(gen, texts)
    assert len(ids[0]) != len(ids[1])
    images = photos(3, seed=7)
    old = two_pass_logprobs(gen, images, texts)
    with torch.inference_mode():
        new = answers_logprobs(gen.base.model, gen.base.lm_head,
                               gen.backbone.chat_inputs(images, gen.prompt), ids).double().numpy()
    assert np.abs(new - old).max() < 1e-5


def test_constrained_p_rain_is_softmax_of_scores(gen):
    images = photos(3, seed=3)
    lp = two_pass_logprobs(gen, images, list(LABELS))
    p = gen.constrained_p_rain(images)
    expected = np.exp(lp[:, 1]) / np.exp(lp).sum(axis=1)
    assert np.abs(p - expected).max() < 1e-5


def test_ragged_prompts_are_refused(gen):
    import torch

    inputs = gen.backbone.chat_inputs(photos(2), gen.prompt)
    inputs["attention_mask"] = inputs["attention_mask"].clone()
    inputs["attention_mask"][0, 0] = 0
    with torch.inference_mode(), pytest.raises(ValueError, match="one length"):
        answers_logprobs(gen.base.model, gen.base.lm_head, inputs, [[1, 0]])
