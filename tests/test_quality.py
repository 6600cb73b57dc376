"""Tests for rainclf.report.quality on hand-written answers, including the baseline's failure modes."""

from __future__ import annotations

import pytest

from rainclf.labels import NO_RAIN, RAIN
from rainclf.report.quality import (
    assess_answer,
    labels_mentioned,
    latin_fraction,
    summarise,
)

SENTENCE = "图片中天气晴朗，没有乌云，所以不会下雨。"
MIXED = "The sky is 阴天, will rain 会下雨"
THINK = "<think>乌云密布</think><answer>会下雨</answer>"


def test_sentence_answer_contains_no_rain_but_is_not_valid():
    q = assess_answer(SENTENCE)
    assert q.format_valid is False
    assert q.label is None
    assert q.contains_label is True
    assert labels_mentioned(SENTENCE) == {NO_RAIN}  # the 会下雨 inside 不会下雨 is not RAIN
    assert q.mixed_language is False
    assert q.latin_fraction == 0.0
    assert q.think_leak is False
    assert q.length == len(SENTENCE)


def test_label_with_punctuation_is_extractable_not_exact():
    # issue 16: format-valid means exactly a label; a full stop makes it "extractable"
    q = assess_answer("会下雨。")
    assert (q.kind, q.format_valid, q.label, q.extracted) == ("extractable", False, None, RAIN)
    assert q.contains_label is True
    assert q.length == 4


def test_whitespace_around_no_rain_is_valid_and_trimmed():
    q = assess_answer("  不会下雨\n")
    assert q.format_valid is True and q.kind == "exact" and q.wrappers == ()
    assert q.label == q.extracted == NO_RAIN
    assert labels_mentioned("  不会下雨\n") == {NO_RAIN}
    assert q.length == 4


def test_mixed_language_answer():
    q = assess_answer(MIXED)
    assert q.format_valid is False
    assert q.mixed_language is True
    # Latin letters: Thesky is willrain -> T,h,e,s,k,y,i,s,w,i,l,l,r,a,i,n = 16; CJK: 阴天会下雨 = 5.
    assert q.latin_fraction == pytest.approx(16 / 21)
    assert labels_mentioned(MIXED) == {RAIN}
    assert q.contains_label is True


def test_think_tags_leak_and_are_stripped_before_counting():
    q = assess_answer(THINK)
    assert q.think_leak is True
    # issue 16: the think block and the answer tags are the family's wrappers, removed (and
    # counted) before the exact check
    assert q.format_valid is True and q.kind == "exact" and q.wrappers == ("think", "answer")
    assert q.label == RAIN
    # The tag names are Latin letters; they must not make the answer look "mixed".
    assert q.mixed_language is False
    assert q.latin_fraction == 0.0
    assert q.length == len("乌云密布会下雨")
    assert labels_mentioned(THINK) == {RAIN}


def test_empty_answer():
    q = assess_answer("")
    assert q == assess_answer("")  # frozen dataclass: value equality
    assert (q.format_valid, q.contains_label, q.mixed_language, q.think_leak) == (
        False, False, False, False)
    assert q.latin_fraction == 0.0
    assert q.length == 0
    assert q.label is None


def test_labels_mentioned_both_and_adjacent():
    assert labels_mentioned("可能会下雨，也可能不会下雨") == {RAIN, NO_RAIN}
    # Removing 不会下雨 must not glue neighbours into a fresh 会下雨 match.
    assert labels_mentioned("不会下雨不会下雨") == {NO_RAIN}
    assert labels_mentioned("会下雨不会下雨") == {RAIN, NO_RAIN}
    assert labels_mentioned("晴天") == set()


def test_full_width_latin_counts_as_latin():
    assert latin_fraction("ＲＡＩＮ会下雨") == pytest.approx(4 / 7)


def test_answer_quality_is_frozen():
    q = assess_answer("会下雨")
    with pytest.raises(AttributeError):
        q.label = NO_RAIN  # type: ignore[misc]


