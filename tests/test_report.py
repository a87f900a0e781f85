"""Reports of real (tiny) grids: every section and figure, valid PNGs, a self-contained HTML page.

Grids are trained for real through ``bench run`` (debug executor: the test-only synthetic task
is registered in this process only) with budgets of a few dozen optimizer steps.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
import yaml

from bench import store
from bench.cli import main
from bench.report import terminal_summary, write_report
from bench.runner import write_grid_spec
from bench.spec import parse_spec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SYNTH_TRAIN = {"budget_samples": 1024, "batch_size": 32, "eval_every_samples": 256, "checkpoint_every_samples": 512}
SECTIONS = ["## Summary", "## How to read this report", "### Verdicts", "### Arms", "### Effects on every metric",
            "### Learning curves", "### Stability", "### Cost", "### Outputs"]  # fmt: skip


def _run_grid(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['grid']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    results = tmp_path / "results"
    assert main(["run", str(path), "--results", str(results), "--no-progress", "--executor", "debug"]) == 0
    return results / spec["grid"]


def _figures(gdir: Path) -> list[Path]:
    md = (gdir / "report.md").read_text()
    names = re.findall(r"!\[[^\]]*\]\(figures/([^)]+)\)", md)
    assert names, "the report has no figures"
    return [gdir / "figures" / n for n in names]


def _check_self_contained(gdir: Path, figures: list[Path]) -> str:
    page = (gdir / "report.html").read_text()
    for fig in figures:
        data = fig.read_bytes()
        assert data.startswith(PNG_MAGIC), fig.name
        img = mpimg.imread(str(fig))
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, fig.name
        assert base64.b64encode(data).decode() in page, f"{fig.name} is not embedded in report.html"
    assert page.count("data:image/png;base64,") == len(figures)
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", page), "external reference in report.html"
    assert "<link" not in page and "<script" not in page
    assert "<table>" in page and "|---" not in page  # tables are HTML tables, not markdown text
    return page


def test_one_at_a_time_report_with_divergence(tmp_path: Path, synthetic_task: str) -> None:
    spec = {
        "grid": "report-oaat",
        "design": "one_at_a_time",
        "seeds": 3,
        "tasks": {
            "synthetic": {"params": {"dim": 8}, "train": SYNTH_TRAIN,
                          "tricks": {"ema": {"half_life_samples": 128}, "accumulation": {"micro_batches": 2}}},
            "unstable": {"task": "synthetic", "params": {"dim": 8}, "train": {**SYNTH_TRAIN, "lr": 5.0},
                         "tricks": {"ema": {"half_life_samples": 128}}},
        },
    }  # fmt: skip
    gdir = _run_grid(tmp_path, spec)
    md = (gdir / "report.md").read_text()
    for section in SECTIONS:
        assert section in md, section
    assert "## synthetic" in md and "## unstable" in md
    figures = _figures(gdir)
    for kind in ("forest", "learning_curves", "stability", "cost"):
        assert gdir / "figures" / f"synthetic_{kind}.png" in figures, kind
    _check_self_contained(gdir, figures)
    assert "render_outputs" in md  # the synthetic task draws nothing, and the report says so

    # the numbers in the report are those of the stored runs
    runs = store.load_grid(gdir)
    synth = runs[runs["task"] == "synthetic"].pivot(index="seed", columns="arm", values="metric.test_mse")
    diff = (synth["+ema"] - synth["baseline"]).to_numpy()
    effects = pd.read_csv(gdir / "effects.csv")
    row = effects[
        (effects["task"] == "synthetic") & (effects["term"] == "ema") & (effects["metric"] == "metric.test_mse")
    ]
    assert row["mean"].iloc[0] == pytest.approx(diff.mean())
    assert row["frac_improved"].iloc[0] == pytest.approx(np.mean(diff < 0))
    assert f"| baseline (reference) | 3 / 0 / 0 | {synth['baseline'].mean():.4g} ± " in md

    # every run of the unstable block diverged: counted, excluded from effects, said why
    assert set(runs[runs["task"] == "unstable"]["status"]) == {"diverged"}
    assert "| +ema | 0 / 3 / 0 |" in md
    assert "3 left out because a run diverged" in md

    summary = terminal_summary(gdir)
    lines = summary.splitlines()
    assert lines[0].split()[:3] == ["task", "trick", "verdict"]
    assert any(line.startswith("synthetic") and " ema " in line for line in lines)
    assert any(line.startswith("unstable") for line in lines)


def test_fractional_factorial_report_states_resolution_aliases_and_interactions(
    tmp_path: Path, synthetic_task: str
) -> None:
    spec = {
        "grid": "report-frac",
        "design": "fractional_factorial",
        "fraction": 1,
        "seeds": 2,
        "tasks": {
            "synthetic": {"params": {"dim": 8}, "train": SYNTH_TRAIN,
                          "tricks": {"ema": {"half_life_samples": 128}, "accumulation": {"micro_batches": 2},
                                     "no_weight_decay": None}},
        },
    }  # fmt: skip
    gdir = _run_grid(tmp_path, spec)
    md = (gdir / "report.md").read_text()
    for section in [*SECTIONS, "### Interactions"]:
        assert section in md, section
    assert "resolution **3**" in md
    assert "`no_weight_decay = ema·accumulation`" in md
    assert "ema (+accumulation×no_weight_decay)" in md  # a main effect names the interaction it carries
    figures = _figures(gdir)
    assert gdir / "figures" / "synthetic_interactions.png" in figures
    _check_self_contained(gdir, figures)
    write_report(gdir)  # the same stored runs give the same report (fixed bootstrap seed)
    assert (gdir / "report.md").read_text() == md


def test_report_of_a_grid_with_nothing_finished(tmp_path: Path) -> None:
    spec = parse_spec({"grid": "report-empty", "seeds": 2, "tasks": {"cifar_autoencoder": {"tricks": {"ema": None}}}})
    gdir = tmp_path / "report-empty"
    write_grid_spec(spec, gdir)
    md = write_report(gdir).read_text()
    assert "4 runs (4 pending)" in md
    assert "(no finished runs yet)" in md
    assert "needs more seeds" in terminal_summary(gdir)


def test_cifar_report_draws_each_arms_outputs(tmp_path: Path) -> None:
    spec = {
        "grid": "report-cifar",
        "design": "one_at_a_time",
        "seeds": 1,
        "tasks": {
            "cifar_autoencoder": {
                "params": {"data": "offline", "train_size": 128, "test_size": 64, "width": 4},
                "train": {"budget_samples": 128, "batch_size": 32, "eval_every_samples": 64,
                          "checkpoint_every_samples": 128},
                "tricks": {"ema": {"half_life_samples": 32}},
            }
        },
    }  # fmt: skip
    gdir = _run_grid(tmp_path, spec)
    figures = _figures(gdir)
    outputs = gdir / "figures" / "cifar_autoencoder_outputs.png"
    assert outputs in figures
    for arm in ("baseline", "+ema"):
        assert (gdir / "figures" / f"cifar_autoencoder_outputs_{arm}.png").read_bytes().startswith(PNG_MAGIC)
    _check_self_contained(gdir, figures)
    md = (gdir / "report.md").read_text()
    assert "outputs not drawn" not in md
    assert "needs more seeds" in md  # one seed: no test is possible, and the verdict says so
