"""Split a labelled dataset into train.jsonl / test.jsonl with every near-duplicate group on one
side (fit's own grouped split: exact copies, pHash groups, --groups FILE), so that a model fit on
train.jsonl can be measured on photos it did not see, not even as a near-copy.

    python tools/holdout_split.py ../shared/weather/train.jsonl -o /tmp/holdout \\
        [--groups ../shared/weather/near_duplicate_groups.csv] [--test 0.2] [--seed 1]

Writes OUT/train.jsonl and OUT/test.jsonl (GLM-4 format, absolute image paths) and prints the
counts and how many groups straddle the split (0 by construction).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rainclf.backbones.base import DEFAULT_PROMPT  # noqa: E402
from rainclf.data.datasets import load_dataset, load_groups, stratified_split  # noqa: E402
from rainclf.data.groups import DEFAULT_THRESHOLD, find_groups, image_facts  # noqa: E402
from rainclf.labels import RAIN  # noqa: E402


def write_jsonl(examples, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"messages": [
                {"role": "user", "content": DEFAULT_PROMPT, "image": str(e.path)},
                {"role": "assistant", "content": e.label}]}, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--groups")
    ap.add_argument("--test", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=1, help="differs from fit's default 0 on purpose")
    args = ap.parse_args(argv)
    examples = load_dataset(args.data)
    given = load_groups(args.groups) if args.groups else None
    facts = image_facts([e.path for e in examples])
    grouping = find_groups(facts, DEFAULT_THRESHOLD, given)
    by_path = grouping.by_path(facts)
    train, test = stratified_split(examples, args.test, args.seed, groups=by_path)
    side = {e.path: "train" for e in train} | {e.path: "test" for e in test}
    straddle = sum(len({side[facts[i].path] for i in g}) > 1 for g in grouping.groups)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, out / "train.jsonl")
    write_jsonl(test, out / "test.jsonl")
    for name, part in (("train", train), ("test", test)):
        print(f"{out / (name + '.jsonl')}: {len(part)} images ({sum(e.label == RAIN for e in part)} {RAIN})")
    print(f"{len(grouping.groups)} groups, {straddle} straddle the split")
    return 0


if __name__ == "__main__":
    sys.exit(main())
