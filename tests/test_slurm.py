"""The SLURM executor against the real single-node cluster of ``slurm/cluster.sh`` (marker ``slurm``).

Start the cluster first (root): ``bash slurm/cluster.sh install && bash slurm/cluster.sh start``. Without it
the ``slurm``-marked tests are skipped with that reason; option validation, the golden sbatch script and
``bench status`` of a local grid are checked either way.

SLURM workers are fresh Pythons: the test-only ``synthetic`` task reaches them through
``$TRICKBENCH_EXTRA_TASKS`` (and ``$PYTHONPATH`` for the ``tests`` package), which sbatch exports from
this process's environment. A requeued job waits ~2 minutes before SLURM starts it again (its
"BeginTime"); the tests lift that with ``scontrol update StartTime=now``, as an operator can.
"""

from __future__ import annotations

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
from bench.executors.slurm import job_records, queue_states, sbatch_script, wait_for_jobs
from bench.executors.worker import read_state, run_one
from bench.grid import expand
from bench.loop import RunContext, train
from bench.runner import write_grid_spec
from bench.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "sbatch_array.sh"


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
#: a synthetic run long enough (~4 s unloaded) to be interrupted mid-training, checkpointing every 250 steps
LONG_TRAIN = {"budget_samples": 32 * 5000, "batch_size": 32, "eval_every_samples": 32 * 1000}
LONG_TRAIN["checkpoint_every_samples"] = 32 * 250


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


@pytest.fixture
def worker_env(synthetic_task: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Let SLURM workers import the synthetic task (sbatch exports this environment to them)."""
    monkeypatch.setenv("TRICKBENCH_EXTRA_TASKS", "synthetic=tests.synthetic_task")
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


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_time_limit_signals_requeue_up_to_the_limit_then_incomplete(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """USR2 with the time limit near (2 min limit, USR2 60 s before it): checkpoint at a step boundary and
    requeue, once (--slurm-max-requeues 1); the second time the run is recorded incomplete with its reason."""
    endless = LONG_TRAIN | {"budget_samples": 32 * 10**7}  # never finishes in this test
    flags = ("--slurm-time-min", "2", "--slurm-signal-delay-s", "60", "--slurm-max-requeues", "1")
    _spec_dict, results, job, rdir = _submit_long(tmp_path, "slurm-timeout", *flags, train=endless)
    gdir = results / "slurm-timeout"
    _wait_until(lambda: (rdir / store.CHECKPOINT).exists(), 120, "the job's first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # what --signal=USR2@60 sends
    _wait_until(lambda: read_state(rdir).get("state") == "requeued", 60, "the run to requeue itself")
    state = read_state(rdir)
    assert state["timeouts"] == 1 and "time limit near" in state["reason"], state
    step_1 = state["step"]
    cmd_status(gdir)
    assert "1 requeued" in capsys.readouterr().out

    _release_when_pending(job)
    # "running" is written after the worker installed its handlers: from here a signal stops at a step boundary
    _wait_until(lambda: read_state(rdir).get("attempts") == 2, 120, "the second attempt")
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
    wait_for_jobs([job], poll_s=0.2, timeout_s=60)
    result = store.read_json(rdir / store.RESULT)
    assert result["status"] == "incomplete" and result["cost"]["timeouts"] == 2
    assert result["cost"]["steps_done"] >= step_1  # the second attempt resumed from the first one's checkpoint
    assert "more than --slurm-max-requeues 1" in result["reason"]
    assert (rdir / store.CHECKPOINT).exists()  # kept: delete result.json to train on
    cmd_status(gdir)
    out = capsys.readouterr().out
    assert "1 incomplete" in out and "time limit reached 2 times" in out, out
    assert _bench_run(gdir / "grid.yaml", results, "--executor", "slurm") == 0
    assert "submitted 0 jobs" in capsys.readouterr().out


#: array tasks of the concurrency test. Each is a fresh Python that imports torch (~2 CPU-s), torch._dynamo (~2 CPU-s,
#: pulled in by torch.optim) and pandas (~0.5 CPU-s): on 2 cores 64 tasks take ~4 minutes of the suite.
MANY_TASKS = 64


@pytest.mark.slurm
@pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))
@pytest.mark.usefixtures("worker_env")
def test_64_array_tasks_finishing_together_leave_64_intact_results(tmp_path: Path) -> None:
    tiny = {"budget_samples": 256, "batch_size": 32, "eval_every_samples": 128, "checkpoint_every_samples": 128}
    spec = _spec("slurm-64", {"synthetic": {"train": tiny}}, seeds=MANY_TASKS)
    results = tmp_path / "results"
    assert _bench_run(_write(tmp_path, spec), results, "--executor", "slurm", "--slurm-wait") == 0
    gdir = results / "slurm-64"
    assert len(set(job_records(gdir).values())) == MANY_TASKS  # one array task per run
    cells = expand(parse_spec(spec))
    for cell in cells:
        rdir = store.run_dir(results, "slurm-64", cell.run_id)
        result = store.read_json(rdir / store.RESULT)  # parses: never a partial file
        assert result["run_id"] == cell.run_id and result["status"] == "completed"
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
    settings = WorkerSettings(device="cpu", threads=1, grid_tricks={"synthetic": []}, runs_per_gpu=2)
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
