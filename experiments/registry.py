"""Task registry: task name -> Task class. Names resolve only through this table."""

from __future__ import annotations

from importlib import import_module

from experiments.base import Task
from tricks.card import did_you_mean

# name -> module (fixed here; never a path taken from a spec)
_TASK_MODULES = {
    "cifar_autoencoder": "experiments.cifar_autoencoder",
    "toy_diffusion": "experiments.toy_diffusion",
    "rl_policy": "experiments.rl_policy",
}
TASK_NAMES = tuple(_TASK_MODULES)


def get_task(name: str) -> type[Task]:
    """The Task class registered as ``name``; ``KeyError`` with a did-you-mean otherwise."""
    if name not in _TASK_MODULES:
        hint = did_you_mean(name, TASK_NAMES)
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}" + (f" ({hint})" if hint else ""))
    return import_module(_TASK_MODULES[name]).TASK


def available_tasks() -> dict[str, type[Task]]:
    """Every registered task, by name (an import error in a task module is raised, not hidden)."""
    return {name: get_task(name) for name in TASK_NAMES}
