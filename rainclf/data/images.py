"""Finding image files on disk and decoding them into plain RGB ``PIL.Image`` objects, safely.

Every bad input a user can drop into a folder (empty, truncated, mislabelled text, a symlink loop,
a 16-bit PNG, a decompression bomb, a non-UTF-8 name ...) ends as ONE :class:`ImageError` line that
names the file and says what to do, never as a traceback from deep inside Pillow.

Decisions (kept here so every caller behaves the same):

* ``.gif`` is accepted: people drop animated GIFs in. Only the FIRST frame is used (also for
  animated WebP), because a classifier sees one picture.
* Transparency (RGBA, LA, PA, palette or RGB/L with a transparent colour) is composited over
  WHITE, the colour a viewer shows and the one the shared training photos were flattened onto.
* Content decides the format, not the extension (a PNG named ``.jpg`` is fine), but only the
  formats behind :data:`IMAGE_EXTENSIONS` are tried, so random bytes are never "decoded" by an
  exotic plugin with no magic number (TGA, ...).
* An embedded ICC profile is converted to sRGB when Pillow has LittleCMS (the shared photos were
  converted the same way); a broken profile or broken EXIF never rejects a photo.
* Hidden entries (names starting with ``.``: ``.git``, macOS ``._x.jpg`` resource forks) are
  skipped by :func:`find_images`; a single file path is always taken as given.
* ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone (off): a truncated file is an error.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
# Pillow format names that those extensions can hold (MPO, a multi-picture JPEG, comes from the
# JPEG opener; DIB is a BMP without its file header).
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF")
_EXTS_TEXT = ", ".join(sorted(IMAGE_EXTENSIONS))
_FIX_FILE = "re-export or remove the file"
_BOMB_FIX = "resize it or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file"


def describe_path(path: str | os.PathLike | bytes) -> str:
    """A printable one-line form of ``path``: undecodable bytes of a non-UTF-8 name become
    ``\\xff`` escapes and control characters (a newline in a name) are escaped too."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ImageError(Exception):
    """One image file cannot be used. ``str(err)`` is one line: ``<path>: <problem> — <fix>``."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = _FIX_FILE) -> None:
        self.path = Path(path) if not isinstance(path, Path) else path
        self.problem = _one_line(problem)
        self.fix = fix
        super().__init__(f"{describe_path(path)}: {self.problem} — {fix}")


class NoImagesError(ImageError):
    """A path that holds no image at all: missing, an empty folder, or a folder without images."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or exc.__class__.__name__).lower()


# --------------------------------------------------------------------------------------------
# finding files


def find_images(root: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]]:
    """All image files under ``root`` (recursive, sorted), plus ``(path, reason)`` problems met
    on the way (unreadable folder, symlink loop, broken symlink). A file path is returned as is.

    Files are matched by extension only (case-insensitive); bad content is reported later by
    :func:`load_image`. Raises :class:`NoImagesError` when nothing image-like is found.
    """
    root = Path(root)
    try:
        st = os.stat(root)
    except OSError as exc:
        raise NoImagesError(root, "no such file or folder" if isinstance(exc, FileNotFoundError)
                            else f"cannot open ({_os_reason(exc)})", "check the path") from None
    if not stat.S_ISDIR(st.st_mode):
        return [root], []

    images: list[Path] = []
    problems: list[tuple[Path, str]] = []
    other_files = 0
    root_key = (st.st_dev, st.st_ino)
    # Folders are identified by (device, inode) so a symlink back to a parent is seen as the
    # loop it is, and a second link to an already searched folder does not list files twice.
    seen = {root_key}
    pending: list[tuple[Path, tuple[tuple[int, int], ...]]] = [(root, (root_key,))]
    while pending:
        folder, ancestors = pending.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as exc:
            problems.append((folder, f"cannot read folder ({_os_reason(exc)})"))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            try:
                est = entry.stat()  # follows symlinks
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    problems.append((path, "symlink loop (the link points to itself)"))
                elif isinstance(exc, FileNotFoundError):
                    problems.append((path, "broken symlink (its target does not exist)"))
                else:
                    problems.append((path, f"cannot stat ({_os_reason(exc)})"))
                continue
            if stat.S_ISDIR(est.st_mode):
                key = (est.st_dev, est.st_ino)
                if key in ancestors:
                    problems.append((path, "symlink loop (points back to a parent folder), skipped"))
                elif key in seen:
                    problems.append((path, "same folder already searched through another path, skipped"))
                else:
                    seen.add(key)
                    pending.append((path, ancestors + (key,)))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(path)
            else:
                other_files += 1

    if not images:
        if other_files == 0 and not problems:
            raise NoImagesError(root, "folder is empty", f"add images ({_EXTS_TEXT})")
        detail = f"{other_files} other file(s)"
        if problems:
            detail += f", {len(problems)} problem(s), first: {describe_path(problems[0][0])}: {problems[0][1]}"
        raise NoImagesError(root, f"no images found ({detail})",
                            f"searched recursively for {_EXTS_TEXT} (any case)")
    # Sorted by the raw bytes of each path component: deterministic, also for non-UTF-8 names.
    images.sort(key=lambda p: [os.fsencode(part) for part in p.parts])
    problems.sort(key=lambda item: os.fsencode(item[0]))
    return images, problems


