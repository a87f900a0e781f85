"""The toy_diffusion task: its data, metric, sampler, trick wiring, learning, and bit-exact resume."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from bench.grid import expand
from bench.loop import RunContext, build_task, train
from bench.seeds import SeedBundle
from bench.spec import SpecError, applicable_tricks, load_spec, parse_spec
from experiments.base import MicroBatch
from experiments.data import toy2d
from experiments.toy_diffusion import (
    Denoiser,
    ToyDiffusion,
    class_fidelity,
    edm_sigmas,
    heun_sample,
    sliced_wasserstein,
)
from tests.test_loop import cell_for
from tricks.registry import REGISTRY

GRIDS = Path(__file__).resolve().parent.parent / "experiments" / "grids"
TINY = ToyDiffusion.tiny


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_task(tricks: dict | None = None, params: dict | None = None, train_cfg: dict | None = None, seed: int = 0):
    """A task object as the loop builds it (resolved config), and its untrained model."""
    cfg = cell_for("toy_diffusion", tricks, params, train_cfg, seed=seed).config
    streams = SeedBundle(seed)
    task, _ = build_task(cfg, streams, torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(streams.seed_for("init"))
        model = task.build_model()
    return task, model


# ---------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("name", list(toy2d.DISTRIBUTIONS))
def test_distribution_shapes_balance_scale_and_determinism(name: str) -> None:
    k = toy2d.num_classes(name)
    pts, labels = toy2d.sample(name, 1001, gen(3))
    assert pts.shape == (1001, 2) and pts.dtype == torch.float32
    assert labels.shape == (1001,) and labels.dtype == torch.int64
    counts = torch.bincount(labels, minlength=k)
    assert len(counts) == k and int(counts.max() - counts.min()) <= 1  # balanced
    assert 0.3 < toy2d.data_std(name) < 1.0 and float(pts.abs().max()) < 2.0  # roughly unit scale
    again, labels_again = toy2d.sample(name, 1001, gen(3))
    assert torch.equal(pts, again) and torch.equal(labels, labels_again)
    assert not torch.equal(pts, toy2d.sample(name, 1001, gen(4))[0])


@pytest.mark.parametrize("name", list(toy2d.DISTRIBUTIONS))
def test_classes_are_distinct_components(name: str) -> None:
    """Each class is its own region: a point's nearest neighbour (among other points) is almost
    always of its class, far above the 1/K of classes laid on top of each other."""
    pts, labels = toy2d.sample(name, 2000, gen(0))
    d = torch.cdist(pts, pts)
    d.fill_diagonal_(float("inf"))
    same = (labels[d.argmin(1)] == labels).float().mean()
    assert same > 0.9


def test_given_labels_are_respected() -> None:
    labels = torch.tensor([2, 2, 0, 1, 2])
    pts, out = toy2d.sample("rings", 5, gen(0), labels)
    assert torch.equal(out, labels)
    radius = pts.norm(dim=1)
    assert torch.allclose(radius, torch.tensor([1.05, 1.05, 0.35, 0.7, 1.05]), atol=0.2)  # the ring radii


def test_bad_inputs_name_the_field() -> None:
    with pytest.raises(ValueError, match="name: 'circles'"):
        toy2d.sample("circles", 10, gen())
    with pytest.raises(ValueError, match="n: -1"):
        toy2d.sample("moons", -1, gen())
    with pytest.raises(ValueError, match="labels"):
        toy2d.sample("moons", 3, gen(), torch.tensor([0, 1, 2]))  # class 2 of a 2-class set


# ---------------------------------------------------------------------------------------- metric


def test_swd_zero_for_identical_and_exact_for_a_shift() -> None:
    a, _ = toy2d.sample("spirals", 500, gen(0))
    assert sliced_wasserstein(a, a) == 0.0
    # a shift by t along x moves every projection by t·|cos θ|: the mean over θ of |cos θ| is 2/π
    t = 0.3
    swd = sliced_wasserstein(a, a + torch.tensor([t, 0.0]), num_projections=4096)
    assert swd == pytest.approx(2 * t / math.pi, rel=1e-6)


def test_swd_small_for_same_distribution_large_for_different() -> None:
    a, _ = toy2d.sample("moons", 2048, gen(0))
    b, _ = toy2d.sample("moons", 2048, gen(1))
    c, _ = toy2d.sample("spirals", 2048, gen(2))
    same, different = sliced_wasserstein(a, b), sliced_wasserstein(a, c)
    assert same < 0.03  # the finite-sample floor at n = 2048
    assert different > 5 * same
    # unequal sizes go through the quantile grid and agree with the equal-size value
    assert sliced_wasserstein(a, b[:1024]) == pytest.approx(sliced_wasserstein(a, b), abs=0.02)


def test_per_class_metric_sees_swapped_classes() -> None:
    """Samples of the right distribution but with the class labels swapped: the pooled
    distribution is perfect, the per-class distances and the class fidelity are not."""
    task, _ = make_task()
    pts, labels = task._truth[task.p["eval_samples_per_class"]]
    other, _ = task._true_points(task.p["eval_samples_per_class"], 2)
    swapped = torch.cat([other[labels == 1], other[labels == 0]])
    right = task._swd_per_class(other, (pts, labels))
    wrong = task._swd_per_class(swapped, (pts, labels))
    assert max(right) < 0.1 and min(wrong) > 3 * max(right)
    assert class_fidelity(other, labels, pts, labels) > 0.95
    assert class_fidelity(swapped, labels, pts, labels) < 0.05


# ---------------------------------------------------------------------------------------- sampler and model


def test_edm_sigmas() -> None:
    s = edm_sigmas(18, 0.002, 80.0, 7.0)
    assert len(s) == 19 and s[-1] == 0
    assert s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002)
    assert bool((s[:-1] > s[1:]).all())
    with pytest.raises(ValueError, match="sigma_min"):
        edm_sigmas(4, 1.0, 0.5)


def test_heun_sampler_with_the_exact_gaussian_denoiser() -> None:
    """For data N(0, s²) the ideal denoiser is s²/(s² + σ²)·x and the ODE's solution is
    x(σ) ∝ √(s² + σ²): the sampler must reproduce it, with Heun's second-order convergence."""
    s, smax = 0.57, 10.0
    noise = torch.randn(1000, 2, generator=gen(0), dtype=torch.float64)
    exact = noise * smax * s / math.sqrt(s**2 + smax**2)

    def error(steps: int) -> float:
        out = heun_sample(
            lambda x, sig: s**2 / (s**2 + sig[:, None] ** 2) * x, noise * smax, edm_sigmas(steps, 0.002, smax)
        )
        return float(((out - exact).norm(dim=1) / exact.norm(dim=1)).max())

    assert error(32) < 0.01  # the task's default sampler
    assert 3.5 < error(32) / error(64) < 4.5  # second order: halving the step quarters the error


