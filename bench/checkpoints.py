"""A run's checkpoints: written so that a good one always survives, read with fallbacks.

In the run folder::

    checkpoint.pt          the latest checkpoint
    checkpoint.prev.pt     the one before it, kept until the next one is complete
    quarantine/<n>.<name>  a checkpoint that could not be used, set aside (never deleted)
    recovery.json          every fallback: which files were set aside, why, and what the run did instead

:func:`save` (called by the loop's ``save_checkpoint``) writes the new checkpoint to a temporary file,
syncs it, and only then turns the latest into the previous one and the new one into the latest: a
kill at any moment leaves at least one complete checkpoint. Each checkpoint carries a SHA-256 of its
content (every tensor's bytes, every value) — ``torch.load`` does not check the zip's CRCs, so a
garbled byte in a tensor would otherwise load silently as a wrong number.

:class:`Resume` (used by the loop's ``maybe_resume``) yields the usable checkpoints newest first:
one that cannot be read (truncated, garbled, empty, a folder), fails its digest, has another format
or belongs to another run is moved aside with the reason, and the previous one is tried, then a clean
restart. :func:`remove_stale_tmp` deletes the ``.*.tmp`` files a killed writer left (a run folder has
one writer, so at the start of a run's launch every such file is stale). Checkpoints are read with
``torch.load(weights_only=True)`` only: a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import time
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import store

__all__ = ["LATEST", "PREVIOUS", "Resume", "content_digest", "remove", "remove_stale_tmp", "save"]

LATEST, PREVIOUS = store.CHECKPOINT, store.PREVIOUS_CHECKPOINT
DIGEST_KEY = "digest"  # the content SHA-256 inside a checkpoint (absent in checkpoints written before it)
REQUIRED = ("model", "optimizer", "evaluated_weights", "task", "history", "state")
_SCALARS = (int, float, str, bool, type(None))


def content_digest(obj: Any) -> str:
    """SHA-256 over a checkpoint payload's content: structure, keys, plain values and every tensor's bytes.

    The same content gives the same digest before ``torch.save`` and after ``torch.load`` (on any device).
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.resolve_conj().resolve_neg().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        if all(type(x) is float for x in obj):  # long metric histories: their bits in one C call
            h.update(b"f" + array("d", obj).tobytes())
        elif all(type(x) in _SCALARS for x in obj):
            h.update(repr(obj).encode())
        else:
            for x in obj:
                _feed(h, x)
    elif isinstance(obj, _SCALARS):
        h.update(f"S{type(obj).__name__}:{obj!r}".encode())
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"B%d:" % len(obj) + bytes(obj))
    elif isinstance(obj, np.ndarray):
        h.update(f"N{obj.dtype}{obj.shape}".encode() + np.ascontiguousarray(obj).tobytes())
    else:  # anything else weights_only admits (dtypes, numpy scalars): its type and repr
        h.update(f"O{type(obj).__name__}:{obj!r}".encode())


def _write_all(fh: Any, data: bytes) -> None:
    """Write ``data`` to the open temporary file (a seam for tests that kill a writer mid-write)."""
    fh.write(data)


