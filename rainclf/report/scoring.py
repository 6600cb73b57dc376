"""One model's rows → its metric dict in ``evaluate``: which label counts, which score the
probability metrics use, the answer classes, the training-image check, and the notes.

Rules (stated in every report, see ``rule_lines``):

- **Labels.** A head, constrained decoding, and a head + fallback emit one of the two labels by
  construction: their answer format is ``GUARANTEED``, not measured. A generative model decoding
  greedy/sample text is measured with rainclf.report.quality: only *exact* answers count as a
  label, unless ``lenient`` (``--lenient``), which also counts *extractable* ones (the label read
  from inside the text); everything else has no label and counts wrong. A head + fallback is
  scored on the labels it emitted (the fallback replaces the head's label only with an exact one).
- **Scores.** ROC-AUC, ECE and Brier are computed from one score per readable image, given by the
  part of the model that scores every image: the head's p_rain (in head + fallback too — the
  fallback relabels the uncertain images, it does not re-score them, and its greedy text has no
  score), or constrained decoding's p_rain. Greedy/sample text alone has none. Accuracy, F1 and
  the confusion matrix use the labels.
- **ECE** is the binary reliability ECE: 10 equal-width bins over p_rain (not over the predicted
  label's confidence).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from rainclf.labels import RAIN
from rainclf.report.metrics import classification_metrics, latency_summary, reliability_bins, roc_points
from rainclf.report.quality import SUMMARY_KEYS, assess_answer, summarise
from rainclf.report.resources import dir_size_mb

GUARANTEED = "guaranteed (cannot emit anything else)"
MEASURED = "free text, measured"
# Constrained decoding's score, stated in every report that has one. Not length-normalised: the sum
# is log p(answer | image, prompt), so the softmax over the two is the model's own two-way posterior;
# a per-token mean would change it (会下雨 and 不会下雨 differ in length) and its calibration with it.
CONSTRAINED_SCORE = ("p_rain = softmax of the two labels' summed log-probabilities (label tokens + "
                     "terminator), not length-normalised")
FREE_TEXT_DECODINGS = ("greedy", "sample")
ECE_VARIANT = "binary ECE: 10 equal-width bins over p_rain (not top-label confidence)"
SCORE_RULE = ("ROC-AUC, ECE and Brier use one score per readable image from the part of the model that "
              "scores every image: a head's p_rain (also for head + fallback: the fallback changes labels, "
              "not scores) or constrained decoding's p_rain; greedy/sample text has no score. Accuracy, F1 "
              "and the confusion matrix use the labels.")


def free_text(description: dict) -> bool:
    """A classifier (its ``describe()``) whose answers are written as text — a generative model, or
    a fallback, decoding greedy or sample — so their format is measured rather than guaranteed."""
    return description.get("decoding") in FREE_TEXT_DECODINGS


def label_rule(lenient: bool) -> str:
    return "exact and extractable answers (--lenient)" if lenient else "exact answers only"


def rule_lines(lenient: bool) -> list[str]:
    counted = ("exact answers and, with --lenient, the label read from inside other text" if lenient else
               "exact answers only: an answer with a label inside other text counts wrong (--lenient counts it)")
    return [f"Generated answers: accuracy counts {counted}.", SCORE_RULE, f"ECE: {ECE_VARIANT}."]


def counted_label(row, lenient: bool) -> str | None:
    """The label a row is scored with: its own, or (lenient, generated text) the extracted one."""
    raw = row.extra.get("raw")
    if not lenient or row.error is not None or raw is None:
        return row.label
    return assess_answer(raw).extracted


def score_of(row) -> float | None:
    """The score the probability metrics use (see the module docstring)."""
    return row.extra["head_p_rain"] if "head_p_rain" in row.extra else row.p_rain


def file_sha256(path) -> str | None:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def seen_images(model_dirs, digests) -> dict | None:
    """How many of the evaluated images (``digests``: sha256 per image, None if unreadable) the
    model directories trained or validated on; None when no directory records it (a rainclf that
    does not write the record, or a model fitted before it did)."""
    try:
        from rainclf.model import read_seen_sha256
    except ImportError:
        return None
    train, val, recorded = set(), set(), False
    for d in model_dirs:
        if d is None:
            continue
        rec = read_seen_sha256(d)
        if not rec:
            continue
        recorded = True
        train |= {str(h).lower() for h in rec.get("train") or ()}
        val |= {str(h).lower() for h in rec.get("validation") or ()}
    if not recorded:
        return None
    in_train = sum(h in train for h in digests if h)
    in_val = sum(h in val and h not in train for h in digests if h)
    return {"train": in_train, "validation": in_val, "n": len(digests)}


def held_out_text(seen: dict | None) -> str | None:
    """"yes", "NO: k training + j validation of n images", or None (not recorded)."""
    if seen is None:
        return None
    if not seen["train"] and not seen["validation"]:
        return "yes"
    return f"NO: {seen['train']} training + {seen['validation']} validation of {seen['n']} images"


def _word(k: int) -> str:
    return "none" if k == 0 else str(k)


def answers_sentence(m: dict, lenient: bool) -> str | None:
    """One sentence on a free-text model's answers, in counts."""
    n = m.get("n_answers")
    if not n or m.get("answer_format") != MEASURED:
        return None
    e, x, i = m["n_exact"], m["n_extractable"], m["n_invalid_answers"]
    counted = "counted, --lenient" if lenient else "counted wrong unless --lenient"
    return (f"of {n} answer{'s' if n != 1 else ''}, {_word(e)} {'was' if e <= 1 else 'were'} exactly a label, "
            f"{_word(x)} had a label inside other text ({counted}) and {_word(i)} had no label (counted wrong)")