def test_preconditioning_is_edm_table_1() -> None:
    model = Denoiser(num_classes=2, sigma_data=0.5)
    c_skip, c_out, c_in, c_noise = model.precondition(torch.tensor([0.3]))
    assert c_skip.item() == pytest.approx(0.25 / (0.09 + 0.25))
    assert c_out.item() == pytest.approx(0.3 * 0.5 / math.sqrt(0.34))
    assert c_in.item() == pytest.approx(1 / math.sqrt(0.34))
    assert c_noise.item() == pytest.approx(math.log(0.3) / 4)
    # with F ≡ 0 the denoiser is c_skip·x, the ideal denoiser of N(0, σ_data²)
    torch.nn.init.zeros_(model.out.weight)
    torch.nn.init.zeros_(model.out.bias)
    x = torch.randn(4, 2, generator=gen())
    cond = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1]), 3).float()
    assert torch.allclose(model(x, torch.full((4,), 0.3), cond), c_skip * x)


def test_optional_layers_do_not_change_the_shared_initialization() -> None:
    _, base = make_task()
    for tricks in ({"fourier_features": None}, {"nonleaky_augmentation": None}, {"cond_noise": None}):
        _, other = make_task(tricks)
        other_sd = other.state_dict()
        for name, value in base.state_dict().items():
            if not name.startswith("noise_embed") or "fourier_features" not in tricks:
                assert torch.equal(value, other_sd[name]), (tricks, name)


def test_guidance_weight_zero_equals_unguided_sampling() -> None:
    task, model = make_task({"cond_dropout": {"p": 0.2, "guidance_weight": 1.0}}, TINY["params"])
    model.eval()
    labels = torch.tensor([0, 1] * 32)
    noise = torch.randn(64, 2, generator=gen(1))
    with torch.no_grad():
        plain = task.generate(model, labels, noise, None)
        zero = task.generate(model, labels, noise, 0.0)
        guided = task.generate(model, labels, noise, 1.0)
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, guided)


