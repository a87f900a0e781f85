"""The adaptive-seeds engine (bench/sequential.py): boundaries, decisions, error control, seeds saved.

- boundaries: against the published Lan–DeMets O'Brien–Fleming-type values (5 equally spaced
  looks, two-sided α = 0.05: 4.877, 3.357, 2.680, 2.290, 2.031; Jennison & Turnbull 2000 ch. 7,
  R gsDesign ``sfLDOF``) and against a Monte Carlo of the
  z-process (400,000 paths: each look's exit probability equals the spending increment within
  4 standard errors);
- decisions: replaying stored rounds, missing seeds, verdict wording, the vectorized
  simulation agreeing with :func:`decide`;
- error: A/A grids (normal data here; heavy-tailed shapes in tests/test_calibration.py) call a
  trick in ≤ 5 % of families, and a mixed grid makes no false claim of any kind in more;
- seeds: on synthetic grids with null, small and large effects (d_z = 0, 0.5, 1.5; 4,000
  families), the seeds the adaptive procedure spends against a fixed-n design (paired t,
  Holm) of equal power for the small effects. ``python -m tests.test_sequential`` prints the
  table for the report; the asserts below are the claims made there.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from bench import sequential as sq
from bench import stats

SEED = 20_250_615


def _grid(effects: list[float], families: int, max_seeds: int, seed: int = SEED) -> np.ndarray:
    """(families, arms, max_seeds) differences of arms vs one shared reference arm; sd of a difference 1."""
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(families, 1, max_seeds))
    arms = rng.normal(size=(families, len(effects), max_seeds))
    return np.asarray(effects)[None, :, None] + (arms - ref) / math.sqrt(2)


# --- boundaries --------------------------------------------------------------------------------------------------
def test_obrien_fleming_boundaries_match_the_published_values() -> None:
    plan = sq.SequentialPlan(n_arms=1, max_seeds=10, first_seeds=2, round_seeds=2, spending="obrien_fleming")
    z = sq.boundaries([2, 4, 6, 8, 10], plan, t_calibrated=False)
    np.testing.assert_allclose(z, [4.877, 3.357, 2.680, 2.290, 2.031], atol=1e-3)


@pytest.mark.parametrize("spending", ["power", "pocock"])
def test_boundaries_spend_the_planned_error_at_each_look(spending: str) -> None:
    plan = sq.SequentialPlan(n_arms=1, max_seeds=30, first_seeds=3, round_seeds=4, alpha=0.2, spending=spending)
    looks = np.array(plan.looks())
    c = sq.boundaries(looks, plan, t_calibrated=False)
    rng = np.random.default_rng(SEED)
    steps = rng.normal(size=(400_000, len(looks))) * np.sqrt(np.diff(np.concatenate([[0], looks])))
    z = np.cumsum(steps, axis=1) / np.sqrt(looks)  # the z statistic of a Brownian score at each look
    crossed = np.abs(z) >= c
    first = np.where(crossed.any(axis=1), crossed.argmax(axis=1), len(looks))
    exit_by_look = np.cumsum(np.bincount(first, minlength=len(looks) + 1)[:-1]) / len(z)
    planned = plan.spent(looks / plan.max_seeds)
    se = np.sqrt(planned * (1 - planned) / len(z))
    assert np.all(np.abs(exit_by_look - planned) <= 4 * se + 1e-4), (exit_by_look, planned)
    assert exit_by_look[-1] == pytest.approx(0.2, abs=4e-3)


def test_boundaries_for_looks_past_the_cap_and_bad_input() -> None:
    plan = sq.SequentialPlan(n_arms=2, max_seeds=6, first_seeds=3, round_seeds=3)
    c = sq.boundaries([3, 6, 9], plan)
    assert math.isfinite(c[1]) and c[2] == math.inf  # all error spent at the cap: no claim from extra seeds
    with pytest.raises(ValueError, match="increasing"):
        sq.boundaries([3, 3], plan)


def test_plan_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="first_seeds: 1"):
        sq.SequentialPlan(n_arms=3, first_seeds=1)
    with pytest.raises(ValueError, match="margin: -1"):
        sq.SequentialPlan(n_arms=3, margin=-1.0)
    with pytest.raises(ValueError, match=r"spending: 'linear'.*allowed: power"):
        sq.SequentialPlan(n_arms=3, spending="linear")
    assert sq.SequentialPlan(n_arms=3, max_seeds=12, first_seeds=4, round_seeds=3).looks() == [4, 7, 10, 12]


# --- decisions ---------------------------------------------------------------------------------------------------
def test_decisions_on_clear_open_and_equivalent_arms() -> None:
    plan = sq.SequentialPlan(n_arms=3, max_seeds=24, first_seeds=4, round_seeds=4, margin=0.5)
    rng = np.random.default_rng(1)
    large = 2.0 + 0.1 * rng.normal(size=24)
    dec = sq.decide(large, plan, higher_is_better=True, arm="ema")
    assert (dec.stop, dec.verdict, dec.n, dec.looks) == (True, "helps", 4, 1) and "excludes 0" in dec.reason
    assert sq.decide(large, plan, higher_is_better=False).verdict == "hurts"
    tiny = 0.01 * rng.normal(size=24)
    eq = sq.decide(tiny, plan, higher_is_better=True)
    assert eq.verdict == "equivalent" and -0.5 < eq.low < eq.high < 0.5
    noisy = rng.normal(size=24)
    last = sq.decide(noisy, plan, higher_is_better=True)
    assert last.verdict == "cap reached" and last.n == 24 and last.low < 0 < last.high
    early = sq.decide(noisy[:10], plan, higher_is_better=True)
    assert (early.stop, early.verdict, early.n) == (False, "open", 8)  # looks at 4 and 8; seeds 9-10 wait
    # the interval at a look is the t-interval at the look's nominal level
    mean, lo, hi = sq.repeated_interval(noisy[:8], early.boundary_z)
    half = sps.t.isf(early.nominal_alpha / 2, 7) * noisy[:8].std(ddof=1) / math.sqrt(8)
    assert (lo, hi) == pytest.approx((mean - half, mean + half))
    assert (early.mean, early.low, early.high) == pytest.approx((mean, lo, hi))


def test_replaying_stored_rounds_keeps_the_first_decision() -> None:
    plan = sq.SequentialPlan(n_arms=1, max_seeds=30, first_seeds=3, round_seeds=3)
    d = np.r_[np.full(6, 3.0) + np.linspace(-0.1, 0.1, 6), np.random.default_rng(2).normal(size=24)]
    first = sq.decide(d[:6], plan, higher_is_better=True)
    assert first.stop and first.verdict == "helps"
    assert sq.decide(d, plan, higher_is_better=True) == first  # extra seeds run later do not change it


def test_missing_seeds_take_their_rounds_information() -> None:
    plan = sq.SequentialPlan(n_arms=1, max_seeds=12, first_seeds=4, round_seeds=4)
    d = np.random.default_rng(3).normal(size=10)
    rounds = [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]  # round 1 lost one seed, round 3 lost one (diverged pairs)
    dec = sq.decide(d, plan, higher_is_better=True, rounds=rounds)
    assert dec.looks == 3 and dec.n == 10
    c = sq.boundaries([3, 7, 10], plan)
    assert dec.boundary_z == pytest.approx(c[-1])
    with pytest.raises(ValueError, match="rounds"):
        sq.decide(d, plan, higher_is_better=True, rounds=[1, 0, 0, 0, 0, 0, 0, 0, 0, 0])


def test_next_round_adds_seeds_only_to_open_arms() -> None:
    plan = sq.SequentialPlan(n_arms=3, max_seeds=10, first_seeds=4, round_seeds=4, margin=0.2)
    rng = np.random.default_rng(4)
    decisions = sq.decide_grid(
        {"a": 5 + rng.normal(size=4), "b": rng.normal(size=8), "c": []}, plan, higher_is_better=True
    )
    assert decisions["a"].stop and not decisions["b"].stop and decisions["c"].looks == 0
    assert sq.next_round(decisions, plan) == {"a": 0, "b": 2, "c": 4}  # b: up to the cap of 10
    with pytest.raises(ValueError, match="n_arms"):
        sq.decide_grid({"a": [1.0, 2.0]}, plan, higher_is_better=True)


def test_vectorized_simulation_agrees_with_decide() -> None:
    plan = sq.SequentialPlan(n_arms=4, max_seeds=18, first_seeds=3, round_seeds=3, margin=0.6, futility=0.05)
    d = _grid([0.0, 0.3, 1.0, -1.0], 60, 18, seed=5)
    sim = sq.simulate_grid(d, plan, higher_is_better=False)
    for f in range(60):
        for k in range(4):
            dec = sq.decide(d[f, k], plan, higher_is_better=False)
            assert (sim.verdicts[f, k], sim.seeds[f, k]) == (dec.verdict, dec.n)
            assert sim.low[f, k] == pytest.approx(dec.low)
    assert {"helps", "hurts"} <= set(sim.verdicts.ravel())


# --- error control -----------------------------------------------------------------------------------------------
def test_aa_familywise_error_of_the_adaptive_procedure() -> None:
    plan = sq.SequentialPlan(n_arms=10, max_seeds=30, first_seeds=3, round_seeds=3)
    sim = sq.simulate_grid(_grid([0.0] * 10, 20_000, 30), plan)
    fwer = np.mean(np.any(np.isin(sim.verdicts, ("helps", "hurts")), axis=1))
    assert 0.005 < fwer <= 0.05  # Bonferroni over 10 arms and the looks is conservative, not vacuous


def test_no_false_claim_of_any_kind_in_a_mixed_grid() -> None:
    """Helps for a null or harmful arm, hurts for a null or helpful one, 'equivalent' for |effect| ≥ margin."""
    effects = np.array([0.0, 0.0, 0.25, 0.5, -0.5, 1.0])
    plan = sq.SequentialPlan(n_arms=6, max_seeds=40, first_seeds=4, round_seeds=4, margin=0.5)
    sim = sq.simulate_grid(_grid(list(effects), 8000, 40), plan)
    v = sim.verdicts
    false = ((v == "helps") & (effects <= 0)) | ((v == "hurts") & (effects >= 0))
    false |= (v == "equivalent") & (np.abs(effects) >= 0.5)
    assert np.mean(np.any(false, axis=1)) <= 0.05


# --- seeds spent against a fixed design of equal power -----------------------------------------------------------
def fixed_power(d: np.ndarray, n: int, arms: np.ndarray) -> float:
    """Power of the fixed-n design (first n seeds, paired t, Holm over all arms) to call ``arms`` 'helps'."""
    _, lo, _, p = stats.paired_t(d[:, :, :n])
    adjusted = _holm_rows(p)
    return float(np.mean((adjusted[:, arms] < stats.ALPHA) & (lo[:, arms] > 0)))


def _holm_rows(p: np.ndarray) -> np.ndarray:
    """stats.holm per row, vectorized (checked against stats.holm in test_holm_rows)."""
    m = p.shape[1]
    order = np.argsort(p, axis=1, kind="stable")
    adj_sorted = np.minimum(1.0, np.maximum.accumulate(np.take_along_axis(p, order, 1) * (m - np.arange(m)), axis=1))
    out = np.empty_like(p)
    np.put_along_axis(out, order, adj_sorted, axis=1)
    return out


def test_holm_rows() -> None:
    p = np.random.default_rng(6).random((300, 7))
    np.testing.assert_allclose(_holm_rows(p), np.apply_along_axis(stats.holm, 1, p))


def seeds_ratio(effects: list[float], plan: sq.SequentialPlan, families: int = 4000) -> dict[str, float]:
    """Seeds of the adaptive procedure / seeds of the fixed-n design with the same power on the smallest effect."""
    eff = np.asarray(effects)
    smallest = eff == min(e for e in effects if e > 0)
    extra = 200  # fixed designs may need more seeds than the cap
    d = _grid(effects, families, plan.max_seeds + extra)
    sim = sq.simulate_grid(d[:, :, : plan.max_seeds], plan)
    power = float(np.mean(sim.verdicts[:, smallest] == "helps"))
    n_fixed = next(n for n in range(2, plan.max_seeds + extra) if fixed_power(d, n, smallest) >= power)
    trick = float(sim.seeds.sum(axis=1).mean())
    runs = trick + float(sim.reference_seeds.mean())
    k = len(effects)
    return {
        "power": power,
        "n_fixed": n_fixed,
        "trick_seeds": trick,
        "runs": runs,
        "ratio_trick_seeds": trick / (k * n_fixed),
        "ratio_runs": runs / ((k + 1) * n_fixed),
        "fwer": float(np.mean(np.any(((sim.verdicts == "helps") | (sim.verdicts == "hurts")) & (eff == 0), axis=1))),
    }


MIXED = [0.0, 0.0, 0.0, 0.0, 0.5, 0.5, 1.5, 1.5]


def test_adaptive_seeds_cost_less_than_a_fixed_design_of_equal_power() -> None:
    plan = sq.SequentialPlan(n_arms=8, max_seeds=64, first_seeds=3, round_seeds=3, margin=0.5)
    r = seeds_ratio(MIXED, plan)
    assert r["power"] > 0.7 and r["fwer"] <= 0.05
    assert r["ratio_trick_seeds"] < 0.9 and r["ratio_runs"] < 0.95, r


def test_futility_stops_save_more_at_equal_power() -> None:
    plan = sq.SequentialPlan(n_arms=8, max_seeds=64, first_seeds=3, round_seeds=3, margin=0.5, futility=0.05)
    r = seeds_ratio(MIXED, plan)
    assert r["power"] > 0.6 and r["fwer"] <= 0.05
    assert r["ratio_trick_seeds"] < 0.7 and r["ratio_runs"] < 0.75, r


def print_table() -> None:
    scenarios = [
        ("4 null, 2 × 0.5σ, 2 × 1.5σ; cap 64, margin 0.5σ", MIXED, {"max_seeds": 64, "margin": 0.5}),
        ("same, futility 0.05", MIXED, {"max_seeds": 64, "margin": 0.5, "futility": 0.05}),
        ("same, cap 48", MIXED, {"max_seeds": 48, "margin": 0.5}),
        ("same, no margin", MIXED, {"max_seeds": 64}),
        (
            "2 null, 2 × 0.5σ, 2 × 1σ, 2 × 1.5σ; cap 48",
            [0, 0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5],
            {"max_seeds": 48, "margin": 0.5},
        ),
        ("4 null, 2 × 0.8σ, 2 × 2σ; cap 32", [0, 0, 0, 0, 0.8, 0.8, 2.0, 2.0], {"max_seeds": 32, "margin": 0.5}),
    ]
    print("scenario | power (smallest) | fixed n | adaptive trick seeds / runs | ratio seeds / runs | A/A-arm FWER")
    for name, effects, kw in scenarios:
        plan = sq.SequentialPlan(n_arms=len(effects), first_seeds=3, round_seeds=3, **kw)
        r = seeds_ratio(effects, plan)
        print(
            f"{name} | {r['power']:.3f} | {r['n_fixed']} | {r['trick_seeds']:.0f} / {r['runs']:.0f} | "
            f"{r['ratio_trick_seeds']:.2f} / {r['ratio_runs']:.2f} | {r['fwer']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    print_table()
