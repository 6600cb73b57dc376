"""rainclf on checkpoints laid out like the real GLM-4V releases (``../shared/glm4v-real/``).

Two random-weight checkpoints are built once per module by ``tools/make_glm4v_from_meta.py``:
``g41`` from the released GLM-4.1V-9B-Thinking files (flat config kept flat, real tokenizer, chat
template and processor, every token id) and ``g45`` from the GLM-4.5V config values (glm4v_moe:
one dense layer, one MoE layer). Their weights are random, so only behaviour is tested here: what
is built, what the prompt and the answer tokens are, what is refused, that every command exits 0
with the two labels only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys

import pytest
from click.testing import CliRunner
from conftest import REPO, SAMPLE

from rainclf.backbones import BackboneError, BackboneOptions, create_backbone
from rainclf.labels import LABELS
from rainclf.report.quality import assess_answer, summarise

META = REPO.parent / "shared" / "glm4v-real"
META41 = META / "GLM-4.1V-9B-Thinking"
# real token ids (tokenizer_config.json of the release, ../shared/glm4v-real/README.md)
GMASK, SOP, USER, ASSISTANT, THINK, THINK_END, ANSWER_END = 151331, 151333, 151336, 151337, 151345, 151346, 151348
RAIN_IDS, NO_RAIN_IDS = [98337, 112374], [99271, 112374]
IMAGE_SIZE = "112"   # 2 × 112² = 25,088 pixels: inside the release's [12,544, 9,633,792]


def _builder():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import make_glm4v_from_meta
    finally:
        sys.path.pop(0)
    return make_glm4v_from_meta


@pytest.fixture(scope="module")
def g41(tmp_path_factory):
    if not (META41 / "config.json").is_file():
        pytest.fail(f"{META41} is missing: ../shared/glm4v-real/ must be beside the checkout")
    return _builder().build(META41, tmp_path_factory.mktemp("g41") / "GLM-4.1V-small")


@pytest.fixture(scope="module")
def g45(tmp_path_factory):
    return _builder().build(META / "GLM-4.5V", tmp_path_factory.mktemp("g45") / "GLM-4.5V-small")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 images of data/sample, 3 per label, as class folders."""
    root = tmp_path_factory.mktemp("data")
    for label in LABELS:
        (root / label).mkdir()
        for p in sorted((SAMPLE / "train" / label).glob("*.jpg"))[:3]:
            shutil.copyfile(p, root / label / p.name)
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _run(*args):
    from rainclf.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def _rows(path):
    return list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))


# --------------------------------------------------------------------------- config

def test_flat_config_stays_flat_and_its_sizes_are_built(g41):
    raw = json.loads((g41 / "config.json").read_text())
    assert "text_config" not in raw and raw["hidden_size"] == 32 and raw["rope_scaling"]["type"] == "default"
    b = create_backbone(str(g41), BackboneOptions(device="cpu", image_size=112))
    assert (b.hidden_size, b.num_layers, b.dim("vision")) == (32, 2, 32)
    lm = b.language_model
    # transformers alone would build Glm4vTextConfig defaults (4096 × 40) from this file
    assert lm.config.hidden_size == 32 and len(lm.layers) == 2 and lm.embed_tokens.weight.shape == (151552, 32)
    assert lm.config.rope_parameters["mrope_section"] == [1, 1, 2]


def test_normalise_the_released_flat_config():
    from rainclf.backbones.glm4v_config import normalise, read_config

    n = normalise(read_config(META41))
    t = n["text_config"]
    assert (t["hidden_size"], t["num_hidden_layers"], t["model_type"]) == (4096, 40, "glm4v_text")
    assert t["rope_parameters"] == {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0,
                                    "partial_rotary_factor": 0.5}
    assert "rope_scaling" not in t and "hidden_size" not in n and n["eos_token_id"] == [151329, 151336, 151338, 151348]