# ---------------------------------------------------------------------------------------- trick wiring


def _u_of(task: ToyDiffusion, sigma: torch.Tensor) -> torch.Tensor:
    """Invert σ = exp(P_mean + P_std·Φ⁻¹(u)) back to u (float64)."""
    z = (sigma.double().log() - task.p["P_mean"]) / task.p["P_std"]
    return torch.special.ndtr(z)


def test_stratified_sigmas_cover_every_stratum_across_micro_batches() -> None:
    task, model = make_task(
        {"stratified_sampling": None, "accumulation": {"micro_batches": 4}}, None, {"batch_size": 64}
    )
    u = torch.cat([_u_of(task, task.batch(model, MicroBatch(7, micro, 4, 16, 0.0)).sigma) for micro in range(4)])
    strata = torch.floor(u * 64).long()
    assert torch.equal(torch.sort(strata).values, torch.arange(64))
    # the i.i.d. arm leaves strata empty (with overwhelming probability at n = 64)
    task_iid, _ = make_task({"accumulation": {"micro_batches": 4}}, None, {"batch_size": 64})
    u_iid = torch.cat([_u_of(task_iid, task_iid.batch(model, MicroBatch(7, m, 4, 16, 0.0)).sigma) for m in range(4)])
    assert len(torch.unique(torch.floor(u_iid * 64))) < 64


def test_cond_dropout_writes_the_exact_null_class() -> None:
    task, model = make_task({"cond_dropout": {"p": 0.5}, "cond_noise": {"std": 0.3}})
    b = task.batch(model, MicroBatch(0, 0, 1, 2000, 0.0))
    null = torch.tensor([0.0, 0.0, 1.0])
    dropped = (b.cond == null).all(dim=1)
    assert abs(dropped.float().mean().item() - 0.5) < 0.05
    kept = b.cond[~dropped]
    assert not (kept == null).all(dim=1).any() and kept.std() > 0  # the kept ones carry the noised one-hot


def test_cond_noise_noises_the_one_hot_in_training_only() -> None:
    task, model = make_task({"cond_noise": {"std": 0.2}})
    b = task.batch(model, MicroBatch(0, 0, 1, 4000, 0.0))
    base, _ = make_task()
    clean = base.batch(model, MicroBatch(0, 0, 1, 4000, 0.0)).cond  # the same step of the paired arm: the same classes
    assert abs((b.cond - clean).std().item() - 0.2) < 0.01
    assert torch.equal(b.cond_std, torch.full((4000, 1), 0.2))
    cond, _, cond_std = task._sampling_cond(torch.tensor([0, 1]))
    assert torch.equal(cond, torch.eye(3)[:2]) and torch.equal(cond_std, torch.zeros(2, 1))


def test_nonleaky_augmentation_labels_zero_exactly_where_points_are_clean() -> None:
    task, model = make_task({"nonleaky_augmentation": {"p": 0.3}})
    base, _ = make_task()
    b, clean = task.batch(model, MicroBatch(3, 0, 1, 512, 0.0)), base.batch(model, MicroBatch(3, 0, 1, 512, 0.0))
    untouched = (b.aug == 0).all(dim=1)
    assert 0.05 < untouched.float().mean() < 0.5  # (1 − 0.3)^5 ≈ 0.17 of the points are clean
    assert torch.equal(b.x[untouched], clean.x[untouched])
    assert ((b.x[~untouched] - clean.x[~untouched]).norm(dim=1) > 0).all()
    assert torch.equal(b.sigma, clean.sigma) and torch.equal(b.noise, clean.noise)  # paired noise


def test_fixed_training_set_is_shared_by_seeds_and_sampled_from() -> None:
    task, model = make_task(None, {"train_size": 64}, seed=0)
    other, _ = make_task(None, {"train_size": 64}, seed=1)
    assert torch.equal(task.train_points, other.train_points)  # a property of the task, not of the seed
    b = task.batch(model, MicroBatch(5, 0, 1, 256, 0.0))
    assert (b.x[:, None, :] == task.train_points[None]).all(dim=2).any(dim=1).all()  # every point is a training point
    assert len(torch.unique(b.x, dim=0)) <= 64


