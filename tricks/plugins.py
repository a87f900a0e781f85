"""Plugin loading shared by the trick and task registries.

Entry points (``importlib.metadata``) are how an installed distribution adds tricks and tasks:
they are visible in every Python process of the environment, so pool workers, SLURM array
tasks and ``bench report`` see the same registry as the launching process, with no
environment variable. :func:`register_trick` / ``register_task`` cover code that imports
trickbench directly; :func:`registrations` lists what was registered that way, and
:func:`record_registration` exports the list to the processes this one starts (a local pool's
spawned workers, SLURM tasks), where ``bench.plugins.replay_registrations`` repeats it by importing
the module that registered — module names come from code, never from a spec.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from importlib import metadata
from typing import Any

__all__ = [
    "REGISTRATIONS_ENV",
    "PluginError",
    "entry_point_objects",
    "exported_registrations",
    "forget_registration",
    "record_registration",
    "registrations",
]


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


#: the environment variable through which code registrations reach worker processes: a local pool's
#: spawned workers inherit the launching process's environment, and sbatch exports it to SLURM tasks
REGISTRATIONS_ENV = "TRICKBENCH_REGISTRATIONS"

_RECORDS: list[tuple[str, str, str | None, str]] = []  # (kind, module, attribute, name) in registration order


def _export() -> None:
    if _RECORDS:
        os.environ[REGISTRATIONS_ENV] = json.dumps(_RECORDS)
    else:
        os.environ.pop(REGISTRATIONS_ENV, None)


def record_registration(kind: str, obj: Any, depth: int = 2) -> None:
    """Remember that ``obj`` (a trick card or a task class) was registered by code, for worker processes.

    Recorded as ``(kind, module, attribute, name)`` and exported in ``$TRICKBENCH_REGISTRATIONS`` (JSON),
    which processes started from this one inherit; ``bench.plugins.replay_registrations`` repeats them there.
    """
    if kind == "task":
        module, attr, name = obj.__module__, obj.__qualname__, obj.name
    else:  # a card instance: the module that called register_trick, and the card's name there if it has one
        frame = sys._getframe(depth)
        module = frame.f_globals.get("__name__", "__main__")
        attr = next((k for k, v in frame.f_globals.items() if v is obj), None)
        name = obj.name
    record = (kind, module, attr, name)
    if record not in _RECORDS:
        _RECORDS.append(record)
        _export()


def forget_registration(kind: str, name: str) -> None:
    """Drop the records of ``kind`` named ``name`` (an unregistered task), here and in the exported list."""
    _RECORDS[:] = [r for r in _RECORDS if not (r[0] == kind and r[3] == name)]
    _export()


def registrations() -> list[tuple[str, str, str | None, str]]:
    """What :func:`record_registration` recorded: ``(kind, module, attribute, name)``, picklable, for workers."""
    return list(_RECORDS)


def exported_registrations(env: Mapping[str, str] | None = None) -> list[tuple[str, str, str | None, str]]:
    """The records a launching process exported in ``$TRICKBENCH_REGISTRATIONS`` (``[]`` when none)."""
    text = (os.environ if env is None else env).get(REGISTRATIONS_ENV, "")
    if not text:
        return []
    try:
        records = [tuple(r) for r in json.loads(text)]
    except (ValueError, TypeError) as exc:
        raise PluginError(f"${REGISTRATIONS_ENV}: not the JSON list trickbench writes ({exc})") from None
    if not all(len(r) == 4 and r[0] in ("trick", "task") for r in records):
        raise PluginError(f"${REGISTRATIONS_ENV}: not the JSON list trickbench writes")
    return records  # type: ignore[return-value]
