"""Shared fixtures: the committed tiny GLM-4V (random weights), real photos from ../shared, and
synthetic images. Everything runs offline on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
