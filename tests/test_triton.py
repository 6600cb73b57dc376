"""Tests for rainclf.onnx.triton (``rainclf export --include-backbone --triton DIR``): the Triton
Inference Server model repository it writes (DIR/NAME/1/model.onnx + config.pbtxt), that
config.pbtxt declares exactly the tensors of the graph beside it (read with onnx, run with
onnxruntime), the CLI refusals, and that the Triton graph, fed the numpy preprocessing the
docs describe, gives the p_rain of ``rainclf predict --engine onnx`` on real photos."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from click.testing import CliRunner  # noqa: E402

from rainclf.cli import main  # noqa: E402
from rainclf.labels import LABELS  # noqa: E402
from rainclf.onnx.format import METADATA_FILE, OnnxExportError  # noqa: E402

# glm4v-tiny at 224 px: (224 / 14)² = 256 patches of 3 · 2 (temporal) · 14² = 1176 values
PATCHES, PATCH_DIM = 256, 1176
ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64", 10: "TYPE_FP16", 11: "TYPE_FP64"}


# ------------------------------------------------------------------ a reader for config.pbtxt

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([A-Za-z_][A-Za-z0-9_]*)|(-?[0-9.]+)|([:{}\[\],]))')


def _tokens(text: str) -> list:
    out, pos, text = [], 0, text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"config.pbtxt: cannot read {text[pos:pos + 30]!r}"
        pos = m.end()
        comment, string, ident, number, punct = m.groups()
        if comment is None:
            out.append(("str", json.loads(string)) if string is not None else
                       ("id", ident) if ident is not None else
                       ("num", float(number) if "." in number else int(number)) if number is not None else
                       ("p", punct))
    return out


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format, the subset Triton configs use → {field: [values]} (every field
    repeated, messages as dicts, lists flattened into the repeated values)."""
    toks = _tokens(text)
    pos = 0

    def value():
        nonlocal pos
        kind, v = toks[pos]
        pos += 1
        if (kind, v) == ("p", "{"):
            return message("}")
        if (kind, v) == ("p", "["):
            items = []
            while toks[pos] != ("p", "]"):
                items.append(value())
                if toks[pos] == ("p", ","):
                    pos += 1
            pos += 1
            return items
        assert kind in ("str", "num", "id"), f"unexpected {v!r}"
        return v

    def message(end):
        nonlocal pos
        fields: dict = {}
        while pos < len(toks) and toks[pos] != ("p", end):
            kind, name = toks[pos]
            assert kind == "id", f"expected a field name, got {name!r}"
            pos += 1
            if toks[pos] == ("p", ":"):
                pos += 1
            v = value()
            fields.setdefault(name, []).extend(v if isinstance(v, list) and name != "dims" and
                                               name != "shape" else [v])
        pos += 1
        return fields

    return message(None)


def test_pbtxt_reader_reads_nested_messages_and_lists():
    got = parse_pbtxt('# c\nname: "a b"\nn: 3\nx [ { dims: [ 1, 2 ] r: { shape: [ ] } }, { dims: [5] } ]\n'
                      'd { q: 10 }\n')
    assert got == {"name": ["a b"], "n": [3], "x": [{"dims": [[1, 2]], "r": [{"shape": [[]]}]}, {"dims": [[5]]}],
                   "d": [{"q": [10]}]}


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_backbone):
    """A tiny glm4v-tiny linear model, exported with ``rainclf export --include-backbone --triton``."""
    from test_export import make_linear_model_dir

    root = tmp_path_factory.mktemp("triton")
    model_dir = make_linear_model_dir(root / "model", tiny_backbone)
    repo = root / "repository"
    r = CliRunner().invoke(main, ["export", str(model_dir), "--include-backbone", "--triton", str(repo)])
    assert r.exit_code == 0, r.output
    assert f"wrote {repo / 'rainclf'}: Triton model (1/model.onnx, config.pbtxt, rainclf_onnx.json)" in r.output
    return model_dir, repo / "rainclf"


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def config_of(model: Path) -> dict:
    return parse_pbtxt((model / "config.pbtxt").read_text(encoding="utf-8"))


def only(cfg: dict, key: str):
    (v,) = cfg[key]
    return v


# ------------------------------------------------------------------ the repository

