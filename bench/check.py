"""``bench check``: the regression check of the trick implementations.

Re-trains the small regression grids (``experiments/grids/regression_<task>.yaml``: one seed,
the baseline and every applicable trick alone, a tiny model and budget, CPU, one thread) into
a temporary folder and compares every final number with the committed baselines
(``results/baselines/<task>.json``): the final metrics (``metric.*``), the stability record
(``stability.*``: best metric, spikes, roughness, gradient-norm summary, divergence), the
status and the samples/steps trained. Wall time and memory (the rest of ``cost.*``) vary
between machines and are not compared.

Tolerances are written in each baseline file, per value, in two sets: ``same_platform``
(this torch version, CPU model and SIMD level — the platform fingerprint stored with the
baseline) and ``other_platform``; in each, ``"*"`` is the default for floating-point values
and other keys override it. A float passes when ``|new − old| ≤ atol + rtol·|old|``;
integers, strings and nulls (counts, status, the divergence step) must be equal.

Why two sets: on one platform a run is bit-reproducible (``threads=1``, named seed streams),
so ``same_platform`` is tight (rtol 1e-6: any real code change moves a value by far more,
and nothing else can). Other CPUs' kernels (another SIMD level, oneDNN/MKL blocking) round
differently in the last bits, and a few dozen training steps amplify that to ~1e-4 relative;
``other_platform`` is set about 10× above the drift measured by forcing other SIMD levels
(``results/baselines/README.md``) — coarser, so re-pin on the CI platform for a bit-level check.

Plugin tasks bring their own regression grid and baselines, found in one of two ways:

- the task class declares ``regression_spec`` (a path to its regression grid) and
  ``regression_baselines`` (the folder of its ``<task>.json``): ``bench check`` then checks it like
  a built-in task (``bench check``, ``bench check --task NAME``, ``--update``);
- ``bench check --spec PATH --baselines DIR`` checks the regression grid at PATH (one task block)
  against ``DIR/<task>.json``, whatever declares it.

Exit status: 0 every value within tolerance; 1 something moved (each printed as task /
trick / value: old → new, Δ, tolerance) or a run failed; 2 bad input — e.g. a missing
baseline, which is reported before anything trains. ``--update`` re-pins the baselines
from the fresh runs and prints what changed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench import store
from bench.grid import Cell, expand
from bench.spec import GridSpec, load_spec
from experiments.registry import get_task, task_names

__all__ = [
    "BASELINE_FORMAT",
    "DEFAULT_TOLERANCES",
    "Moved",
    "add_arguments",
    "arm_key",
    "baseline_path",
    "baselines_dir",
    "compare",
    "platform_fingerprint",
    "regression_spec_path",
    "regression_tasks",
    "run",
    "spec_digest",
    "tolerance_set",
    "values_of",
]

BASELINE_FORMAT = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
GRIDS_DIR = REPO_ROOT / "experiments" / "grids"
DEFAULT_BASELINES = REPO_ROOT / "results" / "baselines"
# Tolerances a new baseline file starts with (then edited per task in the file); see the module docstring.
DEFAULT_TOLERANCES: dict[str, dict[str, dict[str, float]]] = {
    "same_platform": {"*": {"rtol": 1e-6, "atol": 1e-9}},
    "other_platform": {
        "*": {"rtol": 3e-3, "atol": 1e-6},
        # a small difference of two reconstructions: its relative drift across CPUs is ~10× the loss's
        "metric.hint_sensitivity": {"rtol": 5e-2, "atol": 1e-6},
        # std of step-to-step log-loss changes over the last few steps: a difference of near-equal numbers
        "stability.late_roughness": {"rtol": 1e-2, "atol": 1e-6},
    },
}
COMPARED_COST = ("samples", "steps")  # the deterministic part of cost.*
_FINISHED = store.RunStatus.FINISHED


def regression_spec_path(task: str) -> Path:
    """The regression grid of ``task``: ``experiments/grids/regression_<task>.yaml``, else the path the task
    class declares as ``regression_spec`` (plugins), else the built-in path (which then does not exist)."""
    builtin = GRIDS_DIR / f"regression_{task}.yaml"
    if builtin.is_file():
        return builtin
    declared = getattr(get_task(task), "regression_spec", None)
    return Path(declared) if declared else builtin


def baselines_dir(task: str, given: Path | None = None) -> Path:
    """Where ``task``'s baseline lives: ``given`` (``--baselines``), else the folder the task class declares as
    ``regression_baselines`` (plugins), else ``results/baselines/`` of this checkout."""
    if given is not None:
        return Path(given)
    declared = getattr(get_task(task), "regression_baselines", None)
    return Path(declared) if declared else DEFAULT_BASELINES


def regression_tasks() -> list[str]:
    """Tasks that have a regression grid (built-in or declared by the task class), in registry order."""
    return [t for t in task_names() if regression_spec_path(t).is_file()]


def baseline_path(baselines_dir: Path, task: str) -> Path:
    return Path(baselines_dir) / f"{task}.json"


def arm_key(cell: Cell) -> str:
    """How a run is keyed in a baseline: ``baseline`` or the tricks that are on, joined by ``+``."""
    return "+".join(cell.tricks_on) or "baseline"


def values_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """The compared numbers of one ``result.json``: status, metric.*, stability.*, cost.samples/steps."""
    out: dict[str, Any] = {"status": result["status"]}
    for k, v in sorted(result.get("metric", {}).items()):
        out[f"metric.{k}"] = v
    for k, v in sorted(result.get("stability", {}).items()):
        out[f"stability.{k}"] = v
    for k in COMPARED_COST:
        out[f"cost.{k}"] = result.get("cost", {}).get(k)
    return out


@dataclass(frozen=True)
class Moved:
    """One value outside its tolerance (or missing on one side)."""

    task: str
    arm: str
    value: str
    old: Any
    new: Any
    tolerance: Mapping[str, float] | None
    note: str = ""

    def describe(self) -> str:
        who = "baseline" if self.arm == "baseline" else f"trick {self.arm}"
        head = f"{self.task} / {who} / {self.value}"
        if self.note:
            return f"{head}: {self.note}"
        if self.old is _MISSING:
            return f"{head}: new value {self.new!r} has no baseline"
        if self.new is _MISSING:
            return f"{head}: {self.old!r} in the baseline, missing now"
        if _is_float(self.old) and _is_float(self.new):
            delta = self.new - self.old
            rel = f", {delta / abs(self.old):+.3g} relative" if self.old and math.isfinite(delta) else ""
            tol = self.tolerance
            allowed = f"; allowed rtol {tol['rtol']:g}, atol {tol['atol']:g}" if tol else ""
            return f"{head}: {self.old!r} → {self.new!r} (Δ {delta:+.3g}{rel}{allowed})"
        return f"{head}: {self.old!r} → {self.new!r}" + (" (must be equal)" if self.tolerance else "")


class _Missing:
    def __repr__(self) -> str:
        return "missing"


_MISSING: Any = _Missing()


def _is_float(v: Any) -> bool:
    return isinstance(v, float)


def _within(old: Any, new: Any, tol: Mapping[str, float]) -> bool:
    if _is_float(old) or _is_float(new):
        if not (isinstance(old, (int, float)) and isinstance(new, (int, float))) or isinstance(old, bool):
            return False
        old, new = float(old), float(new)
        if math.isnan(old) or math.isnan(new):
            return math.isnan(old) and math.isnan(new)
        if math.isinf(old) or math.isinf(new):
            return old == new
        return abs(new - old) <= tol["atol"] + tol["rtol"] * abs(old)
    return old == new


def platform_fingerprint() -> dict[str, str]:
    """What decides the last bits of a CPU run: torch build, SIMD level, CPU model, OS/architecture."""
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu,
        "system": f"{platform.system()} {platform.machine()}",
    }


def tolerance_set(baseline: Mapping[str, Any]) -> tuple[str, Mapping[str, Mapping[str, float]]]:
    """(name, tolerances) to compare with: ``same_platform`` when this platform made the baseline."""
    name = "same_platform" if baseline.get("platform") == platform_fingerprint() else "other_platform"
    return name, baseline.get("tolerances", DEFAULT_TOLERANCES)[name]


def tolerance_for(tolerances: Mapping[str, Mapping[str, float]], value: str) -> Mapping[str, float]:
    """The tolerance of ``value`` within one set: its own entry, else the set's ``"*"``."""
    return tolerances.get(value, tolerances["*"])


