"""The local executor: a pool of warm worker processes on this machine, progress bars, clean stops.

Each worker process trains one run at a time with ``threads`` torch threads (default 1:
parallelism comes from one run per core, and a run's numbers do not depend on where it ran).
Workers start once per launch and stay warm across runs. On Linux with one-thread CPU runs (the
default) they are forked from the launching process after it imported what they need (torch, the
task modules, the ``torch._dynamo`` import that the first optimizer step triggers: :func:`preload`),
so those ~2.5 CPU-s are paid once per launch, not once per worker; elsewhere (CUDA, several threads
per run, other platforms) they are spawned and pay them each (:func:`start_method`). Either way
what a worker holds after warming up is frozen out of the garbage collector (``gc.freeze``). The
launching process talks to each worker over one pipe (runs out; progress and results back) —
no ``multiprocessing.Manager`` server, no shared queue — and hands a run only to an idle worker.

Stopping. Every stop reaches the workers as SIGTERM, which they catch: the running run
checkpoints at its next step boundary, its result goes back, the worker exits; runs not started
stay untouched; re-launching resumes. What stops a pool:

- Ctrl-C, SIGTERM or SIGHUP to the launching process (handled there as flags while the pool
  runs, so a signal never tears a message): the pool stops as above, then :func:`run_pool`
  raises ``KeyboardInterrupt`` (:class:`Terminated` for SIGTERM/SIGHUP; the CLI exits 130).
  A second one does not wait: the workers are killed (their last periodic checkpoint stays).
- The launching process dying by any means, SIGKILL included: each worker watches a pipe whose
  other end only the launching process holds (EOF the moment it dies; plus a ``getppid`` check
  every 0.5 s and, on Linux, ``PR_SET_PDEATHSIG`` = SIGTERM) and stops as above, or exits
  without a last checkpoint ``$TRICKBENCH_ORPHAN_GRACE_S`` (default 5 s) later if its run does
  not reach a step boundary by then. No worker outlives its launch by more than that.
- ``stop`` (a SLURM task's signal flag) and SIGTERM/SIGUSR2 sent to the workers themselves
  (SLURM signals every process of a job): the same, without raising.

GPUs: ``runs_per_gpu=N`` with device ``cuda`` packs N runs onto each visible GPU — N ×
``torch.cuda.device_count()`` workers, worker i pinned to ``cuda:(i mod count)`` when it
starts. Small models leave a GPU mostly idle (a step is bound by Python and kernel launches,
each run needs its own CPU core), so several runs per GPU multiply its throughput. A SLURM
array task packs its runs the same way (:func:`run_pool`, called by ``bench.executors.slurm``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from bench import lease
from bench.executors.group import WorkItem, item_cells, run_group, work_items
from bench.executors.start import WORKER_START_ENV, worker_start_override
from bench.executors.worker import run_one
from bench.grid import Cell
from bench.plugins import replay_registrations
from tricks.plugins import registrations

__all__ = [
    "ORPHAN_GRACE_ENV",
    "WORKER_START_ENV",
    "Terminated",
    "default_jobs",
    "gpu_jobs",
    "run_debug",
    "run_local",
    "run_pool",
    "start_method",
    "worker_device",
    "worker_start_override",
]

ORPHAN_GRACE_ENV = "TRICKBENCH_ORPHAN_GRACE_S"
ORPHAN_GRACE_S = 5.0  # an orphaned worker's run has this long to reach a step boundary and checkpoint
PARENT_POLL_S = 0.5  # a worker checks its parent at least this often (the pipe wakes it at once)
POOL_POLL_S = 0.25  # the launching process checks its stop conditions at least this often
JOIN_S = 10.0  # after the last result, a worker has this long to exit before it is killed
PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Set in each pool worker by _worker_main (a worker trains many runs; these hold for all of them).
_DEVICE: str | None = None  # the GPU this worker is pinned to (runs_per_gpu), else None
_SIGNALS: list[str] = []  # SIGTERM/SIGHUP/SIGUSR2 this worker received: stop, report, exit
_ORPHANED = threading.Event()  # set by the watchdog when the launching process is gone
_BUSY = threading.Event()  # set while the worker holds a run (the watchdog waits for it to clear)
_NOT_STARTED = "not_started"  # a worker's answer for a run it got after it was told to stop


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP stopped the pool (a ``KeyboardInterrupt``, so callers treat it as Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


def default_jobs() -> int:
    """One run per core (the tiny tasks scale better across runs than across threads)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def worker_device(index: int, gpu_count: int) -> str:
    """The device of pool worker ``index`` (0-based, in start order) when runs are packed onto GPUs."""
    return f"cuda:{index % gpu_count}"


