"""Precise BN: population statistics, estimator vs PyTorch's update_bn, state preservation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from tricks.precise_bn import CARD, PreciseBN, bn_modules, recompute_bn_stats


@pytest.fixture(autouse=True)
def _float64():
    """The tolerances below are float64 tolerances."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _data(n: int = 60, c: int = 3, hw: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # per-channel offsets and scales so that mean and variance are channel-specific
    return torch.randn(n, c, hw, hw, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + torch.tensor(
        [0.0, 3.0, -1.0]
    ).view(1, 3, 1, 1)


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == x.shape[0]
    return list(torch.split(x, sizes))


def _pooled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance per channel over all values of NCHW data."""
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=False)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 1)
        self.drop = nn.Dropout(0.5)
        self.bn2 = nn.BatchNorm2d(4, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.drop(self.conv(self.bn(x))))


@pytest.mark.parametrize("sizes", [[60], [30, 30], [7, 13, 40], [1, 2, 57], [20, 20, 20]])
def test_stats_are_pooled_mean_and_biased_var_however_split(sizes: list[int]) -> None:
    x = _data()
    model = nn.Sequential(nn.BatchNorm2d(3))
    n = recompute_bn_stats(model, _split(x, sizes), num_batches=len(sizes))
    mean, var = _pooled(x)
    torch.testing.assert_close(model[0].running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model[0].running_var, var, rtol=1e-12, atol=1e-12)
    assert n == 60


def test_second_layer_sees_first_layer_output_and_1d_input() -> None:
    # BatchNorm1d on (N, C): values per channel = N; a later BN sees the (train-mode) output
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 5, generator=g) * 3 + 1
    lin = nn.Linear(5, 2)
    model = nn.Sequential(nn.BatchNorm1d(5), lin, nn.BatchNorm1d(2))
    batches = _split(x, [10, 15, 25])
    recompute_bn_stats(model, batches, num_batches=3)
    mean, var = _pooled(x)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)
    # the second layer's input is the first layer normalised with *batch* statistics
    hidden = torch.cat([lin((b - b.mean(0)) / torch.sqrt(b.var(0, unbiased=False) + 1e-5)) for b in batches])
    m2, v2 = _pooled(hidden.detach())
    torch.testing.assert_close(model[2].running_mean, m2)
    torch.testing.assert_close(model[2].running_var, v2)


def test_weights_momentum_modes_and_counters_unchanged() -> None:
    model = _Net()
    model.bn.momentum = 0.3
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 2.0)
        model.bn.bias.uniform_(-1, 1)
    # nested submodules in mixed modes
    model.train()
    model.conv.eval()
    model.bn2.eval()
    model.bn.num_batches_tracked.fill_(17)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k}
    modes = {name: m.training for name, m in model.named_modules()}
    recompute_bn_stats(model, _split(_data(), [20, 40]), num_batches=2)
    after = {k: v for k, v in model.state_dict().items() if "running" not in k}
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.bn.momentum == 0.3
    assert model.bn2.momentum is None
    assert int(model.bn.num_batches_tracked) == 17


def test_dropout_off_by_default_and_on_when_kept() -> None:
    model = _Net().train()
    x = _data()
    ref = copy.deepcopy(model)
    recompute_bn_stats(model, [x], num_batches=1)
    with torch.no_grad():
        h = ref.conv(ref.bn.train()(x))  # dropout off (eval), first BN in train mode
    _, v = _pooled(h)
    torch.testing.assert_close(model.bn2.running_var, v)
    # keeping the train mode of dropout inflates the variance (dropout scales by 2)
    kept = copy.deepcopy(ref)
    recompute_bn_stats(kept, [x], num_batches=1, eval_other_modules=False)
    assert bool((kept.bn2.running_var > 1.3 * v).all())


def test_too_little_data_is_an_error_and_restores_buffers() -> None:
    model = _Net()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="yielded 2 batches but num_batches=3"):
        recompute_bn_stats(model, _split(_data(), [30, 30]), num_batches=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.bn.momentum == 0.1 and model.bn2.momentum is None


def test_error_inside_forward_restores_everything() -> None:
    model = _Net().train()
    before = copy.deepcopy(model.state_dict())

    def bad(m: nn.Module, b: torch.Tensor) -> None:
        m(b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        recompute_bn_stats(model, [_data()], num_batches=1, forward_fn=bad)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.training for m in model.modules())


def test_takes_only_num_batches_from_a_longer_iterable() -> None:
    x = _data()
    model = nn.Sequential(nn.BatchNorm2d(3))
    it = iter(_split(x, [10, 20, 30]))
    assert recompute_bn_stats(model, it, num_batches=2) == 30
    mean, var = _pooled(x[:30])
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)
    assert next(it).shape[0] == 30  # the third batch was not consumed


def test_no_batchnorm_is_an_error() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        recompute_bn_stats(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), [torch.zeros(2, 2)], 1)
    with pytest.raises(ValueError, match="no BatchNorm"):
        recompute_bn_stats(nn.BatchNorm1d(2, track_running_stats=False), [torch.zeros(2, 2)], 1)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_num_batches_validation(bad: object) -> None:
    with pytest.raises(ValueError, match="num_batches"):
        recompute_bn_stats(nn.BatchNorm1d(2), [torch.zeros(2, 2)], bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_batches"):
        PreciseBN(bad)  # type: ignore[arg-type]


def test_differs_from_update_bn_with_unequal_batches() -> None:
    x = _data()
    batches = _split(x, [5, 15, 40])
    ours = nn.Sequential(nn.BatchNorm2d(3))
    theirs = copy.deepcopy(ours)
    recompute_bn_stats(ours, batches, num_batches=3)
    update_bn(batches, theirs)
    # update_bn: equal-weight average of per-batch means and per-batch *unbiased* variances
    dims = [0, 2, 3]
    torch.testing.assert_close(theirs[0].running_mean, torch.stack([b.mean(dims) for b in batches]).mean(0))
    torch.testing.assert_close(theirs[0].running_var, torch.stack([b.var(dims) for b in batches]).mean(0))
    mean, var = _pooled(x)
    torch.testing.assert_close(ours[0].running_mean, mean)
    torch.testing.assert_close(ours[0].running_var, var)
    assert not torch.allclose(theirs[0].running_mean, mean, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(theirs[0].running_var, var, rtol=1e-6, atol=1e-6)


def test_agrees_with_update_bn_on_the_mean_for_equal_batches_but_not_the_variance() -> None:
    # per-batch offsets make the between-batch variance that update_bn misses visible
    x = _data() + torch.arange(60).div(20, rounding_mode="floor").view(60, 1, 1, 1)
    batches = _split(x, [20, 20, 20])
    ours = nn.Sequential(nn.BatchNorm2d(3))
    theirs = copy.deepcopy(ours)
    recompute_bn_stats(ours, batches, num_batches=3)
    update_bn(batches, theirs)
    torch.testing.assert_close(ours[0].running_mean, theirs[0].running_mean)
    # law of total variance: pooled = mean within-batch biased var + var of batch means;
    # update_bn has the unbiased within-batch vars and misses the between-batch part (≈ 2/3)
    dims = [0, 2, 3]
    within = torch.stack([b.var(dims, unbiased=False) for b in batches]).mean(0)
    between = torch.stack([b.mean(dims) for b in batches]).var(0, unbiased=False)
    torch.testing.assert_close(ours[0].running_var, within + between)
    assert bool((between > 0.4).all())
    assert bool((ours[0].running_var - theirs[0].running_var > 0.4).all())


def test_custom_forward_fn_with_dict_batches() -> None:
    x = _data()
    model = nn.Sequential(nn.BatchNorm2d(3))
    batches = [{"image": b, "label": torch.zeros(b.shape[0])} for b in _split(x, [25, 35])]
    n = recompute_bn_stats(model, batches, 2, forward_fn=lambda m, b: m(b["image"]))
    assert n == 60
    mean, var = _pooled(x)
    torch.testing.assert_close(model[0].running_mean, mean)
    torch.testing.assert_close(model[0].running_var, var)


def test_layer_called_twice_per_forward_pools_both_calls() -> None:
    bn = nn.BatchNorm1d(2)

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = bn

        def forward(self, b: tuple[torch.Tensor, torch.Tensor]) -> None:
            self.bn(b[0])
            self.bn(b[1])

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(10, 2, generator=g), torch.randn(30, 2, generator=g) + 5
    assert recompute_bn_stats(Twice(), [(a, b)], 1) == 10
    mean, var = _pooled(torch.cat([a, b]))
    torch.testing.assert_close(bn.running_mean, mean)
    torch.testing.assert_close(bn.running_var, var)


def test_unreached_layer_keeps_stats_with_warning() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.BatchNorm1d(2), nn.BatchNorm1d(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    model = Branch()
    model.unused.running_mean.fill_(7.0)
    with pytest.warns(UserWarning, match="unused"):
        recompute_bn_stats(model, [torch.randn(4, 2)], 1)
    assert torch.equal(model.unused.running_mean, torch.full((2,), 7.0))


def test_nan_buffers_are_replaced_and_all_bn_kinds_found() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2), nn.SyncBatchNorm(2), nn.BatchNorm1d(2, affine=False))
    model[0].running_var.fill_(float("nan"))
    assert len(bn_modules(model)) == 3
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    recompute_bn_stats(model, [x], 1)
    assert all(bool(torch.isfinite(bn.running_var).all()) for bn in bn_modules(model))
    torch.testing.assert_close(model[0].running_var, x.var(0, unbiased=False))


def test_3d_and_float32_model() -> None:
    torch.set_default_dtype(torch.float32)
    model = nn.Sequential(nn.BatchNorm3d(2))
    x = torch.randn(6, 2, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 4 + 2
    recompute_bn_stats(model, list(torch.split(x, [1, 5])), 2)
    mean, var = _pooled(x.double())
    torch.testing.assert_close(model[0].running_mean, mean.float())
    torch.testing.assert_close(model[0].running_var, var.float())


def test_class_agrees_with_function() -> None:
    x = _data()
    a, b = _Net(), _Net()
    b.load_state_dict(a.state_dict())
    fn = PreciseBN(2, forward_fn=lambda m, batch: m(batch))
    assert fn(a, _split(x, [10, 50])) == recompute_bn_stats(b, _split(x, [10, 50]), 2) == 60
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_card() -> None:
    assert CARD.name == "precise_bn" and CARD.role != "task"
    assert CARD.resolve({}) == {"num_batches": 32}
    assert CARD.resolve(CARD.tiny_setting)["num_batches"] >= 1
    with pytest.raises(ValueError, match="num_batches"):
        CARD.resolve({"num_batches": 0})
    with pytest.raises(ValueError, match="did you mean"):
        CARD.resolve({"num_batch": 4})
