"""Code registrations in worker processes: repeat the ``register_task``/``register_trick`` calls of the launch.

When to call: :func:`replay_registrations` once at the start of every worker process (a local pool's
spawned worker, a SLURM array task) before it trains — ``bench.executors.worker.register_extra_tasks``
does. Entry-point plugins need nothing: every process of the environment sees them.

A launching process that registered a task or trick in code exported the records
(``tricks.plugins.record_registration`` → ``$TRICKBENCH_REGISTRATIONS``): for each, the worker imports
the module that registered and registers the same object again. A script's ``__main__`` is found as
the module ``__mp_main__`` that multiprocessing's spawn re-imports in every worker; a notebook's cannot
be, nor a script's in a SLURM task — that is a :class:`~tricks.plugins.PluginError` naming the task or
trick and what to do (put it in an importable module, or a plugin distribution).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib import import_module
from typing import Any

from tricks.plugins import PluginError, exported_registrations

__all__ = ["replay_registrations"]


def _module(name: str) -> Any:
    if name == "__main__":
        if "__mp_main__" in sys.modules:  # the launching script, re-imported by multiprocessing's spawn
            return sys.modules["__mp_main__"]
        return None
    return import_module(name)


def replay_registrations(env: Mapping[str, str] | None = None) -> list[str]:
    """Register in this process what the launching process registered in code; returns the names.

    Already registered (the same object): nothing to do. ``PluginError`` naming the task or trick when
    its object cannot be found here.
    """
    from experiments.registry import get_task, register_task, task_names
    from tricks.card import TrickCard
    from tricks.registry import cards, register_trick

    done = []
    for kind, module_name, attr, name in exported_registrations(env):
        mod = _module(module_name)
        obj = None
        if mod is not None and attr:
            obj = mod
            for part in attr.split("."):
                obj = getattr(obj, part, None)
        if obj is None and mod is not None and kind == "trick":  # e.g. CARD = register_trick(TrickCard(...))
            obj = next((v for v in vars(mod).values() if isinstance(v, TrickCard) and v.name == name), None)
        if obj is None:
            raise PluginError(
                f"{kind} {name!r} was registered in code (register_{kind}, module {module_name}) and cannot be "
                "re-created in this worker process; define it in an importable module (or install it as a plugin "
                "distribution with a trickbench entry point), or train with --executor debug"
            )
        if kind == "task":
            if name in task_names() and get_task(name) is obj:
                continue
            register_task(obj)
        else:
            if cards().get(name) is obj:
                continue
            register_trick(obj)
        done.append(name)
    return done
