"""``rainclf evaluate``: every model on the same labelled images → metrics.json, predictions/, reports.

    DATA ──► [linear head | LoRA head | generative (per decoding) | head + generative fallback]
         ──► load + warm every model, time them interleaved (rainclf.report.timing)
         ──► rows per image ──► metrics per model (rainclf.report.scoring) ──► metrics.json, report.md/html

Per model (``metrics["models"][name]``, snake_case keys):

- classification (rainclf.report.metrics): ``accuracy``, ``balanced_accuracy``, ``precision``/``recall``/
  ``f1_per_label``, ``f1`` (会下雨), ``f1_macro``, ``confusion_matrix``, ``n_invalid`` (no counted
  label: unreadable, or a generated answer that is not exactly a label — extractable ones count
  with ``lenient``), ``labels_counted``, and for generated text both ``accuracy_exact`` and
  ``accuracy_lenient``; ``roc_auc``, ``ece``, ``brier`` over the ``n_scored`` images with a score
  (``score_source``; the rule is rainclf.report.scoring's); ``curves`` for plots;
- answers (rainclf.report.quality): ``answer_format`` (``guaranteed (cannot emit anything else)``
  for heads, constrained decoding and head + fallback, else measured), ``quality_of``, and for
  generated text ``n_exact``/``n_extractable``/``n_invalid_answers`` with their rates
  (``format_valid_rate`` = exact), wrapper rates, ``mixed_language_rate``, ``mean_length``;
  with a fallback ``fallback_rate``, ``n_fallback``, ``fallback_replaced``, ``fallback_invalid``;
- seen images: ``seen_images`` ({train, validation, n} of the evaluated images the model directory
  records as fitted on; None when it records none) and ``held_out``; a warning is printed;
- speed: ``latency_ms_p50``/``p95``/``mean``, ``images_per_s`` over ``n_timed`` = images ×
  ``timing_repeats``. Every model is loaded and warmed at every call size first (its fallback
  too, ``warmup_sizes``), then all are timed call by call in rotating order (``interleave``;
  else one model at a time). Timing ``single`` (default) predicts each image alone: latency is
  what one request waits (file decode included), img/s is sequential throughput. ``batch``
  predicts ``options.batch_size`` images per call and gives each image the call's time / its
  length (amortised: p95 then means little). Every file is read once before any model runs;
- size and memory: ``model_size_mb`` (model directory), ``backbone_size_mb`` (weight files),
  ``peak_memory_mb`` during load + warm-up: the CUDA ``max_memory_allocated`` increase; on the CPU
  peak RSS (VmHWM, reset per model) minus the RSS before loading, else the ``ru_maxrss`` increase.

Top level: ``random_weights`` (any random-weight backbone: the numbers then say nothing about
GLM-4V), ``data``, ``n_images``, ``label_counts``, ``lenient``, ``rules``, ``timing``,
``environment``. The reports are rendered from this same dict (rainclf.report.render);
everything is written atomically.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from rainclf import __version__
from rainclf.backbones.base import resolve_device
from rainclf.config import DEFAULT_CACHE, RunOptions
from rainclf.data.datasets import load_dataset
from rainclf.data.images import describe_path
from rainclf.io import atomic_dir, check_target, log
from rainclf.heads import head_classifier
from rainclf.labels import LABELS
from rainclf.model import read_config
from rainclf.report.scoring import file_sha256, model_metrics, rule_lines, seen_images
from rainclf.report.timing import run_models

METRICS_FILE = "metrics.json"
PREDICTIONS_DIR = "predictions"
TIMINGS = ("single", "batch")


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
    """The report's columns: every model directory (a head that can be asked several ways, i.e.
    the generative one, once per decoding), then every model that has no decodings combined with
    ``fallback``. Reads config.json only (fails fast); the head's class says what it can do."""
    decodings = list(decodings or ["greedy"])
    specs: list[ModelSpec] = []
    bases: list[tuple[Path, str, str, tuple]] = []
    for d in model_dirs:
        d = Path(d)
        head = read_config(d).head
        ways = head_classifier(head).decodings
        base = _safe(d.name)
        if any(b == base for _, b, _, _ in bases):
            base = f"{base}_{len(bases) + 1}"
        bases.append((d, base, head, ways))
        if ways:
            specs += [ModelSpec(f"{base}-{dec}", d, head, dec) for dec in decodings]
        else:
            specs.append(ModelSpec(base, d, head))
    if fallback is not None:
        fb = Path(fallback)
        if not head_classifier(read_config(fb).head).decodings:
            raise ValueError(f"--fallback {fb}: not a generative model directory (fit one with --head generative)")
        for d, base, head, ways in bases:
            if not ways:
                specs.append(ModelSpec(f"{base}+{_safe(fb.name)}-{fallback_decoding}", d,
                                       f"{head}+fallback", fallback_decoding, fb))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):  # same directory given twice
        for i, s in enumerate(specs):
            s.name = f"{s.name}_{i + 1}"
    return specs