def compare(
    task: str,
    baseline: Mapping[str, Any],
    current: Mapping[str, Mapping[str, Any]],
    tolerances: Mapping[str, Mapping[str, float]],
) -> list[Moved]:
    """Every value of ``current`` (arm → {"values": ...}) outside ``tolerances`` of the baseline or on one side only."""
    moved: list[Moved] = []
    old_arms = baseline["arms"]
    for arm in sorted(set(old_arms) | set(current), key=lambda a: (a != "baseline", a)):
        old_vals = old_arms.get(arm, {}).get("values", {})
        new_vals = current.get(arm, {}).get("values", {})
        if arm not in current:
            moved.append(Moved(task, arm, "(run)", None, None, None, "in the baseline, not in the regression grid now"))
            continue
        if arm not in old_arms:
            moved.append(Moved(task, arm, "(run)", None, None, None, "in the regression grid, not in the baseline"))
            continue
        for key in sorted(set(old_vals) | set(new_vals)):
            old, new = old_vals.get(key, _MISSING), new_vals.get(key, _MISSING)
            tol = tolerance_for(tolerances, key)
            if old is _MISSING or new is _MISSING or not _within(old, new, tol):
                moved.append(Moved(task, arm, key, old, new, tol))
    return moved


def spec_digest(spec: GridSpec) -> str:
    """SHA-256 (16 hex) of the resolved regression grid: tells whether a baseline was made from this grid."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def _load_baseline(path: Path, task: str, update_hint: str = "") -> dict[str, Any]:
    update = update_hint or f"bench check --update --task {task}"
    if not path.is_file():
        raise FileNotFoundError(
            f"no baseline for task {task!r}: {path} does not exist; create it with `{update}` (and commit it)"
        )
    data = json.loads(path.read_text())
    if data.get("format") != BASELINE_FORMAT or data.get("task") != task or "arms" not in data:
        raise ValueError(
            f"{path}: not a baseline of task {task!r} in format {BASELINE_FORMAT}; re-create it with `{update}`"
        )
    problem = _tolerance_problems(data.get("tolerances"))
    if problem:
        raise ValueError(f"{path}: tolerances: {problem}")
    return data


def _tolerance_problems(tolerances: Any) -> str:
    """'' when ``tolerances`` has both sets, each with a ``"*"`` entry and non-negative rtol/atol everywhere."""
    allowed = 'allowed: {"same_platform": {"*": {"rtol": r, "atol": a}, ...}, "other_platform": {...}}, r, a ≥ 0'
    if not isinstance(tolerances, dict) or set(tolerances) != {"same_platform", "other_platform"}:
        return f"{tolerances!r} is not allowed; {allowed}"
    for name, entries in tolerances.items():
        if not isinstance(entries, dict) or "*" not in entries:
            return f"{name}: {entries!r} has no default entry '*'; {allowed}"
        for key, tol in entries.items():
            ok = isinstance(tol, dict) and set(tol) == {"rtol", "atol"}
            if not ok or not all(isinstance(v, (int, float)) and v >= 0 for v in tol.values()):
                return f"{name}.{key}: {tol!r} is not allowed; {allowed}"
    return ""


@contextlib.contextmanager
def _private_cache(folder: Path) -> Iterator[None]:
    """A fresh cache (e.g. the feature-matching consumer) trained inside the check, on its own thread settings."""
    old = os.environ.get("TRICKBENCH_CACHE")
    os.environ["TRICKBENCH_CACHE"] = str(folder)  # read by spawned workers too (they inherit the environment)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRICKBENCH_CACHE", None)
        else:
            os.environ["TRICKBENCH_CACHE"] = old


def _train(cells: list[Cell], results_root: Path, grid_tricks: dict[str, list[str]], jobs: int, progress: bool) -> None:
    from bench.executors.local import run_debug, run_local
    from bench.runner import code_version, stale_runs

    # the check always judges today's code: runs a reused results folder holds from other code train again
    status = {c.run_id: store.run_status(store.run_dir(results_root, c.grid, c.run_id)) for c in cells}
    by_id = {c.run_id: c for c in cells}
    for run_id, parts in stale_runs(cells, results_root, status).items():
        rdir = store.run_dir(results_root, by_id[run_id].grid, run_id)
        store.quarantine_run(rdir, f"trained by other code ({'; '.join(parts)} changed)", folder=store.STALE)
    todo = [c for c in cells if store.run_status(store.run_dir(results_root, c.grid, c.run_id)) not in _FINISHED]
    if not todo:
        return
    common = {"threads": 1, "code_version": code_version(), "grid_tricks": grid_tricks, "show_progress": progress}
    if jobs == 1:
        run_debug(todo, results_root, **common)
    else:
        run_local(todo, results_root, jobs, **common)


def _collect(cells: list[Cell], results_root: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(arm → {"run_id", "values"}, failures) of one task's cells."""
    arms: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for c in cells:
        rdir = store.run_dir(results_root, c.grid, c.run_id)
        if (rdir / store.RESULT).exists():
            arms[arm_key(c)] = {"run_id": c.run_id, "values": values_of(store.read_json(rdir / store.RESULT))}
        else:
            err = store.read_json(rdir / store.ERROR)["error"] if (rdir / store.ERROR).exists() else "no result"
            failures.append(f"{c.task} / {arm_key(c)}: run {c.run_id} did not finish: {err} (see {rdir})")
    return arms, failures


