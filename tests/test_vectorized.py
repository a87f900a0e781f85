"""Seed-vectorized groups (``bench run --vectorize-seeds S``): S seeds of one arm through the one training loop.

- a group's seeds equal the same seeds trained alone within ``VECTORIZED_TOLERANCE`` (toy_diffusion, rl_policy,
  every evaluated-weights trick, accumulation, zero weight decay, the task-role tricks);
- a group interrupted and re-launched finishes bit for bit as the uninterrupted group; members found at
  different steps resume apart and still match; a seed that diverges finishes alone, the others unaffected;
- every seed is an ordinary run folder that ``bench status``, ``bench report`` and ``bench check`` read;
- what cannot be vectorized is refused before anything is written, naming the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import store
from bench.cli import main
from bench.executors.group import group_cells, run_group
from bench.grid import Cell, expand
from bench.loop import (
    VECTORIZED_METRIC_TOLERANCE,
    VECTORIZED_TOLERANCE,
    RunContext,
    train,
    train_group,
    vectorize_problems,
)
from bench.spec import parse_spec
from experiments.base import MicroBatch
from experiments.registry import get_task

RUN_FILES = {"config.json", "result.json", "curve.csv", "train.csv", "final_model.pt", "state.json"}


def arm(
    task: str, tricks: dict, seeds: int = 3, params: dict | None = None, train_cfg: dict | None = None
) -> list[Cell]:
    """The cells of the arm with exactly ``tricks`` on, at the task's tiny setting (seconds)."""
    tiny = get_task(task).tiny or {"params": {}, "train": {}}
    spec = parse_spec(
        {
            "grid": "vec",
            "seeds": seeds,
            "design": "leave_one_out",  # its first arm: every listed trick on
            "tasks": {
                task: {
                    "params": tiny["params"] | (params or {}),
                    "train": tiny["train"] | (train_cfg or {}),
                    "tricks": tricks,
                }
            },
        }
    )
    return [c for c in expand(spec) if set(c.tricks_on) == set(tricks)]


def _rows(path: Path) -> tuple[list[str], list[list[float]]]:
    head, *rows = path.read_text().splitlines()
    return head.split(","), [[float(v) for v in r.split(",")] for r in rows]


