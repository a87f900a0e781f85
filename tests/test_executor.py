"""Launching grids: the local pool, re-launch skips finished runs, resumes partial ones, reruns crashed ones."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bench import lease, store
from bench.cli import main
from bench.loop import RunContext, train
from bench.runner import plan

SPEC = {
    "grid": "relaunch",
    "design": "one_at_a_time",
    "seeds": 2,
    "tasks": {
        "cifar_autoencoder": {
            "params": {"data": "offline", "train_size": 128, "test_size": 64, "width": 4},
            "train": {
                "budget_samples": 128,
                "batch_size": 32,
                "eval_every_samples": 64,
                "checkpoint_every_samples": 64,
            },
            "tricks": {"ema": {"half_life_samples": 32}},
        }
    },
}


def _write(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_local_pool_then_relaunch_skips_resumes_and_reruns(tmp_path: Path) -> None:
    spec_path, results = _write(tmp_path), tmp_path / "results"
    assert main(["run", str(spec_path), "--results", str(results), "--jobs", "2", "--no-progress"]) == 0
    gdir = results / "relaunch"
    runs = store.load_grid(gdir)
    assert len(runs) == 4 and set(runs["status"]) == {"completed"}
    assert (gdir / "report.md").exists() and (gdir / "summary.csv").exists() and (gdir / "grid.yaml").exists()
    assert len(pd.read_csv(gdir / "summary.csv")) == 4

    launch = plan(spec_path, results)
    assert launch.todo == []  # a finished grid trains nothing
    trainers = {e["pid"] for c in launch.cells for e in lease.read_log(store.run_dir(results, "relaunch", c.run_id))}
    assert len(trainers) <= 2  # warm workers: each trained several runs
    # damage the store the way clusters do: one run crashed, one half-way (checkpoint only)
    crashed, partial, *done = launch.cells
    store.run_dir(results, "relaunch", crashed.run_id).joinpath("result.json").unlink()
    store.atomic_write_json(
        store.run_dir(results, "relaunch", crashed.run_id) / "error.json",
        {"run_id": crashed.run_id, "error": "boom", "traceback_tail": []},
    )
    pdir = store.run_dir(results, "relaunch", partial.run_id)
    reference = store.read_json(pdir / "result.json")
    (pdir / "result.json").unlink()
    for f in ("curve.csv", "train.csv", "final_model.pt"):
        (pdir / f).unlink()
    assert train(partial, pdir, RunContext(max_steps=2))["status"] == "interrupted"
    mtimes = {
        c.run_id: store.run_dir(results, "relaunch", c.run_id).joinpath("result.json").stat().st_mtime_ns for c in done
    }

    launch = plan(spec_path, results)
    assert {c.run_id for c in launch.todo} == {crashed.run_id, partial.run_id}
    assert main(["run", str(spec_path), "--results", str(results), "--jobs", "2", "--no-progress"]) == 0
    for c in done:  # untouched
        assert (
            store.run_dir(results, "relaunch", c.run_id).joinpath("result.json").stat().st_mtime_ns == mtimes[c.run_id]
        )
    resumed = store.read_json(pdir / "result.json")
    assert resumed["cost"]["resumes"] == 1
    assert resumed["metric"] == reference["metric"]
    assert not (store.run_dir(results, "relaunch", crashed.run_id) / "error.json").exists()
    assert set(store.load_grid(gdir)["status"]) == {"completed"}


def test_debug_executor_and_status(tmp_path: Path, capsys) -> None:
    spec_path, results = _write(tmp_path), tmp_path / "results"
    assert (
        main(["run", str(spec_path), "--results", str(results), "--executor", "debug", "--no-progress", "--no-report"])
        == 0
    )
    assert main(["status", str(results / "relaunch")]) == 0
    out = capsys.readouterr().out
    assert "4 completed" in out


def test_dry_run_writes_nothing(tmp_path: Path, capsys) -> None:
    spec_path, results = _write(tmp_path), tmp_path / "results"
    assert main(["run", str(spec_path), "--results", str(results), "--dry-run"]) == 0
    assert "4 runs" in capsys.readouterr().out
    assert not results.exists()


def test_pool_stopped_from_outside_interrupts_running_runs_and_leaves_the_rest_untouched(tmp_path: Path) -> None:
    """``run_pool(stop=...)`` (how a SLURM task stops on a signal): a running run checkpoints and reports
    ``interrupted``; runs not started — queued or already handed to a worker — get no folder and no result."""
    from bench.executors.local import run_pool
    from bench.grid import expand
    from bench.spec import parse_spec
    from experiments.registry import get_task

    tiny = get_task("toy_diffusion").tiny
    long_train = tiny["train"] | {"budget_samples": 64 * 100_000, "checkpoint_every_samples": 64 * 1000}
    spec = {
        "grid": "stop",
        "seeds": 4,
        "design": "one_at_a_time",
        "tasks": {"toy_diffusion": tiny | {"train": long_train}},
    }
    cells = expand(parse_spec(spec))
    started = tmp_path / "results" / "stop" / "runs"
    results = run_pool(cells, tmp_path / "results", 1, show_progress=False, stop=lambda: started.exists())
    assert len(results) == 1 and next(iter(results.values()))["status"] == "interrupted"
    (run_id,) = results
    assert sorted(p.name for p in started.iterdir()) == [run_id]
    assert (started / run_id / store.CHECKPOINT).exists() and not (started / run_id / store.RESULT).exists()


def test_a_run_another_live_process_holds_is_skipped_and_said_so(tmp_path: Path, capsys) -> None:
    """The debug executor (like every executor, through ``run_one``) leaves a run alone while another live
    process holds its lease, says so, exits 0; once the holder is gone a re-launch trains it."""
    spec_path, results = _write(tmp_path), tmp_path / "results"
    held_run = plan(spec_path, results).cells[1]
    rdir = store.run_dir(results, "relaunch", held_run.run_id)
    rdir.mkdir(parents=True)
    hold = "import sys, time; from bench import lease; lease.acquire(sys.argv[1]); print('held', flush=True)\n"
    hold += "time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(rdir)], stdout=subprocess.PIPE, text=True)
    args = ["run", str(spec_path), "--results", str(results), "--executor", "debug", "--no-progress", "--no-report"]
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(args) == 0
    finally:
        holder.kill()
        holder.wait()
    out = capsys.readouterr().out
    assert "trained: 3 completed, 1 held" in out, out
    assert f"skipped 1 run that another process is training right now (1 by pid {holder.pid} on " in out, out
    assert not (rdir / store.CONFIG).exists() and not (rdir / store.RESULT).exists()  # untouched
    assert main(args) == 0
    assert "trained: 1 completed" in capsys.readouterr().out
    assert "is gone" in lease.read_log(rdir)[0]["reason"]  # the dead holder's lease was taken over


def test_cpu_peak_memory_counts_live_bytes_even_where_an_earlier_run_left_free_heap(tmp_path: Path) -> None:
    """A warm worker keeps the heap an earlier run freed; the resident set would not grow when the next run
    reuses it, live bytes do (so no gc.collect or malloc_trim is needed before a run)."""
    from bench.memory import PeakMemory

    earlier = [torch.ones(16 * 1024) for _ in range(512)]  # 32 MB in 64 KB blocks (below glibc's mmap threshold)
    del earlier  # freed into the heap, kept by the allocator
    with PeakMemory(torch.device("cpu"), interval_s=0.01) as mem:
        mem.rebase()
        now = [torch.ones(16 * 1024) for _ in range(512)]
        time.sleep(0.05)
        del now
    assert 30 * 2**20 < mem.peak_bytes < 40 * 2**20, mem.peak_bytes / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux parent-death signal")
def test_parent_death_signal_is_armed_on_linux() -> None:
    """Pool workers arm PR_SET_PDEATHSIG = SIGTERM through ctypes (read back with PR_GET_PDEATHSIG in a child)."""
    code = (
        "import ctypes, signal; from bench.executors.local import _set_parent_death_signal\n"
        "_set_parent_death_signal(signal.SIGTERM); sig = ctypes.c_int()\n"
        "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0); print(sig.value)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert int(out.stdout) == 15


FORK_SPEC = {
    "grid": "start",
    "seeds": 2,
    "tasks": {
        "toy_diffusion": {
            "params": {"hidden": 16},
            "train": {"budget_samples": 512, "batch_size": 64, "eval_every_samples": 256},
            "tricks": ["ema"],
        }
    },
}


def test_forked_and_spawned_workers_train_the_same_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool's workers forked from the launcher (Linux, CPU: the default) or spawned afresh (CUDA, other
    platforms): every run's metrics, curves and final weights are the same bits either way."""
    from bench.executors.local import WORKER_START_ENV

    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(FORK_SPEC))
    for method in ("fork", "spawn"):
        monkeypatch.setenv(WORKER_START_ENV, method)
        argv = ["run", str(spec), "--results", str(tmp_path / method), "--jobs", "2", "--no-progress", "--no-report"]
        assert main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "fork" / "start" / "runs").iterdir())
    assert len(runs) == 4 == len(list((tmp_path / "spawn" / "start" / "runs").iterdir()))
    for run_id in runs:
        a, b = (tmp_path / m / "start" / "runs" / run_id for m in ("fork", "spawn"))
        assert store.read_json(a / store.RESULT)["metric"] == store.read_json(b / store.RESULT)["metric"]
        assert (a / "curve.csv").read_text() == (b / "curve.csv").read_text()
        wa, wb = (torch.load(d / "final_model.pt", weights_only=True) for d in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), run_id


