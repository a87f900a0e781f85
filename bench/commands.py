"""Implementations of the ``bench`` subcommands (argument parsing lives in ``bench/cli.py``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench import store
from bench.runner import LaunchPlan, code_version, grid_cells, plan, plan_for, write_grid_spec
from bench.selection import Selection, parse_names, parse_seeds
from bench.status import STATUS_ORDER, _alive, cmd_status, run_view  # noqa: F401  (`bench status` lives there)

if TYPE_CHECKING:
    from bench.executors.slurm import SlurmOptions
    from bench.executors.slurm_cluster import Cluster


SLURM_FLAGS = (
    "partition",
    "account",
    "qos",
    "gpus_per_run",
    "gres",
    "cpus_per_run",
    "mem_gb",
    "time_min",
    "constraint",
    "sbatch",
    "setup",
    "runs_per_task",
    "array_parallelism",
    "max_requeues",
    "signal_delay_s",
    "wait",
)


def slurm_options(args: argparse.Namespace) -> SlurmOptions | None:
    """The validated ``--slurm-*`` options of ``bench run`` (None unless ``--executor slurm``); ValueError naming
    the flag when one is invalid, or given with another executor."""
    from bench.executors.slurm import SlurmOptions, cli_flag, parse_gpus

    given = {name: getattr(args, f"slurm_{name}", None) for name in SLURM_FLAGS}
    given["runs_per_task"] = getattr(args, "runs_per_task", None)
    given["retry_incomplete"] = getattr(args, "retry_incomplete", None)
    given = {k: v for k, v in given.items() if v is not None and v is not False}  # flags not given
    if args.executor != "slurm":
        if given:
            name = next(iter(given))
            raise ValueError(f"{cli_flag(name)}: only used with --executor slurm (this launch uses {args.executor})")
        return None
    if "sbatch" in given:
        given["sbatch"] = SlurmOptions.parse_sbatch(given["sbatch"])
    if "setup" in given:
        given["setup"] = tuple(given["setup"])
    if "gpus_per_run" in given:
        gpu_type, given["gpus_per_run"] = parse_gpus(given["gpus_per_run"])
        if gpu_type is not None:
            given["gpu_type"] = gpu_type
    runs_per_gpu = getattr(args, "runs_per_gpu", None)
    if runs_per_gpu is not None:
        given["runs_per_gpu"] = runs_per_gpu
        if "runs_per_task" not in given and isinstance(runs_per_gpu, int) and runs_per_gpu > 0:
            gpus = given.get("gpus_per_run", 0) or SlurmOptions(gres=given.get("gres")).gpus
            given["runs_per_task"] = runs_per_gpu * gpus or 1  # fill every GPU slot once
    return SlurmOptions(**given)


def _max_runs(args: argparse.Namespace) -> int:
    """``--max-runs`` (the cap on runs a spec may plan), validated; the default cap when not given."""
    from bench.specfile import DEFAULT_MAX_RUNS, MAX_RUNS_CEILING

    n = getattr(args, "max_runs", None)
    if n is None:
        return DEFAULT_MAX_RUNS
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_RUNS_CEILING:
        raise ValueError(f"--max-runs: {n!r} is not allowed; allowed: an integer 1..{MAX_RUNS_CEILING}")
    return n


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


def _slurm_todo(launch: LaunchPlan, options: SlurmOptions) -> list:
    """The runs a SLURM launch submits: those not finished, and with ``--retry-incomplete`` the incomplete ones."""
    if not options.retry_incomplete:
        return list(launch.todo)
    todo = {c.run_id for c in launch.todo}
    return [c for c in launch.cells if c.run_id in todo or launch.status[c.run_id] == store.RunStatus.INCOMPLETE]


def cmd_run(args: argparse.Namespace) -> int:
    from bench.executors.start import worker_start_override

    spec_path, overrides, selection = run_inputs(args)
    worker_start_override()  # a wrong $TRICKBENCH_WORKER_START: exit 2 before anything is written
    # SpecError / ValueError here: nothing written
    launch = plan(spec_path, args.results, overrides, selection, max_runs=_max_runs(args), rerun_stale=args.rerun_stale)
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
    vectorize = _vectorize_seeds(args, launch, slurm)  # ValueError naming the flag or field: nothing written
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"--device: {args.device!r} is not allowed here; CUDA is not available on this machine "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); allowed: cpu"
            )
    if args.until_decisive:
        from bench.adaptive import check_launch

        check_launch(launch, args)  # ValueError naming the flag: nothing written
    cluster = None
    if slurm is not None:  # --dry-run too: commands on PATH, controller up, the request fits the cluster
        from bench.executors.slurm import check_cluster

        cluster = check_cluster(slurm, args.device, _slurm_tasks(launch, slurm, vectorize))
    print(launch.describe())
    if vectorize is not None:
        from bench.executors.group import group_cells

        groups = group_cells(launch.todo, vectorize)
        print(f"seed-vectorized: {len(launch.todo)} runs to train as {len(groups)} groups of up to {vectorize} seeds")
    if args.dry_run:
        for c in launch.cells:
            print(f"  {c.run_id}  {launch.status[c.run_id]:<10} {c.task:<20} {c.arm:<32} seed {c.seed}")
        if slurm is not None and cluster is not None:
            _dry_run_slurm(launch, slurm, cluster, vectorize)
        return 0
    version = code_version()
    if launch.rerun_stale and launch.stale:  # asked for explicitly: the stale folders go aside before any executor
        for run_id, parts in launch.stale.items():
            rdir = store.run_dir(args.results, launch.spec.grid, run_id)
            store.quarantine_run(rdir, f"trained by other code ({'; '.join(parts)} changed)", folder=store.STALE)
        launch = plan_for(launch.spec, args.results, launch.overrides, launch.selection)
    if args.until_decisive:
        from bench.adaptive import run_adaptive

        return run_adaptive(launch, args, slurm, version, cluster)
    if slurm is not None:  # damaged runs are moved aside by the array task that retrains them (worker.run_one)
        return _run_slurm(launch, args, slurm, version, cluster)  # grid.yaml written once sbatch accepted
    launch = set_aside_damaged(launch, args)
    write_grid_spec(launch.spec, launch.grid_dir, launch.overrides)
    counts = train_locally(launch.todo, launch, args, version)
    store.write_summary(launch.grid_dir)
    if counts:
        print("trained: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    _write_report(launch.grid_dir, args)
    return 1 if counts.get(store.RunStatus.FAILED) else 0


def set_aside_damaged(launch: LaunchPlan, args: argparse.Namespace) -> LaunchPlan:
    """Move the launch's damaged runs aside (said so) and return the plan that trains them again."""
    moved = store.set_aside_damaged(store.run_dir(args.results, c.grid, c.run_id) for c in launch.cells)
    for run_id, reason, target in moved:
        print(f"run {run_id} is damaged ({reason}): moved aside to {target}; training it again")
    return plan_for(launch.spec, args.results, launch.overrides, launch.selection) if moved else launch


