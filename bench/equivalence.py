"""Equivalence of two implementations over paired seeds: the paired two one-sided tests (TOST).

When to call: after both arms of an equivalence check (``bench equiv``) trained on the same seeds;
:func:`tost` takes the per-seed differences candidate − reference of one metric. Pure statistics
(NumPy/SciPy): nothing here trains, reads or writes runs.

The question is not "is there a difference?" (a test that fails to reject says nothing: too few
seeds look like equivalence) but "is the difference shown to lie within ±δ?". TOST (Schuirmann
1987) rejects both ``H0−: μ ≤ −δ`` and ``H0+: μ ≥ +δ`` at level α each; that is the same decision
as "the (1 − 2α) confidence interval of the mean difference lies inside (−δ, +δ)", and its
false-equivalence rate is at most α whenever the true difference is ±δ or farther.

Why the t-based TOST (and not a Wilcoxon signed-rank TOST):

- the answer a user needs is an interval in metric units ("within ±0.002 test MSE"); the t
  interval is that interval, the signed-rank test gives a Hodges-Lehmann interval only with
  extra machinery and coarse attainable levels at 5–20 seeds;
- the differences an equivalence check sees are averages of a whole training run's numerical
  deviations (one number per seed), close to normal; where the two implementations consume the
  same random streams they are tiny and near-deterministic, and the exact-zero case (bit-identical
  implementations, ``sd = 0``) is handled explicitly (the interval is the point);
- robustness is measured, not assumed: the calibration test (``tests/test_equivalence.py``) checks
  the false-equivalence rate at ±δ and ±2δ under heavy-tailed (t with 3 df) and skewed (centred
  exponential) differences as well as normal ones.

``δ`` is the user's: in metric units, or a fraction of the baseline's seed spread
(:func:`delta_from_spread`: the sample standard deviation, ddof = 1, of the baseline arm's metric
over the check's seeds). The second makes δ itself an estimate (relative standard error about
``1/√(2(n−1))``: 24 % at 10 seeds); the test is then conditional on the δ it printed — give δ in metric
units when it must be fixed in advance. :func:`tost_power` (exact, one-dimensional integral) and
:func:`seeds_for_equivalence` say how many seeds a check needs for a given noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import integrate, stats

__all__ = [
    "TostResult",
    "delta_from_spread",
    "seed_spread",
    "seeds_for_equivalence",
    "simulate_equivalence_rate",
    "tost",
    "tost_power",
]


@dataclass(frozen=True)
class TostResult:
    """A paired TOST on ``n`` differences (candidate − reference), margin ±``delta``, level ``alpha`` per side."""

    n: int
    mean_diff: float
    sd_diff: float  # sample SD of the differences (ddof = 1)
    df: int
    delta: float
    alpha: float
    ci_low: float  # the (1 − 2α) confidence interval of the mean difference (paired t)
    ci_high: float
    p_lower: float  # H0−: mean ≤ −δ
    p_upper: float  # H0+: mean ≥ +δ

    @property
    def p_value(self) -> float:
        """The TOST p-value: the larger of the two one-sided p-values."""
        return max(self.p_lower, self.p_upper)

    @property
    def equivalent(self) -> bool:
        """True when both one-sided nulls are rejected (the CI lies strictly inside ±δ)."""
        return self.p_value < self.alpha

    @property
    def ci_level(self) -> float:
        return 1.0 - 2.0 * self.alpha

    @property
    def mean_inside(self) -> bool:
        """Whether the observed mean difference itself lies inside ±δ (more seeds could then show equivalence)."""
        return abs(self.mean_diff) < self.delta

    def verdict(self) -> str:
        """``equivalent within ±δ`` or ``not shown equivalent`` (with δ)."""
        head = "equivalent" if self.equivalent else "not shown equivalent"
        return f"{head} within ±{self.delta:.4g}"


def _finite_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: shape {arr.shape} is not allowed; allowed: a 1-D sequence of numbers")
    bad = [i for i, v in enumerate(arr) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name}: non-finite values at positions {bad}; allowed: finite numbers only")
    return arr


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not (isinstance(alpha, (int, float)) and 0.0 < alpha < 0.5):
        raise ValueError(f"alpha: {alpha!r} is not allowed; allowed: a number in (0, 0.5)")


def _check_delta(delta: float) -> None:
    if isinstance(delta, bool) or not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"delta: {delta!r} is not allowed; allowed: a finite number > 0 (in metric units)")


def tost(diffs: Sequence[float] | np.ndarray, delta: float, alpha: float = 0.05) -> TostResult:
    """Paired TOST of the per-seed differences ``diffs`` (candidate − reference) against ±``delta``.

    t-based: the mean difference's standard error ``sd/√n`` with ``n − 1`` degrees of freedom; the
    (1 − 2α) interval ``mean ± t_{1−α, n−1}·se``. With every difference equal (``sd = 0``: e.g. two
    bit-identical implementations) the interval is the point and each one-sided p-value is 0 or 1.
    At least 2 differences; ``ValueError`` naming the argument otherwise.
    """
    d = _finite_array(diffs, "diffs")
    _check_delta(delta)
    _check_alpha(alpha)
    n = len(d)
    if n < 2:
        raise ValueError(f"diffs: {n} paired difference(s) given; allowed: at least 2 (seeds)")
    mean = float(d.mean())
    sd = float(d.std(ddof=1))
    df = n - 1
    se = sd / math.sqrt(n)
    if se == 0.0:
        lo = hi = mean
        p_lower = 0.0 if mean > -delta else 1.0
        p_upper = 0.0 if mean < delta else 1.0
    else:
        half = float(stats.t.ppf(1.0 - alpha, df)) * se
        lo, hi = mean - half, mean + half
        p_lower = float(stats.t.sf((mean + delta) / se, df))
        p_upper = float(stats.t.cdf((mean - delta) / se, df))
    return TostResult(n, mean, sd, df, float(delta), float(alpha), lo, hi, p_lower, p_upper)


def seed_spread(values: Sequence[float] | np.ndarray) -> float:
    """The seed-to-seed spread of one arm's metric: the sample standard deviation (ddof = 1) over its seeds."""
    v = _finite_array(values, "values")
    if len(v) < 2:
        raise ValueError(f"values: {len(v)} seed(s) given; allowed: at least 2 to estimate a spread")
    return float(v.std(ddof=1))


