"""What one worker does for one cell, whatever the executor: lease, write config, train, record.

The same function runs inside a local pool process, in-process for ``debug``, and in a
SLURM array task; it reads everything it needs from disk and the cell (never from state
pickled at an earlier submission), so any of them can resume a run another one started.
It holds the run's lease (``bench.lease``) while it trains, so two launches of one grid —
at once, staggered, on one machine or on SLURM nodes sharing the results folder — never
train the same run twice.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import lease, store
from bench.grid import Cell

if TYPE_CHECKING:  # the loop imports torch: only the functions that train import it (bench status reads state here)
    from bench.loop import RunContext

STATE = "state.json"  # who holds a run and when it was last seen; read by `bench status`
HEARTBEAT_S = 15.0  # a training run refreshes state.json at most this often
STALE_S = 120.0  # a "running" state.json not refreshed for this long is a dead worker (bench status)


_STATE_TYPES: dict[str, type | tuple[type, ...]] = {  # what the fields a worker writes hold
    "state": str,
    "host": str,
    "pid": int,
    "job_id": (str, type(None)),
    "updated": (int, float),
    "started": (int, float),
    "attempts": int,
    "timeouts": int,
    "requeues": int,
    "step": (int, type(None)),
    "total_steps": int,
    "reason": (str, type(None)),
}


def read_state(run_dir: Path) -> dict[str, Any]:
    """A run's ``state.json`` (worker, heartbeat, restart counters), or ``{}`` when absent or unreadable;
    a known field of the wrong type (a damaged file) is dropped, so no reader trips over it."""
    try:
        state = store.read_json(Path(run_dir) / STATE)
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(state, dict):
        return {}
    return {
        k: v
        for k, v in state.items()
        if k not in _STATE_TYPES or (isinstance(v, _STATE_TYPES[k]) and not isinstance(v, bool))
    }


class RunState:
    """``state.json`` of one run: written atomically by the one worker holding the run, read by ``bench status``.

    :meth:`set` records a change (started, interrupted, requeued, finished); :meth:`beat`, called from the
    loop's progress callback, refreshes the heartbeat at most every ``HEARTBEAT_S``. Counters that must survive
    restarts (``attempts``, ``timeouts``) are carried over from the file on disk, never from a pickle.
    """

    def __init__(self, run_dir: Path, job_id: str | None = None) -> None:
        self.path = Path(run_dir) / STATE
        self.data = read_state(run_dir)
        self.job_id = job_id
        self._last_write = 0.0

    def set(self, state: str, **fields: Any) -> None:
        now = time.time()
        self.data.update(state=state, host=socket.gethostname(), pid=os.getpid(), job_id=self.job_id, updated=now)
        self.data.update(fields)
        store.atomic_write_json(self.path, self.data)
        self._last_write = now

    def beat(self, steps_done: int, total_steps: int, loss: float) -> None:
        if time.time() - self._last_write >= HEARTBEAT_S:
            self.set("running", step=steps_done, total_steps=total_steps)


def run_one(
    cell: Cell,
    results_root: Path,
    ctx: RunContext,
    grid_tricks: list[str],
    wandb_cfg: Mapping[str, Any] | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Train ``cell`` into its run folder unless it already finished or another process trains it.

    Takes the run's lease first (``bench.lease``; every executor comes through here), so a run is trained by
    one process at a time: a run leased by a live process is left alone and reported with status
    ``held`` and the ``holder`` record; a stale lease (dead holder) is taken over and the run resumes from
    its checkpoint. Whether the run is finished is checked again under the lease. ``wandb_cfg`` (the spec's
    ``wandb`` block with ``--wandb`` applied, ``bench.tracking.wandb_settings``) mirrors the run to wandb
    when enabled; a tracker already in ``ctx`` is used as is. ``job_id`` (a SLURM job, e.g. ``1234_5``) is
    recorded in the lease and the run's ``state.json`` with host, pid and heartbeat.
    """
    out = store.run_dir(results_root, cell.grid, cell.run_id)
    check = store.check_run(out)
    if check.status in store.RunStatus.FINISHED:
        return {"status": check.status, "skipped": True}
    if check.status == store.RunStatus.DAMAGED:  # moved aside (never deleted); trained again from an empty folder
        store.quarantine_run(out, check.reason)
    out.mkdir(parents=True, exist_ok=True)
    try:
        held = lease.acquire(out, job_id)
    except lease.LeaseHeld as exc:
        return {"status": lease.HELD, "skipped": True, "holder": exc.holder}
    result: dict[str, Any] = {}  # an exception (e.g. Ctrl-C in the debug executor) releases with status None
    try:
        status = store.run_status(out)  # again, under the lease: another process may have finished it meanwhile
        if status in store.RunStatus.FINISHED:
            result = {"status": status, "skipped": True}
            return result
        result = _train_leased(cell, out, ctx, grid_tricks, wandb_cfg, job_id, held)
        return result
    finally:
        held.release(result.get("status"))


def _train_leased(
    cell: Cell,
    out: Path,
    ctx: RunContext,
    grid_tricks: list[str],
    wandb_cfg: Mapping[str, Any] | None,
    job_id: str | None,
    held: lease.Lease,
) -> dict[str, Any]:
    """:func:`run_one` once the lease is held: config, state.json, train, record."""
    if not (out / store.CONFIG).exists():
        from bench.loop import write_config

        write_config(cell, out, ctx.code_version, grid_tricks)
    tracker = None
    if ctx.tracker is None and wandb_cfg and wandb_cfg.get("enabled"):
        from bench.tracking import make_tracker

        tracker = make_tracker(cell, out, wandb_cfg, code_version=ctx.code_version)
        ctx = replace(ctx, tracker=tracker)
    run_state = RunState(out, job_id)
    attempt = run_state.data.get("attempts", 0) + 1
    run_state.set("running", attempts=attempt, started=time.time(), reason=None)
    held.log("train", attempt=attempt, checkpoint=(out / store.CHECKPOINT).exists())
    user_progress, user_stop = ctx.on_progress, ctx.stop

    def progress(steps_done: int, total_steps: int, loss: float) -> None:
        run_state.beat(steps_done, total_steps, loss)
        if user_progress is not None:
            user_progress(steps_done, total_steps, loss)

    def stop() -> bool:  # polled at every step boundary
        return held.lost or (user_stop is not None and user_stop())

    from bench.loop import train_cell

    result = train_cell(cell, out, replace(ctx, on_progress=progress, stop=stop))
    if held.lost:  # judged dead and taken over (this process was frozen past the TTL): the new holder records
        return {"status": "interrupted", "step": result.get("step"), "error": "lease lost to another process"}
    run_state.set(result["status"], step=result.get("step", result.get("cost", {}).get("steps")))
    if tracker is not None:
        tracker.finish(result)  # closes the wandb run (bounded; never raises)
    return result
