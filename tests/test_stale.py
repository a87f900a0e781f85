"""Code identity: runs record the fingerprint of the code they trained with; a launch after a code change
finds the stale runs, keeps them apart (not reused silently, not resumed), and ``--rerun-stale`` retrains them."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import store
from bench.cli import main
from bench.fingerprint import module_closure, run_fingerprint, stale_parts

PROBE = '''
"""A plugin-style trick for the staleness test: an evaluated-weights copy of the weights every N steps."""
import copy

from tricks.card import Param, TrickCard


class Snapshot:
    takes_candidates = False

    def __init__(self, model, every):
        self.every, self.steps, self.copy = every, 0, copy.deepcopy(model)

    def after_step(self, model, samples_seen):
        self.steps += 1
        if self.steps % self.every == 0:
            self.copy.load_state_dict(model.state_dict())

    def candidate(self, model, metric, step):
        pass

    def weights(self, model, final):
        return self.copy, False

    def state_dict(self):
        return {"steps": self.steps, "copy": self.copy.state_dict()}

    def load_state_dict(self, state):
        self.steps = state["steps"]
        self.copy.load_state_dict(state["copy"])


def build(settings, context):
    return Snapshot(context.model, settings["every_steps"])


CARD = TrickCard(
    name="stale_probe", summary="evaluate a snapshot", off="o", on="o",
    params=(Param("every_steps", int, 2, "steps between snapshots", low=1),),
    cost="c", effect="e", references=("test",), role="evaluated_weights", build=build,
)
'''


@pytest.fixture
def probe_trick(tmp_path: Path) -> Iterator[Path]:
    """The probe trick in its own module on sys.path, registered in this process (the debug executor)."""
    from tricks.registry import register_trick, unregister_trick

    pkg = tmp_path / "probe_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "probe_trick.py").write_text(PROBE)
    sys.path.insert(0, str(tmp_path))
    module = importlib.import_module("probe_pkg.probe_trick")
    register_trick(module.CARD)
    yield pkg / "probe_trick.py"
    unregister_trick("stale_probe")
    sys.path.remove(str(tmp_path))
    for name in ("probe_pkg.probe_trick", "probe_pkg"):
        sys.modules.pop(name, None)


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(
        "grid: stale\nseeds: 2\ntasks:\n  synthetic:\n"
        "    train: {budget_samples: 256, eval_every_samples: 128, checkpoint_every_samples: 128}\n"
        "    tricks: {stale_probe: {every_steps: 2}}\n"
    )
    return path


def _run(tmp_path: Path, *extra: str) -> int:
    return main(["run", str(_spec(tmp_path)), "--results", str(tmp_path / "results"), "--executor", "debug",
                 "--no-progress", "--no-report", *extra])  # fmt: skip


def test_fingerprint_covers_the_trick_task_and_loop_sources(probe_trick: Path, synthetic_task: str) -> None:
    fp = run_fingerprint({"task": synthetic_task, "tricks": {"stale_probe": {}}})
    assert fp["tricks"]["stale_probe"]["module"] == "probe_pkg.probe_trick"
    assert fp["task"]["module"] == "tests.synthetic_task"
    assert "tricks.ema" in module_closure("experiments.rl_policy")  # the RL task's target network uses it
    probe_trick.write_text(probe_trick.read_text() + "\n# a comment is a change too\n")
    assert stale_parts(fp, run_fingerprint({"task": synthetic_task, "tricks": {"stale_probe": {}}})) == [
        "trick stale_probe"
    ]


def test_a_code_change_is_detected_kept_apart_and_retrained_with_rerun_stale(
    tmp_path: Path, probe_trick: Path, synthetic_task: str, capsys: pytest.CaptureFixture
) -> None:
    assert _run(tmp_path) == 0
    gdir = tmp_path / "results" / "stale"
    runs = sorted((gdir / "runs").iterdir())
    assert len(runs) == 4  # baseline + probe, 2 seeds
    probe_runs = [r for r in runs if "stale_probe" in store.read_json(r / store.CONFIG)["tricks_on"]]
    before = {r.name: (r / store.RESULT).read_bytes() for r in runs}
    capsys.readouterr()

    source = probe_trick.read_text().replace("steps between snapshots", "steps between two snapshots")
    probe_trick.write_text(source)  # edit the trick after the grid finished

    assert _run(tmp_path) == 0  # without --rerun-stale: warned, nothing retrained, nothing mixed in silently
    out = capsys.readouterr().out
    assert "2 runs were trained by other code than this (trick stale_probe changed)" in out
    assert "0 to train" in out and "--rerun-stale" in out
    assert {r.name: (r / store.RESULT).read_bytes() for r in runs} == before
    frame = store.load_grid(gdir)
    assert sorted(frame.loc[frame["stale"], "run_id"]) == sorted(r.name for r in probe_runs)
    assert set(frame.loc[frame["stale"], "stale_parts"]) == {"trick stale_probe"}

    assert _run(tmp_path, "--rerun-stale") == 0
    out = capsys.readouterr().out
    assert "moved aside to stale/ and trained again" in out
    assert sorted(p.name.split(".")[0] for p in (gdir / "stale").iterdir() if p.is_dir()) == sorted(
        r.name for r in probe_runs
    )  # moved aside, never deleted
    frame = store.load_grid(gdir)
    assert not frame["stale"].any() and (frame["status"] == "completed").all()
    for r in runs:
        if r in probe_runs:  # trained again; the old folder is kept whole under stale/
            assert (gdir / "stale" / f"{r.name}.1" / store.RESULT).read_bytes() == before[r.name]
            assert (r / store.RESULT).exists()
        else:  # the baseline runs were not touched
            assert (r / store.RESULT).read_bytes() == before[r.name]
    assert _run(tmp_path) == 0
    assert "runs were trained by other code" not in capsys.readouterr().out


def _every_import(module: str, path: Path) -> set[str]:
    """What a full parse of the module finds (every Import / ImportFrom node): the reference for the line scan."""
    import ast

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return {n for n in names if n}


def test_the_fingerprints_import_scan_finds_every_import_a_full_parse_finds() -> None:
    """The fingerprint parses only the import statements that begin a line (fast); over every first-party module
    and the example plugin it misses nothing a parse of the whole module finds."""
    from bench.fingerprint import _imports

    root = Path(__file__).resolve().parents[1]
    files = [f for pkg in ("bench", "tricks", "experiments", "examples") for f in (root / pkg).rglob("*.py")]
    assert len(files) > 60
    for f in files:
        module = ".".join(f.relative_to(root).with_suffix("").parts)
        missing = _every_import(module, f) - _imports(module, str(f))
        assert not missing, (f, missing)
