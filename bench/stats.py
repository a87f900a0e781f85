"""Statistics of a grid: paired effects, stability, cost, verdicts and factorial interactions.

Called by the reports (``bench/report.py``) once runs are stored; reads only the frames of
``bench.store`` and the grid's stored spec, and never trains anything. The functions near
the top are pure (arrays in, numbers out) and are what the calibration tests exercise; the
ones at the bottom assemble them into one :class:`TaskStats` per task of a grid.

Conventions (written into every report):

- **Effect** of a trick = metric with the trick on − metric with it off, **paired by seed**
  (seed *s* of every arm shares its seed bundle). one_at_a_time: ``+t − baseline``;
  leave_one_out: ``all − all-t``; factorial designs: the per-seed ±1 contrast
  ``(2/N)·Σ_arms x_t·y`` (= mean over arms with t on − mean over arms with t off), which is
  the least-squares main effect with seed as a blocking factor. Two-way interactions use
  ``x_a·x_b``: half the change of a's effect when b is switched on.
- **CI**: bootstrap over seeds of the mean difference (``scipy.stats.bootstrap``, BCa, 10k
  resamples; percentile when BCa is degenerate). Small samples make every bootstrap
  interval too narrow (≈90% actual coverage for a nominal 95% at n = 10, see
  tests/test_stats.py), so the level is *expanded* as Hesterberg (2015, "What teachers
  should know about the bootstrap", The American Statistician 69(4)) recommends: the
  bootstrap is asked for level 1 − 2·Φ(−√(n/(n−1))·t_{n−1,0.975}) (0.983 at n = 10),
  which brings coverage to ≈95% for near-normal differences. No bootstrap interval can be
  wider than the range of the data, which covers the mean with probability ≤ 1 − 2^{1−n}
  (75% at n = 3, 94% at n = 5): intervals from fewer than 6 seeds are flagged.
- **p**: exact paired sign-flip permutation test of the mean difference
  (``scipy.stats.permutation_test``, ``permutation_type="samples"``; Monte Carlo with 10k
  sign patterns beyond 13 seeds), two-sided; **Holm** across the tricks of a task, per
  metric (Benjamini–Hochberg q-values are given beside). The smallest attainable p is
  2/2^n, so a verdict needs ≥ 6 seeds with one trick, more with several.
- **Diverged runs** have no final metric: a pair (or factorial block) with a diverged run
  is excluded from metric effects and counted; divergence is its own outcome (rates and a
  paired test on the 0/1 indicators).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from bench import store

__all__ = [
    "ALPHA",
    "MIN_EFFECT_SIZE",
    "N_RESAMPLES",
    "POWER",
    "Effect",
    "GridStats",
    "TaskStats",
    "Term",
    "Verdict",
    "analyze_grid",
    "analyze_task",
    "benjamini_hochberg",
    "bootstrap_ratio_ci",
    "design_terms",
    "expanded_level",
    "holm",
    "interaction_terms",
    "metric_direction",
    "min_seeds_for_significance",
    "paired_effect",
    "seed_matrix",
    "seeds_needed",
    "term_effect",
    "verdict",
]

ALPHA = 0.05  # significance level of verdicts (after Holm)
CONFIDENCE = 0.95  # level of every interval
POWER = 0.8  # power assumed when saying how many seeds a verdict needs
N_RESAMPLES = 10_000  # bootstrap resamples and Monte Carlo sign patterns
MIN_EFFECT_SIZE = 0.5  # |mean| / sd of the paired differences (Cohen's d_z) that counts as "practically large"
MIN_RELIABLE_CI_SEEDS = 6  # below this no bootstrap interval can reach 95% coverage (1 − 2^{1−n} < 0.95)
STATS_SEED = 20_240_601  # fixed: the same stored runs always give the same numbers
MIN_MEASURED_MEMORY_MB = 1.0  # CPU peaks are sampled RSS growth in pages: smaller readings are noise, not cost

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
    ci_method: str  # "BCa", "percentile", "exact" (all differences equal) or "none" (n < 3)
    ci_level: float  # the level the bootstrap was asked for (expanded above 0.95 for small n)
    p: float  # two-sided sign-flip permutation p-value; nan when n < 2
    p_exact: bool  # all 2^n sign patterns enumerated
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
    def ci_reliable(self) -> bool:
        """False when too few seeds for a bootstrap interval to reach its nominal coverage."""
        return self.n >= MIN_RELIABLE_CI_SEEDS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_stat(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def expanded_level(n: int, confidence: float = CONFIDENCE) -> float:
    """The bootstrap level that gives ≈``confidence`` coverage of a mean from ``n`` values (Hesterberg 2015).

    1 − 2·Φ(−√(n/(n−1))·t_{n−1,(1+c)/2}): the percentile/BCa bootstrap of a mean behaves like a
    z-interval with the biased (÷n) standard deviation; this level turns it into the t-interval's
    width. Tends to ``confidence`` as n grows.
    """
    if n < 2:
        raise ValueError(f"n: {n} is not allowed; allowed: at least 2 values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: {confidence} is not allowed; allowed: 0 < confidence < 1")
    t = sps.t.ppf((1 + confidence) / 2, n - 1)
    return float(1 - 2 * sps.norm.sf(math.sqrt(n / (n - 1)) * t))


def paired_effect(
    diffs: np.ndarray | list[float],
    higher_is_better: bool | None,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    method: str = "BCa",
    expand: bool = True,
    seed: int = STATS_SEED,
) -> Effect:
    """Mean, bootstrap CI, sign-flip permutation p and fraction improved of per-seed differences.

    ``diffs`` are on − off, one per seed, all finite (drop diverged pairs first).
    ``method``: "BCa" (falls back to "percentile" when BCa is degenerate) or "percentile".
    ``expand``: widen the bootstrap level for small n (see :func:`expanded_level`); switch off
    only to study the plain bootstrap. Deterministic in ``seed``.
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if not np.all(np.isfinite(d)):
        raise ValueError(f"diffs: {d.tolist()} has non-finite values; allowed: finite values (exclude diverged pairs)")
    if method not in ("BCa", "percentile"):
        raise ValueError(f"method: {method!r} is not allowed; allowed: 'BCa' or 'percentile'")
    if n_resamples < 100:
        raise ValueError(f"n_resamples: {n_resamples} is not allowed; allowed: at least 100")
    n = len(d)
    nan = float("nan")
    if n == 0:
        return Effect(0, nan, nan, nan, "none", nan, nan, False, nan, nan, higher_is_better)
    mean = float(d.mean())
    if higher_is_better is None:
        frac = nan
    else:
        frac = float(np.mean(d > 0) if higher_is_better else np.mean(d < 0))
    if n == 1:
        return Effect(1, mean, nan, nan, "none", nan, nan, False, nan, frac, higher_is_better)
    sd = float(d.std(ddof=1))
    rng = np.random.default_rng(seed)
    p, exact = _sign_flip_p(d, n_resamples, rng)
    level = min(expanded_level(n, confidence), 1 - 1e-9) if expand else confidence
    if n < 3:  # a bootstrap of 2 values has 3 distinct means: no interval worth printing
        lo = hi = nan
        used = "none"
    elif np.all(d == d[0]):
        lo = hi = mean
        used = "exact"
    else:
        lo, hi, used = _bootstrap_mean_ci(d, level, n_resamples, method, rng)
    return Effect(n, mean, lo, hi, used, level, p, exact, sd, frac, higher_is_better)