def start_method(device: str, gpu_count: int = 0, threads: int = 1) -> str:
    """How pool workers start: ``fork`` on Linux for one-thread CPU runs, else ``spawn``; ``$TRICKBENCH_WORKER_START``
    overrides.

    A forked worker starts with the launcher's imports (torch, the harness, the task modules, the optimizers'
    lazy ``torch._dynamo``: :func:`preload`), ~2.5 CPU-s that a spawned worker pays again. Spawn where fork is
    not safe: CUDA (a child cannot use a CUDA context its parent created), more than one torch thread per run
    (a child of a process that already ran an OpenMP parallel region hangs in its first parallel region: GNU
    OpenMP's thread pool does not survive fork; one thread never enters it), and platforms other than Linux.
    Results do not depend on it (every random number comes from the run's seed bundle; tested both ways).
    """
    forced = worker_start_override()
    if forced is not None:
        return forced
    cuda = device.startswith("cuda") or gpu_count > 0 or _cuda_initialized()
    return "fork" if sys.platform.startswith("linux") and not cuda and threads == 1 else "spawn"


def _cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def preload(task_names: Sequence[str]) -> None:
    """Before forking workers: import here once what every worker needs (the task modules, the training loop,
    ``torch._dynamo``, which ``torch.optim``'s first step imports) so that each worker inherits it."""
    import torch._dynamo  # noqa: F401  (~1 CPU-s, once per launch instead of once per worker)

    import bench.loop  # noqa: F401
    from experiments.registry import get_task

    for name in task_names:
        with contextlib.suppress(Exception):  # the worker's warm-up meets the same error and reports it
            get_task(name)


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


# --- the worker process ------------------------------------------------------------------------------------


def _record_signal(signum: int, frame: Any) -> None:
    _SIGNALS.append(signal.Signals(signum).name)  # nothing else here: the run checkpoints at its next step


def _stopped() -> bool:
    """Polled by the training loop at every step boundary (two attribute reads)."""
    return bool(_SIGNALS) or _ORPHANED.is_set()


def _orphan_grace_s() -> float:
    raw = os.environ.get(ORPHAN_GRACE_ENV, "")
    try:
        return float(raw) if raw else ORPHAN_GRACE_S
    except ValueError:
        return ORPHAN_GRACE_S


