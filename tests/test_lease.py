"""Per-run leases: atomic, exclusive, stale holders taken over, a SIGKILLed holder's run resumed from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import lease, store
from bench.executors.worker import run_one
from bench.grid import expand
from bench.loop import RunContext, train
from bench.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
LONG = {
    "budget_samples": 32 * 12000,
    "batch_size": 32,
    "eval_every_samples": 32 * 3000,
    "checkpoint_every_samples": 32 * 200,
}

#: a process that holds the lease of argv[1] until killed (prints "held" once it does)
HOLD = "import sys, time; from bench import lease; lease.acquire(sys.argv[1]); print('held', flush=True); time.sleep(9)"


@pytest.fixture
def fast_lease(monkeypatch: pytest.MonkeyPatch) -> float:
    """Lease timings in seconds for this test (and the processes it starts): TTL 2 s, heartbeat every 0.2 s."""
    monkeypatch.setenv(lease.TTL_ENV, "2")
    monkeypatch.setenv(lease.BEAT_ENV, "0.2")
    return 2.0


def _env() -> dict[str, str]:
    return os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def _hold(run_dir: Path) -> subprocess.Popen:
    """Start a process holding ``run_dir``'s lease; return once it holds it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _foreign(run_dir: Path, age_s: float, **fields: object) -> None:
    """A lease as written by a process on another machine, with its last heartbeat ``age_s`` ago."""
    record = {"host": "other-node", "boot_id": "x", "pid_ns": "y", "pid": 4242, "since": time.time() - age_s} | fields
    path = run_dir / lease.LEASE
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_acquire_is_exclusive_and_release_frees(tmp_path: Path) -> None:
    held = lease.acquire(tmp_path)
    record = json.loads((tmp_path / lease.LEASE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(lease.LeaseHeld) as exc:
        lease.acquire(tmp_path)  # this process is alive: its own lease is not stale
    assert exc.value.holder["pid"] == os.getpid()
    assert lease.holder(tmp_path)["pid"] == os.getpid()
    held.release("completed")
    assert not (tmp_path / lease.LEASE).exists() and lease.holder(tmp_path) is None
    assert [e["event"] for e in lease.read_log(tmp_path)] == ["release"]
    assert not list(tmp_path.glob(".lease.*"))  # no temporary file left behind
    lease.acquire(tmp_path).release()


def test_live_holder_in_another_process_is_respected_and_a_killed_one_taken_over(tmp_path: Path) -> None:
    proc = _hold(tmp_path)
    try:
        with pytest.raises(lease.LeaseHeld, match=f"pid {proc.pid}"):
            lease.acquire(tmp_path)
        assert lease.holder(tmp_path)["pid"] == proc.pid
    finally:
        proc.kill()
        proc.wait()
    assert lease.holder(tmp_path) is None  # same host, pid gone: stale at once, whatever the heartbeat says
    taken = lease.acquire(tmp_path)
    (takeover,) = [e for e in lease.read_log(tmp_path) if e["event"] == "takeover"]
    assert takeover["previous"]["pid"] == proc.pid and "is gone" in takeover["reason"]
    assert takeover["won"] is True and takeover["pid"] == os.getpid()  # logged by the taker, which holds it
    taken.release()


def test_holder_on_another_host_is_taken_over_only_after_its_heartbeat_expires(tmp_path: Path, fast_lease) -> None:
    _foreign(tmp_path, age_s=0.5)
    with pytest.raises(lease.LeaseHeld, match="other-node"):
        lease.acquire(tmp_path)
    assert lease.holder(tmp_path)["host"] == "other-node"
    _foreign(tmp_path, age_s=fast_lease + 1)
    assert lease.holder(tmp_path) is None
    taken = lease.acquire(tmp_path)
    assert "no heartbeat" in lease.read_log(tmp_path)[-1]["reason"]
    taken.release()


def test_a_requeued_slurm_job_takes_over_its_earlier_attempt_at_once(tmp_path, monkeypatch, fast_lease) -> None:
    _foreign(tmp_path, age_s=0.1, job_id="77_3", slurm_restart="0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(tmp_path, job_id="77_3")  # the same attempt (e.g. another process of the task): live
    with pytest.raises(lease.LeaseHeld):
        lease.acquire(tmp_path, job_id="77_4")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lease.acquire(tmp_path, job_id="77_3").release()
    assert "earlier attempt of SLURM job 77_3" in lease.read_log(tmp_path)[0]["reason"]


def test_heartbeat_refreshes_and_a_lost_lease_is_noticed(tmp_path: Path, fast_lease) -> None:
    held = lease.acquire(tmp_path)
    path = tmp_path / lease.LEASE
    os.utime(path, (time.time() - 100, time.time() - 100))
    deadline = time.monotonic() + 5
    while time.time() - path.stat().st_mtime > 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.time() - path.stat().st_mtime < 50, "the heartbeat did not refresh the lease"
    assert not held.lost
    path.unlink()
    _foreign(tmp_path, age_s=0)  # a taker replaced it (this process was judged dead)
    deadline = time.monotonic() + 5
    while not held.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.lost
    held.release()
    assert json.loads(path.read_text())["host"] == "other-node"  # not ours: left alone


def test_racing_takers_of_a_stale_lease_one_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six processes at once on a stale lease (and then on none): exactly one holds it each time.

    TTL 10 s: the winner's heartbeat must never look expired to a late contender, even on a loaded machine.
    """
    monkeypatch.setenv(lease.TTL_ENV, "10")
    monkeypatch.setenv(lease.BEAT_ENV, "0.5")
    ttl = 10.0
    race = (
        "import os, sys, time; from bench import lease\n"
        "while time.time() < float(sys.argv[2]): pass\n"
        "try:\n    lease.acquire(sys.argv[1]); print('won', flush=True)\n"
        "except lease.LeaseHeld:\n    print('held', flush=True); sys.exit()\n"
        "while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n"  # hold it until every other one has tried
    )
    for stale in (True, False):
        run_dir, done = tmp_path / f"stale-{stale}", tmp_path / f"done-{stale}"
        run_dir.mkdir()
        if stale:
            _foreign(run_dir, age_s=ttl + 5)
        start = str(time.time() + 1.0)
        procs = [
            subprocess.Popen([sys.executable, "-c", race, str(run_dir), start, str(done)], stdout=subprocess.PIPE)
            for _ in range(6)
        ]
        deadline = time.monotonic() + 60
        while sum(p.poll() is not None for p in procs) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        done.touch()
        outs = sorted(p.communicate(timeout=60)[0].decode().strip() for p in procs)
        assert outs == ["held"] * 5 + ["won"], outs
        assert len([e for e in lease.read_log(run_dir) if e["event"] == "takeover"]) == int(stale)


def test_lease_timings_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(lease.TTL_ENV, "soon")
    with pytest.raises(ValueError, match="TRICKBENCH_LEASE_TTL_S: 'soon'"):
        lease.ttl_s()
    monkeypatch.setenv(lease.TTL_ENV, "1")
    monkeypatch.setenv(lease.BEAT_ENV, "2")
    with pytest.raises(ValueError, match="less than the lease TTL"):
        lease.beat_s()


def _long_cell(grid: str):
    (cell,) = expand(parse_spec({"grid": grid, "seeds": 1, "tasks": {"synthetic": {"train": LONG}}}))
    return cell


@pytest.mark.slow
def test_sigkilled_holder_on_another_node_is_taken_over_after_its_heartbeat_expires_and_the_run_resumes(
    tmp_path: Path, synthetic_task: str, fast_lease: float
) -> None:
    """A run trained by ``run_one`` in another process; the process is SIGKILLed after a checkpoint and
    its lease made to look like another node's (no pid to check): a re-launch skips the run while the
    heartbeat is fresh, takes it over once it has expired, resumes from the checkpoint, and ends bit for
    bit where the uninterrupted run ends."""
    cell = _long_cell("lease-takeover")
    results = tmp_path / "results"
    rdir = store.run_dir(results, cell.grid, cell.run_id)
    owner = (
        "import sys; from pathlib import Path; from bench.executors.worker import run_one\n"
        "from bench.grid import Cell; from bench.loop import RunContext; import json\n"
        "from experiments.registry import register_task\n"
        "from tests.synthetic_task import Synthetic; register_task(Synthetic)\n"
        "cell = Cell.from_dict(json.loads(sys.argv[1]))\n"
        "run_one(cell, Path(sys.argv[2]), RunContext(threads=1), [])\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", owner, json.dumps(cell.to_dict()), str(results)], env=_env())
    try:
        deadline = time.monotonic() + 120
        while not (rdir / store.CHECKPOINT).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (rdir / store.CHECKPOINT).exists(), "no checkpoint within 120 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = time.time()
    record = json.loads((rdir / lease.LEASE).read_text())
    assert record["pid"] == proc.pid
    mtime = (rdir / lease.LEASE).stat().st_mtime
    (rdir / lease.LEASE).write_text(json.dumps(record | {"host": "dead-node"}))  # the node died with it
    os.utime(rdir / lease.LEASE, (mtime, mtime))

    reference = train(cell, tmp_path / "reference", RunContext(threads=1))
    if time.time() - mtime < fast_lease - 0.5:  # still fresh: a re-launch leaves the run alone
        res = run_one(cell, results, RunContext(threads=1), [])
        assert res["status"] == lease.HELD and res["holder"]["host"] == "dead-node"
    time.sleep(max(0.0, mtime + fast_lease + 0.2 - time.time()))
    res = run_one(cell, results, RunContext(threads=1), [])
    assert res["status"] == "completed" and res["cost"]["resumes"] == 1
    assert time.time() - killed_at >= fast_lease - 0.5
    assert res["metric"] == reference["metric"]
    for name in ("curve.csv", "train.csv"):
        assert (rdir / name).read_text() == (tmp_path / "reference" / name).read_text()
    a, b = (torch.load(d / "final_model.pt", weights_only=True) for d in (rdir, tmp_path / "reference"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [e["event"] for e in lease.read_log(rdir)]
    assert events == ["train", "takeover", "train", "release"]  # the killed holder never released
    takeover = lease.read_log(rdir)[1]
    assert takeover["previous"]["host"] == "dead-node" and "no heartbeat" in takeover["reason"]
    assert not (rdir / lease.LEASE).exists()
