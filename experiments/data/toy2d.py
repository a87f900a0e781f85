"""Procedural class-conditional 2-D distributions for the ``toy_diffusion`` task.

Each distribution is a mixture of ``num_classes(name)`` components, one per class, laid out
so that points lie roughly in [-1.2, 1.2]² (per-coordinate std 0.5–0.7):

- ``blobs``   — 8 isotropic Gaussians (std 0.08) on the unit circle; class = blob.
- ``rings``   — 3 concentric circles (radii 0.35, 0.7, 1.05, radial noise 0.04); class = ring.
- ``moons``   — 2 interleaved half-moons (sklearn's ``make_moons`` layout, centred and scaled
  by 0.8, noise 0.05); class = moon.
- ``spirals`` — 3 arms of a spiral (radius 0.1 → 1 over 1.25 turns, noise 0.04); class = arm.

The thin components (rings, moons, spirals) make the task's distance metric sensitive to
how sharply a model renders structure, not only to where the mass is.

:func:`sample` is a pure function of ``(name, n, generator[, labels])``: the same generator
state gives the same points on every machine (CPU generator, float64 maths, float32 out).
Labels are balanced (counts differ by at most one) unless given.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["DISTRIBUTIONS", "data_std", "num_classes", "sample"]

#: name -> number of classes
DISTRIBUTIONS: dict[str, int] = {"blobs": 8, "rings": 3, "moons": 2, "spirals": 3}

_BLOB_STD = 0.08
_RING_RADII = (0.35, 0.7, 1.05)
_RING_NOISE = 0.04
_MOON_NOISE = 0.05
_MOON_SCALE = 0.8
_SPIRAL_NOISE = 0.04
_SPIRAL_TURNS = 1.25


def _check_name(name: str) -> None:
    if name not in DISTRIBUTIONS:
        raise ValueError(f"name: {name!r} is not allowed; allowed: one of {', '.join(map(repr, DISTRIBUTIONS))}")


def num_classes(name: str) -> int:
    """How many classes distribution ``name`` has."""
    _check_name(name)
    return DISTRIBUTIONS[name]


def _balanced_labels(n: int, k: int, generator: torch.Generator) -> Tensor:
    return (torch.arange(n) % k)[torch.randperm(n, generator=generator)]


def sample(name: str, n: int, generator: torch.Generator, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``n`` points (N, 2) float32 and their class labels (N,) int64 from distribution ``name``.

    ``labels`` given (int64 (n,), values in [0, num_classes)): the points are drawn from those
    classes (used for per-class evaluation); otherwise balanced labels are drawn first. Then
    one uniform (position along the component) and two normals (noise) per point are drawn,
    whatever the distribution, in a fixed order. Randomness only from ``generator`` (CPU).
    """
    _check_name(name)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: {n!r} is not allowed; allowed: an integer ≥ 0")
    k = DISTRIBUTIONS[name]
    if labels is None:
        labels = _balanced_labels(n, k, generator)
    else:
        if not isinstance(labels, Tensor) or labels.shape != (n,) or labels.dtype != torch.int64:
            raise ValueError(f"labels: {labels!r} is not allowed; allowed: an int64 tensor of shape ({n},)")
        if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"labels: values outside [0, {k - 1}] are not allowed for distribution {name!r}")
        labels = labels.cpu()
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    c = labels.to(torch.float64)
    if name == "blobs":
        angle = 2 * math.pi * c / k
        pts = torch.stack([angle.cos(), angle.sin()], dim=1) + _BLOB_STD * eps
    elif name == "rings":
        radius = torch.tensor(_RING_RADII, dtype=torch.float64)[labels] + _RING_NOISE * eps[:, 0]
        angle = 2 * math.pi * u
        pts = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    elif name == "moons":
        t = math.pi * u
        upper = torch.stack([t.cos(), t.sin()], dim=1)
        lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], dim=1)
        pts = torch.where((labels == 0)[:, None], upper, lower)
        pts = (pts - torch.tensor([0.5, 0.25], dtype=torch.float64)) * _MOON_SCALE + _MOON_NOISE * eps
    else:  # spirals
        radius = 0.1 + 0.9 * u
        angle = 2 * math.pi * (c / k + _SPIRAL_TURNS * u)
        pts = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1) + _SPIRAL_NOISE * eps
    return pts.to(torch.float32), labels


@functools.cache
def data_std(name: str) -> float:
    """Per-coordinate standard deviation of distribution ``name`` (pooled over both axes and classes).

    Estimated once from 65,536 points of a constant-seeded generator, so it is a property of
    the distribution (the same in every run); the task's default ``σ_data``.
    """
    points, _ = sample(name, 65536, torch.Generator().manual_seed(0))
    return float((points - points.mean(0)).pow(2).mean().sqrt())
