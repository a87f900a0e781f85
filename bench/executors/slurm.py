"""The SLURM executor: a grid's runs as submitit job arrays that survive preemption and time limits.

Submitting side (``bench run SPEC --executor slurm``, :func:`submit_grid`)::

    SlurmOptions (checked before anything is written)  ->  the runs still to train, minus those already queued
    ->  chunks of ``runs_per_task`` runs  ->  submitit.SlurmExecutor(folder=<grid>/submitit/%j).map_array(...)
    ->  one job array; <grid>/submitit/jobs.json maps each run to its array task

Worker side (one array task, :class:`SlurmTask`): the runs of its chunk one after another, each through
``bench.executors.worker.run_one`` — the per-cell path of every executor. With ``--runs-per-gpu N`` the task
trains N runs at once on each of its GPUs (``bench.executors.local.run_pool``: one process per run, pinned
to a GPU, one or more CPUs each), the packing the local executor does. The signals only set a flag;
the loop polls it (``RunContext.stop``) at every step boundary, writes its checkpoint and returns. Then,
outside any signal handler:

- ``SIGUSR2`` (sent ``signal_delay_s`` before the time limit by ``--signal=USR2@N``, or on preemption): the
  task requeues itself with ``scontrol requeue``. When the job had little time left this counts as a
  timeout of the interrupted run (``timeouts`` in its ``state.json``); past ``max_requeues`` timeouts the
  run is recorded ``incomplete`` with the reason instead of being requeued again.
- ``SIGTERM`` alone (preemption with ``PreemptMode=REQUEUE``, ``scontrol requeue``, ``scancel``, node
  shutdown): the task exits and the scheduler decides whether the job runs again.

Whatever restarts a task — its own requeue, a preemption, a node failure, or a re-launch of the grid
after a SIGKILL — each run resumes from the checkpoint in its own folder: the submitted pickle holds
only the cells, the results path and how to run (device, threads), never training state.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from submitit.helpers import Checkpointable, DelayedSubmission

from bench.executors.worker import EXTRA_TASKS_ENV, register_extra_tasks

__all__ = [
    "EXTRA_TASKS_ENV",
    "JOBS_FILE",
    "SUBMITIT_DIR",
    "SlurmOptions",
    "SlurmTask",
    "Submission",
    "WorkerSettings",
    "check_cluster",
    "cli_flag",
    "job_name",
    "job_records",
    "parse_time_left",
    "queue_states",
    "register_extra_tasks",
    "sbatch_script",
    "submit_grid",
    "wait_for_jobs",
]

SUBMITIT_DIR = "submitit"  # <grid>/submitit/<job id>/: submission script, pickles and logs of each array task
JOBS_FILE = "jobs.json"  # <grid>/submitit/jobs.json: run_id -> SLURM job (array task) id, written by the submitter
#: sbatch(1), --signal: "the signal may be sent up to 60 seconds earlier than specified"
SIGNAL_RESOLUTION_S = 60

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PARTITIONS = re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
#: sbatch options trickbench sets itself (or has a dedicated flag for): not accepted through --slurm-sbatch
_MANAGED_SBATCH = {
    "array": "--runs-per-task / --slurm-array-parallelism",
    "output": "(logs go to <grid>/submitit/<job id>/)",
    "error": "(logs go to <grid>/submitit/<job id>/)",
    "open-mode": "(set by submitit)",
    "signal": "--slurm-signal-delay-s",
    "job-name": "(named after the grid)",
    "partition": "--slurm-partition",
    "account": "--slurm-account",
    "qos": "--slurm-qos",
    "gpus-per-node": "--slurm-gpus-per-run",
    "gres": "--slurm-gpus-per-run",
    "cpus-per-task": "--slurm-cpus-per-run",
    "mem": "--slurm-mem-gb",
    "time": "--slurm-time-min",
    "constraint": "--slurm-constraint",
    "nodes": "(one node per run)",
    "ntasks-per-node": "(one task per run)",
    "requeue": "(always requeueable)",
    "no-requeue": "(runs must be requeueable)",
}


def cli_flag(name: str) -> str:
    """The ``bench run`` flag of a :class:`SlurmOptions` field."""
    if name in ("runs_per_task", "runs_per_gpu"):
        return "--" + name.replace("_", "-")
    return "--slurm-" + name.replace("_", "-")


@dataclass(frozen=True)
class SlurmOptions:
    """How a grid runs on a SLURM cluster (how-to-run: never part of a run's config or run_id).

    Each field is the CLI flag ``--slurm-<field>`` (``--runs-per-task``, ``--runs-per-gpu`` for those); the
    sbatch option each maps to is in ``slurm/README.md``. Construction validates every field and raises
    ``ValueError`` naming the flag, the value and what is allowed.
    """

    partition: str | None = None  # --partition; None = the cluster's default partition
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    gpus_per_run: int = 0  # --gpus-per-node: GPUs for each array task
    cpus_per_run: int = 1  # CPUs per run; --cpus-per-task = this × the runs a task trains at once
    mem_gb: float | None = None  # --mem; None = the cluster's default
    time_min: int = 60  # --time, minutes, for one array task (all its runs_per_task runs)
    constraint: str | None = None  # --constraint, e.g. "a100|h100"
    sbatch: tuple[tuple[str, str], ...] = ()  # further #SBATCH --key=value lines
    runs_per_task: int = 1  # runs one array task trains (one after another, or runs_per_gpu at a time per GPU)
    runs_per_gpu: int | None = None  # runs trained at once on each GPU of an array task (small models)
    array_parallelism: int = 256  # at most this many array tasks run at once (--array=0-N%P)
    max_requeues: int = 3  # time-limit requeues per run; past it the run is recorded incomplete
    signal_delay_s: int = 90  # USR2 this long before the time limit (--signal=USR2@N): checkpoint and requeue
    wait: bool = False  # block until the jobs have left the queue, then write summary and report

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name, pattern, allowed in (
            ("partition", _PARTITIONS, "partition names (letters, digits, '_', '.', '-'), comma-separated"),
            ("account", _NAME, "an account name (letters, digits, '_', '.', '-')"),
            ("qos", _NAME, "a QOS name (letters, digits, '_', '.', '-')"),
        ):
            value = getattr(self, name)
            if value is not None and not pattern.match(value):
                problems.append(f"{cli_flag(name)}: {value!r} is not allowed; allowed: {allowed}")
        if self.constraint is not None and (not self.constraint.strip() or re.search(r"[\s'\"\\]", self.constraint)):
            problems.append(
                f"--slurm-constraint: {self.constraint!r} is not allowed; allowed: a feature expression without "
                "spaces or quotes, e.g. a100 or 'a100|h100'"
            )
        for name, low in (
            ("gpus_per_run", 0),
            ("cpus_per_run", 1),
            ("time_min", 1),
            ("runs_per_task", 1),
            ("array_parallelism", 1),
            ("max_requeues", 0),
            ("signal_delay_s", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{cli_flag(name)}: {value!r} is not allowed; allowed: an integer ≥ {low}")
        if self.runs_per_gpu is not None:
            n = self.runs_per_gpu
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                problems.append(f"--runs-per-gpu: {n!r} is not allowed; allowed: an integer ≥ 1")
            elif isinstance(self.gpus_per_run, int) and self.gpus_per_run < 1:
                problems.append(
                    f"--runs-per-gpu: {n} is not allowed with --slurm-gpus-per-run {self.gpus_per_run}; allowed: "
                    "only with --slurm-gpus-per-run ≥ 1 (it packs N runs onto each GPU of an array task)"
                )
            elif isinstance(self.runs_per_task, int) and self.runs_per_task < self.concurrent_runs:
                problems.append(
                    f"--runs-per-task: {self.runs_per_task} is not allowed with --runs-per-gpu {n} and "
                    f"--slurm-gpus-per-run {self.gpus_per_run}; allowed: ≥ {self.concurrent_runs} (the runs a "
                    "task trains at once; fewer would leave GPU slots idle)"
                )
        if self.mem_gb is not None and (
            isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, (int, float)) or not self.mem_gb > 0
        ):
            problems.append(f"--slurm-mem-gb: {self.mem_gb!r} is not allowed; allowed: a number of GB > 0")
        if (
            isinstance(self.time_min, int)
            and isinstance(self.signal_delay_s, int)
            and self.signal_delay_s >= self.time_min * 60
        ):
            problems.append(
                f"--slurm-signal-delay-s: {self.signal_delay_s} is not allowed with --slurm-time-min {self.time_min}; "
                f"allowed: fewer seconds than the time limit ({self.time_min * 60} s)"
            )
        for key, value in self.sbatch:
            if not _SBATCH_KEY.match(key):
                problems.append(
                    f"--slurm-sbatch: key {key!r} is not allowed; allowed: an sbatch long option name without "
                    "dashes in front, e.g. mail-type=END"
                )
            elif key in _MANAGED_SBATCH:
                problems.append(f"--slurm-sbatch: {key} is set by trickbench; use {_MANAGED_SBATCH[key]}")
            if not value or "\n" in value or "\r" in value:
                problems.append(f"--slurm-sbatch: {key}={value!r} is not allowed; allowed: a non-empty one-line value")
        if problems:
            raise ValueError("invalid SLURM options:\n" + "\n".join(f"  - {p}" for p in problems))

    @staticmethod
    def parse_sbatch(items: Iterable[str]) -> tuple[tuple[str, str], ...]:
        """``["mail-type=END", ...]`` (the ``--slurm-sbatch`` values) -> ``(("mail-type", "END"), ...)``."""
        pairs = []
        for item in items:
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(
                    f"--slurm-sbatch: {item!r} is not allowed; allowed: KEY=VALUE (an sbatch long option and its "
                    "value, e.g. mail-type=END)"
                )
            pairs.append((key.strip().removeprefix("--"), value.strip()))
        return tuple(pairs)

    @property
    def concurrent_runs(self) -> int:
        """Runs one array task trains at once: ``runs_per_gpu`` × ``gpus_per_run``, else 1."""
        return self.runs_per_gpu * self.gpus_per_run if self.runs_per_gpu else 1

    def submitit_parameters(self, job_name: str) -> dict[str, Any]:
        """Parameters for ``submitit.SlurmExecutor.update_parameters`` (sbatch option names, '_' for '-')."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": self.time_min,
            "cpus_per_task": self.cpus_per_run * self.concurrent_runs,
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": self.array_parallelism,
        }
        if self.gpus_per_run:
            params["gpus_per_node"] = self.gpus_per_run
        if self.mem_gb is not None:
            mem_mb = round(self.mem_gb * 1024)
            params["mem"] = f"{mem_mb // 1024}GB" if mem_mb % 1024 == 0 else f"{mem_mb}MB"
        for name in ("partition", "account", "qos", "constraint"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.sbatch:
            params["additional_parameters"] = dict(self.sbatch)
        return params


def _run(cmd: Sequence[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, check=False)


def check_cluster(options: SlurmOptions, device: str = "cpu") -> None:
    """Check that this machine can submit and the cluster can run what ``options`` ask; ValueError otherwise.

    Call before anything is written: the SLURM commands are on PATH, the controller answers, the partition
    exists, has GPUs when GPUs are asked for, and allows the time limit. (Account, QOS and constraints need
    the accounting database or node features; sbatch itself checks those at submission.)
    """
    missing = [c for c in ("sbatch", "srun", "squeue", "sinfo", "scontrol") if shutil.which(c) is None]
    if missing:
        raise ValueError(
            f"--executor slurm: {', '.join(missing)} not found on PATH; run on a SLURM login node "
            "(or start the test cluster: sudo bash slurm/cluster.sh install && sudo bash slurm/cluster.sh start)"
        )
    if device.startswith("cuda") and options.gpus_per_run < 1:
        raise ValueError(f"--device {device}: needs --slurm-gpus-per-run ≥ 1 with --executor slurm")
    out = _run(["sinfo", "-h", "-o", "%R|%a|%l|%G|%D"])
    if out.returncode != 0:
        raise ValueError(f"--executor slurm: the SLURM controller does not answer (sinfo: {out.stderr.strip()})")
    partitions: dict[str, list[tuple[str, str, str]]] = {}
    for line in out.stdout.splitlines():
        name, avail, limit, gres, _nodes = (line.split("|") + [""] * 5)[:5]
        partitions.setdefault(name, []).append((avail, limit, gres))
    wanted = options.partition.split(",") if options.partition else []
    for name in wanted:
        if name not in partitions:
            raise ValueError(
                f"--slurm-partition: {name!r} is not a partition of this cluster; "
                f"allowed: {', '.join(sorted(partitions)) or '(none)'}"
            )
        rows = partitions[name]
        if options.gpus_per_run and not any("gpu" in gres for _, _, gres in rows):
            raise ValueError(
                f"--slurm-gpus-per-run: {options.gpus_per_run} asked for, but partition {name!r} has no GPUs "
                f"(gres: {', '.join(sorted({g for _, _, g in rows}))})"
            )
        limits = [_parse_duration_s(limit) for _, limit, _ in rows]
        max_s = max((x for x in limits if x is not None), default=None)
        if max_s is not None and options.time_min * 60 > max_s:
            raise ValueError(
                f"--slurm-time-min: {options.time_min} is more than partition {name!r} allows ({max_s // 60} minutes)"
            )


def _parse_duration_s(text: str) -> int | None:
    """SLURM durations (``[D-]HH:MM:SS``, ``MM:SS``, ``M``) in seconds; None for infinite / unknown."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "INVALID", "NOT_SET", "N/A"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:  # minutes
        seconds = parts[0] * 60
    elif len(parts) == 2:  # minutes:seconds
        seconds = parts[0] * 60 + parts[1]
    else:
        seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return days * 86400 + seconds


def parse_time_left(text: str) -> int | None:
    """``squeue -o %L`` (time left of a job) in seconds; None when the job has no limit or SLURM cannot tell."""
    try:
        return _parse_duration_s(text)
    except ValueError:
        return None


# --- submitting --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerSettings:
    """How every run of a submission trains (pickled with the callable; no training state)."""

    device: str = "cpu"
    threads: int = 1
    code_version: str = "unknown"
    grid_tricks: dict[str, list[str]] = field(default_factory=dict)
    wandb_cfg: dict[str, Any] | None = None
    max_requeues: int = 3
    signal_delay_s: int = 90
    runs_per_gpu: int | None = None  # train this many runs at once per GPU of the task (device cuda; on CPU: at once)


@dataclass
class Submission:
    """What one ``bench run --executor slurm`` submitted."""

    job_ids: list[str]  # one per array task, e.g. "1234_0"; a single task is a plain job "1234"
    runs: dict[str, str]  # run_id -> job id
    already_queued: dict[str, str]  # run_id -> job id: still in the queue from an earlier launch, not resubmitted
    folder: Path  # <grid>/submitit

    @property
    def array_ids(self) -> list[str]:
        return sorted({j.split("_")[0] for j in self.job_ids}, key=int)


def job_records(grid_dir: Path) -> dict[str, str]:
    """run_id -> the SLURM job (array task) that was last submitted for it (``<grid>/submitit/jobs.json``)."""
    path = Path(grid_dir) / SUBMITIT_DIR / JOBS_FILE
    try:
        from bench import store

        return dict(store.read_json(path).get("runs", {}))
    except (OSError, ValueError):
        return {}


def job_name(grid: str) -> str:
    """The SLURM job name of a grid's arrays (also how its jobs are told apart from others with reused ids)."""
    return f"trickbench-{grid}"


def queue_states(name: str | None = None) -> dict[str, str] | None:
    """Job (array task) id -> state (PENDING, RUNNING, COMPLETING, ...) of this user's jobs still in the queue,
    only those named ``name`` when given.

    None when ``squeue`` is not installed or the controller does not answer (a local grid, or no cluster).
    """
    if shutil.which("squeue") is None:
        return None
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T", "-u", str(os.getuid())]
    cmd += [f"--name={name}"] if name else []
    try:
        out = _run(cmd, timeout_s=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    states = {}
    for line in out.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job:
            states[job] = state
    return states


def _queued_runs(grid_dir: Path, grid: str) -> dict[str, str]:
    """run_id -> job id for the grid's runs whose last job is still in the queue (never submit those twice)."""
    records = job_records(grid_dir)
    if not records:
        return {}
    queue = queue_states(job_name(grid))
    if queue is None:
        raise ValueError("--executor slurm: squeue does not answer; cannot tell which runs are already queued")
    return {rid: job for rid, job in records.items() if job in queue}


def sbatch_script(options: SlurmOptions, folder: Path, job_name: str, n_tasks: int, python: str) -> str:
    """The sbatch script submitit writes for ``n_tasks`` array tasks (what :func:`submit_grid` submits)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python} -u -m submitit.core._submit {folder}"
    params = options.submitit_parameters(job_name)
    params["map_count"] = n_tasks if n_tasks > 1 else None
    return _make_sbatch_string(command=command, folder=folder, **params)


def submit_grid(
    cells: Sequence[Any],
    grid_dir: Path,
    results_root: Path,
    options: SlurmOptions,
    settings: WorkerSettings,
    grid_name: str,
) -> Submission:
    """Submit ``cells`` (the runs still to train) as one job array of ``runs_per_task`` runs per task.

    Runs whose last job is still in the queue are left alone (one worker per run folder). Records the
    run -> job mapping in ``<grid>/submitit/jobs.json``. Submits nothing when nothing is left.
    """
    import submitit

    from bench import store

    folder = Path(grid_dir).resolve() / SUBMITIT_DIR
    queued = _queued_runs(grid_dir, grid_name)
    todo = [c for c in cells if c.run_id not in queued]
    if not todo:
        return Submission([], {}, queued, folder)
    k = options.runs_per_task
    chunks = [todo[i : i + k] for i in range(0, len(todo), k)]
    executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=options.max_requeues)
    executor.update_parameters(**options.submitit_parameters(job_name(grid_name)))
    task = SlurmTask(settings)
    root = str(Path(results_root).resolve())
    try:
        jobs = executor.map_array(task, [[c.to_dict() for c in chunk] for chunk in chunks], [root] * len(chunks))
    except submitit.core.utils.FailedJobError as exc:  # sbatch said no: an account, QOS, constraint, limit...
        raise ValueError(f"--executor slurm: sbatch rejected the job array: {exc}") from None
    runs = {c.run_id: job.job_id for job, chunk in zip(jobs, chunks) for c in chunk}
    path = folder / JOBS_FILE
    try:
        record = store.read_json(path)
    except (OSError, ValueError):
        record = {"runs": {}, "launches": []}
    record["runs"].update(runs)
    record["launches"].append(
        {
            "submitted": time.time(),
            "jobs": [j.job_id for j in jobs],
            "runs": len(todo),
            "runs_per_task": k,
            "runs_per_gpu": options.runs_per_gpu,
        }
    )
    store.atomic_write_json(path, record)
    return Submission([j.job_id for j in jobs], runs, queued, folder)


def wait_for_jobs(
    job_ids: Iterable[str],
    poll_s: float = 5.0,
    timeout_s: float | None = None,
    on_poll: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Block until none of ``job_ids`` (array tasks or plain jobs) is in the queue any more.

    A requeued job stays in the queue (pending), so this returns only when every job has ended for good.
    ``on_poll(states)`` sees the jobs still queued. TimeoutError after ``timeout_s``.
    """
    wanted = set(job_ids)
    t0 = time.monotonic()
    while True:
        queue = queue_states()
        if queue is None:
            raise RuntimeError("squeue does not answer; cannot follow the jobs")
        left = {j: s for j, s in queue.items() if j in wanted}
        if not left:
            return
        if on_poll is not None:
            on_poll(left)
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"jobs still queued after {timeout_s:.0f} s: {left}")
        time.sleep(poll_s)


# --- the worker side ---------------------------------------------------------------------------------------


def _preempt_signal() -> signal.Signals:
    from submitit.slurm.slurm import SlurmJobEnvironment

    return signal.Signals[f"SIG{SlurmJobEnvironment.USR_SIG}"]  # what --signal=USR2@N sends (SUBMITIT_PREEMPT_SIGNAL)


class _StopSignals:
    """Signal handlers that only record the signal; training stops at its next step boundary."""

    def __init__(self) -> None:
        self.received: list[str] = []

    def __call__(self, signum: int, frame: Any) -> None:
        self.received.append(signal.Signals(signum).name)  # nothing else here: the loop checkpoints

    def is_set(self) -> bool:
        return bool(self.received)

    def install(self) -> _StopSignals:
        # replaces submitit's handlers (its USR2 one would checkpoint and exit in the middle of a step)
        for sig in (_preempt_signal(), signal.SIGTERM):
            signal.signal(sig, self)
        return self


def _job_id() -> str:
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def _time_left_s() -> int | None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job or shutil.which("squeue") is None:
        return None
    try:
        out = _run(["squeue", "-h", "-j", job, "-o", "%L"], timeout_s=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_time_left(out.stdout.strip()) if out.returncode == 0 else None


def _requeue(job_id: str) -> str | None:
    """``scontrol requeue`` this job (array task); the error text when that failed, else None."""
    if shutil.which("scontrol") is None:
        return "scontrol not found on PATH"
    try:
        out = _run(["scontrol", "requeue", job_id], timeout_s=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return repr(exc)
    return None if out.returncode == 0 else (out.stderr.strip() or f"exit status {out.returncode}")


def _write_incomplete(cell: Any, run_dir: Path, reason: str, step: int | None, state: dict[str, Any]) -> None:
    """``result.json`` with status incomplete: the run is given up (kept out of re-launches), its reason kept."""
    from bench import store
    from experiments.registry import get_task

    task = get_task(cell.config["task"])
    store.atomic_write_json(
        run_dir / store.RESULT,
        {
            "run_id": cell.run_id,
            "status": store.RunStatus.INCOMPLETE,
            "reason": reason,
            "diverged_step": None,
            "metric": {},
            "primary_metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "stability": {},
            "cost": {
                "steps_done": step,
                "attempts": state.get("attempts"),
                "timeouts": state.get("timeouts"),
            },
        },
    )


class SlurmTask(Checkpointable):
    """The callable of every array task: train its runs, one after another; requeue on USR2.

    Called by submitit as ``task(cells, results_root)`` where ``cells`` are ``Cell.to_dict()`` of this
    task's runs. Returns run_id -> final status. Exits through ``SystemExit`` when interrupted (as
    submitit does after a requeue), so no result pickle claims a finished task.
    """

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings

    def checkpoint(self, cells: list[dict[str, Any]], results_root: str) -> DelayedSubmission:
        """Resubmission of the same callable and arguments (submitit's own USR2 handler calls this).

        Only reached when the signal arrives before :meth:`__call__` installed its handlers; the arguments
        are cells and paths, so the requeued task resumes each run from its checkpoint on disk.
        """
        return DelayedSubmission(self, cells, results_root)

    @staticmethod
    def _unfinished(cells: list[Any], root: Path) -> list[Any]:
        from bench import store

        return [
            c for c in cells if store.run_status(store.run_dir(root, c.grid, c.run_id)) not in store.RunStatus.FINISHED
        ]

    def _train(self, cells: list[Any], root: Path, stop: _StopSignals, job_id: str) -> dict[str, dict[str, Any]]:
        """Train ``cells`` until done or signalled; run_id -> result (runs never started are left out)."""
        from bench.executors.worker import run_one
        from bench.loop import RunContext

        s = self.settings
        if s.runs_per_gpu:  # N runs at once per GPU of this task, one process each (device cpu: N at once)
            from bench.executors.local import gpu_jobs, run_pool

            jobs, gpus = gpu_jobs(s.runs_per_gpu, "cuda") if s.device == "cuda" else (s.runs_per_gpu, 0)
            return run_pool(
                cells,
                root,
                jobs,
                device=s.device,
                threads=s.threads,
                code_version=s.code_version,
                grid_tricks=s.grid_tricks,
                show_progress=False,
                gpu_count=gpus,
                wandb_cfg=s.wandb_cfg,
                stop=stop.is_set,
                job_id=job_id,
            )
        results: dict[str, dict[str, Any]] = {}
        for cell in cells:
            if stop.is_set():
                break
            ctx = RunContext(device=s.device, threads=s.threads, stop=stop.is_set, code_version=s.code_version)
            res = run_one(cell, root, ctx, s.grid_tricks.get(cell.task, list(cell.tricks_on)), s.wandb_cfg, job_id)
            results[cell.run_id] = res
            if res["status"] == "interrupted":
                break
        return results

    def __call__(self, cells: list[dict[str, Any]], results_root: str) -> dict[str, str]:
        stop = _StopSignals().install()
        register_extra_tasks()
        from bench import store
        from bench.executors.worker import RunState
        from bench.grid import Cell

        s = self.settings
        job_id = _job_id()
        root = Path(results_root)
        all_cells = [Cell.from_dict(d) for d in cells]
        results = self._train(all_cells, root, stop, job_id)
        statuses = {rid: res["status"] for rid, res in results.items()}
        interrupted = [(c, results[c.run_id].get("step")) for c in all_cells if statuses.get(c.run_id) == "interrupted"]
        if not stop.is_set() or (not interrupted and not self._unfinished(all_cells, root)):
            return statuses  # no signal, or one that came after the last run finished

        received = set(stop.received)
        usr = _preempt_signal().name
        if usr not in received:  # SIGTERM only: the scheduler ends this job (and requeues it, or not)
            for cell, _ in interrupted:
                run_dir = store.run_dir(root, cell.grid, cell.run_id)
                RunState(run_dir, job_id).set("interrupted", reason=f"{'+'.join(sorted(received))} from SLURM")
            print(f"trickbench: {'+'.join(sorted(received))}; checkpointed, exiting", file=sys.stderr, flush=True)
            raise SystemExit(143)

        left_s = _time_left_s()
        # a USR2 is a timeout when it comes with the time limit near (else: preemption, or a manual signal)
        timed_out = left_s is None or left_s <= s.signal_delay_s + SIGNAL_RESOLUTION_S
        why = f"time limit near ({left_s} s left)" if timed_out else f"preempted ({left_s} s left)"
        requeue_states: list[tuple[RunState, dict[str, Any]]] = []
        for cell, step in interrupted:
            run_dir = store.run_dir(root, cell.grid, cell.run_id)
            state = RunState(run_dir, job_id)
            timeouts = state.data.get("timeouts", 0) + int(timed_out)
            if timed_out and timeouts > s.max_requeues:
                reason = (
                    f"time limit reached {timeouts} times (more than --slurm-max-requeues {s.max_requeues}); "
                    f"checkpoint at step {step} kept"
                )
                state.set("incomplete", timeouts=timeouts, reason=reason, step=step)
                _write_incomplete(cell, run_dir, reason, step, state.data)
                statuses[cell.run_id] = store.RunStatus.INCOMPLETE
            else:
                requeue_states.append((state, {"timeouts": timeouts, "reason": why, "step": step}))
        if not self._unfinished(all_cells, root):  # e.g. the interrupted run, the task's last, is now incomplete
            return statuses
        error = _requeue(job_id)
        for state, fields in requeue_states:
            if error is None:
                state.set("requeued", requeues=state.data.get("requeues", 0) + 1, **fields)
            else:
                state.set("interrupted", **(fields | {"reason": f"{why}; requeue failed: {error}"}))
        print(
            f"trickbench: {usr}, {why}: "
            + (f"requeued job {job_id}" if error is None else f"requeue failed ({error}); re-launch the grid"),
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1 if error is None else 2)
