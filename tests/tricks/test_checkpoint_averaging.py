"""Tests of tricks/checkpoint_averaging.py: averages, selection, integer buffers, float64."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from tricks.card import ParamError
from tricks.checkpoint_averaging import CARD, CheckpointAverager, average_state_dicts, has_batchnorm_stats


def bn_net(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        net[1].running_mean.copy_(torch.randn(4, generator=g))
        net[1].num_batches_tracked.fill_(seed + 1)
    return net


def sd_of(value: float, step: int = 0) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2,), value), "count": torch.tensor(step)}


def roundtrip(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------ functional


def test_one_checkpoint_averages_to_itself() -> None:
    sd = bn_net(0).state_dict()
    avg = average_state_dicts([sd])
    for k, v in sd.items():
        assert torch.equal(avg[k], v) and avg[k].dtype == v.dtype, k
        assert avg[k].data_ptr() != v.data_ptr()  # new tensors, inputs untouched


@pytest.mark.parametrize("n", [2, 3, 7])
def test_n_copies_average_to_themselves(n: int) -> None:
    sd = bn_net(1).state_dict()
    avg = average_state_dicts([sd] * n)
    for k, v in sd.items():
        assert torch.equal(avg[k], v), k


def test_average_is_the_mean() -> None:
    sds = [bn_net(s).state_dict() for s in range(3)]
    avg = average_state_dicts(sds)
    for k in ("0.weight", "1.running_mean", "2.bias"):
        expected = sum(sd[k].double() for sd in sds) / 3
        torch.testing.assert_close(avg[k], expected.float(), rtol=0, atol=1e-6)


def test_integer_buffers_stay_integer_and_come_from_the_last() -> None:
    sds = [bn_net(s).state_dict() for s in (0, 4, 1)]  # counts 1, 5, 2
    avg = average_state_dicts(sds)
    nbt = avg["1.num_batches_tracked"]
    assert nbt.dtype == torch.int64 and nbt.item() == 2  # from the last, not (1+5+2)//3
    masks = [{"m": torch.tensor([True, False])}, {"m": torch.tensor([False, False])}]
    assert torch.equal(average_state_dicts(masks)["m"], torch.tensor([False, False]))


def test_float64_accumulation() -> None:
    """float32 accumulation of 1e8, 1, -1e8 loses the 1 (1e8 + 1 rounds to 1e8); float64 keeps it."""
    values = [1e8, 1.0, -1e8]
    naive = torch.zeros((), dtype=torch.float32)
    for v in values:
        naive += torch.tensor(v, dtype=torch.float32)
    assert naive.item() == 0.0  # the failure a float32 accumulator would have
    avg = average_state_dicts([{"w": torch.tensor(v, dtype=torch.float32)} for v in values])
    assert avg["w"].dtype == torch.float32
    assert avg["w"].item() == torch.tensor(1 / 3, dtype=torch.float32).item()
    half = average_state_dicts([{"w": torch.tensor(v, dtype=torch.bfloat16)} for v in (1.0, 2.0)])
    assert half["w"].dtype == torch.bfloat16 and half["w"].item() == 1.5


def test_average_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        average_state_dicts([])
    with pytest.raises(ValueError, match="keys differ"):
        average_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shape"):
        average_state_dicts([{"a": torch.zeros(1)}, {"a": torch.zeros(2)}])


def test_has_batchnorm_stats() -> None:
    assert has_batchnorm_stats(bn_net(0).state_dict())
    assert not has_batchnorm_stats(nn.Linear(2, 2).state_dict())


# ----------------------------------------------------------------------------------------- class


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_non_finite_or_missing_metrics_never_enter(bad: float | None) -> None:
    avg = CheckpointAverager(n=2, mode="best")
    assert avg.offer(sd_of(1.0), metric=0.5, step=1)
    assert not avg.offer(sd_of(1e6), metric=bad, step=2)
    assert avg.offer(sd_of(3.0), metric=0.7, step=3)
    assert not avg.offer(sd_of(1e6), metric=bad, step=4)  # also when full
    assert avg.kept_steps == [1, 3]
    assert avg.average()["w"].tolist() == [2.0, 2.0]


def test_best_n_lower_is_better() -> None:
    avg = CheckpointAverager(n=2, mode="best", higher_is_better=False)
    for step, loss in enumerate([5.0, 3.0, 4.0, 1.0, 6.0, 3.0]):
        avg.offer(sd_of(float(step), step), metric=loss, step=step)
    # Best two losses: 1.0 (step 3) and 3.0 (step 1); a later tie (step 5) does not displace it.
    assert avg.kept_steps == [1, 3]
    assert avg.kept_metrics == [3.0, 1.0]
    out = avg.average()
    assert out["w"].tolist() == [2.0, 2.0]
    assert out["count"].item() == 3 and out["count"].dtype == torch.int64  # the most recent kept


def test_best_n_ties_drop_the_oldest() -> None:
    avg = CheckpointAverager(n=2, mode="best")
    for step, loss in enumerate([2.0, 2.0, 1.0]):
        assert avg.offer(sd_of(float(step)), metric=loss, step=step)
    assert avg.kept_steps == [1, 2]


def test_best_n_higher_is_better() -> None:
    avg = CheckpointAverager(n=2, mode="best", higher_is_better=True)
    for step, acc in enumerate([0.5, 0.3, 0.9, 0.1, 0.7]):
        avg.offer(sd_of(float(step)), metric=acc, step=step)
    assert avg.kept_steps == [2, 4]


def test_rejected_offer_returns_false_and_copies_nothing() -> None:
    avg = CheckpointAverager(n=1, mode="best")
    assert avg.offer(sd_of(1.0), metric=1.0)
    assert not avg.offer(sd_of(2.0), metric=2.0)
    assert avg.offer(sd_of(3.0), metric=0.5)
    assert avg.average()["w"].tolist() == [3.0, 3.0]


def test_last_n_fifo() -> None:
    avg = CheckpointAverager(n=3, mode="last")
    for step in range(6):
        assert avg.offer(sd_of(float(step)), metric=None if step % 2 else float("nan"), step=step)
    assert avg.kept_steps == [3, 4, 5]
    assert avg.average()["w"].tolist() == [4.0, 4.0]


def test_stored_checkpoints_are_detached_cpu_clones() -> None:
    net = bn_net(2)
    avg = CheckpointAverager(n=1, mode="last")
    avg.offer(net.state_dict(), step=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    out = avg.average()
    for k, v in before.items():
        assert torch.equal(out[k], v) and out[k].device.type == "cpu", k
        assert not out[k].requires_grad


def test_class_matches_function() -> None:
    sds = [bn_net(s).state_dict() for s in range(4)]
    avg = CheckpointAverager(n=4, mode="last")
    for i, sd in enumerate(sds):
        avg.offer(sd, step=i)
    for (k, a), b in zip(avg.average().items(), average_state_dicts(sds).values()):
        assert torch.equal(a, b), k


def test_empty_average_raises() -> None:
    avg = CheckpointAverager(n=2)
    avg.offer(sd_of(1.0), metric=float("nan"))
    with pytest.raises(ValueError, match="no checkpoint"):
        avg.average()


def test_state_dict_roundtrip() -> None:
    avg = CheckpointAverager(n=2, mode="best", higher_is_better=True)
    for step, acc in enumerate([0.2, 0.8, 0.5]):
        avg.offer(bn_net(step).state_dict(), metric=acc, step=step)
    restored = CheckpointAverager(n=2, mode="best", higher_is_better=True)
    restored.load_state_dict(roundtrip(avg.state_dict()))
    assert restored.kept_steps == avg.kept_steps and restored.kept_metrics == avg.kept_metrics
    # The selection continues identically: 0.6 replaces 0.5 in both.
    for a in (avg, restored):
        assert a.offer(bn_net(7).state_dict(), metric=0.6, step=3)
    assert restored.kept_steps == avg.kept_steps == [1, 3]
    for (k, x), y in zip(avg.average().items(), restored.average().values()):
        assert torch.equal(x, y), k
    with pytest.raises(ValueError, match="mode"):
        CheckpointAverager(n=2, mode="last").load_state_dict(avg.state_dict())


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="n:"):
        CheckpointAverager(n=0)
    with pytest.raises(ValueError, match="mode"):
        CheckpointAverager(n=1, mode="top")
    with pytest.raises(ValueError, match="higher_is_better"):
        CheckpointAverager(n=1, higher_is_better="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step"):
        CheckpointAverager(n=1).offer(sd_of(1.0), metric=1.0, step=1.5)  # type: ignore[arg-type]


def test_card() -> None:
    assert CARD.name == "checkpoint_averaging" and CARD.role != "task"
    assert CARD.resolve({}) == {"n": 3, "mode": "best", "recompute_bn": True}
    CARD.resolve(CARD.tiny_setting)
    with pytest.raises(ParamError, match="n"):
        CARD.resolve({"n": 0})
    with pytest.raises(ParamError, match="mode"):
        CARD.resolve({"mode": "first"})
