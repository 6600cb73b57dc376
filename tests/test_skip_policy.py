"""The skip allow-list in tests/conftest.py: a run with a test skipped for a reason that is not
allowed (a missing module, "not written yet") fails and names it; allowed skips (root-only
permission tests, GPU tests without a GPU) pass and are listed with -rs."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO

CASES = '''
import pytest

pytest.importorskip("{module}")

def test_root_only():
    pytest.skip("chmod 0 does not stop reads here (running as root)")

def test_gpu(cuda):
    assert cuda == "cuda"

def test_runs():
    assert 1 + 1 == 2
'''


def _run(tmp_path, body: str):
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(body, encoding="utf-8")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True)


def test_allowed_skips_pass_and_are_listed(tmp_path):
    import torch

    r = _run(tmp_path, CASES.format(module="json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "running as root" in r.stdout                       # -rs lists the reason
    assert "skips not in the allow-list" not in r.stdout
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in r.stdout


def test_a_missing_module_fails_the_run(tmp_path):
    r = _run(tmp_path, CASES.format(module="no_such_module_rainclf"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "skips not in the allow-list" in r.stdout and "no_such_module_rainclf" in r.stdout


def test_a_skip_inside_a_test_fails_the_run(tmp_path):
    r = _run(tmp_path, "import pytest\n\ndef test_x():\n    pytest.skip('export does not exist in this checkout')\n")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "SKIPPED, counted as FAILED: test_cases.py::test_x" in r.stdout
