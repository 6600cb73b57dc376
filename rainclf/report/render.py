"""Evaluation reports: ``report.md`` and one self-contained ``report.html``, both rendered from the
metrics dict that rainclf.report.evaluate writes to metrics.json (never from anything else, so the
numbers in the three files agree).

    metrics dict ──► section_tables() ──► markdown tables / HTML tables   (same strings)
                 ──► make_plots()      ──► plots/*.png (linked from report.md)
                                           base64 <img> in report.html (no external file)

Plots (matplotlib, Agg backend, imported only here): confusion matrices, reliability diagrams,
ROC curves, latency bars, output-quality bars. Plot text is ASCII ("rain" = 会下雨,
"no rain" = 不会下雨) because many servers have no CJK font.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from rainclf.labels import NO_RAIN, RAIN

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
PLOTS_DIR = "plots"
MISSING = "—"

# (key path into a model's dict, row header, format spec: a number format, "d", or "s" for text);
# sections of the side-by-side tables.
SECTIONS: list[tuple[str, list[tuple[tuple, str, str]]]] = [
    ("Accuracy and calibration", [
        (("held_out",), "held-out images (not fitted on)", "s"),
        (("labels_counted",), "labels counted", "s"),
        (("accuracy",), "accuracy", ".4f"),
        (("accuracy_exact",), "accuracy, exact answers only", ".4f"),
        (("accuracy_lenient",), "accuracy, extractable answers counted too", ".4f"),
        (("balanced_accuracy",), "balanced accuracy", ".4f"),
        (("f1",), f"F1 ({RAIN})", ".4f"),
        (("f1_macro",), "F1 macro", ".4f"),
        (("score_source",), "score used for ROC-AUC, ECE, Brier", "s"),
        (("roc_auc",), "ROC-AUC", ".4f"),
        (("ece",), "ECE (10 bins over p_rain)", ".4f"),
        (("brier",), "Brier score", ".4f"),
        (("n_invalid",), "images without a counted label (counted wrong)", "d"),
        (("n_scored",), "images with a score", "d"),
    ]),
    ("Per label", [
        (("precision", RAIN), f"precision {RAIN}", ".4f"),
        (("recall", RAIN), f"recall {RAIN}", ".4f"),
        (("f1_per_label", RAIN), f"F1 {RAIN}", ".4f"),
        (("precision", NO_RAIN), f"precision {NO_RAIN}", ".4f"),
        (("recall", NO_RAIN), f"recall {NO_RAIN}", ".4f"),
        (("f1_per_label", NO_RAIN), f"F1 {NO_RAIN}", ".4f"),
    ]),
    ("Output quality", [
        (("answer_format",), "answer format", "s"),
        (("quality_of",), "measured on", "s"),
        (("n_answers",), "answers", "d"),
        (("format_valid_rate",), "exactly a label (format-valid)", ".4f"),
        (("extractable_rate",), "label inside other text (extractable)", ".4f"),
        (("invalid_rate",), "no label (invalid)", ".4f"),
        (("mixed_language_rate",), "mixed-language rate", ".4f"),
        (("think_wrapper_rate",), "<think> block used", ".4f"),
        (("answer_wrapper_rate",), "<answer> tags used", ".4f"),
        (("box_wrapper_rate",), "<|begin_of_box|> used", ".4f"),
        (("mean_length",), "mean answer length (chars)", ".2f"),
        (("fallback_rate",), "sent to fallback", ".4f"),
        (("fallback_replaced",), "fallback label used", "d"),
    ]),
    ("Speed, size, memory", [
        (("images_per_s",), "images/s", ".3f"),
        (("latency_ms_p50",), "latency p50 (ms)", ".2f"),
        (("latency_ms_p95",), "latency p95 (ms)", ".2f"),
        (("n_timed",), "timed images (all passes)", "d"),
        (("timing_repeats",), "timed passes", "d"),
        (("load_seconds",), "load + warm-up (s)", ".2f"),
        (("model_size_mb",), "model directory (MiB)", ".3f"),
        (("backbone_size_mb",), "backbone weights (MiB)", ".3f"),
        (("peak_memory_mb",), "peak memory, load + warm-up (MiB)", ".1f"),
    ]),
]


def lookup(model: dict, path: tuple):
    value = model
    for k in path:
        value = value.get(k) if isinstance(value, dict) else None
    return value


def fmt(value, spec: str) -> str:
    if value is None:
        return MISSING
    if spec == "d":
        return str(int(value))
    if spec == "s":
        return str(value)
    return format(float(value), spec)


def section_tables(metrics: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) per section: one row per metric, one column per model. Rows whose
    value is missing for every model are left out."""
    names = list(metrics["models"])
    out = []
    for title, rows in SECTIONS:
        body = []
        for path, header, spec in rows:
            values = [lookup(metrics["models"][n], path) for n in names]
            if all(v is None for v in values):
                continue
            body.append([header] + [fmt(v, spec) for v in values])
        if body:
            out.append((title, ["metric"] + names, body))
    return out


