"""Shared fixtures: a results folder per test, a private consumer cache, the synthetic task."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test session gets its own consumer-network cache (never the user's)."""
    cache = tmp_path_factory.getbasetemp() / "trickbench-cache"
    monkeypatch.setenv("TRICKBENCH_CACHE", str(cache))


@pytest.fixture
def synthetic_task(monkeypatch: pytest.MonkeyPatch) -> str:
    """Register the test-only ``synthetic`` task for the duration of a test."""
    from experiments import registry

    monkeypatch.setitem(registry._TASK_MODULES, "synthetic", "tests.synthetic_task")
    monkeypatch.setattr(registry, "TASK_NAMES", (*registry.TASK_NAMES, "synthetic"))
    from bench import spec

    monkeypatch.setattr(spec, "TASK_NAMES", registry.TASK_NAMES)
    return "synthetic"
