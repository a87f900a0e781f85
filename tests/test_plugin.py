"""The example plugin (``examples/plugin``), installed as a user would (``pip install -e examples/plugin``, which
``make test`` does), end to end: registries, ``bench run`` with Ctrl-C and resume, ``bench status`` and
``bench report``, ``bench check`` with the plugin's own baseline, ``bench selftest``, ``bench equiv`` on the
correct and the wrong EMA, names of uninstalled plugins, broken plugins, and ``register_task`` reaching pool
workers.

Takes about a minute and a half on one core (``bench equiv`` with the guide's 10 seeds is the slow part).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from bench import store
from bench.cli import main

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "plugin"
GRID = PLUGIN / "grid.yaml"
GRID_NAME = "plugin-example"
FAST = ["seeds=2"]  # the shipped grid, two seeds (8 runs of ~0.5 s)
# runs long enough (~2-3 s) that Ctrl-C lands mid-training even when the machine is loaded
LONGER = [*FAST, "tasks.mlp_regression.train.budget_samples=65536"]


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    """The tests need the plugin installed in this environment (its entry points), as CI installs it."""
    from importlib import metadata

    try:
        metadata.distribution("trickbench-example-plugin")
    except metadata.PackageNotFoundError:
        pytest.fail(
            "the example plugin is not installed: run `.venv/bin/pip install -e examples/plugin` (make test does)"
        )


def _bench(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _cli(*argv: str | Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.cli", *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


# --- registries -----------------------------------------------------------------------------------


def test_entry_points_register_the_plugins_task_and_tricks() -> None:
    from experiments.registry import get_task, origin, task_names
    from tricks.registry import cards
    from tricks.registry import origin as trick_origin

    assert "mlp_regression" in task_names()
    assert "trickbench-example-plugin" in origin("mlp_regression")
    table = cards()
    assert {"mixup", "example_ema", "example_ema_buggy"} <= set(table)
    assert table["mixup"].role == "task" and table["example_ema"].role == "evaluated_weights"
    assert "entry point 'mixup = trickbench_example.mixup:CARD'" in trick_origin("mixup")
    cls = get_task("mlp_regression")
    assert cls.accepts(table["mixup"]) and cls.accepts(table["ema"]) and not cls.accepts(table["precise_bn"])
    code, out, _ = _bench("list")
    assert code == 0 and out.count("of distribution 'trickbench-example-plugin'") == 4  # 3 tricks and the task
    assert "role: task; applies to: mlp_regression" in out


# --- bench run: train, Ctrl-C, resume, status, report ---------------------------------------------------


def _run_files(results: Path) -> dict[str, tuple[dict, str, dict]]:
    """run_id -> (result.json metrics, train.csv, final weights) of every finished run."""
    out = {}
    for rdir in sorted((results / GRID_NAME / "runs").iterdir()):
        result = store.read_json(rdir / store.RESULT)
        weights = torch.load(rdir / "final_model.pt", weights_only=True)
        out[rdir.name] = (result["metric"], (rdir / "train.csv").read_text(), weights)
    return out


def test_grid_trains_resumes_after_sigint_and_equals_an_uninterrupted_grid(tmp_path: Path) -> None:
    """`bench run examples/plugin/grid.yaml` in a subprocess (local pool), SIGINT once a run is training, the same
    command again: every run completes, equal (metrics, per-step losses, final weights) to an uninterrupted grid."""
    results = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "bench.cli", "run", str(GRID), *LONGER, "--results", str(results), "--jobs", "1"]
    cmd += ["--no-progress", "--no-report"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = results / GRID_NAME / "runs"
    deadline = time.monotonic() + 120
    while not any(runs.glob("*/checkpoint.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # a run is training: its first periodic checkpoint (step 128 of 512) is on disk
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends to the launch
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    statuses = [store.run_status(d) for d in runs.iterdir()]
    assert store.RunStatus.PARTIAL in statuses, statuses  # a run stopped mid-training with a checkpoint
    code, out, _ = _bench("status", results / GRID_NAME)
    assert code == 0 and "partial" in out, out

    again = _cli("run", GRID, *LONGER, "--results", results, "--jobs", "1", "--no-progress", "--no-report")
    assert again.returncode == 0, again.stderr
    assert "8 completed" in _bench("status", results / GRID_NAME)[1]

    code, _, err = _bench(
        "run", GRID, *LONGER, "--results", tmp_path / "straight", "--executor", "debug", "--no-progress", "--no-report"
    )
    assert code == 0, err
    resumed, straight = _run_files(results), _run_files(tmp_path / "straight")
    resumes = [store.read_json(d / store.RESULT)["cost"]["resumes"] for d in runs.iterdir()]
    assert max(resumes) >= 1, resumes  # the interrupted run continued from its checkpoint
    assert resumed.keys() == straight.keys() and len(resumed) == 8
    for run_id, (metrics, losses, weights) in straight.items():
        assert resumed[run_id][0] == metrics, run_id
        assert resumed[run_id][1] == losses, run_id
        assert all(torch.equal(resumed[run_id][2][k], v) for k, v in weights.items()), run_id

    code, _, err = _bench("report", results / GRID_NAME)
    assert code == 0, err
    text = (results / GRID_NAME / "report.md").read_text()
    assert "mlp_regression" in text and "mixup" in text


# --- bench check with the plugin's own baseline ------------------------------------------------------


def test_bench_check_uses_the_plugins_own_regression_grid_and_baseline(tmp_path: Path) -> None:
    from bench import check

    assert "mlp_regression" in check.regression_tasks()
    code, out, err = _bench("check", "--task", "mlp_regression", "--jobs", "1", "--no-progress", "--results", tmp_path)
    assert code == 0, out + err
    assert "mlp_regression: all" in out and "within tolerance" in out
    spec = PLUGIN / "trickbench_example" / "regression.yaml"
    baselines = PLUGIN / "trickbench_example" / "baselines"
    code, out, err = _bench(  # the explicit form, reusing the finished runs
        "check", "--spec", spec, "--baselines", baselines, "--no-progress", "--results", tmp_path
    )
    assert code == 0 and "reusing 10 finished runs" in out, out + err
    # a moved number is caught against the plugin's baseline too
    doc = json.loads((baselines / "mlp_regression.json").read_text())
    doc["arms"]["mixup"]["values"]["metric.test_mse"] *= 1.01
    (tmp_path / "moved").mkdir()
    (tmp_path / "moved" / "mlp_regression.json").write_text(json.dumps(doc))
    code, out, _ = _bench(
        "check", "--spec", spec, "--baselines", tmp_path / "moved", "--no-progress", "--results", tmp_path
    )
    assert code == 1 and "mlp_regression / trick mixup / metric.test_mse" in out


# --- names that are not installed, plugins that are broken ------------------------------------------


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        ({"mlp_regresion": {}}, 'unknown task \'mlp_regresion\'; allowed: cifar_autoencoder, toy_diffusion, rl_policy, '
         'mlp_regression (did you mean "mlp_regression"?)'),
        ({"mlp_regression": {"tricks": ["mixp"]}}, 'unknown trick; allowed: '),
    ],
)  # fmt: skip
def test_a_spec_naming_an_uninstalled_plugin_is_exit_2_with_did_you_mean(
    tmp_path: Path, block: dict, expected: str
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps({"grid": "g", "seeds": 1, "tasks": block}))
    code, _, err = _bench("run", spec, "--results", tmp_path / "results")
    assert code == 2 and expected in err, err
    if "mixp" in str(block):
        assert 'did you mean "mixup"?' in err and "example_ema" in err  # installed plugin names are offered
    assert not (tmp_path / "results").exists()


def _broken_distribution(root: Path, group: str, module_text: str) -> Path:
    """A throwaway distribution on a private path (never installed in the environment): one entry point of
    ``group`` pointing at a module whose import runs ``module_text``."""
    info = root / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\nbroken = broken_mod:THING\n")
    (root / "broken_mod.py").write_text(module_text)
    return root


@pytest.mark.parametrize("group", ["trickbench.tricks", "trickbench.tasks"])
def test_a_plugin_that_raises_on_import_is_named(tmp_path: Path, group: str) -> None:
    path = _broken_distribution(tmp_path, group, "import math\nraise RuntimeError('needs libfoo')\n")
    env = {**os.environ, "PYTHONPATH": f"{path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for argv in (("list",), ("run", GRID, "--dry-run")):
        proc = _cli(*argv, env=env, timeout=120)
        assert proc.returncode == 2, proc
        assert f"entry point 'broken = broken_mod:THING' (group {group}) of distribution 'broken-plugin'" in proc.stderr
        assert "RuntimeError: needs libfoo" in proc.stderr and "broken_mod.py:2" in proc.stderr
        assert "pip uninstall broken-plugin" in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stdout == ""  # nothing printed (or written) before the error


def test_a_broken_entry_point_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process, with an entry point object whose module does not exist (no distribution installed)."""
    from importlib import metadata

    from tricks import plugins

    ep = metadata.EntryPoint(name="ghost", value="no_such_module_xyz:CARD", group="trickbench.tricks")
    monkeypatch.setattr(plugins.metadata, "entry_points", lambda group: [ep] if group == "trickbench.tricks" else [])
    with pytest.raises(plugins.PluginError, match=r"entry point 'ghost = no_such_module_xyz:CARD'.*ModuleNotFound"):
        plugins.entry_point_objects("trickbench.tricks")


