"""How the local pool's workers start, as the environment may force it (torch-free: ``bench run`` checks it
before anything is written, and before a bad spec would import torch)."""

from __future__ import annotations

import os

__all__ = ["WORKER_START_ENV", "worker_start_override"]

WORKER_START_ENV = "TRICKBENCH_WORKER_START"  # fork | spawn (default: bench.executors.local.start_method)


def worker_start_override() -> str | None:
    """``$TRICKBENCH_WORKER_START`` (fork or spawn), None when unset; ``ValueError`` naming it when it is neither."""
    forced = os.environ.get(WORKER_START_ENV, "")
    if forced and forced not in ("fork", "spawn"):
        raise ValueError(f"${WORKER_START_ENV}: {forced!r} is not allowed; allowed: fork, spawn")
    return forced or None
