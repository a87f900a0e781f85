"""``bench equiv``: is a re-implementation of a trick equivalent to the reference, on a task, over paired seeds?

When to call: from the CLI (``bench equiv TASK REFERENCE CANDIDATE``), or :func:`plan_equivalence` +
:func:`train_equivalence` + :func:`assess` from code. Order of work:

1. :func:`plan_equivalence` writes the comparison as an ordinary grid spec (validated like any spec,
   so unknown names, settings a task cannot honour and conflicting tricks are exit-2 errors before
   anything trains): design ``one_at_a_time`` over the two tricks on one task block — the arms
   *baseline*, *reference*, *candidate* — or, for two settings of one trick, two blocks labelled
   ``reference`` and ``candidate``. Every arm of a seed draws the same random streams (paired).
2. :func:`train_equivalence` trains what is not finished into ``results/<grid>/`` (resumable;
   ``bench status`` and ``bench report`` read it like any grid).
3. :func:`assess` reads the runs: per seed the metric of each arm and the largest absolute
   difference between the reference's and the candidate's final evaluated weights
   (``final_model.pt``: 0 when the two compute the same numbers); δ (given, or a fraction of the
   baseline's seed spread); the paired TOST of :mod:`bench.equivalence`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import store
from bench.equivalence import TostResult, delta_from_spread, seed_spread, seeds_for_equivalence, tost, tost_power
from bench.grid import Cell, expand
from bench.spec import GridSpec, parse_spec
from tricks.card import did_you_mean

__all__ = [
    "BASELINE",
    "DEFAULT_DELTA_SD",
    "DEFAULT_SEEDS",
    "EquivPlan",
    "EquivReport",
    "assess",
    "cmd_equiv",
    "format_report",
    "plan_equivalence",
    "train_equivalence",
    "weights_difference",
]

BASELINE = "baseline"  # an arm with no trick: "is this trick equivalent to nothing?"
DEFAULT_SEEDS = 10  # docs/extending.md: why ten
DEFAULT_DELTA_SD = 0.25  # δ = a quarter of the baseline's seed SD unless told otherwise
_GRID_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")


@dataclass
class EquivPlan:
    """A planned comparison: the validated spec and, per role (baseline / reference / candidate), its cell per seed."""

    spec: GridSpec
    task: str
    reference: str
    candidate: str
    cells: dict[str, dict[int, Cell]]  # role -> seed -> cell
    all_cells: list[Cell]
    overrides: tuple[str, ...] = ()

    @property
    def seeds(self) -> list[int]:
        return sorted(self.cells["reference"])


@dataclass
class EquivReport:
    """The outcome of one comparison (what ``bench equiv`` prints and stores as JSON)."""

    task: str
    reference: str
    candidate: str
    metric: str
    higher_is_better: bool
    seeds: list[int]
    values: dict[str, list[float]]  # role -> metric per seed (in ``seeds`` order)
    weight_diffs: list[float | None]  # per seed: max |θ_candidate − θ_reference| of the final evaluated weights
    delta: float
    delta_source: str
    result: TostResult
    failures: list[str] = field(default_factory=list)
    identical_atol: float | None = None

    @property
    def weights_identical(self) -> bool | None:
        """Whether every seed's evaluated weights agree within ``identical_atol`` (None: not asked or unknown)."""
        if self.identical_atol is None:
            return None
        return all(d is not None and d <= self.identical_atol for d in self.weight_diffs)

    @property
    def equivalent(self) -> bool:
        return not self.failures and self.result.equivalent and self.weights_identical is not False

    def to_dict(self) -> dict[str, Any]:
        r = self.result
        return {
            "task": self.task,
            "reference": self.reference,
            "candidate": self.candidate,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "seeds": self.seeds,
            "values": self.values,
            "differences": [c - ref for c, ref in zip(self.values["candidate"], self.values["reference"])],
            "max_weight_difference": self.weight_diffs,
            "delta": self.delta,
            "delta_source": self.delta_source,
            "alpha": r.alpha,
            "mean_difference": r.mean_diff,
            "sd_difference": r.sd_diff,
            "ci": [r.ci_low, r.ci_high],
            "ci_level": r.ci_level,
            "p_lower": r.p_lower,
            "p_upper": r.p_upper,
            "identical_atol": self.identical_atol,
            "equivalent": self.equivalent,
            "verdict": "equivalent" if self.equivalent else "not shown equivalent",
        }


