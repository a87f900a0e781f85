"""Repeating in-process plugin registrations in worker processes.

Tricks and tasks of installed distributions come from entry points, which every process sees.
Those registered by code that imports trickbench directly (``register_trick`` / ``register_task``
in a notebook or a launcher script) exist only in the launching process; an executor passes
:func:`tricks.plugins.registrations` to its workers (pool processes, SLURM array tasks), which call
:func:`replay_registrations` before training. Only module names recorded from code travel —
never a path from a spec.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from importlib import import_module
from typing import Any

from tricks.plugins import PluginError

__all__ = ["replay_registrations"]


def replay_registrations(records: Iterable[tuple[str, str, str | None]]) -> None:
    """Register again, in this process, what the launching process registered by code.

    Imports each recorded module; when the registered object is a module attribute it is registered
    again (registering the same object twice is a no-op). ``__main__``: a spawned worker re-imports the
    launcher's script as ``__mp_main__`` and registers what it finds there; a SLURM task cannot (nothing
    to do there: register from a module).
    """
    from experiments.registry import register_task
    from tricks.registry import register_trick

    for kind, module, attr in records:
        if module in ("__main__", "__mp_main__"):
            # a spawned worker re-imports the launching script as __mp_main__: its classes and cards are there,
            # also when the script registered them under `if __name__ == "__main__":` (which did not run here)
            obj = sys.modules.get("__mp_main__")
            for part in (attr or "").split(".") if attr and obj is not None else ():
                obj = getattr(obj, part, None)
            if obj is not None and attr:
                (register_task if kind == "task" else register_trick)(obj)
            continue
        try:
            obj: Any = import_module(module)
            for part in (attr or "").split(".") if attr else ():
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise PluginError(
                f"the launching process registered {kind} {module}:{attr or ''}, which this worker cannot import "
                f"({type(exc).__name__}: {exc}); register from an importable module or install it with an entry point"
            ) from exc
        if attr is None:
            continue  # registered when the module was imported, above
        if kind == "task":
            register_task(obj)
        else:
            register_trick(obj)
