"""Implementations of the ``bench`` subcommands (argument parsing lives in ``bench/cli.py``)."""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench import store
from bench.runner import LaunchPlan, code_version, grid_cells, plan, write_grid_spec
from bench.selection import Selection, parse_names, parse_seeds

if TYPE_CHECKING:
    from bench.executors.slurm import SlurmOptions


SLURM_FLAGS = (
    "partition",
    "account",
    "qos",
    "gpus_per_run",
    "cpus_per_run",
    "mem_gb",
    "time_min",
    "constraint",
    "sbatch",
    "runs_per_task",
    "array_parallelism",
    "max_requeues",
    "signal_delay_s",
    "wait",
)


def slurm_options(args: argparse.Namespace) -> SlurmOptions | None:
    """The validated ``--slurm-*`` options of ``bench run`` (None unless ``--executor slurm``); ValueError naming
    the flag when one is invalid, or given with another executor."""
    from bench.executors.slurm import SlurmOptions, cli_flag

    given = {name: getattr(args, f"slurm_{name}", None) for name in SLURM_FLAGS}
    given["runs_per_task"] = getattr(args, "runs_per_task", None)
    given = {k: v for k, v in given.items() if v is not None and v is not False}  # flags not given
    if args.executor != "slurm":
        if given:
            name = next(iter(given))
            raise ValueError(f"{cli_flag(name)}: only used with --executor slurm (this launch uses {args.executor})")
        return None
    if "sbatch" in given:
        given["sbatch"] = SlurmOptions.parse_sbatch(given["sbatch"])
    runs_per_gpu = getattr(args, "runs_per_gpu", None)
    if runs_per_gpu is not None:
        given["runs_per_gpu"] = runs_per_gpu
        if "runs_per_task" not in given and isinstance(runs_per_gpu, int) and runs_per_gpu > 0:
            given["runs_per_task"] = runs_per_gpu * given.get("gpus_per_run", 0) or 1  # fill every GPU slot once
    return SlurmOptions(**given)


def run_inputs(args: argparse.Namespace) -> tuple[str, list[str], Selection]:
    """(spec path, overrides, selection) of ``bench run``'s arguments.

    ``bench run seeds=8`` (no spec, an override first) runs the default spec with that override:
    argparse gives the first positional to ``spec``, so a first token that looks like an override
    and is no file moves back to the overrides. Bad ``--seeds`` is a ValueError naming the flag.
    """
    from bench.cli import DEFAULT_SPEC
    from bench.overrides import looks_like_override

    spec, overrides = str(args.spec), list(getattr(args, "overrides", None) or [])
    if looks_like_override(spec) and not Path(spec).exists():
        spec, overrides = str(DEFAULT_SPEC), [spec, *overrides]
    selection = Selection(
        tasks=parse_names(getattr(args, "tasks", None)),
        tricks=parse_names(getattr(args, "tricks", None)),
        seeds=parse_seeds(getattr(args, "seeds", None)),
    )
    return spec, overrides, selection