def test_check_rejects_an_empty_sampling_range() -> None:
    with pytest.raises(SpecError, match=r"params\.sigma_min"):
        cell_for("toy_diffusion", None, {"sigma_min": 5.0, "sigma_max": 1.0})


# ---------------------------------------------------------------------------------------- grids


def test_grids_validate_and_cover_every_applicable_trick() -> None:
    quick, full = load_spec(GRIDS / "diffusion_quick.yaml"), load_spec(GRIDS / "diffusion_full.yaml")
    from tricks.registry import origin

    # trickbench's own tricks (an installed plugin's tricks of loop roles apply too, but are not shipped in grids)
    applicable = {t for t in applicable_tricks(ToyDiffusion) if origin(t).startswith("tricks.")}
    for spec in (quick, full):
        (task,) = spec.tasks
        assert set(task.tricks) == applicable
    assert len(quick.seeds) == 3 and len(full.seeds) >= 10
    assert len(expand(quick)) == 3 * (1 + len(applicable))
    with pytest.raises(SpecError, match="precise_bn"):
        parse_spec({"grid": "x", "tasks": {"toy_diffusion": {"tricks": {"precise_bn": None}}}})


# ---------------------------------------------------------------------------------------- training


def test_baseline_really_learns_at_quick_grid_scale(tmp_path: Path) -> None:
    """The quick grid's baseline: its final swd must be far below the untrained model's.

    Measured (seeds 0-2): swd untrained 0.37-0.39, trained 0.028-0.053 (ratio 0.075-0.13), floor
    0.013-0.024; class fidelity 0.49-0.52 untrained, 0.990-0.997 trained.
    """
    (spec_task,) = load_spec(GRIDS / "diffusion_quick.yaml").tasks
    task, untrained = make_task(None, spec_task.params, spec_task.train)
    untrained.eval()
    with torch.no_grad():
        before = task.evaluate(untrained, final=True)
    result = train(cell_for("toy_diffusion", None, spec_task.params, spec_task.train), tmp_path, RunContext(threads=1))
    after = result["metric"]
    assert after["swd"] < 0.25 * before["swd"], (after, before)
    assert after["class_fidelity"] > 0.9 > before["class_fidelity"] + 0.3
    assert after["swd_floor"] < after["swd"]  # the floor is a floor
    assert (tmp_path / "final_model.pt").exists()
    ok = task.render_outputs(untrained, tmp_path / "samples.png")
    assert ok and (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


TRICK_CASES = {"baseline": {}} | {name: {name: REGISTRY[name].tiny_setting} for name in applicable_tricks(ToyDiffusion)}
TRICK_CASES["task-tricks+accumulation"] = {
    name: REGISTRY[name].tiny_setting
    for name in ("stratified_sampling", "fourier_features", "cond_dropout", "cond_noise", "nonleaky_augmentation")
} | {"accumulation": {"micro_batches": 2}}


@pytest.mark.parametrize("case", list(TRICK_CASES))
def test_tiny_training_resumes_bit_exactly(tmp_path: Path, case: str) -> None:
    cell = cell_for("toy_diffusion", TRICK_CASES[case], TINY["params"], TINY["train"])
    full = train(cell, tmp_path / "full", RunContext(threads=1))
    assert full["status"] == "completed" and math.isfinite(full["metric"]["swd"])
    if "cond_dropout" in TRICK_CASES[case]:
        assert {"swd_guided", "swd_unguided"} <= set(full["metric"])
    if "nonleaky_augmentation" in TRICK_CASES[case]:
        assert "swd_to_augmented" in full["metric"]
    stop_at = random.Random(case).randrange(1, full["cost"]["steps"])
    out = tmp_path / "resumed"
    assert train(cell, out, RunContext(threads=1, max_steps=stop_at)) == {"status": "interrupted", "step": stop_at}
    second = train(cell, out, RunContext(threads=1))
    assert second["cost"]["resumes"] == 1
    assert second["metric"] == full["metric"]
    assert (out / "curve.csv").read_text() == (tmp_path / "full" / "curve.csv").read_text()
    assert (out / "train.csv").read_text() == (tmp_path / "full" / "train.csv").read_text()
    for k, v in _final_params(tmp_path / "full").items():
        torch.testing.assert_close(_final_params(out)[k], v, atol=0, rtol=0)
