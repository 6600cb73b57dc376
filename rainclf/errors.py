"""What the command line does with an exception: one line and a documented exit status for a
user's mistake or an environment problem, "internal error, please report" for a bug.

Exit status (every command):

    0    success (predict: at least one image was predicted)
    1    the job ran but produced nothing usable (predict: no image could be predicted)
    2    bad usage or bad input: an option, a data file, an image folder, a model directory or an
         ONNX export that cannot be used — one line names the file and the fix
    3    an output could not be written (folder missing or read-only, disk full, file-size limit,
         name too long, a special file as -o) — checked before long work where it can be
    70   internal error: a bug in rainclf; ``--debug`` (or ``RAINCLF_DEBUG=1``) shows the traceback
    130  interrupted (Ctrl-C); nothing half-written is left behind

Which exceptions are a user's: every ``UserError`` (below), the package's own error types
(``BackboneError``, ``DataError``, ``ImageError``, ``ModelDirError``, ``OnnxExportError`` …),
``FileExistsError``, and a ``ValueError`` that rainclf raised itself (the innermost frame of its
traceback is rainclf code: those messages are written for users). A ``ValueError`` raised inside
numpy, torch, onnxruntime … escaped a check rainclf should have made, so it is an internal error.
An ``OSError`` that names a file is reported as that file and the system's reason.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

EXIT_OK = 0
EXIT_NOTHING = 1
EXIT_BAD_INPUT = 2
EXIT_OUTPUT = 3
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

DEBUG_ENV = "RAINCLF_DEBUG"
PACKAGE_DIR = str(Path(__file__).resolve().parent)


class UserError(ValueError):
    """A problem the user can fix; ``exit_code`` is what the command line exits with. A
    ValueError, so library callers that caught ValueError before still do."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(UserError):
    """Unusable input: an option, a file or a folder (exit 2)."""


class OutputError(UserError):
    """An output cannot be written (exit 3)."""

    exit_code = EXIT_OUTPUT


#: errno values that mean "the output location cannot take this file" (→ OutputError wording)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENAMETOOLONG, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EXDEV}

_FIXES = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space (quota) or write elsewhere",
    errno.EFBIG: "the file-size limit (ulimit -f) is too small: raise it or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "you may not write there: fix its permissions or write elsewhere",
    errno.EPERM: "you may not write there: fix its permissions or write elsewhere",
    errno.ENAMETOOLONG: "the name is too long for this file system: choose a shorter one",
    errno.ENOENT: "its folder does not exist: create it or write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder: write elsewhere",
    errno.EISDIR: "it is a folder: name a file",
}


def output_error(path, e: OSError) -> OutputError:
    """``OSError`` while writing ``path`` → one line naming it, the reason and the fix."""
    reason = e.strerror or str(e)
    fix = _FIXES.get(e.errno, "write elsewhere")
    return OutputError(f"cannot write {path}: {reason} — {fix}")


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def raised_by_rainclf(e: BaseException) -> bool:
    """True when the innermost frame of ``e``'s traceback is in the rainclf package."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(PACKAGE_DIR)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _package_errors() -> tuple:
    """The package's own error types, of the modules imported so far (one not imported cannot
    have raised its error, and importing it here could pull torch into a torch-free host)."""
    import sys

    return tuple(getattr(sys.modules[m], name) for m, name in (
        ("rainclf.backbones.base", "BackboneError"), ("rainclf.data.datasets", "DataError"),
        ("rainclf.data.images", "ImageError"), ("rainclf.model", "ModelDirError"),
        ("rainclf.onnx.format", "OnnxExportError")) if m in sys.modules)


def classify(e: BaseException) -> tuple[int, str] | None:
    """(exit status, one line) for a user's or the environment's error; None for a bug."""
    if isinstance(e, UserError):
        return e.exit_code, first_line(e)
    if isinstance(e, (FileExistsError, *_package_errors())):
        return EXIT_BAD_INPUT, first_line(e)
    if isinstance(e, OSError):
        name = e.filename if e.filename is not None else None
        if name is None:
            return None
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            return EXIT_OUTPUT, first_line(output_error(name, e))
        return EXIT_BAD_INPUT, f"{name}: {e.strerror or e} — check the path and its permissions"
    if isinstance(e, ValueError) and raised_by_rainclf(e):
        return EXIT_BAD_INPUT, first_line(e)
    return None
