"""Tests of tricks/weight_averaging.py: window averages and EDM2 post-hoc EMA."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from tricks.card import ParamError
from tricks.ema import ema_update_
from tricks.weight_averaging import (
    CARDS,
    PERIODIC_CARD,
    POSTHOC_CARD,
    PeriodicAverager,
    PostHocEMA,
    gamma_to_sigma_rel,
    power_ema_beta,
    sigma_rel_to_gamma,
    solve_posthoc_coefficients,
    window_average,
    window_size,
)


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))


def bn_net() -> nn.Module:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    return net


def set_all(net: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)


def roundtrip(obj: dict) -> dict:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------ periodic averaging


def test_snapshots_when_multiples_are_crossed() -> None:
    net = bn_net()
    pa = PeriodicAverager(snapshot_every_samples=10)
    taken = [pa.maybe_snapshot(net, s) for s in (4, 8, 12, 16, 20, 24, 55, 56)]
    # 12 crosses 10, 20 crosses 20, 55 crosses 30/40/50 at once (one snapshot: same weights).
    assert taken == [False, False, True, False, True, False, True, False]
    assert pa.num_snapshots == 3 and pa.snapshot_samples == [12, 20, 55]
    with pytest.raises(ValueError, match="backwards"):
        pa.maybe_snapshot(net, 30)


def test_window_average_is_the_mean_of_the_snapshots_in_it() -> None:
    net = bn_net()
    pa = PeriodicAverager(snapshot_every_samples=8, window_fraction=0.5)
    for i in range(1, 9):  # snapshot k holds value k (k = 1..8)
        set_all(net, float(i))
        net.train()
        net(torch.full((4, 3), float(i), dtype=torch.float64))  # BN buffers change too
        assert pa.maybe_snapshot(net, 8 * i)
    out = pa.average()  # last half: values 5..8
    assert torch.equal(out["0.weight"], torch.full((4, 3), 6.5, dtype=torch.float64))
    assert out["1.num_batches_tracked"].item() == 8 and out["1.num_batches_tracked"].dtype == torch.int64
    # The window is chosen after training, from the same snapshots.
    assert pa.average(1.0)["2.bias"].tolist() == [4.5, 4.5]
    assert pa.average(0.25)["2.bias"].tolist() == [7.5, 7.5]
    assert pa.average(1e-6)["2.bias"].tolist() == [8.0, 8.0]  # at least one snapshot
    # The class agrees with the functional form on the same window.
    states = pa.state_dict()["snapshots"]
    for k, v in window_average(states[-3:]).items():
        assert torch.equal(v, pa.average(3 / 8)[k]), k


def test_window_size() -> None:
    assert window_size(25, 0.28) == 7  # 0.28·25 is 7.000000000000001 in floats
    assert window_size(10, 0.31) == 4
    assert window_size(7, 1.0) == 7
    assert window_size(7, 0.01) == 1
    with pytest.raises(ValueError, match="window_fraction"):
        window_size(7, 0.0)
    with pytest.raises(ValueError, match="window_fraction"):
        window_size(7, 1.5)


def test_periodic_snapshots_are_independent_of_later_training() -> None:
    net = bn_net()
    pa = PeriodicAverager(snapshot_every_samples=1)
    set_all(net, 2.0)
    pa.maybe_snapshot(net, 1)
    set_all(net, 100.0)
    assert pa.average()["0.weight"].unique().tolist() == [2.0]


def test_periodic_state_dict_roundtrip() -> None:
    net = bn_net()
    pa = PeriodicAverager(snapshot_every_samples=5, window_fraction=0.75)
    for i in range(1, 5):
        set_all(net, float(i))
        pa.maybe_snapshot(net, 5 * i + 1)
    restored = PeriodicAverager(snapshot_every_samples=5)
    restored.load_state_dict(roundtrip(pa.state_dict()))
    assert restored.window_fraction == 0.75 and restored.snapshot_samples == pa.snapshot_samples
    assert not restored.maybe_snapshot(net, 24)  # the clock is restored: 24 crosses nothing new
    assert restored.maybe_snapshot(net, 25) and pa.maybe_snapshot(net, 25)
    for (k, a), b in zip(pa.average().items(), restored.average().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="snapshot_every_samples"):
        PeriodicAverager(snapshot_every_samples=6).load_state_dict(pa.state_dict())


def test_periodic_validation() -> None:
    with pytest.raises(ValueError, match="snapshot_every_samples"):
        PeriodicAverager(snapshot_every_samples=0)
    with pytest.raises(ValueError, match="window_fraction"):
        PeriodicAverager(snapshot_every_samples=1, window_fraction=0.0)
    with pytest.raises(ValueError, match="no snapshot"):
        PeriodicAverager(snapshot_every_samples=1).average()
    with pytest.raises(ValueError, match="empty"):
        window_average([])


# -------------------------------------------------------------------------------- post-hoc EMA


def test_sigma_rel_gamma_conversions() -> None:
    assert round(sigma_rel_to_gamma(0.10), 2) == 6.94
    assert round(sigma_rel_to_gamma(0.05), 2) == 16.97
    assert round(gamma_to_sigma_rel(6.94), 3) == 0.100
    assert round(gamma_to_sigma_rel(16.97), 3) == 0.050
    for s in (0.01, 0.05, 0.08, 0.10, 0.2):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)
    # γ = 0 (uniform weights on [0, T]) has σ_rel = 1/√12, the widest allowed.
    assert gamma_to_sigma_rel(0.0) == pytest.approx(1 / math.sqrt(12))
    assert sigma_rel_to_gamma(1 / math.sqrt(12)) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.3)
    with pytest.raises(ValueError, match="sigma_rel"):
        sigma_rel_to_gamma(0.0)
    with pytest.raises(ValueError, match="gamma"):
        gamma_to_sigma_rel(-0.5)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 6.94, 16.97])
def test_power_ema_matches_closed_form(gamma: float) -> None:
    """After t updates the weight of update i is (i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1)."""
    assert power_ema_beta(1, gamma) == 0.0
    sigma = gamma_to_sigma_rel(gamma)
    model = Scalar()
    ph = PostHocEMA(model, sigma_rels=(sigma,), snapshot_every_samples=1000)
    values = [math.sin(i) + 0.1 * i for i in range(1, 31)]
    for v in values:
        with torch.no_grad():
            model.w.fill_(v)
        ph.update(model)
    t, e = len(values), gamma + 1
    closed = sum((i**e - (i - 1) ** e) * v for i, v in enumerate(values, start=1)) / t**e
    assert ph.tracked_state(0)["w"].item() == pytest.approx(closed, rel=1e-10, abs=1e-12)
    if gamma == 0.0:  # γ = 0 is the running uniform mean
        assert closed == pytest.approx(sum(values) / t)


def test_class_matches_functional_update() -> None:
    model = Scalar()
    ph = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every_samples=1000)
    manual = [torch.zeros((), dtype=torch.float64) for _ in range(2)]
    gammas = [sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)]
    for t in range(1, 12):
        with torch.no_grad():
            model.w.fill_(float(t * t))
        ph.update(model)
        for m, g in zip(manual, gammas):
            ema_update_([m], [model.w], power_ema_beta(t, g))
    for i, m in enumerate(manual):
        assert torch.equal(ph.tracked_state(i)["w"], m)


def train_posthoc(sigma_rels: tuple[float, ...], steps: int = 200, every: int = 10) -> PostHocEMA:
    """A smooth parameter trajectory with a BN layer; snapshot every `every` steps."""
    g = torch.Generator().manual_seed(0)
    net = bn_net()
    ph = PostHocEMA(net, sigma_rels=sigma_rels, snapshot_every_samples=every * 4, samples_per_update=4)
    for t in range(1, steps + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.sin(t / 15.0 + torch.arange(p.numel(), dtype=torch.float64).reshape(p.shape)))
                p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=torch.float64))
        net.train()
        net(torch.randn(8, 3, generator=g, dtype=torch.float64))
        ph.update(net)
        ph.maybe_snapshot(4 * t)
    return ph


def test_reconstruction_of_a_stored_profile_returns_it() -> None:
    ph = train_posthoc((0.05, 0.10))
    assert ph.num_snapshots == 2 * 20
    for index, sigma in enumerate((0.05, 0.10)):
        x = ph.coefficients(sigma)
        assert x[-2 + index].item() == pytest.approx(1.0, abs=1e-6)
        rec, tracked = ph.reconstruct(sigma), ph.tracked_state(index)
        for k, v in tracked.items():
            torch.testing.assert_close(rec[k], v, rtol=0, atol=1e-5)
    # Integer buffers stay integer in a reconstruction.
    assert ph.reconstruct(0.08)["1.num_batches_tracked"].dtype == torch.int64


def test_reconstruction_of_an_unstored_profile_is_closer_than_the_stored_ones() -> None:
    """Track σ=0.08 directly (not snapshotted) as the truth; rebuild it from the 0.05/0.10 snapshots."""
    ph = train_posthoc((0.05, 0.10, 0.08))
    ph._snapshots = [s for s in ph._snapshots if s["sigma_rel"] != 0.08]
    truth = ph.tracked_state(2)["0.weight"]
    rec = ph.reconstruct(0.08)["0.weight"]
    err = (rec - truth).abs().max().item()
    nearest = min((ph.tracked_state(i)["0.weight"] - truth).abs().max().item() for i in (0, 1))
    assert err < 0.01 * nearest


def test_solve_coefficients_properties() -> None:
    steps, gammas = [10, 10, 20, 20], [16.97, 6.94, 16.97, 6.94]
    x = solve_posthoc_coefficients(steps, gammas, 20, 6.94)
    assert x.dtype == torch.float64
    torch.testing.assert_close(x, torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-9, rtol=0)
    x = solve_posthoc_coefficients(steps, gammas, 20, sigma_rel_to_gamma(0.08))
    assert x.sum().item() == pytest.approx(1.0)
    # Scale-free in the step unit (steps or samples give the same coefficients).
    y = solve_posthoc_coefficients([s * 64 for s in steps], gammas, 20 * 64, sigma_rel_to_gamma(0.08))
    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="sizes"):
        solve_posthoc_coefficients([1, 2], [1.0], 2, 1.0)
    with pytest.raises(ValueError, match="snapshot_steps"):
        solve_posthoc_coefficients([0, 2], [1.0, 1.0], 2, 1.0)


def test_buffers_are_copied_not_averaged() -> None:
    g = torch.Generator().manual_seed(1)
    net = bn_net()
    ph = PostHocEMA(net, snapshot_every_samples=3)
    for t in range(1, 7):
        net.train()
        net(torch.randn(8, 3, generator=g, dtype=torch.float64) + t)
        ph.update(net)
        ph.maybe_snapshot(t)
    for i in range(2):
        state = ph.tracked_state(i)
        assert torch.equal(state["1.running_mean"], net[1].running_mean)
        assert state["1.num_batches_tracked"].item() == 6
    rec = ph.reconstruct(0.08)
    assert torch.equal(rec["1.running_var"], net[1].running_var)


def test_snapshot_rules() -> None:
    net = bn_net()
    ph = PostHocEMA(net, snapshot_every_samples=10)
    assert not ph.maybe_snapshot(10)  # no update yet: nothing to store
    ph.update(net)
    assert not ph.maybe_snapshot(15)
    assert ph.maybe_snapshot(20) and ph.num_snapshots == 2  # one state per tracked σ_rel
    assert not ph.maybe_snapshot(30)  # no update since: a duplicate would add nothing
    with pytest.raises(ValueError, match="no snapshot"):
        PostHocEMA(net, snapshot_every_samples=10).reconstruct(0.08)


def test_posthoc_state_dict_roundtrip() -> None:
    ph = train_posthoc((0.05, 0.10), steps=40)
    restored = PostHocEMA(bn_net(), snapshot_every_samples=40, samples_per_update=4)
    restored.load_state_dict(roundtrip(ph.state_dict()))
    assert restored.num_updates == ph.num_updates and restored.num_snapshots == ph.num_snapshots
    for i in range(2):
        for (k, a), b in zip(ph.tracked_state(i).items(), restored.tracked_state(i).values()):
            assert torch.equal(a, b), k
    for (k, a), b in zip(ph.reconstruct(0.08).items(), restored.reconstruct(0.08).values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="sigma_rels"):
        PostHocEMA(bn_net(), sigma_rels=(0.1,), snapshot_every_samples=40, samples_per_update=4).load_state_dict(
            ph.state_dict()
        )


def test_posthoc_validation() -> None:
    net = bn_net()
    with pytest.raises(ValueError, match="sigma_rels"):
        PostHocEMA(net, sigma_rels=(), snapshot_every_samples=1)
    with pytest.raises(ValueError, match="sigma_rel"):
        PostHocEMA(net, sigma_rels=(0.5,), snapshot_every_samples=1)
    with pytest.raises(ValueError, match="snapshot_every_samples"):
        PostHocEMA(net, snapshot_every_samples=0)
    with pytest.raises(ValueError, match="samples_per_update"):
        PostHocEMA(net, snapshot_every_samples=1, samples_per_update=0)
    with pytest.raises(ValueError, match="index"):
        PostHocEMA(net, snapshot_every_samples=1).tracked_state(2)
    with pytest.raises(ValueError, match="num_updates"):
        power_ema_beta(0, 1.0)


# ------------------------------------------------------------------------------------------ cards


def test_cards() -> None:
    assert [c.name for c in CARDS] == ["periodic_averaging", "posthoc_ema"]
    assert all(c.role == "evaluated_weights" for c in CARDS)
    assert PERIODIC_CARD.resolve({}) == {"snapshot_every_samples": 10000, "window_fraction": 0.5}
    assert POSTHOC_CARD.resolve({}) == {
        "sigma_rel_a": 0.05,
        "sigma_rel_b": 0.10,
        "target_sigma_rel": 0.08,
        "snapshot_every_samples": 10000,
    }
    for card in CARDS:
        card.resolve(card.tiny_setting)
        assert "ema" in card.incompatible
        assert all(p.type in (int, float, bool, str) for p in card.params)
    with pytest.raises(ParamError, match="window_fraction"):
        PERIODIC_CARD.resolve({"window_fraction": 1.5})
    with pytest.raises(ParamError, match="target_sigma_rel"):
        POSTHOC_CARD.resolve({"target_sigma_rel": 0.3})
    # Every allowed σ_rel converts to a γ.
    sigma_rel_to_gamma(POSTHOC_CARD.param_map["target_sigma_rel"].high)
