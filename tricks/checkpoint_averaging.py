"""Weight averaging of N checkpoints (best-N by a metric, or last-N).

Trick card
----------
**Off**: the model evaluated at the end is the final training model.
**On**: at each evaluation the loop offers the current training weights, with their metric, to a
:class:`CheckpointAverager`, which keeps a CPU copy of the N best (by the validation metric;
``mode="best"``) or the N most recent (``mode="last"``) checkpoints. At the final evaluation the
final weights are offered first (evaluated as they are, for their metric), then the evaluated
model is the uniform average of the kept checkpoints — so ``n: 1, mode: last`` evaluates exactly
the final weights, and with ``mode: best`` the final weights are a candidate.

Parameters (grid):

- ``n`` (int ≥ 1, unit: checkpoints; default 3): how many checkpoints are averaged. ``n=1`` with
  ``mode="best"`` is "keep the best checkpoint".
- ``mode`` (``"best"`` | ``"last"``, default ``"best"``): selection rule. ``best`` ranks by the
  metric the loop passes (direction set by the loop: loss lower, accuracy higher); a NaN, infinite
  or missing metric is rejected, so a diverged checkpoint never enters the average
  (super-gradients ``ModelWeightAveraging``). ``last`` keeps a FIFO of the N latest.
- ``recompute_bn`` (bool, default true; only on tasks whose model has BatchNorm): recompute
  BatchNorm statistics on the averaged weights (precise BN) before evaluating. Averaged running
  statistics are *not* the statistics of the averaged weights (the averaged network's activations
  differ from each checkpoint's), so without recomputation BN models are evaluated with mismatched
  statistics. :func:`has_batchnorm_stats`
  tells the loop whether there is anything to recompute.

Cost: N copies of the state dict in CPU memory; a device→CPU copy per accepted checkpoint; one
float64 pass over N state dicts at the end; plus a precise-BN pass when recomputing.

Expected effect: a flatter, often slightly better final model than the last checkpoint, most when
the final learning rate is high (no cooldown); with a full cooldown the gain is small.

References: Deci-AI/super-gradients ``src/super_gradients/training/utils/weight_averaging_utils.py``
(top-K by a metric, non-finite metrics rejected); huggingface/pytorch-image-models
``avg_checkpoints.py`` (float64 accumulation); Izmailov et al. 2018 (SWA, arXiv 1803.05407) on BN.

Incompatible: ``ema``, ``periodic_averaging``, ``posthoc_ema`` — each replaces the evaluated model.

Pitfalls avoided: integer buffers (``num_batches_tracked``) are taken from the most recent kept
checkpoint, never divided into floats; accumulation in float64 and cast back (float32 sums
drift); stored clones are detached CPU copies, so later training steps do not change them; an
empty averager raises a clear error instead of crashing later (super-gradients PR #1976).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tricks.card import BuildContext, CheckContext, Param, Settings, TrickCard

__all__ = ["CARD", "CheckpointAverager", "average_state_dicts", "build", "cpu_clone", "has_batchnorm_stats"]

MODES = ("best", "last")


# ----------------------------------------------------------------------------------------------
# Functional core


@torch.no_grad()
def average_state_dicts(state_dicts: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Uniform average of state dicts with identical keys and shapes.

    Floating (and complex) tensors are summed in float64 (complex128) and cast back to their own
    dtype; integer and bool tensors (``num_batches_tracked``, masks) are taken from the *last*
    state dict, never divided. Returns new tensors on each key's device in the last state dict;
    the inputs are not changed. Cost: one float64 temporary per key.
    """
    if len(state_dicts) == 0:
        raise ValueError("state_dicts: an empty sequence is not allowed; allowed: at least one state dict")
    last = state_dicts[-1]
    keys = list(last.keys())
    for i, sd in enumerate(state_dicts):
        if set(sd.keys()) != set(keys):
            missing = sorted(set(keys) - set(sd.keys()))[:3]
            extra = sorted(set(sd.keys()) - set(keys))[:3]
            raise ValueError(
                f"state_dicts[{i}]: keys differ from the last state dict (missing {missing}, extra {extra})"
            )
    out: dict[str, Tensor] = {}
    n = len(state_dicts)
    for key in keys:
        ref = last[key]
        if not isinstance(ref, Tensor):
            raise ValueError(f"state_dicts[-1][{key!r}]: {type(ref).__name__} is not allowed; allowed: tensors")
        if not (ref.is_floating_point() or ref.is_complex()):
            out[key] = ref.detach().clone()
            continue
        acc_dtype = torch.complex128 if ref.is_complex() else torch.float64
        acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
        for i, sd in enumerate(state_dicts):
            t = sd[key]
            if t.shape != ref.shape:
                raise ValueError(f"state_dicts[{i}][{key!r}]: shape {tuple(t.shape)} differs from {tuple(ref.shape)}")
            acc += t.detach().to(device=ref.device, dtype=acc_dtype)
        out[key] = (acc / n).to(ref.dtype)
    return out


