"""``bench run --until-decisive``: rounds of seeds until every arm is decisive, resumable, plan fixed."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import store
from bench.adaptive import STATE
from bench.cli import main

SPEC = """grid: adaptive
design: one_at_a_time
seeds: 12
tasks:
  synthetic:
    params: {noise_std: 0.5}
    train: {budget_samples: 512, eval_every_samples: 256, checkpoint_every_samples: 512, lr: 0.02}
    tricks:
      ema: {half_life_samples: 64}
      accumulation: {micro_batches: 2}
"""


def _run(tmp_path: Path, *extra: str) -> int:
    spec = tmp_path / "grid.yaml"
    spec.write_text(SPEC)
    return main(["run", str(spec), "--results", str(tmp_path / "results"), "--executor", "debug", "--no-progress",
                 "--no-report", "--until-decisive", "--first-seeds", "3", "--round-seeds", "3", "--margin", "0.25",
                 *extra])  # fmt: skip


def test_rounds_stop_decisive_arms_and_a_relaunch_continues_from_the_store(
    tmp_path: Path, synthetic_task: str, capsys: pytest.CaptureFixture
) -> None:
    assert _run(tmp_path) == 0
    out = capsys.readouterr().out
    gdir = tmp_path / "results" / "adaptive"
    state = store.read_json(gdir / STATE)
    decisions = state["decisions"]["synthetic"]
    assert set(decisions) == {"+ema", "+accumulation"}
    for d in decisions.values():  # every arm ended with a verdict the procedure allows, and says why
        assert d["stop"] and d["verdict"] in ("helps", "hurts", "equivalent", "cap reached") and d["reason"]
    # accumulation without BatchNorm: the same expected gradient (its micro-batches draw other samples): equivalent
    assert decisions["+accumulation"]["verdict"] == "equivalent"
    frame = store.load_grid(gdir)
    per_arm = frame.groupby("arm").size().to_dict()
    assert per_arm["baseline"] == max(per_arm["+ema"], per_arm["+accumulation"])  # the reference runs every seed
    assert state["runs_spent"] == len(frame) < state["runs_fixed_design"] == 36
    assert "runs:" in out and "trained of the 36" in out
    # the rounds trained the spec's seeds in order, a prefix per arm
    for arm, n in per_arm.items():
        assert sorted(frame.loc[frame["arm"] == arm, "seed"]) == list(range(n))

    # a re-launch reaches the same decisions from the store and trains nothing
    before = {p.name for p in (gdir / "runs").iterdir()}
    assert _run(tmp_path) == 0
    assert {p.name for p in (gdir / "runs").iterdir()} == before
    assert store.read_json(gdir / STATE)["decisions"] == state["decisions"]

    # another plan after seeing data is refused: it would void the error guarantee
    capsys.readouterr()
    assert _run(tmp_path, "--round-seeds", "2") == 2
    assert "another plan" in capsys.readouterr().err


def test_adaptive_flags_are_validated(tmp_path: Path, synthetic_task: str, capsys: pytest.CaptureFixture) -> None:
    assert _run(tmp_path, "--first-seeds", "1") == 2
    assert "--first-seeds: 1 is not allowed" in capsys.readouterr().err
    assert _run(tmp_path, "--seeds", "0-3") == 2
    assert "not allowed with --tasks/--tricks/--seeds" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_the_report_of_an_adaptive_grid_leads_with_the_sequential_decisions(
    tmp_path: Path, synthetic_task: str
) -> None:
    from bench.report import write_report

    assert _run(tmp_path) == 0
    gdir = tmp_path / "results" / "adaptive"
    md = write_report(gdir).read_text()
    head = md[: md.index("## Adaptive seeds")]
    assert "## " not in head.replace("# trickbench report", "")  # the decisions come first
    section = md[md.index("## Adaptive seeds") :]
    assert "| synthetic | +ema | helps |" in section and "descriptive only" in section
