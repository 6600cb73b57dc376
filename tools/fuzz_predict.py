"""Fuzz ``rainclf predict`` with random and mutated image files; print what happened.

    python tools/fuzz_predict.py                     # 2,000 files, seed 0, a tiny model fitted here
    python tools/fuzz_predict.py --n 20000 --seed 7 --model MODEL_DIR --keep /tmp/fuzz

Files are random bytes, or real JPEG/PNG/GIF/WebP/BMP bytes with bit flips, overwritten ranges,
truncations, inserted/deleted runs, headers spliced onto other formats' bodies, and header size
fields rewritten (decompression bombs), under image extensions that may not match the content.
Every file is first decoded on its own (anything but an ``ImageError`` is a crash), then the whole
folder goes through ``rainclf.predict.predict`` once: it must finish, and the output must hold
exactly one row per file, each with a label or a one-line error naming the file.

Exit status 0 when there were no crashes and every file was accounted for, 1 otherwise.
``tests/test_fuzz.py`` runs the same generator, bounded (a few hundred files).
"""

from __future__ import annotations

import argparse
import io
import random
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".JPG", ".PNG")
MUTATIONS = ("random", "magic+random", "bitflip", "overwrite", "truncate", "insert", "delete",
             "splice", "dims", "original")


def make_seeds(seed: int = 0) -> list[tuple[bytes, str]]:
    """Small valid images in every format (and the modes that take other code paths)."""
    import numpy as np
    from PIL import Image, features

    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (24, 40, 4), dtype=np.uint8), "RGBA")
    second = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6

    def enc(im, fmt, **kw) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **kw)
        return buf.getvalue()

    seeds = [
        (enc(rgb, "JPEG", quality=85), ".jpg"),
        (enc(rgb, "JPEG", quality=70, progressive=True, exif=exif), ".jpg"),
        (enc(rgb.convert("CMYK"), "JPEG"), ".jpeg"),
        (enc(rgb.convert("L"), "JPEG"), ".jpg"),
        (enc(rgb, "PNG"), ".png"),
        (enc(rgba, "PNG"), ".png"),
        (enc(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8), "PNG", transparency=0), ".png"),
        (enc(Image.fromarray((rng.integers(0, 65535, (24, 40))).astype(np.uint16)), "PNG"), ".png"),
        (enc(rgb, "GIF", save_all=True, append_images=[second], duration=50, loop=0), ".gif"),
        (enc(rgb, "BMP"), ".bmp"),
    ]
    if features.check("webp"):
        seeds += [(enc(rgb, "WEBP", quality=80), ".webp"),
                  (enc(rgb, "WEBP", save_all=True, append_images=[second], lossless=True), ".webp")]
    return seeds


