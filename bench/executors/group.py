"""Seed-vectorized work: S seeds of one arm as one unit of work for every executor.

``bench run --vectorize-seeds S`` groups the runs to train by arm, S seeds at a time
(:func:`group_cells`); each group is one unit of work — one task of the local pool, one step of
the debug executor, one SLURM array task — and trains in one process as one vmapped model through
the one training loop (:func:`bench.loop.train_group`; what is vectorized and how, and what is not,
is said there). :func:`check_groups` runs before a launch writes anything and names what cannot be
vectorized (exit 2). :func:`run_group` is the group's :func:`bench.executors.worker.run_one`: per
member it skips finished runs, sets damaged ones aside, takes the run's lease (``bench.lease``: a
member another live process trains is left out), writes ``config.json`` and ``state.json``
(heartbeat, attempts), mirrors to wandb; every member is an ordinary run folder, so ``bench status``,
``bench report`` and ``bench check`` read it like any other.

Why opt-in (a flag, not automatic for tasks that declare support): a seed trained in a group
computes its numbers with batched kernels, equal to the same seed trained alone only to float
rounding (``bench.loop.VECTORIZED_TOLERANCE``). A grid's numbers should not change in the last bits
because another version picked another executor, so the user asks for it — and gets an error, not a
silent fallback, when an arm cannot be vectorized.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import lease, store
from bench.executors.worker import RunState
from bench.grid import Cell
from bench.loop import RunContext, train_group_cells, vectorize_problems, write_config

__all__ = ["WorkItem", "check_groups", "check_seeds_per_group", "group_cells", "item_cells", "run_group", "work_items"]

#: one unit of work: a cell trained alone, or the cells of one seed-vectorized group
WorkItem = Cell | list[Cell]


def check_seeds_per_group(seeds: Any) -> int:
    """``--vectorize-seeds``, validated: an integer ≥ 1 (``ValueError`` naming the flag otherwise)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(
            f"--vectorize-seeds: {seeds!r} is not allowed; allowed: an integer ≥ 1 (seeds of one arm per group)"
        )
    return seeds


def _arm_key(cell: Cell) -> tuple[str, str, str]:
    config = {k: v for k, v in cell.config.items() if k != "seed"}
    return cell.grid, cell.task, json.dumps(config, sort_keys=True, default=str)


def group_cells(cells: Sequence[Cell], seeds_per_group: int) -> list[list[Cell]]:
    """The cells as groups of at most ``seeds_per_group`` seeds of one arm (lowest seeds first).

    Arms keep the order in which they first appear; within an arm the cells are sorted by seed and
    cut into consecutive groups (10 seeds, S = 4: groups of 4, 4 and 2).
    """
    seeds_per_group = check_seeds_per_group(seeds_per_group)
    arms: dict[tuple[str, str, str], list[Cell]] = {}
    for cell in cells:
        arms.setdefault(_arm_key(cell), []).append(cell)
    groups = []
    for members in arms.values():
        members = sorted(members, key=lambda c: c.seed)
        groups += [members[i : i + seeds_per_group] for i in range(0, len(members), seeds_per_group)]
    return groups


def check_groups(groups: Sequence[Sequence[Cell]]) -> None:
    """Raise ``ValueError`` naming every field that keeps a group from training seed-vectorized.

    Call before a launch writes anything (``bench run`` does, dry runs too). One message per distinct
    problem, with one run of each as an example.
    """
    seen: dict[str, str] = {}
    for group in groups:
        for problem in vectorize_problems(group):
            seen.setdefault(problem, f"{group[0].task}/{group[0].arm}")
    if seen:
        lines = [f"{problem} (e.g. arm {where})" for problem, where in seen.items()]
        raise ValueError("--vectorize-seeds: " + "; ".join(lines))


def work_items(cells: Sequence[Cell], seeds_per_group: int | None) -> list[WorkItem]:
    """The units of work of a launch: each cell alone (``seeds_per_group`` None), else checked groups."""
    if seeds_per_group is None:
        return list(cells)
    groups = group_cells(cells, seeds_per_group)
    check_groups(groups)
    return [list(g) for g in groups]


def item_cells(item: WorkItem) -> list[Cell]:
    """The cells of a unit of work."""
    return list(item) if isinstance(item, list) else [item]


