"""What one worker does for one cell, whatever the executor: write config, train, record.

The same function runs inside a local pool process, in-process for ``debug``, and in a
SLURM array task; it reads everything it needs from disk and the cell (never from state
pickled at an earlier submission), so any of them can resume a run another one started.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench import store
from bench.grid import Cell
from bench.loop import RunContext, train_cell, write_config


def run_one(cell: Cell, results_root: Path, ctx: RunContext, grid_tricks: list[str]) -> dict[str, Any]:
    """Train ``cell`` into its run folder unless it already finished; return its status dict."""
    out = store.run_dir(results_root, cell.grid, cell.run_id)
    status = store.run_status(out)
    if status in store.RunStatus.FINISHED:
        return {"status": status, "skipped": True}
    out.mkdir(parents=True, exist_ok=True)
    if not (out / store.CONFIG).exists():
        write_config(cell, out, ctx.code_version, grid_tricks)
    return train_cell(cell, out, ctx)
