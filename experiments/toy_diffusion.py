"""``toy_diffusion``: a class-conditional EDM diffusion model (tiny MLP) on procedural 2-D data.

Data: one of the distributions of ``experiments/data/toy2d.py`` (blobs, rings, moons,
spirals; class = component), fresh samples every step from the ``data`` stream, or a fixed
training set of ``train_size`` points. Model: an MLP denoiser with EDM preconditioning
(Karras et al. 2022, Table 1: ``c_skip``, ``c_out``, ``c_in``, ``c_noise = ln(σ)/4``),
conditioned on the noise level and on the class (a one-hot with an extra *null* index K,
through a bias-free linear layer = a learned embedding). Loss: EDM's weighted denoising
loss, ``λ(σ)·‖D(x + σn; σ, c) − x‖²`` with ``λ = (σ² + σ_d²)/(σ·σ_d)²`` and log-normal
``σ`` (``P_mean``, ``P_std``). Sampling: EDM's deterministic Heun ODE solver with the ρ = 7
schedule; the initial noise comes from the ``eval`` stream, so every arm of a seed starts
from the same noise.

Metric: the sliced Wasserstein distance (:func:`sliced_wasserstein`, W1 in data units) per
class between generated and fresh true samples; ``swd`` (primary, lower is better) is the
mean over classes of the samples the arm's recipe produces — guided (cond_dropout's
``guidance_weight``) when cond_dropout is on, plain conditional otherwise. Also reported:
``swd_unguided``, ``swd_guided`` (cond_dropout only), ``swd_class<k>``; at the final
evaluation ``swd_floor`` (the distance between two true samples of the same size: the
value a perfect model would get), ``cond_sensitivity`` (output change per unit
conditioning perturbation, the cond_noise claim) and, with nonleaky_augmentation,
``swd_to_augmented`` (the leakage check, see below).

Why sliced Wasserstein and not energy distance: SWD is in data units, exact (sorted
quantiles) per 1-D projection in O(n log n), and as a W1 it grows with how far mass is
misplaced — a blurred spiral arm costs in proportion to its blur. Energy distance is a
squared-distance statistic dominated by the large-scale layout, less sensitive to the thin
structure these distributions are made of. In 2-D the projections are evenly spaced
angles over [0, π) — a deterministic quadrature of the circle average (random directions
from a fixed generator estimate the same integral with more variance).

Where each data/loss-level trick acts (search for "TRICK:"):
- stratified_sampling: ``batch`` draws the training σ from stratified uniforms → log-normal,
  stratified across the accumulation micro-batches of a step.
- fourier_features: the model's noise-level embedding is FourierFeatures(c_noise) → linear
  (off: c_noise → linear).
- cond_dropout: ``batch`` drops the class to the null index at rate p; ``evaluate`` samples
  with classifier-free guidance.
- cond_noise: ``batch`` adds Gaussian noise to the class *one-hot* (not to the learned
  embedding, whose scale the network could grow to drown the noise) and feeds its std;
  sampling uses the fixed ``inference_std``.
- nonleaky_augmentation: ``batch`` augments the clean points (flip, rot90, rotate, translate,
  scale) before noising; the labels are an extra conditioning input, zero at sampling.
  Leakage check (NVlabs/edm#17): ``swd`` is measured at labels = 0 against the *clean*
  distribution, and ``swd_to_augmented`` against the augmented one; a leaking model is
  closer to the augmented distribution than a clean one is.
Loop-role tricks (EMA, post-hoc EMA, averaging, accumulation, zero weight decay) act in
bench/loop.py. Seed-vectorized (``vectorizable``): every trick, every setting — ``batch`` draws
each seed's data from its own streams, ``loss`` reads only the model, the batch and ``sigma_data``.
precise_bn does not apply: the model has no BatchNorm (no "batchnorm" capability).

Random sub-streams of one purpose are named by the ``IntEnum`` classes below (their integer
values are part of the stream names, so they never change).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from experiments.base import MicroBatch, Task
from experiments.data import toy2d
from tricks import cond_noise, stratified
from tricks.card import Param
from tricks.cond_dropout import guided
from tricks.fourier import FourierFeatures

__all__ = ["TASK", "Denoiser", "ToyDiffusion", "class_fidelity", "edm_sigmas", "heun_sample", "sliced_wasserstein"]


class Augment(IntEnum):
    """Sub-streams of the ``augment`` purpose (per step and micro-batch)."""

    NONLEAKY = 0  # nonleaky_augmentation's transform draws
    COND_NOISE = 1  # cond_noise's noise
    COND_DROPOUT = 2  # cond_dropout's mask


class Noise(IntEnum):
    """Sub-streams of the ``noise`` purpose (per step and micro-batch)."""

    SAMPLES = 1  # the Gaussian noise added to the clean points (the noise levels use the bare stream)


class Eval(IntEnum):
    """Sub-streams of the ``eval`` purpose (identical in every arm of a seed)."""

    SAMPLER_NOISE = 0  # the sampler's initial noise
    TRUTH = 1  # true points the samples are compared with
    SECOND_TRUTH = 2  # an independent true sample (the reference floor, the leakage check)
    SENSITIVITY = 3  # the conditioning-sensitivity probe
    LEAKAGE_AUGMENT = 4  # augmentation of the true points for the leakage check
    INFERENCE_COND_NOISE = 5  # cond_noise's fixed inference noise


class Init(IntEnum):
    """Sub-streams of the ``init`` purpose."""

    OPTIONAL_LAYERS = 1  # seeds of the layers only some tricks add


# ----------------------------------------------------------------------------------------
# Metric


def sliced_wasserstein(a: Tensor, b: Tensor, num_projections: int = 64) -> float:
    """Sliced Wasserstein-1 distance between two 2-D point sets (N, 2) and (M, 2), in data units.

    The mean over ``num_projections`` directions, evenly spaced over [0, π), of the 1-D
    Wasserstein-1 distance between the projected samples: with N = M the mean absolute
    difference of the sorted projections (exact); otherwise the two empirical quantile
    functions are compared on a grid of max(N, M) midpoints. Deterministic; float64.
    Two finite samples of one distribution are not at 0 but at a floor ~ n^(-1/2).
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[1] != 2 or len(t) == 0:
            raise ValueError(f"{name}: not allowed; allowed: a non-empty tensor (N, 2)")
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections: {num_projections!r} is not allowed; allowed: an integer ≥ 1")
    angles = math.pi * (torch.arange(num_projections, dtype=torch.float64) + 0.5) / num_projections
    dirs = torch.stack([angles.cos(), angles.sin()], dim=1)  # (P, 2)
    pa = torch.sort(a.detach().cpu().double() @ dirs.T, dim=0).values  # (N, P)
    pb = torch.sort(b.detach().cpu().double() @ dirs.T, dim=0).values
    if len(pa) != len(pb):
        m = max(len(pa), len(pb))
        q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
        pa = pa[(q * len(pa)).long()]
        pb = pb[(q * len(pb)).long()]
    return float((pa - pb).abs().mean())


