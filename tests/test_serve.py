"""Tests for ``rainclf serve`` (rainclf/serve/): the real server on a free 127.0.0.1 port, in a
child process where torch and transformers cannot be imported; answers compared with
``rainclf predict --engine onnx`` on the same files."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("python_multipart")

from click.testing import CliRunner

from rainclf.cli import main
from rainclf.labels import LABELS
from rainclf.serve.client import Client, ServeHTTPError, ServerProcess, encode_multipart

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
PREDICT = sorted((SAMPLE / "predict").glob("*.jpg"))
TRAIN = sorted((SAMPLE / "train").glob("*/*.jpg"))
HEAVY = ("torch", "transformers", "sklearn", "safetensors", "peft", "timm")

# The child: torch and transformers blocked (importing them raises), the CLI run as `rainclf`,
# and at exit the heavy modules that got imported anyway are written to $RAINCLF_TEST_MODULES.
CHILD = f"""
import atexit, json, os, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
def _report():
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} and sys.modules[m] is not None)
    with open(os.environ["RAINCLF_TEST_MODULES"], "w") as f:
        json.dump(heavy, f)
atexit.register(_report)
sys.argv = ["rainclf"] + sys.argv[1:]
from rainclf.cli import main
main()
"""


class TorchFreeServer(ServerProcess):
    def __init__(self, model, tmp_path: Path, *options: str):
        self.modules_file = tmp_path / f"modules-{os.urandom(4).hex()}.json"
        env = dict(os.environ, PYTHONPATH=str(REPO), RAINCLF_TEST_MODULES=str(self.modules_file))
        super().__init__([sys.executable, "-c", CHILD, "serve", str(model), *options], env=env, cwd=str(REPO))

    def heavy_modules(self) -> list[str]:
        return json.loads(self.modules_file.read_text())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_backbone):
    pytest.importorskip("onnx")
    from test_export import make_linear_model_dir

    from rainclf.onnx.export import export_onnx

    d = make_linear_model_dir(tmp_path_factory.mktemp("serve") / "model", tiny_backbone)
    export_onnx(d, include_backbone=True)
    return d


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """One server for the read-only tests: small limits, a 20 ms batching window."""
    s = TorchFreeServer(model_dir, tmp_path_factory.mktemp("srv"), "--max-body-mb", "1",
                        "--max-image-pixels", "1000000", "--max-wait-ms", "20").start()
    yield s
    assert s.stop() == 0, s.log[-10:]
    assert s.heavy_modules() == []


def engine_onnx(model_dir, paths, tmp_path) -> dict[str, tuple[str, float]]:
    """``rainclf predict --engine onnx`` on ``paths`` (copied into one folder): name → (label, p_rain)."""
    folder = tmp_path / f"in-{os.urandom(3).hex()}"
    folder.mkdir()
    for i, p in enumerate(paths):
        (folder / f"{i:03d}_{p.name}").write_bytes(p.read_bytes())
    out = tmp_path / f"out-{os.urandom(3).hex()}.csv"
    r = CliRunner().invoke(main, ["predict", str(folder), "--model", str(model_dir), "--engine", "onnx",
                                  "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    return {Path(row["path"]).name: (row["label"], float(row["p_rain"])) for row in rows}


def named(paths) -> list[tuple[str, bytes]]:
    return [(f"{i:03d}_{p.name}", p.read_bytes()) for i, p in enumerate(paths)]


def metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    assert m, f"{name}{labels} not in /metrics"
    return float(m.group(1))


def metrics(url: str) -> str:
    status, headers, body = Client(url).get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return body.decode()


# ------------------------------------------------------------------ interface

def test_health_ready_and_model_info(server):
    c = Client(server.url)
    for path in ("/healthz", "/readyz"):
        status, _, body = c.get(path)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = c.get("/v1/model")
    info = json.loads(body)["model"]
    assert status == 200 and info["labels"] == list(LABELS) and info["random_weights"] is True
    assert info["backbone"] == "glm4v-tiny" and info["image_size"] == 224 and 0 < info["threshold"] < 1


def test_single_and_multi_file_answers_equal_predict_engine_onnx(server, model_dir, tmp_path):
    expected = engine_onnx(model_dir, PREDICT, tmp_path)
    c = Client(server.url)
    files = named(PREDICT)
    many = c.predict(files)
    assert many["model"]["name"] == "model"
    assert [p["filename"] for p in many["predictions"]] == [n for n, _ in files]     # request order
    for name, data in files:
        one = c.predict([(name, data)])["predictions"]
        assert len(one) == 1 and one[0]["error"] is None
        for got in (one[0], next(p for p in many["predictions"] if p["filename"] == name)):
            label, p = expected[name]
            assert got["label"] == label
            # same preprocessing bits; a different batch may sum in another float32 order (≈1e-7)
            assert got["p_rain"] == pytest.approx(p, abs=1e-6)
    # one image as the body, named by ?filename=
    name, data = files[0]
    for content_type in ("application/octet-stream", "image/jpeg"):
        status, _, body = c.request("POST", f"/v1/predict?filename={name}", data, {"Content-Type": content_type})
        (got,) = json.loads(body)["predictions"]
        assert status == 200 and got["filename"] == name and got["label"] == expected[name][0]


def test_concurrent_requests_are_batched_and_equal_predict_engine_onnx(server, model_dir, tmp_path):
    paths = TRAIN[:32]
    expected = engine_onnx(model_dir, paths, tmp_path)
    before = metrics(server.url)
    calls0, images0 = metric(before, "rainclf_batch_size_count"), metric(before, "rainclf_batch_size_sum")

    def one(item):
        return Client(server.url).predict([item])["predictions"][0]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, named(paths)))
    for got in answers:
        label, p = expected[got["filename"]]
        assert got["error"] is None and got["label"] == label and got["p_rain"] == pytest.approx(p, abs=1e-6)
    after = metrics(server.url)
    calls = metric(after, "rainclf_batch_size_count") - calls0
    assert metric(after, "rainclf_batch_size_sum") - images0 == 32
    assert calls < 32, "16 concurrent clients within a 20 ms window never shared an onnxruntime call"


def test_bad_parts_are_error_entries_and_the_rest_is_answered(server, tmp_path):
    good = PREDICT[0].read_bytes()
    big = io.BytesIO()
    Image.new("RGB", (1200, 1000), (90, 90, 200)).save(big, "PNG")     # 1.2 MP > --max-image-pixels 1e6
    parts = [("a.jpg", good), ("empty.jpg", b""), ("notes.jpg", b"just text"), ("cut.jpg", good[: len(good) // 2]),
             ("big.png", big.getvalue()), (None, good), ("b.jpg", good)]
    before = metrics(server.url)
    preds = Client(server.url).predict(parts)["predictions"]
    assert [p["filename"] for p in preds] == [n for n, _ in parts]
    ok = [p["error"] is None for p in preds]
    assert ok == [True, False, False, False, False, True, True]
    for p in preds:
        assert (p["label"] in LABELS) == (p["p_rain"] is not None) == (p["error"] is None)
    assert preds[1]["error"].startswith("empty.jpg: empty file")
    assert preds[2]["error"].startswith("notes.jpg: not an image")
    assert preds[3]["error"].startswith("cut.jpg: truncated JPEG")
    assert "too many pixels (1200000 > 1000000)" in preds[4]["error"] and "--max-image-pixels" in preds[4]["error"]
    assert preds[0]["p_rain"] == preds[5]["p_rain"] == preds[6]["p_rain"]   # one batch, equal inputs
    after = metrics(server.url)
    assert metric(after, "rainclf_errors_total", '{kind="bad_image"}') - \
        metric(before, "rainclf_errors_total", '{kind="bad_image"}') == 4


def _raw(url: str, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    status, response_headers, data = Client(url).request(method, path, body, headers or {})
    return status, json.loads(data)


def test_bad_requests_get_one_json_error_and_the_server_stays_up(server):
    good = PREDICT[0].read_bytes()
    form, form_type = encode_multipart([("a.jpg", good)])
    other, other_type = encode_multipart([("a.jpg", good)], field="image")
    empty_form = f"--{form_type.split('=')[1]}--\r\n".encode()
    cases = [
        # (body, headers, expected status, words in the error)
        (other, {"Content-Type": other_type}, 400, "no image parts"),
        (empty_form, {"Content-Type": form_type}, 400, "no image parts"),
        (form[: len(form) // 2], {"Content-Type": form_type}, 400, "before its closing boundary"),
        (b"garbage without any boundary", {"Content-Type": form_type}, 400, "multipart"),
        (form, {"Content-Type": "multipart/form-data"}, 400, "without a boundary"),
        (b"", {"Content-Type": "application/octet-stream"}, 400, "empty"),
        (b'{"image": "x"}', {"Content-Type": "application/json"}, 415, "unsupported Content-Type"),
        (good, {}, 415, "unsupported Content-Type"),
        (b"\0" * (1024 * 1024 + 1), {"Content-Type": "application/octet-stream"}, 413, "--max-body-mb"),
        (encode_multipart([("x.jpg", b"\0" * 700_000)] * 2)[0], {"Content-Type": form_type}, 413, "over"),
    ]
    for body, headers, status, words in cases:
        got_status, answer = _raw(server.url, "POST", "/v1/predict", body, headers)
        assert (got_status, set(answer)) == (status, {"error"}), (headers, answer)
        assert words in answer["error"]
    assert _raw(server.url, "GET", "/v1/predict")[0] == 405
    status, answer = _raw(server.url, "GET", "/no/such/route")
    assert status == 404 and "POST /v1/predict" in answer["error"]
    # still up, still right
    assert Client(server.url).predict([("a.jpg", good)])["predictions"][0]["label"] in LABELS
    text = metrics(server.url)
    for kind, n in (("no_images", 3), ("bad_multipart", 3), ("content_type", 2), ("too_large", 2)):
        assert metric(text, "rainclf_errors_total", f'{{kind="{kind}"}}') >= n
    assert 'rainclf_requests_total{route="predict",status="500"}' not in text


# ------------------------------------------------------------------ queue, shutdown, loading

def _wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out")


def test_full_queue_answers_503_with_retry_after(model_dir, tmp_path):
    # 3 images wait up to 3 s for a 4th; meanwhile a request for 2 more does not fit (503), one
    # for 1 does, fills the batch and runs it at once
    with TorchFreeServer(model_dir, tmp_path, "--max-batch", "4", "--max-queue", "4",
                         "--max-wait-ms", "3000") as s:
        first = ThreadPoolExecutor(1).submit(lambda: Client(s.url).predict(named(PREDICT[:3])))
        _wait_for(lambda: metric(metrics(s.url), "rainclf_queue_depth") == 3)
        form, form_type = encode_multipart(named(PREDICT[3:5]))
        status, headers, body = Client(s.url).request("POST", "/v1/predict", form, {"Content-Type": form_type})
        assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(body)["error"]
        t = time.monotonic()
        last = Client(s.url).predict(named(PREDICT[5:6]))
        assert time.monotonic() - t < 2.5 and last["predictions"][0]["label"] in LABELS
        assert [p["label"] in LABELS for p in first.result(timeout=10)["predictions"]] == [True] * 3
        with pytest.raises(ServeHTTPError) as too_many:
            Client(s.url).predict(named(PREDICT[:5]))
        assert too_many.value.status == 413 and "--max-queue" in too_many.value.error
        text = metrics(s.url)
        assert metric(text, "rainclf_errors_total", '{kind="queue_full"}') == 1
        assert metric(text, "rainclf_batch_size_count") == 1       # 3 + 1 images, one onnxruntime call
    assert s.stop() == 0


def test_sigterm_finishes_the_requests_in_flight_then_exits_0_without_torch(model_dir, tmp_path):
    s = TorchFreeServer(model_dir, tmp_path, "--max-wait-ms", "2000").start()
    try:
        in_flight = ThreadPoolExecutor(1).submit(lambda: Client(s.url).predict(named(PREDICT[:2])))
        _wait_for(lambda: metric(metrics(s.url), "rainclf_queue_depth") == 2)
        s.proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: any("Shutting down" in line for line in s.log))
        with pytest.raises(OSError):      # no new connections once shutting down
            Client(s.url, timeout=2).get("/healthz")
        answer = in_flight.result(timeout=30)
        assert [p["label"] in LABELS for p in answer["predictions"]] == [True, True]
        assert s.proc.wait(30) == 0
    finally:
        s.stop()
    assert s.heavy_modules() == []


def test_readyz_is_503_while_loading_and_healthz_reports_a_failed_load(model_dir):
    import uvicorn

    from rainclf.serve.app import create_app
    from rainclf.serve.config import ServeOptions
    from rainclf.serve.engine import ServedModel

    class SlowModel(ServedModel):            # the real model, whose session opens on a signal
        gate, fail = threading.Event(), False

        def load(self):
            self.gate.wait(30)
            if self.fail:
                raise RuntimeError("the GPU fell off")
            super().load()

    for fail in (False, True):
        model = SlowModel(model_dir)
        model.fail = fail
        fatal = []
        app = create_app(ServeOptions(model=str(model_dir)), model, on_fatal=fatal.append)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        _wait_for(lambda: server.started)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        status, headers, body = Client(url).get("/readyz")
        assert (status, headers.get("retry-after"), json.loads(body)) == (503, "1", {"status": "loading"})
        assert _raw(url, "GET", "/healthz") == (200, {"status": "loading"})
        with pytest.raises(ServeHTTPError) as loading:
            Client(url).predict(named(PREDICT[:1]))
        assert loading.value.status == 503 and "loading" in loading.value.error
        model.gate.set()
        if fail:
            _wait_for(lambda: fatal)
            status, answer = _raw(url, "GET", "/healthz")
            assert status == 503 and answer["status"] == "error" and "the GPU fell off" in answer["error"]
            assert _raw(url, "GET", "/readyz")[0] == 503 and "the GPU fell off" in fatal[0]
        else:
            _wait_for(lambda: Client(url).get("/readyz")[0] == 200)
            assert Client(url).predict(named(PREDICT[:1]))["predictions"][0]["label"] in LABELS
        model.gate.clear()
        server.should_exit = True
        thread.join(30)


def test_workers_share_the_socket_and_report_metrics_together(model_dir, tmp_path):
    with TorchFreeServer(model_dir, tmp_path, "--workers", "2") as s:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda item: Client(s.url).predict([item]), named(TRAIN[:12])))
        assert all(a["predictions"][0]["label"] in LABELS for a in answers)
        text = metrics(s.url)
        assert metric(text, "rainclf_images_total", '{outcome="predicted"}') == 12
        _wait_for(lambda: metric(metrics(s.url), "rainclf_ready") == 2)     # each worker loaded once
    assert s.stop() == 0


# ------------------------------------------------------------------ refusing what cannot be served

def line_of(path) -> str:
    r = CliRunner().invoke(main, ["serve", str(path)])
    assert r.exit_code == 2
    (line,) = r.output.strip().splitlines()
    return line


def test_refuses_exports_without_the_image_graph_in_one_line(model_dir, tmp_path):
    from rainclf.onnx.export import export_onnx

    head_only = tmp_path / "head-only"
    export_onnx(model_dir, head_only, include_backbone=False)
    for path, words in ((head_only, "holds only the head graph"), (tmp_path, "holds no ONNX export")):
        r = CliRunner().invoke(main, ["serve", str(path)])
        assert r.exit_code == 2
        (line,) = r.output.strip().splitlines()
        assert words in line and "rainclf export" in line and "--include-backbone" in line
    # the fix names what can be exported: an export folder cannot, its model directory can
    assert f"rainclf export {head_only} " not in line_of(head_only) and "model directory" in line_of(head_only)
    copy = tmp_path / "model-copy"
    shutil.copytree(model_dir, copy, ignore=shutil.ignore_patterns("onnx"))
    export_onnx(copy, include_backbone=False)                      # copy/onnx: the head graph only
    assert f"run: rainclf export {copy} --include-backbone" in line_of(copy)
    r = CliRunner().invoke(main, ["serve", str(model_dir), "--max-batch", "64", "--max-queue", "32"])
    assert r.exit_code == 2 and "--max-queue 32 is below --max-batch 64" in r.output


def test_encode_multipart_round_trips_through_the_server_parser():
    from rainclf.serve.uploads import uploads

    files = [("会下雨 \"quoted\".jpg", b"\x00\x01 data \r\n--not-a-boundary"), (None, b"x" * 10_000)]
    body, content_type = encode_multipart(files)
    got = uploads(content_type, body)
    assert [(u.filename, u.data) for u in got] == [('会下雨 %22quoted%22.jpg', files[0][1]), (None, files[1][1])]
    assert np.array_equal(np.frombuffer(got[1].data, np.uint8), np.full(10_000, ord("x"), np.uint8))