def _grid_label(spec_path: Path, baseline_file: Path) -> str:
    """How a baseline names its regression grid: relative to the repository, else to the baseline's folder."""
    spec_path = Path(spec_path).resolve()
    if spec_path.is_relative_to(REPO_ROOT):
        return str(spec_path.relative_to(REPO_ROOT))
    return os.path.relpath(spec_path, Path(baseline_file).resolve().parent)


def _baseline_doc(
    task: str, spec: GridSpec, arms: dict[str, dict[str, Any]], old: dict | None, spec_path: Path, path: Path
) -> dict[str, Any]:
    from bench.runner import code_version

    # hand-tuned tolerances survive a re-pin
    tolerances = old["tolerances"] if old and not _tolerance_problems(old.get("tolerances")) else DEFAULT_TOLERANCES
    return {
        "format": BASELINE_FORMAT,
        "task": task,
        "grid": _grid_label(spec_path, path),
        "spec_digest": spec_digest(spec),
        "code_version": code_version(),
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "platform": platform_fingerprint(),
        "threads": 1,
        "tolerances": tolerances,
        "arms": arms,
    }


def _changes(task: str, old: dict | None, arms: dict[str, dict[str, Any]]) -> list[str]:
    """Every value that differs at all between the old baseline and the new one (for ``--update``)."""
    if old is None:
        return [f"{task}: new baseline ({len(arms)} runs)"]
    exact = compare(task, old, arms, {"*": {"rtol": 0.0, "atol": 0.0}})
    return [replace(m, tolerance=None).describe() for m in exact]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``bench check`` (called by ``bench/cli.py``)."""
    parser.add_argument(
        "--task",
        action="append",
        choices=task_names(),
        help="check only this task (repeatable; default: every task with experiments/grids/regression_<task>.yaml)",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="re-pin the baselines from the fresh runs (prints every value that changed); commit the result",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="parallel runs (local process pool; default: one per core; 1 = in-process)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help="keep the runs in this results folder (default: a temporary folder, deleted); runs already finished "
        "there are reused, not retrained — use a fresh folder after changing code",
    )
    parser.add_argument(
        "--spec",
        action="append",
        type=Path,
        metavar="PATH",
        help="check this regression grid (one task block; e.g. a plugin's) against <baselines>/<task>.json "
        "(repeatable; with --update: pin it)",
    )
    parser.add_argument(
        "--baselines",
        type=Path,
        default=None,
        help=f"baseline folder of every checked task (default: {DEFAULT_BASELINES.relative_to(REPO_ROOT)} of this "
        "checkout; a plugin task's own folder when its class declares regression_baselines)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _spec_paths(args: argparse.Namespace) -> dict[str, Path]:
    """Task -> regression grid to check: ``--task`` names, ``--spec`` files (their one task), else every task with
    one. Errors (missing grid, a spec that is not one task block, a task twice) before anything trains."""
    out: dict[str, Path] = {}
    for task in dict.fromkeys(args.task or []):
        path = regression_spec_path(task)
        if not path.is_file():
            raise FileNotFoundError(
                f"--task {task}: no regression grid {path}; tasks with one: {', '.join(regression_tasks()) or 'none'} "
                "(or give one with --spec PATH)"
            )
        out[task] = path
    for path in getattr(args, "spec", None) or []:
        task = _load_regression_spec(path).tasks[0].task
        if task in out:
            raise ValueError(f"--spec {path}: task {task!r} is already checked (from {out[task]}); allowed: once")
        out[task] = Path(path)
    if not out:
        out = {task: regression_spec_path(task) for task in regression_tasks()}
    if not out:
        raise FileNotFoundError(f"no regression grids (regression_<task>.yaml) in {GRIDS_DIR}")
    return out


def _load_regression_spec(path: Path, task: str | None = None) -> GridSpec:
    """A regression grid: a spec with exactly one task block (of ``task`` when given)."""
    spec = load_spec(path)
    if len(spec.tasks) != 1 or (task is not None and spec.tasks[0].task != task):
        found = ", ".join(t.task for t in spec.tasks)
        raise ValueError(
            f"{path}: tasks: {found} is not allowed; allowed: exactly one task block"
            + (f" (of task {task!r})" if task else "")
        )
    return spec


def _update_hint(args: argparse.Namespace, task: str) -> str:
    """The command that pins ``task``'s baseline, as this check was asked for."""
    for path in getattr(args, "spec", None) or []:
        if _load_regression_spec(path).tasks[0].task == task:
            bdir = f" --baselines {args.baselines}" if args.baselines is not None else ""
            return f"bench check --update --spec {path}{bdir}"
    return f"bench check --update --task {task}" + (f" --baselines {args.baselines}" if args.baselines else "")