def cmd_run(args: argparse.Namespace) -> int:
    spec_path, overrides, selection = run_inputs(args)
    launch = plan(spec_path, args.results, overrides, selection)  # SpecError / ValueError here: nothing written
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs: {args.jobs} is not allowed; allowed: an integer ≥ 1")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: {args.threads} is not allowed; allowed: an integer ≥ 1")
    if args.runs_per_gpu is not None and args.executor == "debug":
        raise ValueError("--runs-per-gpu: only with --executor local or slurm (debug trains in this process)")
    if args.runs_per_gpu is not None and args.executor == "slurm" and args.device != "cuda":
        raise ValueError(
            f"--runs-per-gpu: {args.runs_per_gpu} is not allowed with --device {args.device!r}; allowed: only with "
            "--device cuda (it packs that many runs onto each GPU of an array task)"
        )
    slurm = slurm_options(args)  # ValueError naming the flag: nothing written
    if slurm is not None and not args.dry_run:
        from bench.executors.slurm import check_cluster

        check_cluster(slurm, args.device)  # commands on PATH, controller up, partition/GPUs/time limit fit
    print(launch.describe())
    if args.dry_run:
        for c in launch.cells:
            print(f"  {c.run_id}  {launch.status[c.run_id]:<10} {c.task:<20} {c.arm:<32} seed {c.seed}")
        if slurm is not None and launch.todo:
            tasks = -(-len(launch.todo) // slurm.runs_per_task)
            print(f"would submit {len(launch.todo)} runs as {tasks} array tasks ({slurm.runs_per_task} per task)")
        return 0
    write_grid_spec(launch.spec, launch.grid_dir, launch.overrides)
    version = code_version()
    if slurm is not None:
        return _run_slurm(launch, args, slurm, version)
    from bench.executors.local import default_jobs, run_debug, run_local

    wandb_cfg = _wandb_cfg(launch, args)
    if args.executor == "debug":
        counts = run_debug(
            launch.todo,
            args.results,
            device=args.device,
            threads=args.threads,
            code_version=version,
            grid_tricks=launch.grid_tricks,
            show_progress=not args.no_progress,
            wandb_cfg=wandb_cfg,
        )
    else:
        counts = run_local(
            launch.todo,
            args.results,
            args.jobs or default_jobs(),
            device=args.device,
            threads=args.threads,
            code_version=version,
            grid_tricks=launch.grid_tricks,
            show_progress=not args.no_progress,
            runs_per_gpu=args.runs_per_gpu,
            wandb_cfg=wandb_cfg,
        )
    store.write_summary(launch.grid_dir)
    if counts:
        print("trained: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    _write_report(launch.grid_dir, args)
    return 1 if counts.get(store.RunStatus.FAILED) else 0


def _wandb_cfg(launch: LaunchPlan, args: argparse.Namespace) -> dict:
    """The spec's wandb block with ``--wandb/--no-wandb`` applied; a bad WANDB_MODE is an error up front."""
    cfg = dict(launch.spec.wandb) | ({"enabled": bool(args.wandb)} if args.wandb is not None else {})
    if cfg["enabled"]:
        from bench.tracking import resolve_mode

        resolve_mode(cfg["mode"])
    return cfg


def _write_report(grid_dir: Path, args: argparse.Namespace) -> None:
    if not args.no_report:
        from bench.report import terminal_summary, write_report
        from bench.stats import analyze_grid

        stats = analyze_grid(grid_dir)  # once, for both the report and the terminal summary
        path = write_report(grid_dir, stats)
        print(terminal_summary(grid_dir, stats))
        print(f"report: {path}")


def _run_slurm(launch: LaunchPlan, args: argparse.Namespace, options: SlurmOptions, version: str) -> int:
    """Submit the runs still to train as a job array; with ``--slurm-wait`` follow them to the end."""
    from bench.executors.slurm import WorkerSettings, submit_grid, wait_for_jobs

    wandb_cfg = _wandb_cfg(launch, args)
    settings = WorkerSettings(
        device=args.device,
        threads=args.threads or 1,
        code_version=version,
        grid_tricks=launch.grid_tricks,
        wandb_cfg=wandb_cfg,
        max_requeues=options.max_requeues,
        signal_delay_s=options.signal_delay_s,
        runs_per_gpu=options.runs_per_gpu,
    )
    sub = submit_grid(launch.todo, launch.grid_dir, args.results, options, settings, launch.spec.grid)
    if sub.already_queued:
        print(f"{len(sub.already_queued)} runs are still queued from an earlier launch; not submitted again")
    if sub.job_ids:
        tasks = len(sub.job_ids)
        packing = f", {options.concurrent_runs} at a time" if options.runs_per_gpu else ""
        print(
            f"submitted {len(sub.runs)} runs as {tasks} array task{'s' * (tasks > 1)} "
            f"({options.runs_per_task} per task{packing}): job {', '.join(sub.array_ids)}"
        )
        print(f"logs: {sub.folder}/<job id>/   follow: bench status {launch.grid_dir}")
    else:
        print("submitted 0 jobs: nothing left to train" + (" or all of it is queued" if sub.already_queued else ""))
    if not options.wait:
        return 0
    waiting = [*sub.job_ids, *sub.already_queued.values()]
    last = [0.0]

    def report_progress(left: dict[str, str]) -> None:
        if time.monotonic() - last[0] > 60:
            last[0] = time.monotonic()
            states: dict[str, int] = {}
            for state in left.values():
                states[state] = states.get(state, 0) + 1
            print("waiting: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items())), flush=True)

    wait_for_jobs(waiting, poll_s=2.0, on_poll=report_progress)
    df = store.write_summary(launch.grid_dir)
    statuses = df["status"].value_counts().to_dict() if len(df) else {}
    print("grid: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())))
    _write_report(launch.grid_dir, args)
    unfinished = [
        c
        for c in launch.cells
        if store.run_status(store.run_dir(args.results, c.grid, c.run_id)) not in store.RunStatus.FINISHED
    ]
    return 1 if unfinished else 0


def cmd_list(what: str) -> int:
    from experiments.registry import BUILTIN_TASKS, available_tasks
    from experiments.registry import origin as task_origin
    from tricks.registry import BUILTIN_MODULES, REGISTRY
    from tricks.registry import origin as trick_origin

    tasks = available_tasks()
    len(REGISTRY)  # load every plugin before printing anything (a broken one is an error, not half a table)
    builtin_tricks = {f"tricks.{m}" for m in BUILTIN_MODULES}
    if what in ("all", "tricks"):
        print("TRICKS")
        for name, card in REGISTRY.items():
            applies = ", ".join(t for t, cls in tasks.items() if cls.accepts(card)) or "(no task yet)"
            print(f"  {name:<24} {card.summary}")
            params = ", ".join(f"{p.name}={p.default!r}{(' ' + p.unit) if p.unit else ''}" for p in card.params)
            print(f"  {'':<24} role: {card.role}; params: {params or '(none)'}")
            print(f"  {'':<24} applies to: {applies}")
            if trick_origin(name) not in builtin_tricks:
                print(f"  {'':<24} from: {trick_origin(name)}")
    if what in ("all", "tasks"):
        print("\nTASKS")
        for name, cls in tasks.items():
            print(f"  {name:<20} {cls.summary}")
            print(f"  {'':<20} metric: {cls.metric} ({'higher' if cls.higher_is_better else 'lower'} is better)")
            if name not in BUILTIN_TASKS:
                print(f"  {'':<20} from: {task_origin(name)}")
    if what in ("all", "matrix"):
        print("\nAPPLICABILITY (task × trick; x = applies)")
        names = list(tasks)
        print(f"  {'':<24}" + "".join(f"{n[:18]:>20}" for n in names))
        for trick, card in REGISTRY.items():
            print(f"  {trick:<24}" + "".join(f"{'x' if tasks[n].accepts(card) else '.':>20}" for n in names))
    return 0


STATUS_ORDER = ("completed", "running", "pending", "requeued", "partial", "diverged", "failed", "incomplete")


def _alive(state: dict, queued: str | None) -> bool:
    """Whether the worker named in a run's ``state.json`` is still at it (heartbeat, pid, or the queue says so)."""
    from bench.executors.worker import STALE_S

    if state.get("host") == socket.gethostname() and state.get("pid"):
        try:
            os.kill(int(state["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
    return queued == "RUNNING" or time.time() - float(state.get("updated", 0)) < STALE_S


def run_view(rdir: Path, job: str | None, queue: dict[str, str] | None) -> tuple[str, str]:
    """(status, detail) of one run for ``bench status``: the on-disk status refined by the worker's
    ``state.json`` and, for SLURM grids, the queue (``running`` / ``requeued`` / ``pending``)."""
    from bench.executors.worker import read_state

    disk = store.run_status(rdir)
    if disk == store.RunStatus.FAILED:
        err = store.read_json(rdir / store.ERROR)
        return disk, err["error"] + "".join("\n        " + line for line in err["traceback_tail"][-3:])
    if disk == store.RunStatus.DIVERGED:
        return disk, f"non-finite loss at step {store.read_json(rdir / store.RESULT)['diverged_step']}"
    if disk == store.RunStatus.INCOMPLETE:
        return disk, str(store.read_json(rdir / store.RESULT).get("reason", ""))
    if disk in store.RunStatus.FINISHED:
        return disk, ""
    state = read_state(rdir)
    job = job or state.get("job_id")
    queued = queue.get(job) if queue is not None and job else None
    where = f"job {job} " if job else ""
    seen = f"{time.time() - float(state.get('updated', 0)):.0f} s ago" if state else ""
    step = f"step {state.get('step')}/{state.get('total_steps')}, " if state.get("total_steps") else ""
    if state.get("state") == "running" and _alive(state, queued):
        return "running", f"{where}on {state.get('host')} (pid {state.get('pid')}), {step}seen {seen}"
    if state.get("state") in ("requeued", "interrupted") and (queued or state.get("state") == "requeued"):
        return "requeued", f"{where}{queued.lower() if queued else ''}: {state.get('reason') or 'interrupted'}"
    if queued is not None:
        return "pending", f"{where}{queued.lower()}"
    if disk == store.RunStatus.PARTIAL:
        last = f"; last worker {state.get('state')} on {state.get('host')} {seen}" if state else ""
        return disk, f"checkpoint on disk (resumes on re-launch){last}"
    return disk, ""


def cmd_status(grid: Path) -> int:
    spec, cells = grid_cells(grid)
    results_root = Path(grid).parent
    from bench.executors.slurm import job_name, job_records, queue_states

    jobs = job_records(grid)
    dirs = {c.run_id: store.run_dir(results_root, spec.grid, c.run_id) for c in cells}
    unfinished = any(store.run_status(d) not in store.RunStatus.FINISHED for d in dirs.values())
    queue = queue_states(job_name(spec.grid)) if jobs and unfinished else None  # ask SLURM only when it matters
    counts: dict[str, int] = {}
    rows = []
    for c in cells:
        st, detail = run_view(dirs[c.run_id], jobs.get(c.run_id), queue)
        counts[st] = counts.get(st, 0) + 1
        rows.append(f"  {c.run_id}  {st:<10} {c.task:<20} {c.arm:<32} seed {c.seed}  {detail}".rstrip())
    order = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts) - set(STATUS_ORDER))
    print(f"grid {spec.grid}: {len(cells)} runs — " + ", ".join(f"{counts[s]} {s}" for s in order))
    if jobs and unfinished and queue is None:
        print("  (squeue does not answer: running/pending from the runs' state.json only)")
    print("\n".join(rows))
    return 0


def cmd_report(grid: Path) -> int:
    from bench.report import write_report

    grid_cells(grid)  # a clear error when this is not a launched grid
    store.write_summary(grid)
    print(f"report: {write_report(grid)}")
    return 0


def cmd_selftest(args: argparse.Namespace) -> int:
    """``bench selftest NAME...``: the registry checks as a table; 1 if a check failed; ValueError (2): bad name."""
    from bench.selftest import cells_for, format_row, iter_selftest

    tasks = [t for item in args.task or [] for t in item.split(",") if t] or None
    try:
        planned = {cell for name in args.names for cell in cells_for(name, tasks)}  # every name known, before training
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    if not planned and not any(_is_trick(n) for n in args.names):
        raise ValueError(f"--task: {', '.join(tasks or [])} leaves no cell of {', '.join(args.names)} to check")
    print(f"bench selftest {' '.join(args.names)}: {len(planned)} cell(s) at the tasks' tiny settings")
    print(format_row(), flush=True)
    failed, total = [], 0
    t0 = time.perf_counter()
    for result in iter_selftest(list(args.names), args.workdir, tasks):
        total += 1
        print(format_row(result), flush=True)
        if not result.ok:
            failed.append(result)
    elapsed = time.perf_counter() - t0
    if failed:
        print(f"\n{len(failed)} of {total} checks FAILED ({elapsed:.0f} s):")
        for r in failed:
            print(f"  {r.check} / {r.task} / {r.trick}: {r.detail}")
        return 1
    print(f"\nall {total} checks passed ({elapsed:.0f} s)")
    return 0


def _is_trick(name: str) -> bool:
    from tricks.registry import cards

    return name in cards()