def _png_dims(data: bytes, w: int, h: int) -> bytes:
    """Rewrite a PNG's IHDR width/height and fix its CRC (so the header is 'valid')."""
    if not data.startswith(b"\x89PNG") or len(data) < 33:
        return data
    ihdr = b"IHDR" + struct.pack(">II", w, h) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _jpeg_dims(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the height/width of a JPEG's first SOFn segment."""
    for marker in (b"\xff\xc0", b"\xff\xc2", b"\xff\xc1"):
        i = data.find(marker)
        if i > 0 and i + 9 <= len(data):
            return data[:i + 5] + struct.pack(">HH", h & 0xFFFF, w & 0xFFFF) + data[i + 9:]
    return data


def _header_dims(data: bytes, w: int, h: int) -> bytes:
    if data.startswith(b"\x89PNG"):
        return _png_dims(data, w, h)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_dims(data, w, h)
    if data.startswith(b"GIF8") and len(data) > 10:
        return data[:6] + struct.pack("<HH", w & 0xFFFF, h & 0xFFFF) + data[10:]
    if data.startswith(b"BM") and len(data) > 26:
        return data[:18] + struct.pack("<ii", w, h) + data[26:]
    return data


def mutate(rng: random.Random, seeds: list[tuple[bytes, str]]) -> tuple[bytes, str, str]:
    """One fuzz file: (bytes, extension, mutation name)."""
    kind = rng.choice(MUTATIONS)
    data, ext = rng.choice(seeds)
    b = bytearray(data)
    if kind == "random":
        b = bytearray(rng.randbytes(rng.randint(0, 3000)))
    elif kind == "magic+random":
        b = bytearray(bytes(data[:rng.randint(2, 40)]) + rng.randbytes(rng.randint(0, 3000)))
    elif kind == "bitflip":
        # most flips near the start, where the headers are
        for _ in range(rng.randint(1, 24)):
            pos = min(int(rng.expovariate(1 / 200)), len(b) - 1) if rng.random() < 0.6 else rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        pos, n = rng.randrange(len(b)), rng.randint(1, 64)
        b[pos:pos + n] = rng.randbytes(min(n, len(b) - pos))
    elif kind == "truncate":
        b = b[:rng.randrange(len(b))]
    elif kind == "insert":
        pos = rng.randrange(len(b))
        b[pos:pos] = rng.randbytes(rng.randint(1, 256))
    elif kind == "delete":
        pos = rng.randrange(len(b))
        del b[pos:pos + rng.randint(1, 256)]
    elif kind == "splice":
        other, _ = rng.choice(seeds)
        cut_a, cut_b = rng.randrange(1, len(data)), rng.randrange(len(other))
        b = bytearray(data[:cut_a] + other[cut_b:])
    elif kind == "dims":
        w = rng.choice([0, 1, 2, 65535, 9000, 30000, 1 << 20, rng.randrange(1, 70000)])
        h = rng.choice([0, 1, 3, 65535, 9000, 30000, 1 << 20, rng.randrange(1, 70000)])
        b = bytearray(_header_dims(data, w, h))
    if rng.random() < 0.25:
        ext = rng.choice(EXTS)  # content decides the format, not the name
    return bytes(b), ext, kind


def write_corpus(folder: Path, n: int, seed: int) -> dict[str, str]:
    """Write ``n`` fuzz files into ``folder``; returns {file name: mutation}."""
    rng = random.Random(seed)
    seeds = make_seeds(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    for i in range(n):
        data, ext, kind = mutate(rng, seeds)
        name = f"f{i:05d}-{kind}{ext}"
        (folder / name).write_bytes(data)
        names[name] = kind
    return names


def decode_each(folder: Path, names) -> list[str]:
    """Decode every file on its own; return one line per crash (an exception other than ImageError)."""
    from rainclf.data.images import ImageError, load_image

    crashes = []
    for name in sorted(names):
        try:
            load_image(folder / name)
        except ImageError:
            pass
        except BaseException as exc:  # noqa: BLE001 - this is what a fuzzer looks for
            crashes.append(f"{name}: {type(exc).__name__}: {exc}")
    return crashes


def account(rows, folder: Path, names) -> list[str]:
    """Problems with the rows: missing, duplicate or unknown files, rows with neither or both of
    label and error, labels outside the two, multi-line errors, errors not naming the file."""
    from rainclf.data.images import describe_path
    from rainclf.labels import LABELS

    prefix = describe_path(folder) + "/"
    seen = Counter(r.path[len(prefix):] if r.path.startswith(prefix) else r.path for r in rows)
    problems = [f"{n}: {seen[n]} rows" for n in sorted(names) if seen[n] != 1]
    problems += [f"{p}: not a fuzz file" for p in sorted(set(seen) - set(names))]
    for r in rows:
        name = r.path[len(prefix):]
        if (r.label is None) == (r.error is None):
            problems.append(f"{name}: label {r.label!r} and error {r.error!r}")
        elif r.label is not None and (r.label not in LABELS or not 0.0 <= r.p_rain <= 1.0):
            problems.append(f"{name}: label {r.label!r} p_rain {r.p_rain!r}")
        elif r.error is not None and ("\n" in r.error or name not in r.error):
            problems.append(f"{name}: error does not name the file on one line: {r.error!r}")
    return problems


def error_kind(error: str) -> str:
    """'truncated JPEG', 'not an image', 'too many pixels', ... from an ImageError line."""
    problem = error.split(": ", 1)[-1].split(" — ")[0]
    return problem.split(" (")[0]


def run_campaign(folder: Path, model_dir: Path, n: int, seed: int, batch_size: int = 16,
                 cache_dir=None) -> dict:
    from rainclf.config import RunOptions
    from rainclf.predict import predict

    t0 = time.perf_counter()
    names = write_corpus(folder, n, seed)
    crashes = decode_each(folder, names)
    rows = []
    try:
        rows = predict(folder, model_dir, RunOptions(device="cpu", progress=False, batch_size=batch_size,
                                                     cache_dir=cache_dir), output=folder.parent / "fuzz.csv").rows
    except BaseException as exc:  # noqa: BLE001
        crashes.append(f"predict: {type(exc).__name__}: {exc}")
    unaccounted = account(rows, folder, names) if rows else [f"{len(names)} files: no output"]
    return {"files": len(names), "mutations": Counter(names.values()), "rows": len(rows),
            "predicted": sum(r.label is not None for r in rows),
            "errors": Counter(error_kind(r.error) for r in rows if r.error),
            "crashes": crashes, "unaccounted": unaccounted, "seconds": time.perf_counter() - t0}


def fit_tiny_model(out: Path) -> Path:
    """A linear head on glm4v-tiny (random weights) over a few synthetic skies."""
    import numpy as np
    from PIL import Image

    from rainclf.fit import FitOptions, fit

    rng = np.random.default_rng(0)
    data = out.parent / "fuzz-train"
    for label, base in (("会下雨", (70, 75, 85)), ("不会下雨", (90, 160, 235))):
        (data / label).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            arr = np.clip(np.array(base) + rng.normal(0, 18, (32, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(data / label / f"{i}.jpg")
    fit(data, out, FitOptions(backbone="glm4v-tiny", device="cpu", progress=False, cache_dir=None, val_split=0.0))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="number of fuzz files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, help="model directory (default: fit a tiny one)")
    ap.add_argument("--keep", type=Path, help="write the corpus here and keep it (default: a temp dir)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="lower PIL.Image.MAX_IMAGE_PIXELS (bounds memory; default: Pillow's)")
    args = ap.parse_args(argv)
    if args.max_pixels:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = args.max_pixels
    with tempfile.TemporaryDirectory(prefix="rainclf-fuzz-") as tmp:
        root = args.keep or Path(tmp)
        model = args.model or fit_tiny_model(Path(tmp) / "model")
        folder = root / "corpus"
        if folder.exists() and any(folder.iterdir()):
            ap.error(f"{folder} is not empty")
        res = run_campaign(folder, model, args.n, args.seed, args.batch_size)
    print(f"files {res['files']} (seed {args.seed}), rows {res['rows']}, predicted {res['predicted']}, "
          f"errors {sum(res['errors'].values())}, crashes {len(res['crashes'])}, "
          f"unaccounted {len(res['unaccounted'])}, {res['seconds']:.1f} s")
    print("mutations: " + ", ".join(f"{k} {v}" for k, v in sorted(res["mutations"].items())))
    print("errors: " + ", ".join(f"{k} {v}" for k, v in res["errors"].most_common()))
    for line in (res["crashes"] + res["unaccounted"])[:50]:
        print(f"  {line}")
    return 1 if res["crashes"] or res["unaccounted"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
