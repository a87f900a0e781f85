"""The flat gradient buffer: same training as per-parameter gradients, and loud when its premise breaks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.gradbuffer import FlatGrads
from bench.loop import RunContext, train
from experiments.registry import get_task
from tests.test_loop import cell_for


def _named(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def test_views_have_the_parameters_shapes_and_strides_including_channels_last() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    model = model.to(memory_format=torch.channels_last)
    flat = FlatGrads.for_params(_named(model))
    assert flat is not None
    assert flat.flat.numel() == sum(p.numel() for p in model.parameters())
    for p, v in zip(flat.params, flat.views):
        assert v.shape == p.shape and v.stride() == p.stride()
    # the views tile the buffer exactly: writing 1 through every view fills it
    for v in flat.views:
        v.fill_(1.0)
    assert torch.equal(flat.flat, torch.ones_like(flat.flat))


def test_not_used_for_mixed_dtypes_or_non_dense_parameters() -> None:
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, dtype=torch.float64))
    assert FlatGrads.for_params([("a", a), ("b", b)]) is None
    base = torch.zeros(4, 4)
    strided = nn.Parameter(base[:, ::2])  # a view with gaps: not dense
    assert FlatGrads.for_params([("s", strided)]) is None
    assert FlatGrads.for_params([]) is None


def test_norm_and_accumulation_match_per_parameter_gradients() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    twin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    twin.load_state_dict(model.state_dict())
    x = torch.randn(16, 5)
    flat = FlatGrads.for_params(_named(model))
    assert flat is not None
    for step in range(3):  # first step: adopt; then in-place accumulation over two micro-batches
        for half in (x[:8], x[8:]):
            model(half).pow(2).mean().backward()
            twin(half).pow(2).mean().backward()
        if step == 0:
            flat.adopt("test")
        assert flat.attached()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad)
        expected = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in twin.parameters()]))
        assert math.isclose(flat.norm(), float(expected), rel_tol=1e-6)
        flat.zero_()
        twin.zero_grad(set_to_none=True)
        assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters())


def test_adopt_names_a_parameter_without_gradient() -> None:
    model = nn.ModuleDict({"used": nn.Linear(2, 1), "unused": nn.Linear(2, 1)})
    model["used"](torch.randn(3, 2)).sum().backward()
    flat = FlatGrads.for_params(_named(model))
    with pytest.raises(RuntimeError, match=r"unused\.weight.*dense_grads"):
        flat.adopt("demo")


def test_attached_detects_an_unset_gradient() -> None:
    model = nn.Linear(2, 1)
    model(torch.randn(3, 2)).sum().backward()
    flat = FlatGrads.for_params(_named(model))
    flat.adopt("demo")
    assert flat.attached()
    model.zero_grad(set_to_none=True)
    assert not flat.attached()


@pytest.mark.parametrize("task", ["toy_diffusion", "rl_policy"])
def test_flat_buffer_trains_exactly_like_per_parameter_gradients(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    """Same losses and final parameters bit for bit; gradient norms equal to float32 rounding."""
    cls = get_task(task)
    cell = cell_for(task, {"accumulation": {"micro_batches": 2}}, cls.tiny["params"], cls.tiny["train"])
    flat = train(cell, tmp_path / "flat", RunContext(threads=1))
    monkeypatch.setattr(cls, "dense_grads", False)
    plain = train(cell, tmp_path / "plain", RunContext(threads=1))
    assert flat["status"] == plain["status"] == "completed"
    assert flat["metric"] == plain["metric"]

    def columns(run: str) -> tuple[list[str], list[float]]:
        rows = [r.split(",") for r in (tmp_path / run / "train.csv").read_text().splitlines()[1:]]
        return [r[2] for r in rows], [float(r[3]) for r in rows]

    (loss_f, norm_f), (loss_p, norm_p) = columns("flat"), columns("plain")
    assert loss_f == loss_p
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(norm_f, norm_p))
    for name in ("flat", "plain"):
        assert (tmp_path / name / "final_model.pt").exists()
    a = torch.load(tmp_path / "flat" / "final_model.pt", weights_only=True)
    b = torch.load(tmp_path / "plain" / "final_model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_task_that_unsets_gradients_fails_the_run_instead_of_reporting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_task: str
) -> None:
    cls = get_task(synthetic_task)
    monkeypatch.setattr(cls, "dense_grads", True)
    original = cls.loss

    def loss_that_unsets_grads(self, model, batch, mb):  # type: ignore[no-untyped-def]
        model.zero_grad(set_to_none=True)  # the bug the buffer must not hide
        return original(self, model, batch, mb)

    monkeypatch.setattr(cls, "loss", loss_that_unsets_grads)
    cell = cell_for(synthetic_task, {}, {}, {"budget_samples": 256, "eval_every_samples": 128})
    with pytest.raises(RuntimeError, match="dense_grads"):
        train(cell, tmp_path / "run", RunContext(threads=1))
    assert not (tmp_path / "run" / "result.json").exists()
