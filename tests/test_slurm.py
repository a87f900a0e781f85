"""The SLURM executor against the real single-node cluster of ``slurm/cluster.sh`` (marker ``slurm``).

Start the cluster first (root): ``bash slurm/cluster.sh install && bash slurm/cluster.sh start``. Without it
the ``slurm``-marked tests are skipped with that reason; option validation, the golden sbatch script and
``bench status`` of a local grid are checked either way.

SLURM workers are fresh Pythons: the test-only ``synthetic`` task, registered here with ``register_task``,
reaches them as every in-process registration does (``WorkerSettings.registrations``, replayed by the task;
``$PYTHONPATH``, which sbatch exports from this process's environment, makes the ``tests`` package importable).
A requeued job waits ~2 minutes before SLURM starts it again (its
"BeginTime"); the tests lift that with ``scontrol update StartTime=now``, as an operator can.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from bench import store
from bench.cli import build_parser, main
from bench.commands import cmd_status, slurm_options
from bench.executors.slurm import job_records, queue_jobs, queue_states, sbatch_script, wait_for_jobs
from bench.executors.worker import read_state, run_one
from bench.grid import expand
from bench.loop import RunContext, train
from bench.runner import plan, write_grid_spec
from bench.spec import parse_spec
from tricks.plugins import registrations

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "sbatch_array.sh"
GOLDEN_GPU = Path(__file__).resolve().parent / "golden" / "sbatch_gpu_type_setup.sh"


def _cluster_problem() -> str | None:
    """Why the real cluster cannot be used, or None when its node takes jobs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client on PATH (start the test cluster: bash slurm/cluster.sh install && ... start)"
    try:
        # an installed client retries a stopped controller for ~10 s; a running one answers in milliseconds
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo did not answer ({exc!r}); run bash slurm/cluster.sh start"
    if out.returncode != 0:
        return f"SLURM controller not reachable (sinfo: {out.stderr.strip()[:200]}); run bash slurm/cluster.sh start"
    if not any(s.rstrip("*") == s and s.startswith(("idle", "mixed", "alloc")) for s in out.stdout.split()):
        return f"no SLURM node takes jobs (sinfo: {out.stdout.split()})"
    return None


_PROBLEM = _cluster_problem()

TINY_CIFAR = {
    "params": {"data": "offline", "train_size": 128, "test_size": 64, "width": 4},
    "train": {"budget_samples": 128, "batch_size": 32, "eval_every_samples": 64, "checkpoint_every_samples": 64},
    "tricks": {"ema": {"half_life_samples": 32}},
}
#: the options of the array test, as flags; the golden sbatch script is what they generate
ARRAY_FLAGS = [
    "--slurm-partition", "debug",
    "--slurm-gpus-per-run", "1",
    "--slurm-cpus-per-run", "1",
    "--slurm-mem-gb", "1.5",
    "--slurm-time-min", "10",
    "--slurm-sbatch", "comment=trickbench-test",
    "--runs-per-task", "2",
    "--slurm-array-parallelism", "2",
    "--slurm-max-requeues", "2",
    "--slurm-signal-delay-s", "30",
]  # fmt: skip
#: a GPU type, setup lines (in order) and runs packed per GPU; tests/golden/sbatch_gpu_type_setup.sh is the script
GPU_SETUP_FLAGS = [
    "--slurm-partition", "gpu",
    "--slurm-gpus-per-run", "a100:2",
    "--runs-per-gpu", "2",
    "--slurm-cpus-per-run", "3",
    "--slurm-mem-gb", "8",
    "--slurm-time-min", "120",
    "--slurm-setup", "module load cuda/12.1",
    "--slurm-setup", "source /opt/venvs/bench/bin/activate",
    "--slurm-sbatch", "mail-type=FAIL",
]  # fmt: skip
#: a synthetic run long enough (~4 s unloaded) to be interrupted mid-training, checkpointing every 250 steps
LONG_TRAIN = {"budget_samples": 32 * 5000, "batch_size": 32, "eval_every_samples": 32 * 1000}
LONG_TRAIN["checkpoint_every_samples"] = 32 * 250
#: long enough (~8 s unloaded) to be interrupted three times before it finishes
TIME_LIMITED_TRAIN = LONG_TRAIN | {"budget_samples": 32 * 10000}


def _spec(grid: str, tasks: dict, seeds: int | list[int] = 1) -> dict:
    return {"grid": grid, "design": "one_at_a_time", "seeds": seeds, "tasks": tasks}


def _write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['grid']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _bench_run(spec_path: Path, results: Path, *flags: str) -> int:
    argv = ["run", str(spec_path), "--results", str(results), "--no-progress", "--no-report", *flags]
    return main(argv)


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; queue: {queue_states()}")
        time.sleep(0.1)


def _release_when_pending(job: str) -> None:
    """A requeued job is held ~2 min ("BeginTime"); start it early, as an operator can.

    Not within the second of the requeue: slurmd revokes the old instance's credential with a
    one-second timestamp, and a relaunch in that same second is killed as "Job credential revoked"
    (seen once in this project's runs: the job then left the queue without a second attempt).
    """
    _wait_until(lambda: (queue_states() or {}).get(job) == "PENDING", 60, f"job {job} to be pending again")
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, timeout=30)


def _only_run(results: Path, grid: str) -> tuple[str, Path]:
    (run_id, job), *rest = job_records(results / grid).items()
    assert not rest
    return job, store.run_dir(results, grid, run_id)


