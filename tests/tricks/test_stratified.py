"""Stratified sampling: per-position marginals, one value per stratum, variance, adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from tricks.stratified import (
    CARD,
    StratifiedSampler,
    iid_uniform,
    stratified_uniform,
    stratified_uniform_accumulated,
    to_lognormal,
    to_normal,
    to_uniform_int,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _kdiffusion_unpermuted(n: int, generator: torch.Generator) -> torch.Tensor:
    """k-diffusion's form: sample i always in stratum i (no permutation)."""
    return (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=generator, dtype=torch.float64)) / n


def _draws(fn, n: int, reps: int, seed: int = 0) -> np.ndarray:
    g = _gen(seed)
    return torch.stack([fn(n, generator=g) for _ in range(reps)]).double().numpy()


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_exactly_one_value_per_stratum(n: int) -> None:
    g = _gen(1)
    for dtype in (torch.float32, torch.float64):
        for _ in range(20):
            u = stratified_uniform(n, generator=g, dtype=dtype)
            assert u.shape == (n,) and u.dtype == dtype
            assert bool(((u >= 0) & (u < 1)).all())
            strata = torch.floor(u.double() * n).long()
            assert torch.equal(torch.sort(strata).values, torch.arange(n))


def test_each_position_marginally_uniform_and_unpermuted_version_fails() -> None:
    n, reps = 8, 2000
    ours = _draws(lambda n, generator: stratified_uniform(n, generator=generator, dtype=torch.float64), n, reps)
    # Bonferroni over the n positions at overall α = 0.01
    p_ours = [stats.kstest(ours[:, i], "uniform").pvalue for i in range(n)]
    assert min(p_ours) > 0.01 / n, p_ours
    theirs = _draws(_kdiffusion_unpermuted, n, reps)
    p_theirs = [stats.kstest(theirs[:, i], "uniform").pvalue for i in range(n)]
    assert max(p_theirs) < 1e-10, p_theirs  # every position fails
    # but both are one-per-stratum: the stratum test alone cannot tell them apart
    assert sorted(np.floor(theirs[0] * n).astype(int)) == list(range(n))


def test_permutation_is_uniform_over_positions() -> None:
    # stratum of position 0 is uniform over the n strata (chi-square)
    n, reps = 5, 3000
    u = _draws(lambda n, generator: stratified_uniform(n, generator=generator, dtype=torch.float64), n, reps)
    counts = np.bincount(np.floor(u[:, 0] * n).astype(int), minlength=n)
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("n", [4, 16])
def test_variance_of_batch_mean(n: int) -> None:
    reps = 20000
    strat = _draws(lambda n, generator: stratified_uniform(n, generator=generator, dtype=torch.float64), n, reps)
    iid = _draws(lambda n, generator: iid_uniform(n, generator=generator, dtype=torch.float64), n, reps, seed=1)
    v_strat = strat.mean(1).var()
    v_iid = iid.mean(1).var()
    assert v_strat * 12 * n**3 == pytest.approx(1.0, rel=0.06)
    assert v_iid * 12 * n == pytest.approx(1.0, rel=0.06)
    assert v_iid / v_strat == pytest.approx(n**2, rel=0.1)
    # both unbiased for the mean 1/2
    assert strat.mean() == pytest.approx(0.5, abs=3 * math.sqrt(1 / (12 * n**3 * reps)))


