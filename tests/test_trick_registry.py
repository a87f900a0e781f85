"""Registry-driven tests over every trick card and every (task, trick) cell of the applicability matrix.

- every card is complete, has a tiny setting, a role and a build;
- every applicable cell smoke-trains and resumes bit-exactly;
- every applicable cell changes the run when the trick is switched on (a trick the loop or the task
  does not wire cannot pass);
- every parameter of every card, moved from its setting to another valid value, changes the run on
  every task it applies to — or validation rejects it for that task. No parameter is dead.

A new trick or task (built-in or plugin) is covered without editing this file: the cells come from
the registries. ``bench selftest`` runs the same checks for one installed plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bench.loop import RunContext, train
from bench.selftest import alternatives, differs, run_signature, tiny_cell
from bench.spec import SpecError, applicable_tricks, parse_spec
from experiments.registry import get_task, task_names
from tricks.card import ROLES
from tricks.registry import REGISTRY

PAIRS = [(task, trick) for task in task_names() for trick in applicable_tricks(get_task(task))]
IDS = [f"{t}-{k}" for t, k in PAIRS]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_card_is_complete(name: str) -> None:
    card = REGISTRY[name]
    assert card.name == name
    for field in ("summary", "off", "on", "cost", "effect"):
        assert getattr(card, field).strip(), f"{name}: empty {field}"
    assert card.references, f"{name}: no references"
    assert card.role in ROLES
    assert callable(card.build)
    assert isinstance(card.tiny_setting, dict), f"{name}: no tiny setting"
    card.resolve(card.tiny_setting)  # the tiny setting is itself valid
    assert any(card.name in applicable_tricks(get_task(t)) for t in task_names()), f"{name} applies to no task"
    for other in card.incompatible:
        assert other in REGISTRY, f"{name}: incompatible with unknown trick {other!r}"


@pytest.mark.parametrize("task", task_names())
def test_task_declares_tiny_setting_and_valid_tricks(task: str) -> None:
    cls = get_task(task)
    assert cls.tiny is not None, f"task {task} has no tiny setting"
    for name in cls.tricks:  # the tricks the task wires itself must be task-role cards
        assert name in REGISTRY, f"task {task} lists unknown trick {name!r}"
        assert REGISTRY[name].role == "task", f"task {task} lists {name!r}, whose role is {REGISTRY[name].role!r}"
    for role in cls.loop_roles:
        assert role in ROLES and role != "task", f"task {task} accepts unknown loop role {role!r}"
    for name in cls.trick_defaults:  # the task's own defaults validate on the task at its default budgets
        assert name in applicable_tricks(cls), f"task {task} has defaults for {name!r}, which does not apply"
        parse_spec({"grid": "defaults", "seeds": 1, "tasks": {task: {"tricks": [name]}}})


@pytest.mark.parametrize(("task", "trick"), PAIRS, ids=IDS)
def test_every_applicable_cell_trains_and_resumes_bit_exactly(tmp_path: Path, task: str, trick: str) -> None:
    cell = tiny_cell(task, {trick: REGISTRY[trick].tiny_setting})
    full = train(cell, tmp_path / "full", RunContext(threads=1))
    assert full["status"] == "completed", full
    steps = full["cost"]["steps"]
    assert steps >= 2
    out = tmp_path / "resumed"
    assert train(cell, out, RunContext(threads=1, max_steps=steps // 2))["status"] == "interrupted"
    resumed = train(cell, out, RunContext(threads=1))
    assert resumed["metric"] == full["metric"]
    assert (out / "train.csv").read_text() == (tmp_path / "full" / "train.csv").read_text()
    final_full = torch.load(tmp_path / "full" / "final_model.pt", weights_only=True)
    final_resumed = torch.load(out / "final_model.pt", weights_only=True)
    for k, v in final_full.items():
        assert torch.equal(final_resumed[k], v), k


@pytest.mark.parametrize(("task", "trick"), PAIRS, ids=IDS)
def test_trick_on_changes_the_run(tmp_path: Path, task: str, trick: str) -> None:
    """On ≠ off: the training losses, the evaluated final weights or the final metrics differ."""
    off = run_signature(tiny_cell(task, {}), tmp_path)
    on = run_signature(tiny_cell(task, {trick: REGISTRY[trick].tiny_setting}), tmp_path)
    assert differs(on, off), f"{task} + {trick}: switching the trick on changed nothing"


PARAM_CELLS = [(task, trick, p.name) for task, trick in PAIRS for p in REGISTRY[trick].params]


@pytest.mark.slow
@pytest.mark.parametrize(("task", "trick", "param"), PARAM_CELLS, ids=[f"{t}-{k}-{p}" for t, k, p in PARAM_CELLS])
def test_every_parameter_acts_or_is_rejected(tmp_path: Path, task: str, trick: str, param: str) -> None:
    """Moving one parameter to another valid value changes the run, or validation rejects it for this task.

    The base setting is the card's tiny setting, with the parameter's ``only_if`` condition switched
    on (``alpha`` of replay is probed with ``prioritized: true``, where it is meant to act).
    """
    card = REGISTRY[trick]
    p = card.param_map[param]
    base: dict[str, Any] = dict(card.tiny_setting)
    if p.only_if is not None:
        base[p.only_if[0]] = p.only_if[1]
    try:
        base_cell = tiny_cell(task, {trick: base})
    except SpecError:  # the condition itself is rejected on this task: so is the parameter
        return
    value = base_cell.config["tricks"][trick].get(param)
    if value is None and param not in base_cell.config["tricks"][trick]:
        with pytest.raises(SpecError, match="no effect here"):  # inactive here: giving it must be an error
            tiny_cell(task, {trick: {**base, param: p.default}})
        return
    alts = alternatives(p, value)
    assert alts, f"{trick}.{param}: no other valid value to probe (value {value!r})"
    reference = run_signature(base_cell, tmp_path)
    for alt in alts:
        try:
            cell = tiny_cell(task, {trick: {**base, param: alt}})
        except SpecError:
            continue  # rejected for this task, with the field named: allowed
        assert differs(run_signature(cell, tmp_path), reference), (
            f"{task} + {trick}: {param} {value!r} → {alt!r} validates but changes nothing (a dead parameter)"
        )


DENSE_CELLS = [
    (task, trick)
    for task in task_names()
    if get_task(task).dense_grads
    for trick in (None, *applicable_tricks(get_task(task)))
]


@pytest.mark.parametrize(("task", "trick"), DENSE_CELLS, ids=[f"{t}-{k or 'baseline'}" for t, k in DENSE_CELLS])
def test_dense_grads_declaration_holds_for_every_cell(tmp_path: Path, task: str, trick: str | None) -> None:
    """A task that declares ``dense_grads`` gives every trainable parameter a gradient at every step.

    Trained here with per-parameter gradients unset between steps (what the declaration lets the
    loop skip), so a parameter left out of some step's graph shows up as ``grad is None``.
    """
    from bench.loop import _Trainer
    from bench.memory import PeakMemory
    from experiments.base import MicroBatch

    cell = tiny_cell(task, {trick: REGISTRY[trick].tiny_setting} if trick else {})
    with PeakMemory(torch.device("cpu")) as mem:
        t = _Trainer(cell, tmp_path, RunContext(threads=1), mem)
        named = [(n, p) for n, p in t.model.named_parameters() if p.requires_grad]
        for step in range(min(t.total_steps, 8)):
            for micro, size in enumerate(t.micro_sizes):
                mb = MicroBatch(step=step, index=micro, count=t.k, size=size, progress=step / t.total_steps)
                loss, _ = t.task.loss(t.model, t.task.batch(t.model, mb), mb)
                loss.backward()
            missing = [n for n, p in named if p.grad is None]
            assert not missing, f"{task} + {trick}: no gradient for {missing} at step {step}"
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            t.task.after_optimizer_step(t.model, step)


#: settings under which a built-in task's final evaluation measures what an intermediate one does (the tiny
#: settings of toy_diffusion and rl_policy use a larger final sample, where the hook must say None)
_SAME_ESTIMATOR = {
    "toy_diffusion": {"final_samples_per_class": "eval_samples_per_class"},
    "rl_policy": {"eval_episodes_intermediate": "eval_episodes"},
}
HOOK_CELLS = [
    (task, trick, same)
    for task in task_names()
    for trick in [None, *sorted(t for t in applicable_tricks(get_task(task)) if REGISTRY[t].role == "task")]
    for same in ([False, True] if task in _SAME_ESTIMATOR else [False])
]


@pytest.mark.parametrize(
    ("task", "trick", "same"),
    HOOK_CELLS,
    ids=[f"{t}-{k or 'baseline'}-{'same' if s else 'tiny'}" for t, k, s in HOOK_CELLS],
)
def test_intermediate_from_final_is_what_an_intermediate_evaluation_measures(
    task: str, trick: str | None, same: bool
) -> None:
    """A task's :meth:`intermediate_from_final` (the learning curve's last point without a second evaluation)
    equals a real ``evaluate(model, final=False)`` after the final one, exactly — or is None."""
    from bench.selftest import intermediate_hook_agrees

    cell = tiny_cell(task, {trick: REGISTRY[trick].tiny_setting} if trick else {})
    config = cell.config
    if same:
        params = dict(config["params"])
        for key, source in _SAME_ESTIMATOR[task].items():
            params[key] = params[source]
        config = {**config, "params": params}
    agrees, why = intermediate_hook_agrees(config, cell.seed)
    if same or task == "cifar_autoencoder":  # built-in tasks that must answer here (the test is not vacuous)
        assert agrees is not None
    assert agrees is not False, why
