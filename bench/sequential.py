"""Adaptive seeds: decide after each round of seeds which arms are decisive and which need more.

The statistical engine of ``bench run --until-decisive``: a grid runs in rounds (``plan.looks()``
gives the cumulative seeds per round); after each round :func:`decide` is called on every arm's
paired differences (trick on − off, one per seed, in seed order) and says, per arm, *stop* with a
verdict — **helps**, **hurts**, **equivalent** (within ``plan.margin``), **cap reached** — or
*continue*; :func:`next_round` turns that into the seeds to add. Optionally (``plan.futility``)
an arm whose conditional power to reach a verdict by the cap is tiny stops as **futile** (no
claim: non-binding, so the error control below is unchanged). Pure functions of the stored
differences and the plan: a re-launch that replays the stored rounds reaches the same decisions.

Method: **group-sequential repeated confidence intervals with error spending**, one family of K
arms with Bonferroni's α/K each (Jennison & Turnbull 1989, "Interim analyses: the repeated
confidence interval approach", JRSS B 51; Lan & DeMets 1983, Biometrika 70). Per arm, the
two-sided α/K is spent over the looks by the power family α/K·t^ρ of the information fraction
t = n / ``max_seeds`` (ρ = 2 by default, between Pocock (≈1) and O'Brien–Fleming (≈3)); the
critical values c_1, c_2, ... are computed by the recursive numerical integration of Armitage,
McPherson & Rowe (1969) for the looks actually taken, so the z-process of an arm with no effect
leaves (−c_j, c_j) at some look with probability α/K. At look j the arm's interval is the
paired t-interval at the nominal level 2Φ(−c_j) (t quantiles with n_j − 1 degrees of freedom:
the "significance level approach", J&T 2000 §3.8, for an unknown variance; since that alone
overshoots α by 5–15 % at a handful of seeds, the spending is scaled down until simulated normal
null paths cross with probability ≤ α/K, see :func:`boundaries`). These intervals
cover the true mean difference at *every* look simultaneously with probability ≥ 1 − α/K,
whatever the stopping rule (a property of the boundaries, not of when one looks), so:

- every claim is read off the interval: helps/hurts when it excludes 0 (on the better/worse
  side), equivalent when it lies within ±margin; a false claim of any kind needs some arm's
  interval to miss its true effect at some look, so the family-wise error of all claims is
  ≤ K·α/K = α under any data-dependent stopping, including stopping arms at different rounds
  and stopping for futility (for normal differences by construction; tests/test_sequential.py
  and tests/test_calibration.py measure A/A grids of normal, heavy-tailed, lognormal, skewed and
  outlier data);
- the cost of looking: at the cap the interval is a little wider than a fixed-n interval at
  α/K (c = 3.04 instead of 2.81 for 10 looks at α/K = 0.005), which a plan pays back by
  stopping clear arms early (tests/test_sequential.py measures seeds spent against a fixed-n
  design of equal power).

Why not anytime-valid confidence sequences / e-values (Howard et al. 2021; the scale-invariant
t-mixture of Lai 1976 / Wang & Ramdas 2023)? They need no plan at all, but they pay for
validity at every n with intervals ~1.5–2× wider at the seed counts a grid reaches: simulated on
the mixed grid of tests/test_sequential.py (4 null, 2 × 0.5σ, 2 × 1.5σ, cap 64), a t-mixture
confidence sequence spent ≈1.3× the seeds of a fixed design of equal power, the boundaries here
0.85× (0.53× with the futility stop, which gives up some power: a plan with it needs a higher
cap). The price of efficiency is a plan: ``max_seeds`` and the round sizes are fixed before the
first round (store the plan with the grid; raising the cap afterwards voids the guarantee).
Error spending tolerates unplanned information: a diverged run that removes a seed from an arm
only changes that arm's t_j.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize as spo
from scipy import special
from scipy import stats as sps

__all__ = [
    "VERDICTS",
    "ArmDecision",
    "GridSimulation",
    "SequentialPlan",
    "boundaries",
    "conditional_power",
    "decide",
    "decide_grid",
    "next_round",
    "repeated_interval",
    "simulate_grid",
]

VERDICTS = ("helps", "hurts", "equivalent", "futile", "cap reached", "open")
GRID_POINTS = 401  # grid of the recursive integration (boundaries accurate to ~1e-5 in z)
SPENDINGS = ("power", "obrien_fleming", "pocock")


@dataclass(frozen=True)
class SequentialPlan:
    """What is fixed before the first round of an adaptive grid (store it with the grid)."""

    n_arms: int  # K: arms (tricks / terms) whose claims share the family-wise error α
    max_seeds: int = 32  # cap per arm; all of an arm's α is spent by then
    first_seeds: int = 3  # seeds of round 1 (at least 2: a t-interval needs an sd)
    round_seeds: int = 3  # seeds added to every open arm per further round
    alpha: float = 0.05  # family-wise error of all claims (helps, hurts, equivalent) together
    margin: float | None = None  # equivalence margin in the metric's units; None: never stop for equivalence
    spending: str = "power"  # error-spending family: "power" (α·t^ρ), "obrien_fleming" or "pocock" (Lan–DeMets)
    rho: float = 2.0  # exponent of the power family
    futility: float = 0.0  # stop an open arm whose conditional power to exclude 0 by the cap is below this; 0: never
    futility_from: float = 0.25  # ... but only from this information fraction n / max_seeds on

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.n_arms, int) or self.n_arms < 1:
            problems.append(f"n_arms: {self.n_arms!r} is not allowed; allowed: an integer ≥ 1")
        if not isinstance(self.first_seeds, int) or self.first_seeds < 2:
            problems.append(f"first_seeds: {self.first_seeds!r} is not allowed; allowed: an integer ≥ 2")
        if not isinstance(self.round_seeds, int) or self.round_seeds < 1:
            problems.append(f"round_seeds: {self.round_seeds!r} is not allowed; allowed: an integer ≥ 1")
        if not isinstance(self.max_seeds, int) or self.max_seeds < max(self.first_seeds, 2):
            problems.append(f"max_seeds: {self.max_seeds!r} is not allowed; allowed: an integer ≥ first_seeds")
        if not 0 < self.alpha < 1:
            problems.append(f"alpha: {self.alpha!r} is not allowed; allowed: 0 < alpha < 1")
        if self.margin is not None and not (math.isfinite(self.margin) and self.margin > 0):
            problems.append(f"margin: {self.margin!r} is not allowed; allowed: a positive number or None")
        if self.spending not in SPENDINGS:
            problems.append(f"spending: {self.spending!r} is not allowed; allowed: {', '.join(SPENDINGS)}")
        if not self.rho > 0:
            problems.append(f"rho: {self.rho!r} is not allowed; allowed: > 0")
        if not 0 <= self.futility < 1 or not 0 <= self.futility_from <= 1:
            problems.append(
                f"futility: {self.futility!r}, futility_from: {self.futility_from!r}; allowed: 0 ≤ futility < 1, "
                "0 ≤ futility_from ≤ 1"
            )
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def alpha_arm(self) -> float:
        """Two-sided error of one arm over all its looks (Bonferroni share of the family's α)."""
        return self.alpha / self.n_arms

    def looks(self) -> list[int]:
        """Planned cumulative seeds of an arm that stays open: first_seeds, + round_seeds, ..., max_seeds."""
        out = list(range(self.first_seeds, self.max_seeds, self.round_seeds))
        return [*out, self.max_seeds]

    def spent(self, t: np.ndarray | float) -> np.ndarray:
        """Cumulative two-sided α of one arm spent by information fraction t (clipped to [0, 1])."""
        t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
        a = self.alpha_arm
        if self.spending == "power":
            return a * t**self.rho
        if self.spending == "pocock":
            return a * np.log1p((math.e - 1) * t)
        with np.errstate(divide="ignore"):  # two-sided: each side spends the one-sided O'Brien–Fleming α/2
            return np.where(t > 0, 4 * sps.norm.sf(sps.norm.isf(a / 4) / np.sqrt(t)), 0.0)

    def to_dict(self) -> dict:
        return asdict(self)


# --- boundaries --------------------------------------------------------------------------------------------------
def boundaries(seeds_at_looks: Sequence[int], plan: SequentialPlan, *, t_calibrated: bool = True) -> np.ndarray:
    """Two-sided z critical values c_j of one arm for the looks taken at these cumulative seed counts.

    Information is proportional to seeds; t_j = min(n_j / max_seeds, 1). c_j is set so that a
    z-process with no drift stays inside (−c_i, c_i) for i < j and leaves at j with probability
    s·(spent(t_j) − spent(t_{j−1})) (∞ when nothing is left to spend, e.g. past the cap). With
    ``t_calibrated`` (what the decisions use), s ≤ 1 is set so that on the plan's schedule of looks
    the *t*-process of normal differences (t-intervals at the nominal levels 2Φ(−c_j), unknown
    variance) has error ≤ α/K (c_j depends only on the looks up to j, so a look's boundary is known
    when it is taken):
    converting z boundaries to t quantiles alone overshoots by 5–15 % at a handful of seeds (J&T
    2000 §3.8). s comes from 200,000 simulated null paths (fixed seed, so deterministic; ±3 %
    Monte Carlo error in the error rate at α/K = 0.005, and the target is lowered by 2 of those).
    With ``t_calibrated=False``, s = 1: the textbook boundaries.
    """
    ns = tuple(int(n) for n in seeds_at_looks)
    if not ns or any(b <= a for a, b in itertools.pairwise(ns)) or ns[0] < 1:
        raise ValueError(f"seeds_at_looks: {list(ns)} is not allowed; allowed: increasing positive counts")
    scale = _t_scale(tuple(plan.looks()), plan) if t_calibrated else 1.0  # from the plan: known before round 1
    return np.array(_boundaries(ns, plan, scale))


CALIBRATION_PATHS = 200_000
CALIBRATION_SEED = 20_250_615


@lru_cache(maxsize=256)
def _t_scale(ns: tuple[int, ...], plan: SequentialPlan) -> float:
    """The spending scale s at which normal null paths cross the t-converted boundaries with probability ≤ α/K."""
    usable = [j for j, n in enumerate(ns) if n >= 2]
    if not usable:
        return 1.0
    rng = np.random.default_rng(CALIBRATION_SEED)
    looks = np.array([ns[j] for j in usable])
    block = np.diff(np.concatenate([[0], looks]))  # new seeds per look
    # per block of m normal draws, the sum is N(0, m) and the sum of squares is sum²/m + χ²(m − 1), independent:
    # two draws per block give exactly the running sums a path of single draws would
    sums = rng.normal(size=(CALIBRATION_PATHS, len(block))) * np.sqrt(block)
    squares = sums**2 / block + rng.chisquare(np.maximum(block - 1, 1), size=(CALIBRATION_PATHS, len(block))) * (
        block > 1
    )
    s1, s2 = np.cumsum(sums, axis=1), np.cumsum(squares, axis=1)
    mean = s1 / looks
    sd = np.sqrt(np.maximum(s2 - looks * mean**2, 0.0) / (looks - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        abs_t = np.abs(mean) / (sd / np.sqrt(looks))
    target = plan.alpha_arm * (1 - 2 / math.sqrt(plan.alpha_arm * CALIBRATION_PATHS))

    def error(scale: float) -> float:
        nominal = _nominal(np.array(_boundaries(ns, plan, scale))[usable])
        return float(np.mean(np.any(abs_t >= sps.t.isf(nominal / 2, looks - 1), axis=1)))

    scale, err = 1.0, error(1.0)
    for _ in range(4):  # the error is close to proportional to the scale: a few proportional steps
        if err <= 0:
            break
        scale = min(1.0, scale * target / err)
        err = error(scale)
    while err > target:
        scale *= 0.98
        err = error(scale)
    return scale


@lru_cache(maxsize=4096)
def _boundaries(ns: tuple[int, ...], plan: SequentialPlan, scale: float = 1.0) -> tuple[float, ...]:
    info = np.array(ns, dtype=np.float64)
    spent = scale * plan.spent(info / plan.max_seeds)
    increments = np.diff(np.concatenate([[0.0], spent]))
    out: list[float] = []
    grid = weights = density = None  # sub-density of the score B_j = Z_j·√I_j on the continuation region
    for j, (inc, i_j) in enumerate(zip(increments, info)):
        if j == 0:
            c = float(sps.norm.isf(inc / 2)) if inc > 0 else math.inf
            span = min(c, 12.0) * math.sqrt(i_j)
            grid = np.linspace(-span, span, GRID_POINTS)
            density = sps.norm.pdf(grid / math.sqrt(i_j)) / math.sqrt(i_j)
        else:
            step = math.sqrt(i_j - info[j - 1])
            root = math.sqrt(i_j)
            mass = weights * density
            args = (grid, mass, step, root, inc)
            if inc <= 0 or _exit_minus_target(40.0, *args) > 0:
                c = math.inf
            elif _exit_minus_target(0.0, *args) < 0:
                c = 0.0
            else:
                c = float(spo.brentq(_exit_minus_target, 0.0, 40.0, args=args, xtol=1e-9))
            span = min(c, 12.0) * root
            new_grid = np.linspace(-span, span, GRID_POINTS)
            kernel = np.exp(-0.5 * ((new_grid[None, :] - grid[:, None]) / step) ** 2) / (step * math.sqrt(2 * math.pi))
            density = mass @ kernel
            grid = new_grid
        weights = np.full(GRID_POINTS, grid[1] - grid[0])
        weights[[0, -1]] /= 2
        out.append(c)
    return tuple(out)


def _exit_minus_target(c: float, grid: np.ndarray, mass: np.ndarray, step: float, root: float, target: float) -> float:
    """P(leave (−c, c) at this look | the sub-density ``mass`` on ``grid`` at the last one) − target."""
    up = special.ndtr((grid - c * root) / step)
    down = special.ndtr((-c * root - grid) / step)
    return float(np.sum(mass * (up + down))) - target


def _nominal(c: np.ndarray | float) -> np.ndarray:
    """Two-sided nominal level of a z critical value: 2Φ(−c)."""
    return 2 * sps.norm.sf(np.asarray(c, dtype=np.float64))


def repeated_interval(diffs: np.ndarray, c: float) -> tuple[float, float, float]:
    """(mean, low, high): the paired t-interval at the nominal level 2Φ(−c) of the z critical value c."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    mean = float(d.mean())
    if n < 2 or not math.isfinite(c):
        return mean, -math.inf, math.inf
    half = float(sps.t.isf(_nominal(c) / 2, n - 1)) * float(d.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


# --- decisions ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArmDecision:
    """Where one arm stands after the latest look (see :func:`decide`)."""

    arm: str
    n: int  # seeds used at the deciding (or latest) look
    looks: int  # looks taken up to it
    mean: float  # mean difference on − off
    low: float  # repeated confidence interval at that look (simultaneous over looks: level 1 − α/K)
    high: float
    boundary_z: float  # the look's critical value c_j
    nominal_alpha: float  # 2Φ(−c_j): the two-sided level of the t-interval at that look
    stop: bool
    verdict: str  # one of VERDICTS ("open" while it continues)
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def conditional_power(z: np.ndarray | float, n: np.ndarray | float, plan: SequentialPlan) -> np.ndarray:
    """Chance that an arm at z after n seeds ends beyond the final boundary, if its current trend holds.

    Brownian-motion approximation (Lan & Wittes 1988): with t = n / max_seeds and B = |z|·√t,
    the drift is estimated as B / t and CP = P(B(1) > c_K | B(t)), c_K the planned last boundary.
    1 at or past the cap (nothing left to gain), used only for the non-binding futility stop.
    """
    t = np.minimum(np.asarray(n, dtype=np.float64) / plan.max_seeds, 1.0)
    c_final = boundaries(plan.looks(), plan)[-1]
    b = np.abs(np.asarray(z, dtype=np.float64)) * np.sqrt(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        cp = sps.norm.sf((c_final - b - b / t * (1 - t)) / np.sqrt(1 - t))
    return np.where(t < 1, cp, 1.0)


def _verdict_at(
    mean: float, low: float, high: float, n: int, plan: SequentialPlan, higher_is_better: bool, z: float = 0.0
) -> tuple[str, str] | None:
    if low > 0 or high < 0:
        better = (low > 0) == higher_is_better
        within = plan.margin is not None and -plan.margin < low and high < plan.margin
        note = f" (but within the margin ±{plan.margin:g})" if within else ""
        return ("helps" if better else "hurts"), f"the repeated interval [{low:.3g}, {high:.3g}] excludes 0{note}"
    if plan.margin is not None and -plan.margin < low and high < plan.margin:
        return "equivalent", f"the repeated interval [{low:.3g}, {high:.3g}] lies within ±{plan.margin:g}"
    if n >= plan.max_seeds:
        return "cap reached", f"{n} seeds (the cap): the repeated interval [{low:.3g}, {high:.3g}] is still open"
    if plan.futility > 0 and n / plan.max_seeds >= plan.futility_from:
        cp = float(conditional_power(z, n, plan))
        if cp < plan.futility:
            return "futile", f"conditional power {cp:.2f} < {plan.futility:g} to exclude 0 by {plan.max_seeds} seeds"
    return None


def _look_counts(n_available: int, rounds: np.ndarray | None, plan: SequentialPlan) -> list[int]:
    """Usable seeds at each look: planned cumulative counts, or counts per stored round when given."""
    if rounds is None:
        return [n for n in plan.looks() if n <= n_available] or []
    r = np.asarray(rounds)
    if len(r) != n_available or np.any(np.diff(r) < 0):
        raise ValueError(f"rounds: {r.tolist()} is not allowed; allowed: one non-decreasing round index per difference")
    counts = [int(np.sum(r <= k)) for k in range(int(r.max()) + 1)] if len(r) else []
    return sorted({c for c in counts if c > 0})


def decide(
    diffs: Sequence[float] | np.ndarray,
    plan: SequentialPlan,
    *,
    higher_is_better: bool,
    rounds: Sequence[int] | np.ndarray | None = None,
    arm: str = "",
) -> ArmDecision:
    """Replay the looks of one arm on its differences (seed order) and return the first decisive one, else the last.

    ``diffs``: on − off per seed, finite (leave out seeds whose pair diverged), in the order
    the seeds were run. ``rounds``: the round each difference came from (non-decreasing), when
    seeds went missing or rounds differed from the plan; default: the plan's round sizes. A
    look is taken after every round with at least one new seed. Differences beyond the cap
    add looks at which no error is left to spend.
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if not np.all(np.isfinite(d)):
        raise ValueError(f"diffs of arm {arm!r}: non-finite values; allowed: finite (exclude diverged pairs)")
    counts = _look_counts(len(d), None if rounds is None else np.asarray(rounds), plan)
    if not counts or counts[0] < 2:
        counts = [c for c in counts if c >= 2]
    if not counts:
        mean = float(d.mean()) if len(d) else math.nan
        return ArmDecision(arm, len(d), 0, mean, -math.inf, math.inf, math.inf, 0.0, False, "open", "no look yet")
    cs = boundaries(counts, plan)
    for j, (n, c) in enumerate(zip(counts, cs)):
        mean, low, high = repeated_interval(d[:n], c)
        sd = float(d[:n].std(ddof=1))
        z = mean / (sd / math.sqrt(n)) if sd > 0 else (0.0 if mean == 0 else math.inf)
        found = _verdict_at(mean, low, high, n, plan, higher_is_better, z)
        if found is not None:
            return ArmDecision(arm, n, j + 1, mean, low, high, float(c), float(_nominal(c)), True, *found)
    why = f"the repeated interval [{low:.3g}, {high:.3g}] includes 0" + (
        f" and reaches beyond ±{plan.margin:g}" if plan.margin is not None else ""
    )
    return ArmDecision(arm, n, len(counts), mean, low, high, float(c), float(_nominal(c)), False, "open", why)


def decide_grid(
    diffs_by_arm: dict[str, Sequence[float] | np.ndarray],
    plan: SequentialPlan,
    *,
    higher_is_better: bool,
    rounds_by_arm: dict[str, Sequence[int]] | None = None,
) -> dict[str, ArmDecision]:
    """:func:`decide` for every arm of one family (``plan.n_arms`` must be the number of arms)."""
    if len(diffs_by_arm) != plan.n_arms:
        raise ValueError(
            f"diffs_by_arm: {len(diffs_by_arm)} arms but plan.n_arms = {plan.n_arms}; allowed: the same family size"
        )
    rounds_by_arm = rounds_by_arm or {}
    return {
        arm: decide(d, plan, higher_is_better=higher_is_better, rounds=rounds_by_arm.get(arm), arm=arm)
        for arm, d in diffs_by_arm.items()
    }


def next_round(decisions: dict[str, ArmDecision], plan: SequentialPlan) -> dict[str, int]:
    """Seeds to add to each arm in the next round: round_seeds (up to the cap) for open arms, 0 for stopped ones.

    For a design with a shared reference arm (one_at_a_time, leave_one_out) the reference runs
    every seed any open arm runs; a factorial design estimates every term from the same seed
    blocks, so it adds a block while any term is open.
    """
    out = {}
    for arm, dec in decisions.items():
        if dec.stop:
            out[arm] = 0
        elif dec.looks == 0:
            out[arm] = max(plan.first_seeds - dec.n, 0)
        else:
            out[arm] = min(plan.round_seeds, max(plan.max_seeds - dec.n, 0))
    return out


# --- vectorized simulation (tests, planning) ---------------------------------------------------------------------
@dataclass(frozen=True)
class GridSimulation:
    """Outcome of :func:`simulate_grid`: per family × arm, the verdict and the seeds the arm ran."""

    verdicts: np.ndarray  # (families, arms) of VERDICTS
    seeds: np.ndarray  # (families, arms) seeds the arm ran (the look at which it stopped, or the cap)
    low: np.ndarray  # the deciding look's repeated interval
    high: np.ndarray

    @property
    def reference_seeds(self) -> np.ndarray:
        """Seeds a shared reference arm runs: the most any arm of the family ran."""
        return self.seeds.max(axis=1)


def simulate_grid(diffs: np.ndarray, plan: SequentialPlan, *, higher_is_better: bool = True) -> GridSimulation:
    """Run the adaptive procedure on (families, arms, max_seeds) pre-drawn differences, all families at once.

    Seed s of an arm is the s-th difference; an arm that stops at a look never uses the rest.
    The same decisions as :func:`decide` on each arm (without missing seeds).
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 3 or d.shape[2] < plan.max_seeds:
        raise ValueError(f"diffs: shape {d.shape} is not allowed; allowed: (families, arms, ≥ {plan.max_seeds})")
    looks = np.array([n for n in plan.looks() if n >= 2])
    cs = boundaries(looks, plan)
    csum, csq = np.cumsum(d, axis=2), np.cumsum(d * d, axis=2)
    mean = csum[..., looks - 1] / looks
    var = (csq[..., looks - 1] - looks * mean**2) / (looks - 1)
    se = np.sqrt(np.maximum(var, 0.0) / looks)
    half = sps.t.isf(_nominal(cs) / 2, looks - 1) * se
    low, high = mean - half, mean + half
    pos, neg = low > 0, high < 0
    claim = pos | neg
    eq = np.zeros_like(claim) if plan.margin is None else (low > -plan.margin) & (high < plan.margin) & ~claim
    cap = looks >= plan.max_seeds
    futile = np.zeros_like(claim)
    if plan.futility > 0:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(se > 0, mean / se, np.where(mean == 0, 0.0, np.inf))
        futile = (conditional_power(z, looks, plan) < plan.futility) & (looks / plan.max_seeds >= plan.futility_from)
        futile &= ~claim & ~eq & ~cap
    stop = claim | eq | cap | futile
    first = stop.argmax(axis=2)
    pick = lambda a: np.take_along_axis(a, first[..., None], axis=2)[..., 0]  # noqa: E731
    better = pick(pos) if higher_is_better else pick(neg)
    verdicts = np.full(first.shape, "cap reached", dtype=object)
    verdicts[pick(futile)] = "futile"
    verdicts[pick(eq)] = "equivalent"
    verdicts[pick(claim) & better] = "helps"
    verdicts[pick(claim) & ~better] = "hurts"
    return GridSimulation(verdicts, looks[first], pick(low), pick(high))