def test_stated_sizes_that_would_not_be_built_are_refused(g41):
    from rainclf.backbones.glm4v_config import build_config, check_built, normalise, read_config

    built = build_config(g41)
    stated = normalise(read_config(g41))
    stated["text_config"]["hidden_size"] = 48
    with pytest.raises(BackboneError) as e:
        check_built(stated, built, g41 / "config.json")
    assert str(e.value).startswith(f"{g41 / 'config.json'}: the config states sizes transformers would not build "
                                   "(text_config.hidden_size 48 → 32)")


def test_checkpoint_without_weights_or_with_other_sizes_is_one_line_exit_2(g41, data, tmp_path):
    no_weights = _copy(g41, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    res = _run("embed", data, "-o", tmp_path / "v.safetensors", "--backbone", no_weights, "--device", "cpu",
               "--image-size", IMAGE_SIZE, "-q", "--no-cache")
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (f"rainclf: error: {no_weights} has no weights (*.safetensors): "
                                                   "download the checkpoint's weight files into it, or point "
                                                   "--backbone at the full checkpoint")
    other = _copy(g41, tmp_path / "other-sizes")
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    res = _run("embed", data, "-o", tmp_path / "v.safetensors", "--backbone", other, "--device", "cpu",
               "--image-size", IMAGE_SIZE, "-q", "--no-cache")
    assert res.exit_code == 2, res.output
    line = [x for x in res.output.splitlines() if x.startswith("rainclf: error:")]
    assert len(line) == 1 and line[0].startswith(f"rainclf: error: {other / 'model.safetensors'}: the weights do "
                                                 f"not match {other / 'config.json'}")


# --------------------------------------------------------------------------- prompt, labels, terminator

def test_prompt_is_the_released_template_rendering_with_thinking_off(g41):
    import jinja2

    b = create_backbone(str(g41), BackboneOptions(device="cpu", image_size=112))
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)   # how transformers renders templates
    released = env.from_string((META41 / "chat_template.jinja").read_text()).render(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "根据图片判断：会下雨还是不会下雨？"}]}],
        add_generation_prompt=True)
    assert b.thinking["mode"] == "empty_block"   # </answer> is a stop id and the template has no switch
    assert b.chat_text() == released + "<think></think>"
    assert b.chat_text() == ("[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>"
                             "根据图片判断：会下雨还是不会下雨？<|assistant|>\n<think></think>")
    ids = b.chat_inputs([b.prepare_images([_blank()])[0]])["input_ids"][0].tolist()
    assert ids[:3] == [GMASK, SOP, USER] and ids[-4:] == [ASSISTANT, 198, THINK, THINK_END]
    assert json.loads((g41 / "config.json").read_text())["eos_token_id"][-1] == ANSWER_END
    assert b.describe()["thinking"] == "empty_block"


def _blank():
    from PIL import Image

    return Image.new("RGB", (112, 112))


def test_labels_tokenise_as_the_release_and_the_target_ends_with_its_terminator(g41, tiny_backbone):
    from rainclf.heads.answer_tokens import label_token_ids

    b = create_backbone(str(g41), BackboneOptions(device="cpu", image_size=112))
    tok = b.load()[1].tokenizer
    assert tok.encode("会下雨", add_special_tokens=False) == RAIN_IDS
    assert tok.encode("不会下雨", add_special_tokens=False) == NO_RAIN_IDS
    # the released template writes no EOS after an answer: the next turn's <|user|> (a stop id) ends it
    assert b.terminator == "<|user|>"
    assert label_token_ids(b, "根据图片判断：会下雨还是不会下雨？", _blank(), b.stop_ids) == {
        "不会下雨": NO_RAIN_IDS + [USER], "会下雨": RAIN_IDS + [USER]}
    # glm4v-tiny's own template ends an answer with <|endoftext|>
    assert tiny_backbone.terminator == "<|endoftext|>"
    assert label_token_ids(tiny_backbone, "根据图片判断：会下雨还是不会下雨？", _blank(), [0])["会下雨"][-1] == 0