def test_repository_layout_is_name_version_model_and_config(exported):
    import onnx

    model_dir, triton = exported
    assert files_under(triton) == ["1/model.onnx", "config.pbtxt", METADATA_FILE]
    onnx.checker.check_model(str(triton / "1" / "model.onnx"))
    # the labels, threshold and preprocessing travel with it, unchanged
    assert (triton / METADATA_FILE).read_bytes() == (model_dir / "onnx" / METADATA_FILE).read_bytes()
    meta = json.loads((triton / METADATA_FILE).read_text(encoding="utf-8"))
    assert meta["labels"] == list(LABELS) and 0 < meta["threshold"] < 1
    # the export rainclf itself serves keeps its flat (B · patches, patch_dim) input
    flat = onnx.load(str(model_dir / "onnx" / "model.onnx"), load_external_data=False)
    assert [d.dim_value or d.dim_param for d in flat.graph.input[0].type.tensor_type.shape.dim] == \
        ["patches", PATCH_DIM]


def test_config_pbtxt_declares_the_tensors_of_the_graph(exported):
    import onnx
    import onnxruntime as ort

    _, triton = exported
    cfg = config_of(triton)
    assert (only(cfg, "name"), only(cfg, "backend"), only(cfg, "max_batch_size")) == ("rainclf", "onnxruntime", 32)
    assert only(cfg, "dynamic_batching") == {"max_queue_delay_microseconds": [5000]}

    graph = onnx.load(str(triton / "1" / "model.onnx")).graph
    (inp,) = cfg["input"]
    (g_in,) = graph.input
    dims = g_in.type.tensor_type.shape.dim
    assert only(inp, "name") == g_in.name == "pixel_values"
    assert only(inp, "data_type") == ONNX_TO_TRITON[g_in.type.tensor_type.elem_type] == "TYPE_FP32"
    # Triton's dims leave out the batch axis, which the graph must keep free (max_batch_size > 0)
    assert dims[0].dim_param and not dims[0].dim_value
    assert only(inp, "dims") == [d.dim_value for d in dims[1:]] == [PATCHES, PATCH_DIM]

    # outputs: the same names and types as the graph, and per-image dims equal to what
    # onnxruntime really returns for a batch of 3 (p_rain: one value per image, dims [1] reshaped to [])
    outputs = {only(o, "name"): o for o in cfg["output"]}
    assert sorted(outputs) == sorted(o.name for o in graph.output) == ["embeddings", "logits", "p_rain"]
    session = ort.InferenceSession(str(triton / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, PATCHES, PATCH_DIM)).astype(np.float32)
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": x})))
    for o in graph.output:
        entry, shape = outputs[o.name], got[o.name].shape
        assert only(entry, "data_type") == ONNX_TO_TRITON[o.type.tensor_type.elem_type]
        assert got[o.name].dtype == np.float32 and shape[0] == 3
        if len(shape) == 1:
            assert only(entry, "dims") == [1] and only(entry, "reshape") == {"shape": [[]]}
        else:
            assert only(entry, "dims") == list(shape[1:]) and "reshape" not in entry
    assert only(outputs["logits"], "dims") == [2]
    assert only(outputs["embeddings"], "dims") == [json.loads((triton / METADATA_FILE).read_text())["dim"]]
    # p_rain is the head's sigmoid of the logit difference, per image
    logits = got["logits"].astype(np.float64)
    assert np.allclose(got["p_rain"], 1 / (1 + np.exp(logits[:, 0] - logits[:, 1])), atol=1e-6)


def test_name_and_max_batch_options_and_a_rewrite_replaces_the_model(exported, tmp_path):
    from rainclf.onnx.triton import write_triton_repository

    model_dir, _ = exported
    repo = tmp_path / "repo"
    r = CliRunner().invoke(main, ["export", str(model_dir), "--include-backbone", "-o", str(tmp_path / "exp"),
                                  "--triton", str(repo), "--triton-name", "sky_v2", "--triton-max-batch", "8"])
    assert r.exit_code == 0, r.output
    cfg = config_of(repo / "sky_v2")
    assert (only(cfg, "name"), only(cfg, "max_batch_size")) == ("sky_v2", 8)
    # a second write over a rainclf model replaces it whole (a stray file does not survive)
    (repo / "sky_v2" / "1" / "stale.onnx").write_bytes(b"old")
    info = write_triton_repository(model_dir, repo, "sky_v2", max_batch_size=4, max_queue_delay_us=100)
    assert info["files"] == ["1/model.onnx", "config.pbtxt", METADATA_FILE] == files_under(repo / "sky_v2")
    cfg = config_of(repo / "sky_v2")
    assert (only(cfg, "max_batch_size"), only(cfg, "dynamic_batching")) == (4, {"max_queue_delay_microseconds": [100]})
    assert sorted(p.name for p in repo.iterdir()) == ["sky_v2"]      # no temporary folder left