def describe_models(metrics: dict) -> tuple[list[str], list[list[str]]]:
    names = list(metrics["models"])
    fields = [("head", "head"), ("feature", "feature"), ("layer", "layer"), ("decoding", "decoding"),
              ("fallback", "fallback"), ("constrained_score", "constrained score"), ("backbone", "backbone"), ("random_weights", "random weights"),
              ("model_dir", "directory")]
    rows = []
    for key, header in fields:
        values = [metrics["models"][n].get(key) for n in names]
        if all(v is None for v in values):
            continue
        rows.append([header] + [MISSING if v is None else ("yes" if v is True else "no" if v is False else str(v))
                                for v in values])
    return ["", *names], rows


def random_banner(metrics: dict) -> str | None:
    if not metrics.get("random_weights"):
        return None
    names = ", ".join(metrics.get("random_weights_backbones") or [])
    return (f"RANDOM-weight backbone ({names}): these numbers measure colour statistics of the photos, "
            "not GLM-4V quality. Do not choose a model from them.")


def seen_banner(metrics: dict) -> str | None:
    """The models evaluated on images their directory says they were fitted on, or None."""
    seen = [f"{n} ({m['held_out'][4:]})" for n, m in metrics["models"].items()
            if (m.get("seen_images") or {}).get("train") or (m.get("seen_images") or {}).get("validation")]
    if not seen:
        return None
    return ("Evaluated on images the model was fitted on: " + "; ".join(seen)
            + ". Those columns are not held-out figures.")


def summary_lines(metrics: dict) -> list[str]:
    """A few plain sentences: best model, fastest model, what each fallback and generated-text
    model did."""
    from rainclf.report.scoring import answers_sentence

    models = metrics["models"]
    lines = []
    scored = [(m["balanced_accuracy"], n) for n, m in models.items() if m.get("balanced_accuracy") is not None]
    if scored:
        v, n = max(scored, key=lambda t: t[0])   # the first of equals, in the report's order
        lines.append(f"Highest balanced accuracy: {n} ({fmt(v, '.4f')}).")
    timed = [(m["latency_ms_p50"], n) for n, m in models.items() if m.get("latency_ms_p50") is not None]
    if len(timed) > 1:
        (fast, fn), (slow, sn) = min(timed, key=lambda t: t[0]), max(timed, key=lambda t: t[0])
        ratio = f", {slow / fast:.1f}× lower" if fast > 0 else ""
        lines.append(f"Fastest per image: {fn} (p50 {fmt(fast, '.2f')} ms{ratio} than {sn} "
                     f"at {fmt(slow, '.2f')} ms).")
    for n, m in models.items():
        if m.get("n_fallback") is not None:
            alone = next((k for k, h in models.items() if h.get("model_dir") == m.get("model_dir")
                          and not h.get("fallback") and h.get("accuracy") is not None), None)
            versus = f" (the head alone: {fmt(models[alone]['accuracy'], '.4f')})" if alone else ""
            k, total = m["n_fallback"], m.get("n")
            lines.append(f"{n}: {'no' if k == 0 else k} of {total} images went to the generative model, "
                         f"whose label was used for {m.get('fallback_replaced') or 0} "
                         f"({m.get('fallback_changed') or 0} different from the head's); accuracy "
                         f"{fmt(m.get('accuracy'), '.4f')}{versus}.")
        sentence = answers_sentence(m, bool(metrics.get("lenient")))
        if sentence:
            lines.append(f"{n}: {sentence}.")
    return lines


def _context_lines(metrics: dict) -> list[str]:
    counts = ", ".join(f"{k} {v}" for k, v in metrics.get("label_counts", {}).items())
    t, env = metrics.get("timing", {}), metrics.get("environment", {})
    lines = [f"Data: `{metrics.get('data')}`, {metrics.get('n_images')} images ({counts}).",
             f"Timing: {t.get('note')}; {t.get('order', 'one model at a time')}, {t.get('repeats', 1)} timed "
             f"pass(es) per model after {t.get('warmup_calls')} untimed warm-up call(s) at every call size "
             "(fallbacks included)"
             + ("; embedding cache ON (cached images skip the backbone)" if t.get("embedding_cache") else "")
             + ".",
             f"Machine: {env.get('gpu') or env.get('device')}, {env.get('cpu_count')} CPUs, torch "
             f"{env.get('torch')} ({env.get('torch_threads')} threads); rainclf {metrics.get('rainclf_version')}, "
             f"{metrics.get('created')}."]
    lines += list(metrics.get("rules") or [])
    if metrics.get("models") and all(m.get("held_out") is None for m in metrics["models"].values()):
        lines.append("Held-out: no model directory records the images it was fitted on, so this report cannot "
                     "tell whether these images are new to the models.")
    if metrics.get("band"):
        lo, hi = metrics["band"]
        lines.append(f"Fallback band: head p_rain in [{lo}, {hi}] goes to the generative model.")
    return lines


