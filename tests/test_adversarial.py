"""The adversarial matrix (issue 13): hostile or unlucky inputs through the command line.

Five families — images, data files, model directories, outputs, ONNX exports — each a table of
cases run through ``rainclf`` with click's CliRunner. For every case:

* the exit status is the documented one (rainclf/errors.py: 0, 1, 2 bad input, 3 output);
* stderr holds no ``Traceback`` and, on failure, exactly one ``rainclf: error:`` line;
* nothing partial appears (no output file or model directory unless the command succeeded, no
  ``.rainclf-tmp-*`` left), and nothing that existed before is changed or removed;
* every input image is accounted for once (one row each, a label or an error).

One tiny model (glm4v-tiny, random weights, data/sample/train) is fitted per module and copied
for the cases that damage it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import struct
import urllib.parse
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLE
from PIL import Image

from rainclf.cli import main
from rainclf.errors import EXIT_BAD_INPUT, EXIT_OUTPUT
from rainclf.io import OLD_PREFIX, TMP_PREFIX

ROOT = os.geteuid() == 0


# ---------------------------------------------------------------------------------------------
# fixtures and invariants


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adv-cache")


@pytest.fixture(scope="module")
def model(tmp_path_factory, cache) -> Path:
    from rainclf.fit import FitOptions, fit

    out = tmp_path_factory.mktemp("adv-model") / "m"
    fit(SAMPLE / "train", out, FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=cache))
    return out


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    """A copy of the model with its head-only ONNX export (MODEL/onnx/model.onnx)."""
    from rainclf.onnx.export import export_onnx

    copy = tmp_path_factory.mktemp("adv-onnx") / "m"
    shutil.copytree(model, copy)
    export_onnx(copy)
    return copy


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def check(result, code: int):
    """Exit status ``code``; no traceback; one error line when it failed."""
    err = result.stderr
    assert "Traceback" not in err, err
    assert result.exit_code == code, (result.exit_code, err, result.exception)
    errors = [line for line in err.splitlines() if line.startswith(("rainclf: error:", "Error: "))]
    if code not in (0,):
        assert len(errors) == 1, err
        assert "internal error" not in errors[0], err
    else:
        assert errors == [], err
    return err


def snapshot(root: Path) -> dict:
    """Every entry under ``root``: kind and content hash (what 'nothing destroyed' compares)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            digest = ""
            if stat.S_ISREG(st.st_mode):
                try:
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                except OSError:
                    digest = "unreadable"
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), digest)
    return out


def no_leftovers(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.startswith(TMP_PREFIX)]


def rows_of(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(encoding="utf-8", newline="")))


# ---------------------------------------------------------------------------------------------
# images: one bad (or odd) file beside a good one → two rows, the job goes on


def _png(width, height, data=b"") -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))


def _encoded(fmt: str, mode: str = "RGB", size=(40, 30), **kw) -> bytes:
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _jpeg() -> bytes:
    return _encoded("JPEG", quality=85)