def _set_parent_death_signal(signum: int) -> None:
    """Linux: have the kernel send ``signum`` to this process when the thread that spawned it ends."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def _watch_parent(lifeline: Connection, parent_pid: int) -> None:
    """Watchdog thread: when the launching process is gone, stop the run at its next step, then exit.

    ``lifeline``'s other end is held by the launching process only, so it reads EOF the moment that
    process dies, however it dies. Also exits an idle worker that was signalled (it gets no more runs).
    """
    while True:
        try:
            if lifeline.poll(PARENT_POLL_S):
                lifeline.recv_bytes()  # nothing is ever sent: this raises EOFError
        except (EOFError, OSError):
            break
        if os.getppid() != parent_pid:
            break
        if _SIGNALS and not _BUSY.is_set():
            os._exit(0)  # told to stop while idle
    _ORPHANED.set()  # the running run checkpoints at its next step boundary and releases its lease
    deadline = time.monotonic() + _orphan_grace_s()
    while _BUSY.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0 if not _BUSY.is_set() else 1)


def _warm_up(threads: int, task_names: Sequence[str], device: str | None, forked: bool = False) -> None:
    """Pay once per worker what the first run would pay: imports, task modules, the optimizers' lazy imports.

    A forked worker inherited all of it from the launcher (:func:`preload`): here it only sets its threads and
    freezes what it has (no full collection: the launcher froze its objects before forking).
    """
    import torch

    import bench.loop  # noqa: F401  (torch, tricks, seeds, store)
    from experiments.registry import get_task

    torch.set_num_threads(threads)
    if device is not None:
        torch.cuda.set_device(device)
    for name in task_names:
        with contextlib.suppress(Exception):  # else the run fails with this error, recorded like any other
            get_task(name)
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    for opt in (torch.optim.AdamW([param]), torch.optim.SGD([param], lr=0.1, momentum=0.9)):
        opt.step()  # the first step imports torch._dynamo (+ sympy): ~1 CPU-s (a forked worker: inherited)
    if not forked:
        gc.collect()
    gc.freeze()  # everything imported so far is permanent: later collections skip its ~10^6 objects


def _worker_main(
    conn: Connection,
    lifeline: Connection,
    parent_pid: int,
    threads: int,
    device: str | None,
    task_names: list[str],
    catch_usr2: bool,
    plugin_records: list[tuple[str, str, str | None]],
    inherited: list[Connection],
) -> None:
    """A pool worker: warm up, then train the runs the launching process sends until told to stop.

    ``inherited`` (a forked worker): the launcher's pipe ends this process got with its memory, closed first.
    """
    global _DEVICE
    for end in inherited:
        end.close()
    _SIGNALS.clear()
    _ORPHANED.clear()
    _BUSY.clear()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launching process, which stops the pool
    for sig in (signal.SIGTERM, signal.SIGHUP, *((signal.SIGUSR2,) if catch_usr2 else ())):
        signal.signal(sig, _record_signal)
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:
        return  # the launching process died before the death signal was armed
    threading.Thread(target=_watch_parent, args=(lifeline, parent_pid), name="watch-parent", daemon=True).start()
    _DEVICE = device
    try:
        forked = bool(inherited)  # a forked worker has the launcher's registrations already, importable or not
        if not forked:
            replay_registrations(plugin_records)  # tricks/tasks the launcher registered by code (register_*)
        _warm_up(threads, task_names, device, forked=forked)
        conn.send(("ready", os.getpid()))
        while not _stopped():
            msg = conn.recv()
            if msg is None:
                break
            _BUSY.set()
            try:
                result = _train(conn, *msg)
                conn.send(("result", result))
            finally:
                _BUSY.clear()
    except (EOFError, OSError):
        pass  # the launching process is gone; the watchdog takes it from here
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("crash", traceback.format_exc()))


def _train(
    conn: Connection,
    cell_dict: dict[str, Any] | list[dict[str, Any]],
    results_root: str,
    device: str,
    threads: int,
    code_version: str,
    grid_tricks: list[str],
    wandb_cfg: dict[str, Any] | None,
    job_id: str | None,
) -> dict[str, Any] | list[dict[str, Any]]:
    if isinstance(cell_dict, list):  # a seed-vectorized group: one result per member
        return _train_group(
            conn, cell_dict, results_root, device, threads, code_version, grid_tricks, wandb_cfg, job_id
        )
    from bench.loop import RunContext

    cell = Cell.from_dict(cell_dict)
    if _stopped():  # reached after the worker was told to stop: leave the run untouched
        return {"run_id": cell.run_id, "status": _NOT_STARTED, "error": None, "step": None}

    def progress(done: int, total: int, loss: float) -> None:
        try:
            conn.send(("progress", cell.run_id, done, total, loss))
        except OSError:
            _ORPHANED.set()  # the launching process is gone: checkpoint at this step boundary

    ctx = RunContext(
        device=_DEVICE or device, threads=threads, stop=_stopped, on_progress=progress, code_version=code_version
    )
    try:
        result = run_one(cell, Path(results_root), ctx, grid_tricks, wandb_cfg=wandb_cfg, job_id=job_id)
    except Exception as exc:  # outside training (train_cell records those): e.g. the results folder is unwritable
        return {"run_id": cell.run_id, "status": "failed", "error": repr(exc), "step": None}
    return _reply(cell.run_id, result)


def _reply(run_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """What a worker sends back for one run: its status and what the launching process reports of it."""
    return {
        "run_id": run_id,
        "status": result["status"],
        "error": result.get("error"),
        "step": result.get("step"),
        "holder": result.get("holder"),
        "skipped": bool(result.get("skipped")),
    }


def _train_group(
    conn: Connection,
    cell_dicts: list[dict[str, Any]],
    results_root: str,
    device: str,
    threads: int,
    code_version: str,
    grid_tricks: list[str],
    wandb_cfg: dict[str, Any] | None,
    job_id: str | None,
) -> list[dict[str, Any]]:
    """:func:`_train` of a seed-vectorized group (``bench.executors.group.run_group``): one result per member."""
    from bench.loop import RunContext

    cells = [Cell.from_dict(d) for d in cell_dicts]
    if _stopped():
        return [{"run_id": c.run_id, "status": _NOT_STARTED, "error": None, "step": None} for c in cells]

    def progress(run_id: str, done: int, total: int, loss: float) -> None:
        try:
            conn.send(("progress", run_id, done, total, loss))
        except OSError:
            _ORPHANED.set()

    ctx = RunContext(device=_DEVICE or device, threads=threads, stop=_stopped, code_version=code_version)
    try:
        results = run_group(cells, Path(results_root), ctx, grid_tricks, wandb_cfg, job_id, progress=progress)
    except Exception as exc:  # outside training (train_group_cells records those)
        return [{"run_id": c.run_id, "status": "failed", "error": repr(exc), "step": None} for c in cells]
    return [_reply(c.run_id, r) for c, r in zip(cells, results)]


# --- the launching process ---------------------------------------------------------------------------------


class _ParentSignals:
    """While the pool runs: Ctrl-C, SIGTERM and SIGHUP only set flags (read by the pool loop).

    Installed only on the main thread and only over default handlers (an ignored SIGHUP — ``nohup`` —
    stays ignored; a caller's own handlers, e.g. a SLURM task's, stay in place).
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)

    def __enter__(self) -> _ParentSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
        if hasattr(signal, "SIGHUP"):
            defaults[signal.SIGHUP] = signal.SIG_DFL
        for sig, default in defaults.items():
            if signal.getsignal(sig) is default:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def interrupt(self) -> KeyboardInterrupt:
        """The exception for the first signal received."""
        first = self.received[0]
        return KeyboardInterrupt() if first == signal.SIGINT else Terminated(first)


