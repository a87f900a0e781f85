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


DENSE_CELLS = [
    (task, trick) for task in TASK_NAMES if get_task(task).dense_grads for trick in (None, *get_task(task).tricks)
]


@pytest.mark.parametrize(("task", "trick"), DENSE_CELLS, ids=[f"{t}-{k or 'baseline'}" for t, k in DENSE_CELLS])
def test_dense_grads_declaration_holds_for_every_cell(tmp_path: Path, task: str, trick: str | None) -> None:
    """A task that declares ``dense_grads`` gives every trainable parameter a gradient at every step.

    Trained here with per-parameter gradients unset between steps (what the declaration lets the
    loop skip), so a parameter left out of some step's graph shows up as ``grad is None``.
    """
    from bench.loop import _Trainer
    from bench.memory import PeakMemory

    cls = get_task(task)
    tricks = {trick: REGISTRY[trick].tiny_setting} if trick else {}
    cell = cell_for(task, tricks, cls.tiny["params"], cls.tiny["train"])
    with PeakMemory(torch.device("cpu")) as mem:
        t = _Trainer(cell, tmp_path, RunContext(threads=1), mem)
        named = [(n, p) for n, p in t.model.named_parameters() if p.requires_grad]
        for step in range(min(t.total_steps, 8)):
            for micro, size in enumerate(t.micro_sizes):
                batch = t.task.batch(t.model, step, micro, size, step / t.total_steps)
                loss, _ = t.task.loss(t.model, batch, step, micro)
                loss.backward()
            missing = [n for n, p in named if p.grad is None]
            assert not missing, f"{task} + {trick}: no gradient for {missing} at step {step}"
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            t.task.after_optimizer_step(t.model, step)