def test_thinking_decision_follows_template_and_config(tmp_path):
    from rainclf.backbones.glm4v_chat import thinking_decision
    from rainclf.backbones.glm4v_config import normalise, read_config

    base = _copy(META41, tmp_path / "base")   # GLM-4.1V-9B-Base: same tokenizer, no </answer> stop
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(cfg, eos_token_id=[151329, 151336, 151338])))
    assert thinking_decision(base, normalise(read_config(base)))["mode"] == "none"
    switch = _copy(META41, tmp_path / "switch")   # a template that knows enable_thinking (GLM-4.5V style)
    t = (switch / "chat_template.jinja").read_text()
    (switch / "chat_template.jinja").write_text(
        t.replace("<|assistant|>\n{% endif %}",
                  "<|assistant|>\n{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"))
    assert thinking_decision(switch, normalise(read_config(switch)))["mode"] == "template"
    assert thinking_decision(META41, normalise(read_config(META41)))["mode"] == "empty_block"


def test_native_answer_wrappers_give_the_label_and_are_counted():
    native = "<answer><|begin_of_box|>会下雨<|end_of_box|></answer>"
    q = assess_answer(native)
    assert (q.label, q.format_valid, q.wrappers, q.mixed_language) == ("会下雨", True, ("answer", "box"), False)
    # generation stops at </answer> (a stop id), so the decoded text usually lacks it
    thinking = "<think>乌云密布</think><answer><|begin_of_box|>不会下雨<|end_of_box|>"
    assert assess_answer(thinking).label == "不会下雨" and assess_answer(thinking).wrappers == ("think", "answer", "box")
    s = summarise([native, thinking, "会下雨", "图片中天气晴朗"])
    assert (s["answer_wrapper_rate"], s["box_wrapper_rate"], s["think_wrapper_rate"]) == (0.5, 0.5, 0.25)
    assert (s["n_exact"], s["n_invalid_answers"], s["mixed_language_rate"]) == (3, 1, 0.0)


# --------------------------------------------------------------------------- image size

def test_image_size_outside_the_processor_pixel_bounds_is_refused(g41):
    with pytest.raises(BackboneError) as e:
        create_backbone(str(g41), BackboneOptions(image_size=56))
    assert str(e.value) == ("--image-size 56 gives 2×56² = 6,272 pixels, below "
                            f"{g41}'s processor bounds [12,544, 9,633,792] (preprocessor_config.json size "
                            "shortest_edge/longest_edge, temporal patch 2 counted): use 84..2184 (multiples of 28)")
    with pytest.raises(BackboneError, match=r"--image-size 2240 gives 2×2240² = 10,035,200 pixels, above .*use 84\.\.2184"):
        create_backbone(str(g41), BackboneOptions(image_size=2240))
    for ok in (84, 336, 2184):
        assert create_backbone(str(g41), BackboneOptions(image_size=ok)).image_size == ok


# --------------------------------------------------------------------------- fingerprint

def _fp(d):
    return create_backbone(str(d), BackboneOptions(device="cpu", image_size=112)).fingerprint


def test_fingerprint_is_content_template_tokenizer_included(g41, tmp_path):
    same = _copy(g41, tmp_path / "copy")
    ref = _fp(g41)
    assert _fp(same) == ref
    # a config re-saved by transformers (nested layout, defaults spelled out) means the same
    from rainclf.backbones.glm4v_config import build_config

    resaved = _copy(g41, tmp_path / "resaved")
    build_config(g41).save_pretrained(resaved)
    assert "text_config" in json.loads((resaved / "config.json").read_text()) and _fp(resaved) == ref
    # weight file names do not count
    renamed = _copy(g41, tmp_path / "renamed")
    (renamed / "model.safetensors").rename(renamed / "weights.safetensors")
    assert _fp(renamed) == ref
    for name, edit in [("chat_template.jinja", lambda t: t.replace("<|assistant|>\n{% endif %}", "<|assistant|>{% endif %}")),
                       ("tokenizer_config.json", lambda t: t.replace('"padding_side": "left"', '"padding_side": "right"')),
                       ("preprocessor_config.json", lambda t: t.replace("12544", "3136"))]:
        d = _copy(g41, tmp_path / f"edit-{name}")
        before = (d / name).read_text()
        (d / name).write_text(edit(before))
        assert (d / name).read_text() != before and _fp(d) != ref, name
    gen = _copy(g41, tmp_path / "gen")
    (gen / "generation_config.json").write_text(json.dumps({"eos_token_id": [151329], "pad_token_id": 151329}))
    assert _fp(gen) != ref


