"""Launching a grid: validate → expand → record the resolved spec → train what is not done.

Shared by ``bench run`` and the tests. Validation happens before anything is written;
finished runs (``result.json`` present) are skipped by content (run_id), checkpointed
runs resume, crashed runs are re-run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import store
from bench.grid import Cell, expand
from bench.overrides import RECORD_KEY, apply_overrides, parse_overrides, split_record
from bench.selection import Selection, select_cells
from bench.spec import GridSpec, parse_spec
from bench.specfile import DEFAULT_MAX_RUNS, load_yaml

__all__ = ["LaunchPlan", "code_version", "grid_cells", "paired_in_time", "plan", "write_grid_spec"]


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
    """What a launch will do: the cells of the grid it covers (all, or a selection), and those still to train.

    ``overrides`` are the command-line overrides the spec was launched with (those recorded in a
    stored ``grid.yaml`` it was read from first); ``grid_size`` the number of cells of the whole grid.
    """

    spec: GridSpec
    grid_dir: Path
    cells: list[Cell]
    todo: list[Cell]
    status: dict[str, str]  # run_id -> on-disk status before the launch
    overrides: tuple[str, ...] = ()
    selection: Selection = field(default_factory=Selection)
    grid_size: int | None = None
    #: run_id -> the parts of the code that changed since it trained (finished or checkpointed runs)
    stale: dict[str, list[str]] = field(default_factory=dict)
    rerun_stale: bool = False

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for s in self.status.values():
            counts[s] = counts.get(s, 0) + 1
        parts = [f"{n} {s}" for s, n in sorted(counts.items())]
        lines = [
            f"grid {self.spec.grid}: {len(self.cells)} runs ({', '.join(parts)}); "
            f"{len(self.todo)} to train, {len(self.cells) - len(self.todo)} already finished or kept"
        ]
        if self.stale:
            changed = sorted({p for parts in self.stale.values() for p in parts})
            lines.append(
                f"{len(self.stale)} runs were trained by other code than this ({'; '.join(changed)} changed): "
                + (
                    "moved aside to stale/ and trained again (--rerun-stale)"
                    if self.rerun_stale
                    else "kept as they are, not resumed, and marked in the report; `bench run --rerun-stale` "
                    "trains them again"
                )
            )
        if self.overrides:
            lines.append("overrides: " + " ".join(self.overrides))
        if self.spec.design == "fractional_factorial":
            lines += [design_lines(t.label, list(t.tricks), self.spec.fraction) for t in self.spec.tasks if t.tricks]
        if not self.selection.empty:
            lines.append(
                f"selection {self.selection.describe()}: {len(self.cells)} of the grid's {self.grid_size} runs "
                "(the same run ids as in the whole grid)"
            )
        return "\n".join(lines)

    @property
    def grid_tricks(self) -> dict[str, list[str]]:
        return {t.label: list(t.tricks) for t in self.spec.tasks}


def design_lines(label: str, tricks: list[str], fraction: int) -> str:
    """What a fractional factorial of ``tricks`` confounds: resolution, generators, defining relation, aliases."""
    from bench.designs import fractional_design

    d = fractional_design(len(tricks), fraction)
    aliases = d.alias_labels(tricks)
    return (
        f"{label}: fractional factorial 2^({len(tricks)}-{fraction}) = {len(d.rows)} arms, resolution {d.resolution}"
        f"; generators {'; '.join(d.generator_labels(tricks))}; defining relation {', '.join(d.word_labels(tricks))}"
        + (
            f"; aliased: {'; '.join(aliases)}"
            if aliases
            else "; no main effect or two-trick interaction aliased with another"
        )
    )


def plan(
    spec_path: str | Path,
    results_root: Path,
    overrides: Sequence[str] = (),
    selection: Selection | None = None,
    max_runs: int = DEFAULT_MAX_RUNS,
    rerun_stale: bool = False,
) -> LaunchPlan:
    """Validate the spec with its overrides and work out what to train; raises SpecError / ValueError, writes nothing.

    ``overrides`` (Hydra grammar, :mod:`bench.overrides`) are applied to the raw YAML mapping before
    validation; ``selection`` (:mod:`bench.selection`) keeps a subset of the expanded cells.
    """
    parsed = parse_overrides(overrides)  # grammar errors first, before the file is read
    raw, recorded = split_record(load_yaml(spec_path))  # file, YAML and size limits first (bench.specfile)
    if parsed:
        raw = apply_overrides(raw, parsed, source=str(spec_path))
    source = f"{spec_path} with overrides" if parsed else str(spec_path)
    spec = parse_spec(raw, source=source, max_runs=max_runs)
    return plan_for(spec, results_root, (*recorded, *overrides), selection or Selection(), rerun_stale=rerun_stale)


def plan_for(
    spec: GridSpec,
    results_root: Path,
    overrides: Sequence[str] = (),
    selection: Selection | None = None,
    rerun_stale: bool = False,
) -> LaunchPlan:
    """What a launch of validated ``spec`` trains: its cells (or a selection), minus those finished — and
    minus those trained by other code, unless ``rerun_stale`` (then they are trained again)."""
    selection = selection or Selection()
    grid = expand(spec)
    cells = select_cells(grid, spec, selection)
    gdir = store.grid_dir(results_root, spec.grid)
    status = {c.run_id: store.run_status(store.run_dir(results_root, spec.grid, c.run_id)) for c in cells}
    stale = stale_runs(cells, results_root, status)
    todo = [
        c
        for c in paired_in_time(cells)  # seed-major, the arms of a seed side by side: cost ratios are paired in time
        if (status[c.run_id] not in store.RunStatus.FINISHED and c.run_id not in stale)
        or (rerun_stale and c.run_id in stale)
    ]
    return LaunchPlan(spec, gdir, cells, todo, status, tuple(overrides), selection, len(grid), stale, rerun_stale)


def paired_in_time(cells: Sequence[Cell]) -> list[Cell]:
    """``cells`` in the order executors start them: seed-major, the arms of one seed (per task) next to each
    other, their order reversed on every other seed (A B, B A, ...).

    Cost ratios compare the runs of one seed (:func:`bench.stats.paired_ratio`); run next to each other,
    both see the same machine load, so a load that drifts during a grid cancels in each ratio (and a
    linear drift, by the reversed order, in their mean) instead of landing on the arms that run later.
    """
    seeds = {s: i for i, s in enumerate(dict.fromkeys(c.seed for c in cells))}
    tasks = {t: i for i, t in enumerate(dict.fromkeys(c.task for c in cells))}
    arms: dict[tuple[str, str], int] = {}
    for c in cells:
        arms.setdefault((c.task, c.arm), len(arms))

    def key(c: Cell) -> tuple[int, int, int]:
        s, a = seeds[c.seed], arms[(c.task, c.arm)]
        return s, tasks[c.task], -a if s % 2 else a

    return sorted(cells, key=key)


def stale_runs(cells: Sequence[Cell], results_root: Path, status: dict[str, str]) -> dict[str, list[str]]:
    """Finished or checkpointed runs whose recorded code fingerprint differs from today's code.

    run_id -> the parts that changed (``bench.fingerprint.stale_parts``). Fingerprints are computed once
    per (task, tricks) combination; a run without a readable ``config.json`` is left to the integrity
    checks (it is damaged, not stale).
    """
    from bench.fingerprint import run_fingerprint, stale_parts

    current: dict[tuple[str, tuple[str, ...]], dict] = {}
    out: dict[str, list[str]] = {}
    for c in cells:
        if status[c.run_id] not in (*store.RunStatus.FINISHED, store.RunStatus.PARTIAL):
            continue
        try:
            recorded = store.read_json(store.run_dir(results_root, c.grid, c.run_id) / store.CONFIG).get("fingerprint")
        except (OSError, ValueError, AttributeError):
            continue
        key = (c.config["task"], tuple(sorted(c.config["tricks"])))
        if key not in current:
            current[key] = run_fingerprint(c.config)
        parts = stale_parts(recorded, current[key])
        if parts:
            out[c.run_id] = parts
    return out


class _PlainDumper(yaml.SafeDumper):
    """Writes every value out: no anchors and aliases for objects the resolved spec shares (the spec
    loader refuses them, as it refuses them in a user's spec)."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def write_grid_spec(spec: GridSpec, gdir: Path, overrides: Sequence[str] = ()) -> None:
    """Store the resolved spec as ``grid.yaml``; a different earlier version is kept in ``history/``.

    ``overrides`` are recorded beside it as a top-level ``overrides:`` list (provenance; the
    resolved spec already has them applied). The whole grid is stored even when a launch selects
    a subset of it.
    """
    data = spec.to_dict() | ({RECORD_KEY: list(overrides)} if overrides else {})
    text = yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, allow_unicode=True)
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
    raw, _recorded = split_record(load_yaml(path))
    spec = GridSpec.from_resolved(raw, source=str(path))  # resolved at launch: no registry, no torch
    return spec, expand(spec)
