"""Interrupted and concurrent runs: kill -9 in the middle of fit, predict -o (and export when it
exists), then look at what is left on disk; damaged cache entries; two predicts sharing a cache.

Runs are real subprocesses. A small driver (written by the test, not part of rainclf) starts the
CLI with one hook that makes the kill land where work is in progress: it slows each cache write
down, or stops inside the atomic write after half the output, and then the test sends SIGKILL.
Afterwards only hidden ``.rainclf-tmp-*`` leftovers may exist; they are swept by the next write
once stale (atomic.STALE_SECONDS, so a concurrent run's temporary entry is never taken away).
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO
from helpers import solid_images, write_class_folders

from rainclf.cli import main
from rainclf.config import RunOptions
from rainclf.embed.cache import decode_entry
from rainclf.fit import FitOptions, fit
from rainclf.io import STALE_SECONDS, TMP_PREFIX
from rainclf.labels import LABELS
from rainclf.model import load_classifier, read_config
from rainclf.predict import predict

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and fork semantics are POSIX")

WAIT_S = 300  # generous: CI has 2 busy cores, and the tiny model loads in a few seconds there

DRIVER = r'''
import contextlib, os, sys, time
hook, ready = os.environ["RAINCLF_TEST_HOOK"], os.environ["RAINCLF_TEST_READY"]

def hang():
    open(ready, "w").close()  # tell the test: work is in progress now, kill me
    time.sleep(3600)

if hook == "slow-cache":        # real embedding work, each cache write followed by a pause
    from rainclf.embed.cache import EmbeddingCache
    put = EmbeddingCache.put
    def slow_put(self, sha, vector):
        put(self, sha, vector)
        time.sleep(0.25)
    EmbeddingCache.put = slow_put
elif hook == "fit-write":       # stop while the model directory is half written
    import rainclf.heads.linear
    def half_written(directory, config, metrics, **kw):
        (directory / "config.json").write_text(config.to_json()[:50], encoding="utf-8")
        hang()
    rainclf.heads.linear.write_common_files = half_written
elif hook == "predict-write":   # stop after half the output file was written and flushed
    import rainclf.outputs
    atomic_file = rainclf.outputs.atomic_file
    @contextlib.contextmanager
    def half_atomic(dest, *args, **kwargs):
        with atomic_file(dest, *args, **kwargs) as f:
            class Half:
                def write(self, text):
                    f.write(text[: len(text) // 2]); f.flush(); os.fsync(f.fileno()); hang()
            yield Half()
    rainclf.outputs.atomic_file = half_atomic
elif hook == "export-write":    # stop after the first ONNX graph was written
    import rainclf.onnx.export
    save_graph = rainclf.onnx.export._save_graph
    def save_then_stop(*args, **kwargs):
        save_graph(*args, **kwargs)
        hang()
    rainclf.onnx.export._save_graph = save_then_stop
from rainclf.cli import main
sys.argv = ["rainclf"] + sys.argv[1:]
main()
'''


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("int-data") / "train", n_per_class=6)


@pytest.fixture(scope="module")
def model_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("int-models") / "m"
    fit(dataset, out, FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None))
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int-photos") / "photos"
    folder.mkdir()
    for i, im in enumerate(solid_images(24, seed=3, size=(40, 30))):
        im.save(folder / f"p{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def reference(photos, model_dir):
    run = predict(photos, model_dir, RunOptions(device="cpu", progress=False, cache_dir=None))
    return {Path(r.path).name: r.p_rain for r in run.rows}


def _env(tmp_path: Path, hook: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")  # two runs at once on 2 busy cores: threads only fight
    if hook:
        env.update(RAINCLF_TEST_HOOK=hook, RAINCLF_TEST_READY=str(tmp_path / f"ready-{hook}"))
    return env


def _spawn(tmp_path: Path, hook: str | None, *args: str) -> subprocess.Popen:
    if hook:
        driver = tmp_path / "driver.py"
        driver.write_text(DRIVER, encoding="utf-8")
        cmd = [sys.executable, str(driver), *args]
    else:
        cmd = [sys.executable, "-m", "rainclf.cli", *args]
    return subprocess.Popen(cmd, env=_env(tmp_path, hook), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_until(proc: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}:\n{err.decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _kill9(proc: subprocess.Popen) -> None:
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def _leftovers(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name.startswith(TMP_PREFIX))


def _age(path: Path) -> None:
    old = time.time() - 2 * STALE_SECONDS
    os.utime(path, (old, old))


def _cache_entries(cache: Path) -> list[Path]:
    return sorted(cache.glob("embeddings/*/*/*.rce"))


def _rows(path: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in csv.DictReader(path.open(encoding="utf-8"))}


# ---------------------------------------------------------------------------------------------
# fit


def test_kill_during_fit_leaves_no_model_dir_and_rerun_sweeps(dataset, tmp_path):
    parent = tmp_path / "models"
    out = parent / "m"
    proc = _spawn(tmp_path, "fit-write", "fit", "--backbone", "glm4v-tiny", str(dataset), "-o", str(out), "--device", "cpu", "-q",
                  "--no-cache")
    _wait_until(proc, (tmp_path / "ready-fit-write").exists, "the model directory was being written")
    _kill9(proc)

    assert not out.exists()
    assert [p.name for p in parent.iterdir() if not p.name.startswith(".")] == []
    (left,) = _leftovers(parent)  # the half-written temporary directory, hidden
    assert (left / "head.safetensors").is_file() and len((left / "config.json").read_text()) == 50

    _age(left)
    fit(dataset, out, FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None))
    assert read_config(out).head == "linear" and not _leftovers(parent)
    rows = load_classifier(out, RunOptions(device="cpu", progress=False)).predict_paths(
        sorted(dataset.rglob("*.jpg"))[:3])
    assert all(r.label in LABELS for r in rows)


def test_kill_during_fit_overwrite_keeps_the_old_model(dataset, model_dir, tmp_path):
    import shutil

    out = tmp_path / "models" / "m"
    shutil.copytree(model_dir, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = _spawn(tmp_path, "fit-write", "fit", "--backbone", "glm4v-tiny", str(dataset), "-o", str(out), "--overwrite", "--C", "0.5",
                  "--device", "cpu", "-q", "--no-cache")
    _wait_until(proc, (tmp_path / "ready-fit-write").exists, "the new model directory was being written")
    _kill9(proc)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(_leftovers(out.parent)) == 1


# ---------------------------------------------------------------------------------------------
# predict -o, and the cache it fills


def test_kill_during_predict_keeps_valid_cache_and_no_output(photos, model_dir, reference, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out" / "pred.csv"
    proc = _spawn(tmp_path, "slow-cache", "predict", str(photos), "--model", str(model_dir), "-o", str(out),
                  "--cache-dir", str(cache), "--batch-size", "1", "--device", "cpu", "-q")
    _wait_until(proc, lambda: len(_cache_entries(cache)) >= 4, "4 embeddings were cached")
    _kill9(proc)

    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))
    entries = _cache_entries(cache)
    assert 4 <= len(entries) < len(reference)
    assert all(decode_entry(p.read_bytes()) is not None for p in entries)  # every entry intact

    clf = load_classifier(model_dir, RunOptions(device="cpu", progress=False, cache_dir=cache))
    predict(photos, model_dir, output=out, classifier=clf)
    assert clf.last_embed.n_cached == len(entries)  # the killed run's work is reused
    rows = _rows(out)
    assert rows.keys() == reference.keys()
    for name, p in reference.items():
        assert float(rows[name]["p_rain"]) == pytest.approx(p, abs=2e-6)
    assert len(_cache_entries(cache)) == len(reference)


def test_kill_while_writing_predictions_keeps_the_old_file(photos, model_dir, reference, tmp_path):
    out = tmp_path / "out" / "pred.csv"
    predict(photos, model_dir, RunOptions(device="cpu", progress=False), output=out)
    before = out.read_bytes()
    proc = _spawn(tmp_path, "predict-write", "predict", str(photos), "--model", str(model_dir), "-o",
                  str(out), "--device", "cpu", "-q")
    _wait_until(proc, (tmp_path / "ready-predict-write").exists, "the output was half written")
    _kill9(proc)

    assert out.read_bytes() == before  # the old complete file, not half of the new one
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == ["pred.csv"]
    (left,) = _leftovers(out.parent)
    assert 0 < left.stat().st_size < len(before)  # the kill landed mid-write

    _age(left)
    out.unlink()
    predict(photos, model_dir, RunOptions(device="cpu", progress=False), output=out)
    assert _rows(out).keys() == reference.keys() and not _leftovers(out.parent)


def test_damaged_cache_entries_are_recomputed(photos, model_dir, reference, tmp_path):
    cache = tmp_path / "cache"
    r = CliRunner().invoke(main, ["predict", str(photos), "--model", str(model_dir), "--cache-dir", str(cache),
                                  "-q", "-o", str(tmp_path / "a.csv")])
    assert r.exit_code == 0, r.output
    entries = _cache_entries(cache)
    assert len(entries) == len(reference)
    rng = np.random.default_rng(0)
    damage = [
        lambda b: b[: len(b) // 2],                                  # truncated
        lambda b: b[:-1] + bytes([b[-1] ^ 0x01]),                    # one bit flipped in the payload
        lambda b: b"",                                               # emptied
        lambda b: b"XXXX" + b[4:],                                   # wrong magic
        lambda b: rng.bytes(len(b)),                                 # garbage
        lambda b: b[:4] + (999).to_bytes(4, "little") + b[8:],       # wrong dimension
    ]
    for p, hurt in zip(entries, damage):
        p.write_bytes(hurt(p.read_bytes()))

    clf = load_classifier(model_dir, RunOptions(device="cpu", progress=False, cache_dir=cache))
    run = predict(photos, model_dir, output=tmp_path / "b.csv", classifier=clf)
    assert clf.last_embed.n_cached == len(reference) - len(damage)
    for row in run.rows:
        assert row.p_rain == pytest.approx(reference[Path(row.path).name], abs=2e-6)
    assert all(decode_entry(p.read_bytes()) is not None for p in _cache_entries(cache))  # rewritten


def test_two_predicts_share_one_cache_concurrently(photos, model_dir, reference, tmp_path):
    cache = tmp_path / "shared-cache"
    outs = [tmp_path / "a.csv", tmp_path / "b.csv"]
    procs = [_spawn(tmp_path, None, "predict", str(photos), "--model", str(model_dir), "-o", str(o),
                    "--cache-dir", str(cache), "--batch-size", "2", "--device", "cpu", "-q") for o in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, err.decode()[-2000:]
    a, b = (o.read_text(encoding="utf-8") for o in outs)
    assert a == b
    rows = _rows(outs[0])
    assert rows.keys() == reference.keys()
    for name, p in reference.items():
        assert float(rows[name]["p_rain"]) == pytest.approx(p, abs=2e-6)
    entries = _cache_entries(cache)
    assert len(entries) == len(reference)
    assert all(decode_entry(p.read_bytes()) is not None for p in entries)
    assert not [p for p in cache.rglob(".rainclf-tmp-*") if p.is_file()]  # no leftovers


# ---------------------------------------------------------------------------------------------
# export


def test_kill_during_export(model_dir, dataset, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    model_files = {p.name: p.read_bytes() for p in d.iterdir()}
    ready = tmp_path / "ready-export-write"

    # 1. the first export, killed after it wrote a graph: no onnx/ folder, the model untouched
    proc = _spawn(tmp_path, "export-write", "export", str(d))
    _wait_until(proc, ready.exists, "an ONNX graph was written")
    _kill9(proc)
    assert not (d / "onnx").exists()
    assert {p.name: p.read_bytes() for p in d.iterdir() if not p.name.startswith(".")} == model_files
    (left,) = _leftovers(d)
    assert any(p.suffix == ".onnx" for p in left.iterdir())  # the kill landed mid-export
    r = CliRunner().invoke(main, ["predict", str(dataset), "--model", str(d), "--engine", "onnx", "-q"])
    assert r.exit_code == 2 and "rainclf export" in r.stderr  # a clear refusal, not a broken graph

    # 2. the rerun succeeds and sweeps the stale leftover
    _age(left)
    r = CliRunner().invoke(main, ["export", str(d)])
    assert r.exit_code == 0, r.output
    assert not _leftovers(d) and (d / "onnx" / "rainclf_onnx.json").is_file()
    before = {p.name: p.read_bytes() for p in (d / "onnx").iterdir()}

    # 3. a re-export killed mid-write leaves the previous export whole
    ready.unlink()
    proc = _spawn(tmp_path, "export-write", "export", str(d))
    _wait_until(proc, ready.exists, "an ONNX graph was written again")
    _kill9(proc)
    assert {p.name: p.read_bytes() for p in (d / "onnx").iterdir()} == before
    r = CliRunner().invoke(main, ["predict", str(dataset), "--model", str(d), "--engine", "onnx", "-q"])
    assert r.exit_code == 0, r.output
