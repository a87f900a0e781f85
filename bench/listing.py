"""``bench list``: the registry as a reader wants it — overview, a trick's full card, a task's contract.

``bench list`` prints every trick (role, summary, the tasks it applies to), every task and the
applicability matrix; ``bench list TRICK`` the whole card, with the settings a run of each task
actually uses (the card's defaults, then the task's own, minus what has no effect on the task);
``bench list TASK`` the task contract: metric, parameters, train defaults, capabilities, and each
applicable trick with its resolved defaults. Everything comes from the same registries and rules
that validation uses (``Task.accepts``, ``bench.spec.resolve_trick``), so what is printed is what runs.
"""

from __future__ import annotations

import textwrap
from typing import Any

from tricks.card import ROLES, Param, TrickCard, did_you_mean

__all__ = ["SECTIONS", "describe_task", "describe_trick", "plugin_origin", "render"]

SECTIONS = ("all", "tricks", "tasks", "matrix")
WIDTH = 100


def _wrap(text: str, indent: str = "    ") -> str:
    return textwrap.fill(" ".join(text.split()), WIDTH, initial_indent=indent, subsequent_indent=indent)


def _value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    return f"{v:g}" if isinstance(v, float) else str(v)


def _param_line(p: Param) -> str:
    unit = f" [{p.unit}]" if p.unit else ""
    extra = []
    if p.needs:
        extra.append(f"only on tasks with {p.needs}")
    if p.only_if is not None:
        extra.append(f"only with {p.only_if[0]}: {_value(p.only_if[1])}")
    return f"  {p.name}{unit} — {p.allowed()}; default {_value(p.default)}" + (
        f" ({'; '.join(extra)})" if extra else ""
    )


def _task_defaults(card: TrickCard, task_cls: Any) -> str:
    """The settings a run of ``task_cls`` uses for ``card`` with nothing given in the spec."""
    from bench.spec import TRAIN_MAP, resolve_trick, task_cls_params

    params = {p.name: p.default for p in task_cls_params(task_cls).values()}
    train = {name: task_cls.train_defaults.get(name, p.default) for name, p in TRAIN_MAP.items()}
    resolved, problems = resolve_trick(task_cls, card, None, card.name, params, train)
    if problems:  # e.g. no_weight_decay with the task's weight_decay at 0: it must be given settings that act
        return "needs settings: " + "; ".join(problems)
    text = ", ".join(f"{k}={_value(v)}" for k, v in resolved.items()) or "(no parameters)"
    dropped = [p.name for p in card.params if p.name not in resolved]
    return text + (f"   [no effect here, so not settable: {', '.join(dropped)}]" if dropped else "")


def plugin_origin(kind: str, name: str) -> str | None:
    """Where a plugin trick or task (``kind``) comes from (entry point and distribution, or ``register_*``);
    None for a built-in one."""
    if kind == "task":
        from experiments.registry import BUILTIN_TASKS, origin

        return None if name in BUILTIN_TASKS else origin(name)
    from tricks.registry import BUILTIN_MODULES, origin

    where = origin(name)
    return None if where in {f"tricks.{m}" for m in BUILTIN_MODULES} else where


def describe_trick(card: TrickCard) -> str:
    """The full card of one trick, with the defaults each applicable task uses."""
    from bench.spec import applicable_tricks
    from experiments.registry import available_tasks

    tasks = {name: cls for name, cls in available_tasks().items() if card.name in applicable_tricks(cls)}
    lines = [f"{card.name} — {card.summary}", "", f"role: {card.role} ({ROLES[card.role]})"]
    if (where := plugin_origin("trick", card.name)) is not None:
        lines.append(f"from: {where}")
    lines += ["", "off:", _wrap(card.off), "on:", _wrap(card.on), "", "parameters:"]
    lines += [_param_line(p) + "\n" + _wrap(p.doc, "      ") for p in card.params] or ["  (none)"]
    lines += ["", "defaults a run uses, per task (card defaults, then the task's own):"]
    lines += [f"  {name}: {_task_defaults(card, cls)}" for name, cls in tasks.items()] or ["  (applies to no task)"]
    lines += ["", "cost:", _wrap(card.cost), "expected effect:", _wrap(card.effect)]
    exclusive = f"one trick of role {card.role!r} per arm" if card.exclusive else ""
    incompatible = ", ".join(card.incompatible)
    lines += ["", "incompatible: " + ("; ".join(x for x in (incompatible, exclusive) if x) or "none")]
    lines += ["", "references:"] + [f"  - {r}" for r in card.references]
    lines += ["", f"tiny setting (smoke tests): {card.tiny_setting or '{}'}"]
    return "\n".join(lines)