# --------------------------------------------------------------------------- evaluate

def _preimport() -> None:
    """Import the model libraries before the first measurement, so the first model's peak memory
    and load time do not include importing transformers / peft (the later models' do not either)."""
    import importlib

    for name in ("transformers", "peft"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
           "rainclf": __version__}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _opener(spec: ModelSpec, options: RunOptions, band):
    from rainclf.predict import open_classifier

    opts = replace(options, progress=False,
                   decoding=spec.decoding if spec.fallback is None and spec.decoding else options.decoding)
    return lambda: open_classifier(spec.model_dir, opts, spec.fallback, band, spec.decoding or "constrained")


def evaluate(data, model_dirs: Sequence, out_dir, options: RunOptions | None = None, fallback=None,
             band: tuple[float, float] = (0.35, 0.65), decodings: Sequence[str] | None = None,
             fallback_decoding: str = "constrained", timing: str = "single", warmup: int = 1,
             overwrite: bool = False, plots: bool = True, lenient: bool = False, repeats: int = 1,
             interleave: bool = True) -> dict:
    """Run every model on the labelled images of DATA; write OUT_DIR atomically:
    ``metrics.json``, ``predictions/<model>.csv``, ``report.md``, ``report.html``, ``plots/``.
    ``lenient``: generated answers with a label inside other text count with that label.
    ``repeats``: timed passes over the images per model. ``interleave=False``: load, warm and time
    one model at a time (when they do not fit in memory together). Returns the metrics dict."""
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
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists: choose another -o or pass --overwrite")
    check_target(out_dir, is_dir=True)   # before the long part, not after it
    if plots:
        check_plotting()   # before the long part
    examples = load_dataset(data)
    specs = plan_models(model_dirs, fallback, decodings, fallback_decoding)
    paths = [e.path for e in examples]
    y_true = [e.label for e in examples]
    device = resolve_device(options.device)
    _preimport()
    # read every file once: no model pays for the disk while the others hit the page cache; the
    # digests tell which images a model directory says it was fitted on
    digests = [file_sha256(p) for p in paths]
    size = 1 if timing == "single" else options.batch_size
    log(f"evaluate: {len(specs)} models on {len(paths)} images: loading and warming each, then timing them "
        + ("interleaved" if interleave else "one at a time"), options.progress)
    runs = run_models({s.name: _opener(s, options, band) for s in specs}, paths, device, size, warmup,
                      repeats, interleave, options.progress)
    models: dict = {}
    for spec in specs:
        run = runs[spec.name]
        for row, truth in zip(run.rows, y_true):
            row.extra["true_label"] = truth
            row.path = describe_path(row.path)   # a non-UTF-8 name would break the UTF-8 CSV
        seen = seen_images([spec.model_dir, spec.fallback], digests)
        m = model_metrics(spec, y_true, run, read_config(spec.model_dir), lenient,
                          band if spec.fallback is not None else None, seen)
        models[spec.name] = m
        if seen and (seen["train"] or seen["validation"]):
            log(f"warning: {spec.name} is evaluated on images it was fitted on ({m['held_out'][4:]}): "
                "its figures are not held-out figures", True)
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
        "lenient": lenient,
        "rules": rule_lines(lenient),
        "timing": {"mode": timing, "warmup_calls": warmup, "repeats": repeats,
                   "order": "interleaved" if interleave else "one model at a time",
                   "batch_size": size,
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
        for name, run in runs.items():
            write_rows(run.rows, tmp / PREDICTIONS_DIR / f"{name}.csv")
        write_reports(metrics, tmp, plots=plots)
    log(f"wrote {out_dir}/ ({METRICS_FILE}, report.md, report.html, {PREDICTIONS_DIR}/)", options.progress)
    return metrics
