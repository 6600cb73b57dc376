"""Tests for rainclf.onnx.quantize: int8 / fp16 image graphs with the head kept fp32, agreement
measured against a reference, refusal below --min-agreement (nothing replaced), option checks.
A small conv graph with the exporter's /features/… and /head/… node names stands in for an image
graph, so the tests need no backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")   # the onnx extra; CI installs it (a skip here fails the run)

from rainclf.cli import main  # noqa: E402
from rainclf.onnx.format import OnnxExportError  # noqa: E402
from rainclf.onnx.quantize import (  # noqa: E402
    AgreementError,
    check_options,
    convert_image_graph,
    graph_p_rain,
)


class Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 2)

    def forward(self, e):
        logits = self.linear(e)
        return logits, torch.softmax(logits, -1)[:, 1]


class Graph(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU6(),
                                            torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),
                                            torch.nn.Conv2d(16, 16, 1), torch.nn.AdaptiveAvgPool2d(1),
                                            torch.nn.Flatten())
        self.head = Head()

    def forward(self, pixel_values):
        e = self.features(pixel_values)
        logits, p = self.head(e)
        return logits, p, e


@pytest.fixture()
def graph(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    torch.onnx.export(Graph().eval(), (torch.zeros(2, 3, 16, 16),), str(path), dynamo=False, opset_version=18,
                      input_names=["pixel_values"], output_names=["logits", "p_rain", "embeddings"],
                      dynamic_axes={"pixel_values": {0: "batch"}, "p_rain": {0: "batch"},
                                    "logits": {0: "batch"}, "embeddings": {0: "batch"}})
    px = np.random.default_rng(1).normal(0, 1, (40, 3, 16, 16)).astype(np.float32)
    return path, px


def initializer_types(path):
    import onnx

    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


def test_int8_keeps_the_head_fp32_and_records_agreement(graph):
    import onnx

    path, px = graph
    ref = graph_p_rain(path, px, 1)
    entry = convert_image_graph(path, px, 1, ref, 0.5, "int8", "fp32", 0.5)
    assert entry["quantize"] == "int8" and entry["method"].startswith("static QDQ")
    assert entry["n_images"] == 40 and entry["fp32_graph"]["label_agreement"] == 1.0
    assert 0.5 <= entry["label_agreement"] <= 1.0 and entry["max_abs_dp"] < 0.5
    model = onnx.load(str(path))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    # the head's Gemm reads its fp32 weight directly, not through a DequantizeLinear
    produced_by = {o: n.op_type for n in model.graph.node for o in n.output}
    head_gemm = [n for n in model.graph.node if n.name.startswith("/head/") and n.op_type == "Gemm"]
    assert head_gemm and produced_by.get(head_gemm[0].input[1]) != "DequantizeLinear"
    assert not list(path.parent.glob("*.converted.onnx"))


def test_below_min_agreement_is_refused_and_the_graph_is_untouched(graph):
    path, px = graph
    before = path.read_bytes()
    wrong = 1.0 - graph_p_rain(path, px, 1)      # a "torch" that disagrees on every image
    with pytest.raises(AgreementError, match=r"agrees with torch on 0\.0% of 40 calibration images"):
        convert_image_graph(path, px, 1, wrong, 0.5, "int8", "fp32", 0.98)
    assert path.read_bytes() == before
    assert not list(path.parent.glob("*.converted.onnx"))


def test_fp16_graph_is_close_and_half_precision(graph):
    path, px = graph
    ref = graph_p_rain(path, px, 1)
    entry = convert_image_graph(path, px, 1, ref, 0.5, None, "fp16", 0.98)
    assert entry["precision"] == "fp16" and entry["label_agreement"] == 1.0
    assert entry["max_abs_dp"] < 5e-3
    assert 10 in initializer_types(path)          # TensorProto.FLOAT16
    assert 1 in initializer_types(path)           # the head's weights stay FLOAT


def test_option_checks():
    assert check_options(None, "fp32", False) is False
    assert check_options("int8", "fp32", True) is True
    with pytest.raises(OnnxExportError, match="add --include-backbone"):
        check_options("int8", "fp32", False)
    with pytest.raises(OnnxExportError, match="--precision 'bf16'"):
        check_options(None, "bf16", True)


def test_cli_quantize_without_image_graph_exits_2(tmp_path):
    r = CliRunner().invoke(main, ["export", str(tmp_path), "--quantize", "int8"])
    assert r.exit_code == 2
    assert "convert the image graph: add --include-backbone" in r.output


def test_cli_quantize_without_calibration_exits_2(tmp_path):
    r = CliRunner().invoke(main, ["export", str(tmp_path), "--include-backbone", "--quantize", "int8"])
    assert r.exit_code == 2
    assert "need --calibration DIR" in r.output
