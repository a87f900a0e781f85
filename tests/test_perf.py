"""Performance machinery, checked for correctness (speed is measured by ``bench perf``, never asserted here).

- the harness trains exactly what a bare hand-written PyTorch loop trains (losses, final weights);
- the performance options: off = that bare loop bit for bit; channels_last and bf16 autocast on CPU;
- the ``vectorized`` and ``grid`` parts measure what they say (groups: tests/test_vectorized.py);
- ``runs_per_gpu`` is a clear error on CPU, and pins workers round-robin to GPUs;
- ``bench perf`` runs end to end and writes its tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.executors.local import run_local, worker_device
from bench.grid import expand
from bench.loop import RunContext, train
from bench.perf import bare_train, harness_train, perf_cell, tiny_cell
from bench.spec import parse_spec
from experiments.registry import available_tasks, get_task

TASKS = sorted(available_tasks())


@pytest.mark.parametrize("task", TASKS)
def test_harness_with_perf_options_off_equals_bare_loop(task: str) -> None:
    """Default train block (channels_last, autocast, compile all off): the bare loop's numbers, bit for bit."""
    cell = tiny_cell(task, steps=8)
    assert not cell.config["train"]["channels_last"] and cell.config["train"]["autocast"] == "none"
    assert not cell.config["train"]["compile"]
    harness, bare = harness_train(cell), bare_train(cell)
    assert harness.result["status"] == "completed"
    assert len(harness.losses) == len(bare.losses) == 8
    assert harness.losses == bare.losses  # exactly, not only to 5 decimals
    assert all(math.isfinite(g) and g > 0 for g in harness.grad_norms)
    assert harness.final_state.keys() == bare.final_state.keys()
    for k, v in harness.final_state.items():
        assert torch.equal(v, bare.final_state[k]), k


def test_perf_step_clock_times_the_steps() -> None:
    cell = tiny_cell("toy_diffusion", steps=6)
    run = harness_train(cell)
    assert len(run.step_wall_s) == len(run.step_cpu_s) == 4  # steps 2..5 of 6: first and last dropped
    assert all(t > 0 for t in run.step_wall_s)


def test_channels_last_on_cpu_trains_close_to_fp32() -> None:
    base = harness_train(tiny_cell("cifar_autoencoder", steps=6))
    cl = harness_train(tiny_cell("cifar_autoencoder", steps=6, train={"channels_last": True}))
    assert cl.result["status"] == "completed"
    # other conv kernels sum in another order: ~1e-6 relative after 6 steps; a layout bug would be O(1)
    torch.testing.assert_close(torch.tensor(cl.losses), torch.tensor(base.losses), rtol=1e-4, atol=0)
    assert cl.result["metric"]["test_mse"] == pytest.approx(base.result["metric"]["test_mse"], rel=5e-4)


def test_autocast_bf16_on_cpu_runs_and_is_applied() -> None:
    base = harness_train(tiny_cell("cifar_autoencoder", steps=6))
    bf16 = harness_train(tiny_cell("cifar_autoencoder", steps=6, train={"autocast": "bf16"}))
    assert bf16.result["status"] == "completed"
    assert bf16.losses != base.losses  # bf16 matmuls/convs ran: the numbers moved
    torch.testing.assert_close(torch.tensor(bf16.losses), torch.tensor(base.losses), rtol=5e-3, atol=0)
    assert bf16.result["metric"]["test_mse"] == pytest.approx(base.result["metric"]["test_mse"], rel=5e-3)


@pytest.mark.slow  # compiling the autoencoder on CPU takes ~30-60 s (inductor + a C++ compiler)
def test_compile_on_cpu_trains_close_to_eager() -> None:
    base = harness_train(tiny_cell("cifar_autoencoder", steps=6))
    compiled = harness_train(tiny_cell("cifar_autoencoder", steps=6, train={"compile": True}))
    assert compiled.result["status"] == "completed"
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(base.losses), rtol=1e-4, atol=0)


def _seed_cells(tricks: dict, seeds: int = 3) -> list:
    tiny = get_task("toy_diffusion").tiny
    spec = parse_spec(
        {
            "grid": "vec",
            "seeds": seeds,
            "design": "leave_one_out",  # its first arm: every listed trick on
            "tasks": {"toy_diffusion": {"params": tiny["params"], "train": tiny["train"], "tricks": tricks}},
        }
    )
    return [c for c in expand(spec) if set(c.tricks_on) == set(tricks)]


