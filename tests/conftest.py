"""Shared fixtures: a results folder per test, a private consumer cache, the synthetic task."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
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
def synthetic_task() -> Iterator[str]:
    """Register the test-only ``synthetic`` task for the duration of a test (``register_task``, as a user would)."""
    from experiments.registry import register_task, unregister_task
    from tests.synthetic_task import Synthetic

    register_task(Synthetic)
    yield "synthetic"
    unregister_task("synthetic")
