"""Reliability: a photo folder full of bad inputs, fit-side data errors, mismatched model directories.

One folder holds every kind of bad file next to good ones (and good ones in unusual modes); predict
through the library and through the CLI must label every good file, give each bad one a single-line
error naming it, and write exactly one row per file. Data errors in fit must be reported with the
line number before any model is built. Model directories that do not fit the backbone, feature,
layer or dimension are refused with exit status 2 and one line saying what differs and what to do.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import write_class_folders
from PIL import Image, features

from rainclf.cli import main
from rainclf.config import RunOptions
from rainclf.data.datasets import DataError
from rainclf.data.images import NoImagesError, describe_path
from rainclf.embed.extract import embed_paths
from rainclf.fit import FitOptions, fit
from rainclf.labels import LABELS
from rainclf.model import CONFIG_FILE, ModelDirError, load_classifier
from rainclf.predict import predict

CPU = RunOptions(device="cpu", progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("rel-data") / "train", n_per_class=6)


@pytest.fixture(scope="module")
def model_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel-models") / "vision"
    fit(dataset, out, FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None))
    return out


# ---------------------------------------------------------------------------------------------
# the bad-input folder


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (checksums right, pixel data tiny)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def _sky(w: int, h: int, seed: int, dark: bool) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array((70, 75, 85) if dark else (90, 160, 235))
    return Image.fromarray(np.clip(base + rng.normal(0, 18, (h, w, 3)), 0, 255).astype(np.uint8))


def _asymmetric(w: int = 80, h: int = 40) -> Image.Image:
    """Left dark, right bright, a vertical gradient: every rotation looks different."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (40, 45, 60)
    arr[:, w // 2:] = (120, 180, 250)
    arr[..., 0] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


# name -> None (must be predicted) or a substring of the error it must get
GOOD = ["good0.jpg", "good1.png", "UPPER.JPG", "png_named.jpg", "alpha.png", "alpha_flat.png",
        "palette.png", "cmyk.jpg", "gray16.png", "gray.jpg", "exif.jpg", "rotated.png", "tiny.png",
        "big.jpg", "anim.gif", "anim_first.png", "anim_second.png", "sub/nested.jpg"]
BAD = {"empty.jpg": "empty file (0 bytes)", "cut.jpg": "truncated JPEG", "text.jpg": "not an image",
       "bomb.png": "too many pixels", "bombwarn.png": "too many pixels",
       "loop.jpg": "symlink loop", "dangling.jpg": "broken symlink", "locked.jpg": "permission denied",
       "pipe.jpg": "not a regular file"}
NON_UTF8 = b"sky_\xff\xfe.jpg"


def _build_bad_folder(folder: Path) -> dict[str, str | None]:
    folder.mkdir()
    (folder / "sub").mkdir()
    (folder / "emptysub").mkdir()  # an empty subfolder: nothing to report
    (folder / "notes.txt").write_text("not an image extension: ignored")
    _sky(64, 48, 0, True).save(folder / "good0.jpg", quality=90)
    _sky(64, 48, 1, False).save(folder / "good1.png")
    _sky(64, 48, 2, True).save(folder / "UPPER.JPG")
    _sky(64, 48, 3, False).save(folder / "png_named.jpg", format="PNG")  # content decides
    _sky(50, 30, 4, True).save(folder / "sub" / "nested.jpg")

    rgba = _sky(64, 48, 5, True).convert("RGBA")
    alpha = np.array(rgba)
    alpha[:, :32, 3] = 0  # left half transparent
    alpha[:, 32:, 3] = 128
    rgba = Image.fromarray(alpha, "RGBA")
    rgba.save(folder / "alpha.png")
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    flat.save(folder / "alpha_flat.png")  # what the documented white compositing must give

    _sky(64, 48, 6, False).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "palette.png")
    Image.new("CMYK", (40, 30), (10, 120, 200, 30)).save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)).save(folder / "gray16.png")
    _sky(64, 48, 7, True).convert("L").save(folder / "gray.jpg")

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    _asymmetric().save(folder / "exif.jpg", exif=exif, quality=95)
    with Image.open(folder / "exif.jpg") as im:
        stored = im.convert("RGB")  # the pixels as stored, no rotation
    stored.transpose(Image.Transpose.ROTATE_270).save(folder / "rotated.png")

    Image.new("RGB", (1, 1), (30, 30, 40)).save(folder / "tiny.png")
    big = Image.new("RGB", (6000, 4000), (80, 90, 110))
    big.paste((200, 210, 230), (0, 0, 3000, 2000))
    big.save(folder / "big.jpg", quality=80)

    first, second = Image.new("RGB", (48, 32), (40, 40, 60)), Image.new("RGB", (48, 32), (250, 200, 40))
    first.save(folder / "anim.gif", save_all=True, append_images=[second], duration=100, loop=0)
    first.save(folder / "anim_first.png")
    second.save(folder / "anim_second.png")
    good = list(GOOD)
    if features.check("webp"):
        first.save(folder / "anim.webp", save_all=True, append_images=[second], duration=100, lossless=True)
        good.append("anim.webp")

    (folder / "empty.jpg").write_bytes(b"")
    (folder / "cut.jpg").write_bytes((folder / "good0.jpg").read_bytes()[:300])
    (folder / "text.jpg").write_text("this is a text file, not a photo\n")
    (folder / "bomb.png").write_bytes(_png_claiming(20000, 20000))      # > 2 x Pillow's limit: error
    (folder / "bombwarn.png").write_bytes(_png_claiming(10000, 10000))  # > 1 x the limit: a warning
    os.symlink("loop.jpg", folder / "loop.jpg")                          # points to itself
    os.symlink("gone.jpg", folder / "dangling.jpg")
    shutil.copy(folder / "good0.jpg", folder / "locked.jpg")
    (folder / "locked.jpg").chmod(0)
    os.mkfifo(folder / "pipe.jpg")
    raw = os.path.join(os.fsencode(folder), NON_UTF8)
    with open(raw, "wb") as fh:
        fh.write((folder / "good1.png").read_bytes())
    expected: dict[str, str | None] = {name: None for name in good}
    expected[os.fsdecode(NON_UTF8)] = None
    expected.update(BAD)
    return expected


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    if os.name != "posix":
        pytest.skip("symlinks, FIFOs and byte file names need a POSIX file system")
    folder = tmp_path_factory.mktemp("bad") / "photos"
    expected = _build_bad_folder(folder)
    yield folder, expected
    (folder / "locked.jpg").chmod(0o644)


