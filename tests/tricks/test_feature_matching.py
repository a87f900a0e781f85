"""Tests of tricks.feature_matching: reference math, frozen consumer, gradient to pred, layers/axes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tricks.card import ParamError
from tricks.feature_matching import CARD, REDUCE_DIMS, FeatureMatchingLoss, consumer_layers, feature_matching_loss


def make_consumer(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 2),
    ).double()
    # Non-trivial BN statistics so eval mode is not the identity.
    net[1].running_mean.uniform_(-0.5, 0.5)
    net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def data(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def reference(layers, pred, target, n_layers, dims, p=1):
    """The formula written out plainly (no detaching tricks, no checks)."""
    total = 0.0
    hp, ht = pred, target
    for layer in list(layers)[:n_layers]:
        hp, ht = layer(hp), layer(ht)
        d = hp.mean(dim=dims) - ht.mean(dim=dims)
        t = d.abs() if p == 1 else d.square()
        total = total + (t.reshape(t.shape[0], -1).sum(1).mean() if 0 not in dims else t.sum())
    return total / n_layers


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("reduce", ["batch_spatial", "spatial"])
@pytest.mark.parametrize("p", [1, 2])
def test_matches_reference_math(n_layers, reduce, p):
    consumer = make_consumer()
    pred, target = data(1), data(2)
    dims = REDUCE_DIMS[reduce]
    got = feature_matching_loss(consumer, pred, target, n_layers, dims, p=p)
    with torch.no_grad():
        want = reference(consumer, pred, target, n_layers, dims, p)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got > 0


def test_first_layer_by_hand():
    # One conv layer, batch+spatial means: Σ_c |mean conv(pred)_c − mean conv(target)_c|.
    conv = nn.Conv2d(3, 4, 1).double()
    pred, target = data(3), data(4)
    w = conv.weight[:, :, 0, 0]
    by_hand = (w @ (pred.mean(dim=(0, 2, 3)) - target.mean(dim=(0, 2, 3)))).abs().sum()  # bias cancels
    got = feature_matching_loss(nn.Sequential(conv).eval(), pred, target, 1)
    torch.testing.assert_close(got, by_hand.detach(), rtol=1e-12, atol=1e-12)


def test_zero_when_pred_equals_target():
    consumer = make_consumer()
    x = data(5)
    pred = x.clone().requires_grad_(True)
    for reduce in REDUCE_DIMS.values():
        loss = feature_matching_loss(consumer, pred, x, 4, reduce)
        assert loss.item() == 0.0
    assert FeatureMatchingLoss(consumer, 4)(x, x).item() == 0.0


def test_gradient_flows_to_pred_not_to_consumer():
    consumer = make_consumer()
    consumer.requires_grad_(True)  # even when the caller left them trainable
    pred = data(6).requires_grad_(True)
    feature_matching_loss(consumer, pred, data(7), 4).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(w.grad is None for w in consumer.parameters())
    # The gradient is the true gradient of the formula (finite difference along a direction).
    v = torch.randn_like(pred)
    eps = 1e-6
    with torch.no_grad():
        fd = (
            feature_matching_loss(consumer, pred + eps * v, data(7), 4)
            - feature_matching_loss(consumer, pred - eps * v, data(7), 4)
        ) / (2 * eps)
    torch.testing.assert_close((pred.grad * v).sum(), fd, rtol=1e-5, atol=1e-8)


def test_consumer_frozen_through_optimizer_step_on_task_model():
    class Task(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1)).double()
            self.fm = FeatureMatchingLoss(make_consumer(), n_layers=3, weight=0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pred = self.net(x)
            return (pred - x).abs().mean() + self.fm(pred, x)

    task = Task().train()
    before = {k: v.clone() for k, v in task.fm.state_dict().items()}
    net_before = [w.clone() for w in task.net.parameters()]
    # AdamW over *all* parameters, consumer included, with weight decay: frozen ones must not move.
    opt = torch.optim.AdamW(task.parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        opt.zero_grad()
        task(data(10 + seed)).backward()
        opt.step()
    assert all(w.grad is None for w in task.fm.parameters())
    after = task.fm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN buffers too
    assert any(not torch.equal(a, b) for a, b in zip(net_before, task.net.parameters()))


def test_eval_mode_kept_under_parent_train():
    consumer = make_consumer().train()
    fm = FeatureMatchingLoss(consumer, n_layers=2)
    parent = nn.Sequential(nn.Identity(), fm)
    parent.train()
    assert fm.training and not any(m.training for m in fm.layers.modules())
    assert not consumer.training and not any(w.requires_grad for w in consumer.parameters())
    parent.eval()
    parent.train(True)
    assert not any(m.training for m in fm.layers.modules())


def test_train_mode_consumer_rejected_and_why():
    consumer = make_consumer().train()
    with pytest.raises(ValueError, match="train mode"):
        feature_matching_loss(consumer, data(1), data(2), 2)
    # Why: in train mode BatchNorm normalises each batch by its own statistics, so per-channel
    # means after it equal the BN bias for *any* input — the loss would be blind at that layer.
    with torch.no_grad():
        a = consumer[:2](data(1)).mean(dim=(0, 2, 3))
        b = consumer[:2](data(2) * 5 + 3).mean(dim=(0, 2, 3))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_layer_count_and_reduce_dims_change_the_value():
    consumer = make_consumer()
    pred, target = data(8), data(9)
    values = {n: feature_matching_loss(consumer, pred, target, n).item() for n in (1, 2, 3, 4)}
    assert len(set(values.values())) == 4
    per_sample = feature_matching_loss(consumer, pred, target, 2, REDUCE_DIMS["spatial"]).item()
    assert per_sample != values[2]
    # Per-sample matching sees differences that cancel in batch means: swap two samples in
    # the prediction → batch means unchanged (loss 0) but per-sample means differ.
    swapped = target[[1, 0, 2, 3, 4, 5]]
    assert feature_matching_loss(consumer, swapped, target, 2, REDUCE_DIMS["batch_spatial"]).item() < 1e-12
    assert feature_matching_loss(consumer, swapped, target, 2, REDUCE_DIMS["spatial"]).item() > 1e-3


def test_spatial_reduce_does_not_grow_with_batch_size():
    consumer = make_consumer()
    pred, target = data(11), data(12)
    one = feature_matching_loss(consumer, pred, target, 2, (2, 3))
    doubled = feature_matching_loss(consumer, torch.cat([pred, pred]), torch.cat([target, target]), 2, (2, 3))
    torch.testing.assert_close(one, doubled, rtol=1e-12, atol=0)


def test_class_agrees_with_function_and_state_dict_round_trip(tmp_path):
    fm = FeatureMatchingLoss(make_consumer(0), n_layers=3, reduce_dims=(2, 3), weight=0.25, p=2)
    pred, target = data(13), data(14)
    want = 0.25 * feature_matching_loss(make_consumer(0), pred, target, 3, (2, 3), p=2)
    torch.testing.assert_close(fm(pred, target), want, rtol=1e-12, atol=0)
    torch.save(fm.state_dict(), tmp_path / "fm.pt")
    other = FeatureMatchingLoss(make_consumer(1), n_layers=3, reduce_dims=(2, 3), weight=0.25, p=2)
    assert not torch.equal(other(pred, target), fm(pred, target))
    other.load_state_dict(torch.load(tmp_path / "fm.pt", weights_only=True))
    assert torch.equal(other(pred, target), fm(pred, target))


def test_consumer_layers_helper():
    seq = make_consumer()
    assert len(consumer_layers(seq, 3)) == 3 and consumer_layers(seq, 3)[0] is seq[0]

    class WithFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
            self.head = nn.Linear(3, 1)

    m = WithFeatures()
    assert consumer_layers(m, 2)[1] is m.features[1]
    with pytest.raises(ValueError, match=r"n_layers: 3 .* \[1, 2\]"):
        consumer_layers(m, 3)
    with pytest.raises(ValueError, match="n_layers"):
        consumer_layers(seq, 0)
    with pytest.raises(ValueError, match="consumer"):
        consumer_layers(nn.Linear(2, 2), 1)


def test_validation_errors():
    consumer = make_consumer()
    with pytest.raises(ValueError, match="n_layers"):
        feature_matching_loss(consumer, data(1), data(2), 9)
    with pytest.raises(ValueError, match="p"):
        feature_matching_loss(consumer, data(1), data(2), 1, p=3)
    with pytest.raises(ValueError, match="pred"):
        feature_matching_loss(consumer, data(1, n=4), data(2), 1)
    with pytest.raises(ValueError, match="reduce_dims"):
        feature_matching_loss(consumer, data(1), data(2), 8)  # (0, 2, 3) on (N, 2) logits
    with pytest.raises(ValueError, match="weight"):
        FeatureMatchingLoss(consumer, 2, weight=-1.0)


def test_card():
    assert CARD.name == "feature_matching" and CARD.role == "task"
    resolved = CARD.resolve({})
    assert resolved == {"weight": 0.1, "n_layers": 2, "reduce": "batch_spatial"}
    assert set(CARD.param_map["reduce"].choices) == set(REDUCE_DIMS)
    CARD.resolve(CARD.tiny_setting)
    with pytest.raises(ParamError, match="did you mean"):
        CARD.resolve({"reduce": "spatail"})
    with pytest.raises(ParamError):
        CARD.resolve({"n_layers": 0})
