"""Patchwise training: train a fully convolutional model on random crops, finish on full images.

Trick card
----------
**Off**: every training step sees the full images of its micro-batch.

**On**: for the first ``1 − full_fraction`` of the sample budget the task trains on random
square crops ("patches") of its images; the last ``full_fraction`` of the budget is on full
images, and evaluation is *always* on full images. The patch sizes are ``min_patch`` and every
power-of-two multiple of it below the full size (``min_patch=8`` on 32×32 images: 8, 16). The
schedule walks through them smallest first, in equal segments of the patch phase (a
deterministic curriculum, like composer's progressive resizing); ``patch_size_at(...,
generator=g)`` instead picks a size uniformly at random per step (Patch-Diffusion's mixed
sizes).

**Budget.** With patch size ``p`` on ``H×W`` images a micro-batch of ``B`` images becomes
``B·⌊H·W/p²⌋`` patches (several independent crops of each image, :func:`patches_per_image`),
so the pixels per step stay within one patch of the full-image step and the budget, counted in
*full-image samples*, is unchanged: the loop still counts ``B`` samples for that step. The
patches are grouped by source image — rows ``[i·k, (i+1)·k)`` come from image ``i`` — so a
task repeats per-image labels with ``labels.repeat_interleave(k)``.

Parameters
~~~~~~~~~~
- ``min_patch`` (int ≥ 4, pixels, default 16): the smallest patch side. When it is not
  smaller than the full image there is no patch phase (the trick is a no-op).
- ``full_fraction`` (float in [0, 1], fraction of the sample budget, default 0.25): the final
  part of training on full images. 1 = the trick is off; 0 = never trained on full images
  (risky: border statistics of full images are then never seen).

Cost: cheaper per step in FLOPs only for the convolution part — pixels per step are equal by
construction; the gather copies each patch once (``B·H·W·C`` elements per step).
Expected effect: faster wall time per sample for models with global layers removed, more
translation-invariant features; usually a small quality cost unless the full-image phase is
long enough (Wang et al. 2023, "Patch Diffusion", arXiv 2304.12526).

References: Zhendong-Wang/Patch-Diffusion ``training/patch_loss.py`` (``pachify``: random
crops by advanced indexing, more images per step for small patches, coordinate channels);
mosaicml/composer ``algorithms/progressive_resizing`` (``mode='crop'``).

Incompatibilities and pitfalls: the model must be fully convolutional (no Linear layer over
the flattened image, no fixed-size positional embedding) — a model that is not accepts only
one size and fails loudly. BatchNorm statistics collected on patches differ from full-image
statistics; the final full-image phase (or precise BN afterwards) re-adapts them. Patches
lose absolute position; Patch-Diffusion feeds the crop coordinates as two extra channels —
:func:`patch_coords` builds them if a task wants that.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from tricks._checks import check_generator
from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = [
    "CARD",
    "PatchSchedule",
    "build",
    "patch_batch",
    "patch_coords",
    "patch_size_at",
    "patch_sizes_from",
    "patches_per_image",
    "random_crops",
]


def _check_images(images: Tensor, patch_size: int) -> tuple[int, int]:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images: {shape} is not allowed; allowed: a tensor of shape (N, C, H, W)")
    h, w = images.shape[2], images.shape[3]
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or not 1 <= patch_size <= min(h, w):
        raise ValueError(
            f"patch_size: {patch_size!r} is not allowed; allowed: an integer in [1, {min(h, w)}] for {h}×{w} images"
        )
    return h, w


def _crop_at(images: Tensor, source: Tensor, top: Tensor, left: Tensor, patch_size: int) -> Tensor:
    """Gather patches ``images[source[j], :, top[j]:top[j]+p, left[j]:left[j]+p]`` in one indexing op."""
    ar = torch.arange(patch_size, device=images.device)
    rows = (top[:, None] + ar)[:, :, None]  # (M, p, 1)
    cols = (left[:, None] + ar)[:, None, :]  # (M, 1, p)
    # Advanced indices separated by a slice put the broadcast dims first: (M, p, p, C).
    patches = images[source[:, None, None], :, rows, cols]
    return patches.permute(0, 3, 1, 2).contiguous()


def _offsets(m: int, h: int, w: int, patch_size: int, generator: torch.Generator, device: torch.device) -> Tensor:
    # Draw on the generator's device (torch requires it), then move: the stream stays the
    # same whatever device the images live on.
    check_generator(generator)
    top = torch.randint(0, h - patch_size + 1, (m,), generator=generator, device=generator.device)
    left = torch.randint(0, w - patch_size + 1, (m,), generator=generator, device=generator.device)
    return torch.stack([top, left], dim=1).to(device)


def random_crops(images: Tensor, patch_size: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One uniformly placed ``patch_size``×``patch_size`` crop per image.

    Call inside the task's batch code. ``images`` (N, C, H, W) is not modified. Returns
    ``(patches (N, C, p, p), offsets (N, 2) int64 as (top, left))``; every valid position
    ``top ∈ [0, H−p]``, ``left ∈ [0, W−p]`` is equally likely. If ``p == H == W`` the images
    themselves are returned (no copy) with zero offsets and no random numbers are drawn.
    Cost: one gather of N·C·p² elements.
    """
    h, w = _check_images(images, patch_size)
    n = images.shape[0]
    if patch_size == h == w:
        return images, torch.zeros(n, 2, dtype=torch.long, device=images.device)
    offsets = _offsets(n, h, w, patch_size, generator, images.device)
    source = torch.arange(n, device=images.device)
    return _crop_at(images, source, offsets[:, 0], offsets[:, 1], patch_size), offsets