def _sign_flip_p(d: np.ndarray, n_resamples: int, rng: np.random.Generator) -> tuple[float, bool]:
    """Two-sided paired permutation p-value of the mean: the null flips the sign of each difference."""
    if np.all(d == 0):
        return 1.0, True
    res = sps.permutation_test(
        (d,),
        _mean_stat,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        alternative="two-sided",
        rng=rng,
    )
    return float(min(1.0, res.pvalue)), bool(2 ** len(d) <= n_resamples)


def _bootstrap_mean_ci(
    d: np.ndarray, level: float, n_resamples: int, method: str, rng: np.random.Generator
) -> tuple[float, float, str]:
    for m in (method, "percentile") if method == "BCa" else (method,):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa on degenerate data warns and returns nan: we fall back
            res = sps.bootstrap(
                (d,),
                _mean_stat,
                n_resamples=n_resamples,
                vectorized=True,
                confidence_level=level,
                method=m,
                rng=rng,
            )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi, m
    return float("nan"), float("nan"), "none"


def bootstrap_ratio_ci(
    on: np.ndarray,
    off: np.ndarray,
    *,
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = STATS_SEED,
) -> tuple[float, float, float]:
    """Across-seed spread ratio sqrt(mean var(on arms) / mean var(off arms)) with a percentile CI.

    ``on``/``off``: seeds × arms matrices of the same seeds (rows paired). The seeds (rows) are
    resampled jointly, keeping the pairing. Returns (ratio, low, high); nan where undefined
    (fewer than 3 seeds, or no spread in the off arms).
    """
    on, off = np.atleast_2d(np.asarray(on, float).T).T, np.atleast_2d(np.asarray(off, float).T).T
    if on.shape[0] != off.shape[0]:
        raise ValueError(f"on/off: {on.shape[0]} and {off.shape[0]} seeds; allowed: the same seeds (paired rows)")
    n = on.shape[0]
    nan = float("nan")
    if n < 2:
        return nan, nan, nan

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        va, vb = a.var(axis=-2, ddof=1).mean(axis=-1), b.var(axis=-2, ddof=1).mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sqrt(va / vb)

    point = float(ratio(on, off))
    if n < 3 or not math.isfinite(point):
        return point, nan, nan
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    boot = ratio(on[idx], off[idx])
    boot = boot[np.isfinite(boot)]  # resamples that drew one seed n times have no spread at all
    if len(boot) < n_resamples // 2:
        return point, nan, nan
    a = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return point, float(lo), float(hi)


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


