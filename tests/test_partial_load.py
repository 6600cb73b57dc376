"""Tests for rainclf.backbones.glm4v_load on glm4v-tiny (CPU): an embed loads only the modules
and tensors its feature uses, gives the same vectors as the whole model, reads sharded
checkpoints through their index, and a later whole-model ``load()`` gets everything."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from rainclf.backbones import create_backbone, glm4v_load
from rainclf.backbones.base import BackboneError, BackboneOptions
from rainclf.backbones.glm4v import tiny_model_dir
from rainclf.backbones.glm4v_load import INDEX_FILE, load_partial, parts_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
N_LAYERS = 2   # glm4v-tiny's language model


def photos(n=3):
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (48, 60 + 7 * i, 3), dtype=np.uint8)) for i in range(n)]


def all_keys():
    return sorted(load_file(str(tiny_model_dir() / "model.safetensors")))


@pytest.fixture(scope="module")
def full():
    b = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    b.load()     # outside embed: the whole checkpoint
    return b


@pytest.fixture()
def reads(monkeypatch):
    """Every tensor name the loader reads from disk."""
    log: list[str] = []
    real = glm4v_load.read_tensors
    monkeypatch.setattr(glm4v_load, "read_tensors", lambda where, names, dtype=None, _log=None:
                        real(where, names, dtype, log))
    return log


CASES = [("vision", -1, ("model.visual.",)),
         ("answer", 1, ("model.visual.", "model.language_model.embed_tokens.", "model.language_model.layers.0.")),
         ("answer", 0, ("model.visual.", "model.language_model.embed_tokens.")),
         ("answer", -1, ("model.visual.", "model.language_model.embed_tokens.", "model.language_model.layers.",
                         "model.language_model.norm."))]


@pytest.mark.parametrize("feature,layer,prefixes", CASES)
def test_partial_embed_equals_full_and_reads_only_its_tensors(full, reads, feature, layer, prefixes):
    ims = photos()
    b = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    vec = b.embed(ims, feature, layer)
    ref = full.embed(ims, feature, layer)
    assert vec.shape == ref.shape == (3, b.dim(feature))
    assert float(np.abs(vec - ref).max()) <= 1e-6
    expected = [k for k in all_keys() if k.startswith(prefixes)]
    assert sorted(reads) == expected
    assert "lm_head.weight" not in reads and len(reads) < len(all_keys())
    assert b._model.rainclf_parts == parts_for(feature, layer, N_LAYERS)


def test_whole_model_load_after_a_partial_one_reads_everything():
    b = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    b.embed(photos(1), "vision")
    assert isinstance(b._model.lm_head, glm4v_load.NotLoaded)
    model, _ = b.load()                         # LoRA, generative, export: the whole model
    assert getattr(model, "rainclf_parts", None) is None
    assert not isinstance(model.lm_head, glm4v_load.NotLoaded)
    assert model.lm_head.weight.shape[1] == b.hidden_size


def test_asking_for_more_reloads_with_the_union():
    b = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    b.embed(photos(1), "vision")
    b.embed(photos(1), "answer", 1)
    assert b._model.rainclf_parts == parts_for("vision", -1, N_LAYERS) | parts_for("answer", 1, N_LAYERS)
    before = b._model
    b.embed(photos(1), "vision")                # already covered: no reload
    assert b._model is before


def test_a_module_not_loaded_says_so():
    b = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    b.embed(photos(1), "vision")
    with pytest.raises(BackboneError, match="model.language_model was not loaded for this feature"):
        b._model.model.language_model(input_ids=None)


def test_sharded_checkpoint_is_read_through_its_index(tmp_path, full):
    src = tiny_model_dir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, tmp_path / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard), metadata={"format": "pt"})
    (tmp_path / INDEX_FILE).write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
    log: list[str] = []
    model = load_partial(tmp_path, parts_for("answer", 1, N_LAYERS), None, log)
    assert sorted(log) == [k for k in names if k.startswith(
        ("model.visual.", "model.language_model.embed_tokens.", "model.language_model.layers.0."))]
    ref = dict(full.load()[0].named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == ref[name].dtype and bool((p == ref[name]).all()), name


def test_truncated_shard_is_one_clear_error(tmp_path):
    src = tiny_model_dir()
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(BackboneError, match="truncated; re-download"):
        load_partial(tmp_path, parts_for("answer", -1, N_LAYERS), None)
