"""``bench status GRID``: what each run of a grid is doing, and where to look when it is not doing it.

Called by ``bench status`` (``--failed`` adds the tail of each failed run's log) and by ``bench run --executor
slurm --slurm-wait`` (:func:`grid_verdict`, its one-line verdict). Reads only: the run folders (``result.json``,
``error.json``, ``checkpoint.pt``, the worker's ``state.json``), ``<grid>/submitit/jobs.json`` and, for a SLURM
grid with unfinished runs, one ``squeue`` call. Nothing is written.

A run's status is its on-disk status (``bench.store.run_status``) refined by its worker and its SLURM job:

- ``running``: the worker's heartbeat is fresh (or its pid lives on this host, or squeue says RUNNING);
- ``requeued``: interrupted (preemption, time limit, ``scontrol requeue``) and its job is back in the queue;
- ``pending``: its job is in the queue (with squeue's reason: ``Resources``, ``Priority``, ``BeginTime``...);
- ``failed``: ``error.json``, or its job left the queue without ever starting it (a task that died before
  training: bad environment, Python exiting 127, ...) — with the task's exit status and last log line;
- ``partial``: a checkpoint and no worker (killed, OOM, requeue refused, cancelled): the next ``bench run``
  resumes it;
- ``completed`` / ``diverged`` / ``incomplete``: finished (``result.json``).

Each row also shows the run's attempts and requeues, the age of the last heartbeat, and for a SLURM run the log
file of its array task (``<grid>/submitit/<job>/<job>_0_log.err``).
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import lease, store

__all__ = ["STATUS_ORDER", "RunView", "cmd_status", "grid_verdict", "log_tail", "run_view", "view_run"]

STATUS_ORDER = ("completed", "running", "pending", "requeued", "partial", "diverged", "failed", "incomplete")
TAIL_LINES = 20  # lines of a failed run's log that `bench status --failed` prints


@dataclass(frozen=True)
class RunView:
    """One run as ``bench status`` shows it."""

    status: str  # one of STATUS_ORDER
    detail: str = ""  # why / what it is doing (may span lines for a traceback tail)
    job: str | None = None  # the SLURM job (array task) last submitted for it
    log: Path | None = None  # the log file to read (SLURM runs)
    attempts: int | None = None  # times a worker started it (state.json)
    requeues: int | None = None  # times its task requeued itself
    heartbeat_age_s: float | None = None  # seconds since its worker last wrote state.json


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


def _queue_entry(entry: Any) -> tuple[str | None, str | None]:
    """(state, reason) of a queue entry: a ``QueueEntry``, a bare state string, or None."""
    if entry is None:
        return None, None
    if isinstance(entry, str):
        return entry, None
    return entry.state, entry.reason


def log_tail(path: Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log file (at most the last 64 KB read); ``[]`` when it does not exist."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


_NOISE = re.compile(r"^(submitit (INFO|WARNING|DEBUG)|srun: error: .*: tasks? [\d,-]+: Exited with exit code)")


def _last_words(path: Path | None) -> str:
    """The last meaningful line of a task's stderr, quoted, or '' (submitit's INFO lines and srun's "Exited with
    exit code" skipped: the exit status is reported on its own)."""
    if path is None:
        return ""
    for line in reversed(log_tail(path, 200)):
        line = line.strip()
        if line and not _NOISE.match(line):
            return f": {line[:200]!r}"
    return ""


def _exit_text(grid_dir: Path, job: str) -> str:
    from bench.executors.slurm import exit_status

    code = exit_status(grid_dir, job)
    if code is None:
        return "with no exit status (killed with its script: time limit, scancel, node failure?)"
    return f"with exit status {code}"


