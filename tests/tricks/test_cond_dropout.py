"""Tests of tricks.cond_dropout: drop rates, exact null values, joint-rate control, guidance."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from tricks.card import ParamError
from tricks.cond_dropout import (
    CARD,
    CondDropout,
    apply_dropout,
    dropout_mask,
    guided,
    joint_masks,
    with_indicator,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within_binomial(count: int, n: int, p: float, z: float = 5.0) -> bool:
    """|count/n − p| within z binomial standard errors (exact match when p ∈ {0, 1})."""
    se = math.sqrt(p * (1 - p) / n)
    return abs(count / n - p) <= z * se + 1e-12


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_empirical_drop_rate_equals_p(p):
    n = 100_000
    mask = dropout_mask(n, p, generator=gen(1))
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert within_binomial(int(mask.sum()), n, p)
    if p in (0.0, 1.0):
        assert int(mask.sum()) == n * p  # edges exact


def test_mask_uses_same_uniforms_for_every_p():
    # Paired arms: a larger p drops a superset of the samples a smaller p drops.
    small = dropout_mask(1000, 0.1, generator=gen(2))
    large = dropout_mask(1000, 0.3, generator=gen(2))
    assert torch.all(large[small])


def test_class_index_dropout_null_exact_kept_unchanged():
    num_classes = 10
    labels = torch.randint(0, num_classes, (500,), generator=gen(3))
    mask = dropout_mask(500, 0.3, generator=gen(4))
    out = apply_dropout(labels, mask, num_classes)
    assert out.dtype == torch.long
    assert torch.all(out[mask] == num_classes)
    assert torch.equal(out[~mask], labels[~mask])
    assert 0 < int(mask.sum()) < 500


def test_float_vector_and_map_dropout_with_scalar_and_tensor_null():
    cond = torch.randn(64, 5, dtype=torch.float64)
    mask = dropout_mask(64, 0.5, generator=gen(5))
    out = apply_dropout(cond, mask, 0.0)
    assert torch.all(out[mask] == 0) and torch.equal(out[~mask], cond[~mask])
    null = torch.arange(5, dtype=torch.float64)
    out = apply_dropout(cond, mask, null)
    assert torch.equal(out[mask], null.expand(int(mask.sum()), 5))
    maps = torch.randn(64, 2, 3, 3)
    out = apply_dropout(maps, mask, -1.0)
    assert torch.all(out[mask] == -1) and torch.equal(out[~mask], maps[~mask])


def test_learned_null_receives_gradient_of_dropped_rows():
    cond = torch.randn(16, 3)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[1, 4, 9]] = True
    null = torch.zeros(3, requires_grad=True)
    apply_dropout(cond, mask, null).sum().backward()
    assert torch.equal(null.grad, torch.full((3,), 3.0))


def test_mask_is_actually_applied_to_the_model_input():
    # The DALLE2-pytorch#144 pitfall: a mask computed but never used. Here the embedding of the
    # dropped samples' true classes must receive no gradient from them; the null row gets it all.
    num_classes = 4
    labels = torch.full((40,), 2)
    emb = nn.Embedding(num_classes + 1, 3)
    out, mask = CondDropout(0.5, null_value=num_classes)(labels, gen(6))
    emb(out).sum().backward()
    dropped = int(mask.sum())
    assert 0 < dropped < 40
    assert torch.equal(emb.weight.grad[num_classes], torch.full((3,), float(dropped)))
    assert torch.equal(emb.weight.grad[2], torch.full((3,), float(40 - dropped)))
    assert not torch.equal(out, labels)


def test_indicator_matches_mask():
    cond = torch.randn(32, 4)
    out, mask = CondDropout(0.5, 0.0, indicator=True)(cond, gen(7))
    assert out.shape == (32, 5)
    assert torch.equal(out[:, -1], (~mask).float())  # 1 = present
    assert torch.equal(out[:, :-1], apply_dropout(cond, mask, 0.0))
    assert torch.equal(with_indicator(cond, mask)[:, :4], cond)


def test_class_agrees_with_function_and_is_deterministic():
    cond = torch.randn(50, 2)
    out, mask = CondDropout(0.2, 0.0)(cond, gen(8))
    ref_mask = dropout_mask(50, 0.2, generator=gen(8))
    assert torch.equal(mask, ref_mask)
    assert torch.equal(out, apply_dropout(cond, ref_mask, 0.0))
    out2, mask2 = CondDropout(0.2, 0.0)(cond, gen(8))
    assert torch.equal(out, out2) and torch.equal(mask, mask2)
    out0, mask0 = CondDropout(0.0, 0.0)(cond, gen(8))
    assert torch.equal(out0, cond) and not mask0.any()


def test_independent_droppers_compound():
    n, k, p = 200_000, 3, 0.3
    masks = joint_masks(n, k, p, None, generator=gen(9))
    assert masks.shape == (n, k)
    for i in range(k):
        assert within_binomial(int(masks[:, i].sum()), n, p)
    assert within_binomial(int(masks.all(dim=1).sum()), n, p**k)  # p^k, not p


@pytest.mark.parametrize(
    ("k", "p_each", "p_all"),
    [(1, 0.2, 0.2), (2, 0.1, 0.05), (2, 0.3, 0.3), (3, 0.1, 0.1), (3, 0.2, 0.02), (3, 0.8, 0.4), (5, 0.3, 0.1)],
)
def test_joint_rate_exact_and_marginals_kept(k, p_each, p_all):
    n = 200_000
    masks = joint_masks(n, k, p_each, p_all, generator=gen(10 + k))
    for i in range(k):
        assert within_binomial(int(masks[:, i].sum()), n, p_each), i
    assert within_binomial(int(masks.all(dim=1).sum()), n, p_all)
    if p_all == p_each:  # all or nothing
        assert torch.all(masks.all(dim=1) | ~masks.any(dim=1))
    if p_all == max(0.0, k * p_each - (k - 1)) and p_all > 0:  # lower Fréchet bound: ≥ k−1 dropped
        assert int(masks.sum(dim=1).min()) >= k - 1


def test_joint_masks_at_independent_rate_reproduce_independent_droppers():
    # p_all = p^k: the construction gives the independent distribution over all 2^k patterns.
    n, k, p = 100_000, 3, 0.4
    masks = joint_masks(n, k, p, p**k, generator=gen(20))
    patterns = (masks.long() * torch.tensor([1, 2, 4])).sum(dim=1)
    counts = torch.bincount(patterns, minlength=8).numpy()
    ones = torch.tensor([bin(c).count("1") for c in range(8)], dtype=torch.float64)
    expected = (p**ones * (1 - p) ** (k - ones) * n).numpy()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    # And a deliberately different joint rate is detected as different by the same test.
    other = joint_masks(n, k, p, 0.2, generator=gen(20))
    counts_other = torch.bincount((other.long() * torch.tensor([1, 2, 4])).sum(dim=1), minlength=8).numpy()
    assert stats.chisquare(counts_other, expected).pvalue < 1e-6


def test_joint_masks_range_errors():
    with pytest.raises(ValueError, match="p_all"):
        joint_masks(10, 3, 0.1, 0.2, generator=gen())  # above p_each
    with pytest.raises(ValueError, match="p_all"):
        joint_masks(10, 3, 0.8, 0.3, generator=gen())  # below 3·0.8 − 2 = 0.4
    with pytest.raises(ValueError, match="p_all"):
        joint_masks(10, 1, 0.3, 0.1, generator=gen())  # k = 1 forces p_all = p_each
    with pytest.raises(ValueError, match="num_inputs"):
        joint_masks(10, 0, 0.3, None, generator=gen())
    assert joint_masks(0, 3, 0.3, 0.1, generator=gen()).shape == (0, 3)
    assert joint_masks(7, 2, 1.0, 1.0, generator=gen()).all()


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 3.0, 7.5])
def test_guided_combination(w):
    c = torch.randn(6, 4, dtype=torch.float64, generator=gen(30))
    u = torch.randn(6, 4, dtype=torch.float64, generator=gen(31))
    out = guided(c, u, w)
    assert torch.allclose(out, (1 + w) * c - w * u, rtol=0, atol=1e-12)
    assert torch.allclose(out, torch.lerp(u, c, 1 + w), rtol=0, atol=1e-12)  # PyTorch's own lerp
    if w == 0:
        assert torch.equal(out, c)
    assert torch.equal(guided(c, c, w), c)  # equal predictions: guidance changes nothing
    assert torch.allclose(guided(c, u, -1.0), u)


def test_validation_errors():
    with pytest.raises(ValueError, match="p"):
        dropout_mask(4, 1.5, generator=gen())
    with pytest.raises(ValueError, match="p"):
        CondDropout(-0.1, 0)
    with pytest.raises(ValueError, match="null_value"):
        apply_dropout(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool), 0.5)
    with pytest.raises(ValueError, match="null_value"):
        apply_dropout(torch.zeros(4, 3), torch.zeros(4, dtype=torch.bool), torch.zeros(4))
    with pytest.raises(ValueError, match="cond"):
        apply_dropout(torch.zeros(5, 3), torch.zeros(4, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="mask"):
        apply_dropout(torch.zeros(4, 3), torch.zeros(4), 0.0)
    with pytest.raises(ValueError, match="cond"):
        with_indicator(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="guidance_weight"):
        guided(torch.zeros(2), torch.zeros(2), float("inf"))
    with pytest.raises(ValueError, match="uncond_pred"):
        guided(torch.zeros(2), torch.zeros(3), 1.0)


def test_card():
    assert CARD.name == "cond_dropout" and CARD.role == "task"
    assert CARD.resolve({}) == {"p": 0.1, "guidance_weight": 1.0}
    CARD.resolve(CARD.tiny_setting)
    with pytest.raises(ParamError):
        CARD.resolve({"p": 1.0})  # [0, 1): p = 1 would never train the conditional model
    with pytest.raises(ParamError):
        CARD.resolve({"guidance_weight": -1.0})