def train_locally(cells: list, launch: LaunchPlan, args: argparse.Namespace, version: str) -> dict[str, int]:
    """Train ``cells`` with the local or debug executor of ``args``; counts by final status.

    ``--vectorize-seeds S`` (checked by ``cmd_run``): the seeds of each arm train S at a time as one group.
    """
    from bench.executors.local import default_jobs, run_debug, run_local

    wandb_cfg = _wandb_cfg(launch, args)
    vectorize = getattr(args, "vectorize_seeds", None)
    if args.executor == "debug":
        return run_debug(
            cells,
            args.results,
            device=args.device,
            threads=args.threads,
            code_version=version,
            grid_tricks=launch.grid_tricks,
            show_progress=not args.no_progress,
            wandb_cfg=wandb_cfg,
            vectorize_seeds=vectorize,
        )
    return run_local(
        cells,
        args.results,
        args.jobs or default_jobs(),
        device=args.device,
        threads=args.threads,
        code_version=version,
        grid_tricks=launch.grid_tricks,
        show_progress=not args.no_progress,
        runs_per_gpu=args.runs_per_gpu,
        wandb_cfg=wandb_cfg,
        vectorize_seeds=vectorize,
    )


def _vectorize_seeds(args: argparse.Namespace, launch: LaunchPlan, slurm: SlurmOptions | None) -> int | None:
    """``--vectorize-seeds``, validated against the flags and every group of the launch (``ValueError`` naming the
    flag or the field that cannot be vectorized; nothing written)."""
    seeds = getattr(args, "vectorize_seeds", None)
    if seeds is None:
        return None
    from bench.executors.group import check_groups, check_seeds_per_group, group_cells

    check_seeds_per_group(seeds)
    if slurm is not None and slurm.runs_per_gpu:
        raise ValueError(
            "--vectorize-seeds: not allowed with --runs-per-gpu on --executor slurm (an array task trains one group)"
        )
    if slurm is not None and getattr(args, "runs_per_task", None) is not None:
        raise ValueError(
            "--vectorize-seeds: not allowed with --runs-per-task (an array task trains one group of up to S seeds)"
        )
    check_groups(group_cells(launch.todo, seeds))
    return seeds