def _assert_same_run(a: Path, b: Path) -> None:
    """Two run folders hold the same training: metrics, curves and final weights bit for bit."""
    ra, rb = store.read_json(a / store.RESULT), store.read_json(b / store.RESULT)
    assert ra["status"] == rb["status"] == "completed"
    assert ra["metric"] == rb["metric"]
    for name in ("curve.csv", "train.csv"):
        assert (a / name).read_text() == (b / name).read_text(), name
    wa, wb = (torch.load(d / "final_model.pt", weights_only=True) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


_REFERENCES: dict[str, Path] = {}


def _reference(spec: dict, tmp_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted in-process run of the spec's single cell (trained once per session; 1 thread)."""
    (cell,) = expand(parse_spec(spec))
    if cell.run_id not in _REFERENCES:
        out = tmp_factory.mktemp("reference") / cell.run_id
        assert train(cell, out, RunContext(threads=1))["status"] == "completed"
        _REFERENCES[cell.run_id] = out
    return _REFERENCES[cell.run_id]


def _cluster_config() -> dict[str, str]:
    """``scontrol show config`` as a dict (JobRequeue, MaxArraySize, ...)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30, check=True)
    return {k.strip(): v.strip() for k, sep, v in (line.partition("=") for line in out.stdout.splitlines()) if sep}


@pytest.fixture
def worker_env(synthetic_task: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Let SLURM workers import the synthetic task (sbatch exports this environment to them)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return synthetic_task


# --- without the cluster -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--slurm-cpus-per-run", "0"], "--slurm-cpus-per-run"),
        (["--slurm-gpus-per-run", "-1"], "--slurm-gpus-per-run"),
        (["--slurm-mem-gb", "0"], "--slurm-mem-gb"),
        (["--slurm-time-min", "0"], "--slurm-time-min"),
        (["--runs-per-task", "0"], "--runs-per-task"),
        (["--slurm-array-parallelism", "0"], "--slurm-array-parallelism"),
        (["--slurm-max-requeues", "-1"], "--slurm-max-requeues"),
        (["--slurm-signal-delay-s", "600", "--slurm-time-min", "5"], "--slurm-signal-delay-s"),
        (["--slurm-partition", "gpu;rm"], "--slurm-partition"),
        (["--slurm-account", "a b"], "--slurm-account"),
        (["--slurm-qos", ""], "--slurm-qos"),
        (["--slurm-constraint", "a100 h100"], "--slurm-constraint"),
        (["--slurm-sbatch", "mail-type"], "KEY=VALUE"),
        (["--slurm-sbatch", "time=10"], "--slurm-time-min"),
        (["--slurm-sbatch", "Mail_Type=END"], "--slurm-sbatch: key"),
        (["--slurm-sbatch", "mail-type="], "--slurm-sbatch: mail-type"),
        (["--slurm-sbatch", "export=NONE"], "--slurm-sbatch: export=NONE is not allowed: the workers need"),
        (["--slurm-sbatch", "export-file=/etc/env"], "--slurm-sbatch: export-file=/etc/env is not allowed"),
        (["--slurm-sbatch", "ntasks=2"], "--slurm-sbatch: ntasks is set by trickbench"),
        (["--slurm-sbatch", "gres=gpu:1"], "--slurm-sbatch: gres is set by trickbench; use --slurm-gres"),
        (["--slurm-sbatch", "no-requeue=1"], "--slurm-sbatch: no-requeue is set by trickbench"),
        (["--slurm-gpus-per-run", "a100"], "--slurm-gpus-per-run: 'a100' is not allowed; allowed: N or TYPE:N"),
        (["--slurm-gpus-per-run", "a100:0"], "--slurm-gpus-per-run: a100:0 is not allowed"),
        (["--slurm-gres", "gpu a100"], "--slurm-gres: 'gpu a100' is not allowed"),
        (["--slurm-gres", "gpu:1", "--slurm-gpus-per-run", "1"], "--slurm-gres: 'gpu:1' asks for GPUs and so does"),
        (["--slurm-setup", ""], "--slurm-setup: '' is not allowed"),
        (["--runs-per-gpu", "2"], "--runs-per-gpu: 2 is not allowed with --device 'cpu'"),
        (["--runs-per-gpu", "2", "--device", "cuda"], "--runs-per-gpu: 2 is not allowed with --slurm-gpus-per-run 0"),
        (["--runs-per-gpu", "0", "--device", "cuda", "--slurm-gpus-per-run", "1"], "--runs-per-gpu: 0"),
        (
            ["--runs-per-gpu", "4", "--device", "cuda", "--slurm-gpus-per-run", "1", "--runs-per-task", "2"],
            "--runs-per-task: 2 is not allowed with --runs-per-gpu 4",
        ),
    ],
)
def test_bad_slurm_options_fail_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], named: str
) -> None:
    spec_path, results = _write(tmp_path, _spec("bad", {"cifar_autoencoder": TINY_CIFAR})), tmp_path / "results"
    before = queue_states() if _PROBLEM is None else None
    assert _bench_run(spec_path, results, "--executor", "slurm", *flags) == 2
    err = capsys.readouterr().err
    assert named in err, err
    assert not results.exists()
    if before is not None:  # a cluster is up: nothing reached it
        assert set(queue_states() or {}) <= set(before)


def test_slurm_flags_need_the_slurm_executor_and_numbers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec_path, results = _write(tmp_path, _spec("bad", {"cifar_autoencoder": TINY_CIFAR})), tmp_path / "results"
    assert _bench_run(spec_path, results, "--executor", "debug", "--runs-per-task", "2") == 2
    assert "--runs-per-task: only used with --executor slurm" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: not a number
        _bench_run(spec_path, results, "--executor", "slurm", "--slurm-cpus-per-run", "two")
    assert exit_info.value.code == 2
    assert "--slurm-cpus-per-run: invalid int value" in capsys.readouterr().err
    assert not results.exists()


def test_no_slurm_client_is_an_error_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec_path, results = _write(tmp_path, _spec("bad", {"cifar_autoencoder": TINY_CIFAR})), tmp_path / "results"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # a machine without SLURM commands
    assert _bench_run(spec_path, results, "--executor", "slurm") == 2
    assert "sbatch, srun, squeue, sinfo, scontrol not found on PATH" in capsys.readouterr().err
    assert not results.exists()


def test_runs_per_gpu_fills_each_gpu_of_a_task_and_asks_cpus_for_each_run() -> None:
    flags = ["--executor", "slurm", "--device", "cuda", "--runs-per-gpu", "4", "--slurm-gpus-per-run", "2"]
    options = slurm_options(build_parser().parse_args(["run", "x.yaml", *flags, "--slurm-cpus-per-run", "3"]))
    assert options.runs_per_task == 8 and options.concurrent_runs == 8  # default: every GPU slot once
    assert (
        options.submitit_parameters("x")["cpus_per_task"] == 24
        and options.submitit_parameters("x")["gpus_per_node"] == 2
    )
    more = slurm_options(build_parser().parse_args(["run", "x.yaml", *flags, "--runs-per-task", "32"]))
    assert more.runs_per_task == 32 and more.submitit_parameters("x")["cpus_per_task"] == 8


def _array_options() -> object:
    args = build_parser().parse_args(["run", "x.yaml", "--executor", "slurm", *ARRAY_FLAGS])
    return slurm_options(args)


def test_golden_sbatch_script() -> None:
    """The flags map to these #SBATCH lines (partition, GPUs, memory in MB, time, extra options, array %P, USR2@N)."""
    script = sbatch_script(
        _array_options(), Path("/RESULTS/slurm-array/submitit/%j"), "trickbench-slurm-array", 2, "/PYTHON"
    )
    if os.environ.get("TRICKBENCH_UPDATE_GOLDEN"):
        GOLDEN.write_text(script)
    expected = GOLDEN.read_text()
    assert script == expected, "\n".join(difflib.unified_diff(expected.splitlines(), script.splitlines(), lineterm=""))


def _gpu_setup_options() -> object:
    flags = ["--executor", "slurm", "--device", "cuda", *GPU_SETUP_FLAGS]
    return slurm_options(build_parser().parse_args(["run", "x.yaml", *flags]))


def test_golden_sbatch_script_gpu_type_and_setup_lines() -> None:
    """A GPU type (``--slurm-gpus-per-run a100:2``), setup lines in order before the worker, memory and CPUs per
    run scaled by the runs a task trains at once (``--runs-per-gpu 2`` × 2 GPUs), ``--requeue``, the exit status."""
    options = _gpu_setup_options()
    assert options.gpu_type == "a100" and options.gpus == 2 and options.concurrent_runs == 4
    script = sbatch_script(options, Path("/RESULTS/gpu-grid/submitit/%j"), "trickbench-gpu-grid", 3, "/PYTHON")
    if os.environ.get("TRICKBENCH_UPDATE_GOLDEN"):
        GOLDEN_GPU.write_text(script)
    expected = GOLDEN_GPU.read_text()
    assert script == expected, "\n".join(difflib.unified_diff(expected.splitlines(), script.splitlines(), lineterm=""))
    lines = script.splitlines()
    assert lines.index("module load cuda/12.1") < lines.index("source /opt/venvs/bench/bin/activate")
    assert lines.index("source /opt/venvs/bench/bin/activate") < next(i for i, x in enumerate(lines) if "srun" in x)
    assert "#SBATCH --gpus-per-node=a100:2" in lines and "#SBATCH --requeue" in lines
    assert "#SBATCH --cpus-per-task=12" in lines and "#SBATCH --mem=32GB" in lines  # 3 CPUs, 8 GB per run × 4


def test_gres_gpus_count_for_packing_and_reach_the_script() -> None:
    flags = ["--executor", "slurm", "--device", "cuda", "--slurm-gres", "gpu:h100:2,nvme:1", "--runs-per-gpu", "3"]
    options = slurm_options(build_parser().parse_args(["run", "x.yaml", *flags]))
    assert (options.gpus, options.gpu_kind, options.gpu_flag) == (2, "h100", "--slurm-gres")
    assert options.runs_per_task == 6 and options.cpus_per_task == 6  # 3 runs on each of the 2 GPUs
    script = sbatch_script(options, Path("/R/g/submitit/%j"), "trickbench-g", 1, "/PYTHON")
    assert "#SBATCH --gres=gpu:h100:2,nvme:1" in script.splitlines() and "--gpus-per-node" not in script


def _fake_cluster(**overrides: object) -> object:
    """A three-partition cluster as scontrol would describe it (parsed by the same code as a real one)."""
    from bench.executors.slurm_cluster import Cluster, Node, Partition, parse_gres, parse_records

    nodes_text = (
        "NodeName=g01 Arch=x86_64 CPUTot=32 CPUEfctv=32 RealMemory=256000 Gres=gpu:a100:4(S:0-1) "
        "AvailableFeatures=a100,ib ActiveFeatures=a100,ib OS=Linux 5.14 #1 SMP Partitions=gpu,all State=IDLE\n"
        "NodeName=c01 CPUTot=64 CPUEfctv=64 RealMemory=512000 Gres=(null) AvailableFeatures=(null) "
        "Partitions=cpu,all State=MIXED Reason=Not responding [root@2026]\n"
    )
    nodes = {}
    for rec in parse_records(nodes_text, "NodeName"):
        nodes[rec["NodeName"]] = Node(
            rec["NodeName"],
            int(rec["CPUEfctv"]),
            int(rec["RealMemory"]),
            parse_gres(rec["Gres"]),
            frozenset(f for f in rec["AvailableFeatures"].split(",") if f != "(null)"),
            tuple(rec["Partitions"].split(",")),
        )
    parts = {
        "gpu": Partition("gpu", max_time_s=2 * 86400),
        "cpu": Partition("cpu", default=True, max_time_s=4 * 3600, max_mem_per_cpu_mb=4000),
        "all": Partition("all"),
    }
    return dataclasses.replace(Cluster(parts, nodes, max_array_size=1001, max_job_count=10000), **overrides)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus_per_run": 1}, "--slurm-gpus-per-run: 1 GPU(s) per array task asked for, but partition 'cpu' (the "),
        ({"gpus_per_run": 1, "partition": "gpu", "gpu_type": "h100"}, "1 h100 GPU(s) per"),
        ({"gpus_per_run": 8, "partition": "gpu"}, "have at most 4 (GPU types there: a100)"),
        ({"partition": "gpu", "gres": "gpu:v100:1"}, "--slurm-gres: 1 v100 GPU(s)"),
        ({"time_min": 300}, "--slurm-time-min: 300 is more than partition 'cpu' (the cluster's default) allows"),
        ({"cpus_per_run": 65}, "--slurm-cpus-per-run: an array task asks for 65 CPUs"),
        ({"cpus_per_run": 2, "mem_gb": 10}, "--slurm-mem-gb: an array task asks for 10 GB"),  # MaxMemPerCPU 4000 MB
        ({"partition": "gpu", "gpus_per_run": 1, "cpus_per_run": 33}, "nodes of partition 'gpu' that have the GPUs"),
        ({"partition": "gpu", "constraint": "h100"}, "--slurm-constraint: feature(s) h100 are on no node"),
        ({"partition": "gpux"}, "--slurm-partition: 'gpux' is not a partition of this cluster (did you mean"),
    ],
)
def test_preflight_names_the_flag_of_what_the_cluster_cannot_run(kwargs: dict, message: str) -> None:
    from bench.executors.slurm import SlurmOptions
    from bench.executors.slurm_cluster import preflight

    with pytest.raises(ValueError) as info:
        preflight(SlurmOptions(**kwargs), 10, _fake_cluster())
    assert message in str(info.value), str(info.value)


def test_preflight_passes_what_fits_and_checks_tasks_against_the_cluster_and_qos() -> None:
    from bench.executors.slurm import SlurmOptions
    from bench.executors.slurm_cluster import QosLimits, array_sizes, preflight

    fits = SlurmOptions(partition="cpu,gpu", gpus_per_run=2, gpu_type="a100", cpus_per_run=8, mem_gb=64)
    preflight(fits, 5000, _fake_cluster())  # the gpu partition can run it (cpu cannot)
    preflight(SlurmOptions(partition="all", gres="gpu:a100:4", constraint="a100|ib"), 1, _fake_cluster())
    with pytest.raises(ValueError, match="--runs-per-task: 1 gives 20000 array tasks, more than the cluster holds"):
        preflight(SlurmOptions(), 20000, _fake_cluster())
    qos = {"short": QosLimits("short", max_wall_s=1800, max_tres_per_job={"cpu": 4}, max_submit_jobs_per_user=100)}
    with pytest.raises(ValueError, match="--slurm-time-min: 60 is more than QOS 'short' allows"):
        preflight(SlurmOptions(qos="short"), 1, _fake_cluster(qos=qos))
    with pytest.raises(ValueError, match="--slurm-cpus-per-run: a task asks for cpu=8, more than QOS 'short'"):
        preflight(SlurmOptions(qos="short", time_min=10, cpus_per_run=8), 1, _fake_cluster(qos=qos))
    with pytest.raises(ValueError, match="--runs-per-task: 101 array tasks are more than QOS 'short'"):
        preflight(SlurmOptions(qos="short", time_min=10), 101, _fake_cluster(qos=qos))
    with pytest.raises(ValueError, match="--slurm-partition: this cluster has no default partition"):
        preflight(SlurmOptions(), 1, _fake_cluster(partitions={"gpu": _fake_cluster().partitions["gpu"]}))
    assert array_sizes(1200, 1001) == [1001, 199] and array_sizes(2002, 1001) == [1001, 1001]
    assert array_sizes(3, 1001) == [3]


def test_sbatch_refusals_name_the_flag() -> None:
    from bench.executors.slurm import SlurmOptions
    from bench.executors.slurm_cluster import sbatch_refusal

    plain, extra = SlurmOptions(), SlurmOptions(sbatch=(("reservation", "dl"),))
    err = "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified"
    assert sbatch_refusal(err, plain).startswith("--slurm-account: sbatch refused the job array: Batch job")
    err = "sbatch: error: Batch job submission failed: Invalid qos specification"
    assert sbatch_refusal(err, plain).startswith("--slurm-qos:")
    err = "sbatch: error: Batch job submission failed: Invalid job array specification"
    assert sbatch_refusal(err, plain).startswith("--runs-per-task (MaxArraySize):")
    err = "sbatch: error: Batch job submission failed: Requested reservation is invalid"
    assert sbatch_refusal(err, extra).startswith("--slurm-sbatch reservation=...:")


def test_a_task_with_failed_runs_exits_non_zero_and_one_that_cannot_train_marks_its_runs_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, synthetic_task: str
) -> None:
    """The worker side, in-process: a failed run makes the array task exit 1 (the job ends FAILED, mail-on-failure
    fires); an error before training writes error.json for each of its runs, with the task's log, and re-raises."""
    from bench.executors import slurm as slurm_module
    from bench.status import view_run

    cells = expand(parse_spec(_spec("worker-exit", {"synthetic": {"train": LONG_TRAIN}}, seeds=2)))
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    task = slurm_module.SlurmTask(slurm_module.WorkerSettings())
    statuses = {cells[0].run_id: "completed", cells[1].run_id: "failed"}
    monkeypatch.setattr(
        slurm_module.SlurmTask,
        "_train",
        lambda self, cs, root, stop, job: {r: {"status": s} for r, s in statuses.items()},
    )
    with pytest.raises(SystemExit) as info:
        task([c.to_dict() for c in cells], str(tmp_path))
    assert info.value.code == 1 and f"1 of 2 runs failed ({cells[1].run_id})" in capsys.readouterr().err

    def broken(self: object, *args: object) -> None:
        raise ImportError("libcudart.so.12: cannot open shared object file")

    monkeypatch.setattr(slurm_module.SlurmTask, "_train", broken)
    with pytest.raises(ImportError):
        task([c.to_dict() for c in cells], str(tmp_path))
    for cell in cells:
        rdir = store.run_dir(tmp_path, cell.grid, cell.run_id)
        assert store.run_status(rdir) == "failed"
        view = view_run(rdir, "77_3", {})
        assert view.status == "failed" and "array task 77_3 failed before finishing: ImportError" in view.detail
        assert view.log == tmp_path / "worker-exit" / "submitit" / "77_3" / "77_3_0_log.err"


