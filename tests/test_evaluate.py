"""rainclf.report.evaluate on glm4v-tiny (random weights): every model given gets a column, the numbers in
report.md are those of metrics.json, predictions/<model>.csv has one row per image, an unreadable
image counts as wrong, and the ``rainclf evaluate`` command. Metric formulas themselves are tested
in test_metrics.py; the HTML/markdown rendering in test_report.py."""

from __future__ import annotations

import csv
import json
import re

import pytest
from click.testing import CliRunner
from helpers import write_class_folders

from rainclf.cli import main
from rainclf.report.quality import assess_answer
from rainclf.report.render import MISSING, SECTIONS
from rainclf.report.scoring import GUARANTEED, MEASURED


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Fit the tiny models once (linear on both features, LoRA, generative), add an unreadable
    image, evaluate everything with the fallback combination."""
    from rainclf.config import RunOptions
    from rainclf.fit import FitOptions, fit
    from rainclf.report.evaluate import evaluate

    root = tmp_path_factory.mktemp("evaluate")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAINCLF_CACHE_DIR", str(root / "cache"))   # module scope: the autouse one is not active yet
        data = write_class_folders(root / "data", n_per_class=3)
        base = dict(backbone="glm4v-tiny", cache_dir=None, progress=False, device="cpu", val_split=0.0)
        dirs = [root / "vision", root / "answer"]
        fit(data, dirs[0], FitOptions(feature="vision", **base))
        fit(data, dirs[1], FitOptions(feature="answer", layer=1, **base))
        tiny = dict(steps=1, eval_every=1, train_batch_size=2, max_new_tokens=2)
        dirs.append(root / "lora")
        fit(data, dirs[-1], FitOptions(head="lora", feature="answer", head_params=tiny, **base))
        gen = root / "gen"
        dirs.append(gen)
        fit(data, gen, FitOptions(head="generative", feature="answer", head_params=tiny, **base))
        (data / "会下雨" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
        out = root / "report"
        metrics = evaluate(data, dirs, out, RunOptions(device="cpu", cache_dir=None, progress=False,
                                                       max_new_tokens=3),
                           fallback=gen, band=(0.0, 1.0),
                           decodings=["greedy", "constrained"], timing="single", warmup=1)
    return {"data": data, "dirs": dirs, "out": out, "metrics": metrics, "gen": gen}


def test_every_model_given_is_in_metrics_reports_and_predictions(evaluated):
    out, metrics = evaluated["out"], evaluated["metrics"]
    expected = {"vision", "answer", "lora", "gen-greedy", "gen-constrained"}
    expected |= {f"{h}+gen-constrained" for h in ("vision", "answer", "lora")}
    on_disk = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert on_disk == json.loads(json.dumps(metrics))          # what evaluate returned is what it wrote
    assert set(on_disk["models"]) == expected
    md = (out / "report.md").read_text(encoding="utf-8")
    page = (out / "report.html").read_text(encoding="utf-8")
    n_images = on_disk["n_images"]
    assert n_images == 7                                        # 6 images + the broken one
    for name in expected:
        assert name in md and name in page
        with open(out / "predictions" / f"{name}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == n_images
        assert len({r["path"] for r in rows}) == n_images
        assert {r["true_label"] for r in rows} == {"会下雨", "不会下雨"}
    assert {p.name for p in (out / "plots").iterdir()} >= {"confusion.png", "latency.png", "quality.png"}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".rainclf-tmp-")]


def test_two_linear_heads_differ_by_feature_and_are_timed(evaluated):
    models = evaluated["metrics"]["models"]
    assert (models["vision"]["feature"], models["answer"]["feature"]) == ("vision", "answer")
    for name in ("vision", "answer"):
        m = models[name]
        assert m["n_timed"] == 7 and m["timing_repeats"] == 1 and m["warmup_sizes"] == [1]
        # single timing: one image per call, so img/s is exactly 1000 / mean latency in ms
        assert m["images_per_s"] == pytest.approx(1000.0 / m["latency_ms_mean"])
        assert m["latency_ms_p95"] >= m["latency_ms_p50"]
        assert m["model_size_mb"] > 0 and m["backbone_size_mb"] > 0
        # a head can only emit the two labels: guaranteed, not a measured 1.0
        assert m["answer_format"] == GUARANTEED and m["format_valid_rate"] is None
        assert m["quality_of"] == "emitted label" and m["score_source"] == "the head's p_rain"


def test_unreadable_image_counts_as_wrong(evaluated):
    m = evaluated["metrics"]["models"]["vision"]
    assert m["n_invalid"] == 1 and m["n_errors"] == 1 and m["n_scored"] == 6
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == 6
    assert m["accuracy"] <= 6 / 7
    with open(evaluated["out"] / "predictions" / "vision.csv", encoding="utf-8", newline="") as f:
        broken = [r for r in csv.DictReader(f) if r["path"].endswith("broken.jpg")]
    assert len(broken) == 1 and broken[0]["label"] == "" and broken[0]["error"]


def _md_tables(md: str) -> dict[str, dict[str, str]]:
    """{row header: {model: cell}} over every metric table of report.md."""
    cells: dict[str, dict[str, str]] = {}
    header = None
    for line in md.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        parts = [c.strip() for c in line.strip().strip("|").split("|")]
        if parts[0] == "metric":
            header = parts[1:]
        elif header and not set(parts[0]) <= set("-:"):
            cells[parts[0]] = dict(zip(header, parts[1:]))
    return cells


def test_numbers_in_report_md_equal_metrics_json(evaluated):
    out = evaluated["out"]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    cells = _md_tables((out / "report.md").read_text(encoding="utf-8"))
    checked = set()
    for _, rows in SECTIONS:
        for path, header, spec in rows:
            if header not in cells:
                continue
            if spec == "s":            # text rows (rules, answer format) have no number to compare
                continue
            for model, text in cells[header].items():
                value = metrics["models"][model]
                for k in path:
                    value = value.get(k) if isinstance(value, dict) else None
                if value is None:
                    assert text == MISSING, (header, model, text)
                    continue
                decimals = 0 if spec == "d" else int(re.search(r"\.(\d+)f", spec).group(1))
                assert abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-12, (header, model, text, value)
                checked.add(path[0])
    assert {"accuracy", "balanced_accuracy", "f1", "roc_auc", "ece", "brier", "format_valid_rate",
            "latency_ms_p50", "latency_ms_p95", "images_per_s", "peak_memory_mb"} <= checked


def test_random_weight_flag(evaluated):
    out = evaluated["out"]
    assert evaluated["metrics"]["random_weights"] is True
    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.splitlines()[2].startswith("**RANDOM-weight backbone (glm4v-tiny)")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert page.index("<strong>RANDOM-weight backbone") < page.index("<h2>")


def _predictions(evaluated, name: str) -> list[dict]:
    with open(evaluated["out"] / "predictions" / f"{name}.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_generative_columns_show_answer_quality(evaluated):
    models = evaluated["metrics"]["models"]
    greedy, constrained = models["gen-greedy"], models["gen-constrained"]
    assert greedy["quality_of"] == "generated text" and greedy["answer_format"] == MEASURED
    # the answer classes are those of the raw answers written to predictions/gen-greedy.csv
    raws = [r["raw"] for r in _predictions(evaluated, "gen-greedy") if not r["error"]]
    kinds = [assess_answer(a).kind for a in raws]
    assert greedy["n_answers"] == len(raws) == 6
    assert (greedy["n_exact"], greedy["n_extractable"], greedy["n_invalid_answers"]) == (
        kinds.count("exact"), kinds.count("extractable"), kinds.count("invalid"))
    assert greedy["format_valid_rate"] == pytest.approx(kinds.count("exact") / 6)
    # without --lenient only exact answers have a label: the rest and the broken image count wrong
    assert greedy["n_invalid"] == 1 + 6 - kinds.count("exact")
    assert greedy["accuracy"] == greedy["accuracy_exact"] <= greedy["accuracy_lenient"]
    assert greedy["n_scored"] == 0 and greedy["roc_auc"] is None     # greedy text has no p_rain
    assert constrained["answer_format"] == GUARANTEED and constrained["format_valid_rate"] is None
    assert constrained["n_scored"] == 6 and constrained["score_source"] == "constrained decoding's p_rain"
    assert constrained["decoding"] == "constrained" and greedy["decoding"] == "greedy"
    # the report states how constrained scores are formed (summed, not length-normalised)
    assert "not length-normalised" in constrained["constrained_score"] and greedy["constrained_score"] is None
    md = (evaluated["out"] / "report.md").read_text(encoding="utf-8")
    assert "| constrained score |" in md and "summed log-probabilities" in md


def test_fallback_combination_routes_by_band(evaluated):
    models = evaluated["metrics"]["models"]
    m = models["vision+gen-constrained"]
    # band (0, 1): every readable image goes to the generative model
    assert m["fallback_rate"] == pytest.approx(6 / 7) and m["n_fallback"] == 6
    assert m["fallback_replaced"] == 6 and m["fallback_invalid"] == 0
    assert m["head"] == "linear+fallback" and m["fallback"] == str(evaluated["gen"])
    # one rule for the scores: the head's p_rain on every image, so the ranking metrics of the
    # combination are the head's own, while the labels (accuracy) are the fallback's
    assert m["score_source"] == "the head's p_rain" and m["n_scored"] == 6
    for key in ("roc_auc", "ece", "brier"):
        assert m[key] == pytest.approx(models["vision"][key])
    assert m["confusion_matrix"] == models["gen-constrained"]["confusion_matrix"]
    md = (evaluated["out"] / "report.md").read_text(encoding="utf-8")
    changed = sum(r["label"] != r["head_label"] for r in _predictions(evaluated, "vision+gen-constrained")
                  if r["source"] == "fallback")
    assert m["fallback_changed"] == changed
    assert ("6 of 7 images had a head p_rain in [0, 1] and were asked again to the generative model "
            f"(constrained): its label replaced the head's for 6 ({changed or 'none'} of them a different label)") in md
    # every model directory records what it was fitted on (data_sha256.safetensors): here all of it
    assert m["held_out"] == models["vision"]["held_out"] == "NO: 6 training + 0 validation of 7 images"   # 6 + the broken file (hashed too)
    assert "Held-out: no model directory records the images it was fitted on" not in md
    assert "so the head's label stood" not in md


def test_bad_inputs_refused_before_any_model_work(evaluated, tmp_path):
    from rainclf.model import ModelDirError
    from rainclf.report.evaluate import evaluate

    vision = evaluated["dirs"][0]
    with pytest.raises(ModelDirError):
        evaluate(evaluated["data"], [tmp_path / "nope"], tmp_path / "r")
    with pytest.raises(ValueError, match="not a generative model"):
        evaluate(evaluated["data"], [vision], tmp_path / "r", fallback=vision)
    with pytest.raises(FileExistsError):
        evaluate(evaluated["data"], [vision], evaluated["out"])
    assert not (tmp_path / "r").exists()


def test_cli_evaluate(evaluated, tmp_path):
    data, (vision, answer) = evaluated["data"], evaluated["dirs"][:2]
    out = tmp_path / "cli-report"
    args = ["evaluate", str(data), "--model", str(vision), "--model", str(answer), "-o", str(out),
            "--device", "cpu", "--timing", "batch", "--batch-size", "16", "--no-plots", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "vision: accuracy" in r.stdout and "answer: accuracy" in r.stdout and "RANDOM" in r.stderr
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["models"]) == {"vision", "answer"} and metrics["timing"]["mode"] == "batch"
    assert metrics["timing"]["embedding_cache"] is False
    assert not (out / "plots").exists() and "data:image/png" not in (out / "report.html").read_text(encoding="utf-8")
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_roc_points_match_scikit_learn_and_auc():
    import numpy as np
    from sklearn.metrics import roc_auc_score, roc_curve

    from rainclf.report.metrics import roc_points

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 60).astype(float)
    p = np.round(np.clip(0.3 * y + rng.uniform(0, 0.7, 60), 0, 1), 1)     # many ties
    pts = roc_points(y, p)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(pts["fpr"], fpr, atol=1e-6)
    np.testing.assert_allclose(pts["tpr"], tpr, atol=1e-6)
    assert np.trapezoid(pts["tpr"], pts["fpr"]) == pytest.approx(roc_auc_score(y, p), abs=1e-6)


def test_same_model_twice_shows_the_same_speed(evaluated, tmp_path):
    """Every model is warmed fully and the calls are interleaved: two copies of one model in one
    evaluate must come out at about the same speed (the first used to pay for the warm-up)."""
    from rainclf.config import RunOptions
    from rainclf.report.evaluate import evaluate

    vision = evaluated["dirs"][0]
    metrics = evaluate(evaluated["data"], [vision, vision], tmp_path / "twice",
                       RunOptions(device="cpu", cache_dir=None, progress=False), repeats=3, plots=False)
    a, b = metrics["models"]["vision"], metrics["models"]["vision_2"]
    assert a["n_timed"] == b["n_timed"] == 21 and a["timing_repeats"] == 3
    assert metrics["timing"]["order"] == "interleaved"
    for key in ("latency_ms_p50", "images_per_s"):
        ratio = a[key] / b[key]
        assert 0.5 <= ratio <= 2.0, (key, a[key], b[key])
    assert a["accuracy"] == b["accuracy"] and a["roc_auc"] == b["roc_auc"]


def test_evaluate_warns_and_marks_models_fitted_on_the_images(evaluated, tmp_path, monkeypatch, capsys):
    """A model directory that records the sha256 of its training images: evaluate on those
    images warns, fills seen_images and marks the report. Without a record nothing is said."""
    import hashlib

    import rainclf.model
    from rainclf.config import RunOptions
    from rainclf.data.datasets import load_dataset
    from rainclf.report.evaluate import evaluate

    data, vision = evaluated["data"], evaluated["dirs"][0]
    files = sorted(e.path for e in load_dataset(data))
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    record = {"train": set(digests[:4]), "validation": {digests[4]}}
    monkeypatch.setattr(rainclf.model, "read_seen_sha256",
                        lambda d: record if str(d) == str(vision) else None, raising=False)
    opts = RunOptions(device="cpu", cache_dir=None, progress=False)
    metrics = evaluate(data, [vision, evaluated["dirs"][1]], tmp_path / "seen", opts, plots=False)
    seen, other = metrics["models"]["vision"], metrics["models"]["answer"]
    assert seen["seen_images"] == {"train": 4, "validation": 1, "n": 7}
    assert seen["held_out"] == "NO: 4 training + 1 validation of 7 images"
    assert other["seen_images"] is None and other["held_out"] is None
    err = capsys.readouterr().err
    assert "warning: vision is evaluated on images it was fitted on (4 training + 1 validation of 7 images)" in err
    assert "answer is evaluated" not in err
    md = (tmp_path / "seen" / "report.md").read_text(encoding="utf-8")
    assert "**Evaluated on images the model was fitted on: vision (4 training + 1 validation of 7 images)" in md


def test_lenient_counts_labels_inside_generated_text(evaluated, tmp_path):
    from rainclf.config import RunOptions
    from rainclf.report.evaluate import evaluate

    strict = evaluated["metrics"]["models"]["gen-greedy"]
    metrics = evaluate(evaluated["data"], [evaluated["gen"]], tmp_path / "lenient",
                       RunOptions(device="cpu", cache_dir=None, progress=False, max_new_tokens=3),
                       decodings=["greedy"], lenient=True, plots=False)
    m = metrics["models"]["gen-greedy"]
    assert metrics["lenient"] is True and m["labels_counted"].startswith("exact and extractable")
    # the same answers (greedy is deterministic), scored the other way
    assert (m["n_exact"], m["n_extractable"]) == (strict["n_exact"], strict["n_extractable"])
    assert m["accuracy"] == m["accuracy_lenient"] == strict["accuracy_lenient"]
    assert m["n_invalid"] == 1 + strict["n_invalid_answers"]
