"""Code fingerprints: a content hash of the code a run's numbers depend on, so stale results are never reused.

A run's fingerprint has one digest per part:

- ``loop``: the modules of :data:`LOOP_MODULES` (the training loop and what it computes with — seeds,
  gradient buffer, stability metrics, the task/trick contracts, the default BN recalibration);
- ``task``: the task's module and every first-party module it imports, transitively;
- ``tricks``: per trick that is on, the module of its card's ``build`` and its first-party imports.

"First-party" is trickbench's own packages plus the plugin package a task or trick comes from.
Imports are followed statically (each import statement that begins a line is parsed with :mod:`ast`,
nothing is imported), so computing a fingerprint never imports torch, and reading a finished grid's
fingerprints is cheap. A digest hashes module names and file contents: a comment change counts —
the conservative choice for a tool whose job includes regression-checking implementations.

``config.json`` of each run records the fingerprint its worker computed before training
(:func:`run_fingerprint`); :func:`stale_parts` compares it with the current code. ``bench run``
reports stale runs and does not mix them in silently; ``bench run --rerun-stale`` retrains them.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

__all__ = ["LOOP_MODULES", "module_closure", "modules_digest", "refreshed", "run_fingerprint", "stale_parts"]

FIRST_PARTY = ("bench", "tricks", "experiments")
#: the modules every run's numbers depend on besides its task and tricks
LOOP_MODULES = (
    "bench.loop",
    "bench.gradbuffer",
    "bench.seeds",
    "bench.stability",
    "experiments.base",
    "tricks.card",
    "tricks.binding",
    "tricks.accumulation",  # the loss scaling the loop applies itself
    "tricks.precise_bn",  # the default BN recalibration of averaged weights
)


def _origin(module: str) -> str | None:
    """The source file of ``module``: the one this process imported, else found without importing it;
    None for a namespace or unknown module. Not cached: ``sys.path`` may change within a process."""
    loaded = sys.modules.get(module)
    origin = getattr(loaded, "__file__", None) if loaded is not None else None
    if origin is None:
        origin = _find_origin(module)
    return origin if origin and origin.endswith(".py") else None


def _find_origin(module: str) -> str | None:
    """The source file of ``module`` found without executing any package: ``importlib.util.find_spec`` of
    ``a.b.c`` imports ``a.b`` (and a name like ``experiments.base.Task`` would import torch), so only the
    top-level package is looked up that way and the rest is searched in its folders."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    for part in rest:
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
    return spec.origin if spec is not None else None


_IMPORT_LINE = re.compile(r"^[ \t]*(?:from[ \t]+[.\w]+[ \t]+import\b|import[ \t]+\w)")


def _import_statements(source: str) -> Iterator[str]:
    """The source of every import statement that begins a line (top level or indented, with its
    parenthesised or backslash continuation lines), dedented: what :func:`_imports` parses instead of the
    whole module (~20× faster; a fingerprint is computed at every launch). A docstring line that reads like
    an import is parsed too and, unless it is valid Python, skipped: at worst a module more is hashed."""
    lines = source.splitlines()
    i = 0
    while i < len(lines):
        if _IMPORT_LINE.match(lines[i]):
            statement = [lines[i].strip()]
            depth = lines[i].count("(") - lines[i].count(")")
            while (depth > 0 or statement[-1].endswith("\\")) and i + 1 < len(lines):
                i += 1
                statement.append(lines[i].strip())
                depth += lines[i].count("(") - lines[i].count(")")
            yield "\n".join(statement)
        i += 1


def _imports(module: str, path: str) -> set[str]:
    """Absolute names of the modules ``module``'s source imports (top-level and inside functions)."""
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    names: set[str] = set()
    for statement in _import_statements(Path(path).read_text(encoding="utf-8")):
        try:
            nodes = ast.parse(statement).body
        except SyntaxError:  # prose in a docstring, or a line-start pattern this scan does not join
            continue
        for node in nodes:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x / from ..pkg import y
                    parts = package.split(".")
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names.add(base)
                names.update(f"{base}.{alias.name}" for alias in node.names)  # submodules imported by name
    return {n for n in names if n}


