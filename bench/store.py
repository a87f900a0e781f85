"""The result store: one folder per run, atomic writes, and loading a grid into pandas.

Layout (see DESIGN.md)::

    <results>/<grid>/grid.yaml                  resolved spec as launched
    <results>/<grid>/runs/<run_id>/config.json  resolved config, code version, seed bundle
    <results>/<grid>/runs/<run_id>/curve.csv    evaluation metrics by samples seen
    <results>/<grid>/runs/<run_id>/train.csv    per-step train loss, gradient norm, lr
    <results>/<grid>/runs/<run_id>/checkpoint.pt  latest checkpoint (bench.checkpoints)
    <results>/<grid>/runs/<run_id>/checkpoint.prev.pt  the one before, kept until the next one is complete
    <results>/<grid>/runs/<run_id>/recovery.json  damaged checkpoints the run fell back from, and why
    <results>/<grid>/runs/<run_id>/quarantine/  checkpoints (and stale curves) set aside by that fallback
    <results>/<grid>/runs/<run_id>/result.json  final metrics, status, timings — written last
    <results>/<grid>/runs/<run_id>/error.json   a crash (traceback tail); the run is re-run on re-launch
    <results>/<grid>/summary.csv                one row per run (rewritten by `bench report`)
    <results>/<grid>/quarantine/<run_id>.<n>/   a damaged run folder moved aside (+ <run_id>.<n>.json: why)

Every file is written to a temporary name in the same folder and renamed into place, so a
reader (or a re-launch after a kill) never sees a partial file. Each run folder is written
by exactly one worker, so no locks or database are needed, even for hundreds of SLURM
array tasks on a shared filesystem. Folder names are run ids (hex), never user strings.

Integrity: ``result.json`` records the size and SHA-256 of every artefact the report reads
(``artefacts``: config.json, curve.csv, train.csv, final_model.pt), and a digest of itself. :func:`check_run` verifies a
run before anyone trusts it — sizes always, hashes of small files always and of large ones when
``deep`` (reading a grid for analysis), cached in memory by (size, mtime, ctime, inode) — and
reports a run whose files do not match, or whose result.json / config.json / error.json cannot be
read or lacks a required field, or that belongs to another run, as ``damaged`` with the reason.
A damaged run is left out of every analysis (with a note), never stops ``status``/``report``, and
the next ``bench run`` moves its folder aside to ``<grid>/quarantine/<run_id>.<n>/`` (never
deleted) and trains it again (:func:`set_aside_damaged`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ARTEFACTS",
    "RunCheck",
    "RunStatus",
    "artefact_manifest",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_run",
    "grid_dir",
    "grid_rows",
    "load_curves",
    "load_grid",
    "quarantine_run",
    "read_json",
    "run_dir",
    "run_notes",
    "run_status",
    "sealed",
    "set_aside_damaged",
    "write_summary",
]

RESULT, ERROR, CHECKPOINT, CONFIG = "result.json", "error.json", "checkpoint.pt", "config.json"
PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the checkpoint before the latest, kept until the next one is complete
CURVE, TRAIN_LOG, FINAL_MODEL = "curve.csv", "train.csv", "final_model.pt"
RECOVERY = "recovery.json"  # what a run recovered from (damaged checkpoints set aside), read by `bench status`
ARTEFACTS = (CONFIG, CURVE, TRAIN_LOG, FINAL_MODEL)  # what the report reads; recorded in result.json
QUARANTINE = "quarantine"  # <grid>/quarantine/<run_id>.<n>/: damaged run folders, moved aside, never deleted
STALE = "stale"  # <grid>/stale/<run_id>.<n>/: runs trained by other code, moved aside by --rerun-stale
SMALL_BYTES = 1 << 20  # files up to this size are hashed on every check; larger ones when deep=True
MAX_JSON_BYTES = 64 << 20  # a result/config/error file larger than this is damage, not something to parse
RUN_ID = re.compile(r"[0-9a-f]{16}\Z")


class RunStatus:
    """On-disk states of a run (derived from which files exist, never stored separately)."""

    COMPLETED = "completed"  # result.json, trained the whole budget
    DIVERGED = "diverged"  # result.json, non-finite loss at some step
    INCOMPLETE = "incomplete"  # result.json, given up (e.g. requeue limit) with a reason
    FAILED = "failed"  # error.json: crashed; re-run on re-launch
    PARTIAL = "partial"  # checkpoint.pt only: resumed on re-launch
    PENDING = "pending"  # nothing yet
    DAMAGED = "damaged"  # a file cannot be read or does not match result.json: set aside and re-run on re-launch
    FINISHED = (COMPLETED, DIVERGED, INCOMPLETE)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace`` (atomic on POSIX).

    The file gets the mode an ordinary ``open(path, "w")`` gives: 0o666 less the process umask
    (0o644 under the default 022), so labmates on a shared filesystem can read results.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # not tempfile.mkstemp: it creates 0o600 whatever the umask; O_EXCL + a random name is as safe
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)  # kernel applies umask
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def grid_dir(results_root: Path, grid: str) -> Path:
    return Path(results_root) / grid


def run_dir(results_root: Path, grid: str, run_id: str) -> Path:
    return grid_dir(results_root, grid) / "runs" / run_id


# --- integrity -----------------------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int, int, int, int], str] = {}  # (path, size, mtime, ctime, inode, dev) -> sha256


def _sha256(path: Path, st: os.stat_result) -> str:
    """SHA-256 of ``path``, cached for as long as its size, times and inode are unchanged."""
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


def artefact_manifest(run_dir: Path, names: Iterable[str] = ARTEFACTS) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` of each of ``names`` present in ``run_dir``.

    Call after the artefacts are written and before ``result.json`` (which records it).
    """
    out = {}
    for name in names:
        path = Path(run_dir) / name
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode):
            out[name] = {"bytes": st.st_size, "sha256": _sha256(path, st)}
    return out


