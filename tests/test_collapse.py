"""The collapse rule (rainclf/report/collapse.py) and what it reaches: metrics.json, the model card,
the end of fit, predict; and the LoRA head's defaults against collapse (balanced class weights,
selection by balanced accuracy, the probe start) and its refusal of non-GLM backbones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from rainclf.cli import main
from rainclf.config import FitOptions, RunOptions
from rainclf.fit import fit
from rainclf.predict import predict
from rainclf.report.collapse import COLLAPSE_BALANCED_ACCURACY, collapse_flag
from rainclf.report.metrics import classification_metrics

R, N = "会下雨", "不会下雨"


@pytest.mark.parametrize("truth, pred, collapsed", [
    ([N, N, R, R], [N, N, N, N], True),                       # one label for everything
    ([N, N, R, R], [R, R, R, R], True),
    ([N] * 8 + [R] * 2, [N] * 7 + [R] + [N, R], False),       # balanced accuracy 0.9375
    ([N] * 10 + [R] * 10, [N] * 5 + [R] * 5 + [N] * 5 + [R] * 5, True),   # 0.50: both labels, no skill
    ([N] * 20 + [R] * 20, [N] * 11 + [R] * 9 + [N] * 9 + [R] * 11, True),  # 0.55 exactly
    ([N] * 20 + [R] * 20, [N] * 12 + [R] * 8 + [N] * 8 + [R] * 12, False),  # 0.60
])
def test_rule(truth, pred, collapsed):
    m = classification_metrics(truth, None, pred)
    flag = collapse_flag(m)
    assert (flag is not None) == collapsed
    if flag:
        assert flag["confusion_matrix"] == m["confusion_matrix"] and flag["balanced_accuracy"] == m["balanced_accuracy"]
        assert m["balanced_accuracy"] <= COLLAPSE_BALANCED_ACCURACY or "for all" in flag["reason"]


def test_no_validation_no_flag_and_invalid_answers_count():
    assert collapse_flag(None) is None and collapse_flag(classification_metrics([], None, [])) is None
    flag = collapse_flag(classification_metrics([N, R], None, [None, None]))   # generative: no label at all
    assert flag and "no validation image got a label" in flag["reason"]


@pytest.fixture(scope="module")
def three_rain_among_120(weather_dir, tmp_path_factory):
    """The forced collapse of the issue: 3 rain photos among 120, --class-weight none."""
    root = tmp_path_factory.mktemp("collapse")
    rows = [json.loads(line) for line in (weather_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    rain = [r for r in rows if r["messages"][1]["content"] == R][:3]
    dry = [r for r in rows if r["messages"][1]["content"] == N][:117]
    with open(root / "data.jsonl", "w", encoding="utf-8") as f:
        for r in rain + dry:
            r["messages"][0]["image"] = str(weather_dir / r["messages"][0]["image"])
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return root


def test_forced_collapse_is_flagged_everywhere(three_rain_among_120, weather_photos, tmp_path, capsys):
    data = three_rain_among_120 / "data.jsonl"
    res = fit(data, tmp_path / "m", FitOptions(backbone="glm4v-tiny", class_weight=None, device="cpu",
                                               progress=False, cache_dir=None))
    err = capsys.readouterr().err
    assert "warning: the head collapsed: it answered 不会下雨 for all" in err      # printed even without progress
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["collapse"]["collapsed"] and metrics["collapse"]["confusion_matrix"]["matrix"][1] == [1, 0]
    assert metrics["validation"]["confusion_matrix"] == metrics["collapse"]["confusion_matrix"]
    assert res.metrics["collapse"] == metrics["collapse"]
    card = (tmp_path / "m" / "README.md").read_text(encoding="utf-8")
    assert card.splitlines()[2].startswith("**Warning: the head collapsed")
    run = predict(weather_photos[:3], tmp_path / "m", RunOptions(device="cpu", progress=False, cache_dir=None))
    assert sum("collapsed" in n for n in run.summary.notes) == 1
    r = CliRunner().invoke(main, ["predict", str(weather_photos[0]), "--model", str(tmp_path / "m"), "-q",
                                  "--no-cache"])
    assert r.exit_code == 0 and r.output.count("the head collapsed") == 1


def test_balanced_weights_do_not_collapse_on_the_same_data(three_rain_among_120, tmp_path):
    res = fit(three_rain_among_120 / "data.jsonl", tmp_path / "m",
              FitOptions(device="cpu", progress=False, cache_dir=None))     # efficientnet-lite0, balanced
    assert "collapse" not in res.metrics and res.metrics["validation"]["balanced_accuracy"] > 0.9


def test_lora_and_generative_refuse_a_non_glm_backbone_in_one_line(tmp_path):
    from helpers import write_class_folders

    data = write_class_folders(tmp_path / "d", n_per_class=3)
    for head in ("lora", "generative"):
        r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / head), "--head", head, "-q"])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
        assert "not a GLM-4V" in r.output and "--backbone glm4v-tiny" in r.output
        for name in ("timm:convnext_atto", "efficientnet-lite0"):
            with pytest.raises(ValueError, match="not a GLM-4V"):
                fit(data, tmp_path / head, FitOptions(backbone=name, head=head, progress=False))


def test_class_weights_and_balanced_accuracy():
    from rainclf.heads.lora import balanced_accuracy, class_weights

    w = class_weights([0] * 9 + [1] * 3, "balanced")
    assert np.allclose(w.numpy(), [12 / 18, 12 / 6]) and class_weights([0, 1], None) is None
    y = np.array([0] * 9 + [1] * 3)
    assert balanced_accuracy(y, np.zeros(12, dtype=int)) == 0.5
    assert balanced_accuracy(y, y) == 1.0


def test_train_loop_keeps_the_start_unless_training_beats_it():
    import torch

    from rainclf.heads.adapters import LoraParams
    from rainclf.heads.train import train_loop

    w = torch.nn.Parameter(torch.zeros(1))
    ranks = iter([(0.8, -0.5), (0.7, -0.3), (0.8, -0.4), (0.75, -0.2)])   # step 0, 1, 2, 3

    def evaluate():
        return {"rank": next(ranks)}

    params = LoraParams(steps=3, eval_every=1, patience=5, lr=0.1)
    common = dict(n_train=4, loss_fn=lambda idx: (w - 1).pow(2).sum(), modules=[], device="cpu",
                  dtype=None, progress=False)
    out = train_loop(params, [("w", w)], evaluate=evaluate, start_is_candidate=True, **common)
    assert out.best_step == 2        # ties on balanced accuracy: log-loss decides (step 2 beats 0)
    assert float(out.best_state["w"]) != 0.0
    ranks = iter([(0.9, -0.5), (0.7, -0.3), (0.8, -0.4), (0.75, -0.2)])
    w.data.zero_()
    out = train_loop(params, [("w", w)], evaluate=evaluate, start_is_candidate=True, **common)
    assert out.best_step == 0 and float(out.best_state["w"]) == 0.0
    ranks = iter([(0.9, -0.5), (0.7, -0.3), (0.8, -0.4), (0.75, -0.2)])
    out = train_loop(params, [("w", w)], evaluate=evaluate, **common)
    assert out.best_step == 2        # without start_is_candidate step 0 never wins


def test_lora_defaults_record_their_choices_and_do_not_collapse(tmp_path, one_torch_thread):
    """Imbalanced red/blue (4 会下雨 : 12 不会下雨): balanced weights, the probe start and
    selection by balanced accuracy give a head that answers both labels."""
    pytest.importorskip("peft")
    from helpers import make_red_blue

    data = make_red_blue(tmp_path / "d", n_per_class=12, size=56)
    for p in sorted((data / R).iterdir())[4:]:
        p.unlink()
    res = fit(data, tmp_path / "m", FitOptions(backbone="glm4v-tiny", head="lora", feature="answer", device="cpu",
                                               progress=False, cache_dir=None, val_split=0.25,
                                               head_params=dict(steps=6, eval_every=2, train_batch_size=4)))
    m = res.metrics
    assert m["class_weight"] == "balanced" and m["selection"].startswith("validation balanced accuracy")
    assert m["score_init"]["train_balanced_accuracy"] == 1.0
    assert "collapse" not in m and m["validation"]["balanced_accuracy"] == 1.0
    assert all("val_balanced_accuracy" in h for h in m["history"])
    shutil.rmtree(tmp_path / "m")