# name → (file name (str or bytes), bytes maker, predicted?)
IMAGE_CASES = {
    "empty-jpg": ("empty.jpg", lambda: b"", False),
    "random-bytes": ("noise.jpg", lambda: np.random.default_rng(0).bytes(3000), False),
    "truncated-jpeg": ("cut.jpg", lambda: _jpeg()[:200], False),
    "jpeg-header-only": ("head.jpg", lambda: _jpeg()[:20], False),
    "text-as-png": ("notes.png", lambda: b"this is not an image\n" * 20, False),
    "png-bomb-header": ("bomb.png", lambda: _png(100000, 100000), False),
    "png-zero-size": ("zero.png", lambda: _png(0, 0), False),
    "png-bad-crc": ("crc.png", lambda: _encoded("PNG")[:30] + b"\0\0\0\0" + _encoded("PNG")[34:], False),
    "gif-empty": ("e.gif", lambda: b"GIF89a", False),
    "bmp-truncated": ("t.bmp", lambda: _encoded("BMP")[:60], False),
    "webp-garbage": ("g.webp", lambda: b"RIFF\x10\0\0\0WEBPVP8 " + b"\xff" * 40, False),
    "png-under-jpg-name": ("actually_png.jpg", lambda: _encoded("PNG"), True),
    "cmyk-jpeg": ("cmyk.jpg", lambda: _encoded("JPEG", "CMYK"), True),
    "grey-png": ("grey.png", lambda: _encoded("PNG", "L"), True),
    "rgba-png": ("rgba.png", lambda: _encoded("PNG", "RGBA"), True),
    "palette-gif": ("p.gif", lambda: _encoded("GIF", "P"), True),
    "one-pixel": ("dot.png", lambda: _encoded("PNG", size=(1, 1)), True),
    "upper-ext": ("LOUD.JPEG", _jpeg, True),
    "newline-in-name": ("a\nb.jpg", _jpeg, True),
    "backslash-n-in-name": ("a\\nb.jpg", _jpeg, True),
    "non-utf8-name": (b"sky_\xff\xfe.jpg", _jpeg, True),
    "long-name": ("x" * 200 + ".jpg", _jpeg, True),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_images(case, model, cache, tmp_path):
    name, make, ok = IMAGE_CASES[case]
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SAMPLE / "predict" / sorted(os.listdir(SAMPLE / "predict"))[0], folder / "good.jpg")
    target = os.path.join(os.fsencode(folder), name) if isinstance(name, bytes) else folder / name
    with open(target, "wb") as f:
        f.write(make())
    before = snapshot(folder)
    out = tmp_path / "rows.jsonl"
    check(cli("predict", folder, "--model", model, "-o", out, "--cache-dir", cache, "--device", "cpu", "-q"), 0)
    assert snapshot(folder) == before
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # every file once, each row naming its file exactly (os.fsencode gives the bytes back)
    want = sorted([os.fsencode(folder / "good.jpg"), os.fsencode(target)])
    assert sorted(os.fsencode(r["path"]) for r in rows) == want
    bad = [r for r in rows if r["label"] is None]
    if ok:
        assert bad == [] and all(r["label"] in ("会下雨", "不会下雨") for r in rows)
    else:
        (row,) = bad
        assert row["source"] == "error" and "\n" not in row["error"] and row["p_rain"] is None
        assert os.fsencode(row["path"]) == os.fsencode(target)


SPECIAL_ENTRIES = {
    "fifo": lambda p: os.mkfifo(p),
    "dangling-symlink": lambda p: p.symlink_to(p.parent / "nowhere.jpg"),
    "symlink-loop": lambda p: p.symlink_to(p),
    "socket": lambda p: socket.socket(socket.AF_UNIX).bind(str(p)),
}


