"""A saved classifier is a directory, and this module reads, writes, checks and loads it:

    config.json        everything needed to reload: backbone identity and fingerprint, feature,
                       layer, image size, prompt, labels, threshold, head type, format version
    head.safetensors   the head's weights (linear); LoRA heads add adapter/ + score.safetensors
    metrics.json       validation metrics measured at fit time (+ the collapse flag, report/collapse.py)
    README.md          a model card a person can read
    data_sha256.safetensors  sha256 of every training and validation image (uint8 (N, 32) arrays
                       ``train`` and ``validation``), so later tools can tell what a model has seen:
                       ``read_seen_sha256(model_dir)``

It is written atomically (temporary directory, then rename) and never contains pickles.
``load_classifier(dir)`` rebuilds the backbone config.json names (``backbone_for``, which refuses a
backbone with another fingerprint) and returns the head's classifier (``heads.base.Classifier``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rainclf import __version__
from rainclf.backbones import create_backbone
from rainclf.backbones.base import Backbone, BackboneOptions
from rainclf.config import RunOptions
from rainclf.jsonfile import read_versioned
from rainclf.labels import LABELS
from rainclf.report.collapse import collapse_flag, collapse_message

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
SEEN_FILE = "data_sha256.safetensors"
SEEN_SPLITS = ("train", "validation")


class ModelDirError(ValueError):
    """The model directory is missing, damaged, too new, or does not fit the backbone."""


@dataclass
class ModelConfig:
    head: str                          # linear | lora | generative
    backbone: dict                     # Backbone.describe(): name, kind, fingerprint, random_weights, image_size
    feature: str                       # vision | answer
    layer: int = -1
    prompt: str | None = None
    dim: int | None = None             # embedding dimension the head expects
    threshold: float = 0.5
    labels: list = field(default_factory=lambda: list(LABELS))
    head_params: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    rainclf_version: str = __version__
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def __post_init__(self):
        if self.feature not in ("vision", "answer"):
            raise ModelDirError(f"feature must be vision or answer, not {self.feature!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ModelDirError(f"threshold must lie in (0, 1), got {self.threshold}")
        if list(self.labels) != list(LABELS):
            raise ModelDirError(f"labels must be {list(LABELS)}, got {self.labels}")

    @property
    def image_size(self) -> int:
        return int(self.backbone["image_size"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = CONFIG_FILE) -> "ModelConfig":
        return read_versioned(cls, text, source, ModelDirError, FORMAT_VERSION, "rainclf model directory",
                              "the model directory is damaged; refit it")


def read_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    path = model_dir / CONFIG_FILE
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir}: no such model directory (make one with: rainclf fit DATA -o {model_dir})")
    if not path.is_file():
        raise ModelDirError(f"{model_dir} has no {CONFIG_FILE}: not a rainclf model directory")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelDirError(f"{path}: cannot read ({e.strerror}) — make it readable or run as its owner") from None
    except UnicodeDecodeError:
        raise ModelDirError(f"{path}: not UTF-8 text — the model directory is damaged; restore it or refit") from None
    return ModelConfig.from_json(text, str(path))


def read_metrics(model_dir: str | Path) -> dict:
    path = Path(model_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelDirError(f"{path}: cannot be read ({type(e).__name__}) — the model directory is damaged; "
                            "restore it or refit") from None
    if not isinstance(data, dict):
        raise ModelDirError(f"{path}: not a JSON object — the model directory is damaged; restore it or refit")
    return data


def write_common_files(directory: Path, config: ModelConfig, metrics: dict, seen: tuple | None = None) -> None:
    """config.json, metrics.json and the model card, into an (atomic, temporary) directory.
    The collapse flag (``report.collapse``) is added to ``metrics`` here, for every head;
    ``seen`` = (train examples, validation examples) are recorded by sha256 (``SEEN_FILE``)."""
    flag = collapse_flag(metrics.get("validation"))
    if flag:
        metrics["collapse"] = flag
    if seen is not None:
        write_seen_sha256(directory, *seen)
    (directory / CONFIG_FILE).write_text(config.to_json(), encoding="utf-8")
    (directory / METRICS_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n",
                                          encoding="utf-8")
    (directory / CARD_FILE).write_text(model_card(config, metrics), encoding="utf-8")


def _sha256_rows(examples):
    """(N, 32) uint8: the sha256 of each example's file, sorted and unique (unreadable files left out)."""
    import numpy as np

    digests = set()
    for e in examples:
        try:
            digests.add(hashlib.sha256(Path(e.path).read_bytes()).digest())
        except OSError:
            continue   # the head skipped it too
    rows = sorted(digests)
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), 32).copy()


