"""Heads: the part of a classifier that is trained. A static table names, for every head type,
its fitter and its loaded-classifier class as ``"module:attribute"``; both are imported on use,
so a head whose module fails to import (peft missing, a bug) reports that error, never
"unknown head".

    linear       frozen embeddings → standardised logistic regression      (heads/linear.py)
    lora         LoRA on the language model + 2-way score on the answer state (heads/lora.py)
    generative   the generative LoRA baseline, answers decoded to a label     (heads/generative.py)

Every loaded classifier answers the protocol of ``heads/base.py`` (``Classifier``).
"""

from __future__ import annotations

import importlib

#: head type → (options check, fitter, classifier class), each "module:attribute". The check runs
#: before any data or model work (``fit``), so a bad option costs nothing.
HEADS: dict[str, tuple[str, str, str]] = {
    "linear": ("rainclf.heads.linear:check_options", "rainclf.heads.linear:fit_linear",
               "rainclf.heads.linear:LinearClassifier"),
    "lora": ("rainclf.heads.adapters:check_options", "rainclf.heads.lora:fit_lora",
             "rainclf.heads.lora:LoraClassifier"),
    "generative": ("rainclf.heads.adapters:check_options", "rainclf.heads.generative:fit_generative",
                   "rainclf.heads.generative:GenerativeClassifier"),
}
HEAD_TYPES = tuple(HEADS)
#: heads whose fitter trains data-parallel under torchrun / accelerate launch (heads/train.py)
DISTRIBUTED_HEADS = frozenset({"lora", "generative"})


class UnknownHeadError(ValueError):
    """A head type that is not in ``HEADS``."""


def resolve(ref: str):
    """``"package.module:attribute"`` → the attribute (an ImportError propagates as it is)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _entry(head: str, what: str) -> tuple[str, str]:
    try:
        return HEADS[head]
    except KeyError:
        raise UnknownHeadError(f"unknown {what} {head!r}: use {', '.join(HEADS)}") from None


def head_options_check(head: str):
    """``check(options) -> None`` for a head type: raises ValueError on an option it cannot use."""
    return resolve(_entry(head, "--head")[0])


def head_fitter(head: str):
    """``fit(train, val, out_dir, options) -> FitResult`` for a head type."""
    return resolve(_entry(head, "--head")[1])


def head_classifier(head: str):
    """The loaded-classifier class for a head type: ``cls(config, model_dir, options)``."""
    return resolve(_entry(head, "head type")[2])
