"""Tests of tricks/accumulation.py: same gradient without BN, different with BN, the 1/k."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tricks.accumulation import CARD, accumulate_gradients, scale_loss, split_micro_batches
from tricks.card import ParamError


def mlp(bn: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers).double()
    g = torch.Generator().manual_seed(0)  # fixed init from an explicit generator, not the global RNG
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def data(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)  # mean over the batch


def grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def full_batch_grads(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    model.zero_grad()
    loss_fn(model, (x, y)).backward()
    return grads(model)


def chunks(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(x.split(sizes), y.split(sizes)))


@pytest.mark.parametrize(("k", "b"), [(2, 3), (4, 8), (8, 1)])
def test_micro_batches_give_the_full_batch_gradient_without_bn(k: int, b: int) -> None:
    model = mlp()
    x, y = data(k * b)
    expected = full_batch_grads(model, x, y)
    model.zero_grad()
    accumulate_gradients(model, loss_fn, chunks(x, y, split_micro_batches(k * b, k)))
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_manual_loop_with_scale_loss_matches_helper() -> None:
    model = mlp()
    x, y = data(12)
    model.zero_grad()
    for batch in chunks(x, y, split_micro_batches(12, 3)):
        scale_loss(loss_fn(model, batch), 3).backward()
    manual = grads(model)
    model.zero_grad()
    accumulate_gradients(model, loss_fn, chunks(x, y, [4, 4, 4]))
    for a, b in zip(manual, grads(model)):
        assert torch.equal(a, b)


def test_unequal_micro_batches_need_size_weights() -> None:
    model = mlp()
    x, y = data(10)
    expected = full_batch_grads(model, x, y)
    sizes = split_micro_batches(10, 4)  # [3, 3, 2, 2]
    model.zero_grad()
    accumulate_gradients(model, loss_fn, chunks(x, y, sizes), sizes=sizes)
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    model.zero_grad()
    accumulate_gradients(model, loss_fn, chunks(x, y, sizes))  # plain 1/k: slightly off
    assert any(not torch.allclose(g, e, rtol=0, atol=1e-6) for g, e in zip(grads(model), expected))


def test_forgetting_the_division_gives_k_times_the_gradient() -> None:
    k = 4
    model = mlp()
    x, y = data(4 * k)
    expected = full_batch_grads(model, x, y)
    model.zero_grad()
    for batch in chunks(x, y, split_micro_batches(4 * k, k)):
        loss_fn(model, batch).backward()  # no / k: the nanoGPT#206 bug
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, k * e, rtol=0, atol=1e-10)
        assert not torch.allclose(g, e)


def test_batchnorm_makes_micro_batches_differ() -> None:
    """The card's caveat: BN normalizes each micro-batch with its own statistics."""
    k = 4
    model = mlp(bn=True)
    model.train()
    x, y = data(4 * k)
    expected = full_batch_grads(model, x, y)
    model.zero_grad()
    accumulate_gradients(model, loss_fn, chunks(x, y, split_micro_batches(4 * k, k)))
    diff = max((g - e).abs().max().item() for g, e in zip(grads(model), expected))
    assert diff > 1e-3
    # In eval mode BN is a fixed affine map, and the equivalence holds again.
    model.eval()
    expected = full_batch_grads(model, x, y)
    model.zero_grad()
    accumulate_gradients(model, loss_fn, chunks(x, y, split_micro_batches(4 * k, k)))
    for g, e in zip(grads(model), expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_split_micro_batches() -> None:
    assert split_micro_batches(8, 4) == [2, 2, 2, 2]
    assert split_micro_batches(10, 4) == [3, 3, 2, 2]
    assert split_micro_batches(5, 5) == [1] * 5
    assert split_micro_batches(7, 1) == [7]
    for bsz in range(3, 40):
        sizes = split_micro_batches(bsz, 3)
        assert sum(sizes) == bsz and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="batch_size"):
        split_micro_batches(3, 4)
    with pytest.raises(ValueError, match="micro_batches"):
        split_micro_batches(8, 0)


def test_scale_loss() -> None:
    loss = torch.tensor(6.0, requires_grad=True)
    out = scale_loss(loss, 4)
    assert out.item() == 1.5 and loss.item() == 6.0  # not in place
    with pytest.raises(ValueError, match="micro_batches"):
        scale_loss(loss, 0)


def test_accumulate_validation() -> None:
    model = mlp()
    x, y = data(4)
    with pytest.raises(ValueError, match="micro_batches"):
        accumulate_gradients(model, loss_fn, [])
    with pytest.raises(ValueError, match="sizes"):
        accumulate_gradients(model, loss_fn, chunks(x, y, [2, 2]), sizes=[4])


def test_card() -> None:
    assert CARD.name == "accumulation" and CARD.role != "task"
    assert CARD.resolve({}) == {"micro_batches": 4}
    assert CARD.resolve(CARD.tiny_setting)["micro_batches"] >= 2
    with pytest.raises(ParamError, match="micro_batches"):
        CARD.resolve({"micro_batches": 1})
    assert "BatchNorm" in CARD.on or "BatchNorm" in CARD.effect
