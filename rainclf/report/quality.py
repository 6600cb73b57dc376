"""Output-quality measures for generated answers (stdlib only).

The generative GLM-4V LoRA baseline is asked to answer with exactly one label, but in practice it
writes sentences ("图片中天气晴朗，……所以不会下雨。"), mixes English into Chinese, and the GLM
family wraps answers in its own markup. :func:`assess_answer` puts every answer in one of three
classes:

    exact        the answer *is* 会下雨 or 不会下雨 once whitespace is trimmed and the model
                 family's own wrappers are removed (``format_valid``)
    extractable  a label can be recovered: an English alias, added punctuation or quotes, or
                 exactly one label inside a sentence (counted only by ``evaluate --lenient``)
    invalid      no label, or both labels ("可能会下雨，也可能不会下雨")

The wrappers (``WRAPPERS``) are GLM-4.1V-Thinking's ``<think>…</think>`` block (removed with its
content: the reasoning is not the answer; an unclosed one runs to the end, a ``</think>`` without
its opening tag ends a block the prompt opened), its ``<answer>``/``</answer>`` tags and GLM-4.xV's
``<|begin_of_box|>``/``<|end_of_box|>``; each is counted separately, so a report shows how often a
model used them. Language mixing and length are measured on the text with special-token markup
(``<|…|>``, the tags) removed but its content kept.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass

from rainclf.labels import LABELS, NO_RAIN, RAIN, normalise_label

EXACT, EXTRACTABLE, INVALID = "exact", "extractable", "invalid"
ANSWER_CLASSES = (EXACT, EXTRACTABLE, INVALID)

# name → markup removed before the exact check. "think" removes the block's content too.
WRAPPERS: dict[str, re.Pattern] = {
    "think": re.compile(r"<think>.*?(?:</think>|\Z)|\A(?:(?!<think>).)*?</think>", re.DOTALL),
    "answer": re.compile(r"</?answer>"),
    "box": re.compile(r"<\|begin_of_box\|>|<\|end_of_box\|>"),
}
# Special-token markup only (content kept): GLM's <|…|> tokens, the tags, the chat prefix tokens.
_MARKUP_RE = re.compile(r"<\|[^<>|]*\|>|</?\s*(?:think|answer)\s*>|\[gMASK\]|<sop>", re.IGNORECASE)
_TAG_RE = re.compile(r"</?\s*(?:think|answer)\s*>", re.IGNORECASE)


@dataclass(frozen=True)
class AnswerQuality:
    """Quality of one generated answer."""

    kind: str                   # exact | extractable | invalid
    label: str | None           # the label if the answer is exact, else None
    extracted: str | None       # the label a lenient reading recovers (exact or extractable), else None
    format_valid: bool          # kind == exact
    wrappers: tuple[str, ...]   # names of the WRAPPERS found (in WRAPPERS order)
    contains_label: bool        # a label appears somewhere in the answer (think block included)
    mixed_language: bool        # any Latin letter in the markup-free answer
    latin_fraction: float       # Latin letters / (Latin letters + CJK characters), markup-free
    think_leak: bool            # <think>/<answer> tags present
    length: int                 # characters of the markup-free, whitespace-trimmed answer


def strip_markup(text: str) -> str:
    """Remove special-token markup (``<|begin_of_box|>``, ``<think>``, ``</answer>``, …), not the
    text between it, and trim surrounding whitespace."""
    return _MARKUP_RE.sub("", text).strip()


def unwrap(text: str) -> tuple[str, tuple[str, ...]]:
    """The answer with the model family's wrappers removed (think blocks with their content),
    whitespace trimmed, and the names of the wrappers that were there."""
    found = []
    for name, pattern in WRAPPERS.items():
        text, n = pattern.subn("", text)
        if n:
            found.append(name)
    return text.strip(), tuple(found)


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
    """Latin letters / (Latin letters + CJK characters) in ``text`` with special-token markup
    removed; 0.0 when there are neither."""
    t = unicodedata.normalize("NFKC", strip_markup(text))
    latin = sum(1 for ch in t if _is_latin_letter(ch))
    cjk = sum(1 for ch in t if _is_cjk(ch))
    total = latin + cjk
    return latin / total if total else 0.0


def _extract(core: str) -> str | None:
    """A label a lenient reader recovers from the unwrapped answer: an alias or a label with
    punctuation, else the one label a sentence mentions (None when it mentions both or none)."""
    label = normalise_label(core)
    if label is not None:
        return label
    mentioned = labels_mentioned(core)
    return next(iter(mentioned)) if len(mentioned) == 1 else None


def assess_answer(text: str) -> AnswerQuality:
    """Classify one generated answer (see the module docstring): ``format_valid`` is true only
    for an exact label, ``extracted`` is what ``--lenient`` counts."""
    core, wrappers = unwrap(text)
    exact = core if core in LABELS else None
    extracted = exact or _extract(core)
    kind = EXACT if exact else EXTRACTABLE if extracted else INVALID
    frac = latin_fraction(text)
    return AnswerQuality(
        kind=kind,
        label=exact,
        extracted=extracted,
        format_valid=kind == EXACT,
        wrappers=wrappers,
        contains_label=bool(labels_mentioned(text)),
        mixed_language=frac > 0.0,
        latin_fraction=frac,
        think_leak=has_think_leak(text),
        length=len(strip_markup(text)),
    )


#: summarise's keys besides ``n`` (rates in [0, 1], counts, means), in a stable order.
SUMMARY_KEYS = ("n_exact", "n_extractable", "n_invalid_answers", "exact_rate", "extractable_rate",
                "invalid_rate", "format_valid_rate", "contains_label_rate", "mixed_language_rate",
                "mean_latin_fraction", "think_leak_rate") + tuple(
                    f"{w}_wrapper_rate" for w in WRAPPERS) + ("mean_length",)


def summarise(answers: Iterable[str]) -> dict:
    """Aggregate :func:`assess_answer` over many answers.

    Keys: ``n``; ``n_exact``/``n_extractable``/``n_invalid_answers`` and their rates
    ``exact_rate``/``extractable_rate``/``invalid_rate`` (``format_valid_rate`` = ``exact_rate``);
    ``contains_label_rate``, ``mixed_language_rate``, ``mean_latin_fraction``, ``think_leak_rate``;
    ``<wrapper>_wrapper_rate`` for each of WRAPPERS (answers that used it); ``mean_length``.
    With no answers every value except ``n`` is None (no data is not the same as 0%).
    """
    qs = [assess_answer(a) for a in answers]
    n = len(qs)
    if n == 0:
        return {"n": 0, **{k: None for k in SUMMARY_KEYS}}
    counts = {c: sum(q.kind == c for q in qs) for c in ANSWER_CLASSES}
    out = {
        "n": n,
        "n_exact": counts[EXACT],
        "n_extractable": counts[EXTRACTABLE],
        "n_invalid_answers": counts[INVALID],
        "exact_rate": counts[EXACT] / n,
        "extractable_rate": counts[EXTRACTABLE] / n,
        "invalid_rate": counts[INVALID] / n,
        "format_valid_rate": counts[EXACT] / n,
        "contains_label_rate": sum(q.contains_label for q in qs) / n,
        "mixed_language_rate": sum(q.mixed_language for q in qs) / n,
        "mean_latin_fraction": sum(q.latin_fraction for q in qs) / n,
        "think_leak_rate": sum(q.think_leak for q in qs) / n,
    }
    for w in WRAPPERS:
        out[f"{w}_wrapper_rate"] = sum(w in q.wrappers for q in qs) / n
    out["mean_length"] = sum(q.length for q in qs) / n
    return out
