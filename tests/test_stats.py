"""Unit tests of bench/stats.py on simulated paired seeds (numpy only, no training).

The coverage and family-wise error of the interval and the verdicts over five data shapes
are in tests/test_calibration.py; this file checks the pieces: formulas against independent
references (scipy, published power tables), the consistency of verdicts with intervals,
edge cases and the design contrasts. The simulation here: seed s gives the reference arm
1 + u_s + e and the trick arm 1 + u_s + Δ + e', with a shared per-seed component u_s ~ N(0,
σ_seed²) (what pairing cancels) and independent noise e, e' ~ N(0, σ_noise²).

- A/A: 200 repetitions × 4 null tricks sharing one reference arm at n = 8 seeds: the 800
  raw t-test p-values must reject at 5 % within a two-sided binomial band (P < 0.001 each
  side: 22..57 of 800), and Holm's family-wise rate over the 200 families must stay within
  the upper band of 5 % (≤ 21 of 200).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench import stats
from bench.grid import design_arms, fractional_design

RESAMPLES = 2000  # sign-flip Monte Carlo patterns in these tests only (the reports use 10,000)


def simulate(
    rng: np.random.Generator, n: int, deltas: list[float], sd_seed: float = 1.0, sd_noise: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """(reference values (n,), arm values (n, len(deltas))) with a shared per-seed component."""
    u = rng.normal(0, sd_seed, n)
    ref = 1.0 + u + rng.normal(0, sd_noise, n)
    arms = 1.0 + u[:, None] + np.asarray(deltas)[None, :] + rng.normal(0, sd_noise, (n, len(deltas)))
    return ref, arms


def binomial_band(n: int, p: float, tail: float = 0.001) -> tuple[int, int]:
    return int(sps.binom.ppf(tail, n, p)), int(sps.binom.isf(tail, n, p))


# --- the interval and the test -----------------------------------------------------------------------------------
def test_interval_and_p_are_the_textbook_paired_t() -> None:
    rng = np.random.default_rng(1)
    for n in (2, 3, 7, 25):
        d = rng.normal(0.3, 1.0, n)
        eff = stats.paired_effect(d, True, n_resamples=RESAMPLES)
        half = sps.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        assert eff.ci_method == "t" and eff.ci_level == 0.95 and eff.ci_calibrated
        assert eff.ci_low == pytest.approx(d.mean() - half) and eff.ci_high == pytest.approx(d.mean() + half)
        t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
        assert eff.p == pytest.approx(2 * sps.t.sf(abs(t), n - 1))
    mean, lo, hi, p = stats.paired_t(rng.normal(size=(5, 4, 6)))  # vectorized over leading axes
    assert mean.shape == lo.shape == hi.shape == p.shape == (5, 4)


def test_p_below_alpha_exactly_when_the_interval_excludes_zero() -> None:
    """The issue-15 bug (p(Holm) < 0.05 but the CI includes 0) cannot happen: the interval inverts the test."""
    rng = np.random.default_rng(2)
    d = rng.normal(0.5, 1.0, (4000, 6))
    _, lo, hi, p = stats.paired_t(d)
    excludes = (lo > 0) | (hi < 0)
    assert 0.1 < excludes.mean() < 0.9  # both outcomes occur
    assert np.array_equal(p < 0.05, excludes)
    repro = [0.757, 0.803, -1.096, 1.716, 0.535, 1.056, 1.012, 1.111, 1.026, 1.024]  # from the issue
    eff = stats.paired_effect(repro, True, n_resamples=RESAMPLES)
    v = stats.verdict(eff, eff.p)
    assert eff.p < 0.05 and eff.ci_low > 0 and v.label == "helps"


def test_aa_false_positive_rate_and_holm_familywise_rate() -> None:
    rng = np.random.default_rng(7)
    reps, k, n = 200, 4, 8
    raw_rejections = family_rejections = verdict_calls = 0
    for r in range(reps):
        ref, arms = simulate(rng, n, [0.0] * k)  # four tricks that do nothing, one shared reference arm
        effects = [stats.paired_effect(arms[:, j] - ref, False, n_resamples=300, seed=r) for j in range(k)]
        p = np.array([e.p for e in effects])
        adjusted = stats.holm(p)
        raw_rejections += int(np.sum(p < 0.05))
        family_rejections += int(np.any(adjusted < 0.05))
        near = [(e, q) for e, q in zip(effects, adjusted) if q < 0.2]  # verdicts far from α cannot be helps/hurts
        verdict_calls += any(stats.verdict(e, q, m=k).label in ("helps", "hurts") for e, q in near)
    lo, hi = binomial_band(reps * k, 0.05)
    assert lo <= raw_rejections <= hi, f"raw A/A rejections {raw_rejections}/{reps * k}, allowed {lo}..{hi}"
    assert family_rejections <= binomial_band(reps, 0.05)[1], f"Holm FWER {family_rejections}/{reps}"
    assert verdict_calls == family_rejections  # a verdict is exactly a Holm rejection


def test_pairing_detects_a_shift_the_unpaired_analysis_cannot() -> None:
    """Seed noise 10× the measurement noise: pairing cancels it, an unpaired comparison drowns in it."""
    rng = np.random.default_rng(3)
    reps, n, delta = 100, 8, 0.3
    paired = unpaired = 0
    for r in range(reps):
        ref, arm = simulate(rng, n, [delta], sd_seed=1.0, sd_noise=0.1)
        paired += stats.paired_effect(arm[:, 0] - ref, True, n_resamples=500, seed=r).p < 0.05
        unpaired += sps.ttest_ind(arm[:, 0], ref, equal_var=False).pvalue < 0.05
    assert paired / reps >= 0.9
    assert unpaired / reps <= 0.25


# --- units ---------------------------------------------------------------------------------------------------
def test_direction_awareness() -> None:
    d = np.array([-0.3, -0.2, -0.25, -0.1, -0.35, -0.2, -0.15, -0.3])
    lower = stats.paired_effect(d, higher_is_better=False, n_resamples=RESAMPLES)
    higher = stats.paired_effect(d, higher_is_better=True, n_resamples=RESAMPLES)
    assert lower.mean == higher.mean < 0
    assert lower.gain > 0 > higher.gain
    assert lower.frac_improved == 1.0 and higher.frac_improved == 0.0
    assert lower.p_signflip == pytest.approx(2 / 2**8)  # all 8 differences negative: the most extreme of 256
    assert stats.verdict(lower, lower.p).label == "helps"
    assert stats.verdict(higher, higher.p).label == "hurts"
    neutral = stats.paired_effect(d, higher_is_better=None, n_resamples=RESAMPLES)
    assert math.isnan(neutral.frac_improved) and math.isnan(neutral.gain)
    with pytest.raises(ValueError, match="higher_is_better"):
        stats.verdict(neutral, neutral.p)


def test_paired_effect_edge_cases() -> None:
    assert stats.paired_effect([], True).n == 0
    one = stats.paired_effect([0.5], True)
    assert one.mean == 0.5 and math.isnan(one.p) and one.ci_method == "none" and not one.test_possible
    same = stats.paired_effect([0.2] * 7, True, n_resamples=RESAMPLES)
    assert same.ci_low == same.ci_high == same.mean == pytest.approx(0.2) and same.ci_method == "exact"
    assert same.p == 0.0 and same.p_signflip == pytest.approx(2 / 2**7) and same.dz == math.inf
    zeros = stats.paired_effect([0.0] * 5, True, n_resamples=RESAMPLES)
    assert zeros.p == 1.0 and zeros.p_signflip == 1.0 and zeros.frac_improved == 0.0
    tiny = stats.paired_effect([1e-300, 0.0, 0.0], True, n_resamples=RESAMPLES)  # the variance underflows
    assert tiny.ci_low <= tiny.mean <= tiny.ci_high
    with pytest.raises(ValueError, match="non-finite"):
        stats.paired_effect([0.1, float("nan")], True)
    with pytest.raises(ValueError, match="at least 2"):
        stats.paired_t(np.ones((3, 1)))


def test_holm_and_bh_against_hand_computed_values() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone: 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
    # BH: 0.04·4/4 = 0.04, 0.03·4/3 = 0.04, 0.01·4/2 = 0.02, 0.005·4/1 = 0.02
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])
    with_nan = stats.holm([0.01, float("nan"), 0.04])  # nan is not part of the family (m = 2)
    np.testing.assert_allclose(with_nan, [0.02, np.nan, 0.04])
    np.testing.assert_allclose(stats.holm([0.3, 0.6]), [0.6, 0.6])
    np.testing.assert_allclose(stats.holm([0.7, 0.9]), [1.0, 1.0])  # capped at 1
    with pytest.raises(ValueError, match="outside"):
        stats.holm([1.5])


# --- power and seeds needed --------------------------------------------------------------------------------------
def test_seeds_needed_matches_published_power_tables() -> None:
    """One-sample / paired two-sided t-test, α = 0.05, power 0.8 (Cohen 1988; G*Power): d = 0.2, 0.5, 0.8, 1.2."""
    assert [stats.seeds_needed(1.0, d) for d in (0.2, 0.5, 0.8, 1.2)] == [199, 34, 15, 8]
    assert stats.seeds_needed(2.0, -1.0) == 34  # only |effect| / sd matters
    for dz, m in [(0.5, 1), (1.0, 4), (2.0, 10)]:
        n = int(stats.seeds_needed(1.0, dz, m=m))
        assert stats.t_test_power(n, dz, 0.05 / m) >= 0.8 > stats.t_test_power(n - 1, dz, 0.05 / m)
    assert stats.seeds_needed(1.0, 1.0, m=4) > stats.seeds_needed(1.0, 1.0)  # Holm's strictest step: α/4
    assert stats.seeds_needed(1.0, 0.0) == math.inf
    assert stats.seeds_needed(1.0, 1e-4) == math.inf  # more than 100,000 seeds
    assert stats.seeds_needed(0.0, 1.0) == stats.MIN_TEST_SEEDS
    assert math.isnan(stats.seeds_needed(float("nan"), 1.0))
    with pytest.raises(ValueError, match="power"):
        stats.seeds_needed(1.0, 1.0, power=1.5)
    assert stats.min_seeds_for_significance() == 6  # the sign-flip floor: 2/2^6 = 0.031 < 0.05 ≤ 2/2^5
    assert stats.min_seeds_for_significance(m=4) == 8


def test_seeds_needed_gives_the_promised_power() -> None:
    """At n = seeds_needed(σ_d, Δ) a paired t-test on normal differences detects Δ in ≈80 % of 4000 repetitions."""
    sd_d, delta = 1.0, 0.6
    n = int(stats.seeds_needed(sd_d, delta))
    d = np.random.default_rng(11).normal(delta, sd_d, (4000, n))
    _, _, _, p = stats.paired_t(d)
    assert 0.78 <= np.mean(p < 0.05) <= 0.85, f"power {np.mean(p < 0.05):.3f} at n={n}"


def test_dz_interval_covers_at_its_level() -> None:
    rng = np.random.default_rng(12)
    n, dz, reps = 6, 0.7, 400
    covered = 0
    for _ in range(reps):
        d = rng.normal(dz, 1.0, n)
        lo, hi = stats.dz_interval(d.mean(), d.std(ddof=1), n, 0.8)
        covered += lo <= dz <= hi
    assert 0.74 <= covered / reps <= 0.86  # 80 % ± 3 binomial sd (2 %)
    lo, hi = stats.dz_interval(1.0, 1.0, 10, 0.95)
    t = math.sqrt(10)  # the observed t sits at the 97.5 % / 2.5 % quantiles of the bounding noncentral t's
    assert sps.nct.cdf(t, 9, lo * t) == pytest.approx(0.975) and sps.nct.cdf(t, 9, hi * t) == pytest.approx(0.025)
    assert lo < 1.0 < hi
    assert all(math.isnan(x) for x in stats.dz_interval(1.0, 0.0, 10))


def test_seeds_needed_interval() -> None:
    rng = np.random.default_rng(13)
    clear = stats.paired_effect(rng.normal(0.8, 1.0, 12), True, n_resamples=RESAMPLES)
    lo, hi = stats.seeds_needed_interval(clear)
    dz_lo, dz_hi = stats.dz_interval(clear.mean, clear.sd, clear.n, 0.8)
    assert dz_lo > 0  # the 80 % interval of d_z excludes 0: both ends are finite
    assert lo == stats.seeds_needed(1.0, dz_hi) and hi == stats.seeds_needed(1.0, dz_lo)
    assert lo <= stats.seeds_needed(clear.sd, clear.mean) <= hi
    vague = stats.paired_effect([0.3, -0.2, 0.5], True, n_resamples=RESAMPLES)
    lo, hi = stats.seeds_needed_interval(vague)
    assert lo > 3 and hi == math.inf  # d_z = 0 is plausible: at least lo seeds, maybe no number suffices
    flat = stats.paired_effect([0.01, -0.01] * 30, True, n_resamples=RESAMPLES)
    lo, hi = stats.seeds_needed_interval(flat)  # 60 seeds bound |d_z| ≤ 0.17: detecting that takes ≥ 290
    assert lo == stats.seeds_needed(1.0, stats.dz_interval(0.0, flat.sd, 60, 0.8)[1]) > 60 and hi == math.inf
    # not informative (at a power this low even the largest plausible effect needs no more seeds than used)
    assert all(math.isnan(x) for x in stats.seeds_needed_interval(flat, power=0.06))


# --- verdicts ----------------------------------------------------------------------------------------------------
def _effect(mean: float, sd: float, n: int, lo: float, hi: float, hib: bool = False) -> stats.Effect:
    return stats.Effect(n, mean, lo, hi, "t", 0.95, float("nan"), float("nan"), sd, 0.5, hib)


def test_verdict_rules() -> None:
    # significant and CI on the better side (lower is better: CI below 0) → helps
    assert stats.verdict(_effect(-1.0, 0.5, 10, -1.3, -0.7), 0.01).label == "helps"
    assert stats.verdict(_effect(1.0, 0.5, 10, 0.7, 1.3), 0.01).label == "hurts"
    assert stats.verdict(_effect(1.0, 0.5, 10, 0.7, 1.3, hib=True), 0.01).code == "significant"
    # a p from another test than the interval's: significant but the CI touches 0 → says they disagree
    v = stats.verdict(_effect(-1.0, 1.0, 10, -2.0, 0.1), 0.03)
    assert v.label == "needs more seeds" and v.code == "disagree" and "disagree" in v.reason
    # not significant with a wide d_z interval → needs more seeds with a range
    v = stats.verdict(_effect(-1.0, 1.0, 4, -2.6, 0.6), 0.2)
    assert v.label == "needs more seeds" and v.code == "inconclusive"
    assert v.seeds_needed == stats.seeds_needed(1.0, 1.0) and v.seeds_needed_low <= v.seeds_needed
    assert v.seeds_needed < v.seeds_needed_high < math.inf  # t = −2: the 80 % interval of d_z excludes 0
    assert v.dz_low < 0 < v.dz_high  # ... the 95 % one does not (not significant)
    # too few seeds for any test
    v = stats.verdict(_effect(-1.0, float("nan"), 1, np.nan, np.nan), np.nan)
    assert v.label == "needs more seeds" and v.code == "too_few_seeds" and "n ≥ 2 needed" in v.reason
    # every seed exactly the same with and without
    v = stats.verdict(_effect(0.0, 0.0, 10, 0.0, 0.0), 1.0)
    assert v.label == "no detectable effect" and v.code == "no_difference"


def test_mean_zero_with_different_differences_is_not_called_identical() -> None:
    eff = stats.paired_effect([1.0, -1.0, 2.0, -2.0], True, n_resamples=RESAMPLES)
    v = stats.verdict(eff, eff.p)
    assert eff.mean == 0 and "same metric" not in v.reason and v.code == "inconclusive"


def test_no_detectable_effect_needs_an_interval_that_rules_out_a_large_effect() -> None:
    rng = np.random.default_rng(14)
    small_n = [stats.paired_effect(rng.normal(0.0, 1.0, 3), True, n_resamples=RESAMPLES) for _ in range(50)]
    assert all(stats.verdict(e, e.p).label != "no detectable effect" for e in small_n)  # 3 seeds never rule it out
    d = rng.normal(0.0, 1.0, 60)
    d -= d.mean()  # observed d_z = 0 at 60 seeds: the 95 % interval is about ±0.26
    eff = stats.paired_effect(d, True, n_resamples=RESAMPLES)
    v = stats.verdict(eff, eff.p)
    assert v.label == "no detectable effect" and v.code == "equivalent"
    assert -0.5 < v.dz_low < 0 < v.dz_high < 0.5


# --- spread ratio ------------------------------------------------------------------------------------------------
def test_spread_ratio_recovers_a_known_ratio() -> None:
    rng = np.random.default_rng(5)
    off = rng.normal(0, 1.0, (40, 1))
    on = rng.normal(0, 2.0, (40, 1))
    sr = stats.spread_ratio(on, off)
    assert sr.low < 2.0 < sr.high and 1.5 < sr.ratio < 2.7 and sr.method == "jackknife"
    assert sr.p < 0.05 and sr.changed  # the interval excludes 1 and the exact swap test agrees
    two = stats.spread_ratio(on[:2], off[:2])
    assert math.isnan(two.low) and two.method == "none" and not two.changed  # 2 seeds: no interval
    multi = stats.spread_ratio(rng.normal(0, 1.0, (30, 4)), rng.normal(0, 1.0, (30, 4)))  # factorial: 4 arms a side
    assert multi.low < 1.0 < multi.high and math.isnan(multi.p)


def test_gini_spread_interval_against_a_direct_computation() -> None:
    rng = np.random.default_rng(6)
    on, off = rng.normal(0, 1.5, (7, 2)), rng.normal(0, 1.0, (7, 2))
    gini = lambda x: np.mean([abs(a - b) for a, b in itertools.permutations(x, 2)])  # noqa: E731
    ratio = lambda a, b: np.mean([gini(c) for c in a.T]) / np.mean([gini(c) for c in b.T])  # noqa: E731
    loo = np.log([ratio(np.delete(on, i, 0), np.delete(off, i, 0)) for i in range(7)])
    se = math.sqrt(6 / 7 * np.sum((loo - loo.mean()) ** 2))
    half = sps.t.ppf(0.975, 6) * se
    r, lo, hi = stats.gini_spread_interval(on, off)
    assert r == pytest.approx(ratio(on, off))
    assert (lo, hi) == pytest.approx((ratio(on, off) * math.exp(-half), ratio(on, off) * math.exp(half)))


def test_swap_test_is_exact_when_the_arms_are_exchangeable() -> None:
    """All 2^5 swap patterns: under no effect the p is uniform on its lattice, so P(p ≤ α) ≤ α for every α."""
    rng = np.random.default_rng(8)
    u = rng.standard_t(3, size=(20_000, 5))
    on, off = u + rng.standard_t(3, size=(20_000, 5)), u + rng.standard_t(3, size=(20_000, 5))
    p = stats.swap_test_p(on, off, stats.swap_patterns(5))
    for alpha in (2 / 32, 4 / 32, 8 / 32):  # 32 patterns, each statistic value twice (swap all = same |log ratio|)
        assert np.mean(p <= alpha) <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / 20_000)
    assert np.mean(p <= 4 / 32) > 0.1  # and it is not vacuous
    one = stats.spread_ratio(on[0], off[0])
    assert one.p == pytest.approx(p[0])
    assert stats.swap_patterns(20).shape == (4096, 20)  # beyond 12 seeds: 4,096 random patterns


# --- designs -------------------------------------------------------------------------------------------------
def _runs(
    design: str,
    tricks: list[str],
    fraction: int,
    n_seeds: int,
    main: dict[str, float],
    inter: dict[tuple[str, str], float],
    rng: np.random.Generator,
    sd_seed: float = 5.0,
    sd_noise: float = 0.02,
) -> pd.DataFrame:
    """Runs of a grid whose metric is μ + u_s + Σ (E_t/2)·x_t + Σ (I_ab/2)·x_a·x_b + noise (x = ±1)."""
    rows = []
    for seed in range(n_seeds):
        u = rng.normal(0, sd_seed)
        for arm, on in design_arms(design, tricks, fraction):
            x = {t: 1.0 if t in on else -1.0 for t in tricks}
            y = 3.0 + u + sum(e / 2 * x[t] for t, e in main.items())
            y += sum(e / 2 * x[a] * x[b] for (a, b), e in inter.items()) + rng.normal(0, sd_noise)
            rows.append(
                {
                    "run_id": f"{arm}-{seed}",
                    "arm": arm,
                    "seed": seed,
                    "status": "completed",
                    "metric.loss": y,
                    "stability.diverged": 0,
                    "cost.train_s_per_sample": 1e-3 * (1.5 if "a" in on else 1.0),
                    "cost.peak_mem_mb": 100.0,
                    "cost.peak_mem_mb_per_sample": 2.0,
                }
            )
    return pd.DataFrame(rows)


def _analyze(runs: pd.DataFrame, design: str, tricks: list[str], fraction: int = 0) -> stats.TaskStats:
    return stats.analyze_task(
        runs, label="t", task="t", design=design, tricks=tricks, fraction=fraction, metric="loss",
        higher_is_better=False, n_resamples=RESAMPLES,
    )  # fmt: skip


def test_full_factorial_recovers_main_effects_and_interactions() -> None:
    tricks = ["a", "b", "c"]
    main = {"a": -0.5, "b": 0.2, "c": 0.0}
    inter = {("a", "b"): 0.3, ("a", "c"): 0.0, ("b", "c"): -0.1}
    runs = _runs("full_factorial", tricks, 0, 8, main, inter, np.random.default_rng(1))
    ts = _analyze(runs, "full_factorial", tricks)
    eff = ts.effects[ts.effects["metric"] == "metric.loss"].set_index("term")
    truth = {**main, **{f"{a}×{b}": v for (a, b), v in inter.items()}}
    for term, value in truth.items():
        r = eff.loc[term]
        assert r["n"] == 8
        assert r["ci_low"] <= value <= r["ci_high"], term
        assert abs(r["mean"] - value) < 0.03, term  # seed noise (sd 5) is blocked out; only sd 0.02 remains
    assert not eff["aliases"].any()
    v = ts.verdicts.set_index("term")
    assert v.loc["a", "verdict"] == "helps" and v.loc["b", "verdict"] == "hurts"
    assert v.loc["a", "time_ratio"] == pytest.approx(1.5) and v.loc["b", "time_ratio"] == pytest.approx(1.0)
    assert set(ts.interactions["term"]) == {"a×b", "a×c", "b×c"}
    assert ts.resolution is None


def test_fractional_factorial_resolution_aliases_and_estimates() -> None:
    tricks = ["a", "b", "c", "d"]
    rows, generators, resolution = fractional_design(4, 1)  # unpacks as the older triple
    assert resolution == 4 and generators == [(0, 1, 2)] and len(rows) == 8
    main = {"a": -0.4, "b": 0.25, "c": 0.0, "d": 0.1}
    inter = {("a", "b"): 0.3}  # aliased with c×d in this design
    runs = _runs("fractional_factorial", tricks, 1, 6, main, inter, np.random.default_rng(2))
    ts = _analyze(runs, "fractional_factorial", tricks, fraction=1)
    assert ts.resolution == 4 and ts.defining_relation == ["d = a·b·c"]
    eff = ts.effects[ts.effects["metric"] == "metric.loss"].set_index("term")
    for t, value in main.items():  # resolution IV: main effects are clear of two-way interactions
        assert eff.loc[t, "aliases"] == ""
        assert abs(eff.loc[t, "mean"] - value) < 0.03
    assert set(ts.interactions["term"]) == {"a×b", "a×c", "a×d"}
    assert dict(zip(ts.interactions["term"], ts.interactions["aliases"])) == {"a×b": "c×d", "a×c": "b×d", "a×d": "b×c"}
    assert abs(eff.loc["a×b", "mean"] - 0.3) < 0.03  # the estimate of the alias pair a×b + c×d


def test_resolution_three_main_effects_list_their_aliases() -> None:
    terms = stats.design_terms(
        "fractional_factorial", ["a", "b", "c"], design_arms("fractional_factorial", ["a", "b", "c"], 1)
    )
    assert {t.name: t.aliases for t in terms} == {"a": ("b×c",), "b": ("a×c",), "c": ("a×b",)}
    assert stats.interaction_terms(["a", "b", "c"], design_arms("fractional_factorial", ["a", "b", "c"], 1)) == []


def test_one_at_a_time_and_leave_one_out_contrasts() -> None:
    tricks = ["a", "b"]
    oaat = stats.design_terms("one_at_a_time", tricks, design_arms("one_at_a_time", tricks))
    assert [(t.name, t.weights) for t in oaat] == [
        ("a", {"+a": 1.0, "baseline": -1.0}),
        ("b", {"+b": 1.0, "baseline": -1.0}),
    ]
    loo = stats.design_terms("leave_one_out", tricks, design_arms("leave_one_out", tricks))
    assert [(t.name, t.weights) for t in loo] == [
        ("a", {"all": 1.0, "all-a": -1.0}),
        ("b", {"all": 1.0, "all-b": -1.0}),
    ]
    # leave_one_out effect = all − all-t: a trick that lowers the loss by 0.5 shows −0.5
    runs = _runs("leave_one_out", tricks, 0, 8, {"a": -0.5}, {}, np.random.default_rng(4))
    ts = _analyze(runs, "leave_one_out", tricks)
    v = ts.verdicts.set_index("term")
    assert v.loc["a", "mean"] == pytest.approx(-0.5, abs=0.03) and v.loc["a", "verdict"] == "helps"
    assert v.loc["b", "verdict"] in ("no detectable effect", "needs more seeds")
    assert ts.reference_arm == "all"


def test_diverged_pairs_are_excluded_and_divergence_decides_the_verdict() -> None:
    rng = np.random.default_rng(9)
    runs = _runs("one_at_a_time", ["a", "b"], 0, 8, {"a": -0.5, "b": -0.5}, {}, rng)
    # trick a diverges in two seeds; trick b diverges in all eight
    bad = ((runs["arm"] == "+a") & runs["seed"].isin([0, 1])) | (runs["arm"] == "+b")
    runs.loc[bad, ["status", "metric.loss", "stability.diverged"]] = ["diverged", np.nan, 1]
    ts = _analyze(runs, "one_at_a_time", ["a", "b"])
    v = ts.verdicts.set_index("term")
    assert v.loc["a", "n"] == 6 and v.loc["a", "n_excluded_diverged"] == 2
    assert v.loc["a", "verdict"] == "helps"  # 6 clean pairs, Holm over 2 tricks: p = 2/64·2 < 0.05
    assert v.loc["b", "n"] == 0 and v.loc["b", "n_excluded_diverged"] == 8
    assert v.loc["b", "verdict"] == "hurts" and "diverged" in v.loc["b", "reason"]
    st = ts.stability.set_index("term")
    assert (st.loc["a", "diverged_total_on"], st.loc["a", "diverged_total_off"]) == (2, 0)
    assert st.loc["b", "diverged_on"] == 1.0 and st.loc["b", "diverged_off"] == 0.0
    arms = ts.arm_summary.set_index("arm")
    assert arms.loc["+b", "diverged"] == 8 and arms.loc["+b", "completed"] == 0


def test_metric_direction() -> None:
    class T:
        metric = "return"
        higher_is_better = True
        metric_directions = {"custom": False}

    assert stats.metric_direction(T, "return") is True
    assert stats.metric_direction(T, "custom") is False
    assert stats.metric_direction(T, "test_psnr") is True
    assert stats.metric_direction(T, "test_mse") is False
    assert stats.metric_direction(T, "train_return_auc") is True
    assert stats.metric_direction(T, "hint_sensitivity") is None
    assert stats.metric_direction(T, "class_fidelity") is None  # "fid" is a word, not a substring
    assert stats.metric_direction(T, "accuracy_loss") is None  # contradicting words: no direction