def test_summarise_rates():
    answers = [SENTENCE, "会下雨。", MIXED, THINK, "", "  不会下雨\n"]
    s = summarise(answers)
    assert set(s) == {"n", "format_valid_rate", "contains_label_rate", "mixed_language_rate",
                      "mean_latin_fraction", "think_leak_rate", "mean_length", "n_exact", "n_extractable",
                      "n_invalid_answers", "exact_rate", "extractable_rate", "invalid_rate",
                      "think_wrapper_rate", "answer_wrapper_rate", "box_wrapper_rate"}
    assert s["n"] == 6
    # exact: "  不会下雨\n" and THINK; extractable: SENTENCE, "会下雨。", MIXED; invalid: ""
    assert (s["n_exact"], s["n_extractable"], s["n_invalid_answers"]) == (2, 3, 1)
    assert (s["exact_rate"], s["extractable_rate"], s["invalid_rate"]) == pytest.approx((2 / 6, 3 / 6, 1 / 6))
    assert s["think_wrapper_rate"] == s["answer_wrapper_rate"] == pytest.approx(1 / 6)
    assert s["box_wrapper_rate"] == 0.0
    assert s["format_valid_rate"] == pytest.approx(2 / 6)
    assert s["contains_label_rate"] == pytest.approx(5 / 6)
    assert s["mixed_language_rate"] == pytest.approx(1 / 6)
    assert s["mean_latin_fraction"] == pytest.approx((16 / 21) / 6)
    assert s["think_leak_rate"] == pytest.approx(1 / 6)
    expected_len = len(SENTENCE) + 4 + len(MIXED) + 7 + 0 + 4
    assert s["mean_length"] == pytest.approx(expected_len / 6)


def test_summarise_accepts_generator_and_empty():
    assert summarise(a for a in ["会下雨"])["format_valid_rate"] == 1.0
    empty = summarise([])
    assert empty["n"] == 0
    assert all(v is None for k, v in empty.items() if k != "n")


@pytest.mark.parametrize("text, kind, label, extracted, wrappers", [
    # the real GLM-4.xV answer formats: exact once the family's wrappers are removed
    ("<answer><|begin_of_box|>会下雨<|end_of_box|></answer>", "exact", RAIN, RAIN, ("answer", "box")),
    ("<|begin_of_box|>不会下雨<|end_of_box|>", "exact", NO_RAIN, NO_RAIN, ("box",)),
    ("<think>天很阴，可能会下雨</think><answer>不会下雨", "exact", NO_RAIN, NO_RAIN, ("think", "answer")),
    ("乌云密布，会下雨</think>\n<answer>会下雨</answer>", "exact", RAIN, RAIN, ("think", "answer")),  # prompt opened <think>
    (" \u3000会下雨\n", "exact", RAIN, RAIN, ()),
    # extractable: aliases, punctuation, quotes, one label in a sentence
    ("rain", "extractable", None, RAIN, ()),
    ("won't rain", "extractable", None, NO_RAIN, ()),
    ("「会下雨」", "extractable", None, RAIN, ()),
    ("<answer>会下雨。</answer>", "extractable", None, RAIN, ("answer",)),
    ("图片中乌云密布，会下雨", "extractable", None, RAIN, ()),
    # invalid: nothing, both labels, a truncated think block, a label only inside the reasoning
    ("", "invalid", None, None, ()),
    ("可能会下雨，也可能不会下雨", "invalid", None, None, ()),
    ("<think>天空很暗，会下雨", "invalid", None, None, ("think",)),
    ("<think>会下雨</think><answer></answer>", "invalid", None, None, ("think", "answer")),
    ("晴天", "invalid", None, None, ()),
])
def test_answer_classes(text, kind, label, extracted, wrappers):
    q = assess_answer(text)
    assert (q.kind, q.label, q.extracted, q.wrappers) == (kind, label, extracted, wrappers)
    assert q.format_valid is (kind == "exact")


def test_a_label_after_the_think_block_is_not_removed():
    q = assess_answer("会下雨<think>其实不确定</think>")
    assert (q.kind, q.label) == ("exact", RAIN)


def test_special_token_markup_is_not_mixed_language():
    q = assess_answer("<answer><|begin_of_box|>会下雨<|end_of_box|></answer>")
    assert q.mixed_language is False and q.latin_fraction == 0.0 and q.length == 3
    # real English inside the wrappers still counts
    q = assess_answer("<|begin_of_box|>rain 会下雨<|end_of_box|>")
    assert q.mixed_language is True and q.latin_fraction == pytest.approx(4 / 7)