def save(run_dir: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (a dict of tensors and plain values) as the run's latest checkpoint.

    The previous latest becomes ``checkpoint.prev.pt`` only once the new file is complete on disk, so a
    kill at any point leaves the old checkpoint (as latest or previous) readable.
    """
    import torch

    run_dir = Path(run_dir)
    buf = io.BytesIO()
    torch.save({**payload, DIGEST_KEY: content_digest(payload)}, buf)
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{LATEST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_all(fh, buf.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        if (run_dir / LATEST).exists():
            os.replace(run_dir / LATEST, run_dir / PREVIOUS)
        os.replace(tmp, run_dir / LATEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    store._fsync_dir(run_dir)


def remove(run_dir: Path) -> None:
    """Delete both checkpoints (after ``result.json`` is written: the run is done)."""
    for name in (LATEST, PREVIOUS):
        (Path(run_dir) / name).unlink(missing_ok=True)


def remove_stale_tmp(run_dir: Path) -> list[str]:
    """Delete the ``.*.tmp`` files a killed writer left in ``run_dir``; return their names.

    Call only from the run's own worker when it starts the run (nobody else writes in a run folder).
    """
    removed = []
    for path in Path(run_dir).glob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:160]}" if text else type(exc).__name__


class Resume:
    """The usable checkpoints of a run, newest first; unusable ones are set aside with the reason.

    Iterate to get ``(name, payload)``; call :meth:`reject` if a payload cannot be restored after all,
    and :meth:`finish` with what the run did, which records the fallback (if any) in ``recovery.json``.
    """

    def __init__(self, run_dir: Path, run_id: str, fmt: int, map_location: Any = "cpu") -> None:
        self.run_dir, self.run_id, self.fmt, self.map_location = Path(run_dir), run_id, fmt, map_location
        self.problems: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for name in (LATEST, PREVIOUS):
            path = self.run_dir / name
            if not os.path.lexists(path):
                continue
            payload, reason = self._read(path)
            if reason:
                self.reject(name, reason)
                continue
            yield name, payload

    def _read(self, path: Path) -> tuple[dict[str, Any] | None, str]:
        import torch

        name = path.name
        if path.is_dir():
            return None, f"{name} is a folder, not a file"
        if path.stat().st_size == 0:
            return None, f"{name} is empty (0 bytes)"
        try:
            payload = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as exc:  # truncated zip, garbled pickle, a pickle that wants to run code, ...
            return None, f"{name} cannot be read ({_short(exc)})"
        if not isinstance(payload, dict):
            return None, f"{name} holds a {type(payload).__name__}, not a checkpoint"
        if payload.get("format") != self.fmt:
            return None, f"{name} has format {payload.get('format')!r}, this code writes {self.fmt}"
        if payload.get("run_id") != self.run_id:
            return None, f"{name} belongs to another run ({payload.get('run_id')!r})"
        missing = [k for k in REQUIRED if k not in payload]
        if missing:
            return None, f"{name} lacks {', '.join(missing)}"
        digest = payload.pop(DIGEST_KEY, None)
        try:
            if digest is not None and digest != content_digest(payload):
                return None, f"{name} does not match its content digest (garbled)"
        except (RecursionError, RuntimeError, TypeError, ValueError) as exc:
            return None, f"{name} cannot be verified ({_short(exc)})"
        return payload, ""

    def _set_aside(self, name: str) -> str:
        """Move file ``name`` of the run folder to ``quarantine/<n>.<name>``; return that relative path."""
        qdir = self.run_dir / store.QUARANTINE
        qdir.mkdir(exist_ok=True)
        n = 1
        while os.path.lexists(qdir / f"{n}.{name}"):
            n += 1
        with contextlib.suppress(FileNotFoundError):  # already gone: nothing to set aside
            os.replace(self.run_dir / name, qdir / f"{n}.{name}")
        return f"{store.QUARANTINE}/{n}.{name}"

    def reject(self, name: str, reason: str) -> None:
        """Set checkpoint ``name`` aside (``quarantine/<n>.<name>``) because of ``reason``."""
        self.problems.append(f"{reason} (set aside as {self._set_aside(name)})")

    def set_aside_leftovers(self) -> None:
        """Before a clean restart: move the curves and model an earlier attempt left to ``quarantine/`` too.

        The restart writes them anew; meanwhile the folder never looks like a finished run that lost its
        ``result.json`` (curves, no checkpoint), which ``bench run`` would move aside as damaged.
        """
        for name in (store.CURVE, store.TRAIN_LOG, store.FINAL_MODEL):
            if os.path.lexists(self.run_dir / name):
                self._set_aside(name)

    def finish(self, outcome: str) -> None:
        """Record ``outcome`` (e.g. "resumed from checkpoint.prev.pt at step 12") if anything was set aside."""
        if not self.problems:
            return
        path = self.run_dir / store.RECOVERY
        try:
            events = store.read_json(path)
            events = events if isinstance(events, list) else []
        except (OSError, ValueError):
            events = []
        events.append({"time": time.time(), "reason": "; ".join(self.problems), "action": outcome})
        store.atomic_write_json(path, events)
