"""``bench run --until-decisive``: train a grid in rounds and add seeds only where the answer is still open.

The spec's ``seeds`` are the cap: the seeds an arm may use, in order. Round 1 trains the first
``first_seeds`` of every arm; after each round the stored results are analysed with the
group-sequential procedure of :mod:`bench.sequential` (repeated confidence intervals with error
spending; the family-wise error of all claims stays ≤ α whatever the stopping), and every arm
whose verdict is still open gets ``round_seeds`` more seeds — the reference arm (the baseline of
``one_at_a_time``, the all-tricks arm of ``leave_one_out``) runs every seed any open arm runs,
so pairs stay paired. An arm stops when it is decisive (helps, hurts, equivalent within
``--margin``), futile (optional), or at the cap.

The plan (cap, round sizes, margin, one family of K arms per task) and every round's seed
assignment are stored in ``<grid>/adaptive.json`` before the round trains: a re-launch finishes
the assigned runs and goes on from what is stored, on any executor (a SLURM round is submitted as
arrays and waited for). A re-launch with another plan is refused — changing the cap after
seeing data voids the error guarantee. Decisions are pure functions of the stored results, so
the same runs always give the same decisions.

Factorial designs are not supported (their terms share every run: a block of seeds would be
added while any term is open); use one_at_a_time or leave_one_out.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import store
from bench.grid import Cell, design_arms, expand
from bench.sequential import ArmDecision, SequentialPlan, decide, next_round
from bench.spec import GridSpec

__all__ = ["STATE", "AdaptiveGrid", "AdaptiveOptions", "render_decisions"]

STATE = "adaptive.json"
STATE_FORMAT = 1
DESIGNS = ("one_at_a_time", "leave_one_out")


@dataclass(frozen=True)
class AdaptiveOptions:
    """The command-line part of the plan (``--first-seeds``, ``--round-seeds``, ``--margin``, ``--futility``)."""

    first_seeds: int = 3
    round_seeds: int = 3
    margin: float | None = None
    futility: float = 0.0
    alpha: float = 0.05


@dataclass(frozen=True)
class Family:
    """One task block's arms: the reference arm and, per trick, the arm whose difference from it is the effect."""

    label: str
    reference: str
    arms: dict[str, str]  # arm -> the trick its paired difference measures
    higher_is_better: bool
    metric: str
    plan: SequentialPlan


def _families(spec: GridSpec, options: AdaptiveOptions) -> dict[str, Family]:
    from experiments.registry import get_task

    if spec.design not in DESIGNS:
        raise ValueError(
            f"--until-decisive: design {spec.design!r} is not supported; allowed: {', '.join(DESIGNS)} (a factorial's "
            "terms share every run)"
        )
    out = {}
    for task in spec.tasks:
        tricks = list(task.tricks)
        if not tricks:
            continue
        arms = design_arms(spec.design, tricks)
        reference = arms[0][0]  # "baseline" (one_at_a_time) or "all" (leave_one_out)
        if spec.design == "one_at_a_time":
            by_arm = {arm: on[0] for arm, on in arms[1:]}
        else:
            by_arm = {arm: next(t for t in tricks if t not in on) for arm, on in arms[1:]}
        cls = get_task(task.task)
        try:
            plan = SequentialPlan(
                n_arms=len(by_arm),
                max_seeds=len(spec.seeds),
                first_seeds=options.first_seeds,
                round_seeds=options.round_seeds,
                alpha=options.alpha,
                margin=options.margin,
                futility=options.futility,
            )
        except ValueError as exc:
            raise ValueError(
                f"--until-decisive (task {task.label}, cap = the spec's {len(spec.seeds)} seeds): {exc}"
            ) from None
        out[task.label] = Family(task.label, reference, by_arm, cls.higher_is_better, cls.metric, plan)
    if not out:
        raise ValueError("--until-decisive: no task block has tricks; nothing to decide")
    return out


