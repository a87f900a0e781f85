"""Two-level fractional factorial designs 2^(k−p) of maximum resolution and minimum aberration.

Called by :func:`bench.grid.design_arms` (which arms a ``fractional_factorial`` grid runs) and
by the statistics and the report (which effects are aliased). Pure: nothing is read or written.

A 2^(k−p) design runs the full factorial of its first b = k − p factors (the *base*
factors); each of the last p factors is set to the product, in ±1 coding, of the base
factors of its *generator* word. The *defining relation* is the group of the 2^p − 1
*words* made by multiplying generator words (each including its own added factor); its
*word-length pattern* (A_3, A_4, ...) counts the words of each length. The *resolution*
is the shortest word length: at resolution III main effects are aliased with two-factor
interactions, at IV with three-factor interactions only (two-factor interactions are
aliased among themselves), at V and above main effects and two-factor interactions are
all clear of each other. Among designs of the highest resolution, a *minimum aberration*
design (Fries & Hunter 1980) has the lexicographically smallest word-length pattern: the
fewest shortest words.

The table :data:`MIN_ABERRATION_GENERATORS` (every k ≤ 12 and every p with k ≤ 2^(k−p) − 1,
the most factors b base factors can carry without aliasing two main effects) was produced
by :func:`search_min_aberration`, an exhaustive branch-and-bound search: generator columns
are chosen in a fixed order (heaviest first), the first one is taken as a representative
of its orbit under permutations of the base factors (every design is isomorphic to one
whose heaviest generator uses the lowest-numbered base factors), and a branch is cut as
soon as the word-length pattern of its partial design, a componentwise lower bound of
every completion's, is lexicographically no better than the best complete design found.
The search finishes for every table entry (about 20 s in total on one core; ``python -m
bench.designs`` reruns it and prints the table). tests/test_designs.py checks the table
against the search, against a brute-force enumeration without pruning for the small
designs, against the resolution bounds of coding theory (Griesmer, Rao), and against the
generators published by Box, Hunter & Hunter (2005, Table 6.22) / Montgomery (2017,
Table 8.14): every table design has a word-length pattern at least as good as theirs.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from functools import cache

import numpy as np

__all__ = [
    "MAX_DESIGN_FACTORS",
    "MIN_ABERRATION_GENERATORS",
    "FractionalDesign",
    "fractional_design",
    "max_fraction",
    "resolution_upper_bound",
    "search_min_aberration",
    "word_length_pattern",
]

MAX_DESIGN_FACTORS = 12  # factors (tricks) a tabulated design may have
LETTERS = "ABCDEFGHJKLMNPQRST"  # design letters as the tables write them (no I: it is the identity word)

#: minimum-aberration generators of the added factors, in base-factor letters, from :func:`search_min_aberration`
MIN_ABERRATION_GENERATORS: dict[tuple[int, int], tuple[str, ...]] = {
    (3, 1): ("AB",),
    (4, 1): ("ABC",),
    (5, 1): ("ABCD",),
    (5, 2): ("ABC", "AB"),
    (6, 1): ("ABCDE",),
    (6, 2): ("ABC", "ABD"),
    (6, 3): ("ABC", "AB", "AC"),
    (7, 1): ("ABCDEF",),
    (7, 2): ("ABCD", "ABCE"),
    (7, 3): ("ABC", "ABD", "ACD"),
    (7, 4): ("ABC", "AB", "AC", "BC"),
    (8, 1): ("ABCDEFG",),
    (8, 2): ("ABCDE", "ABCF"),
    (8, 3): ("ABCD", "ABCE", "ABDE"),
    (8, 4): ("ABC", "ABD", "ACD", "BCD"),
    (9, 1): ("ABCDEFGH",),
    (9, 2): ("ABCDE", "ABCFG"),
    (9, 3): ("ABCDE", "ABCF", "ABDF"),
    (9, 4): ("ABCD", "ABCE", "ABDE", "ACDE"),
    (9, 5): ("ABCD", "ABC", "ABD", "ACD", "BCD"),
    (10, 1): ("ABCDEFGHJ",),
    (10, 2): ("ABCDEF", "ABCDGH"),
    (10, 3): ("ABCDEF", "ABCDG", "ABEFG"),
    (10, 4): ("ABCDE", "ABCF", "ABDF", "AEF"),
    (10, 5): ("ABCD", "ABCE", "ABDE", "ACDE", "BCDE"),
    (10, 6): ("ABCD", "ABC", "ABD", "ACD", "BCD", "AB"),
    (11, 1): ("ABCDEFGHJK",),
    (11, 2): ("ABCDEFG", "ABCDHJ"),
    (11, 3): ("ABCDEFG", "ABCDH", "ABEFH"),
    (11, 4): ("ABCDEFG", "ABCD", "ABEF", "ACEG"),
    (11, 5): ("ABCDE", "ABCF", "ABDF", "AEF", "BEF"),
    (11, 6): ("ABCDE", "ABC", "ABD", "ACE", "ADE", "BDE"),
    (11, 7): ("ABCD", "ABC", "ABD", "ACD", "BCD", "AB", "AC"),
    (12, 1): ("ABCDEFGHJKL",),
    (12, 2): ("ABCDEFG", "ABCDHJK"),
    (12, 3): ("ABCDEFG", "ABCDHJ", "ABEFHJ"),
    (12, 4): ("ABCDEFG", "ABCDH", "ABEFH", "ACEGH"),
    (12, 5): ("ABCDEFG", "ABCD", "ABEF", "ACEG", "ADFG"),
    (12, 6): ("ABCDE", "ABCF", "ABDF", "CDEF", "AEF", "BEF"),
    (12, 7): ("ABCDE", "ABC", "ABD", "ACE", "ADE", "BDE", "CDE"),
    (12, 8): ("ABCD", "ABC", "ABD", "ACD", "BCD", "AB", "AC", "AD"),
}


def _popcounts(bits: int) -> np.ndarray:
    return np.array([bin(i).count("1") for i in range(1 << bits)], dtype=np.int64)


def _mask(word: tuple[int, ...]) -> int:
    return sum(1 << i for i in word)


def _indices(mask: int) -> tuple[int, ...]:
    return tuple(i for i in range(mask.bit_length()) if mask >> i & 1)


def max_fraction(k: int) -> int:
    """The largest p of a 2^(k−p) design in which no two of the k main effects are aliased (k ≤ 2^(k−p) − 1)."""
    if k < 2:
        return 0
    b = 1
    while (1 << b) - 1 < k:
        b += 1
    return k - b


def _check_kp(k: int, p: int) -> None:
    if not isinstance(k, int) or not 3 <= k <= MAX_DESIGN_FACTORS:
        raise ValueError(
            f"k: {k!r} factors is not allowed; allowed: 3 ≤ k ≤ {MAX_DESIGN_FACTORS} for a fractional design"
        )
    top = max_fraction(k)
    if not isinstance(p, int) or not 1 <= p <= top:
        raise ValueError(
            f"fraction p: {p!r} is not allowed for k = {k} factors; allowed: 1 ≤ p ≤ {top} "
            f"(with more, 2^({k}−p) runs cannot keep the {k} main effects apart: k ≤ 2^(k−p) − 1 is needed)"
        )


def _words(k: int, generators: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
    """All 2^p − 1 words of the defining relation (factor indices), shortest first."""
    b = k - len(generators)
    full = [_mask(g) | (1 << (b + j)) for j, g in enumerate(generators)]
    words = []
    for r in range(1, len(full) + 1):
        for combo in itertools.combinations(full, r):
            m = 0
            for w in combo:
                m ^= w
            words.append(_indices(m))
    return sorted(words, key=lambda w: (len(w), w))


def word_length_pattern(k: int, generators: tuple[tuple[int, ...], ...] | list[tuple[int, ...]]) -> tuple[int, ...]:
    """(A_1, ..., A_k): the number of defining-relation words of each length 1..k."""
    counts = [0] * k
    for w in _words(k, tuple(tuple(g) for g in generators)):
        counts[len(w) - 1] += 1
    return tuple(counts)


@dataclass(frozen=True)
class FractionalDesign:
    """A 2^(k−p) design: runs, generators, defining relation and aliases (factor indices 0..k−1)."""

    k: int
    p: int
    generators: tuple[tuple[int, ...], ...]  # base-factor indices whose product sets added factor b + j
    rows: tuple[tuple[int, ...], ...]  # 2^(k−p) runs, 0/1 per factor (1 = on)
    words: tuple[tuple[int, ...], ...]  # defining relation I = word (2^p − 1 words), shortest first
    wlp: tuple[int, ...]  # word-length pattern (A_1, ..., A_k)

    def __iter__(self):
        """Unpacks as the older ``(rows, generators, resolution)`` triple of ``bench.grid.fractional_design``."""
        return iter((list(self.rows), list(self.generators), self.resolution))

    @property
    def resolution(self) -> int:
        """Length of the shortest word of the defining relation."""
        return min(len(w) for w in self.words)

    def aliases(self, max_order: int = 2) -> dict[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """Each main effect and two-factor interaction → the effects of order ≤ ``max_order`` it is aliased with.

        Effect e is aliased with e·w (symmetric difference) for every word w; every word has a
        + sign here (generators are plain products), so aliases are equal, not negated, contrasts.
        """
        effects = [(i,) for i in range(self.k)] + list(itertools.combinations(range(self.k), 2))
        masks = [_mask(w) for w in self.words]
        out = {}
        for e in effects:
            m = _mask(e)
            found = sorted(
                (_indices(m ^ w) for w in masks if bin(m ^ w).count("1") <= max_order), key=lambda x: (len(x), x)
            )
            out[e] = tuple(found)
        return out

    def generator_labels(self, names: list[str] | None = None, sep: str = "·") -> list[str]:
        """'E = A·B·C·D' per added factor (letters, or ``names`` of the k factors)."""
        n = self._names(names)
        b = self.k - self.p
        return [f"{n[b + j]} = " + sep.join(n[i] for i in g) for j, g in enumerate(self.generators)]

    def word_labels(self, names: list[str] | None = None, sep: str = "·") -> list[str]:
        """'I = A·B·C·D·E' for every word of the defining relation, shortest first."""
        n = self._names(names)
        return ["I = " + sep.join(n[i] for i in w) for w in self.words]

    def alias_labels(self, names: list[str] | None = None, sep: str = "×") -> list[str]:
        """'A = B×C' lines for every main effect and two-factor interaction that has an alias of order ≤ 2."""
        n = self._names(names)
        lines, seen = [], set()
        for e, al in self.aliases().items():
            if al and e not in seen:
                seen.update(al)
                lines.append(" = ".join(sep.join(n[i] for i in x) for x in (e, *al)))
        return lines

    def _names(self, names: list[str] | None) -> list[str]:
        if names is None:
            return list(LETTERS[: self.k])
        if len(names) != self.k:
            raise ValueError(f"names: {len(names)} names for a design of {self.k} factors; allowed: exactly {self.k}")
        return list(names)


def _parse(word: str) -> tuple[int, ...]:
    return tuple(LETTERS.index(c) for c in word)


@cache
def fractional_design(k: int, p: int) -> FractionalDesign:
    """The minimum-aberration 2^(k−p) design of :data:`MIN_ABERRATION_GENERATORS` (3 ≤ k ≤ 12).

    Call to get the runs of a ``fractional_factorial`` grid: base factors are the first
    k − p, generated factors the last p. Raises ``ValueError`` naming the allowed p range
    when k main effects cannot be kept apart in 2^(k−p) runs.
    """
    _check_kp(k, p)
    generators = tuple(_parse(w) for w in MIN_ABERRATION_GENERATORS[(k, p)])
    return _build(k, generators)


def _build(k: int, generators: tuple[tuple[int, ...], ...]) -> FractionalDesign:
    b = k - len(generators)
    rows = []
    for levels in itertools.product((0, 1), repeat=b):
        signs = [1 if x else -1 for x in levels]
        extra = tuple(1 if np.prod([signs[i] for i in g]) > 0 else 0 for g in generators)
        rows.append(tuple(levels) + extra)
    words = tuple(_words(k, generators))
    return FractionalDesign(k, len(generators), generators, tuple(rows), words, word_length_pattern(k, generators))


# --- the search that produced the table --------------------------------------------------------------------------
def search_min_aberration(k: int, p: int, *, max_order: int | None = None, time_limit_s: float = 600.0):
    """Exhaustive branch-and-bound search for a minimum-aberration 2^(k−p) design.

    Returns (generators as base-factor index tuples, word-length pattern (A_1..A_k), complete):
    ``complete`` is False when ``time_limit_s`` ran out (the design is then the best found).
    With ``max_order`` = R, only designs of resolution ≥ R are searched and (None, None, True)
    means none exists: a proof that the best attainable resolution is below R.
    """
    _check_kp(k, p)
    b = k - p
    pop = _popcounts(b)
    cand = np.array(sorted((v for v in range(1, 1 << b) if pop[v] >= 2), key=lambda v: (-pop[v], v)), dtype=np.int64)
    n_cand = len(cand)
    # the incumbent word-length pattern (lengths 1..k); a forbidden length acts as an unbeatable incumbent there
    best: list = [None, None]
    if max_order is not None:
        best[0] = tuple([0] * (max_order - 1) + [sys.maxsize] + [0] * (k - max_order))
    t0 = time.perf_counter()
    complete = True

    def no_better(w: np.ndarray) -> bool:
        if best[0] is None:
            return False
        for a, r in zip(w[1:], best[0]):
            if a != r:
                return a > r
        return True

    def dfs(start: int, xors: np.ndarray, sizes: np.ndarray, wlp: np.ndarray, gens: list[int]) -> None:
        nonlocal complete
        q = len(gens)
        if q == p:
            best[0], best[1] = tuple(int(x) for x in wlp[1:]), list(gens)
            return
        if time.perf_counter() - t0 > time_limit_s:
            complete = False
            return
        idx = np.arange(start, n_cand - (p - q) + 1)
        if q == 0:  # symmetry: the heaviest generator uses the lowest-numbered base factors
            idx = idx[cand[idx] == (1 << pop[cand[idx]]) - 1]
        if not len(idx):
            return
        lengths = pop[xors[None, :] ^ cand[idx][:, None]] + sizes[None, :] + 1
        hist = np.zeros((len(idx), k + 1), dtype=np.int64)
        np.add.at(hist, (np.repeat(np.arange(len(idx)), lengths.shape[1]), lengths.ravel()), 1)
        new = wlp[None, :] + hist
        for i in sorted(range(len(idx)), key=lambda i: tuple(new[i, 1:])):
            if no_better(new[i]):  # the partial pattern bounds every completion's from below
                continue
            c = int(cand[idx[i]])
            dfs(
                int(idx[i]) + 1,
                np.concatenate([xors, xors ^ c]),
                np.concatenate([sizes, sizes + 1]),
                new[i],
                [*gens, c],
            )

    dfs(0, np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(k + 1, np.int64), [])
    if best[1] is None:
        return None, None, complete
    return [_indices(g) for g in best[1]], best[0], complete


# --- coding-theory bounds on the resolution ----------------------------------------------------------------------
def resolution_upper_bound(k: int, p: int) -> int:
    """The largest resolution R that the Griesmer bound (on the [k, p, R] code of the defining relation)
    and the Rao bound (on the 2^(k−p)-run orthogonal array of strength R − 1) both allow.

    Griesmer: k ≥ Σ_{i<p} ⌈R / 2^i⌉. Rao, strength t = R − 1 with N = 2^(k−p) runs:
    N ≥ Σ_{i≤t/2} C(k, i) for even t, Σ_{i≤(t−1)/2} C(k, i) + C(k−1, (t−1)/2) for odd t.
    """
    from math import comb

    n_runs = 1 << (k - p)
    best = 0
    for r in range(1, k + 1):
        griesmer = sum(-(-r // (1 << i)) for i in range(p)) <= k
        t = r - 1
        if t % 2 == 0:
            rao = sum(comb(k, i) for i in range(t // 2 + 1))
        else:
            rao = sum(comb(k, i) for i in range((t - 1) // 2 + 1)) + comb(k - 1, (t - 1) // 2)
        if griesmer and rao <= n_runs:
            best = r
    return best


def _table_line(k: int, p: int, generators: list[tuple[int, ...]]) -> str:
    words = ", ".join(repr("".join(LETTERS[i] for i in g)) for g in generators)
    return f"    ({k}, {p}): ({words},),"


if __name__ == "__main__":  # regenerate MIN_ABERRATION_GENERATORS
    for k_ in range(3, MAX_DESIGN_FACTORS + 1):
        for p_ in range(1, max_fraction(k_) + 1):
            gens, wlp_, done = search_min_aberration(k_, p_)
            print(_table_line(k_, p_, gens) + ("" if done else "  # search did not finish"), "# WLP", wlp_[2:6])
