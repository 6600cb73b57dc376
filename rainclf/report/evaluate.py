"""``rainclf evaluate``: every model on the same labelled images → metrics.json, predictions/, reports.

    DATA ──► [linear head | LoRA head | generative (per decoding) | head + generative fallback]
         ──► rows per image ──► metrics per model (one dict) ──► metrics.json, report.md, report.html

Per model (``metrics["models"][name]``, snake_case keys):

- classification (rainclf.report.metrics): ``accuracy``, ``balanced_accuracy``, ``precision``/``recall``/
  ``f1_per_label``, ``f1`` (会下雨), ``f1_macro``, ``confusion_matrix``, ``n_invalid`` (no label:
  unreadable or a non-label answer, counted wrong); ``roc_auc``, ``ece`` (10 bins), ``brier`` over
  the ``n_scored`` images that got a p_rain (greedy/sample text has none); ``curves`` for plots;
- output quality (rainclf.report.quality): ``format_valid_rate``, ``contains_label_rate``,
  ``mixed_language_rate``, ``think_leak_rate``, ``mean_length`` — of the raw text for generative
  models, of the emitted label for heads (100% valid by construction, which is the point);
- speed, warm-up excluded: ``latency_ms_p50``/``p95``/``mean``, ``images_per_s``. Timing ``single``
  (default) predicts each image alone: latency is what one request waits (file decode included),
  img/s is sequential throughput. ``batch`` predicts ``options.batch_size`` images per call and
  gives each image the call's time / its length (amortised: p95 then means little). ``warmup``
  calls on the first image load the model first (``load_seconds``); every file is read once
  before any model runs, so none of them pays for a cold disk. With ``single``, sampled
  answers are seeded by the image's place in its call (always 0), not in the whole run;
- size and memory: ``model_size_mb`` (model directory), ``backbone_size_mb`` (weight files),
  ``peak_memory_mb``: CUDA ``max_memory_allocated`` during the model's run; CPU peak RSS (VmHWM,
  reset per model) minus the RSS before loading, else the ``ru_maxrss`` increase.

Top level: ``random_weights`` (any random-weight backbone: the numbers then say nothing about
GLM-4V), ``data``, ``n_images``, ``label_counts``, ``timing``, ``environment``. The reports are
rendered from this same dict (rainclf.report.render); everything is written atomically.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from rainclf import __version__
from rainclf.backbones.base import resolve_device
from rainclf.config import DEFAULT_CACHE, RunOptions
from rainclf.data.datasets import load_dataset
from rainclf.data.images import describe_path
from rainclf.io import atomic_dir, log
from rainclf.labels import LABELS, RAIN
from rainclf.model import read_config
from rainclf.report.metrics import (
    classification_metrics,
    latency_summary,
    reliability_bins,
)
from rainclf.report.quality import assess_answer, summarise
from rainclf.report.resources import PeakMemory, dir_size_mb

METRICS_FILE = "metrics.json"
PREDICTIONS_DIR = "predictions"
TIMINGS = ("single", "batch")
QUALITY_KEYS = ("format_valid_rate", "contains_label_rate", "mixed_language_rate",
                "mean_latin_fraction", "think_leak_rate", "mean_length")


@dataclass
class ModelSpec:
    """One column of the report: a model directory run one way."""

    name: str                      # file-system safe, unique; predictions/<name>.csv
    model_dir: Path
    head: str                      # linear | lora | generative | <head>+fallback
    decoding: str | None = None    # generative models (and the fallback's decoding)
    fallback: Path | None = None   # generative directory asked about uncertain images


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("._") or "model"


def plan_models(model_dirs: Sequence, fallback=None, decodings: Sequence[str] | None = None,
                fallback_decoding: str = "constrained") -> list[ModelSpec]:
    """The report's columns: every model directory (one that answers by decoding once per
    decoding), then every other one combined with ``fallback``. Reads config.json only."""
    from rainclf.heads import head_classifier

    decodings = list(decodings or ["greedy"])
    specs: list[ModelSpec] = []
    bases: list[tuple[Path, str, str, bool]] = []
    for d in model_dirs:
        d = Path(d)
        head = read_config(d).head
        decodes = bool(head_classifier(head).decodings)
        base = _safe(d.name)
        if any(b == base for _, b, _, _ in bases):
            base = f"{base}_{len(bases) + 1}"
        bases.append((d, base, head, decodes))
        if decodes:
            specs += [ModelSpec(f"{base}-{dec}", d, head, dec) for dec in decodings]
        else:
            specs.append(ModelSpec(base, d, head))
    if fallback is not None:
        fb = Path(fallback)
        if not head_classifier(read_config(fb).head).decodings:
            raise ValueError(f"--fallback {fb}: not a generative model directory (fit one with --head generative)")
        for d, base, head, decodes in bases:
            if not decodes:
                specs.append(ModelSpec(f"{base}+{_safe(fb.name)}-{fallback_decoding}", d,
                                       f"{head}+fallback", fallback_decoding, fb))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):  # same directory given twice
        for i, s in enumerate(specs):
            s.name = f"{s.name}_{i + 1}"
    return specs


# --------------------------------------------------------------------------- running one model

@dataclass
class ModelRun:
    rows: list
    seconds: list          # per image, timed pass only
    load_seconds: float
    peak_mb: float | None
    peak_method: str
    backbone_size_mb: float | None
    n_cached: int
    description: dict          # the classifier's describe() after the timed pass


def run_model(spec: ModelSpec, paths: Sequence[Path], options: RunOptions, band=(0.35, 0.65),
              timing: str = "single", warmup: int = 1) -> ModelRun:
    """Load ``spec``, warm it up, then predict every path once under the timer."""
    from tqdm.auto import tqdm

    from rainclf.predict import open_classifier

    opts = replace(options, progress=False,
                   decoding=spec.decoding if spec.fallback is None and spec.decoding else options.decoding)
    device = resolve_device(options.device)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        clf = open_classifier(spec.model_dir, opts, spec.fallback, band, spec.decoding or "constrained")
        for _ in range(warmup):
            clf.predict_paths(list(paths[:1]))
        load_seconds = time.perf_counter() - t0
        size = 1 if timing == "single" else options.batch_size
        rows, seconds = [], []
        cached_before = clf.describe()["n_cached"]
        bar = tqdm(total=len(paths), desc=spec.name, unit="img", disable=not options.progress, leave=False)
        for lo in range(0, len(paths), size):
            chunk = list(paths[lo:lo + size])
            t = time.perf_counter()
            out = clf.predict_paths(chunk)
            _sync(device)
            dt = time.perf_counter() - t
            if len(out) != len(chunk):
                raise RuntimeError(f"{spec.name}: predict_paths returned {len(out)} rows for {len(chunk)} images")
            rows += out
            seconds += [dt / len(chunk)] * len(chunk)
            bar.update(len(chunk))
        bar.close()
    d = clf.describe()
    run = ModelRun(rows, seconds, load_seconds, mem.peak_mb, mem.method, d["backbone_weights_mb"],
                   d["n_cached"] - cached_before, d)
    del clf
    gc.collect()
    return run


def _preimport() -> None:
    """Import the model libraries before the first measurement, so the first model's peak memory
    and load time do not include importing transformers / peft (the later models' do not either)."""
    import importlib

    for name in ("transformers", "peft"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# --------------------------------------------------------------------------- metrics of one model

def roc_points(y01: np.ndarray, p: np.ndarray) -> dict:
    """ROC curve (fpr, tpr lists from (0,0) to (1,1)), one point per distinct threshold."""
    order = np.argsort(-p, kind="mergesort")
    ys, ps = y01[order], p[order]
    distinct = np.r_[np.where(np.diff(ps))[0], len(ps) - 1]  # last index of each tie group
    tps, fps = np.cumsum(ys)[distinct], np.cumsum(1 - ys)[distinct]
    n_pos, n_neg = max(ys.sum(), 1), max((1 - ys).sum(), 1)
    return {"fpr": [0.0] + (fps / n_neg).round(6).tolist(), "tpr": [0.0] + (tps / n_pos).round(6).tolist()}


def model_metrics(spec: ModelSpec, y_true: list[str], run: ModelRun, config) -> dict:
    """The flat, snake_case metric dict of one model (see module docstring)."""
    rows = run.rows
    y_pred = [r.label for r in rows]
    m: dict = {"model_dir": str(spec.model_dir), "head": spec.head, "decoding": spec.decoding,
               "fallback": str(spec.fallback) if spec.fallback else None,
               "feature": config.feature, "layer": config.layer if config.feature == "answer" else None,
               "backbone": config.backbone.get("name"),
               "random_weights": bool(config.backbone.get("random_weights"))}
    m.update(classification_metrics(y_true, None, y_pred))
    # probability metrics over the images that got a p_rain (all of them for heads)
    scored = [i for i, r in enumerate(rows) if r.p_rain is not None]
    m["n_scored"] = len(scored)
    m["roc_auc"] = m["ece"] = m["brier"] = None
    curves: dict = {"roc": None, "reliability": None}
    if scored:
        yt = [y_true[i] for i in scored]
        p = np.array([rows[i].p_rain for i in scored], dtype=float)
        pm = classification_metrics(yt, p, None)
        m.update({k: pm[k] for k in ("roc_auc", "ece", "brier")})
        y01 = np.array([t == RAIN for t in yt], dtype=float)
        curves["reliability"] = reliability_bins(y01, p, 10)
        if pm["roc_auc"] is not None:
            curves["roc"] = roc_points(y01, p)
    # output quality: a generative model's raw text; a head's (or head + fallback's) emitted label
    generated = run.description["quality_of"] == "generated text"
    answers = [r.extra.get("raw") if generated else r.label for r in rows]
    answered = [a for a in answers if a is not None]
    quality = summarise(answered)
    m.update({k: quality[k] for k in QUALITY_KEYS})
    m["n_answers"] = quality["n"]
    m["quality_of"] = "generated text" if generated else "emitted label"
    m["n_errors"] = sum(r.error is not None and r.label is None for r in rows)
    notes = []
    if m["n_errors"]:
        notes.append(f"{m['n_errors']} images could not be read (no label, counted wrong)")
    if generated:
        bad = sum(not assess_answer(a).format_valid for a in answered)
        notes.append(f"{bad} of {len(answered)} answers were not exactly a label (no label, counted wrong)")
    if spec.fallback is not None:
        routed = [r for r in rows if "head_label" in r.extra]
        kept = sum(r.source != "fallback" for r in routed)
        m["fallback_rate"] = len(routed) / len(rows) if rows else None
        m["fallback_invalid"] = kept
        notes.append(f"{len(routed)} of {len(rows)} images went to the generative model; {kept} of its "
                     "answers were not a label, so the head's label stood")
    if run.n_cached:
        notes.append(f"{run.n_cached} images came from the embedding cache: their latency is a cache read")
    latency = latency_summary(run.seconds, warmup=0)
    m["n_timed"] = latency.pop("n")
    m.update(latency)
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


# --------------------------------------------------------------------------- evaluate

def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
           "rainclf": __version__}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def evaluate(data, model_dirs: Sequence, out_dir, options: RunOptions | None = None, fallback=None,
             band: tuple[float, float] = (0.35, 0.65), decodings: Sequence[str] | None = None,
             fallback_decoding: str = "constrained", timing: str = "single", warmup: int = 1,
             overwrite: bool = False, plots: bool = True) -> dict:
    """Run every model on the labelled images of DATA; write OUT_DIR atomically:
    ``metrics.json``, ``predictions/<model>.csv``, ``report.md``, ``report.html``, ``plots/``.
    Returns the dict written to metrics.json."""
    import json

    from rainclf.outputs import write_rows
    from rainclf.report.plots import check_plotting
    from rainclf.report.render import write_reports

    options = options or RunOptions()
    if options.cache_dir == DEFAULT_CACHE:
        # latency read from cached embeddings would time a disk read, not the model: the cache is
        # used only when a folder is named explicitly
        options = replace(options, cache_dir=None)
    if not model_dirs:
        raise ValueError("evaluate needs at least one --model directory")
    if timing not in TIMINGS:
        raise ValueError(f"timing {timing!r}: use one of {', '.join(TIMINGS)}")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists: choose another -o or pass --overwrite")
    if plots:
        check_plotting()   # before the long part
    examples = load_dataset(data)
    specs = plan_models(model_dirs, fallback, decodings, fallback_decoding)
    paths = [e.path for e in examples]
    y_true = [e.label for e in examples]
    device = resolve_device(options.device)
    _preimport()
    for p in paths:   # read every file once: no model pays for the disk while the others hit the page cache
        try:
            Path(p).read_bytes()
        except OSError:
            pass       # reported as that image's error row by every model
    models: dict = {}
    all_rows: dict = {}
    for spec in specs:
        log(f"evaluate {spec.name} ({spec.head}{', ' + spec.decoding if spec.decoding else ''}) "
             f"on {len(paths)} images", options.progress)
        run = run_model(spec, paths, options, band, timing, warmup)
        for row, truth in zip(run.rows, y_true):
            row.extra["true_label"] = truth
            row.path = describe_path(row.path)   # a non-UTF-8 name would break the UTF-8 CSV
        m = model_metrics(spec, y_true, run, read_config(spec.model_dir))
        models[spec.name] = m
        all_rows[spec.name] = run.rows
        log(f"  {spec.name}: accuracy {m['accuracy']:.3f}, {m['images_per_s'] or 0:.2f} img/s, "
             f"p50 {m['latency_ms_p50'] or 0:.1f} ms", options.progress)
    random_names = sorted({m["backbone"] for m in models.values() if m["random_weights"]})
    metrics = {
        "rainclf_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": str(data),
        "n_images": len(examples),
        "label_counts": {lab: sum(t == lab for t in y_true) for lab in LABELS},
        "random_weights": bool(random_names),
        "random_weights_backbones": random_names,
        "band": list(band) if fallback is not None else None,
        "timing": {"mode": timing, "warmup_calls": warmup,
                   "batch_size": 1 if timing == "single" else options.batch_size,
                   "embedding_cache": options.cache_dir is not None,
                   "note": ("each image predicted alone (batch of 1); latency = one call, file decode included"
                            if timing == "single" else
                            f"batches of {options.batch_size}; per-image time = batch time / batch length")},
        "environment": environment(device),
        "models": models,
    }
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
        for name, rows in all_rows.items():
            write_rows(rows, tmp / PREDICTIONS_DIR / f"{name}.csv")
        write_reports(metrics, tmp, plots=plots)
    log(f"wrote {out_dir}/ ({METRICS_FILE}, report.md, report.html, {PREDICTIONS_DIR}/)", options.progress)
    return metrics
