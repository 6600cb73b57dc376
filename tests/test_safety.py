"""Safe loading: nothing we write can carry pickled code, nothing we read runs code we were not
asked to run.

* every directory and file rainclf writes (linear, LoRA and generative model directories, the ONNX
  export, the embedding cache, embed/predict outputs) is scanned for pickle content: pickle opcodes
  at the start of a file, zip archives (torch's format, ``data.pkl`` inside), pickle-capable
  suffixes; every ``.safetensors`` file must parse as safetensors;
* the source tree is parsed (AST, not grep, so docstrings saying "never pickled" do not count):
  no pickle/joblib/dill/marshal/shelve import, no ``eval``/``exec``, no ``torch.load`` without
  ``weights_only=True``, no ``torch.save``, no ``np.load(allow_pickle=True)``, no
  ``safe_serialization=False``, and ``trust_remote_code=True`` only behind a
  ``if not ....trust_remote_code: raise`` guard in the same class;
* loading and predicting with a saved model never calls ``torch.load`` or unpickles, and the
  GLM-4V loader passes ``trust_remote_code=False``.
"""

from __future__ import annotations

import ast
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO
from helpers import write_class_folders

from rainclf.cli import main
from rainclf.config import RunOptions
from rainclf.fit import FitOptions, fit
from rainclf.model import load_classifier
from rainclf.predict import predict

PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy", ".npz", ".h5"}
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _is_pickle(path: Path) -> bool:
    """Starts with a PROTO 2..5 opcode and parses as a pickle up to its STOP opcode. (A safetensors
    file whose header is 0x0580 bytes long also starts with b"\\x80\\x05": it does not parse.)"""
    import pickletools

    data = path.read_bytes()
    if len(data) < 3 or data[0] != 0x80 or not 2 <= data[1] <= 5:
        return False
    try:
        return any(op.name == "STOP" for op, _, _ in pickletools.genops(data))
    except Exception:  # noqa: BLE001 - not a pickle stream
        return False


