"""Reading a grid spec file safely: size, YAML and structure limits, checked before anything is built.

Call :func:`load_yaml` to read a spec file into plain Python data, then :func:`check_limits` on that data
(``bench.spec.parse_spec`` does both before it imports a task or trick registry). Neither imports torch,
neither writes anything; both answer a hostile spec within milliseconds and with bounded memory:

- the file: a regular file of at most :data:`MAX_SPEC_BYTES`, UTF-8, one YAML document;
- YAML: no anchors or aliases (a "billion laughs" alias bomb is refused before anything is expanded),
  nesting at most :data:`MAX_DEPTH` deep, at most :data:`MAX_NODES` values, no duplicate keys, every key a
  string, no code (``yaml.safe_load`` semantics: ``!!python/...`` tags are refused);
- the data: names (the grid, mapping keys, trick names in the list form) of letters, digits, ``_ - .`` only
  (no control characters, no trailing newline, no path separators), strings without control characters,
  integers that fit 64 bits, sample counts (``*_samples``) at most :data:`MAX_SAMPLES`, at most
  :data:`MAX_SEEDS` seeds in either form, no seed or trick listed twice, and a planned number of runs — counted
  arithmetically, arms × seeds, never by expanding the grid — at most the caller's ``max_runs``
  (:data:`DEFAULT_MAX_RUNS` for ``bench run``; raise it with ``--max-runs``).

Every problem names the field (``tasks.toy_diffusion.train.budget_samples``), the value (shortened) and
what is allowed, in a :class:`SpecError`.
"""

from __future__ import annotations

import math
import re
import stat
import unicodedata
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_MAX_RUNS",
    "MAX_DEPTH",
    "MAX_NODES",
    "MAX_RUNS_CEILING",
    "MAX_SAMPLES",
    "MAX_SEEDS",
    "MAX_SPEC_BYTES",
    "SpecError",
    "check_limits",
    "grid_name_problem",
    "load_yaml",
    "planned_runs",
    "short_repr",
]

MAX_SPEC_BYTES = 1 << 20  # a grid spec is a page of YAML; the shipped ones are < 2 KiB
MAX_DEPTH = 20  # nesting of mappings/sequences; a spec needs ~7 (tasks.<label>.tricks.<trick>.<param>)
MAX_NODES = 20_000  # scalars + collections in the whole document (1000 seeds are 1000 nodes)
MAX_SEEDS = 1000  # seeds of a grid, integer or list form
MAX_SAMPLES = 10**10  # any ``*_samples`` setting (budgets, intervals, half-lives)
DEFAULT_MAX_RUNS = 10_000  # runs one `bench run` may plan unless --max-runs raises it
MAX_RUNS_CEILING = 1_000_000  # the most --max-runs can allow (and what a stored grid.yaml may hold)
MAX_STRING_CHARS = 1000  # any string but ``description``
MAX_DESCRIPTION_CHARS = 100_000
INT64_MAX = 2**63 - 1
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")
GRID_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")  # \Z, not $: a trailing newline is not part of a name
NAME_RULE = "a name of letters, digits, '_', '-', '.' (1-64 characters; no spaces, control characters or '/')"
FREE_TEXT_KEYS = ("description",)  # strings that may hold newlines and tabs


class SpecError(ValueError):
    """A grid spec is invalid. ``problems`` lists every problem found (field: value; allowed)."""

    def __init__(self, problems: list[str], source: str = "spec") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid grid {source} ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters (a hostile value never floods a message)."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 20:
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**40:
        return f"<integer of {len(str(abs(value))) if abs(value) < 10**4000 else 'over 4000'} digits>"
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # a deeply nested value; an int past Python's digit limit
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the file and its YAML -------------------------------------------------------------------------------

_BASE_LOADER: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: fast, no recursion


class _SpecLoader(_BASE_LOADER):  # type: ignore[misc, valid-type]
    """Safe loader that rejects duplicate keys and keys that are not strings (lists, mappings, numbers)."""