PLOT_CAPTIONS = {
    "confusion": "Confusion matrices (rows: true label, columns: predicted; images without a label not shown)",
    "reliability": "Reliability diagrams (10 equal-width bins over p_rain, the score the ROC-AUC, ECE and Brier "
                   "use; the diagonal is perfect calibration)",
    "roc": "ROC curves",
    "latency": "Latency per image, p50 and p95 (ms)",
    "quality": "Generated answers: share exactly a label, with a label inside other text, without a label, "
               "mixing languages (models whose format is guaranteed are not shown)",
}


# --------------------------------------------------------------------------- markdown

def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    return (["| " + " | ".join(esc[0]) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            + ["| " + " | ".join(r) + " |" for r in esc[1:]])


def markdown_report(metrics: dict, plot_files: dict[str, str] | None = None) -> str:
    lines = ["# rainclf evaluation", ""]
    for banner in (random_banner(metrics), seen_banner(metrics)):
        if banner:
            lines += [f"**{banner}**", ""]
    lines += [f"- {s}" for s in _context_lines(metrics)] + [""]
    summary = summary_lines(metrics)
    if summary:
        lines += ["## Summary", ""] + [f"- {s}" for s in summary] + [""]
    lines += ["## Models", ""] + _md_table(*describe_models(metrics)) + [""]
    for title, header, rows in section_tables(metrics):
        lines += [f"## {title}", ""] + _md_table(header, rows) + [""]
    notes = [(n, note) for n, m in metrics["models"].items() for note in m.get("notes") or []]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}: {note}" for n, note in notes] + [""]
    if plot_files:
        lines += ["## Plots", ""]
        for key, rel in plot_files.items():
            lines += [f"![{PLOT_CAPTIONS.get(key, key)}]({rel})", "", f"*{PLOT_CAPTIONS.get(key, key)}*", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- html

_CSS = """body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;
max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em}td{text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
.warn{background:#fff3cd;border:2px solid #d39e00;padding:.8em 1em;font-size:1.1em}
figure{margin:1.5em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:0 .2em}"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline_md(text: str) -> str:
    # the context lines use `code`; escape first, then mark up
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def html_report(metrics: dict, plots: dict[str, bytes] | None = None) -> str:
    out = ["<!DOCTYPE html>", '<html lang="zh"><head><meta charset="utf-8">',
           "<title>rainclf evaluation</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>rainclf evaluation</h1>"]
    for banner in (random_banner(metrics), seen_banner(metrics)):
        if banner:
            out.append(f'<p class="warn"><strong>{html.escape(banner)}</strong></p>')
    out.append("<ul>" + "".join(f"<li>{_inline_md(s)}</li>" for s in _context_lines(metrics)) + "</ul>")
    summary = summary_lines(metrics)
    if summary:
        out.append("<h2>Summary</h2><ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary) + "</ul>")
    out.append("<h2>Models</h2>" + _html_table(*describe_models(metrics)))
    for title, header, rows in section_tables(metrics):
        out.append(f"<h2>{html.escape(title)}</h2>" + _html_table(header, rows))
    notes = [(n, note) for n, m in metrics["models"].items() for note in m.get("notes") or []]
    if notes:
        out.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(f'{n}: {t}')}</li>" for n, t in notes) + "</ul>")
    if plots:
        out.append("<h2>Plots</h2>")
        for key, png in plots.items():
            data = base64.b64encode(png).decode("ascii")
            cap = html.escape(PLOT_CAPTIONS.get(key, key))
            out.append(f'<figure><img alt="{cap}" src="data:image/png;base64,{data}"><figcaption>{cap}'
                       "</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- files

def write_reports(metrics: dict, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write report.md, report.html (and plots/*.png) into ``out_dir`` (already a temporary
    directory when called from evaluate, hence plain writes here)."""
    from rainclf.report.plots import make_plots

    out_dir = Path(out_dir)
    images = make_plots(metrics) if plots else {}
    plot_files = {}
    if images:
        (out_dir / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
        for key, png in images.items():
            (out_dir / PLOTS_DIR / f"{key}.png").write_bytes(png)
            plot_files[key] = f"{PLOTS_DIR}/{key}.png"
    md = out_dir / REPORT_MD
    md.write_text(markdown_report(metrics, plot_files), encoding="utf-8")
    page = out_dir / REPORT_HTML
    page.write_text(html_report(metrics, images), encoding="utf-8")
    return {"markdown": md, "html": page}
