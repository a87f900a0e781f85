"""Damaged results and checkpoints: found, named, left out, moved aside and retrained — never trusted,
never a reason to stop ``bench run``, ``bench status`` or ``bench report`` for the rest of a grid.

Everything trains the test-only synthetic task for real (a few optimizer steps per run).
"""

from __future__ import annotations

import gc
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from bench import checkpoints, store
from bench.cli import main
from bench.grid import Cell, expand
from bench.loop import RunContext, train
from bench.runner import write_grid_spec
from bench.spec import load_spec, parse_spec
from bench.stats import COST_COLUMNS, analyze_grid

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"budget_samples": 256, "batch_size": 32, "eval_every_samples": 128, "checkpoint_every_samples": 128}
TRICKS = {"ema": {"half_life_samples": 64}, "no_weight_decay": None}


def _spec(grid: str, seeds: int, tricks: dict | None = None, train_cfg: dict | None = None) -> dict:
    return {
        "grid": grid,
        "design": "one_at_a_time",
        "seeds": seeds,
        "tasks": {"synthetic": {"params": {"dim": 4}, "train": train_cfg or TRAIN, "tricks": tricks or {}}},
    }


def _write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / f"{spec['grid']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _bench_run(spec_path: Path, results: Path, *extra: str) -> int:
    return main(["run", str(spec_path), "--results", str(results), "--no-progress", "--executor", "debug", *extra])


@pytest.fixture(autouse=True)
def _frozen_heap() -> Iterator[None]:
    """Freeze the objects alive now out of the garbage collector's sight: every run starts with a full
    ``gc.collect()`` (bench.memory), which in a pytest process that has imported torch costs ~0.3 s a run."""
    gc.freeze()
    yield
    gc.unfreeze()


# --- the corruption matrix ------------------------------------------------------------------------------------


def zero(path: Path, other: Path) -> None:
    path.write_bytes(b"")