def test_cli_refuses_triton_without_the_image_graph_in_one_line(exported, tmp_path):
    model_dir, _ = exported
    before = files_under(model_dir / "onnx")
    repo = tmp_path / "repo"
    r = CliRunner().invoke(main, ["export", str(model_dir), "--triton", str(repo)])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "rainclf: error: --triton needs the image graph (Triton receives pixel tensors): add --include-backbone"]
    assert not repo.exists() and files_under(model_dir / "onnx") == before     # refused before exporting


def test_refusals_of_the_library_name_the_fix(exported, tmp_path):
    from rainclf.onnx.export import export_onnx
    from rainclf.onnx.triton import write_triton_repository

    model_dir, _ = exported
    head_only = tmp_path / "head-only"
    export_onnx(model_dir, head_only, include_backbone=False)
    with pytest.raises(OnnxExportError, match="has no image graph.*re-export with --include-backbone"):
        write_triton_repository(head_only, tmp_path / "repo")
    with pytest.raises(ValueError, match="--triton-name 'a b'"):
        write_triton_repository(model_dir, tmp_path / "repo", name="a b")
    (tmp_path / "repo" / "theirs").mkdir(parents=True)
    (tmp_path / "repo" / "theirs" / "config.pbtxt").write_text("name: \"theirs\"\n")
    with pytest.raises(FileExistsError, match="is not a rainclf Triton model"):
        write_triton_repository(model_dir, tmp_path / "repo", name="theirs")
    assert files_under(tmp_path / "repo") == ["theirs/config.pbtxt"]        # someone else's model untouched
    r = CliRunner().invoke(main, ["export", str(model_dir), "--include-backbone", "-o", str(tmp_path / "exp"),
                                  "--triton", str(tmp_path / "repo"), "--triton-name", "theirs"])
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("rainclf: error: ")
    assert "is not a rainclf Triton model: choose another --triton-name" in r.output


# ------------------------------------------------------------------ parity with predict --engine onnx

def test_triton_graph_on_numpy_pixels_equals_predict_engine_onnx_on_real_photos(exported, weather_dir, tmp_path):
    """What a Triton client does (docs/serving.md): decode, rainclf.onnx.runtime.preprocess one
    image → (patches, patch_dim), stack along the batch axis, run model.onnx, threshold p_rain."""
    import onnxruntime as ort

    from rainclf.data.images import decode_image
    from rainclf.onnx.format import OnnxMetadata
    from rainclf.onnx.runtime import preprocess

    model_dir, triton = exported
    images = sorted((weather_dir / "images").glob("*.jpg"))
    photos = [p for kind in ("rain", "cloudy", "shine", "sunrise") for p in
              [q for q in images if q.name.startswith(kind)][:3]]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copyfile(p, folder / p.name)
    out = tmp_path / "pred.csv"
    r = CliRunner().invoke(main, ["predict", str(folder), "--model", str(model_dir), "--engine", "onnx",
                                  "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    expected = {Path(row["path"]).name: (row["label"], float(row["p_rain"]))
                for row in csv.DictReader(io.StringIO(out.read_text(encoding="utf-8")))}
    assert len(expected) == len(photos) == 12

    meta = json.loads((triton / METADATA_FILE).read_text(encoding="utf-8"))
    # rainclf_onnx.json "input", as a client with rainclf installed reads it
    spec = OnnxMetadata.from_json((triton / METADATA_FILE).read_text(encoding="utf-8"), METADATA_FILE).input_spec
    assert (spec.patches_per_image, spec.patch_dim) == (PATCHES, PATCH_DIM)
    pixels = np.stack([preprocess([decode_image(p.read_bytes(), p.name)], spec) for p in photos])
    assert pixels.shape == (12, PATCHES, PATCH_DIM) and pixels.dtype == np.float32
    session = ort.InferenceSession(str(triton / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    # one request of 12, and the batches Triton could form from requests of 1, 4 and 7 images
    whole = session.run(["p_rain"], {"pixel_values": pixels})[0]
    parts = np.concatenate([session.run(["p_rain"], {"pixel_values": pixels[lo:hi]})[0]
                            for lo, hi in ((0, 1), (1, 5), (5, 12))])
    for p_rain in (whole, parts):
        assert p_rain.shape == (12,)
        for p, got in zip(photos, p_rain):
            label, want = expected[p.name]
            assert float(got) == pytest.approx(want, abs=1e-6)
            assert (LABELS[1] if got >= meta["threshold"] else LABELS[0]) == label
    assert np.ptp(whole) > 1e-4      # the photos get different answers: not a constant graph
