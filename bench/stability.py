"""Stability metrics of one run, the same for every task, computed from its history.

Called once at the end of a run (and for diverged runs) by the loop; pure functions of
the recorded per-step losses, gradient norms and evaluation metrics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["SPIKE_WINDOW_STEPS", "SPIKE_Z", "loss_spikes", "roughness", "stability_metrics"]

SPIKE_WINDOW_STEPS = 25  # trailing window for the robust baseline of a spike
SPIKE_Z = 5.0  # robust z-score (on log loss) above which a step counts as a spike
LATE_FRACTION = 0.25  # "late training" = the last quarter of the steps


def loss_spikes(losses: Sequence[float], window: int = SPIKE_WINDOW_STEPS, z: float = SPIKE_Z) -> int:
    """Steps whose log-loss exceeds the trailing median by ``z`` robust standard deviations.

    Robust (median/MAD of the previous ``window`` steps) and scale-free (log), so the same
    threshold serves an autoencoder's MSE and a DQN's TD loss.
    """
    x = np.log(np.maximum(np.asarray(losses, dtype=np.float64), 1e-30))
    if len(x) <= window:
        return 0
    windows = np.lib.stride_tricks.sliding_window_view(x[:-1], window)  # windows[i] precedes x[i + window]
    med = np.median(windows, axis=1)
    mad = np.median(np.abs(windows - med[:, None]), axis=1)
    scale = 1.4826 * mad + 1e-3
    return int(np.sum((x[window:] - med) / scale > z))


def roughness(losses: Sequence[float], late_fraction: float = LATE_FRACTION) -> float:
    """Std of step-to-step changes of log-loss over the last ``late_fraction`` of steps."""
    x = np.log(np.maximum(np.asarray(losses, dtype=np.float64), 1e-30))
    tail = x[int(len(x) * (1 - late_fraction)) :]
    return float(np.std(np.diff(tail))) if len(tail) > 2 else float("nan")


def stability_metrics(
    losses: Sequence[float],
    grad_norms: Sequence[float],
    eval_values: Sequence[float],
    higher_is_better: bool,
    diverged_step: int | None,
) -> dict[str, float | int | None]:
    """The per-run stability record: best metric, spikes, roughness, gradient-norm summary, divergence."""
    finite_evals = [v for v in eval_values if math.isfinite(v)]
    best = (max if higher_is_better else min)(finite_evals) if finite_evals else float("nan")
    g = np.asarray([v for v in grad_norms if math.isfinite(v)], dtype=np.float64)
    return {
        "best_metric": best,
        "loss_spikes": loss_spikes(losses),
        "late_roughness": roughness(losses),
        "grad_norm_median": float(np.median(g)) if g.size else float("nan"),
        "grad_norm_p95": float(np.percentile(g, 95)) if g.size else float("nan"),
        "grad_norm_max": float(g.max()) if g.size else float("nan"),
        "diverged": int(diverged_step is not None),
        "diverged_step": diverged_step,
    }