def seeds_needed(sd_diff: float, effect: float, *, alpha: float = ALPHA, power: float = POWER, m: int = 1) -> float:
    """Seeds for a paired test to detect ``effect`` at noise ``sd_diff``: (z_{1−α/(2m)} + z_{power})²·σ_d²/Δ².

    With m = 1, α = 0.05, power 0.8 this is 7.85·σ_d²/Δ² (the unpaired two-arm version is
    15.7·σ²/Δ² per arm; pairing replaces σ² by σ_d² = 2σ²(1−ρ)). ``m`` > 1 uses the
    Bonferroni level α/m, the strictest step of Holm over m tricks. Returns a whole number of
    seeds (ceil), ``inf`` when the effect is 0, 0 when there is no noise at all.
    """
    if not 0 < alpha < 1 or not 0 < power < 1 or m < 1:
        raise ValueError(f"alpha={alpha}, power={power}, m={m}; allowed: 0 < alpha < 1, 0 < power < 1, m ≥ 1")
    if not math.isfinite(sd_diff) or not math.isfinite(effect):
        return float("nan")
    if effect == 0:
        return float("inf")
    z = sps.norm.ppf(1 - alpha / (2 * m)) + sps.norm.ppf(power)
    return float(math.ceil(z**2 * sd_diff**2 / effect**2))


def min_seeds_for_significance(alpha: float = ALPHA, m: int = 1) -> int:
    """Fewest seeds at which the exact sign-flip test can reach p < α/m at all (smallest p = 2/2^n)."""
    n = 1
    while 2.0 ** (1 - n) >= alpha / m:
        n += 1
    return n


@dataclass(frozen=True)
class Verdict:
    """The verdict on one trick of one task."""

    label: str  # "helps" | "hurts" | "no detectable effect" | "needs more seeds"
    reason: str
    seeds_needed: float  # seeds a conclusive answer would need (nan when the verdict is already conclusive)


