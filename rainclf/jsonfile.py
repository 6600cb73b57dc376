"""Versioned JSON files read into dataclasses (``config.json`` of a model directory,
``rainclf_onnx.json`` of an export): one reader, so both refuse damaged, foreign, newer or
unknown-keyed files the same way, each with its own error type and fix. Stdlib only (the
torch-free runtime reads export metadata through it).
"""

from __future__ import annotations

import json

from rainclf import __version__


def read_versioned(cls, text: str, source: str, error: type[Exception], newest: int, what: str,
                   damaged_fix: str):
    """``cls(**data)`` from ``text``; ``error`` (one line naming ``source``) when the JSON is
    damaged, is not a ``what`` (no integer ``format_version``), was written by a newer rainclf
    (format above ``newest``), or holds keys ``cls`` does not know."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{source}: not valid JSON ({e.msg}, line {e.lineno}) — {damaged_fix}") from None
    except RecursionError:
        raise error(f"{source}: not valid JSON (nested too deeply) — {damaged_fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("format_version"), int):
        raise error(f"{source}: no format_version — not a {what}")
    version = data["format_version"]
    if version > newest:
        raise error(f"{source}: format version {version} was written by a newer rainclf "
                    f"({data.get('rainclf_version')}); this is rainclf {__version__} (format {newest}) "
                    "— upgrade rainclf")
    unknown = set(data) - set(cls.__dataclass_fields__)
    if unknown:
        raise error(f"{source}: unknown keys {sorted(unknown)} — written by another rainclf?")
    try:
        return cls(**data)
    except TypeError as e:
        raise error(f"{source}: {e}") from None