# --- bench selftest -----------------------------------------------------------------------------------


def test_selftest_passes_the_plugin_trick_and_rejects_unknown_names() -> None:
    code, out, _ = _bench("selftest", "mixup")
    assert code == 0, out
    rows = [line for line in out.splitlines() if "  PASS" in line or "  FAIL" in line]
    for check in ("card ", "smoke ", "bit-exact resume ", "on ≠ off ", "parameter alpha ", "parameter p "):
        assert any(r.startswith(check) and "  PASS" in r for r in rows), (check, out)
    assert all("  FAIL" not in r for r in rows) and "checks passed" in out
    code, _, err = _bench("selftest", "mixp")
    assert code == 2 and 'did you mean "mixup"?' in err


def test_selftest_fails_a_trick_with_a_dead_parameter(tmp_path: Path) -> None:
    """A card whose build reads a setting and ignores it: `bench selftest` exits 1 naming the parameter."""
    script = textwrap.dedent(
        """
        import sys
        from dataclasses import replace
        from bench.cli import main
        from trickbench_example.ema_copies import CARD, LerpEMA
        from tricks.card import Param
        from tricks.registry import register_trick

        def build(settings, context):
            settings["ignored"]  # read, then ignored: validated but dead
            return LerpEMA(context.model, settings["half_life_samples"], context.samples_per_step)

        DEAD = register_trick(
            replace(CARD, name="dead_ema", params=(*CARD.params, Param("ignored", float, 1.0, "does nothing")),
                    build=build)
        )
        sys.exit(main(["selftest", "dead_ema", "--task", "mlp_regression"]))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc
    assert "parameter ignored" in proc.stdout and "changes nothing" in proc.stdout
    assert "FAILED" in proc.stdout


# --- bench equiv on the correct and the wrong EMA ----------------------------------------------------


@pytest.mark.slow
def test_equiv_calls_the_correct_ema_equivalent_and_flags_the_wrong_one(tmp_path: Path) -> None:
    """With the guide's defaults (10 paired seeds, δ = 0.25 × the baseline's seed SD), in one results folder:
    the baseline and `ema` runs of the first comparison are reused by the second."""
    code, out, err = _bench(
        "equiv", "mlp_regression", "ema", "example_ema", "--executor", "debug", "--results", tmp_path,
        "--no-progress", "--identical-atol", "0",
    )  # fmt: skip
    assert code == 0, out + err
    assert "EQUIVALENT within ±" in out and "identical on every seed" in out
    code, out, err = _bench(
        "equiv", "mlp_regression", "ema", "example_ema_buggy", "--executor", "debug", "--results", tmp_path,
        "--no-progress",
    )  # fmt: skip
    assert code == 1, out + err
    assert "NOT SHOWN EQUIVALENT" in out and "the mean difference itself is outside ±δ" in out
    reports = sorted((tmp_path / "equiv-mlp_regression").glob("equivalence-*.json"))
    docs = {json.loads(p.read_text())["candidate"]: json.loads(p.read_text()) for p in reports}
    right, wrong = docs["example_ema"], docs["example_ema_buggy"]
    assert len(right["seeds"]) == 10 and right["equivalent"] and max(right["max_weight_difference"]) == 0.0
    assert not wrong["equivalent"] and min(wrong["max_weight_difference"]) > 0
    assert wrong["ci"][0] > wrong["delta"]  # the whole interval beyond +δ: the wrong EMA evaluates worse weights
    assert right["delta"] == wrong["delta"]  # the same baseline runs, the same margin


def test_equiv_rejects_bad_input_before_training(tmp_path: Path) -> None:
    cases = [
        (("mlp_regression", "ema", "mixup"), "role"),
        (("mlp_regression", "ema", "exmple_ema"), 'did you mean "example_ema"?'),
        (("mlp_regression", "ema", "example_ema", "refrence.half_life_samples=3"), 'did you mean "reference"?'),
        (("mlp_regression", "ema", "example_ema", "reference.half_lif=3"), 'did you mean "half_life_samples"?'),
        (("mlp_regression", "ema", "example_ema", "--seeds", "1"), "--seeds"),
        (("mlp_regression", "ema", "example_ema", "--delta", "-1"), "--delta"),
    ]
    for argv, needle in cases:
        code, _, err = _bench("equiv", *argv, "--results", tmp_path / "r")
        assert code == 2 and needle in err, (argv, err)
    assert not (tmp_path / "r").exists()


# --- register_task from a launcher script reaches the local pool's workers ------------------------------


LINE_TASK = textwrap.dedent(
    """
            import torch
            from torch import nn
            from experiments.base import Task
            from tricks.card import Param

            class Line(Task):
                name = "line_fit"
                summary = "fit a line"
                params = (Param("slope", float, 2.0, "true slope"),)
                metric = "mse"
                higher_is_better = False
                train_defaults = {"budget_samples": 256, "batch_size": 32, "eval_every_samples": 128,
                                  "checkpoint_every_samples": 128}

                def build_model(self):
                    return nn.Linear(1, 1)

                def batch(self, model, mb):
                    x = torch.randn(mb.size, 1, generator=self.streams.generator("data", mb.step, mb.index))
                    return x, self.p["slope"] * x

                def loss(self, model, batch, mb):
                    x, y = batch
                    return ((model(x) - y) ** 2).mean(), {}

                def evaluate(self, model, final):
                    x = torch.linspace(-1, 1, 64)[:, None]
                    return {"mse": float(((model(x) - self.p["slope"] * x) ** 2).mean())}
    """
)  # a task registered in code (no entry point), written to a module file by the tests


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_register_task_in_a_launcher_reaches_pool_workers(tmp_path: Path, start: str) -> None:
    """Tasks registered in code (no entry point) train in the local executor's workers, forked (Linux, CPU: the
    default) or spawned (CUDA, other platforms): one from an importable module, one defined in the launching
    script (registered under its `__main__` guard)."""
    (tmp_path / "line_task.py").write_text(LINE_TASK)
    grid = {"grid": "line", "seeds": 2, "tasks": {"line_fit": {"tricks": ["example_ema"]}, "steep_fit": {}}}
    (tmp_path / "grid.yaml").write_text(json.dumps(grid))
    (tmp_path / "launch.py").write_text(
        textwrap.dedent(
            """
            import sys
            from bench.cli import main
            from experiments.registry import register_task
            from line_task import Line

            class Steep(Line):  # defined in the launching script itself
                name = "steep_fit"

            if __name__ == "__main__":
                register_task(Line)
                register_task(Steep)
                sys.exit(main(["run", "grid.yaml", "--jobs", "2", "--no-progress", "--no-report"]))
            """
        )
    )
    env = os.environ | {"TRICKBENCH_WORKER_START": start}
    proc = subprocess.run(
        [sys.executable, "launch.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc
    assert "trained: 6 completed" in proc.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers")
def test_a_task_defined_where_nothing_can_import_it_reaches_forked_workers(tmp_path: Path) -> None:
    """A task class made at run time (as in a notebook cell: no module a worker could import it from) trains in
    the local pool's forked workers, which inherit it from the launching process."""
    (tmp_path / "line_task.py").write_text(LINE_TASK)
    (tmp_path / "grid.yaml").write_text(json.dumps({"grid": "cell", "seeds": 2, "tasks": {"cell_fit": {}}}))
    (tmp_path / "launch.py").write_text(
        textwrap.dedent(
            """
            import sys
            from bench.cli import main
            from experiments.registry import register_task
            from line_task import Line

            def notebook_cell():
                return type("CellFit", (Line,), {"name": "cell_fit"})  # nowhere importable

            if __name__ == "__main__":
                register_task(notebook_cell())
                sys.exit(main(["run", "grid.yaml", "--jobs", "2", "--no-progress", "--no-report"]))
            """
        )
    )
    env = os.environ | {"TRICKBENCH_WORKER_START": "fork"}
    proc = subprocess.run(
        [sys.executable, "launch.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc
    assert "trained: 2 completed" in proc.stdout
