"""Shared by the generator scripts in tools/: write a generated folder, or ``--check`` that the
committed copy is byte-identical to a fresh build (so generated artefacts never drift from
their scripts)."""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable


def digest(folder: Path) -> dict[str, str]:
    """relative path → sha256 prefix, for every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(folder.rglob("*")) if p.is_file()}


def main(doc: str, default_out: Path, write: Callable[[Path], None], what: str, argv=None) -> int:
    """CLI of a generator: ``[--out DIR] [--check]``; ``what`` describes the result when written."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--check", action="store_true",
                    help="regenerate into a temporary folder and compare byte for byte with --out")
    args = ap.parse_args(argv)
    if not args.check:
        if args.out.exists():
            shutil.rmtree(args.out)
        write(args.out)
        sums = digest(args.out)
        size = sum((args.out / rel).stat().st_size for rel in sums)
        print(f"wrote {args.out}: {len(sums)} files, {size / 1e3:.0f} KB ({what})")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / args.out.name
        write(fresh)
        want, have = digest(fresh), digest(args.out) if args.out.is_dir() else {}
        differs = sorted(rel for rel in want.keys() | have.keys() if want.get(rel) != have.get(rel))
        if differs:
            print(f"{args.out}: {len(differs)} file(s) differ from a fresh build, e.g. {differs[:5]} — "
                  f"rerun python {Path(sys.argv[0]).as_posix()}", file=sys.stderr)
            return 1
        print(f"{args.out}: {len(want)} files byte-identical to a fresh build")
        return 0
