"""Uncertainty fallback: a classification head answers first; images whose p_rain lies inside a
band (the head is unsure) are asked again to a generative model directory.

    rows = head.predict_paths(paths)
    unsure = [r for r in rows if lo <= r.p_rain <= hi]   # a zero-width band (lo == hi) is empty
    gen.predict_paths(unsure)  → label stands only if the answer is exactly a label

``source`` says who decided: ``head`` or ``fallback``. A fallback answer that is not a valid label
(free text, an unreadable file, no answer) never reaches the output: the head's label stands and
the case is counted in ``notes``. When the head embeds with the same backbone as the generative
model, it reuses the generative model's weights with the adapters off (one model in memory, not
two). Routed rows keep the head's verdict in ``head_label`` /
``head_p_rain`` and the generative answer in ``raw`` / ``format_valid``, so a report can compare.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from rainclf.heads.base import ClassifierBase
from rainclf.labels import LABELS


def parse_band(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--band {text!r}: expected LO,HI such as 0.35,0.65") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"--band {text!r}: need 0 <= LO <= HI <= 1")
    return lo, hi


class FallbackClassifier(ClassifierBase):
    """``head_clf`` and ``gen_clf`` are loaded classifiers (``heads.base.Classifier``); ``band``
    is (lo, hi) on the head's p_rain, inclusive; lo == hi sends nothing, (0, 1) sends everything."""

    def __init__(self, head_clf, gen_clf, band: tuple[float, float] = (0.35, 0.65)):
        lo, hi = (float(x) for x in band)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"fallback band ({lo}, {hi}): need 0 <= lo <= hi <= 1")
        self.head, self.gen, self.band = head_clf, gen_clf, (lo, hi)
        self.config = head_clf.config
        self.notes: list[str] = []
        lent = gen_clf.frozen_backbone()
        self.shared_base = lent is not None and head_clf.adopt_backbone(lent)
        self.backbone = head_clf.backbone

    def in_band(self, p_rain: float | None) -> bool:
        lo, hi = self.band
        return p_rain is not None and lo < hi and lo <= p_rain <= hi

    def predict_paths(self, paths: Sequence[str | Path]) -> list:
        rows = self.head.predict_paths(paths)
        unsure = [i for i, r in enumerate(rows) if r.error is None and self.in_band(r.p_rain)]
        answers = self.gen.predict_paths([rows[i].path for i in unsure]) if unsure else []
        if len(answers) != len(unsure):
            raise RuntimeError(f"fallback model returned {len(answers)} rows for {len(unsure)} images")
        invalid = 0
        for i, ans in zip(unsure, answers):
            head = rows[i]
            extra = dict(head.extra, head_label=head.label, head_p_rain=head.p_rain,
                         raw=ans.extra.get("raw"), format_valid=bool(ans.extra.get("format_valid", False)))
            if ans.error is None and ans.label in LABELS:
                rows[i] = replace(head, label=ans.label, p_rain=ans.p_rain, source="fallback", extra=extra)
            else:
                # not a label (or the fallback failed on this file): the head's answer stands
                invalid += 1
                extra["format_valid"] = False
                rows[i] = replace(head, extra=extra)
        lo, hi = self.band
        gen_notes = list(self.gen.notes) if unsure else []
        self.notes = list(self.head.notes) + gen_notes + [
            f"fallback: {len(unsure)} of {len(rows)} images asked (head p_rain in [{lo:g}, {hi:g}]), "
            f"{len(unsure) - invalid} answered with a label, {invalid} invalid answers kept the head's label"]
        return rows

    def predict_proba(self, images):
        """The head's p_rain for every image: one model's scores, so ranking and calibration
        metrics of "head + fallback" are the head's (the fallback changes labels only)."""
        return self.head.predict_proba(images)

    def describe(self) -> dict:
        d = self.head.describe()
        d.update(head=f"{self.config.head}+fallback", decoding=self.gen.decoding,
                 fallback=self.gen.describe(), n_cached=self.head.n_cached)
        return d