def test_vectorized_part_trains_the_same_runs_as_one_group() -> None:
    """The ``vectorized`` part times a group (bench.loop.train_group) against the runs alone; its numbers agree
    (the group's correctness is tested in tests/test_vectorized.py; here: the benchmark measures that path)."""
    from bench.loop import VECTORIZED_METRIC_TOLERANCE
    from bench.perf import vectorized_speed

    row = vectorized_speed(seeds=2, steps=4, repeats=1, params={"hidden": 16, "depth": 2, "sampling_steps": 4,
                           "eval_samples_per_class": 16, "final_samples_per_class": 16})  # fmt: skip
    assert row["seeds"] == 2 and row["steps"] == 4
    assert row["max_abs_swd_diff"] <= VECTORIZED_METRIC_TOLERANCE
    assert row["vectorized_train_s"] > 0 and row["sequential_train_s"] > 0


def test_throughput_grid_is_64_runs_the_bare_loop_can_train(tmp_path: Path) -> None:
    """8 arms × 8 seeds of task-role tricks only (they act inside the task's batch/loss, which the bare loop calls
    too); the bare loop refuses a trick of the loop's roles, and trains a tiny version of the grid."""
    from bench.perf import BareLoop, bare_grid, throughput_spec

    cells = expand(parse_spec(throughput_spec()))
    assert len(cells) == 64 and len({c.arm for c in cells}) == 8 and len({c.seed for c in cells}) == 8
    with pytest.raises(ValueError, match=r"cell.tricks: \['ema'\] given; allowed: tricks of the task role only"):
        BareLoop(perf_cell("toy_diffusion", {"ema": None}, steps=3))
    tiny = throughput_spec(seeds=1, steps=2, tricks=("fourier_features",))
    tiny["tasks"]["toy_diffusion"]["params"] = get_task("toy_diffusion").tiny["params"]
    done = bare_grid(tiny)
    assert done["runs"] == 2 and done["cpu_s"] > 0


@pytest.mark.slow  # 15-40 s: three fresh processes (two `bench run` launches) on a tiny grid
def test_bench_perf_grid_part_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["perf", "--quick", "--only", "grid", "--out", str(tmp_path)])
    assert code == 0
    (folder,) = tmp_path.iterdir()
    rows = (folder / "grid.csv").read_text()
    assert "CPU ratio: bench run / bare loops" in rows and "speedup, wall" in rows


