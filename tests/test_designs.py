"""The fractional designs of bench/designs.py: best attainable resolution, minimum aberration, aliases.

Four independent checks of :data:`bench.designs.MIN_ABERRATION_GENERATORS`:

- resolution: for every supported (k, p) an exhaustive search finds no design of resolution
  R + 1 (a complete proof, milliseconds each), and R never exceeds the Griesmer/Rao bound
  (they agree everywhere except 2^(12−5), where the bound allows V but no V design exists);
- minimum aberration by brute force: for every (k, p) whose candidate generator sets number
  at most 60,000, all of them are enumerated (no pruning, no symmetry) and the smallest
  word-length pattern equals the table's;
- minimum aberration by the branch-and-bound search for every entry (the large ones are slow);
- published designs (Box, Hunter & Hunter 2005, Table 6.22; Montgomery 2017, Table 8.14):
  each table design's word-length pattern is lexicographically no worse.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bench import designs
from bench.designs import LETTERS, MIN_ABERRATION_GENERATORS, fractional_design, word_length_pattern
from bench.grid import design_arms

SUPPORTED = sorted(MIN_ABERRATION_GENERATORS)
SLOW_SEARCH = {(11, 5), (12, 3), (12, 4), (12, 5), (12, 6)}  # exhaustive MA search over ~1 s each

#: generators as printed in Box, Hunter & Hunter (2005) Table 6.22 / Montgomery (2017) Table 8.14
PUBLISHED = {
    (4, 1): ("ABC",),
    (5, 1): ("ABCD",),
    (5, 2): ("AB", "AC"),
    (6, 1): ("ABCDE",),
    (6, 2): ("ABC", "BCD"),
    (6, 3): ("AB", "AC", "BC"),
    (7, 1): ("ABCDEF",),
    (7, 2): ("ABCD", "ABDE"),
    (7, 3): ("ABC", "BCD", "ACD"),
    (7, 4): ("AB", "AC", "BC", "ABC"),
    (8, 1): ("ABCDEFG",),
    (8, 2): ("ABCD", "ABEF"),
    (8, 3): ("ABC", "ABD", "BCDE"),
    (8, 4): ("BCD", "ACD", "ABC", "ABD"),
    (9, 2): ("ACDFG", "BCEFG"),
    (9, 3): ("ABCD", "ACEF", "CDEF"),
    (9, 4): ("BCDE", "ACDE", "ABDE", "ABCE"),
    (9, 5): ("ABC", "BCD", "ACD", "ABD", "ABCD"),
    (10, 3): ("ABCG", "BCDE", "ACDF"),
    (10, 4): ("BCDF", "ACDF", "ABDE", "ABCE"),
    (10, 5): ("ABCD", "ABCE", "ABDE", "ACDE", "BCDE"),
    (10, 6): ("ABC", "BCD", "ACD", "ABD", "ABCD", "AB"),
    (11, 4): ("ABCG", "BCDE", "ACDF", "ABCDEFG"),
    (11, 5): ("CDE", "ABCD", "ABF", "BDEF", "ADEF"),
    (11, 6): ("ABC", "BCD", "CDE", "ACD", "ADE", "BDE"),
    (11, 7): ("ABC", "BCD", "ACD", "ABD", "ABCD", "AB", "AC"),
}


def _parse(words: tuple[str, ...]) -> list[tuple[int, ...]]:
    return [tuple(LETTERS.index(c) for c in w) for w in words]


def test_table_covers_every_design_up_to_twelve_factors() -> None:
    for k in range(3, 13):
        top = designs.max_fraction(k)
        assert (1 << (k - top)) - 1 >= k > (1 << (k - top - 1)) - 1
        assert [p for kk, p in SUPPORTED if kk == k] == list(range(1, top + 1))


@pytest.mark.parametrize(("k", "p"), SUPPORTED)
def test_resolution_is_the_best_attainable(k: int, p: int) -> None:
    d = fractional_design(k, p)
    assert d.resolution <= designs.resolution_upper_bound(k, p)
    gens, _wlp, complete = designs.search_min_aberration(k, p, max_order=d.resolution + 1, time_limit_s=30)
    assert complete and gens is None, f"2^({k}-{p}): a design of resolution {d.resolution + 1} exists: {gens}"
    if (k, p) != (12, 5):
        assert d.resolution == designs.resolution_upper_bound(k, p)


def _brute_force_best_wlp(k: int, p: int) -> tuple[int, ...]:
    """The lexicographically smallest word-length pattern over all sets of p distinct generator columns."""
    b = k - p
    cand = np.array([v for v in range(1, 1 << b) if bin(v).count("1") >= 2], dtype=np.int64)
    combos = np.array(list(itertools.combinations(range(len(cand)), p)), dtype=np.int64)
    pop = np.array([bin(i).count("1") for i in range(1 << b)], dtype=np.int64)
    counts = np.zeros((len(combos), k + 1), dtype=np.int64)
    for r in range(1, p + 1):
        for subset in itertools.combinations(range(p), r):
            x = np.bitwise_xor.reduce(cand[combos[:, list(subset)]], axis=1)
            np.add.at(counts, (np.arange(len(combos)), pop[x] + r), 1)
    order = np.lexsort(counts[:, :0:-1].T)  # last key first: sorts by A_1, then A_2, ...
    return tuple(int(a) for a in counts[order[0], 1:])


BRUTE = [(k, p) for k, p in SUPPORTED if math.comb((1 << (k - p)) - 1 - (k - p), p) <= 60_000]


@pytest.mark.parametrize(("k", "p"), BRUTE)
def test_minimum_aberration_against_brute_force(k: int, p: int) -> None:
    assert fractional_design(k, p).wlp == _brute_force_best_wlp(k, p)


def test_brute_force_reaches_every_run_size() -> None:
    assert {k - p for k, p in BRUTE} == {2, 3, 4, 5, 6, 7, 8, 9, 10, 11}
    assert len(BRUTE) >= 25


@pytest.mark.parametrize(
    ("k", "p"), [pytest.param(*kp, marks=pytest.mark.slow) if kp in SLOW_SEARCH else kp for kp in SUPPORTED]
)
def test_table_is_what_the_search_finds(k: int, p: int) -> None:
    gens, wlp, complete = designs.search_min_aberration(k, p, time_limit_s=120)
    assert complete
    assert fractional_design(k, p).wlp == wlp
    assert fractional_design(k, p).generators == tuple(gens)


@pytest.mark.parametrize(("k", "p"), sorted(PUBLISHED))
def test_no_worse_than_the_published_tables(k: int, p: int) -> None:
    published = word_length_pattern(k, _parse(PUBLISHED[(k, p)]))
    ours = fractional_design(k, p).wlp
    assert ours <= published, f"2^({k}-{p}): ours {ours}, published {published}"


def test_issue_cases_now_reach_resolution_four_or_five() -> None:
    """The cases the old greedy generators left at resolution III (issue 15)."""
    expected = {(6, 2): 4, (7, 2): 4, (7, 3): 4, (8, 2): 5, (8, 3): 4, (8, 4): 4}
    assert {kp: fractional_design(*kp).resolution for kp in expected} == expected


@pytest.mark.parametrize(("k", "p"), SUPPORTED)
def test_rows_words_and_aliases_agree_with_the_contrasts(k: int, p: int) -> None:
    d = fractional_design(k, p)
    x = np.array(d.rows, dtype=np.int64) * 2 - 1  # ±1 coding
    assert x.shape == (1 << (k - p), k) and len(set(d.rows)) == len(d.rows)
    assert np.all(x.sum(axis=0) == 0)  # balanced
    for w in d.words:  # every word is the identity column: I = product of its factors
        assert np.all(np.prod(x[:, list(w)], axis=1) == 1), w
    assert len(d.words) == 2**p - 1 and sum(d.wlp) == 2**p - 1
    assert d.resolution == min(i + 1 for i, a in enumerate(d.wlp) if a)
    # aliases from the words equal aliases from equal contrast columns (effects of order ≤ 2)
    effects = [(i,) for i in range(k)] + list(itertools.combinations(range(k), 2))
    cols = {e: np.prod(x[:, list(e)], axis=1) for e in effects}
    for e, al in d.aliases().items():
        same = {f for f in effects if f != e and np.array_equal(cols[f], cols[e])}
        assert set(al) == same, e
    if d.resolution >= 5:
        assert not any(d.aliases().values())
    elif d.resolution == 4:
        assert not any(d.aliases()[(i,)] for i in range(k))  # main effects clear of two-factor interactions


def test_labels_of_a_small_design() -> None:
    d = fractional_design(6, 2)
    names = ["ema", "acc", "clip", "wd", "ls", "swa"]
    assert d.generator_labels(names) == ["ls = ema·acc·clip", "swa = ema·acc·wd"]
    assert d.word_labels() == ["I = A·B·C·E", "I = A·B·D·F", "I = C·D·E·F"]
    assert "A×B = C×E = D×F" in d.alias_labels()
    assert len(d.alias_labels()) == len(set(d.alias_labels()))
    with pytest.raises(ValueError, match="names"):
        d.generator_labels(["a"])


def test_design_arms_use_the_minimum_aberration_rows() -> None:
    tricks = [f"t{i}" for i in range(8)]
    arms = design_arms("fractional_factorial", tricks, 2)
    assert len(arms) == 64
    rows = {tuple(int(t in on) for t in tricks) for _, on in arms}
    assert rows == set(fractional_design(8, 2).rows)


def test_bad_k_or_p_names_the_allowed_range() -> None:
    with pytest.raises(ValueError, match=r"allowed: 1 ≤ p ≤ 4"):
        fractional_design(7, 5)
    with pytest.raises(ValueError, match=r"allowed: 3 ≤ k ≤ 12"):
        fractional_design(13, 2)
    with pytest.raises(ValueError, match="fraction p"):
        design_arms("fractional_factorial", ["a", "b", "c"], 2)