@pytest.fixture(scope="module")
def locked_unreadable(bad_folder):
    """chmod 0 stops reads, except for root: there the same EACCES is produced for locked.jpg only."""
    folder, _ = bad_folder
    with pytest.MonkeyPatch.context() as mp:
        if os.access(folder / "locked.jpg", os.R_OK):
            import builtins

            import rainclf.data.images

            def guarded_open(file, *args, **kwargs):
                if os.fsencode(file).endswith(b"/locked.jpg"):
                    raise PermissionError(13, "Permission denied", os.fsdecode(file))
                return builtins.open(file, *args, **kwargs)

            mp.setattr(rainclf.data.images, "open", guarded_open, raising=False)
        yield


def _name(path: str, folder: Path) -> str:
    prefix = describe_path(folder) + "/"
    assert path.startswith(prefix), path
    return path[len(prefix):]


def _expected_names(expected: dict) -> set[str]:
    return {describe_path(n) for n in expected}


@pytest.fixture(scope="module")
def library_run(bad_folder, model_dir, locked_unreadable, tmp_path_factory):
    folder, _ = bad_folder
    out = tmp_path_factory.mktemp("bad-out") / "rows.csv"
    return predict(folder, model_dir, CPU, output=out), out


def test_every_file_gets_exactly_one_row(bad_folder, library_run):
    folder, expected = bad_folder
    run, out = library_run
    names = [_name(describe_path(r.path), folder) for r in run.rows]  # rows keep the exact name
    assert sorted(names) == sorted(_expected_names(expected))  # each exactly once, nothing else
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert sorted(_name(r["path"], folder) for r in rows) == sorted(names)
    assert run.summary.images == len(expected)
    assert run.summary.errors == len(BAD) and run.summary.predicted == len(expected) - len(BAD)