def view_run(rdir: Path, job: str | None, queue: Mapping[str, Any] | None, grid_dir: Path | None = None) -> RunView:
    """How ``bench status`` shows the run in folder ``rdir``.

    ``job``: its last SLURM job from ``jobs.json`` (None for local runs); ``queue``: job id -> ``QueueEntry``
    (or state) of the grid's queued jobs, None when squeue was not asked or did not answer (then a job that is
    not listed is not taken to have ended).
    """
    from bench.executors.slurm import task_log
    from bench.executors.worker import read_state

    rdir = Path(rdir)
    grid_dir = Path(grid_dir) if grid_dir is not None else rdir.parent.parent
    check = store.check_run(rdir)
    disk = check.status
    state = read_state(rdir)
    job = job or state.get("job_id") or None
    log = task_log(grid_dir, job) if job else None
    counts: dict[str, Any] = {
        "job": job,
        "log": log,
        "attempts": state.get("attempts"),
        "requeues": state.get("requeues"),
        "heartbeat_age_s": time.time() - float(state["updated"]) if state.get("updated") else None,
    }
    if disk == store.RunStatus.DAMAGED:
        detail = f"{check.reason} (left out of the report; the next `bench run` moves it aside and retrains it)"
        return RunView(disk, detail, **counts)
    if disk == store.RunStatus.FAILED:
        err = store.read_json(rdir / store.ERROR)
        if err.get("log"):
            counts["log"] = Path(err["log"])
        tail = "".join("\n        " + line for line in err.get("traceback_tail", [])[-3:])
        return RunView(disk, err.get("error", "?") + tail, **counts)
    if disk == store.RunStatus.DIVERGED:
        step = store.read_json(rdir / store.RESULT).get("diverged_step")
        return RunView(disk, f"non-finite loss at step {step}", **counts)
    if disk == store.RunStatus.INCOMPLETE:
        reason = str(store.read_json(rdir / store.RESULT).get("reason", ""))
        return RunView(disk, reason + "; bench run --retry-incomplete trains it on", **counts)
    if disk in store.RunStatus.FINISHED:
        return RunView(disk, **counts)
    queued, why = _queue_entry(queue.get(job) if queue is not None and job else None)
    step = f"step {state.get('step')}/{state.get('total_steps')}, " if state.get("total_steps") else ""
    age = counts["heartbeat_age_s"]
    seen = f"{age:.0f} s ago" if age is not None else ""
    wstate = state.get("state")
    holder = lease.holder(rdir)  # the run's lease: who trains it right now (any executor, any host)
    if holder is not None:
        return RunView("running", f"{step}{lease.describe(holder)}", **counts)
    if wstate == "running" and _alive(state, queued):
        return RunView("running", f"on {state.get('host')} (pid {state.get('pid')}), {step}seen {seen}", **counts)
    if wstate in ("requeued", "interrupted") and queued is not None:
        back = queued.lower() + (f" ({why})" if why else "")
        return RunView("requeued", f"{back}: {state.get('reason') or 'interrupted'}", **counts)
    if queued is not None:
        waiting = queued.lower() + (f" ({why})" if why else "")
        if queued == "RUNNING":
            waiting = "its array task is running; this run waits its turn in it"
        if wstate == "reopened":
            waiting += "; reopened after incomplete"
        return RunView("pending", waiting, **counts)
    if job and queue is not None:  # its job has left the queue and the run is not finished
        return _ended_job_view(rdir, disk, state, job, grid_dir, counts)
    if disk == store.RunStatus.PARTIAL:
        last = f"; last worker {wstate} on {state.get('host')} {seen}" if state else ""
        return RunView(disk, f"checkpoint on disk (resumes on re-launch){last}", **counts)
    return RunView(disk, **counts)


def _ended_job_view(
    rdir: Path, disk: str, state: dict[str, Any], job: str, grid_dir: Path, counts: dict[str, Any]
) -> RunView:
    """A run whose last job ended (left the queue) without finishing it."""
    ran_it = state.get("job_id") == job
    wstate = state.get("state")
    checkpoint = disk == store.RunStatus.PARTIAL
    resume = "; the next bench run resumes it" + (" from its checkpoint" if checkpoint else "")
    if ran_it and wstate == "interrupted":
        return RunView("partial", f"job {job} ended: {state.get('reason') or 'interrupted'}" + resume, **counts)
    if ran_it and wstate == "requeued":
        return RunView(
            "partial", f"requeued by its worker, but job {job} has left the queue (cancelled?){resume}", **counts
        )
    if ran_it and wstate in ("running", "starting"):
        step = f" at step {state.get('step')}" if state.get("step") is not None else ""
        words = _last_words(counts["log"])
        detail = f"the worker of job {job} stopped{step} without finishing, {_exit_text(grid_dir, job)}{words}"
        return RunView("partial" if checkpoint else "failed", detail + resume, **counts)
    if ran_it:
        return RunView(disk if disk != store.RunStatus.PENDING else "failed", f"job {job} ended: {wstate}", **counts)
    detail = f"array task {job} ended {_exit_text(grid_dir, job)} without starting this run{_last_words(counts['log'])}"
    return RunView("failed", detail + "; the next bench run submits it again", **counts)


def run_view(rdir: Path, job: str | None, queue: Mapping[str, Any] | None) -> tuple[str, str]:
    """(status, detail) of one run (see :func:`view_run`)."""
    view = view_run(rdir, job, queue)
    return view.status, view.detail


