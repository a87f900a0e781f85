"""Process lifecycle of ``bench run``: however a launch ends no worker outlives it, and no run is trained twice.

Each test starts real ``bench run`` processes (``bench.cli.main`` in a fresh Python that also registers the
test-only synthetic task) on a small grid, does to them what a scheduler, a terminal or a user does, and
checks the processes that are left, the runs' own lease logs, and that every run ends bit for bit where
its uninterrupted in-process training ends.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from bench import lease, store
from bench.cli import main
from bench.grid import expand
from bench.loop import RunContext, train
from bench.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
CLI = (
    "import sys; from experiments.registry import register_task\n"
    "from tests.synthetic_task import Synthetic; register_task(Synthetic)\n"
    "from bench.cli import main; sys.exit(main())\n"  # as the `bench` console script calls it (argv from sys.argv)
)
#: runs of ~1.5-3 s on an idle core, a checkpoint every 200 steps (a few ms)
LONG = {
    "budget_samples": 32 * 8000,
    "batch_size": 32,
    "eval_every_samples": 32 * 3000,
    "checkpoint_every_samples": 32 * 200,
}
SHORT = LONG | {"budget_samples": 32 * 1600, "eval_every_samples": 32 * 800}
GONE_WITHIN_S = 10.0

pytestmark = pytest.mark.slow


def _spec(tmp_path: Path, grid: str, train_block: dict, seeds: int) -> Path:
    path = tmp_path / f"{grid}.yaml"
    path.write_text(yaml.safe_dump({"grid": grid, "seeds": seeds, "tasks": {"synthetic": {"train": train_block}}}))
    return path


def _launch(spec: Path, results: Path, log: Path, *flags: str, session: bool = False) -> subprocess.Popen:
    """``bench run SPEC`` in a fresh Python (stdout and stderr to ``log``)."""
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "TRICKBENCH_ORPHAN_GRACE_S": "5",
    }
    args = ["run", str(spec), "--results", str(results), "--no-progress", "--no-report", *flags]
    with open(log, "w") as fh:
        return subprocess.Popen(
            [sys.executable, "-c", CLI, *args], stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=session
        )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (pool workers, multiprocessing's resource tracker)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _wait(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


_REFERENCES: dict[str, Path] = {}


def _assert_as_uninterrupted(results: Path, spec: Path, tmp_factory: pytest.TempPathFactory) -> list:
    """Every run of ``spec`` finished and equals its uninterrupted in-process training bit for bit."""
    cells = expand(parse_spec(yaml.safe_load(spec.read_text())))
    for cell in cells:
        if cell.run_id not in _REFERENCES:
            out = tmp_factory.mktemp("reference") / cell.run_id
            assert train(cell, out, RunContext(threads=1))["status"] == "completed"
            _REFERENCES[cell.run_id] = out
        ref, rdir = _REFERENCES[cell.run_id], store.run_dir(results, cell.grid, cell.run_id)
        got, want = store.read_json(rdir / store.RESULT), store.read_json(ref / store.RESULT)
        assert got["status"] == "completed" and got["metric"] == want["metric"], cell.run_id
        for name in ("curve.csv", "train.csv"):
            assert (rdir / name).read_text() == (ref / name).read_text(), (cell.run_id, name)
        a, b = (torch.load(d / "final_model.pt", weights_only=True) for d in (rdir, ref))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), cell.run_id
        assert not (rdir / lease.LEASE).exists() and not (rdir / store.CHECKPOINT).exists()
    return cells


def _hold_ctrl_c(proc: subprocess.Popen[bytes], every_s: float = 0.01) -> None:
    """Send SIGINT to ``proc``'s process group every ``every_s`` until it has exited (a key held down)."""
    while proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        time.sleep(every_s)


def _trained(rdir: Path) -> int:
    """How often a run was trained (started or resumed), from its own lease log."""
    return sum(e["event"] == "train" for e in lease.read_log(rdir))