def describe_task(task_cls: Any) -> str:
    """The contract of one task: metric, parameters, train defaults, capabilities and its tricks' defaults."""
    from bench.spec import TRAIN_PARAMS, applicable_tricks

    direction = "higher" if task_cls.higher_is_better else "lower"
    lines = [f"{task_cls.name} — {task_cls.summary}", "", f"metric: {task_cls.metric} ({direction} is better)"]
    if (where := plugin_origin("task", task_cls.name)) is not None:
        lines.append(f"from: {where}")
    if task_cls.metric_directions:
        lines.append(
            "secondary metrics: "
            + ", ".join(f"{m} ({'higher' if hib else 'lower'})" for m, hib in task_cls.metric_directions.items())
        )
    lines += ["", "parameters (spec: tasks.<label>.params):"]
    lines += [_param_line(p) + "\n" + _wrap(p.doc, "      ") for p in task_cls.params] or ["  (none)"]
    lines += ["", "train block defaults (spec: tasks.<label>.train):"]
    for p in TRAIN_PARAMS:
        value = task_cls.train_defaults.get(p.name, p.default)
        lines.append(f"  {p.name}{f' [{p.unit}]' if p.unit else ''} = {_value(value)} — {p.allowed()}")
    caps = ", ".join(sorted(task_cls.capabilities)) or "none"
    lines += ["", f"capabilities: {caps}", f"loop roles accepted: {', '.join(task_cls.loop_roles) or 'none'}"]
    lines += ["", "tricks that apply, with the defaults a run uses:"]
    for name, card in applicable_tricks(task_cls).items():
        lines.append(f"  {name} ({card.role}): {_task_defaults(card, task_cls)}")
    return "\n".join(lines)


def render(what: str) -> str:
    """What ``bench list WHAT`` prints; ``KeyError`` (with a did-you-mean) for an unknown name."""
    from bench.spec import applicable_tricks
    from experiments.registry import available_tasks
    from tricks.registry import cards

    table, tasks = cards(), available_tasks()
    if what in table:
        return describe_trick(table[what])
    if what in tasks:
        return describe_task(tasks[what])
    if what not in SECTIONS:
        known = [*SECTIONS, *table, *tasks]
        hint = did_you_mean(what, known)
        raise KeyError(
            f"bench list: {what!r} is not a trick, a task or a section; allowed: {', '.join(SECTIONS)}, a trick "
            f"({', '.join(table)}) or a task ({', '.join(tasks)})" + (f" ({hint})" if hint else "")
        )
    applies = {name: applicable_tricks(cls) for name, cls in tasks.items()}
    out: list[str] = []
    if what in ("all", "tricks"):
        out.append(f"TRICKS ({len(table)} cards; `bench list NAME` shows one in full)")
        for name, card in table.items():
            on = ", ".join(t for t in tasks if name in applies[t]) or "(no task)"
            out.append(f"  {name:<24} {card.summary}")
            out.append(f"  {'':<24} role: {card.role}; applies to: {on}")
            if (where := plugin_origin("trick", name)) is not None:
                out.append(f"  {'':<24} from: {where}")
    if what in ("all", "tasks"):
        out.append("\nTASKS (`bench list TASK` shows its parameters and its tricks' defaults)")
        for name, cls in tasks.items():
            out.append(f"  {name:<20} {cls.summary}")
            out.append(f"  {'':<20} metric: {cls.metric} ({'higher' if cls.higher_is_better else 'lower'} is better)")
            if (where := plugin_origin("task", name)) is not None:
                out.append(f"  {'':<20} from: {where}")
    if what in ("all", "matrix"):
        out.append("\nAPPLICABILITY (task × trick; x = applies)")
        names = list(tasks)
        out.append(f"  {'':<24}" + "".join(f"{n[:18]:>20}" for n in names))
        for trick in table:
            out.append(f"  {trick:<24}" + "".join(f"{'x' if trick in applies[n] else '.':>20}" for n in names))
    return "\n".join(out).lstrip("\n")