class _Worker:
    """The launching process's handle on one worker: process, its pipe end, the run it holds.

    ``others``: the live workers' handles (a forked worker closes their pipe ends, which it inherited)."""

    def __init__(
        self, ctx: Any, index: int, device: str | None, args: tuple[Any, ...], others: Sequence[_Worker] = ()
    ) -> None:
        self.index, self.device = index, device
        self.conn, child_conn = ctx.Pipe(duplex=True)
        child_lifeline, self.lifeline = ctx.Pipe(duplex=False)  # we keep the write end: EOF there when we die
        forked = ctx.get_start_method() == "fork"
        # a forked worker inherits every descriptor of this process: it must close the launcher's ends of its own
        # pipes and of the other workers' (else a lifeline's write end outlives the launcher, and no EOF comes)
        inherited = [self.conn, self.lifeline, *(c for w in others for c in (w.conn, w.lifeline))] if forked else []
        self.process = ctx.Process(
            target=_worker_main,
            args=(child_conn, child_lifeline, os.getpid(), args[0], device, *args[1:], inherited),
            name=f"trickbench-worker-{index}",
            daemon=False,
        )
        if forked and gc.get_freeze_count() == 0:  # (a caller that froze objects itself keeps them frozen)
            gc.freeze()  # the worker's copy starts frozen (no collection walks, and dirties, the inherited objects)
            try:
                self.process.start()
            finally:
                gc.unfreeze()
        else:
            self.process.start()
        child_conn.close()
        child_lifeline.close()
        self.ready = False  # warmed up and waiting for a run
        self.retired = False  # told to exit (nothing left to train)
        self.cell: WorkItem | None = None  # the run (or seed-vectorized group) it trains now
        self.pid: int | None = self.process.pid

    def signal(self, signum: int) -> None:
        if self.process.exitcode is None:  # not reaped yet: the pid is still this process's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)


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

    ``vectorize_seeds`` S: the cells train in seed-vectorized groups of up to S seeds of one arm, one group
    per worker at a time (``bench.executors.group``); a ``ValueError`` naming what cannot.

    ``runs_per_gpu`` (device ``cuda`` only; replaces ``jobs``): N runs at a time on each visible
    GPU, each worker pinned to one GPU when it starts. With device ``cpu`` it is a ``ValueError``.
    Runs another live process trains are skipped, counted as ``held`` and named on stdout; runs another
    process finished after the launch planned them are counted as ``already finished``.
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
    _print_held([r.get("holder") or {} for r in results.values() if r["status"] == lease.HELD])
    return dict(Counter(_count_as(res) for res in results.values()))