def class_fidelity(samples: Tensor, labels: Tensor, true_points: Tensor, true_labels: Tensor) -> float:
    """Fraction of ``samples`` whose nearest true point (over all classes) has the intended class.

    A precision-like check of the conditioning: 1 = every sample lies in its own class's
    region. Guidance trades distribution match (``swd``) for this. Chunked nearest-neighbour
    search (float32), O(N·M) time, O(1024·M) memory.
    """
    hits = 0
    for i in range(0, len(samples), 1024):
        nearest = torch.cdist(samples[i : i + 1024].float(), true_points.float()).argmin(dim=1)
        hits += int((true_labels[nearest] == labels[i : i + 1024]).sum())
    return hits / max(len(samples), 1)


# ----------------------------------------------------------------------------------------
# Sampler


def edm_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM's noise levels (Karras et al. 2022, eq. 5): ``steps`` levels from σ_max to σ_min, then 0.

    ``σ_i = (σ_max^(1/ρ) + i/(steps−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ`` (float64, (steps + 1,)).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: {steps!r} is not allowed; allowed: an integer ≥ 1")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min: {sigma_min!r} is not allowed; allowed: 0 < sigma_min < sigma_max ({sigma_max})")
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / max(steps - 1, 1)
    sig = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sig, torch.zeros(1, dtype=torch.float64)])


