"""The local executor: a process pool on this machine with progress bars and clean Ctrl-C.

Each worker process trains one run at a time with ``threads`` torch threads (default 1:
parallelism comes from one run per core, and a run's numbers do not depend on where it ran).
Ctrl-C sets a shared stop flag: every running run checkpoints at its next step boundary and
returns; the store is consistent (every file is written atomically), and re-launching the
grid resumes them. The flag is a ``multiprocessing.Event`` handed to each worker when it
starts (polled every step for ~1 µs; a manager proxy would cost a round trip to the manager
process, ~0.1-0.4 ms, per step).

GPUs: ``runs_per_gpu=N`` with device ``cuda`` packs N runs onto each visible GPU — N ×
``torch.cuda.device_count()`` workers, worker i pinned to ``cuda:(i mod count)`` when it
starts. Small models leave a GPU mostly idle (a step is bound by Python and kernel launches,
each run needs its own CPU core), so several runs per GPU multiply its throughput. A SLURM
array task packs its runs the same way (:func:`run_pool`, called by ``bench.executors.slurm``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.executors.group import WorkItem, item_cells, run_group, work_items
from bench.executors.worker import register_extra_tasks, run_one
from bench.grid import Cell
from bench.loop import RunContext

__all__ = ["default_jobs", "gpu_jobs", "run_debug", "run_local", "run_pool", "worker_device"]

# Set in each pool worker by _init_worker (a worker trains many runs; these hold for all of them).
_STOP: Any = None  # the pool's shared stop flag (multiprocessing.Event)
_DEVICE: str | None = None  # the GPU this worker is pinned to (runs_per_gpu), else None
_SIGNALS: list[str] = []  # SIGTERM/SIGUSR2 this worker received itself (inside a SLURM array task)
_NOT_STARTED = "not_started"  # a worker's answer for a run it got after the stop flag was set


def default_jobs() -> int:
    """One run per core (the tiny tasks scale better across runs than across threads)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def worker_device(index: int, gpu_count: int) -> str:
    """The device of pool worker ``index`` (0-based, in start order) when runs are packed onto GPUs."""
    return f"cuda:{index % gpu_count}"


def gpu_jobs(runs_per_gpu: int, device: str) -> tuple[int, int]:
    """(workers, visible GPUs) for ``runs_per_gpu`` runs per GPU; ``ValueError`` naming the option if impossible."""
    if isinstance(runs_per_gpu, bool) or not isinstance(runs_per_gpu, int) or runs_per_gpu < 1:
        raise ValueError(f"--runs-per-gpu: {runs_per_gpu!r} is not allowed; allowed: an integer ≥ 1")
    if device != "cuda":
        raise ValueError(
            f"--runs-per-gpu: {runs_per_gpu} is not allowed with --device {device!r}; allowed: only with "
            "--device cuda (it packs that many runs onto each visible GPU; on CPU use --jobs)"
        )
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        raise ValueError(f"--runs-per-gpu: {runs_per_gpu} needs a CUDA device, and none is visible")
    return runs_per_gpu * count, count


def _record_signal(signum: int, frame: Any) -> None:
    _SIGNALS.append(signal.Signals(signum).name)  # nothing else here: the run checkpoints at its next step


def _stopped() -> bool:
    return bool(_SIGNALS) or _STOP.is_set()


def _init_worker(threads: int, stop_event: Any, gpu_counter: Any, gpu_count: int, catch_term: bool = False) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells workers via the stop flag
    if catch_term:  # in a SLURM job the scheduler may signal every process of the step, not only the parent
        for sig in (signal.SIGTERM, signal.SIGUSR2):
            signal.signal(sig, _record_signal)
    register_extra_tasks()  # a spawned process: tasks named in $TRICKBENCH_EXTRA_TASKS (tests)
    import torch

    global _STOP, _DEVICE
    _STOP = stop_event
    torch.set_num_threads(threads)
    if gpu_counter is not None:  # runs_per_gpu: pin this worker to its GPU once, for all its runs
        with gpu_counter.get_lock():
            index = gpu_counter.value
            gpu_counter.value += 1
        _DEVICE = worker_device(index, gpu_count)
        torch.cuda.set_device(_DEVICE)


