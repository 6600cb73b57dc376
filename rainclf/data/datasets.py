"""Labelled datasets for ``fit``: reading them from disk, checking them, splitting them.

:func:`load_dataset` auto-detects four layouts and returns :class:`Example` rows
(absolute image path, label, where it came from):

(a) a folder with one subfolder per label: ``会下雨/`` and ``不会下雨/`` (or ``rain/``, ``no_rain/``);
(b) GLM-4 fine-tuning JSONL: ``{"messages": [{"role": "user", "content": "…", "image": "x.jpg"},
    {"role": "assistant", "content": "会下雨"}]}`` (user content may also be a list of parts,
    ``{"type": "image", "image": "x.jpg"}``);
(c) CSV with a ``label`` column and a ``path``/``image``/``file`` column;
(d) ms-swift JSONL: ``{"images": ["x.jpg"], "label": "会下雨"}`` or ``{"images": [...], "messages": [...]}``.

Relative image paths are relative to the JSONL/CSV file's folder. Everything is validated here
with cheap ``os.path`` checks only (no decoding), so a typo on line 800 is reported before any
model is loaded. Every error is one :class:`DataError` line: ``file:line: problem — fix``.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from rainclf.data.images import (
    IMAGE_EXTENSIONS,
    NoImagesError,
    describe_path,
    find_images,
)
from rainclf.labels import LABELS, normalise_label

_LABEL_FIX = "use 会下雨 or 不会下雨 (aliases rain/no_rain)"
_FORMATS_HINT = ("pass a folder with 会下雨/ and 不会下雨/ subfolders, a GLM-4 or ms-swift .jsonl, "
                 "or a .csv with label and path columns")
_IMAGE_COLUMNS = ("path", "image", "file")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Example:
    """One labelled image. ``path`` is absolute; ``origin`` says where it was read, for errors:
    ``"train.jsonl:12"``, ``"manifest.csv:3"`` or ``"train/会下雨/x.jpg"``."""

    path: Path
    label: str
    origin: str


class DataError(ValueError):
    """A dataset cannot be used. ``str(err)`` is one line naming the file (and line) and the fix."""


def load_dataset(source: str | os.PathLike) -> list[Example]:
    """Read every labelled example of ``source`` (folder, .jsonl, .json or .csv); see the module
    docstring for the layouts. Raises :class:`DataError` for any problem, including no examples."""
    src = Path(source)
    name = describe_path(src)
    if src.is_dir():
        examples = _from_folder(src)
    elif src.is_file():
        suffix = src.suffix.lower()
        if suffix == ".jsonl":
            examples = _from_jsonl(src)
        elif suffix == ".json":
            examples = _from_json(src)
        elif suffix == ".csv":
            examples = _from_csv(src)
        else:
            raise DataError(f"{name}: unknown dataset format {suffix or '(no extension)'!r} — {_FORMATS_HINT}")
    else:
        raise DataError(f"{name}: not found — {_FORMATS_HINT}")
    if not examples:
        raise DataError(f"{name}: no examples — add labelled images ({_FORMATS_HINT})")
    _check_conflicts(examples)
    return examples


def check_trainable(examples: list[Example], source: str | os.PathLike) -> dict[str, int]:
    """Raise :class:`DataError` unless both labels are present; return ``{label: count}``."""
    name = describe_path(source)
    if not examples:
        raise DataError(f"{name}: no examples — fit needs labelled images of both labels")
    counts = Counter(e.label for e in examples)
    missing = [label for label in LABELS if counts[label] == 0]
    if missing:
        present = next(label for label in LABELS if counts[label])
        raise DataError(f"only {present} found in {name} — fit needs examples of both labels "
                        f"(add some {missing[0]} images)")
    return {label: counts[label] for label in LABELS}


def _check_conflicts(examples: list[Example]) -> None:
    # The same photo listed twice with different labels would teach the head noise.
    first: dict[Path, Example] = {}
    for ex in examples:
        prev = first.setdefault(ex.path, ex)
        if prev.label != ex.label:
            raise DataError(f"{ex.origin}: {describe_path(ex.path)} is labelled {ex.label} here but "
                            f"{prev.label} at {prev.origin} — keep one label per image")


# --------------------------------------------------------------------------------------------
# (a) folder of label subfolders


def _from_folder(src: Path) -> list[Example]:
    name = describe_path(src)
    try:
        with os.scandir(src) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
    except OSError as exc:
        raise DataError(f"{name}: cannot read folder ({exc.strerror}) — check the path and permissions") from None
    dirs = [e for e in entries if not e.name.startswith(".") and _entry_is(e, "dir")]
    label_dirs = [(e, normalise_label(e.name)) for e in dirs]
    bad = [describe_path(e.name) for e, label in label_dirs if label is None]
    if bad:
        # e.g. shared/weather/: images/ beside train.jsonl and manifest.csv
        tables = [e.name for e in entries if _entry_is(e, "file") and Path(e.name).suffix.lower() in (".jsonl", ".csv")]
        hint = f", or pass {describe_path(src / tables[0])} instead" if tables else ""
        raise DataError(f"{name}: subfolder(s) {', '.join(bad)} are not labels — name the label "
                        f"folders 会下雨 and 不会下雨 (aliases rain/no_rain){hint}")
    if not label_dirs:
        raise DataError(f"{name}: no label subfolders — put the images in {name}/会下雨/ and {name}/不会下雨/")
    loose = [e.name for e in entries if _entry_is(e, "file") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        raise DataError(f"{name}: {len(loose)} image(s) outside the label subfolders "
                        f"(e.g. {describe_path(loose[0])}) — move them into 会下雨/ or 不会下雨/")

    top = src.resolve().name or name
    examples = []
    for entry, label in label_dirs:
        try:
            images, problems = find_images(src / entry.name)
        except NoImagesError:
            continue  # an empty label folder: check_trainable names the missing label
        if problems:
            path, reason = problems[0]
            raise DataError(f"{describe_path(path)}: {reason} — fix or remove it (found while reading {name})")
        for p in images:
            rel = describe_path(Path(top) / p.relative_to(src))
            examples.append(Example(Path(os.path.abspath(p)), label, rel))
    return examples


# --------------------------------------------------------------------------------------------
# (b), (d) JSONL / JSON records


def _from_jsonl(src: Path) -> list[Example]:
    return [_record_example(rec, f"{describe_path(src)}:{n}", src.parent) for n, rec in _jsonl_records(src)]


def _from_json(src: Path) -> list[Example]:
    """A ``.json`` file holding a list of records (ms-swift allows this); JSONL named .json works."""
    try:
        obj = json.loads(_read_text(src))
    except (json.JSONDecodeError, RecursionError):
        return _from_jsonl(src)  # one object per line under a .json name
    if isinstance(obj, dict):
        return _from_jsonl(src)  # a one-line JSONL: line numbers still apply
    records = obj if isinstance(obj, list) else [obj]  # a scalar: _record_example names the problem
    return [_record_example(rec, f"{describe_path(src)}[{i}]", src.parent) for i, rec in enumerate(records)]


def _jsonl_records(src: Path) -> Iterator[tuple[int, Any]]:
    name = describe_path(src)
    try:
        raw = src.read_bytes()
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.strerror}) — check the path and permissions") from None
    for n, line in enumerate(raw.split(b"\n"), 1):
        if n == 1 and line.startswith(codecs.BOM_UTF8):
            line = line[len(codecs.BOM_UTF8):]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{name}:{n}: not UTF-8 text — save the file as UTF-8") from None
        if not text.strip():
            continue  # blank lines (a trailing newline, a separator) carry no example
        try:
            yield n, json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}:{n}: malformed JSON ({exc.msg} at column {exc.colno}) — "
                            "fix the line; JSONL holds one JSON object per line") from None
        except RecursionError:
            raise DataError(f"{name}:{n}: malformed JSON (nested too deeply) — "
                            "fix the line; JSONL holds one JSON object per line") from None


def _record_example(rec: Any, where: str, base: Path) -> Example:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__} — "
                        'write {"messages": [...]} or {"images": [...], "label": ...}')
    images = _record_images(rec, where)
    if not images:
        raise DataError(f'{where}: no image — give the user message an "image": "path" (GLM-4) '
                        'or the record "images": ["path"] (ms-swift)')
    if len(images) > 1:
        raise DataError(f"{where}: {len(images)} images in one record — rainclf classifies one image "
                        "per example; keep one image per line")
    label = _record_label(rec, where)
    return Example(_resolve_image(images[0], base, where), label, where)


def _image_ref(item: Any, where: str) -> str:
    if isinstance(item, dict) and isinstance(item.get("path"), str):
        item = item["path"]  # ms-swift also writes {"path": ...}
    if not isinstance(item, str):
        raise DataError(f"{where}: image must be a path string, got {type(item).__name__} — "
                        "write the image's file path")
    return item


def _record_images(rec: dict, where: str) -> list[str]:
    found: list[str] = []
    top = rec.get("images")
    if top is not None:
        found += [_image_ref(i, where) for i in (top if isinstance(top, list) else [top])]
    if "image" in rec:
        found.append(_image_ref(rec["image"], where))
    for msg in _messages(rec, where):
        if msg.get("role") != "user":
            continue
        if msg.get("image") is not None:
            img = msg["image"]
            found += [_image_ref(i, where) for i in (img if isinstance(img, list) else [img])]
        content = msg.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image":
                    found.append(_image_ref(part.get("image", part.get("path")), where))
    return found


def _messages(rec: dict, where: str) -> list[dict]:
    msgs = rec.get("messages", [])
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f'{where}: "messages" must be a list of {{"role": ..., "content": ...}} objects — fix the record')
    return msgs


def _text(content: Any) -> str | None:
    if isinstance(content, list):  # [{"type": "text", "text": "会下雨"}]
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        content = "".join(parts) if parts else None
    return content if isinstance(content, str) else None


def _record_label(rec: dict, where: str) -> str:
    answers = [_text(m.get("content")) for m in _messages(rec, where) if m.get("role") == "assistant"]
    answer = answers[-1] if answers else None  # the last answer is the one trained on
    given = rec.get("label")
    if given is None and answer is None:
        raise DataError(f"{where}: no label — add an assistant message with 会下雨 or 不会下雨 "
                        '(or a "label" field)')
    label = _normalise(given if given is not None else answer, where)
    if given is not None and answer is not None and _normalise(answer, where) != label:
        raise DataError(f"{where}: label {given!r} disagrees with the assistant answer {answer!r} — keep one")
    return label


def _normalise(text: Any, where: str) -> str:
    label = normalise_label(text) if isinstance(text, str) else None
    if label is None:
        shown = str(text) if len(str(text)) <= 40 else str(text)[:40] + "…"
        raise DataError(f"{where}: unknown label {shown!r} — {_LABEL_FIX}")
    return label


def _resolve_image(ref: str, base: Path, where: str) -> Path:
    if not ref.strip():
        raise DataError(f"{where}: empty image path — give the image's file path")
    if _URL.match(ref):
        raise DataError(f"{where}: remote image {ref!r} — download it and give a local path")
    full = Path(os.path.abspath(base / ref))
    if not os.path.isfile(full) and "\\" in ref:  # a path written on Windows
        alt = Path(os.path.abspath(base / ref.replace("\\", "/")))
        full = alt if os.path.isfile(alt) else full
    if not os.path.isfile(full):
        what = "is a folder, not a file" if os.path.isdir(full) else "not found"
        raise DataError(f"{where}: image {ref!r} {what} (looked for {describe_path(full)}) — fix the "
                        f"path; relative paths start at {describe_path(base.resolve())}")
    return full


# --------------------------------------------------------------------------------------------
# (c) CSV


def _read_text(src: Path) -> str:
    try:
        return src.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{describe_path(src)}: not UTF-8 text — save the file as UTF-8") from None
    except OSError as exc:
        raise DataError(f"{describe_path(src)}: cannot read ({exc.strerror}) — check the path and permissions") from None


def _entry_is(entry, kind: str) -> bool:
    """``entry.is_dir()`` / ``is_file()``, False for a symlink loop (which raises ELOOP)."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError:
        return False


