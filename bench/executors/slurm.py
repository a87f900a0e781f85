"""The SLURM executor: a grid's runs as job arrays that survive preemption and time limits.

Submitting side (``bench run SPEC --executor slurm``, :func:`submit_grid`)::

    SlurmOptions (checked before anything is written)  ->  preflight against the cluster (slurm_cluster.py)
    ->  <grid>/submit.lock (one submitter per grid, across hosts: submit_lock.py)
    ->  the runs still to train, minus those already queued  ->  chunks of ``runs_per_task`` runs
    ->  arrays of at most MaxArraySize tasks, each ``sbatch --hold``  (a refusal: nothing written, flag named)
    ->  the submitit pickles, grid.yaml, <grid>/submitit/jobs.json  ->  ``scontrol release``

The workers run submitit's own entry point (``python -m submitit.core._submit``) on the pickles written here:
one :class:`SlurmTask` per array task, whose arguments are its cells and the results path. Jobs are submitted
held and released only once everything they read exists, so a refusal leaves nothing behind and no task
starts before its pickle and log folder are there. A launch killed between ``sbatch`` and ``release`` leaves
held jobs that the next launch of the grid releases (when recorded) or cancels (when not).

Worker side (one array task, :class:`SlurmTask`): the runs of its chunk one after another, each through
``bench.executors.worker.run_one`` — the per-cell path of every executor. With ``--runs-per-gpu N`` the task
trains N runs at once on each of its GPUs (``bench.executors.local.run_pool``: one process per run, pinned
to a GPU, one or more CPUs each), the packing the local executor does. The signals only set a flag;
the loop polls it (``RunContext.stop``) at every step boundary, writes its checkpoint and returns. Then,
outside any signal handler:

- ``SIGUSR2`` (sent ``signal_delay_s`` before the time limit by ``--signal=USR2@N``, or on preemption): the
  task requeues itself with ``scontrol requeue`` (the script always says ``--requeue``, so this works on a
  cluster with ``JobRequeue=0``). When the job had little time left this counts as a timeout of the
  interrupted run (``timeouts`` in its ``state.json``); past ``max_requeues`` timeouts the run is recorded
  ``incomplete`` with the reason instead of being requeued again. A refused requeue (the job's ``Requeue=0``)
  is recorded in the run's state with SLURM's answer; the next ``bench run`` resumes the run.
- ``SIGTERM`` alone (preemption with ``PreemptMode=REQUEUE``, ``scontrol requeue``, ``scancel``, node
  shutdown): the task exits and the scheduler decides whether the job runs again.

A task whose runs failed exits non-zero (the job is FAILED: mail-on-failure fires). The sbatch script writes
the exit status of the worker to ``<grid>/submitit/<job>/exit_status``; ``bench status`` reads it, with the
log, for a run whose task ended without it.

Whatever restarts a task — its own requeue, a preemption, a node failure, or a re-launch of the grid
after a SIGKILL — each run resumes from the checkpoint in its own folder: the submitted pickle holds
only the cells, the results path and how to run (device, threads), never training state.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from submitit.helpers import Checkpointable, DelayedSubmission

from bench.executors.slurm_cluster import (
    DEFAULT_MAX_ARRAY_SIZE,
    Cluster,
    array_sizes,
    parse_duration_s,
    preflight,
    sbatch_refusal,
)
from bench.executors.submit_lock import LOCK_FILE, LockTimeout, SubmissionLock

__all__ = [
    "EXIT_STATUS",
    "JOBS_FILE",
    "SUBMITIT_DIR",
    "QueueEntry",
    "SlurmOptions",
    "SlurmTask",
    "Submission",
    "WorkerSettings",
    "check_cluster",
    "cli_flag",
    "exit_status",
    "job_name",
    "job_records",
    "parse_time_left",
    "queue_jobs",
    "queue_states",
    "reopen_incomplete",
    "sbatch_script",
    "submit_grid",
    "task_log",
    "wait_for_jobs",
]

SUBMITIT_DIR = "submitit"  # <grid>/submitit/<job id>/: submission script, pickles and logs of each array task
JOBS_FILE = "jobs.json"  # <grid>/submitit/jobs.json: run_id -> SLURM job (array task) id, written by the submitter
EXIT_STATUS = "exit_status"  # <grid>/submitit/<job id>/exit_status: the worker's exit status, written by the script
#: sbatch(1), --signal: "the signal may be sent up to 60 seconds earlier than specified"
SIGNAL_RESOLUTION_S = 60

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PARTITIONS = re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9-]*$")
_GRES_ITEM = r"[A-Za-z][A-Za-z0-9_]*(:[A-Za-z0-9_.-]+)?(:\d+)?"
_GRES = re.compile(rf"^{_GRES_ITEM}(,{_GRES_ITEM})*$")
_GPUS = re.compile(r"^(?:(?P<type>[A-Za-z0-9_.-]+):)?(?P<count>-?\d+)$")
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
    "gpus": "--slurm-gpus-per-run [TYPE:]N",
    "gpus-per-node": "--slurm-gpus-per-run [TYPE:]N",
    "gpus-per-task": "--slurm-gpus-per-run [TYPE:]N",
    "gres": "--slurm-gres or --slurm-gpus-per-run [TYPE:]N",
    "cpus-per-task": "--slurm-cpus-per-run",
    "cpus-per-gpu": "--slurm-cpus-per-run",
    "mem": "--slurm-mem-gb",
    "mem-per-cpu": "--slurm-mem-gb",
    "mem-per-gpu": "--slurm-mem-gb",
    "time": "--slurm-time-min",
    "constraint": "--slurm-constraint",
    "nodes": "(one node per array task)",
    "ntasks": "(one task per array task: more would train every run twice)",
    "ntasks-per-node": "(one task per array task: more would train every run twice)",
    "requeue": "(always set: every array task is requeueable)",
    "no-requeue": "(runs must be requeueable)",
    "hold": "(trickbench submits held and releases once the pickles are written)",
    "wrap": "(the script is trickbench's)",
    "parsable": "(set by trickbench)",
    "test-only": "(use bench run --dry-run)",
    "wait": "(use --slurm-wait)",
}
#: sbatch options that would take the submitting environment (python, PYTHONPATH, CUDA, ...) from the workers
_ENVIRONMENT_SBATCH = {
    "export": "keep ALL (the default) or ALL,VAR=value; use --slurm-setup for environment lines",
    "export-file": "use --slurm-setup lines to set variables",
    "get-user-env": "use --slurm-setup lines (e.g. source ~/.bashrc) instead",
    "chdir": "(the workers use absolute paths; a changed directory breaks relative PYTHONPATH entries)",
}


def cli_flag(name: str) -> str:
    """The ``bench run`` flag of a :class:`SlurmOptions` field."""
    if name in ("runs_per_task", "runs_per_gpu", "retry_incomplete"):
        return "--" + name.replace("_", "-")
    if name == "gpu_type":
        return "--slurm-gpus-per-run"
    return "--slurm-" + name.replace("_", "-")


def parse_gpus(value: str | int) -> tuple[str | None, int]:
    """``--slurm-gpus-per-run`` value ``N`` or ``TYPE:N`` -> (type, N); ValueError naming the flag."""
    if isinstance(value, int) and not isinstance(value, bool):
        return None, value
    m = _GPUS.match(str(value).strip())
    if not m:
        raise ValueError(
            f"--slurm-gpus-per-run: {value!r} is not allowed; allowed: N or TYPE:N (GPUs per array task, e.g. 1 "
            "or a100:2)"
        )
    return m.group("type"), int(m.group("count"))


@dataclass(frozen=True)
class SlurmOptions:
    """How a grid runs on a SLURM cluster (how-to-run: never part of a run's config or run_id).

    Each field is the CLI flag ``--slurm-<field>`` (``--runs-per-task``, ``--runs-per-gpu``,
    ``--retry-incomplete`` for those; ``gpu_type`` is the ``TYPE:`` of ``--slurm-gpus-per-run``); the sbatch
    option each maps to is in ``slurm/README.md``. Construction validates every field and raises
    ``ValueError`` naming the flag, the value and what is allowed.
    """

    partition: str | None = None  # --partition; None = the cluster's default partition
    account: str | None = None  # --account
    qos: str | None = None  # --qos
    gpus_per_run: int = 0  # --gpus-per-node=[TYPE:]N: GPUs for each array task
    gpu_type: str | None = None  # the TYPE of --slurm-gpus-per-run TYPE:N (e.g. a100)
    gres: str | None = None  # --gres, e.g. gpu:a100:2 or gpu:1,nvme:1
    cpus_per_run: int = 1  # CPUs per run; --cpus-per-task = this × the runs a task trains at once
    mem_gb: float | None = None  # memory per run; --mem = this × the runs a task trains at once; None = default
    time_min: int = 60  # --time, minutes, for one array task (all its runs_per_task runs)
    constraint: str | None = None  # --constraint, e.g. "a100|h100"
    sbatch: tuple[tuple[str, str], ...] = ()  # further #SBATCH --key=value lines
    setup: tuple[str, ...] = ()  # shell lines the script runs before the worker (e.g. module load cuda)
    runs_per_task: int = 1  # runs one array task trains (one after another, or runs_per_gpu at a time per GPU)
    runs_per_gpu: int | None = None  # runs trained at once on each GPU of an array task (small models)
    array_parallelism: int = 256  # at most this many array tasks run at once (--array=0-N%P)
    max_requeues: int = 3  # time-limit requeues per run; past it the run is recorded incomplete
    signal_delay_s: int = 90  # USR2 this long before the time limit (--signal=USR2@N): checkpoint and requeue
    wait: bool = False  # block until the jobs have left the queue, then write summary and report
    retry_incomplete: bool = False  # train incomplete runs on, with a fresh count of time-limit requeues

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name, pattern, allowed in (
            ("partition", _PARTITIONS, "partition names (letters, digits, '_', '.', '-'), comma-separated"),
            ("account", _NAME, "an account name (letters, digits, '_', '.', '-')"),
            ("qos", _NAME, "a QOS name (letters, digits, '_', '.', '-')"),
            ("gpu_type", _NAME, "a GPU type (letters, digits, '_', '.', '-'), as in TYPE:N"),
            ("gres", _GRES, "NAME[:TYPE][:COUNT], comma-separated, e.g. gpu:a100:2"),
        ):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and pattern.match(value)):
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
        if self.gpu_type is not None and self.gpus_per_run == 0:
            problems.append(f"--slurm-gpus-per-run: {self.gpu_type}:0 is not allowed; allowed: TYPE:N with N ≥ 1")
        valid_gres = isinstance(self.gres, str) and _GRES.match(self.gres)
        if valid_gres and self.gres_gpus[1] and self.gpus_per_run:
            problems.append(
                f"--slurm-gres: {self.gres!r} asks for GPUs and so does --slurm-gpus-per-run "
                f"{self.gpus_per_run}; allowed: GPUs through one of them"
            )
        if self.runs_per_gpu is not None:
            n = self.runs_per_gpu
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                problems.append(f"--runs-per-gpu: {n!r} is not allowed; allowed: an integer ≥ 1")
            elif isinstance(self.gpus_per_run, int) and self.gpus < 1:
                problems.append(
                    f"--runs-per-gpu: {n} is not allowed with --slurm-gpus-per-run {self.gpus_per_run}; allowed: "
                    "only with --slurm-gpus-per-run ≥ 1 (it packs N runs onto each GPU of an array task)"
                )
            elif isinstance(self.runs_per_task, int) and self.runs_per_task < self.concurrent_runs:
                problems.append(
                    f"--runs-per-task: {self.runs_per_task} is not allowed with --runs-per-gpu {n} and "
                    f"--slurm-gpus-per-run {self.gpus}; allowed: ≥ {self.concurrent_runs} (the runs a "
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
            elif key in _ENVIRONMENT_SBATCH and not (key == "export" and value.split(",")[0] == "ALL"):
                problems.append(
                    f"--slurm-sbatch: {key}={value} is not allowed: the workers need the environment of `bench run` "
                    f"(its python, PYTHONPATH, CUDA); {_ENVIRONMENT_SBATCH[key]}"
                )
            if not value or "\n" in value or "\r" in value:
                problems.append(f"--slurm-sbatch: {key}={value!r} is not allowed; allowed: a non-empty one-line value")
        for line in self.setup:
            if not isinstance(line, str) or not line.strip() or "\n" in line or "\r" in line:
                problems.append(
                    f"--slurm-setup: {line!r} is not allowed; allowed: one non-empty shell line per flag, e.g. "
                    "'module load cuda/12.1'"
                )
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
    def gres_gpus(self) -> tuple[str | None, int]:
        """(type, count) of the GPUs asked for through ``--slurm-gres`` (``(None, 0)`` when none)."""
        for item in (self.gres or "").split(","):
            parts = item.split(":")
            if parts[0] == "gpu":
                count = int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
                gtype = parts[1] if len(parts) == 3 or (len(parts) == 2 and not parts[1].isdigit()) else None
                return gtype, count
        return None, 0

    @property
    def gpus(self) -> int:
        """GPUs of one array task, through either flag."""
        return self.gpus_per_run or self.gres_gpus[1]

    @property
    def gpu_kind(self) -> str | None:
        """The GPU type asked for (``--slurm-gpus-per-run TYPE:N`` or ``--slurm-gres gpu:TYPE:N``), else None."""
        return self.gpu_type if self.gpus_per_run else self.gres_gpus[0]

    @property
    def gpu_flag(self) -> str:
        return "--slurm-gres" if self.gres_gpus[1] and not self.gpus_per_run else "--slurm-gpus-per-run"

    @property
    def concurrent_runs(self) -> int:
        """Runs one array task trains at once: ``runs_per_gpu`` × its GPUs, else 1."""
        return self.runs_per_gpu * self.gpus if self.runs_per_gpu else 1

    @property
    def cpus_per_task(self) -> int:
        """``--cpus-per-task``: ``cpus_per_run`` for each run a task trains at once."""
        return self.cpus_per_run * self.concurrent_runs

    @property
    def mem_mb_per_task(self) -> int | None:
        """``--mem`` in MB: ``mem_gb`` for each run a task trains at once (None: the cluster's default)."""
        return None if self.mem_gb is None else round(self.mem_gb * 1024) * self.concurrent_runs

    def submitit_parameters(self, job_name: str) -> dict[str, Any]:
        """Parameters of ``submitit``'s sbatch script (sbatch option names, '_' for '-')."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": self.time_min,
            "cpus_per_task": self.cpus_per_task,
            "signal_delay_s": self.signal_delay_s,
            "array_parallelism": self.array_parallelism,
        }
        if self.gpus_per_run:
            params["gpus_per_node"] = f"{self.gpu_type}:{self.gpus_per_run}" if self.gpu_type else self.gpus_per_run
        if self.mem_mb_per_task is not None:
            mem_mb = self.mem_mb_per_task
            params["mem"] = f"{mem_mb // 1024}GB" if mem_mb % 1024 == 0 else f"{mem_mb}MB"
        for name in ("partition", "account", "qos", "constraint", "gres"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        params["additional_parameters"] = {"requeue": True, **dict(self.sbatch)}
        if self.setup:
            params["setup"] = list(self.setup)
        return params


def _run(cmd: Sequence[str], timeout_s: float = 30.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, check=False, **kwargs)


def check_cluster(options: SlurmOptions, device: str = "cpu", n_tasks: int = 1) -> Cluster:
    """Check that this machine can submit and the cluster can run ``n_tasks`` array tasks of ``options``.

    Call before anything is written (``--dry-run`` included): the SLURM commands are on PATH, the controller
    answers, and the partition (the default one without ``--slurm-partition``) has nodes with the GPUs (of the
    type asked for), CPUs and memory of one task, allows the time limit and the number of tasks (see
    ``slurm_cluster.preflight``). Returns what was read of the cluster; ``ValueError`` naming the flag otherwise.
    """
    missing = [c for c in ("sbatch", "srun", "squeue", "sinfo", "scontrol") if shutil.which(c) is None]
    if missing:
        raise ValueError(
            f"--executor slurm: {', '.join(missing)} not found on PATH; run on a SLURM login node "
            "(or start the test cluster, as root: bash slurm/cluster.sh install && bash slurm/cluster.sh start)"
        )
    if device.startswith("cuda") and options.gpus < 1:
        raise ValueError(f"--device {device}: needs --slurm-gpus-per-run ≥ 1 with --executor slurm")
    return preflight(options, n_tasks)


def test_only(options: SlurmOptions, grid_dir: Path, grid: str, n_tasks: int) -> str:
    """``sbatch --test-only`` of the first array a launch would submit (``--dry-run``); sbatch's answer.

    Nothing is submitted or written. ``ValueError`` naming the flag when sbatch refuses the request.
    """
    folder = Path(grid_dir).resolve() / SUBMITIT_DIR / "%j"
    script = sbatch_script(options, folder, job_name(grid), max(1, n_tasks), shlex.quote(sys.executable))
    out = _run(["sbatch", "--test-only"], input=script)
    if out.returncode != 0:
        raise ValueError(sbatch_refusal(out.stderr, options))
    return (out.stderr or out.stdout).strip().removeprefix("sbatch: ")


def parse_time_left(text: str) -> int | None:
    """``squeue -o %L`` (time left of a job) in seconds; None when the job has no limit or SLURM cannot tell."""
    try:
        return parse_duration_s(text)
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
    #: tricks/tasks the launching process registered by code (``tricks.plugins.registrations``), repeated in the task
    registrations: list[tuple[str, str, str | None]] = field(default_factory=list)


@dataclass
class Submission:
    """What one ``bench run --executor slurm`` submitted."""

    job_ids: list[str]  # one per array task, e.g. "1234_0"
    runs: dict[str, str]  # run_id -> job id
    already_queued: dict[str, str]  # run_id -> job id: still in the queue from an earlier launch, not resubmitted
    folder: Path  # <grid>/submitit
    reopened: list[str] = field(default_factory=list)  # incomplete runs given a fresh count of time-limit requeues
    messages: list[str] = field(default_factory=list)  # what the submission did besides submitting (to print)

    @property
    def array_ids(self) -> list[str]:
        return sorted({j.split("_")[0] for j in self.job_ids}, key=int)


class QueueEntry(NamedTuple):
    """One job (array task) in the queue: its state and squeue's reason (``None`` for running jobs)."""

    state: str
    reason: str | None


def job_records(grid_dir: Path) -> dict[str, str]:
    """run_id -> the SLURM job (array task) that was last submitted for it (``<grid>/submitit/jobs.json``)."""
    return dict(_read_jobs_file(grid_dir).get("runs", {}))


def _read_jobs_file(grid_dir: Path) -> dict[str, Any]:
    from bench import store

    try:
        record = store.read_json(Path(grid_dir) / SUBMITIT_DIR / JOBS_FILE)
    except (OSError, ValueError):
        return {"runs": {}, "launches": []}
    return record if isinstance(record, dict) else {"runs": {}, "launches": []}


def task_folder(grid_dir: Path, job_id: str) -> Path:
    """``<grid>/submitit/<job id>/``: the pickle, logs and exit status of one array task."""
    return Path(grid_dir) / SUBMITIT_DIR / job_id


def task_log(grid_dir: Path, job_id: str, stream: str = "err") -> Path:
    """The stderr (``stream="err"``) or stdout (``"out"``) log of array task ``job_id`` (one file per task,
    appended to by every restart of the task)."""
    return task_folder(grid_dir, job_id) / f"{job_id}_0_log.{stream}"


def exit_status(grid_dir: Path, job_id: str) -> int | None:
    """The exit status of the worker of array task ``job_id``, as its sbatch script recorded it; None when the
    task has not ended, or was killed with its script (time limit, scancel) before it could record one."""
    try:
        return int((task_folder(grid_dir, job_id) / EXIT_STATUS).read_text().strip())
    except (OSError, ValueError):
        return None


def job_name(grid: str) -> str:
    """The SLURM job name of a grid's arrays (also how its jobs are told apart from others with reused ids)."""
    return f"trickbench-{grid}"


def queue_jobs(name: str | None = None) -> dict[str, QueueEntry] | None:
    """Job (array task) id -> (state, pending reason) of this user's jobs still in the queue, only those named
    ``name`` when given.

    None when ``squeue`` is not installed or the controller does not answer (a local grid, or no cluster).
    """
    if shutil.which("squeue") is None:
        return None
    cmd = ["squeue", "-h", "-r", "-o", "%i|%T|%r", "-u", str(os.getuid())]
    cmd += [f"--name={name}"] if name else []
    try:
        out = _run(cmd, timeout_s=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    jobs = {}
    for line in out.stdout.splitlines():
        job, _, rest = line.strip().partition("|")
        state, _, reason = rest.partition("|")
        if job:
            jobs[job] = QueueEntry(state, None if reason in ("", "None") else reason)
    return jobs


def queue_states(name: str | None = None) -> dict[str, str] | None:
    """Job (array task) id -> state (PENDING, RUNNING, ...) of this user's queued jobs (see :func:`queue_jobs`)."""
    jobs = queue_jobs(name)
    return None if jobs is None else {job: entry.state for job, entry in jobs.items()}


def _queued_runs(grid_dir: Path, queue: dict[str, QueueEntry]) -> dict[str, str]:
    """run_id -> job id for the grid's runs whose last job is still in the queue (never submit those twice)."""
    return {rid: job for rid, job in job_records(grid_dir).items() if job in queue}


def sbatch_script(
    options: SlurmOptions,
    folder: Path,
    job_name: str,
    n_tasks: int,
    python: str,
    array_parallelism: int | None = None,
) -> str:
    """The sbatch script of one job array of ``n_tasks`` tasks (what :func:`submit_grid` submits).

    ``folder`` is ``<grid>/submitit/%j``. After the worker, the script records its exit status in
    ``<grid>/submitit/<job>/exit_status`` and exits with it.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python} -u -m submitit.core._submit {folder}"
    params = options.submitit_parameters(job_name)
    params["map_count"] = n_tasks
    if array_parallelism is not None:
        params["array_parallelism"] = array_parallelism
    task_dir = shlex.quote(str(Path(folder).parent)) + '/"${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"'
    params["teardown"] = [
        "trickbench_exit=$?",
        f'echo "$trickbench_exit" > {task_dir}/{EXIT_STATUS}',
        'exit "$trickbench_exit"',
        "",
    ]
    return _make_sbatch_string(command=command, folder=folder, **params)


def _parallelism(sizes: list[int], total: int) -> list[int]:
    """``--slurm-array-parallelism`` shared among the arrays a submission is split into (each at least 1)."""
    n = sum(sizes)
    return [max(1, total * size // n) for size in sizes]


def _sbatch_held(script: str, options: SlurmOptions) -> str:
    """Submit ``script`` held (``sbatch --hold``, from stdin: nothing written); its job id, or the refusal."""
    out = _run(["sbatch", "--hold", "--parsable"], input=script, timeout_s=120)
    if out.returncode != 0:
        raise ValueError(sbatch_refusal(out.stderr or out.stdout, options) + "; nothing was submitted or written")
    return out.stdout.strip().split(";")[0]


def _scancel(job_ids: Iterable[str]) -> None:
    ids = list(job_ids)
    if ids:
        _run(["scancel", *ids], timeout_s=60)


def _job_stdout(job_id: str) -> str | None:
    """The stdout path SLURM holds for ``job_id`` (an array: its first task), None when it cannot tell."""
    from bench.executors.slurm_cluster import parse_records

    try:
        out = _run(["scontrol", "show", "job", "-o", job_id], timeout_s=30)
    except (OSError, subprocess.SubprocessError):
        return None
    records = parse_records(out.stdout, "JobId")
    return records[0].get("StdOut") if out.returncode == 0 and records else None


def _finish_interrupted_launches(grid_dir: Path, grid: str, queue: dict[str, QueueEntry]) -> list[str]:
    """Release the held arrays of a launch that recorded them but died before releasing; cancel held arrays of
    this grid's folder that no launch recorded (it died between sbatch and writing jobs.json). Messages."""
    from bench import store

    record = _read_jobs_file(grid_dir)
    recorded = {str(a["id"]) for launch in record["launches"] for a in launch.get("arrays", [])}
    held = {job.split("_")[0] for job, entry in queue.items() if entry.reason == "JobHeldUser"}
    messages = []
    changed = False
    for launch in record["launches"]:
        if launch.get("released", True):
            continue
        ids = [str(a["id"]) for a in launch.get("arrays", [])]
        to_release = [a for a in ids if a in held]
        for array in to_release:
            out = _run(["scontrol", "release", array], timeout_s=60)
            if out.returncode != 0:
                raise ValueError(f"--executor slurm: scontrol release {array} failed: {out.stderr.strip()}")
        if to_release:
            messages.append(f"released array {', '.join(to_release)}: held by a launch that ended before releasing")
        launch["released"] = True
        changed = True
    if changed:
        store.atomic_write_json(Path(grid_dir) / SUBMITIT_DIR / JOBS_FILE, record)
    folder = str(Path(grid_dir).resolve() / SUBMITIT_DIR)
    orphans = [a for a in sorted(held - recorded) if (_job_stdout(a) or "").startswith(folder + os.sep)]
    if orphans:
        _scancel(orphans)
        messages.append(
            f"cancelled held array {', '.join(orphans)}: submitted by a launch that ended before recording it"
        )
    return messages


def reopen_incomplete(run_dirs: Iterable[Path]) -> list[str]:
    """Let runs recorded ``incomplete`` train on: their ``result.json`` moves into ``state.json`` (``retries``) and
    the count of time-limit requeues restarts at 0, so they get a full ``--slurm-max-requeues`` again. Also
    applied to a run whose ``result.json`` was deleted by hand after it became incomplete. Returns the run ids
    reopened. Call under the submission lock, after sbatch accepted and before the jobs are released."""
    from bench import store
    from bench.executors.worker import STATE, read_state

    reopened = []
    for rdir in run_dirs:
        rdir = Path(rdir)
        state = read_state(rdir)
        result_path = rdir / store.RESULT
        result = None
        if result_path.exists():
            result = store.read_json(result_path)
            if result.get("status") != store.RunStatus.INCOMPLETE:
                continue
        elif state.get("state") != store.RunStatus.INCOMPLETE:
            continue
        retry = {
            "at": time.time(),
            "timeouts": state.get("timeouts", 0),
            "reason": (result or {}).get("reason", state.get("reason")),
            "steps_done": ((result or {}).get("cost") or {}).get("steps_done", state.get("step")),
            "result": result,  # the incomplete result.json, kept
        }
        state.update(state="reopened", timeouts=0, reason=None, retries=[*state.get("retries", []), retry])
        store.atomic_write_json(rdir / STATE, state)
        result_path.unlink(missing_ok=True)
        reopened.append(rdir.name)
    return reopened


def submit_grid(
    cells: Sequence[Any],
    grid_dir: Path,
    results_root: Path,
    options: SlurmOptions,
    settings: WorkerSettings,
    grid_name: str,
    *,
    cluster: Cluster | None = None,
    on_accepted: Callable[[], None] | None = None,
    on_wait: Callable[[dict[str, Any]], None] | None = None,
) -> Submission:
    """Submit ``cells`` (the runs still to train) as job arrays of ``runs_per_task`` runs per task.

    Under ``<grid>/submit.lock`` (concurrent launches of one grid submit each run once): runs whose last job is
    still in the queue are left alone; the rest go out in arrays of at most ``cluster.max_array_size`` tasks,
    submitted held. Only once sbatch accepted all of them are the pickles, ``jobs.json`` and (``on_accepted``,
    e.g. grid.yaml) written, incomplete runs among ``cells`` reopened (:func:`reopen_incomplete`), and the
    arrays released. A refusal cancels what was accepted, writes nothing and raises ``ValueError`` naming the
    flag; anything else that goes wrong before the release (Ctrl-C included) cancels the arrays and removes
    what was written. Submits nothing when nothing is left.
    """
    from bench import store

    grid_dir = Path(grid_dir)
    folder = grid_dir.resolve() / SUBMITIT_DIR
    lock = SubmissionLock(grid_dir / LOCK_FILE, on_wait=on_wait)
    try:
        lock.acquire()
    except LockTimeout as exc:
        raise ValueError(f"--executor slurm: {exc}; if no launch is running, delete {lock.path}") from None
    kept = False
    try:
        queue = queue_jobs(job_name(grid_name))
        if queue is None:
            raise ValueError("--executor slurm: squeue does not answer; cannot tell which runs are already queued")
        messages = _finish_interrupted_launches(grid_dir, grid_name, queue) if folder.exists() else []
        queued = _queued_runs(grid_dir, queue)
        todo = [c for c in cells if c.run_id not in queued]
        if not todo:
            if on_accepted is not None:
                on_accepted()
            kept = True
            return Submission([], {}, queued, folder, messages=messages)
        k = options.runs_per_task
        chunks = [todo[i : i + k] for i in range(0, len(todo), k)]
        sizes = array_sizes(len(chunks), cluster.max_array_size if cluster else DEFAULT_MAX_ARRAY_SIZE)
        python = shlex.quote(sys.executable)
        name = job_name(grid_name)
        scripts: list[tuple[str, str, int]] = []  # (array id, script, tasks)
        try:
            for size, parallel in zip(sizes, _parallelism(sizes, options.array_parallelism)):
                script = sbatch_script(options, folder / "%j", name, size, python, array_parallelism=parallel)
                lock.check()
                scripts.append((_sbatch_held(script, options), script, size))
        except BaseException:
            _scancel(a for a, _, _ in scripts)
            raise
        written: list[Path] = []
        created_folder = not folder.exists()
        try:
            root = str(Path(results_root).resolve())
            runs, job_ids = _write_tasks(scripts, chunks, folder, root, options, settings, written)
            reopened = reopen_incomplete(store.run_dir(results_root, c.grid, c.run_id) for c in todo)
            if on_accepted is not None:
                on_accepted()
            record = _read_jobs_file(grid_dir)
            record["runs"].update(runs)
            launch = {
                "submitted": time.time(),
                "arrays": [{"id": a, "tasks": n} for a, _, n in scripts],
                "runs": len(todo),
                "runs_per_task": k,
                "runs_per_gpu": options.runs_per_gpu,
                "released": False,
            }
            record["launches"].append(launch)
            lock.check()
            store.atomic_write_json(folder / JOBS_FILE, record)
            for array, _, _ in scripts:
                out = _run(["scontrol", "release", array], timeout_s=60)
                if out.returncode != 0:
                    raise ValueError(f"--executor slurm: scontrol release {array} failed: {out.stderr.strip()}")
            launch["released"] = True
            store.atomic_write_json(folder / JOBS_FILE, record)
        except BaseException:
            _scancel(a for a, _, _ in scripts)
            for path in reversed(written):  # task folders (pickle inside) and array folders (script inside)
                shutil.rmtree(path, ignore_errors=True)
            if created_folder:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        kept = True
        return Submission(job_ids, runs, queued, folder, reopened=reopened, messages=messages)
    except LockTimeout as exc:  # taken over while this launch was suspended: what it submitted is cancelled
        raise ValueError(f"--executor slurm: {exc}; this launch's submission was cancelled: run it again") from None
    finally:
        lock.release()
        if not kept:
            lock.remove_created_dirs()


def _write_tasks(
    scripts: list[tuple[str, str, int]],
    chunks: list[list[Any]],
    folder: Path,
    root: str,
    options: SlurmOptions,
    settings: WorkerSettings,
    written: list[Path],
) -> tuple[dict[str, str], list[str]]:
    """The submitit pickle of every accepted array task and the script of every array; (run -> job, job ids)."""
    from submitit.core.utils import JobPaths

    task = SlurmTask(settings)
    runs: dict[str, str] = {}
    job_ids: list[str] = []
    index = 0
    for array, script, size in scripts:
        array_dir = folder / array
        array_dir.mkdir(parents=True, exist_ok=True)
        written.append(array_dir)
        (array_dir / f"{array}_submission.sh").write_text(script)
        for i in range(size):
            job_id = f"{array}_{i}"
            chunk = chunks[index]
            index += 1
            paths = JobPaths(folder / "%j", job_id=job_id)
            paths.folder.mkdir(parents=True, exist_ok=True)
            written.append(paths.folder)
            delayed = DelayedSubmission(task, [c.to_dict() for c in chunk], root)
            delayed.set_timeout(options.time_min, options.max_requeues)
            delayed.dump(paths.submitted_pickle)
            job_ids.append(job_id)
            runs.update({c.run_id: job_id for c in chunk})
    return runs, job_ids


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
    """``scontrol requeue`` this job (array task); None when SLURM took it back, else why not (for the run's state).

    SLURM refuses with "Requested operation is presently disabled" when the job is not requeueable (its
    ``Requeue=0``: the cluster's ``JobRequeue=0`` without ``--requeue``, or an administrator's update).
    """
    if shutil.which("scontrol") is None:
        return "scontrol not found on PATH"
    try:
        out = _run(["scontrol", "requeue", job_id], timeout_s=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return repr(exc)
    if out.returncode == 0:
        return None
    answer = out.stderr.strip() or f"exit status {out.returncode}"
    if "disabled" in answer.lower():
        return f"requeueing is disabled for job {job_id} (its Requeue=0; SLURM: {answer})"
    return answer


def _write_error(cell: Any, run_dir: Path, error: str, tb: str, job_id: str) -> None:
    """``error.json`` (status failed; re-run on re-launch) for a run its task could not train, with the task's log."""
    from bench import store

    log = task_log(run_dir.parent.parent, job_id) if job_id else None
    run_dir.mkdir(parents=True, exist_ok=True)
    store.atomic_write_json(
        run_dir / store.ERROR,
        {
            "run_id": cell.run_id,
            "error": error,
            "traceback_tail": tb.splitlines()[-15:],
            "job_id": job_id,
            "log": str(log) if log else None,
        },
    )


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
        from bench.grid import Cell

        job_id = _job_id()
        root = Path(results_root)
        all_cells = [Cell.from_dict(d) for d in cells]
        try:
            from bench.plugins import replay_registrations

            replay_registrations(self.settings.registrations)
            results = self._train(all_cells, root, stop, job_id)
        except Exception as exc:  # the task cannot train (environment, imports, ...): each unfinished run failed
            from bench import store

            tb = traceback.format_exc()
            for cell in self._unfinished(all_cells, root):
                run_dir = store.run_dir(root, cell.grid, cell.run_id)
                if not (run_dir / store.ERROR).exists():
                    _write_error(cell, run_dir, f"array task {job_id} failed before finishing: {exc!r}", tb, job_id)
            raise
        statuses = {rid: res["status"] for rid, res in results.items()}
        interrupted = [(c, results[c.run_id].get("step")) for c in all_cells if statuses.get(c.run_id) == "interrupted"]
        if not stop.is_set() or (not interrupted and not self._unfinished(all_cells, root)):
            return self._finish(statuses)  # no signal, or one that came after the last run finished
        return self._after_signal(all_cells, root, stop, job_id, statuses, interrupted)

    @staticmethod
    def _finish(statuses: dict[str, str]) -> dict[str, str]:
        """The task's result; a task with failed runs exits non-zero (the job ends FAILED)."""
        failed = sorted(rid for rid, st in statuses.items() if st == "failed")
        if failed:
            print(
                f"trickbench: {len(failed)} of {len(statuses)} runs failed ({', '.join(failed)}); "
                "see error.json in their folders",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(1)
        return statuses

    def _after_signal(
        self,
        all_cells: list[Any],
        root: Path,
        stop: _StopSignals,
        job_id: str,
        statuses: dict[str, str],
        interrupted: list[tuple[Any, int | None]],
    ) -> dict[str, str]:
        """Checkpointed after a signal: exit (SIGTERM), or requeue this task / record runs incomplete (USR2)."""
        from bench import store
        from bench.executors.worker import RunState

        s = self.settings
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
            return self._finish(statuses)
        error = _requeue(job_id)
        for state, fields in requeue_states:
            if error is None:
                state.set("requeued", requeues=state.data.get("requeues", 0) + 1, requeue_failed=None, **fields)
            else:
                reason = f"{why}; requeue failed: {error}; checkpointed: the next bench run resumes it"
                state.set("interrupted", **(fields | {"reason": reason, "requeue_failed": error}))
        print(
            f"trickbench: {usr}, {why}: "
            + (f"requeued job {job_id}" if error is None else f"requeue failed ({error}); re-launch the grid"),
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1 if error is None else 2)
