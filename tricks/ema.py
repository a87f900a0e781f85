"""Exponential moving average of the weights (EMA).

Trick card
----------
**Off**: the model evaluated is the training model itself.
**On**: beside the training model the loop keeps a copy whose weights follow
``ema ← d·ema + (1−d)·model`` once per *optimizer* step (never per micro-batch: with
accumulation that would shorten the window k-fold, SWivid/F5-TTS#631), and evaluates the copy.
The first update is a copy, so after n updates the copy is ``Σ_i w_i·θ_i`` with
``w_0 = d^(n−1)`` and ``w_i = d^(n−1−i)(1−d)`` for i ≥ 1 (weights sum to 1).

Parameters (grid):

- ``half_life_samples`` (float > 0, unit: training samples; default 2000): the number of samples
  after which an update's weight has halved. The per-update decay is
  ``d = 2^(−samples_per_update / half_life_samples)`` (composer's interval correction), so the
  window is the same in samples whatever the batch size or update interval
  (lucidrains/ema-pytorch's uncorrected ``update_every=N`` silently makes it N× longer).
- ``warmup`` (bool, default false): cap the decay at ``1 − (1 + t)^(−2/3)`` after t updates
  (timm ``ModelEmaV3`` / k-diffusion ``EMAWarmup``), so early random weights are forgotten fast.
- ``buffers`` (``"copy"`` | ``"average"`` | ``"recompute"``, default ``"copy"``): what happens to
  buffers such as BatchNorm running statistics. ``copy``: copied from the training model at every
  update (PyTorch ``AveragedModel(use_buffers=False)``); ``average``: floating buffers averaged
  like weights (``use_buffers=True``), integer buffers (``num_batches_tracked``) always copied,
  never averaged; ``recompute``: copied, and :attr:`EMA.needs_bn_recompute` tells the loop to
  recalibrate BatchNorm on the EMA weights with precise BN before evaluating — copied or averaged
  statistics belong to other weights than the EMA's (pytorch/pytorch#84053, pytorch/ignite#2590).

Cost: one extra copy of parameters and buffers on the model's device, and one fused
``torch._foreach_lerp_`` per optimizer step (memory-bound, ~3 passes over the parameters).
``recompute`` adds a precise-BN pass over a few batches before each evaluation.

Expected effect: a smoother, usually better evaluated model late in training at a fixed budget,
most visible with a high final learning rate or noisy gradients; it partly substitutes for an LR
cooldown. Too long a half-life lags behind (worse early evaluations).

References: PyTorch ``torch/optim/swa_utils.py`` (``AveragedModel``, ``get_ema_multi_avg_fn``);
timm ``timm/utils/model_ema.py`` (``ModelEmaV3``: warmup, foreach); k-diffusion
``k_diffusion/utils.py`` (``ema_update``, ``EMAWarmup``); composer ``algorithms/ema``
(half-life corrected for the update interval); EDM ``training/training_loop.py`` (half-life in
images).

Incompatible: ``periodic_averaging``, ``posthoc_ema``, ``checkpoint_averaging`` — each replaces the
*evaluated* model, and a run evaluates one.

Pitfalls avoided: update per optimizer step, decay corrected for the update interval; integer
buffers never averaged (``get_ema_multi_avg_fn`` with ``use_buffers=True`` lerps
``num_batches_tracked`` and truncates it); parameters matched by name, so an EMA built from a
wrapped model (``module.``/``_orig_mod.`` prefixes) and updated from the bare one fails loudly
instead of pairing the wrong tensors (huggingface/pytorch-image-models#1119); evaluating with
:meth:`EMA.swap_in` restores the training weights bit for bit.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = [
    "CARD",
    "EMA",
    "build",
    "decay_from_half_life",
    "ema_update_",
    "has_running_stats",
    "warmup_decay",
]

BUFFER_POLICIES = ("copy", "average", "recompute")


# ----------------------------------------------------------------------------------------------
# Functional core


def decay_from_half_life(half_life_samples: float, samples_per_update: float) -> float:
    """Per-update decay whose half-life is ``half_life_samples`` samples: ``2^(−s/h)``.

    Call once when building the EMA. ``samples_per_update`` is the number of training samples
    between two EMA updates (the effective batch size when updating every optimizer step).
    Two updates of interval s decay old weights exactly as much as one of interval 2s.
    """
    if isinstance(half_life_samples, bool) or not (
        isinstance(half_life_samples, (int, float)) and math.isfinite(half_life_samples) and half_life_samples > 0
    ):
        raise ValueError(f"half_life_samples: {half_life_samples!r} is not allowed; allowed: a finite number > 0")
    if not (
        not isinstance(samples_per_update, bool)
        and isinstance(samples_per_update, (int, float))
        and math.isfinite(samples_per_update)
        and samples_per_update > 0
    ):
        raise ValueError(f"samples_per_update: {samples_per_update!r} is not allowed; allowed: a finite number > 0")
    return 2.0 ** (-float(samples_per_update) / float(half_life_samples))


def warmup_decay(decay: float, num_updates: int, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """Decay to use after ``num_updates`` updates: ``min(decay, 1 − (1 + t/γ)^(−p))``.

    timm ``ModelEmaV3`` / k-diffusion ``EMAWarmup``; t = 0 gives 0 (a copy). With the default
    ``p = 2/3`` the cap reaches 0.999 after ~31k updates; ``p = 3/4`` reaches it after ~10k.
    Valid ranges: decay in [0, 1], num_updates ≥ 0, gamma > 0, power > 0.
    """
    _check_decay(decay)
    if isinstance(num_updates, bool) or not isinstance(num_updates, int) or num_updates < 0:
        raise ValueError(f"num_updates: {num_updates!r} is not allowed; allowed: an integer ≥ 0")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma: {gamma!r} is not allowed; allowed: a finite number > 0")
    if not (math.isfinite(power) and power > 0):
        raise ValueError(f"power: {power!r} is not allowed; allowed: a finite number > 0")
    return min(float(decay), 1.0 - (1.0 + num_updates / gamma) ** -power)


@torch.no_grad()
def ema_update_(ema_tensors: list[Tensor], tensors: list[Tensor], decay: float, *, foreach: bool = True) -> None:
    """In place: ``ema ← decay·ema + (1−decay)·new`` for each pair (``lerp`` with weight 1−decay).

    Call once per optimizer step. ``foreach=True`` uses one fused ``torch._foreach_lerp_``
    (what ``AveragedModel`` and timm use); ``foreach=False`` loops ``Tensor.lerp_`` per tensor —
    same arithmetic, kept as a readable reference. ``lerp`` is exact at both ends: decay 0 copies
    ``new`` and decay 1 leaves ``ema`` untouched bit for bit. Only floating tensors are allowed:
    integer buffers must be copied, never averaged.
    """
    _check_decay(decay)
    if len(ema_tensors) != len(tensors):
        raise ValueError(f"ema_tensors/tensors: lengths {len(ema_tensors)} and {len(tensors)} differ; they must match")
    for i, (e, t) in enumerate(zip(ema_tensors, tensors)):
        if not e.is_floating_point():
            raise ValueError(f"ema_tensors[{i}]: dtype {e.dtype} is not allowed; allowed: floating dtypes only")
        if e.shape != t.shape:
            raise ValueError(f"tensors[{i}]: shape {tuple(t.shape)} does not match the EMA's {tuple(e.shape)}")
    if not ema_tensors:
        return
    weight = 1.0 - float(decay)
    new = [t.detach() for t in tensors]
    if foreach:
        torch._foreach_lerp_(ema_tensors, new, weight)
    else:
        for e, t in zip(ema_tensors, new):
            e.lerp_(t, weight)


def has_running_stats(module: nn.Module) -> bool:
    """True if ``module`` contains a normalization layer that tracks running statistics (BatchNorm)."""
    return any(
        isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.running_mean is not None
        for m in module.modules()
    )


def _check_decay(decay: float) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0.0 <= decay <= 1.0):
        raise ValueError(f"decay: {decay!r} is not allowed; allowed: a number in [0, 1]")


# ----------------------------------------------------------------------------------------------
# Stateful wrapper


class EMA:
    """An EMA copy of ``model``; call :meth:`update` once per optimizer step.

    Give exactly one of ``half_life_samples`` (with ``samples_per_update``, the samples seen
    between two updates) or ``decay`` (per update, in [0, 1]). Build it from the model the loop
    will pass to :meth:`update` (the same unwrapped module), after moving it to its device.
    ``.module`` is a deep copy in eval mode with ``requires_grad=False``; evaluate it directly,
    or use :meth:`swap_in` to evaluate with the training model object.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        half_life_samples: float | None = None,
        decay: float | None = None,
        samples_per_update: int = 1,
        warmup: bool = False,
        buffers: str = "copy",
        foreach: bool = True,
    ) -> None:
        if (half_life_samples is None) == (decay is None):
            raise ValueError(
                f"half_life_samples/decay: got {half_life_samples!r} and {decay!r}; allowed: exactly one of them set"
            )
        if buffers not in BUFFER_POLICIES:
            raise ValueError(f"buffers: {buffers!r} is not allowed; allowed: one of {', '.join(BUFFER_POLICIES)}")
        if not isinstance(warmup, bool):
            raise ValueError(f"warmup: {warmup!r} is not allowed; allowed: true/false")
        if half_life_samples is not None:
            self.decay = decay_from_half_life(half_life_samples, samples_per_update)
        else:
            _check_decay(decay)  # type: ignore[arg-type]
            self.decay = float(decay)  # type: ignore[arg-type]
        self.half_life_samples = half_life_samples
        self.samples_per_update = samples_per_update
        self.warmup = warmup
        self.buffers = buffers
        self.foreach = foreach
        self.num_updates = 0

        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None  # deepcopy copies .grad; the EMA never needs it
        # Cached once: the EMA's own tensors never change identity.
        self._param_names = [n for n, _ in self.module.named_parameters()]
        self._params = [p for _, p in self.module.named_parameters()]
        self._buffer_names = [n for n, _ in self.module.named_buffers()]
        self._buffers = [b for _, b in self.module.named_buffers()]

    @property
    def needs_bn_recompute(self) -> bool:
        """True when the loop must recalibrate BN on ``.module`` (precise BN) before evaluating."""
        return self.buffers == "recompute" and has_running_stats(self.module)

    def current_decay(self) -> float:
        """Decay the next :meth:`update` will use (0 for the first, a copy)."""
        if self.num_updates == 0:
            return 0.0
        return warmup_decay(self.decay, self.num_updates) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the EMA toward ``model``'s current weights; call once per optimizer step.

        Changes ``.module`` in place; ``model`` is only read. The first call copies.
        """
        params = self._matched(self._param_names, model.named_parameters(), "parameters")
        model_buffers = self._matched(self._buffer_names, model.named_buffers(), "buffers")
        d = self.current_decay()
        ema_update_(self._params, params, d, foreach=self.foreach)
        if self.buffers == "average":
            floating = [i for i, b in enumerate(self._buffers) if b.is_floating_point()]
            counts = [i for i, b in enumerate(self._buffers) if not b.is_floating_point()]
            ema_update_([self._buffers[i] for i in floating], [model_buffers[i] for i in floating], d, foreach=True)
            if counts:  # e.g. num_batches_tracked: a count, never averaged
                torch._foreach_copy_([self._buffers[i] for i in counts], [model_buffers[i] for i in counts])
        elif self._buffers:
            torch._foreach_copy_(self._buffers, model_buffers)  # one fused call, not one copy_ per buffer
        self.num_updates += 1

    def _matched(self, names: list[str], named: Iterator[tuple[str, Tensor]], what: str) -> list[Tensor]:
        pairs = list(named)
        got = [n for n, _ in pairs]
        if got != names:
            diff = next((f"{a!r} vs {b!r}" for a, b in zip(names, got) if a != b), f"{len(names)} vs {len(got)} names")
            raise ValueError(
                f"model: its {what} do not match the EMA's ({diff}); build the EMA from the same (unwrapped) "
                "module that is passed to update()"
            )
        return [t for _, t in pairs]

    @contextlib.contextmanager
    @torch.no_grad()
    def swap_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Context manager: ``model`` holds the EMA weights and buffers inside, its own after.

        Cost: one clone of the training parameters and buffers for the duration. Anything done to
        ``model``'s tensors inside (an evaluation, a precise-BN pass) is undone on exit, bit for
        bit; the train/eval mode is left to the caller.
        """
        params = self._matched(self._param_names, model.named_parameters(), "parameters")
        bufs = self._matched(self._buffer_names, model.named_buffers(), "buffers")
        saved = [t.detach().clone() for t in params + bufs]
        try:
            for t, e in zip(params + bufs, self._params + self._buffers):
                t.detach().copy_(e)
            yield model
        finally:
            for t, s in zip(params + bufs, saved):
                t.detach().copy_(s)

    # --- the loop's "evaluated_weights" role (tricks.binding.EvaluatedWeights) ---------------
    takes_candidates = False

    def after_step(self, model: nn.Module, samples_seen: int) -> None:
        """Once per optimizer step: :meth:`update`."""
        self.update(model)

    def candidate(self, model: nn.Module, metric: float | None, step: int) -> None:
        """The EMA does not choose among evaluated checkpoints: nothing to do."""

    def weights(self, model: nn.Module, final: bool) -> tuple[nn.Module, bool]:
        """The EMA copy, and whether its BatchNorm statistics must be recomputed (``buffers: recompute``)."""
        return self.module, self.needs_bn_recompute

    def state_dict(self) -> dict[str, Any]:
        """Tensors (the EMA module's state, by reference) and plain Python; ``weights_only``-safe."""
        return {
            "module": self.module.state_dict(),
            "num_updates": self.num_updates,
            "decay": self.decay,
            "warmup": self.warmup,
            "buffers": self.buffers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the configuration must match this EMA's."""
        for key in ("decay", "warmup", "buffers"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state_dict.{key}: {state[key]!r} does not match this EMA's {getattr(self, key)!r}")
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])