def heun_sample(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor) -> Tensor:
    """Integrate the probability-flow ODE with EDM's Heun solver (Algorithm 1, deterministic).

    ``x`` is the initial sample at ``sigmas[0]`` (noise · σ_max); ``denoise(x, σ (N,))`` returns
    D(x; σ). Euler on the last step to σ = 0, Heun's correction elsewhere: 2·steps − 1 calls.
    """
    for s_cur, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, x.new_full((len(x),), s_cur))) / s_cur
        x_next = x + (s_next - s_cur) * d
        if s_next > 0:
            d_next = (x_next - denoise(x_next, x.new_full((len(x),), s_next))) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d + d_next)
        x = x_next
    return x


# ----------------------------------------------------------------------------------------
# Model


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Create a layer from its own seed (not the running init stream), when ``seed`` is given."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):  # layers are created on the CPU, from the CPU generator
        torch.default_generator.manual_seed(seed)  # torch.manual_seed's CPU state, without its lazy-CUDA queue
        yield


class Denoiser(nn.Module):
    """EDM-preconditioned MLP denoiser ``D(x; σ, class)`` for 2-D points.

    ``forward(x, sigma, cond, aug=None, cond_std=None)``: ``x`` (N, 2) noisy points, ``sigma``
    (N,), ``cond`` (N, K+1) class one-hot (index K = null), ``aug`` (N, aug_dim) augmentation
    labels, ``cond_std`` (N, 1) conditioning-noise level. Returns D (N, 2) =
    ``c_skip·x + c_out·F(c_in·x, c_noise, ...)``.

    The raw network F: the sum of the input, class, noise-level and (optional) conditioning
    embeddings, then ``depth − 1`` SiLU+linear layers and a SiLU+linear output. The noise-level
    embedding and the optional conditioning layers are created last, each under its own seed
    (``layer_seed + i``) when given, so switching a trick on leaves every other layer's
    initialization unchanged (paired arms). ``fourier``: the fourier_features trick's layer
    factory (``fourier(in_features)`` → :class:`~tricks.fourier.FourierFeatures`), or None.
    """

    def __init__(
        self,
        num_classes: int,
        sigma_data: float,
        hidden: int = 64,
        depth: int = 3,
        fourier: Callable[..., FourierFeatures] | None = None,
        aug_dim: int = 0,
        cond_std_input: bool = False,
        layer_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.sigma_data = float(sigma_data)
        self.num_classes = num_classes
        self.x_in = nn.Linear(2, hidden)
        self.class_embed = nn.Linear(num_classes + 1, hidden, bias=False)  # one-hot → embedding; row K = null
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth - 1))
        self.out = nn.Linear(hidden, 2)
        with _seeded(layer_seed):
            if fourier is not None:  # TRICK: fourier_features — c_noise → sin/cos features → linear
                feats = fourier(1)
                self.noise_embed: nn.Module = nn.Sequential(feats, nn.Linear(feats.out_features, hidden))
            else:
                self.noise_embed = nn.Linear(1, hidden)
        with _seeded(None if layer_seed is None else layer_seed + 1):
            self.aug_embed = nn.Linear(aug_dim, hidden, bias=False) if aug_dim else None
        with _seeded(None if layer_seed is None else layer_seed + 2):
            self.cond_std_embed = nn.Linear(1, hidden, bias=False) if cond_std_input else None

    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """EDM's (c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (N,), each (N, 1)."""
        s = sigma.reshape(-1, 1)
        sd2 = self.sigma_data**2
        norm = (s**2 + sd2).sqrt()
        return sd2 / (s**2 + sd2), s * self.sigma_data / norm, 1 / norm, s.log() / 4

    def forward(
        self, x: Tensor, sigma: Tensor, cond: Tensor, aug: Tensor | None = None, cond_std: Tensor | None = None
    ) -> Tensor:
        c_skip, c_out, c_in, c_noise = self.precondition(sigma.to(x.dtype))
        h = self.x_in(c_in * x) + self.class_embed(cond) + self.noise_embed(c_noise)
        if self.aug_embed is not None:
            h = h + self.aug_embed(aug if aug is not None else x.new_zeros(len(x), self.aug_embed.in_features))
        if self.cond_std_embed is not None:
            h = h + self.cond_std_embed(cond_std if cond_std is not None else x.new_zeros(len(x), 1))
        for layer in self.layers:
            h = layer(F.silu(h))
        return c_skip * x + c_out * self.out(F.silu(h))


