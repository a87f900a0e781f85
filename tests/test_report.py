"""Reports of real (tiny) grids: the first screen, every section and figure, per-task metrics, no empty panel
or row, a self-contained HTML page, cached outputs, and no torch import when reporting a finished grid.

Grids are trained for real through ``bench run`` (debug executor: the test-only tasks are registered in
this process only) with budgets of a few dozen optimizer steps. One grid (four task blocks) is trained
once for the module and read by several tests.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from torch import nn

from bench import plots, stats, store
from bench.cli import main
from bench.report import _output_arms, terminal_summary, write_report
from bench.runner import write_grid_spec
from bench.spec import parse_spec
from bench.stats import analyze_grid
from tests.report_checks import check_no_empty_panel_or_row
from tests.synthetic_task import Synthetic

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SYNTH_TRAIN = {"budget_samples": 1024, "batch_size": 32, "eval_every_samples": 256, "checkpoint_every_samples": 512}
TASK_SECTIONS = ["verdicts", "arms", "effects on every metric", "learning curves", "stability", "cost", "outputs"]


class SyntheticMAE(Synthetic):
    """The synthetic regression scored by other metrics: mean absolute error and an R² whose direction only the
    task declares (no word of ``fit_r2`` says which way is better)."""

    name = "synthetic_mae"
    metric = "test_mae"
    higher_is_better = False
    metric_directions = {"fit_r2": True}

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        err = model(self.x_test) - self.y_test
        return {"test_mae": float(err.abs().mean()), "fit_r2": 1.0 - float((err**2).mean() / self.y_test.var())}


@pytest.fixture(scope="module")
def tasks() -> Iterator[None]:
    """The test-only tasks, registered for the whole module (a module-scoped grid trains with them)."""
    from experiments.registry import register_task, unregister_task

    register_task(Synthetic)
    register_task(SyntheticMAE)
    yield
    unregister_task("synthetic")
    unregister_task("synthetic_mae")


def _run_grid(root: Path, spec: dict, *extra: str) -> Path:
    path = root / f"{spec['grid']}.yaml"
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML, without anchors for the shared train blocks
    results = root / "results"
    assert main(["run", str(path), "--results", str(results), "--no-progress", "--executor", "debug", *extra]) == 0
    return results / spec["grid"]


OAAT = {
    "grid": "report-oaat",
    "design": "one_at_a_time",
    "seeds": 3,
    "tasks": {
        "synthetic": {"params": {"dim": 8}, "train": SYNTH_TRAIN,
                      "tricks": {"ema": {"half_life_samples": 128}, "accumulation": {"micro_batches": 2}}},
        "unstable": {"task": "synthetic", "params": {"dim": 8}, "train": {**SYNTH_TRAIN, "lr": 5.0},
                     "tricks": {"ema": {"half_life_samples": 128}}},
        "synthetic_mae": {"params": {"dim": 8}, "train": SYNTH_TRAIN, "tricks": {"ema": {"half_life_samples": 128}}},
        "plain": {"task": "synthetic", "params": {"dim": 4}, "train": SYNTH_TRAIN},  # baseline only
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def oaat(tmp_path_factory: pytest.TempPathFactory, tasks: None) -> Path:
    """A one_at_a_time grid of four blocks: two tricks; an unstable copy whose runs all diverge; a task with
    other metrics; a baseline-only block (as rl_full.yaml's cartpole_target_ema)."""
    return _run_grid(tmp_path_factory.mktemp("oaat"), OAAT)


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
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:|#)""", page), "external reference in report.html"
    assert "<link" not in page and "<script" not in page
    assert "<table" in page and "|---" not in page  # tables are HTML tables, not markdown text
    return page


def test_one_at_a_time_report_with_divergence(oaat: Path) -> None:
    gdir = oaat
    md = (gdir / "report.md").read_text()
    assert "## Answer" in md and "## How to read this report" in md and "**Contents**" in md
    for label in ("synthetic", "unstable", "synthetic_mae"):
        assert f"## {label}" in md
        for section in TASK_SECTIONS:
            assert f"### {label}: {section}" in md, (label, section)
    figures = _figures(gdir)
    for kind in ("forest", "learning_curves", "stability", "cost"):
        assert gdir / "figures" / f"synthetic_{kind}.png" in figures, kind
    assert gdir / "figures" / "overview.png" in figures
    _check_self_contained(gdir, figures)
    assert "render_outputs" in md  # the synthetic task draws nothing, and the report says so
    assert "mixes code versions" not in md  # arms import different tricks: that is not mixed code

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
    assert row["effect_pct"].iloc[0] == pytest.approx(100 * diff.mean() / synth["baseline"].mean())
    for col in ("verdict", "verdict_code", "seeds_needed_low", "seeds_needed_high", "time_ratio", "memory_ratio"):
        assert col in effects, col  # effects.csv carries verdict, seeds needed and cost
    assert row["verdict"].iloc[0] in ("helps", "hurts", "no detectable effect", "needs more seeds")
    assert f"| baseline (reference) | 3 / 0 / 0 | {synth['baseline'].mean():.4g} ± " in md

    # every run of the unstable block diverged: counted, excluded from effects, no verdict, said why
    assert set(runs[runs["task"] == "unstable"]["status"]) == {"diverged"}
    assert "| +ema | 0 / 3 / 0 |" in md
    assert "every seed has a diverged run (3 seed(s))" in md
    assert "**no usable pairs**" in md

    summary = terminal_summary(gdir)
    lines = summary.splitlines()
    assert lines[0].split()[:3] == ["task", "trick", "verdict"]
    assert any(line.startswith("synthetic ") and " ema " in line for line in lines)
    assert any(line.startswith("unstable") and "no usable pairs" in line for line in lines)


def test_each_task_reports_its_own_metrics_and_no_panel_or_row_is_empty(oaat: Path) -> None:
    gs = analyze_grid(oaat, n_resamples=200)
    by = {ts.label: ts for ts in gs.tasks}
    assert list(by["synthetic"].metric_directions) == ["metric.test_mse"]
    # fit_r2's direction comes from result.json (the task declared it); nothing of the other task leaks in
    assert by["synthetic_mae"].metric_directions == {"metric.test_mae": False, "metric.fit_r2": True}
    assert set(by["synthetic"].effects["metric"]) >= {"metric.test_mse"}
    assert not {"metric.test_mae", "metric.fit_r2"} & set(by["synthetic"].effects["metric"])
    assert not {"metric.test_mse"} & set(by["synthetic_mae"].effects["metric"])
    assert by["plain"].baseline_only and not len(by["plain"].effects) and not len(by["plain"].verdicts)

    forest = {
        label: [p["title"] for p in json.loads((oaat / "figures" / f"{label}_forest.json").read_text())["panels"]]
        for label in ("synthetic", "synthetic_mae")
    }
    assert forest == {"synthetic": ["test_mse"], "synthetic_mae": ["test_mae", "fit_r2"]}
    assert not (oaat / "figures" / "unstable_forest.png").exists()  # no pair: no forest, and no empty one
    report = check_no_empty_panel_or_row(oaat)
    arms = next(t for t in report["tables"] if t["section"] == "synthetic_mae: arms")
    assert arms["header"][2:4] == ["test_mae", "fit_r2"]

    md = (oaat / "report.md").read_text()
    assert "**baseline-only block** (no tricks to compare): test_mse = " in md
    assert "### plain: arms" in md and "### plain: learning curves" in md and "### plain: verdicts" not in md


def test_first_screen_is_sorted_coloured_and_the_page_has_contents_and_vector_figures(oaat: Path) -> None:
    report = json.loads((oaat / "report.json").read_text())
    first = report["tables"][0]
    assert first["section"] == "synthetic: test_mse, lower is better"
    pct = [float(re.match(r"([+-][\d.e+-]+)%", row[2]).group(1)) for row in first["rows"]]
    assert pct == sorted(pct)  # lower is better: the largest decrease first
    ts = next(t for t in analyze_grid(oaat, n_resamples=200).tasks if t.label == "synthetic")
    assert [r[0] for r in first["rows"]] == list(ts.verdicts.sort_values("effect_pct")["term"])

    page = (oaat / "report.html").read_text()
    answer, details = page.index("id='answer'"), page.index("id='how-to-read-this-report'")
    assert answer < page.index("<table class='summary'") < page.index("<nav class='toc'>") < details
    for cls in ts.verdicts["verdict_class"]:
        assert f"<td class='v-{cls.replace(' ', '-')}'>" in page
    toc = page[page.index("<nav class='toc'>") : page.index("</nav>")]
    for anchor in re.findall(r"<h[23] id='([^']+)'", page[details - 40 :]):
        assert f"href='#{anchor}'" in toc, anchor
    text = re.sub(r"<[^>]+>", "", page)
    assert not re.search(r"(?<![\w*])\*[^*\s][^*\n]*\*", text), "markdown emphasis left in the HTML text"
    assert "<i>s</i>" in page  # "Seed *s*" became italics

    for name in ("overview", "synthetic_forest", "synthetic_cost", "synthetic_stability", "synthetic_learning_curves"):
        assert (oaat / "figures" / f"{name}.svg").read_text().lstrip().startswith("<?xml"), name
        assert f"(figures/{name}.png) ([SVG](figures/{name}.svg))" in (oaat / "report.md").read_text()


def test_report_of_a_finished_grid_imports_no_torch_and_no_task_module(oaat: Path, tmp_path: Path) -> None:
    gdir = tmp_path / "copy"
    shutil.copytree(oaat, gdir)
    for name in ("report.md", "report.html", "effects.csv"):
        (gdir / name).unlink()
    code = (
        "import sys\nfrom bench.cli import main\nrc = main(['report', sys.argv[1]])\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'experiments'))\n"
        "print('RESULT', rc, bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(gdir)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT 0 []" in out.stdout, out.stdout[-3000:]
    assert (gdir / "report.html").read_text().count("<table") > 10
    # the same report as the one written in the training process (directions from result.json, not the class)
    assert (gdir / "report.md").read_text() == (oaat / "report.md").read_text()


def test_out_of_spec_runs_and_mixed_code_are_said(oaat: Path, tmp_path: Path, monkeypatch) -> None:
    results = tmp_path / "results"
    shutil.copytree(oaat, results / OAAT["grid"])
    spec = tmp_path / "oaat.yaml"
    spec.write_text(json.dumps(OAAT, indent=1))
    args = ["run", str(spec), "seeds=2", "--results", str(results), "--no-progress", "--executor", "debug"]
    assert main([*args, "--no-report"]) == 0  # the spec shrank: nothing to train, seed 2's runs stay on disk
    gdir = results / OAAT["grid"]
    gs = analyze_grid(gdir, n_resamples=200)
    arms = 3 + 2 + 2 + 1  # synthetic, unstable, synthetic_mae, plain
    assert gs.out_of_spec == arms and gs.n_cells == 2 * arms
    store.write_summary(gdir)
    summary = pd.read_csv(gdir / "summary.csv")  # the file a user reads, as pandas reads it
    assert int(summary["in_spec"].sum()) == gs.n_cells == len(gs.runs)  # the pandas view and the report agree
    assert int((~summary["in_spec"].astype(bool)).sum()) == gs.out_of_spec
    md = write_report(gdir, gs).read_text()
    assert f"{arms} runs in this folder belong to an earlier version of the spec" in md

    # the +ema runs trained by older code (as load_grid marks them): said at the top and at those tricks
    real = store.load_grid

    def load_grid(path: Path) -> pd.DataFrame:
        df = real(path)
        old = df["arm"] == "+ema"
        df.loc[old, "stale"], df.loc[old, "stale_parts"] = True, "trick ema"
        return df

    monkeypatch.setattr(store, "load_grid", load_grid)
    md = write_report(gdir).read_text()
    assert "**synthetic: this comparison mixes code versions** (2 runs trained by other code than today's " in md
    assert "(trick ema changed): `bench run --rerun-stale` retrains them" in md
    assert "| ema ⚠ mixed code |" in md
    assert "accumulation ⚠" not in md  # its runs are all of today's code
    assert "⚠ some comparisons mix code versions" in terminal_summary(gdir)
    monkeypatch.setattr(store, "load_grid", real)

    # seed 1 trained by another loop: two versions of one part among the runs compared (runs of different arms
    # differ in the tricks they import, which is no mixing: the grid as trained reports none)
    parts_of = stats._code_parts_of

    def code_parts_of(gdir: Path, runs: pd.DataFrame) -> list[dict[str, str]]:
        return [p | {"loop": "0ldl00p"} if s == 1 else p for p, s in zip(parts_of(gdir, runs), runs["seed"])]

    monkeypatch.setattr(stats, "_code_parts_of", code_parts_of)
    md = write_report(gdir).read_text()
    assert "**synthetic: this comparison mixes code versions** (2 versions of loop)" in md
    assert "| accumulation ⚠ mixed code |" in md


def test_fractional_factorial_report_states_resolution_aliases_and_interactions(tmp_path: Path, tasks: None) -> None:
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
    for section in [*TASK_SECTIONS, "interactions"]:
        assert f"### synthetic: {section}" in md, section
    assert "resolution **3**" in md
    assert "`no_weight_decay = ema·accumulation`" in md
    assert "ema (+accumulation×no_weight_decay)" in md  # a main effect names the interaction it carries
    figures = _figures(gdir)
    assert gdir / "figures" / "synthetic_interactions.png" in figures
    _check_self_contained(gdir, figures)
    check_no_empty_panel_or_row(gdir)
    write_report(gdir)  # the same stored runs give the same report
    assert (gdir / "report.md").read_text() == md


def test_report_of_a_grid_with_nothing_finished(tmp_path: Path) -> None:
    spec = parse_spec({"grid": "report-empty", "seeds": 2, "tasks": {"cifar_autoencoder": {"tricks": {"ema": None}}}})
    gdir = tmp_path / "report-empty"
    write_grid_spec(spec, gdir)
    md = write_report(gdir).read_text()
    assert "4 runs (4 pending)" in md
    assert "(no finished runs yet)" in md
    assert "**No verdicts: no usable pairs.**" in md  # a grid without a completed pair gets no verdicts
    assert "no usable pairs" in terminal_summary(gdir) and "needs more seeds" not in terminal_summary(gdir)


def test_cifar_report_draws_each_arms_outputs_once(tmp_path: Path, monkeypatch) -> None:
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
    assert "too few seeds" in md  # one seed: no test is possible, and the first screen says so
    cached = sorted(gdir.glob("runs/*/outputs.png"))
    assert len(cached) == 2
    before = {p: p.read_bytes() for p in cached}

    def no_render(*args: object) -> bool:
        raise AssertionError("the outputs were drawn again")

    monkeypatch.setattr("bench.report._render_run", no_render)
    md = write_report(gdir).read_text()  # from the cached pictures: no model is rebuilt
    assert "outputs not drawn" not in md and outputs in _figures(gdir)
    assert {p: p.read_bytes() for p in cached} == before


def test_outputs_figures_page_every_arm(tmp_path: Path) -> None:
    panels = []
    for i in range(11):
        path = tmp_path / f"arm{i}.png"
        plt.imsave(path, np.full((20, 30, 3), i / 11.0))
        panels.append((f"+trick{i}", path))
    pages = plots.outputs_figures(panels, tmp_path / "task_outputs.png", "outputs", per_page=8)
    assert [p.name for p in pages] == ["task_outputs.png", "task_outputs_2.png"]
    drawn = [p["title"] for page in pages for p in json.loads(page.with_suffix(".json").read_text())["panels"]]
    assert drawn == [c for c, _ in panels]  # every arm, in order, none dropped


def test_output_arms_are_every_arm_of_the_design(tasks: None) -> None:
    from bench.grid import design_arms
    from bench.stats import analyze_task

    tricks = [f"t{i}" for i in range(10)]
    ts = analyze_task(pd.DataFrame(), label="x", task="x", design="one_at_a_time", tricks=tricks, metric="m",
                      higher_is_better=True)  # fmt: skip
    assert _output_arms(ts) == [a for a, _ in design_arms("one_at_a_time", tricks)]  # 11 arms, none dropped


def test_ratio_ticks_are_few_and_readable() -> None:
    assert plots.ratio_ticks(0.45, 2.2) == [0.5, 1.0, 2.0]
    wide = plots.ratio_ticks(0.01, 100.0)
    assert wide == [0.01, 0.1, 1.0, 10.0, 100.0]
    huge = plots.ratio_ticks(1e-6, 1e6)
    assert len(huge) <= 7 and 1.0 in huge
    assert plots.ratio_ticks(0.05, 20.0) == [0.1, 0.3, 1.0, 3.0, 10.0]
    assert [plots._ratio_label(t) for t in plots.ratio_ticks(0.45, 2.2)] == ["0.5×", "1×", "2×"]


def test_learning_curve_ends_with_the_intermediate_estimator(tmp_path: Path) -> None:
    """toy_diffusion measures its final swd on 4× the intermediate sample (another estimator): the curve's
    last point is the final weights measured like the intermediate points; result.json keeps the final one."""
    import torch

    from bench.loop import build_task
    from bench.seeds import SeedBundle

    spec = {
        "grid": "curve",
        "seeds": 1,
        "tasks": {
            "toy_diffusion": {
                "params": {"data": "moons", "hidden": 16, "depth": 2, "sampling_steps": 4,
                           "eval_samples_per_class": 64, "final_samples_per_class": 256, "num_projections": 16},
                "train": {"budget_samples": 1024, "batch_size": 64, "eval_every_samples": 512,
                          "checkpoint_every_samples": 1024},
            }
        },
    }  # fmt: skip
    gdir = _run_grid(tmp_path, spec, "--no-report")
    (rdir,) = (gdir / "runs").iterdir()
    curve = pd.read_csv(rdir / "curve.csv")
    result = store.read_json(rdir / "result.json")
    meta = store.read_json(rdir / "config.json")
    task, _ = build_task(meta["config"], SeedBundle(meta["seed"]), torch.device("cpu"))
    model = task.build_model()
    model.load_state_dict(torch.load(rdir / "final_model.pt", weights_only=True))
    model.eval()
    with torch.no_grad():
        intermediate, final = task.evaluate(model, final=False), task.evaluate(model, final=True)
    assert curve["swd"].iloc[-1] == pytest.approx(intermediate["swd"], rel=1e-6)
    assert result["metric"]["swd"] == pytest.approx(final["swd"], rel=1e-6)
    assert intermediate["swd"] != pytest.approx(final["swd"], rel=1e-3)  # two estimators: the test can tell
    assert result["metric_directions"]["class_fidelity"] is True
