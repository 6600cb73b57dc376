"""``rainclf check-data DATA``: what is wrong with a labelled dataset, before any training.

One line per problem (``file: what — fix``), a few ``note:`` lines, then a summary. Problems:

    unreadable            a file that cannot be read or decoded (fit would skip it)
    exact duplicate       byte-identical files with the same label (one copy weighs double)
    conflict              byte-identical files with both labels (fit refuses without --allow-conflicts)
    near-duplicate labels one near-duplicate group (pHash, data/groups.py) holding both labels:
                          the same photo labelled twice differently, or a false merge — look
    small image           shorter side below the backbone's input size (it will be upscaled)

Notes: counts per label, near-duplicate groups within one label (fit keeps each on one side of
its split), and how many of them a plain random split would straddle.

Exit status (``CheckReport.code``): 0 clean, 1 problems found, 2 unusable (the dataset cannot be
read, or lacks a label, or has no readable image).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rainclf.data.datasets import DataError, check_trainable, load_dataset, load_groups, stratified_split
from rainclf.data.groups import DEFAULT_THRESHOLD, find_groups, image_facts
from rainclf.data.images import describe_path
from rainclf.labels import LABELS

CLEAN, PROBLEMS, UNUSABLE = 0, 1, 2


@dataclass
class CheckReport:
    problems: list = field(default_factory=list)   # one line each
    notes: list = field(default_factory=list)
    summary: str = ""
    code: int = CLEAN
    counts: dict = field(default_factory=dict)     # problem kind → number


def _name(p) -> str:
    """A path relative to the working folder when that is shorter (rows stay readable)."""
    try:
        rel = os.path.relpath(p)
    except ValueError:   # another drive (Windows)
        rel = str(p)
    return describe_path(rel if len(rel) < len(str(p)) else p)


SMALL_LISTED = 5   # more small images than this: one line with the smallest, not one line each


def _small_images(examples, facts, input_size: int, backbone: str, kinds: Counter, problems: list) -> None:
    small = sorted(((min(f.size), e, f) for e, f in zip(examples, facts) if f.size and min(f.size) < input_size),
                   key=lambda t: t[0])
    if small:
        kinds["small image"] += len(small)
    fix = "it will be upscaled; use a larger copy if you have one"
    if len(small) <= SMALL_LISTED:
        for _, e, f in small:
            problems.append(f"{e.origin}: {_name(e.path)} is {f.size[0]}×{f.size[1]} px, below the {input_size} px "
                            f"input of {backbone} — {fix}")
        return
    shown = ", ".join(f"{_name(e.path)} {f.size[0]}×{f.size[1]}" for _, e, f in small[:SMALL_LISTED])
    problems.append(f"{len(small)} of {len(examples)} images are below the {input_size} px input of {backbone} "
                    f"(smallest: {shown}, …) — they will be upscaled; use larger copies if you have them")


def check_data(data: str | Path, groups: str | Path | None = None, threshold: int | None = DEFAULT_THRESHOLD,
               input_size: int | None = None, backbone_name: str = "", val_split: float = 0.2,
               seed: int = 0, progress: bool = False) -> CheckReport:
    """Check DATA (any format ``load_dataset`` reads); ``input_size``: the backbone's (None: skip
    the size check)."""
    report = CheckReport()
    try:
        examples = load_dataset(data)
        counts = check_trainable(examples, data)
        given = load_groups(groups) if groups else None
    except DataError as e:
        report.problems.append(str(e))
        report.code, report.summary = UNUSABLE, f"{_name(data)}: unusable — {str(e).splitlines()[0]}"
        return report
    kinds: Counter = Counter()

    def problem(kind: str, line: str) -> None:
        kinds[kind] += 1
        report.problems.append(line)

    facts = image_facts([e.path for e in examples], progress, desc="check-data")
    for e, f in zip(examples, facts):
        if f.error:
            problem("unreadable", f"{e.origin}: {f.error}")
    grouping = find_groups(facts, threshold, given)
    for i, j in grouping.exact_pairs:
        a, b = examples[i], examples[j]
        if a.label == b.label:
            problem("exact duplicate", f"{b.origin}: {_name(b.path)} is a byte-identical copy of {_name(a.path)} "
                                       f"({a.origin}), both {a.label} — remove one copy")
        else:
            problem("conflict", f"{b.origin}: {_name(b.path)} ({b.label}) is byte-identical to {_name(a.path)} "
                                f"({a.label}, {a.origin}) — fix the label or remove one copy (fit refuses "
                                "this unless --allow-conflicts)")
    within = 0
    for members in grouping.groups:
        # both labels on different images (identical bytes were reported as a conflict above)
        shas = {label: {facts[i].sha256 for i in members if examples[i].label == label} for label in LABELS}
        if any(a != b for a in shas[LABELS[0]] for b in shas[LABELS[1]]):
            n = Counter(examples[i].label for i in members)
            members = sorted(members, key=lambda i: n[examples[i].label])   # the rarer label first
            shown = ", ".join(f"{_name(examples[i].path)} ({examples[i].label})" for i in members[:6])
            more = f" and {len(members) - 6} more" if len(members) > 6 else ""
            problem("near-duplicate labels", f"{examples[members[0]].origin}: near-duplicates with both labels: "
                                             f"{shown}{more} — check the labels (or a false match: ignore)")
        else:
            within += 1
    if input_size:
        _small_images(examples, facts, input_size, backbone_name or "the backbone", kinds, report.problems)

    report.counts = dict(kinds)
    report.notes.append(f"{len(examples)} images: " + ", ".join(f"{counts[label]} {label}" for label in LABELS))
    if grouping.groups:
        plain_train, _ = stratified_split(examples, val_split, seed)
        in_train = {e.path for e in plain_train}
        straddle = sum(len({examples[i].path in in_train for i in m}) > 1 for m in grouping.groups)
        report.notes.append(
            f"{within} near-duplicate group(s) within one label ({grouping.n_images()} images in all groups; "
            f"pHash ≤ {threshold} bits{', + ' + _name(groups) if groups else ''}): rainclf fit keeps each "
            f"group on one side of its split; a plain random split (seed {seed}, {val_split:.0%} validation) "
            f"would straddle {straddle} of the {len(grouping.groups)} groups")
    readable = sum(f.error is None for f in facts)
    if readable == 0:
        report.code = UNUSABLE
        report.summary = f"{_name(data)}: unusable — none of its {len(examples)} images can be read"
        return report
    report.code = PROBLEMS if report.problems else CLEAN
    found = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no problems"
    report.summary = f"{_name(data)}: {len(examples)} images, {found}"
    return report