# ----------------------------------------------------------------------------------------------
# Card


def build(settings: Settings, context: BuildContext) -> EMA:
    """The run's EMA of ``context.model``, updated every optimizer step of ``samples_per_step`` samples."""
    if context.model is None or context.samples_per_step is None:
        raise ValueError("ema: build needs the model and samples_per_step (the loop builds it)")
    return EMA(
        context.model,
        half_life_samples=settings["half_life_samples"],
        samples_per_update=context.samples_per_step,
        warmup=settings["warmup"],
        buffers=settings.get("buffers", "copy"),  # no BatchNorm: buffers are constants, copying is exact
    )


CARD = TrickCard(
    name="ema",
    summary="Evaluate an exponential moving average of the weights, updated once per optimizer step.",
    off="The training model is evaluated.",
    on=(
        "An EMA copy (decay from a half-life in samples, corrected for the samples per update; first update a copy) "
        "is updated after every optimizer step and evaluated instead."
    ),
    params=(
        Param(
            "half_life_samples",
            float,
            2000.0,
            "Samples after which an update's weight in the average has halved; decay = 2^(-samples_per_update/h).",
            unit="samples",
            low=0.0,
            low_open=True,
        ),
        Param("warmup", bool, False, "Cap the decay at 1-(1+t)^(-2/3) after t updates (timm/k-diffusion warmup)."),
        Param(
            "buffers",
            str,
            "copy",
            "Buffers (BN statistics): copy from the model, average floating ones, or copy and recompute with "
            "precise BN before evaluation. Only on tasks whose model has BatchNorm statistics.",
            choices=BUFFER_POLICIES,
            needs="batchnorm",
        ),
    ),
    cost="One extra copy of the weights on the device; one fused lerp per optimizer step; recompute adds a "
    "precise-BN pass per evaluation.",
    effect="Smoother, usually better evaluated weights late in training at equal budget; lags with too long a "
    "half-life.",
    references=(
        "pytorch/pytorch:torch/optim/swa_utils.py (AveragedModel, get_ema_multi_avg_fn)",
        "huggingface/pytorch-image-models:timm/utils/model_ema.py (ModelEmaV3)",
        "crowsonkb/k-diffusion:k_diffusion/utils.py (ema_update, EMAWarmup)",
        "mosaicml/composer:composer/algorithms/ema/ema.py (half-life corrected for the update interval)",
        "NVlabs/edm:training/training_loop.py (ema_halflife_kimg)",
    ),
    role="evaluated_weights",
    build=build,
    tiny_setting={"half_life_samples": 64.0},
    incompatible=("periodic_averaging", "posthoc_ema", "checkpoint_averaging"),
)