def test_accumulated_covers_all_strata_once() -> None:
    n, k, seed = 6, 4, 1234
    parts = [
        stratified_uniform_accumulated(n, k, i, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for i in range(k)
    ]
    assert all(p.shape == (n,) for p in parts)
    strata = torch.floor(torch.cat(parts) * n * k).long()
    assert torch.equal(torch.sort(strata).values, torch.arange(n * k))
    # per-micro stratification alone would not: it puts k values in each of n wide strata
    per_micro = torch.cat([stratified_uniform(n, generator=torch.Generator().manual_seed(seed + i)) for i in range(k)])
    assert not torch.equal(torch.sort(torch.floor(per_micro.double() * n * k).long()).values, torch.arange(n * k))
    # micro step 0 of a full-step draw with the same seed is the first slice
    full = stratified_uniform(n * k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert torch.equal(parts[2], full[2 * n : 3 * n])


def test_accumulated_each_position_marginally_uniform() -> None:
    n, k, reps = 4, 3, 1500
    draws = np.stack(
        [
            stratified_uniform_accumulated(n, k, 1, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
            .double()
            .numpy()
            for s in range(reps)
        ]
    )
    p = [stats.kstest(draws[:, i], "uniform").pvalue for i in range(n)]
    assert min(p) > 0.01 / n, p


def _strata_hit(u: torch.Tensor) -> torch.Tensor:
    n = len(u)
    return torch.bincount(torch.floor(u.double() * n).long(), minlength=n)


def test_float32_and_bfloat16_never_reach_one() -> None:
    u = stratified_uniform(64, generator=_gen(3), dtype=torch.bfloat16)
    assert float(u.max()) < 1.0
    assert torch.equal(_strata_hit(u), torch.ones(64, dtype=torch.long))
    # the raw bf16 cast does reach 1.0 for the top strata: the clamp matters
    g = _gen(3)
    raw = ((torch.randperm(1000, generator=g).double() + torch.rand(1000, generator=g, dtype=torch.float64)) / 1000).to(
        torch.bfloat16
    )
    assert float(raw.max()) == 1.0
    assert int(to_uniform_int(u, 0, 64).max()) <= 63
    big = stratified_uniform(2**22, generator=_gen(4))
    assert float(big.max()) < 1.0 and float(big.min()) >= 0.0
    assert torch.equal(_strata_hit(big), torch.ones(2**22, dtype=torch.long))


def test_float32_keeps_exactly_one_value_per_stratum() -> None:
    """A float32 cast of (perm + jitter)/n can land on a stratum's upper edge (about 1 draw in 75 at
    n = 1000, every draw at n ≥ 65536): such values are moved back inside their stratum."""
    for seed in range(200):
        u = stratified_uniform(1000, generator=_gen(seed))
        assert torch.equal(_strata_hit(u), torch.ones(1000, dtype=torch.long)), seed
    g = _gen(7)
    raw = (torch.randperm(65536, generator=g).double() + torch.rand(65536, generator=g, dtype=torch.float64)) / 65536
    assert not torch.equal(_strata_hit(raw.float()), torch.ones(65536, dtype=torch.long))  # what the fix repairs
    assert torch.equal(_strata_hit(stratified_uniform(65536, generator=_gen(7))), torch.ones(65536, dtype=torch.long))


def test_a_dtype_too_coarse_for_the_strata_is_refused() -> None:
    with pytest.raises(ValueError, match=r"n: 1000 is not allowed with dtype torch.bfloat16.*float64"):
        stratified_uniform(1000, generator=_gen(3), dtype=torch.bfloat16)


def test_device_and_default_generator() -> None:
    u = stratified_uniform(3, device="cpu", dtype=torch.float64)
    assert u.device.type == "cpu" and u.dtype == torch.float64
    assert iid_uniform(3).dtype == torch.float32


def test_determinism_given_generator() -> None:
    a = stratified_uniform(10, generator=_gen(7))
    b = stratified_uniform(10, generator=_gen(7))
    c = stratified_uniform(10, generator=_gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_normal_and_lognormal_quantiles() -> None:
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    np.testing.assert_allclose(to_normal(u).numpy(), stats.norm.ppf(u.numpy()), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        to_normal(u, 2.0, 3.0).numpy(), stats.norm.ppf(u.numpy(), loc=2, scale=3), rtol=1e-10, atol=1e-10
    )
    # EDM: ln(sigma) ~ N(P_mean, P_std²)
    np.testing.assert_allclose(
        to_lognormal(u, -1.2, 1.2).numpy(),
        stats.lognorm.ppf(u.numpy(), s=1.2, scale=math.exp(-1.2)),
        rtol=1e-10,
    )
    median = to_lognormal(torch.tensor([0.5]), -1.2, 1.2)
    assert float(median) == pytest.approx(math.exp(-1.2), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_edges_clamped_finite_and_symmetric(dtype: torch.dtype) -> None:
    z = to_normal(torch.tensor([0.0, 1.0], dtype=dtype))
    assert bool(torch.isfinite(z).all())
    assert float(z[0]) == pytest.approx(-float(z[1]), rel=1e-3)
    assert float(z[1]) > 5.0
    assert bool(torch.isfinite(to_lognormal(torch.tensor([0.0, 1.0], dtype=dtype), 0.0, 1.0)).all())


def test_stratified_normal_is_stratified_in_normal_quantiles() -> None:
    z = to_normal(stratified_uniform(50, generator=_gen(0), dtype=torch.float64))
    strata = np.floor(stats.norm.cdf(z.numpy()) * 50).astype(int)
    assert sorted(strata) == list(range(50))


def test_uniform_int_even_coverage() -> None:
    low, high = 3, 13
    # stratified with n = 3·(high − low): each integer exactly 3 times
    k = to_uniform_int(stratified_uniform(30, generator=_gen(0)), low, high)
    assert k.dtype == torch.int64
    assert torch.equal(torch.bincount(k - low, minlength=10), torch.full((10,), 3))
    # edges: u = 0 -> low, u just below 1 -> high − 1
    edge = to_uniform_int(torch.tensor([0.0, 1.0 - 2**-24, 1.0]), low, high)
    assert edge.tolist() == [3, 12, 12]
    # i.i.d. draws are uniform too (chi-square)
    counts = torch.bincount(to_uniform_int(iid_uniform(20000, generator=_gen(1)), 0, 10), minlength=10).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    # large range: float64 arithmetic keeps the top value in range
    assert int(to_uniform_int(torch.tensor([1.0 - 2**-53], dtype=torch.float64), 0, 2**40).item()) == 2**40 - 1


def test_sampler_agrees_with_functions() -> None:
    cases = [
        (StratifiedSampler(), lambda u: u),
        (StratifiedSampler("normal", std=2.0), lambda u: to_normal(u, 0.0, 2.0)),
        (StratifiedSampler("lognormal", mean=-1.2, std=1.2), lambda u: to_lognormal(u, -1.2, 1.2)),
        (StratifiedSampler("uniform_int", low=0, high=1000), lambda u: to_uniform_int(u, 0, 1000)),
    ]
    for sampler, transform in cases:
        got = sampler.sample(16, _gen(5))
        want = transform(stratified_uniform(16, generator=_gen(5)))
        assert torch.equal(got, want), sampler
    off = StratifiedSampler("normal", stratified=False)
    assert torch.equal(off.sample(16, _gen(5)), to_normal(iid_uniform(16, generator=_gen(5))))
    assert "lognormal" in repr(cases[2][0])


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="n: 0"):
        stratified_uniform(0)
    with pytest.raises(ValueError, match=r"n: 2\.0"):
        stratified_uniform(2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtype"):
        stratified_uniform(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="micro_index: 4"):
        stratified_uniform_accumulated(2, 4, 4)
    with pytest.raises(ValueError, match="micro_batches: 0"):
        stratified_uniform_accumulated(2, 0, 0)
    with pytest.raises(ValueError, match="std: 0"):
        to_normal(torch.rand(2), 0.0, 0.0)
    with pytest.raises(ValueError, match="mean: nan"):
        to_lognormal(torch.rand(2), float("nan"), 1.0)
    with pytest.raises(ValueError, match="high: 3"):
        to_uniform_int(torch.rand(2), 3, 3)
    with pytest.raises(ValueError, match="u: dtype"):
        to_uniform_int(torch.zeros(2, dtype=torch.int64), 0, 3)
    with pytest.raises(ValueError, match="kind: 'gauss'"):
        StratifiedSampler("gauss")
    with pytest.raises(ValueError, match="missing"):
        StratifiedSampler("lognormal", mean=0.0)
    with pytest.raises(ValueError, match="not allowed for kind"):
        StratifiedSampler("uniform", low=0)
    with pytest.raises(ValueError, match="std"):
        StratifiedSampler("normal", std=-1.0)
    with pytest.raises(ValueError, match="high"):
        StratifiedSampler("uniform_int", low=5, high=2)


def test_card() -> None:
    assert CARD.name == "stratified_sampling" and CARD.role == "task"
    assert CARD.resolve(CARD.tiny_setting) == {}
