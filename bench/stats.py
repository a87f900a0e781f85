"""Statistics of a grid: paired effects, stability, cost, verdicts and factorial interactions.

Called by the reports (``bench/report.py``) once runs are stored; reads only the frames of
``bench.store`` and the grid's stored spec, and never trains anything. The functions near
the top are pure (arrays in, numbers out) and are what tests/test_calibration.py exercises;
the ones at the bottom assemble them into one :class:`TaskStats` per task of a grid. Grids
run adaptively (``bench run --until-decisive``) are judged by :mod:`bench.sequential`
instead: the fixed-n test and interval here are not valid after data-dependent stopping.

Conventions (written into every report):

- **Effect** of a trick = metric with the trick on − metric with it off, **paired by seed**
  (seed *s* of every arm shares its seed bundle). one_at_a_time: ``+t − baseline``;
  leave_one_out: ``all − all-t``; factorial designs: the per-seed ±1 contrast
  ``(2/N)·Σ_arms x_t·y`` (= mean over arms with t on − mean over arms with t off), which is
  the least-squares main effect with seed as a blocking factor. Two-way interactions use
  ``x_a·x_b``: half the change of a's effect when b is switched on.
- **Interval and test**: the paired **t-interval** of the mean difference and the paired
  **t-test** it inverts (``scipy.stats.ttest_1samp``), so a verdict and its interval never
  disagree: p < α exactly when the (1 − α) interval excludes 0, and p(Holm) ≥ p. Chosen by
  calibration (tests/test_calibration.py, 20,000 simulated families per cell): over five
  data shapes (normal, t₃, lognormal metric, skewed differences, rare outlier runs) at 2, 3,
  5, 10 and 20 seeds it covers 93.9–96.6 % (nominal 95 %). The interval shipped before,
  BCa bootstrap at a level expanded for small n, covered 72–76 % at 3 seeds and 88.5–94.8 %
  at 5–20 seeds on the same shapes (``python -m tests.test_calibration``): a bootstrap
  interval cannot be wider than the data and treats n values as the population; the
  percentile and BCa variants share that fault at n ≤ 20, and a bootstrap-t (studentized)
  interval, the bootstrap that can reach nominal coverage, is erratic at 5 seeds and costs
  10⁴ resamples per family, too slow to keep calibrating in CI. Known limits (printed by the
  same command): strongly skewed differences (skewness 2, exponential) cover 88–92 %; frequent
  large outliers (5 % of runs 10σ off) over-cover (96–98 %, conservative).
  The **sign-flip permutation p** (exact for symmetric differences) is reported beside.
  **Holm** adjusts p across the tricks of a task, per metric (Benjamini–Hochberg q beside).
- **Verdict** (primary metric): helps / hurts when p(Holm) < α (the interval then excludes 0
  on that side); no detectable effect when not significant *and* the 95 % interval of the
  effect size d_z = mean / sd of the differences lies within ±0.5 (any effect is small next
  to the seed noise; an equivalence claim, not a failure to reject); otherwise needs more
  seeds, with the reason (too few seeds for a test, or inconclusive) and a seeds-needed
  interval (see :func:`seeds_needed_interval`).
- **Diverged runs** have no final metric: a pair (or factorial block) with a diverged run
  is excluded from metric effects and counted; divergence is its own outcome (rates and an
  exact sign-flip test on the 0/1 indicators).
- **Stability spread ratio**: Gini mean difference across seeds with the trick on / off,
  with a jackknife interval of the log ratio and an exact swap test (see :func:`spread_ratio`).
- **Cost ratio**: geometric mean of per-seed on/off ratios, the t-interval of the mean log
  ratio exponentiated (the same calibrated interval on log values).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize as spo
from scipy import stats as sps

from bench import store

__all__ = [
    "ALPHA",
    "MIN_EFFECT_SIZE",
    "MIN_TEST_SEEDS",
    "NO_PAIRS",
    "N_RESAMPLES",
    "POWER",
    "VERDICT_CLASSES",
    "Effect",
    "GridStats",
    "SpreadRatio",
    "TaskStats",
    "Term",
    "Verdict",
    "analyze_grid",
    "analyze_task",
    "benjamini_hochberg",
    "cost_matrices",
    "design_terms",
    "dz_interval",
    "gini_spread_interval",
    "holm",
    "interaction_terms",
    "metric_direction",
    "min_seeds_for_significance",
    "paired_effect",
    "paired_ratio",
    "paired_t",
    "seed_matrix",
    "seeds_needed",
    "seeds_needed_interval",
    "spread_ratio",
    "swap_patterns",
    "swap_test_p",
    "t_test_power",
    "term_effect",
    "verdict",
    "verdict_class",
]

ALPHA = 0.05  # significance level of verdicts (after Holm)
CONFIDENCE = 0.95  # level of every interval
POWER = 0.8  # power assumed when saying how many seeds a verdict needs
N_RESAMPLES = 10_000  # Monte Carlo sign patterns of the sign-flip p beyond 13 seeds
MIN_EFFECT_SIZE = 0.5  # |mean| / sd of the paired differences (Cohen's d_z) that counts as "practically large"
#: fewest seeds for a paired t-test and interval (one needs an sd); tests/test_calibration.py measures the
#: interval's coverage from here on: 93.9–96.6 % at 2, 3, 5, 10, 20 seeds over the five data shapes
MIN_TEST_SEEDS = 2
MIN_RELIABLE_CI_SEEDS = MIN_TEST_SEEDS  # older name (report, plots): intervals from fewer seeds are flagged
MIN_SPREAD_SEEDS = 3  # the spread ratio's jackknife interval needs 3 seeds (leave-one-out keeps a pair)
SEEDS_NEEDED_CONFIDENCE = 0.8  # level of the d_z interval that the seeds-needed range is read from
MAX_SEEDS_NEEDED = 100_000  # beyond this a seeds-needed bound is reported as ∞
STATS_SEED = 20_240_601  # fixed: the same stored runs always give the same numbers
MIN_MEASURED_MEMORY_MB = 1.0  # CPU peaks are sampled RSS growth in pages: smaller readings are noise, not cost
COST_CI_LABEL = f"geometric mean of per-seed ratios, {CONFIDENCE:.0%} t-interval of the mean log ratio"
CI_LABELS = {
    "t": "t-interval",
    "exact": "exact (every seed gave the same difference)",
    "none": "none",
}

#: primary-metric-independent stability columns of result.json and their direction
STABILITY_METRICS = {
    "stability.loss_spikes": False,
    "stability.late_roughness": False,
    "stability.final_train_loss": False,
}
#: whole words of metric names ("test_psnr" → test, psnr) whose direction is unambiguous; used only for
#: secondary metrics the task does not declare in ``metric_directions`` (no match = no preferred direction)
_HIGHER_IS_BETTER_WORDS = frozenset({"psnr", "ssim", "acc", "accuracy", "return", "reward", "auc", "f1"})
_LOWER_IS_BETTER_WORDS = frozenset({"mse", "mae", "rmse", "loss", "error", "nll", "fid", "perplexity", "wasserstein"})


# --- pure statistics ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Effect:
    """A paired effect: summary of the per-seed differences (on − off) of one metric."""

    n: int  # seeds (pairs / blocks) used
    mean: float  # mean difference, in the metric's units
    ci_low: float
    ci_high: float
    ci_method: str  # "t" (paired t-interval), "exact" (all differences equal) or "none" (n < 2)
    ci_level: float  # nominal level of the interval (nan without one)
    p: float  # two-sided paired t-test p (the test the interval inverts); nan when n < 2
    p_signflip: float  # two-sided sign-flip permutation p (exact under symmetric differences); nan when n < 2
    sd: float  # std of the differences (ddof=1); nan when n < 2
    frac_improved: float  # fraction of seeds where "on" is better; nan when the direction is unknown
    higher_is_better: bool | None

    @property
    def gain(self) -> float:
        """The mean difference signed so that positive = better (nan without a direction)."""
        if self.higher_is_better is None:
            return float("nan")
        return self.mean if self.higher_is_better else -self.mean

    @property
    def dz(self) -> float:
        """Standardized effect d_z = mean / sd of the differences (±inf with no spread, nan when undefined)."""
        if self.n < 2 or not math.isfinite(self.sd):
            return float("nan")
        if self.sd == 0:
            return 0.0 if self.mean == 0 else math.copysign(math.inf, self.mean)
        return self.mean / self.sd

    @property
    def test_possible(self) -> bool:
        """Enough seeds for the paired t-test (and its interval) at all."""
        return self.n >= MIN_TEST_SEEDS

    @property
    def ci_calibrated(self) -> bool:
        """True when the interval's coverage was measured at this seed count (tests/test_calibration.py)."""
        return self.ci_method == "t" and self.n >= MIN_TEST_SEEDS

    @property
    def ci_reliable(self) -> bool:
        """Older name of :attr:`ci_calibrated`."""
        return self.ci_calibrated or self.ci_method == "exact"

    @property
    def ci_label(self) -> str:
        """What the interval is, for a report: '95% t-interval', 'exact (...)' or 'none'."""
        if self.ci_method == "t":
            return f"{self.ci_level:.0%} {CI_LABELS['t']}"
        return CI_LABELS.get(self.ci_method, self.ci_method)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "dz": self.dz,
            "test_possible": self.test_possible,
            "ci_calibrated": self.ci_calibrated,
            "ci_label": self.ci_label,
        }


