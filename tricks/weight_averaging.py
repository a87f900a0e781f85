"""Periodic weight averaging (choose the window after training) and post-hoc EMA.

Two trick cards live here; both replace the *evaluated* model and never touch training.

Trick card: ``periodic_averaging``
----------------------------------
**Off**: the final training model is evaluated.
**On**: every ``snapshot_every_samples`` training samples the loop stores a CPU snapshot of the
weights (:meth:`PeriodicAverager.maybe_snapshot`, called once per optimizer step); the evaluated
model is the uniform average of the last ``window_fraction`` of the snapshots. Because the
snapshots are kept, the window can be chosen (or swept) *after* training — the averaging
alternative to an LR cooldown studied by Hägele et al. 2024 (arXiv 2405.18392).

- ``snapshot_every_samples`` (int ≥ 1, unit: samples; default 10000): spacing of snapshots.
  The window average is a quadrature of the uniform average over the window; finer spacing
  costs memory. (epfml/schedules-and-scaling averages every ``interval`` steps inside each block
  and saves block averages; point snapshots are the coarse version of the same estimator.)
- ``window_fraction`` (float in (0, 1]; default 0.5): fraction of the run's snapshots, counted
  from the end, that is averaged; ``ceil(fraction·count)`` snapshots, at least one.

Cost: one CPU state dict per snapshot (``budget / snapshot_every_samples`` of them) and a
device→CPU copy each; one float64 pass at the end. Expected effect: with a constant LR, a late
window average recovers much of the gain of a cooldown; with a cooldown it adds little.

References: epfml/schedules-and-scaling ``src/optim/weight_averaging.py`` (``WeightAverager``,
``sweep_horizon_like``); PyTorch ``torch/optim/swa_utils.py`` (SWA, ``SWALR``).
Incompatible: ``ema``, ``posthoc_ema``, ``checkpoint_averaging`` (one evaluated model per run).

Trick card: ``posthoc_ema``
---------------------------
**Off**: the final training model is evaluated.
**On**: during training two power-function EMAs are tracked (relative widths ``sigma_rel_a``
and ``sigma_rel_b``), updated once per optimizer step; every ``snapshot_every_samples`` samples
both are stored on CPU. After training, the EMA of any width ``target_sigma_rel`` is
reconstructed as the least-squares combination of the stored snapshots (Karras et al. 2024,
EDM2, arXiv 2312.02696) and evaluated.

A power-function EMA has weight profile ∝ t^γ over the run so far; its width relative to the
run length is ``σ_rel = sqrt((γ+1)/((γ+2)²(γ+3)))`` (EDM2 eq. 123). It is tracked with
``β_t = (1 − 1/t)^(γ+1)`` after t updates (EDM2 eq. 127; the first update copies), which is
batch-size free: after t updates the weight of update i is ``(i^(γ+1) − (i−1)^(γ+1)) / t^(γ+1)``.

- ``sigma_rel_a``, ``sigma_rel_b`` (float in (0, 0.288]; defaults 0.05 and 0.10, EDM2's): the
  two tracked widths (γ ≈ 16.97 and 6.94). σ_rel = 1/√12 ≈ 0.2887 (γ = 0) is a uniform average.
- ``target_sigma_rel`` (float in (0, 0.288]; default 0.08): the width reconstructed and evaluated.
  Best inside [a, b]; outside it, the reconstruction extrapolates and degrades.
- ``snapshot_every_samples`` (int ≥ 1, unit: samples; default 10000): snapshot spacing; more
  snapshots give a more faithful reconstruction.

Cost: two extra weight copies on the device, two fused lerps per optimizer step, two CPU state
dicts per snapshot, a small float64 linear solve at the end. Expected effect: the EMA length can
be tuned after training at the cost of one run; EDM2 reports a sharp optimum in σ_rel.

References: NVlabs/edm2 ``training/phema.py`` (``PowerFunctionEMA``, ``solve_posthoc_coefficients``)
and ``reconstruct_phema.py``. Incompatible: ``ema``, ``periodic_averaging``,
``checkpoint_averaging``.

Pitfalls avoided (both): updates/snapshots per optimizer step, never per micro-batch; float64
accumulation with integer buffers taken from the latest snapshot, never averaged; BatchNorm
buffers are copied (not averaged or combined with possibly negative coefficients) — the loop
recomputes them with precise BN when the model has BN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tricks.card import BuildContext, CheckContext, Param, Settings, TrickCard
from tricks.checkpoint_averaging import average_state_dicts, cpu_clone
from tricks.ema import ema_update_

__all__ = [
    "CARDS",
    "PERIODIC_CARD",
    "POSTHOC_CARD",
    "PeriodicAverager",
    "PostHocEMA",
    "build_periodic",
    "build_posthoc",
    "gamma_to_sigma_rel",
    "power_ema_beta",
    "power_function_correlation",
    "sigma_rel_to_gamma",
    "solve_posthoc_coefficients",
    "window_average",
    "window_size",
]

# σ_rel of γ = 0 (a uniform average): the widest power-function profile allowed here.
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)


# ----------------------------------------------------------------------------------------------
# Periodic averaging: functional core


def window_average(snapshots: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Uniform mean of ``snapshots`` (float64 accumulation; integer buffers from the last)."""
    if len(snapshots) == 0:
        raise ValueError("snapshots: an empty window is not allowed; allowed: at least one snapshot")
    return average_state_dicts(snapshots)