def _construct_mapping(loader: _SpecLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    out: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)  # deep: a list key is shown filled in
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            kind = type(key).__name__
            hint = " — YAML reads yes/no/on/off as true/false; quote the key" if isinstance(key, bool) else ""
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"mapping key {short_repr(key)} (a {kind}, line {line}) is not allowed; allowed: a name{hint}",
                key_node.start_mark,
            )
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=deep)
    return out


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_spec_text(path: str | Path) -> str:
    """The text of spec file ``path``: a regular UTF-8 file of at most :data:`MAX_SPEC_BYTES`; else SpecError."""
    path = Path(path)
    source = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise SpecError([f"spec file {source!r} does not exist (give a path to a .yaml grid spec)"], source) from None
    except OSError as exc:
        raise SpecError([f"spec file {source!r} cannot be read: {exc.strerror or exc}"], source) from None
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise SpecError([f"spec file {source!r} is {what}; allowed: a .yaml grid spec file"], source)
    too_big = f"bytes; allowed: at most {MAX_SPEC_BYTES} bytes (a grid spec is a page of YAML)"
    if st.st_size > MAX_SPEC_BYTES:
        raise SpecError([f"spec file: {st.st_size} {too_big}"], source)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise SpecError([f"spec file {source!r} cannot be read: {exc.strerror or exc}"], source) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError([f"spec file: more than {MAX_SPEC_BYTES} {too_big}"], source)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([f"spec file: not UTF-8 text (byte {exc.start}); allowed: a UTF-8 YAML file"], source) from None


def _check_events(text: str, source: str) -> None:
    """Stream the YAML events once: refuse anchors, aliases, deep nesting and too many values before any
    node is built (so neither an alias bomb nor 50,000 nested brackets costs memory or recursion)."""
    depth = nodes = documents = 0
    for event in yaml.parse(text, Loader=_BASE_LOADER):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.AliasEvent):
            raise SpecError(
                [
                    f"line {line}: YAML alias *{event.anchor} is not allowed; allowed: plain data without anchors "
                    "(&name) and aliases (*name) — write each value out"
                ],
                source,
            )
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            raise SpecError(
                [
                    f"line {line}: YAML anchor &{event.anchor} is not allowed; allowed: plain data without anchors "
                    "(&name) and aliases (*name) — write each value out"
                ],
                source,
            )
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise SpecError([f"line {line}: a second YAML document; allowed: one document per spec"], source)
        if isinstance(event, yaml.NodeEvent):
            nodes += 1
            if nodes > MAX_NODES:
                raise SpecError(
                    [f"line {line}: more than {MAX_NODES} values; allowed: at most {MAX_NODES} in a spec"], source
                )
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(
                    [f"line {line}: nested more than {MAX_DEPTH} levels deep; allowed: at most {MAX_DEPTH} levels"],
                    source,
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def load_yaml(path: str | Path) -> Any:
    """Read spec file ``path`` into plain data within the file and YAML limits; ``SpecError`` otherwise.

    Call before anything else looks at a spec; it imports nothing heavy and writes nothing.
    """
    source = str(path)
    text = read_spec_text(path)
    try:
        _check_events(text, source)
        return yaml.load(text, Loader=_SpecLoader)  # a safe loader (no tags that build objects)
    except SpecError:
        raise
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):  # libyaml's own cap, met while scanning ahead of our depth check
            raise SpecError([f"not valid YAML: nested too deep; allowed: at most {MAX_DEPTH} levels"], source) from None
        raise SpecError([f"not valid YAML: {exc}"], source) from None
    except (ValueError, OverflowError) as exc:  # e.g. an integer of more than 4300 digits, a date out of range
        raise SpecError([f"not valid YAML: a value cannot be read ({short_repr(str(exc), 120)})"], source) from None


# --- limits on the data ----------------------------------------------------------------------------------


