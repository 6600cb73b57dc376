"""Shared fixtures: the committed tiny GLM-4V (random weights), real photos from ../shared, and
synthetic images. Everything runs offline on the CPU, except the ``gpu`` tests (``pytest -m gpu``).

Also a small plugin: a skipped test hides whatever it would have found, so a run fails when a test
is skipped for a reason not in ``ALLOWED_SKIPS`` (a missing module, command or data folder is a
failure, not a skip). Skip reasons are listed at the end of every run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

#: reason pattern → why such a skip is acceptable. Anything else skipped fails the run.
ALLOWED_SKIPS = {
    r"running as root": "permission tests: chmod 0 does not stop root from reading a file",
    r"needs a CUDA GPU": "GPU tests (pytest -m gpu) asked for on a machine without one",
}
_SKIPPED = pytest.StashKey[list]()


def skip_allowed(reason: str) -> bool:
    return any(re.search(pattern, reason) for pattern in ALLOWED_SKIPS)


def pytest_configure(config):
    config.stash[_SKIPPED] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        item.config.stash[_SKIPPED].append((report.nodeid, reason))


def pytest_collectreport(report):
    # a module skipped while collecting (module-level pytest.skip / importorskip)
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _collect_skips.append((report.nodeid, reason))


_collect_skips: list = []


def _disallowed(config) -> list:
    skipped = config.stash.get(_SKIPPED, []) + _collect_skips
    return [(nodeid, reason) for nodeid, reason in skipped if not skip_allowed(reason)]


def pytest_sessionfinish(session, exitstatus):
    clean = (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)
    if _disallowed(session.config) and session.exitstatus in clean:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = _disallowed(config)
    if bad:
        terminalreporter.section("skips not in the allow-list (ALLOWED_SKIPS in tests/conftest.py)", red=True)
        for nodeid, reason in bad:
            terminalreporter.line(f"SKIPPED, counted as FAILED: {nodeid}: {reason}")
        terminalreporter.line(f"{len(bad)} test(s) skipped for a reason that could hide a failure: the run fails.")


@pytest.fixture
def cuda():
    """A CUDA device for ``gpu`` tests; skips (allowed) on a machine without one."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: run pytest -m gpu on a GPU machine")
    return "cuda"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_WEATHER = REPO.parent / "shared" / "weather"
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache: every test gets its own default cache folder."""
    monkeypatch.setenv("RAINCLF_CACHE_DIR", str(tmp_path_factory.mktemp("rainclf-cache")))


@pytest.fixture(scope="session")
def tiny_backbone():
    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import BackboneOptions

    backbone = create_backbone("glm4v-tiny", BackboneOptions(device="cpu"))
    backbone.load()
    return backbone


@pytest.fixture(scope="session")
def weather_dir() -> Path:
    if not (SHARED_WEATHER / "images").is_dir():
        pytest.skip(f"real photos not found at {SHARED_WEATHER} (../shared/weather beside the checkout)")
    return SHARED_WEATHER


@pytest.fixture(scope="session")
def weather_photos(weather_dir) -> list[Path]:
    return sorted((weather_dir / "images").glob("*.jpg"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: the tiny model gains nothing from more, and on a busy
    machine spinning OpenMP threads made LoRA fits 10x slower (3 s vs 50 s)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def fake_backbone(monkeypatch) -> str:
    """The registry name of a numpy-only fake backbone (tests/fakes.py), registered for one test."""
    from fakes import register

    return register(monkeypatch)