def window_size(num_snapshots: int, window_fraction: float) -> int:
    """Number of trailing snapshots in a window of ``window_fraction``: ceil(f·n), at least 1."""
    _check_fraction(window_fraction)
    if isinstance(num_snapshots, bool) or not isinstance(num_snapshots, int) or num_snapshots < 1:
        raise ValueError(f"num_snapshots: {num_snapshots!r} is not allowed; allowed: an integer ≥ 1")
    # The tiny slack keeps 0.3·10 = 3.0000000000000004 at 3 instead of ceil-ing it to 4.
    return max(1, min(num_snapshots, math.ceil(window_fraction * num_snapshots - 1e-9)))


def _check_fraction(window_fraction: float) -> None:
    if (
        isinstance(window_fraction, bool)
        or not isinstance(window_fraction, (int, float))
        or not (0.0 < window_fraction <= 1.0)
    ):
        raise ValueError(f"window_fraction: {window_fraction!r} is not allowed; allowed: a number in (0, 1]")


def _check_every(snapshot_every_samples: int) -> None:
    if isinstance(snapshot_every_samples, bool) or not isinstance(snapshot_every_samples, int):
        raise ValueError(f"snapshot_every_samples: {snapshot_every_samples!r} is not allowed; allowed: an integer ≥ 1")
    if snapshot_every_samples < 1:
        raise ValueError(f"snapshot_every_samples: {snapshot_every_samples!r} is not allowed; allowed: an integer ≥ 1")


class _Clock:
    """Fires once each time a non-decreasing sample count crosses a multiple of ``every``."""

    def __init__(self, every: int) -> None:
        _check_every(every)
        self.every = every
        self.last_index = 0  # number of multiples crossed at the last firing

    def crossed(self, samples_seen: int) -> bool:
        if isinstance(samples_seen, bool) or not isinstance(samples_seen, int) or samples_seen < 0:
            raise ValueError(f"samples_seen: {samples_seen!r} is not allowed; allowed: an integer ≥ 0")
        index = samples_seen // self.every
        if index < self.last_index:
            raise ValueError(
                f"samples_seen: {samples_seen!r} went backwards (a snapshot was taken at ≥ "
                f"{self.last_index * self.every}); allowed: a non-decreasing count"
            )
        if index == self.last_index:
            return False
        # Several multiples crossed in one step (batch > spacing) still give one snapshot: the
        # weights are the same at all of them.
        self.last_index = index
        return True


# ----------------------------------------------------------------------------------------------
# Periodic averaging: stateful wrapper


