"""The example plugin on the real single-node SLURM cluster (marker ``slurm``; skipped when no cluster answers).

Start the cluster first (root): ``bash slurm/cluster.sh install && bash slurm/cluster.sh start``. The array
tasks are fresh Pythons of this environment: they find the installed plugin through its entry points — no
environment variable — and a task registered in code through the registrations the launch exports.
"""

from __future__ import annotations

import contextlib
import io
import os
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
from bench.cli import main
from bench.executors.slurm import job_records
from bench.executors.worker import read_state
from tests.test_plugin import LINE_TASK
from tests.test_slurm import _PROBLEM  # why the real cluster cannot be used (one probe for both files)

ROOT = Path(__file__).resolve().parent.parent
GRID = ROOT / "examples" / "plugin" / "grid.yaml"
FLAGS = ["--executor", "slurm", "--slurm-partition", "debug", "--slurm-time-min", "10", "--no-progress", "--no-report"]


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))]


def _bench(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def _same_runs(a: Path, b: Path) -> int:
    """Every run of grid folder ``a`` equals the one of ``b`` (metrics, losses, final weights); returns the count."""
    runs = sorted(p.name for p in (a / "runs").iterdir())
    assert runs == sorted(p.name for p in (b / "runs").iterdir())
    for run_id in runs:
        ra, rb = (store.read_json(g / "runs" / run_id / store.RESULT) for g in (a, b))
        assert ra["status"] == rb["status"] == "completed" and ra["metric"] == rb["metric"], run_id
        assert (a / "runs" / run_id / "train.csv").read_text() == (b / "runs" / run_id / "train.csv").read_text()
        wa, wb = (torch.load(g / "runs" / run_id / "final_model.pt", weights_only=True) for g in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), run_id
    return len(runs)


def test_plugin_grid_on_slurm_equals_local_and_reports(tmp_path: Path) -> None:
    """`bench run examples/plugin/grid.yaml --executor slurm`: the array tasks see the installed plugin's task and
    trick; the runs equal an in-process local grid; `bench status` and `bench report` read it."""
    results, local = tmp_path / "slurm", tmp_path / "local"
    code, out, err = _bench(
        "run", GRID, "seeds=2", "--results", results, *FLAGS, "--runs-per-task", "4", "--slurm-wait"
    )
    assert code == 0, out + err
    code, _, err = _bench(
        "run", GRID, "seeds=2", "--results", local, "--executor", "debug", "--no-progress", "--no-report"
    )
    assert code == 0, err
    assert _same_runs(results / "plugin-example", local / "plugin-example") == 8
    code, out, _ = _bench("status", results / "plugin-example")
    assert code == 0 and "8 completed" in out
    assert _bench("report", results / "plugin-example")[0] == 0


def test_plugin_run_killed_mid_training_resumes_on_relaunch(tmp_path: Path) -> None:
    """The array task's Python SIGKILLed while a plugin-task run trains (no handler, like a node dying): the same
    `bench run` resubmits it and it resumes from its last checkpoint to the uninterrupted result."""
    long = ["seeds=1", "tasks.mlp_regression.train.budget_samples=160000"]  # ~5 s per run
    long += ["tasks.mlp_regression.train.checkpoint_every_samples=8000"]
    long += ["~tasks.mlp_regression.tricks.ema", "~tasks.mlp_regression.tricks.no_weight_decay"]  # baseline, mixup
    results, local = tmp_path / "slurm", tmp_path / "local"
    code, out, err = _bench("run", GRID, *long, "--results", results, *FLAGS, "--runs-per-task", "2")
    assert code == 0, out + err
    runs = results / "plugin-example" / "runs"
    _wait_until(lambda: any(runs.glob("*/checkpoint.pt")), 180, "a first checkpoint")
    (rdir,) = {p.parent for p in runs.glob("*/checkpoint.pt")}
    (job,) = set(job_records(results / "plugin-example").values())
    os.kill(int(read_state(rdir)["pid"]), signal.SIGKILL)
    code, _, err = _bench("run", GRID, *long, "--results", local, "--executor", "debug", "--no-progress", "--no-report")
    assert code == 0, err
    _wait_until(lambda: _queue_state(job) is None, 120, "the killed job to leave the queue")
    code, out, err = _bench("run", GRID, *long, "--results", results, *FLAGS, "--slurm-wait")
    assert code == 0 and "submitted 2 runs" in out, out + err
    assert _same_runs(results / "plugin-example", local / "plugin-example") == 2
    assert store.read_json(rdir / store.RESULT)["cost"]["resumes"] == 1


def test_register_task_in_a_launcher_reaches_slurm_tasks(tmp_path: Path) -> None:
    """A task registered in code (module on PYTHONPATH, no entry point) trains in SLURM array tasks."""
    (tmp_path / "line_task.py").write_text(LINE_TASK)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({"grid": "line", "seeds": 2, "tasks": {"line_fit": {}}}))
    flags = [*FLAGS, "--runs-per-task", "2", "--slurm-wait"]
    (tmp_path / "launch.py").write_text(
        "import sys\nfrom bench.cli import main\nfrom experiments.registry import register_task\n"
        "from line_task import Line\n\nif __name__ == '__main__':\n    register_task(Line)\n"
        f"    sys.exit(main(['run', 'grid.yaml', *{flags!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "launch.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc
    statuses = [store.run_status(d) for d in (tmp_path / "results" / "line" / "runs").iterdir()]
    assert statuses == ["completed", "completed"], statuses


def _queue_state(job: str) -> str | None:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    states = out.stdout.split()
    return states[0] if out.returncode == 0 and states else None
