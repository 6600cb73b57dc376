"""rainclf.report.scoring on hand-built rows (no models): which label counts, which score the
probability metrics use (the head's p_rain for head + fallback, on every image), the answer
classes of a greedy fallback, and the fallback note in words."""

from __future__ import annotations

from pathlib import Path

import pytest

from rainclf.heads.base import Row
from rainclf.labels import NO_RAIN, RAIN
from rainclf.report.evaluate import ModelSpec
from rainclf.report.metrics import classification_metrics
from rainclf.report.scoring import GUARANTEED, MEASURED, counted_label, model_metrics
from rainclf.report.timing import ModelRun

TRUTH = [RAIN, RAIN, NO_RAIN, NO_RAIN, RAIN, NO_RAIN]
HEAD_P = [0.9, 0.55, 0.45, 0.1, 0.6, 0.4]


class Config:
    feature, layer = "vision", -1
    backbone = {"name": "glm4v-tiny", "random_weights": True}


def _run(rows, description: dict) -> ModelRun:
    return ModelRun(rows, [0.01] * len(rows), 0.1, None, "test", None, 0, description=description)


HEAD_GREEDY = {"head": "linear+fallback", "decoding": "greedy", "quality_of": "emitted label",
               "fallback": {"head": "generative", "decoding": "greedy", "quality_of": "generated text"}}
GEN_GREEDY = {"head": "generative", "decoding": "greedy", "quality_of": "generated text"}


def greedy_fallback_rows() -> list[Row]:
    """A head + greedy fallback on band [0.35, 0.65]: images 1, 2, 4, 5 are routed; the fallback
    answers exactly (1, 2), with a sentence (4: head label kept) and with text (5: kept)."""
    rows = []
    answers = {1: "会下雨", 2: "会下雨", 4: "天很阴，会下雨。", 5: "天空很美"}
    for i, p in enumerate(HEAD_P):
        head = RAIN if p >= 0.5 else NO_RAIN
        if i not in answers:
            rows.append(Row(path=f"{i}.jpg", label=head, p_rain=p))
            continue
        raw = answers[i]
        extra = {"head_label": head, "head_p_rain": p, "raw": raw, "format_valid": raw in (RAIN, NO_RAIN)}
        if extra["format_valid"]:   # as FallbackClassifier does: the fallback's label, its p_rain (None)
            rows.append(Row(path=f"{i}.jpg", label=raw, p_rain=None, source="fallback", extra=extra))
        else:
            rows.append(Row(path=f"{i}.jpg", label=head, p_rain=p, source="head", extra=extra))
    return rows


def test_head_plus_greedy_fallback_scores_every_image_with_the_head_p_rain():
    spec = ModelSpec("h+g-greedy", Path("h"), "linear+fallback", "greedy", Path("g"))
    m = model_metrics(spec, TRUTH, _run(greedy_fallback_rows(), HEAD_GREEDY), Config(), band=(0.35, 0.65))
    head_only = classification_metrics(TRUTH, HEAD_P, None)
    assert m["n_scored"] == 6 and m["score_source"] == "the head's p_rain"
    for key in ("roc_auc", "ece", "brier"):
        assert m[key] == pytest.approx(head_only[key])
    # labels: image 2 relabelled by the fallback (wrong), the rest are the head's
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert (m["n_fallback"], m["fallback_replaced"], m["fallback_changed"], m["fallback_invalid"]) == (4, 2, 1, 2)
    # the combination always emits a label; the fallback's answers are measured
    assert m["answer_format"] == GUARANTEED and m["quality_of"] == "the fallback's generated text (4 answers)"
    assert (m["n_exact"], m["n_extractable"], m["n_invalid_answers"]) == (2, 1, 1)
    assert m["notes"] == ["4 of 6 images had a head p_rain in [0.35, 0.65] and were asked again to the generative "
                          "model (greedy): its label replaced the head's for 2 (1 of them a different label); for 2 "
                          "its answer was not exactly a label, so the head's label was kept"]


def test_generated_text_counts_exact_answers_unless_lenient():
    rows = [Row(path=f"{i}.jpg", label=lab, source="generative", extra={"raw": raw})
            for i, (raw, lab) in enumerate([("会下雨", RAIN), ("会下雨。", None), ("<answer>不会下雨</answer>", NO_RAIN),
                                            ("rain", None), ("晴", None), ("不会下雨", NO_RAIN)])]
    rows.append(Row(path="broken.jpg", source="generative", error="broken.jpg: not an image"))
    truth = TRUTH + [RAIN]
    spec = ModelSpec("g-greedy", Path("g"), "generative", "greedy")
    strict = model_metrics(spec, truth, _run(rows, GEN_GREEDY), Config())
    lenient = model_metrics(spec, truth, _run(rows, GEN_GREEDY), Config(), lenient=True)
    # exact: 0 (right), 2 (right), 5 (right); extractable: 1 → RAIN (right), 3 → RAIN (wrong: NO_RAIN)
    assert strict["accuracy"] == strict["accuracy_exact"] == pytest.approx(3 / 7)
    assert lenient["accuracy"] == strict["accuracy_lenient"] == pytest.approx(4 / 7)
    assert strict["n_invalid"] == 4 and lenient["n_invalid"] == 2
    assert strict["answer_format"] == MEASURED and strict["n_answers"] == 6
    assert (strict["n_exact"], strict["n_extractable"], strict["n_invalid_answers"]) == (3, 2, 1)
    assert strict["answer_wrapper_rate"] == pytest.approx(1 / 6)
    assert strict["n_scored"] == 0 and strict["roc_auc"] is None and strict["score_source"] is None
    assert [counted_label(r, True) for r in rows] == [RAIN, RAIN, NO_RAIN, RAIN, None, NO_RAIN, None]