def run_group(
    cells: Sequence[Cell],
    results_root: Path,
    ctx: RunContext,
    grid_tricks: list[str],
    wandb_cfg: Mapping[str, Any] | None = None,
    job_id: str | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
) -> list[dict[str, Any]]:
    """Train the group ``cells`` (seeds of one arm) into their run folders; one status dict per cell, in order.

    Per member as :func:`bench.executors.worker.run_one` does per run: a finished run is skipped
    (``{"status": ..., "skipped": True}``), a damaged one moved aside and trained again; the run's lease is
    taken (``bench.lease``) — a member another live process holds is left out of the group
    (``{"status": "held", "skipped": True, "holder": ...}``) and the status is checked again under the
    lease; ``config.json`` written once, ``state.json`` set to running (attempts, heartbeat at most every
    15 s) and to the outcome, a wandb mirror per run when enabled. The others train together
    (``bench.loop.train_group``); a crash of the group is recorded as ``error.json`` in each member's
    folder. ``ctx`` is shared (device, threads, stop); the group stops at its next step boundary when any
    member's lease is lost (that member reports ``interrupted``, ``lease lost to another process``).
    ``progress(run_id, steps_done, total_steps, loss)`` reports each member's progress. Every lease taken
    is released with its member's status, also when this raises (e.g. Ctrl-C in the debug executor).
    """
    results: list[dict[str, Any] | None] = [None] * len(cells)
    out_dirs = [store.run_dir(results_root, c.grid, c.run_id) for c in cells]
    leases: dict[int, lease.Lease] = {}
    try:
        todo: list[int] = []
        for i, out in enumerate(out_dirs):
            check = store.check_run(out)
            if check.status in store.RunStatus.FINISHED:
                results[i] = {"status": check.status, "skipped": True}
                continue
            if check.status == store.RunStatus.DAMAGED:  # moved aside (never deleted); trained again from scratch
                store.quarantine_run(out, check.reason)
            out.mkdir(parents=True, exist_ok=True)
            try:
                leases[i] = lease.acquire(out, job_id)
            except lease.LeaseHeld as exc:
                results[i] = {"status": lease.HELD, "skipped": True, "holder": exc.holder}
                continue
            status = store.run_status(out)  # again, under the lease: another process may have finished it
            if status in store.RunStatus.FINISHED:
                results[i] = {"status": status, "skipped": True}
                continue
            todo.append(i)
        if todo:
            for i, result in zip(todo, _train_leased_group(cells, out_dirs, todo, leases, ctx, grid_tricks,
                                                           wandb_cfg, job_id, progress)):  # fmt: skip
                results[i] = result
        return results  # type: ignore[return-value]
    finally:
        for i, held in leases.items():
            held.release(results[i].get("status") if results[i] is not None else None)


def _train_leased_group(
    cells: Sequence[Cell],
    out_dirs: list[Path],
    todo: list[int],
    leases: dict[int, lease.Lease],
    ctx: RunContext,
    grid_tricks: list[str],
    wandb_cfg: Mapping[str, Any] | None,
    job_id: str | None,
    progress: Callable[[str, int, int, float], None] | None,
) -> list[dict[str, Any]]:
    """:func:`run_group` once the members ``todo`` hold their leases: config, state.json, train, record."""
    ctxs, states, trackers = [], [], []
    user_stop = ctx.stop
    held = [leases[i] for i in todo]

    def stop() -> bool:  # polled at every step boundary, for every member: one lost lease stops the group
        return any(h.lost for h in held) or (user_stop is not None and user_stop())

    for i in todo:
        cell, out = cells[i], out_dirs[i]
        if not (out / store.CONFIG).exists():
            write_config(cell, out, ctx.code_version, grid_tricks)
        tracker = None
        if ctx.tracker is None and wandb_cfg and wandb_cfg.get("enabled"):
            from bench.tracking import make_tracker

            tracker = make_tracker(cell, out, wandb_cfg, code_version=ctx.code_version)
        run_state = RunState(out, job_id)
        attempt = run_state.data.get("attempts", 0) + 1
        run_state.set("running", attempts=attempt, started=time.time(), reason=None)
        leases[i].log("train", attempt=attempt, checkpoint=(out / store.CHECKPOINT).exists(), group=len(todo))
        ctxs.append(
            replace(
                ctx,
                tracker=tracker or ctx.tracker,
                stop=stop,
                on_progress=_member_progress(cell.run_id, run_state, ctx.on_progress, progress),
            )
        )
        states.append(run_state)
        trackers.append(tracker)
    trained = train_group_cells([cells[i] for i in todo], [out_dirs[i] for i in todo], ctxs)
    results = []
    for i, result, run_state, tracker in zip(todo, trained, states, trackers):
        if leases[i].lost:  # judged dead and taken over: the new holder records this run
            result = {"status": "interrupted", "step": result.get("step"), "error": "lease lost to another process"}
        else:
            run_state.set(result["status"], step=result.get("step", result.get("cost", {}).get("steps")))
        if tracker is not None:
            tracker.finish(result)  # closes the wandb run (bounded; never raises)
        results.append(result)
    return results


def _member_progress(
    run_id: str,
    run_state: RunState,
    shared: Callable[[int, int, float], None] | None,
    per_run: Callable[[str, int, int, float], None] | None,
) -> Callable[[int, int, float], None]:
    def progress(steps_done: int, total_steps: int, loss: float) -> None:
        run_state.beat(steps_done, total_steps, loss)
        if shared is not None:
            shared(steps_done, total_steps, loss)
        if per_run is not None:
            per_run(run_id, steps_done, total_steps, loss)

    return progress
