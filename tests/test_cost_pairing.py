"""Cost ratios are paired in time: a machine load that drifts during a grid does not land on one arm.

The test-only ``drifting`` task sleeps at every optimizer step for a time that grows with the number
of steps this process has trained (a load that ramps up 3× over the grid). The trick compared,
``no_weight_decay`` (the linear model's bias leaves the decayed parameter group), changes nothing
about the work of a step, so its true time ratio is 1. Run in the executors' order (seed-major, the
arms of a seed side by side, A B / B A) the reported ratio stays within 10 % of 1; run arm by arm
(the order before) it does not.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch import nn

from bench.cli import main
from bench.executors.local import run_debug
from bench.grid import expand
from bench.runner import paired_in_time, plan, write_grid_spec
from bench.spec import parse_spec
from bench.stats import analyze_grid
from experiments.base import MicroBatch
from tests.synthetic_task import Synthetic
from tricks.card import Param

LOAD = {"steps": 0}  # steps trained in this process (the "load" of the machine grows with it)
STEP_SLEEP_S = 0.02
RAMP_STEPS = 32  # the sleep grows by STEP_SLEEP_S every RAMP_STEPS steps: 3× at the end of a 64-step grid


class Drifting(Synthetic):
    """Synthetic regression whose every step waits longer the more steps this process has trained."""

    name = "drifting"
    summary = "test-only: synthetic regression under a machine load that ramps up"
    params = (*Synthetic.params, Param("ramp_steps", int, RAMP_STEPS, "steps per extra step_sleep", low=1))

    def batch(self, model: nn.Module, mb: MicroBatch) -> Any:
        LOAD["steps"] += 1
        time.sleep(STEP_SLEEP_S * (1 + LOAD["steps"] / self.p["ramp_steps"]))
        return super().batch(model, mb)


@pytest.fixture
def drifting_task() -> Iterator[str]:
    from experiments.registry import register_task, unregister_task

    register_task(Drifting)
    LOAD["steps"] = 0
    yield "drifting"
    unregister_task("drifting")


def _spec(grid: str) -> dict:
    return {
        "grid": grid,
        "design": "one_at_a_time",
        "seeds": 4,
        "tasks": {
            "drifting": {
                "train": {"budget_samples": 256, "batch_size": 32, "eval_every_samples": 256,
                          "checkpoint_every_samples": 256, "weight_decay": 0.01},
                "tricks": {"no_weight_decay": None},  # the bias leaves the decayed group: the same work per step
            }
        },
    }  # fmt: skip


def _time_ratio(gdir: Path) -> float:
    (ts,) = analyze_grid(gdir, n_resamples=200).tasks
    (row,) = ts.cost.itertuples()
    assert row.time_n == 4
    # the same number in the verdicts and the arms table (one definition of the ratio)
    assert ts.verdicts.iloc[0]["time_ratio"] == pytest.approx(row.time_ratio)
    arms = ts.arm_summary.set_index("arm")
    assert arms.loc["+no_weight_decay", "time_ratio"] == pytest.approx(row.time_ratio)
    return float(row.time_ratio)


def test_executor_order_is_seed_major_with_the_arms_of_a_seed_side_by_side(tmp_path: Path) -> None:
    path = tmp_path / "order.yaml"
    tricks = {"ema": None, "accumulation": None}
    spec = {"grid": "order", "seeds": 3, "tasks": {"cifar_autoencoder": {"tricks": tricks}}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    cells = expand(parse_spec(spec))
    arms = list(dict.fromkeys(c.arm for c in cells))  # the grid's arm order (baseline first)
    assert arms[0] == "baseline" and len(arms) == 3
    todo = [(c.seed, c.arm) for c in plan(path, tmp_path / "results").todo]
    assert todo == [(0, a) for a in arms] + [(1, a) for a in arms[::-1]] + [(2, a) for a in arms]
    assert sorted(c.run_id for c in paired_in_time(cells)) == sorted(c.run_id for c in cells)


@pytest.mark.slow  # ~25 s: two grids of 8 runs, most of it the runs' fixed costs
def test_cost_ratio_of_an_unchanged_trick_survives_a_load_drift(tmp_path: Path, drifting_task: str) -> None:
    results = tmp_path / "results"
    path = tmp_path / "paired.yaml"
    path.write_text(yaml.safe_dump(_spec("paired")))
    assert main(["run", str(path), "--results", str(results), "--no-progress", "--executor", "debug",
                 "--no-report"]) == 0  # fmt: skip
    assert LOAD["steps"] == 64
    paired = _time_ratio(results / "paired")
    print(f"time ratio of an unchanged trick under a 3x load ramp: paired in time {paired:.3f}×", end="")
    assert abs(paired - 1) < 0.10, paired

    # the control: the same grid run arm by arm (baseline seeds first), under the same ramp
    LOAD["steps"] = 0
    launch = plan(path, results, ["grid=armwise"])
    arm_major = expand(launch.spec)  # the grid's own order: arms outer, seeds inner
    assert [c.arm for c in arm_major] == ["baseline"] * 4 + ["+no_weight_decay"] * 4
    write_grid_spec(launch.spec, launch.grid_dir)
    run_debug(arm_major, results, show_progress=False)
    drifted = _time_ratio(results / "armwise")
    print(f", arm by arm {drifted:.3f}×")
    assert drifted > 1.3, drifted  # the drift lands on the trick: the test can fail