VERDICTS = ("helps", "hurts", "no detectable effect", "needs more seeds")


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

    - **helps / hurts**: Holm-adjusted p < α *and* the CI excludes 0 on the better / worse side.
    - **needs more seeds**: otherwise, when the observed effect is practically large relative
      to its noise (|mean| / sd ≥ ``min_effect_size``, i.e. Cohen's d_z ≥ 0.5), or fewer than 2
      seeds were usable; the seeds needed are max(:func:`seeds_needed` at level α/m,
      :func:`min_seeds_for_significance`).
    - **no detectable effect**: otherwise (a small effect relative to the seed noise).
    """
    if effect.higher_is_better is None:
        raise ValueError("effect.higher_is_better: None is not allowed for a verdict; allowed: True or False")
    floor = min_seeds_for_significance(alpha, m)
    if effect.n < 2:
        return Verdict("needs more seeds", f"{effect.n} usable seed(s): no test possible", float(floor))
    significant = math.isfinite(p_adjusted) and p_adjusted < alpha
    lo, hi = (effect.ci_low, effect.ci_high) if effect.higher_is_better else (-effect.ci_high, -effect.ci_low)
    if significant and lo > 0:
        return Verdict("helps", f"p(Holm) = {p_adjusted:.3g} < {alpha}, CI excludes 0 on the better side", float("nan"))
    if significant and hi < 0:
        return Verdict("hurts", f"p(Holm) = {p_adjusted:.3g} < {alpha}, CI excludes 0 on the worse side", float("nan"))
    if effect.mean == 0:
        return Verdict("no detectable effect", "every seed gave the same metric with and without", float("inf"))
    size = abs(effect.mean) / effect.sd if effect.sd > 0 else float("inf")
    needed = max(seeds_needed(effect.sd, effect.mean, alpha=alpha, power=power, m=m), floor)
    if size >= min_effect_size:
        why = "not significant" if effect.n >= floor else f"{effect.n} seeds cannot reach p < {alpha / m:.3g}"
        return Verdict("needs more seeds", f"{why}; effect/noise d_z = {size:.2f} ≥ {min_effect_size}", needed)
    return Verdict(
        "no detectable effect", f"not significant; effect/noise d_z = {size:.2f} < {min_effect_size}", needed
    )


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
    arm_summary: pd.DataFrame  # one row per arm: counts by status, mean/std of every metric, cost
    effects: pd.DataFrame  # one row per term × metric
    verdicts: pd.DataFrame  # one row per trick (primary metric, divergence, cost)
    stability: pd.DataFrame  # one row per trick
    cost: pd.DataFrame  # one row per trick
    interactions: pd.DataFrame  # factorial designs: one row per two-way term (primary metric)
    fraction: int = 0  # p of a 2^(k−p) design
    resolution: int | None = None
    defining_relation: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    return sorted(c for c in runs.columns if c.startswith("metric.") and not c.startswith("metric.raw_"))


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
    seeds: list[int] | None = None,
    n_resamples: int = N_RESAMPLES,
) -> TaskStats:
    """All statistics of one task from its runs (rows of :func:`bench.store.load_grid` for this task)."""
    from bench.grid import design_arms, fractional_design

    arms = design_arms(design, tricks, fraction)
    labels = [a for a, _ in arms]
    reference = "all" if design == "leave_one_out" and tricks else "baseline"
    if reference not in labels:
        reference = ""  # a fractional design may have no all-off arm
    terms = design_terms(design, tricks, arms)
    inter = interaction_terms(tricks, arms) if design.endswith("factorial") and len(tricks) >= 2 else []
    kw = {"n_resamples": n_resamples}
    notes: list[str] = []
    resolution, relation = None, []
    if design == "fractional_factorial" and tricks:
        _, generators, resolution = fractional_design(len(tricks), fraction)
        base = len(tricks) - fraction
        relation = [f"{tricks[base + j]} = " + "·".join(tricks[i] for i in word) for j, word in enumerate(generators)]
    runs = runs if len(runs) else pd.DataFrame(columns=["run_id", "arm", "seed", "status"])
    primary = f"metric.{metric}"
    metric_cols = _metric_columns(runs)
    if primary in metric_cols:
        metric_cols.remove(primary)
        metric_cols.insert(0, primary)
    directions = {c: metric_direction(task_cls, c.removeprefix("metric.")) for c in metric_cols}
    directions[primary] = higher_is_better
    if "stability.best_metric" in runs:
        directions["stability.best_metric"] = higher_is_better
    directions |= {c: d for c, d in STABILITY_METRICS.items() if c in runs}

    # effects of every term on every metric (completed runs only: a diverged side has no metric)
    div = seed_matrix(runs, "stability.diverged", (store.RunStatus.COMPLETED, store.RunStatus.DIVERGED))
    rows = []
    primary_effects: dict[str, tuple[Effect, int]] = {}
    for col, hib in directions.items():
        mat = seed_matrix(runs, col)
        # interactions of the task's metrics only: stability columns get main effects
        for term in terms + (inter if col.startswith("metric.") else []):
            eff, used = term_effect(mat, term, hib, **kw)
            excluded = _diverged_blocks(div, term, used)
            if col == primary:
                primary_effects[term.name] = (eff, excluded)
            rows.append(
                {"term": term.name, "kind": term.kind, "metric": col, "aliases": ", ".join(term.aliases)}
                | eff.as_dict()
                | {"n_excluded_diverged": excluded, "seeds": used}
            )
    effects = pd.DataFrame(rows)
    if len(effects):
        effects["p_holm"] = np.nan
        effects["q_bh"] = np.nan
        for _, idx in effects.groupby(["metric", "kind"]).groups.items():
            effects.loc[idx, "p_holm"] = holm(effects.loc[idx, "p"].to_numpy())
            effects.loc[idx, "q_bh"] = benjamini_hochberg(effects.loc[idx, "p"].to_numpy())

    stability = _stability(runs, terms, primary, div, kw)
    cost = _cost(runs, terms, kw)
    p_holm: dict[str, float] = {}
    if len(effects):
        sel = effects[(effects["metric"] == primary) & (effects["kind"] == "main")]
        p_holm = dict(zip(sel["term"], sel["p_holm"]))
    verdicts = _verdicts(primary_effects, p_holm, stability, cost, terms, higher_is_better)
    interactions = effects[(effects["kind"] == "interaction") & (effects["metric"] == primary)] if inter else None
    if any(t.aliases for t in terms):
        notes.append(
            "Resolution III: main effects are aliased with two-way interactions (listed); a main effect "
            "estimate is the sum of the aliased effects."
        )
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
        arm_summary=_arm_summary(runs, arms, metric_cols),
        effects=effects,
        verdicts=verdicts,
        stability=stability,
        cost=cost,
        interactions=interactions.reset_index(drop=True) if interactions is not None else pd.DataFrame(),
        fraction=fraction,
        resolution=resolution,
        defining_relation=relation,
        notes=notes,
    )


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
            ratio, lo, hi = bootstrap_ratio_ci(sub[on].to_numpy(), sub[off].to_numpy(), **kw)
            row |= {"spread_ratio": ratio, "spread_low": lo, "spread_high": hi, "spread_n": len(sub)}
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
            row[f"{name}_p"] = eff.p
        rows.append(row)
    out = pd.DataFrame(rows)
    if "diverged_p" in out:
        out["diverged_p_holm"] = holm(out["diverged_p"].to_numpy())
    return out


def _cost(runs: pd.DataFrame, terms: list[Term], kw: dict) -> pd.DataFrame:
    """Per trick: train time and peak memory per sample, on / off, as a ratio with a CI (geometric, per seed)."""
    finished = (store.RunStatus.COMPLETED, store.RunStatus.DIVERGED)
    rows = []
    for term in terms:
        row: dict[str, Any] = {"term": term.name}
        for name, col in (("time", "cost.train_s_per_sample"), ("memory", "cost.peak_mem_mb_per_sample")):
            mat = seed_matrix(runs, col, finished)
            if name == "memory" and len(mat):
                mat = mat.where(seed_matrix(runs, "cost.peak_mem_mb", finished) >= MIN_MEASURED_MEMORY_MB)
            eff, _ = term_effect(mat, term, False, transform="log", **kw)
            row |= {
                f"{name}_ratio": math.exp(eff.mean) if eff.n else np.nan,
                f"{name}_low": math.exp(eff.ci_low) if math.isfinite(eff.ci_low) else np.nan,
                f"{name}_high": math.exp(eff.ci_high) if math.isfinite(eff.ci_high) else np.nan,
                f"{name}_n": eff.n,
            }
        rows.append(row)
    return pd.DataFrame(rows)


def _verdicts(
    primary_effects: dict[str, tuple[Effect, int]],
    p_holm: dict[str, float],
    stability: pd.DataFrame,
    cost: pd.DataFrame,
    terms: list[Term],
    higher_is_better: bool,
) -> pd.DataFrame:
    """One verdict per trick from its primary-metric main effect; a significant divergence change overrides."""
    rows = []
    for term in terms:
        eff, excluded = primary_effects.get(term.name, (paired_effect([], higher_is_better), 0))
        p_adj = float(p_holm.get(term.name, float("nan")))
        v = verdict(eff, p_adj, m=len(terms))
        label, reason = v.label, v.reason
        if eff.n < 2 and excluded:
            reason = f"{eff.n} usable seed(s): {excluded} left out because a run diverged"
        st = stability[stability["term"] == term.name].iloc[0] if len(stability) else None
        if st is not None and "diverged_p_holm" in st and math.isfinite(st["diverged_p_holm"]):
            lo, hi = st["diverged_low"], st["diverged_high"]
            if st["diverged_p_holm"] < ALPHA and math.isfinite(lo) and (lo > 0 or hi < 0):
                more = lo > 0
                label = "hurts" if more else "helps"
                reason = (
                    f"{'more' if more else 'fewer'} diverged runs with the trick "
                    f"({st['diverged_total_on']} vs {st['diverged_total_off']}; p(Holm) = {st['diverged_p_holm']:.3g})"
                    + (f"; metric alone: {v.label}" if v.label != label else "")
                )
        c = cost[cost["term"] == term.name].iloc[0] if len(cost) else None
        rows.append(
            {
                "term": term.name,
                "verdict": label,
                "reason": reason,
                "seeds_needed": v.seeds_needed if label == v.label else np.nan,
                "n": eff.n,
                "n_excluded_diverged": excluded,
                "mean": eff.mean,
                "ci_low": eff.ci_low,
                "ci_high": eff.ci_high,
                "ci_reliable": eff.ci_reliable,
                "p": eff.p,
                "p_holm": p_adj,
                "frac_improved": eff.frac_improved,
                "time_ratio": c["time_ratio"] if c is not None else np.nan,
                "memory_ratio": c["memory_ratio"] if c is not None else np.nan,
                "aliases": ", ".join(term.aliases),
            }
        )
    return pd.DataFrame(rows)


def _arm_summary(runs: pd.DataFrame, arms: list[tuple[str, tuple[str, ...]]], metric_cols: list[str]) -> pd.DataFrame:
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


def _task_class(name: str) -> Any:
    from experiments.registry import get_task

    try:
        return get_task(name)
    except (KeyError, ImportError):
        return None


def _direction_from_results(gdir: Path, run_ids: list[str]) -> tuple[str, bool] | None:
    """(primary metric, higher_is_better) as stored in the runs' result.json (when the task class is gone)."""
    for rid in run_ids:
        path = Path(gdir) / "runs" / rid / store.RESULT
        if store.run_status(path.parent) in store.RunStatus.FINISHED:  # verified: never a damaged file
            res = store.read_json(path)
            if "primary_metric" in res and "higher_is_better" in res:
                return res["primary_metric"], bool(res["higher_is_better"])
    return None


def analyze_grid(gdir: Path, *, n_resamples: int = N_RESAMPLES) -> GridStats:
    """Load a launched grid from its folder and compute :class:`TaskStats` for each of its tasks."""
    from bench.runner import grid_cells

    gdir = Path(gdir)
    spec, cells = grid_cells(gdir)
    ids = {c.run_id for c in cells}
    runs = store.load_grid(gdir)
    runs = runs[runs["run_id"].isin(ids)] if len(runs) else runs
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
        cls = _task_class(t.task)
        if cls is not None:
            metric, hib = cls.metric, bool(cls.higher_is_better)
        else:
            found = _direction_from_results(gdir, [c.run_id for c in cells if c.task == t.label])
            if found is None:
                continue  # neither the task class nor a finished run says what the metric is
            metric, hib = found
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
                seeds=list(spec.seeds),
                n_resamples=n_resamples,
            )
        )
    return GridStats(
        spec.grid, spec.description, spec.design, list(spec.seeds), len(cells), counts, tasks, ids, damaged
    )
