"""Atomic outputs: a file or directory appears complete or not at all, and nothing that was
there is lost.

Everything is first written under a hidden temporary name in the destination's own folder (same
file system, so renames are atomic), then renamed. A run killed with -9 leaves at most a
``.rainclf-tmp-*`` entry behind, never a half-written result; those leftovers are swept the next
time something is written into that folder (once older than ``STALE_SECONDS``).

Replacing a directory (``fit --overwrite``, a re-export) swaps old and new in one step
(``renameat2(RENAME_EXCHANGE)`` on Linux), so a concurrent reader sees the old or the new one and
never no directory. The old one then lies under ``.rainclf-old-*``, a name the sweeper never
deletes, until this process removes it; a run killed in between leaves it there and the next
write into that folder says so.

Every file and folder gets the same mode, 0666 / 0777 minus the umask, whatever library wrote it.
Targets that are not regular files (a device, a FIFO, a socket) are refused, never replaced:
``-`` (the command line's stdout) is the only way to write to a stream.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import sys
import time
from pathlib import Path

from rainclf.errors import OutputError, output_error

TMP_PREFIX = ".rainclf-tmp-"
OLD_PREFIX = ".rainclf-old-"       # a replaced directory waiting to be deleted: never swept
STALE_SECONDS = 3600.0
#: the files of a model directory written last (model.write_common_files): a leftover holding all
#: of them is a complete model, never deleted by the sweep
COMPLETE_MODEL = ("config.json", "metrics.json", "README.md")
_RENAME_EXCHANGE = 2
SYSTEM_DIRS = ("/dev", "/proc", "/sys")   # device and kernel nodes: never an output (-o - is stdout)


def tmp_name(dest: Path, prefix: str = TMP_PREFIX) -> Path:
    """A hidden temporary name beside ``dest`` (same file system), unique to this process."""
    return dest.parent / f"{prefix}{dest.name}.{os.getpid()}.{os.urandom(3).hex()}"


def sweep_stale(folder: Path, older_than: float = STALE_SECONDS) -> list[Path]:
    """Remove leftovers of killed runs (temporary entries older than ``older_than`` seconds);
    returns the ``.rainclf-old-*`` directories found (kept: they hold a complete old result)."""
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    now, kept = time.time(), []
    for p in entries:
        if p.name.startswith(OLD_PREFIX):
            kept.append(p)
        elif p.name.startswith(TMP_PREFIX):
            try:
                if now - p.lstat().st_mtime <= older_than:
                    continue
                if p.is_dir() and not p.is_symlink() and all((p / f).is_file() for f in COMPLETE_MODEL):
                    # a complete model (an older rainclf's interrupted --overwrite put the previous
                    # one here): kept under the name that is never swept, and reported
                    kept_as = p.parent / (OLD_PREFIX + p.name[len(TMP_PREFIX):])
                    os.replace(p, kept_as)
                    kept.append(kept_as)
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            except OSError:
                pass
    return kept


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def normalise_modes(root: Path) -> None:
    """Files 0666 and folders 0777 minus the umask, under ``root`` (itself included)."""
    mask = umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def check_target(dest: str | Path, is_dir: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: a special file (device, FIFO,
    socket, anything under /dev, /proc or /sys — /dev/stdout included), a folder where a file is
    wanted (or a file where a folder is), a folder we may not write into, a name too long once the
    temporary prefix is added. Creates nothing. Returns the path to write: a symbolic link to a
    file is written through (the link stays)."""
    dest = Path(dest)
    for where in (os.path.abspath(dest), os.path.realpath(dest)):   # /dev/stdout, and links into /dev
        top = next((d for d in SYSTEM_DIRS if where == d or where.startswith(d + os.sep)), None)
        if top is not None:
            raise OutputError(f"cannot write {dest}: it is under {top}, where rainclf never replaces anything "
                              "— name a regular file elsewhere, or -o - for stdout")
    if not is_dir and os.path.islink(dest):
        dest = Path(os.path.realpath(dest))   # write through a link to a file: the link itself stays
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise output_error(dest, e) from None
    if st is not None:
        if is_dir and not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"cannot write {dest}: it exists and is not a folder — choose another name")
        if not is_dir and not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                    else "a block device" if stat.S_ISBLK(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise OutputError(f"cannot write {dest}: it is {kind}, which rainclf never replaces — name a "
                              "regular file, or -o - for stdout")
    ancestor = dest.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"cannot write {dest}: {ancestor} is a file, not a folder — write elsewhere")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {dest}: {ancestor} is not writable — fix its permissions or write elsewhere")
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    size = len(dest.name.encode("utf-8", "surrogateescape"))
    extra = max(len(tmp_name(dest, p).name.encode("utf-8", "surrogateescape")) for p in (TMP_PREFIX, OLD_PREFIX)) - size
    if size + extra > name_max:
        raise OutputError(f"cannot write {dest}: the name is too long once rainclf's temporary prefix is "
                          f"added ({size} bytes; at most {name_max - extra} here) — choose a shorter name")
    return dest