class PeriodicAverager:
    """Store weight snapshots every ``snapshot_every_samples`` samples; average a trailing window.

    Call :meth:`maybe_snapshot` once per optimizer step with the samples seen so far; call
    :meth:`average` (with any window) after training and load the result into a model.
    """

    def __init__(self, snapshot_every_samples: int, window_fraction: float = 0.5) -> None:
        self._clock = _Clock(snapshot_every_samples)
        _check_fraction(window_fraction)
        self.snapshot_every_samples = snapshot_every_samples
        self.window_fraction = float(window_fraction)
        self._snapshots: list[dict[str, Tensor]] = []
        self.snapshot_samples: list[int] = []  # samples_seen at each snapshot

    @property
    def num_snapshots(self) -> int:
        return len(self._snapshots)

    @torch.no_grad()
    def maybe_snapshot(self, model: nn.Module, samples_seen: int) -> bool:
        """Store a CPU copy of ``model.state_dict()`` if a multiple was crossed; return whether."""
        if not self._clock.crossed(samples_seen):
            return False
        self._snapshots.append(cpu_clone(model.state_dict()))
        self.snapshot_samples.append(samples_seen)
        return True

    def average(self, window_fraction: float | None = None) -> dict[str, Tensor]:
        """Uniform average of the last ``window_fraction`` (default: the constructor's) of snapshots."""
        if not self._snapshots:
            raise ValueError("average: no snapshot was taken yet; call maybe_snapshot past snapshot_every_samples")
        fraction = self.window_fraction if window_fraction is None else window_fraction
        m = window_size(len(self._snapshots), fraction)
        return window_average(self._snapshots[-m:])

    # --- the loop's "evaluated_weights" role (tricks.binding.EvaluatedWeights) ---------------
    takes_candidates = False

    def after_step(self, model: nn.Module, samples_seen: int) -> None:
        """Once per optimizer step: :meth:`maybe_snapshot`."""
        self.maybe_snapshot(model, samples_seen)

    def candidate(self, model: nn.Module, metric: float | None, step: int) -> None:
        """Snapshots are taken by the clock, not at evaluations: nothing to do."""

    def weights(self, model: nn.Module, final: bool) -> tuple[nn.Module | dict[str, Tensor], bool]:
        """The window average (BN statistics to recompute), or the training weights before the first snapshot."""
        return (self.average(), True) if self._snapshots else (model, False)

    def state_dict(self) -> dict[str, Any]:
        """Configuration, snapshots (by reference) and clock; ``weights_only``-safe."""
        return {
            "snapshot_every_samples": self.snapshot_every_samples,
            "window_fraction": self.window_fraction,
            "snapshots": list(self._snapshots),
            "snapshot_samples": list(self.snapshot_samples),
            "last_index": self._clock.last_index,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ``snapshot_every_samples`` must match."""
        if state["snapshot_every_samples"] != self.snapshot_every_samples:
            raise ValueError(
                f"state_dict.snapshot_every_samples: {state['snapshot_every_samples']!r} does not match "
                f"{self.snapshot_every_samples!r}"
            )
        self.window_fraction = float(state["window_fraction"])
        self._snapshots = [cpu_clone(s) for s in state["snapshots"]]
        self.snapshot_samples = [int(s) for s in state["snapshot_samples"]]
        self._clock.last_index = int(state["last_index"])


# ----------------------------------------------------------------------------------------------
# Post-hoc EMA: functional core (EDM2 training/phema.py, in float64)


def gamma_to_sigma_rel(gamma: float) -> float:
    """Relative std of the power-function profile t^γ: sqrt((γ+1)/((γ+2)²(γ+3))) (EDM2 eq. 123)."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma: {gamma!r} is not allowed; allowed: a finite number ≥ 0")
    g = float(gamma)
    return math.sqrt((g + 1.0) / (g + 2.0) ** 2 / (g + 3.0))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """Exponent γ ≥ 0 of the power-function EMA of relative width ``sigma_rel`` (EDM2 eq. 126).

    Largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, as EDM2's ``std_to_exp``.
    Valid range: 0 < sigma_rel ≤ 1/√12 ≈ 0.2887 (γ = 0, a uniform average).
    """
    if (
        isinstance(sigma_rel, bool)
        or not isinstance(sigma_rel, (int, float))
        or not (0.0 < sigma_rel <= MAX_SIGMA_REL + 1e-12)
    ):
        raise ValueError(f"sigma_rel: {sigma_rel!r} is not allowed; allowed: a number in (0, {MAX_SIGMA_REL:.4f}]")
    t = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return max(float(roots.real.max()), 0.0)


