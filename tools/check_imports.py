"""Import graph of the rainclf package: every ``import`` / ``from … import`` statement, at module
level and inside functions, between rainclf modules. Prints the import cycles (none is the rule)
and the modules over the size limit; exit 1 if there is either.

    python tools/check_imports.py [--max-lines 450] [--json FILE]

Only written import statements count: a package's ``__init__`` that imports its own submodules
(the backbone registry re-exports ``backbones/base.py``) is not a cycle, because nothing in
those submodules imports the ``__init__`` back.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rainclf"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(node: ast.AST, known: set[str]) -> set[str]:
    """rainclf modules named by one import statement (``from pkg import sub`` names ``pkg.sub``)."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return out
    for name in names:
        while name and name not in known:      # rainclf.x.attr → rainclf.x
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            edges[name] |= imported(node, known)
        edges[name].discard(name)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def long_modules(max_lines: int) -> dict[str, int]:
    sizes = {m: len(p.read_text(encoding="utf-8").splitlines()) for m, p in modules().items()}
    return {m: n for m, n in sorted(sizes.items()) if n > max_lines}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-lines", type=int, default=450)
    ap.add_argument("--json", type=Path, help="also write the findings as JSON")
    args = ap.parse_args(argv)
    edges = graph()
    found, long = cycles(edges), long_modules(args.max_lines)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} import edges")
    for comp in found:
        print("cycle: " + " <-> ".join(comp))
    for m, n in long.items():
        print(f"too long: {m} ({n} lines > {args.max_lines})")
    if not found and not long:
        print("no import cycles; no module over the limit")
    if args.json:
        args.json.write_text(json.dumps({"cycles": found, "too_long": long}, indent=2) + "\n")
    return 1 if found or long else 0


if __name__ == "__main__":
    sys.exit(main())
