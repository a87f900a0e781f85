"""Every shipped grid (experiments/grids/*.yaml), shrunk to a tiny budget, trains and reports without error, and
no figure panel or table row of its report is empty (checked from the data the report wrote).

The shrinking is registry-driven: a task parameter of a size unit (images, points, channels, units, layers,
steps, episodes, env steps) goes to a small value its Param allows; every setting counted in samples or
transitions (train block, task parameters, trick cards) is scaled with the budget; real CIFAR-10 becomes the
offline image set; seeds become 2. The grid's structure — tasks, blocks (the baseline-only one too), tricks,
design — is kept.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.cli import main
from bench.spec import parse_spec
from bench.stats import analyze_grid
from tests.report_checks import check_no_empty_panel_or_row

GRIDS = sorted((Path(__file__).resolve().parent.parent / "experiments" / "grids").glob("*.yaml"))
SIZE_UNITS = {"images", "points", "channels", "units", "layers", "steps", "episodes", "env steps"}
SMALL = {"images": 64, "points": 16, "channels": 4, "units": 8}  # otherwise the Param's lower bound (at least 1)
BATCH = 16
STEPS = 4


def _small(param: Any, value: Any) -> Any:
    """A small value of a size parameter that its Param accepts."""
    low = param.low if param.low is not None else 1
    return max(int(low), SMALL.get(param.unit, 1), 0 if value == 0 else 1) if value != 0 else 0


def _scaled(value: float, factor: float, integer: bool) -> Any:
    return max(1, math.ceil(value * factor)) if integer else value * factor


def shrink(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a grid spec as loaded) with tiny budgets and sizes, the same tasks, blocks, tricks and design."""
    from experiments.registry import get_task
    from tricks.registry import get_card

    spec = json.loads(json.dumps(raw))  # a deep copy of plain data
    spec["seeds"] = 2
    for block in spec["tasks"].values():
        block = block if block is not None else {}
        task = get_task(block.get("task") or next(k for k, v in spec["tasks"].items() if v is block))
        train = block.setdefault("train", {})
        batch = min(int(train.get("batch_size", task.train_defaults.get("batch_size", 64))), BATCH)
        old_budget = int(train.get("budget_samples", task.train_defaults["budget_samples"]))
        steps_per = int((block.get("params") or {}).get("env_steps_per_update", 1)) if task.name == "rl_policy" else 1
        budget = STEPS * max(batch, steps_per * 4) if task.name == "rl_policy" else STEPS * batch
        factor = budget / old_budget
        for key, value in list(train.items()):
            if key.endswith("_samples") and key != "budget_samples" and isinstance(value, (int, float)):
                train[key] = _scaled(value, factor, isinstance(value, int)) if value else 0
        per_step = steps_per if task.name == "rl_policy" else batch  # samples of one optimizer step
        train |= {"batch_size": batch, "budget_samples": budget, "eval_every_samples": budget // STEPS,
                  "checkpoint_every_samples": budget // 2}  # fmt: skip
        params = block.get("params") or {}
        declared = {p.name: p for p in task.params}
        for key, value in list(params.items()):
            p = declared.get(key)
            if p is None or isinstance(value, bool):
                continue
            if key == "data" and value == "cifar10":
                params[key] = "offline"  # no download in tests
            elif p.type is int and p.unit in SIZE_UNITS:
                params[key] = _small(p, value)
            elif key.endswith("_samples") and isinstance(value, (int, float)):
                params[key] = _scaled(value, factor, p.type is int)
        for name, settings in (block.get("tricks") or {}).items():
            card = {p.name: p for p in get_card(name).params}
            for key, value in list((settings or {}).items()):
                p = card.get(key)
                if p is not None and p.unit == "samples" and isinstance(value, (int, float)):
                    settings[key] = max(per_step, _scaled(value, factor, p.type is int))
    return spec


def test_shrink_keeps_every_grid_valid_and_its_structure() -> None:
    assert len(GRIDS) >= 10
    for path in GRIDS:
        raw = yaml.safe_load(path.read_text())
        small = parse_spec(shrink(raw), source=f"{path.name} shrunk")
        full = parse_spec(raw, source=path.name)
        assert [(t.label, t.task, list(t.tricks)) for t in small.tasks] == [
            (t.label, t.task, list(t.tricks)) for t in full.tasks
        ]
        assert small.design == full.design and len(small.seeds) == 2
        for t in small.tasks:
            assert t.train["budget_samples"] <= 4 * 64, (path.name, t.label)


@pytest.mark.slow  # all shipped grids: 2-5 s of tiny runs and a report each, ~2 min in all on a busy 2-core machine
@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_shipped_grid_runs_and_reports(path: Path, tmp_path: Path) -> None:
    spec = shrink(yaml.safe_load(path.read_text()))
    spec_path = tmp_path / path.name
    spec_path.write_text(json.dumps(spec))
    results = tmp_path / "results"
    assert main(["run", str(spec_path), "--results", str(results), "--no-progress", "--executor", "debug"]) == 0
    gdir = results / spec["grid"]
    report = check_no_empty_panel_or_row(gdir)
    gs = analyze_grid(gdir, n_resamples=200)
    assert {ts.label for ts in gs.tasks} == set(spec["tasks"])  # every block reported, baseline-only ones too
    md = (gdir / "report.md").read_text()
    for ts in gs.tasks:
        assert f"## {ts.label}" in md
        if ts.baseline_only:
            assert f"### {ts.label}: {ts.metric}" in md and "**baseline-only block**" in md
        else:  # each task's figures hold its own metrics only
            forest = json.loads((gdir / "figures" / f"{ts.label}_forest.json").read_text())
            own = {m.removeprefix("metric.") for m in ts.metric_directions}
            assert {p["title"] for p in forest["panels"]} <= own
    assert report["tables"] and report["figures"]
