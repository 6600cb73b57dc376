"""Leak-free splits and data checks: rainclf/data/groups.py, rainclf/data/check.py (check-data),
their wiring in fit.py, and the sha256 record of what a model has seen (model.read_seen_sha256)."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import write_class_folders
from rainclf.cli import main
from rainclf.config import FitOptions
from rainclf.data.datasets import load_dataset, load_groups, stratified_split
from rainclf.data.groups import ConflictError, find_groups, image_facts
from rainclf.fit import fit, prepare_data
from rainclf.model import read_seen_sha256


def _photo(seed: int, size=(120, 90)) -> Image.Image:
    """A textured image (a random 6×6 colour field, upscaled, plus noise): distinct structure per
    seed for pHash to hash."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(field, dtype=np.float64) + rng.normal(0, 4, (size[1], size[0], 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def test_exact_copies_and_near_copies_are_grouped_unrelated_images_are_not(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"p{i}.jpg"
        _photo(i).save(p, quality=92)
        paths.append(p)
    shutil.copyfile(paths[0], tmp_path / "copy0.jpg")                         # exact copy
    _photo(1).resize((150, 112)).save(tmp_path / "near1.jpg", quality=60)     # resized, re-encoded
    paths += [tmp_path / "copy0.jpg", tmp_path / "near1.jpg"]
    facts = image_facts(paths)
    g = find_groups(facts)
    names = sorted(sorted(paths[i].name for i in m) for m in g.groups)
    assert names == [["copy0.jpg", "p0.jpg"], ["near1.jpg", "p1.jpg"]]
    assert [(paths[i].name, paths[j].name) for i, j in g.exact_pairs] == [("p0.jpg", "copy0.jpg")]
    # near-duplicates off: only the byte-identical pair remains
    assert [sorted(paths[i].name for i in m) for m in find_groups(facts, None).groups] == [["copy0.jpg", "p0.jpg"]]


def test_unreadable_file_has_an_error_and_no_hash(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    (f,) = image_facts([bad])
    assert f.error and "bad.jpg" in f.error and f.phash is None and f.sha256 == hashlib.sha256(b"not an image").hexdigest()


def test_identical_images_under_both_labels_refused_unless_allowed(tmp_path):
    data = write_class_folders(tmp_path / "d", n_per_class=6)
    shutil.copyfile(data / "会下雨" / "000.jpg", data / "不会下雨" / "dup.jpg")
    opts = FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None)
    with pytest.raises(ConflictError, match=r"byte-identical images with different labels.*--allow-conflicts") as e:
        prepare_data(data, opts)
    assert "000.jpg (会下雨" in str(e.value) and "dup.jpg (不会下雨" in str(e.value)
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / "m"), "--backbone", "glm4v-tiny", "-q"])
    assert r.exit_code == 2 and "byte-identical" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m").exists()
    train, val = prepare_data(data, FitOptions(backbone="glm4v-tiny", allow_conflicts=True, progress=False))
    # the two copies are one group: both on the same side
    copies = {data / "会下雨" / "000.jpg", data / "不会下雨" / "dup.jpg"}
    sides = {("train" if e in train else "val") for e in train + val if e.path in copies}
    assert len(sides) == 1 and sum(e.path in copies for e in train + val) == 2


def test_fit_split_keeps_listed_near_duplicates_on_one_side(weather_dir):
    """No validation photo of ../shared/weather has a listed near-twin in train (with seed 0, a
    plain split puts 27 of them there)."""
    listed = load_groups(weather_dir / "near_duplicate_groups.csv")
    examples = load_dataset(weather_dir / "train.jsonl")

    def twins(train, val):
        in_train = {listed[e.path] for e in train if e.path in listed}
        return sum(e.path in listed and listed[e.path] in in_train for e in val)

    assert twins(*stratified_split(examples, 0.2, 0)) > 20          # the leak this fixes
    opts = FitOptions(progress=False)                               # automatic groups only
    train, val = prepare_data(weather_dir / "train.jsonl", opts)
    assert twins(train, val) == 0 and 150 < len(val) < 200
    train, val = prepare_data(weather_dir / "train.jsonl", FitOptions(progress=False, near_dup_threshold=None,
                                                                      groups=str(weather_dir / "near_duplicate_groups.csv")))
    assert twins(train, val) == 0