def _fallback_note(rows, band, decoding) -> tuple[dict, str]:
    routed = [r for r in rows if "head_label" in r.extra]
    used = [r for r in routed if r.source == "fallback"]
    replaced, changed = len(used), sum(r.label != r.extra["head_label"] for r in used)
    kept = len(routed) - replaced
    lo, hi = band if band else (None, None)
    where = f"a head p_rain in [{lo:g}, {hi:g}]" if band else "a head p_rain in the band"
    figures = {"fallback_rate": len(routed) / len(rows) if rows else None, "n_fallback": len(routed),
               "fallback_replaced": replaced, "fallback_changed": changed, "fallback_invalid": kept}
    if not routed:
        return figures, f"no image had {where}: the generative model was not asked"
    text = (f"{len(routed)} of {len(rows)} images had {where} and were asked again to the generative model "
            f"({decoding}): its label replaced the head's for {_word(replaced)}"
            + (f" ({_word(changed)} of them a different label)" if replaced else ""))
    if kept:
        text += f"; for {kept} its answer was not exactly a label, so the head's label was kept"
    return figures, text


def model_metrics(spec, y_true: list[str], run, config, lenient: bool = False, band=None,
                  seen: dict | None = None) -> dict:
    """The flat, snake_case metric dict of one model (see rainclf.report.evaluate)."""
    rows, d = run.rows, run.description
    text = free_text(d)
    alone = text and "fallback" not in d         # lenient reading applies to a model's own text
    m: dict = {"model_dir": str(spec.model_dir), "head": spec.head, "decoding": spec.decoding,
               "fallback": str(spec.fallback) if spec.fallback else None,
               "feature": config.feature, "layer": config.layer if config.feature == "answer" else None,
               "backbone": config.backbone.get("name"),
               "random_weights": bool(config.backbone.get("random_weights")),
               "labels_counted": label_rule(lenient) if alone else "emitted labels"}
    m.update(classification_metrics(y_true, None, [counted_label(r, lenient and alone) for r in rows]))
    m["accuracy_exact"] = m["accuracy_lenient"] = None
    if alone:
        for key, rule in (("accuracy_exact", False), ("accuracy_lenient", True)):
            m[key] = classification_metrics(y_true, None, [counted_label(r, rule) for r in rows])["accuracy"]
    # probability metrics: one score per readable image (module docstring)
    scores = [score_of(r) for r in rows]
    scored = [i for i, s in enumerate(scores) if s is not None]
    m["n_scored"] = len(scored)
    own_scores = d.get("decoding") == "constrained" and "fallback" not in d
    m["score_source"] = (None if not scored else "constrained decoding's p_rain" if own_scores
                         else "the head's p_rain")
    m["constrained_score"] = CONSTRAINED_SCORE if d.get("decoding") == "constrained" and own_scores else None
    m["roc_auc"] = m["ece"] = m["brier"] = None
    curves: dict = {"roc": None, "reliability": None}
    if scored:
        yt = [y_true[i] for i in scored]
        p = np.array([scores[i] for i in scored], dtype=float)
        pm = classification_metrics(yt, p, None)
        m.update({k: pm[k] for k in ("roc_auc", "ece", "brier")})
        y01 = np.array([t == RAIN for t in yt], dtype=float)
        curves["reliability"] = reliability_bins(y01, p, 10)
        if pm["roc_auc"] is not None:
            curves["roc"] = roc_points(y01, p)
    # answer format: guaranteed for labels by construction; measured on generated text
    if text:
        answers = [r.extra.get("raw") for r in rows if r.error is None and (alone or "head_label" in r.extra)]
        quality = summarise(a for a in answers if a is not None)
        m["quality_of"] = "generated text" if alone else f"the fallback's generated text ({quality['n']} answers)"
    else:
        quality = {"n": None, **{k: None for k in SUMMARY_KEYS}}
        m["quality_of"] = "emitted label"
    m["answer_format"] = MEASURED if alone else GUARANTEED
    m.update({k: quality[k] for k in SUMMARY_KEYS})
    m["n_answers"] = quality["n"]
    m["n_errors"] = sum(r.error is not None and r.label is None for r in rows)
    notes = []
    if m["n_errors"]:
        k = m["n_errors"]
        notes.append(f"{k} image{'s' if k != 1 else ''} could not be read: no label, counted wrong")
    if spec.fallback is not None:
        figures, note = _fallback_note(rows, band, spec.decoding)
        m.update(figures)
        notes.append(note)
    if run.n_cached:
        notes.append(f"{run.n_cached} images came from the embedding cache: their latency is a cache read")
    m["seen_images"] = seen
    m["held_out"] = held_out_text(seen)
    if seen and (seen["train"] or seen["validation"]):
        notes.append(f"evaluated on images it was fitted on ({m['held_out'][4:]}): these figures are not "
                     "held-out figures")
    latency = latency_summary(run.seconds, warmup=0)
    m["n_timed"] = latency.pop("n")
    m.update(latency)
    m["timing_repeats"] = run.repeats
    m["warmup_sizes"] = list(run.warm_sizes)
    m["load_seconds"] = round(run.load_seconds, 4)
    m["n_cached"] = run.n_cached
    size = dir_size_mb(spec.model_dir)
    if spec.fallback is not None:
        size = (size or 0.0) + (dir_size_mb(spec.fallback) or 0.0)
    m["model_size_mb"] = size
    m["backbone_size_mb"] = run.backbone_size_mb
    m["peak_memory_mb"] = run.peak_mb
    m["peak_memory_method"] = run.peak_method
    m["notes"] = notes
    m["curves"] = curves
    return m
