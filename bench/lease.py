"""Per-run leases: a run is trained by at most one process at a time, on any executor.

Taken by :func:`bench.executors.worker.run_one` (the per-run path of the local pool, the debug
executor and SLURM array tasks) before it looks at or writes anything in the run folder, released
when the run returns. On disk, in the run folder::

    lease.json   the holder: host, boot id, pid namespace, pid and its start time, SLURM job id and
                 restart count, when it took the lease; its mtime is the heartbeat
    lease.log    one JSON line per event (train, takeover, release), appended (O_APPEND): the run's
                 own record of who trained it, and when

Taking a lease is atomic on local filesystems and on NFS: the holder record is written to a private
temporary file, then hard-linked to ``lease.json`` (``link`` fails if the name exists; a lost NFS
reply is resolved by comparing inodes). A heartbeat thread touches ``lease.json`` every
:func:`beat_s` seconds (``utime``, the server's clock on NFS) and notices when it no longer holds it.

A lease is stale — and taken over — when its holder is known dead:

- on the same host (hostname, boot id and pid namespace equal): its pid is gone, a zombie, or a
  different process (start time differs) — detected at once, whatever the heartbeat says;
- an earlier attempt of the same SLURM job (same job id, other ``SLURM_RESTART_COUNT``): SLURM runs
  one attempt of a job at a time;
- on another host: no heartbeat for :func:`ttl_s` seconds, measured on the filesystem's own clock
  (the mtime of a file the taker just wrote), so clock skew between nodes does not matter.

A takeover removes the stale file and links the new one while holding ``lease.json.takeover`` (taken
the same way), so two takers cannot both succeed. A holder that was frozen for longer than the TTL
and lost its lease to a taker sees it at its next heartbeat (:attr:`Lease.lost`) and stops.

Timings: ``$TRICKBENCH_LEASE_TTL_S`` (default 60 s) and ``$TRICKBENCH_LEASE_BEAT_S`` (default TTL/6),
read when a lease is taken, so tests can use seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

__all__ = [
    "HELD",
    "LEASE",
    "LOG",
    "Lease",
    "LeaseHeld",
    "acquire",
    "beat_s",
    "describe",
    "holder",
    "read_log",
    "ttl_s",
]

LEASE, LOG, TAKEOVER = "lease.json", "lease.log", "lease.json.takeover"
HELD = "held"  # run_one's status for a run that another live process is training
TTL_ENV, BEAT_ENV = "TRICKBENCH_LEASE_TTL_S", "TRICKBENCH_LEASE_BEAT_S"
DEFAULT_TTL_S = 60.0  # no heartbeat for this long: a holder on another host is dead
TAKE_ATTEMPTS = 4  # races lost in a row (released / replaced under us) before giving up as "held"


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"${name}: {raw!r} is not allowed; allowed: a number of seconds > 0")
    return value


def ttl_s() -> float:
    """Seconds without a heartbeat after which a holder on another host counts as dead (``$TRICKBENCH_LEASE_TTL_S``)."""
    return _env_seconds(TTL_ENV, DEFAULT_TTL_S)


def beat_s() -> float:
    """Seconds between heartbeats (``$TRICKBENCH_LEASE_BEAT_S``; default a sixth of :func:`ttl_s`)."""
    ttl = ttl_s()
    beat = _env_seconds(BEAT_ENV, ttl / 6)
    if beat >= ttl:
        raise ValueError(f"${BEAT_ENV}: {beat} is not allowed; allowed: less than the lease TTL ({ttl} s)")
    return beat


# --- who is this process -------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state letter, start time in clock ticks since boot) of ``pid`` from ``/proc``, or None if it is gone."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may contain spaces and parentheses
    return (fields[0], fields[19]) if len(fields) > 19 else None


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


_BOOT_ID = _read_text("/proc/sys/kernel/random/boot_id")


def _owner(job_id: str | None) -> dict[str, Any]:
    """The record written into ``lease.json`` by this process."""
    stat = _proc_stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "boot_id": _BOOT_ID,
        "pid_ns": _pid_namespace(),
        "pid": os.getpid(),
        "pid_start": stat[1] if stat else None,
        "job_id": job_id,
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "since": time.time(),
        "token": secrets.token_hex(8),
    }


def _same_host(rec: dict[str, Any], me: dict[str, Any]) -> bool:
    """Whether ``rec``'s pid can be checked here: same host, same boot, same pid namespace (all known)."""
    keys = ("host", "boot_id", "pid_ns")
    return all(rec.get(k) and rec.get(k) == me[k] for k in keys)


