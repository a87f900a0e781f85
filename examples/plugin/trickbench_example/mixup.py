"""Mixup: train on convex combinations of pairs of examples and of their targets.

Trick card
----------
**Off**: each micro-batch is used as drawn.
**On**: with probability ``p`` a micro-batch is replaced by ``λ·(x, y) + (1 − λ)·(x, y)[π]``, with one
``λ ~ Beta(alpha, alpha)`` per micro-batch and ``π`` a random permutation of its rows (Zhang et al.
2018; the per-batch λ of ``facebookresearch/mixup-cifar10``). For regression the targets are mixed
like the inputs (a linear interpolation prior between training points).

Role ``task``: the task calls :meth:`Mixup.__call__` in its ``batch`` with a generator from its own
named stream; a task that lists ``mixup`` in ``Task.tricks`` wires it.

Parameters: ``alpha`` (> 0; Beta concentration: small = λ near 0 or 1, mild mixing; 1 = uniform λ),
``p`` (in (0, 1]; fraction of micro-batches mixed).

Cost: one gather and one axpy over the micro-batch; no extra forward or backward pass.
Expected effect: less overfitting on small, noisy training sets (a smoother fit between points);
too large ``alpha`` under-fits (targets averaged toward the mean).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tricks.card import BuildContext, CheckContext, Param, Settings, TrickCard

__all__ = ["CARD", "Mixup", "build", "mix"]


def mix(x: Tensor, y: Tensor, lam: float, perm: Tensor) -> tuple[Tensor, Tensor]:
    """``λ·x + (1 − λ)·x[perm]`` and the same for ``y`` (functional core; ``perm`` a permutation of the rows)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam: {lam!r} is not allowed; allowed: a number in [0, 1]")
    if len(x) != len(y) or perm.shape != (len(x),):
        raise ValueError(f"perm: shape {tuple(perm.shape)} is not allowed; allowed: ({len(x)},), one index per row")
    return torch.lerp(x[perm], x, lam), torch.lerp(y[perm], y, lam)


class Mixup:
    """Mixup of one micro-batch at a time; build it with :func:`build` (from the card's settings)."""

    def __init__(self, alpha: float, p: float) -> None:
        if isinstance(alpha, bool) or not alpha > 0:
            raise ValueError(f"alpha: {alpha!r} is not allowed; allowed: a number > 0")
        if isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"p: {p!r} is not allowed; allowed: a number in (0, 1]")
        self.alpha, self.p = float(alpha), float(p)

    def __call__(self, x: Tensor, y: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """The micro-batch ``(x, y)`` mixed (or as is, with probability 1 − p). Draws from ``rng`` only.

        Always draws the same three numbers in the same order (whether to mix, λ, the permutation),
        so what a micro-batch gets never depends on an earlier outcome.
        """
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng: {rng!r} is not allowed; allowed: a numpy.random.Generator from a named stream")
        use = rng.random() < self.p
        lam = float(rng.beta(self.alpha, self.alpha))
        perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        return mix(x, y, lam, perm) if use else (x, y)


def build(settings: Settings, context: BuildContext) -> Mixup:
    """The task's mixup (role ``task``: built before the model; the task calls it in ``batch``)."""
    return Mixup(alpha=settings["alpha"], p=settings["p"])


def check(settings: Mapping[str, Any], context: CheckContext) -> list[str]:
    """Settings that validate one by one but not on this run: a batch of one row has nothing to mix with."""
    if int(context.train["batch_size"]) < 2:
        return [f"p: mixup needs micro-batches of at least 2 rows; train.batch_size is {context.train['batch_size']}"]
    return []


CARD = TrickCard(
    name="mixup",
    summary="Train on convex combinations of pairs of examples and of their targets (one λ ~ Beta per batch).",
    off="Each micro-batch is used as drawn.",
    on="With probability p a micro-batch becomes λ·(x, y) + (1−λ)·(x, y)[π], λ ~ Beta(alpha, alpha), π a random "
    "permutation of its rows.",
    params=(
        Param("alpha", float, 0.4, "Beta(alpha, alpha) concentration of the mixing weight λ.", low=0.0, low_open=True),
        Param("p", float, 1.0, "Fraction of micro-batches that are mixed.", low=0.0, high=1.0, low_open=True),
    ),
    cost="A gather and an interpolation of the micro-batch; no extra forward or backward pass.",
    effect="Less overfitting on small noisy training sets; too large alpha under-fits.",
    references=(
        "Zhang et al. 2018, mixup: Beyond Empirical Risk Minimization, arXiv:1710.09412",
        "facebookresearch/mixup-cifar10:train.py (mixup_data: one lambda per batch, a permutation of the batch)",
        "Yao et al. 2022, C-Mixup: Improving Generalization in Regression, arXiv:2210.05775",
    ),
    role="task",
    build=build,
    tiny_setting={"alpha": 0.4},
    check=check,
)
