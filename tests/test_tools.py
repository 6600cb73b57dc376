"""The committed generated artefacts are exactly what their scripts produce."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_tiny_glm4v_regenerates_byte_identically():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_glm4v.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "byte-identical" in r.stdout


def test_sample_data_regenerates_byte_identically():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "make_sample_data.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_has_no_import_cycle_and_no_long_module():
    """tools/check_imports.py reads every import statement (functions included) of rainclf/."""
    r = subprocess.run([sys.executable, str(REPO / "tools" / "check_imports.py"), "--max-lines", "450"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no import cycles; no module over the limit" in r.stdout


def test_import_checker_finds_a_cycle(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import check_imports
    finally:
        sys.path.pop(0)
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert check_imports.cycles(edges) == [["a", "b", "c"]]