def _hold_lock_in_child(path: str, conn: object) -> None:
    from bench.executors.submit_lock import SubmissionLock

    lock = SubmissionLock(Path(path), stale_s=0.4)
    lock.acquire()
    conn.send("held")
    time.sleep(30)  # killed by the test while holding it


def _count_in_lock(path: str, tally: str, rounds: int) -> None:
    from bench.executors.submit_lock import SubmissionLock

    for _ in range(rounds):
        with SubmissionLock(Path(path), stale_s=5.0, poll_s=0.01):
            n = int(Path(tally).read_text())  # a read-modify-write that loses counts without mutual exclusion
            time.sleep(0.002)
            Path(tally).write_text(str(n + 1))


def test_submission_lock_excludes_breaks_stale_locks_and_waits_for_live_ones(tmp_path: Path) -> None:
    import multiprocessing as mp

    from bench.executors.submit_lock import LockTimeout, SubmissionLock, read_lock

    path, tally = tmp_path / "grid" / "submit.lock", tmp_path / "tally"
    tally.write_text("0")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_count_in_lock, args=(str(path), str(tally), 25)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * 4 and tally.read_text() == "100"  # no lost update
    assert not path.exists()

    # a live holder keeps its lock (heartbeat); killed, its lock is taken over at once (same host, pid gone)
    parent, child = ctx.Pipe()
    holder = ctx.Process(target=_hold_lock_in_child, args=(str(path), child))
    holder.start()
    assert parent.recv() == "held"
    with pytest.raises(LockTimeout, match=f"held by .* pid {holder.pid}"):
        SubmissionLock(path, stale_s=0.4, wait_s=1.2).acquire()
    holder.kill()
    holder.join()
    t0 = time.monotonic()
    with SubmissionLock(path, stale_s=60.0) as lock:
        assert time.monotonic() - t0 < 5 and read_lock(path)["token"] == lock.token
    assert not path.exists()

    # a holder whose lock was taken over (suspended for longer than stale_s) finds out before it submits
    with SubmissionLock(path) as lock:
        lock.check()
        path.write_text('{"host": "login-2", "pid": 7, "token": "other"}')
        with pytest.raises(LockTimeout, match="taken over by login-2 pid 7"):
            lock.check()
    assert path.exists()  # not ours: left alone on release
    path.unlink()

    # a lock of another host whose heartbeat stopped: taken over once it has not changed for stale_s
    path.write_text('{"host": "login-9", "pid": 1, "token": "x"}')
    t0 = time.monotonic()
    with SubmissionLock(path, stale_s=0.5):
        assert time.monotonic() - t0 >= 0.5
    assert not path.exists()