def as_os_error(e: BaseException) -> OSError | None:
    """``e`` itself if an OSError; the OSError inside a library's own error type (safetensors
    reports a full disk as "SafetensorError: … I/O error: … (os error 28)"); else None."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, Exception):
        m = re.search(r"\(os error (\d+)\)", str(e))
        if m:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    return None


def _ours(e: OSError, *paths: Path) -> bool:
    """Did ``e`` happen writing one of ``paths`` (or inside one), not reading some input?"""
    if e.filename is None:
        return True
    name = os.fsdecode(e.filename) if isinstance(e.filename, bytes) else str(e.filename)
    return any(name == str(p) or name.startswith(str(p) + os.sep) for p in paths)


@contextlib.contextmanager
def atomic_file(dest: str | Path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """``with atomic_file(p) as f: f.write(...)`` → p appears only when the block succeeds."""
    dest = check_target(dest)
    tmp = tmp_name(dest)
    kwargs = {} if "b" in mode else {"encoding": encoding, "newline": newline}
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(dest.parent)
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, dest)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        oe = as_os_error(e)
        if oe is not None and _ours(oe, dest, tmp, dest.parent):
            raise output_error(dest, oe) from e
        raise


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    import errno

    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(new: Path, dest: Path) -> None:
    """Put the complete directory ``new`` at ``dest``, replacing what is there without a moment
    with neither; the old one is deleted last (kept under ``.rainclf-old-*`` if we are killed)."""
    if not os.path.lexists(dest):
        os.replace(new, dest)
        return
    old = tmp_name(dest, OLD_PREFIX)
    os.replace(new, old)                 # complete now: a name the sweeper keeps
    if exchange(old, dest):              # dest: new; old: the previous directory
        shutil.rmtree(old, ignore_errors=True)
        return
    # no atomic exchange here: the previous directory steps aside under the kept name first
    aside = tmp_name(dest, OLD_PREFIX)
    os.replace(dest, aside)
    os.replace(old, dest)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False):
    """``with atomic_dir(d) as tmp: write into tmp`` → d appears (or is replaced) only on success."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists: choose another -o or pass --overwrite")
    check_target(dest, is_dir=True)
    tmp = tmp_name(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for p in sweep_stale(dest.parent):
            log(f"note: kept {p}: a complete earlier version of {p.parent}/{p.name[len(OLD_PREFIX):].rsplit('.', 2)[0]} "
                "that a killed --overwrite left behind — delete it when you no longer need it")
        tmp.mkdir()
    except OSError as e:
        raise output_error(dest, e) from e
    try:
        yield tmp
        normalise_modes(tmp)
        replace_dir(tmp, dest)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        oe = as_os_error(e)
        if oe is not None and _ours(oe, dest, tmp):
            raise output_error(dest, oe) from e
        raise


def log(msg: str, progress: bool = True) -> None:
    """One ``rainclf:`` line on stderr, above any live progress bar (never on its line)."""
    if progress:
        if "tqdm" in sys.modules:
            from tqdm import tqdm

            tqdm.write(f"rainclf: {msg}", file=sys.stderr)
        else:
            print(f"rainclf: {msg}", file=sys.stderr)