@cache
def module_closure(module: str, packages: tuple[str, ...] = FIRST_PARTY) -> frozenset[str]:
    """``module`` and every module of ``packages`` it imports, transitively (statically; nothing imported)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] not in packages:
            continue
        path = _origin(name)
        if path is None:
            continue
        seen.add(name)
        todo.extend(_imports(name, path) - seen)
    return frozenset(seen)


def modules_digest(modules: Iterable[str]) -> str:
    """16 hex digits of SHA-256 over the names and source bytes of ``modules`` (sorted).

    Remembered while every file's size and modification time stay the same (a worker fingerprints every run it
    trains: the same ~70 files each time).
    """
    names = sorted(modules)
    paths = [_origin(name) for name in names]
    key = tuple((name, path, *_stat(path)) for name, path in zip(names, paths))
    if key not in _DIGESTS:
        h = hashlib.sha256()
        for name, path in zip(names, paths):
            h.update(name.encode() + b"\0")
            h.update(Path(path).read_bytes() if path else b"<no source>")
            h.update(b"\0")
        _DIGESTS[key] = h.hexdigest()[:16]
    return _DIGESTS[key]


_DIGESTS: dict[tuple[Any, ...], str] = {}


def _stat(path: str | None) -> tuple[int, int]:
    if path is None:
        return (0, 0)
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size)


def _part_digest(module: str) -> str:
    packages = tuple(dict.fromkeys((*FIRST_PARTY, module.split(".")[0])))
    return modules_digest(module_closure(module, packages))


def task_module(task: str) -> str:
    """The module that defines registered task ``task`` (imports the registry's entry, not its module source)."""
    from experiments.registry import BUILTIN_TASKS, get_task

    return BUILTIN_TASKS.get(task) or get_task(task).__module__


def trick_module(trick: str) -> str:
    """The module whose ``build`` turns trick ``trick``'s settings into behaviour."""
    from tricks.registry import get_card

    return get_card(trick).build.__module__


def _loop_digest() -> str:
    return modules_digest(m for name in LOOP_MODULES for m in module_closure(name))


def _part(module: str) -> dict[str, str]:
    return {"module": module, "digest": _part_digest(module)}


def run_fingerprint(config: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of the code a run of resolved ``config`` trains with (in this process, now).

    ``{"loop": digest, "task": {"module", "digest"}, "tricks": {name: {"module", "digest"}}, "versions"}``;
    finding a trick's module imports the trick registry.
    """
    return {
        "loop": _loop_digest(),
        "task": _part(task_module(config["task"])),
        "tricks": {name: _part(trick_module(name)) for name in sorted(config["tricks"])},
        "versions": _versions(),
    }


def refreshed(recorded: Mapping[str, Any]) -> dict[str, Any]:
    """``recorded`` with every digest recomputed from today's sources of the same modules.

    Imports nothing (no registry, no torch): what ``bench status`` and ``bench report`` use to say
    whether finished runs were trained by the code that is here now.
    """
    return {
        "loop": _loop_digest(),
        "task": _part(recorded["task"]["module"]),
        "tricks": {name: _part(part["module"]) for name, part in (recorded.get("tricks") or {}).items()},
    }


@lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("trickbench", "torch"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def stale_parts(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """The parts whose code changed since ``recorded`` was taken (``loop``, ``task``, ``trick <name>``).

    A run recorded without a fingerprint (made before fingerprints existed) is stale as a whole.
    Package versions are provenance, not staleness: a different torch moves last bits (``bench check``
    judges those with its platform tolerances).
    """
    if not recorded or "task" not in recorded or not isinstance(recorded.get("task"), Mapping):
        return ["all (no fingerprint recorded)"]
    parts = [p for p in ("loop", "task") if recorded.get(p) != current.get(p)]
    old, new = recorded.get("tricks") or {}, current.get("tricks") or {}
    parts += [f"trick {n}" for n in sorted(set(old) | set(new)) if old.get(n) != new.get(n)]
    return parts


def clear_cache() -> None:
    """Forget cached module sources (call after editing code in the same process, e.g. in tests)."""
    module_closure.cache_clear()
    _DIGESTS.clear()