def delta_from_spread(values: Sequence[float] | np.ndarray, fraction: float) -> float:
    """δ = ``fraction`` × :func:`seed_spread` of ``values`` (the baseline arm's metric over the check's seeds).

    ``ValueError`` when the spread is 0 (the metric does not vary over seeds: give δ in metric units).
    """
    if isinstance(fraction, bool) or not (
        isinstance(fraction, (int, float)) and math.isfinite(fraction) and fraction > 0
    ):
        raise ValueError(f"fraction: {fraction!r} is not allowed; allowed: a finite number > 0")
    spread = seed_spread(values)
    if spread == 0.0:
        raise ValueError(
            "values: the metric is identical on every seed (spread 0), so a fraction of it is no margin; "
            "give delta in metric units instead"
        )
    return fraction * spread


def tost_power(n: int, sd_diff: float, delta: float, true_diff: float = 0.0, alpha: float = 0.05) -> float:
    """Probability that :func:`tost` declares equivalence with ``n`` normal differences of SD ``sd_diff``.

    Exact (no simulation): given the sample SD ``s`` the decision is ``|mean ∓ …|`` inside a band of
    half-width ``δ − t_{1−α}·s/√n``; the mean is normal and independent of ``s``, whose square is
    ``σ²·χ²_{n−1}/(n−1)``, so the probability is one integral over the χ² density. At
    ``|true_diff| ≥ δ`` this is the false-equivalence rate (≤ α); at 0 it is the power.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n: {n!r} is not allowed; allowed: an integer ≥ 2")
    _check_delta(delta)
    _check_alpha(alpha)
    if not (math.isfinite(sd_diff) and sd_diff >= 0):
        raise ValueError(f"sd_diff: {sd_diff!r} is not allowed; allowed: a finite number ≥ 0")
    if sd_diff == 0.0:
        return 1.0 if abs(true_diff) < delta else 0.0
    df = n - 1
    crit = float(stats.t.ppf(1.0 - alpha, df))
    se_true = sd_diff / math.sqrt(n)
    # the band exists while crit·s/√n < δ, i.e. χ² < v_max
    v_max = df * (delta * math.sqrt(n) / (crit * sd_diff)) ** 2

    def integrand(v: float) -> float:
        half = delta - crit * sd_diff * math.sqrt(v / df) / math.sqrt(n)
        inside = stats.norm.cdf((half - true_diff) / se_true) - stats.norm.cdf((-half - true_diff) / se_true)
        return float(inside) * float(stats.chi2.pdf(v, df))

    value, _ = integrate.quad(integrand, 0.0, v_max, limit=200)
    return float(min(1.0, max(0.0, value)))


def seeds_for_equivalence(
    sd_diff: float,
    delta: float,
    power: float = 0.8,
    alpha: float = 0.05,
    true_diff: float = 0.0,
    max_seeds: int = 10_000,
) -> int | None:
    """The fewest paired seeds with which :func:`tost` shows equivalence with probability ≥ ``power``.

    For differences of SD ``sd_diff`` and true mean ``true_diff`` (normal). None when even
    ``max_seeds`` are not enough (e.g. ``|true_diff| ≥ δ``: equivalence is then false).
    Doubling then bisection over :func:`tost_power` (monotone in n).
    """
    if not 0.0 < power < 1.0:
        raise ValueError(f"power: {power!r} is not allowed; allowed: a number in (0, 1)")
    if tost_power(2, sd_diff, delta, true_diff, alpha) >= power:
        return 2
    hi = 4
    while tost_power(hi, sd_diff, delta, true_diff, alpha) < power:
        if hi >= max_seeds:
            return None
        hi = min(2 * hi, max_seeds)
    lo = hi // 2  # power(lo) < target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tost_power(mid, sd_diff, delta, true_diff, alpha) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def simulate_equivalence_rate(
    n: int,
    sd_diff: float,
    delta: float,
    true_diff: float,
    sims: int,
    rng: np.random.Generator,
    alpha: float = 0.05,
    noise: str = "normal",
) -> float:
    """Monte Carlo: the fraction of ``sims`` simulated checks that :func:`tost`'s rule calls equivalent.

    ``n`` differences per check, ``true_diff + sd_diff·ε`` with ε of mean 0 and SD 1: ``normal``,
    ``t3`` (Student t with 3 df, rescaled: heavy tails) or ``exponential`` (centred: skewed). The
    same decision as :func:`tost`, vectorised over the simulated checks (for calibration tests).
    """
    if noise == "normal":
        eps = rng.standard_normal((sims, n))
    elif noise == "t3":
        eps = rng.standard_t(3, (sims, n)) / math.sqrt(3.0)  # Var(t3) = 3
    elif noise == "exponential":
        eps = rng.standard_exponential((sims, n)) - 1.0
    else:
        raise ValueError(f"noise: {noise!r} is not allowed; allowed: one of 'normal', 't3', 'exponential'")
    d = true_diff + sd_diff * eps
    mean = d.mean(axis=1)
    se = d.std(axis=1, ddof=1) / math.sqrt(n)
    crit = float(stats.t.ppf(1.0 - alpha, n - 1))
    inside = (mean - crit * se > -delta) & (mean + crit * se < delta)
    return float(inside.mean())
