"""The wandb mirror: real wandb (offline, or online against a closed port), never a mock.

The offline run files are read back with wandb's own record definitions
(``wandb.proto.wandb_internal_pb2.Record``). wandb 0.31 ships no Python reader for its
``.wandb`` transaction log (the writer lives in the Go ``wandb-core``), so ``_records`` below
implements the framing: the leveldb-log layout wandb uses — a 7-byte file header
(``:W&B``, magic 0xBEE1, version 0), 32 KiB blocks, 7-byte record headers (CRC-32 over
type byte + data, length, type FULL/FIRST/MIDDLE/LAST) — and checks every CRC.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from bench import store, tracking
from bench.cli import main
from bench.executors.worker import run_one
from bench.loop import RunContext, train
from bench.runner import grid_cells
from tests.test_loop import cell_for

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

OFFLINE = {"enabled": True, "project": "trickbench-tests", "mode": "offline"}
# 64 steps of 32 samples; evaluations after steps 15, 31, 47, 63; checkpoints at the same boundaries
SYN_TRAIN = {"budget_samples": 2048, "batch_size": 32, "eval_every_samples": 512, "checkpoint_every_samples": 512}
EVAL_STEPS = [15, 31, 47, 63]


def _records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a wandb transaction log"
    out, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a record header never straddles a block: the tail is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at byte {pos} of {path}"
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def _offline_runs(run_dir: Path, expect: int, timeout_s: float = 10.0) -> list[list[wandb_internal_pb2.Record]]:
    """Records of each offline wandb run folder of a run, oldest first.

    wandb-core writes the file in its own process and flushes it a few ms after ``finish()``
    returns, so wait (bounded) until every file holds its exit record.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        runs = [_records(f) if f.stat().st_size > 7 else [] for f in files]
        done = len(runs) == expect and all(any(r.HasField("exit") for r in recs) for recs in runs)
        if done or time.monotonic() > deadline:
            assert len(runs) == expect, f"{len(runs)} offline wandb runs in {run_dir}, expected {expect}"
            assert done, "a wandb run file has no exit record (not finished?)"
            return runs


def _history(recs: list[wandb_internal_pb2.Record]) -> list[dict[str, object]]:
    rows = []
    for r in recs:
        if r.HasField("history"):
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            row["_record_step"] = r.history.step.num
            rows.append(row)
    return rows


def _curve(run_dir: Path, name: str = "curve.csv") -> list[dict[str, float]]:
    lines = (run_dir / name).read_text().split()
    keys = lines[0].split(",")
    return [dict(zip(keys, map(float, line.split(",")))) for line in lines[1:]]


