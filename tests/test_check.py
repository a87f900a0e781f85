"""`bench check`: a real re-run against the committed baseline, a perturbed baseline, --update, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest

from bench import check
from bench.cli import main
from bench.spec import applicable_tricks, load_spec
from experiments.registry import get_task

TASK = "cifar_autoencoder"


def _bench(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """One real `bench check` of the CIFAR regression grid against the committed baseline; its runs are kept."""
    root = tmp_path_factory.mktemp("check")
    (root / "baselines").mkdir()
    shutil.copy(check.baseline_path(check.DEFAULT_BASELINES, TASK), root / "baselines")
    code, out, _ = _bench(
        "check", "--task", TASK, "--jobs", "1", "--no-progress", "--results", root / "results",
        "--baselines", root / "baselines",
    )  # fmt: skip
    return root, code, out


def _again(root: Path, *extra: str) -> tuple[int, str, str]:
    """The same check, reusing the finished runs of the fixture (nothing retrains)."""
    return _bench(
        "check", "--task", TASK, "--no-progress", "--results", root / "results", "--baselines", root / "baselines",
        *extra,
    )  # fmt: skip


def test_check_passes_on_committed_baseline(checked: tuple[Path, int, str]) -> None:
    _, code, out = checked
    n_runs = 1 + len(load_spec(check.regression_spec_path(TASK)).tasks[0].tricks)
    assert code == 0, out
    assert f"{TASK}: all " in out and f"values of {n_runs} runs within tolerance" in out
    assert "bench check: OK" in out


def test_perturbed_baseline_fails_naming_task_trick_and_value(checked: tuple[Path, int, str]) -> None:
    root = checked[0]
    path = root / "baselines" / f"{TASK}.json"
    original = path.read_text()
    doc = json.loads(original)
    old = doc["arms"]["ema"]["values"]["metric.test_mse"]
    doc["arms"]["ema"]["values"]["metric.test_mse"] = old * 1.01  # 1 %: beyond both tolerance sets
    doc["arms"]["baseline"]["values"]["stability.loss_spikes"] += 1  # a count: must be equal
    path.write_text(json.dumps(doc))
    try:
        code, out, _ = _again(root)
    finally:
        path.write_text(original)
    assert code == 1
    assert "reusing 13 finished runs" in out
    moved = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert len(moved) == 2, out
    assert moved[0].startswith(f"{TASK} / baseline / stability.loss_spikes: 1 → 0 (must be equal)")
    assert moved[1].startswith(f"{TASK} / trick ema / metric.test_mse: {old * 1.01!r} → {old!r}")
    assert "relative" in moved[1] and "allowed rtol" in moved[1]
    assert "bench check: FAILED" in out


def test_update_rewrites_baseline_and_keeps_tolerances(checked: tuple[Path, int, str]) -> None:
    root = checked[0]
    bdir = root / "update-baselines"
    bdir.mkdir()
    doc = json.loads((root / "baselines" / f"{TASK}.json").read_text())
    real = doc["arms"]["precise_bn"]["values"]["metric.test_psnr"]
    doc["arms"]["precise_bn"]["values"]["metric.test_psnr"] = real + 1.0
    del doc["arms"]["patchwise"]
    doc["tolerances"]["other_platform"]["metric.test_psnr"] = {"rtol": 1e-3, "atol": 0.0}  # hand-tuned: kept
    (bdir / f"{TASK}.json").write_text(json.dumps(doc))

    code, out, _ = _again(root, "--update", "--baselines", str(bdir))
    assert code == 0, out
    assert f"trick precise_bn / metric.test_psnr: {real + 1.0!r} → {real!r}" in out
    assert "trick patchwise / (run): in the regression grid, not in the baseline" in out
    new = json.loads((bdir / f"{TASK}.json").read_text())
    assert new["arms"]["precise_bn"]["values"]["metric.test_psnr"] == real
    assert "patchwise" in new["arms"]
    assert new["tolerances"]["other_platform"]["metric.test_psnr"] == {"rtol": 1e-3, "atol": 0.0}
    assert new["platform"] == check.platform_fingerprint() and new["code_version"]
    assert _again(root, "--baselines", str(bdir))[0] == 0


def test_missing_baseline_is_a_clear_error_before_training(tmp_path: Path) -> None:
    results = tmp_path / "results"
    code, _, err = _bench(
        "check", "--task", TASK, "--no-progress", "--results", results, "--baselines", tmp_path / "none"
    )
    assert code == 2
    assert f"no baseline for task {TASK!r}" in err and "--update" in err and str(tmp_path / "none") in err
    assert not results.exists()  # nothing trained


def test_malformed_tolerances_are_a_clear_error(tmp_path: Path) -> None:
    doc = json.loads(check.baseline_path(check.DEFAULT_BASELINES, TASK).read_text())
    doc["tolerances"]["same_platform"] = {"metric.test_mse": {"rtol": 1e-6, "atol": 0}}  # no "*"
    (tmp_path / f"{TASK}.json").write_text(json.dumps(doc))
    code, _, err = _bench("check", "--task", TASK, "--baselines", tmp_path, "--results", tmp_path / "r")
    assert code == 2 and "same_platform" in err and "'*'" in err


# --- pure parts -----------------------------------------------------------------------------------


def test_compare_rules() -> None:
    tol = {"*": {"rtol": 1e-3, "atol": 1e-9}, "metric.loose": {"rtol": 0.5, "atol": 0.0}}
    base = {
        "arms": {
            "baseline": {"values": {"metric.a": 1.0, "metric.loose": 1.0, "stability.n": 3, "metric.nan": math.nan}},
            "ema": {"values": {"metric.a": 2.0, "status": "completed"}},
        }
    }
    same = {
        "baseline": {"values": {"metric.a": 1.0 + 9e-4, "metric.loose": 1.4, "stability.n": 3, "metric.nan": math.nan}},
        "ema": {"values": {"metric.a": 2.0, "status": "completed"}},
    }
    assert check.compare("t", base, same, tol) == []
    moved = check.compare(
        "t",
        base,
        {
            "baseline": {"values": {"metric.a": 1.0 + 2e-3, "metric.loose": 1.6, "stability.n": 4}},
            "ema": {"values": {"metric.a": 2.0, "status": "diverged", "metric.new": 0.5}},
            "cond_noise": {"values": {}},
        },
        tol,
    )
    found = {(m.arm, m.value) for m in moved}
    assert found == {
        ("baseline", "metric.a"),
        ("baseline", "metric.loose"),
        ("baseline", "stability.n"),  # counts must be equal
        ("baseline", "metric.nan"),  # missing now
        ("ema", "status"),
        ("ema", "metric.new"),  # no baseline
        ("cond_noise", "(run)"),
    }


def test_tolerance_set_follows_the_platform() -> None:
    doc = {"platform": check.platform_fingerprint(), "tolerances": check.DEFAULT_TOLERANCES}
    assert check.tolerance_set(doc)[0] == "same_platform"
    assert check.tolerance_set({**doc, "platform": {**doc["platform"], "cpu_capability": "AVX2-elsewhere"}})[0] == (
        "other_platform"
    )


def _same_source(trick: str, task: str) -> bool:
    """Whether ``trick`` ships with trickbench, or with the distribution ``task`` comes from (not another plugin)."""
    from experiments.registry import BUILTIN_TASKS
    from experiments.registry import origin as task_origin
    from tricks.registry import BUILTIN_MODULES
    from tricks.registry import origin as trick_origin

    where = trick_origin(trick)
    if where in {f"tricks.{m}" for m in BUILTIN_MODULES}:
        return True
    return (
        task not in BUILTIN_TASKS
        and where.split("of distribution")[-1] == task_origin(task).split("of distribution")[-1]
    )


@pytest.mark.parametrize("task", check.regression_tasks())
def test_regression_grid_covers_every_applicable_trick_and_has_a_baseline(task: str) -> None:
    """Every applicable trick of trickbench (and, for a plugin task, of its own distribution) is in the grid."""
    spec = load_spec(check.regression_spec_path(task))
    (ts,) = spec.tasks
    assert spec.design == "one_at_a_time" and len(spec.seeds) == 1
    assert set(ts.tricks) == {t for t in applicable_tricks(get_task(task)) if _same_source(t, task)}
    baseline = json.loads(check.baseline_path(check.baselines_dir(task), task).read_text())
    assert set(baseline["arms"]) == {"baseline", *ts.tricks}
