"""Registry-driven tests: every trick has a card and a tiny setting; every (task, trick) cell of the
applicability matrix smoke-trains and resumes bit-exactly. A new trick or task without a tiny
setting fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.loop import RunContext, train
from experiments.registry import TASK_NAMES, get_task
from tests.test_loop import cell_for
from tricks.registry import REGISTRY

PAIRS = [(task, trick) for task in TASK_NAMES for trick in get_task(task).tricks]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_card_is_complete(name: str) -> None:
    card = REGISTRY[name]
    assert card.name == name
    for field in ("summary", "off", "on", "cost", "effect"):
        assert getattr(card, field).strip(), f"{name}: empty {field}"
    assert card.references, f"{name}: no references"
    assert card.level in ("loop", "task")
    assert isinstance(card.tiny_setting, dict), f"{name}: no tiny setting"
    card.resolve(card.tiny_setting)  # the tiny setting is itself valid
    assert any(name in get_task(t).tricks for t in TASK_NAMES), f"{name} applies to no task"


@pytest.mark.parametrize("task", TASK_NAMES)
def test_task_declares_tiny_setting_and_valid_tricks(task: str) -> None:
    cls = get_task(task)
    assert cls.tiny is not None, f"task {task} has no tiny setting"
    unknown = set(cls.tricks) - set(REGISTRY)
    assert not unknown, f"task {task} lists unknown tricks {unknown}"


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


@pytest.mark.parametrize(("task", "trick"), PAIRS, ids=[f"{t}-{k}" for t, k in PAIRS])
def test_every_applicable_cell_trains_and_resumes_bit_exactly(tmp_path: Path, task: str, trick: str) -> None:
    cls = get_task(task)
    cell = cell_for(task, {trick: REGISTRY[trick].tiny_setting}, cls.tiny["params"], cls.tiny["train"])
    full = train(cell, tmp_path / "full", RunContext(threads=1))
    assert full["status"] == "completed", full
    steps = full["cost"]["steps"]
    assert steps >= 2
    out = tmp_path / "resumed"
    assert train(cell, out, RunContext(threads=1, max_steps=steps // 2))["status"] == "interrupted"
    resumed = train(cell, out, RunContext(threads=1))
    assert resumed["metric"] == full["metric"]
    assert (out / "train.csv").read_text() == (tmp_path / "full" / "train.csv").read_text()
    for k, v in _final(tmp_path / "full").items():
        assert torch.equal(_final(out)[k], v), k
