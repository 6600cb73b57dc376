"""Measure the perceptual-hash near-duplicate threshold against a listed grouping.

    python tools/measure_groups.py [--data ../shared/weather/train.jsonl]
        [--groups ../shared/weather/near_duplicate_groups.csv] [--max 16] [--json FILE]

For each Hamming threshold t (pHash, 64 bits) prints:
    found      listed groups whose members all land in one automatic group
    partial    listed groups split over several automatic groups (some members linked)
    missed     listed groups with no member linked to another
    false      automatic groups that join images of two or more different listed groups or
               unlisted images (an unlisted image counts as its own group): merges the list
               does not make (they may be real near-duplicates the list missed: look at them)
    joined     images the false merges pull together beyond the listed groups
    leak       with fit's grouped split (seed 0, val 0.2): listed groups straddling the split,
               validation photos with a listed near-twin in train
and the default's figures. Nothing is asserted: it prints numbers (and --json writes them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rainclf.data.datasets import load_dataset, load_groups, stratified_split  # noqa: E402
from rainclf.data.groups import DEFAULT_THRESHOLD, find_groups, image_facts  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "weather"


def leak(examples, listed: dict, by_path: dict, seed: int = 0, val: float = 0.2) -> dict:
    """Listed groups straddling fit's split and validation photos with a listed twin in train."""
    train, valid = stratified_split(examples, val, seed, groups=by_path)
    side = {e.path: "t" for e in train} | {e.path: "v" for e in valid}
    members = defaultdict(set)
    for p, g in listed.items():
        if p in side:
            members[g].add(side[p])
    straddle = sum(len(s) > 1 for s in members.values())
    train_groups = {listed[e.path] for e in train if e.path in listed}
    twins = sum(1 for e in valid if e.path in listed and listed[e.path] in train_groups)
    return {"straddling_groups": straddle, "val_with_twin_in_train": twins, "n_val": len(valid)}


def score(facts, examples, listed: dict, t: int | None) -> dict:
    grouping = find_groups(facts, t)
    auto = {}
    for n, g in enumerate(grouping.groups):
        for i in g:
            auto[i] = n
    unit = [listed.get(f.path, f"single:{i}") for i, f in enumerate(facts)]
    by_listed = defaultdict(list)
    for i, u in enumerate(unit):
        if not u.startswith("single:"):
            by_listed[u].append(i)
    found = partial = missed = 0
    for members in by_listed.values():
        autos = {auto.get(i, f"none:{i}") for i in members}
        if len(autos) == 1 and members[0] in auto:
            found += 1
        elif len(autos) < len(members):
            partial += 1
        else:
            missed += 1
    false, joined = 0, 0
    for g in grouping.groups:
        units = {unit[i] for i in g}
        if len(units) > 1:
            false += 1
            joined += len(units) - 1
    return {"threshold": t, "auto_groups": len(grouping.groups), "auto_images": grouping.n_images(),
            "found": found, "partial": partial, "missed": missed, "false_merges": false,
            "extra_units_joined": joined,
            "leak": leak(examples, listed, grouping.by_path(facts))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED / "train.jsonl"))
    ap.add_argument("--groups", default=str(SHARED / "near_duplicate_groups.csv"))
    ap.add_argument("--max", type=int, default=16, help="largest threshold to try")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)

    examples = load_dataset(args.data)
    listed = {Path(p): g for p, g in load_groups(args.groups).items()}
    t0 = time.perf_counter()
    facts = image_facts([e.path for e in examples])
    hash_s = time.perf_counter() - t0
    n_listed = len(set(listed.values()))
    print(f"{len(examples)} images, {n_listed} listed groups ({len(listed)} images); hashing took "
          f"{hash_s:.2f} s")
    rows = [score(facts, examples, listed, None)]
    rows[0]["threshold"] = "exact only"
    rows += [score(facts, examples, listed, t) for t in range(0, args.max + 1)]
    print(f"{'t':>10} {'groups':>6} {'images':>6} {'found':>5} {'partial':>7} {'missed':>6} {'false':>5} "
          f"{'joined':>6}  leak (straddling groups / val photos with a twin in train)")
    for r in rows:
        lk = r["leak"]
        mark = "  <- default" if r["threshold"] == DEFAULT_THRESHOLD else ""
        print(f"{r['threshold']!s:>10} {r['auto_groups']:>6} {r['auto_images']:>6} {r['found']:>5} "
              f"{r['partial']:>7} {r['missed']:>6} {r['false_merges']:>5} {r['extra_units_joined']:>6}  "
              f"{lk['straddling_groups']} / {lk['val_with_twin_in_train']} of {lk['n_val']}{mark}")
    plain = leak(examples, listed, {})
    print(f"split without any groups (seed 0): {plain['straddling_groups']} listed groups straddle, "
          f"{plain['val_with_twin_in_train']} of {plain['n_val']} validation photos have a twin in train")
    if args.json:
        Path(args.json).write_text(json.dumps({"n_images": len(examples), "n_listed_groups": n_listed,
                                               "hash_seconds": round(hash_s, 3), "default": DEFAULT_THRESHOLD,
                                               "rows": rows, "no_groups": plain}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
