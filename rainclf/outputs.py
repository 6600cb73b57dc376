"""Prediction files: rows → CSV (header + one line per row; empty cells for None) or JSONL, chosen
by the output's extension, written atomically. Shared by ``predict`` and the sharded runner.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from rainclf.heads.base import ROW_FIELDS, Row
from rainclf.io import atomic_file


def row_fields(rows: Sequence[Row]) -> list[str]:
    fields = list(ROW_FIELDS)
    for r in rows:
        for k in r.extra:
            if k not in fields:
                fields.append(k)
    return fields


def format_rows(rows: Sequence[Row], fmt: str) -> str:
    """CSV (header + one line per row; empty cells for None) or JSONL text."""
    if fmt == "jsonl":
        return "".join(json.dumps(r.as_dict(), ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=row_fields(rows), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        d = r.as_dict()
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