def power_ema_beta(num_updates: int, gamma: float) -> float:
    """Decay of update ``num_updates`` (1-based) of a power-function EMA: (1 − 1/t)^(γ+1).

    t = 1 gives 0 (the first update copies). EDM2 writes (1 − Δ/t)^(γ+1) with t and Δ in images;
    with a constant batch the ratio is 1/(number of updates), so the samples cancel.
    """
    if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 1:
        raise ValueError(f"num_updates: {num_updates!r} is not allowed; allowed: an integer ≥ 1")
    if not (math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma: {gamma!r} is not allowed; allowed: a finite number ≥ 0")
    return (1.0 - 1.0 / num_updates) ** (gamma + 1.0)


def power_function_correlation(a_step: Tensor, a_gamma: Tensor, b_step: Tensor, b_gamma: Tensor) -> Tensor:
    """Inner products of normalized power-function profiles (EDM2 eq. 151, Algorithm 3), broadcast.

    Profile (γ+1)·t^γ / T^(γ+1) on [0, T]; steps may be in any unit (the solve is scale-free).
    """
    ratio = a_step / b_step
    exponent = torch.where(a_step < b_step, b_gamma, -a_gamma)
    num = (a_gamma + 1) * (b_gamma + 1) * ratio**exponent
    den = (a_gamma + b_gamma + 1) * torch.maximum(a_step, b_step)
    return num / den


def solve_posthoc_coefficients(
    snapshot_steps: Sequence[float] | Tensor,
    snapshot_gammas: Sequence[float] | Tensor,
    target_step: float,
    target_gamma: float,
) -> Tensor:
    """Coefficients x (float64, one per snapshot) so that Σ x_i·profile_i best fits the target profile.

    Least squares in the L2 inner product of profiles: solve A x = b with A the snapshots' Gram
    matrix and b their inner products with the target, then normalize Σx = 1 (EDM2's
    ``solve_posthoc_coefficients``). ``torch.linalg.lstsq`` (gelsd) keeps it defined when two
    snapshots coincide. A target equal to a stored (step, γ) yields that snapshot's unit vector.
    """
    steps = torch.as_tensor(snapshot_steps, dtype=torch.float64).reshape(-1)
    gammas = torch.as_tensor(snapshot_gammas, dtype=torch.float64).reshape(-1)
    if steps.numel() == 0 or steps.shape != gammas.shape:
        raise ValueError(
            f"snapshot_steps/snapshot_gammas: sizes {steps.numel()} and {gammas.numel()}; allowed: equal and ≥ 1"
        )
    if not bool((steps > 0).all()) or not bool(torch.isfinite(steps).all()):
        raise ValueError(f"snapshot_steps: {steps.tolist()} is not allowed; allowed: finite numbers > 0")
    if not bool((gammas >= 0).all()) or not bool(torch.isfinite(gammas).all()):
        raise ValueError(f"snapshot_gammas: {gammas.tolist()} is not allowed; allowed: finite numbers ≥ 0")
    if not (math.isfinite(target_step) and target_step > 0):
        raise ValueError(f"target_step: {target_step!r} is not allowed; allowed: a finite number > 0")
    if not (math.isfinite(target_gamma) and target_gamma >= 0):
        raise ValueError(f"target_gamma: {target_gamma!r} is not allowed; allowed: a finite number ≥ 0")
    t_step = torch.tensor([[float(target_step)]], dtype=torch.float64)
    t_gamma = torch.tensor([[float(target_gamma)]], dtype=torch.float64)
    a = power_function_correlation(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = power_function_correlation(steps[:, None], gammas[:, None], t_step, t_gamma)
    x = torch.linalg.lstsq(a, b, driver="gelsd").solution.reshape(-1)
    return x / x.sum()


# ----------------------------------------------------------------------------------------------
# Post-hoc EMA: stateful wrapper


class PostHocEMA:
    """Track power-function EMAs of ``model``, snapshot them, reconstruct any σ_rel afterwards.

    Call :meth:`update` once per optimizer step (after ``optimizer.step()``) and
    :meth:`maybe_snapshot` with the samples seen so far; after training call :meth:`reconstruct`.
    Floating parameters are averaged; buffers are copied from the model at each update (EDM2 does
    the same), so BN statistics should be recomputed on a reconstruction. Tracked EMAs live on the
    model's device; snapshots on the CPU.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every_samples: int,
        samples_per_update: int = 1,
        target_sigma_rel: float | None = None,
    ) -> None:
        if len(sigma_rels) == 0:
            raise ValueError("sigma_rels: an empty sequence is not allowed; allowed: at least one σ_rel")
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self._clock = _Clock(snapshot_every_samples)
        if isinstance(samples_per_update, bool) or not isinstance(samples_per_update, int) or samples_per_update < 1:
            raise ValueError(f"samples_per_update: {samples_per_update!r} is not allowed; allowed: an integer ≥ 1")
        self.snapshot_every_samples = snapshot_every_samples
        self.samples_per_update = samples_per_update
        if target_sigma_rel is not None:
            sigma_rel_to_gamma(target_sigma_rel)  # validates the range
        self.target_sigma_rel = target_sigma_rel  # what :meth:`weights` reconstructs (the loop's evaluated EMA)
        self.num_updates = 0
        state = model.state_dict()
        self._keys = list(state)
        # remove_duplicate=False: a tied weight appears under every name in state_dict(), and each
        # name must be averaged (not copied from the raw model).
        params = {n for n, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()}
        self._avg_keys = [k for k in self._keys if k in params]
        self._copy_keys = [k for k in self._keys if k not in params]
        self._tracked: list[dict[str, Tensor]] = [
            {k: v.detach().clone() for k, v in state.items()} for _ in self.sigma_rels
        ]
        # Each snapshot: {"state": CPU state dict, "step": updates so far, "gamma", "sigma_rel"}.
        self._snapshots: list[dict[str, Any]] = []

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Advance every tracked EMA by one optimizer step (in place; the first update copies)."""
        state = model.state_dict()
        if list(state) != self._keys:
            raise ValueError("model: its state_dict keys do not match the ones PostHocEMA was built with")
        self.num_updates += 1
        new = [state[k] for k in self._avg_keys]
        copied = [state[k] for k in self._copy_keys]  # e.g. BatchNorm's num_batches_tracked: copied, not averaged
        for gamma, tracked in zip(self.gammas, self._tracked):
            beta = power_ema_beta(self.num_updates, gamma)
            ema_update_([tracked[k] for k in self._avg_keys], new, beta)
            if copied:
                torch._foreach_copy_([tracked[k] for k in self._copy_keys], copied)

    @torch.no_grad()
    def maybe_snapshot(self, samples_seen: int) -> bool:
        """Store CPU copies of all tracked EMAs if a multiple of the spacing was crossed."""
        if not self._clock.crossed(samples_seen):
            return False
        if self.num_updates == 0:
            return False  # nothing averaged yet: the profile of step 0 is undefined
        if self._snapshots and self._snapshots[-1]["step"] == self.num_updates:
            return False  # same profiles as the last snapshot; a duplicate would only add cost
        for sigma_rel, gamma, tracked in zip(self.sigma_rels, self.gammas, self._tracked):
            self._snapshots.append(
                {"state": cpu_clone(tracked), "step": self.num_updates, "gamma": gamma, "sigma_rel": sigma_rel}
            )
        return True

    @property
    def num_snapshots(self) -> int:
        """Number of stored snapshot states (one per tracked σ_rel per snapshot time)."""
        return len(self._snapshots)

    def tracked_state(self, index: int = 0) -> dict[str, Tensor]:
        """The current state dict of tracked EMA ``index`` (σ_rel = ``sigma_rels[index]``), by reference."""
        if not (0 <= index < len(self._tracked)):
            raise ValueError(f"index: {index!r} is not allowed; allowed: 0..{len(self._tracked) - 1}")
        return dict(self._tracked[index])

    def _used(self, step: int | None) -> tuple[float, list[dict[str, Any]]]:
        """Target step and the snapshots a reconstruction at it combines (those at or before it)."""
        if not self._snapshots:
            raise ValueError("reconstruct: no snapshot is stored yet; call maybe_snapshot past snapshot_every_samples")
        target = self._snapshots[-1]["step"] if step is None else step
        used = [s for s in self._snapshots if s["step"] <= target]
        if not used:
            raise ValueError(f"step: {step!r} is before the first snapshot (step {self._snapshots[0]['step']})")
        return float(target), used

    def coefficients(self, sigma_rel: float, step: int | None = None) -> Tensor:
        """Reconstruction coefficients over the snapshots with step ≤ ``step`` (default: the latest)."""
        target, used = self._used(step)
        return solve_posthoc_coefficients(
            [s["step"] for s in used], [s["gamma"] for s in used], target, sigma_rel_to_gamma(sigma_rel)
        )

    @torch.no_grad()
    def reconstruct(self, sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
        """The power-function EMA of width ``sigma_rel`` at ``step`` (default: the latest snapshot).

        Parameters: Σ x_i·snapshot_i accumulated in float64, cast back. Buffers: copied from the
        latest snapshot used (never combined: coefficients can be negative). Returns CPU tensors.
        """
        _, used = self._used(step)
        x = self.coefficients(sigma_rel, step).tolist()
        latest = used[-1]["state"]
        copy_keys = set(self._copy_keys)
        out: dict[str, Tensor] = {}
        for k in self._keys:
            if k in copy_keys:
                out[k] = latest[k].clone()
                continue
            acc = torch.zeros(latest[k].shape, dtype=torch.float64)
            for xi, s in zip(x, used):
                acc.add_(s["state"][k].to(torch.float64), alpha=xi)
            out[k] = acc.to(latest[k].dtype)
        return out

    # --- the loop's "evaluated_weights" role (tricks.binding.EvaluatedWeights) ---------------
    takes_candidates = False

    def after_step(self, model: nn.Module, samples_seen: int) -> None:
        """Once per optimizer step: :meth:`update`, then :meth:`maybe_snapshot`."""
        self.update(model)
        self.maybe_snapshot(samples_seen)

    def candidate(self, model: nn.Module, metric: float | None, step: int) -> None:
        """Snapshots are taken by the clock, not at evaluations: nothing to do."""

    def weights(self, model: nn.Module, final: bool) -> tuple[nn.Module | dict[str, Tensor], bool]:
        """The reconstruction at ``target_sigma_rel`` (BN statistics to recompute), or the training weights
        before the first snapshot."""
        if self.target_sigma_rel is None:
            raise ValueError(
                "weights: this PostHocEMA has no target_sigma_rel; give one to use it as the evaluated model"
            )
        return (self.reconstruct(self.target_sigma_rel), True) if self._snapshots else (model, False)

    def state_dict(self) -> dict[str, Any]:
        """Configuration, tracked EMAs, snapshots (tensors by reference) and clock; ``weights_only``-safe."""
        return {
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every_samples": self.snapshot_every_samples,
            "samples_per_update": self.samples_per_update,
            "num_updates": self.num_updates,
            "tracked": [dict(t) for t in self._tracked],
            "snapshots": [dict(s) for s in self._snapshots],
            "last_index": self._clock.last_index,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; σ_rels and snapshot spacing must match."""
        for key in ("sigma_rels", "snapshot_every_samples", "samples_per_update"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict.{key}: {state[key]!r} does not match {getattr(self, key)!r}")
        for tracked, saved in zip(self._tracked, state["tracked"]):
            for k in self._keys:
                tracked[k].copy_(saved[k])
        self._snapshots = [
            {
                "state": cpu_clone(s["state"]),
                "step": int(s["step"]),
                "gamma": float(s["gamma"]),
                "sigma_rel": float(s["sigma_rel"]),
            }
            for s in state["snapshots"]
        ]
        self.num_updates = int(state["num_updates"])
        self._clock.last_index = int(state["last_index"])


# ----------------------------------------------------------------------------------------------
# Cards

_SIGMA_HIGH = 0.288  # just below 1/√12 (γ = 0)


def build_periodic(settings: Settings, context: BuildContext) -> PeriodicAverager:
    """The run's periodic averager (snapshots by samples seen; the loop evaluates the window average)."""
    return PeriodicAverager(settings["snapshot_every_samples"], settings["window_fraction"])


def build_posthoc(settings: Settings, context: BuildContext) -> PostHocEMA:
    """The run's post-hoc EMA of ``context.model``; the loop evaluates the reconstruction at ``target_sigma_rel``."""
    if context.model is None or context.samples_per_step is None:
        raise ValueError("posthoc_ema: build needs the model and samples_per_step (the loop builds it)")
    return PostHocEMA(
        context.model,
        sigma_rels=(settings["sigma_rel_a"], settings["sigma_rel_b"]),
        snapshot_every_samples=settings["snapshot_every_samples"],
        samples_per_update=context.samples_per_step,
        target_sigma_rel=settings["target_sigma_rel"],
    )


def _check_spacing(settings: Any, context: CheckContext) -> list[str]:
    every, step, budget = settings["snapshot_every_samples"], context.samples_per_step, context.train["budget_samples"]
    if every < step:
        return [
            f"snapshot_every_samples: {every} is below the {step} samples of one optimizer step, and snapshots are "
            f"taken at most once per step (as with {step}); allowed: ≥ {step}"
        ]
    if every > budget:
        return [
            f"snapshot_every_samples: {every} exceeds train.budget_samples {budget}: no snapshot would be taken and "
            f"the training weights evaluated (the trick switched off); allowed: ≤ {budget}"
        ]
    return []


def _check_posthoc(settings: Any, context: CheckContext) -> list[str]:
    if settings["sigma_rel_a"] == settings["sigma_rel_b"]:
        return [
            f"sigma_rel_b: {settings['sigma_rel_b']} equals sigma_rel_a; allowed: two different widths (one tracked "
            "profile cannot reconstruct others)"
        ]
    return _check_spacing(settings, context)


PERIODIC_CARD = TrickCard(
    name="periodic_averaging",
    summary="Snapshot the weights periodically; evaluate the uniform average of a trailing window chosen after "
    "training.",
    off="The final training model is evaluated.",
    on=(
        "A CPU snapshot is stored every snapshot_every_samples samples; the evaluated model is the float64 uniform "
        "average of the last window_fraction of the snapshots."
    ),
    params=(
        Param(
            "snapshot_every_samples",
            int,
            10000,
            "Training samples between two snapshots.",
            unit="samples",
            low=1,
        ),
        Param(
            "window_fraction",
            float,
            0.5,
            "Trailing fraction of the snapshots averaged (ceil, at least one); can be changed after training.",
            low=0.0,
            low_open=True,
            high=1.0,
        ),
    ),
    cost="One CPU state dict per snapshot and a device-to-CPU copy each; one float64 pass at the end.",
    effect="With a constant LR, a late window average recovers much of a cooldown's gain; little with a cooldown.",
    references=(
        "arXiv:2405.18392 (Hägele et al. 2024, scaling laws and compute-optimal training beyond fixed durations)",
        "epfml/schedules-and-scaling:src/optim/weight_averaging.py (WeightAverager, sweep_horizon_like)",
        "pytorch/pytorch:torch/optim/swa_utils.py (AveragedModel, SWALR)",
    ),
    role="evaluated_weights",
    build=build_periodic,
    check=_check_spacing,
    tiny_setting={"snapshot_every_samples": 32},
    incompatible=("ema", "posthoc_ema", "checkpoint_averaging"),
)

POSTHOC_CARD = TrickCard(
    name="posthoc_ema",
    summary="Track two power-function EMAs, snapshot them, and reconstruct an EMA of any width after training (EDM2).",
    off="The final training model is evaluated.",
    on=(
        "Two power-function EMAs (sigma_rel_a, sigma_rel_b) are updated every optimizer step and snapshotted every "
        "snapshot_every_samples samples; the evaluated model is the least-squares reconstruction at "
        "target_sigma_rel."
    ),
    params=(
        Param(
            "sigma_rel_a",
            float,
            0.05,
            "Relative width of the first tracked EMA (γ≈16.97 at 0.05).",
            low=0.0,
            low_open=True,
            high=_SIGMA_HIGH,
        ),
        Param(
            "sigma_rel_b",
            float,
            0.10,
            "Relative width of the second tracked EMA (γ≈6.94 at 0.10).",
            low=0.0,
            low_open=True,
            high=_SIGMA_HIGH,
        ),
        Param(
            "target_sigma_rel",
            float,
            0.08,
            "Relative width of the reconstructed, evaluated EMA; best between sigma_rel_a and sigma_rel_b.",
            low=0.0,
            low_open=True,
            high=_SIGMA_HIGH,
        ),
        Param(
            "snapshot_every_samples",
            int,
            10000,
            "Training samples between two snapshots of the tracked EMAs.",
            unit="samples",
            low=1,
        ),
    ),
    cost="Two extra weight copies on the device, two fused lerps per optimizer step, two CPU state dicts per "
    "snapshot, a small float64 solve at the end.",
    effect="The EMA length is chosen after training from one run; EDM2 reports a sharp optimum in sigma_rel.",
    references=(
        "arXiv:2312.02696 (Karras et al. 2024, EDM2, post-hoc EMA)",
        "NVlabs/edm2:training/phema.py (PowerFunctionEMA, solve_posthoc_coefficients)",
        "NVlabs/edm2:reconstruct_phema.py",
    ),
    role="evaluated_weights",
    build=build_posthoc,
    check=_check_posthoc,
    tiny_setting={"snapshot_every_samples": 32},
    incompatible=("ema", "periodic_averaging", "checkpoint_averaging"),
)

CARDS = (PERIODIC_CARD, POSTHOC_CARD)
