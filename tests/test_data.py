"""Tests for rainclf/data.py: the four dataset layouts, their one-line errors, and splitting."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from rainclf.data.datasets import (
    DataError,
    Example,
    check_trainable,
    load_dataset,
    load_groups,
    stratified_split,
)
from rainclf.labels import NO_RAIN, RAIN

WEATHER = Path(__file__).resolve().parents[1].parent / "shared" / "weather"
needs_weather = pytest.mark.skipif(
    not (WEATHER / "train.jsonl").is_file(),
    reason=f"real photos not found at {WEATHER} (shared/ sits beside the checkout)")


def _img(path: Path, colour=(90, 90, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def _glm(image: str, answer: str, content_as_parts: bool = False) -> dict:
    user = ({"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "会下雨吗？"}]}
            if content_as_parts else
            {"role": "user", "content": "根据图片判断：会下雨还是不会下雨？", "image": image})
    return {"messages": [user, {"role": "assistant", "content": answer}]}


def _jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def pics(tmp_path):
    """Three images under tmp_path/images/."""
    return [_img(tmp_path / "images" / f"{n}.jpg") for n in ("r1", "n1", "n2")]


# ---------------------------------------------------------------------------- (a) folders


def test_folder_of_label_subfolders(tmp_path):
    a = _img(tmp_path / "ds" / "会下雨" / "a.jpg")
    b = _img(tmp_path / "ds" / "rain" / "b.PNG")  # alias folder, merged into 会下雨
    c = _img(tmp_path / "ds" / "不会下雨" / "deep" / "c.jpg")
    (tmp_path / "ds" / "README.txt").write_text("not an image, ignored")
    got = {e.path: (e.label, e.origin) for e in load_dataset(tmp_path / "ds")}
    assert got == {a: (RAIN, "ds/会下雨/a.jpg"), b: (RAIN, "ds/rain/b.PNG"),
                   c: (NO_RAIN, "ds/不会下雨/deep/c.jpg")}
    assert all(p.is_absolute() for p in got)


def test_folder_with_non_label_subfolders(tmp_path):
    _img(tmp_path / "ds" / "会下雨" / "a.jpg")
    (tmp_path / "ds" / "sunny").mkdir()
    (tmp_path / "ds" / "misc").mkdir()
    with pytest.raises(DataError, match=r"ds: subfolder\(s\) misc, sunny are not labels — name"):
        load_dataset(tmp_path / "ds")


def test_folder_with_loose_images(tmp_path):
    _img(tmp_path / "ds" / "会下雨" / "a.jpg")
    _img(tmp_path / "ds" / "stray.jpg")
    with pytest.raises(DataError, match=r"1 image\(s\) outside the label subfolders \(e\.g\. stray\.jpg\)"):
        load_dataset(tmp_path / "ds")


def test_folder_empty_label_folders_is_empty_dataset(tmp_path):
    (tmp_path / "ds" / "会下雨").mkdir(parents=True)
    with pytest.raises(DataError, match=r"ds: no examples"):
        load_dataset(tmp_path / "ds")


# ---------------------------------------------------------------------------- (b), (d) JSONL


def test_glm4_jsonl(tmp_path, pics):
    r1, n1, n2 = pics
    src = _jsonl(tmp_path / "train.jsonl", [
        _glm("images/r1.jpg", "会下雨"),
        "",  # blank lines are skipped, line numbers still count them
        _glm("images/n1.jpg", " 不会下雨。", content_as_parts=True),
        _glm(str(n2), "no_rain"),  # absolute path, alias label
    ])
    ex = load_dataset(src)
    assert [(e.path, e.label) for e in ex] == [(r1, RAIN), (n1, NO_RAIN), (n2, NO_RAIN)]
    assert [e.origin for e in ex] == [f"{src}:1", f"{src}:3", f"{src}:4"]


def test_ms_swift_jsonl(tmp_path, pics):
    r1, n1, _ = pics
    src = _jsonl(tmp_path / "swift.jsonl", [
        {"images": ["images/r1.jpg"], "label": "rain"},
        {"images": ["images/n1.jpg"], "messages": [
            {"role": "user", "content": "<image>会下雨吗？"}, {"role": "assistant", "content": "不会下雨"}]},
    ])
    assert [(e.path, e.label) for e in load_dataset(src)] == [(r1, RAIN), (n1, NO_RAIN)]


def test_ms_swift_two_images_rejected(tmp_path, pics):
    src = _jsonl(tmp_path / "swift.jsonl", [{"images": ["images/r1.jpg", "images/n1.jpg"], "label": "会下雨"}])
    with pytest.raises(DataError, match=r"swift\.jsonl:1: 2 images in one record"):
        load_dataset(src)


def test_unknown_label_message(tmp_path, pics):
    src = _jsonl(tmp_path / "train.jsonl", [_glm("images/r1.jpg", "会下雨"), _glm("images/n1.jpg", "可能下雨")])
    with pytest.raises(DataError) as e:
        load_dataset(src)
    assert str(e.value) == f"{src}:2: unknown label '可能下雨' — use 会下雨 or 不会下雨 (aliases rain/no_rain)"


def test_malformed_json_line(tmp_path, pics):
    src = _jsonl(tmp_path / "train.jsonl", [_glm("images/r1.jpg", "会下雨"), "", '{"messages": [}'])
    with pytest.raises(DataError, match=r"train\.jsonl:3: malformed JSON"):
        load_dataset(src)


def test_missing_image(tmp_path, pics):
    src = _jsonl(tmp_path / "train.jsonl", [_glm("images/r1.jpg", "会下雨"), _glm("images/gone.jpg", "会下雨")])
    with pytest.raises(DataError) as e:
        load_dataset(src)
    msg = str(e.value)
    assert msg.startswith(f"{src}:2: image 'images/gone.jpg' not found") and "fix the path" in msg


def test_jsonl_without_user_image(tmp_path):
    src = _jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "下雨吗"},
                                                          {"role": "assistant", "content": "会下雨"}]}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: no image"):
        load_dataset(src)


def test_jsonl_without_label(tmp_path, pics):
    src = _jsonl(tmp_path / "train.jsonl", [{"images": ["images/r1.jpg"]}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: no label"):
        load_dataset(src)


def test_empty_jsonl(tmp_path):
    src = _jsonl(tmp_path / "train.jsonl", ["", "   "])
    with pytest.raises(DataError, match=r"train\.jsonl: no examples"):
        load_dataset(src)


def test_same_image_two_labels(tmp_path, pics):
    src = _jsonl(tmp_path / "train.jsonl", [_glm("images/r1.jpg", "会下雨"), _glm("images/r1.jpg", "不会下雨")])
    with pytest.raises(DataError, match=r"train\.jsonl:2: .*r1\.jpg is labelled 不会下雨 here but 会下雨 at .*train\.jsonl:1"):
        load_dataset(src)


# ---------------------------------------------------------------------------- (c) CSV


def test_csv(tmp_path, pics):
    r1, n1, _ = pics
    src = tmp_path / "list.csv"
    src.write_text("File,label,comment\nimages/r1.jpg,会下雨,dark\n\nimages/n1.jpg,no_rain,\n", encoding="utf-8")
    ex = load_dataset(src)
    assert [(e.path, e.label, e.origin) for e in ex] == [
        (r1, RAIN, f"{src}:2"), (n1, NO_RAIN, f"{src}:4")]


def test_csv_unknown_label_and_missing_column(tmp_path, pics):
    src = tmp_path / "list.csv"
    src.write_text("image,label\nimages/r1.jpg,会下雨\nimages/n1.jpg,sunny\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.csv:3: unknown label 'sunny'"):
        load_dataset(src)
    src.write_text("picture,label\nimages/r1.jpg,会下雨\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list\.csv:1: no path / image / file column"):
        load_dataset(src)


def test_unknown_format_and_missing_source(tmp_path):
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DataError, match=r"data\.txt: unknown dataset format '\.txt'"):
        load_dataset(tmp_path / "data.txt")
    with pytest.raises(DataError, match=r"nothing\.jsonl: not found"):
        load_dataset(tmp_path / "nothing.jsonl")


# ---------------------------------------------------------------------------- check_trainable


def test_check_trainable(tmp_path):
    with pytest.raises(DataError, match=r"x\.jsonl: no examples"):
        check_trainable([], "x.jsonl")
    one = [Example(Path("/a.jpg"), RAIN, "x.jsonl:1")]
    with pytest.raises(DataError) as e:
        check_trainable(one, "x.jsonl")
    assert str(e.value).startswith("only 会下雨 found in x.jsonl — fit needs examples of both labels")
    both = one + [Example(Path("/b.jpg"), NO_RAIN, "x.jsonl:2")]
    assert check_trainable(both, "x.jsonl") == {NO_RAIN: 1, RAIN: 1}


# ---------------------------------------------------------------------------- real data


@needs_weather
@pytest.mark.parametrize("name", ["train.jsonl", "manifest.csv"])
def test_real_weather_dataset(name):
    ex = load_dataset(WEATHER / name)
    assert len(ex) == 877
    assert Counter(e.label for e in ex) == {RAIN: 164, NO_RAIN: 713}
    assert all(e.path.is_file() for e in ex[:20])


@needs_weather
def test_real_weather_folder_points_to_the_tables():
    with pytest.raises(DataError, match=r"subfolder\(s\) images are not labels .* or pass .*weather/"):
        load_dataset(WEATHER)


@needs_weather
def test_real_split_keeps_near_duplicates_together():
    ex = load_dataset(WEATHER / "train.jsonl")
    groups = load_groups(WEATHER / "near_duplicate_groups.csv")
    assert len(groups) == 150 and len(set(groups.values())) == 71
    assert all(p.is_file() for p in groups)
    train, val = stratified_split(ex, 0.2, seed=0, groups=groups)
    side = {e.path: "val" for e in val} | {e.path: "train" for e in train}
    by_group: dict[str, set] = {}
    for p, g in groups.items():
        by_group.setdefault(g, set()).add(side[p])
    assert all(len(s) == 1 for s in by_group.values())
    rain_val = sum(e.label == RAIN for e in val)
    assert abs(rain_val - round(164 * 0.2)) <= 3 and abs(len(val) - round(877 * 0.2)) <= 6


# ---------------------------------------------------------------------------- splitting


def _examples(n_rain: int, n_no: int) -> list[Example]:
    return ([Example(Path(f"/d/rain_{i}.jpg"), RAIN, f"t:{i}") for i in range(n_rain)]
            + [Example(Path(f"/d/sun_{i}.jpg"), NO_RAIN, f"t:{n_rain + i}") for i in range(n_no)])


def test_split_deterministic_stratified_and_complete():
    ex = _examples(40, 160)
    train, val = stratified_split(ex, 0.25, seed=3)
    assert (train, val) == stratified_split(ex, 0.25, seed=3)
    assert stratified_split(list(reversed(ex)), 0.25, seed=3)[1] == list(reversed(val))  # order-free
    assert set(val) != set(stratified_split(ex, 0.25, seed=4)[1])
    assert sorted(train + val, key=ex.index) == ex and not set(train) & set(val)
    assert Counter(e.label for e in val) == {RAIN: 10, NO_RAIN: 40}
    assert [e for e in ex if e in set(val)] == val  # input order kept


def test_split_tiny_set_has_both_labels_on_both_sides():
    train, val = stratified_split(_examples(2, 3), 0.1, seed=0)
    assert {e.label for e in train} == {e.label for e in val} == {RAIN, NO_RAIN}


def test_split_groups_respected():
    ex = _examples(20, 20)
    groups = {Path(f"/d/rain_{i}.jpg"): f"g{i // 5}" for i in range(20)}  # four groups of five
    groups[Path("/d/sun_0.jpg")] = "g0"  # a mixed group travels as one
    for seed in range(5):
        train, val = stratified_split(ex, 0.3, seed=seed, groups=groups)
        side = {e.path: e in set(val) for e in ex}
        for g in set(groups.values()):
            assert len({side[p] for p, gg in groups.items() if gg == g}) == 1
        assert RAIN in {e.label for e in val} and RAIN in {e.label for e in train}


def test_split_groups_bigger_than_target_still_give_val_each_label():
    ex = _examples(7, 20)
    groups = {Path(f"/d/rain_{i}.jpg"): "big" if i < 4 else "small" for i in range(7)}
    train, val = stratified_split(ex, 0.1, seed=0, groups=groups)  # target 1 rain; groups are 4 and 3
    assert sorted(e.path.name for e in val if e.label == RAIN) == ["rain_4.jpg", "rain_5.jpg", "rain_6.jpg"]
    assert sum(e.label == RAIN for e in train) == 4


def test_split_same_path_twice_stays_together():
    ex = _examples(6, 6)
    ex = ex + [Example(ex[0].path, RAIN, "t:dup")]
    for seed in range(6):
        train, val = stratified_split(ex, 0.5, seed=seed)
        assert (ex[0] in val) == (ex[-1] in val)


def test_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(_examples(2, 2), 1.0, seed=0)
    assert stratified_split(_examples(2, 2), 0.0, seed=0)[1] == []


def test_load_groups(tmp_path):
    src = tmp_path / "groups.csv"
    src.write_text("group,file\n1,images/a.jpg\n1,images/b.jpg\n2,images/c.jpg\n")
    assert load_groups(src) == {(tmp_path / "images" / n).resolve(): g
                                for n, g in (("a.jpg", "1"), ("b.jpg", "1"), ("c.jpg", "2"))}
    src.write_text("group,file\n1,images/a.jpg\n2,images/a.jpg\n")
    with pytest.raises(DataError, match=r"groups\.csv:3: images/a\.jpg is in group 2 and group 1"):
        load_groups(src)