def test_good_files_are_all_predicted(bad_folder, library_run):
    folder, expected = bad_folder
    run, out = library_run
    by_name = {_name(describe_path(r.path), folder): r for r in run.rows}
    for name, problem in expected.items():
        row = by_name[describe_path(name)]
        if problem is None:
            assert row.error is None, row.error
            assert row.label in LABELS and 0.0 <= row.p_rain <= 1.0 and math.isfinite(row.p_rain), name
    rows = {_name(r["path"], folder): r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows["sky_\\xff\\xfe.jpg"]["label"] in LABELS  # the non-UTF-8 name, written escaped


def test_each_bad_file_is_one_line_naming_it(bad_folder, library_run):
    folder, _ = bad_folder
    run, out = library_run
    by_name = {_name(describe_path(r.path), folder): r for r in run.rows}
    for name, problem in BAD.items():
        row = by_name[name]
        assert row.label is None and row.p_rain is None, name
        assert "\n" not in row.error and name in row.error and problem in row.error, row.error
    rows = {_name(r["path"], folder): r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert all(rows[n]["label"] == "" and BAD[n] in rows[n]["error"] for n in BAD)


def test_documented_conversions(bad_folder, library_run):
    """Alpha over white, first frame of an animation, EXIF rotation applied: same p_rain as the
    reference image that shows what the documentation promises, and not what it rules out."""
    folder, _ = bad_folder
    run, _ = library_run
    p = {_name(describe_path(r.path), folder): r.p_rain for r in run.rows}
    assert p["alpha.png"] == pytest.approx(p["alpha_flat.png"], abs=1e-9)
    assert p["exif.jpg"] == pytest.approx(p["rotated.png"], abs=1e-9)
    assert p["anim.gif"] == pytest.approx(p["anim_first.png"], abs=1e-9)
    assert p["anim.gif"] != pytest.approx(p["anim_second.png"], abs=1e-6)
    if "anim.webp" in p:
        assert p["anim.webp"] == pytest.approx(p["anim_first.png"], abs=1e-9)
    assert p["UPPER.JPG"] is not None and p["png_named.jpg"] is not None


def test_exif_rotation_embedding_equals_manually_rotated(bad_folder, tiny_backbone):
    folder, _ = bad_folder
    with Image.open(folder / "exif.jpg") as im:
        stored = im.convert("RGB")
    assert stored.size == (80, 40)
    res = embed_paths(tiny_backbone, [folder / "exif.jpg"], batch_size=1, progress=False)
    assert res.errors == [None]
    rotated = tiny_backbone.embed([stored.transpose(Image.Transpose.ROTATE_270)])[0]
    unrotated = tiny_backbone.embed([stored])[0]
    np.testing.assert_allclose(res.vectors[0], rotated, rtol=1e-5, atol=1e-6)
    assert not np.allclose(res.vectors[0], unrotated, rtol=1e-3, atol=1e-4)


def test_broken_exif_is_ignored_silently(tmp_path):
    """An orientation tag whose data lies past the end: the photo is used as stored, and Pillow's
    "Tag data larger than file" warning (a stderr line naming no file) is not let through."""
    import io
    import warnings

    from rainclf.data.images import load_image

    exif = Image.Exif()
    exif[0x0112] = 6
    raw = bytearray(exif.tobytes())
    i = raw.find(b"\x01\x12\x00\x03") if raw[6:8] == b"MM" else raw.find(b"\x12\x01\x03\x00")
    raw[i + 4:i + 8] = struct.pack(">I" if raw[6:8] == b"MM" else "<I", 0x1000)  # count: 4096 values
    buf = io.BytesIO()
    _asymmetric().save(buf, "JPEG", exif=bytes(raw))
    (tmp_path / "badexif.jpg").write_bytes(buf.getvalue())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        im = load_image(tmp_path / "badexif.jpg")
    assert im.size == (80, 40) and [str(w.message) for w in caught] == []


def test_cli_over_the_bad_folder(bad_folder, model_dir, locked_unreadable, tmp_path):
    folder, expected = bad_folder
    out = tmp_path / "cli.csv"
    r = CliRunner().invoke(main, ["predict", str(folder), "--model", str(model_dir), "-o", str(out),
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert sorted(_name(row["path"], folder) for row in rows) == sorted(_expected_names(expected))
    skipped = [line for line in r.stderr.splitlines() if line.startswith("rainclf: skipped ")]
    assert len(skipped) == len(BAD)
    for name, problem in BAD.items():
        lines = [line for line in skipped if f"/{name}:" in line]
        assert len(lines) == 1 and problem in lines[0], (name, skipped)
    assert f"{len(expected)} images: {len(expected) - len(BAD)} predicted" in r.stderr


def test_jsonl_output_with_bad_files(bad_folder, model_dir, locked_unreadable, tmp_path):
    folder, expected = bad_folder
    out = tmp_path / "rows.jsonl"
    predict(folder, model_dir, CPU, output=out)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(expected)
    assert sum(row["label"] is None for row in rows) == len(BAD)


def test_empty_folder_and_folder_without_images(model_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "readme.txt").write_text("x")
    (other / "data.csv").write_text("a,b\n")
    with pytest.raises(NoImagesError, match="folder is empty"):
        predict(tmp_path / "empty", model_dir, CPU)
    with pytest.raises(NoImagesError, match=r"no images found \(2 other file"):
        predict(other, model_dir, CPU)
    for folder, text in ((tmp_path / "empty", "folder is empty"), (other, "no images found")):
        out = tmp_path / f"{folder.name}.csv"
        r = CliRunner().invoke(main, ["predict", str(folder), "--model", str(model_dir), "-o", str(out), "-q"])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.stderr
        assert text in r.stderr and describe_path(folder) in r.stderr
        assert not out.exists()


def test_single_bad_file_argument(model_dir, tmp_path):
    p = tmp_path / "only.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    r = CliRunner().invoke(main, ["predict", str(p), "--model", str(model_dir), "-q"])
    assert r.exit_code == 1 and "no image could be predicted" in r.stderr
    assert r.stdout.count("\n") == 2 and "only.jpg" in r.stdout


# ---------------------------------------------------------------------------------------------
# fit: data errors before any model work


@pytest.fixture
def no_model_work(monkeypatch):
    """Make building or loading any backbone fail loudly: data errors must come first."""
    import rainclf.heads.linear
    from rainclf.backbones.glm4v import Glm4vBackbone

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was built/loaded before the data was validated")

    monkeypatch.setattr(Glm4vBackbone, "load", refuse)
    monkeypatch.setattr(rainclf.heads.linear, "create_backbone", refuse)


def _record(image: str, label: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": "会下雨吗？", "image": image},
                                    {"role": "assistant", "content": label}]}, ensure_ascii=False)


@pytest.fixture
def jsonl_dir(tmp_path):
    for i in range(3):
        _sky(16, 16, i, i % 2 == 0).save(tmp_path / f"{i}.jpg")
    return tmp_path


FIT_CASES = {
    "missing_image": ([_record("0.jpg", "会下雨"), _record("nope.jpg", "不会下雨")],
                      ["train.jsonl:2", "'nope.jpg' not found"]),
    "unknown_label": ([_record("0.jpg", "会下雨"), _record("1.jpg", "不会下雨"), _record("2.jpg", "多云")],
                      ["train.jsonl:3", "unknown label '多云'", "use 会下雨 or 不会下雨"]),
    "malformed_json": ([_record("0.jpg", "会下雨"), '{"messages": [', _record("1.jpg", "不会下雨")],
                       ["train.jsonl:2", "malformed JSON"]),
    "empty_set": (["", "   "], ["train.jsonl", "no examples"]),
    "one_class": ([_record("0.jpg", "会下雨"), _record("1.jpg", "会下雨")],
                  ["only 会下雨 found", "train.jsonl", "add some 不会下雨"]),
    "not_an_object": ([_record("0.jpg", "会下雨"), "[1, 2]"], ["train.jsonl:2", "expected a JSON object"]),
}


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_data_errors_before_model_work_library(case, jsonl_dir, no_model_work):
    lines, needles = FIT_CASES[case]
    data = jsonl_dir / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        fit(data, jsonl_dir / "model", FitOptions(backbone="glm4v-tiny", device="cpu", progress=False))
    assert all(n in str(e.value) for n in needles), str(e.value)
    assert "\n" not in str(e.value)
    assert not (jsonl_dir / "model").exists()


@pytest.mark.parametrize("case", sorted(FIT_CASES))
def test_fit_data_errors_before_model_work_cli(case, jsonl_dir, no_model_work):
    lines, needles = FIT_CASES[case]
    data = jsonl_dir / "train.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = CliRunner().invoke(main, ["fit", "--backbone", "glm4v-tiny", str(data), "-o", str(jsonl_dir / "model"), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rainclf: error: "), r.stderr
    assert all(n in r.stderr for n in needles), r.stderr
    assert not (jsonl_dir / "model").exists()


def test_fit_csv_missing_image_has_line_number(jsonl_dir, no_model_work):
    data = jsonl_dir / "train.csv"
    data.write_text("label,path\n会下雨,0.jpg\n不会下雨,1.jpg\n会下雨,missing.jpg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.csv:4: image 'missing\.jpg' not found"):
        fit(data, jsonl_dir / "model", FitOptions(backbone="glm4v-tiny", device="cpu", progress=False))


# ---------------------------------------------------------------------------------------------
# mismatched model directories


@pytest.fixture(scope="module")
def answer_model(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel-models") / "answer"
    fit(dataset, out, FitOptions(backbone="glm4v-tiny", device="cpu", feature="answer", layer=-2, progress=False, cache_dir=None))
    return out


def _edited_copy(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / CONFIG_FILE).read_text(encoding="utf-8"))
    for key, value in changes.items():
        if key.startswith("backbone."):
            cfg["backbone"][key.split(".", 1)[1]] = value
        else:
            cfg[key] = value
    (dest / CONFIG_FILE).write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return dest


def _refused(model: Path, photos: Path, *needles: str, extra=()) -> str:
    r = CliRunner().invoke(main, ["predict", str(photos), "--model", str(model), "-q", "--device", "cpu",
                                  *extra])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rainclf: error: "), r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    with pytest.raises(ModelDirError):
        load_classifier(model, RunOptions(device="cpu", progress=False,
                                          backbone=extra[1] if extra else None))
    return r.stderr


def test_mismatch_backbone_fingerprint(model_dir, dataset, tmp_path):
    d = _edited_copy(model_dir, tmp_path / "m", **{"backbone.fingerprint": "0" * 64})
    _refused(d, dataset, "fingerprint 000000000000", "use the original backbone", "refit")


def test_mismatch_backbone_weights(model_dir, dataset, tmp_path):
    from safetensors.numpy import load_file, save_file

    from rainclf.backbones.glm4v import tiny_model_dir

    other = tmp_path / "other-backbone"
    shutil.copytree(tiny_model_dir(), other)
    state = load_file(str(other / "model.safetensors"))
    k = sorted(state)[-1]
    state[k] = state[k] + 1
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    _refused(model_dir, dataset, "fingerprint", "refit", extra=("--backbone", str(other)))


def test_mismatch_feature(model_dir, dataset, tmp_path):
    d = _edited_copy(model_dir, tmp_path / "m", feature="answer", layer=-1,
                     prompt="根据图片判断：会下雨还是不会下雨？")
    _refused(d, dataset, "feature", "'vision'", "'answer'", "refit")


def test_mismatch_layer(answer_model, dataset, tmp_path):
    d = _edited_copy(answer_model, tmp_path / "m", layer=-1)
    _refused(d, dataset, "layer", "-2", "-1", "refit")


def test_mismatch_embedding_dimension_in_config(model_dir, dataset, tmp_path):
    d = _edited_copy(model_dir, tmp_path / "m", dim=32)
    _refused(d, dataset, "64-d", "32", "refit")


def test_mismatch_embedding_dimension_of_head(model_dir, dataset, tmp_path):
    """A head for another embedding size (an old directory without the extraction record)."""
    from safetensors.numpy import save_file

    d = _edited_copy(model_dir, tmp_path / "m", dim=32)
    save_file({"coef": np.ones(32), "intercept": np.zeros(1), "mean": np.zeros(32), "scale": np.ones(32)},
              str(d / "head.safetensors"), metadata={"head": "linear", "C": "1.0", "params": "{}"})
    _refused(d, dataset, "32-d", "64-d", "refit")


def test_mismatch_head_copied_from_another_model(model_dir, answer_model, dataset, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    shutil.copy(answer_model / "head.safetensors", d / "head.safetensors")
    _refused(d, dataset, "feature", "refit")


def test_newer_format_version(model_dir, dataset, tmp_path):
    d = _edited_copy(model_dir, tmp_path / "m", format_version=99, rainclf_version="9.0")
    _refused(d, dataset, "format version 99", "newer rainclf", "upgrade rainclf")


@pytest.fixture(scope="module")
def exported(model_dir, answer_model, tmp_path_factory):
    """Copies of both model directories, each with its ONNX export (head graph) in MODEL_DIR/onnx."""
    root = tmp_path_factory.mktemp("rel-onnx")
    out = {}
    for name, src in (("vision", model_dir), ("answer", answer_model)):
        shutil.copytree(src, root / name)
        r = CliRunner().invoke(main, ["export", str(root / name)])
        assert r.exit_code == 0, r.output
        out[name] = root / name
    return out


ONNX_CASES = {  # (model, field in rainclf_onnx.json, new value, words the refusal must hold)
    "fingerprint": ("vision", "backbone.fingerprint", "f" * 64, ["backbone fingerprint", "ffffffffffff"]),
    "dimension": ("vision", "dim", 32, ["embedding dimension 32", "64"]),
    "feature": ("vision", "feature", "answer", ["feature answer", "vision"]),
    "threshold": ("vision", "threshold", 0.9, ["threshold 0.9"]),
    "layer": ("answer", "layer", -1, ["layer -1", "-2"]),
    "image_size": ("vision", "backbone.image_size", 168, ["image size 168", "224"]),
}


@pytest.mark.parametrize("case", sorted(ONNX_CASES))
def test_onnx_metadata_mismatch(case, exported, dataset, tmp_path):
    model, field, value, needles = ONNX_CASES[case]
    d = tmp_path / "m"
    shutil.copytree(exported[model], d)
    meta_file = d / "onnx" / "rainclf_onnx.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if "." in field:
        outer, inner = field.split(".")
        meta[outer][inner] = value
    else:
        meta[field] = value
    meta_file.write_text(json.dumps(meta), encoding="utf-8")
    _refused_onnx(d, dataset, *needles, "rainclf export")


def test_onnx_export_of_other_head_weights(exported, dataset, tmp_path):
    """The model was refitted (other head weights) but the export is the old one."""
    d = tmp_path / "m"
    shutil.copytree(exported["vision"], d)
    head = (d / "head.safetensors").read_bytes()
    from safetensors.numpy import load_file, save_file

    state = load_file(str(d / "head.safetensors"))
    state["coef"] = state["coef"] * 1.5
    from safetensors import safe_open

    with safe_open(str(d / "head.safetensors"), "numpy") as f:
        metadata = f.metadata()
    save_file(state, str(d / "head.safetensors"), metadata=metadata)
    assert (d / "head.safetensors").read_bytes() != head
    _refused_onnx(d, dataset, "other head weights", "rainclf export")


def _refused_onnx(model: Path, photos: Path, *needles: str) -> None:
    r = CliRunner().invoke(main, ["predict", str(photos), "--model", str(model), "--engine", "onnx", "-q",
                                  "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rainclf: error: "), r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_onnx_export_still_predicts_when_nothing_differs(exported, dataset):
    """The control for the cases above: the untouched export is accepted."""
    r = CliRunner().invoke(main, ["predict", str(dataset), "--model", str(exported["vision"]),
                                  "--engine", "onnx", "-q", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n") == 13