CSV_DELIMITERS = ",;\t|"


def csv_delimiter(text: str) -> str:
    """The header line's delimiter: ``,`` unless the first non-blank line holds none of it but
    ``;``, a tab or ``|`` (csv.Sniffer on that line)."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    if "," in first or not any(d in first for d in CSV_DELIMITERS[1:]):
        return ","
    try:
        return csv.Sniffer().sniff(first, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return next(d for d in CSV_DELIMITERS[1:] if d in first)


def _csv_rows(src: Path, wanted: tuple[tuple[str, ...], ...]) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line, [cell per wanted column])``; each entry of ``wanted`` lists accepted header
    names (case-insensitive), the first present wins."""
    name = describe_path(src)
    text = _read_text(src)
    delimiter = csv_delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    columns: list[int] | None = None
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                header = [cell.strip().lower() for cell in row]
                columns = []
                for names in wanted:
                    idx = next((header.index(n) for n in names if n in header), None)
                    if idx is None:
                        raise DataError(f"{name}:{reader.line_num}: no {' / '.join(names)} column "
                                        f"(header is {', '.join(row)}, read with delimiter {delimiter!r}) — "
                                        "add it to the first line, or separate columns with ',' ';' or a tab")
                    columns.append(idx)
                continue
            yield reader.line_num, [row[i].strip() if i < len(row) else "" for i in columns]
    except csv.Error as exc:
        raise DataError(f"{name}:{reader.line_num}: malformed CSV ({exc}) — fix the quoting") from None
    if columns is None:
        raise DataError(f"{name}: empty CSV — add a header line and one row per image")


