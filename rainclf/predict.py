"""``rainclf predict``: a folder (or file) of images + a model directory → one row per file.

Unreadable files become rows with an ``error`` and no label; the job goes on. The output
(CSV or JSONL, chosen by the extension of ``-o``) is written atomically.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rainclf.config import RunOptions
from rainclf.data.images import describe_path, find_images
from rainclf.heads.base import Row
from rainclf.io import check_target
from rainclf.model import load_classifier, read_metrics
from rainclf.outputs import format_rows, output_format, write_rows  # noqa: F401 (format_rows: API)
from rainclf.parallel.ddp import dist_context
from rainclf.report.collapse import collapse_message


@dataclass
class PredictSummary:
    images: int
    predicted: int
    errors: int
    seconds: float
    random_weights: bool
    counts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items())
        images = f"{self.images} image" + ("" if self.images == 1 else "s")
        text = (f"{images}: {self.predicted} predicted" + (f" ({counts})" if counts else "")
                + f", {self.errors} error{'' if self.errors == 1 else 's'}, "
                f"{self.seconds:.2f} s, {self.images_per_s:.1f} img/s")
        if self.random_weights:
            text += " — RANDOM-weight backbone: labels are meaningless"
        return text


@dataclass
class PredictRun:
    rows: list[Row]
    summary: PredictSummary


def open_classifier(model_dir, options: RunOptions, fallback=None, band=(0.35, 0.65),
                    fallback_decoding: str = "constrained"):
    """The classifier for a model directory: torch or ONNX engine, optionally with a generative
    fallback for images whose p_rain lies inside ``band``."""
    if options.engine == "onnx":
        from rainclf.onnx.engine import load_onnx_classifier

        clf = load_onnx_classifier(model_dir, options)
    elif options.engine == "torch":
        clf = load_classifier(model_dir, options)
    else:
        raise ValueError(f"unknown --engine {options.engine!r}: use torch or onnx")
    if fallback is not None:
        from dataclasses import replace

        from rainclf.heads.fallback import FallbackClassifier

        gen = load_classifier(fallback, replace(options, engine="torch", decoding=fallback_decoding))
        clf = FallbackClassifier(clf, gen, band)
    return clf


def predict(inputs: str | Path | Sequence[str | Path], model_dir: str | Path,
            options: RunOptions | None = None, output: str | Path | None = None,
            classifier=None, fallback: str | Path | None = None,
            band: tuple[float, float] = (0.35, 0.65), fallback_decoding: str = "constrained") -> PredictRun | None:
    """Predict every image under ``inputs``; write ``output`` (.csv or .jsonl) if given.
    ``fallback``: a generative model directory asked about images with p_rain inside ``band``.

    Under torchrun / accelerate launch (RANK / WORLD_SIZE set) each process predicts one shard
    and rank 0 merges them into ``output``; the other ranks return None."""
    if dist_context().is_distributed:
        from rainclf.parallel.shards import predict_sharded

        return predict_sharded(inputs, model_dir, options, output, classifier, fallback, band,
                               fallback_decoding, run_local=predict_local)
    return predict_local(inputs, model_dir, options, output, classifier, fallback, band, fallback_decoding)


def predict_local(inputs, model_dir, options: RunOptions | None = None, output=None, classifier=None,
                  fallback=None, band: tuple[float, float] = (0.35, 0.65),
                  fallback_decoding: str = "constrained") -> PredictRun:
    """``predict`` in this process only (what each shard of a multi-process run does)."""
    options = options or RunOptions()
    if output is not None:
        output_format(output)  # refuse a bad -o before any work
        check_target(output)   # a special file, a read-only folder, a name too long: before any work
    start = time.perf_counter()
    if isinstance(inputs, (str, Path)):
        paths, problems = find_images(inputs)
    else:
        paths, problems = [Path(p) for p in inputs], []
    clf = classifier or open_classifier(model_dir, options, fallback, band, fallback_decoding)
    rows = clf.predict_paths(paths)
    # the error names the file, like the ImageError lines of unreadable images do
    rows += [Row(path=str(p), error=f"{describe_path(p)}: {msg}") for p, msg in problems]
    for r in rows:
        settle_row(r)
    seconds = time.perf_counter() - start
    counts: dict[str, int] = {}
    for r in rows:
        if r.label:
            counts[r.label] = counts.get(r.label, 0) + 1
    summary = PredictSummary(images=len(rows), predicted=sum(counts.values()),
                             errors=sum(r.error is not None and r.label is None for r in rows),
                             seconds=seconds, counts=counts,
                             random_weights=bool(clf.config.backbone.get("random_weights")),
                             notes=list(clf.notes) + collapse_notes(model_dir))
    if output is not None:
        write_rows(rows, output)
    return PredictRun(rows, summary)


def settle_row(r: Row) -> Row:
    """A score that is not a finite number is an error, never a label; an error row says
    ``source=error``."""
    if r.p_rain is not None and not math.isfinite(r.p_rain):
        r.error = f"{r.path}: the model gave a non-finite score ({r.p_rain}) for this image — no label"
        r.label, r.p_rain = None, None
    if r.error is not None and r.label is None:
        r.source = "error"
    return r


def collapse_notes(model_dir) -> list[str]:
    """The fit-time collapse warning of a model directory (report/collapse.py), once per run."""
    if model_dir is None or not (Path(model_dir) / "metrics.json").is_file():
        return []
    message = collapse_message(read_metrics(model_dir))
    return [f"warning: {model_dir}: {message}"] if message else []
