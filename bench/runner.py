"""Launching a grid: validate → expand → record the resolved spec → train what is not done.

Shared by ``bench run`` and the tests. Validation happens before anything is written;
finished runs (``result.json`` present) are skipped by content (run_id), checkpointed
runs resume, crashed runs are re-run.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import store
from bench.grid import Cell, expand
from bench.spec import GridSpec, load_spec, parse_spec

__all__ = ["LaunchPlan", "code_version", "grid_cells", "plan", "write_grid_spec"]


def code_version() -> str:
    """``git describe`` of the checkout the code runs from, or the package version."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import version

        return f"trickbench {version('trickbench')}"


@dataclass
class LaunchPlan:
    """What a launch will do: all cells of the grid, and those still to train."""

    spec: GridSpec
    grid_dir: Path
    cells: list[Cell]
    todo: list[Cell]
    status: dict[str, str]  # run_id -> on-disk status before the launch

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for s in self.status.values():
            counts[s] = counts.get(s, 0) + 1
        parts = [f"{n} {s}" for s, n in sorted(counts.items())]
        return (
            f"grid {self.spec.grid}: {len(self.cells)} runs ({', '.join(parts)}); "
            f"{len(self.todo)} to train, {len(self.cells) - len(self.todo)} already finished"
        )

    @property
    def grid_tricks(self) -> dict[str, list[str]]:
        return {t.label: list(t.tricks) for t in self.spec.tasks}


def plan(spec_path: str | Path, results_root: Path) -> LaunchPlan:
    """Validate the spec (raises SpecError, nothing written) and work out what to train."""
    spec = load_spec(spec_path)
    return plan_for(spec, results_root)


def plan_for(spec: GridSpec, results_root: Path) -> LaunchPlan:
    cells = expand(spec)
    gdir = store.grid_dir(results_root, spec.grid)
    status = {c.run_id: store.run_status(store.run_dir(results_root, spec.grid, c.run_id)) for c in cells}
    todo = [c for c in cells if status[c.run_id] not in store.RunStatus.FINISHED]
    return LaunchPlan(spec, gdir, cells, todo, status)


def write_grid_spec(spec: GridSpec, gdir: Path) -> None:
    """Store the resolved spec as ``grid.yaml``; a different earlier version is kept in ``history/``."""
    text = yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True)
    path = gdir / "grid.yaml"
    if path.exists() and path.read_text() != text:
        hist = gdir / "history"
        hist.mkdir(parents=True, exist_ok=True)
        n = len(list(hist.glob("grid-*.yaml"))) + 1
        store.atomic_write_text(hist / f"grid-{n:03d}.yaml", path.read_text())
    store.atomic_write_text(path, text)


def grid_cells(gdir: Path) -> tuple[GridSpec, list[Cell]]:
    """The spec and cells of a launched grid, from its stored ``grid.yaml``."""
    path = Path(gdir) / "grid.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{gdir} is not a launched grid (no grid.yaml); run `bench run SPEC` first")
    spec = parse_spec(yaml.safe_load(path.read_text()), source=str(path))
    return spec, expand(spec)
