"""``bench compare GRID_A GRID_B``: two versions of one grid, paired by task, arm and seed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import compare as compare_mod
from bench import store
from bench.cli import main
from bench.compare import compare_grids
from bench.stats import holm, paired_effect

TRAIN = {"budget_samples": 512, "batch_size": 32, "eval_every_samples": 256, "checkpoint_every_samples": 512}


def _grid(root: Path, name: str, lr: float) -> Path:
    spec = {
        "grid": name,
        "seeds": 3,
        "tasks": {"synthetic": {"params": {"dim": 8}, "train": {**TRAIN, "lr": lr},
                                "tricks": {"ema": {"half_life_samples": 64}}}},
    }  # fmt: skip
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(spec))
    args = ["run", str(path), "--results", str(root / "results"), "--no-progress", "--executor", "debug"]
    assert main([*args, "--no-report"]) == 0
    return root / "results" / name


def test_compare_pairs_by_arm_and_seed(tmp_path: Path, synthetic_task: str, monkeypatch, capsys) -> None:
    a, b = _grid(tmp_path, "cmp-a", 0.05), _grid(tmp_path, "cmp-b", 0.02)  # B: a smaller step size
    cmp = compare_grids(a, b, n_resamples=200)
    prim = cmp.primary().set_index("arm")
    assert list(prim.index) == ["baseline", "+ema"] and set(prim["metric"]) == {"test_mse"}

    runs_a, runs_b = store.load_grid(a), store.load_grid(b)
    p = []
    for arm in ("baseline", "+ema"):
        va = runs_a[runs_a["arm"] == arm].set_index("seed").sort_index()
        vb = runs_b[runs_b["arm"] == arm].set_index("seed").sort_index()
        diffs = (vb["metric.test_mse"] - va["metric.test_mse"]).to_numpy()
        eff = paired_effect(diffs, False, n_resamples=200)
        row = prim.loc[arm]
        assert row["n"] == 3 and row["diff"] == pytest.approx(diffs.mean())
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((eff.ci_low, eff.ci_high))
        ratio = np.exp(np.mean(np.log(vb["cost.train_s_per_sample"] / va["cost.train_s_per_sample"])))
        assert row["time_ratio"] == pytest.approx(ratio)
        p.append(eff.p)
    assert list(prim["p_holm"]) == pytest.approx(list(holm(p)))
    assert set(prim["verdict"]) <= {"B better", "B worse", "same", "unclear"}
    assert cmp.code_changes == []  # the same code trained both

    # the CLI: a table, compare.md and compare.csv in GRID_B
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "B − A [95% CI]" in out and "code parts that differ: none" in out
    assert (b / "compare.md").read_text().count("| synthetic |") == 2
    csv = pd.read_csv(b / "compare.csv")
    assert set(csv["arm"]) == {"baseline", "+ema"} and "fit_r2" not in set(csv["metric"])

    # a grid against its own copy: every arm identical; a changed trick's code is named
    same = tmp_path / "copy"
    shutil.copytree(a, same)
    assert set(compare_grids(a, same, n_resamples=200).rows["verdict"]) == {"identical"}
    real = compare_mod._parts
    monkeypatch.setattr(
        compare_mod, "_parts", lambda g, rid: real(g, rid) | ({"trick ema": "changed"} if g == same else {})
    )
    changed = compare_grids(a, same, n_resamples=200).primary().set_index("arm")["code_changed"]
    assert changed["+ema"] == "trick ema" and changed["baseline"] == ""


def test_compare_refuses_what_is_not_two_versions_of_one_grid(tmp_path: Path, synthetic_task: str, capsys) -> None:
    a = _grid(tmp_path, "cmp-a", 0.05)
    before = sorted(p.name for p in a.iterdir())
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert "not a launched grid" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "grid.yaml").write_text(
        (a / "grid.yaml").read_text().replace("synthetic:", "other_label:\n    task: synthetic")
    )
    assert main(["compare", str(a), str(empty)]) == 2
    assert "no task, arm and seed with a completed run in both" in capsys.readouterr().err
    assert sorted(p.name for p in a.iterdir()) == before and not (empty / "compare.md").exists()
