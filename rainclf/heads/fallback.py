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

from rainclf.labels import LABELS


class AdapterOffBackbone:
    """A generative model's backbone seen with its LoRA adapters switched off: the same frozen
    weights the head was trained on, so one copy of a 9B model serves both head and fallback."""

    def __init__(self, backbone, peft_model):
        self._backbone, self._peft_model = backbone, peft_model

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def embed(self, *args, **kwargs):
        with self._peft_model.disable_adapter():
            return self._backbone.embed(*args, **kwargs)


def share_base_model(head_clf, gen_clf) -> bool:
    """Point an embedding head at the generative model's base weights when they are the same
    backbone (fingerprint and image size) and the head has not loaded its own copy yet."""
    head_bb, gen_bb = getattr(head_clf, "backbone", None), getattr(gen_clf, "backbone", None)
    peft_model = getattr(getattr(gen_clf, "model", None), "peft_model", None)
    if head_bb is None or gen_bb is None or peft_model is None or not hasattr(head_clf, "embed"):
        return False
    if (getattr(head_bb, "_model", None) is not None or head_bb.fingerprint != gen_bb.fingerprint
            or head_bb.image_size != gen_bb.image_size):
        return False
    head_clf.backbone = AdapterOffBackbone(gen_bb, peft_model)
    return True


class FallbackClassifier:
    """``head_clf`` and ``gen_clf`` are loaded classifiers (``predict_paths`` → rows); ``band`` is
    (lo, hi) on the head's p_rain, inclusive; lo == hi sends nothing, (0, 1) sends everything."""

    def __init__(self, head_clf, gen_clf, band: tuple[float, float] = (0.35, 0.65)):
        lo, hi = (float(x) for x in band)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"fallback band ({lo}, {hi}): need 0 <= lo <= hi <= 1")
        self.head, self.gen, self.band = head_clf, gen_clf, (lo, hi)
        self.config = head_clf.config
        self.notes: list[str] = []
        self.shared_base = share_base_model(head_clf, gen_clf)

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
        gen_notes = list(getattr(self.gen, "notes", [])) if unsure else []
        self.notes = list(getattr(self.head, "notes", [])) + gen_notes + [
            f"fallback: {len(unsure)} of {len(rows)} images asked (head p_rain in [{lo:g}, {hi:g}]), "
            f"{len(unsure) - invalid} answered with a label, {invalid} invalid answers kept the head's label"]
        return rows
