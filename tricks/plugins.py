"""Plugin loading shared by the trick and task registries.

Entry points (``importlib.metadata``) are how an installed distribution adds tricks and tasks:
they are visible in every Python process of the environment, so pool workers, SLURM array
tasks and ``bench report`` see the same registry as the launching process, with no
environment variable. :func:`register_trick` / ``register_task`` cover code that imports
trickbench directly; :func:`registrations` lists what was registered that way so an executor
can repeat it in its worker processes (``bench.plugins.replay_registrations``), by importing the
module that registered — module names come from code, never from a spec.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

__all__ = ["PluginError", "entry_point_objects", "forget_registration", "record_registration", "registrations"]


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered; the message names the distribution and entry point."""


def entry_point_objects(group: str) -> list[tuple[str, Any]]:
    """``(where, object)`` for every entry point of ``group``, loaded; :class:`PluginError` on failure.

    ``where`` reads ``entry point 'name = module:attr' of distribution 'dist'``. The same entry
    point seen twice (two metadata copies of one distribution on ``sys.path``) is loaded once.
    """
    out = []
    seen: set[tuple[str, str]] = set()
    for ep in sorted(metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
        if (ep.name, ep.value) in seen:
            continue
        seen.add((ep.name, ep.value))
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an unknown distribution"
        where = f"entry point '{ep.name} = {ep.value}' (group {group}) of distribution '{dist}'"
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin: name it, never skip it
            raise PluginError(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
        out.append((where, obj))
    return out


_RECORDS: list[tuple[str, str, str | None]] = []  # (kind, module, attribute) in registration order


def record_registration(kind: str, obj: Any, depth: int = 2) -> None:
    """Remember that ``obj`` (a trick card or a task class) was registered by code, for worker processes."""
    if kind == "task":
        module, attr = obj.__module__, obj.__qualname__
    else:  # a card instance: the module that called register_trick, and the card's name there if it has one
        frame = sys._getframe(depth)
        module = frame.f_globals.get("__name__", "__main__")
        attr = next((k for k, v in frame.f_globals.items() if v is obj), None)
    record = (kind, module, attr)
    if record not in _RECORDS:
        _RECORDS.append(record)


def forget_registration(kind: str, obj: Any) -> None:
    """Drop the record of a registration that was undone (``unregister_task`` / ``unregister_trick``)."""
    if kind == "task":
        _RECORDS[:] = [r for r in _RECORDS if r != (kind, obj.__module__, obj.__qualname__)]
    else:
        _RECORDS[:] = [r for r in _RECORDS if not (r[0] == kind and r[2] is not None and _names(r, obj))]


def _names(record: tuple[str, str, str | None], card: Any) -> bool:
    import sys

    module = sys.modules.get(record[1])
    return module is not None and getattr(module, record[2] or "", None) is card


def registrations() -> list[tuple[str, str, str | None]]:
    """What :func:`record_registration` recorded: ``(kind, module, attribute)``, picklable, for workers."""
    return list(_RECORDS)
