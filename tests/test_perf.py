"""Performance machinery, checked for correctness (speed is measured by ``bench perf``, never asserted here).

- the harness trains exactly what a bare hand-written PyTorch loop trains (losses, final weights);
- the performance options: off = that bare loop bit for bit; channels_last and bf16 autocast on CPU;
- seed-vectorized training equals independent runs within 1e-5;
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
from bench.vectorized import check_vectorizable, train_vectorized
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


@pytest.mark.parametrize(
    "tricks",
    [
        {},
        {
            "ema": {"half_life_samples": 64},
            "accumulation": {"micro_batches": 2},
            "stratified_sampling": None,
            "cond_dropout": None,
            "nonleaky_augmentation": None,
        },
    ],
    ids=["baseline", "ema+accumulation+task-tricks"],
)
def test_vectorized_seeds_equal_independent_runs(tmp_path: Path, tricks: dict) -> None:
    cells = _seed_cells(tricks)
    assert len(cells) == 3
    vectorized = train_vectorized(cells)
    for cell, vec in zip(cells, vectorized):
        ref = train(cell, tmp_path / cell.run_id, RunContext(threads=1))
        assert vec["run_id"] == cell.run_id and vec["status"] == ref["status"] == "completed"
        final = torch.load(tmp_path / cell.run_id / "final_model.pt", weights_only=True)
        assert final.keys() == vec["final_model"].keys()
        for k, v in final.items():
            torch.testing.assert_close(vec["final_model"][k], v, rtol=0, atol=1e-5)
        assert vec["metric"].keys() == ref["metric"].keys()
        for k, v in ref["metric"].items():
            assert vec["metric"][k] == pytest.approx(v, abs=1e-5), k
        rows = (tmp_path / cell.run_id / "train.csv").read_text().splitlines()[1:]
        losses = [float(r.split(",")[2]) for r in rows]
        torch.testing.assert_close(
            torch.tensor(vec["history"]["train"]["loss"]), torch.tensor(losses), rtol=0, atol=1e-5
        )
    # the seeds really differ (each drew its own init and batches)
    assert vectorized[0]["metric"]["swd"] != vectorized[1]["metric"]["swd"]


def test_vectorized_rejects_what_it_cannot_train() -> None:
    with pytest.raises(ValueError, match="posthoc_ema"):
        check_vectorizable(_seed_cells({"posthoc_ema": None}, seeds=2))
    base, ema_arm = _seed_cells({}, seeds=2), _seed_cells({"ema": None}, seeds=2)
    with pytest.raises(ValueError, match=r"differs .* in tricks"):
        check_vectorizable([base[0], ema_arm[1]])  # two arms
    with pytest.raises(ValueError, match="repeat"):
        check_vectorizable([base[0], base[0]])
    cifar = perf_cell("cifar_autoencoder")
    with pytest.raises(ValueError, match="cifar_autoencoder"):
        check_vectorizable([cifar])


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
    code = main(["perf", "--quick", "--only", "parity", "data", "--tasks", "toy_diffusion", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "Harness vs bare PyTorch loop" in out and "toy_diffusion" in out
    md = next(tmp_path.glob("perf_*_parity+data.md")).read_text()
    assert "load_average" in md and "ratio_wall" in md
    assert {p.name.split("_", 2)[-1] for p in tmp_path.glob("perf_*_*.csv")} == {"parity.csv", "data.csv"}


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