def _grid_views(grid: Path) -> tuple[Any, list[Any], dict[str, RunView], bool]:
    """(spec, cells, run_id -> view, whether squeue was needed but did not answer) of a launched grid."""
    from bench.executors.slurm import job_name, job_records, queue_jobs
    from bench.runner import grid_cells

    spec, cells = grid_cells(grid)
    results_root = Path(grid).parent
    jobs = job_records(grid)
    dirs = {c.run_id: store.run_dir(results_root, spec.grid, c.run_id) for c in cells}
    unfinished = any(store.run_status(d) not in store.RunStatus.FINISHED for d in dirs.values())
    queue = queue_jobs(job_name(spec.grid)) if jobs and unfinished else None  # ask SLURM only when it matters
    views = {c.run_id: view_run(dirs[c.run_id], jobs.get(c.run_id), queue, Path(grid)) for c in cells}
    return spec, cells, views, bool(jobs and unfinished and queue is None)


def _fields(view: RunView) -> str:
    """The per-run columns after the run's identity: job, attempts/requeues, heartbeat."""
    parts = []
    if view.job:
        parts.append(f"job {view.job}")
    if view.attempts:
        parts.append(f"attempts {view.attempts}" + (f", requeues {view.requeues}" if view.requeues else ""))
    if view.heartbeat_age_s is not None and view.status not in store.RunStatus.FINISHED:
        parts.append(f"heartbeat {view.heartbeat_age_s:.0f} s ago")
    return "; ".join(parts)


def cmd_status(grid: Path, failed: bool = False) -> int:
    """Print a grid's counts and one row per run; ``failed``: then the tail of each failed run's log."""
    spec, cells, views, blind = _grid_views(Path(grid))
    counts = Counter(v.status for v in views.values())
    order = [s for s in STATUS_ORDER if s in counts] + sorted(set(counts) - set(STATUS_ORDER))
    print(f"grid {spec.grid}: {len(cells)} runs — " + ", ".join(f"{counts[s]} {s}" for s in order))
    if blind:
        print("  (squeue does not answer: running/pending from the runs' state.json only)")
    for c in cells:
        v = views[c.run_id]
        row = f"  {c.run_id}  {v.status:<10} {c.task:<20} {c.arm:<32} seed {c.seed}"
        notes = store.run_notes(store.run_dir(Path(grid).parent, spec.grid, c.run_id))  # e.g. checkpoint recoveries
        extra = "  ".join(x for x in (_fields(v), v.detail, notes) if x)
        if v.log is not None and v.status not in (store.RunStatus.COMPLETED, store.RunStatus.DIVERGED, "pending"):
            extra += f"\n        log: {v.log}"
        print(f"{row}  {extra}".rstrip())
    failed_views = [(c, views[c.run_id]) for c in cells if views[c.run_id].status == store.RunStatus.FAILED]
    if failed_views and not failed:
        print(f"  ({len(failed_views)} failed: bench status --failed {grid} prints the end of each one's log)")
    if failed:
        for c, v in failed_views:
            print(f"\n--- {c.run_id} ({c.task} {c.arm} seed {c.seed}) failed: {v.detail.splitlines()[0]}")
            if v.log is None:
                print("    (no log: a run of the local or debug executor; the traceback is in its error.json)")
                continue
            tail = log_tail(v.log)
            print(f"    {v.log} (last {len(tail)} lines):" if tail else f"    {v.log}: absent or empty")
            for line in tail:
                print(f"    | {line}")
    return 0


def grid_verdict(grid: Path) -> tuple[Counter, str | None]:
    """(status -> runs, one line saying why the grid is not finished) — the line names the counts, the first
    failure's reason and where to look; None when every run finished. For ``bench run --slurm-wait``."""
    _spec, cells, views, _blind = _grid_views(Path(grid))
    counts = Counter(v.status for v in views.values())
    left = [(c, views[c.run_id]) for c in cells if views[c.run_id].status not in store.RunStatus.FINISHED]
    if not left:
        return counts, None
    unfinished = Counter(v.status for _, v in left)
    run, view = next(((c, v) for c, v in left if v.status == "failed"), left[0])
    why = view.detail.splitlines()[0] if view.detail else view.status
    line = (
        f"{len(left)} of {len(cells)} runs not finished ({', '.join(f'{n} {s}' for s, n in unfinished.most_common())}"
        f"); run {run.run_id}: {why}; see bench status --failed {grid}"
    )
    return counts, line
