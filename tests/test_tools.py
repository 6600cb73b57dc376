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