def truncated(path: Path, other: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbled(path: Path, other: Path) -> None:  # same size: only a hash can tell
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = b'#~{]\x00\xff"['
    path.write_bytes(bytes(data))


def deleted(path: Path, other: Path) -> None:
    path.unlink()


def directory(path: Path, other: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


def missing_fields(path: Path, other: Path) -> None:  # valid JSON, a required field gone
    obj = json.loads(path.read_text())
    del obj[{"result.json": "metric", "config.json": "seed", "state.json": "state"}[path.name]]
    path.write_text(json.dumps(obj))


def edited_value(path: Path, other: Path) -> None:  # valid JSON, every field there, one number changed
    obj = json.loads(path.read_text())
    if path.name == "result.json":
        obj["metric"]["test_mse"] *= 0.5
    else:
        obj["seed"] += 1
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def missing_rows(path: Path, other: Path) -> None:  # valid CSV, its last row gone
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


def other_run(path: Path, other: Path) -> None:
    shutil.copyfile(other / path.name, path)


Damage = Callable[[Path, Path], None]
JSON_KINDS: list[Damage] = [zero, truncated, garbled, deleted, directory, missing_fields, edited_value, other_run]
CSV_KINDS: list[Damage] = [zero, truncated, garbled, deleted, directory, missing_rows, other_run]
PT_KINDS: list[Damage] = [zero, truncated, garbled, deleted, directory, other_run]
DAMAGING = (
    [("config.json", k) for k in JSON_KINDS]
    + [("result.json", k) for k in JSON_KINDS]
    + [(name, k) for name in ("curve.csv", "train.csv") for k in CSV_KINDS]
    + [("final_model.pt", k) for k in PT_KINDS]
)
# state.json is the worker's heartbeat, not a result: its damage changes nothing a finished run reports
HARMLESS = [("state.json", k) for k in JSON_KINDS if k is not edited_value]


@pytest.mark.slow  # ~15 s of CPU: 45 runs trained, 36 of them twice, two reports
def test_every_damaged_file_is_named_left_out_moved_aside_and_retrained(
    tmp_path: Path, synthetic_task: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # ~80 runs are trained here; durability is not the subject
    cases = DAMAGING + HARMLESS
    seeds = -(-(len(cases) + 1) // 3)  # three arms; one run left undamaged at least
    spec_path, results = _write_spec(tmp_path, _spec("integrity", seeds, TRICKS)), tmp_path / "results"
    assert _bench_run(spec_path, results, "--no-report") == 0
    gdir = results / "integrity"
    reference = tmp_path / "reference"
    shutil.copytree(gdir, reference)
    ids = [c.run_id for c in expand(load_spec(spec_path))]
    damaged: dict[str, tuple[str, str]] = {}
    for i, (name, damage) in enumerate(cases):
        rdir, other = gdir / "runs" / ids[i], gdir / "runs" / ids[i + 1]
        damage(rdir / name, other)
        if name != "state.json":
            damaged[ids[i]] = (name, damage.__name__)
    kept = {rid: (gdir / "runs" / rid / "result.json").read_bytes() for rid in ids if rid not in damaged}
    capsys.readouterr()

    # status: exit 0, every damaged run named with the file and why; the rest completed
    assert main(["status", str(gdir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"{len(ids) - len(damaged)} completed, {len(damaged)} damaged" in out[0]
    rows = {line.split()[0]: line for line in out[1:]}
    for rid, (name, kind) in damaged.items():
        assert " damaged " in rows[rid] and name in rows[rid], (name, kind, rows[rid])
    for rid in kept:
        assert " completed " in rows[rid], rows[rid]

    # report: exit 0, the damaged runs named (terminal and report.md) and left out of the analysis
    assert main(["report", str(gdir)]) == 0
    printed = capsys.readouterr().out
    md = (gdir / "report.md").read_text()
    assert f"{len(damaged)} damaged runs left out of this analysis" in md
    for rid, (name, kind) in damaged.items():
        line = next(x for x in printed.splitlines() if x.startswith(f"damaged run left out: {rid} "))
        assert name in line, (kind, line)
        assert rid in md
    summary = pd.read_csv(gdir / "summary.csv")
    assert (summary["status"] == "damaged").sum() == len(damaged)
    assert summary.loc[summary["status"] == "damaged", "metric.test_mse"].isna().all()

    # left out exactly: the analysis is that of the same grid without the damaged runs
    without = tmp_path / "without"
    shutil.copytree(reference, without)
    for rid in damaged:
        shutil.rmtree(without / "runs" / rid)
    got, want = analyze_grid(gdir), analyze_grid(without)
    assert set(got.damaged) == set(damaged) and not want.damaged
    for a, b in zip(got.tasks, want.tasks, strict=True):
        pd.testing.assert_frame_equal(a.effects.drop(columns="seeds"), b.effects.drop(columns="seeds"))

    # run: exactly the damaged runs are moved aside (kept) and retrained; the rest are not touched
    assert _bench_run(spec_path, results) == 0
    printed = capsys.readouterr().out
    assert f"{len(damaged)} to train" in printed
    quarantine = gdir / store.QUARANTINE
    assert {p.name for p in quarantine.iterdir() if p.is_dir()} == {f"{rid}.1" for rid in damaged}
    for rid in damaged:
        assert json.loads((quarantine / f"{rid}.1.json").read_text())["reason"]
    for rid, data in kept.items():
        assert (gdir / "runs" / rid / "result.json").read_bytes() == data
    assert set(store.load_grid(gdir)["status"]) == {"completed"}
    for rid in damaged:  # retrained bit for bit
        for name in ("curve.csv", "train.csv", "final_model.pt", "config.json"):
            assert (gdir / "runs" / rid / name).read_bytes() == (reference / "runs" / rid / name).read_bytes()
    # the final report's effects are those of the undamaged grid (analysed the way write_report writes them)
    # (but for the cost ratios: the retrained runs' timings are new measurements)
    undamaged = analyze_grid(reference)
    expected = pd.concat([ts.effects.assign(task=ts.label) for ts in undamaged.tasks]).drop(columns="seeds")
    assert not undamaged.damaged and len(expected) > 0
    pd.testing.assert_frame_equal(
        pd.read_csv(gdir / "effects.csv").drop(columns=COST_COLUMNS),
        pd.read_csv(io.StringIO(expected.to_csv(index=False))).drop(columns=COST_COLUMNS),
    )


def test_large_artefacts_are_hashed_lazily_once(tmp_path: Path, synthetic_task: str, monkeypatch) -> None:
    """Big files are checked by size on every status and hashed when a grid is read for analysis (or
    before a launch), each content once per process; a same-size change is caught there."""
    spec_path, results = _write_spec(tmp_path, _spec("lazy", 1)), tmp_path / "results"
    assert _bench_run(spec_path, results, "--no-report") == 0
    (rid,) = (p.name for p in (results / "lazy" / "runs").iterdir())
    rdir = results / "lazy" / "runs" / rid
    monkeypatch.setattr(store, "SMALL_BYTES", 0)  # every artefact counts as large
    garbled(rdir / "final_model.pt", rdir)
    calls = []  # files hashed (a file's hash starts empty and is fed in chunks; result.json's digest is not)
    real = store.hashlib.sha256
    monkeypatch.setattr(store.hashlib, "sha256", lambda *a: (None if a else calls.append(1)) or real(*a))
    assert store.check_run(rdir) == store.RunCheck(store.RunStatus.COMPLETED)  # size only
    assert calls == []
    deep = store.check_run(rdir, deep=True)
    assert deep.status == store.RunStatus.DAMAGED and "final_model.pt" in deep.reason and "SHA-256" in deep.reason
    hashed = len(calls)
    assert hashed >= 1 and store.check_run(rdir, deep=True) == deep and len(calls) == hashed  # cached
    assert _bench_run(spec_path, results, "--no-report") == 0  # verified deeply at launch: moved aside, retrained
    assert (results / "lazy" / store.QUARANTINE / f"{rid}.1").is_dir()
    assert store.check_run(rdir, deep=True).status == store.RunStatus.COMPLETED


def test_damaged_files_of_unfinished_runs(tmp_path: Path) -> None:
    rdir = tmp_path / ("ab" * 8)
    rdir.mkdir()
    assert store.check_run(rdir).status == store.RunStatus.PENDING
    (rdir / "checkpoint.prev.pt").write_bytes(b"x")
    assert store.check_run(rdir).status == store.RunStatus.PARTIAL  # the latest is missing: the previous resumes
    (rdir / "error.json").write_text('{"error": "boom"')
    check = store.check_run(rdir)
    assert check.status == store.RunStatus.DAMAGED and "error.json is not valid JSON" in check.reason
    (rdir / "error.json").write_text(json.dumps({"error": "boom", "traceback_tail": []}))
    assert store.check_run(rdir).status == store.RunStatus.FAILED
    (rdir / "config.json").write_text(json.dumps({"run_id": "cd" * 8}))
    assert "config.json lacks required fields" in store.check_run(rdir).reason
    moved = store.quarantine_run(rdir, "test")
    assert moved == tmp_path.parent / store.QUARANTINE / f"{'ab' * 8}.1" and (moved / "error.json").exists()
    assert not rdir.exists() and store.check_run(rdir).status == store.RunStatus.PENDING


def test_damaged_state_of_an_unfinished_run_never_stops_status_or_run(
    tmp_path: Path, synthetic_task: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec_path, results = _write_spec(tmp_path, _spec("state", 1, TRICKS)), tmp_path / "results"
    spec = load_spec(spec_path)
    write_grid_spec(spec, results / "state")
    cell = expand(spec)[0]
    rdir = store.run_dir(results, "state", cell.run_id)
    assert train(cell, rdir, RunContext(threads=1, max_steps=2))["status"] == "interrupted"
    for text in ("", "{", "[1, 2]", '{"state": "running", "pid": "x", "updated": "soon", "attempts": "2"}'):
        (rdir / "state.json").write_text(text)
        assert main(["status", str(results / "state")]) == 0, text
        row = next(x for x in capsys.readouterr().out.splitlines() if cell.run_id in x)
        assert " partial " in row, (text, row)
    assert _bench_run(spec_path, results, "--no-report") == 0
    assert store.read_json(rdir / "state.json")["attempts"] == 1
    assert store.check_run(rdir).status == store.RunStatus.COMPLETED


# --- checkpoints --------------------------------------------------------------------------------------------

CKPT_TRAIN = {"budget_samples": 1024, "batch_size": 32, "eval_every_samples": 256, "checkpoint_every_samples": 128}


def _cell(seed: int = 0) -> Cell:
    spec = parse_spec(_spec("ckpt", 1, {"ema": {"half_life_samples": 64}}, CKPT_TRAIN) | {"seeds": [seed]})
    return next(c for c in expand(spec) if c.tricks_on)  # the +ema arm: optimizer and EMA state both resume


def _same_run(a: Path, b: Path) -> None:
    for name in ("curve.csv", "train.csv", "final_model.pt"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert store.read_json(a / "result.json")["metric"] == store.read_json(b / "result.json")["metric"]


KILLER = """
import json, os, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
from experiments.registry import register_task
from tests.synthetic_task import Synthetic
register_task(Synthetic)
from bench import checkpoints
from bench.grid import Cell
from bench.loop import RunContext, train

writes = []
real = checkpoints._write_all

def write_half_then_die(fh, data):
    writes.append(1)
    if len(writes) == 3:  # the third checkpoint: half written, then SIGKILL (no cleanup runs)
        fh.write(bytes(data[: len(data) // 2]))
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real(fh, data)

checkpoints._write_all = write_half_then_die
train(Cell.from_dict(json.loads(Path(sys.argv[1]).read_text())), Path(sys.argv[2]), RunContext(threads=1))
"""


def test_writer_killed_mid_checkpoint_and_newest_corrupted_resumes_from_previous(
    tmp_path: Path, synthetic_task: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cell = _cell()
    reference = tmp_path / "reference"
    train(cell, reference, RunContext(threads=1))
    spec = parse_spec(_spec("ckpt", 1, {"ema": {"half_life_samples": 64}}, CKPT_TRAIN) | {"seeds": [0]})
    write_grid_spec(spec, tmp_path / "results" / "ckpt")
    rdir = store.run_dir(tmp_path / "results", "ckpt", cell.run_id)
    (tmp_path / "cell.json").write_text(json.dumps(cell.to_dict()))
    (tmp_path / "killer.py").write_text(KILLER.format(root=str(ROOT)))
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "killer.py"), str(tmp_path / "cell.json"), str(rdir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    stale = list(rdir.glob(".checkpoint.pt.*.tmp"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0  # the half-written third checkpoint
    (rdir / ".train.csv.killed.tmp").write_text("step,samples\n")  # another writer's leftover
    assert torch.load(rdir / checkpoints.LATEST, weights_only=True)["state"]["step"] == 8
    assert torch.load(rdir / checkpoints.PREVIOUS, weights_only=True)["state"]["step"] == 4
    _flip_tensor_byte(rdir / checkpoints.LATEST)  # loads without complaint: only the content digest tells

    result = train(cell, rdir, RunContext(threads=1))
    assert result["status"] == "completed" and result["cost"]["resumes"] == 1
    _same_run(rdir, reference)
    assert list(rdir.glob(".*.tmp")) == [] and list(rdir.glob("checkpoint*")) == []
    assert (rdir / store.QUARANTINE / f"1.{checkpoints.LATEST}").exists()  # set aside, not deleted
    (event,) = store.read_json(rdir / store.RECOVERY)
    assert "checkpoint.pt" in event["reason"] and event["action"] == "resumed from checkpoint.prev.pt at step 4"
    capsys.readouterr()
    assert main(["status", str(tmp_path / "results" / "ckpt")]) == 0
    assert "recovered: checkpoint.pt" in capsys.readouterr().out


def _flip_tensor_byte(path: Path) -> None:
    """Change one byte inside the stored model weights (torch.load would load it silently)."""
    payload = torch.load(path, weights_only=True)
    weights = payload["model"]["weight"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = bytes(data).index(weights) + 3
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model"]["weight"].numpy().tobytes() != weights


def _other_runs_checkpoint(path: Path) -> None:
    other = path.parent.parent / "other"
    train(_cell(seed=1), other, RunContext(threads=1, max_steps=3))
    shutil.copyfile(other / checkpoints.LATEST, path)


def _older_format(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    torch.save(payload | {"format": 0}, path)


CHECKPOINT_DAMAGE = [
    (lambda p: zero(p, p), "is empty"),
    (lambda p: truncated(p, p), "cannot be read"),
    (_flip_tensor_byte, "does not match its content digest"),
    (lambda p: directory(p, p), "is a folder"),
    (_other_runs_checkpoint, "belongs to another run"),
    (_older_format, "has format 0"),
]


@pytest.mark.parametrize(
    ("damage", "why"), CHECKPOINT_DAMAGE, ids=["zero", "truncated", "tensor-byte", "folder", "other-run", "format"]
)
def test_damaged_latest_checkpoint_falls_back_to_previous(
    tmp_path: Path, synthetic_task: str, damage: Callable[[Path], None], why: str
) -> None:
    cell = _cell()
    train(cell, tmp_path / "reference", RunContext(threads=1))
    rdir = tmp_path / "run"
    assert train(cell, rdir, RunContext(threads=1, max_steps=10))["status"] == "interrupted"
    damage(rdir / checkpoints.LATEST)
    result = train(cell, rdir, RunContext(threads=1))
    _same_run(rdir, tmp_path / "reference")
    assert result["cost"]["resumes"] == 1
    (event,) = store.read_json(rdir / store.RECOVERY)
    assert why in event["reason"] and event["action"] == "resumed from checkpoint.prev.pt at step 8", event
    assert why in store.run_notes(rdir)


def test_both_checkpoints_damaged_restart_cleanly(tmp_path: Path, synthetic_task: str) -> None:
    cell = _cell()
    train(cell, tmp_path / "reference", RunContext(threads=1))
    rdir = tmp_path / "run"
    train(cell, rdir, RunContext(threads=1, max_steps=10))
    truncated(rdir / checkpoints.LATEST, rdir)
    _flip_tensor_byte(rdir / checkpoints.PREVIOUS)
    result = train(cell, rdir, RunContext(threads=1))
    _same_run(rdir, tmp_path / "reference")
    assert result["cost"]["resumes"] == 0
    (event,) = store.read_json(rdir / store.RECOVERY)
    assert event["action"] == "restarted from scratch"
    assert "checkpoint.pt cannot be read" in event["reason"] and "checkpoint.prev.pt does not match" in event["reason"]
    aside = sorted(p.name for p in (rdir / store.QUARANTINE).iterdir())
    assert aside == ["1.checkpoint.prev.pt", "1.checkpoint.pt", "1.curve.csv", "1.train.csv"]


class _Evil:
    """Unpickling this calls os.mkdir(marker): what a malicious checkpoint or model file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_pickles_in_a_results_folder_are_never_executed(
    tmp_path: Path, synthetic_task: str, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "pwned"
    spec_path, results = _write_spec(tmp_path, _spec("evil", 1, TRICKS)), tmp_path / "results"
    assert _bench_run(spec_path, results, "--no-report") == 0
    done, partial, _ = (results / "evil" / "runs" / c.run_id for c in expand(load_spec(spec_path)))
    # a finished run whose model file was replaced, and its result.json re-sealed to match (a careful attacker)
    torch.save({"weight": _Evil(marker)}, done / "final_model.pt")
    res = store.read_json(done / "result.json")
    res["artefacts"] = store.artefact_manifest(done)
    store.atomic_write_json(done / "result.json", store.sealed(res))
    # an unfinished run whose checkpoints are a torch file and a raw pickle that would run code
    for name in ("result.json", "curve.csv", "train.csv", "final_model.pt"):
        (partial / name).unlink()
    rid = partial.name
    torch.save({"format": 1, "run_id": rid, "model": _Evil(marker)}, partial / checkpoints.LATEST)
    raw = pickle.dumps({"format": 1, "run_id": rid, "x": _Evil(marker)}, protocol=2)
    (partial / checkpoints.PREVIOUS).write_bytes(raw)
    assert not marker.exists()

    assert main(["status", str(results / "evil")]) == 0
    assert _bench_run(spec_path, results, "--no-report") == 0  # the partial run: both set aside, from scratch
    assert main(["report", str(results / "evil")]) == 0  # the model file: refused when drawing outputs
    assert not marker.exists()
    (event,) = store.read_json(partial / store.RECOVERY)
    assert event["action"] == "restarted from scratch" and "UnpicklingError" in event["reason"]
    assert store.check_run(partial).status == store.RunStatus.COMPLETED
    from bench.report import _render_run

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # the report met it, and went on
        _render_run(done, tmp_path / "outputs.png")
    assert not marker.exists()