RESULT_DIGEST = "digest"  # in result.json: SHA-256 of the rest of it (canonical JSON), so any edit shows


def _canonical_digest(obj: dict[str, Any]) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with ``digest`` added: the SHA-256 of its canonical JSON. Write result.json as
    ``atomic_write_json(path, sealed(result))``; :func:`check_run` then detects any later change to it."""
    body = {k: v for k, v in result.items() if k != RESULT_DIGEST}
    return {**body, RESULT_DIGEST: _canonical_digest(body)}


@dataclass(frozen=True)
class RunCheck:
    """What :func:`check_run` found: the run's status, and for ``damaged`` why."""

    status: str
    reason: str = ""


class _Damage(Exception):
    """A run folder failed a check (internal; becomes RunCheck(DAMAGED, reason))."""


def _regular_file(path: Path, missing: str = "") -> os.stat_result:
    """``path``'s stat when it is a regular file; _Damage naming it (``missing``: what to add when it is absent)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise _Damage(f"{path.name} is missing{missing}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _Damage(f"{path.name} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise _Damage(f"{path.name} is not a regular file")
    return st


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; _Damage saying what is wrong with the file otherwise."""
    name = path.name
    st = _regular_file(path)
    if st.st_size == 0:
        raise _Damage(f"{name} is empty (0 bytes)")
    if st.st_size > MAX_JSON_BYTES:
        raise _Damage(f"{name} has {st.st_size} bytes (more than {MAX_JSON_BYTES}: not one of ours)")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _Damage(f"{name} is not UTF-8 text (byte {exc.start}): garbled") from None
    except json.JSONDecodeError as exc:
        raise _Damage(
            f"{name} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}): truncated or garbled"
        ) from None
    except (RecursionError, ValueError) as exc:
        raise _Damage(f"{name} cannot be parsed ({type(exc).__name__}): garbled") from None
    except OSError as exc:
        raise _Damage(f"{name} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(obj, dict):
        raise _Damage(f"{name} holds a JSON {type(obj).__name__}, not an object: garbled")
    return obj


def _require(obj: dict[str, Any], name: str, fields: dict[str, type | tuple[type, ...]]) -> None:
    missing = [f for f in fields if f not in obj]
    if missing:
        raise _Damage(f"{name} lacks required field{'s' * (len(missing) > 1)} {', '.join(missing)}")
    for f, kind in fields.items():
        value = obj[f]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _Damage(f"{name}: field {f} is a {type(value).__name__}, not what a run writes")


_CONFIG_FIELDS = {"run_id": str, "task": str, "arm": str, "seed": int, "tricks_on": list, "config": dict}
_RESULT_FIELDS = {"run_id": str, "status": str, "metric": dict, "stability": dict, "cost": dict}
_ERROR_FIELDS = {"error": str, "traceback_tail": list}


def _same_run(path: Path, name: str, run_id: str) -> None:
    """_Damage when a file's run_id is not the folder's (a file of another run copied or moved in)."""
    if RUN_ID.match(path.name) and run_id != path.name:
        raise _Damage(f"{name} belongs to another run ({run_id!r}, this folder is {path.name})")


def _check_config(path: Path) -> dict[str, Any] | None:
    if not os.path.lexists(path / CONFIG):
        return None
    meta = _read_json_object(path / CONFIG)
    _require(meta, CONFIG, _CONFIG_FIELDS)
    _same_run(path, CONFIG, meta["run_id"])
    return meta


def _check_artefacts(path: Path, manifest: Any, deep: bool) -> None:
    if manifest is None:
        return  # a result.json written before artefacts were recorded: nothing to compare against
    if not isinstance(manifest, dict):
        raise _Damage(f"{RESULT}: field artefacts is a {type(manifest).__name__}: garbled")
    for name in ARTEFACTS:  # only names we know: never a path taken from a file
        rec = manifest.get(name)
        if rec is None:
            continue
        if not (
            isinstance(rec, dict)
            and isinstance(rec.get("bytes"), int)
            and isinstance(rec.get("sha256"), str)
            and len(rec["sha256"]) == 64
        ):
            raise _Damage(f"{RESULT}: the record of {name} is malformed: garbled")
        file = path / name
        st = _regular_file(file, f" (result.json records {rec['bytes']} bytes)")
        if st.st_size != rec["bytes"]:
            raise _Damage(f"{name} has {st.st_size} bytes, result.json records {rec['bytes']}: truncated or replaced")
        if (deep or st.st_size <= SMALL_BYTES) and _sha256(file, st) != rec["sha256"]:
            raise _Damage(f"{name} does not match its recorded SHA-256: garbled or another run's file")


def _check_finished(path: Path, meta: dict[str, Any] | None, deep: bool) -> str:
    res = _read_json_object(path / RESULT)
    digest = res.pop(RESULT_DIGEST, None)  # absent in results written before it (and in SLURM's "incomplete")
    if digest is not None and digest != _canonical_digest(res):
        raise _Damage(f"{RESULT} does not match its digest: edited or garbled")
    _require(res, RESULT, _RESULT_FIELDS)
    status = res["status"]
    if status not in RunStatus.FINISHED:
        raise _Damage(f"{RESULT}: status {status!r} is not one a finished run records")
    _same_run(path, RESULT, res["run_id"])
    if meta is not None and meta["run_id"] != res["run_id"]:
        raise _Damage(f"{RESULT} ({res['run_id']}) and {CONFIG} ({meta['run_id']}) are of different runs")
    if status == RunStatus.DIVERGED and not isinstance(res.get("diverged_step"), int):
        raise _Damage(f"{RESULT}: a diverged run without its diverged_step")
    primary = res.get("primary_metric")
    if status == RunStatus.COMPLETED and (
        not res["metric"] or (isinstance(primary, str) and primary not in res["metric"])
    ):
        raise _Damage(f"{RESULT}: metric section lacks the primary metric {primary!r}")
    _check_artefacts(path, res.get("artefacts"), deep)
    return status


def check_run(path: Path, deep: bool = False) -> RunCheck:
    """The status of the run stored in folder ``path`` (see :class:`RunStatus`), verified.

    Reads nothing but the run's own JSON files and file sizes, plus the SHA-256 of every recorded
    artefact up to :data:`SMALL_BYTES` — and of all of them with ``deep`` (before analysing a grid).
    Never raises for a damaged run: it is ``RunCheck("damaged", reason)``.
    """
    path = Path(path)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return RunCheck(RunStatus.PENDING)
    try:
        if not stat.S_ISDIR(st.st_mode):
            raise _Damage(f"the run folder {path.name} is not a folder")
        meta = _check_config(path)
        if os.path.lexists(path / RESULT):
            return RunCheck(_check_finished(path, meta, deep))
        if os.path.lexists(path / ERROR):
            _require(_read_json_object(path / ERROR), ERROR, _ERROR_FIELDS)
            return RunCheck(RunStatus.FAILED)
        if os.path.lexists(path / CHECKPOINT) or os.path.lexists(path / PREVIOUS_CHECKPOINT):
            return RunCheck(RunStatus.PARTIAL)
        left = [n for n in (CURVE, TRAIN_LOG, FINAL_MODEL) if os.path.lexists(path / n)]
        if left:  # curves are written only with (after) a checkpoint, and the checkpoint goes only after result.json
            raise _Damage(f"{RESULT} is missing, but {', '.join(left)} {'is' if len(left) == 1 else 'are'} there")
    except _Damage as exc:
        return RunCheck(RunStatus.DAMAGED, str(exc))
    except OSError as exc:  # e.g. permissions: say so rather than stop the whole grid
        return RunCheck(RunStatus.DAMAGED, f"cannot be read ({exc.strerror or exc})")
    return RunCheck(RunStatus.PENDING)


def run_status(path: Path, deep: bool = False) -> str:
    """The status of the run stored in folder ``path`` (:func:`check_run`'s status; see :class:`RunStatus`)."""
    return check_run(path, deep).status


def quarantine_run(path: Path, reason: str, folder: str = QUARANTINE) -> Path | None:
    """Move the run folder ``path`` aside to ``<grid>/<folder>/<run_id>.<n>`` (never deleted) and record why
    in ``<run_id>.<n>.json`` beside it; the run's next launch starts from an empty folder.

    ``folder``: ``quarantine`` for damaged runs, ``stale`` for runs trained by other code (``--rerun-stale``).
    Call only for a run no worker holds. Returns the new path, or None when the folder is already gone
    (someone else moved it).
    """
    path = Path(path)
    qdir = path.parent.parent / folder
    qdir.mkdir(parents=True, exist_ok=True)
    n = 1
    while os.path.lexists(qdir / f"{path.name}.{n}") or os.path.lexists(qdir / f"{path.name}.{n}.json"):
        n += 1
    target = qdir / f"{path.name}.{n}"
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return None
    _fsync_dir(path.parent)
    atomic_write_json(
        qdir / f"{path.name}.{n}.json",
        {"run_id": path.name, "reason": reason, "moved_from": str(path), "moved_at": time.time()},
    )
    return target


def set_aside_damaged(run_dirs: Iterable[Path]) -> list[tuple[str, str, Path]]:
    """Move every damaged run among ``run_dirs`` aside (:func:`quarantine_run`), fully verified (``deep``);
    return (run_id, reason, new path) of each. Call before training a grid, never while it trains."""
    moved = []
    for rdir in run_dirs:
        check = check_run(rdir, deep=True)
        if check.status == RunStatus.DAMAGED:
            target = quarantine_run(rdir, check.reason)
            if target is not None:
                moved.append((Path(rdir).name, check.reason, target))
    return moved


def run_notes(path: Path) -> str:
    """What run ``path`` recovered from (``recovery.json``: damaged checkpoints set aside), one line; '' if none."""
    try:
        events = read_json(Path(path) / RECOVERY)
    except (OSError, ValueError):
        return ""
    if not isinstance(events, list) or not events:
        return ""
    last = events[-1] if isinstance(events[-1], dict) else {}
    more = f" ({len(events)} recoveries)" if len(events) > 1 else ""
    return f"recovered{more}: {last.get('reason', '?')} -> {last.get('action', '?')}"


def _config_or_none(rdir: Path) -> dict[str, Any] | None:
    try:
        return _check_config(rdir)
    except (_Damage, OSError):
        return None


def load_grid(path: Path) -> pd.DataFrame:  # pandas imported lazily: SLURM workers never need it
    """:func:`grid_rows` as a pandas frame."""
    import pandas as pd

    return pd.DataFrame(grid_rows(path))


def grid_rows(path: Path) -> list[dict[str, Any]]:
    """One row per run of the grid folder ``path``, finished or not (tidy; pandas-ready).

    Columns: run_id, task, arm, seed, status, one 0/1 column per trick (``trick.<name>``),
    and the flattened ``result.json`` (``metric.*``, ``stability.*``, ``cost.*``). Every run is
    verified first (:func:`check_run`, deep): a damaged run is a row with status ``damaged`` and its
    ``reason``, and no data. ``in_spec``: the run is a cell of the grid as last launched (``grid.yaml``;
    runs of an earlier version of the spec stay in the folder and are False here). ``code``: a short
    digest of the code fingerprint the run trained with; ``stale``: that code differs from today's
    (``stale_parts`` says which part).
    """
    rows = []
    runs = Path(path) / "runs"
    current = _current_run_ids(Path(path))
    staleness: dict[str, list[str]] = {}
    for rdir in sorted(runs.iterdir()) if runs.is_dir() else []:
        check = check_run(rdir, deep=True)
        if check.status == RunStatus.DAMAGED:
            row = {"run_id": rdir.name, "task": None, "arm": None, "seed": None, "status": check.status}
            rows.append(row | {"reason": check.reason})
            continue
        meta = _config_or_none(rdir)
        if meta is None:
            continue
        row: dict[str, Any] = {
            "run_id": meta["run_id"],
            "task": meta["task"],
            "arm": meta["arm"],
            "seed": meta["seed"],
            "tricks_on": "+".join(meta["tricks_on"]),
        }
        for t in meta.get("grid_tricks", meta["tricks_on"]):
            row[f"trick.{t}"] = int(t in meta["tricks_on"])
        row["status"] = check.status
        row["in_spec"] = current is None or meta["run_id"] in current
        row["code"], parts = _code_of(meta.get("fingerprint"), staleness)
        row["stale"], row["stale_parts"] = bool(parts), "; ".join(parts)
        if check.status in RunStatus.FINISHED:
            res = read_json(rdir / RESULT)
            for section in ("metric", "stability", "cost"):
                for k, v in res.get(section, {}).items():
                    row[f"{section}.{k}"] = v
            row["diverged_step"] = res.get("diverged_step")
            row["reason"] = res.get("reason")
        rows.append(row)
    return rows


def _current_run_ids(gdir: Path) -> set[str] | None:
    """Run ids of the grid's stored ``grid.yaml`` (None when it cannot be read: every run counts as in the spec)."""
    from bench.runner import grid_cells

    try:
        return {c.run_id for c in grid_cells(gdir)[1]}
    except (OSError, ValueError):
        return None


def _code_of(fingerprint: Any, cache: dict[str, list[str]]) -> tuple[str, list[str]]:
    """(short digest of a recorded fingerprint, the parts of it that today's code changed)."""
    import hashlib

    from bench.fingerprint import refreshed, stale_parts

    if not isinstance(fingerprint, dict):
        return "", ["all (no fingerprint recorded)"]
    key = json.dumps({k: v for k, v in fingerprint.items() if k != "versions"}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    if digest not in cache:
        try:
            cache[digest] = stale_parts(fingerprint, refreshed(fingerprint))
        except (KeyError, TypeError, OSError):
            cache[digest] = ["all (unreadable fingerprint)"]
    return digest, cache[digest]


def load_curves(path: Path, kind: str = "curve") -> pd.DataFrame:
    """All runs' ``curve.csv`` (kind="curve") or ``train.csv`` (kind="train"), with run columns.

    Damaged runs are left out (:func:`check_run`), and so is an unreadable curve of an unfinished run.
    """
    import pandas as pd

    frames = []
    runs = Path(path) / "runs"
    for rdir in sorted(runs.iterdir()) if runs.is_dir() else []:
        f = rdir / f"{kind}.csv"
        if not f.is_file() or check_run(rdir, deep=True).status == RunStatus.DAMAGED:
            continue
        meta = _config_or_none(rdir)
        if meta is None:
            continue
        try:
            df = pd.read_csv(f)
        except (OSError, ValueError):  # pandas' parser and empty-data errors are ValueErrors
            continue
        df.insert(0, "seed", meta["seed"])
        df.insert(0, "arm", meta["arm"])
        df.insert(0, "task", meta["task"])
        df.insert(0, "run_id", meta["run_id"])
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_summary(path: Path) -> list[dict[str, Any]]:
    """Rewrite ``summary.csv`` beside the runs from what is stored (:func:`grid_rows`); return the rows.

    Written with :mod:`csv`, not pandas (whose import is ~0.3 CPU-s of every launch): columns in order of
    first appearance, a missing value empty, floats as ``repr`` (exact) — what ``pandas.read_csv`` reads
    back as :func:`load_grid`'s frame.
    """
    rows = grid_rows(path)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_csv_cell(row.get(c)) for c in columns] for row in rows)
    atomic_write_text(Path(path) / "summary.csv", buf.getvalue())
    return rows


def _csv_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)
