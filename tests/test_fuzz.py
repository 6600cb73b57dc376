"""Fuzz predict: a few hundred random and mutated image files (seeded), through the decoder and
through ``rainclf predict``: zero crashes, every file accounted for exactly once.

The generator and the checks live in ``tools/fuzz_predict.py``, which runs bigger campaigns.
Pillow's pixel limit is lowered here only to bound the memory a mutated header can ask for.
"""

from __future__ import annotations

import csv
import importlib.util
from collections import Counter

import pytest
from click.testing import CliRunner
from conftest import REPO
from helpers import write_class_folders
from PIL import Image

from rainclf.cli import main
from rainclf.data.images import describe_path
from rainclf.fit import FitOptions, fit

N_FILES = 300
SEED = 20240607


def _tool():
    spec = importlib.util.spec_from_file_location("fuzz_predict", REPO / "tools" / "fuzz_predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz():
    return _tool()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-model")
    data = write_class_folders(root / "train", n_per_class=5)
    fit(data, root / "m", FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None, val_split=0.0))
    return root / "m"


@pytest.fixture(scope="module")
def corpus(fuzz, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "corpus"
    return folder, fuzz.write_corpus(folder, N_FILES, SEED)


@pytest.fixture(autouse=True)
def _bounded_pixels(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1 << 22)


def test_generator_is_seeded_and_varied(fuzz, corpus, tmp_path):
    folder, names = corpus
    again = fuzz.write_corpus(tmp_path / "again", 40, SEED)
    for name in again:
        assert (tmp_path / "again" / name).read_bytes() == (folder / name).read_bytes()
    kinds = Counter(names.values())
    assert set(kinds) == set(fuzz.MUTATIONS) and min(kinds.values()) >= 10
    assert len({(folder / n).read_bytes() for n in names}) >= N_FILES - 40  # mostly distinct


def test_decoder_never_crashes_nor_warns(fuzz, corpus):
    """Anything but an ImageError is a crash; a Pillow warning would be a stray stderr line."""
    import warnings

    folder, names = corpus
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fuzz.decode_each(folder, names) == []
    assert [str(w.message) for w in caught] == []


def test_predict_accounts_for_every_file(fuzz, corpus, model_dir, tmp_path):
    folder, names = corpus
    out = tmp_path / "fuzz.csv"
    r = CliRunner().invoke(main, ["predict", str(folder), "--model", str(model_dir), "-o", str(out),
                                  "--device", "cpu", "--batch-size", "16", "-q"])
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.exit_code == 0, r.output  # the untouched originals are predicted
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    prefix = describe_path(folder) + "/"
    seen = Counter(row["path"][len(prefix):] for row in rows)
    assert set(seen) == set(names) and set(seen.values()) == {1}
    predicted = [row for row in rows if row["label"]]
    errors = [row for row in rows if row["error"]]
    assert len(predicted) + len(errors) == N_FILES and not [row for row in predicted if row["error"]]
    for row in errors:
        name = row["path"][len(prefix):]
        assert name in row["error"] and "\n" not in row["error"], row
    # each mutation kind that keeps an image intact is predicted, each that cannot be read is not
    originals = [n for n, k in names.items() if k == "original"]
    assert all(seen[n] == 1 for n in originals)
    by_name = {row["path"][len(prefix):]: row for row in rows}
    assert all(by_name[n]["label"] for n in originals)
    assert 0 < len(predicted) < N_FILES


def test_library_campaign(fuzz, model_dir, tmp_path):
    """The tool's own campaign (another seed, the library path): no crash, nothing unaccounted."""
    res = fuzz.run_campaign(tmp_path / "corpus", model_dir, 120, SEED + 1, batch_size=16)
    assert res["crashes"] == [] and res["unaccounted"] == []
    assert res["rows"] == res["files"] == 120
    assert res["predicted"] + sum(res["errors"].values()) == 120
    assert "too many pixels" in res["errors"] or "truncated JPEG" in res["errors"]