# --------------------------------------------------------------------------------------------
# reading and decoding


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, or :class:`ImageError` (missing, a folder, unreadable, zero bytes)."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError(path, "is a folder, not an image file", "pass the image file or use find_images")
        # A FIFO or device would block or never end: refuse anything that is not a plain file.
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, "not a regular file", "pass a plain image file")
        with open(path, "rb") as fh:
            data = fh.read()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(path, "file not found", "check the path") from None
    except PermissionError:
        raise ImageError(path, "permission denied", "make it readable (chmod +r) or remove it") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read ({_os_reason(exc)})", "check the disk or remove the file") from None
    if not data:
        raise ImageError(path, "empty file (0 bytes)", _FIX_FILE)
    return data


def _open_formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in _FORMATS if f in Image.OPEN)  # WEBP may be missing from a build


def _bomb_error(path: str | os.PathLike, exc: Exception | str) -> ImageError:
    m = re.search(r"\((\d+) pixels\)", str(exc))
    n = m.group(1) if m else "?"
    return ImageError(path, f"too many pixels ({n} > {Image.MAX_IMAGE_PIXELS})", _BOMB_FIX)


def decode_image(data: bytes, path: str | os.PathLike) -> Image.Image:
    """Decode ``data`` (the bytes of ``path``, named in errors) into a fully loaded RGB image.

    EXIF orientation is applied, the first frame of an animation is used, alpha is composited
    over white, 16-bit greyscale is scaled to 8 bits. Raises :class:`ImageError` for anything
    that is not a complete image, including Pillow's decompression-bomb limit.
    """
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    fmt = "image"
    try:
        # The warning (> MAX_IMAGE_PIXELS) is an error here, not a line on stderr: a service
        # should refuse the file, not decode 200 megapixels.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Pillow's UserWarnings about broken metadata ("Tag data larger than file") would be
            # stray stderr lines that name no file; the pixels are used as they are, silently.
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(io.BytesIO(data), formats=_open_formats()) as im:
                fmt = im.format or fmt
                # Again by hand: catch_warnings is process-wide, another thread may have reset it.
                if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                    raise _bomb_error(path, f"({im.width * im.height} pixels)")
                im.seek(0)  # first frame of an animated GIF/WebP
                im.load()
                return _to_rgb(im, path)
    except ImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise _bomb_error(path, exc) from None
    except UnidentifiedImageError:
        sniffed = _sniff(data)
        if sniffed is None:
            raise ImageError(path, "not an image (not readable as JPEG/PNG/WebP/BMP/GIF)") from None
        # The magic number is right but the header is cut or damaged: say which, not "not an image".
        raise ImageError(path, f"{'truncated' if _looks_truncated(data, sniffed) else 'corrupt'} "
                         f"{sniffed} (header cannot be read)") from None
    except MemoryError:
        raise ImageError(path, "out of memory while decoding", "resize the image") from None
    except Exception as exc:  # Pillow plugins raise OSError, SyntaxError, ValueError, struct.error...
        reason = _one_line(exc) or exc.__class__.__name__
        kind = "truncated" if "truncated" in reason.lower() else "corrupt"
        if fmt == "image":  # Image.open failed before naming the format
            fmt = _sniff(data) or fmt
        raise ImageError(path, f"{kind} {fmt} ({reason})") from None


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"))


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _looks_truncated(data: bytes, fmt: str) -> bool:
    """Whether the file lacks its format's end marker (only the formats that have one)."""
    tail = data[-16:]
    return {"JPEG": b"\xff\xd9" not in tail, "PNG": b"IEND" not in tail,
            "GIF": not data.endswith(b";")}.get(fmt, False)