def _pid_alive(pid: int, pid_start: str | None) -> bool:
    """Whether process ``pid`` (started at ``pid_start`` clock ticks, when known) still runs on this host."""
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        return state not in ("Z", "X") and (pid_start is None or start == pid_start)
    if os.path.isdir("/proc/self"):  # Linux, and /proc/<pid> is gone
        return False
    try:  # no /proc: the pid exists or not (reuse is not detected)
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _stale_reason(rec: dict[str, Any], age_s: float, me: dict[str, Any], ttl: float) -> str | None:
    """Why the holder of a lease with record ``rec`` and heartbeat age ``age_s`` is dead, or None if it may live."""
    if rec.get("host") == me["host"] and rec.get("boot_id") and me["boot_id"] and rec["boot_id"] != me["boot_id"]:
        return f"host {me['host']} rebooted since pid {rec.get('pid')} took the lease"
    if _same_host(rec, me) and isinstance(rec.get("pid"), int):
        if _pid_alive(rec["pid"], rec.get("pid_start")):
            return None
        return f"pid {rec['pid']} on {rec['host']} is gone"
    job = rec.get("job_id")
    if job and job == me.get("job_id") and str(rec.get("slurm_restart")) != str(me["slurm_restart"]):
        return f"an earlier attempt of SLURM job {job} (restart {rec.get('slurm_restart')})"
    if age_s > ttl:
        return f"no heartbeat for {age_s:.0f} s (> {ttl:g} s) from pid {rec.get('pid')} on {rec.get('host')}"
    return None


# --- the files -------------------------------------------------------------------------------------------


def _read(path: Path) -> tuple[dict[str, Any], os.stat_result] | None:
    """(record, stat) of a lease file, or None when absent. Opened first: NFS revalidates attributes on open."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
    finally:
        os.close(fd)
    try:
        rec = json.loads(raw)
    except ValueError:
        rec = {}  # not ours, or damaged: judged by its heartbeat age alone
    return (rec if isinstance(rec, dict) else {}), st


def _is(path: Path, rec: dict[str, Any], st: os.stat_result) -> bool:
    """Whether ``path`` is still the lease file read as (``rec``, ``st``): same inode and same record.

    The record is compared too: a deleted file's inode number is often given to the next file made.
    """
    now = _read(path)
    return now is not None and _same_file(now[1], st) and now[0] == rec


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_ino, a.st_dev) == (b.st_ino, b.st_dev)


def _link(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to ``dst``; False if ``dst`` exists and is another file (atomic, also on NFS)."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        # NFS: a retransmitted LINK whose first reply was lost answers EEXIST although it worked
        try:
            return _same_file(os.stat(src), os.stat(dst))
        except FileNotFoundError:
            return False


def _append_log(run_dir: Path, event: str, **fields: Any) -> None:
    """Append one event to ``lease.log`` (one write with O_APPEND: lines of concurrent writers never interleave)."""
    line = json.dumps({"event": event, "t": time.time(), **fields}, sort_keys=True, default=str) + "\n"
    fd = os.open(Path(run_dir) / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    """The events of a run's ``lease.log`` (``[]`` when there is none), oldest first."""
    try:
        lines = (Path(run_dir) / LOG).read_text().splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


# --- the lease -------------------------------------------------------------------------------------------


class LeaseHeld(Exception):
    """Raised by :func:`acquire` when another live process holds the run; ``holder`` is its record."""

    def __init__(self, run_dir: Path, holder: dict[str, Any]) -> None:
        super().__init__(f"{run_dir}: {describe(holder)}")
        self.holder = holder


