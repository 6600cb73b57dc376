"""rainclf.report.render / rainclf.report.plots on a hand-built metrics dict (no models, fast): one self-contained
HTML file with embedded PNGs, the random-weight flag in bold, missing values shown as a dash,
escaping, the matplotlib install hint. The end-to-end check (report.md numbers == metrics.json on
glm4v-tiny) lives in test_evaluate.py."""

from __future__ import annotations

import base64
import re
import sys

import numpy as np
import pytest

from rainclf.labels import LABELS, NO_RAIN, RAIN
from rainclf.report.metrics import (
    classification_metrics,
    latency_summary,
    reliability_bins,
)
from rainclf.report.plots import PlottingUnavailable, check_plotting
from rainclf.report.render import (
    MISSING,
    html_report,
    markdown_report,
    section_tables,
    write_reports,
)
from rainclf.report.scoring import GUARANTEED, MEASURED


def _model(seed: int, generative: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    y = [LABELS[i % 2] for i in range(20)]
    p = np.clip(np.array([0.8 if t == RAIN else 0.2 for t in y]) + rng.normal(0, 0.2, 20), 0, 1)
    m = {"head": "generative" if generative else "linear", "feature": "vision", "backbone": "glm4v-tiny",
         "random_weights": True, "decoding": "greedy" if generative else None, "notes": ["a note"]}
    if generative:   # greedy text: labels, some invalid, no p_rain
        pred = [t if i % 4 else None for i, t in enumerate(y)]
        m.update(classification_metrics(y, None, pred))
        m.update({"n_scored": 0, "roc_auc": None, "ece": None, "brier": None, "curves": {"roc": None, "reliability": None},
                  "format_valid_rate": 0.75, "extractable_rate": 0.1, "invalid_rate": 0.15,
                  "n_answers": 20, "n_exact": 15, "n_extractable": 2, "n_invalid_answers": 3,
                  "contains_label_rate": 0.9, "mixed_language_rate": 0.1, "answer_format": MEASURED,
                  "think_leak_rate": 0.0, "mean_length": 12.5, "quality_of": "generated text"})
    else:
        m.update(classification_metrics(y, p, None))
        y01 = np.array([t == RAIN for t in y], dtype=float)
        m.update({"n_scored": 20, "format_valid_rate": None, "answer_format": GUARANTEED, "quality_of": "emitted label",
                  "curves": {"reliability": reliability_bins(y01, p), "roc": {"fpr": [0, 0.1, 1], "tpr": [0, 0.9, 1]}}})
    lat = latency_summary(rng.uniform(0.01, 0.02 if not generative else 0.5, 20))
    lat.pop("n")
    m.update(lat)
    m.update({"model_size_mb": 0.01, "backbone_size_mb": 0.8, "peak_memory_mb": 12.0, "load_seconds": 0.5})
    return m


@pytest.fixture
def metrics() -> dict:
    return {"rainclf_version": "0", "created": "now", "data": "data/<sky>", "n_images": 20,
            "label_counts": {NO_RAIN: 10, RAIN: 10}, "random_weights": True,
            "random_weights_backbones": ["glm4v-tiny"], "band": None,
            "timing": {"mode": "single", "warmup_calls": 1, "note": "batch of 1", "embedding_cache": False},
            "environment": {"device": "cpu", "cpu_count": 2, "torch": "x", "torch_threads": 2},
            "models": {"head_a": _model(0), "gen-greedy": _model(1, generative=True)}}


def test_html_is_one_self_contained_file_with_embedded_plots(metrics, tmp_path):
    files = write_reports(metrics, tmp_path)
    page = files["html"].read_text(encoding="utf-8")
    srcs = re.findall(r'\bsrc="([^"]*)"', page)
    assert len(srcs) == 5                                           # all five plots
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        assert base64.b64decode(s.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "href=" not in page and "<link" not in page and "<script" not in page and "url(" not in page
    # the markdown links the same plots as files next to it
    md = files["markdown"].read_text(encoding="utf-8")
    for name in ("confusion", "reliability", "roc", "latency", "quality"):
        assert f"(plots/{name}.png)" in md and (tmp_path / "plots" / f"{name}.png").is_file()


def test_random_weights_flagged_in_bold_at_the_top(metrics):
    md = markdown_report(metrics)
    assert md.splitlines()[2].startswith("**RANDOM-weight backbone (glm4v-tiny)") and md.splitlines()[2].endswith("**")
    page = html_report(metrics)
    assert page.index("<strong>RANDOM-weight backbone") < page.index("<h2>")
    metrics["random_weights"] = False
    assert "RANDOM" not in markdown_report(metrics) and "RANDOM" not in html_report(metrics)


def test_side_by_side_tables_same_strings_in_md_and_html(metrics):
    tables = section_tables(metrics)
    titles = [t for t, _, _ in tables]
    assert titles == ["Accuracy and calibration", "Per label", "Output quality", "Speed, size, memory"]
    md, page = markdown_report(metrics), html_report(metrics)
    for _, header, rows in tables:
        assert header == ["metric", "head_a", "gen-greedy"]
        for row in rows:
            assert "| " + " | ".join(row) + " |" in md
            assert "".join(f"<td>{c}</td>" for c in row) in page
    acc = next(r for _, _, rows in tables for r in rows if r[0] == "accuracy")
    assert acc[1] == f"{metrics['models']['head_a']['accuracy']:.4f}"
    auc = next(r for _, _, rows in tables for r in rows if r[0] == "ROC-AUC")
    assert auc[2] == MISSING                                        # greedy text has no p_rain
    # a row that is missing for every model is left out (no fallback here)
    assert not any(r[0] == "sent to fallback" for _, _, rows in tables for r in rows)


def test_summary_names_best_and_fastest_and_generative_validity(metrics):
    md = markdown_report(metrics)
    assert "Highest balanced accuracy: head_a" in md
    assert "Fastest per image: head_a" in md
    # counts in words, and the rule that decides what counts (issue 16: "0.7500 of answers" read badly)
    assert ("gen-greedy: of 20 answers, 15 were exactly a label, 2 had a label inside other text (counted "
            "wrong unless --lenient) and 3 had no label (counted wrong).") in md
    metrics["lenient"] = True
    assert "(counted, --lenient)" in markdown_report(metrics)


def test_guaranteed_format_is_shown_as_such_not_as_a_measured_rate(metrics):
    tables = {r[0]: r[1:] for _, _, rows in section_tables(metrics) for r in rows}
    assert tables["answer format"] == [GUARANTEED, MEASURED]
    assert tables["measured on"] == ["emitted label", "generated text"]
    assert tables["exactly a label (format-valid)"] == [MISSING, "0.7500"]
    assert "1.0000" not in markdown_report(metrics).split("## Output quality")[1].split("##")[0]


def test_report_states_its_rules(metrics):
    from rainclf.report.scoring import rule_lines

    metrics["rules"] = rule_lines(False)
    md = markdown_report(metrics)
    assert "accuracy counts exact answers only" in md
    assert "10 equal-width bins over p_rain (not top-label confidence)" in md
    assert "a head's p_rain (also for head + fallback" in md
    assert "ECE (10 bins over p_rain)" in md


def test_text_is_escaped_in_html(metrics):
    page = html_report(metrics)
    assert "data/&lt;sky&gt;" in page and "data/<sky>" not in page


def test_no_plots_without_matplotlib_and_install_hint(metrics, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import matplotlib → ImportError
    with pytest.raises(PlottingUnavailable, match=r"pip install"):
        check_plotting()
    files = write_reports(metrics, tmp_path, plots=False)   # tables still work
    assert "data:image" not in files["html"].read_text(encoding="utf-8")
    assert not (tmp_path / "plots").exists()
