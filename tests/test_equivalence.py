"""bench/equivalence.py: the paired TOST, δ from a seed spread, exact power and seeds needed, and calibration.

The calibration test is a seeded Monte Carlo over seed counts, noise levels and noise shapes: the
false-equivalence rate at planted differences of ±2δ stays ≤ 5 %, the rate at the margin ±δ is α for
normal differences, and the power at 0 difference (reported in the test's output) agrees with the
exact integral of :func:`tost_power`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from bench.equivalence import (
    delta_from_spread,
    seed_spread,
    seeds_for_equivalence,
    simulate_equivalence_rate,
    tost,
    tost_power,
)

# --- the test itself --------------------------------------------------------------------------------


def test_tost_agrees_with_two_one_sided_t_tests_and_the_t_interval() -> None:
    """Checked against scipy's one-sample t-tests and t interval (an independent implementation)."""
    rng = np.random.default_rng(1)
    for n, delta in ((5, 0.3), (10, 0.1), (30, 0.05)):
        d = 0.02 + 0.1 * rng.standard_normal(n)
        r = tost(d, delta, alpha=0.05)
        assert r.p_lower == pytest.approx(stats.ttest_1samp(d, -delta, alternative="greater").pvalue, rel=1e-9)
        assert r.p_upper == pytest.approx(stats.ttest_1samp(d, delta, alternative="less").pvalue, rel=1e-9)
        lo, hi = stats.t.interval(0.90, n - 1, loc=d.mean(), scale=stats.sem(d))
        assert (r.ci_low, r.ci_high) == (pytest.approx(lo), pytest.approx(hi))
        # the TOST decision is "the 90 % interval lies inside ±δ"
        assert r.equivalent == (-delta < r.ci_low and r.ci_high < delta)


def test_equivalent_and_not_shown_equivalent() -> None:
    close = tost([0.001, -0.002, 0.0005, 0.0015, -0.001], delta=0.01)
    assert close.equivalent and close.verdict().startswith("equivalent within ±0.01")
    far = tost([0.02, 0.021, 0.019, 0.0205, 0.0195], delta=0.01)  # a precise difference beyond δ
    assert not far.equivalent and not far.mean_inside and far.verdict().startswith("not shown equivalent")
    noisy = tost([0.05, -0.05, 0.04, -0.03, 0.0], delta=0.01)  # centred, but too noisy to show anything
    assert not noisy.equivalent and noisy.mean_inside