class AdaptiveGrid:
    """The stored state of an adaptive grid: its plan and the seeds assigned to each arm, round by round."""

    def __init__(self, spec: GridSpec, gdir: Path, options: AdaptiveOptions) -> None:
        self.spec, self.gdir = spec, Path(gdir)
        self.families = _families(spec, options)
        self.cells = {(c.task, c.arm, c.seed): c for c in expand(spec)}
        self.path = self.gdir / STATE
        plans = {label: fam.plan.to_dict() for label, fam in self.families.items()}
        self.rounds: dict[str, list[dict[str, int]]] = {label: [] for label in self.families}  # per round: arm -> n
        if self.path.exists():
            stored = store.read_json(self.path)
            if stored.get("format") != STATE_FORMAT or stored.get("seeds") != list(spec.seeds):
                raise ValueError(f"{self.path}: written for another grid or format; move it aside to start over")
            if stored.get("plans") != plans:
                raise ValueError(
                    f"--until-decisive: this grid was started with another plan ({self.path}); changing the cap, the "
                    "round sizes or the margin after seeing results voids the error guarantee. Relaunch with the same "
                    "options, or move the grid folder aside to start a new adaptive grid"
                )
            self.rounds = {label: list(stored["rounds"].get(label, [])) for label in self.families}
        self._plans = plans

    # --- seeds ----------------------------------------------------------------------------------------------
    def seeds_of(self, label: str) -> dict[str, int]:
        """Seeds (how many of the spec's, in order) assigned so far to each arm of task ``label``; reference too."""
        fam = self.families[label]
        counts = dict.fromkeys(fam.arms, 0)
        for rnd in self.rounds[label]:
            for arm, n in rnd.items():
                if arm in counts:
                    counts[arm] = n
        counts[fam.reference] = max(counts.values(), default=0)
        return counts

    def assigned_cells(self) -> list[Cell]:
        """Every run assigned so far, seed-major (arms of one seed adjacent: paired in time)."""
        out = []
        for label in self.families:
            counts = self.seeds_of(label)
            for i, seed in enumerate(self.spec.seeds):
                out += [self.cells[(label, arm, seed)] for arm, n in counts.items() if i < n]
        return out

    # --- decisions ------------------------------------------------------------------------------------------
    def decisions(self) -> dict[str, dict[str, ArmDecision]]:
        """Each task's arms as the stored results decide them now (see :func:`bench.sequential.decide`)."""
        frame = store.load_grid(self.gdir)
        out = {}
        for label, fam in self.families.items():
            rows = (
                frame[(frame["task"] == label) & (frame["status"] == store.RunStatus.COMPLETED)]
                if len(frame)
                else frame
            )
            col = f"metric.{fam.metric}"
            values: dict[tuple[str, int], float] = {}
            if len(rows) and col in rows:
                for arm, seed, v in zip(rows["arm"], rows["seed"], rows[col]):
                    values[(arm, int(seed))] = float(v)
            counts = self.seeds_of(label)
            out[label] = {}
            for arm in fam.arms:
                diffs, rounds = [], []
                for i, seed in enumerate(self.spec.seeds[: counts[arm]]):
                    arm_value, ref_value = values.get((arm, seed)), values.get((fam.reference, seed))
                    if _usable(arm_value) and _usable(ref_value):
                        # the trick on − off: +t − baseline (one_at_a_time), all − (all − t) (leave_one_out)
                        on_minus_off = arm_value - ref_value if fam.reference != "all" else ref_value - arm_value
                        diffs.append(on_minus_off)
                        rounds.append(self._round_of(label, arm, i))
                out[label][arm] = decide(diffs, fam.plan, higher_is_better=fam.higher_is_better, rounds=rounds, arm=arm)
        return out

    def _round_of(self, label: str, arm: str, index: int) -> int:
        for r, rnd in enumerate(self.rounds[label]):
            if index < rnd.get(arm, 0):
                return r
        return len(self.rounds[label])

    def advance(self, decisions: dict[str, dict[str, ArmDecision]]) -> bool:
        """Assign the next round's seeds to the open arms (stored before they train); False when all have stopped."""
        added = False
        for label, fam in self.families.items():
            counts = self.seeds_of(label)
            extra = (
                next_round(decisions[label], fam.plan)
                if self.rounds[label]
                else dict.fromkeys(fam.arms, fam.plan.first_seeds)
            )
            new = {arm: min(counts[arm] + extra.get(arm, 0), fam.plan.max_seeds) for arm in fam.arms}
            if any(new[arm] > counts[arm] for arm in fam.arms):
                self.rounds[label].append(new)
                added = True
        self.save()
        return added

    def save(self) -> None:
        store.atomic_write_json(
            self.path,
            {"format": STATE_FORMAT, "seeds": list(self.spec.seeds), "plans": self._plans, "rounds": self.rounds},
        )

    def record(self, decisions: dict[str, dict[str, ArmDecision]]) -> None:
        """Store the latest decisions beside the plan (for ``bench report`` and ``bench status``)."""
        doc = store.read_json(self.path) if self.path.exists() else {}
        doc["decisions"] = {label: {arm: d.as_dict() for arm, d in arms.items()} for label, arms in decisions.items()}
        doc["runs_spent"] = len(self.assigned_cells())
        doc["runs_fixed_design"] = len(self.cells)
        store.atomic_write_json(self.path, doc)


