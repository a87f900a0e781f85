"""An exclusive lock file for one grid's SLURM submissions, safe on NFS; held only while submitting.

``bench run --executor slurm`` decides which runs to submit from what is already queued (``jobs.json`` and
``squeue``) and then submits: two launches of one grid doing that at once would both see nothing queued and
both submit every run. :class:`SubmissionLock` makes that decision and the submission one critical section.

Scheme (works on NFSv3+ and local filesystems; not on NFSv2, whose ``O_EXCL`` is not atomic):

- take: ``open(<grid>/submit.lock, O_CREAT | O_EXCL | O_WRONLY)`` — atomic on the server: exactly one
  creator succeeds — then write ``{host, pid, token, created}`` into it;
- hold: a daemon thread touches the file (``os.utime``) every ``stale_s / 4`` seconds: its mtime is the
  holder's heartbeat, so even a long submission (thousands of array tasks) keeps the lock;
- stale: the lock's owner is on this host and its pid is gone, or the file (its mtime and content) has not
  changed for ``stale_s`` seconds *of the waiter's own clock* (no comparison of clocks across hosts);
- break a stale lock: ``rename`` it to a private name (atomic: of several breakers exactly one gets it),
  check that the renamed file is the lock judged stale (same token), delete it and take the lock anew;
  a lock renamed by mistake (re-created in between) is linked back;
- release: delete the file only if it still holds this owner's token.
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
from types import TracebackType
from typing import Any

__all__ = ["LOCK_FILE", "LockTimeout", "SubmissionLock", "read_lock"]

LOCK_FILE = "submit.lock"  # <grid>/submit.lock
STALE_S = 60.0  # a lock whose heartbeat has not moved for this long (waiter's clock) belongs to a dead launch
WAIT_S = 600.0  # a launch waits at most this long for another launch's submission


class LockTimeout(TimeoutError):
    """The lock stayed held by a live owner for longer than the caller would wait."""


def read_lock(path: Path) -> dict[str, Any] | None:
    """The owner record of the lock file ``path``; None when there is none; ``{}`` while it is being written."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SubmissionLock:
    """``with SubmissionLock(grid_dir / LOCK_FILE): ...`` — one submitter of a grid at a time, across hosts.

    ``on_wait(owner)`` is called once when the lock is held by someone else (to tell the user who).
    ``LockTimeout`` after ``wait_s`` seconds of a live owner.
    """

    def __init__(
        self,
        path: Path,
        *,
        stale_s: float = STALE_S,
        wait_s: float = WAIT_S,
        poll_s: float = 0.2,
        on_wait: Any = None,
    ) -> None:
        self.path = Path(path)
        self.stale_s = stale_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.on_wait = on_wait
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.created_dirs: list[Path] = []  # folders made to hold the lock (removed on release when empty)

    # --- taking -----------------------------------------------------------------------------------------

    def _try_create(self) -> bool:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "created": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record))
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _observe(self) -> tuple[int, str] | None:
        """(mtime_ns, content) of the lock file now; None when it is gone."""
        try:
            st = self.path.stat()
            return st.st_mtime_ns, self.path.read_text()
        except FileNotFoundError:
            return None

    def _owner_dead_here(self, owner: dict[str, Any]) -> bool:
        return (
            owner.get("host") == socket.gethostname()
            and isinstance(owner.get("pid"), int)
            and (not _pid_alive(owner["pid"]))
        )

    def _break(self, stale_content: str) -> None:
        """Remove the lock file if it still is the one whose content was judged stale."""
        aside = self.path.with_name(f"{self.path.name}.stale.{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke it first
        try:
            taken = aside.read_text()
        except OSError:
            taken = None
        if taken != stale_content:  # re-created between our look and the rename: put the live lock back
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def acquire(self) -> None:
        """Take the lock, waiting for a live holder and breaking a stale one; ``LockTimeout`` after ``wait_s``."""
        parent = self.path.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created_dirs = missing  # deepest first
        t0 = time.monotonic()
        seen: tuple[int, str] | None = None
        seen_at = t0
        told = False
        while not self._try_create():
            now = time.monotonic()
            look = self._observe()
            if look is None:
                continue  # released between our create and our look: try again at once
            if look != seen:
                seen, seen_at = look, now
            owner = read_lock(self.path) or {}
            if self._owner_dead_here(owner) or now - seen_at > self.stale_s:
                self._break(look[1])
                seen = None
                continue
            if not told and self.on_wait is not None:
                self.on_wait(owner)
                told = True
            if now - t0 > self.wait_s:
                raise LockTimeout(
                    f"{self.path} is held by {owner.get('host', '?')} pid {owner.get('pid', '?')} (another launch "
                    f"submitting this grid) for more than {self.wait_s:.0f} s"
                )
            time.sleep(self.poll_s)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="submit-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def check(self) -> None:
        """``LockTimeout`` unless the lock file still holds this owner's token (call before each submission step:
        a launch suspended for longer than ``stale_s`` may have lost its lock to another launch)."""
        owner = read_lock(self.path)
        if not owner or owner.get("token") != self.token:
            raise LockTimeout(
                f"{self.path} was taken over by {(owner or {}).get('host', '?')} pid {(owner or {}).get('pid', '?')} "
                f"(this launch did not refresh it for {self.stale_s:.0f} s)"
            )

    # --- releasing ---------------------------------------------------------------------------------------

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        owner = read_lock(self.path)
        if owner and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def remove_created_dirs(self) -> None:
        """Remove the folders :meth:`acquire` created for the lock, if they are empty (a refused submission)."""
        for folder in self.created_dirs:
            try:
                folder.rmdir()
            except OSError:
                break

    def __enter__(self) -> SubmissionLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
