"""Grid expansion: a validated spec → the list of runs (cells), each with a stable ``run_id``.

cells = design(tricks of the task) × seeds. Seed *s* of every arm uses the same seed
bundle, so arms are paired. ``run_id`` is a hash of the run's resolved config (task,
params, train, tricks that are on with their parameters, seed): the same config gets the
same id in every launch, which is how re-launches skip finished runs by content.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any

from bench.designs import fractional_design
from bench.spec import GridSpec, TaskSpec

__all__ = ["CONFIG_VERSION", "Cell", "design_arms", "expand", "fractional_design", "run_id_of"]

#: bump when a change to the loop alters what a given config computes (invalidates run_ids)
CONFIG_VERSION = 1
MAX_FACTORIAL_TRICKS = 12


@dataclass(frozen=True)
class Cell:
    """One run of a grid: a task, an arm (set of tricks on) and a seed."""

    grid: str
    task: str  # the task label of the spec (the registered task name is config["task"])
    arm: str
    tricks_on: tuple[str, ...]
    seed: int
    config: dict[str, Any]
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "task": self.task,
            "arm": self.arm,
            "tricks_on": list(self.tricks_on),
            "seed": self.seed,
            "config": self.config,
            "run_id": self.run_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Cell:
        return cls(
            grid=d["grid"],
            task=d["task"],
            arm=d["arm"],
            tricks_on=tuple(d["tricks_on"]),
            seed=d["seed"],
            config=d["config"],
            run_id=d["run_id"],
        )


def run_id_of(config: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of the resolved config."""
    canonical = json.dumps({"v": CONFIG_VERSION, **config}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def design_arms(design: str, tricks: list[str], fraction: int = 0) -> list[tuple[str, tuple[str, ...]]]:
    """(arm label, tricks on) for a design over ``tricks`` (spec order kept)."""
    if design == "one_at_a_time":
        return [("baseline", ())] + [(f"+{t}", (t,)) for t in tricks]
    if design == "leave_one_out":
        if not tricks:
            return [("baseline", ())]
        return [("all", tuple(tricks))] + [(f"all-{t}", tuple(x for x in tricks if x != t)) for t in tricks]
    if design in ("full_factorial", "fractional_factorial"):
        if len(tricks) > MAX_FACTORIAL_TRICKS:
            raise ValueError(f"design {design}: {len(tricks)} tricks is too many (at most {MAX_FACTORIAL_TRICKS})")
        if design == "full_factorial" or not tricks:
            rows = list(itertools.product((0, 1), repeat=len(tricks)))
        else:
            rows = list(fractional_design(len(tricks), fraction).rows)
        arms = []
        for row in rows:
            on = tuple(t for t, bit in zip(tricks, row) if bit)
            arms.append(("baseline" if not on else "+".join(on), on))
        return arms
    raise ValueError(f"unknown design {design!r}")


def _cell_config(task: TaskSpec, on: tuple[str, ...], seed: int) -> dict[str, Any]:
    label = {"label": task.label} if task.label != task.task else {}
    return {
        "task": task.task,
        **label,
        "params": task.params,
        "train": task.train,
        "tricks": {t: task.tricks[t] for t in on},
        "seed": seed,
    }


def expand(spec: GridSpec) -> list[Cell]:
    """All cells of the grid, seeds innermost, duplicates (same run_id) removed."""
    cells: list[Cell] = []
    seen: set[str] = set()
    for task in spec.tasks:
        for arm, on in design_arms(spec.design, list(task.tricks), spec.fraction):
            for seed in spec.seeds:
                config = _cell_config(task, on, seed)
                rid = run_id_of(config)
                if rid in seen:
                    continue
                seen.add(rid)
                cells.append(Cell(spec.grid, task.label, arm, on, seed, config, rid))
    return cells