def test_identical_implementations_have_a_point_interval() -> None:
    r = tost([0.0] * 4, delta=1e-6)
    assert r.equivalent and r.ci_low == r.ci_high == 0.0 and r.p_value == 0.0
    shifted = tost([0.5] * 4, delta=0.4)  # exactly the same difference on every seed, beyond δ
    assert not shifted.equivalent and shifted.p_value == 1.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"diffs": [0.1], "delta": 1.0}, "diffs"),
        ({"diffs": [0.1, math.nan], "delta": 1.0}, "diffs"),
        ({"diffs": [0.1, 0.2], "delta": 0.0}, "delta"),
        ({"diffs": [0.1, 0.2], "delta": math.inf}, "delta"),
        ({"diffs": [0.1, 0.2], "delta": True}, "delta"),
        ({"diffs": [0.1, 0.2], "delta": 1.0, "alpha": 0.5}, "alpha"),
    ],
)
def test_bad_input_names_the_argument(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tost(**kwargs)


def test_delta_from_the_seed_spread() -> None:
    values = [0.30, 0.32, 0.29, 0.35, 0.31]
    assert seed_spread(values) == pytest.approx(float(np.std(values, ddof=1)))
    assert delta_from_spread(values, 0.25) == pytest.approx(0.25 * float(np.std(values, ddof=1)))
    with pytest.raises(ValueError, match="identical on every seed"):
        delta_from_spread([0.3, 0.3, 0.3], 0.25)
    with pytest.raises(ValueError, match="fraction"):
        delta_from_spread(values, -1)


# --- power and seeds --------------------------------------------------------------------------------


def test_exact_power_matches_simulation() -> None:
    rng = np.random.default_rng(2)
    sims = 20_000
    for n, sd, true in ((6, 0.8, 0.0), (10, 1.0, 0.3), (15, 2.0, 0.0), (8, 1.0, 1.0)):
        exact = tost_power(n, sd, 1.0, true)
        simulated = simulate_equivalence_rate(n, sd, 1.0, true, sims, rng)
        se = math.sqrt(max(exact * (1 - exact), 1e-4) / sims)
        assert abs(exact - simulated) < 4 * se, (n, sd, true, exact, simulated)


def test_seeds_for_equivalence_is_the_smallest_sufficient_count() -> None:
    for sd in (0.3, 1.0, 2.0):
        n = seeds_for_equivalence(sd, 1.0, power=0.8)
        assert n is not None and tost_power(n, sd, 1.0) >= 0.8
        assert n == 2 or tost_power(n - 1, sd, 1.0) < 0.8
    assert seeds_for_equivalence(0.5, 1.0, true_diff=1.5, max_seeds=256) is None  # equivalence is false there
    assert tost_power(3, 0.0, 1.0) == 1.0 and tost_power(3, 0.0, 1.0, true_diff=1.0) == 0.0


# --- calibration -------------------------------------------------------------------------------------

SEEDS = (5, 10, 20)
NOISE_OVER_DELTA = (0.25, 0.5, 1.0, 2.0)  # SD of the per-seed differences, in units of δ
SHAPES = ("normal", "t3", "exponential")


def test_calibration_false_equivalence_at_2delta_and_power_at_0(capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded Monte Carlo (4,000 simulated checks per cell, ~1 s): planted differences of ±2δ are called
    equivalent at most 5 % of the time for every seed count, noise level and noise shape; at the margin
    ±δ the rate is α = 5 % for normal differences; the power at 0 is reported and matches the exact value."""
    rng = np.random.default_rng(20261130)
    sims = 4000
    se_at_alpha = math.sqrt(0.05 * 0.95 / sims)
    lines = ["n  sd/δ  shape        P(eq | 2δ)  P(eq | -2δ)  P(eq | δ)  power at 0 (exact)"]
    worst_2delta = 0.0
    for n in SEEDS:
        for sd in NOISE_OVER_DELTA:
            for shape in SHAPES:
                at_2 = simulate_equivalence_rate(n, sd, 1.0, 2.0, sims, rng, noise=shape)
                at_m2 = simulate_equivalence_rate(n, sd, 1.0, -2.0, sims, rng, noise=shape)
                at_1 = simulate_equivalence_rate(n, sd, 1.0, 1.0, sims, rng, noise=shape)
                at_0 = simulate_equivalence_rate(n, sd, 1.0, 0.0, sims, rng, noise=shape)
                exact = tost_power(n, sd, 1.0)
                worst_2delta = max(worst_2delta, at_2, at_m2)
                assert at_2 <= 0.05 and at_m2 <= 0.05, (n, sd, shape, at_2, at_m2)
                if shape == "normal":
                    assert at_1 <= 0.05 + 3 * se_at_alpha, (n, sd, at_1)
                    assert abs(at_0 - exact) < 4 * math.sqrt(max(exact * (1 - exact), 1e-4) / sims), (n, sd)
                lines.append(
                    f"{n:<2} {sd:<5} {shape:<12} {at_2:<11.4f} {at_m2:<12.4f} {at_1:<10.4f} {at_0:.4f} ({exact:.4f})"
                )
    with capsys.disabled():
        print("\nTOST calibration (α = 0.05 per side; rates of 'equivalent'):\n" + "\n".join(lines))
        print(f"largest false-equivalence rate at ±2δ: {worst_2delta:.4f}")
    # the recommended check (10 seeds) is sure to show equivalence when the differences' SD is ≤ δ/2
    assert tost_power(10, 0.5, 1.0) > 0.99