def write_seen_sha256(directory: Path, train, validation) -> None:
    """``SEEN_FILE``: which images (by content) a model was trained and validated on."""
    from safetensors.numpy import save_file

    save_file({"train": _sha256_rows(train), "validation": _sha256_rows(validation)},
              str(Path(directory) / SEEN_FILE), metadata={"format": "sha256 rows, uint8 (N, 32)"})


def read_seen_sha256(model_dir: str | Path) -> dict[str, set[str]]:
    """``{"train": {hex sha256, …}, "validation": {…}}`` of the images a model directory was fit
    on; empty sets for a directory written before rainclf recorded them."""
    from safetensors.numpy import load_file

    path = Path(model_dir) / SEEN_FILE
    if not path.is_file():
        return {split: set() for split in SEEN_SPLITS}
    try:
        arrays = load_file(str(path))
    except Exception as e:   # safetensors raises its own error types for a damaged header
        raise ModelDirError(f"{path}: not a valid safetensors file ({e}) — refit the model") from None
    out = {}
    for split in SEEN_SPLITS:
        rows = arrays.get(split)
        if rows is None or rows.ndim != 2 or rows.shape[1] != 32:
            raise ModelDirError(f"{path}: no (N, 32) uint8 array {split!r} — refit the model")
        out[split] = {bytes(r).hex() for r in rows}
    return out


def check_backbone(config: ModelConfig, backbone, model_dir: str | Path) -> None:
    """Refuse a backbone that differs from the one the head was trained on."""
    saved = config.backbone
    if saved.get("fingerprint") != backbone.fingerprint:
        raise ModelDirError(
            f"{model_dir} was trained on backbone {saved.get('name')!r} (fingerprint "
            f"{str(saved.get('fingerprint'))[:12]}) but {backbone.name!r} has fingerprint "
            f"{backbone.fingerprint[:12]}: its weights, config, tokenizer, chat template or processor "
            "differ — use the original backbone (--backbone PATH) or refit")
    if int(saved.get("image_size", backbone.image_size)) != backbone.image_size:
        raise ModelDirError(f"{model_dir} was trained at image size {saved.get('image_size')}, "
                            f"the backbone is set to {backbone.image_size}: drop --image-size")


def check_extraction(trained_on: dict | None, expected: dict, model_dir: str | Path) -> None:
    """Refuse a head whose recorded extraction setting (``embed.extract.extraction_namespace`` at fit
    time) differs from what config.json + the backbone give now: an edited config.json or a head
    copied from another model would otherwise predict silently on the wrong embeddings."""
    if trained_on is None:
        return  # written before heads recorded it: the dimension checks are all there is
    diff = sorted(k for k in set(trained_on) | set(expected) if trained_on.get(k) != expected.get(k))
    if diff:
        def show(ns: dict) -> str:
            return ", ".join(f"{k} {str(ns.get(k))[:12] if k == 'backbone' else ns.get(k)!r}" for k in diff)

        raise ModelDirError(f"{model_dir}: config.json and the backbone give {show(expected)}, but the head "
                            f"was trained on {show(trained_on)} — the files do not belong together "
                            "(edited or copied): restore the original config.json or refit")


