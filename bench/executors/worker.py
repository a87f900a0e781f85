"""What one worker does for one cell, whatever the executor: write config, train, record.

The same function runs inside a local pool process, in-process for ``debug``, and in a
SLURM array task; it reads everything it needs from disk and the cell (never from state
pickled at an earlier submission), so any of them can resume a run another one started.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import store
from bench.grid import Cell
from bench.loop import RunContext, train_cell, write_config

#: ``name=module[,name=module]``: extra task modules a worker process registers before training (SLURM tasks and
#: pool processes are fresh Pythons, so tasks registered at runtime in the launching process — e.g. the tests'
#: synthetic task — must be named here; the launching process registers them itself)
EXTRA_TASKS_ENV = "TRICKBENCH_EXTRA_TASKS"
STATE = "state.json"  # who holds a run and when it was last seen; read by `bench status`
HEARTBEAT_S = 15.0  # a training run refreshes state.json at most this often
STALE_S = 120.0  # a "running" state.json not refreshed for this long is a dead worker (bench status)


def read_state(run_dir: Path) -> dict[str, Any]:
    """A run's ``state.json`` (worker, heartbeat, restart counters), or ``{}`` when absent or unreadable."""
    try:
        return dict(store.read_json(Path(run_dir) / STATE))
    except (OSError, ValueError):
        return {}


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


def register_extra_tasks(env: dict[str, str] | None = None) -> list[str]:
    """In a worker process: repeat the launching process's ``register_task``/``register_trick`` calls (exported
    automatically, :mod:`bench.plugins`), then register the task modules named in ``$TRICKBENCH_EXTRA_TASKS``
    (``name=module[,...]``, older tests); return the latter's names.

    A SLURM task or a pool process is a fresh Python, so a registration made at runtime in the launching process
    does not reach it by itself (entry-point plugins need nothing: every process sees them).
    """
    from bench.plugins import replay_registrations

    replay_registrations(env)  # register_task/register_trick calls of the launching process (bench/plugins.py)
    spec = (os.environ if env is None else env).get(EXTRA_TASKS_ENV, "").strip()
    if not spec:
        return []
    from importlib import import_module

    from experiments.registry import register_task

    names = []
    for item in spec.split(","):
        name, sep, module = item.strip().partition("=")
        if not sep or not name.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
            raise ValueError(f"{EXTRA_TASKS_ENV}: {item!r} is not allowed; allowed: name=package.module[,...]")
        register_task(import_module(module).TASK)
        names.append(name)
    return names


def run_one(
    cell: Cell,
    results_root: Path,
    ctx: RunContext,
    grid_tricks: list[str],
    wandb_cfg: Mapping[str, Any] | None = None,
    job_id: str | None = None,
) -> dict[str, Any]:
    """Train ``cell`` into its run folder unless it already finished; return its status dict.

    ``wandb_cfg`` (the spec's ``wandb`` block with ``--wandb`` applied, ``bench.tracking.wandb_settings``)
    mirrors the run to wandb when enabled; a tracker already in ``ctx`` is used as is. ``job_id`` (a
    SLURM job, e.g. ``1234_5``) is recorded in the run's ``state.json`` with host, pid and heartbeat.
    """
    out = store.run_dir(results_root, cell.grid, cell.run_id)
    status = store.run_status(out)
    if status in store.RunStatus.FINISHED:
        return {"status": status, "skipped": True}
    out.mkdir(parents=True, exist_ok=True)
    if not (out / store.CONFIG).exists():
        write_config(cell, out, ctx.code_version, grid_tricks)
    tracker = None
    if ctx.tracker is None and wandb_cfg and wandb_cfg.get("enabled"):
        from bench.tracking import make_tracker

        tracker = make_tracker(cell, out, wandb_cfg, code_version=ctx.code_version)
        ctx = replace(ctx, tracker=tracker)
    run_state = RunState(out, job_id)
    run_state.set("running", attempts=run_state.data.get("attempts", 0) + 1, started=time.time(), reason=None)
    user_progress = ctx.on_progress

    def progress(steps_done: int, total_steps: int, loss: float) -> None:
        run_state.beat(steps_done, total_steps, loss)
        if user_progress is not None:
            user_progress(steps_done, total_steps, loss)

    result = train_cell(cell, out, replace(ctx, on_progress=progress))
    run_state.set(result["status"], step=result.get("step", result.get("cost", {}).get("steps")))
    if tracker is not None:
        tracker.finish(result)  # closes the wandb run (bounded; never raises)
    return result