def test_start_method_forks_only_where_it_is_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    """fork on Linux for one-thread CPU runs; spawn for CUDA and for several threads per run; the environment
    variable overrides, and a wrong value is an error naming the variable and what is allowed."""
    from bench.executors.local import WORKER_START_ENV, start_method

    monkeypatch.delenv(WORKER_START_ENV, raising=False)
    assert start_method("cpu") == ("fork" if sys.platform.startswith("linux") else "spawn")
    assert start_method("cuda") == start_method("cuda:1") == start_method("cpu", gpu_count=2) == "spawn"
    assert start_method("cpu", threads=2) == "spawn"
    monkeypatch.setenv(WORKER_START_ENV, "spawn")
    assert start_method("cpu") == "spawn"
    monkeypatch.setenv(WORKER_START_ENV, "forkserver")
    with pytest.raises(ValueError, match=rf"\${WORKER_START_ENV}: 'forkserver' is not allowed; allowed: fork, spawn"):
        start_method("cpu")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc")
def test_a_forked_worker_holds_none_of_the_launchers_pipe_ends() -> None:
    """Forked workers inherit the launcher's descriptors; each closes the launcher's end of its own pipes and of
    the workers forked before it — else a lifeline's write end would outlive the launcher and its EOF (how a
    worker learns at once that the launcher died) would never come."""
    import multiprocessing as mp

    from bench.executors.local import _Worker
    from tricks.plugins import registrations

    ctx = mp.get_context("fork")
    workers: list = []
    try:
        for i in range(2):
            workers.append(_Worker(ctx, i, None, (1, ["toy_diffusion"], False, registrations()), workers))
        for w in workers:
            assert w.conn.poll(120) and w.conn.recv()[0] == "ready"
        # the launcher's ends: each pipe's socket of its own (a socketpair end has its own inode), each lifeline's
        # write end (a pipe's two ends share one inode: told apart by the access mode)
        sockets = {os.fstat(w.conn.fileno()).st_ino for w in workers}
        write_ends = {os.fstat(w.lifeline.fileno()).st_ino for w in workers}
        for w in workers:
            held_sockets, held_write_ends = set(), set()
            for fd in Path(f"/proc/{w.pid}/fd").iterdir():
                target = os.readlink(fd)
                inode = int(target.split("[")[1].rstrip("]")) if target.endswith("]") else None
                flags = int((Path(f"/proc/{w.pid}/fdinfo") / fd.name).read_text().split("flags:")[1].split()[0], 8)
                if target.startswith("socket:["):
                    held_sockets.add(inode)
                elif target.startswith("pipe:[") and flags & os.O_ACCMODE == os.O_WRONLY:
                    held_write_ends.add(inode)
            assert not held_sockets & sockets, (w.index, "a launcher's pipe end")
            assert not held_write_ends & write_ends, (w.index, "a lifeline's write end")
    finally:
        for w in workers:
            with contextlib.suppress(OSError):
                w.conn.send(None)
            w.process.join(30)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_launcher_that_already_ran_parallel_kernels_trains_its_grid(tmp_path: Path, threads: int) -> None:
    """A launching process (a notebook, a script) that ran an OpenMP-parallel kernel before ``bench run``: its
    grid trains with one thread per run (forked workers never enter a parallel region) and with two (spawned
    workers: a forked child of such a process would hang in its first parallel region)."""
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(FORK_SPEC | {"seeds": 1}))
    code = (
        "import sys, torch; torch.set_num_threads(2); x = torch.randn(1024, 1024); float((x @ x).sum())\n"
        "from bench.cli import main\n"
        f"sys.exit(main(['run', {str(spec)!r}, '--results', {str(tmp_path / 'results')!r}, '--jobs', '2', "
        f"'--threads', '{threads}', '--no-progress', '--no-report']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRICKBENCH_WORKER_START"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0 and "trained: 2 completed" in proc.stdout, proc


def test_a_wrong_worker_start_method_is_exit_2_with_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``$TRICKBENCH_WORKER_START`` other than fork/spawn: ``bench run`` says so (the variable, the value, what is
    allowed) and writes nothing."""
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump(FORK_SPEC))
    monkeypatch.setenv("TRICKBENCH_WORKER_START", "forkk")
    assert main(["run", str(spec), "--results", str(tmp_path / "results"), "--no-progress"]) == 2
    assert "$TRICKBENCH_WORKER_START: 'forkk' is not allowed; allowed: fork, spawn" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
