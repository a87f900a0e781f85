"""The local executor: a process pool on this machine with progress bars and clean Ctrl-C.

Each worker process trains one run at a time with ``threads`` torch threads (default 1:
parallelism comes from one run per core, and a run's numbers do not depend on where it ran). Ctrl-C sets a shared stop
flag: every running run checkpoints at its next step boundary and returns; the store is
consistent (every file is written atomically), and re-launching the grid resumes them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench.executors.worker import run_one
from bench.grid import Cell
from bench.loop import RunContext

__all__ = ["default_jobs", "run_debug", "run_local"]


def default_jobs() -> int:
    """One run per core (the tiny tasks scale better across runs than across threads)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _init_worker(threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells workers via the stop flag
    import torch

    torch.set_num_threads(threads)


def _worker(
    cell_dict: dict[str, Any],
    results_root: str,
    device: str,
    threads: int,
    code_version: str,
    grid_tricks: list[str],
    stop_event: Any,
    queue: Any,
) -> dict[str, Any]:
    cell = Cell.from_dict(cell_dict)

    def progress(done: int, total: int, loss: float) -> None:
        queue.put((cell.run_id, done, total, loss))

    ctx = RunContext(
        device=device, threads=threads, stop=stop_event.is_set, on_progress=progress, code_version=code_version
    )
    result = run_one(cell, Path(results_root), ctx, grid_tricks)
    queue.put((cell.run_id, None, None, None))
    return {"run_id": cell.run_id, "status": result["status"], "error": result.get("error")}


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
) -> dict[str, int]:
    """Train ``cells`` in a pool of ``jobs`` processes; return counts by final status."""
    jobs = max(1, min(jobs, len(cells))) if cells else 1
    threads = threads or 1  # one thread per run: bit-identical to a resume on any executor
    grid_tricks = grid_tricks or {}
    ctx = mp.get_context("spawn")
    counts: dict[str, int] = {}
    if not cells:
        return counts
    with ctx.Manager() as manager:
        stop_event, queue = manager.Event(), manager.Queue()
        overall = tqdm(total=len(cells), desc="grid", unit="run", position=0, disable=not show_progress)
        bars: dict[str, Any] = {}
        labels = {c.run_id: _label(c) for c in cells}
        per_run = show_progress and sys.stderr.isatty()
        with ProcessPoolExecutor(
            max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures: dict[Future, Cell] = {
                pool.submit(
                    _worker,
                    c.to_dict(),
                    str(results_root),
                    device,
                    threads,
                    code_version,
                    grid_tricks.get(c.task, list(c.tricks_on)),
                    stop_event,
                    queue,
                ): c
                for c in cells
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
                        res = fut.result()
                        counts[res["status"]] = counts.get(res["status"], 0) + 1
                        overall.update(1)
                        if res["status"] == "failed":
                            tqdm.write(f"run {res['run_id']} ({labels[res['run_id']]}) failed: {res['error']}")
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
    return counts


def run_debug(
    cells: Sequence[Cell],
    results_root: Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    code_version: str = "unknown",
    grid_tricks: dict[str, list[str]] | None = None,
    show_progress: bool = True,
) -> dict[str, int]:
    """Train ``cells`` one after another in this process (breakpoints work; exceptions are stored)."""
    counts: dict[str, int] = {}
    grid_tricks = grid_tricks or {}
    for cell in tqdm(cells, desc="grid", unit="run", disable=not show_progress):
        ctx = RunContext(device=device, threads=threads or 1, code_version=code_version)
        res = run_one(cell, Path(results_root), ctx, grid_tricks.get(cell.task, list(cell.tricks_on)))
        counts[res["status"]] = counts.get(res["status"], 0) + 1
    return counts