def test_a_refused_second_array_cancels_the_first_and_a_failure_after_acceptance_removes_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synthetic_task: str
) -> None:
    """Without a cluster (sbatch, squeue, scancel and scontrol stubbed): a submission split into arrays whose second
    array sbatch refuses cancels the first and writes nothing; an error after sbatch accepted (here: writing
    grid.yaml) cancels every array and removes the pickles, scripts and the folders it made."""
    from bench.executors import slurm as slurm_module

    cells = expand(parse_spec(_spec("split", {"synthetic": {"train": LONG_TRAIN}}, seeds=5)))
    cluster = dataclasses.replace(_fake_cluster(), max_array_size=2)
    calls: list[list[str]] = []
    accepted = iter(["501", "502", "503"])

    def sbatch(script: str, options: object) -> str:
        if "--array=0-0" in script and calls == [["sbatch", "501"], ["sbatch", "502"]]:
            raise ValueError("--slurm-sbatch x=y: sbatch refused the job array: nope")
        job = next(accepted)
        calls.append(["sbatch", job])
        return job

    monkeypatch.setattr(slurm_module, "queue_jobs", lambda name=None: {})
    monkeypatch.setattr(slurm_module, "_sbatch_held", sbatch)
    monkeypatch.setattr(slurm_module, "_scancel", lambda ids: calls.append(["scancel", *ids]))
    monkeypatch.setattr(slurm_module, "_run", lambda cmd, **kw: calls.append(list(cmd)) or _Done())
    results = tmp_path / "results"
    gdir = results / "split"
    settings = slurm_module.WorkerSettings()
    with pytest.raises(ValueError, match="sbatch refused"):
        slurm_module.submit_grid(cells, gdir, results, slurm_module.SlurmOptions(), settings, "split", cluster=cluster)
    assert calls == [["sbatch", "501"], ["sbatch", "502"], ["scancel", "501", "502"]]
    assert not results.exists()  # the lock's folders are gone too

    calls.clear()
    accepted = iter(["601", "602", "603"])

    def fail() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        slurm_module.submit_grid(
            cells, gdir, results, slurm_module.SlurmOptions(), settings, "split", cluster=cluster, on_accepted=fail
        )
    assert calls == [["sbatch", "601"], ["sbatch", "602"], ["sbatch", "603"], ["scancel", "601", "602", "603"]]
    assert not results.exists()


