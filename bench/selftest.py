"""Registry-driven checks of tricks and tasks — the ones trickbench's own tests run — for any registered name.

``bench selftest NAME...`` (a trick or a task, built-in or from a plugin) runs, on every applicable
(task, trick) cell at the task's tiny setting:

- **smoke + resume**: the cell trains, and a run interrupted half-way and resumed equals the
  uninterrupted one bit for bit (losses, metrics, final weights);
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

__all__ = ["CheckResult", "alternatives", "differs", "run_signature", "selftest", "tiny_cell"]


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


def _cells_for(name: str) -> list[tuple[str, str]]:
    from experiments.registry import get_task, task_names
    from tricks.registry import cards

    table = cards()
    if name in table:
        return [(t, name) for t in task_names() if name in applicable_tricks(get_task(t))]
    if name in task_names():
        return [(name, trick) for trick in applicable_tricks(get_task(name))]
    from tricks.card import did_you_mean

    known = sorted({*table, *task_names()})
    hint = did_you_mean(name, known)
    raise KeyError(f"unknown trick or task {name!r}; known: {', '.join(known)}" + (f" ({hint})" if hint else ""))


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
    out = workdir / "resumed" / cell.run_id
    train(cell, out, RunContext(threads=1, max_steps=full["cost"]["steps"] // 2))
    resumed = train(cell, out, RunContext(threads=1))
    a = torch.load(workdir / "full" / cell.run_id / "final_model.pt", weights_only=True)
    b = torch.load(out / "final_model.pt", weights_only=True)
    same = resumed["metric"] == full["metric"] and all(torch.equal(a[k], b[k]) for k in a)
    yield CheckResult("bit-exact resume", task, trick, same, "" if same else "the resumed run differs")
    on = run_signature(cell, workdir / "sig")
    off = run_signature(tiny_cell(task, {}), workdir / "sig")
    yield CheckResult("on ≠ off", task, trick, differs(on, off), "switching the trick on changed nothing")
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
                f"parameter {p.name}", task, trick, acts, "" if acts else f"{value!r} → {alt!r} changes nothing"
            )


def selftest(names: list[str], workdir: Path | None = None) -> list[CheckResult]:
    """Run the registry checks for ``names`` (tricks or tasks); KeyError naming an unknown name."""
    cells = [cell for name in names for cell in _cells_for(name)]
    with tempfile.TemporaryDirectory(prefix="trickbench-selftest-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        return [result for task, trick in cells for result in _check_cell(task, trick, root)]