def run(args: argparse.Namespace) -> int:
    """Run the check (or ``--update``); print the outcome; return the exit status."""
    from bench.executors.local import default_jobs

    t0 = time.perf_counter()
    spec_paths = _spec_paths(args)  # task -> its regression grid; errors before anything trains
    tasks = list(spec_paths)
    jobs = default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        raise ValueError(f"--jobs: {jobs} is not allowed; allowed: an integer ≥ 1")
    specs = {task: _load_regression_spec(path, task) for task, path in spec_paths.items()}
    bdirs = {task: baselines_dir(task, args.baselines) for task in tasks}
    # a missing or unreadable baseline is bad input: say so before anything trains
    baselines = (
        {} if args.update else {t: _load_baseline(baseline_path(bdirs[t], t), t, _update_hint(args, t)) for t in tasks}
    )

    cells = {t: expand(spec) for t, spec in specs.items()}
    grid_tricks = {ts.label: list(ts.tricks) for spec in specs.values() for ts in spec.tasks}
    all_cells = [c for t in tasks for c in cells[t]]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-check-")))
        results_root = Path(args.results) if args.results is not None else tmp / "results"
        reused = [
            c
            for c in all_cells
            if store.run_status(store.run_dir(results_root, c.grid, c.run_id)) in store.RunStatus.FINISHED
        ]
        print(
            f"bench check: {len(tasks)} task{'s' * (len(tasks) > 1)} ({', '.join(tasks)}), {len(all_cells)} runs, "
            f"jobs {jobs}" + (f"; reusing {len(reused)} finished runs in {results_root}" if reused else "")
        )
        stack.enter_context(_private_cache(tmp / "cache"))
        _train(all_cells, results_root, grid_tricks, jobs, progress=not args.no_progress)
        collected = {t: _collect(cells[t], results_root) for t in tasks}

    failed = [f for t in tasks for f in collected[t][1]]
    status = 0
    for task in tasks:
        arms, failures = collected[task]
        path = baseline_path(bdirs[task], task)
        if args.update:
            if failures:
                print(f"{task}: NOT updated — {len(failures)} run(s) did not finish")
                continue
            old = json.loads(path.read_text()) if path.is_file() else None
            changes = _changes(task, old, arms)
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = _baseline_doc(task, specs[task], arms, old, spec_paths[task], path)
            store.atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
            print(f"{task}: wrote {path} ({len(changes) if old else 0} value(s) changed)")
            for line in changes if old else []:
                print(f"  {line}")
            continue
        base = baselines[task]
        tol_name, tolerances = tolerance_set(base)
        moved = compare(task, base, arms, tolerances)
        n_values = sum(len(a["values"]) for a in arms.values())
        if base.get("spec_digest") != spec_digest(specs[task]):
            print(
                f"{task}: note — {spec_paths[task].name} changed since the baseline was made "
                f"({base.get('created', '?')}); differences are expected: review them, then `--update`"
            )
        if moved:
            status = 1
            print(
                f"{task}: {len(moved)} value(s) moved beyond the {tol_name} tolerance "
                f"(baseline {base.get('created', '?')}, code {base.get('code_version', '?')}):"
            )
            for m in moved:
                print(f"  {m.describe()}")
        elif not failures:
            print(f"{task}: all {n_values} values of {len(arms)} runs within tolerance ({tol_name})")
    for f in failed:
        print(f"FAILED {f}")
    if failed:
        status = 1
    print(f"bench check: {'OK' if status == 0 else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
    return status