def paired_t(
    diffs: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Paired t-interval and two-sided t-test of the mean, vectorized over leading axes.

    ``diffs``: (..., n) per-seed differences, n ≥ 2, finite. Returns (mean, low, high, p),
    each of shape (...). With no spread the interval is the point and p is 0 (or 1 when the
    mean is 0). This is the interval and test of every paired effect; the calibration suite
    calls it on 20,000 families at once.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.shape[-1] < 2:
        raise ValueError(f"diffs: {d.shape[-1]} values per sample is not allowed; allowed: at least 2")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: {confidence} is not allowed; allowed: 0 < confidence < 1")
    mean = d.mean(axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nearly identical values: scipy warns about precision, the result is right
        res = sps.ttest_1samp(d, 0.0, axis=-1)
        ci = res.confidence_interval(confidence)
    low, high, p = np.asarray(ci.low, float), np.asarray(ci.high, float), np.asarray(res.pvalue, float)
    flat = np.all(d == d[..., :1], axis=-1)  # every value equal (a computed sd may be rounding noise)
    if np.any(flat):
        first = d[..., 0]
        mean = np.where(flat, first, mean)
        low, high, p = np.where(flat, first, low), np.where(flat, first, high), np.where(flat, (first == 0) * 1.0, p)
    return mean, low, high, p


def paired_effect(
    diffs: np.ndarray | list[float],
    higher_is_better: bool | None,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = STATS_SEED,
) -> Effect:
    """Mean, t-interval, t-test p, sign-flip p and fraction improved of per-seed differences.

    ``diffs`` are on − off, one per seed, all finite (drop diverged pairs first).
    ``n_resamples`` sign patterns are drawn for the sign-flip p beyond 13 seeds (exact below);
    deterministic in ``seed``.
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if not np.all(np.isfinite(d)):
        raise ValueError(f"diffs: {d.tolist()} has non-finite values; allowed: finite values (exclude diverged pairs)")
    if n_resamples < 100:
        raise ValueError(f"n_resamples: {n_resamples} is not allowed; allowed: at least 100")
    n = len(d)
    nan = float("nan")
    if n == 0:
        return Effect(0, nan, nan, nan, "none", nan, nan, nan, nan, nan, higher_is_better)
    mean = float(d.mean())
    if higher_is_better is None:
        frac = nan
    else:
        frac = float(np.mean(d > 0) if higher_is_better else np.mean(d < 0))
    if n == 1:
        return Effect(1, mean, nan, nan, "none", nan, nan, nan, nan, frac, higher_is_better)
    method = "exact" if np.all(d == d[0]) else "t"
    sd = float(d.std(ddof=1)) if method == "t" else 0.0
    mean, lo, hi, p = (float(x) for x in paired_t(d, confidence))
    p_sign = _sign_flip_p(d, n_resamples, np.random.default_rng(seed))
    return Effect(n, mean, lo, hi, method, confidence, p, p_sign, sd, frac, higher_is_better)


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def _sign_flip_p(d: np.ndarray, n_resamples: int, rng: np.random.Generator) -> float:
    """Two-sided paired permutation p-value of the mean: the null flips the sign of each difference."""
    if np.all(d == 0):
        return 1.0
    res = sps.permutation_test(
        (d,),
        _mean_stat,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=rng,
    )
    return float(min(1.0, res.pvalue))


@dataclass(frozen=True)
class SpreadRatio:
    """Across-seed spread with the trick on / off, its interval and an exact test (see :func:`spread_ratio`)."""

    ratio: float
    low: float
    high: float
    n: int  # seeds
    p: float  # exact within-seed swap permutation p of "the trick leaves the spread alone" (one arm a side; else nan)
    method: str  # "jackknife" or "none" (fewer than MIN_SPREAD_SEEDS seeds, or no spread in an arm)

    @property
    def label(self) -> str:
        if self.method == "none":
            return "none"
        return f"{CONFIDENCE:.0%} jackknife t-interval of the log ratio of Gini mean differences"

    @property
    def changed(self) -> bool:
        """A change of spread is claimed: the interval excludes 1 and (one arm a side) the exact swap test agrees."""
        if not (math.isfinite(self.low) and (self.low > 1 or self.high < 1)):
            return False
        return not math.isfinite(self.p) or self.p < ALPHA


def gini_spread_interval(
    on: np.ndarray, off: np.ndarray, confidence: float = CONFIDENCE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spread ratio on / off and its jackknife t-interval, vectorized over leading axes.

    ``on``, ``off``: (..., n, arms) values of the same n seeds (rows paired), n ≥ 3. The spread
    of an arm is its Gini mean difference (mean |y_s − y_t| over pairs of seeds: no estimated
    centre, finite variance whenever the metric has one), averaged over the arms of a side.
    The interval is exp(log ratio ± t_{n−1}·se) with se the leave-one-seed-out jackknife
    standard error of the log ratio. Returns (ratio, low, high); nan where an arm has no spread.
    """
    on, off = np.asarray(on, np.float64), np.asarray(off, np.float64)
    n = on.shape[-2]
    if n < 3:
        raise ValueError(f"on/off: {n} seeds is not allowed; allowed: at least 3")

    def sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # Σ_{s,t} |x_s − x_t| and its row sums, per arm
        d = np.abs(x[..., :, None, :] - x[..., None, :, :])  # (..., n, n, arms)
        rows = d.sum(axis=-2)  # (..., n, arms)
        return rows.sum(axis=-2), rows

    (s_on, r_on), (s_off, r_off) = sums(on), sums(off)
    with np.errstate(divide="ignore", invalid="ignore"):
        full = np.log(s_on.mean(-1) / s_off.mean(-1))  # the pair counts cancel in the ratio
        loo = np.log((s_on[..., None, :] - 2 * r_on).mean(-1) / (s_off[..., None, :] - 2 * r_off).mean(-1))
        se = np.sqrt((n - 1) / n * ((loo - loo.mean(-1, keepdims=True)) ** 2).sum(-1))
        half = sps.t.ppf((1 + confidence) / 2, n - 1) * se
        return np.exp(full), np.exp(full - half), np.exp(full + half)


def swap_test_p(on: np.ndarray, off: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Permutation p of |log Gini(on) / Gini(off)| over within-seed swaps of the two arms, vectorized.

    ``on``, ``off``: (..., n) one arm a side; ``patterns``: (B, n) 0/1 swap patterns. With all
    2^n patterns the p is exact when the trick does not change the arm's distribution (the two
    runs of a seed are then exchangeable), whatever the shape of the data.
    """
    on, off = np.asarray(on, np.float64), np.asarray(off, np.float64)
    x = 1.0 - np.asarray(patterns, np.float64)  # 1 = keep
    y = 1.0 - x
    dist = {
        (a, b): np.abs(u[..., :, None] - v[..., None, :])
        for (a, u), (b, v) in itertools.product((("on", on), ("off", off)), repeat=2)
    }

    def quad(p: np.ndarray, m: np.ndarray, q: np.ndarray) -> np.ndarray:  # p_s m_st q_t summed, per pattern
        return np.einsum("bs,...st,bt->...b", p, m, q)

    g_on = quad(x, dist["on", "on"], x) + quad(y, dist["off", "off"], y) + 2 * quad(x, dist["on", "off"], y)
    g_off = quad(y, dist["on", "on"], y) + quad(x, dist["off", "off"], x) + 2 * quad(y, dist["on", "off"], x)
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.abs(np.log(g_on / g_off))
        observed = np.abs(np.log(dist["on", "on"].sum((-1, -2)) / dist["off", "off"].sum((-1, -2))))
    return np.mean(stat >= observed[..., None] * (1 - 1e-12), axis=-1)


def swap_patterns(n: int, max_patterns: int = 4096, seed: int = STATS_SEED) -> np.ndarray:
    """All 2^n within-seed swap patterns (exact) up to ``max_patterns``, else that many random ones plus identity."""
    if 2**n <= max_patterns:
        return ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(np.float64)
    rng = np.random.default_rng(seed)
    return np.vstack([np.zeros((1, n)), rng.integers(0, 2, size=(max_patterns - 1, n))]).astype(np.float64)


def spread_ratio(on: np.ndarray, off: np.ndarray, *, confidence: float = CONFIDENCE) -> SpreadRatio:
    """Ratio of across-seed spreads, on / off, with its interval and (one arm a side) an exact test.

    ``on``/``off``: seeds × arms matrices (or 1-D for one arm each) of the same seeds. The
    spread of an arm is its Gini mean difference across seeds (mean |y_s − y_t|; for normal
    metrics √2·2/√π·sd, so the ratio is the ratio of standard deviations), averaged over the
    arms of a side. The interval (:func:`gini_spread_interval`) covers 94.2–96.1 % over the
    additive shapes of tests/test_calibration.py at 3–20 seeds (91.4–95.4 % with a
    multiplicative, lognormal seed factor; the bootstrap of the sd ratio shipped before covered
    71–93 %); a variance ratio's interval needs the fourth moment (Pitman–Morgan covered 64–89 %
    on t₃ and outlier data). With one arm a side, ``p`` is the exact within-seed swap test
    (:func:`swap_test_p`; all 2^n patterns up to 12 seeds, 4,096 random ones beyond) and
    :attr:`SpreadRatio.changed` needs both, so "spread changed" is claimed in at most α of grids
    where the trick changes nothing, whatever the data's shape; its smallest p is 2/2^n, so a
    change can be claimed from 6 seeds on.
    """
    on = np.asarray(on, dtype=np.float64)
    off = np.asarray(off, dtype=np.float64)
    on, off = (x[:, None] if x.ndim == 1 else x for x in (on, off))
    if on.shape[0] != off.shape[0]:
        raise ValueError(f"on/off: {on.shape[0]} and {off.shape[0]} seeds; allowed: the same seeds (paired rows)")
    n = on.shape[0]
    nan = float("nan")
    if n < 2:
        return SpreadRatio(nan, nan, nan, n, nan, "none")
    if n < MIN_SPREAD_SEEDS:
        g_on = np.abs(on[0] - on[1]).mean()
        g_off = np.abs(off[0] - off[1]).mean()
        return SpreadRatio(float(g_on / g_off) if g_off > 0 else nan, nan, nan, n, nan, "none")
    ratio, low, high = (float(v) for v in gini_spread_interval(on, off, confidence))
    p = nan
    if on.shape[1] == 1 and off.shape[1] == 1:
        p = float(swap_test_p(on[:, 0], off[:, 0], swap_patterns(n)))
    return SpreadRatio(ratio, low, high, n, p, "jackknife" if math.isfinite(low) else "none")


def holm(pvalues: np.ndarray | list[float]) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (family-wise error control); nan entries are left out of the family.

    Sorted ascending, the i-th smallest (0-based) of m is multiplied by m − i, then made
    monotone non-decreasing and capped at 1.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    if np.any((p[idx] < 0) | (p[idx] > 1)):
        raise ValueError(f"pvalues: {p.tolist()} has values outside [0, 1]")
    m = len(idx)
    if m == 0:
        return out
    order = idx[np.argsort(p[idx], kind="stable")]
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out


def benjamini_hochberg(pvalues: np.ndarray | list[float]) -> np.ndarray:
    """Benjamini–Hochberg q-values (false-discovery-rate control; ``scipy.stats.false_discovery_control``)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full_like(p, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    if len(idx):
        out[idx] = sps.false_discovery_control(p[idx], method="bh")
    return out


# --- power and seeds needed --------------------------------------------------------------------------------------
def t_test_power(n: int | np.ndarray, dz: float, alpha: float = ALPHA) -> np.ndarray | float:
    """Power of the two-sided paired t-test at level ``alpha`` with n seeds when the true d_z is ``dz``.

    Exact under normal differences: the t statistic is noncentral t with n − 1 degrees of
    freedom and noncentrality d_z·√n (``scipy.stats.nct``).
    """
    n_arr = np.asarray(n, dtype=np.float64)
    if np.any(n_arr < 2):
        raise ValueError(f"n: {n} is not allowed; allowed: at least 2 seeds")
    df = n_arr - 1
    crit = sps.t.isf(alpha / 2, df)
    nc = abs(dz) * np.sqrt(n_arr)
    power = sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc)
    return float(power) if np.ndim(power) == 0 else power


def seeds_needed(sd_diff: float, effect: float, *, alpha: float = ALPHA, power: float = POWER, m: int = 1) -> float:
    """Fewest seeds at which a paired t-test at level α/m detects ``effect`` with probability ``power``.

    The true standardized effect is d_z = effect / sd_diff; the power is the noncentral-t power
    of :func:`t_test_power` (not a normal approximation, which undercounts at few seeds). ``m``
    > 1 uses the Bonferroni level α/m, the strictest step of Holm over m tricks. Returns a whole
    number ≥ 2, ``inf`` when the effect is 0 or more than 100,000 seeds would be needed,
    :data:`MIN_TEST_SEEDS` when there is no noise at all, nan for non-finite input.
    """
    if not 0 < alpha < 1 or not 0 < power < 1 or m < 1:
        raise ValueError(f"alpha={alpha}, power={power}, m={m}; allowed: 0 < alpha < 1, 0 < power < 1, m ≥ 1")
    if not math.isfinite(sd_diff) or not math.isfinite(effect):
        return float("nan")
    if effect == 0:
        return float("inf")
    if sd_diff == 0:
        return float(MIN_TEST_SEEDS)
    return _seeds_for_dz(abs(effect) / abs(sd_diff), alpha / m, power)


def _seeds_for_dz(dz: float, level: float, power: float) -> float:
    if dz <= 0:
        return float("inf")
    if t_test_power(MAX_SEEDS_NEEDED, dz, level) < power:
        return float("inf")
    # the t-test needs a few seeds more than the normal approximation (z_{1−level/2} + z_power)² / d_z²:
    # try the 12 counts from there in one vectorized call, then fall back to a doubling search
    n_z = (sps.norm.isf(level / 2) + sps.norm.ppf(power)) ** 2 / dz**2
    start = max(MIN_TEST_SEEDS, math.floor(n_z))
    counts = np.arange(start, min(start + 12, MAX_SEEDS_NEEDED + 1))
    enough = np.flatnonzero(np.asarray(t_test_power(counts, dz, level)) >= power)
    if len(enough) and (enough[0] > 0 or start == MIN_TEST_SEEDS):
        return float(counts[enough[0]])
    lo, hi = MIN_TEST_SEEDS, MIN_TEST_SEEDS
    while t_test_power(hi, dz, level) < power:  # power grows with n: double, then bisect
        lo, hi = hi, min(2 * hi, MAX_SEEDS_NEEDED)
    if t_test_power(lo, dz, level) >= power:
        return float(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if t_test_power(mid, dz, level) >= power else (mid, hi)
    return float(hi)


def dz_interval(mean: float, sd: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Confidence interval of the true d_z from a sample: inverts the noncentral t of the t statistic.

    With t = mean / (sd/√n) ~ nct(n − 1, d_z·√n), the bounds are the d_z at which t sits at
    the (1 ± confidence)/2 quantiles. Exact under normal differences. (nan, nan) when n < 2 or
    sd = 0.
    """
    if n < 2 or not math.isfinite(sd) or sd <= 0 or not math.isfinite(mean):
        return float("nan"), float("nan")
    t_obs = mean / (sd / math.sqrt(n))
    df, rn = n - 1, math.sqrt(n)
    tail = (1 - confidence) / 2

    def bound(target: float) -> float:  # the d_z with P(T ≤ t_obs) = target; the cdf falls as d_z grows
        f = lambda dz: _nct_cdf(t_obs, df, dz * rn) - target  # noqa: E731
        lo, hi = t_obs / rn - 1.0, t_obs / rn + 1.0
        while f(lo) < 0:
            lo -= 2 * (hi - lo)
        while f(hi) > 0:
            hi += 2 * (hi - lo)
        return float(spo.brentq(f, lo, hi, xtol=1e-10))

    return bound(1 - tail), bound(tail)


def _nct_cdf(t: float, df: float, nc: float) -> float:
    """``scipy.stats.nct.cdf`` with its far tails (where it returns nan) filled in."""
    value = float(sps.nct.cdf(t, df, nc))
    if math.isnan(value):
        value = float(sps.nct.sf(-t, df, -nc))  # T ~ nct(df, nc) ⇔ −T ~ nct(df, −nc)
    if math.isnan(value):
        value = 1.0 if t > nc else 0.0
    return value


def seeds_needed_interval(
    effect: Effect,
    *,
    m: int = 1,
    alpha: float = ALPHA,
    power: float = POWER,
    confidence: float = SEEDS_NEEDED_CONFIDENCE,
) -> tuple[float, float]:
    """Range of seeds a t-test at level α/m needs for ``power``, over the plausible true effect sizes.

    The ``confidence`` interval of |d_z| (from :func:`dz_interval`; 80 % by default, i.e. the
    10th–90th percentile range) is mapped through :func:`seeds_needed`: the low end of the
    range is the seeds needed if the effect is as large as the data allow, the high end if it
    is as small (∞ when |d_z| = 0 is plausible). Returns (nan, nan) when not informative: fewer
    than 2 seeds, no spread, or when even the low end is at most the seeds already used while
    the high end is ∞ (the data neither show the effect nor rule out that it is tiny).
    """
    nan = float("nan")
    if effect.n < 2 or not math.isfinite(effect.sd) or effect.sd == 0:
        return nan, nan
    lo_dz, hi_dz = dz_interval(effect.mean, effect.sd, effect.n, confidence)
    if lo_dz <= 0 <= hi_dz:
        small, large = 0.0, max(abs(lo_dz), abs(hi_dz))
    else:
        small, large = sorted((abs(lo_dz), abs(hi_dz)))
    low = _seeds_for_dz(large, alpha / m, power)
    high = _seeds_for_dz(small, alpha / m, power) if small > 0 else float("inf")
    if low <= effect.n and math.isinf(high):
        return nan, nan
    return low, high


def min_seeds_for_significance(alpha: float = ALPHA, m: int = 1) -> int:
    """Fewest seeds at which the exact sign-flip test (reported beside the t-test) can reach p < α/m.

    Its smallest p is 2/2^n. The verdicts use the t-test, which has no such floor.
    """
    n = 1
    while 2.0 ** (1 - n) >= alpha / m:
        n += 1
    return n


# --- verdicts ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """The verdict on one trick of one task."""

    label: str  # "helps" | "hurts" | "no detectable effect" | "needs more seeds"
    reason: str
    seeds_needed: float  # seeds at the observed d_z (a point guess: print the interval); nan when conclusive
    code: str = ""  # why: one of VERDICT_CODES
    seeds_needed_low: float = float("nan")  # range of seeds needed (see seeds_needed_interval); nan: not informative
    seeds_needed_high: float = float("nan")
    dz_low: float = float("nan")  # the CONFIDENCE interval of d_z the equivalence rule reads
    dz_high: float = float("nan")


VERDICTS = ("helps", "hurts", "no detectable effect", "needs more seeds")
#: reason codes of :class:`Verdict`, for reports that word them their own way
VERDICT_CODES = {
    "significant": "p(Holm) < α and the interval excludes 0",
    "equivalent": "not significant, and the interval of d_z lies within ±MIN_EFFECT_SIZE",
    "no_difference": "every seed gave exactly the same metric with and without the trick",
    "inconclusive": "not significant, and the interval of d_z still allows a practically large effect",
    "too_few_seeds": "fewer seeds than a test needs",
    "disagree": "p(Holm) < α but the interval includes 0 (a p from another test was passed in)",
}


def verdict(
    effect: Effect,
    p_adjusted: float,
    *,
    m: int = 1,
    alpha: float = ALPHA,
    power: float = POWER,
    min_effect_size: float = MIN_EFFECT_SIZE,
) -> Verdict:
    """The verdict rule (stated in every report).

    - **helps / hurts**: p(Holm) < α *and* the interval excludes 0 on the better / worse side
      (with the t-test p and t-interval of :func:`paired_effect` the second follows from the first).
    - **no detectable effect**: otherwise, when the ``CONFIDENCE`` interval of d_z lies within
      ±``min_effect_size`` (or every seed gave exactly the same metric with and without).
    - **needs more seeds**: otherwise; ``code`` says whether there were too few seeds for a
      test (fewer than :data:`MIN_TEST_SEEDS`) or the data are inconclusive, and the
      seeds-needed range of :func:`seeds_needed_interval` (at level α/m) is attached.
    """
    if effect.higher_is_better is None:
        raise ValueError("effect.higher_is_better: None is not allowed for a verdict; allowed: True or False")
    nan = float("nan")
    if not effect.test_possible:
        return Verdict(
            "needs more seeds",
            f"too few seeds for a test: n ≥ {MIN_TEST_SEEDS} needed ({effect.n} usable)",
            float(MIN_TEST_SEEDS),
            "too_few_seeds",
            float(MIN_TEST_SEEDS),
            float("inf"),
        )
    significant = math.isfinite(p_adjusted) and p_adjusted < alpha
    lo, hi = (effect.ci_low, effect.ci_high) if effect.higher_is_better else (-effect.ci_high, -effect.ci_low)
    ci = f"{effect.ci_level:.0%} CI [{effect.ci_low:.3g}, {effect.ci_high:.3g}]"
    if significant and lo > 0:
        return Verdict("helps", f"p(Holm) = {p_adjusted:.3g} < {alpha}; {ci} excludes 0", nan, "significant")
    if significant and hi < 0:
        return Verdict("hurts", f"p(Holm) = {p_adjusted:.3g} < {alpha}; {ci} excludes 0", nan, "significant")
    if effect.sd == 0 and effect.mean == 0:
        return Verdict("no detectable effect", "every seed gave the same metric with and without", nan, "no_difference")
    point = seeds_needed(effect.sd, effect.mean, alpha=alpha, power=power, m=m)
    low, high = seeds_needed_interval(effect, m=m, alpha=alpha, power=power)
    dz_lo, dz_hi = dz_interval(effect.mean, effect.sd, effect.n, effect.ci_level)
    if significant:  # only reachable with a p from another test than the interval's
        why = f"p(Holm) = {p_adjusted:.3g} < {alpha} but the {ci} includes 0: the test and the interval disagree"
        return Verdict("needs more seeds", why, point, "disagree", low, high, dz_lo, dz_hi)
    dz_ci = f"d_z = {effect.dz:.2f} [{dz_lo:.2f}, {dz_hi:.2f}]"
    if math.isfinite(dz_lo) and -min_effect_size < dz_lo and dz_hi < min_effect_size:
        why = f"not significant (p(Holm) = {p_adjusted:.3g}); {dz_ci} lies within ±{min_effect_size}"
        return Verdict("no detectable effect", why, nan, "equivalent", nan, nan, dz_lo, dz_hi)
    why = f"not significant (p(Holm) = {p_adjusted:.3g}); {dz_ci} still allows |d_z| ≥ {min_effect_size}"
    return Verdict("needs more seeds", why, point, "inconclusive", low, high, dz_lo, dz_hi)


# --- designs: which arms make which effect -----------------------------------------------------------------------
@dataclass(frozen=True)
class Term:
    """One estimated effect: per seed, Σ_arm weight·value (a main effect of a trick, or a two-way interaction)."""

    name: str  # "ema" or "ema×accumulation"
    factors: tuple[str, ...]
    weights: dict[str, float]  # arm label -> weight
    aliases: tuple[str, ...] = ()  # other effects with the same contrast (fractional designs)
    on_arms: tuple[str, ...] = ()  # main effects: arms with the trick on / off (for rates and spreads)
    off_arms: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "main" if len(self.factors) == 1 else "interaction"

    @property
    def arms(self) -> tuple[str, ...]:
        return tuple(self.weights)


def _coded(arms: list[tuple[str, tuple[str, ...]]], tricks: list[str]) -> pd.DataFrame:
    """±1 coding of the arms (rows) by trick (columns)."""
    return pd.DataFrame(
        [[1.0 if t in on else -1.0 for t in tricks] for _, on in arms], index=[a for a, _ in arms], columns=tricks
    )


def design_terms(design: str, tricks: list[str], arms: list[tuple[str, tuple[str, ...]]]) -> list[Term]:
    """The main effect of every trick as a per-seed contrast of the design's arms.

    ``arms``: (label, tricks on) as :func:`bench.grid.design_arms` returns them. For fractional
    designs each term lists the two-way interactions it is aliased with.
    """
    labels = {a for a, _ in arms}
    terms = []
    if design == "one_at_a_time":
        for t in tricks:
            if f"+{t}" in labels and "baseline" in labels:
                terms.append(Term(t, (t,), {f"+{t}": 1.0, "baseline": -1.0}, (), (f"+{t}",), ("baseline",)))
        return terms
    if design == "leave_one_out":
        for t in tricks:
            if f"all-{t}" in labels and "all" in labels:
                terms.append(Term(t, (t,), {"all": 1.0, f"all-{t}": -1.0}, (), ("all",), (f"all-{t}",)))
        return terms
    if design in ("full_factorial", "fractional_factorial"):
        return [t for t in _factorial_terms(tricks, arms) if t.kind == "main"]
    raise ValueError(f"design: {design!r} is not allowed; allowed: one_at_a_time, leave_one_out, *_factorial")


def interaction_terms(tricks: list[str], arms: list[tuple[str, tuple[str, ...]]]) -> list[Term]:
    """Two-way interactions of a factorial design that are not aliased with a main effect."""
    return [t for t in _factorial_terms(tricks, arms) if t.kind == "interaction"]


def _factorial_terms(tricks: list[str], arms: list[tuple[str, tuple[str, ...]]]) -> list[Term]:
    """Main effects then two-way interactions, ±1 coded; effects with identical contrasts merged as aliases."""
    x = _coded(arms, tricks)
    n_arms = len(x)
    candidates: list[tuple[tuple[str, ...], np.ndarray]] = [((t,), x[t].to_numpy()) for t in tricks]
    for i, a in enumerate(tricks):
        for b in tricks[i + 1 :]:
            candidates.append(((a, b), (x[a] * x[b]).to_numpy()))
    groups: list[tuple[tuple[str, ...], np.ndarray, list[str]]] = []
    for factors, col in candidates:
        if np.all(col == col[0]):  # aliased with the grand mean: not estimable
            continue
        for _, gcol, aliases in groups:
            if np.array_equal(col, gcol) or np.array_equal(col, -gcol):
                aliases.append(("−" if np.array_equal(col, -gcol) else "") + "×".join(factors))
                break
        else:
            groups.append((factors, col, []))
    terms = []
    for factors, col, aliases in groups:
        weights = {arm: 2.0 * float(c) / n_arms for arm, c in zip(x.index, col)}
        on = tuple(a for a, c in zip(x.index, col) if c > 0) if len(factors) == 1 else ()
        off = tuple(a for a, c in zip(x.index, col) if c < 0) if len(factors) == 1 else ()
        terms.append(Term("×".join(factors), factors, weights, tuple(aliases), on, off))
    return terms


def seed_matrix(runs: pd.DataFrame, column: str, statuses: tuple[str, ...] = ("completed",)) -> pd.DataFrame:
    """Seeds (rows) × arms (columns) of ``column``; nan where the run is missing, not in ``statuses`` or non-finite."""
    if not len(runs) or column not in runs:
        return pd.DataFrame()
    ok = runs[runs["status"].isin(statuses)]
    if not len(ok):
        return pd.DataFrame()
    values = pd.to_numeric(ok[column], errors="coerce").where(lambda v: np.isfinite(v))
    return ok.assign(_v=values).pivot_table(index="seed", columns="arm", values="_v", aggfunc="first", dropna=False)


def term_effect(
    matrix: pd.DataFrame, term: Term, higher_is_better: bool | None, *, transform: str | None = None, **kw: Any
) -> tuple[Effect, list[int]]:
    """The paired effect of ``term`` over the seeds where every arm of the term has a value.

    Returns (effect, seeds used). ``transform="log"`` estimates on log values (cost ratios).
    """
    if not len(matrix) or any(a not in matrix.columns for a in term.arms):
        return paired_effect([], higher_is_better), []
    sub = matrix[list(term.arms)].dropna()
    vals = sub.to_numpy(dtype=np.float64)
    if transform == "log":
        keep = np.all(vals > 0, axis=1)
        sub, vals = sub[keep], np.log(vals[keep])
    d = vals @ np.array([term.weights[a] for a in term.arms])
    return paired_effect(d, higher_is_better, **kw), [int(s) for s in sub.index]


def metric_direction(task_cls: Any, metric: str) -> bool | None:
    """True if higher is better, False if lower is better, None if unknown.

    The task's primary metric uses its declared direction; other metrics use the task's optional
    ``metric_directions`` mapping, then whole words of the name (psnr/accuracy/return: higher;
    mse/loss/error: lower). A wrong direction would mislabel effects, so anything else has none.
    """
    if task_cls is not None and metric == getattr(task_cls, "metric", None):
        return bool(task_cls.higher_is_better)
    declared = getattr(task_cls, "metric_directions", None) or {}
    if metric in declared:
        return bool(declared[metric])
    words = set(metric.lower().split("_"))
    higher, lower = bool(words & _HIGHER_IS_BETTER_WORDS), bool(words & _LOWER_IS_BETTER_WORDS)
    return None if higher == lower else higher


# --- one task of a grid ------------------------------------------------------------------------------------------
NO_PAIRS = "no usable pairs"  # the verdict of a trick without one seed where both sides of its comparison finished
#: how a report colours a verdict (:func:`verdict_class`)
VERDICT_CLASSES = ("helps", "hurts", "no effect", "unclear", "too few seeds", "no data")
#: columns of a task's effects frame (also when it has no rows), before the verdict and cost columns merged in
EFFECT_COLUMNS = [
    "term", "kind", "metric", "aliases", "n", "mean", "ci_low", "ci_high", "ci_method", "ci_level", "p",
    "p_signflip", "sd", "frac_improved", "higher_is_better", "dz", "test_possible", "ci_calibrated", "ci_label",
    "n_excluded_diverged", "seeds", "p_holm", "q_bh",
]  # fmt: skip
#: per trick, merged into the effects rows of its main term (effects.csv): verdict on the primary metric
VERDICT_COLUMNS = ["verdict", "verdict_code", "seeds_needed_low", "seeds_needed_high", "base_mean", "effect_pct",
                   "effect_pct_low", "effect_pct_high", "dz_low", "dz_high"]  # fmt: skip
#: per trick, merged into every effects row of its main term: cost ratios on / off
COST_COLUMNS = ["time_ratio", "time_low", "time_high", "memory_ratio", "memory_low", "memory_high",
                "memory_approximate"]  # fmt: skip


def verdict_class(label: str, code: str = "") -> str:
    """The colour class of a verdict in a report: one of :data:`VERDICT_CLASSES`.

    helps / hurts; "no effect" (an equivalence claim); "too few seeds" (no test was possible);
    "no data" (no usable pair); "unclear" (a test was possible and is inconclusive).
    """
    if label in ("helps", "hurts"):
        return label
    if label == "no detectable effect":
        return "no effect"
    if label == NO_PAIRS:
        return "no data"
    if code == "too_few_seeds":
        return "too few seeds"
    return "unclear"


@dataclass
class TaskStats:
    """Everything the report says about one task of a grid (frames are empty when nothing finished)."""

    label: str
    task: str
    design: str
    tricks: list[str]
    arms: list[tuple[str, tuple[str, ...]]]
    reference_arm: str  # "" when the design has none (a fractional design without the all-off arm)
    metric: str  # primary
    higher_is_better: bool
    seeds: list[int]
    arm_summary: pd.DataFrame  # one row per arm: counts by status, mean/std of every metric, paired cost vs reference
    effects: pd.DataFrame  # one row per term × metric (+ the trick's verdict and cost on its main-effect rows)
    verdicts: pd.DataFrame  # one row per trick (primary metric, divergence, cost)
    stability: pd.DataFrame  # one row per trick
    cost: pd.DataFrame  # one row per trick
    interactions: pd.DataFrame  # factorial designs: one row per two-way term (primary metric)
    fraction: int = 0  # p of a 2^(k−p) design
    resolution: int | None = None
    defining_relation: list[str] = field(default_factory=list)  # generators: "d = a·b·c"
    defining_words: list[str] = field(default_factory=list)  # every word of the defining relation: "I = a·b·c·d"
    word_length_pattern: tuple[int, ...] = ()  # (A_3, A_4, ...): words of length 3, 4, ...
    alias_structure: list[str] = field(default_factory=list)  # "a×b = c×d": aliased main effects / 2-factor terms
    notes: list[str] = field(default_factory=list)
    #: every metric column this task's runs report (primary first) -> higher is better (None: no direction)
    metric_directions: dict[str, bool | None] = field(default_factory=dict)
    code_versions: dict[str, int] = field(default_factory=dict)  # code part -> versions among its runs (if > 1)
    stale_runs: int = 0  # finished runs analysed that today's code would not reproduce
    stale_parts: list[str] = field(default_factory=list)  # which parts of the code changed since they trained
    memory_approximate: bool = True  # some run's peak memory is a CPU reading (sampled), not an allocator peak

    @property
    def baseline_only(self) -> bool:
        """A block without tricks: one arm, nothing to compare (its runs are still summarised)."""
        return not self.tricks

    @property
    def usable_pairs(self) -> int:
        """Seeds behind the best-covered trick's verdict (0: no trick has a pair of finished runs)."""
        return int(self.verdicts["n"].max()) if len(self.verdicts) else 0

    @property
    def code_mixed(self) -> bool:
        """The runs compared were trained by different code, or by code other than today's."""
        return bool(self.code_versions) or self.stale_runs > 0


def _metric_columns(runs: pd.DataFrame, primary: str | None = None) -> list[str]:
    """The task's own metric columns: those with a finite value in one of *its* completed runs (a grid's
    frame has the union of every task's columns), ``raw_*`` left out; ``primary`` first, always present."""
    done = runs[runs["status"] == store.RunStatus.COMPLETED] if len(runs) and "status" in runs else runs
    cols = []
    for c in sorted(runs.columns):
        if not c.startswith("metric.") or c.startswith("metric.raw_") or c == primary:
            continue
        values = pd.to_numeric(done[c], errors="coerce") if len(done) else pd.Series(dtype=float)
        if np.isfinite(values.to_numpy(dtype=np.float64)).any():
            cols.append(c)
    return ([primary] if primary else []) + cols


def _direction_of(name: str, metric: str, higher_is_better: bool, declared: dict[str, Any]) -> bool | None:
    """Direction of metric ``name``: the primary's, then the task's declared ``metric_directions``, then words."""
    if name == metric:
        return bool(higher_is_better)
    if name in declared and declared[name] is not None:
        return bool(declared[name])
    return metric_direction(None, name)


def _code_of_runs(runs: pd.DataFrame) -> tuple[dict[str, int], int, list[str]]:
    """(code part -> versions among the finished runs in ``runs``, for parts with more than one; stale runs;
    the parts today's code changed for them).

    A part is the loop, the task or one trick (``bench.fingerprint``): runs of different arms differ in the
    tricks they import, which is no mixing; two digests of the *same* part are. Reads the ``code_parts``
    column (:func:`analyze_grid` adds it from each run's config.json) and load_grid's ``stale`` columns.
    """
    if not len(runs) or "status" not in runs:
        return {}, 0, []
    done = runs[runs["status"].isin(store.RunStatus.FINISHED)]
    seen: dict[str, set[str]] = {}
    if "code_parts" in done:
        for parts in done["code_parts"]:
            for part, digest in (parts if isinstance(parts, dict) else {}).items():
                seen.setdefault(part, set()).add(digest)
    versions = {part: len(d) for part, d in sorted(seen.items()) if len(d) > 1}
    stale, changed = 0, []
    if "stale" in done:
        mask = done["stale"].fillna(False).astype(bool)
        stale = int(mask.sum())
        if "stale_parts" in done:
            for text in done.loc[mask, "stale_parts"].fillna("").astype(str):
                changed += [p for p in text.split("; ") if p and p not in changed]
    return versions, stale, changed


def code_parts(fingerprint: Any) -> dict[str, str]:
    """``{"loop": digest, "task": digest, "trick <name>": digest}`` of a run's recorded fingerprint ({} if none)."""
    if not isinstance(fingerprint, dict):
        return {}
    out = {"loop": str(fingerprint.get("loop"))}
    task = fingerprint.get("task")
    if isinstance(task, dict):
        out["task"] = str(task.get("digest"))
    for name, part in (fingerprint.get("tricks") or {}).items():
        if isinstance(part, dict):
            out[f"trick {name}"] = str(part.get("digest"))
    return out


def _code_parts_of(gdir: Path, runs: pd.DataFrame) -> list[dict[str, str]]:
    """:func:`code_parts` of every run of ``runs`` from its config.json (verified by load_grid already)."""
    out = []
    for rid in runs["run_id"]:
        try:
            meta = store.read_json(Path(gdir) / "runs" / str(rid) / store.CONFIG)
        except (OSError, ValueError):
            meta = {}
        out.append(code_parts(meta.get("fingerprint") if isinstance(meta, dict) else None))
    return out


def _status_counts(runs: pd.DataFrame, arms: tuple[str, ...]) -> str:
    """ "3 completed, 2 failed" over the runs of ``arms`` (or "no runs")."""
    if not len(runs) or "arm" not in runs:
        return "no runs"
    counts = runs[runs["arm"].isin(arms)]["status"].value_counts()
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs"


def analyze_task(
    runs: pd.DataFrame,
    *,
    label: str,
    task: str,
    design: str,
    tricks: list[str],
    fraction: int = 0,
    metric: str,
    higher_is_better: bool,
    task_cls: Any = None,
    metric_directions: dict[str, bool] | None = None,
    seeds: list[int] | None = None,
    n_resamples: int = N_RESAMPLES,
) -> TaskStats:
    """All statistics of one task from its runs (rows of :func:`bench.store.load_grid` for this task).

    Directions of secondary metrics: ``metric_directions`` (as the runs recorded it in result.json), else
    the task class's, else whole words of the name (:func:`metric_direction`). Only the metrics this
    task's runs report are analysed. Effects are of completed runs, paired by seed: a seed counts for a
    trick only when every run of its comparison completed.
    """
    from bench.designs import fractional_design
    from bench.grid import design_arms

    arms = design_arms(design, tricks, fraction)
    labels = [a for a, _ in arms]
    reference = "all" if design == "leave_one_out" and tricks else "baseline"
    if reference not in labels:
        reference = ""  # a fractional design may have no all-off arm
    terms = design_terms(design, tricks, arms)
    inter = interaction_terms(tricks, arms) if design.endswith("factorial") and len(tricks) >= 2 else []
    kw = {"n_resamples": n_resamples}
    notes: list[str] = []
    resolution, relation, words, wlp, alias_lines = None, [], [], (), []
    if design == "fractional_factorial" and tricks:
        fd = fractional_design(len(tricks), fraction)
        resolution, relation, words = fd.resolution, fd.generator_labels(tricks), fd.word_labels(tricks)
        wlp, alias_lines = fd.wlp[2:], fd.alias_labels(tricks)
    runs = runs if len(runs) else pd.DataFrame(columns=["run_id", "arm", "seed", "status"])
    primary = f"metric.{metric}"
    metric_cols = _metric_columns(runs, primary)
    declared = dict(getattr(task_cls, "metric_directions", None) or {}) | dict(metric_directions or {})
    directions: dict[str, bool | None] = {
        c: _direction_of(c.removeprefix("metric."), metric, higher_is_better, declared) for c in metric_cols
    }
    metric_dirs = dict(directions)
    if "stability.best_metric" in runs:
        directions["stability.best_metric"] = higher_is_better
    directions |= {c: d for c, d in STABILITY_METRICS.items() if c in runs}

    # effects of every term on every metric (completed runs only: a diverged side has no metric)
    div = seed_matrix(runs, "stability.diverged", (store.RunStatus.COMPLETED, store.RunStatus.DIVERGED))
    rows = []
    primary_effects: dict[str, tuple[Effect, int, float]] = {}
    for col, hib in directions.items():
        mat = seed_matrix(runs, col)
        # interactions of the task's metrics only: stability columns get main effects
        for term in terms + (inter if col.startswith("metric.") else []):
            eff, used = term_effect(mat, term, hib, **kw)
            excluded = _diverged_blocks(div, term, used)
            if col == primary and term.kind == "main":
                base = float(mat.loc[used, list(term.off_arms)].to_numpy().mean()) if used else float("nan")
                primary_effects[term.name] = (eff, excluded, base)
            rows.append(
                {"term": term.name, "kind": term.kind, "metric": col, "aliases": ", ".join(term.aliases)}
                | eff.as_dict()
                | {"n_excluded_diverged": excluded, "seeds": used}
            )
    effects = pd.DataFrame(rows) if rows else pd.DataFrame(columns=EFFECT_COLUMNS[:-2])
    effects["p_holm"] = np.nan
    effects["q_bh"] = np.nan
    for _, idx in effects.groupby(["metric", "kind"]).groups.items() if len(effects) else []:
        effects.loc[idx, "p_holm"] = holm(effects.loc[idx, "p"].to_numpy(dtype=np.float64))
        effects.loc[idx, "q_bh"] = benjamini_hochberg(effects.loc[idx, "p"].to_numpy(dtype=np.float64))

    stability = _stability(runs, terms, primary, div, kw)
    memory_approximate = _memory_approximate(runs)
    cost = _cost(runs, terms, kw, memory_approximate)
    p_holm: dict[str, float] = {}
    if len(effects):
        sel = effects[(effects["metric"] == primary) & (effects["kind"] == "main")]
        p_holm = dict(zip(sel["term"], sel["p_holm"]))
    verdicts = _verdicts(primary_effects, p_holm, stability, cost, terms, higher_is_better, runs)
    effects = _with_verdicts_and_cost(effects, verdicts, cost, primary)
    interactions = effects[(effects["kind"] == "interaction") & (effects["metric"] == primary)] if inter else None
    if any(t.aliases for t in terms):
        notes.append(
            "Resolution III: main effects are aliased with two-way interactions (listed); a main effect "
            "estimate is the sum of the aliased effects."
        )
    codes, stale, parts = _code_of_runs(runs)
    return TaskStats(
        label=label,
        task=task,
        design=design,
        tricks=list(tricks),
        arms=arms,
        reference_arm=reference,
        metric=metric,
        higher_is_better=higher_is_better,
        seeds=list(seeds) if seeds is not None else sorted(int(s) for s in runs["seed"].unique()),
        arm_summary=_arm_summary(runs, arms, metric_cols, reference, kw),
        effects=effects,
        verdicts=verdicts,
        stability=stability,
        cost=cost,
        interactions=interactions.reset_index(drop=True) if interactions is not None else pd.DataFrame(),
        fraction=fraction,
        resolution=resolution,
        defining_relation=relation,
        defining_words=words,
        word_length_pattern=wlp,
        alias_structure=alias_lines,
        notes=notes,
        metric_directions=metric_dirs,
        code_versions=codes,
        stale_runs=stale,
        stale_parts=parts,
        memory_approximate=memory_approximate,
    )


def _with_verdicts_and_cost(
    effects: pd.DataFrame, verdicts: pd.DataFrame, cost: pd.DataFrame, primary: str
) -> pd.DataFrame:
    """The effects frame with each trick's verdict (on its primary-metric row) and cost (on its main rows)."""
    out = effects.copy()
    for col in VERDICT_COLUMNS + COST_COLUMNS:
        out[col] = pd.Series([None] * len(out), index=out.index, dtype=object)
    if not len(out):
        return out
    main = out["kind"] == "main"
    v = verdicts.set_index("term") if len(verdicts) else pd.DataFrame()
    c = cost.set_index("term") if len(cost) else pd.DataFrame()
    for idx in out.index[main]:
        term = out.at[idx, "term"]
        if term in c.index:
            for col in COST_COLUMNS:
                out.at[idx, col] = c.at[term, col]
        if out.at[idx, "metric"] == primary and term in v.index:
            for col in VERDICT_COLUMNS:
                out.at[idx, col] = v.at[term, "code" if col == "verdict_code" else col]
    return out


def _diverged_blocks(div: pd.DataFrame, term: Term, used: list[int]) -> int:
    """Seeds left out of a term's effect because one of its runs diverged."""
    if not len(div) or any(a not in div.columns for a in term.arms):
        return 0
    sub = div[list(term.arms)]
    return int(((sub == 1).any(axis=1) & ~sub.index.isin(used)).sum())


def _stability(runs: pd.DataFrame, terms: list[Term], primary: str, div: pd.DataFrame, kw: dict) -> pd.DataFrame:
    """Per trick: across-seed spread ratio of the primary metric, divergence and loss-spike rates on vs off."""
    metric = seed_matrix(runs, primary)
    spikes = seed_matrix(runs, "stability.loss_spikes")
    rows = []
    for term in terms:
        row: dict[str, Any] = {"term": term.name}
        on, off = list(term.on_arms), list(term.off_arms)
        if len(metric) and all(a in metric.columns for a in on + off):
            sub = metric[on + off].dropna()
            sr = spread_ratio(sub[on].to_numpy(), sub[off].to_numpy())
            row |= {"spread_ratio": sr.ratio, "spread_low": sr.low, "spread_high": sr.high, "spread_n": sr.n}
            row |= {"spread_p": sr.p, "spread_changed": sr.changed, "spread_method": sr.label}
        for name, mat in (("diverged", div), ("spikes", spikes)):
            if not len(mat) or any(a not in mat.columns for a in on + off):
                continue
            sub = mat[on + off].dropna()
            # rates: mean per run over the seeds where every arm of the contrast finished
            row[f"{name}_on"] = float(sub[on].to_numpy().mean()) if len(sub) else np.nan
            row[f"{name}_off"] = float(sub[off].to_numpy().mean()) if len(sub) else np.nan
            row[f"{name}_total_on"] = int(sub[on].to_numpy().sum())
            row[f"{name}_total_off"] = int(sub[off].to_numpy().sum())
            row[f"{name}_n"] = len(sub)
            eff, _ = term_effect(mat, term, False, **kw)
            row |= {f"{name}_diff": eff.mean, f"{name}_low": eff.ci_low, f"{name}_high": eff.ci_high}
            row[f"{name}_p"] = eff.p_signflip  # exact for 0/1 indicators and counts under no effect
        rows.append(row)
    out = pd.DataFrame(rows)
    if "diverged_p" in out:
        out["diverged_p_holm"] = holm(out["diverged_p"].to_numpy())
    return out


#: the cost columns of result.json that cost ratios are taken of
COST_METRICS = {"time": "cost.train_s_per_sample", "memory": "cost.peak_mem_mb_per_sample"}


def _memory_approximate(runs: pd.DataFrame) -> bool:
    """True unless every finished run measured its peak memory with the CUDA allocator (exact peaks).

    On CPU the peak is sampled growth of the process's heap: comparable between runs of the same
    process history only approximately, so it is labelled approximate and never used in a verdict.
    """
    if not len(runs) or "cost.device" not in runs:
        return True
    done = runs[runs["status"].isin(store.RunStatus.FINISHED)]
    devices = done["cost.device"].dropna().astype(str)
    return not len(devices) or not devices.str.startswith("cuda").all()


def cost_matrices(runs: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Seeds × arms of train time per sample and peak memory per sample (finished runs; tiny memory readings,
    below :data:`MIN_MEASURED_MEMORY_MB`, are noise and left out). The one input of every cost ratio."""
    finished = (store.RunStatus.COMPLETED, store.RunStatus.DIVERGED)
    out = {name: seed_matrix(runs, col, finished) for name, col in COST_METRICS.items()}
    if len(out["memory"]):
        out["memory"] = out["memory"].where(seed_matrix(runs, "cost.peak_mem_mb", finished) >= MIN_MEASURED_MEMORY_MB)
    return out


def paired_ratio(matrix: pd.DataFrame, term: Term, **kw: Any) -> dict[str, float]:
    """THE cost ratio of every table: per seed, cost with the trick on / off (the same seed's runs, which the
    executors run next to each other in time), geometric mean over seeds, and the t-interval of the mean log
    ratio exponentiated. Returns ratio, low, high, n (nan without a pair)."""
    eff, _ = term_effect(matrix, term, False, transform="log", **kw)
    return {
        "ratio": math.exp(eff.mean) if eff.n else np.nan,
        "low": math.exp(eff.ci_low) if math.isfinite(eff.ci_low) else np.nan,
        "high": math.exp(eff.ci_high) if math.isfinite(eff.ci_high) else np.nan,
        "n": eff.n,
    }


def _cost(runs: pd.DataFrame, terms: list[Term], kw: dict, memory_approximate: bool = True) -> pd.DataFrame:
    """Per trick: train time and peak memory per sample, on / off (:func:`paired_ratio`)."""
    mats = cost_matrices(runs)
    rows = []
    for term in terms:
        row: dict[str, Any] = {"term": term.name}
        for name, mat in mats.items():
            r = paired_ratio(mat, term, **kw)
            row |= {f"{name}_ratio": r["ratio"], f"{name}_low": r["low"], f"{name}_high": r["high"]}
            row[f"{name}_n"] = r["n"]
        row["memory_approximate"] = memory_approximate
        row["ci_method"] = COST_CI_LABEL
        rows.append(row)
    columns = ["term"] + [f"{n}_{x}" for n in COST_METRICS for x in ("ratio", "low", "high", "n")]
    return pd.DataFrame(rows, columns=[*columns, "memory_approximate", "ci_method"])


def _verdicts(
    primary_effects: dict[str, tuple[Effect, int, float]],
    p_holm: dict[str, float],
    stability: pd.DataFrame,
    cost: pd.DataFrame,
    terms: list[Term],
    higher_is_better: bool,
    runs: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One verdict per trick from its primary-metric main effect; a significant divergence change overrides.

    A trick without a single seed where every run of its comparison completed gets :data:`NO_PAIRS`
    (with the runs' states), never a verdict.
    """
    nan = float("nan")
    rows = []
    for term in terms:
        eff, excluded, base = primary_effects.get(term.name, (paired_effect([], higher_is_better), 0, nan))
        p_adj = float(p_holm.get(term.name, nan))
        v = verdict(eff, p_adj, m=len(terms))
        label, reason, code = v.label, v.reason, v.code
        if eff.n == 0:
            label, code = NO_PAIRS, "no_pairs"
            reason = (
                f"no usable pair: every seed has a diverged run ({excluded} seed(s))"
                if excluded
                else "no seed where both runs of the comparison completed "
                f"({_status_counts(runs, term.arms) if runs is not None else 'no runs'})"
            )
        elif not eff.test_possible and excluded:
            reason = (
                f"too few seeds for a test: n ≥ {MIN_TEST_SEEDS} needed ({eff.n} usable seed(s): "
                f"{excluded} left out because a run diverged)"
            )
        own = True  # the metric's verdict stands (not overridden by divergence)
        st = stability[stability["term"] == term.name].iloc[0] if len(stability) else None
        if st is not None and "diverged_p_holm" in st and math.isfinite(st["diverged_p_holm"]):
            lo, hi = st["diverged_low"], st["diverged_high"]
            if st["diverged_p_holm"] < ALPHA and math.isfinite(lo) and (lo > 0 or hi < 0):
                more = lo > 0
                own = False
                metric_alone = label
                label = "hurts" if more else "helps"
                reason = (
                    f"{'more' if more else 'fewer'} diverged runs with the trick "
                    f"({st['diverged_total_on']} vs {st['diverged_total_off']}; p(Holm) = {st['diverged_p_holm']:.3g})"
                    + (f"; metric alone: {metric_alone}" if metric_alone != label else "")
                )
        c = cost[cost["term"] == term.name].iloc[0] if len(cost) else None
        dz_lo, dz_hi = dz_interval(eff.mean, eff.sd, eff.n) if eff.n >= 2 else (nan, nan)
        scale = abs(base) if math.isfinite(base) and base != 0 else nan
        mine = runs[runs["arm"].isin(term.arms)] if runs is not None and len(runs) else None
        codes, stale, _ = _code_of_runs(mine) if mine is not None else ({}, 0, [])
        rows.append(
            {
                "term": term.name,
                "verdict": label,
                "reason": reason,
                "code": code if own else "diverged",
                "verdict_class": verdict_class(label, code if own else "diverged"),
                "test_possible": eff.test_possible,
                "seeds_needed": v.seeds_needed if own and eff.n else nan,
                "seeds_needed_low": v.seeds_needed_low if own and eff.n else nan,
                "seeds_needed_high": v.seeds_needed_high if own and eff.n else nan,
                "n": eff.n,
                "n_excluded_diverged": excluded,
                "mean": eff.mean,
                "ci_low": eff.ci_low,
                "ci_high": eff.ci_high,
                "ci_method": eff.ci_method,
                "ci_level": eff.ci_level,
                "ci_label": eff.ci_label,
                "ci_calibrated": eff.ci_calibrated,
                "ci_reliable": eff.ci_reliable,
                "base_mean": base,
                "effect_pct": 100 * eff.mean / scale,
                "effect_pct_low": 100 * eff.ci_low / scale,
                "effect_pct_high": 100 * eff.ci_high / scale,
                "dz": eff.dz,
                "dz_low": dz_lo,
                "dz_high": dz_hi,
                "p": eff.p,
                "p_signflip": eff.p_signflip,
                "p_holm": p_adj,
                "frac_improved": eff.frac_improved,
                "time_ratio": c["time_ratio"] if c is not None else nan,
                "time_low": c["time_low"] if c is not None else nan,
                "time_high": c["time_high"] if c is not None else nan,
                "memory_ratio": c["memory_ratio"] if c is not None else nan,
                "memory_low": c["memory_low"] if c is not None else nan,
                "memory_high": c["memory_high"] if c is not None else nan,
                "memory_approximate": bool(c["memory_approximate"]) if c is not None else True,
                "code_mixed": bool(codes) or stale > 0,
                "aliases": ", ".join(term.aliases),
            }
        )
    return pd.DataFrame(rows, columns=_VERDICT_FRAME_COLUMNS) if not rows else pd.DataFrame(rows)


_VERDICT_FRAME_COLUMNS = [
    "term", "verdict", "reason", "code", "verdict_class", "test_possible", "seeds_needed", "seeds_needed_low",
    "seeds_needed_high", "n", "n_excluded_diverged", "mean", "ci_low", "ci_high", "ci_method", "ci_level", "ci_label",
    "ci_calibrated", "ci_reliable", "base_mean", "effect_pct", "effect_pct_low", "effect_pct_high", "dz", "dz_low",
    "dz_high", "p", "p_signflip", "p_holm", "frac_improved", "time_ratio", "time_low", "time_high", "memory_ratio",
    "memory_low", "memory_high", "memory_approximate", "code_mixed", "aliases",
]  # fmt: skip


def _arm_summary(
    runs: pd.DataFrame,
    arms: list[tuple[str, tuple[str, ...]]],
    metric_cols: list[str],
    reference: str = "",
    kw: dict | None = None,
) -> pd.DataFrame:
    """One row per arm: runs by status, mean/std of each metric over completed runs, and the arm's cost
    relative to the reference arm of the same seeds (:func:`paired_ratio`, the definition every table uses)."""
    mats = cost_matrices(runs)
    rows = []
    for arm, on in arms:
        df = runs[runs["arm"] == arm] if len(runs) else runs
        done = df[df["status"] == store.RunStatus.COMPLETED]
        row: dict[str, Any] = {
            "arm": arm,
            "tricks_on": "+".join(on),
            "runs": len(df),
            "completed": len(done),
            "diverged": int((df["status"] == store.RunStatus.DIVERGED).sum()),
            "other": int((~df["status"].isin([store.RunStatus.COMPLETED, store.RunStatus.DIVERGED])).sum()),
        }
        for col in [*metric_cols, "cost.train_s", "cost.train_s_per_sample", "cost.peak_mem_mb"]:
            vals = pd.to_numeric(done[col], errors="coerce") if col in done else pd.Series(dtype=float)
            vals = vals[np.isfinite(vals)]
            row[f"{col}.mean"] = float(vals.mean()) if len(vals) else np.nan
            row[f"{col}.std"] = float(vals.std(ddof=1)) if len(vals) > 1 else np.nan
        for name, mat in mats.items():
            if reference and arm != reference:
                r = paired_ratio(mat, Term(arm, (arm,), {arm: 1.0, reference: -1.0}), **(kw or {}))
            else:
                r = {"ratio": np.nan, "low": np.nan, "high": np.nan, "n": 0}
            row |= {f"{name}_ratio": r["ratio"], f"{name}_low": r["low"], f"{name}_high": r["high"]}
            row[f"{name}_n"] = r["n"]
        rows.append(row)
    return pd.DataFrame(rows)


# --- a whole grid ------------------------------------------------------------------------------------------------
@dataclass
class GridStats:
    """The statistics of every task of a launched grid."""

    grid: str
    description: str
    design: str
    seeds: list[int]
    n_cells: int
    status_counts: dict[str, int]
    tasks: list[TaskStats]
    run_ids: set[str] = field(default_factory=set)  # the runs of the current spec (older versions' runs excluded)
    damaged: dict[str, str] = field(default_factory=dict)  # run_id -> "task / arm / seed s: why" (left out)
    runs: pd.DataFrame = field(default_factory=pd.DataFrame)  # load_grid rows of the current spec's runs
    out_of_spec: int = 0  # runs in the folder that the spec as last launched does not have (in_spec False)

    @property
    def usable_pairs(self) -> bool:
        """Some trick of some task has a seed where both sides of its comparison completed."""
        return any(ts.usable_pairs for ts in self.tasks)

    @property
    def code_mixed(self) -> bool:
        return any(ts.code_mixed for ts in self.tasks)


def _task_class(name: str, *, import_ok: bool = True) -> Any:
    """The registered task class ``name``; with ``import_ok=False`` only if the registry is already imported
    (the report of a finished grid reads directions from result.json and imports no task module)."""
    import sys

    if not import_ok and "experiments.registry" not in sys.modules:
        return None
    from experiments.registry import get_task

    try:
        return get_task(name)
    except (KeyError, ImportError):
        return None


def _direction_from_results(gdir: Path, run_ids: list[str]) -> tuple[str, bool, dict[str, bool] | None] | None:
    """(primary metric, higher_is_better, metric_directions or None) as the runs' result.json recorded them."""
    for rid in run_ids:
        path = Path(gdir) / "runs" / rid / store.RESULT
        if store.run_status(path.parent) in store.RunStatus.FINISHED:  # verified: never a damaged file
            res = store.read_json(path)
            if "primary_metric" in res and "higher_is_better" in res:
                dirs = res.get("metric_directions")
                dirs = {str(k): bool(v) for k, v in dirs.items()} if isinstance(dirs, dict) else None
                return res["primary_metric"], bool(res["higher_is_better"]), dirs
    return None


def analyze_grid(gdir: Path, *, n_resamples: int = N_RESAMPLES) -> GridStats:
    """Load a launched grid from its folder and compute :class:`TaskStats` for each of its tasks.

    Only the runs of the spec as last launched are analysed (``in_spec``); the others are counted in
    ``out_of_spec``. Metric directions come from the runs' result.json: a finished grid is analysed
    without importing any task module (or torch); the task class is asked only when no run finished.
    """
    from bench.runner import grid_cells

    gdir = Path(gdir)
    spec, cells = grid_cells(gdir)
    ids = {c.run_id for c in cells}
    everything = store.load_grid(gdir)
    runs = everything[everything["run_id"].isin(ids)] if len(everything) else everything
    if len(runs):
        runs = runs.assign(code_parts=_code_parts_of(gdir, runs))
    out_of_spec = int((~everything["run_id"].isin(ids)).sum()) if len(everything) else 0
    checks = {c.run_id: store.check_run(gdir / "runs" / c.run_id, deep=True) for c in cells}
    counts: dict[str, int] = {}
    for check in checks.values():
        counts[check.status] = counts.get(check.status, 0) + 1
    damaged = {
        c.run_id: f"{c.task} / {c.arm} / seed {c.seed}: {checks[c.run_id].reason}"
        for c in cells
        if checks[c.run_id].status == store.RunStatus.DAMAGED
    }
    tasks = []
    for t in spec.tasks:
        tr = runs[runs["task"] == t.label] if len(runs) else runs
        found = _direction_from_results(gdir, [c.run_id for c in cells if c.task == t.label])
        cls = _task_class(t.task, import_ok=found is None)
        if found is not None:
            metric, hib, declared = found
        elif cls is not None:
            metric, hib, declared = cls.metric, bool(cls.higher_is_better), None
        else:
            continue  # neither the task class nor a finished run says what the metric is
        tasks.append(
            analyze_task(
                tr,
                label=t.label,
                task=t.task,
                design=spec.design,
                tricks=list(t.tricks),
                fraction=spec.fraction,
                metric=metric,
                higher_is_better=hib,
                task_cls=cls,
                metric_directions=declared,
                seeds=list(spec.seeds),
                n_resamples=n_resamples,
            )
        )
    return GridStats(
        grid=spec.grid,
        description=spec.description,
        design=spec.design,
        seeds=list(spec.seeds),
        n_cells=len(cells),
        status_counts=counts,
        tasks=tasks,
        run_ids=ids,
        damaged=damaged,
        runs=runs,
        out_of_spec=out_of_spec,
    )