def _slurm_tasks(launch: LaunchPlan, options: SlurmOptions, vectorize: int | None) -> int:
    """Array tasks a SLURM launch submits: chunks of ``runs_per_task`` runs, or one per seed-vectorized group."""
    todo = _slurm_todo(launch, options)
    if vectorize:
        from bench.executors.group import group_cells

        return len(group_cells(todo, vectorize))
    return -(-len(todo) // options.runs_per_task)


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


def _dry_run_slurm(launch: LaunchPlan, options: SlurmOptions, cluster: Cluster, vectorize: int | None = None) -> None:
    """What a SLURM launch would submit, and sbatch's own verdict (``sbatch --test-only``; nothing submitted)."""
    from bench.executors.slurm import test_only
    from bench.executors.slurm_cluster import array_sizes

    todo = _slurm_todo(launch, options)
    if not todo:
        return
    tasks = _slurm_tasks(launch, options, vectorize)
    sizes = array_sizes(tasks, cluster.max_array_size)
    arrays = f" in {len(sizes)} arrays (MaxArraySize {cluster.max_array_size})" if len(sizes) > 1 else ""
    per_task = f"one group of up to {vectorize} seeds" if vectorize else options.runs_per_task
    print(f"would submit {len(todo)} runs as {tasks} array tasks ({per_task} per task){arrays}")
    print(f"sbatch --test-only: {test_only(options, launch.grid_dir, launch.spec.grid, sizes[0])}")


def _run_slurm(
    launch: LaunchPlan, args: argparse.Namespace, options: SlurmOptions, version: str, cluster: Cluster | None = None
) -> int:
    """Submit the runs still to train as job arrays; with ``--slurm-wait`` follow them to the end."""
    from bench.executors.slurm import WorkerSettings, submit_grid, wait_for_jobs
    from bench.status import grid_verdict
    from tricks.plugins import registrations

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
        registrations=registrations(),
        vectorize_seeds=getattr(args, "vectorize_seeds", None),
    )

    def waiting_for_lock(owner: dict) -> None:
        print(
            f"waiting: another launch ({owner.get('host', '?')}, pid {owner.get('pid', '?')}) is submitting this grid",
            flush=True,
        )

    sub = submit_grid(
        _slurm_todo(launch, options),
        launch.grid_dir,
        args.results,
        options,
        settings,
        launch.spec.grid,
        cluster=cluster,
        on_accepted=lambda: write_grid_spec(launch.spec, launch.grid_dir, launch.overrides),
        on_wait=waiting_for_lock,
    )
    for message in sub.messages:
        print(message)
    if sub.reopened:
        print(f"reopened {len(sub.reopened)} incomplete runs (a fresh --slurm-max-requeues {options.max_requeues})")
    if sub.already_queued:
        print(f"{len(sub.already_queued)} runs are still queued from an earlier launch; not submitted again")
    if sub.job_ids:
        tasks = len(sub.job_ids)
        packing = f", {options.concurrent_runs} at a time" if options.runs_per_gpu else ""
        arrays = sub.array_ids
        print(
            f"submitted {len(sub.runs)} runs as {tasks} array task{'s' * (tasks > 1)} "
            f"({options.runs_per_task} per task{packing}): job{'s' * (len(arrays) > 1)} {', '.join(arrays)}"
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
    store.write_summary(launch.grid_dir)
    counts, reason = grid_verdict(launch.grid_dir)
    print("grid: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if counts.get(store.RunStatus.COMPLETED):
        _write_report(launch.grid_dir, args)
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_list(what: str) -> int:
    """``bench list [WHAT]``: see :mod:`bench.listing`. Exit 2 with a did-you-mean for an unknown name."""
    from bench.listing import render

    try:
        print(render(what))
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    return 0


def cmd_report(grid: Path) -> int:
    from bench.report import write_report
    from bench.stats import analyze_grid

    grid_cells(grid)  # a clear error when this is not a launched grid
    store.write_summary(grid)
    stats = analyze_grid(grid)
    for run_id, why in stats.damaged.items():  # left out of the report; never a reason to stop it
        print(f"damaged run left out: {run_id} {why}")
    print(f"report: {write_report(grid, stats)}")
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