def has_batchnorm_stats(state_dict: Mapping[str, Any]) -> bool:
    """True if ``state_dict`` holds BatchNorm running statistics (keys ending in running_mean/var)."""
    return any(k.endswith(("running_mean", "running_var")) for k in state_dict)


@torch.no_grad()
def cpu_clone(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached CPU copies of every tensor (a snapshot later training cannot change)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


# ----------------------------------------------------------------------------------------------
# Stateful wrapper


class CheckpointAverager:
    """Keep N checkpoints (best by a metric, or last) and average them.

    Call :meth:`offer` after each evaluation with the model's ``state_dict()`` and the metric;
    call :meth:`average` at the end and load the result into a model (then recompute BN).
    Kept checkpoints are stored in offer order, so "the last state dict" is the most recent one.
    """

    def __init__(self, n: int, mode: str = "best", higher_is_better: bool = False, recompute_bn: bool = True) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: {n!r} is not allowed; allowed: an integer ≥ 1")
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not allowed; allowed: one of {', '.join(MODES)}")
        if not isinstance(higher_is_better, bool):
            raise ValueError(f"higher_is_better: {higher_is_better!r} is not allowed; allowed: true/false")
        if not isinstance(recompute_bn, bool):
            raise ValueError(f"recompute_bn: {recompute_bn!r} is not allowed; allowed: true/false")
        self.n, self.mode, self.higher_is_better = n, mode, higher_is_better
        self.recompute_bn = recompute_bn
        # Each entry: {"state": CPU state dict, "metric": float | None, "step": int}, in offer order.
        self._entries: list[dict[str, Any]] = []

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def offer(self, state_dict: Mapping[str, Tensor], metric: float | None = None, step: int = 0) -> bool:
        """Offer a checkpoint; return True if it was kept.

        ``mode="best"``: rejected when ``metric`` is None or not finite, or when N are kept and it
        is not strictly better than the worst kept one (which it then replaces). ``mode="last"``:
        always kept, the oldest dropped beyond N. Only a kept checkpoint is copied (to CPU).
        """
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"step: {step!r} is not allowed; allowed: an integer")
        if self.mode == "best":
            if metric is None or isinstance(metric, bool) or not math.isfinite(float(metric)):
                return False
            metric = float(metric)
            if len(self._entries) >= self.n:
                worst = self._worst_index()
                if not self._better(metric, self._entries[worst]["metric"]):
                    return False
                del self._entries[worst]
        else:
            metric = None if metric is None else float(metric)
            if len(self._entries) >= self.n:
                del self._entries[0]
        self._entries.append({"state": cpu_clone(state_dict), "metric": metric, "step": step})
        return True

    def _worst_index(self) -> int:
        # Strictly-worse comparison in offer order: among equal metrics the oldest is dropped first.
        worst = 0
        for i, e in enumerate(self._entries):
            if self._better(self._entries[worst]["metric"], e["metric"]):
                worst = i
        return worst

    def average(self) -> dict[str, Tensor]:
        """Uniform float64-accumulated average of the kept checkpoints (CPU tensors)."""
        if not self._entries:
            raise ValueError(
                "average: no checkpoint is kept (none offered, or every metric was None/NaN/inf); "
                "offer at least one checkpoint with a finite metric"
            )
        return average_state_dicts([e["state"] for e in self._entries])

    @property
    def kept_steps(self) -> list[int]:
        """Steps of the kept checkpoints, in offer order."""
        return [e["step"] for e in self._entries]

    @property
    def kept_metrics(self) -> list[float | None]:
        """Metrics of the kept checkpoints, in offer order."""
        return [e["metric"] for e in self._entries]

    # --- the loop's "evaluated_weights" role (tricks.binding.EvaluatedWeights) ---------------
    takes_candidates = True

    def after_step(self, model: nn.Module, samples_seen: int) -> None:
        """Checkpoints are chosen at evaluations, not per step: nothing to do."""

    def candidate(self, model: nn.Module, metric: float | None, step: int) -> None:
        """Offer the training weights and their metric (every evaluation, the final one included)."""
        self.offer(model.state_dict(), metric, step)

    def weights(self, model: nn.Module, final: bool) -> tuple[nn.Module | dict[str, Tensor], bool]:
        """At the final evaluation the average of the kept checkpoints (BN recomputed if ``recompute_bn``);
        before it, and when nothing was kept (every metric non-finite), the training weights."""
        if final and self._entries:
            return self.average(), self.recompute_bn
        return model, False

    def state_dict(self) -> dict[str, Any]:
        """Configuration and kept checkpoints (tensors by reference); ``weights_only``-safe."""
        return {
            "n": self.n,
            "mode": self.mode,
            "higher_is_better": self.higher_is_better,
            "entries": [{"state": dict(e["state"]), "metric": e["metric"], "step": e["step"]} for e in self._entries],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the configuration must match."""
        for key in ("n", "mode", "higher_is_better"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state_dict.{key}: {state[key]!r} does not match this averager's {getattr(self, key)!r}"
                )
        self._entries = [
            {"state": cpu_clone(e["state"]), "metric": e["metric"], "step": int(e["step"])} for e in state["entries"]
        ]


# ----------------------------------------------------------------------------------------------
# Card


def build(settings: Settings, context: BuildContext) -> CheckpointAverager:
    """The run's checkpoint keeper; ranks by the task's metric in the task's direction."""
    return CheckpointAverager(
        settings["n"],
        settings["mode"],
        higher_is_better=context.higher_is_better,
        recompute_bn=settings.get("recompute_bn", False),  # no BatchNorm: nothing to recompute
    )


def _check(settings: Any, context: CheckContext) -> list[str]:
    n = settings["n"]
    if n == 1 and settings["mode"] == "last" and not settings.get("recompute_bn", False):
        return [
            "n: 1 with mode 'last' and no BatchNorm recomputation evaluates the final weights unchanged (the trick "
            "switched off); allowed: n ≥ 2, or mode 'best'"
        ]
    if n > context.evaluations:
        return [
            f"n: {n} exceeds the run's {context.evaluations} evaluations (the checkpoints it chooses from: "
            "train.budget_samples / train.eval_every_samples, and the final one), so it would average all of them "
            f"as n: {context.evaluations} does; allowed: 1 to {context.evaluations}, or evaluate more often"
        ]
    return []


CARD = TrickCard(
    name="checkpoint_averaging",
    summary="Evaluate the uniform average of the N best (or last) checkpoints instead of the final one.",
    off="The final training model is evaluated.",
    on=(
        "At each evaluation the weights are offered to a keeper of the N best (by the metric; non-finite rejected) "
        "or N last checkpoints; the final model is their float64 average, with BN statistics recomputed."
    ),
    params=(
        Param("n", int, 3, "Number of checkpoints averaged.", unit="checkpoints", low=1),
        Param("mode", str, "best", "Keep the N best by the validation metric, or the N most recent.", choices=MODES),
        Param(
            "recompute_bn",
            bool,
            True,
            "Recompute BatchNorm statistics on the averaged weights (precise BN): averaged statistics are not the "
            "statistics of the averaged weights. Only on tasks whose model has BatchNorm statistics.",
            needs="batchnorm",
        ),
    ),
    cost="N state dicts in CPU memory, one device-to-CPU copy per kept checkpoint, a precise-BN pass at the end.",
    effect="Often a slightly better final model than the last checkpoint without an LR cooldown; small with one.",
    references=(
        "Deci-AI/super-gradients:src/super_gradients/training/utils/weight_averaging_utils.py (ModelWeightAveraging)",
        "huggingface/pytorch-image-models:avg_checkpoints.py (float64 accumulation)",
        "arXiv:1803.05407 (SWA; BN statistics of averaged weights)",
    ),
    role="evaluated_weights",
    build=build,
    check=_check,
    tiny_setting={"n": 2},
    incompatible=("ema", "periodic_averaging", "posthoc_ema"),
)