def test_perf_device_is_refused_where_it_cannot_act(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the CPU-step parts would time a GPU run as if it were CPU steps: --device cuda is only for vectorized/grid
    assert main(["perf", "--device", "cuda", "--only", "parity", "grid", "--out", str(tmp_path)]) == 2
    assert "--device: 'cuda' is not allowed with --only parity" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["perf", "--device", "cuda", "--only", "grid", "--out", str(tmp_path)]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_runs_per_gpu_with_cpu_is_a_clear_error(tmp_path: Path) -> None:
    cells = _seed_cells({}, seeds=2)
    with pytest.raises(ValueError, match=r"--runs-per-gpu: 2 is not allowed with --device 'cpu'"):
        run_local(cells, tmp_path, 2, device="cpu", runs_per_gpu=2, show_progress=False)
    with pytest.raises(ValueError, match=r"--runs-per-gpu: 0 is not allowed"):
        run_local(cells, tmp_path, 2, device="cuda", runs_per_gpu=0, show_progress=False)
    assert not (tmp_path / "vec").exists()  # nothing was started
    assert [worker_device(i, 2) for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_per_gpu_packs_runs_onto_every_gpu(tmp_path: Path) -> None:
    from bench import store

    cells = _seed_cells({}, seeds=4 * torch.cuda.device_count())
    counts = run_local(cells, tmp_path, 1, device="cuda", runs_per_gpu=2, show_progress=False)
    assert counts == {"completed": len(cells)}
    devices = {
        store.read_json(store.run_dir(tmp_path, c.grid, c.run_id) / store.RESULT)["cost"]["device"] for c in cells
    }
    assert devices == {f"cuda:{i}" for i in range(torch.cuda.device_count())}


def test_bench_perf_cli_writes_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each invocation writes a new folder under --out (never overwriting); parity shows CPU beside wall ratios."""
    args = ["perf", "--quick", "--only", "parity", "data", "--tasks", "toy_diffusion", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Harness vs bare PyTorch loop" in out and "toy_diffusion" in out
    (first,) = tmp_path.iterdir()
    md = (first / "perf.md").read_text()
    assert "load_average" in md and "torch: " + torch.__version__ in md
    assert {p.name for p in first.glob("*.csv")} == {"parity.csv", "data.csv"}
    header = (first / "parity.csv").read_text().splitlines()[0].split(",")
    assert {"ratio_wall", "ratio_cpu", "ratio_cpu_min", "ratio_cpu_max", "target_met_cpu", "bare_step_cpu_ms"} <= set(
        header
    )
    assert header.index("ratio_cpu") == header.index("ratio_wall") + 1  # side by side
    assert main([*args[:3], "data", "--tasks", "toy_diffusion", "--out", str(tmp_path)]) == 0
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2 and (first / "parity.csv").exists()  # the first invocation's files are untouched


def test_lockstep_runs_take_turns_and_train_what_they_train_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import perf

    cells = [perf_cell("toy_diffusion", tricks, steps=12) for tricks in ({}, {"ema": None}, {"fourier_features": None})]
    runs = perf.lockstep_train(cells)
    assert [len(r.step_wall_s) for r in runs] == [10, 10, 10]  # 12 steps, first and last dropped
    assert all(t > 0 for r in runs for t in r.step_wall_s + r.step_cpu_s)
    for i, (cell, run) in enumerate(zip(cells, runs)):
        alone = train(cell, tmp_path / str(i), RunContext(threads=1))
        assert run.result["metric"] == alone["metric"]

    order: list[int] = []  # who handed the baton on after a step: 0, 1, 2, 0, 1, 2, ... then the longer runs
    original = perf._Baton.pass_on

    def recording(self: perf._Baton, i: int, finished: bool = False) -> None:
        if not finished:
            order.append(i)
        original(self, i, finished)

    monkeypatch.setattr(perf._Baton, "pass_on", recording)
    perf.lockstep_train([*cells[:2], perf_cell("toy_diffusion", {}, steps=6)])
    assert order == [0, 1, 2] * 6 + [0, 1] * 6


@pytest.mark.slow
def test_trick_costs_time_a_trick_that_needs_evaluations_against_a_baseline_on_its_schedule() -> None:
    """``bench perf --only tricks``: checkpoint averaging's defaults (n: 3) cannot act on a run that evaluates only
    at its end, so its pair — baseline and trick alike — evaluates TRICK_COST_EVALS times; the part completes."""
    from bench.perf import trick_costs

    rows = trick_costs("cifar_autoencoder", steps=4, repeats=1, tricks=["checkpoint_averaging", "ema"])
    by_trick = {r["trick"]: r for r in rows}
    assert set(by_trick) == {"baseline", "checkpoint_averaging", "ema"}
    assert all(r["status"] == "completed" for r in rows), rows
    assert by_trick["checkpoint_averaging"]["time_rel"] > 0


def test_cluster_estimate_of_a_cifar10_grid_completes_offline(tmp_path: Path) -> None:
    """``bench perf --only scaling`` ends with the 1,000-run GPU estimate of every shipped ``*_full.yaml`` grid;
    ``cifar_full.yaml`` trains on CIFAR-10, which this machine cannot download: the estimate counts its ops on
    the offline image set (same shapes) instead of failing the benchmark. (A small grid of the same kind.)"""
    import yaml

    from bench.perf import cluster_estimate

    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "experiments/grids/cifar_full.yaml").read_text())
    assert shipped["tasks"]["cifar_autoencoder"]["params"]["data"] == "cifar10"
    grid = tmp_path / "cifar_small.yaml"
    small = {"data": "cifar10", "train_size": 256, "test_size": 64}
    grid.write_text(yaml.safe_dump({"grid": "cifar-small", "tasks": {"cifar_autoencoder": {"params": small}}}))
    rows = cluster_estimate([grid])
    assert rows and all(r["grid"] == grid.name and r["est_gpu_run_s"] > 0 for r in rows)
