"""Grid expansion: designs, paired seeds, stable run ids."""

from __future__ import annotations

import copy

from bench.grid import design_arms, expand, fractional_design, run_id_of
from bench.spec import parse_spec
from tests.test_spec import GOOD


def test_one_at_a_time_and_leave_one_out() -> None:
    assert design_arms("one_at_a_time", ["a", "b"]) == [("baseline", ()), ("+a", ("a",)), ("+b", ("b",))]
    assert design_arms("leave_one_out", ["a", "b", "c"]) == [
        ("all", ("a", "b", "c")),
        ("all-a", ("b", "c")),
        ("all-b", ("a", "c")),
        ("all-c", ("a", "b")),
    ]


def test_full_factorial_has_all_subsets() -> None:
    arms = design_arms("full_factorial", ["a", "b", "c"])
    assert len(arms) == 8 and len({on for _, on in arms}) == 8


def test_fractional_factorial_is_balanced_with_stated_resolution() -> None:
    rows, _gens, resolution = fractional_design(5, 1)
    assert len(rows) == 16 and resolution == 5  # 2^(5-1) with E = ABCD is resolution V
    for j in range(5):
        assert sum(r[j] for r in rows) == 8  # each factor on in half the runs
    rows, _, resolution = fractional_design(4, 1)
    assert len(rows) == 8 and resolution == 4


def test_expand_pairs_seeds_and_ids_are_stable() -> None:
    cells = expand(parse_spec(GOOD))
    assert len(cells) == 3 * 2  # baseline, +ema, +no_weight_decay × 2 seeds
    assert len({c.run_id for c in cells}) == len(cells)
    again = expand(parse_spec(copy.deepcopy(GOOD)))
    assert [c.run_id for c in cells] == [c.run_id for c in again]
    # seed s is the same in every arm; only the tricks differ
    by_seed = {}
    for c in cells:
        by_seed.setdefault(c.seed, set()).add(c.arm)
    assert all(len(arms) == 3 for arms in by_seed.values())


def test_run_id_depends_on_config_only() -> None:
    cells = expand(parse_spec(GOOD))
    renamed = copy.deepcopy(GOOD)
    renamed["grid"] = "other-name"
    assert {c.run_id for c in cells} == {c.run_id for c in expand(parse_spec(renamed))}
    changed = copy.deepcopy(GOOD)
    changed["tasks"]["cifar_autoencoder"]["train"]["budget_samples"] = 256
    assert not {c.run_id for c in cells} & {c.run_id for c in expand(parse_spec(changed))}
    assert run_id_of({"a": 1, "b": 2}) == run_id_of({"b": 2, "a": 1})