def _from_csv(src: Path) -> list[Example]:
    examples = []
    for line, (label_text, ref) in _csv_rows(src, (("label",), _IMAGE_COLUMNS)):
        where = f"{describe_path(src)}:{line}"
        label = _normalise(label_text, where)
        examples.append(Example(_resolve_image(ref, src.parent, where), label, where))
    return examples


def load_groups(csv_path: str | os.PathLike) -> dict[Path, str]:
    """Read a ``group,file`` CSV (like ``shared/weather/near_duplicate_groups.csv``) into
    ``{absolute image path: group id}``; file paths are relative to the CSV's folder."""
    src = Path(csv_path)
    if not src.is_file():
        raise DataError(f"{describe_path(src)}: not found — pass a CSV with group and file columns")
    groups: dict[Path, str] = {}
    for line, (group, ref) in _csv_rows(src, (("group",), _IMAGE_COLUMNS)):
        where = f"{describe_path(src)}:{line}"
        if not group or not ref:
            raise DataError(f"{where}: empty group or file cell — fill both")
        path = Path(os.path.abspath(src.parent / ref))
        if groups.setdefault(path, group) != group:
            raise DataError(f"{where}: {ref} is in group {group} and group {groups[path]} — merge the groups")
    return groups


# --------------------------------------------------------------------------------------------
# splitting


