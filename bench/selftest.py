"""Registry-driven checks of tricks and tasks — the ones trickbench's own tests run — for any registered name.

``bench selftest NAME...`` (a trick or a task, built-in or from a plugin) is the one command a plugin
author runs. For a **trick** it checks the card (complete, a tiny setting that validates, known
incompatible names) and then every (task, trick) cell it applies to; for a **task** it checks the task
alone (its ``tiny`` setting, its primary metric, bit-exact resume without any trick) and then every
trick that applies to it. Each cell runs at the task's tiny setting:

- **smoke + resume**: the cell trains, and a run interrupted half-way and resumed equals the
  uninterrupted one bit for bit (losses, metrics, final weights) — which is what tests a task's
  ``state_dict``/``load_state_dict`` and a trick object's checkpointed state;
- **on ≠ off**: switching the trick on changes the run (training losses, the evaluated weights, or
  the final metrics) — a trick nobody wires cannot pass;
- **no dead parameter**: every parameter of the card, moved to another valid value, changes the run,
  or validation rejects it for that task.

``tests/test_trick_registry.py`` runs the same checks over the whole registry with pytest; the
helpers here (:func:`tiny_cell`, :func:`run_signature`, :func:`differs`, :func:`alternatives`) are
shared by both.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.grid import Cell, expand
from bench.spec import SpecError, applicable_tricks, parse_spec
from tricks.card import Param, ParamError

__all__ = [
    "CheckResult",
    "alternatives",
    "cells_for",
    "differs",
    "format_row",
    "format_table",
    "iter_selftest",
    "run_signature",
    "selftest",
    "tiny_cell",
]


def tiny_cell(task: str, tricks: dict[str, Any], seed: int = 0) -> Cell:
    """The run of ``task`` at its tiny setting with ``tricks`` on (validated like a spec; SpecError if not)."""
    from experiments.registry import get_task

    tiny = get_task(task).tiny or {}
    spec = parse_spec(
        {
            "grid": "selftest",
            "seeds": [seed],
            "design": "leave_one_out" if tricks else "one_at_a_time",
            "tasks": {task: {"params": tiny.get("params", {}), "train": tiny.get("train", {}), "tricks": tricks}},
        }
    )
    return expand(spec)[0]  # leave_one_out's first arm: every listed trick on


@dataclass(frozen=True)
class Signature:
    """What a run computed: its per-step training log, final metrics and evaluated final weights."""

    train_log: str
    metrics: dict[str, float]
    weights: dict[str, Any]


_SIGNATURES: dict[str, Signature] = {}  # run_id -> signature (runs are deterministic: compute each once)


def run_signature(cell: Cell, workdir: Path) -> Signature:
    """Train ``cell`` (once per process per run id) and return its :class:`Signature`."""
    import torch

    from bench.loop import RunContext, train

    if cell.run_id not in _SIGNATURES:
        out = Path(workdir) / cell.run_id
        result = train(cell, out, RunContext(threads=1))
        if result["status"] not in ("completed", "diverged"):
            raise RuntimeError(f"run {cell.run_id} ended {result['status']}: {result}")
        final = out / "final_model.pt"
        weights = torch.load(final, weights_only=True) if final.exists() else {}
        _SIGNATURES[cell.run_id] = Signature((out / "train.csv").read_text(), dict(result["metric"]), weights)
    return _SIGNATURES[cell.run_id]


def differs(a: Signature, b: Signature) -> bool:
    """Whether two runs computed anything differently (bitwise: a change in the last bit counts)."""
    import torch

    if a.train_log != b.train_log or a.metrics.keys() != b.metrics.keys() or a.weights.keys() != b.weights.keys():
        return True
    if any(
        not (a.metrics[k] == b.metrics[k] or (a.metrics[k] != a.metrics[k] and b.metrics[k] != b.metrics[k]))
        for k in a.metrics
    ):
        return True  # NaN equals NaN here
    return any(not torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def alternatives(p: Param, value: Any, limit: int = 3) -> list[Any]:
    """Other valid values of parameter ``p`` than ``value``, to probe whether it acts.

    Booleans: the other one; choices: every other choice; numbers: twice and half the value (for 0:
    a small and a unit value), and the closed lower bound — those ``p.validate`` accepts; an integer
    with neither falls back to its neighbours.
    """
    if p.type is bool:
        candidates: list[Any] = [not value]
    elif p.choices is not None:
        candidates = [c for c in p.choices if c != value]
    elif p.type is int:
        candidates = [value * 2, value // 2]
    elif p.type is float:
        candidates = [value * 2, value / 2] if value else [0.1, 1.0]
        if p.low is not None and not p.low_open:
            candidates.append(p.low)
    else:
        candidates = []
    out = _valid_others(p, value, candidates)
    if not out and p.type is int:  # e.g. 1 at its upper bound: try the neighbours
        out = _valid_others(p, value, [value + 1, value - 1])
    return out[:limit]


def _valid_others(p: Param, value: Any, candidates: list[Any]) -> list[Any]:
    out: list[Any] = []
    for c in candidates:
        try:
            c = p.validate(c, p.name)
        except ParamError:
            continue
        if c != value and c not in out:
            out.append(c)
    return out


@dataclass
class CheckResult:
    """One check of one cell: ``ok`` is False when it found a problem, described in ``detail``."""

    check: str
    task: str
    trick: str
    ok: bool
    detail: str = ""


def cells_for(name: str, tasks: list[str] | None = None) -> list[tuple[str, str | None]]:
    """The (task, trick) cells ``bench selftest NAME`` checks; ``trick`` None = the task alone.

    A trick: every task it applies to; a task: the task alone, then every trick that applies to it.
    ``tasks`` keeps only those tasks. ``KeyError`` naming the known tricks and tasks (with a did-you-mean)
    for an unknown name, and a task in ``tasks`` that is not registered.
    """
    from experiments.registry import get_task, task_names
    from tricks.card import did_you_mean
    from tricks.registry import cards

    table, known_tasks = cards(), task_names()
    for t in tasks or []:
        if t not in known_tasks:
            hint = did_you_mean(t, known_tasks)
            known = ", ".join(known_tasks)
            raise KeyError(f"--task: unknown task {t!r}; known: {known}" + (f" ({hint})" if hint else ""))
    keep = set(tasks) if tasks else set(known_tasks)
    if name in table:
        return [(t, name) for t in known_tasks if t in keep and name in applicable_tricks(get_task(t))]
    if name in known_tasks:
        if name not in keep:
            return []
        return [(name, None)] + [(name, trick) for trick in applicable_tricks(get_task(name))]
    known = sorted({*table, *known_tasks})
    hint = did_you_mean(name, known)
    raise KeyError(f"unknown trick or task {name!r}; known: {', '.join(known)}" + (f" ({hint})" if hint else ""))


def _check_card(trick: str) -> Iterator[CheckResult]:
    """The card alone: complete, a tiny setting that validates, incompatible names that exist, a task to run on."""
    from experiments.registry import get_task, task_names
    from tricks.registry import cards

    table = cards()
    card = table[trick]
    problems = [f"empty {f}" for f in ("summary", "off", "on", "cost", "effect") if not getattr(card, f).strip()]
    if not card.references:
        problems.append("no references")
    try:
        card.resolve(card.tiny_setting)
    except ParamError as exc:
        problems.append(f"tiny_setting does not validate: {exc}")
    problems += [f"incompatible with unknown trick {o!r}" for o in card.incompatible if o not in table]
    if not any(trick in applicable_tricks(get_task(t)) for t in task_names()):
        problems.append("applies to no registered task (role task: list it in a task's `tricks`, or `applies_to`)")
    yield CheckResult("card", "-", trick, not problems, "; ".join(problems))


def intermediate_hook_agrees(config: dict[str, Any], seed: int = 0) -> tuple[bool | None, str]:
    """Whether a task's ``intermediate_from_final`` equals a real intermediate evaluation after the final one.

    Built and evaluated at ``config`` (a run config) with a freshly initialised model: (None, "") when the
    hook answers None there, (True, "") when it equals ``evaluate(model, False)`` exactly (NaN = NaN), else
    (False, what differs).
    """
    import torch

    from bench.loop import build_task
    from bench.seeds import SeedBundle

    task, _ = build_task(config, SeedBundle(seed), torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = task.build_model().eval()
    with torch.no_grad():
        derived = task.intermediate_from_final(dict(task.evaluate(model, True)))
        real = task.evaluate(model, False)
    if derived is None:
        return None, ""
    keys = derived.keys() ^ real.keys()
    if keys:
        return False, f"keys differ from evaluate(model, final=False): {sorted(keys)}"
    off = [k for k in real if not (derived[k] == real[k] or (derived[k] != derived[k] and real[k] != real[k]))]
    return (not off), (f"values differ for {off}" if off else "")


def _check_task(task: str, workdir: Path) -> Iterator[CheckResult]:
    """The task alone: a tiny setting, its primary metric reported, bit-exact resume with no trick on."""
    import torch

    from bench.loop import RunContext, train
    from experiments.registry import get_task

    cls = get_task(task)
    if not cls.tiny:
        yield CheckResult("tiny setting", task, "-", False, "Task.tiny is not set: give a seconds-long setting")
        return
    try:
        cell = tiny_cell(task, {})
    except SpecError as exc:
        yield CheckResult("tiny setting validates", task, "-", False, str(exc))
        return
    full_dir = workdir / "full" / cell.run_id
    full = train(cell, full_dir, RunContext(threads=1))
    ok = full["status"] == "completed" and full["cost"]["steps"] >= 2
    yield CheckResult("smoke", task, "-", ok, "" if ok else f"status {full['status']}, result {full}")
    if not ok:
        return
    has_metric = cls.metric in full["metric"] and isinstance(cls.higher_is_better, bool)
    yield CheckResult(
        "primary metric",
        task,
        "-",
        has_metric,
        "" if has_metric else f"evaluate() returned {sorted(full['metric'])}, not the primary metric {cls.metric!r}",
    )
    agrees, why = intermediate_hook_agrees(cell.config, cell.seed)
    if agrees is not None:  # the curve's last point taken from the final evaluation: must be what it measures
        yield CheckResult("intermediate_from_final", task, "-", agrees, why)
    out = workdir / "resumed" / cell.run_id
    train(cell, out, RunContext(threads=1, max_steps=full["cost"]["steps"] // 2))
    resumed = train(cell, out, RunContext(threads=1))
    a = torch.load(full_dir / "final_model.pt", weights_only=True)
    b = torch.load(out / "final_model.pt", weights_only=True)
    same = (
        resumed["metric"] == full["metric"]
        and (out / "train.csv").read_text() == (full_dir / "train.csv").read_text()
        and all(torch.equal(a[k], b[k]) for k in a)
    )
    yield CheckResult(
        "bit-exact resume",
        task,
        "-",
        same,
        "" if same else "the resumed run differs: state_dict/load_state_dict must carry all mutable task state",
    )


def _check_cell(task: str, trick: str, workdir: Path) -> Iterator[CheckResult]:
    import torch

    from bench.loop import RunContext, train
    from tricks.registry import get_card

    card = get_card(trick)
    try:
        cell = tiny_cell(task, {trick: card.tiny_setting})
    except SpecError as exc:
        yield CheckResult("tiny setting validates", task, trick, False, str(exc))
        return
    full = train(cell, workdir / "full" / cell.run_id, RunContext(threads=1))
    ok = full["status"] == "completed" and full["cost"]["steps"] >= 2
    yield CheckResult("smoke", task, trick, ok, "" if ok else f"status {full['status']}, result {full}")
    if not ok:
        return
    if card.role == "task":  # a task-role trick may change what the evaluations measure
        agrees, why = intermediate_hook_agrees(cell.config, cell.seed)
        if agrees is not None:
            yield CheckResult("intermediate_from_final", task, trick, agrees, why)
    out = workdir / "resumed" / cell.run_id
    train(cell, out, RunContext(threads=1, max_steps=full["cost"]["steps"] // 2))
    resumed = train(cell, out, RunContext(threads=1))
    a = torch.load(workdir / "full" / cell.run_id / "final_model.pt", weights_only=True)
    b = torch.load(out / "final_model.pt", weights_only=True)
    same = (
        resumed["metric"] == full["metric"]
        and (out / "train.csv").read_text() == (workdir / "full" / cell.run_id / "train.csv").read_text()
        and all(torch.equal(a[k], b[k]) for k in a)
    )
    yield CheckResult(
        "bit-exact resume",
        task,
        trick,
        same,
        "" if same else "the resumed run differs: the trick object's state_dict must carry all its state",
    )
    on = run_signature(cell, workdir / "sig")
    off = run_signature(tiny_cell(task, {}), workdir / "sig")
    acts = differs(on, off)
    yield CheckResult("on ≠ off", task, trick, acts, "" if acts else "switching the trick on changed nothing")
    for p in card.params:
        base = dict(card.tiny_setting)
        if p.only_if is not None:
            base[p.only_if[0]] = p.only_if[1]
        try:
            base_cell = tiny_cell(task, {trick: base})
        except SpecError:
            continue
        if p.name not in base_cell.config["tricks"][trick]:
            continue  # inactive on this task: validation rejects it (tested by the registry tests)
        value = base_cell.config["tricks"][trick][p.name]
        reference = run_signature(base_cell, workdir / "sig")
        alts = alternatives(p, value)
        if not alts:
            yield CheckResult(
                f"parameter {p.name}", task, trick, False, f"no other valid value to probe than {value!r}"
            )
        for alt in alts:
            try:
                probe = tiny_cell(task, {trick: {**base, p.name: alt}})
            except SpecError:
                continue
            acts = differs(run_signature(probe, workdir / "sig"), reference)
            yield CheckResult(
                f"parameter {p.name}", task, trick, acts, f"{value!r} → {alt!r}" + ("" if acts else " changes nothing")
            )


def iter_selftest(
    names: list[str], workdir: Path | None = None, tasks: list[str] | None = None
) -> Iterator[CheckResult]:
    """The checks of :func:`selftest`, one result at a time as they finish (for a progress display).

    Every name is resolved before anything trains (``KeyError`` for an unknown one).
    """
    plan: list[tuple[str, str | None]] = []
    for name in names:
        for cell in cells_for(name, tasks):
            if cell not in plan:
                plan.append(cell)
    from tricks.registry import cards

    table = cards()
    with tempfile.TemporaryDirectory(prefix="trickbench-selftest-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        for name in dict.fromkeys(names):
            if name in table:
                yield from _check_card(name)
        for task, trick in plan:
            yield from (_check_task(task, root) if trick is None else _check_cell(task, trick, root))


def selftest(names: list[str], workdir: Path | None = None, tasks: list[str] | None = None) -> list[CheckResult]:
    """Run the registry checks for ``names`` (tricks or tasks; ``tasks`` restricts the cells to those tasks).

    ``KeyError`` naming an unknown name, before anything trains.
    """
    return list(iter_selftest(names, workdir, tasks))


#: column widths of the selftest table (rows are printed as checks finish, so the widths are fixed)
COLUMNS = (("check", 34), ("task", 18), ("trick", 22), ("result", 6))


def format_row(result: CheckResult | None = None) -> str:
    """One line of the selftest table (the header when ``result`` is None): check, task, trick, PASS/FAIL, detail."""
    if result is None:
        cells = [name for name, _ in COLUMNS] + ["detail"]
    else:
        cells = [result.check, result.task, result.trick, "PASS" if result.ok else "FAIL", result.detail]
    return ("  ".join(c.ljust(w) for c, (_, w) in zip(cells, COLUMNS)) + "  " + cells[-1]).rstrip()


def format_table(results: list[CheckResult]) -> str:
    """The results as a text table with a header (see :func:`format_row`)."""
    return "\n".join([format_row(), *(format_row(r) for r in results)])