def test_hub_snapshot_and_local_directory_share_the_fingerprint(g41, tmp_path):
    """A hub cache links snapshots/<revision>/FILE to blobs/<sha256>: same files, any revision,
    same fingerprint as a plain directory."""
    repo = tmp_path / "models--zai-org--GLM-4.1V-small"
    (repo / "blobs").mkdir(parents=True)
    for rev in ("ddd07b32" + "0" * 32, "3c1471e5" + "0" * 32):
        snap = repo / "snapshots" / rev
        snap.mkdir(parents=True)
        for p in g41.iterdir():
            blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
            if not blob.exists():
                shutil.copyfile(p, blob)
            (snap / p.name).symlink_to(blob)
    ref = _fp(g41)
    assert [_fp(s) for s in sorted((repo / "snapshots").iterdir())] == [ref, ref]


def test_template_edit_is_never_served_from_the_cache(g41, data, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    d = _copy(g41, tmp_path / "ckpt")
    monkeypatch.setenv("RAINCLF_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--backbone", d, "--feature", "answer", "--device", "cpu", "--image-size", IMAGE_SIZE, "-q"]
    assert _run("embed", data, "-o", tmp_path / "a.safetensors", *args).exit_code == 0
    t = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").write_text(t.replace("<|user|>{{ '\\n' }}", "<|user|>{{ '\\n' }}请只回答两个标签之一。"))
    assert (d / "chat_template.jinja").read_text() != t
    assert _run("embed", data, "-o", tmp_path / "b.safetensors", *args).exit_code == 0
    assert _run("embed", data, "-o", tmp_path / "c.safetensors", *args, "--no-cache").exit_code == 0
    a, b, c = (load_file(str(tmp_path / f"{x}.safetensors")) for x in "abc")
    key = next(k for k in a if a[k].ndim == 2)
    assert abs(a[key] - b[key]).max() > 1e-3           # the new prompt's vectors, not the cached ones
    assert abs(b[key] - c[key]).max() == 0.0           # and exactly what --no-cache computes
    assert len(list((tmp_path / "cache" / "embeddings").iterdir())) == 2


# --------------------------------------------------------------------------- every command, both layouts

@pytest.mark.parametrize("ckpt", ["g41", "g45"])
def test_fit_predict_export_on_real_layouts(ckpt, request, data, tmp_path, one_torch_thread):
    """fit vision/answer/lora/generative, the three decodings, export --include-backbone and
    predict --engine onnx: exit 0, labels only from the two."""
    d = request.getfixturevalue(ckpt)
    common = ["--backbone", d, "--device", "cpu", "--image-size", IMAGE_SIZE, "-q", "--no-cache"]
    fits = {"vision": ["--feature", "vision"], "answer": ["--feature", "answer"],
            "lora": ["--feature", "answer", "--head", "lora", "--steps", "2", "--eval-every", "2"]}
    if ckpt == "g45":   # glm4v_moe: the MLP projections that exist (dense layer + shared experts)
        fits["lora"] += ["--lora-targets", "q_proj,v_proj,gate_proj,up_proj,down_proj"]
    for name, extra in fits.items():
        res = _run("fit", data, "-o", tmp_path / name, *common, *extra)
        assert res.exit_code == 0, res.output
    for name in ("answer", "lora"):
        res = _run("export", tmp_path / name, "--include-backbone")
        assert res.exit_code == 0 and "image graph" in res.output, res.output
        out = {}
        for engine in ("torch", "onnx"):
            res = _run("predict", data, "--model", tmp_path / name, "--engine", engine, "-q", "--no-cache",
                       "-o", tmp_path / f"{name}-{engine}.csv")
            assert res.exit_code == 0, res.output
            out[engine] = _rows(tmp_path / f"{name}-{engine}.csv")
        assert len(out["onnx"]) == 6 and {r["label"] for r in out["onnx"]} <= set(LABELS)
        for r, t in zip(out["onnx"], out["torch"]):
            assert r["label"] == t["label"] and abs(float(r["p_rain"]) - float(t["p_rain"])) < 1e-4
    res = _run("fit", data, "-o", tmp_path / "gen", *common, "--head", "generative", "--steps", "30",
               "--eval-every", "30", "--lr", "1e-2", "--lora-dropout", "0")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert cfg["backbone"]["thinking"] == ("empty_block" if ckpt == "g41" else "none")
    for decoding, extra in [("greedy", []), ("sample", ["--temperature", "0.05"]), ("constrained", [])]:
        res = _run("predict", data, "--model", tmp_path / "gen", "--decoding", decoding, *extra, "-q",
                   "--no-cache", "-o", tmp_path / f"gen-{decoding}.csv")
        assert res.exit_code == 0, res.output
        rows = _rows(tmp_path / f"gen-{decoding}.csv")
        assert len(rows) == 6 and {r["label"] for r in rows} <= set(LABELS) | {""}
        assert any(r["label"] in LABELS for r in rows)


def test_terminator_is_the_stop_token_the_template_writes_after_an_answer(tmp_path):
    from transformers import AutoProcessor

    from rainclf.backbones.glm4v_chat import terminator

    stops = [151329, USER, 151338, ANSWER_END]
    assert terminator(AutoProcessor.from_pretrained(META41), stops) == "<|user|>"
    spaced = _copy(META41, tmp_path / "spaced")   # a template that writes "\n" before the next turn
    t = (spaced / "chat_template.jinja").read_text()
    (spaced / "chat_template.jinja").write_text(t.replace("{{ msg.content }}\n        {%- endif %}\n    {%- endif %}",
                                                          "{{ msg.content }}{{ '\\n' }}\n        {%- endif %}\n    {%- endif %}"))
    assert (spaced / "chat_template.jinja").read_text() != t
    assert terminator(AutoProcessor.from_pretrained(spaced), stops) == "\n<|user|>"
    # no stop token after an answer at all: the tokenizer's EOS
    assert terminator(AutoProcessor.from_pretrained(META41), [151329]) == "<|endoftext|>"


def test_moe_lora_targets_are_the_linear_layers_that_exist(g45):
    from rainclf.heads.adapters import lora_targets_in

    model = create_backbone(str(g45), BackboneOptions(device="cpu", image_size=112)).load()[0]
    names = lora_targets_in(model, ["gate_proj", "up_proj", "down_proj"])
    assert sorted(n.split("language_model.")[1] for n in names) == [
        "layers.0.mlp.down_proj", "layers.0.mlp.gate_proj", "layers.0.mlp.up_proj",        # dense layer
        "layers.1.mlp.shared_experts.down_proj", "layers.1.mlp.shared_experts.gate_proj",  # MoE layer:
        "layers.1.mlp.shared_experts.up_proj"]                                               # shared expert only
    with pytest.raises(ValueError) as e:
        lora_targets_in(model, ["gate_up_proj", "down_proj"])
    assert str(e.value) == ("--lora-targets gate_up_proj: this model's language model has no such Linear layer; "
                            "it has q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def test_chatglm_is_named_by_architecture_with_the_tiktoken_extra(tmp_path):
    import configparser

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "hidden_size": 8, "num_layers": 1}))
    with pytest.raises(BackboneError) as e:
        create_backbone(str(tmp_path), BackboneOptions(device="cpu"))
    assert "ChatGLM-architecture checkpoint (model_type chatglm, such as THUDM/glm-4v-9b)" in str(e.value)
    assert "pip install 'rainclf[chatglm]'" in str(e.value) and "the original" not in str(e.value)
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    assert cfg["options.extras_require"]["chatglm"].split() == ["tiktoken>=0.7"]