def stratified_split(examples: list[Example], val_fraction: float, seed: int,
                     groups: dict[Path, str] | None = None) -> tuple[list[Example], list[Example]]:
    """Split into ``(train, val)``, deterministic for a given ``seed``, about ``val_fraction`` of
    each label in val and, when a label has two or more units, at least one on each side.

    A unit is a group from ``groups`` (image path → group id, e.g. near-duplicates) or else one
    image path (the same file listed twice is one unit), and never straddles the split. A group
    holding both labels counts toward its majority label. Both lists keep the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = {Path(os.path.abspath(p)): g for p, g in (groups or {}).items()}

    units: dict[tuple[str, str], list[int]] = {}
    for i, ex in enumerate(examples):
        path = Path(os.path.abspath(ex.path))
        key = ("group", groups[path]) if path in groups else ("path", describe_path(path))
        units.setdefault(key, []).append(i)

    by_label: dict[str, list[tuple[tuple[str, str], list[int]]]] = {label: [] for label in LABELS}
    for key in sorted(units):  # sorted first, so the result does not depend on input order
        counts = Counter(examples[i].label for i in units[key])
        majority = max(sorted(counts), key=lambda label: counts[label])
        by_label.setdefault(majority, []).append((key, units[key]))

    rng = random.Random(seed)
    val_idx: set[int] = set()
    for label in sorted(by_label):
        strata = by_label[label]
        rng.shuffle(strata)
        n = sum(len(members) for _, members in strata)
        target = round(n * val_fraction)
        if val_fraction > 0 and len(strata) >= 2:
            target = min(max(target, 1), n - 1)
        taken = 0
        for _, members in strata:
            if taken + len(members) <= target:
                val_idx.update(members)
                taken += len(members)
        if taken == 0 and target > 0 and len(strata) >= 2:
            # Big groups overshot the target: the smallest unit still gives val this label.
            _, members = min(strata, key=lambda unit: len(unit[1]))
            val_idx.update(members)

    train = [ex for i, ex in enumerate(examples) if i not in val_idx]
    val = [ex for i, ex in enumerate(examples) if i in val_idx]
    return train, val
