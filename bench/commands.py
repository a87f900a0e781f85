"""Implementations of the ``bench`` subcommands (argument parsing lives in ``bench/cli.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import store
from bench.runner import code_version, grid_cells, plan, write_grid_spec


def cmd_run(args: argparse.Namespace) -> int:
    launch = plan(args.spec, args.results)  # SpecError here: nothing written
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs: {args.jobs} is not allowed; allowed: an integer ≥ 1")
    print(launch.describe())
    if args.dry_run:
        for c in launch.cells:
            print(f"  {c.run_id}  {launch.status[c.run_id]:<10} {c.task:<20} {c.arm:<32} seed {c.seed}")
        return 0
    if args.executor == "slurm":
        raise ValueError("--executor slurm: not available in this version; use local or debug")
    write_grid_spec(launch.spec, launch.grid_dir)
    from bench.executors.local import default_jobs, run_debug, run_local

    version = code_version()
    if args.executor == "debug":
        counts = run_debug(
            launch.todo,
            args.results,
            device=args.device,
            threads=args.threads,
            code_version=version,
            grid_tricks=launch.grid_tricks,
            show_progress=not args.no_progress,
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
        )
    store.write_summary(launch.grid_dir)
    if counts:
        print("trained: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    if not args.no_report:
        from bench.report import write_report

        path = write_report(launch.grid_dir)
        print(f"report: {path}")
    return 1 if counts.get(store.RunStatus.FAILED) else 0


def cmd_list(what: str) -> int:
    from experiments.registry import available_tasks
    from tricks.registry import REGISTRY

    tasks = available_tasks()
    if what in ("all", "tricks"):
        print("TRICKS")
        for name, card in REGISTRY.items():
            applies = ", ".join(t for t, cls in tasks.items() if name in cls.tricks) or "(no task yet)"
            print(f"  {name:<24} {card.summary}")
            params = ", ".join(f"{p.name}={p.default!r}{(' ' + p.unit) if p.unit else ''}" for p in card.params)
            print(f"  {'':<24} params: {params or '(none)'}")
            print(f"  {'':<24} applies to: {applies}")
    if what in ("all", "tasks"):
        print("\nTASKS")
        for name, cls in tasks.items():
            print(f"  {name:<20} {cls.summary}")
            print(f"  {'':<20} metric: {cls.metric} ({'higher' if cls.higher_is_better else 'lower'} is better)")
    if what in ("all", "matrix"):
        print("\nAPPLICABILITY (task × trick; x = applies)")
        names = list(tasks)
        print(f"  {'':<24}" + "".join(f"{n[:18]:>20}" for n in names))
        for trick in REGISTRY:
            print(f"  {trick:<24}" + "".join(f"{'x' if trick in tasks[n].tricks else '.':>20}" for n in names))
    return 0


def cmd_status(grid: Path) -> int:
    spec, cells = grid_cells(grid)
    results_root = Path(grid).parent
    counts: dict[str, int] = {}
    rows = []
    for c in cells:
        rdir = store.run_dir(results_root, spec.grid, c.run_id)
        st = store.run_status(rdir)
        counts[st] = counts.get(st, 0) + 1
        detail = ""
        if st == store.RunStatus.FAILED:
            err = store.read_json(rdir / store.ERROR)
            detail = err["error"] + "\n" + "\n".join("        " + line for line in err["traceback_tail"][-3:])
        elif st == store.RunStatus.DIVERGED:
            detail = f"non-finite loss at step {store.read_json(rdir / store.RESULT)['diverged_step']}"
        rows.append(f"  {c.run_id}  {st:<10} {c.task:<20} {c.arm:<32} seed {c.seed}  {detail}")
    print(f"grid {spec.grid}: {len(cells)} runs — " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    print("\n".join(rows))
    return 0


def cmd_report(grid: Path) -> int:
    from bench.report import write_report

    grid_cells(grid)  # a clear error when this is not a launched grid
    store.write_summary(grid)
    print(f"report: {write_report(grid)}")
    return 0
