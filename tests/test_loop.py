"""The training loop: determinism, bit-exact resume, divergence as data."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from bench.grid import expand
from bench.loop import RunContext, build_task, train, train_cell
from bench.spec import parse_spec
from experiments.base import MicroBatch

TINY_CIFAR = {"data": "offline", "train_size": 256, "test_size": 128, "width": 8}


def cell_for(
    task: str, tricks: dict | None = None, params: dict | None = None, train_cfg: dict | None = None, seed: int = 0
):
    spec = parse_spec(
        {
            "grid": "t",
            "seeds": [seed],
            "design": "leave_one_out",
            "tasks": {task: {"params": params or {}, "train": train_cfg or {}, "tricks": tricks or {}}},
        }
    )
    return expand(spec)[0]  # leave_one_out's first arm: every listed trick on


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


CIFAR_TRAIN = {"budget_samples": 384, "batch_size": 32, "eval_every_samples": 96, "checkpoint_every_samples": 160}


def test_same_seed_identical_run(tmp_path: Path) -> None:
    cell = cell_for("cifar_autoencoder", {"ema": {"half_life_samples": 64}}, TINY_CIFAR, CIFAR_TRAIN)
    a, b = train(cell, tmp_path / "a", RunContext(threads=1)), train(cell, tmp_path / "b", RunContext(threads=1))
    assert a["metric"] == b["metric"]
    assert (tmp_path / "a" / "curve.csv").read_text() == (tmp_path / "b" / "curve.csv").read_text()
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()
    for k, v in _params(tmp_path / "a").items():
        assert torch.equal(v, _params(tmp_path / "b")[k]), k


def test_different_seed_differs(tmp_path: Path) -> None:
    a = train(cell_for("cifar_autoencoder", None, TINY_CIFAR, CIFAR_TRAIN, seed=0), tmp_path / "a")
    b = train(cell_for("cifar_autoencoder", None, TINY_CIFAR, CIFAR_TRAIN, seed=1), tmp_path / "b")
    assert a["metric"]["test_mse"] != b["metric"]["test_mse"]


@pytest.mark.parametrize(
    "tricks",
    [
        {},
        {
            "ema": {"half_life_samples": 64},
            "accumulation": {"micro_batches": 2},
            "no_weight_decay": None,
            "precise_bn": {"num_batches": 2},
        },
    ],
    ids=["baseline", "loop-tricks"],
)
def test_resume_after_interruption_equals_uninterrupted(tmp_path: Path, tricks: dict) -> None:
    cell = cell_for("cifar_autoencoder", tricks, TINY_CIFAR, CIFAR_TRAIN)
    full = train(cell, tmp_path / "full", RunContext(threads=1))
    total = full["cost"]["steps"]
    stop_at = random.Random(len(tricks)).randrange(1, total)  # a random step, fixed per case for reproducibility
    out = tmp_path / "resumed"
    first = train(cell, out, RunContext(threads=1, max_steps=stop_at))
    assert first == {"status": "interrupted", "step": stop_at}
    assert (out / "checkpoint.pt").exists() and not (out / "result.json").exists()
    second = train(cell, out, RunContext(threads=1))
    assert second["cost"]["resumes"] == 1
    assert second["metric"] == full["metric"]
    assert (out / "curve.csv").read_text() == (tmp_path / "full" / "curve.csv").read_text()
    assert (out / "train.csv").read_text() == (tmp_path / "full" / "train.csv").read_text()
    for k, v in _params(tmp_path / "full").items():
        torch.testing.assert_close(_params(out)[k], v, atol=0, rtol=0)


def test_multiple_interruptions_including_eval_boundaries(tmp_path: Path) -> None:
    cell = cell_for("cifar_autoencoder", {"ema": {"half_life_samples": 64}}, TINY_CIFAR, CIFAR_TRAIN)
    full = train(cell, tmp_path / "full", RunContext(threads=1))
    out = tmp_path / "r"
    # 3 steps = 96 samples = exactly one eval interval; then 2, then 1 step at a time for a while
    for n in (3, 2, 1, 1, 3):
        assert train(cell, out, RunContext(threads=1, max_steps=n))["status"] == "interrupted"
    final = train(cell, out, RunContext(threads=1))
    assert final["cost"]["resumes"] == 5
    assert final["metric"] == full["metric"]
    assert (out / "train.csv").read_text() == (tmp_path / "full" / "train.csv").read_text()


def test_divergence_is_recorded_not_raised(tmp_path: Path, synthetic_task: str) -> None:
    cell = cell_for(synthetic_task, None, {"dim": 8}, {"lr": 5.0, "budget_samples": 4096})
    result = train_cell(cell, tmp_path / "run")
    assert result["status"] == "diverged"
    assert result["diverged_step"] is not None and result["diverged_step"] > 0
    assert result["stability"]["diverged"] == 1
    assert (tmp_path / "run" / "result.json").exists()


def test_stable_synthetic_learns(tmp_path: Path, synthetic_task: str) -> None:
    cell = cell_for(synthetic_task, None, {"dim": 8, "noise_std": 0.1}, {"lr": 0.05})
    result = train(cell, tmp_path / "run")
    assert result["status"] == "completed"
    assert result["metric"]["test_mse"] < 0.05  # the label-noise floor is 0.01; the initial MSE is ~8


def test_cifar_replay_samples_stored_images_not_slots(tmp_path: Path) -> None:
    """Replay on a class-sorted stream: the buffer returns the dataset indices it was fed.

    With more items pushed than there are images, a slot-vs-item mix-up would index past the data.
    """
    from bench.seeds import SeedBundle

    cell = cell_for(
        "cifar_autoencoder",
        {"replay_buffer": {"capacity": 256}},
        {**TINY_CIFAR, "train_size": 128, "stream": "class_sorted"},
        {"budget_samples": 320, "batch_size": 32, "eval_every_samples": 160},
    )
    assert train(cell, tmp_path / "run", RunContext(threads=1))["status"] == "completed"
    task, _ = build_task(cell.config, SeedBundle(0), torch.device("cpu"))
    model = task.build_model()
    for step in range(6):
        x = task.batch(model, MicroBatch(step=step, index=0, count=1, size=32, progress=0.0)).x
        pushed = task._stream_indices(0, min((step + 1) * 32, 256))
        assert all(any(torch.equal(img, task.x_train[i]) for i in pushed.tolist()) for img in x[:4])