def test_groups_file_that_matches_nothing_is_refused(tmp_path):
    data = write_class_folders(tmp_path / "d", n_per_class=4)
    groups = tmp_path / "g.csv"
    groups.write_text("group,file\n1,elsewhere/a.jpg\n1,elsewhere/b.jpg\n")
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / "m"), "--groups", str(groups), "-q"])
    assert r.exit_code == 2 and "none of its files" in r.output


def _check(args):
    return CliRunner().invoke(main, ["check-data", "-q", "--backbone", "glm4v-tiny"] + [str(a) for a in args])


def test_check_data_exit_codes_and_one_line_per_problem(tmp_path):
    clean = tmp_path / "clean"
    for label, seeds in (("会下雨", range(0, 4)), ("不会下雨", range(10, 14))):
        (clean / label).mkdir(parents=True)
        for s in seeds:
            _photo(s, (240, 240)).save(clean / label / f"{s}.png")
    r = _check([clean])
    assert r.exit_code == 0, r.output
    assert "8 images, no problems" in r.output and "4 会下雨" in r.output

    bad = tmp_path / "bad"
    shutil.copytree(clean, bad)
    shutil.copyfile(bad / "会下雨" / "0.png", bad / "不会下雨" / "conflict.png")      # both labels
    shutil.copyfile(bad / "会下雨" / "1.png", bad / "会下雨" / "again.png")          # same label
    (bad / "不会下雨" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _photo(20, (100, 80)).save(bad / "不会下雨" / "small.png")
    r = _check([bad])
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    problems = [ln for ln in lines if not ln.startswith("note:")][:-1]
    assert len(problems) == 4, r.output
    assert any("conflict.png" in ln and "byte-identical" in ln and "--allow-conflicts" in ln for ln in problems)
    assert any("again.png" in ln and "copy of" in ln for ln in problems)
    assert any("broken.png" in ln for ln in problems)
    assert any("small.png" in ln and "100×80" in ln and "224 px" in ln for ln in problems)
    assert "1 conflict, 1 exact duplicate, 1 small image, 1 unreadable" in lines[-1]

    one_label = tmp_path / "one"
    shutil.copytree(clean / "会下雨", one_label / "会下雨")
    r = _check([one_label])
    assert r.exit_code == 2 and "unusable" in r.output


def test_check_data_reports_groups_a_plain_split_would_straddle(weather_dir):
    r = _check([weather_dir / "train.jsonl", "--groups", weather_dir / "near_duplicate_groups.csv"])
    assert r.exit_code == 1                           # the small photos (below 224 px) are problems
    # hundreds of small photos: one line naming the count and the smallest, not one line each
    small = [ln for ln in r.output.splitlines() if "below the 224 px input" in ln]
    assert len(small) == 1 and "(smallest: " in small[0], small[:3]
    n_small = int(small[0].split(" of ")[0])
    assert n_small > 5 and f"{n_small} small image" in r.output.strip().splitlines()[-1]
    note = next(ln for ln in r.output.splitlines() if "near-duplicate group" in ln)
    assert "a plain random split" in note and int(note.split("would straddle ")[1].split()[0]) > 20


def test_model_directory_records_the_sha256_of_train_and_validation(tmp_path):
    data = write_class_folders(tmp_path / "d", n_per_class=6)
    res = fit(data, tmp_path / "m", FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None))
    seen = read_seen_sha256(tmp_path / "m")
    files = sorted((tmp_path / "d").rglob("*.jpg"))
    every = {hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert seen["train"] | seen["validation"] == every and not seen["train"] & seen["validation"]
    assert len(seen["validation"]) == res.metrics["n_val"] and len(seen["train"]) == res.metrics["n_train"]
    assert (tmp_path / "m" / "data_sha256.safetensors").stat().st_size < 2_000   # 32 bytes an image
    assert read_seen_sha256(tmp_path / "nothing-here") == {"train": set(), "validation": set()}
