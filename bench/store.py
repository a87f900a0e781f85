"""The result store: one folder per run, atomic writes, and loading a grid into pandas.

Layout (see DESIGN.md)::

    <results>/<grid>/grid.yaml                  resolved spec as launched
    <results>/<grid>/runs/<run_id>/config.json  resolved config, code version, seed bundle
    <results>/<grid>/runs/<run_id>/curve.csv    evaluation metrics by samples seen
    <results>/<grid>/runs/<run_id>/train.csv    per-step train loss, gradient norm, lr
    <results>/<grid>/runs/<run_id>/checkpoint.pt  latest valid checkpoint (atomic replace)
    <results>/<grid>/runs/<run_id>/result.json  final metrics, status, timings — written last
    <results>/<grid>/runs/<run_id>/error.json   a crash (traceback tail); the run is re-run on re-launch
    <results>/<grid>/summary.csv                one row per run (rewritten by `bench report`)

Every file is written to a temporary name in the same folder and renamed into place, so a
reader (or a re-launch after a kill) never sees a partial file. Each run folder is written
by exactly one worker, so no locks or database are needed, even for hundreds of SLURM
array tasks on a shared filesystem. Folder names are run ids (hex), never user strings.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "RunStatus",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "grid_dir",
    "load_curves",
    "load_grid",
    "read_json",
    "run_dir",
    "run_status",
    "write_summary",
]

RESULT, ERROR, CHECKPOINT, CONFIG = "result.json", "error.json", "checkpoint.pt", "config.json"


class RunStatus:
    """On-disk states of a run (derived from which files exist, never stored separately)."""

    COMPLETED = "completed"  # result.json, trained the whole budget
    DIVERGED = "diverged"  # result.json, non-finite loss at some step
    INCOMPLETE = "incomplete"  # result.json, given up (e.g. requeue limit) with a reason
    FAILED = "failed"  # error.json: crashed; re-run on re-launch
    PARTIAL = "partial"  # checkpoint.pt only: resumed on re-launch
    PENDING = "pending"  # nothing yet
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


def run_status(path: Path) -> str:
    """The status of the run stored in folder ``path`` (see :class:`RunStatus`)."""
    if (path / RESULT).exists():
        return read_json(path / RESULT)["status"]
    if (path / ERROR).exists():
        return RunStatus.FAILED
    if (path / CHECKPOINT).exists():
        return RunStatus.PARTIAL
    return RunStatus.PENDING


def load_grid(path: Path) -> pd.DataFrame:  # pandas imported lazily: SLURM workers never need it
    """One row per run of the grid folder ``path``, finished or not (tidy; pandas-ready).

    Columns: run_id, task, arm, seed, status, one 0/1 column per trick (``trick.<name>``),
    and the flattened ``result.json`` (``metric.*``, ``stability.*``, ``cost.*``).
    """
    rows = []
    runs = Path(path) / "runs"
    for rdir in sorted(runs.iterdir()) if runs.is_dir() else []:
        if not (rdir / CONFIG).exists():
            continue
        meta = read_json(rdir / CONFIG)
        row: dict[str, Any] = {
            "run_id": meta["run_id"],
            "task": meta["task"],
            "arm": meta["arm"],
            "seed": meta["seed"],
            "tricks_on": "+".join(meta["tricks_on"]),
        }
        for t in meta.get("grid_tricks", meta["tricks_on"]):
            row[f"trick.{t}"] = int(t in meta["tricks_on"])
        row["status"] = run_status(rdir)
        if (rdir / RESULT).exists():
            res = read_json(rdir / RESULT)
            for section in ("metric", "stability", "cost"):
                for k, v in res.get(section, {}).items():
                    row[f"{section}.{k}"] = v
            row["diverged_step"] = res.get("diverged_step")
            row["reason"] = res.get("reason")
        rows.append(row)
    import pandas as pd

    return pd.DataFrame(rows)


def load_curves(path: Path, kind: str = "curve") -> pd.DataFrame:
    """All runs' ``curve.csv`` (kind="curve") or ``train.csv`` (kind="train"), with run columns."""
    import pandas as pd

    frames = []
    runs = Path(path) / "runs"
    for rdir in sorted(runs.iterdir()) if runs.is_dir() else []:
        f = rdir / f"{kind}.csv"
        if not f.exists() or not (rdir / CONFIG).exists():
            continue
        meta = read_json(rdir / CONFIG)
        df = pd.read_csv(f)
        df.insert(0, "seed", meta["seed"])
        df.insert(0, "arm", meta["arm"])
        df.insert(0, "task", meta["task"])
        df.insert(0, "run_id", meta["run_id"])
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def write_summary(path: Path) -> pd.DataFrame:
    """Rewrite ``summary.csv`` beside the runs from what is stored; return the frame."""
    df = load_grid(path)
    atomic_write_text(Path(path) / "summary.csv", df.to_csv(index=False))
    return df