class _Done:
    returncode, stdout, stderr = 0, "", ""


def test_status_of_a_local_run_running_then_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture, synthetic_task: str
) -> None:
    spec = parse_spec(_spec("local-status", {"synthetic": {"train": LONG_TRAIN}}))
    results = tmp_path / "results"
    gdir = store.grid_dir(results, spec.grid)
    write_grid_spec(spec, gdir)
    (cell,) = expand(spec)
    seen: list[str] = []

    def look(steps_done: int, total_steps: int, loss: float) -> None:  # while training, from inside the run
        if not seen:
            cmd_status(gdir)
            seen.append(capsys.readouterr().out)

    ctx = RunContext(threads=1, on_progress=look, progress_interval_s=0.0, max_steps=3)
    assert run_one(cell, results, ctx, [])["status"] == "interrupted"
    assert "1 running" in seen[0] and f"pid {os.getpid()}" in seen[0], seen[0]
    cmd_status(gdir)
    out = capsys.readouterr().out
    assert "1 partial" in out and "checkpoint on disk" in out, out


# --- against the real cluster ------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
def test_job_array_equals_local_then_relaunch_submits_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec_path = _write(tmp_path, _spec("slurm-array", {"cifar_autoencoder": TINY_CIFAR}, seeds=2))
    results, local = tmp_path / "results", tmp_path / "local"
    assert _bench_run(spec_path, results, "--executor", "slurm", *ARRAY_FLAGS) == 0
    out = capsys.readouterr().out
    assert "submitted 4 runs as 2 array tasks (2 per task)" in out, out
    gdir = results / "slurm-array"
    assert _bench_run(spec_path, local, "--executor", "debug") == 0  # in-process while the array runs
    wait_for_jobs(set(job_records(gdir).values()), poll_s=0.5, timeout_s=300)
    runs = sorted(p.name for p in (gdir / "runs").iterdir())
    assert runs == sorted(p.name for p in (local / "slurm-array" / "runs").iterdir()) and len(runs) == 4
    for run_id in runs:
        _assert_same_run(gdir / "runs" / run_id, local / "slurm-array" / "runs" / run_id)
        assert read_state(gdir / "runs" / run_id)["state"] == "completed"

    # what was submitted is the golden script (paths and the python normalised)
    (array_id,) = {job.split("_")[0] for job in job_records(gdir).values()}
    submitted = (gdir / "submitit" / array_id / f"{array_id}_submission.sh").read_text()
    submitted = submitted.replace(str(results.resolve()), "/RESULTS").replace(shlex.quote(sys.executable), "/PYTHON")
    assert submitted == GOLDEN.read_text()

    launches = len(store.read_json(gdir / "submitit" / "jobs.json")["launches"])
    assert _bench_run(spec_path, results, "--executor", "slurm", "--slurm-wait", *ARRAY_FLAGS) == 0
    assert "submitted 0 jobs" in capsys.readouterr().out
    assert len(store.read_json(gdir / "submitit" / "jobs.json")["launches"]) == launches
    assert not [j for j in queue_states() or {} if j.split("_")[0] == array_id]
    cmd_status(gdir)
    assert "4 runs — 4 completed" in capsys.readouterr().out


