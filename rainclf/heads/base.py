"""What every loaded model directory answers, whatever its head: the ``Classifier`` protocol.

    linear · LoRA · generative (each decoding) · head + generative fallback · ONNX engine

all answer the same calls, so ``predict``, ``evaluate``, ``export`` and the fallback never ask
which head they hold:

    clf.config                      the model directory's ModelConfig
    clf.labels                      ("不会下雨", "会下雨"): p_rain is p(labels[1])
    clf.predict_paths(paths)        one Row per file, in order; an unreadable file is an error row
    clf.predict_proba(images)       (N,) p_rain for decoded RGB images, or None when the model gives
                                    no probability (greedy / sample decoding)
    clf.describe()                  what the model is and how it runs: head, engine, decoding, what
                                    its output quality is measured on, embeddings served from cache
    clf.notes                       one-line remarks about the last predict_paths call

``ClassifierBase`` gives the defaults: a head that cannot share its backbone with a fallback, has
no affine form for ONNX, or no decodings simply keeps them. ``HeadArrays`` is any trainable head
(linear or LoRA score) as one affine map, which is what the ONNX head graph computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np

from rainclf.data.images import decode_paths
from rainclf.labels import LABELS

ROW_FIELDS = ("path", "label", "p_rain", "source", "error")


@dataclass
class Row:
    """One image's answer. ``label`` is exactly one of LABELS, or None with an ``error``."""

    path: str
    label: str | None = None
    p_rain: float | None = None
    source: str = "head"
    error: str | None = None
    extra: dict = field(default_factory=dict)   # e.g. raw, format_valid for generative models

    def as_dict(self) -> dict:
        d = {"path": self.path, "label": self.label, "p_rain": self.p_rain,
             "source": self.source, "error": self.error}
        d.update(self.extra)
        return d


@runtime_checkable
class Classifier(Protocol):
    config: object
    notes: list
    labels: tuple

    def predict_paths(self, paths: Sequence) -> list[Row]: ...

    def predict_proba(self, images: Sequence) -> np.ndarray | None: ...

    def describe(self) -> dict: ...


class ClassifierBase:
    """Defaults shared by every classifier; subclasses set ``config`` and implement
    ``predict_paths`` and ``predict_proba``."""

    labels: ClassVar[tuple] = tuple(LABELS)
    #: how this head can be asked (generative: greedy/sample/constrained); () = one way only
    decodings: ClassVar[tuple] = ()
    #: what output quality is measured on: the label a head emits, or generated text
    emits: ClassVar[str] = "label"
    engine: ClassVar[str] = "torch"
    #: the head graph's input is the frozen backbone's embedding (so a head-only ONNX export
    #: runs behind any torch backbone); False for heads that tune the backbone (LoRA)
    frozen_embeddings: ClassVar[bool] = False

    config: object
    notes: list = []
    backbone = None            # the Backbone it embeds with, when it has one in this process
    decoding: str | None = None
    n_cached: int = 0          # embeddings served from the cache since loading

    def describe(self) -> dict:
        c = self.config
        return {"head": c.head, "engine": self.engine, "decoding": self.decoding,
                "quality_of": "generated text" if self.emits == "text" else "emitted label",
                "backbone": c.backbone.get("name"), "random_weights": bool(c.backbone.get("random_weights")),
                "n_cached": self.n_cached, "backbone_weights_mb": self.backbone_weights_mb()}

    def backbone_weights_mb(self) -> float | None:
        """Size of the weight files this classifier runs on (None when unknown)."""
        return self.backbone.weights_mb() if self.backbone is not None else None

    # -- sharing one base model between a head and its generative fallback
    def frozen_backbone(self):
        """The frozen backbone this model can lend to a head (generative: adapters off), or None."""
        return None

    def adopt_backbone(self, backbone) -> bool:
        """Embed with ``backbone`` instead of loading an own copy, if it is the same one."""
        return False

    # -- ONNX
    @classmethod
    def affine_head(cls, config, model_dir) -> "HeadArrays":
        from rainclf.model import ModelDirError

        raise ModelDirError(f"{model_dir}: {config.head} heads cannot be exported to ONNX (only linear and "
                            "lora heads; a generative head answers through a decoding loop)")

    def export_source(self, images):
        """(backbone, torch model to trace, torch p_rain or None, torch embeddings or None) for
        the ONNX image graph, computed on ``images``."""
        from rainclf.model import ModelDirError

        raise ModelDirError(f"{self.config.head} heads have no ONNX image graph")

    @classmethod
    def head_files(cls, model_dir) -> list:
        """The files holding the trained weights (what an export is checked against)."""
        from rainclf.model import ModelDirError

        raise ModelDirError(f"{model_dir}: this head type has no ONNX export")


@dataclass
class HeadArrays:
    """Any rainclf head as one affine map: logits = ((x - mean) / scale) @ weight.T + bias."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray      # (2, dim), rows in LABELS order
    bias: np.ndarray        # (2,)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def p_rain(self, x: np.ndarray) -> np.ndarray:
        logits = ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weight.T + self.bias
        return 1.0 / (1.0 + np.exp(-(logits[:, 1] - logits[:, 0])))


def label_for(p_rain: float, threshold: float) -> str:
    return LABELS[1] if p_rain >= threshold else LABELS[0]


def scored_rows(paths: Sequence, errors: Sequence, p_rain: Sequence[float], threshold: float,
                source: str = "head") -> list[Row]:
    """Rows for files in order: an error row where ``errors[i]`` is set, else the next p_rain
    (``p_rain`` holds one score per readable file, in order)."""
    scores = iter(p_rain)
    rows = []
    for path, err in zip(paths, errors):
        if err is not None:
            rows.append(Row(path=str(path), source=source, error=err))
        else:
            pr = float(next(scores))
            if not np.isfinite(pr):   # NaN / inf: no label can be read from it
                rows.append(Row(path=str(path), source="error",
                                error=f"{path}: the model gave a non-finite score ({pr}) — no label"))
                continue
            rows.append(Row(path=str(path), label=label_for(pr, threshold), p_rain=pr, source=source))
    return rows


def rows_in_batches(paths: Sequence, batch_size: int, answer, prepare=None, progress: bool = True,
                    desc: str = "predict", source: str = "head") -> list[Row]:
    """Decode files ``batch_size`` at a time and ask ``answer(images) -> list[Row]`` (one per
    readable image, path left empty) for each batch; an unreadable file becomes an error row."""
    from tqdm.auto import tqdm

    rows: list[Row] = []
    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    for lo in range(0, len(paths), batch_size):
        chunk = [Path(p) for p in paths[lo:lo + batch_size]]
        images, errors = decode_paths(chunk, prepare)
        good = [im for im in images if im is not None]
        answers = iter(answer(good) if good else [])
        for path, err in zip(chunk, errors):
            rows.append(Row(path=str(path), source=source, error=err) if err is not None
                        else replace(next(answers), path=str(path)))
        bar.update(len(chunk))
    bar.close()
    return rows