def patches_per_image(full_size: int, patch_size: int) -> int:
    """Crops per image that keep the pixels per step of a full-image step: ⌊full² / p²⌋ (≥ 1)."""
    for name, v in (("full_size", full_size), ("patch_size", patch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {v!r} is not allowed; allowed: a positive integer")
    if patch_size > full_size:
        raise ValueError(f"patch_size: {patch_size} is not allowed; allowed: ≤ full_size = {full_size}")
    return full_size**2 // patch_size**2


def patch_batch(images: Tensor, patch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Expand a micro-batch of B full images into B·k patches, k = ⌊H·W / p²⌋ crops per image.

    Each crop has its own uniform offset (crops of one image may overlap). Rows
    ``[i·k, (i+1)·k)`` come from image ``i``; repeat per-image labels with
    ``labels.repeat_interleave(k)``. Returns ``(patches (B·k, C, p, p), offsets (B·k, 2))``.
    The budget in samples is unchanged: count B samples for this step. With ``p == H == W``
    this is :func:`random_crops` (the images themselves).
    """
    h, w = _check_images(images, patch_size)
    if patch_size == h == w:
        return random_crops(images, patch_size, generator=generator)
    k = max(1, (h * w) // patch_size**2)
    n = images.shape[0]
    # Index the source image per crop instead of repeat_interleave-ing the images: no B·k copy
    # of full images is ever made.
    source = torch.arange(n, device=images.device).repeat_interleave(k)
    offsets = _offsets(n * k, h, w, patch_size, generator, images.device)
    return _crop_at(images, source, offsets[:, 0], offsets[:, 1], patch_size), offsets


def patch_coords(offsets: Tensor, patch_size: int, full_size: int) -> Tensor:
    """Patch-Diffusion's coordinate channels: (M, 2, p, p) holding (x, y) of each pixel in [−1, 1].

    The coordinates are those of the pixel in the *full* image, so full images get the plain
    grid and a patch gets exactly the crop of it. Concatenate to the patch channels if wanted.
    """
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size: {patch_size!r} is not allowed; allowed: a positive integer")
    if offsets.ndim != 2 or offsets.shape[1] != 2:
        raise ValueError(f"offsets: shape {tuple(offsets.shape)} is not allowed; allowed: (M, 2) as (top, left)")
    if full_size < 2 or patch_size > full_size:
        raise ValueError(f"full_size: {full_size} is not allowed; allowed: ≥ 2 and ≥ patch_size = {patch_size}")
    ar = torch.arange(patch_size, device=offsets.device)
    ys = (offsets[:, 0, None] + ar).float() / (full_size - 1) * 2 - 1  # (M, p)
    xs = (offsets[:, 1, None] + ar).float() / (full_size - 1) * 2 - 1
    m = offsets.shape[0]
    return torch.stack(
        [xs[:, None, :].expand(m, patch_size, patch_size), ys[:, :, None].expand(m, patch_size, patch_size)], dim=1
    )


def patch_sizes_from(min_patch: int, full_size: int) -> tuple[int, ...]:
    """The card's sizes: ``min_patch`` and its power-of-two multiples *below* ``full_size``.

    Empty when ``min_patch ≥ full_size`` (no patch phase). E.g. (8, 32) → (8, 16).
    """
    if isinstance(min_patch, bool) or not isinstance(min_patch, int) or min_patch < 1:
        raise ValueError(f"min_patch: {min_patch!r} is not allowed; allowed: a positive integer")
    sizes, s = [], min_patch
    while s < full_size:
        sizes.append(s)
        s *= 2
    return tuple(sizes)


def _check_schedule(patch_sizes: Sequence[int], full_size: int, full_fraction: float) -> tuple[int, ...]:
    if isinstance(full_size, bool) or not isinstance(full_size, int) or full_size < 1:
        raise ValueError(f"full_size: {full_size!r} is not allowed; allowed: a positive integer")
    if not 0.0 <= float(full_fraction) <= 1.0:
        raise ValueError(f"full_fraction: {full_fraction!r} is not allowed; allowed: a number in [0, 1]")
    sizes = tuple(patch_sizes)
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= full_size:
            raise ValueError(f"patch_sizes: {sizes!r} is not allowed; allowed: integers in [1, full_size={full_size}]")
    return tuple(sorted(sizes))


def patch_size_at(
    progress: float,
    patch_sizes: Sequence[int],
    full_size: int,
    full_fraction: float,
    *,
    generator: torch.Generator | None = None,
) -> int:
    """The patch side to train on at ``progress`` (fraction of the sample budget done, in [0, 1]).

    ``progress ≥ 1 − full_fraction`` → ``full_size``. Before that, without a generator: the
    sizes sorted ascending, each for an equal segment of ``[0, 1 − full_fraction)``
    (deterministic, smallest first). With a generator: a size drawn uniformly from
    ``patch_sizes`` (one draw per call — call once per step). No sizes → always full.
    """
    if not 0.0 <= float(progress) <= 1.0:
        raise ValueError(f"progress: {progress!r} is not allowed; allowed: a number in [0, 1]")
    sizes = _check_schedule(patch_sizes, full_size, full_fraction)
    patch_end = 1.0 - float(full_fraction)
    if not sizes or progress >= patch_end:
        return full_size
    if generator is not None:
        check_generator(generator)
        i = int(torch.randint(0, len(sizes), (1,), generator=generator, device=generator.device).item())
        return sizes[i]
    return sizes[min(int(progress / patch_end * len(sizes)), len(sizes) - 1)]


class PatchSchedule:
    """The patch-size schedule as an object; holds configuration only (no mutable state).

    ``size_at(progress)`` calls :func:`patch_size_at`. Build from card parameters with
    :meth:`from_card`.
    """

    def __init__(self, patch_sizes: Sequence[int], full_size: int, full_fraction: float) -> None:
        self.patch_sizes = _check_schedule(patch_sizes, full_size, full_fraction)
        self.full_size = full_size
        self.full_fraction = float(full_fraction)

    @classmethod
    def from_card(cls, min_patch: int, full_fraction: float, full_size: int) -> PatchSchedule:
        """Schedule from the card's ``min_patch`` and ``full_fraction`` for ``full_size`` images."""
        return cls(patch_sizes_from(min_patch, full_size), full_size, full_fraction)

    def size_at(self, progress: float, generator: torch.Generator | None = None) -> int:
        """Patch side at ``progress`` ∈ [0, 1]; see :func:`patch_size_at`."""
        return patch_size_at(progress, self.patch_sizes, self.full_size, self.full_fraction, generator=generator)

    def __repr__(self) -> str:
        return (
            f"PatchSchedule(patch_sizes={self.patch_sizes}, full_size={self.full_size}, "
            f"full_fraction={self.full_fraction})"
        )


def build(settings: Settings, context: BuildContext) -> functools.partial[PatchSchedule]:
    """The task's schedule factory: call it with the full image side, ``schedule(full_size=32)``."""
    return functools.partial(PatchSchedule.from_card, settings["min_patch"], settings["full_fraction"])


CARD = TrickCard(
    name="patchwise",
    summary="Train on random crops (more of them per image for small patches), finish on full images.",
    off="Every step trains on the full images of its micro-batch.",
    on=(
        "Before the final full_fraction of the budget, train on random square crops of sizes min_patch, "
        "2·min_patch, … (< full), smallest first; B images become B·⌊HW/p²⌋ crops so pixels per step and the "
        "sample budget are unchanged. Evaluation always on full images; the model must be fully convolutional."
    ),
    params=(
        Param(
            "min_patch",
            int,
            16,
            "Smallest patch side; sizes are its power-of-two multiples below full.",
            "pixels",
            low=4,
        ),
        Param(
            "full_fraction",
            float,
            0.25,
            "Final fraction of the sample budget trained on full images (1 would be the trick switched off).",
            "fraction of budget",
            low=0.0,
            high=1.0,
            high_open=True,
        ),
    ),
    cost="Equal pixels per step; one gather of the batch per step. Wall time per sample roughly unchanged or lower.",
    effect="Usually faster or equal wall time, more translation-invariant features; small quality cost if the "
    "full-image phase is too short.",
    references=(
        "Wang et al. 2023, Patch Diffusion, arXiv 2304.12526",
        "Zhendong-Wang/Patch-Diffusion:training/patch_loss.py",
        "mosaicml/composer:composer/algorithms/progressive_resizing (mode='crop')",
    ),
    role="task",
    build=build,
    tiny_setting={"min_patch": 8, "full_fraction": 0.5},
    incompatible=(),
)