class Lease:
    """A lease this process holds on one run folder. Made by :func:`acquire`; call :meth:`release` when done.

    A daemon thread refreshes the heartbeat every :func:`beat_s` seconds until :meth:`release`; when it
    finds the file gone or replaced (a taker judged this process dead), :attr:`lost` becomes True and the
    holder must stop writing the run.
    """

    def __init__(self, run_dir: Path, record: dict[str, Any], stat: os.stat_result, beat: float) -> None:
        self.run_dir, self.record, self._stat, self._beat = Path(run_dir), record, stat, beat
        self.path = self.run_dir / LEASE
        self._lost = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.run_dir.name}", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        """True once another process took this lease over (this one was judged dead): stop, write nothing more."""
        return self._lost.is_set()

    def _heartbeat(self) -> None:
        while not self._done.wait(self._beat):
            try:
                if not _is(self.path, self.record, self._stat):
                    self._lost.set()
                    return
                os.utime(self.path)  # mtime = now (the file server's clock on NFS)
            except OSError:
                continue  # a transient filesystem error: try again at the next beat

    def log(self, event: str, **fields: Any) -> None:
        """Append ``event`` with this holder's identity to the run's ``lease.log``."""
        who = {k: self.record[k] for k in ("host", "pid", "job_id")}
        _append_log(self.run_dir, event, **who, **fields)

    def release(self, status: str | None = None) -> None:
        """Stop the heartbeat and remove ``lease.json`` if it is still this lease's (idempotent)."""
        if self._done.is_set():
            return
        self._done.set()
        self._thread.join()
        with contextlib.suppress(FileNotFoundError):
            if _is(self.path, self.record, self._stat):
                os.unlink(self.path)
        self.log("release", status=status, lost=self.lost)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(run_dir: Path, job_id: str | None = None) -> Lease:
    """Take the lease of ``run_dir`` (which must exist) for this process; :class:`LeaseHeld` if a live one has it.

    Never waits: a free or stale lease is taken at once (a takeover is logged with the reason), a live
    one raises. ``job_id`` (a SLURM array task, e.g. ``1234_5``) is recorded; with ``SLURM_RESTART_COUNT``
    it lets a requeued task take over its own earlier attempt's lease at once.
    """
    run_dir = Path(run_dir)
    ttl, beat = ttl_s(), beat_s()
    me = _owner(job_id)
    path, takeover = run_dir / LEASE, run_dir / TAKEOVER
    tmp = run_dir / f".lease.{me['pid']}.{me['token']}.tmp"
    with open(tmp, "x") as fh:
        json.dump(me, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    seen: dict[str, Any] = {}
    try:
        for _ in range(TAKE_ATTEMPTS):
            if _link(tmp, path):
                return Lease(run_dir, me, os.stat(tmp), beat)
            current = _read(path)
            if current is None:
                continue  # released between our link and our read: try again
            seen, st = current
            os.utime(tmp)  # the filesystem's "now" (the server's clock on NFS), beside the holder's heartbeat
            reason = _stale_reason(seen, os.stat(tmp).st_mtime - st.st_mtime, me, ttl)
            if reason is None:
                raise LeaseHeld(run_dir, seen | {"heartbeat_age_s": max(0.0, time.time() - st.st_mtime)})
            outcome = _take_over(tmp, path, takeover, (seen, st), me, ttl)
            if outcome is None:
                continue
            # logged by whoever removed the stale lease, also when another process links a lease into the
            # freed place first (then that one holds it and this attempt goes on to find it live)
            _append_log(
                run_dir,
                "takeover",
                **{k: me[k] for k in ("host", "pid", "job_id")},
                reason=reason,
                previous={k: seen.get(k) for k in ("host", "pid", "job_id", "since")},
                won=outcome,
            )
            if outcome:
                return Lease(run_dir, me, os.stat(tmp), beat)
        raise LeaseHeld(run_dir, seen or {"host": "?", "pid": None})
    finally:
        tmp.unlink(missing_ok=True)


def _take_over(
    tmp: Path,
    path: Path,
    takeover: Path,
    stale: tuple[dict[str, Any], os.stat_result],
    me: dict[str, Any],
    ttl: float,
) -> bool | None:
    """Replace the stale lease file ``stale`` by ours, holding the takeover lock.

    None: nothing done (another taker holds the lock, or the lease moved since it was judged stale). True: the
    stale lease was removed and ours is in its place. False: the stale lease was removed, and a process that
    was not taking over (it saw no lease at all) linked its own in between.
    """
    if not _link(tmp, takeover):
        other = _read(takeover)
        if other is not None:  # another taker is at it; only a dead one's lock is cleared (then try again)
            rec, st = other
            if _stale_reason(rec, os.stat(tmp).st_mtime - st.st_mtime, me, ttl) is not None and _is(takeover, rec, st):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(takeover)
        return None
    try:
        if not _is(path, *stale):
            return None  # released or taken over by someone else since we judged it
        os.unlink(path)
        return _link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            if _same_file(os.stat(takeover), os.stat(tmp)):
                os.unlink(takeover)


def holder(run_dir: Path) -> dict[str, Any] | None:
    """Who trains ``run_dir`` right now: the live holder's record plus ``heartbeat_age_s``, else None.

    For ``bench status``. Read-only: a stale lease (dead holder) reads as None. The heartbeat age of a
    holder on another host is measured on this machine's clock (skew shows as age, up to the TTL).
    """
    current = _read(Path(run_dir) / LEASE)
    if current is None:
        return None
    rec, st = current
    age_s = max(0.0, time.time() - st.st_mtime)
    if _stale_reason(rec, age_s, _owner(None), ttl_s()) is not None:
        return None
    return rec | {"heartbeat_age_s": age_s}


def describe(rec: dict[str, Any]) -> str:
    """One line for a holder record: who, where, since when, last heartbeat."""
    job = f"SLURM job {rec['job_id']}, " if rec.get("job_id") else ""
    since = time.strftime("%H:%M:%S", time.localtime(rec["since"])) if rec.get("since") else "?"
    beat = f", heartbeat {rec['heartbeat_age_s']:.0f} s ago" if "heartbeat_age_s" in rec else ""
    return f"trained by {job}pid {rec.get('pid')} on {rec.get('host')} since {since}{beat}"