def _submit_long(tmp_path: Path, grid: str, *flags: str, train: dict = LONG_TRAIN) -> tuple[dict, Path, str, Path]:
    spec = _spec(grid, {"synthetic": {"train": train}})
    results = tmp_path / "results"
    assert _bench_run(_write(tmp_path, spec), results, "--executor", "slurm", *flags) == 0
    job, rdir = _only_run(results, grid)
    return spec, results, job, rdir


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_scontrol_requeue_mid_training_resumes_to_the_uninterrupted_result(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    spec, _results, job, rdir = _submit_long(tmp_path, "slurm-requeue")
    reference = _reference(spec, tmp_path_factory)  # trains while the job starts
    _wait_until(lambda: (rdir / store.CHECKPOINT).exists(), 120, "the job's first checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)  # SIGTERM now, the job back in the queue
    _release_when_pending(job)
    wait_for_jobs([job], poll_s=0.2, timeout_s=180)
    result = store.read_json(rdir / store.RESULT)
    assert result["cost"]["resumes"] >= 1
    assert read_state(rdir)["attempts"] == 2
    _assert_same_run(rdir, reference)


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_sigkilled_worker_resumes_on_relaunch(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    spec, results, job, rdir = _submit_long(tmp_path, "slurm-kill")
    reference = _reference(spec, tmp_path_factory)
    _wait_until(lambda: (rdir / store.CHECKPOINT).exists(), 120, "the job's first checkpoint")
    os.kill(int(read_state(rdir)["pid"]), signal.SIGKILL)  # no handler, no last checkpoint: like a node dying
    wait_for_jobs([job], poll_s=0.2, timeout_s=60)  # a killed task fails its job; SLURM does not requeue it
    capsys.readouterr()
    cmd_status(results / "slurm-kill")
    assert "1 partial" in capsys.readouterr().out
    assert _bench_run(results / "slurm-kill" / "grid.yaml", results, "--executor", "slurm", "--slurm-wait") == 0
    assert "submitted 1 runs as 1 array task" in capsys.readouterr().out
    assert store.read_json(rdir / store.RESULT)["cost"]["resumes"] == 1
    _assert_same_run(rdir, reference)


def _usr2_when_running(rdir: Path, job: str, attempt: int) -> None:
    """USR2 (what ``--signal=USR2@N`` sends before the time limit) once attempt ``attempt`` of the run is training.

    "running" is written after the worker installed its handlers: from then a signal stops at a step boundary.
    """
    _wait_until(lambda: read_state(rdir).get("attempts") == attempt, 120, f"attempt {attempt} of the run")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_time_limits_requeue_a_refused_requeue_resumes_on_relaunch_and_retry_incomplete_finishes_identical(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    """A time-limited run on the test cluster (``JobRequeue=0``: batch jobs are not requeueable unless they ask):

    1. USR2 with the limit near (2 min limit, USR2 60 s before it): checkpoint and ``scontrol requeue`` — it works
       because the script always says ``--requeue``; ``bench status`` says requeued.
    2. The job's ``Requeue`` turned off (as a cluster or an administrator may): the worker's requeue is refused;
       the run's state and ``bench status`` say so, with the log; ``bench run`` resubmits and it resumes.
    3. Past ``--slurm-max-requeues 2`` time limits the run is recorded incomplete; a plain re-launch leaves it;
       ``bench run --retry-incomplete`` gives it a fresh count and it finishes identical to the uninterrupted run.
    """
    if _cluster_config().get("JobRequeue") != "0":
        pytest.skip("the test cluster runs with JobRequeue=1; start it with slurm/cluster.sh's default JobRequeue=0")
    flags = ("--slurm-time-min", "2", "--slurm-signal-delay-s", "60", "--slurm-max-requeues", "2")
    spec, results, job, rdir = _submit_long(tmp_path, "slurm-timeout", *flags, train=TIME_LIMITED_TRAIN)
    gdir = results / "slurm-timeout"
    reference = _reference(spec, tmp_path_factory)  # trains while the job starts

    _usr2_when_running(rdir, job, 1)
    _wait_until(lambda: read_state(rdir).get("state") == "requeued", 60, "the run to requeue itself")
    state = read_state(rdir)
    assert state["timeouts"] == 1 and state["requeues"] == 1 and "time limit near" in state["reason"], state
    capsys.readouterr()
    cmd_status(gdir)
    assert "1 requeued" in capsys.readouterr().out

    _release_when_pending(job)
    _wait_until(lambda: read_state(rdir).get("attempts") == 2, 120, "the second attempt")
    subprocess.run(["scontrol", "update", f"jobid={job}", "Requeue=0"], check=True, timeout=30)
    _usr2_when_running(rdir, job, 2)
    wait_for_jobs([job], poll_s=0.2, timeout_s=60)  # the refused requeue: the task exits, the job is gone
    state = read_state(rdir)
    assert state["state"] == "interrupted" and state["timeouts"] == 2 and state["requeues"] == 1, state
    assert "requeue failed: requeueing is disabled" in state["reason"], state
    cmd_status(gdir)
    out = capsys.readouterr().out
    assert "1 partial" in out and "requeueing is disabled" in out and "the next bench run resumes it" in out, out
    assert f"log: {gdir}/submitit/{job}/{job}_0_log.err" in out, out

    assert _bench_run(gdir / "grid.yaml", results, "--executor", "slurm", *flags) == 0
    assert "submitted 1 runs as 1 array task" in capsys.readouterr().out
    job, _ = _only_run(results, "slurm-timeout")
    _usr2_when_running(rdir, job, 3)  # the third time limit: past --slurm-max-requeues 2
    wait_for_jobs([job], poll_s=0.2, timeout_s=60)
    result = store.read_json(rdir / store.RESULT)
    assert result["status"] == "incomplete" and result["cost"]["timeouts"] == 3, result
    assert "more than --slurm-max-requeues 2" in result["reason"] and (rdir / store.CHECKPOINT).exists()
    cmd_status(gdir)
    out = capsys.readouterr().out
    assert "1 incomplete" in out and "time limit reached 3 times" in out and "--retry-incomplete" in out, out
    assert _bench_run(gdir / "grid.yaml", results, "--executor", "slurm", *flags) == 0
    assert "submitted 0 jobs" in capsys.readouterr().out  # incomplete is finished: a plain re-launch leaves it

    assert (
        _bench_run(gdir / "grid.yaml", results, "--executor", "slurm", "--retry-incomplete", "--slurm-wait", *flags)
        == 0
    )
    assert "reopened 1 incomplete runs" in capsys.readouterr().out
    state = read_state(rdir)
    assert state["attempts"] == 4 and state["timeouts"] == 0 and len(state["retries"]) == 1, state
    assert state["retries"][0]["result"]["status"] == "incomplete"  # the incomplete result is kept
    result = store.read_json(rdir / store.RESULT)
    assert result["cost"]["resumes"] == 3, result["cost"]
    _assert_same_run(rdir, reference)


#: requests the test cluster cannot run, and the text that must name the flag
REFUSED = [
    (["--slurm-cpus-per-run", "64"], "--slurm-cpus-per-run: an array task asks for 64 CPUs"),
    (["--slurm-mem-gb", "4096"], "--slurm-mem-gb: an array task asks for 4096 GB"),
    (["--slurm-time-min", "100000"], "--slurm-time-min: 100000 is more than partition"),
    (["--slurm-gpus-per-run", "8"], "--slurm-gpus-per-run: 8 GPU(s) per array task asked for"),
    (["--slurm-gpus-per-run", "h100:1"], "--slurm-gpus-per-run: 1 h100 GPU(s) per array task asked for"),
    (["--slurm-gres", "gpu:h100:1"], "--slurm-gres: 1 h100 GPU(s) per array task asked for"),
    (["--slurm-sbatch", "nodelist=no-such-node"], "--slurm-sbatch nodelist=no-such-node: sbatch refused"),
]
#: ... on the default partition, with --slurm-partition naming it, in a --dry-run; and partitions of their own
REFUSED_CASES = [(flags + extra, named) for flags, named in REFUSED for extra in ([], ["--slurm-partition", "debug"])]
REFUSED_CASES += [([*flags, "--dry-run"], named) for flags, named in REFUSED]  # the last: sbatch --test-only refuses
REFUSED_CASES += [
    (["--slurm-partition", "debugg"], "--slurm-partition: 'debugg' is not a partition of this cluster"),
    (["--slurm-partition", "nogpu", "--slurm-gpus-per-run", "1"], "but partition 'nogpu' has no GPUs"),
    (["--slurm-partition", "nogpu", "--slurm-gpus-per-run", "1", "--dry-run"], "but partition 'nogpu' has no GPUs"),
]


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.parametrize(("flags", "named"), REFUSED_CASES)
def test_requests_the_cluster_cannot_run_are_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str], named: str
) -> None:
    """Above the node's CPUs, memory or GPUs (of a type), above MaxTime, GPUs on the GPU-less partition, a
    partition that does not exist, an option sbatch itself refuses: exit 2, the flag named, nothing written or
    queued — on the cluster's default partition, with --slurm-partition naming it, and in a --dry-run."""
    spec_path, results = _write(tmp_path, _spec("refused", {"cifar_autoencoder": TINY_CIFAR})), tmp_path / "results"
    before = set(queue_states() or {})
    assert _bench_run(spec_path, results, "--executor", "slurm", *flags) == 2
    err = capsys.readouterr().err
    assert named in err, err
    if "--slurm-partition" not in flags and "--slurm-sbatch" not in flags:
        assert "(the cluster's default)" in err, err
    assert not results.exists()
    assert set(queue_states() or {}) <= before


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_a_task_whose_python_exits_127_before_training_fails_its_runs_with_the_log(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A bad environment on the node (here: a setup line puts a sitecustomize that exits 127 on PYTHONPATH): both
    array tasks end FAILED (exit 127); ``--slurm-wait`` exits 1 with a one-line reason; ``bench status`` shows both
    runs failed with the log to read; ``--failed`` prints the end of that log; a re-launch resubmits them."""
    broken = tmp_path / "broken-env"
    broken.mkdir()
    (broken / "sitecustomize.py").write_text(
        "import os, sys\nprint('trickbench-test: libbroken.so.1: cannot open shared object file', file=sys.stderr)\n"
        "sys.stderr.flush()\nos._exit(127)\n"
    )
    tiny = {"budget_samples": 256, "batch_size": 32, "eval_every_samples": 128, "checkpoint_every_samples": 128}
    spec_path = _write(tmp_path, _spec("slurm-127", {"synthetic": {"train": tiny}}, seeds=2))
    results = tmp_path / "results"
    setup = f"export PYTHONPATH={broken}:$PYTHONPATH"
    assert _bench_run(spec_path, results, "--executor", "slurm", "--slurm-setup", setup, "--slurm-wait") == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: 2 of 2 runs not finished (2 failed); run "), errors
    assert "ended with exit status 127 without starting this run" in errors[0], errors
    assert "libbroken.so.1: cannot open shared object file" in errors[0], errors
    gdir = results / "slurm-127"
    jobs = job_records(gdir)
    assert len(set(jobs.values())) == 2
    for job in jobs.values():
        assert (gdir / "submitit" / job / "exit_status").read_text().strip() == "127"  # the task exited non-zero
    cmd_status(gdir)
    out = capsys.readouterr().out
    assert "2 runs — 2 failed" in out, out
    for job in jobs.values():
        assert f"log: {gdir}/submitit/{job}/{job}_0_log.err" in out, out
    cmd_status(gdir, failed=True)
    out = capsys.readouterr().out
    assert out.count("| trickbench-test: libbroken.so.1: cannot open shared object file") == 2, out
    launch = plan(gdir / "grid.yaml", results)
    assert len(launch.todo) == 2  # a re-launch (with the environment fixed) submits both again


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_a_1200_run_grid_is_submitted_as_arrays_within_max_array_size(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """1,200 tiny runs, one per array task, on a cluster with SLURM's default MaxArraySize=1001: two arrays (1001 +
    199), no sbatch error; every run mapped to its own task; squeue's pending reason (BeginTime: submitted to start
    in an hour) in ``bench status``; one task of the second array started early trains exactly its run."""
    max_array = int(_cluster_config().get("MaxArraySize", "1001"))
    if max_array > 1200:
        pytest.skip(f"MaxArraySize={max_array}: start the test cluster with SLURM's default 1001 (slurm/cluster.sh)")
    n = 1200
    tiny = {"budget_samples": 64, "batch_size": 32, "eval_every_samples": 64, "checkpoint_every_samples": 64}
    two_arms = {"train": tiny, "tricks": {"ema": {"half_life_samples": 32}}}  # baseline and +ema, 600 seeds each
    spec = _spec("slurm-1200", {"synthetic": two_arms}, seeds=n // 2)
    spec_path, results = _write(tmp_path, spec), tmp_path / "results"
    later = ["--executor", "slurm", "--slurm-sbatch", "begin=now+3600"]
    assert _bench_run(spec_path, results, *later, "--dry-run") == 0
    sizes = [max_array] * (n // max_array) + [n % max_array] * (n % max_array > 0)
    assert f"would submit {n} runs as {n} array tasks (1 per task) in {len(sizes)} arrays" in capsys.readouterr().out
    assert _bench_run(spec_path, results, *later) == 0
    out, err = capsys.readouterr()
    arrays = sorted({job.split("_")[0] for job in job_records(results / "slurm-1200").values()}, key=int)
    try:
        assert f"submitted {n} runs as {n} array tasks (1 per task): jobs {', '.join(arrays)}" in out, out + err
        gdir = results / "slurm-1200"
        jobs = job_records(gdir)
        assert len(jobs) == n and len(set(jobs.values())) == n
        queued = {j: s for j, s in (queue_states("trickbench-slurm-1200") or {}).items()}
        assert sorted(queued) == sorted(jobs.values()) and set(queued.values()) == {"PENDING"}
        assert [sum(j.startswith(a + "_") for j in queued) for a in arrays] == sizes
        launch = store.read_json(gdir / "submitit" / "jobs.json")["launches"][0]
        assert [a["tasks"] for a in launch["arrays"]] == sizes and launch["released"] is True

        last = f"{arrays[-1]}_{sizes[-1] - 1}"  # the last task of the last array
        (run_id,) = [r for r, j in jobs.items() if j == last]
        cell = next(c for c in expand(parse_spec(spec)) if c.run_id == run_id)
        entry = lambda: (queue_jobs("trickbench-slurm-1200") or {}).get(last)  # noqa: E731
        _wait_until(lambda: entry() is not None and entry().reason == "BeginTime", 60, "the scheduler's reason")
        cmd_status(gdir)
        status = capsys.readouterr().out
        assert f"{n} runs — {n} pending" in status and f"job {last}  pending (BeginTime)" in status, status[:2000]
        subprocess.run(["scontrol", "update", f"jobid={last}", "StartTime=now"], check=True, timeout=30)
        wait_for_jobs([last], poll_s=0.5, timeout_s=180)
        rdir = store.run_dir(results, "slurm-1200", run_id)
        assert store.read_json(rdir / store.RESULT)["status"] == "completed"
        assert store.read_json(rdir / store.CONFIG)["seed"] == cell.seed and read_state(rdir)["job_id"] == last
        assert sum((d / store.RESULT).exists() for d in (gdir / "runs").iterdir()) == 1
    finally:
        subprocess.run(["scancel", *arrays], check=False, timeout=60)


#: array tasks of the concurrency test. Each is a fresh Python that imports torch (~2 CPU-s), torch._dynamo (~2 CPU-s,
#: pulled in by torch.optim) and pandas (~0.5 CPU-s): on 2 cores 32 tasks (four waves of eight at once, the test
#: cluster's oversubscription) take ~1.5 minutes of the suite.
MANY_TASKS = 32
_LAUNCH = (
    "import sys; from experiments.registry import register_task; "
    "from tests.synthetic_task import Synthetic; register_task(Synthetic); "
    "from bench.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_two_concurrent_launches_submit_each_run_once_and_many_tasks_finishing_together_leave_intact_results(
    tmp_path: Path,
) -> None:
    """Two ``bench run --executor slurm --slurm-wait`` processes of one grid, released at the same moment from a
    submission lock the test holds: one submits every run, the other submits none and waits for the same jobs;
    both exit 0; the array tasks finishing together (eight at a time) leave intact results, each trained once."""
    from bench.executors.submit_lock import LOCK_FILE, SubmissionLock

    tiny = {"budget_samples": 256, "batch_size": 32, "eval_every_samples": 128, "checkpoint_every_samples": 128}
    spec = _spec("slurm-many", {"synthetic": {"train": tiny}}, seeds=MANY_TASKS)
    spec_path, results = _write(tmp_path, spec), tmp_path / "results"
    gdir = results / "slurm-many"
    argv = ["run", str(spec_path), "--results", str(results), "--executor", "slurm", "--slurm-wait"]
    argv += ["--no-progress", "--no-report"]
    logs = [tmp_path / f"launch{i}.log" for i in range(2)]
    with SubmissionLock(gdir / LOCK_FILE):  # both launches reach the lock and wait for it
        procs = [
            subprocess.Popen([sys.executable, "-c", _LAUNCH, *argv], stdout=log.open("w"), stderr=subprocess.STDOUT)
            for log in logs
        ]
        _wait_until(
            lambda: all("waiting: another launch" in log.read_text() for log in logs), 120, "both launches to wait"
        )
    assert [p.wait(timeout=600) for p in procs] == [0, 0], [log.read_text() for log in logs]
    outs = sorted((log.read_text() for log in logs), key=lambda text: f"submitted {MANY_TASKS} runs" not in text)
    assert f"submitted {MANY_TASKS} runs as {MANY_TASKS} array tasks" in outs[0], outs
    assert f"{MANY_TASKS} runs are still queued from an earlier launch; not submitted again" in outs[1], outs
    assert len(store.read_json(gdir / "submitit" / "jobs.json")["launches"]) == 1
    assert len(set(job_records(gdir).values())) == MANY_TASKS  # one array task per run
    assert not (gdir / LOCK_FILE).exists()
    for cell in expand(parse_spec(spec)):
        rdir = store.run_dir(results, "slurm-many", cell.run_id)
        result = store.read_json(rdir / store.RESULT)  # parses: never a partial file
        assert result["run_id"] == cell.run_id and result["status"] == "completed"
        assert read_state(rdir)["attempts"] == 1  # trained once
        assert store.read_json(rdir / store.CONFIG)["seed"] == cell.seed
        assert not list(rdir.glob(".*.tmp")) and not (rdir / store.CHECKPOINT).exists()
        expected = train(cell, tmp_path / "ref" / cell.run_id, RunContext(threads=1))
        assert result["metric"] == expected["metric"]
    assert len(store.write_summary(gdir)) == MANY_TASKS


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_runs_per_gpu_trains_runs_at_once_in_one_task_and_each_resumes_after_requeue(tmp_path: Path) -> None:
    """--runs-per-gpu 2: one array task (one GPU of the test cluster's gres) trains two runs at once, one process
    each; ``scontrol requeue`` (SIGTERM to every process of the job) checkpoints both; after the requeue each
    equals its uninterrupted run. The runs train on CPU here (no CUDA in the cluster); the CLI allows the flag
    only with --device cuda, so the submission goes through the same API the CLI calls."""
    from bench.executors.slurm import SlurmOptions, WorkerSettings, submit_grid

    spec = parse_spec(_spec("slurm-pack", {"synthetic": {"train": LONG_TRAIN}}, seeds=2))
    results = tmp_path / "results"
    gdir = store.grid_dir(results, spec.grid)
    write_grid_spec(spec, gdir)
    cells = expand(spec)
    options = SlurmOptions(gpus_per_run=1, runs_per_gpu=2, runs_per_task=2, time_min=10)
    assert options.concurrent_runs == 2 and options.submitit_parameters("x")["cpus_per_task"] == 2
    settings = WorkerSettings(
        device="cpu", threads=1, grid_tricks={"synthetic": []}, runs_per_gpu=2, registrations=registrations()
    )
    sub = submit_grid(cells, gdir, results, options, settings, spec.grid)
    (job,) = sub.job_ids  # both runs in one array task
    rdirs = [store.run_dir(results, spec.grid, c.run_id) for c in cells]
    references = [train(c, tmp_path / "ref" / c.run_id, RunContext(threads=1)) for c in cells]  # while it starts
    _wait_until(
        lambda: (
            all((d / store.CHECKPOINT).exists() for d in rdirs) and not any((d / store.RESULT).exists() for d in rdirs)
        ),
        180,
        "both runs of the task to have checkpointed before either finished (trained at once)",
    )
    pids = {read_state(d)["pid"] for d in rdirs}
    assert len(pids) == 2 and all(read_state(d)["job_id"] == job for d in rdirs)  # two processes, one task
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    _release_when_pending(job)
    wait_for_jobs([job], poll_s=0.2, timeout_s=240)
    for cell, rdir, reference in zip(cells, rdirs, references):
        result = store.read_json(rdir / store.RESULT)
        assert result["status"] == "completed" and result["cost"]["resumes"] >= 1, result
        assert read_state(rdir)["attempts"] == 2
        _assert_same_run(rdir, tmp_path / "ref" / cell.run_id)
        assert result["metric"] == reference["metric"]