def pickle_findings(root: Path) -> list[str]:
    """Every reason to think a file under ``root`` (or ``root`` itself) holds pickled data."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    found = []
    for p in files:
        head = p.read_bytes()[:16]
        if p.suffix.lower() in PICKLE_SUFFIXES:
            found.append(f"{p}: pickle-capable file type {p.suffix}")
        if _is_pickle(p):
            found.append(f"{p}: a pickle (protocol {head[1]})")
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                pkl = [n for n in z.namelist() if n.endswith((".pkl", "data.pkl")) or "/data/" in n]
            found.append(f"{p}: a zip archive" + (f" with pickles {pkl[:3]}" if pkl else ""))
        if p.suffix == ".safetensors":
            data = p.read_bytes()
            (n,) = struct.unpack("<Q", data[:8])
            try:
                header = json.loads(data[8:8 + n])
            except ValueError:
                found.append(f"{p}: .safetensors without a valid JSON header")
                continue
            assert isinstance(header, dict) and 8 + n <= len(data), p
    return found


def test_scanner_finds_pickles(tmp_path):
    """The scanner itself: torch.save / pickle.dump / joblib-style files are all caught."""
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")  # a zip in disguise
    (tmp_path / "head.json").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY")
    (tmp_path / "ok.json").write_text("{}")
    found = pickle_findings(tmp_path)
    assert {Path(f.split(": ")[0]).name for f in found} == {"weights.safetensors", "head.json", "x.npy"}
    assert any("zip" in f for f in found) and any("a pickle (protocol 4)" in f for f in found)
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(struct.pack("<Q", 0x0580) + b"{" + b" " * 0x057E + b"}")  # starts with 80 05
    assert pickle_findings(fake) == []


# ---------------------------------------------------------------------------------------------
# what we write


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("safe-data") / "train", n_per_class=6, size=(112, 112))


@pytest.fixture(scope="module")
def linear_dir(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    fit(dataset, root / "linear", FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=root / "cache"))
    return root


def test_linear_model_dir_cache_and_outputs_hold_no_pickle(linear_dir, dataset):
    root = linear_dir
    predict(dataset, root / "linear", RunOptions(device="cpu", progress=False, cache_dir=root / "cache"),
            output=root / "p.jsonl")
    r = CliRunner().invoke(main, ["embed", "--backbone", "glm4v-tiny", str(dataset), "-o", str(root / "v.safetensors"), "-q",
                                  "--cache-dir", str(root / "cache")])
    assert r.exit_code == 0, r.output
    written = [root / "linear", root / "cache", root / "p.jsonl", root / "v.safetensors"]
    assert sorted(p.name for p in (root / "linear").iterdir()) == [
        "README.md", "config.json", "data_sha256.safetensors", "head.safetensors", "metrics.json"]
    assert len(list((root / "cache").rglob("*.rce"))) == 12
    for path in written:
        assert pickle_findings(path) == [], path


def test_onnx_export_holds_no_pickle(linear_dir):
    out = linear_dir / "onnx-export"
    r = CliRunner().invoke(main, ["export", str(linear_dir / "linear"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert any(p.suffix == ".onnx" for p in out.iterdir())
    assert pickle_findings(out) == []


@pytest.fixture(scope="module")
def one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("head", ["lora", "generative"])
def test_adapter_model_dirs_hold_no_pickle(head, dataset, tmp_path, one_thread):
    params = dict(steps=2, lr=1e-2, train_batch_size=4, eval_every=1, patience=5, max_new_tokens=4)
    opts = FitOptions(backbone="glm4v-tiny", head=head, feature="answer", device="cpu", progress=False, cache_dir=None,
                      val_split=0.25, head_params=params)
    fit(dataset, tmp_path / head, opts)
    files = sorted(p.relative_to(tmp_path / head).as_posix() for p in (tmp_path / head).rglob("*") if p.is_file())
    assert any(f.endswith(".safetensors") for f in files), files
    assert pickle_findings(tmp_path / head) == []


def test_committed_tiny_backbone_holds_no_pickle():
    from rainclf.backbones.glm4v import tiny_model_dir

    assert pickle_findings(tiny_model_dir()) == []


# ---------------------------------------------------------------------------------------------
# what we read


def test_predict_never_unpickles(linear_dir, dataset, monkeypatch):
    """A fresh load of model directory + backbone + prediction without torch.load or pickle."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("rainclf tried to unpickle while loading a model")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(np, "load", refuse)
    clf = load_classifier(linear_dir / "linear", RunOptions(device="cpu", progress=False, cache_dir=None))
    clf.backbone.load()
    rows = clf.predict_paths(sorted(dataset.rglob("*.jpg"))[:2])
    assert all(r.label for r in rows)


def test_glm4v_loader_never_trusts_remote_code(monkeypatch):
    import transformers

    from rainclf.backbones.base import BackboneOptions
    from rainclf.backbones.glm4v import Glm4vBackbone

    seen = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.append(kwargs)
        raise Stop

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", spy)
    backbone = Glm4vBackbone.from_name("glm4v-tiny", BackboneOptions(device="cpu", trust_remote_code=True))
    with pytest.raises(Stop):
        backbone.load()
    assert seen and all(kw.get("trust_remote_code") is False and kw.get("local_files_only") for kw in seen)


# ---------------------------------------------------------------------------------------------
# the source tree


def _attr_path(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    parts.append(node.id if isinstance(node, ast.Name) else "<expr>")  # x().eval() is not eval()
    return ".".join(reversed(parts))


def _guards_remote_code(scope: ast.AST) -> bool:
    """``if not <...>.trust_remote_code: raise ...`` somewhere in ``scope``."""
    for node in ast.walk(scope):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.UnaryOp) and isinstance(node.test.op, ast.Not)
                and _attr_path(node.test.operand).endswith("trust_remote_code")
                and any(isinstance(n, ast.Raise) for n in node.body)):
            return True
    return False


