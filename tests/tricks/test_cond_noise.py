"""Tests of tricks.cond_noise: noise statistics, inference determinism, identity at 0, the claim."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn

from tricks.card import ParamError
from tricks.cond_noise import CARD, ConditioningNoise, noise_augment, sensitivity


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fixed_std_noise_is_zero_mean_with_asked_std():
    n, d, std = 4000, 50, 0.3
    cond = torch.randn(n, d, generator=gen(1), dtype=torch.float64)
    noisy, sigma = noise_augment(cond, std, generator=gen(2))
    noise = (noisy - cond).flatten()
    m = noise.numel()  # 200 000 draws
    assert sigma.shape == (n,) and torch.all(sigma == std)
    # Mean: standard error std/√m ≈ 6.7e-4; allow 5 SE (seeded, so deterministic anyway).
    assert abs(noise.mean().item()) < 5 * std / m**0.5
    # Std: the relative SE of a sample std is ≈ 1/√(2m) ≈ 1.6e-3; allow 5 SE.
    assert noise.std().item() == pytest.approx(std, rel=5 / (2 * m) ** 0.5)
    # Gaussian, not e.g. uniform with the same std (KS against N(0, std²)).
    assert stats.kstest(noise[:20000].numpy() / std, "norm").pvalue > 1e-3


def test_random_std_levels_uniform_and_noise_scaled_per_sample():
    n, d, std = 4000, 50, 0.5
    cond = torch.zeros(n, d, dtype=torch.float64)
    noisy, sigma = noise_augment(cond, std, generator=gen(3), random_std=True)
    assert sigma.shape == (n,) and sigma.min() >= 0 and sigma.max() <= std
    assert stats.kstest(sigma.numpy() / std, "uniform").pvalue > 1e-3  # σ_i ~ U(0, std)
    # Each sample's noise has its own σ_i: dividing by it gives N(0, 1) overall.
    z = (noisy / sigma[:, None]).flatten()
    assert abs(z.mean().item()) < 5 / z.numel() ** 0.5
    assert z.std().item() == pytest.approx(1.0, rel=5 / (2 * z.numel()) ** 0.5)
    # Per-sample empirical std tracks σ_i (50 draws each: loose, but a shared σ would fail).
    corr = torch.corrcoef(torch.stack([noisy.std(dim=1), sigma]))[0, 1]
    assert corr > 0.95
    # E[noise² | σ] = mean σ_i² (tight: 200 000 draws), and E[σ²] = std²/3 — the relative SE of
    # the mean of 4000 σ_i² is √(4/45)·3/√4000 ≈ 1.4%; allow 5 SE.
    assert noisy.pow(2).mean().item() == pytest.approx(sigma.pow(2).mean().item(), rel=0.02)
    assert sigma.pow(2).mean().item() == pytest.approx(std**2 / 3, rel=0.07)


def test_std_zero_is_exact_identity_and_draws_nothing():
    cond = torch.randn(7, 3, 2)
    g = gen(4)
    state = g.get_state()
    for random_std in (False, True):
        out, sigma = noise_augment(cond, 0.0, generator=g, random_std=random_std)
        assert torch.equal(out, cond) and torch.equal(sigma, torch.zeros(7))
    assert torch.equal(g.get_state(), state)
    mod = ConditioningNoise(std=0.0, return_std=False).train()
    assert torch.equal(mod(cond, gen(5)), cond)


def test_noise_works_on_any_trailing_shape_and_cond_untouched():
    cond = torch.randn(5, 3, 4, 4)
    before = cond.clone()
    noisy, sigma = noise_augment(cond, 0.2, generator=gen(6), random_std=True)
    assert noisy.shape == cond.shape and torch.equal(cond, before)
    # Per-sample level really is per sample: the noise of sample i is bounded by its level.
    resid = (noisy - cond).flatten(1).std(dim=1)
    assert torch.argsort(resid).tolist() == torch.argsort(sigma).tolist()


def test_inference_is_deterministic():
    cond = torch.randn(16, 4)
    mod = ConditioningNoise(std=0.5, random_std=True, inference_std=0.2).eval()
    a, sa = mod(cond)
    b, sb = mod(cond, gen(123))  # a training generator passed by mistake is ignored in eval
    assert torch.equal(a, b) and torch.equal(sa, sb)
    assert not torch.equal(a, cond)  # the fixed level is applied
    assert torch.all(sa == 0.2) and sa.shape == (16, 1)
    clean = ConditioningNoise(std=0.5, inference_std=0.0).eval()
    out, s = clean(cond)
    assert torch.equal(out, cond) and not s.any()


def test_class_agrees_with_function():
    cond = torch.randn(8, 3, dtype=torch.float64)
    for random_std in (False, True):
        mod = ConditioningNoise(std=0.25, random_std=random_std).train()
        out, col = mod(cond, gen(9))
        ref, sigma = noise_augment(cond, 0.25, generator=gen(9), random_std=random_std)
        assert torch.equal(out, ref) and torch.equal(col, sigma[:, None])
    mod = ConditioningNoise(std=0.25, return_std=False).train()
    assert torch.equal(mod(cond, gen(9)), noise_augment(cond, 0.25, generator=gen(9))[0])


def test_module_has_no_state_and_survives_save_load(tmp_path):
    mod = ConditioningNoise(std=0.1)
    assert mod.state_dict() == {}
    torch.save(mod.state_dict(), tmp_path / "s.pt")
    mod.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    # Follows the parent's mode.
    parent = nn.Sequential(mod).eval()
    assert not mod.training
    parent.train()
    assert mod.training


def test_sensitivity_matches_analytic_value_for_linear_map():
    cond = torch.randn(10, 6, dtype=torch.float64)
    a, eps = 3.0, 1e-3
    value = sensitivity(lambda c: a * c, cond, eps, gen(11), n_draws=3)
    g = gen(11)
    ref = sum(torch.randn(10, 6, generator=g, dtype=torch.float64).norm(dim=1).mean().item() for _ in range(3)) / 3
    assert value == pytest.approx(a * ref, rel=1e-6)
    assert sensitivity(lambda c: torch.zeros_like(c), cond, eps, gen(0)) == 0.0


def _train(seed: int, std: float) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Fit a small MLP to 32 noisy points y = sin(c₀) + noise in 8-D; it overfits without noise."""
    g = gen(seed)
    c = torch.randn(32, 8, generator=g, dtype=torch.float64)
    y = torch.sin(c[:, :1]) + 0.3 * torch.randn(32, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)  # same init for both arms
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1)).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    aug = ConditioningNoise(std=std, return_std=False).train()
    noise_gen = gen(100 + seed)
    for _ in range(300):
        loss = (model(aug(c, noise_gen)) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, c, y


@pytest.mark.parametrize("seed", [0, 1])
def test_claim_noise_trained_model_is_less_sensitive(seed):
    base, c, y = _train(seed, 0.0)
    aug, _, _ = _train(seed, 0.5)
    s_base = sensitivity(base, c, 1e-3, gen(7))
    s_aug = sensitivity(aug, c, 1e-3, gen(7))
    # Observed ratios 0.36–0.72 over 8 seeds; require a clear margin.
    assert s_aug < 0.8 * s_base
    # And the noise-trained model still learned the signal (not a constant): MSE below Var(y).
    with torch.no_grad():
        assert (aug(c) - y).pow(2).mean() < 0.8 * y.var()


def test_validation_errors():
    with pytest.raises(ValueError, match="std"):
        noise_augment(torch.zeros(2, 2), -0.1, generator=gen())
    with pytest.raises(ValueError, match="std"):
        noise_augment(torch.zeros(2, 2), float("nan"), generator=gen())
    with pytest.raises(ValueError, match="cond"):
        noise_augment(torch.zeros(2, 2, dtype=torch.long), 0.1, generator=gen())
    with pytest.raises(ValueError, match="cond"):
        noise_augment(torch.tensor(1.0), 0.1, generator=gen())
    with pytest.raises(ValueError, match="generator"):
        ConditioningNoise(0.1).train()(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="inference_std"):
        ConditioningNoise(0.1, inference_std=-1.0)
    with pytest.raises(ValueError, match="eps"):
        sensitivity(lambda c: c, torch.zeros(2, 2), 0.0, gen())


def test_card():
    assert CARD.name == "cond_noise" and CARD.role == "task"
    assert CARD.resolve({}) == {"std": 0.1, "random_std": False, "inference_std": 0.0, "return_std": True}
    CARD.resolve(CARD.tiny_setting)
    with pytest.raises(ParamError):
        CARD.resolve({"std": -1.0})
    with pytest.raises(ParamError):
        CARD.resolve({"random_std": 1})
    # The resolved card parameters are exactly the class's keyword arguments.
    ConditioningNoise(**CARD.resolve({}))
