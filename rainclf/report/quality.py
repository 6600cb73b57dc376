"""Output-quality measures for generated answers (stdlib only).

The generative GLM-4V LoRA baseline is asked to answer with exactly one label, but in practice it
writes sentences ("图片中天气晴朗，……所以不会下雨。"), mixes English into Chinese, and the
thinking variant leaks ``<think>``/``<answer>`` tags. These measures put numbers on those failure
modes so a report can show them next to the accuracy of the classification head.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from rainclf.labels import NO_RAIN, RAIN, normalise_label

# The tags GLM-4.1V-Thinking emits around its reasoning and its final answer.
_TAG_RE = re.compile(r"</?\s*(?:think|answer)\s*>", re.IGNORECASE)


@dataclass(frozen=True)
class AnswerQuality:
    """Quality of one generated answer."""

    label: str | None  # the exact label if the answer is format-valid, else None
    format_valid: bool  # the whole answer is a label (after normalise_label)
    contains_label: bool  # a label appears somewhere in the answer
    mixed_language: bool  # any Latin letter in the (tag-stripped) answer
    latin_fraction: float  # Latin letters / (Latin letters + CJK characters)
    think_leak: bool  # <think>/<answer> tags present
    length: int  # characters of the tag-stripped, whitespace-trimmed answer


def strip_tags(text: str) -> str:
    """Remove ``<think>``, ``</think>``, ``<answer>``, ``</answer>`` tags (not their content)
    and trim surrounding whitespace."""
    return _TAG_RE.sub("", text).strip()


def has_think_leak(text: str) -> bool:
    """True if any of the thinking-model tags appear in ``text``."""
    return _TAG_RE.search(text) is not None


def labels_mentioned(text: str) -> set[str]:
    """The labels that occur anywhere in ``text``.

    ``不会下雨`` contains ``会下雨`` as a substring, so every ``不会下雨`` is counted as NO_RAIN
    and removed before looking for RAIN: "所以不会下雨" mentions only NO_RAIN, while
    "可能会下雨，也可能不会下雨" mentions both. (A question such as "会不会下雨" therefore counts
    as NO_RAIN; the prompt asks for a label, so that phrasing is itself a format failure.)
    """
    t = unicodedata.normalize("NFKC", text)
    found: set[str] = set()
    if NO_RAIN in t:
        found.add(NO_RAIN)
        # Replace with a separator so "不会下雨会下雨" does not fuse into a new match.
        t = t.replace(NO_RAIN, "\0")
    if RAIN in t:
        found.add(RAIN)
    return found


def _is_cjk(ch: str) -> bool:
    # CJK Unified Ideographs, Extension A, Extensions B–F, and Compatibility Ideographs; Chinese
    # punctuation is deliberately not counted, it is neither Chinese nor English "content".
    cp = ord(ch)
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2EBEF
        or 0xF900 <= cp <= 0xFAFF
    )


def _is_latin_letter(ch: str) -> bool:
    # After NFKC full-width Ｒ becomes R, so a simple check covers both; accented Latin letters
    # (é) count too, since they are just as out of place in a Chinese answer.
    return ch.isalpha() and unicodedata.name(ch, "").startswith("LATIN")


def latin_fraction(text: str) -> float:
    """Latin letters / (Latin letters + CJK characters) in ``text`` after stripping tags;
    0.0 when there are neither."""
    t = unicodedata.normalize("NFKC", strip_tags(text))
    latin = sum(1 for ch in t if _is_latin_letter(ch))
    cjk = sum(1 for ch in t if _is_cjk(ch))
    total = latin + cjk
    return latin / total if total else 0.0


def assess_answer(text: str) -> AnswerQuality:
    """Measure one generated answer. ``format_valid`` is judged on the raw text, so an answer
    wrapped in ``<answer>`` tags is not valid: the caller asked for the bare label."""
    label = normalise_label(text)
    stripped = strip_tags(text)
    frac = latin_fraction(text)
    return AnswerQuality(
        label=label,
        format_valid=label is not None,
        contains_label=bool(labels_mentioned(text)),
        mixed_language=frac > 0.0,
        latin_fraction=frac,
        think_leak=has_think_leak(text),
        length=len(stripped),
    )


def summarise(answers: Iterable[str]) -> dict:
    """Aggregate :func:`assess_answer` over many answers.

    Keys: ``n``, ``format_valid_rate``, ``contains_label_rate``, ``mixed_language_rate``,
    ``mean_latin_fraction``, ``think_leak_rate``, ``mean_length``. Rates are in [0, 1];
    with no answers every value except ``n`` is None (no data is not the same as 0%).
    """
    qs = [assess_answer(a) for a in answers]
    n = len(qs)
    if n == 0:
        return {
            "n": 0,
            "format_valid_rate": None,
            "contains_label_rate": None,
            "mixed_language_rate": None,
            "mean_latin_fraction": None,
            "think_leak_rate": None,
            "mean_length": None,
        }
    return {
        "n": n,
        "format_valid_rate": sum(q.format_valid for q in qs) / n,
        "contains_label_rate": sum(q.contains_label for q in qs) / n,
        "mixed_language_rate": sum(q.mixed_language for q in qs) / n,
        "mean_latin_fraction": sum(q.latin_fraction for q in qs) / n,
        "think_leak_rate": sum(q.think_leak for q in qs) / n,
        "mean_length": sum(q.length for q in qs) / n,
    }