def source_findings(path: Path, base: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    found = []

    def where(node):
        return f"{path.relative_to(base)}:{node.lineno}"

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{where(node)}: import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"{where(node)}: from {node.module} import")
        elif isinstance(node, ast.Call):
            name = _attr_path(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(f"{where(node)}: {name}()")
            if name.endswith("torch.load") or name == "load" and isinstance(node.func, ast.Name):
                w = kw.get("weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    found.append(f"{where(node)}: {name}() without weights_only=True")
            if name.endswith("torch.save"):
                found.append(f"{where(node)}: torch.save() (pickle); write safetensors")
            if name.endswith(("np.load", "numpy.load")) and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value:
                found.append(f"{where(node)}: np.load(allow_pickle=True)")
            if name.endswith("read_pickle") or name.endswith("yaml.load"):
                found.append(f"{where(node)}: {name}()")
            v = kw.get("safe_serialization")
            if isinstance(v, ast.Constant) and v.value is False:
                found.append(f"{where(node)}: safe_serialization=False")
            v = kw.get("trust_remote_code")
            if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                if isinstance(v, ast.Constant):
                    # the guard must sit in the same class (e.g. in __init__), else the same function
                    chain, scope = [], node
                    while scope in parents:
                        scope = parents[scope]
                        chain.append(scope)
                    scope = next((a for a in chain if isinstance(a, ast.ClassDef)), None) or next(
                        (a for a in chain if isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
                    if scope is None or not _guards_remote_code(scope):
                        found.append(f"{where(node)}: trust_remote_code={v.value!r} without a guard")
                elif "trust_remote_code" not in ast.unparse(v):
                    found.append(f"{where(node)}: trust_remote_code={ast.unparse(v)} (not the user's flag)")
    return found


def test_source_scanner_catches_violations(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import pickle\nfrom joblib import dump\nimport torch\n"
        "x = torch.load('a.pt')\ny = torch.load('a.pt', weights_only=True)\n"
        "eval('1')\ntorch.save({}, 'b')\n"
        "def f(o):\n    return o.from_pretrained('m', trust_remote_code=True)\n"
        "class Guarded:\n    def __init__(self, options):\n        if not options.trust_remote_code:\n"
        "            raise ValueError('no')\n    def load(self, m):\n"
        "        return m.from_pretrained('x', trust_remote_code=True)\n"
        "def g(m, options):\n    return m.from_pretrained('x', trust_remote_code=options.trust_remote_code)\n"
        "def h(m, yes):\n    return m.from_pretrained('x', trust_remote_code=yes)\n"
        '"""docstrings may say pickle, torch.load(x) and eval(y): they are not code"""\n',
        encoding="utf-8")
    found = source_findings(probe, tmp_path)
    texts = " | ".join(found)
    assert "import pickle" in texts and "from joblib" in texts
    assert texts.count("without weights_only=True") == 1 and "eval()" in texts and "torch.save()" in texts
    assert texts.count("trust_remote_code=True without a guard") == 1  # f, not Guarded.load, not g
    assert "trust_remote_code=yes (not the user's flag)" in texts
    assert len(found) == 7, found


def test_source_tree_has_no_unsafe_loading():
    files = sorted((REPO / "rainclf").rglob("*.py"))
    assert len(files) >= 15
    found = [f for p in files for f in source_findings(p)]
    assert found == []


def test_chatglm_remote_code_needs_the_flag(tmp_path):
    """The one place that sets trust_remote_code=True refuses to exist without the user's flag."""
    from rainclf.backbones.base import BackboneError, BackboneOptions
    from rainclf.backbones.chatglm import ChatGLMBackbone

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm", "hidden_size": 8, "num_layers": 1}))
    with pytest.raises(BackboneError, match="--trust-remote-code"):
        ChatGLMBackbone("THUDM/glm-4v-9b", tmp_path, None, BackboneOptions(device="cpu"))
    with pytest.raises(Exception, match="--trust-remote-code"):
        from rainclf.backbones import create_backbone

        create_backbone(str(tmp_path), BackboneOptions(device="cpu"))
