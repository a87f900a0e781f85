"""An offline 32×32 RGB image set with 10 classes that needs no download.

Procedural but structured (not noise): each image is a smooth two-colour background
gradient with one foreground figure whose *kind* is the class — disk, square, triangle,
ring, horizontal stripes, vertical stripes, checkerboard, cross, diagonal band, two
disks — at a random position, size and colour, plus a little pixel noise. Edges, flat
regions, textures and colour make it a fair stand-in for natural images at this size for
an autoencoder (and a learnable 10-way classification task for the feature-matching
consumer). Generation is vectorised and a pure function of ``(n, seed)``.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["CLASSES", "make_shapes"]

CLASSES = ("disk", "square", "triangle", "ring", "hstripes", "vstripes", "checker", "cross", "band", "two_disks")


@functools.lru_cache(maxsize=4)
def make_shapes(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8, N×3×size×size) and labels (int64) from ``seed``; balanced classes.

    Cached per process (the same set serves every run a worker trains): treat the returned
    tensors as read-only.
    """
    if n < 1:
        raise ValueError(f"n: {n} is not allowed; allowed: an integer ≥ 1")
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    ys, xs = ys[None], xs[None]  # 1×H×W

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    # background: a linear gradient between two colours in a random direction
    c0, c1 = u(n, 3, 1, 1) * 0.8 + 0.1, u(n, 3, 1, 1) * 0.8 + 0.1
    angle = u(n, 1, 1) * 2 * torch.pi
    t = ((xs - 0.5) * torch.cos(angle) + (ys - 0.5) * torch.sin(angle) + 0.71) / 1.42
    img = c0 + (c1 - c0) * t[:, None]

    cx, cy = u(n, 1, 1) * 0.5 + 0.25, u(n, 1, 1) * 0.5 + 0.25
    r = u(n, 1, 1) * 0.15 + 0.12
    dx, dy = xs - cx, ys - cy
    dist = torch.sqrt(dx**2 + dy**2)
    period = u(n, 1, 1) * 0.15 + 0.12
    masks = torch.stack(
        [
            dist < r,  # disk
            (dx.abs() < r) & (dy.abs() < r),  # square
            (dy < r) & (dy > -r) & (dx.abs() < (dy + r) / 2),  # triangle (apex up)
            (dist < r) & (dist > r * 0.55),  # ring
            torch.remainder(ys / period, 1.0) < 0.5,  # horizontal stripes
            torch.remainder(xs / period, 1.0) < 0.5,  # vertical stripes
            (torch.remainder(xs / period, 1.0) < 0.5) ^ (torch.remainder(ys / period, 1.0) < 0.5),  # checker
            ((dx.abs() < r * 0.3) & (dy.abs() < r)) | ((dy.abs() < r * 0.3) & (dx.abs() < r)),  # cross
            (dx + dy).abs() < r * 0.5,  # diagonal band
            (dist < r * 0.6) | (torch.sqrt((xs - (1 - cx)) ** 2 + (ys - (1 - cy)) ** 2) < r * 0.6),  # two disks
        ],
        dim=1,
    )  # N×10×H×W
    mask = masks[torch.arange(n), labels].float()[:, None]
    fg = u(n, 3, 1, 1)
    img = img * (1 - mask) + fg * mask
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels
