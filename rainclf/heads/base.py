"""A loaded model directory: backbone + head composed, predicting image files.

``load_classifier(dir)`` reads ``config.json``, rebuilds the backbone it names (or the one given),
checks that the backbone is the one the head was trained on, and returns an object whose
``predict_paths`` yields one row per file: ``path, label, p_rain, source, error`` — ``label`` is
always exactly one of the two labels, or empty with an ``error``. Head types register a loader in
``HEAD_LOADERS``; prediction code never branches on the head type.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ROW_FIELDS = ("path", "label", "p_rain", "source", "error")


@dataclass
class Row:
    path: str
    label: str | None = None
    p_rain: float | None = None
    source: str = "head"
    error: str | None = None
    extra: dict = field(default_factory=dict)   # e.g. raw, format_valid for generative models

    def as_dict(self) -> dict:
        d = {"path": self.path, "label": self.label, "p_rain": self.p_rain,
             "source": self.source, "error": self.error}
        d.update(self.extra)
        return d
