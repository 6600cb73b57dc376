r"""Prediction files: rows → CSV (header + one line per row; empty cells for None) or JSONL, chosen
by the output's extension, written atomically. Shared by ``predict`` and the sharded runner.

Paths round-trip to their files, however odd the name:

* JSONL: ``path`` is the exact name Python gives the file (``os.fsdecode``). Bytes of a non-UTF-8
  name are lone surrogates there (U+DC80..U+DCFF, Python's ``surrogateescape``), written as JSON
  ``\udcXX`` escapes so the file stays valid UTF-8: ``os.fsencode(json.loads(line)["path"])`` gives
  the name's bytes back. A newline in a name is ``\n`` in JSON, a literal backslash ``\\``.
* CSV: ``path`` is a printable form (``\xff`` for undecodable bytes, ``\n`` for a newline), which
  two names can share. So when any name is not plain printable UTF-8 the file gets a
  ``path_bytes`` column: the name's bytes percent-encoded (``urllib.parse.unquote_to_bytes``
  reverses it) on those rows, empty on rows whose ``path`` is already exact.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Sequence

from rainclf.data.images import describe_path
from rainclf.heads.base import ROW_FIELDS, Row
from rainclf.io import atomic_file


def row_fields(rows: Sequence[Row]) -> list[str]:
    fields = list(ROW_FIELDS)
    for r in rows:
        for k in r.extra:
            if k not in fields:
                fields.append(k)
    return fields


PATH_BYTES = "path_bytes"
_SURROGATE = re.compile("[\ud800-\udfff]")


def plain_path(path: str) -> bool:
    """True when ``path`` is printable UTF-8 as it is (its CSV form is exact)."""
    return describe_path(path) == path and "\\" not in path


def path_bytes(path: str) -> str:
    """The bytes of the name, percent-encoded ('/' kept)."""
    return urllib.parse.quote(os.fsencode(path), safe="/")


def json_line(d: dict) -> str:
    """One JSON object on one line, valid UTF-8 even with lone surrogates (written ``\\udcXX``)."""
    text = json.dumps(d, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def format_rows(rows: Sequence[Row], fmt: str) -> str:
    """CSV (header + one line per row; empty cells for None) or JSONL text."""
    if fmt == "jsonl":
        return "".join(json_line(r.as_dict()) + "\n" for r in rows)
    buf = io.StringIO()
    fields = row_fields(rows)
    odd = [not plain_path(str(r.path)) for r in rows]
    if any(odd):
        fields.insert(1, PATH_BYTES)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r, is_odd in zip(rows, odd):
        d = r.as_dict()
        d["path"] = describe_path(str(r.path))
        if is_odd:
            d[PATH_BYTES] = path_bytes(str(r.path))
        writer.writerow({k: ("" if d.get(k) is None else _fmt(d.get(k))) for k in writer.fieldnames})
    return buf.getvalue()


def _fmt(v):
    return f"{v:.6f}" if isinstance(v, float) else v


def output_format(output: str | Path) -> str:
    suffix = Path(output).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ""):
        return "csv"
    raise ValueError(f"-o {output}: use a .csv or .jsonl file name")


def write_rows(rows: Sequence[Row], output: str | Path) -> None:
    text = format_rows(rows, output_format(output))
    with atomic_file(output, newline="") as f:
        f.write(text)
