"""The task registry: name -> :class:`~experiments.base.Task` subclass, built-in and plugin tasks alike.

Sources, read once per process on first use: the built-in modules of :data:`BUILTIN_TASKS`,
entry points of group ``trickbench.tasks`` (``my_task = "my_pkg.task:MyTask"``; the object may be
a Task subclass or a module with ``TASK``), and :func:`register_task` for code that imports
trickbench directly. Names resolve only through this table — never a module or file path from a
spec. A plugin that fails to load is an error naming its distribution and entry point.
"""

from __future__ import annotations

from importlib import import_module

from experiments.base import Task
from tricks.card import did_you_mean
from tricks.plugins import PluginError, entry_point_objects, forget_registration, record_registration

__all__ = ["BUILTIN_TASKS", "available_tasks", "get_task", "origin", "register_task", "task_names"]

# name -> module (fixed here; never a path taken from a spec)
BUILTIN_TASKS = {
    "cifar_autoencoder": "experiments.cifar_autoencoder",
    "toy_diffusion": "experiments.toy_diffusion",
    "rl_policy": "experiments.rl_policy",
}
ENTRY_POINT_GROUP = "trickbench.tasks"

_plugins: dict[str, type[Task]] | None = None  # entry points and register_task, loaded on first use
_origin: dict[str, str] = {}


def _task_of(obj: object, where: str) -> type[Task]:
    cls = getattr(obj, "TASK", obj)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise PluginError(f"{where}: {obj!r} is not a Task subclass or a module with TASK")
    if not isinstance(getattr(cls, "name", None), str):
        raise PluginError(f"{where}: task class {cls.__qualname__} has no name")
    return cls


def _plugin_table() -> dict[str, type[Task]]:
    global _plugins
    if _plugins is None:
        table: dict[str, type[Task]] = {}
        for where, obj in entry_point_objects(ENTRY_POINT_GROUP):
            cls = _task_of(obj, where)
            _check_new(table, cls, where)
            table[cls.name] = cls
            _origin[cls.name] = where
        _plugins = table
    return _plugins


def _check_new(table: dict[str, type[Task]], cls: type[Task], where: str) -> None:
    if cls.name in BUILTIN_TASKS:
        raise PluginError(f"{where}: task name {cls.name!r} is a built-in task's name")
    if cls.name in table and table[cls.name] is not cls:
        raise PluginError(f"duplicate task name {cls.name!r}: from {where} and from {_origin[cls.name]}")


def task_names() -> tuple[str, ...]:
    """Every registered task name: the built-ins, then plugins in registration order."""
    return (*BUILTIN_TASKS, *_plugin_table())


def get_task(name: str) -> type[Task]:
    """The Task class registered as ``name``; ``KeyError`` with the known names and a did-you-mean otherwise."""
    if name in BUILTIN_TASKS:
        return import_module(BUILTIN_TASKS[name]).TASK
    table = _plugin_table()
    if name not in table:
        known = task_names()
        hint = did_you_mean(name, known)
        raise KeyError(f"unknown task {name!r}; known: {', '.join(known)}" + (f" ({hint})" if hint else ""))
    return table[name]


def origin(name: str) -> str:
    """Where task ``name`` came from: its built-in module, the entry point and distribution, or ``register_task``."""
    if name in BUILTIN_TASKS:
        return BUILTIN_TASKS[name]
    get_task(name)
    return _origin[name]


def available_tasks() -> dict[str, type[Task]]:
    """Every registered task, by name (an import error in a task module is raised, not hidden)."""
    return {name: get_task(name) for name in task_names()}


def register_task(cls: type[Task]) -> type[Task]:
    """Register task class ``cls`` in this process (and in the workers executors start from it).

    Usable as a class decorator. For tasks defined in code that imports trickbench directly; a
    distribution should use the ``trickbench.tasks`` entry point. The class must be importable
    from its module (``cls.__module__``) so worker processes can repeat the registration.
    """
    cls = _task_of(cls, "register_task")
    table = _plugin_table()
    _check_new(table, cls, f"register_task({cls.__module__}.{cls.__qualname__})")
    table[cls.name] = cls
    _origin[cls.name] = "register_task"
    record_registration("task", cls)
    return cls


def unregister_task(name: str) -> None:
    """Remove a task added by :func:`register_task` (tests); built-ins cannot be removed."""
    if name in BUILTIN_TASKS:
        raise ValueError(f"task {name!r} is built in")
    cls = _plugin_table().pop(name, None)
    if cls is not None:
        forget_registration("task", cls)
