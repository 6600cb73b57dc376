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


def test_bare_label_with_punctuation_is_valid():
    q = assess_answer("会下雨。")
    assert q.format_valid is True
    assert q.label == RAIN
    assert q.contains_label is True
    assert q.length == 4


def test_whitespace_around_no_rain_is_valid_and_trimmed():
    q = assess_answer("  不会下雨\n")
    assert q.format_valid is True
    assert q.label == NO_RAIN
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
    assert q.format_valid is False
    assert q.label is None
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
                      "mean_latin_fraction", "think_leak_rate", "mean_length"}
    assert s["n"] == 6
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