# ----------------------------------------------------------------------------------------
# Task


class Batch(NamedTuple):
    """One training micro-batch: clean points, conditioning and the noise to add."""

    x: Tensor  # (N, 2) clean (possibly augmented) points
    cond: Tensor  # (N, K+1) class one-hot (noised / dropped to the null row by the tricks)
    sigma: Tensor  # (N,) noise levels
    noise: Tensor  # (N, 2) standard normal noise (scaled by sigma in the loss)
    aug: Tensor | None  # (N, aug_dim) augmentation labels
    cond_std: Tensor | None  # (N, 1) conditioning-noise level


class ToyDiffusion(Task):
    name = "toy_diffusion"
    summary = "class-conditional EDM diffusion (MLP) on procedural 2-D data; sliced Wasserstein to the truth"
    # task-role tricks wired below ("TRICK:"); loop roles: the default (optimizer groups, micro-batches,
    # evaluated weights) — no "batchnorm" capability, so no bn_statistics role and no BN-only parameters
    tricks = ("stratified_sampling", "fourier_features", "cond_dropout", "cond_noise", "nonleaky_augmentation")
    params = (
        Param("data", str, "moons", "the 2-D distribution (class = component)", choices=tuple(toy2d.DISTRIBUTIONS)),
        Param(
            "train_size",
            int,
            0,
            "0 = fresh samples every step (infinite data); N = a fixed training set of N points",
            "points",
            low=0,
        ),
        Param(
            "dataset_seed", int, 0, "seed of the fixed training set (train_size > 0; the same for every seed)", low=0
        ),
        Param("hidden", int, 64, "width of the MLP", "units", low=4, high=4096),
        Param("depth", int, 3, "hidden layers of the MLP", "layers", low=1, high=16),
        Param(
            "sigma_data",
            float,
            None,
            "EDM's σ_data (null = the distribution's per-coordinate std)",
            "data units",
            low=0.0,
            low_open=True,
            optional=True,
        ),
        Param("P_mean", float, -1.2, "mean of ln σ in training (EDM's P_mean)", "ln data units"),
        Param("P_std", float, 1.2, "std of ln σ in training (EDM's P_std)", "ln data units", low=0.0, low_open=True),
        Param("sigma_min", float, 0.002, "smallest sampling noise level", "data units", low=0.0, low_open=True),
        # EDM's 80 is for images; for 2-D data of std ~0.6, σ_max = 10 leaves a 0.2% prior mismatch and
        # 32 Heun steps integrate the exact Gaussian ODE to 0.7% (18 steps from 80: 5%)
        Param("sigma_max", float, 10.0, "largest sampling noise level", "data units", low=0.0, low_open=True),
        Param("rho", float, 7.0, "exponent of EDM's sampling schedule", low=1.0),
        Param("sampling_steps", int, 32, "Heun steps of the sampler (2·steps − 1 model calls)", "steps", low=1),
        Param(
            "eval_samples_per_class",
            int,
            256,
            "generated (and true) points per class at intermediate evaluations",
            "points",
            low=16,
        ),
        Param(
            "final_samples_per_class",
            int,
            1024,
            "generated (and true) points per class at the final evaluation",
            "points",
            low=16,
        ),
        Param("num_projections", int, 64, "directions of the sliced Wasserstein distance", low=1),
    )
    metric = "swd"
    higher_is_better = False
    dense_grads = True  # every parameter is in every step's graph (tested per trick)
    # every path: the tricks act in batch (per seed) or in the model; loss reads only model, batch, sigma_data
    vectorizable = True
    metric_directions = {"class_fidelity": True, "cond_sensitivity": False, "swd_unguided": False, "swd_guided": False}
    # seconds on one CPU thread: 1024 steps of 128 points (the quick grid's scale)
    train_defaults = {
        "budget_samples": 131072,
        "batch_size": 128,
        "lr": 3e-3,
        "eval_every_samples": 16384,
        "checkpoint_every_samples": 32768,
    }
    # sized for the default budget: EMA half-life ≈ 6% of it; averages over its last quarter
    trick_defaults = {
        "ema": {"half_life_samples": 8192},
        "posthoc_ema": {"snapshot_every_samples": 8192},
        "periodic_averaging": {"snapshot_every_samples": 4096, "window_fraction": 0.25},
        "checkpoint_averaging": {"n": 3, "mode": "last"},
        "fourier_features": {"num_features": 32},
        "nonleaky_augmentation": {"p": 0.12, "max_translate": 0.25},
        "cond_noise": {"std": 0.2},
    }
    tiny = {
        "params": {
            "hidden": 16,
            "depth": 2,
            "sampling_steps": 4,
            "eval_samples_per_class": 16,
            "final_samples_per_class": 16,
        },
        "train": {"budget_samples": 256, "batch_size": 32, "eval_every_samples": 64, "checkpoint_every_samples": 96},
    }

    @classmethod
    def check(cls, params: dict[str, Any], tricks: dict[str, dict[str, Any]], train: dict[str, Any]) -> list[str]:
        problems = []
        if params["sigma_min"] >= params["sigma_max"]:
            problems.append(
                f"params.sigma_min: {params['sigma_min']} is not allowed; allowed: below params.sigma_max "
                f"({params['sigma_max']})"
            )
        return problems

    def __init__(self, params, tricks, streams, device, train) -> None:
        super().__init__(params, tricks, streams, device, train)
        p = params
        self.k = toy2d.num_classes(p["data"])
        self.sigma_data = p["sigma_data"] if p["sigma_data"] is not None else toy2d.data_std(p["data"])
        # the task-role tricks that are on (None when off), built from their validated settings
        aug = tricks.get("nonleaky_augmentation")
        self.aug = aug(kind="points") if aug is not None else None
        self.aug_dim = self.aug.label_dim if self.aug is not None else 0
        self.cond_noise = tricks.get("cond_noise")
        self.dropout = tricks.get("cond_dropout")
        self.stratifier = tricks.get("stratified_sampling")
        self.fourier = tricks.get("fourier_features")
        self.train_points: Tensor | None = None
        if p["train_size"]:
            pts, lab = toy2d.sample(p["data"], p["train_size"], torch.Generator().manual_seed(p["dataset_seed"]))
            self.train_points, self.train_labels = pts.to(device), lab.to(device)
        # fresh true samples for evaluation (the "eval" stream: identical in every arm of a seed)
        self._truth = {
            n: self._true_points(n, Eval.TRUTH) for n in {p["eval_samples_per_class"], p["final_samples_per_class"]}
        }

    def _true_points(self, n_per_class: int, index: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(self.k).repeat_interleave(n_per_class)
        pts, _ = toy2d.sample(self.p["data"], len(labels), self.streams.generator("eval", index, n_per_class), labels)
        return pts.to(self.device), labels.to(self.device)

    def build_model(self) -> nn.Module:
        # optional layers get seeds of their own, derived from the init stream
        return Denoiser(
            self.k,
            self.sigma_data,
            self.p["hidden"],
            self.p["depth"],
            fourier=self.fourier,
            aug_dim=self.aug_dim,
            cond_std_input=bool(self.cond_noise is not None and self.cond_noise.return_std),
            layer_seed=self.streams.seed_for("init", Init.OPTIONAL_LAYERS),
        )

    def one_hot(self, labels: Tensor) -> Tensor:
        """Class conditioning (N, K+1) float; label K is the null (unconditional) class."""
        return F.one_hot(labels, self.k + 1).to(torch.float32)

    # --- training ---------------------------------------------------------------------------
    def batch(self, model: nn.Module, mb: MicroBatch) -> Batch:
        n, step, micro = mb.size, mb.step, mb.index
        g_data = self.streams.generator("data", step, micro)
        if self.train_points is None:
            x, labels = toy2d.sample(self.p["data"], n, g_data)
        else:
            idx = torch.randint(len(self.train_points), (n,), generator=g_data).to(self.device)
            x, labels = self.train_points[idx], self.train_labels[idx]
        x, labels = x.to(self.device), labels.to(self.device)
        aug = None
        if self.aug is not None:  # TRICK: nonleaky_augmentation — augment clean points, labels as conditioning
            x, aug = self.aug(x, self.streams.generator("augment", step, micro, Augment.NONLEAKY))
        if self.stratifier is not None:  # TRICK: stratified_sampling — one σ per stratum of the whole step
            # the same generator state for every micro-batch of the step: one permutation over the step
            u = self.stratifier.uniform(
                n, generator=self.streams.generator("noise", step), micro_batches=mb.count, micro_index=micro
            )
        else:
            u = stratified.iid_uniform(n, generator=self.streams.generator("noise", step, micro))
        sigma = stratified.to_lognormal(u, self.p["P_mean"], self.p["P_std"]).to(self.device)
        noise = torch.randn(n, 2, generator=self.streams.generator("noise", step, micro, Noise.SAMPLES)).to(self.device)
        cond = self.one_hot(labels)
        cond_std = None
        if self.cond_noise is not None:  # TRICK: cond_noise — Gaussian noise on the class one-hot, std as input
            cond, cond_std = self.cond_noise.augment(
                cond, self.streams.generator("augment", step, micro, Augment.COND_NOISE)
            )
        if self.dropout is not None:  # TRICK: cond_dropout — class → null row at rate p (after the noise: exact null)
            g_drop = self.streams.generator("augment", step, micro, Augment.COND_DROPOUT)
            cond, _ = self.dropout(cond, g_drop, null_value=self.one_hot(torch.tensor([self.k]))[0].to(self.device))
        return Batch(x, cond, sigma, noise, aug, cond_std)

    def loss(self, model: nn.Module, batch: Batch, mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        # EDM's loss (training/loss.py EDMLoss): λ(σ)·‖D(x + σn) − x‖², λ = (σ² + σ_d²)/(σ·σ_d)²
        sigma = batch.sigma[:, None]
        denoised = model(batch.x + sigma * batch.noise, batch.sigma, batch.cond, batch.aug, batch.cond_std)
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return (weight * (denoised - batch.x) ** 2).mean(), {}

    # --- sampling and evaluation -------------------------------------------------------------
    def _sampling_cond(self, labels: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Conditioning at sampling: the one-hot (+ fixed inference noise), its std, zero aug labels."""
        cond = self.one_hot(labels)
        cond_std = None
        if self.cond_noise is not None:  # a fixed draw from the eval stream: deterministic inference
            g = self.streams.generator("eval", Eval.INFERENCE_COND_NOISE)
            cond, cond_std = self.cond_noise.at_inference(cond, g)
        aug = cond.new_zeros(len(cond), self.aug_dim) if self.aug is not None else None
        return cond, aug, cond_std

    def generate(self, model: nn.Module, labels: Tensor, noise: Tensor, guidance_weight: float | None) -> Tensor:
        """Samples (N, 2) of classes ``labels`` from standard-normal ``noise`` (N, 2), by the Heun ODE.

        ``guidance_weight`` None: the conditional model alone. A number w: classifier-free
        guidance ``(1 + w)·D(x|c) − w·D(x|null)``, the two predictions from separate calls, so
        w = 0 reproduces the conditional samples exactly.
        """
        p = self.p
        sigmas = edm_sigmas(p["sampling_steps"], p["sigma_min"], p["sigma_max"], p["rho"])
        cond, aug, cond_std = self._sampling_cond(labels)
        null = self.one_hot(torch.full_like(labels, self.k))

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            pred = model(x, sigma, cond, aug, cond_std)
            if guidance_weight is None:
                return pred
            # TRICK: cond_dropout — classifier-free guidance at sampling time
            return guided(pred, model(x, sigma, null, aug, cond_std), guidance_weight)

        return heun_sample(denoise, noise * sigmas[0].item(), sigmas)

    def _swd_per_class(self, samples: Tensor, truth: tuple[Tensor, Tensor]) -> list[float]:
        pts, labels = truth
        return [
            sliced_wasserstein(samples[labels == c], pts[labels == c], self.p["num_projections"]) for c in range(self.k)
        ]

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        n = self.p["final_samples_per_class" if final else "eval_samples_per_class"]
        truth = self._truth[n]
        labels = truth[1]
        noise = torch.randn(len(labels), 2, generator=self.streams.generator("eval", Eval.SAMPLER_NOISE, n))
        samples = self.generate(model, labels, noise.to(self.device), None)
        per_class = self._swd_per_class(samples, truth)
        out = {"swd_unguided": sum(per_class) / self.k}
        if self.dropout is not None:  # the recipe's samples are the guided ones
            samples = self.generate(model, labels, noise.to(self.device), self.dropout.guidance_weight)
            per_class = self._swd_per_class(samples, truth)
            out["swd_guided"] = sum(per_class) / self.k
        out["swd"] = sum(per_class) / self.k
        out |= {f"swd_class{c}": v for c, v in enumerate(per_class)}
        out["class_fidelity"] = class_fidelity(samples, labels, *truth)
        if final:
            out |= self._final_checks(model, n, truth, samples)
        return out

    #: what only the final evaluation measures (:meth:`_final_checks`)
    FINAL_ONLY = frozenset({"swd_floor", "cond_sensitivity", "swd_to_augmented", "swd_clean_to_augmented"})

    def intermediate_from_final(self, final_metrics: dict[str, float]) -> dict[str, float] | None:
        # the same sample size means the same true points and sampler noise (streams keyed by the size)
        if self.p["final_samples_per_class"] != self.p["eval_samples_per_class"]:
            return None
        return {k: v for k, v in final_metrics.items() if k not in self.FINAL_ONLY}

    def _final_checks(
        self, model: nn.Module, n: int, truth: tuple[Tensor, Tensor], samples: Tensor
    ) -> dict[str, float]:
        """The reference floor, the conditioning sensitivity and (nonleaky_augmentation) the leakage check."""
        pts, labels = truth
        other = self._true_points(n, Eval.SECOND_TRUTH)  # a second, independent true sample
        out = {"swd_floor": sum(self._swd_per_class(other[0], truth)) / self.k}
        # how much D changes per unit perturbation of the class conditioning, at a mid noise level
        sigma = torch.full((len(pts),), 0.5, device=self.device)
        g_probe = self.streams.generator("eval", Eval.SENSITIVITY)
        x_noisy = pts + 0.5 * torch.randn(pts.shape, generator=g_probe).to(self.device)
        cond, aug, cond_std = self._sampling_cond(labels)
        out["cond_sensitivity"] = cond_noise.sensitivity(
            lambda c: model(x_noisy, sigma, c, aug, cond_std),
            cond,
            0.05,
            self.streams.generator("eval", Eval.SENSITIVITY, 1),
        )
        if self.aug is not None:  # leakage: are the labels = 0 samples nearer the augmented data than the clean?
            aug_pts, _ = self.aug(other[0], self.streams.generator("eval", Eval.LEAKAGE_AUGMENT))
            out["swd_to_augmented"] = sum(self._swd_per_class(samples, (aug_pts, labels))) / self.k
            # the same distance for true clean points: where a model without leakage sits
            out["swd_clean_to_augmented"] = sum(self._swd_per_class(pts, (aug_pts, labels))) / self.k
        return out

    def render_outputs(self, model: nn.Module, path: Path) -> bool:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = self.p["eval_samples_per_class"]
        pts, labels = self._truth[n]
        noise = torch.randn(len(labels), 2, generator=self.streams.generator("eval", Eval.SAMPLER_NOISE, n))
        noise = noise.to(self.device)
        w = self.dropout.guidance_weight if self.dropout is not None else None
        with torch.no_grad():
            samples = self.generate(model.eval(), labels, noise, w)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
        titles = ("true samples", "generated" + (f" (guidance w={w:g})" if w is not None else ""))
        for ax, data, title in zip(axes, (pts, samples), titles):
            ax.scatter(*data.cpu().T.numpy(), c=labels.cpu().numpy(), cmap="tab10", vmin=0, vmax=9, s=3)
            ax.set_title(title)
            ax.set_xlabel("x₁")
            ax.set_aspect("equal")
        axes[0].set_ylabel("x₂")
        axes[0].set_xlim(-1.6, 1.6)
        axes[0].set_ylim(-1.6, 1.6)
        fig.suptitle(f"{self.p['data']}: colour = class")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True


TASK = ToyDiffusion