@pytest.mark.parametrize(
    "how",
    ["SIGTERM", "SIGHUP", "SIGKILL", "Ctrl-C", "Ctrl-C twice", "Ctrl-C held", "SIGTERM to the group"],
    ids=lambda h: h.replace(" ", "-"),
)
def test_whatever_ends_the_launch_ends_its_workers_and_a_relaunch_finishes_every_run_identically(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, synthetic_task: str, how: str
) -> None:
    """SIGTERM / SIGHUP / SIGKILL to the ``bench run`` process alone, Ctrl-C (SIGINT to the terminal's
    process group, once, twice, or every 10 ms until it has exited) or SIGTERM to the whole group while its
    pool trains: within 10 s no process it started is alive, the exit status is 130 (Ctrl-C, SIGTERM, SIGHUP),
    the interrupted runs kept a checkpoint and released their leases (SIGKILL: the orphaned workers checkpoint
    at their next step themselves), and a re-launch finishes every run as if nothing had happened (checked
    after the three signals to the launch alone)."""
    spec, results = _spec(tmp_path, "lifecycle", LONG, seeds=3), tmp_path / "results"
    runs = results / "lifecycle" / "runs"
    proc = _launch(spec, results, tmp_path / "launch.log", "--jobs", "2", session=True)
    try:
        _wait(lambda: any(runs.glob("*/checkpoint.pt")) or proc.poll() is not None, 180, "a first checkpoint")
        assert proc.poll() is None, (tmp_path / "launch.log").read_text()
        started = _children(proc.pid)
        assert len(started) >= 2, started  # two workers (and the resource tracker)
        if how.startswith("Ctrl-C"):
            os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the whole foreground group
            if how == "Ctrl-C twice":
                time.sleep(0.2)
                os.killpg(proc.pid, signal.SIGINT)
            elif how == "Ctrl-C held":  # lands in every window of the shutdown, the last words included
                threading.Thread(target=_hold_ctrl_c, args=(proc,), daemon=True).start()
        elif how == "SIGTERM to the group":
            os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does (every process of the job)
        else:
            os.kill(proc.pid, getattr(signal, how))  # the launching process alone
        signalled = time.monotonic()
        _wait(lambda: not [p for p in started if _alive(p)], GONE_WITHIN_S, f"the workers to exit after {how}")
        assert time.monotonic() - signalled < GONE_WITHIN_S
        code = proc.wait(timeout=GONE_WITHIN_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = (tmp_path / "launch.log").read_text()
    assert code == (-signal.SIGKILL if how == "SIGKILL" else 130), log
    assert not [p for p in _children(proc.pid) if _alive(p)]
    unfinished = [d for d in runs.iterdir() if not (d / store.RESULT).exists()]
    assert unfinished, "every run finished before the signal: nothing was interrupted"
    if how not in ("Ctrl-C twice", "Ctrl-C held"):  # a second Ctrl-C kills the workers: the last periodic
        # checkpoint is what is left
        for rdir in unfinished:
            if (rdir / lease.LOG).exists():
                assert lease.read_log(rdir)[-1]["event"] == "release", rdir
                assert (rdir / store.CHECKPOINT).exists()
                assert not (rdir / lease.LEASE).exists(), f"{rdir.name}: its worker did not release the lease"

    if how not in ("SIGTERM", "SIGHUP", "SIGKILL"):
        return  # what a re-launch makes of interrupted runs is the same whatever interrupted them (checked below)
    relaunch = ["run", str(spec), "--results", str(results), "--executor", "debug", "--no-progress", "--no-report"]
    assert main(relaunch) == 0
    cells = _assert_as_uninterrupted(results, spec, tmp_path_factory)
    resumed = [c for c in cells if store.read_json(runs / c.run_id / store.RESULT)["cost"]["resumes"] > 0]
    assert resumed, "no run resumed from a checkpoint"


@pytest.mark.parametrize("start", ["together", "staggered"])
def test_two_launches_of_one_grid_train_every_run_once(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, synthetic_task: str, start: str
) -> None:
    """Two ``bench run`` of one grid into one results folder, started together or the second after the first
    finished a run: both exit 0, every run was trained exactly once (its lease log, and the two launch
    summaries' completed counts add up to the grid), and every result is the uninterrupted one."""
    spec, results = _spec(tmp_path, "twice", SHORT, seeds=6), tmp_path / "results"
    first = _launch(spec, results, tmp_path / "first.log", "--jobs", "1")
    if start == "staggered":
        _wait(lambda: any((results / "twice" / "runs").glob("*/result.json")), 180, "the first launch's first run")
    second = _launch(spec, results, tmp_path / "second.log", "--jobs", "1")
    try:
        codes = [first.wait(timeout=300), second.wait(timeout=300)]
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
    logs = [(tmp_path / name).read_text() for name in ("first.log", "second.log")]
    assert codes == [0, 0], logs
    cells = _assert_as_uninterrupted(results, spec, tmp_path_factory)
    trained = {c.run_id: _trained(results / "twice" / "runs" / c.run_id) for c in cells}
    assert set(trained.values()) == {1}, trained
    completed = [re.search(r"trained: .*?(\d+) completed", log) for log in logs]
    assert sum(int(m.group(1)) for m in completed if m) == len(cells), logs
    for log in logs:
        held = re.search(r"(\d+) held", log)
        if held:  # said so, with who holds them
            assert re.search(rf"skipped {held.group(1)} runs? that another process is training right now", log), log


def test_a_worker_killed_alone_is_replaced_and_its_run_resumed(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, synthetic_task: str
) -> None:
    """SIGKILL of one pool worker in mid-run (OOM killer): a fresh worker takes the run over from its lease and
    checkpoint, the launch still exits 0, and the run equals its uninterrupted training."""
    spec, results = _spec(tmp_path, "workerkill", LONG, seeds=2), tmp_path / "results"
    runs = results / "workerkill" / "runs"
    proc = _launch(spec, results, tmp_path / "launch.log", "--jobs", "1")
    try:
        _wait(lambda: any(runs.glob("*/checkpoint.pt")) or proc.poll() is not None, 180, "a first checkpoint")
        (rdir,) = [d for d in runs.iterdir() if (d / lease.LEASE).exists()]
        holder = lease.holder(rdir)
        assert holder is not None and holder["pid"] in _children(proc.pid)
        os.kill(holder["pid"], signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, (tmp_path / "launch.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    _assert_as_uninterrupted(results, spec, tmp_path_factory)
    events = [e["event"] for e in lease.read_log(rdir)]
    assert events == ["train", "takeover", "train", "release"], events
    assert store.read_json(rdir / store.RESULT)["cost"]["resumes"] == 1