ALREADY_FINISHED = "already finished"  # counted for a run another process finished after the launch planned it


def _count_as(result: dict[str, Any]) -> str:
    """The launch summary's name for a run's outcome: its status, or ``already finished`` when not trained here."""
    return ALREADY_FINISHED if result.get("skipped") and result["status"] != lease.HELD else result["status"]


def _print_held(holders: list[dict[str, Any]]) -> None:
    """Say which runs were skipped because another live process trains them, grouped by holder."""
    if not holders:
        return
    by_holder = Counter((h.get("host"), h.get("pid"), h.get("job_id")) for h in holders)
    who = "; ".join(
        f"{n} by {'SLURM job ' + str(job) + ', ' if job else ''}pid {pid} on {host}"
        for (host, pid, job), n in by_holder.most_common()
    )
    print(
        f"skipped {len(holders)} run{'s' * (len(holders) > 1)} that another process is training right now ({who}); "
        "`bench status` shows them, re-launch later for any left unfinished"
    )


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
    """Train ``cells`` in ``jobs`` warm worker processes; return run_id -> ``{"status", "error", "step"}``.

    ``gpu_count`` > 0: worker i is pinned to ``cuda:(i mod gpu_count)`` when it starts. ``stop`` (polled
    every 0.25 s; e.g. a SLURM signal flag) stops the pool as Ctrl-C does, but returns instead of raising:
    running runs checkpoint at their next step and report ``interrupted``, runs not yet started are left
    out of the result. ``job_id`` (a SLURM array task) is recorded in each run's lease and ``state.json``;
    it also makes the workers catch SIGUSR2 (a scheduler may signal every process of a job). A run another
    live process holds comes back as ``held`` with its ``holder``. Ctrl-C, SIGTERM or SIGHUP of this process
    (main thread only) stop the pool, then raise ``KeyboardInterrupt`` / :class:`Terminated`. Call it from
    the thread that outlives the pool (on Linux the workers' death signal follows the spawning thread).
    Each item of ``cells`` is one unit of work: a cell, or a list of cells (a seed-vectorized group, trained
    together by :func:`bench.executors.group.run_group`; its results come back together).
    """
    results: dict[str, dict[str, Any]] = {}
    if not cells:
        return results
    jobs = max(1, min(jobs, len(cells)))
    threads = threads or 1  # one thread per run: bit-identical to a resume on any executor
    grid_tricks = grid_tricks or {}
    ctx = mp.get_context(start_method(device, gpu_count, threads))
    if ctx.get_start_method() == "fork":
        preload(sorted({c.task for item in cells for c in item_cells(item)}))
    runs = [c for item in cells for c in item_cells(item)]
    task_names = sorted({c.task for c in runs})
    labels = {c.run_id: f"{c.task}/{c.arm}/s{c.seed}"[:48] for c in runs}
    todo: deque[WorkItem] = deque(cells)
    requeued: set[str] = set()  # units of work whose worker died under them once already (first run id)
    overall = tqdm(total=len(runs), desc="grid", unit="run", position=0, disable=not show_progress)
    per_run = show_progress and sys.stderr.isatty()
    bars: dict[str, Any] = {}
    workers: list[_Worker] = []
    stopping = hard = False

    def spawn(index: int) -> _Worker:
        pinned = worker_device(index, gpu_count) if gpu_count else None
        return _Worker(ctx, index, pinned, (threads, task_names, job_id is not None, registrations()), workers)

    def work_args(item: WorkItem) -> tuple[Any, ...]:
        cell = item_cells(item)[0]
        tricks = grid_tricks.get(cell.task, list(cell.tricks_on))
        payload = [c.to_dict() for c in item] if isinstance(item, list) else item.to_dict()
        return (payload, str(results_root), device, threads, code_version, tricks, wandb_cfg, job_id)

    def on_message(worker: _Worker, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "ready":
            worker.ready = True
        elif kind == "progress" and per_run:
            _, rid, step, total, loss = msg
            if rid not in bars:
                bars[rid] = tqdm(total=total, desc=labels[rid], unit="step", leave=False, position=1 + len(bars))
            bars[rid].n = step
            bars[rid].set_postfix(loss=f"{loss:.4g}", refresh=True)
        elif kind == "result":
            item = worker.cell
            worker.cell = None
            for res in msg[1] if isinstance(msg[1], list) else [msg[1]]:  # a group's members come back together
                if rid_bar := bars.pop(res["run_id"], None):
                    rid_bar.close()
                if res["status"] == _NOT_STARTED:
                    if not stopping and item is not None:
                        todo.appendleft(item)  # the worker was told to stop by someone else: another takes it
                        item = None
                    continue
                results[res["run_id"]] = res
                overall.update(1)
                if res["status"] == "failed":
                    tqdm.write(f"run {res['run_id']} ({labels[res['run_id']]}) failed: {res['error']}")
        elif kind == "crash":
            raise RuntimeError(f"a pool worker failed outside any run:\n{msg[1]}")

    def on_exit(worker: _Worker) -> None:
        """A worker process ended: read what it sent last; a run it held without answering is lost or retried."""
        while True:
            try:
                if not worker.conn.poll():
                    break
                on_message(worker, worker.conn.recv())
            except (EOFError, OSError):
                break
        worker.process.join()
        workers.remove(worker)
        item = worker.cell
        if item is None:
            if not worker.ready and not worker.retired and not stopping:
                raise RuntimeError(f"a pool worker exited while starting (exit code {worker.process.exitcode})")
            return
        if stopping:
            return  # its run keeps its last checkpoint; not a result
        key = item_cells(item)[0].run_id
        if key in requeued:
            for cell in item_cells(item):
                results[cell.run_id] = {
                    "run_id": cell.run_id,
                    "status": "failed",
                    "error": f"its worker process died twice (last exit code {worker.process.exitcode})",
                    "step": None,
                }
                overall.update(1)
                tqdm.write(f"run {cell.run_id} ({labels[cell.run_id]}) failed: {results[cell.run_id]['error']}")
        else:
            requeued.add(key)
            todo.appendleft(item)  # resumes from its checkpoint(s) in a fresh worker

    def begin_stop(message: str | None) -> None:
        nonlocal stopping
        stopping = True
        if message:
            tqdm.write(message)
        for w in workers:
            w.signal(signal.SIGTERM)  # checkpoint at the next step boundary, report, exit

    with _ParentSignals() as parent_signals:
        try:
            for i in range(jobs):
                workers.append(spawn(i))  # one at a time: a forked worker closes the earlier ones' pipe ends
            while workers or (todo and not stopping):
                if parent_signals.received and not stopping:
                    begin_stop("interrupted: running runs checkpoint at their next step; re-launch to resume")
                elif stop is not None and not stopping and stop():
                    begin_stop(None)
                if len(parent_signals.received) > 1 and not hard:
                    hard = True
                    tqdm.write("interrupted again: workers killed; their runs resume from their last checkpoint")
                    for w in workers:
                        w.signal(signal.SIGKILL)
                if not stopping:
                    for w in workers:
                        if w.ready and w.cell is None:
                            w.ready = bool(todo)
                            w.retired = not todo
                            w.cell = todo.popleft() if todo else None
                            with contextlib.suppress(OSError):  # it died: its sentinel tells
                                w.conn.send(work_args(w.cell) if w.cell is not None else None)  # None: exit
                    starting = sum(not (w.ready or w.retired) for w in workers)
                    if len(todo) > starting and len(workers) < jobs:  # a worker died: replace it
                        used = {w.index for w in workers}
                        free = [i for i in range(jobs) if i not in used]
                        for i in free[: len(todo) - starting]:
                            workers.append(spawn(i))
                by_conn = {w.conn: w for w in workers}
                by_sentinel = {w.process.sentinel: w for w in workers}
                for obj in wait([*by_conn, *by_sentinel], timeout=POOL_POLL_S):
                    if obj in by_conn:
                        worker = by_conn[obj]
                        with contextlib.suppress(EOFError, OSError):  # it is exiting: its sentinel follows
                            on_message(worker, worker.conn.recv())
                    elif by_sentinel[obj] in workers:
                        on_exit(by_sentinel[obj])
        finally:
            _shut_down(workers)
            for bar in bars.values():
                bar.close()
            overall.close()
        if parent_signals.received:
            raise parent_signals.interrupt()
    return results


def _shut_down(workers: list[_Worker]) -> None:
    """Make sure no worker outlives the pool: ask the idle ones to exit, then kill what is left after ``JOIN_S``."""
    for w in workers:
        if w.cell is None:
            with contextlib.suppress(OSError):
                w.conn.send(None)
        else:
            w.signal(signal.SIGTERM)
    deadline = time.monotonic() + JOIN_S
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
        if w.process.exitcode is None:
            w.signal(signal.SIGKILL)
            w.process.join()
        w.conn.close()
        w.lifeline.close()
    workers.clear()


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

    Takes each run's lease like every executor: runs another live process trains are skipped (``held``).
    ``vectorize_seeds`` S: one seed-vectorized group of up to S seeds of one arm after another.
    """
    from bench.loop import RunContext

    counts: dict[str, int] = {}
    held: list[dict[str, Any]] = []
    grid_tricks = grid_tricks or {}
    items = work_items(cells, vectorize_seeds)
    for item in tqdm(items, desc="grid", unit="group" if vectorize_seeds else "run", disable=not show_progress):
        ctx = RunContext(device=device, threads=threads or 1, code_version=code_version)
        first = item_cells(item)[0]
        tricks = grid_tricks.get(first.task, list(first.tricks_on))
        if isinstance(item, list):
            outcomes = run_group(item, Path(results_root), ctx, tricks, wandb_cfg=wandb_cfg)
        else:
            outcomes = [run_one(item, Path(results_root), ctx, tricks, wandb_cfg=wandb_cfg)]
        for res in outcomes:
            counts[_count_as(res)] = counts.get(_count_as(res), 0) + 1
            if res["status"] == lease.HELD:
                held.append(res["holder"])
    _print_held(held)
    return counts