def _worker(
    cell_dict: dict[str, Any] | list[dict[str, Any]],
    results_root: str,
    device: str,
    threads: int,
    code_version: str,
    grid_tricks: list[str],
    queue: Any,
    wandb_cfg: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> list[dict[str, Any]]:
    """One unit of work: a cell (``cell_dict``), or a seed-vectorized group (a list of them); one result each."""
    group = [Cell.from_dict(d) for d in cell_dict] if isinstance(cell_dict, list) else None
    cells = group if group is not None else [Cell.from_dict(cell_dict)]  # type: ignore[arg-type]
    if _stopped():  # queued before the pool was stopped, reached after: leave the runs untouched
        for cell in cells:
            queue.put((cell.run_id, None, None, None))
        return [{"run_id": c.run_id, "status": _NOT_STARTED, "error": None, "step": None} for c in cells]

    def progress(done: int, total: int, loss: float) -> None:
        queue.put((cells[0].run_id, done, total, loss))

    ctx = RunContext(device=_DEVICE or device, threads=threads, stop=_stopped, code_version=code_version)
    if group is None:
        results = [
            run_one(cells[0], Path(results_root), replace(ctx, on_progress=progress), grid_tricks, wandb_cfg, job_id)
        ]
    else:
        results = run_group(
            group, Path(results_root), ctx, grid_tricks, wandb_cfg, job_id, progress=lambda *a: queue.put(a)
        )
    for cell in cells:
        queue.put((cell.run_id, None, None, None))
    return [
        {"run_id": c.run_id, "status": r["status"], "error": r.get("error"), "step": r.get("step")}
        for c, r in zip(cells, results)
    ]


def _label(cell: Cell) -> str:
    return f"{cell.task}/{cell.arm}/s{cell.seed}"[:48]


def run_local(
    cells: Sequence[Cell],
    results_root: Path,
    jobs: int,
    *,
    device: str = "cpu",
    threads: int | None = None,
    code_version: str = "unknown",
    grid_tricks: dict[str, list[str]] | None = None,
    show_progress: bool = True,
    runs_per_gpu: int | None = None,
    wandb_cfg: dict[str, Any] | None = None,
    vectorize_seeds: int | None = None,
) -> dict[str, int]:
    """Train ``cells`` in a pool of ``jobs`` processes; return counts by final status.

    ``runs_per_gpu`` (device ``cuda`` only; replaces ``jobs``): N runs at a time on each visible
    GPU, each worker pinned to one GPU when it starts. With device ``cpu`` it is a ``ValueError``.
    ``vectorize_seeds`` S: the cells train in seed-vectorized groups of up to S seeds of one arm, one
    group per worker at a time (``bench.executors.group``); a ``ValueError`` naming what cannot.
    """
    gpu_count = 0
    if runs_per_gpu is not None:
        jobs, gpu_count = gpu_jobs(runs_per_gpu, device)
    results = run_pool(
        work_items(cells, vectorize_seeds),
        results_root,
        jobs,
        device=device,
        threads=threads,
        code_version=code_version,
        grid_tricks=grid_tricks,
        show_progress=show_progress,
        gpu_count=gpu_count,
        wandb_cfg=wandb_cfg,
    )
    return dict(Counter(res["status"] for res in results.values()))


def run_pool(
    cells: Sequence[WorkItem],
    results_root: Path,
    jobs: int,
    *,
    device: str = "cpu",
    threads: int | None = None,
    code_version: str = "unknown",
    grid_tricks: dict[str, list[str]] | None = None,
    show_progress: bool = True,
    gpu_count: int = 0,
    wandb_cfg: dict[str, Any] | None = None,
    stop: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Train ``cells`` in a pool of ``jobs`` spawned processes; return run_id -> ``{"status", "error", "step"}``.

    Each item of ``cells`` is one unit of work: a cell, or a list of cells (a seed-vectorized group,
    trained together by :func:`bench.executors.group.run_group`).

    ``gpu_count`` > 0: worker i is pinned to ``cuda:(i mod gpu_count)`` when it starts. ``stop`` (polled
    every 0.25 s; e.g. a SLURM signal flag) stops the pool as Ctrl-C does, but returns instead of raising:
    running runs checkpoint at their next step and report ``interrupted``, runs not yet started are left
    out of the result (also those already handed to a worker: it returns them untouched). ``job_id`` (a
    SLURM array task) is recorded in each run's ``state.json``; it also makes the workers catch
    SIGTERM/SIGUSR2 themselves (a scheduler may signal every process of a job).
    """
    jobs = max(1, min(jobs, len(cells))) if cells else 1
    runs = [c for item in cells for c in item_cells(item)]
    threads = threads or 1  # one thread per run: bit-identical to a resume on any executor
    grid_tricks = grid_tricks or {}
    ctx = mp.get_context("spawn")
    results: dict[str, dict[str, Any]] = {}
    if not cells:
        return results
    stop_event = ctx.Event()  # handed to the workers at start (inherited), polled every step
    gpu_counter = ctx.Value("i", 0) if gpu_count else None
    with ctx.Manager() as manager:
        queue = manager.Queue()
        overall = tqdm(total=len(runs), desc="grid", unit="run", position=0, disable=not show_progress)
        bars: dict[str, Any] = {}
        labels = {c.run_id: _label(c) for c in runs}
        per_run = show_progress and sys.stderr.isatty()
        with ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(threads, stop_event, gpu_counter, gpu_count, job_id is not None),
        ) as pool:
            futures: dict[Future, WorkItem] = {
                pool.submit(
                    _worker,
                    [m.to_dict() for m in item] if isinstance(item, list) else item.to_dict(),
                    str(results_root),
                    device,
                    threads,
                    code_version,
                    grid_tricks.get(item_cells(item)[0].task, list(item_cells(item)[0].tricks_on)),
                    queue,
                    wandb_cfg,
                    job_id,
                ): item
                for item in cells
            }
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                    while not queue.empty():
                        rid, step, total, loss = queue.get_nowait()
                        if not per_run:
                            continue
                        if step is None:
                            if rid in bars:
                                bars.pop(rid).close()
                            continue
                        if rid not in bars:
                            bars[rid] = tqdm(
                                total=total, desc=labels[rid], unit="step", leave=False, position=1 + len(bars)
                            )
                        bars[rid].n = step
                        bars[rid].set_postfix(loss=f"{loss:.4g}", refresh=True)
                    for fut in done:
                        if fut.cancelled():
                            continue
                        for res in fut.result():  # one per run of the unit of work
                            if res["status"] == _NOT_STARTED:
                                continue  # like a cancelled future: not a result
                            results[res["run_id"]] = res
                            overall.update(1)
                            if res["status"] == "failed":
                                tqdm.write(f"run {res['run_id']} ({labels[res['run_id']]}) failed: {res['error']}")
                    if stop is not None and stop() and not stop_event.is_set():
                        stop_event.set()  # running runs checkpoint at their next step; the rest never start
                        for fut in pending:
                            fut.cancel()
            except KeyboardInterrupt:
                stop_event.set()
                tqdm.write("interrupted: running runs checkpoint at their next step; re-launch to resume")
                for fut in pending:
                    fut.cancel()
                wait(pending)
                raise
            finally:
                for bar in bars.values():
                    bar.close()
                overall.close()
    return results


def run_debug(
    cells: Sequence[Cell],
    results_root: Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    code_version: str = "unknown",
    grid_tricks: dict[str, list[str]] | None = None,
    show_progress: bool = True,
    wandb_cfg: dict[str, Any] | None = None,
    vectorize_seeds: int | None = None,
) -> dict[str, int]:
    """Train ``cells`` one after another in this process (breakpoints work; exceptions are stored).

    ``vectorize_seeds`` S: one seed-vectorized group of up to S seeds of one arm after another.
    """
    counts: dict[str, int] = {}
    grid_tricks = grid_tricks or {}
    items = work_items(cells, vectorize_seeds)
    for item in tqdm(items, desc="grid", unit="group" if vectorize_seeds else "run", disable=not show_progress):
        ctx = RunContext(device=device, threads=threads or 1, code_version=code_version)
        first = item_cells(item)[0]
        tricks = grid_tricks.get(first.task, list(first.tricks_on))
        if isinstance(item, list):
            results = run_group(item, Path(results_root), ctx, tricks, wandb_cfg=wandb_cfg)
        else:
            results = [run_one(item, Path(results_root), ctx, tricks, wandb_cfg=wandb_cfg)]
        for res in results:
            counts[res["status"]] = counts.get(res["status"], 0) + 1
    return counts
