"""Run a subset of a grid: ``bench run SPEC --tasks A,B --tricks ema,posthoc_ema --seeds 0-3,7``.

When to call: after the grid is expanded (:func:`bench.grid.expand`), to filter its cells. A
selection only drops cells; the cells it keeps are the grid's own, so their run ids (a hash of
the resolved config) are the ones a launch of the whole grid uses, and their results are shared
with it. The stored ``grid.yaml`` stays the whole grid; reports show the runs that exist.

- ``--tasks``: task labels of the spec (the keys under ``tasks``).
- ``--tricks``: keeps the arms whose tricks are all selected — the baseline (no trick) always;
  ``+ema`` for ``--tricks ema``; a factorial arm ``ema+mixup`` only if both are selected.
- ``--seeds``: seeds of the grid, as a comma list of numbers and inclusive ranges (``0-3,7``).

Every flag is validated against the grid (not the registry): a name that is not in it is an error
naming the flag, the value, what the grid has and a did-you-mean. Selecting no run at all is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tricks.card import did_you_mean

__all__ = ["Selection", "parse_names", "parse_seeds", "select_cells"]


@dataclass(frozen=True)
class Selection:
    """Which tasks, tricks and seeds of a grid to run; None = all of them."""

    tasks: tuple[str, ...] | None = None
    tricks: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None

    @property
    def empty(self) -> bool:
        return self.tasks is None and self.tricks is None and self.seeds is None

    def describe(self) -> str:
        """The flags as given, e.g. ``--tricks ema --seeds 0-3``."""
        parts = []
        if self.tasks is not None:
            parts.append("--tasks " + ",".join(self.tasks))
        if self.tricks is not None:
            parts.append("--tricks " + ",".join(self.tricks))
        if self.seeds is not None:
            parts.append("--seeds " + _ranges(self.seeds))
        return " ".join(parts)


def parse_names(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """``["a,b", "c"]`` (the flag given once or repeated, comma-separated) → ``("a", "b", "c")``."""
    if values is None:
        return None
    names = [n.strip() for v in values for n in v.split(",")]
    return tuple(dict.fromkeys(n for n in names if n))


def parse_seeds(values: Sequence[str] | None) -> tuple[int, ...] | None:
    """``["0-3,7"]`` → ``(0, 1, 2, 3, 7)``; ValueError naming ``--seeds`` and the bad part."""
    if values is None:
        return None
    seeds: list[int] = []
    allowed = "comma-separated seeds and inclusive ranges, e.g. 0-3,7"
    for value in values:
        for part in value.split(","):
            part = part.strip()
            lo, sep, hi = part.partition("-")
            try:
                a = int(lo)
                b = int(hi) if sep else a
            except ValueError:
                raise ValueError(f"--seeds: {part!r} is not allowed; allowed: {allowed}") from None
            if a < 0 or b < a:
                raise ValueError(f"--seeds: {part!r} is not allowed; allowed: {allowed} (non-negative, low-high)")
            seeds.extend(range(a, b + 1))
    return tuple(dict.fromkeys(seeds))


def _ranges(seeds: Iterable[int]) -> str:
    """``(0, 1, 2, 3, 7)`` → ``0-3,7``."""
    out: list[str] = []
    run: list[int] = []
    for s in sorted(set(seeds)):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def select_cells(cells: Sequence, spec, selection: Selection) -> list:
    """The cells of ``spec``'s grid that the selection keeps, in grid order (run ids unchanged).

    ``cells`` are ``bench.grid.Cell`` s of ``spec`` (a ``GridSpec``). Raises ValueError naming the
    flag when a task, trick or seed is not in the grid, or when nothing is left.
    """
    if selection.empty:
        return list(cells)
    labels = [t.label for t in spec.tasks]
    tasks = set(labels)
    if selection.tasks is not None:
        for name in selection.tasks:
            if name not in tasks:
                hint = did_you_mean(name, labels)
                raise ValueError(
                    f"--tasks: {name!r} is not a task of grid {spec.grid}; allowed: {', '.join(labels)}"
                    + (f" ({hint})" if hint else "")
                )
        tasks = set(selection.tasks)
    if selection.tricks is not None:
        in_grid = list(dict.fromkeys(t for task in spec.tasks if task.label in tasks for t in task.tricks))
        for name in selection.tricks:
            if name not in in_grid:
                hint = did_you_mean(name, in_grid)
                raise ValueError(
                    f"--tricks: {name!r} is not a trick of the selected tasks of grid {spec.grid}; allowed: "
                    f"{', '.join(in_grid) or '(none)'}" + (f" ({hint})" if hint else "")
                )
    if selection.seeds is not None:
        for seed in selection.seeds:
            if seed not in spec.seeds:
                raise ValueError(
                    f"--seeds: {seed} is not a seed of grid {spec.grid}; allowed: {_ranges(spec.seeds)} "
                    "(the override seeds=N or seeds=[...] changes the grid's seeds)"
                )
    tricks = set(selection.tricks) if selection.tricks is not None else None
    seeds = set(selection.seeds) if selection.seeds is not None else None
    kept = [
        c
        for c in cells
        if c.task in tasks and (tricks is None or set(c.tricks_on) <= tricks) and (seeds is None or c.seed in seeds)
    ]
    if not kept:
        raise ValueError(
            f"{selection.describe()}: selects no run of grid {spec.grid} "
            f"(design {spec.design}: no arm has only the selected tricks)"
        )
    return kept
