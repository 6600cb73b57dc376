"""Atomic outputs: a file or directory appears complete or not at all.

Everything is first written under a hidden temporary name in the destination's own folder (same
file system, so ``os.replace`` is atomic), then renamed. A run killed with -9 leaves at most a
``.rainclf-tmp-*`` entry behind, never a half-written result; those leftovers are swept the next
time something is written into that folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

TMP_PREFIX = ".rainclf-tmp-"
STALE_SECONDS = 3600.0


def tmp_name(dest: Path) -> Path:
    """A hidden temporary name beside ``dest`` (same file system), unique to this process."""
    return dest.parent / f"{TMP_PREFIX}{dest.name}.{os.getpid()}.{os.urandom(3).hex()}"


def sweep_stale(folder: Path, older_than: float = STALE_SECONDS) -> None:
    """Remove leftovers of killed runs (temporary entries older than ``older_than`` seconds)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    now = time.time()
    for p in entries:
        if p.name.startswith(TMP_PREFIX):
            try:
                if now - p.lstat().st_mtime > older_than:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass


@contextlib.contextmanager
def atomic_file(dest: str | Path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """``with atomic_file(p) as f: f.write(...)`` → p appears only when the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest.parent)
    tmp = tmp_name(dest)
    kwargs = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False):
    """``with atomic_dir(d) as tmp: write into tmp`` → d appears (or is replaced) only on success."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists: choose another -o or pass --overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest.parent)
    tmp = tmp_name(dest)
    tmp.mkdir()
    try:
        yield tmp
        if dest.exists():
            # rename the old one away first: a crash between the two renames loses nothing
            old = tmp_name(dest)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def log(msg: str, progress: bool = True) -> None:
    if progress:
        print(f"rainclf: {msg}", file=sys.stderr)