@pytest.mark.parametrize("case", sorted(SPECIAL_ENTRIES))
def test_special_entries_in_a_folder(case, model, cache, tmp_path):
    """A FIFO (never opened: no hang), a socket or a broken link among the photos: an error row."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(SAMPLE / "predict" / sorted(os.listdir(SAMPLE / "predict"))[0], folder / "good.jpg")
    SPECIAL_ENTRIES[case](folder / "odd.jpg")
    out = tmp_path / "rows.csv"
    check(cli("predict", folder, "--model", model, "-o", out, "--cache-dir", cache, "--device", "cpu", "-q"), 0)
    rows = {Path(r["path"]).name: r for r in rows_of(out)}
    assert sorted(rows) == ["good.jpg", "odd.jpg"]
    assert rows["good.jpg"]["label"] and rows["odd.jpg"]["label"] == "" and rows["odd.jpg"]["source"] == "error"
    assert os.path.lexists(folder / "odd.jpg")


def test_paths_round_trip_in_csv(model, cache, tmp_path):
    """A newline in a name vs a literal backslash-n, and a non-UTF-8 name: distinct in CSV too."""
    folder = tmp_path / "photos"
    folder.mkdir()
    names = [b"a\nb.jpg", b"a\\nb.jpg", b"c\xff.jpg", b"plain.jpg"]
    for n in names:
        with open(os.path.join(os.fsencode(folder), n), "wb") as f:
            f.write(_jpeg())
    out = tmp_path / "rows.csv"
    check(cli("predict", folder, "--model", model, "-o", out, "--cache-dir", cache, "--device", "cpu", "-q"), 0)
    rows = rows_of(out)
    assert list(rows[0])[:2] == ["path", "path_bytes"]
    back = sorted(urllib.parse.unquote_to_bytes(r["path_bytes"]) if r["path_bytes"] else os.fsencode(r["path"])
                  for r in rows)
    assert back == sorted(os.path.join(os.fsencode(folder), n) for n in names)
    assert sum(r["path_bytes"] == "" for r in rows) == 1   # only plain.jpg is exact as printed


# ---------------------------------------------------------------------------------------------
# data files for fit: refused in one line before any model work, no model directory


def _csv(text: str):
    def make(folder: Path) -> Path:
        for name in ("a.jpg", "b.jpg"):
            (folder / name).write_bytes(_jpeg())
        p = folder / "data.csv"
        p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
        return p
    return make


def _jsonl(text: str):
    def make(folder: Path) -> Path:
        (folder / "a.jpg").write_bytes(_jpeg())
        p = folder / "data.jsonl"
        p.write_text(text, encoding="utf-8")
        return p
    return make


def _folder(*subdirs):
    def make(folder: Path) -> Path:
        d = folder / "classes"
        d.mkdir()
        for s in subdirs:
            (d / s).mkdir()
            (d / s / "x.jpg").write_bytes(_jpeg())
        return d
    return make


DATA_CASES = {
    "csv-no-label-column": _csv("path,kind\na.jpg,会下雨\n"),
    "csv-semicolon-bad-label": _csv("path;label\na.jpg;maybe\n"),
    "csv-unknown-label": _csv("path,label\na.jpg,晴\n"),
    "csv-missing-image": _csv("path,label\nnothere.jpg,会下雨\nb.jpg,不会下雨\n"),
    "csv-empty": _csv(""),
    "csv-not-utf8": _csv(b"path,label\n\xff\xfe.jpg,\xb2\xbb\n"),
    "csv-bad-quoting": _csv('path,label\n"a.jpg,会下雨\n'),
    "csv-one-label-only": _csv("path,label\na.jpg,会下雨\nb.jpg,会下雨\n"),
    "csv-remote-image": _csv("path,label\nhttp://example.com/a.jpg,会下雨\nb.jpg,不会下雨\n"),
    "jsonl-malformed": _jsonl('{"images": ["a.jpg"], "label": "会下雨"}\n{oops\n'),
    "jsonl-not-object": _jsonl("[1, 2]\n"),
    "jsonl-no-image": _jsonl('{"label": "会下雨"}\n'),
    "jsonl-two-images": _jsonl('{"images": ["a.jpg", "a.jpg"], "label": "会下雨"}\n'),
    "jsonl-nested-too-deeply": _jsonl("[" * 10 ** 5 + "]" * 10 ** 5 + "\n"),
    "jsonl-bad-messages": _jsonl('{"messages": "hi", "images": ["a.jpg"]}\n'),
    "folder-not-labels": _folder("cats", "dogs"),
    "folder-empty": _folder(),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_data_files(case, tmp_path, cache):
    work = tmp_path / "work"
    work.mkdir()
    data = DATA_CASES[case](work)
    before = snapshot(work)
    out = tmp_path / "model"
    err = check(cli("fit", data, "-o", out, "--backbone", "glm4v-tiny", "--device", "cpu", "-q",
                    "--cache-dir", cache), EXIT_BAD_INPUT)
    assert not out.exists() and snapshot(work) == before
    assert os.path.basename(str(data)) in err or "classes" in err or "data" in err
    no_leftovers(tmp_path)


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_csv_delimiter_is_detected(delimiter, tmp_path):
    from rainclf.data.datasets import load_dataset

    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(_jpeg())
    p = tmp_path / "data.csv"
    p.write_text(f"path{delimiter}label\na.jpg{delimiter}会下雨\nb.jpg{delimiter}不会下雨\n", encoding="utf-8")
    examples = load_dataset(p)
    assert [(e.path.name, e.label) for e in examples] == [("a.jpg", "会下雨"), ("b.jpg", "不会下雨")]


# ---------------------------------------------------------------------------------------------
# model directories: damaged, hostile or foreign → one line, exit 2, no output file


def _set_config(**changes):
    def damage(m: Path):
        c = json.loads((m / "config.json").read_text(encoding="utf-8"))
        for k, v in changes.items():
            if k.startswith("backbone."):
                c["backbone"][k.split(".", 1)[1]] = v
            else:
                c[k] = v
        (m / "config.json").write_text(json.dumps(c), encoding="utf-8")
    return damage


def _head_bytes(fn):
    def damage(m: Path):
        p = m / "head.safetensors"
        p.write_bytes(fn(p.read_bytes()))
    return damage


def _head_tensors(**changes):
    def damage(m: Path):
        from safetensors import safe_open
        from safetensors.numpy import save_file

        p = m / "head.safetensors"
        with safe_open(str(p), framework="numpy") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        for k, fn in changes.items():
            t[k] = fn(t[k])
        save_file(t, str(p), metadata=meta)
    return damage


def _head_meta(**changes):
    def damage(m: Path):
        from safetensors import safe_open
        from safetensors.numpy import save_file

        p = m / "head.safetensors"
        with safe_open(str(p), framework="numpy") as f:
            meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        save_file(t, str(p), metadata={**meta, **changes})
    return damage


def _header_with(fn):
    """Rewrite the JSON header of head.safetensors (same data bytes)."""
    def damage(m: Path):
        p = m / "head.safetensors"
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        fn(header)
        new = json.dumps(header).encode()
        p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return damage


def _remove(name):
    return lambda m: (m / name).unlink()


def _chatglm_checkpoint(m: Path) -> Path:
    """A checkpoint folder whose modelling code (would it ever run) leaves a marker file."""
    ckpt = m.parent / "chatglm-ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "chatglm", "hidden_size": 32, "num_layers": 2,
        "vision_config": {"hidden_size": 32, "image_size": 224},
        "auto_map": {"AutoConfig": "modeling_chatglm.C", "AutoModelForCausalLM": "modeling_chatglm.M"}}))
    (ckpt / "modeling_chatglm.py").write_text(f"open({str(m.parent / 'PWNED')!r}, 'w').write('ran')\n")
    return ckpt


def _remote_code(kind: str):
    def damage(m: Path):
        ckpt = _chatglm_checkpoint(m)
        _set_config(**{"backbone.name": str(ckpt), "backbone.kind": kind, "backbone.trust_remote_code": True})(m)
    return damage


MODEL_CASES = {
    "no-config": (_remove("config.json"), "config.json"),
    "config-not-json": (lambda m: (m / "config.json").write_text("{oops", encoding="utf-8"), "not valid JSON"),
    "config-newer-format": (_set_config(format_version=99), "newer rainclf"),
    "config-nested-too-deeply": (lambda m: (m / "config.json").write_text("[" * 10 ** 5 + "]" * 10 ** 5), "too deeply"),
    "metrics-not-json": (lambda m: (m / "metrics.json").write_text("{bad"), "metrics.json"),
    "config-unknown-key": (_set_config(evil=1), "unknown keys"),
    "config-bad-threshold": (_set_config(threshold=1.5), "threshold"),
    "config-unknown-head": (_set_config(head="magic"), "unknown"),
    "config-other-fingerprint": (_set_config(**{"backbone.fingerprint": "0" * 64}), "fingerprint"),
    "config-wrong-dim": (_set_config(dim=7), "damaged"),
    "head-missing": (_remove("head.safetensors"), "missing"),
    "head-empty": (_head_bytes(lambda b: b""), "head.safetensors"),
    "head-truncated": (_head_bytes(lambda b: b[: len(b) // 2]), "head.safetensors"),
    "head-7-bytes": (_head_bytes(lambda b: b[:7]), "truncated"),
    "head-huge-header-size": (_head_bytes(lambda b: struct.pack("<Q", 2 ** 62) + b[8:]), "header"),
    "head-header-not-json": (_head_bytes(lambda b: b[:8] + b"\xff" * (len(b) - 8)), "head.safetensors"),
    "head-offsets-outside": (_header_with(lambda h: h["coef"].update(data_offsets=[0, 10 ** 9])), "outside"),
    "head-random-bytes": (_head_bytes(lambda b: np.random.default_rng(3).bytes(len(b))), "head.safetensors"),
    "head-nan-coef": (_head_tensors(coef=lambda a: np.full_like(a, np.nan)), "NaN"),
    "head-inf-mean": (_head_tensors(mean=lambda a: np.where(np.arange(a.size) == 0, np.inf, a)), "NaN or infinite"),
    "head-metadata-malformed": (_head_meta(params="{oops"), "malformed header metadata"),
    "head-zero-scale": (_head_tensors(scale=lambda a: np.zeros_like(a)), "scale"),
    "head-wrong-shape": (_head_tensors(mean=lambda a: a[:3]), "shapes"),
    "remote-code-chatglm": (_remote_code("chatglm"), "--trust-remote-code"),
    "remote-code-as-glm4v": (_remote_code("glm4v"), "--trust-remote-code"),
    "model-dir-is-file": (lambda m: (shutil.rmtree(m), m.write_text("x")), "no such model directory"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_dirs(case, model, cache, tmp_path):
    damage, words = MODEL_CASES[case]
    m = tmp_path / "m"
    shutil.copytree(model, m)
    damage(m)
    before = snapshot(tmp_path)
    out = tmp_path / "out" / "rows.csv"
    err = check(cli("predict", SAMPLE / "predict", "--model", m, "-o", out, "--cache-dir", cache,
                    "--device", "cpu", "-q"), EXIT_BAD_INPUT)
    assert words in err, err
    assert not out.exists() and snapshot(tmp_path) == before
    assert not (tmp_path / "PWNED").exists()   # the checkpoint's code never ran


@pytest.mark.skipif(ROOT, reason="running as root: chmod 0 does not stop root from reading a file")
def test_unreadable_head(model, cache, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(model, m)
    (m / "head.safetensors").chmod(0)
    err = check(cli("predict", SAMPLE / "predict", "--model", m, "--device", "cpu", "-q"), EXIT_BAD_INPUT)
    assert "permission denied" in err


def test_remote_code_refused_for_evaluate_too(model, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(model, m)
    _remote_code("chatglm")(m)
    out = tmp_path / "report"
    err = check(cli("evaluate", SAMPLE / "train", "--model", m, "-o", out, "--no-plots", "--device", "cpu", "-q"),
                EXIT_BAD_INPUT)
    assert "needs remote code" in err and not out.exists() and not (tmp_path / "PWNED").exists()


def test_non_finite_embeddings_are_error_rows(model, tmp_path):
    """An image whose score is not finite is an error row, never a label."""
    from rainclf.heads.base import scored_rows

    rows = scored_rows(["a.jpg", "b.jpg", "c.jpg"], [None, None, "c.jpg: broken"], [float("nan"), 0.9], 0.5)
    assert [(r.label, r.source) for r in rows] == [(None, "error"), ("会下雨", "head"), (None, "head")]
    assert "non-finite" in rows[0].error


# ---------------------------------------------------------------------------------------------
# outputs: special files refused and kept, unwritable places found before work


def _fifo(tmp):
    p = tmp / "pipe.csv"
    os.mkfifo(p)
    return p


def _sock(tmp):
    p = tmp / "s.csv"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    return p


def _dir(tmp):
    p = tmp / "adir.csv"
    p.mkdir()
    return p


def _under_file(tmp):
    (tmp / "plain").write_text("keep")
    return tmp / "plain" / "rows.csv"


OUTPUT_CASES = {
    "dev-null": (lambda tmp: Path("/dev/null"), EXIT_OUTPUT, "under /dev"),
    "dev-stdout": (lambda tmp: Path("/dev/stdout"), EXIT_OUTPUT, "under /dev"),
    "link-to-dev-null": (lambda tmp: (tmp / "l.csv").symlink_to("/dev/null") or tmp / "l.csv", EXIT_OUTPUT, "under /dev"),
    "fifo": (_fifo, EXIT_OUTPUT, "FIFO"),
    "socket": (_sock, EXIT_OUTPUT, "socket"),
    "a-folder": (_dir, EXIT_BAD_INPUT, "is a directory"),   # click's own usage check
    "parent-is-a-file": (_under_file, EXIT_OUTPUT, "not a folder"),
    "name-too-long": (lambda tmp: tmp / ("r" * 250 + ".csv"), EXIT_OUTPUT, "too long"),
    "bad-extension": (lambda tmp: tmp / "rows.txt", EXIT_BAD_INPUT, ".csv or .jsonl"),
}


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_outputs_refused(case, model, cache, tmp_path):
    make, code, words = OUTPUT_CASES[case]
    target = make(tmp_path)
    kind = stat.S_IFMT(os.lstat(target).st_mode) if os.path.lexists(target) else None
    before = snapshot(tmp_path)
    err = check(cli("predict", SAMPLE / "predict", "--model", model, "-o", target, "--cache-dir", cache,
                    "--device", "cpu", "-q"), code)
    assert words in err, err
    assert snapshot(tmp_path) == before
    if kind is not None:
        assert stat.S_IFMT(os.lstat(target).st_mode) == kind   # the node is still what it was


def test_link_to_a_file_is_written_through(model, cache, tmp_path):
    (tmp_path / "link.csv").symlink_to("real.csv")
    check(cli("predict", SAMPLE / "predict", "--model", model, "-o", tmp_path / "link.csv", "--cache-dir", cache,
              "--device", "cpu", "-q"), 0)
    assert (tmp_path / "link.csv").is_symlink() and len(rows_of(tmp_path / "real.csv")) == 10


def test_dash_writes_stdout(model, cache, tmp_path):
    r = cli("predict", SAMPLE / "predict", "--model", model, "-o", "-", "--cache-dir", cache, "--device", "cpu", "-q")
    check(r, 0)
    assert r.stdout.splitlines()[0] == "path,label,p_rain,source,error" and len(r.stdout.splitlines()) == 11
    assert not (Path.cwd() / "-").exists()


def test_quiet_prints_no_summary(model, cache, tmp_path):
    r = cli("predict", SAMPLE / "predict", "--model", model, "-o", tmp_path / "r.csv", "--cache-dir", cache,
            "--device", "cpu", "-q")
    check(r, 0)
    assert "img/s" not in r.stderr


def test_tilde_is_expanded(model, cache, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    check(cli("predict", SAMPLE / "predict", "--model", model, "--output=~/o.csv", "--cache-dir", cache,
              "--device", "cpu", "-q"), 0)
    assert len(rows_of(home / "o.csv")) == 10 and not (tmp_path / "~").exists()


def test_existing_output_replaced_whole(model, cache, tmp_path):
    out = tmp_path / "rows.csv"
    out.write_text("old\n")
    check(cli("predict", SAMPLE / "predict", "--model", model, "-o", out, "--cache-dir", cache, "--device", "cpu",
              "-q"), 0)
    assert len(rows_of(out)) == 10
    no_leftovers(tmp_path)


@pytest.mark.parametrize("command", ["fit", "embed", "evaluate"])
def test_special_file_targets_of_other_commands(command, model, tmp_path):
    fifo = _fifo(tmp_path)
    args = {"fit": ["fit", SAMPLE / "train", "-o", fifo, "--backbone", "glm4v-tiny"],
            "embed": ["embed", SAMPLE / "train", "-o", fifo, "--backbone", "glm4v-tiny"],
            "evaluate": ["evaluate", SAMPLE / "train", "--model", model, "-o", tmp_path / "plain" / "r"]}[command]
    if command == "evaluate":
        (tmp_path / "plain").write_text("x")
    check(cli(*args, "--device", "cpu", "-q", "--no-cache"), EXIT_OUTPUT if command != "fit" else EXIT_BAD_INPUT)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_fit_refuses_existing_without_overwrite(model, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(model, m)
    before = snapshot(tmp_path)
    err = check(cli("fit", SAMPLE / "train", "-o", m, "--backbone", "glm4v-tiny", "--device", "cpu", "-q"),
                EXIT_BAD_INPUT)
    assert "--overwrite" in err and snapshot(tmp_path) == before


def test_all_files_of_a_model_have_one_mode(model):
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in model.iterdir()}
    mask = os.umask(0o022)
    os.umask(mask)
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_internal_error_says_so_and_debug_shows_traceback(monkeypatch, model, tmp_path):
    import rainclf.predict

    def bug(*a, **k):
        return {}["missing"]   # a KeyError from rainclf: a bug, not the user's input

    monkeypatch.setattr(rainclf.predict, "predict_local", bug)
    r = cli("predict", SAMPLE / "predict", "--model", model)
    assert r.exit_code == 70 and "internal error, please report" in r.stderr and "Traceback" not in r.stderr
    r = cli("--debug", "predict", SAMPLE / "predict", "--model", model)
    assert r.exit_code == 70 and "Traceback" in r.stderr and "KeyError" in r.stderr
    r = cli("predict", SAMPLE / "predict", "--model", model, env={"RAINCLF_DEBUG": "1"})
    assert r.exit_code == 70 and "Traceback" in r.stderr


def test_library_value_error_is_internal(monkeypatch, model):
    """A ValueError raised inside numpy (not by rainclf's own checks) is a bug, not 'bad input'."""
    import rainclf.predict

    monkeypatch.setattr(rainclf.predict, "predict_local", lambda *a, **k: np.zeros(3).reshape(7))
    r = cli("predict", SAMPLE / "predict", "--model", model)
    assert r.exit_code == 70 and "internal error" in r.stderr


# ---------------------------------------------------------------------------------------------
# the overwrite swap: no moment without a model, nothing complete ever swept


def test_overwrite_swaps_in_one_step(tmp_path, monkeypatch):
    import rainclf.io as rio

    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    seen = []
    real = rio.exchange

    def watching(a, b):
        seen.append(sorted(os.listdir(tmp_path)))
        ok = real(a, b)
        seen.append((dest / "config.json").read_text())
        return ok

    monkeypatch.setattr(rio, "exchange", watching)
    with rio.atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (dest / "config.json").read_text() == "new"
    assert "m" in seen[0] and seen[1] == "new"   # dest existed right up to the swap, then held the new one
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_killed_overwrite_leaves_old_model_that_is_never_swept(tmp_path, monkeypatch):
    import rainclf.io as rio

    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.json").write_text("old")

    def killed(*a, **k):
        raise KeyboardInterrupt   # the process dies right after the swap, before deleting the old one

    monkeypatch.setattr(rio.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        with rio.atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
    monkeypatch.undo()
    (kept,) = [p for p in tmp_path.iterdir() if p.name.startswith(OLD_PREFIX)]
    assert (kept / "config.json").read_text() == "old" and (dest / "config.json").read_text() == "new"
    old = 0.0
    os.utime(kept, (old, old))
    with rio.atomic_file(tmp_path / "other.csv") as f:   # the next write into the folder sweeps
        f.write("x")
    assert kept.exists()


def test_exchange_fallback_keeps_old_under_kept_name(tmp_path, monkeypatch):
    import rainclf.io as rio

    dest = tmp_path / "m"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    monkeypatch.setattr(rio, "exchange", lambda a, b: False)   # a system without renameat2
    with rio.atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
    assert (dest / "config.json").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["m"]


def test_write_failure_is_one_line(monkeypatch, tmp_path):
    """ENOSPC while writing → OutputError naming the file and the fix; nothing left behind."""
    import errno

    import rainclf.io as rio
    from rainclf.errors import OutputError

    class Full(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"cannot write .*rows.csv: No space left on device — free some space"):
        with rio.atomic_file(tmp_path / "rows.csv") as f:
            f.write("x" * 10)
            Full().write("x")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# ONNX exports: damaged or swapped graphs refused at load, one line


def _other_graph(dim_in: int, outputs=("logits", "p_rain")):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", dim_in])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch"]) for n in outputs]
    nodes = [helper.make_node("ReduceMean", ["embeddings"], [n], axes=[1], keepdims=0) for n in outputs]
    g = helper.make_graph(nodes, "other", [x], outs)
    return onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