# --- plan --------------------------------------------------------------------------------------------


def _arm_tricks(name: str) -> dict[str, Any]:
    return {} if name == BASELINE else {name: None}


def _grid_name(task: str, given: str | None) -> str:
    if given is not None:
        return given
    name = f"equiv-{task}"
    return name if _GRID_NAME.match(name) else "equiv"


def raw_equivalence_spec(
    task: str, reference: str, candidate: str, seeds: int = DEFAULT_SEEDS, grid: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The raw spec mapping of a comparison, and the block label of each role (before overrides)."""
    if reference == candidate == BASELINE:
        raise ValueError("reference/candidate: both are `baseline`; allowed: at least one trick to compare")
    head = {"grid": _grid_name(task, grid), "design": "one_at_a_time", "seeds": seeds}
    if reference != candidate:
        tricks = {**_arm_tricks(reference), **_arm_tricks(candidate)}
        blocks = {task: {"params": {}, "train": {}, "tricks": tricks}}
        labels = {"baseline": task, "reference": task, "candidate": task}
    else:  # two settings of one trick: two task blocks (a trick appears once per block)
        blocks = {
            role: {"task": task, "params": {}, "train": {}, "tricks": _arm_tricks(reference)}
            for role in ("reference", "candidate")
        }
        labels = {"baseline": "reference", "reference": "reference", "candidate": "candidate"}
        head["description"] = f"equivalence of two settings of {reference} on {task}"
    head.setdefault("description", f"equivalence check on {task}: {candidate} against {reference}")
    return {**head, "tasks": blocks}, labels


def _rewrite_overrides(
    texts: list[str], labels: dict[str, str], reference: str, candidate: str
) -> list[Any]:  # list[bench.overrides.Override]
    """The user's short overrides (params./train./reference./candidate./seeds) as paths of the generated spec."""
    from bench.overrides import parse_overrides

    out = []
    blocks = list(dict.fromkeys(labels.values()))
    allowed = ("params", "train", "reference", "candidate", "seeds")
    for ov in parse_overrides(texts):
        head, rest = ov.path[0], ov.path[1:]
        if head in ("params", "train"):
            out += [replace(ov, path=("tasks", b, head, *rest)) for b in blocks]
        elif head in ("reference", "candidate"):
            trick = reference if head == "reference" else candidate
            if trick == BASELINE:
                raise ValueError(f"{ov.text}: the {head} arm is `baseline` (no trick), so it has no settings")
            out.append(replace(ov, path=("tasks", labels[head], "tricks", trick, *rest)))
        elif head == "seeds" and not rest:
            out.append(ov)
        else:
            hint = did_you_mean(head, allowed)
            raise ValueError(
                f"{ov.text}: {head!r} is not allowed as the first key; allowed: params.KEY, train.KEY, "
                "reference.KEY, candidate.KEY (the trick's settings), seeds" + (f" ({hint})" if hint else "")
            )
    return out


def _check_roles(reference: str, candidate: str) -> None:
    """Two tricks of one role (a re-implementation), two settings of one trick, or a trick against ``baseline``."""
    from tricks.registry import cards

    table = cards()
    if BASELINE in (reference, candidate) or reference not in table or candidate not in table:
        return  # unknown names: the spec's validation names them, with a did-you-mean
    a, b = table[reference].role, table[candidate].role
    if a != b:
        raise ValueError(
            f"reference/candidate: {reference} has the role {a!r} and {candidate} the role {b!r}; allowed: two tricks "
            "of one role (a re-implementation of the reference), two settings of one trick, or `baseline`"
        )


def plan_equivalence(
    task: str,
    reference: str,
    candidate: str,
    overrides: list[str] | tuple[str, ...] = (),
    seeds: int | None = None,
    grid: str | None = None,
) -> EquivPlan:
    """Validate a comparison and list its cells; ``SpecError``/``ValueError`` (exit 2), nothing written.

    ``reference`` and ``candidate`` are trick names (or ``baseline``); ``overrides`` in the short
    form of ``bench equiv`` (``params.K=V``, ``train.K=V``, ``reference.K=V``, ``candidate.K=V``,
    ``seeds=[...]``); ``seeds`` the number of paired seeds (0..N−1; default 10).
    """
    from bench.overrides import apply_overrides

    if seeds is not None and (isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2):
        raise ValueError(f"--seeds: {seeds!r} is not allowed; allowed: an integer ≥ 2 (paired seeds)")
    _check_roles(reference, candidate)
    raw, labels = raw_equivalence_spec(task, reference, candidate, seeds or DEFAULT_SEEDS, grid)
    parsed = _rewrite_overrides(list(overrides), labels, reference, candidate)
    source = f"bench equiv {task} {reference} {candidate}"
    spec = parse_spec(apply_overrides(raw, parsed, source) if parsed else raw, source=source)
    if len(spec.seeds) < 2:
        raise ValueError(f"seeds: {list(spec.seeds)} is not allowed; allowed: at least 2 paired seeds")
    want = {
        "baseline": (labels["baseline"], ()),
        "reference": (labels["reference"], tuple(_arm_tricks(reference))),
        "candidate": (labels["candidate"], tuple(_arm_tricks(candidate))),
    }
    all_cells = expand(spec)
    cells: dict[str, dict[int, Cell]] = {role: {} for role in want}
    for c in all_cells:
        for role, (label, on) in want.items():
            if c.task == label and c.tricks_on == on:
                cells[role][c.seed] = c
    return EquivPlan(spec, task, reference, candidate, cells, all_cells, tuple(overrides))


# --- train -------------------------------------------------------------------------------------------


def train_equivalence(
    plan: EquivPlan,
    results_root: Path,
    executor: str = "local",
    jobs: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict[str, int]:
    """Train the comparison's unfinished runs into ``results_root/<grid>/`` (stores ``grid.yaml``); status counts."""
    from bench.executors.local import default_jobs, run_debug, run_local
    from bench.runner import code_version, write_grid_spec

    gdir = store.grid_dir(results_root, plan.spec.grid)
    write_grid_spec(plan.spec, gdir, plan.overrides)
    todo = [
        c
        for c in plan.all_cells
        if store.run_status(store.run_dir(results_root, c.grid, c.run_id)) not in store.RunStatus.FINISHED
    ]
    grid_tricks = {t.label: list(t.tricks) for t in plan.spec.tasks}
    common = {"device": device, "threads": 1, "code_version": code_version(), "grid_tricks": grid_tricks}
    counts: dict[str, int] = {}
    if todo:
        if executor == "debug" or jobs == 1:
            counts = dict(run_debug(todo, results_root, show_progress=show_progress, **common))
        else:
            counts = dict(run_local(todo, results_root, jobs or default_jobs(), show_progress=show_progress, **common))
    store.write_summary(gdir)
    return counts


# --- assess ------------------------------------------------------------------------------------------


def weights_difference(path_a: Path, path_b: Path) -> float | None:
    """Largest absolute difference between two saved state dicts (``final_model.pt``), None if not comparable.

    Not comparable: a file missing, different keys or shapes (the two evaluate different models).
    Integer and boolean tensors count their largest difference too (as float64).
    """
    import torch

    if not (Path(path_a).is_file() and Path(path_b).is_file()):
        return None
    a = torch.load(path_a, weights_only=True, map_location="cpu")
    b = torch.load(path_b, weights_only=True, map_location="cpu")
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return None
    worst = 0.0
    for k in a:
        if a[k].numel():
            worst = max(worst, float((a[k].double() - b[k].double()).abs().max()))
    return worst


def assess(
    plan: EquivPlan,
    results_root: Path,
    delta: float | None = None,
    delta_sd: float | None = None,
    metric: str | None = None,
    alpha: float = 0.05,
    identical_atol: float | None = None,
) -> EquivReport:
    """Read the comparison's runs and answer it (see the module docstring); ``ValueError`` for bad input.

    ``delta`` in metric units, else ``delta_sd`` (default :data:`DEFAULT_DELTA_SD`) × the sample SD of
    the baseline arm's metric over the seeds. A run that did not finish, or a metric that is not finite
    in one arm and finite in the other, makes the comparison fail (``failures``): not shown equivalent.
    """
    from experiments.registry import get_task

    if delta is not None and delta_sd is not None:
        raise ValueError("--delta/--delta-sd: give one of them, not both")
    task_cls = get_task(plan.task)
    metric = metric or task_cls.metric
    seeds = plan.seeds
    values: dict[str, list[float]] = {role: [] for role in ("baseline", "reference", "candidate")}
    failures: list[str] = []
    for role, by_seed in plan.cells.items():
        for seed in seeds:
            cell = by_seed[seed]
            rdir = store.run_dir(results_root, cell.grid, cell.run_id)
            status = store.run_status(rdir)
            if not (rdir / store.RESULT).exists():
                failures.append(f"{role} seed {seed}: run {cell.run_id} is {status} (see {rdir})")
                values[role].append(math.nan)
                continue
            result = store.read_json(rdir / store.RESULT)
            if metric not in result["metric"]:
                known = sorted(result["metric"])
                hint = did_you_mean(metric, known)
                raise ValueError(
                    f"--metric: {metric!r} is not a metric of task {plan.task!r}; allowed: {', '.join(known)}"
                    + (f" ({hint})" if hint else "")
                )
            values[role].append(float(result["metric"][metric]))
    ref, cand = values["reference"], values["candidate"]
    for seed, a, b in zip(seeds, ref, cand):
        if not failures and (math.isfinite(a) != math.isfinite(b)):
            failures.append(f"seed {seed}: the metric is {a} for the reference and {b} for the candidate")
    weight_diffs = [
        weights_difference(
            store.run_dir(results_root, plan.cells["reference"][s].grid, plan.cells["reference"][s].run_id)
            / "final_model.pt",
            store.run_dir(results_root, plan.cells["candidate"][s].grid, plan.cells["candidate"][s].run_id)
            / "final_model.pt",
        )
        for s in seeds
    ]
    pairs = [(a, b) for a, b in zip(ref, cand) if math.isfinite(a) and math.isfinite(b)]
    base = [v for v in values["baseline"] if math.isfinite(v)]
    if delta is not None:
        source = f"--delta {delta:g} ({metric} units)"
    else:
        fraction = DEFAULT_DELTA_SD if delta_sd is None else delta_sd
        if len(base) < 2:
            raise ValueError("--delta-sd: the baseline arm has fewer than 2 finished seeds; give --delta instead")
        delta = delta_from_spread(base, fraction)
        source = f"{fraction:g} × the baseline's seed SD ({seed_spread(base):.4g}, sample SD over {len(base)} seeds)"
    if len(pairs) < 2:
        diffs = [0.0, 0.0]  # no result to test: report as failed
        failures.append("fewer than 2 seeds where both arms have a finite metric")
    else:
        diffs = [b - a for a, b in pairs]
    return EquivReport(
        task=plan.task,
        reference=plan.reference,
        candidate=plan.candidate,
        metric=metric,
        higher_is_better=bool(task_cls.higher_is_better),
        seeds=seeds,
        values=values,
        weight_diffs=weight_diffs,
        delta=float(delta),
        delta_source=source,
        result=tost(diffs, delta, alpha),
        failures=failures,
        identical_atol=identical_atol,
    )


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:+.6g}" if signed else f"{x:.6g}"


def format_report(rep: EquivReport) -> str:
    """The human answer: a per-seed table, δ and where it came from, the interval, the verdict and what to do."""
    r = rep.result
    direction = "higher" if rep.higher_is_better else "lower"
    ref_col, cand_col = f"reference ({rep.reference})", f"candidate ({rep.candidate})"
    head = f"{'seed':>4}  {'baseline':>12}  {ref_col:>24}  {cand_col:>30}  {'cand − ref':>12}  max |Δ weights|"
    lines = [f"metric: {rep.metric} ({direction} is better); {len(rep.seeds)} paired seeds", head]
    for i, seed in enumerate(rep.seeds):
        b, a, c = (rep.values[k][i] for k in ("baseline", "reference", "candidate"))
        diff = c - a if math.isfinite(a) and math.isfinite(c) else math.nan
        lines.append(
            f"{seed:>4}  {_num(b):>12}  {_num(a):>24}  {_num(c):>30}  {_num(diff, True):>12}  "
            f"{_num(rep.weight_diffs[i])}"
        )
    base, ref = rep.values["baseline"], rep.values["reference"]
    effect = [a - b for a, b in zip(ref, base) if math.isfinite(a) and math.isfinite(b)]
    if rep.reference != BASELINE and effect:
        mean_effect = sum(effect) / len(effect)
        share = f" (δ is {rep.delta / abs(mean_effect):.0%} of it)" if mean_effect else ""
        lines.append(f"the reference's own effect (reference − baseline): mean {mean_effect:+.4g}{share}")
    lines.append(f"δ = {rep.delta:.4g} {rep.metric}: {rep.delta_source}")
    lines.append(
        f"mean difference (candidate − reference) {r.mean_diff:+.4g}, SD {r.sd_diff:.3g}; "
        f"{r.ci_level:.0%} CI [{r.ci_low:+.4g}, {r.ci_high:+.4g}] (paired t, {r.df} df); TOST p = {r.p_value:.3g}"
    )
    known = [d for d in rep.weight_diffs if d is not None]
    if known:
        worst = max(known)
        same = "identical on every seed" if worst == 0.0 else f"differ by at most {worst:.3g}"
        lines.append(f"final evaluated weights: {same} ({len(known)} of {len(rep.seeds)} seeds comparable)")
    for f in rep.failures:
        lines.append(f"FAILED {f}")
    if rep.equivalent:
        lines.append(f"EQUIVALENT within ±{rep.delta:.4g} {rep.metric} (α = {r.alpha:g} per side)")
        return "\n".join(lines)
    why = []
    if rep.failures:
        why.append("some runs did not give a result")
    elif not r.equivalent:
        side = "+δ" if r.ci_high >= r.delta else "−δ"
        why.append(f"the {r.ci_level:.0%} CI reaches beyond {side}")
        if not r.mean_inside:
            why.append("the mean difference itself is outside ±δ: the candidate computes something else")
        else:
            n = seeds_for_equivalence(r.sd_diff, r.delta, 0.8, r.alpha) if r.sd_diff > 0 else None
            power = tost_power(r.n, r.sd_diff, r.delta, 0.0, r.alpha) if r.sd_diff > 0 else 1.0
            more = f"~{n} paired seeds give 80 % power" if n else "no practical number of seeds suffices"
            why.append(
                f"the mean is inside ±δ but the seeds are too few or too noisy (power at a true 0: {power:.0%}); "
                f"{more} if the true difference is 0, at this SD"
            )
    if rep.weights_identical is False:
        why.append(f"the final evaluated weights differ by more than --identical-atol {rep.identical_atol:g}")
    lines.append(f"NOT SHOWN EQUIVALENT within ±{rep.delta:.4g} {rep.metric}: " + "; ".join(why))
    return "\n".join(lines)


def _report_path(plan: EquivPlan, results_root: Path, rep: EquivReport) -> Path:
    """``results/<grid>/equivalence-<digest>.json``: a file name from a digest, never from user strings."""
    key = json.dumps(
        {
            "cells": {role: sorted(c.run_id for c in by_seed.values()) for role, by_seed in plan.cells.items()},
            "metric": rep.metric,
            "delta_source": rep.delta_source,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return store.grid_dir(results_root, plan.spec.grid) / f"equivalence-{digest}.json"


def cmd_equiv(args: argparse.Namespace) -> int:
    """``bench equiv``: plan (exit 2 on bad input, nothing written), train, answer; 0 equivalent, 1 not shown."""
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs: {args.jobs} is not allowed; allowed: an integer ≥ 1")
    for flag, value in (("--delta", args.delta), ("--delta-sd", args.delta_sd)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag}: {value!r} is not allowed; allowed: a finite number > 0")
    if not 0 < args.alpha < 0.5:
        raise ValueError(f"--alpha: {args.alpha!r} is not allowed; allowed: a number in (0, 0.5)")
    if args.identical_atol is not None and not (math.isfinite(args.identical_atol) and args.identical_atol >= 0):
        raise ValueError(f"--identical-atol: {args.identical_atol!r} is not allowed; allowed: a finite number ≥ 0")
    plan = plan_equivalence(args.task, args.reference, args.candidate, args.overrides, args.seeds, args.grid)
    n_seeds = len(plan.seeds)
    print(
        f"bench equiv: {args.candidate} (candidate) against {args.reference} (reference) on {args.task}, "
        f"{n_seeds} paired seeds; runs in {store.grid_dir(args.results, plan.spec.grid)} "
        f"({len(plan.all_cells)} runs)",
        flush=True,
    )
    counts = train_equivalence(
        plan, args.results, args.executor, args.jobs, args.device, show_progress=not args.no_progress
    )
    if counts:
        print("trained: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    rep = assess(plan, args.results, args.delta, args.delta_sd, args.metric, args.alpha, args.identical_atol)
    print(format_report(rep))
    path = _report_path(plan, args.results, rep)
    store.atomic_write_json(path, rep.to_dict())
    print(f"written: {path}")
    return 0 if rep.equivalent else 1