def _usable(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def render_decisions(grid: AdaptiveGrid, decisions: dict[str, dict[str, ArmDecision]]) -> str:
    """The per-arm outcome as text: verdict, seeds used, the repeated interval and why it stopped."""
    lines = []
    for label, arms in decisions.items():
        fam = grid.families[label]
        lines.append(
            f"{label}: {fam.metric} ({'higher' if fam.higher_is_better else 'lower'} is better); "
            f"family of {fam.plan.n_arms} arms, α = {fam.plan.alpha:g}, cap {fam.plan.max_seeds} seeds"
        )
        for arm, d in arms.items():
            interval = f"[{d.low:+.4g}, {d.high:+.4g}]" if math.isfinite(d.low) else "—"
            lines.append(
                f"  {fam.arms[arm]:<24} {d.verdict:<12} seeds {d.n:>3}  Δ {d.mean:+.4g} {interval}  {d.reason}"
            )
    spent, fixed = len(grid.assigned_cells()), len(grid.cells)
    lines.append(f"runs: {spent} trained of the {fixed} a fixed design with every seed would train")
    return "\n".join(lines)


def describe_plan(grid: AdaptiveGrid) -> str:
    fam = next(iter(grid.families.values()))
    p = fam.plan
    margin = f", equivalence margin ±{p.margin:g}" if p.margin is not None else ""
    return (
        f"until decisive: rounds of {p.first_seeds} then {p.round_seeds} seeds per open arm, cap {p.max_seeds} "
        f"(the spec's seeds), family-wise α {p.alpha:g} per task{margin}"
    )


def state_summary(gdir: Path) -> dict[str, Any] | None:
    """The stored decisions of an adaptive grid (None for a fixed grid), for reports."""
    path = Path(gdir) / STATE
    try:
        return dict(store.read_json(path))
    except (OSError, ValueError):
        return None


def options_of(args: Any) -> AdaptiveOptions:
    """The adaptive plan's options from ``bench run``'s flags (ValueError naming the flag)."""
    for flag, value, low in (("--first-seeds", args.first_seeds, 2), ("--round-seeds", args.round_seeds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{flag}: {value!r} is not allowed; allowed: an integer ≥ {low}")
    if args.margin is not None and not (math.isfinite(args.margin) and args.margin > 0):
        raise ValueError(f"--margin: {args.margin!r} is not allowed; allowed: a positive number (metric units)")
    if not 0 <= args.futility < 1:
        raise ValueError(f"--futility: {args.futility!r} is not allowed; allowed: 0 ≤ futility < 1 (0: never)")
    return AdaptiveOptions(args.first_seeds, args.round_seeds, args.margin, args.futility)


def check_launch(launch: Any, args: Any) -> AdaptiveGrid:
    """Validate an adaptive launch before anything is written; return its (not yet stored) state."""
    if not launch.selection.empty:
        raise ValueError("--until-decisive: not allowed with --tasks/--tricks/--seeds (the rounds choose the seeds)")
    return AdaptiveGrid(launch.spec, launch.grid_dir, options_of(args))


def run_adaptive(launch: Any, args: Any, slurm: Any, version: str, cluster: Any) -> int:
    """Train ``launch``'s grid in rounds until every arm is decisive or at its cap; exit status as ``bench run``."""
    from dataclasses import replace

    from bench import commands

    grid = check_launch(launch, args)
    print(describe_plan(grid))
    commands.write_grid_spec(launch.spec, launch.grid_dir, launch.overrides)
    launch = commands.set_aside_damaged(launch, args) if slurm is None else launch
    round_no = 0
    while True:
        todo = [c for c in grid.assigned_cells() if launch_status(c, args.results) not in store.RunStatus.FINISHED]
        if todo:
            round_no += 1
            print(f"round {round_no}: training {len(todo)} runs", flush=True)
            if slurm is not None:
                code = commands._run_slurm(
                    replace(launch, todo=todo), args, replace(slurm, wait=True), version, cluster
                )
                if code:
                    return code
            else:
                commands.train_locally(todo, launch, args, version)
            unfinished = [c for c in todo if launch_status(c, args.results) not in store.RunStatus.FINISHED]
            if unfinished:
                store.write_summary(launch.grid_dir)
                print(
                    f"error: round {round_no}: {len(unfinished)} runs did not finish (see bench status "
                    f"{launch.grid_dir}); re-launch the same command to retry them and go on",
                    file=sys.stderr,
                )
                return 1
        decisions = grid.decisions()
        more = grid.advance(decisions)  # the next round's seeds are stored before they train
        grid.record(decisions)
        if not more:
            break
    store.write_summary(launch.grid_dir)
    print(render_decisions(grid, decisions))
    commands._write_report(launch.grid_dir, args)
    return 0


def launch_status(cell: Cell, results: Path) -> str:
    return store.run_status(store.run_dir(results, cell.grid, cell.run_id))