def model_card(config: ModelConfig, metrics: dict) -> str:
    b = config.backbone
    lines = [f"# rainclf classifier ({config.head} head)", ""]
    collapsed = collapse_message(metrics)
    if collapsed:
        lines += [f"**Warning: {collapsed}.**", ""]
    if b.get("random_weights"):
        lines += ["**Backbone weights are RANDOM** (a test/demo backbone). The metrics below measure "
                  "colour statistics of the photos, not GLM-4V quality. Do not use this model for "
                  "decisions.", ""]
    lines += [
        f"- labels: {' / '.join(config.labels)} (p_rain = p({config.labels[1]}))",
        f"- backbone: `{b.get('name')}` ({b.get('kind')}), fingerprint `{str(b.get('fingerprint'))[:16]}`",
        f"- feature: `{config.feature}`" + (f", layer {config.layer}, prompt `{config.prompt}`"
                                            if config.feature == "answer" else ""),
        f"- image size: {b.get('image_size')}, embedding dim: {config.dim}",
        f"- threshold: {config.threshold:.4f}",
        f"- rainclf {config.rainclf_version}, format {config.format_version}, created {config.created}",
        "",
        "## Validation metrics",
        "",
    ]
    val = metrics.get("validation") or {}
    if not val:
        lines.append("(no validation split)")
    for key in ("n", "accuracy", "balanced_accuracy", "f1", "roc_auc", "ece", "brier"):
        if key in val and val[key] is not None:
            v = val[key]
            lines.append(f"- {key}: {v:.4f}" if isinstance(v, float) else f"- {key}: {v}")
    lines += ["", "Use: `rainclf predict PHOTOS/ --model THIS_DIR -o predictions.csv`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- loading

@dataclass
class FitResult:
    model_dir: Path
    metrics: dict
    config: ModelConfig


def backbone_for(config: ModelConfig, model_dir: Path, options: RunOptions) -> Backbone:
    """The backbone config.json names. Remote code is allowed by ``options.trust_remote_code``
    (this run's --trust-remote-code) only; whatever config.json records about it is ignored."""
    from rainclf.backbones.base import BackboneError

    saved = config.backbone
    name = options.backbone or saved["name"]
    needs_code = saved.get("kind") in REMOTE_CODE_KINDS or bool(saved.get("trust_remote_code"))
    if needs_code and not options.trust_remote_code:
        raise ModelDirError(remote_code_refusal(model_dir, name))
    try:
        backbone = create_backbone(name, BackboneOptions(
            device=options.device, image_size=saved.get("image_size"), weights=saved.get("weights"),
            trust_remote_code=options.trust_remote_code))
    except BackboneError as e:
        if not options.trust_remote_code and "--trust-remote-code" in str(e):
            raise ModelDirError(remote_code_refusal(model_dir, name)) from None
        raise
    check_backbone(config, backbone, model_dir)
    return backbone


#: backbone kinds whose modelling code ships inside the checkpoint (backbones/chatglm.py)
REMOTE_CODE_KINDS = ("chatglm",)


def remote_code_refusal(model_dir, name: str) -> str:
    return (f"{model_dir} needs remote code: its backbone {name} runs Python code shipped with the "
            "checkpoint, which a model directory can never allow — pass --trust-remote-code on this "
            "command line if you trust that checkpoint")


def load_classifier(model_dir: str | Path, options: RunOptions | None = None):
    """The loaded classifier (``heads.base.Classifier``) for a model directory, any head type."""
    from rainclf.heads import UnknownHeadError, head_classifier

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    try:
        cls = head_classifier(config.head)
    except UnknownHeadError:
        raise ModelDirError(f"{model_dir}: head type {config.head!r} is unknown to this rainclf "
                            f"{__version__} — written by another version?") from None
    return cls(config, model_dir, options or RunOptions())