def load_image(path: str | os.PathLike) -> Image.Image:
    """``decode_image(read_bytes(path), path)``: a loaded RGB image with no file left open."""
    return decode_image(read_bytes(path), path)


# --------------------------------------------------------------------------------------------
# colour modes → RGB


def to_rgb(im: Image.Image, name: str | os.PathLike = "<image>") -> Image.Image:
    """Any PIL image (a file decoded here, or one a caller opened) → RGB exactly as
    ``decode_image`` makes it: EXIF rotation applied, ICC profile → sRGB, alpha over white,
    16-bit scaled. A plain RGB image without rotation or profile is returned as it is."""
    if im.mode == "RGB" and not im.info.get("icc_profile") and not im.getexif().get(_EXIF_ORIENTATION):
        return im
    return _to_rgb(im, name)


_EXIF_ORIENTATION = 0x0112


def _to_rgb(im: Image.Image, path: str | os.PathLike) -> Image.Image:
    """A new RGB image from any mode Pillow loads from our formats (``im`` is closed after)."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF: the pixels are fine, keep them as stored
        im = im.copy()
    im = _apply_icc(im)

    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        im = Image.fromarray(_to_uint8(np.asarray(im)), mode="L")
        mode = "L"
    if mode in ("P", "L", "RGB", "1") and "transparency" in im.info:
        im = im.convert("RGBA")  # palette / colour-key transparency becomes an alpha channel
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    try:
        out = im.convert("RGB")  # L, 1, P, CMYK, YCbCr and RGB itself (convert copies)
    except ValueError as exc:
        raise ImageError(path, f"unsupported colour mode {mode} ({_one_line(exc)})",
                         "convert it to RGB") from None
    return out


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale a 16/32-bit integer or float greyscale array to 0..255 (never clip to white)."""
    a = arr.astype(np.float64)
    if arr.dtype.kind == "f":
        hi = 1.0 if a.size == 0 or np.nanmax(a) <= 1.0 else 255.0
    elif a.size and a.max() <= 255:
        hi = 255.0  # an "I" image that only holds 8-bit values
    elif a.size and a.max() <= 65535:
        hi = 65535.0  # 16-bit PNG, whether Pillow calls it "I;16" or "I"
    else:
        hi = float(a.max()) if a.size else 1.0
    return np.clip(np.nan_to_num(a) * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8)


def _apply_icc(im: Image.Image) -> Image.Image:
    """Convert an embedded ICC profile to sRGB (RGB, RGBA, CMYK only); on any failure, unchanged."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
        return im
    try:
        from PIL import (
            ImageCms,  # part of Pillow; needs LittleCMS, absent from some builds
        )

        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
        out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode=out_mode)
    except Exception:  # a broken profile is common on web images; the raw values are close enough
        return im
    return out if out is not None else im


def decode_paths(paths, prepare=None):
    """(images, errors): a decoded RGB image or None per path, and the error string or None.
    ``prepare`` (e.g. ``Backbone.prepare_images``) resizes each image right away: less memory
    than holding every full-size photo of a batch."""
    images, errors = [], []
    for p in paths:
        try:
            im = decode_image(read_bytes(p), p)
            images.append(prepare([im])[0] if prepare is not None else im)
            errors.append(None)
        except ImageError as e:
            images.append(None)
            errors.append(str(e))
    return images, errors