def _walk(data: Any, problems: list[str]) -> Iterator[tuple[str, Any, Any]]:
    """(path, key, value) of every value under ``data``, depth first, within MAX_DEPTH and MAX_NODES.

    Iterative (no recursion), and a container met twice (a cycle, or an alias) is reported, not followed.
    """
    stack: list[tuple[str, Any, Any, int]] = [("", None, data, 0)]
    seen: set[int] = set()
    nodes = 0
    while stack:
        path, key, value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            problems.append(f"(spec): more than {MAX_NODES} values; allowed: at most {MAX_NODES} in a spec")
            return
        yield path, key, value
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                problems.append(f"{path or '(top level)'}: the same object appears twice; allowed: plain tree data")
                continue
            seen.add(id(value))
            if depth + 1 > MAX_DEPTH:
                problems.append(f"{path or '(top level)'}: nested more than {MAX_DEPTH} levels deep; allowed: fewer")
                continue
            if isinstance(value, dict):
                items = [(f"{path}.{k}" if path else str(k), k, v) for k, v in value.items() if isinstance(k, str)]
            else:
                items = [(f"{path}[{i}]", None, v) for i, v in enumerate(value)]
            stack.extend((p, k, v, depth + 1) for p, k, v in reversed(items))


def _has_control(text: str, free_text: bool) -> bool:
    allowed = "\n\t\r" if free_text else ""
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") and ch not in allowed for ch in text)


def _check_value(path: str, key: Any, value: Any, problems: list[str]) -> None:
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                problems.append(
                    f"{path or '(top level)'}: key {short_repr(k)} (a {type(k).__name__}) is not allowed; "
                    f"allowed: {NAME_RULE}"
                )
            elif not NAME.match(k):
                where = f"{path}.{short_repr(k)}" if path else short_repr(k)
                problems.append(f"{where}: key {short_repr(k)} is not allowed; allowed: {NAME_RULE}")
        return
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > INT64_MAX:
            problems.append(f"{path}: {short_repr(value)} does not fit a 64-bit integer; allowed: |value| < 2^63")
        elif isinstance(key, str) and key.endswith("_samples") and value > MAX_SAMPLES:
            problems.append(f"{path}: {value} is too large; allowed: at most {MAX_SAMPLES:.0e} samples")
        return
    if isinstance(value, float):
        if not math.isfinite(value):  # .inf, .nan, or a literal too large for a float (1e400)
            problems.append(f"{path}: {value!r} is not allowed; allowed: a finite number")
        elif abs(value) > INT64_MAX:
            problems.append(f"{path}: {value!r} is too large; allowed: |value| < 2^63 (about 9.2e18)")
        elif isinstance(key, str) and key.endswith("_samples") and value > MAX_SAMPLES:
            problems.append(f"{path}: {value!r} is too large; allowed: at most {MAX_SAMPLES:.0e} samples")
        return
    if isinstance(value, str):
        free = key in FREE_TEXT_KEYS and path == key
        cap = MAX_DESCRIPTION_CHARS if free else MAX_STRING_CHARS
        if len(value) > cap:
            problems.append(f"{path}: a string of {len(value)} characters; allowed: at most {cap}")
        elif _has_control(value, free):
            problems.append(
                f"{path}: {short_repr(value)} contains control characters; allowed: printable text"
                + ("" if free else " (names: letters, digits, '_', '-', '.')")
            )


def grid_name_problem(grid: Any) -> str:
    """The problem with ``grid`` as a grid name (it names the results folder), or ''."""
    if isinstance(grid, str) and GRID_NAME.match(grid):
        return ""
    return (
        f"grid: {short_repr(grid)} is not allowed; allowed: a name of lower-case letters, digits, '_', '-', '.' "
        "(1-64 characters, starting with a letter or digit) — it names the results folder"
    )


def seed_duplicates_problem(raw: Any) -> str:
    """The problem of a seeds list that names a seed twice, or ''."""
    if not isinstance(raw, list) or not all(isinstance(s, int) for s in raw):
        return ""
    dupes = sorted(s for s, n in Counter(raw).items() if n > 1)
    if not dupes:
        return ""
    return (
        f"seeds: {short_repr(dupes)} listed more than once (duplicates); allowed: an integer count 1..{MAX_SEEDS} "
        f"or a list of 1..{MAX_SEEDS} distinct integers 0..2^63-1"
    )


