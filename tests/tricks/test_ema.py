"""Tests of tricks/ema.py: reference math at edge decays, PyTorch AveragedModel parity, buffers."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tricks.card import ParamError
from tricks.ema import CARD, EMA, decay_from_half_life, ema_update_, has_running_stats, warmup_decay


class Scalar(nn.Module):
    """One scalar parameter: the EMA is then a plain weighted sum of the values it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))


def small_bn_net(seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return net


def perturb_and_train_bn(net: nn.Module, g: torch.Generator) -> None:
    """A fake optimizer step: move the weights, and run BN in train mode so its buffers change."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    net.train()
    net(torch.randn(8, 3, generator=g, dtype=torch.float64))


def roundtrip(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------ math


@pytest.mark.parametrize("d", [0.0, 0.5, 0.99, 1.0])
def test_update_weights_follow_closed_form(d: float) -> None:
    """Feed the values e_i (one-hot): the EMA then equals w_i = d^(n-1-i)(1-d), w_0 = d^(n-1)."""
    n = 6
    for i in range(n):
        model = Scalar()
        ema = EMA(model, decay=d)
        for j in range(n):
            with torch.no_grad():
                model.w.fill_(1.0 if j == i else 0.0)
            ema.update(model)
        expected = d ** (n - 1) if i == 0 else d ** (n - 1 - i) * (1 - d)
        assert ema.module.w.item() == pytest.approx(expected, abs=1e-15)
    assert ema.num_updates == n


def test_decay_zero_tracks_and_one_freezes_exactly() -> None:
    g = torch.Generator().manual_seed(1)
    model = small_bn_net()
    track, freeze = EMA(model, decay=0.0), EMA(model, decay=1.0)
    perturb_and_train_bn(model, g)
    track.update(model)
    freeze.update(model)  # first update is a copy, even for d = 1
    first = {k: v.clone() for k, v in freeze.module.state_dict().items() if k.endswith("weight")}
    for _ in range(3):
        perturb_and_train_bn(model, g)
        track.update(model)
        freeze.update(model)
    for (name, p), q in zip(model.named_parameters(), track.module.parameters()):
        assert torch.equal(p, q), name
    for name, p in freeze.module.named_parameters():
        if name in first:
            assert torch.equal(p, first[name]), name
    assert not torch.equal(freeze.module[0].weight, model[0].weight)


def test_first_update_is_a_copy_not_an_average_with_init() -> None:
    model = Scalar()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.w.fill_(5.0)
    ema.update(model)
    assert ema.module.w.item() == 5.0
    with torch.no_grad():
        model.w.fill_(15.0)
    ema.update(model)
    assert ema.module.w.item() == pytest.approx(0.9 * 5 + 0.1 * 15, abs=1e-14)


def test_foreach_and_per_tensor_agree() -> None:
    g = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (7,), (), (2, 3, 5)]
    base = [torch.randn(s, generator=g) for s in shapes]
    a = [t.clone() for t in base]
    b = [t.clone() for t in base]
    for _ in range(10):
        new = [torch.randn(s, generator=g) for s in shapes]
        ema_update_(a, new, 0.93, foreach=True)
        ema_update_(b, new, 0.93, foreach=False)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    assert not torch.equal(a[0], base[0])


def test_function_and_class_agree() -> None:
    g = torch.Generator().manual_seed(3)
    model = small_bn_net()
    ema = EMA(model, decay=0.8)
    manual = [p.detach().clone() for p in model.parameters()]
    for step in range(5):
        perturb_and_train_bn(model, g)
        ema.update(model)
        if step == 0:
            manual = [p.detach().clone() for p in model.parameters()]
        else:
            ema_update_(manual, list(model.parameters()), 0.8)
    for x, y in zip(manual, ema.module.parameters()):
        assert torch.equal(x, y)


def test_matches_pytorch_averaged_model() -> None:
    g = torch.Generator().manual_seed(4)
    decay = 0.9
    model = small_bn_net()
    ours = EMA(model, decay=decay, buffers="copy")
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    ours_avg = EMA(model, decay=decay, buffers="average")
    theirs_avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    for _ in range(6):
        perturb_and_train_bn(model, g)
        for m in (ours, ours_avg):
            m.update(model)
        for m in (theirs, theirs_avg):
            m.update_parameters(model)
    for a, b in zip(ours.module.state_dict().values(), theirs.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # "average": floating buffers agree with use_buffers=True ...
    sd_ours, sd_theirs = ours_avg.module.state_dict(), theirs_avg.module.state_dict()
    for key, value in sd_ours.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, sd_theirs[key], rtol=0, atol=1e-12)
    # ... but the integer count is copied (6), where PyTorch lerps and truncates it.
    assert sd_ours["1.num_batches_tracked"].item() == 6
    assert sd_theirs["1.num_batches_tracked"].item() != 6


@pytest.mark.parametrize("policy", ["copy", "average", "recompute"])
def test_integer_buffers_are_copied_never_averaged(policy: str) -> None:
    g = torch.Generator().manual_seed(5)
    model = small_bn_net()
    ema = EMA(model, decay=0.9, buffers=policy)
    for _ in range(4):
        perturb_and_train_bn(model, g)
        ema.update(model)
    nbt = ema.module.state_dict()["1.num_batches_tracked"]
    assert nbt.dtype == torch.int64
    assert nbt.item() == model[1].num_batches_tracked.item() == 4
    mean_ema, mean_model = ema.module[1].running_mean, model[1].running_mean
    if policy == "average":
        assert not torch.allclose(mean_ema, mean_model)
    else:
        assert torch.equal(mean_ema, mean_model)


def test_needs_bn_recompute() -> None:
    assert EMA(small_bn_net(), decay=0.9, buffers="recompute").needs_bn_recompute
    assert not EMA(small_bn_net(), decay=0.9, buffers="copy").needs_bn_recompute
    assert not EMA(nn.Linear(2, 2), decay=0.9, buffers="recompute").needs_bn_recompute
    assert has_running_stats(small_bn_net()) and not has_running_stats(nn.Linear(2, 2))


def test_half_life_interval_correction() -> None:
    """Two updates of s samples decay old weights exactly as one update of 2s samples."""
    for h, s in [(2000.0, 32), (100.0, 1), (64.0, 96)]:
        assert decay_from_half_life(h, s) ** 2 == pytest.approx(decay_from_half_life(h, 2 * s), rel=1e-14)
    # After half_life_samples samples, the old weight is one half, whatever the batch size.
    for s in (1, 8, 50):
        assert decay_from_half_life(400, s) ** (400 / s) == pytest.approx(0.5, rel=1e-12)
    assert EMA(Scalar(), half_life_samples=200.0, samples_per_update=10).decay == pytest.approx(2 ** (-0.05))


def test_warmup_decay() -> None:
    assert warmup_decay(0.999, 0) == 0.0  # first update a copy
    assert warmup_decay(0.999, 1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert warmup_decay(0.999, 10**9) == 0.999  # capped by the target decay
    assert warmup_decay(0.5, 3, gamma=2.0, power=1.0) == 0.5
    assert warmup_decay(0.99, 3, gamma=2.0, power=1.0) == pytest.approx(1 - 1 / 2.5)
    values = [warmup_decay(0.9999, t) for t in range(0, 2000, 50)]
    assert values == sorted(values)
    # In the class: the second update uses warmup_decay(d, 1), not d.
    model = Scalar()
    ema = EMA(model, decay=0.99, warmup=True)
    ema.update(model)
    with torch.no_grad():
        model.w.fill_(1.0)
    ema.update(model)
    assert ema.module.w.item() == pytest.approx(1 - warmup_decay(0.99, 1), abs=1e-15)


# ------------------------------------------------------------------------------ module contract


def test_module_is_frozen_eval_copy() -> None:
    model = small_bn_net()
    model(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    ema = EMA(model, decay=0.5)
    assert not ema.module.training
    assert all(not p.requires_grad and p.grad is None for p in ema.module.parameters())
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), ema.module.parameters()))
    assert model.training


def test_swap_in_restores_training_weights_bit_identically() -> None:
    g = torch.Generator().manual_seed(6)
    model = small_bn_net()
    ema = EMA(model, decay=0.7)
    for _ in range(3):
        perturb_and_train_bn(model, g)
        ema.update(model)
    perturb_and_train_bn(model, g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    model.eval()
    with ema.swap_in(model) as m:
        out_swapped = m(x)
        m.train()
        m(x)  # a BN pass inside (as a precise-BN recalibration would do) must be undone too
        m.eval()
    model.train()
    assert torch.allclose(out_swapped, ema.module(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad for p in model.parameters())


def test_update_rejects_a_mismatched_model() -> None:
    model = small_bn_net()
    ema = EMA(nn.Sequential(model), decay=0.9)  # built from a wrapper, updated from the bare model
    with pytest.raises(ValueError, match="do not match"):
        ema.update(model)


def test_state_dict_roundtrip_is_exact() -> None:
    g = torch.Generator().manual_seed(7)
    model = small_bn_net()
    ema = EMA(model, half_life_samples=50.0, samples_per_update=4, warmup=True, buffers="average")
    for _ in range(3):
        perturb_and_train_bn(model, g)
        ema.update(model)
    restored = EMA(small_bn_net(seed=9), half_life_samples=50.0, samples_per_update=4, warmup=True, buffers="average")
    restored.load_state_dict(roundtrip(ema.state_dict()))
    assert restored.num_updates == 3
    for _ in range(2):  # the continuation is identical too
        perturb_and_train_bn(model, g)
        ema.update(model)
        restored.update(model)
    for (k, a), b in zip(ema.module.state_dict().items(), restored.module.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=0.5).load_state_dict(ema.state_dict())


# ------------------------------------------------------------------------------------ validation


def test_validation_errors() -> None:
    model = Scalar()
    with pytest.raises(ValueError, match="exactly one"):
        EMA(model)
    with pytest.raises(ValueError, match="exactly one"):
        EMA(model, decay=0.9, half_life_samples=10.0)
    with pytest.raises(ValueError, match="decay"):
        EMA(model, decay=1.5)
    with pytest.raises(ValueError, match="buffers"):
        EMA(model, decay=0.9, buffers="avg")
    with pytest.raises(ValueError, match="half_life_samples"):
        decay_from_half_life(0.0, 1)
    with pytest.raises(ValueError, match="samples_per_update"):
        decay_from_half_life(10.0, -1)
    with pytest.raises(ValueError, match="decay"):
        ema_update_([torch.zeros(2)], [torch.zeros(2)], -0.1)
    with pytest.raises(ValueError, match="lengths"):
        ema_update_([torch.zeros(2)], [], 0.5)
    with pytest.raises(ValueError, match="floating"):
        ema_update_([torch.zeros(2, dtype=torch.int64)], [torch.zeros(2, dtype=torch.int64)], 0.5)
    with pytest.raises(ValueError, match="shape"):
        ema_update_([torch.zeros(2)], [torch.zeros(3)], 0.5)
    with pytest.raises(ValueError, match="num_updates"):
        warmup_decay(0.9, -1)
    with pytest.raises(ValueError, match="gamma"):
        warmup_decay(0.9, 1, gamma=0.0)


def test_card() -> None:
    assert CARD.name == "ema" and CARD.role != "task"
    resolved = CARD.resolve({})
    assert resolved == {"half_life_samples": 2000.0, "warmup": False, "buffers": "copy"}
    assert CARD.resolve(CARD.tiny_setting)["half_life_samples"] > 0
    assert {"periodic_averaging", "posthoc_ema"} <= set(CARD.incompatible)
    with pytest.raises(ParamError, match="half_life_samples"):
        CARD.resolve({"half_life_samples": 0.0})
    with pytest.raises(ParamError, match="buffers"):
        CARD.resolve({"buffers": "averge"})
    with pytest.raises(ParamError, match="did you mean"):
        CARD.resolve({"half_life": 10.0})
    # Every card parameter is a constructor keyword, so the loop can pass them through.
    EMA(Scalar(), samples_per_update=8, **CARD.resolve({}))
    assert math.isclose(EMA(Scalar(), samples_per_update=8, **resolved).decay, 2 ** (-8 / 2000))
