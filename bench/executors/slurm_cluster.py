"""What a SLURM cluster allows, read from ``scontrol``/``sacctmgr``, and the preflight of a submission against it.

Call :func:`preflight` before anything is written or submitted (``bench run --executor slurm``, ``--dry-run``
included). It reads the cluster once (:func:`read_cluster`: partitions with their nodes, ``MaxArraySize``,
``MaxJobCount``, and QOS limits where ``sacctmgr`` can read them) and raises ``ValueError`` naming the
``bench run`` flag to change when a request cannot run: a partition that does not exist (or no default
partition), a time limit above ``MaxTime``, more GPUs (of the type asked for), CPUs or memory per task than
any node of the partition has, unknown node features, more array tasks than the cluster holds, or a QOS
limit. sbatch itself accepts most such jobs (``EnforcePartLimits=NO`` is SLURM's default) and leaves them
pending for ever (``Reason=PartitionConfig``); nothing here submits anything.

:func:`array_sizes` splits a submission into arrays of at most ``MaxArraySize`` tasks; :func:`sbatch_refusal`
turns sbatch's error text into a message naming the trickbench flag of the offending sbatch option.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.executors.slurm import SlurmOptions

__all__ = [
    "Cluster",
    "Node",
    "Partition",
    "QosLimits",
    "array_sizes",
    "parse_duration_s",
    "parse_gres",
    "parse_records",
    "preflight",
    "read_cluster",
    "sbatch_refusal",
]

#: SLURM's MaxArraySize when ``scontrol show config`` does not say: the largest array index is one less
DEFAULT_MAX_ARRAY_SIZE = 1001
_UNLIMITED = {"UNLIMITED", "INFINITE", "NONE", "N/A", "(NULL)", ""}


def _run(cmd: Sequence[str], timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout_s, check=False)


def parse_duration_s(text: str) -> int | None:
    """SLURM durations in seconds (``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``); None for no limit.

    ``ValueError`` for text that is no duration.
    """
    text = text.strip()
    if text.upper() in _UNLIMITED or text.upper() in ("INVALID", "NOT_SET"):
        return None
    days, sep, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) > 3 or (sep and not days):
        raise ValueError(f"not a SLURM duration: {text!r}")
    if sep:  # days-hours[:minutes[:seconds]]
        h, m, s = [*parts, 0, 0][:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    if len(parts) == 1:  # minutes
        return parts[0] * 60
    if len(parts) == 2:  # minutes:seconds
        return parts[0] * 60 + parts[1]
    return parts[0] * 3600 + parts[1] * 60 + parts[2]


def parse_records(text: str, key: str) -> list[dict[str, str]]:
    """``scontrol show <thing> -o`` output (one record per line, ``Key=Value`` separated by spaces) as dicts.

    Values with spaces (``OS=Linux 6.1 #1 SMP``, ``Reason=Not responding``) are kept whole: a word without
    ``=`` continues the previous value. ``key`` names the field every record starts with (``NodeName``).
    """
    records = []
    for line in text.splitlines():
        if not line.strip().startswith(f"{key}="):
            continue
        record: dict[str, str] = {}
        last = None
        for word in line.split():
            name, sep, value = word.partition("=")
            if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9_/:]*", name):
                record[name] = value
                last = name
            elif last is not None:
                record[last] += " " + word
        records.append(record)
    return records


def parse_gres(text: str) -> dict[tuple[str, str | None], int]:
    """``gpu:a100:4(S:0-1),gpu:v100:2,shard:8`` -> ``{("gpu", "a100"): 4, ("gpu", "v100"): 2, ("shard", None): 8}``."""
    found: dict[tuple[str, str | None], int] = {}
    if text.strip().upper() in _UNLIMITED:
        return found
    for item in re.sub(r"\([^)]*\)", "", text).split(","):
        parts = [p for p in item.strip().split(":") if p]
        if not parts:
            continue
        count = 1
        if len(parts) > 1 and re.fullmatch(r"\d+[KMG]?", parts[-1]):
            count = _count(parts.pop())
        name, gtype = parts[0], (parts[1] if len(parts) > 1 else None)
        found[(name, gtype)] = found.get((name, gtype), 0) + count
    return found


def _count(text: str) -> int:
    scale = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


def _int_or_none(text: str | None) -> int | None:
    if text is None or text.strip().upper() in _UNLIMITED:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _mb(text: str | None) -> int | None:
    """``--mem``-style sizes (``4000``, ``16G``, ``1.5T``) in MB; None for unlimited or unknown."""
    if text is None or text.strip().upper() in _UNLIMITED:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", text.strip().upper())
    if not m:
        return None
    scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[m.group(2)]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class Node:
    """One node as configured (``scontrol show node``); its current state does not matter to preflight."""

    name: str
    cpus: int
    memory_mb: int
    gres: dict[tuple[str, str | None], int] = field(default_factory=dict)
    features: frozenset[str] = frozenset()
    partitions: tuple[str, ...] = ()

    def gpus(self, gpu_type: str | None = None) -> int:
        """GPUs of ``gpu_type`` (any type when None) this node has."""
        return sum(n for (name, t), n in self.gres.items() if name == "gpu" and (gpu_type is None or t == gpu_type))

    @property
    def gpu_types(self) -> set[str]:
        return {t for (name, t) in self.gres if name == "gpu" and t}


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool = False
    state: str = "UP"
    max_time_s: int | None = None  # None: no limit
    max_cpus_per_node: int | None = None
    max_mem_per_node_mb: int | None = None
    max_mem_per_cpu_mb: int | None = None
    qos: str | None = None  # the partition's QOS, whose limits apply to its jobs


@dataclass(frozen=True)
class QosLimits:
    """The limits of one QOS that preflight checks (None: no limit, or not readable)."""

    name: str
    max_wall_s: int | None = None
    max_tres_per_job: dict[str, int] = field(default_factory=dict)  # cpu, mem (MB), gres/gpu, ...
    max_submit_jobs_per_user: int | None = None


@dataclass(frozen=True)
class Cluster:
    """What the cluster allows (read once per launch by :func:`read_cluster`)."""

    partitions: dict[str, Partition]
    nodes: dict[str, Node]
    max_array_size: int = DEFAULT_MAX_ARRAY_SIZE
    max_job_count: int | None = None
    job_requeue: bool | None = None
    qos: dict[str, QosLimits] = field(default_factory=dict)  # empty when sacctmgr cannot tell (no accounting)

    @property
    def default_partition(self) -> str | None:
        return next((p.name for p in self.partitions.values() if p.default), None)

    def nodes_of(self, partition: str) -> list[Node]:
        return [n for n in self.nodes.values() if partition in n.partitions]


def read_cluster() -> Cluster:
    """Partitions, nodes, array and job limits, and readable QOS limits of the cluster this machine submits to.

    ``ValueError`` when the controller does not answer.
    """
    parts = _run(["scontrol", "show", "partition", "-o"])
    if parts.returncode != 0:
        raise ValueError(f"--executor slurm: the SLURM controller does not answer (scontrol: {parts.stderr.strip()})")
    nodes_out = _run(["scontrol", "show", "node", "-o"])
    config_out = _run(["scontrol", "show", "config"])
    partitions = {}
    for rec in parse_records(parts.stdout, "PartitionName"):
        partitions[rec["PartitionName"]] = Partition(
            name=rec["PartitionName"],
            default=rec.get("Default", "NO").upper() == "YES",
            state=rec.get("State", "UP").upper(),
            max_time_s=_duration_or_none(rec.get("MaxTime", "UNLIMITED")),
            max_cpus_per_node=_int_or_none(rec.get("MaxCPUsPerNode")),
            max_mem_per_node_mb=_mb(rec.get("MaxMemPerNode")),
            max_mem_per_cpu_mb=_mb(rec.get("MaxMemPerCPU")),
            qos=None if rec.get("QoS", "N/A").upper() in _UNLIMITED else rec["QoS"],
        )
    nodes = {}
    for rec in parse_records(nodes_out.stdout, "NodeName"):
        features = rec.get("AvailableFeatures", "")
        nodes[rec["NodeName"]] = Node(
            name=rec["NodeName"],
            cpus=_int_or_none(rec.get("CPUEfctv")) or _int_or_none(rec.get("CPUTot")) or 0,
            memory_mb=(_mb(rec.get("RealMemory")) or 0) - (_mb(rec.get("MemSpecLimit")) or 0),
            gres=parse_gres(rec.get("Gres", "")),
            features=frozenset(f for f in features.split(",") if f and f.upper() not in _UNLIMITED),
            partitions=tuple(p for p in rec.get("Partitions", "").split(",") if p),
        )
    config = {}
    for line in config_out.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    return Cluster(
        partitions=partitions,
        nodes=nodes,
        max_array_size=_int_or_none(config.get("MaxArraySize")) or DEFAULT_MAX_ARRAY_SIZE,
        max_job_count=_int_or_none(config.get("MaxJobCount")),
        job_requeue=None if "JobRequeue" not in config else config["JobRequeue"] == "1",
        qos=read_qos(),
    )


def _duration_or_none(text: str) -> int | None:
    try:
        return parse_duration_s(text)
    except ValueError:
        return None


def read_qos() -> dict[str, QosLimits]:
    """QOS name -> limits from ``sacctmgr``; ``{}`` when it is absent or cannot read them (no accounting)."""
    if shutil.which("sacctmgr") is None:
        return {}
    try:
        out = _run(["sacctmgr", "-nP", "show", "qos", "format=Name,MaxWall,MaxTRES,MaxSubmitPU"], timeout_s=15)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    limits = {}
    for line in out.stdout.splitlines():
        name, wall, tres, submit = [*line.split("|"), "", "", ""][:4]
        if not name:
            continue
        per_job = {}
        for item in filter(None, tres.split(",")):
            key, _, value = item.partition("=")
            amount = _mb(value) if key == "mem" else _int_or_none(value)
            if amount is not None:
                per_job[key] = amount
        limits[name] = QosLimits(name, _duration_or_none(wall) if wall else None, per_job, _int_or_none(submit))
    return limits


def array_sizes(n_tasks: int, max_array_size: int) -> list[int]:
    """Task counts of the arrays ``n_tasks`` are split into (each at most ``max_array_size``: indices 0..size-1)."""
    if max_array_size < 1:
        raise ValueError(f"MaxArraySize {max_array_size} leaves no room for a job array")
    full, rest = divmod(n_tasks, max_array_size)
    return [max_array_size] * full + ([rest] if rest else [])


def preflight(options: SlurmOptions, n_tasks: int, cluster: Cluster | None = None) -> Cluster:
    """Check ``options`` for ``n_tasks`` array tasks against the cluster; return it. ``ValueError`` naming the flag.

    Without ``--slurm-partition`` the cluster's default partition is checked. With several partitions a request
    passes when one of them can run it (SLURM starts it in whichever can).
    """
    cluster = cluster if cluster is not None else read_cluster()
    if options.partition:
        wanted = options.partition.split(",")
        for name in wanted:
            if name not in cluster.partitions:
                from tricks.card import did_you_mean

                hint = did_you_mean(name, list(cluster.partitions))
                raise ValueError(
                    f"--slurm-partition: {name!r} is not a partition of this cluster{f' ({hint})' if hint else ''}; "
                    "allowed: "
                    f"{', '.join(sorted(cluster.partitions)) or '(none)'}"
                )
    else:
        default = cluster.default_partition
        if default is None:
            raise ValueError(
                "--slurm-partition: this cluster has no default partition; give one of "
                f"{', '.join(sorted(cluster.partitions)) or '(none)'}"
            )
        wanted = [default]
    is_default = not options.partition
    problems = [_partition_problem(options, cluster, cluster.partitions[name], is_default) for name in wanted]
    if all(problems):
        raise ValueError(problems[0] if len(problems) == 1 else "\n".join(problems))
    if cluster.max_job_count is not None and n_tasks > cluster.max_job_count:
        raise ValueError(
            f"--runs-per-task: {options.runs_per_task} gives {n_tasks} array tasks, more than the cluster holds "
            f"(MaxJobCount={cluster.max_job_count}); allowed: a --runs-per-task that gives at most that many"
        )
    _check_qos(options, n_tasks, cluster, wanted)
    return cluster


def _partition_problem(options: SlurmOptions, cluster: Cluster, part: Partition, is_default: bool) -> str | None:
    """Why ``part`` cannot run one array task of ``options`` (naming the flag), or None when it can."""
    where = f"partition {part.name!r}" + (" (the cluster's default)" if is_default else "")
    if part.state in ("INACTIVE", "DRAIN"):
        return f"--slurm-partition: {where} is {part.state} and takes no jobs"
    if part.max_time_s is not None and options.time_min * 60 > part.max_time_s:
        return (
            f"--slurm-time-min: {options.time_min} is more than {where} allows (MaxTime {part.max_time_s // 60} "
            "minutes); allowed: at most that, with more --slurm-max-requeues or fewer --runs-per-task"
        )
    nodes = cluster.nodes_of(part.name)
    if not nodes:
        return f"--slurm-partition: {where} has no nodes"
    gpus, gpu_type = options.gpus, options.gpu_kind
    if gpus:
        flag = options.gpu_flag
        fit = [n for n in nodes if n.gpus(gpu_type) >= gpus]
        if not fit:
            have = max(n.gpus(gpu_type) for n in nodes)
            kind = f"{gpu_type} GPU(s)" if gpu_type else "GPU(s)"
            if not any(n.gpus() for n in nodes):
                return f"{flag}: {gpus} GPU(s) per array task asked for, but {where} has no GPUs"
            types = sorted({t for n in nodes for t in n.gpu_types})
            return f"{flag}: {gpus} {kind} per array task asked for, but the nodes of {where} have at most {have}" + (
                f" (GPU types there: {', '.join(types)})" if types else " (GPUs there have no type)"
            )
        nodes = fit
    cpus = options.cpus_per_task
    cpu_flag = "--slurm-cpus-per-run" + (" / --runs-per-gpu" if options.concurrent_runs > 1 else "")
    limit = part.max_cpus_per_node
    fit = [n for n in nodes if n.cpus >= cpus and (limit is None or cpus <= limit)]
    if not fit:
        most = max(min(n.cpus, limit or n.cpus) for n in nodes)
        return (
            f"{cpu_flag}: an array task asks for {cpus} CPUs ({options.cpus_per_run} per run × "
            f"{options.concurrent_runs} at once), but the nodes of {where}"
            + (" that have the GPUs asked for" if gpus else "")
            + f" offer at most {most}"
        )
    nodes = fit
    mem_mb = options.mem_mb_per_task
    if mem_mb is not None:
        cap = part.max_mem_per_node_mb
        if part.max_mem_per_cpu_mb is not None:
            cap = min(cap or 1 << 62, part.max_mem_per_cpu_mb * cpus)
        fit = [n for n in nodes if n.memory_mb >= mem_mb and (cap is None or mem_mb <= cap)]
        if not fit:
            most = max(min(n.memory_mb, cap or n.memory_mb) for n in nodes)
            return (
                f"--slurm-mem-gb: an array task asks for {mem_mb / 1024:g} GB ({options.mem_gb:g} per run × "
                f"{options.concurrent_runs} at once), but the nodes of {where} that fit the rest of the request "
                f"offer at most {most / 1024:.1f} GB"
            )
        nodes = fit
    if options.constraint:
        names = set(re.findall(r"[A-Za-z0-9_.-]+", re.sub(r"\*\d+", "", options.constraint)))
        known = set().union(*(n.features for n in nodes))
        unknown = sorted(names - known)
        if unknown and not (names & known):
            return (
                f"--slurm-constraint: feature(s) {', '.join(unknown)} are on no node of {where} that fits the "
                f"request; features there: {', '.join(sorted(known)) or '(none)'}"
            )
    return None


def _check_qos(options: SlurmOptions, n_tasks: int, cluster: Cluster, partitions: list[str]) -> None:
    """The limits of ``--slurm-qos`` and of the partitions' QOS, where ``sacctmgr`` could read them."""
    names = [options.qos] if options.qos else []
    names += [q for p in partitions if (q := cluster.partitions[p].qos)]
    for name in names:
        limits = cluster.qos.get(name)
        if limits is None:
            continue
        if limits.max_wall_s is not None and options.time_min * 60 > limits.max_wall_s:
            raise ValueError(
                f"--slurm-time-min: {options.time_min} is more than QOS {name!r} allows "
                f"(MaxWall {limits.max_wall_s // 60} minutes)"
            )
        tres = limits.max_tres_per_job
        asks = {"cpu": (options.cpus_per_task, "--slurm-cpus-per-run"), "gres/gpu": (options.gpus, options.gpu_flag)}
        if options.mem_mb_per_task is not None:
            asks["mem"] = (options.mem_mb_per_task, "--slurm-mem-gb")
        for key, (amount, flag) in asks.items():
            if key in tres and amount > tres[key]:
                raise ValueError(f"{flag}: a task asks for {key}={amount}, more than QOS {name!r} allows ({tres[key]})")
        if limits.max_submit_jobs_per_user is not None and n_tasks > limits.max_submit_jobs_per_user:
            raise ValueError(
                f"--runs-per-task: {n_tasks} array tasks are more than QOS {name!r} lets one user submit "
                f"(MaxSubmitJobsPerUser {limits.max_submit_jobs_per_user}); allowed: a --runs-per-task that gives "
                "at most that many"
            )


#: sbatch error text -> the trickbench flag to change (first match wins)
_REFUSALS: tuple[tuple[str, str], ...] = (
    (r"invalid partition|partition .*(not|no) ", "--slurm-partition"),
    (r"invalid account|account", "--slurm-account"),
    (r"invalid qos|qos", "--slurm-qos"),
    (r"feature", "--slurm-constraint"),
    (r"gres|generic resource|gpu", "--slurm-gpus-per-run / --slurm-gres"),
    (r"time limit|timelimit", "--slurm-time-min"),
    (r"memory|mem", "--slurm-mem-gb"),
    (r"array", "--runs-per-task (MaxArraySize)"),
    (r"processor|cpu", "--slurm-cpus-per-run"),
    (r"node configuration is not available", "--slurm-cpus-per-run / --slurm-mem-gb / --slurm-gpus-per-run"),
)


def sbatch_refusal(stderr: str, options: SlurmOptions) -> str:
    """A message for sbatch's refusal ``stderr`` that names the trickbench flag behind the offending option."""
    text = " ".join(line.removeprefix("sbatch: error: ").strip() for line in stderr.strip().splitlines()) or "?"
    lowered = text.lower()
    for key, _value in options.sbatch:
        if key in lowered:
            return f"--slurm-sbatch {key}=...: sbatch refused the job array: {text}"
    for pattern, flag in _REFUSALS:
        if re.search(pattern, lowered):
            return f"{flag}: sbatch refused the job array: {text}"
    if options.sbatch:  # nothing trickbench maps: most likely one of the user's own sbatch options
        given = " ".join(f"--slurm-sbatch {k}={v}" for k, v in options.sbatch)
        return f"{given}: sbatch refused the job array: {text}"
    return f"--executor slurm: sbatch refused the job array: {text}"
