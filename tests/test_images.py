"""Tests for rainclf/images.py: every bad file a user can drop in ends as one clear ImageError."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from rainclf.data.images import (
    IMAGE_EXTENSIONS,
    ImageError,
    NoImagesError,
    decode_image,
    describe_path,
    find_images,
    load_image,
    read_bytes,
)


def _save(path: Path, im: Image.Image, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def _jpeg_bytes(size=(64, 48)) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _close(a, b, tol=6) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# ---------------------------------------------------------------------------- broken files


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError) as e:
        load_image(p)
    assert "empty.jpg" in str(e.value) and "empty file (0 bytes)" in str(e.value)
    assert e.value.path == p


@pytest.mark.parametrize("keep", [300, 0.5, 0.99])  # cut in the header, mid-scan, before EOI
def test_truncated_jpeg(tmp_path, keep):
    data = _jpeg_bytes()
    p = tmp_path / "photo.jpg"
    p.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ImageError) as e:
        load_image(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: truncated") and "re-export or remove the file" in msg
    assert "\n" not in msg


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n")
    with pytest.raises(ImageError, match=r"notes\.jpg: not an image"):
        load_image(p)


def test_format_without_magic_is_not_guessed(tmp_path):
    # TGA has no magic number; only the formats behind IMAGE_EXTENSIONS are tried.
    p = _save(tmp_path / "x.jpg", Image.new("RGB", (8, 8), (1, 2, 3)), "TGA")
    with pytest.raises(ImageError, match="not an image"):
        load_image(p)


def test_png_named_jpg_is_decoded_by_content(tmp_path):
    p = _save(tmp_path / "really_png.jpg", Image.new("RGB", (5, 4), (9, 99, 199)), "PNG")
    im = load_image(p)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (9, 99, 199)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match=r"nope\.jpg: file not found — check the path"):
        read_bytes(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        read_bytes(tmp_path)


def test_unreadable_file(tmp_path):
    p = tmp_path / "locked.jpg"
    p.write_bytes(_jpeg_bytes())
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):
            pytest.skip("chmod 0 does not stop reads here (running as root)")
        with pytest.raises(ImageError, match=r"locked\.jpg: permission denied"):
            read_bytes(p)
    finally:
        p.chmod(0o644)


def test_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    warn = _save(tmp_path / "warn.png", Image.new("RGB", (12, 12)))  # 144: Pillow would only warn
    error = _save(tmp_path / "error.png", Image.new("RGB", (20, 20)))  # 400 > 2 x 100: Pillow raises
    with pytest.raises(ImageError) as e:
        load_image(warn)
    assert "warn.png: too many pixels (144 > 100)" in str(e.value)
    assert "raise PIL.Image.MAX_IMAGE_PIXELS" in str(e.value)
    with pytest.raises(ImageError, match=r"error\.png: too many pixels \(400 > 100\)"):
        load_image(error)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(error).size == (20, 20)


# ---------------------------------------------------------------------------- colour modes


def test_rgba_composited_over_white(tmp_path):
    im = Image.new("RGBA", (4, 2), (255, 0, 0, 128))
    im.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent: must become white, not blue
    out = load_image(_save(tmp_path / "a.png", im))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert _close(out.getpixel((1, 0)), (255, 127, 127), tol=2)


def test_la_composited_over_white(tmp_path):
    out = load_image(_save(tmp_path / "la.png", Image.new("LA", (3, 3), (0, 0))))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255)


def test_palette_png_with_transparency(tmp_path):
    im = Image.new("P", (2, 1))
    im.putpalette([0, 255, 0, 200, 0, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    out = load_image(_save(tmp_path / "p.png", im, transparency=0))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent index → white, not green
    assert out.getpixel((1, 0)) == (200, 0, 0)


def test_cmyk_jpeg(tmp_path):
    p = _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    assert Image.open(p).mode == "CMYK"
    out = load_image(p)
    assert out.mode == "RGB" and _close(out.getpixel((8, 8)), (255, 0, 0), tol=30)


def test_16bit_png_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    p = _save(tmp_path / "deep.png", Image.fromarray(arr))
    assert Image.open(p).mode.startswith("I")
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert _close(out.getpixel((1, 0)), (128, 128, 128), tol=1)  # mid-grey stays mid-grey
    assert out.getpixel((2, 0)) == (255, 255, 255)


@pytest.mark.parametrize("mode,value,expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_grayscale(tmp_path, mode, value, expected):
    out = load_image(_save(tmp_path / f"g{mode}.png", Image.new(mode, (3, 3), value)))
    assert out.mode == "RGB" and out.getpixel((1, 1)) == expected


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = load_image(_save(tmp_path / "rot.jpg", im, exif=exif, quality=95))
    assert out.size == (20, 40)
    assert _close(out.getpixel((10, 5)), (255, 0, 0), tol=40)  # the left edge is now on top
    assert _close(out.getpixel((10, 35)), (0, 0, 255), tol=40)


def test_one_pixel_image(tmp_path):
    out = load_image(_save(tmp_path / "dot.png", Image.new("RGB", (1, 1), (1, 2, 3))))
    assert out.size == (1, 1) and out.getpixel((0, 0)) == (1, 2, 3)


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(p).n_frames == 3
    out = load_image(p)
    assert out.mode == "RGB" and _close(out.getpixel((4, 4)), (255, 0, 0), tol=4)


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow has no WebP support")
def test_animated_webp_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    p = tmp_path / "anim.webp"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, lossless=True)
    out = load_image(p)
    assert out.mode == "RGB" and _close(out.getpixel((4, 4)), (0, 0, 255), tol=4)


def test_no_file_handle_left_open(tmp_path):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to count open files")
    p = _save(tmp_path / "x.png", Image.new("RGB", (4, 4), (5, 6, 7)))
    before = len(os.listdir("/proc/self/fd"))
    images = [load_image(p) for _ in range(20)]
    assert len(os.listdir("/proc/self/fd")) == before
    assert all(im.getpixel((0, 0)) == (5, 6, 7) for im in images)  # usable after the file is closed


def test_decode_image_names_path_given():
    with pytest.raises(ImageError, match=r"^upload-7\.png: empty file"):
        decode_image(b"", "upload-7.png")


# ---------------------------------------------------------------------------- finding files


def test_find_images_mixed_folder(tmp_path):
    good = _save(tmp_path / "b_good.jpg", Image.new("RGB", (4, 4)))
    bad = tmp_path / "a_bad.JPG"
    bad.write_text("not an image")  # returned anyway: decoding reports it later
    deep = _save(tmp_path / "sub" / "deeper" / "c.PNG", Image.new("RGB", (4, 4)))
    gif = _save(tmp_path / "z.Gif", Image.new("RGB", (4, 4)))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "._b_good.jpg").write_bytes(b"\0\5\26\7")  # macOS resource fork: hidden, skipped
    images, problems = find_images(tmp_path)
    assert images == [bad, good, deep, gif]
    assert problems == []
    assert ".gif" in IMAGE_EXTENSIONS and ".webp" in IMAGE_EXTENSIONS
    assert find_images(str(tmp_path)) == (images, [])  # deterministic, str accepted


def test_find_images_single_file_as_is(tmp_path):
    p = tmp_path / "odd.name"
    p.write_bytes(b"x")
    assert find_images(p) == ([p], [])


def test_empty_folder(tmp_path):
    with pytest.raises(NoImagesError) as e:
        find_images(tmp_path)
    assert str(e.value).startswith(f"{tmp_path}: folder is empty") and ".jpg" in str(e.value)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text("x")
    with pytest.raises(NoImagesError) as e:
        find_images(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path}: no images found (2 other file(s))")
    assert ".jpeg" in msg and ".png" in msg and ".webp" in msg


def test_missing_path(tmp_path):
    with pytest.raises(NoImagesError, match="no such file or folder — check the path"):
        find_images(tmp_path / "missing")


def test_symlink_loop_is_reported_not_followed(tmp_path):
    img = _save(tmp_path / "a" / "b" / "x.jpg", Image.new("RGB", (4, 4)))
    try:
        os.symlink(tmp_path / "a", tmp_path / "a" / "b" / "back")  # a/b/back → a
        os.symlink("self", tmp_path / "a" / "self")  # a/self → itself
    except OSError:
        pytest.skip("cannot create symlinks here")
    images, problems = find_images(tmp_path)
    assert images == [img]
    reasons = {p.name: r for p, r in problems}
    assert set(reasons) == {"back", "self"}
    assert all("symlink loop" in r for r in reasons.values())


def test_second_link_to_same_folder_not_listed_twice(tmp_path):
    img = _save(tmp_path / "real" / "x.jpg", Image.new("RGB", (4, 4)))
    try:
        os.symlink(tmp_path / "real", tmp_path / "zlink")
        os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    except OSError:
        pytest.skip("cannot create symlinks here")
    images, problems = find_images(tmp_path)
    assert images == [img]
    assert [(p.name, "broken symlink" in r or "already searched" in r) for p, r in problems] == [
        ("dangling.jpg", True), ("zlink", True)]


def test_unreadable_folder_is_a_problem(tmp_path):
    _save(tmp_path / "ok.jpg", Image.new("RGB", (4, 4)))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("chmod 0 does not stop reads here (running as root)")
        images, problems = find_images(tmp_path)
        assert [p.name for p in images] == ["ok.jpg"]
        assert problems == [(locked, "cannot read folder (permission denied)")]
    finally:
        locked.chmod(0o755)


def test_non_utf8_file_name(tmp_path):
    if sys.platform == "win32" or sys.platform == "darwin":
        pytest.skip("this filesystem does not store arbitrary bytes in names")
    raw = os.path.join(os.fsencode(tmp_path), b"sky_\xff\xfe.jpg")
    try:
        with open(raw, "wb") as fh:
            fh.write(b"not an image")
    except OSError:
        pytest.skip("the filesystem refuses non-UTF-8 names")
    images, _ = find_images(tmp_path)
    assert len(images) == 1 and os.fsencode(images[0]) == raw
    shown = describe_path(images[0])
    assert shown.endswith("sky_\\xff\\xfe.jpg")
    shown.encode("utf-8")  # printable: no lone surrogates
    with pytest.raises(ImageError) as e:
        load_image(images[0])
    assert "sky_\\xff\\xfe.jpg: not an image" in str(e.value)
    str(e.value).encode("utf-8")


def test_describe_path_escapes_control_characters():
    assert describe_path("a\nb.jpg") == "a\\nb.jpg"


def test_icc_profile_converted_and_broken_profile_tolerated(tmp_path):
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    im = Image.new("RGB", (4, 4), (200, 100, 50))
    assert _close(load_image(_save(tmp_path / "srgb.png", im, icc_profile=srgb)).getpixel((1, 1)), (200, 100, 50), 3)
    out = load_image(_save(tmp_path / "junk.png", im, icc_profile=b"not a profile"))
    assert out.getpixel((1, 1)) == (200, 100, 50)