def _close(a: float, b: float, rtol: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def _assert_equal_within_tolerance(group_dir: Path, alone_dir: Path) -> None:
    """The run folder of a seed trained in a group against the same seed trained alone."""
    for name in ("train.csv", "curve.csv"):
        (hg, rg), (ha, ra) = _rows(group_dir / name), _rows(alone_dir / name)
        assert hg == ha and len(rg) == len(ra), name
        for row_g, row_a in zip(rg, ra):
            for col, x, y in zip(hg, row_g, row_a):
                tol = VECTORIZED_METRIC_TOLERANCE if name == "curve.csv" else VECTORIZED_TOLERANCE
                assert _close(x, y, tol), (name, col, x, y)
    res_g, res_a = store.read_json(group_dir / "result.json"), store.read_json(alone_dir / "result.json")
    assert res_g["status"] == res_a["status"] == "completed"
    assert set(res_g) == set(res_a) and set(res_g["cost"]) == set(res_a["cost"])  # the same format
    assert res_g["cost"]["vectorized_seeds"] > 1 and res_a["cost"]["vectorized_seeds"] == 1
    assert res_g["metric"].keys() == res_a["metric"].keys()
    for k, v in res_a["metric"].items():
        assert _close(res_g["metric"][k], v, VECTORIZED_METRIC_TOLERANCE), (k, res_g["metric"][k], v)
    fg = torch.load(group_dir / "final_model.pt", weights_only=True)
    fa = torch.load(alone_dir / "final_model.pt", weights_only=True)
    assert fg.keys() == fa.keys()
    for k, v in fa.items():
        w = fg[k]
        assert w.shape == v.shape and w.dtype == v.dtype, k
        # its own storage: a member's weights are views of the group's stack, saved without the rest of it
        assert w.untyped_storage().nbytes() == w.numel() * w.element_size(), k
        scale = max(float(v.abs().max()), 1e-12)
        assert float((w - v).abs().max()) <= VECTORIZED_TOLERANCE * scale, k


TOY_TASK_TRICKS = {
    "ema": {"half_life_samples": 64},
    "accumulation": {"micro_batches": 2},
    "no_weight_decay": None,
    "stratified_sampling": None,
    "fourier_features": None,
    "cond_dropout": None,
    "cond_noise": None,
    "nonleaky_augmentation": None,
}
CASES = {
    "toy-ema+accumulation+no_wd+task-tricks": ("toy_diffusion", TOY_TASK_TRICKS, {}),
    "toy-posthoc_ema": ("toy_diffusion", {"posthoc_ema": {"snapshot_every_samples": 64}}, {}),
    "toy-periodic_averaging": ("toy_diffusion", {"periodic_averaging": {"snapshot_every_samples": 32}}, {}),
    "toy-checkpoint_averaging": ("toy_diffusion", {"checkpoint_averaging": {"n": 2, "mode": "best"}}, {}),
    "rl-replay+fourier+stratified+accumulation+ema": (
        "rl_policy",
        {
            "replay_buffer": {"capacity": 128},
            "fourier_features": None,
            "stratified_sampling": None,
            "accumulation": {"micro_batches": 2},
            "ema": {"half_life_samples": 64},
        },
        {"target_update": "ema", "target_half_life_samples": 64.0},
    ),
    "rl-checkpoint_averaging": ("rl_policy", {"checkpoint_averaging": {"n": 2, "mode": "best"}}, {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_group_equals_its_seeds_trained_alone(tmp_path: Path, case: str) -> None:
    task, tricks, params = CASES[case]
    cells = arm(task, tricks, params=params)
    grouped = train_group(cells, [tmp_path / "group" / c.run_id for c in cells], RunContext(threads=1))
    assert [r["status"] for r in grouped] == ["completed"] * 3
    for cell in cells:
        alone = train(cell, tmp_path / "alone" / cell.run_id, RunContext(threads=1))
        assert alone["status"] == "completed"
        _assert_equal_within_tolerance(tmp_path / "group" / cell.run_id, tmp_path / "alone" / cell.run_id)
    # the seeds really are different runs (own init, own data)
    assert len({(tmp_path / "group" / c.run_id / "train.csv").read_text() for c in cells}) == 3


def _same(a: dict, b: dict) -> bool:
    """Equal, NaN included (e.g. a stability value undefined for so short a run)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _files(run_dir: Path) -> dict[str, bytes]:
    return {n: (run_dir / n).read_bytes() for n in ("train.csv", "curve.csv", "final_model.pt")}


@pytest.mark.parametrize("task", ["toy_diffusion", "rl_policy"])
def test_interrupted_group_resumes_bit_exactly(tmp_path: Path, task: str) -> None:
    """Interrupted twice (by max_steps, then by the stop flag across a checkpoint point), re-launched: every file
    and number of every seed equals the uninterrupted group's, bit for bit (the environments' states too)."""
    tricks = {"ema": {"half_life_samples": 64}} if task == "toy_diffusion" else {"replay_buffer": {"capacity": 128}}
    cells = arm(task, tricks)
    whole = train_group(cells, [tmp_path / "whole" / c.run_id for c in cells])
    dirs = [tmp_path / "cut" / c.run_id for c in cells]
    first = train_group(cells, dirs, RunContext(max_steps=3))
    assert [r["status"] for r in first] == ["interrupted"] * 3 and {r["step"] for r in first} == {3}
    assert all((d / store.CHECKPOINT).exists() for d in dirs)  # one checkpoint per seed, written together
    polls = iter(range(1000))
    stop_at = 4 if task == "toy_diffusion" else 9  # past the checkpoint point (96 samples) of rl_policy

    second = train_group(cells, dirs, RunContext(stop=lambda: next(polls) >= stop_at * len(cells)))
    assert [r["status"] for r in second] == ["interrupted"] * 3
    assert {r["step"] for r in second} == {3 + stop_at}
    last = train_group(cells, dirs)
    for cell, a, b in zip(cells, whole, last):
        assert b["status"] == "completed" and b["cost"]["resumes"] == 2
        assert _same(a["metric"], b["metric"]) and _same(a["stability"], b["stability"])
        assert _files(tmp_path / "whole" / cell.run_id) == _files(tmp_path / "cut" / cell.run_id)


def test_members_at_different_steps_resume_apart_and_still_match(tmp_path: Path) -> None:
    """A member whose checkpoint is gone restarts alone while the others resume: a seed's numbers do not depend on
    which seeds share its group (CPU), so every seed still equals the uninterrupted group's, bit for bit."""
    cells = arm("toy_diffusion", {"posthoc_ema": {"snapshot_every_samples": 64}})
    whole = train_group(cells, [tmp_path / "whole" / c.run_id for c in cells])
    dirs = [tmp_path / "cut" / c.run_id for c in cells]
    train_group(cells, dirs, RunContext(max_steps=5))
    for name in (store.CHECKPOINT, store.PREVIOUS_CHECKPOINT):
        (dirs[1] / name).unlink(missing_ok=True)  # seed 1 starts over (its curves from the first attempt set aside)
    resumed = train_group(cells, dirs)
    assert [r["cost"]["resumes"] for r in resumed] == [1, 0, 1]
    for cell, a, b in zip(cells, whole, resumed):
        assert _same(a["metric"], b["metric"])
        assert _files(tmp_path / "whole" / cell.run_id) == _files(tmp_path / "cut" / cell.run_id)


@pytest.fixture
def vec_synthetic() -> Any:
    from experiments.registry import register_task, unregister_task
    from tests.synthetic_task import VecSynthetic

    register_task(VecSynthetic)  # a module-level class: spawned workers re-register it
    yield "vec_synthetic"
    unregister_task("vec_synthetic")


def test_a_diverging_seed_finishes_alone_and_the_others_are_unaffected(tmp_path: Path, vec_synthetic: str) -> None:
    spec = parse_spec(
        {"grid": "div", "seeds": 3, "tasks": {vec_synthetic: {"train": {"budget_samples": 512}, "tricks": {}}}}
    )
    cells = expand(spec)
    grouped = train_group(cells, [tmp_path / "group" / c.run_id for c in cells])
    dirs = (tmp_path / "group", tmp_path / "alone")
    assert [r["status"] for r in grouped] == ["completed", "diverged", "completed"]
    for cell, res in zip(cells, grouped):
        alone = train(cell, tmp_path / "alone" / cell.run_id)
        assert alone["status"] == res["status"] and alone["diverged_step"] == res["diverged_step"]
        if res["status"] == "diverged":
            assert res["diverged_step"] == 3 and not (tmp_path / "group" / cell.run_id / "final_model.pt").exists()
            (head_g, rows_g), (head_a, rows_a) = (_rows(d / cell.run_id / "train.csv") for d in dirs)
            assert head_g == head_a and len(rows_g) == len(rows_a) == 3  # steps 0-2 recorded, step 3 not
            assert all(_close(x, y, VECTORIZED_TOLERANCE) for rg, ra in zip(rows_g, rows_a) for x, y in zip(rg, ra))
        else:
            _assert_equal_within_tolerance(tmp_path / "group" / cell.run_id, tmp_path / "alone" / cell.run_id)


SPEC_TINY = {
    "grid": "vecgrid",
    "design": "one_at_a_time",
    "seeds": 3,
    "tasks": {
        "toy_diffusion": {
            "params": get_task("toy_diffusion").tiny["params"],
            "train": get_task("toy_diffusion").tiny["train"],
            "tricks": {"ema": {"half_life_samples": 64}},
        }
    },
}


def _write_spec(path: Path, spec: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def test_vectorized_launch_stores_ordinary_run_folders_that_status_and_report_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _write_spec(tmp_path / "spec.yaml", SPEC_TINY)
    results = tmp_path / "results"
    code = main(
        ["run", str(spec), "--results", str(results), "--executor", "debug", "--vectorize-seeds", "2", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "6 runs to train as 4 groups of up to 2 seeds" in out and "report:" in out
    grid = results / "vecgrid"
    runs = [d for d in (grid / "runs").iterdir()]
    assert len(runs) == 6
    for run_dir in runs:
        assert {p.name for p in run_dir.iterdir()} >= RUN_FILES, run_dir
        assert store.check_run(run_dir, deep=True).status == "completed"
        assert json.loads((run_dir / "state.json").read_text())["state"] == "completed"
    sizes = {store.read_json(d / "result.json")["cost"]["vectorized_seeds"] for d in runs}
    assert sizes == {1, 2}  # 3 seeds per arm: a group of 2 and a group of 1
    summary = store.load_grid(grid)
    assert len(summary) == 6 and set(summary["status"]) == {"completed"}
    assert main(["status", str(grid)]) == 0
    assert "6 completed" in capsys.readouterr().out.replace("  ", " ")
    assert main(["report", str(grid)]) == 0
    assert (grid / "report.md").exists()
    # a re-launch finds every run finished: nothing trains
    assert main(["run", str(spec), "--results", str(results), "--vectorize-seeds", "2", "--no-progress"]) == 0
    assert "0 to train, 6 already finished" in capsys.readouterr().out


def test_local_pool_trains_groups_as_units_of_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = _write_spec(tmp_path / "spec.yaml", SPEC_TINY | {"seeds": 2})
    results = tmp_path / "results"
    args = ["run", str(spec), "--results", str(results), "--jobs", "2", "--vectorize-seeds", "2", "--no-report"]
    assert main([*args, "--no-progress"]) == 0
    assert "trained: 4 completed" in capsys.readouterr().out
    for run_dir in (results / "vecgrid" / "runs").iterdir():
        assert store.read_json(run_dir / "result.json")["cost"]["vectorized_seeds"] == 2


@pytest.mark.slow  # 7-40 s: the whole regression grid of toy_diffusion (24 runs), two seeds per group
def test_bench_check_reads_vectorized_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The regression grid trained seed-vectorized (seed 0 beside seed 1) passes ``bench check`` against the
    committed baselines: the check reuses the finished run folders as it reuses any other."""
    from bench.check import regression_spec_path

    results = tmp_path / "results"
    spec = regression_spec_path("toy_diffusion")
    args = ["run", str(spec), "seeds=[0,1]", "--results", str(results), "--executor", "debug", "--no-report"]
    assert main([*args, "--vectorize-seeds", "2", "--no-progress"]) == 0
    assert main(["check", "--task", "toy_diffusion", "--results", str(results), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "reusing 12 finished runs" in out and "within tolerance" in out


@pytest.mark.parametrize(
    ("change", "flags", "message"),
    [
        ({"tasks": {"cifar_autoencoder": {"params": {"data": "offline"}}}}, [], "task: 'cifar_autoencoder' cannot"),
        (
            {"tasks": {"rl_policy": {"tricks": {"replay_buffer": {"prioritized": True}}}}},
            [],
            "tricks.replay_buffer.prioritized: true cannot be seed-vectorized",
        ),
        ({"tasks": {"toy_diffusion": {"train": {"compile": True}}}}, [], "train.compile: True is not allowed"),
        ({}, ["--vectorize-seeds", "0"], "--vectorize-seeds: 0 is not allowed"),
    ],
    ids=["cifar", "prioritized-replay", "compile", "zero"],
)
def test_what_cannot_be_vectorized_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, flags: list[str], message: str
) -> None:
    spec = dict(SPEC_TINY) | change
    path = _write_spec(tmp_path / "spec.yaml", spec)
    results = tmp_path / "results"
    code = main(["run", str(path), "--results", str(results), "--no-progress", *(flags or ["--vectorize-seeds", "2"])])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not results.exists()


def test_vectorize_problems_names_mixed_arms_repeated_seeds_and_train_group_refuses(tmp_path: Path) -> None:
    base, ema = arm("toy_diffusion", {}, seeds=2), arm("toy_diffusion", {"ema": None}, seeds=2)
    assert "differs from run" in vectorize_problems([base[0], ema[1]])[0]
    assert "in tricks" in vectorize_problems([base[0], ema[1]])[0]
    assert "repeat" in vectorize_problems([base[0], base[0]])[0]
    assert vectorize_problems(base) == []
    with pytest.raises(ValueError, match="task: 'cifar_autoencoder' cannot be seed-vectorized"):
        cifar = arm("cifar_autoencoder", {}, seeds=2, params={"data": "offline"})
        train_group(cifar, [tmp_path / c.run_id for c in cifar])
    assert not any(tmp_path.iterdir())


def test_group_cells_keeps_arms_apart_sorted_by_seed_in_chunks() -> None:
    spec = parse_spec(dict(SPEC_TINY) | {"seeds": [4, 0, 2, 1, 3]})
    cells = expand(spec)
    groups = group_cells(list(reversed(cells)), 2)
    assert [len(g) for g in groups] == [2, 2, 1, 2, 2, 1]
    for g in groups:
        assert len({c.arm for c in g}) == 1
    assert [[c.seed for c in g] for g in groups[:3]] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="--vectorize-seeds: True is not allowed"):
        group_cells(cells, True)  # type: ignore[arg-type]


def test_run_group_skips_finished_members_and_trains_the_rest(tmp_path: Path) -> None:
    cells = arm("toy_diffusion", {}, seeds=3)
    ctx = RunContext(threads=1)
    first = run_group(cells[:1], tmp_path, ctx, [])
    assert first[0]["status"] == "completed" and first[0]["cost"]["vectorized_seeds"] == 1
    seen: list[tuple[str, int]] = []
    results = run_group(cells, tmp_path, ctx, [], progress=lambda rid, done, total, loss: seen.append((rid, done)))
    assert results[0] == {"status": "completed", "skipped": True}
    assert [r["status"] for r in results[1:]] == ["completed", "completed"]
    assert {rid for rid, _ in seen} == {c.run_id for c in cells[1:]}  # per-member progress
    assert all(r["cost"]["vectorized_seeds"] == 2 for r in results[1:])


def test_slurm_array_task_trains_one_group_and_submission_chunks_by_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.executors import slurm as slurm_module

    cells = expand(parse_spec(dict(SPEC_TINY) | {"seeds": 3}))
    groups = group_cells(cells, 2)
    settings = slurm_module.WorkerSettings(vectorize_seeds=2)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "9")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    statuses = slurm_module.SlurmTask(settings)([c.to_dict() for c in groups[0]], str(tmp_path / "results"))
    assert statuses == {c.run_id: "completed" for c in groups[0]}
    for c in groups[0]:
        result = store.read_json(store.run_dir(tmp_path / "results", c.grid, c.run_id) / "result.json")
        assert result["cost"]["vectorized_seeds"] == 2

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(slurm_module, "queue_jobs", lambda name=None: {})
    monkeypatch.setattr(slurm_module, "_sbatch_held", lambda script, options: "700")
    monkeypatch.setattr(slurm_module, "_scancel", lambda ids: None)
    monkeypatch.setattr(slurm_module, "_run", lambda cmd, **kw: Done())
    results = tmp_path / "submitted"
    sub = slurm_module.submit_grid(
        cells, results / "vecgrid", results, slurm_module.SlurmOptions(), settings, "vecgrid"
    )
    by_job: dict[str, set[str]] = {}
    for run_id, job in sub.runs.items():
        by_job.setdefault(job, set()).add(run_id)
    assert sorted(by_job.values(), key=sorted) == sorted(({c.run_id for c in g} for g in groups), key=sorted)


def test_rl_lockstep_batches_are_each_seeds_own_batches() -> None:
    """rl_policy's batch_group (environments stepped in lockstep, one batched forward per environment step) gives
    each seed exactly the batch its own ``batch`` gives — same transitions, replay samples and TD targets — and
    leaves every environment in the same state (checked with an exact per-seed forward)."""
    from bench.loop import build_task
    from bench.seeds import SeedBundle
    from experiments.rl_policy import RLPolicy

    cells = arm("rl_policy", {"replay_buffer": {"capacity": 64}, "stratified_sampling": None}, params={"eps_end": 0.3})

    def seed_tasks() -> tuple[list[RLPolicy], list[torch.nn.Module]]:
        tasks, models = [], []
        for cell in cells:
            streams = SeedBundle(cell.seed)
            task, _ = build_task(cell.config, streams, torch.device("cpu"))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(streams.seed_for("init"))
                models.append(task.build_model())
            tasks.append(task)
        return tasks, models

    alone, alone_models = seed_tasks()
    grouped, group_models = seed_tasks()

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x[i]) for i, m in enumerate(group_models)])

    for step in range(40):  # 160 environment steps: episodes end and reset, ε decays into greedy actions
        mb = MicroBatch(step=step, index=0, count=1, size=32, progress=step / 40)
        together = RLPolicy.batch_group(grouped, forward, mb)
        for task, model, batch in zip(alone, alone_models, together):
            own = task.batch(model, mb)
            assert own.keys() == batch.keys()
            assert all(torch.equal(own[k], batch[k]) for k in own), step
    from bench.checkpoints import content_digest

    for a, g in zip(alone, grouped):  # environment physics, counters, replay buffer: the same, bit for bit
        assert content_digest(a.state_dict()) == content_digest(g.state_dict())
        assert a.episode > 0


def test_a_crash_in_a_group_fails_its_unfinished_members_and_a_relaunch_resumes_them(
    tmp_path: Path, vec_synthetic: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception in a task (not a divergence; seeds 0 and 2: seed 1 of this task diverges) ends the group:
    every member without a result gets error.json (status failed, re-run on re-launch) and keeps its last
    checkpoint; the re-launch resumes them."""
    from bench.loop import train_group_cells

    train_cfg = {"budget_samples": 512, "checkpoint_every_samples": 128}
    cells = expand(parse_spec({"grid": "crash", "seeds": [0, 2], "tasks": {vec_synthetic: {"train": train_cfg}}}))
    dirs = [tmp_path / c.run_id for c in cells]
    task_cls = get_task(vec_synthetic)
    original = task_cls.batch

    def flaky(self: Any, model: torch.nn.Module, mb: MicroBatch) -> Any:
        if mb.step == 6:
            raise RuntimeError("disk on fire")
        return original(self, model, mb)

    monkeypatch.setattr(task_cls, "batch", flaky)
    crashed = train_group_cells(cells, dirs)
    assert [r["status"] for r in crashed] == ["failed", "failed"] and "disk on fire" in crashed[0]["error"]
    assert all(store.run_status(d) == "failed" and (d / store.CHECKPOINT).exists() for d in dirs)
    monkeypatch.setattr(task_cls, "batch", original)
    again = train_group_cells(cells, dirs)
    assert [r["status"] for r in again] == ["completed", "completed"] and all(r["cost"]["resumes"] == 1 for r in again)
    whole = train_group(cells, [tmp_path / "whole" / c.run_id for c in cells])
    assert [_same(a["metric"], b["metric"]) for a, b in zip(whole, again)] == [True, True]


def test_run_group_leaves_out_a_member_another_process_holds(tmp_path: Path) -> None:
    """Each member's lease is taken as run_one takes a run's: one held elsewhere is reported ``held`` and left out,
    the others train as a group; once released it trains on the next launch. Every lease is released after."""
    from bench import lease

    cells = arm("toy_diffusion", {}, seeds=3)
    held_dir = store.run_dir(tmp_path, cells[1].grid, cells[1].run_id)
    held_dir.mkdir(parents=True)
    other = lease.acquire(held_dir, "9_1")  # as if another launch (a SLURM job) trained it right now
    results = run_group(cells, tmp_path, RunContext(threads=1), [])
    assert [r["status"] for r in results] == ["completed", lease.HELD, "completed"]
    assert results[1]["holder"]["job_id"] == "9_1" and results[0]["cost"]["vectorized_seeds"] == 2
    assert not any((store.run_dir(tmp_path, c.grid, c.run_id) / lease.LEASE).exists() for c in cells[::2])
    other.release(None)
    again = run_group(cells, tmp_path, RunContext(threads=1), [])
    assert [r.get("skipped", False) for r in again] == [True, False, True] and again[1]["status"] == "completed"