def _evals(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [h for h in rows if "eval/test_mse" in h]


def _summary(recs: list[wandb_internal_pb2.Record]) -> dict[str, object]:
    return {
        (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
        for r in recs
        if r.HasField("summary")
        for i in r.summary.update
    }


# --- mode and settings: pure functions of the environment ----------------------------------------


def test_mode_resolution(tmp_path: Path) -> None:
    no_netrc = {"NETRC": str(tmp_path / "absent")}
    assert tracking.resolve_mode("auto", no_netrc) == "offline"
    assert tracking.resolve_mode("auto", {**no_netrc, "WANDB_API_KEY": "k" * 40}) == "online"
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert tracking.resolve_mode("auto", {"NETRC": str(netrc_file)}) == "online"
    # an entry for another host is not an account for this one
    assert tracking.resolve_mode("auto", {"NETRC": str(netrc_file), "WANDB_BASE_URL": "https://wandb.example"}) == (
        "offline"
    )
    assert tracking.resolve_mode("online", no_netrc) == "online"
    # WANDB_MODE from the environment wins over the spec
    assert tracking.resolve_mode("online", {**no_netrc, "WANDB_MODE": "offline"}) == "offline"
    assert tracking.resolve_mode("offline", {"WANDB_MODE": "online"}) == "online"
    assert tracking.resolve_mode("online", {"WANDB_MODE": "disabled"}) == "disabled"
    with pytest.raises(ValueError, match=r"WANDB_MODE='sometimes'.*allowed"):
        tracking.resolve_mode("auto", {"WANDB_MODE": "sometimes"})


def test_flag_overrides_spec_and_off_means_no_tracker(tmp_path: Path, synthetic_task: str) -> None:
    assert tracking.wandb_settings({"enabled": True, "project": "p", "mode": "offline"}, False)["enabled"] is False
    assert tracking.wandb_settings({"enabled": False, "project": "p", "mode": "auto"}, True) == {
        "enabled": True,
        "project": "p",
        "mode": "auto",
    }
    assert tracking.wandb_settings({"enabled": True, "project": "p", "mode": "auto"}, None)["enabled"] is True
    cell = cell_for(synthetic_task, None, {"dim": 4}, SYN_TRAIN)
    assert tracking.make_tracker(cell, tmp_path, {"enabled": False}) is None
    assert not (tmp_path / "wandb").exists()


def test_run_id_is_stable_and_valid(synthetic_task: str) -> None:
    cell = cell_for(synthetic_task, None, {"dim": 4}, SYN_TRAIN)
    assert tracking.wandb_run_id(cell) == f"t-{cell.run_id}"
    long = type(cell)(**{**cell.__dict__, "grid": "g" * 64})
    rid = tracking.wandb_run_id(long)
    assert len(rid) <= 64 and rid.endswith(cell.run_id) and rid == tracking.wandb_run_id(long)


# --- real offline runs ---------------------------------------------------------------------------


def test_worker_mirrors_metrics_config_and_summary_offline(tmp_path: Path, synthetic_task: str) -> None:
    cell = cell_for(synthetic_task, {"ema": {"half_life_samples": 256}}, {"dim": 4}, SYN_TRAIN)
    result = run_one(cell, tmp_path, RunContext(), [], OFFLINE)
    assert result["status"] == "completed"
    rdir = store.run_dir(tmp_path, cell.grid, cell.run_id)
    (recs,) = _offline_runs(rdir, expect=1)

    run = next(r.run for r in recs if r.HasField("run"))
    assert run.run_id == tracking.wandb_run_id(cell)
    assert run.run_group == f"{cell.grid}/{cell.task}/{cell.arm}" == "t/synthetic/all"
    assert run.project == OFFLINE["project"]
    assert run.job_type == synthetic_task
    assert set(run.tags) == {synthetic_task, "ema"}
    updates = [*run.config.update, *(i for r in recs if r.HasField("config") for i in r.config.update)]
    config = {i.key: json.loads(i.value_json) for i in updates}
    assert config["tricks"] == cell.config["tricks"] and config["run_id"] == cell.run_id
    assert config["arm"] == "all" and config["grid"] == cell.grid and config["seed"] == cell.seed

    # history: one row per optimizer step (64 steps ≤ MAX_TRAIN_POINTS) with the numbers of train.csv,
    # and the evaluations in the rows of their steps with the numbers of curve.csv
    hist, curve, steps = _history(recs), _curve(rdir), _curve(rdir, "train.csv")
    assert [h["_step"] for h in hist] == [h["_record_step"] for h in hist] == [int(t["step"]) for t in steps]
    for h, t in zip(hist, steps):
        assert (h["samples"], h["train/loss"], h["train/lr"]) == (t["samples"], t["loss"], t["lr"])  # exact doubles
        assert h["train/grad_norm"] == h["train/grad_norm_max"] == t["grad_norm"]
    evals = _evals(hist)
    assert [h["_step"] for h in evals] == [c["step"] for c in curve] == EVAL_STEPS
    for h, c in zip(evals, curve):
        assert h["samples"] == c["samples"]
        assert h["eval/test_mse"] == c["test_mse"]
    summary = _summary(recs)
    assert summary["metric/test_mse"] == result["metric"]["test_mse"]
    assert summary["status"] == "completed"
    assert json.loads((rdir / tracking.STATE_FILE).read_text())["last_step"] == EVAL_STEPS[-1]

    # a finished run is skipped by the worker: no new wandb run
    assert run_one(cell, tmp_path, RunContext(), [], OFFLINE)["skipped"]
    _offline_runs(rdir, expect=1)


@pytest.mark.parametrize("send_interval_s", [tracking.SEND_INTERVAL_S, 0.0])  # 0: rows sent as they complete
def test_killed_and_relaunched_run_continues_same_wandb_run_without_duplicate_steps(
    tmp_path: Path, synthetic_task: str, monkeypatch: pytest.MonkeyPatch, send_interval_s: float
) -> None:
    monkeypatch.setattr(tracking, "SEND_INTERVAL_S", send_interval_s)
    cell = cell_for(synthetic_task, None, {"dim": 4}, SYN_TRAIN)
    reference = train(cell, tmp_path / "untracked")
    out = tmp_path / "run"

    def launch(max_steps: int | None) -> dict:
        tracker = tracking.make_tracker(cell, out, OFFLINE)
        assert tracker is not None
        res = train(cell, out, RunContext(max_steps=max_steps, tracker=tracker))
        tracker.finish(res)
        return res

    assert launch(16)["status"] == "interrupted"  # steps 0-15 (eval at 15), checkpoint at step 16
    saved = (out / store.CHECKPOINT).read_bytes()
    assert launch(20)["status"] == "interrupted"  # steps 16-35: eval at step 31 mirrored
    # a SIGKILL after step 35 leaves the last periodic checkpoint; here: the one at step 16
    store.atomic_write_bytes(out / store.CHECKPOINT, saved)
    final = launch(None)  # replays steps 16-63: the eval at 31 again, which must not be mirrored twice
    assert final["metric"] == reference["metric"]
    assert (out / "curve.csv").read_text() == (tmp_path / "untracked" / "curve.csv").read_text()

    runs = _offline_runs(out, expect=3)
    ids = {r.run.run_id for recs in runs for r in recs if r.HasField("run")}
    assert ids == {tracking.wandb_run_id(cell)}
    # each step exactly once, in order, across the three launches (the third replays 16-35: not re-sent)
    assert [h["_step"] for recs in runs for h in _history(recs)] == list(range(64))
    assert [[h["_step"] for h in _history(recs)][::-1][:1] for recs in runs] == [[15], [35], [63]]
    evals = [h for recs in runs for h in _evals(_history(recs))]
    assert [h["_step"] for h in evals] == EVAL_STEPS  # each evaluation exactly once
    assert [[h["_step"] for h in _evals(_history(recs))] for recs in runs] == [[15], [31], [47, 63]]
    assert {h["_step"]: h["eval/test_mse"] for h in evals} == {c["step"]: c["test_mse"] for c in _curve(out)}
    losses = {h["_step"]: h["train/loss"] for recs in runs for h in _history(recs)}
    assert losses == {int(t["step"]): t["loss"] for t in _curve(out, "train.csv")}
    summaries = [_summary(recs) for recs in runs]
    assert [s.get("status") for s in summaries] == ["interrupted", "interrupted", "completed"]
    assert "metric/test_mse" not in summaries[0] and summaries[2]["metric/test_mse"] == final["metric"]["test_mse"]


def test_log_failure_disables_tracker_with_one_warning(tmp_path: Path, synthetic_task: str) -> None:
    cell = cell_for(synthetic_task, None, {"dim": 4}, SYN_TRAIN)
    reference = train(cell, tmp_path / "untracked")
    tracker = tracking.make_tracker(cell, tmp_path / "run", OFFLINE)
    assert tracker is not None
    tracker.run.finish()  # the wandb run ends under the tracker: every later log raises inside wandb
    with pytest.warns(RuntimeWarning, match="wandb log failed") as caught:
        res = train(cell, tmp_path / "run", RunContext(tracker=tracker))
        tracker.finish(res)
    assert len([w for w in caught if "wandb" in str(w.message)]) == 1
    assert not tracker.active
    assert res["metric"] == reference["metric"]
    assert (tmp_path / "run" / "curve.csv").read_text() == (tmp_path / "untracked" / "curve.csv").read_text()


# --- an unreachable service ----------------------------------------------------------------------


@pytest.fixture
def unreachable_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb online with a key, pointed at a closed local port; wandb's settings singleton rebuilt around it."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(tracking, "_unreachable_hosts", set())
    wandb.teardown()  # wandb reads the environment once per process setup
    yield
    wandb.teardown()


@pytest.mark.usefixtures("unreachable_wandb")
def test_unreachable_service_leaves_training_identical_and_fast(tmp_path: Path, synthetic_task: str) -> None:
    cell = cell_for(synthetic_task, None, {"dim": 4}, SYN_TRAIN)
    t0 = time.perf_counter()
    reference = train(cell, tmp_path / "untracked")
    untracked_s = time.perf_counter() - t0

    timeout_s = 2.0
    cfg = {"enabled": True, "project": "p", "mode": "auto"}  # auto: a key is configured, so online
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match="online init failed") as caught:
        tracker = tracking.make_tracker(cell, tmp_path / "run", cfg, init_timeout_s=timeout_s)
        res = train(cell, tmp_path / "run", RunContext(tracker=tracker))
        tracker.finish(res)
    tracked_s = time.perf_counter() - t0
    assert len([w for w in caught if "wandb" in str(w.message)]) == 1
    assert res["metric"] == reference["metric"]
    for name in ("curve.csv", "train.csv"):
        assert (tmp_path / "run" / name).read_text() == (tmp_path / "untracked" / name).read_text()
    # the init timeout plus a few seconds of wandb start-up, at most
    assert tracked_s - untracked_s < timeout_s + 4.0, (tracked_s, untracked_s)
    # the run is still mirrored, offline, for a later `wandb sync`
    assert tracker.mode == "offline"
    (recs,) = _offline_runs(tmp_path / "run", expect=1)
    assert [h["_step"] for h in _evals(_history(recs))] == EVAL_STEPS

    # the next run of this process does not wait for the unreachable host again
    t0 = time.perf_counter()
    second = tracking.make_tracker(cell, tmp_path / "second", cfg, init_timeout_s=timeout_s)
    assert second is not None and second.mode == "offline"
    second.finish(None)
    assert time.perf_counter() - t0 < timeout_s


def test_state_file_of_another_wandb_run_is_ignored(tmp_path: Path, synthetic_task: str) -> None:
    """A run folder copied from elsewhere (another grid, another id) does not suppress this run's steps."""
    cell = cell_for(synthetic_task, None, {"dim": 4}, SYN_TRAIN)
    store.atomic_write_json(tmp_path / tracking.STATE_FILE, {"wandb_id": "other-grid-x", "last_step": 10_000})
    tracker = tracking.make_tracker(cell, tmp_path, OFFLINE)
    assert tracker is not None and tracker.last_step == -1
    tracker.log(0, {"samples": 32.0})
    tracker.log(0, {"samples": 32.0})  # the same step again: skipped
    tracker.finish(None)
    (recs,) = _offline_runs(tmp_path, expect=1)
    assert [h["_step"] for h in _history(recs)] == [0]


# --- W&B conventions of a grid ---------------------------------------------------------------------


def test_grid_offline_run_folders_follow_wandb_conventions(
    tmp_path: Path, synthetic_task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bench run --wandb` of a tiny grid (2 arms × 2 seeds): each run's offline folder, read back."""
    for var in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    spec = {
        "grid": "wb",
        "seeds": 2,
        "wandb": {"enabled": True, "mode": "offline", "project": "trickbench-tests"},
        "tasks": {synthetic_task: {"params": {"dim": 4}, "train": SYN_TRAIN, "tricks": ["ema"]}},
    }
    path = tmp_path / "wb.yaml"
    path.write_text(yaml.safe_dump(spec))
    results = tmp_path / "results"
    assert (
        main(["run", str(path), "--results", str(results), "--executor", "debug", "--no-progress", "--no-report"]) == 0
    )
    _, cells = grid_cells(results / "wb")
    assert len(cells) == 4
    groups: dict[str, list[int]] = {}
    for cell in cells:
        rdir = store.run_dir(results, "wb", cell.run_id)
        (recs,) = _offline_runs(rdir, expect=1)
        run = next(r.run for r in recs if r.HasField("run"))
        assert run.run_group == f"wb/{synthetic_task}/{cell.arm}" and run.job_type == synthetic_task
        assert set(run.tags) == {synthetic_task, *(cell.tricks_on or ("baseline",))}
        assert run.project == "trickbench-tests" and run.display_name == f"{synthetic_task} {cell.arm} s{cell.seed}"
        groups.setdefault(run.run_group, []).append(cell.seed)
        hist = _history(recs)
        keys = set().union(*hist)
        assert {"samples", "train/loss", "train/grad_norm", "train/grad_norm_max", "train/lr", "eval/test_mse"} <= keys
        assert len(hist) == 64 and [h["_step"] for h in _evals(hist)] == EVAL_STEPS
        result = store.read_json(rdir / store.RESULT)
        summary = _summary(recs)
        assert summary["status"] == "completed" and summary["metric/test_mse"] == result["metric"]["test_mse"]
        assert summary["cost/steps"] == result["cost"]["steps"] == 64
    assert groups == {f"wb/{synthetic_task}/baseline": [0, 1], f"wb/{synthetic_task}/+ema": [0, 1]}


def test_long_runs_log_a_strided_curve_of_window_means(
    tmp_path: Path, synthetic_task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracking, "MAX_TRAIN_POINTS", 10)  # 64 steps → a stride of 7 steps
    assert tracking.train_stride(64) == 7 and tracking.train_stride(1_000_000, 1000) == 1000
    cell = cell_for(synthetic_task, None, {"dim": 4}, SYN_TRAIN)
    tracker = tracking.make_tracker(cell, tmp_path, OFFLINE)
    assert tracker is not None
    tracker.finish(train(cell, tmp_path, RunContext(tracker=tracker)))
    (recs,) = _offline_runs(tmp_path, expect=1)
    hist, steps = _history(recs), _curve(tmp_path, "train.csv")
    # a row ends a window of 7 steps, or the window cut short by an evaluation (rows at evaluation steps)
    ends = [h["_step"] for h in hist]
    assert ends == [6, 13, 15, 22, 29, 31, 38, 45, 47, 54, 61, 63]
    start = 0
    for h in hist:
        window = steps[start : h["_step"] + 1]
        assert h["train/loss"] == pytest.approx(sum(t["loss"] for t in window) / len(window), rel=1e-12)
        assert h["train/grad_norm_max"] == max(t["grad_norm"] for t in window)
        assert h["train/lr"] == window[-1]["lr"] and h["samples"] == window[-1]["samples"]
        start = h["_step"] + 1


def test_project_entity_and_dir_follow_wandb_precedence(
    tmp_path: Path, synthetic_task: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-team", "WANDB_DIR": str(tmp_path / "wandb-dir")}
    rdir = tmp_path / "run"
    # the spec's default project gives way to WANDB_PROJECT; a project the spec names wins (init args beat env)
    assert tracking.wandb_destination({"project": "trickbench"}, rdir, env) == {
        "project": "env-project",
        "entity": "env-team",
        "dir": str(tmp_path / "wandb-dir"),
    }
    assert tracking.wandb_destination({"project": "mine"}, rdir, env)["project"] == "mine"
    assert tracking.wandb_destination({"project": "trickbench"}, rdir, {}) == {
        "project": "trickbench",
        "entity": None,
        "dir": str(rdir),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cell = cell_for(synthetic_task, None, {"dim": 4}, SYN_TRAIN)
    tracker = tracking.make_tracker(cell, rdir, {**OFFLINE, "project": "trickbench"})
    assert tracker is not None
    tracker.log(0, {"samples": 32.0})
    tracker.finish(None)
    assert not (rdir / "wandb").exists()
    (recs,) = _offline_runs(tmp_path / "wandb-dir", expect=1)  # the folder is WANDB_DIR's
    run = next(r.run for r in recs if r.HasField("run"))
    assert (run.project, run.entity) == ("env-project", "env-team")
    assert (rdir / tracking.STATE_FILE).exists()  # the resume state stays with the run


def test_tracking_on_and_off_give_identical_runs(tmp_path: Path, synthetic_task: str) -> None:
    train_cfg = {**SYN_TRAIN, "grad_clip_norm": 0.5, "lr_schedule": "cosine", "warmup_samples": 256}
    cell = cell_for(
        synthetic_task, {"ema": {"half_life_samples": 256}, "accumulation": {"micro_batches": 2}}, {"dim": 4}, train_cfg
    )
    off = train(cell, tmp_path / "off")
    tracker = tracking.make_tracker(cell, tmp_path / "on", OFFLINE)
    assert tracker is not None
    on = train(cell, tmp_path / "on", RunContext(tracker=tracker))
    tracker.finish(on)
    assert tracker.last_step == 63, "the run was mirrored"
    assert on["metric"] == off["metric"] and on["stability"] == off["stability"]
    for name in ("curve.csv", "train.csv"):
        assert (tmp_path / "on" / name).read_text() == (tmp_path / "off" / name).read_text()
    weights_on = torch.load(tmp_path / "on" / "final_model.pt", weights_only=True)
    weights_off = torch.load(tmp_path / "off" / "final_model.pt", weights_only=True)
    assert weights_on.keys() == weights_off.keys()
    assert all(torch.equal(weights_on[k], weights_off[k]) for k in weights_on)
