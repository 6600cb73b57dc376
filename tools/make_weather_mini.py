"""Build data/weather-mini: 100 real photos from ../shared/weather (CC BY 4.0), for the README's
main command (tools/demo.sh) — fit on train/, predict test/.

    python tools/make_weather_mini.py [--out data/weather-mini] [--check]

Deterministic (seed 0): 40 会下雨 and 60 不会下雨 photos (20 each of the cloudy, shine and
sunrise originals), drawn unit by unit, where a unit is a near-duplicate group
(near_duplicate_groups.csv + rainclf's own exact/pHash groups) or a single photo; then split
60 train / 40 test with fit's grouped split, so no test photo has a near-copy in train. The image
bytes are copied unchanged. ``--check`` rebuilds into a temporary folder and compares.
"""

from __future__ import annotations

import csv
import io
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regen import main as regen_main  # noqa: E402  (tools/ is this script's folder)

from rainclf.data.datasets import Example, load_groups, stratified_split  # noqa: E402
from rainclf.data.groups import DEFAULT_THRESHOLD, find_groups, image_facts  # noqa: E402
from rainclf.labels import NO_RAIN, RAIN  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "weather"
OUT = REPO / "data" / "weather-mini"
WANT = {"rain": 40, "cloudy": 20, "shine": 20, "sunrise": 20}
TEST_FRACTION = 0.4
SEED = 0

README = """# data/weather-mini: 100 real photos (a subset of ../shared/weather)

Made by `python tools/make_weather_mini.py` (deterministic; `--check` verifies this copy); do
not edit by hand. Used by `tools/demo.sh`: fit on `train/`, predict `test/`.

- `train/会下雨/`, `train/不会下雨/`: {n_train} photos ({train_rain} 会下雨)
- `test/会下雨/`, `test/不会下雨/`: {n_test} photos ({test_rain} 会下雨)
- `manifest.csv`: `split,file,label,original_class,group` (group: near-duplicate group id, empty
  for a photo without near-copies here). Near-duplicate groups sit wholly in train or in test.

Labels: 会下雨 = the original `rain` class; 不会下雨 = `cloudy`, `shine`, `sunrise` (20 each). The
label means "rain is visible in the photo", not a forecast (see ../shared/weather/README.md).

## Source and licence

These photos are a subset of `../shared/weather`, copied byte for byte. Attribution (keep this with
any copy or derivative):

"Ajayi, Gbeminiyi (2018), *Multi-class Weather Dataset for Image Classification*, Mendeley Data, V1,
doi:10.17632/4drtyfjtfy.1, licensed under CC BY 4.0. Changes made: images resized and
re-encoded, exact and near-duplicates handled, classes relabelled to a binary rain / no-rain label,
and the set split 80/20."

Licence: CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Further change made here: 100
photos selected and split 60 train / 40 test, near-duplicate groups kept on one side.
"""


def build(out: Path) -> None:
    rows = list(csv.DictReader(open(SHARED / "manifest.csv", encoding="utf-8")))
    paths = [SHARED / r["file"] for r in rows]
    facts = image_facts(paths)
    listed = load_groups(SHARED / "near_duplicate_groups.csv")
    grouping = find_groups(facts, DEFAULT_THRESHOLD, listed)
    group_of = {i: n for n, members in enumerate(grouping.groups) for i in members}
    units: dict = defaultdict(list)              # unit → row indices
    for i in range(len(rows)):
        units[("g", group_of[i]) if i in group_of else ("p", i)].append(i)
    by_class: dict = defaultdict(list)           # original class → units wholly of that class
    for key, members in sorted(units.items()):
        classes = {rows[i]["original_class"] for i in members}
        if len(classes) == 1:
            by_class[classes.pop()].append(members)
    rng = random.Random(SEED)
    chosen: list[int] = []
    for cls, n in WANT.items():
        pool = by_class[cls]
        rng.shuffle(pool)
        taken = []
        for members in pool:
            if len(taken) + len(members) <= n:
                taken += members
            if len(taken) == n:
                break
        chosen += taken
    chosen.sort()
    examples = [Example(paths[i], rows[i]["label"], rows[i]["file"]) for i in chosen]
    train, test = stratified_split(examples, TEST_FRACTION, SEED, groups=grouping.by_path(facts))
    split = {e.path: "train" for e in train} | {e.path: "test" for e in test}
    manifest = io.StringIO()
    writer = csv.writer(manifest, lineterminator="\n")
    writer.writerow(["split", "file", "label", "original_class", "group"])
    for i in chosen:
        part, label = split[paths[i]], rows[i]["label"]
        dest = out / part / label / paths[i].name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths[i], dest)
        writer.writerow([part, dest.relative_to(out).as_posix(), label, rows[i]["original_class"],
                         f"g{group_of[i]}" if i in group_of else ""])
    (out / "manifest.csv").write_text(manifest.getvalue(), encoding="utf-8")
    (out / "README.md").write_text(README.format(
        n_train=len(train), train_rain=sum(e.label == RAIN for e in train),
        n_test=len(test), test_rain=sum(e.label == RAIN for e in test)), encoding="utf-8")
    assert {e.label for e in train} == {RAIN, NO_RAIN} == {e.label for e in test}


if __name__ == "__main__":
    sys.exit(regen_main(__doc__, OUT, build, "100 real photos, CC BY 4.0"))