def _onnx_meta(**changes):
    def damage(m: Path):
        p = m / "onnx" / "rainclf_onnx.json"
        meta = json.loads(p.read_text(encoding="utf-8"))
        meta.update(changes)
        p.write_text(json.dumps(meta), encoding="utf-8")
    return damage


def _onnx_bytes(fn):
    def damage(m: Path):
        p = m / "onnx" / "model.onnx"
        p.write_bytes(fn(p.read_bytes()))
    return damage


ONNX_CASES = {
    "truncated-graph": (_onnx_bytes(lambda b: b[: len(b) // 2]), "re-run rainclf export"),
    "random-bytes-graph": (_onnx_bytes(lambda b: np.random.default_rng(5).bytes(len(b))), "re-run rainclf export"),
    "empty-graph": (_onnx_bytes(lambda b: b""), "re-run rainclf export"),
    "swapped-graph-other-dim": (_onnx_bytes(lambda b: _other_graph(3)), "shape"),
    "graph-without-p_rain": (_onnx_bytes(lambda b: _other_graph(64, ("logits", "score"))), "p_rain"),
    "graph-file-missing": (lambda m: (m / "onnx" / "model.onnx").unlink(), "missing"),
    "metadata-not-json": (lambda m: (m / "onnx" / "rainclf_onnx.json").write_text("{", encoding="utf-8"),
                          "not valid JSON"),
    "metadata-newer": (_onnx_meta(format_version=9), "newer rainclf"),
    "metadata-other-threshold": (_onnx_meta(threshold=0.3), "does not match"),
    "metadata-missing": (lambda m: (m / "onnx" / "rainclf_onnx.json").unlink(), "rainclf export"),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_exports(case, exported, cache, tmp_path):
    damage, words = ONNX_CASES[case]
    m = tmp_path / "m"
    shutil.copytree(exported, m)
    damage(m)
    out = tmp_path / "rows.csv"
    err = check(cli("predict", SAMPLE / "predict", "--model", m, "--engine", "onnx", "-o", out,
                    "--cache-dir", cache, "--device", "cpu", "-q"), EXIT_BAD_INPUT)
    assert words in err, err
    assert not out.exists()


def test_onnx_from_dir_validates_at_load(exported, tmp_path):
    from rainclf.onnx.format import OnnxExportError
    from rainclf.onnx.runtime import OnnxClassifier

    m = tmp_path / "m"
    shutil.copytree(exported, m)
    (m / "onnx" / "model.onnx").write_bytes(_other_graph(3))
    with pytest.raises(OnnxExportError, match="shape"):
        OnnxClassifier.from_dir(m)


def test_onnx_intact_export_predicts_every_file(exported, cache, tmp_path):
    out = tmp_path / "rows.csv"
    err = check(cli("predict", SAMPLE / "predict", "--model", exported, "--engine", "onnx", "-o", out,
                    "--cache-dir", cache, "--device", "cpu"), 0)
    assert len(rows_of(out)) == 10 and "CPUExecutionProvider" in err


# ---------------------------------------------------------------------------------------------
# a real file-size limit (ulimit -f), in a subprocess: one line, exit 3, nothing partial


@pytest.mark.parametrize("command", ["predict", "fit"])
def test_file_size_limit(command, model, cache, tmp_path):
    import resource
    import subprocess
    import sys

    out = tmp_path / ("rows.csv" if command == "predict" else "m")
    args = (["predict", SAMPLE / "train", "--model", model, "-o", out] if command == "predict" else
            ["fit", SAMPLE / "train", "-o", out, "--backbone", "glm4v-tiny"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "rainclf.cli", *map(str, args), "--cache-dir", str(cache),
                           "--device", "cpu", "-q"], capture_output=True, text=True, env=env, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)))
    assert proc.returncode == EXIT_OUTPUT, proc.stderr
    assert "Traceback" not in proc.stderr and "File too large" in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("rainclf: error:")] != []
    assert os.listdir(tmp_path) == []   # nothing partial, no temporary entry


def test_reader_never_sees_no_model_during_overwrites(tmp_path):
    """A reader polling MODEL/config.json while it is replaced 40 times sees old or new, never nothing."""
    import threading

    from rainclf.io import atomic_dir

    dest = tmp_path / "m"
    with atomic_dir(dest) as tmp:
        (tmp / "config.json").write_text("0")
    stop, seen, missing = threading.Event(), set(), []

    def read():
        while not stop.is_set():
            try:
                seen.add((dest / "config.json").read_text())
            except FileNotFoundError:
                missing.append(1)

    t = threading.Thread(target=read)
    t.start()
    for i in range(1, 41):
        with atomic_dir(dest, overwrite=True) as tmp:
            (tmp / "config.json").write_text(str(i))
    stop.set()
    t.join()
    assert missing == [] and (dest / "config.json").read_text() == "40" and len(seen) > 1
    assert sorted(os.listdir(tmp_path)) == ["m"]


@pytest.mark.parametrize("cuda_loads, expected", [(True, ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                                                  (False, ["CPUExecutionProvider"])])
def test_cuda_is_asked_for_only_when_its_libraries_load(cuda_loads, expected, monkeypatch):
    """onnxruntime-gpu on a host without CUDA libraries: CPU, quietly (no red error per session)."""
    import onnxruntime

    from rainclf.onnx import providers

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(providers, "_cuda_state", {"reason": None if cuda_loads else "libcublasLt.so.12: cannot open"})
    assert providers.choose_providers() == expected


def test_cuda_probe_on_this_host_is_quiet(capfd):
    from rainclf.onnx import providers

    providers._cuda_state.clear()
    reason = providers.cuda_unusable_reason()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert reason is None or isinstance(reason, str)


@pytest.mark.parametrize("errors, words", [(0, ", 0 errors,"), (1, ", 1 error,"), (2, ", 2 errors,")])
def test_summary_counts_errors_in_words(errors, words):
    from rainclf.predict import PredictSummary

    line = PredictSummary(images=3, predicted=3 - errors, errors=errors, seconds=1.0, random_weights=False).line()
    assert words in line


def test_sweep_never_deletes_a_complete_model_left_by_an_older_rainclf(model, tmp_path):
    """An older rainclf's killed --overwrite left the previous model under .rainclf-tmp-*: kept."""
    from rainclf.io import sweep_stale

    left = tmp_path / f"{TMP_PREFIX}m.123.abcdef"
    shutil.copytree(model, left)
    half = tmp_path / f"{TMP_PREFIX}n.124.abcdef"   # a half-written one: swept
    half.mkdir()
    (half / "config.json").write_text("{")
    for p in (left, half):
        os.utime(p, (0, 0))
    (kept,) = sweep_stale(tmp_path)
    assert kept.name.startswith(OLD_PREFIX) and snapshot(kept) == snapshot(model)
    assert sorted(os.listdir(tmp_path)) == [kept.name]