def _seed_count(raw: Any, problems: list[str]) -> int:
    """How many seeds ``seeds`` asks for (0 when invalid: parse_spec explains why); caps both forms."""
    if isinstance(raw, bool):
        return 0
    if isinstance(raw, int):
        if raw > MAX_SEEDS:
            problems.append(
                f"seeds: {short_repr(raw)} is too many; allowed: an integer count 1..{MAX_SEEDS} "
                f"or a list of at most {MAX_SEEDS} distinct non-negative integers"
            )
            return 0
        return max(raw, 0)
    if isinstance(raw, (list, tuple)):
        if len(raw) > MAX_SEEDS:
            problems.append(
                f"seeds: a list of {len(raw)} seeds is too many; allowed: at most {MAX_SEEDS} distinct "
                "non-negative integers"
            )
            return 0
        return len(raw)
    return 0


def _design_arms(design: Any, k: int, fraction: Any) -> int:
    """Arms a design plans over ``k`` tricks (an upper bound: duplicates are merged later)."""
    if design == "leave_one_out":
        return 1 + k if k else 1
    if design == "full_factorial":
        return 2**k
    if design == "fractional_factorial":
        p = fraction if isinstance(fraction, int) and not isinstance(fraction, bool) else 0
        return 2 ** (k - p) if 1 <= p < k else 1
    return 1 + k  # one_at_a_time (and an unknown design, which parse_spec rejects)


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**15 else f"more than 10^{min(len(str(n)) - 1, 4000) if n < 10**4000 else 4000}"


def planned_runs(data: dict[str, Any], n_seeds: int) -> tuple[int, list[str]]:
    """(runs the spec plans, one ``label: arms × seeds`` term per task), counted without expanding anything."""
    tasks = data.get("tasks")
    if not isinstance(tasks, dict):
        return 0, []
    total, terms = 0, []
    design, fraction = data.get("design", "one_at_a_time"), data.get("fraction", 0)
    for label, block in tasks.items():
        tricks = block.get("tricks") if isinstance(block, dict) else None
        k = len(tricks) if isinstance(tricks, (list, dict)) else 0
        arms = _design_arms(design, min(k, 100_000), fraction)
        total += arms * n_seeds
        terms.append(f"{label}: {_count(arms)} arms × {n_seeds} seeds")
    return total, terms


def _duplicate_tricks(data: dict[str, Any], problems: list[str]) -> None:
    tasks = data.get("tasks")
    for label, block in tasks.items() if isinstance(tasks, dict) else ():
        tricks = block.get("tricks") if isinstance(block, dict) else None
        if not isinstance(tricks, list):
            continue
        seen: set[str] = set()
        for i, name in enumerate(tricks):
            path = f"tasks.{label}.tricks[{i}]"
            if not isinstance(name, str):
                continue  # parse_spec explains what a tricks list holds
            if not NAME.match(name):
                problems.append(f"{path}: {short_repr(name)} is not allowed; allowed: a trick name ({NAME_RULE})")
            elif name in seen:
                problems.append(f"{path}: trick {name!r} is listed twice; allowed: each trick once")
            seen.add(name)


def check_limits(data: Any, max_runs: int = DEFAULT_MAX_RUNS) -> list[str]:
    """Every limit ``data`` (a parsed spec) breaks, as problem strings; ``[]`` when it is within all of them.

    Cheap and registry-free: call it before validating names against registries or expanding the grid.
    It checks only what could hurt (size, depth, names, number ranges, seed and run counts, duplicates);
    everything else is left to ``bench.spec.parse_spec``, which reports it with the registries at hand.
    """
    problems: list[str] = []
    for path, key, value in _walk(data, problems):
        _check_value(path, key, value, problems)
    if problems or not isinstance(data, dict):
        return problems
    if "grid" in data and grid_name_problem(data["grid"]):  # names a folder: checked with the limits
        problems.append(grid_name_problem(data["grid"]))
    n_seeds = _seed_count(data.get("seeds", 3), problems)
    if seed_duplicates_problem(data.get("seeds")):
        problems.append(seed_duplicates_problem(data.get("seeds")))
    _duplicate_tricks(data, problems)
    total, terms = planned_runs(data, n_seeds)
    if total > max_runs:
        problems.append(
            f"runs: the spec plans {_count(total)} runs ({'; '.join(terms[:5])}{'; …' if len(terms) > 5 else ''}); "
            f"allowed: at most {max_runs:,} runs per launch (raise the cap deliberately with --max-runs N, "
            f"up to {MAX_RUNS_CEILING:,})"
        )
    return problems
