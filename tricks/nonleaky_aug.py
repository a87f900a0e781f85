"""Non-leaking augmentation: augment the training data and tell the network what was done.

Trick card
----------
**Off**: no augmentation; the task feeds all-zero augmentation labels (same architecture in
both arms, so the comparison isolates the augmentation), or no label input at all.

**On**: each training sample is transformed by a random geometric augmentation and the
network receives the parameters of that transform as an extra conditioning input (the
"augmentation labels"). Because the network knows which samples were augmented and how, it
can learn the clean distribution as the slice "labels = 0" instead of absorbing the
augmentations into what it generates ("leaking"). At evaluation and sampling the labels are
all zero (no augmentation).

Each op is applied to each sample independently with probability ``p``, and "applied" always
means a non-identity transform, so a sample's labels are all zero **if and only if** it was not
augmented:

- ``xflip`` — images: mirror left-right; points: x → −x. Label (1): 0 or 1.
- ``rot90`` — images: ``torch.rot90(x, k, dims=(2, 3))``; points: counter-clockwise by k·90°;
  k ∈ {1, 2, 3} uniform. Labels (2): (cos θ − 1, sin θ) of θ = k·90°, exact values.
- ``rotate`` (points only) — by θ ~ U(−π, π). Labels (2): (cos θ − 1, sin θ), as EDM.
- ``translate`` — images: by whole pixels with wrap-around, (dx, dy) uniform over
  [−T, T]² without (0, 0), T = round(max_translate · size); points: t ~ U(−m, m)² in data
  units. Labels (2): the shift divided by its maximum, in [−1, 1].
- ``scale`` — images: zoom by 2^u about the centre (bilinear, reflection padding); points:
  x → 2^u·x; u ~ U(−max_log2_scale, max_log2_scale). Label (1): u.

Transforms compose in the fixed order of that list (flip, then rotations, translation,
scale), whatever order ``ops`` is given in, and labels are laid out in that order too
(:func:`label_names`). All random numbers of all ops are drawn every call, in a fixed order
(one uniform per op and sample for the coin, then the op's parameters), so switching an op
off or changing ``p`` does not shift the random numbers another op consumes.

Parameters
~~~~~~~~~~
- ``p`` (float in [0, 1], probability per op and sample, default 0.5). 0 = identity.
- ``max_translate`` (float in [0, 0.5], fraction of the image size; for points, data units,
  default 0.125): the largest shift. Too small to give a whole pixel → no translation.
- ``max_log2_scale`` (float ≥ 0, default 0.2): zoom factors in ``[2^−m, 2^m]``.

Cost: a few batched gathers and one ``grid_sample`` on the scaled subset per step;
``label_dim(ops, kind)`` extra network inputs.
Expected effect: less overfitting on small data sets (EDM: large FID gains on CIFAR-10 with
few images); a small cost at large data.

Leakage check (NVlabs/edm#17): the scheme avoids leaking only if the network really learns
that "labels = 0" means clean data. Measure it: evaluate/sample with labels = 0 and compare
against the *clean* data distribution; an augmented-looking output (flipped, rotated,
seams of the wrap-around) at labels = 0 is leakage. Augmenting with high ``p`` makes it likelier.

References: Karras et al. 2022, EDM, arXiv 2206.00364 (App. on augmentation regularization);
NVlabs/edm ``training/augment.py`` (``AugmentPipe``, ``augment_dim=9`` labels, per-sample
parameters, ``(cos − 1, sin)`` rotation labels); crowsonkb/k-diffusion ``k_diffusion/augmentation.py``
(``KarrasAugmentationPipeline``); Karras et al. 2020 (ADA), arXiv 2006.06676.

Pitfalls avoided: labels that do not describe the transform exactly (tests invert with the
labels); drawing from the global RNG; a per-sample Python loop. Exactly invertible: flips,
rot90, whole-pixel translations with wrap (:func:`invert_images`), and every point op
(:func:`invert_points`); image scaling interpolates and is inverted only approximately.
Incompatibilities: ``rot90`` needs square images. Datasets whose labels depend on orientation
(digits) should not use flips/rotations at all.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tricks._checks import check_generator
from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = [
    "CARD",
    "IMAGE_OPS",
    "POINT_OPS",
    "NonLeakyAugment",
    "augment_images",
    "augment_points",
    "build",
    "invert_images",
    "invert_points",
    "label_dim",
    "label_names",
]

Kind = Literal["image", "points"]

IMAGE_OPS: tuple[str, ...] = ("xflip", "rot90", "translate", "scale")
POINT_OPS: tuple[str, ...] = ("xflip", "rot90", "rotate", "translate", "scale")
_CANONICAL = {"image": IMAGE_OPS, "points": POINT_OPS}
_NAMES = {
    "xflip": ("xflip",),
    "rot90": ("rot90_cos_m1", "rot90_sin"),
    "rotate": ("rotate_cos_m1", "rotate_sin"),
    "translate": ("translate_x", "translate_y"),
    "scale": ("scale_log2",),
}
# cos/sin of k·90°, exact (no float trigonometry for the lossless ops).
_COS90 = (1.0, 0.0, -1.0, 0.0)
_SIN90 = (0.0, 1.0, 0.0, -1.0)


# ----------------------------------------------------------------------------------------
# Validation and the label layout


def _check_ops(ops: Sequence[str], kind: str) -> tuple[str, ...]:
    """Return ``ops`` in canonical order; reject unknown kinds, unknown or repeated ops."""
    if kind not in _CANONICAL:
        raise ValueError(f"kind: {kind!r} is not allowed; allowed: 'image' or 'points'")
    canonical = _CANONICAL[kind]
    if isinstance(ops, str):
        raise ValueError(f"ops: {ops!r} is not allowed; allowed: a sequence of op names (did you mean ({ops!r},)?)")
    ops = tuple(ops)
    for op in ops:
        if op not in canonical:
            raise ValueError(f"ops: {op!r} is not allowed for kind={kind!r}; allowed: {', '.join(canonical)}")
    if len(set(ops)) != len(ops):
        raise ValueError(f"ops: {ops!r} is not allowed; allowed: each op at most once")
    return tuple(op for op in canonical if op in ops)


def _check_params(p: float, max_translate: float, max_log2_scale: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"p: {p!r} is not allowed; allowed: a number in [0, 1]")
    if (
        isinstance(max_translate, bool)
        or not isinstance(max_translate, (int, float))
        or not 0.0 <= max_translate <= 0.5
    ):
        raise ValueError(f"max_translate: {max_translate!r} is not allowed; allowed: a number in [0, 0.5]")
    if (
        isinstance(max_log2_scale, bool)
        or not isinstance(max_log2_scale, (int, float))
        or not 0.0 <= max_log2_scale < math.inf
    ):
        raise ValueError(f"max_log2_scale: {max_log2_scale!r} is not allowed; allowed: a finite number ≥ 0")


def label_names(ops: Sequence[str], kind: Kind) -> tuple[str, ...]:
    """Names of the label columns, in order (canonical op order, whatever order ``ops`` has)."""
    return tuple(name for op in _check_ops(ops, kind) for name in _NAMES[op])


def label_dim(ops: Sequence[str], kind: Kind) -> int:
    """Number of label columns: xflip 1, rot90 2, rotate 2, translate 2, scale 1."""
    return len(label_names(ops, kind))


def _slices(ops: tuple[str, ...]) -> dict[str, slice]:
    out, i = {}, 0
    for op in ops:
        out[op] = slice(i, i + len(_NAMES[op]))
        i += len(_NAMES[op])
    return out


def _check_labels(labels: Tensor, n: int, ops: tuple[str, ...], kind: str) -> None:
    d = sum(len(_NAMES[op]) for op in ops)
    if labels.ndim != 2 or labels.shape != (n, d):
        raise ValueError(
            f"labels: shape {tuple(labels.shape)} is not allowed; allowed: ({n}, {d}) for ops={ops} kind={kind!r}"
        )


def _pixel_shift(max_translate: float, size: int) -> int:
    return round(max_translate * size)


# ----------------------------------------------------------------------------------------
# Random draws: every op, every call, fixed order (paired streams across ops and p)


def _draw(
    kind: str,
    n: int,
    p: float,
    generator: torch.Generator,
    *,
    shifts: tuple[int, int] | None,
    max_translate: float,
    max_log2_scale: float,
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """Per canonical op: (applied bool (N,), parameters with identity where not applied), float64."""
    dev = check_generator(generator).device
    draws: dict[str, tuple[Tensor, Tensor | None]] = {}
    for op in _CANONICAL[kind]:
        applied = torch.rand(n, generator=generator, device=dev) < p
        param: Tensor | None = None
        if op == "rot90":  # k ∈ {1, 2, 3}: never the identity when applied
            param = torch.where(applied, torch.randint(1, 4, (n,), generator=generator, device=dev), 0)
        elif op == "rotate":
            theta = (torch.rand(n, generator=generator, device=dev, dtype=torch.float64) * 2 - 1) * math.pi
            param = torch.where(applied, theta, 0.0)
        elif op == "translate" and shifts is not None:  # images: whole pixels, (dx, dy) ≠ (0, 0)
            tx, ty = shifts
            cells = (2 * tx + 1) * (2 * ty + 1)
            idx = torch.randint(0, max(cells - 1, 1), (n,), generator=generator, device=dev)
            idx = idx + (idx >= cells // 2).long()  # skip the centre cell (no shift)
            dxy = torch.stack([idx % (2 * tx + 1) - tx, idx // (2 * tx + 1) - ty], dim=1)
            applied = applied & (cells > 1)  # nothing to shift by: never applied
            param = torch.where(applied[:, None], dxy, 0)
        elif op == "translate":  # points: continuous, data units
            t = (torch.rand(n, 2, generator=generator, device=dev, dtype=torch.float64) * 2 - 1) * max_translate
            param = torch.where(applied[:, None], t, 0.0)
        elif op == "scale":
            u = (torch.rand(n, generator=generator, device=dev, dtype=torch.float64) * 2 - 1) * max_log2_scale
            param = torch.where(applied, u, 0.0)
        draws[op] = (applied, param)
    return draws


def _labels(
    draws: dict[str, tuple[Tensor, Tensor | None]],
    ops: tuple[str, ...],
    *,
    shifts: tuple[int, int] | None,
    max_translate: float,
) -> Tensor:
    n = next(iter(draws.values()))[0].shape[0]
    dev = next(iter(draws.values()))[0].device
    cols: list[Tensor] = [torch.zeros(n, 0, dtype=torch.float64, device=dev)]
    for op in ops:
        applied, param = draws[op]
        if op == "xflip":
            cols.append(applied.double()[:, None])
        elif op == "rot90":
            cos = torch.tensor(_COS90, dtype=torch.float64, device=dev)[param]
            sin = torch.tensor(_SIN90, dtype=torch.float64, device=dev)[param]
            cols.append(torch.stack([cos - 1, sin], dim=1))
        elif op == "rotate":
            cols.append(torch.stack([param.cos() - 1, param.sin()], dim=1))
        elif op == "translate" and shifts is not None:
            denom = torch.tensor([max(shifts[0], 1), max(shifts[1], 1)], dtype=torch.float64, device=dev)
            cols.append(param.double() / denom)
        elif op == "translate":
            cols.append(param / max_translate if max_translate > 0 else param)
        elif op == "scale":
            cols.append(param[:, None])
    return torch.cat(cols, dim=1)


# ----------------------------------------------------------------------------------------
# Image transforms (batched; each is exact or only touches the samples it transforms)


def _xflip_images(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask[:, None, None, None], x.flip(3), x)


def _rot90_images(x: Tensor, k: Tensor) -> Tensor:
    out = x.clone()
    for kk in (1, 2, 3):  # one batched rot90 per group, not per sample
        sel = k == kk
        if bool(sel.any()):
            out[sel] = torch.rot90(x[sel], kk, dims=(2, 3))
    return out


def _roll_images(x: Tensor, dxy: Tensor) -> Tensor:
    """Per-sample ``torch.roll(x[i], (dy, dx), dims=(1, 2))`` as one gather (wrap-around)."""
    n, _, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None, :] - dxy[:, 1:2]) % h  # (N, H)
    cols = (torch.arange(w, device=x.device)[None, :] - dxy[:, 0:1]) % w  # (N, W)
    idx = torch.arange(n, device=x.device)[:, None, None]
    return x[idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def _scale_images(x: Tensor, log2_scale: Tensor) -> Tensor:
    """Zoom by 2^u about the centre (u > 0 magnifies). Only samples with u ≠ 0 are resampled,
    so the others stay bit-exact (grid_sample at the identity is not exact in floating point)."""
    sel = log2_scale != 0
    if not bool(sel.any()):
        return x
    inv = torch.exp2(-log2_scale[sel]).to(x.dtype)  # output coord → input coord: divide by s
    theta = torch.zeros(int(sel.sum()), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = inv
    theta[:, 1, 1] = inv
    sub = x[sel]
    grid = F.affine_grid(theta, list(sub.shape), align_corners=False)
    out = x.clone()
    out[sel] = F.grid_sample(sub, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out


def _check_images(images: Tensor, ops: tuple[str, ...]) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        raise ValueError("images: not allowed; allowed: a floating-point tensor (N, C, H, W)")
    if "rot90" in ops and images.shape[2] != images.shape[3]:
        raise ValueError(
            f"images: {images.shape[2]}×{images.shape[3]} is not allowed with op 'rot90'; allowed: square images"
        )


def augment_images(
    images: Tensor,
    p: float,
    *,
    generator: torch.Generator,
    ops: Sequence[str] = IMAGE_OPS,
    max_translate: float = 0.125,
    max_log2_scale: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """Augment a batch of images per sample; return ``(augmented, labels (N, label_dim))``.

    Call in the task's batch code, before the network; feed ``labels`` as conditioning.
    ``images`` is not modified. Each op in ``ops`` is applied to each sample with probability
    ``p`` (see the module table); labels (in ``images.dtype``) are zero exactly for untouched
    samples. Random numbers are drawn on the generator's device. Cost: a handful of batched
    gathers plus one ``grid_sample`` over the scaled samples.
    """
    ops_t = _check_ops(ops, "image")
    _check_params(p, max_translate, max_log2_scale)
    _check_images(images, ops_t)
    n, _, h, w = images.shape
    shifts = (_pixel_shift(max_translate, w), _pixel_shift(max_translate, h))
    draws = _draw("image", n, p, generator, shifts=shifts, max_translate=max_translate, max_log2_scale=max_log2_scale)
    draws = {op: (a.to(images.device), None if q is None else q.to(images.device)) for op, (a, q) in draws.items()}
    x = images
    if "xflip" in ops_t:
        x = _xflip_images(x, draws["xflip"][0])
    if "rot90" in ops_t:
        x = _rot90_images(x, draws["rot90"][1])
    if "translate" in ops_t:
        x = _roll_images(x, draws["translate"][1])
    if "scale" in ops_t:
        x = _scale_images(x, draws["scale"][1])
    labels = _labels(draws, ops_t, shifts=shifts, max_translate=max_translate)
    return x, labels.to(images.dtype)


def invert_images(
    images_aug: Tensor,
    labels: Tensor,
    *,
    ops: Sequence[str] = IMAGE_OPS,
    max_translate: float = 0.125,
    approximate: bool = False,
) -> Tensor:
    """Undo :func:`augment_images` from its labels (same ``ops`` and ``max_translate``).

    Exact for xflip, rot90 and whole-pixel translations (wrap-around loses nothing). Scaling
    resamples: with any scaled sample this raises unless ``approximate=True``, which zooms
    back by 2^−u (border pixels lost to the reflection padding are not recovered).
    """
    ops_t = _check_ops(ops, "image")
    _check_images(images_aug, ops_t)
    n, _, h, w = images_aug.shape
    _check_labels(labels, n, ops_t, "image")
    sl = _slices(ops_t)
    x = images_aug
    if "scale" in ops_t:
        u = labels[:, sl["scale"]][:, 0].double()
        if bool((u != 0).any()):
            if not approximate:
                raise ValueError(
                    "approximate: False is not allowed for scaled samples (bilinear resampling is not exactly "
                    "invertible); allowed: True, or ops without 'scale'"
                )
            x = _scale_images(x, -u)
    if "translate" in ops_t:
        tx, ty = _pixel_shift(max_translate, w), _pixel_shift(max_translate, h)
        lab = labels[:, sl["translate"]].double()
        dxy = torch.stack([(lab[:, 0] * tx).round(), (lab[:, 1] * ty).round()], dim=1).long()
        x = _roll_images(x, -dxy)
    if "rot90" in ops_t:
        lab = labels[:, sl["rot90"]].double()
        k = (torch.atan2(lab[:, 1], lab[:, 0] + 1) / (math.pi / 2)).round().long() % 4
        x = _rot90_images(x, (4 - k) % 4)
    if "xflip" in ops_t:
        x = _xflip_images(x, labels[:, sl["xflip"]][:, 0] != 0)
    return x


# ----------------------------------------------------------------------------------------
# Points


def _rotate_points(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return torch.stack([cos * x[:, 0] - sin * x[:, 1], sin * x[:, 0] + cos * x[:, 1]], dim=1)


def _check_points(points: Tensor) -> None:
    if not isinstance(points, Tensor) or points.ndim != 2 or points.shape[1] != 2 or not points.is_floating_point():
        raise ValueError("points: not allowed; allowed: a floating-point tensor (N, 2)")


def augment_points(
    points: Tensor,
    p: float,
    *,
    generator: torch.Generator,
    ops: Sequence[str] = POINT_OPS,
    max_translate: float = 0.125,
    max_log2_scale: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """Augment 2-D points (N, 2) per sample; return ``(augmented, labels (N, label_dim))``.

    The same contract as :func:`augment_images`; every transform is exact (computed in
    float64, returned in ``points.dtype``). ``max_translate`` is in data units here.
    """
    ops_t = _check_ops(ops, "points")
    _check_params(p, max_translate, max_log2_scale)
    _check_points(points)
    n = points.shape[0]
    draws = _draw("points", n, p, generator, shifts=None, max_translate=max_translate, max_log2_scale=max_log2_scale)
    draws = {op: (a.to(points.device), None if q is None else q.to(points.device)) for op, (a, q) in draws.items()}
    labels = _labels(draws, ops_t, shifts=None, max_translate=max_translate)
    x = points.double()
    if "xflip" in ops_t:
        x = torch.where(draws["xflip"][0][:, None], x * torch.tensor([-1.0, 1.0], device=x.device, dtype=x.dtype), x)
    for op in ("rot90", "rotate"):
        if op in ops_t:
            lab = labels[:, _slices(ops_t)[op]]
            x = _rotate_points(x, lab[:, 0] + 1, lab[:, 1])
    if "translate" in ops_t:
        x = x + draws["translate"][1]
    if "scale" in ops_t:
        x = x * torch.exp2(draws["scale"][1])[:, None]
    return x.to(points.dtype), labels.to(points.dtype)


def invert_points(
    points_aug: Tensor, labels: Tensor, *, ops: Sequence[str] = POINT_OPS, max_translate: float = 0.125
) -> Tensor:
    """Undo :func:`augment_points` from its labels (same ``ops`` and ``max_translate``), exactly
    up to floating-point rounding (computed in float64)."""
    ops_t = _check_ops(ops, "points")
    _check_points(points_aug)
    _check_labels(labels, points_aug.shape[0], ops_t, "points")
    sl = _slices(ops_t)
    lab = labels.double()
    x = points_aug.double()
    if "scale" in ops_t:
        x = x * torch.exp2(-lab[:, sl["scale"]])
    if "translate" in ops_t:
        x = x - lab[:, sl["translate"]] * max_translate
    for op in ("rotate", "rot90"):  # reverse order of application
        if op in ops_t:
            cos, sin = lab[:, sl[op]][:, 0] + 1, lab[:, sl[op]][:, 1]
            x = _rotate_points(x, cos, -sin)
    if "xflip" in ops_t:
        flip = lab[:, sl["xflip"]][:, 0] != 0
        x = torch.where(flip[:, None], x * torch.tensor([-1.0, 1.0], device=x.device, dtype=x.dtype), x)
    return x.to(points_aug.dtype)


# ----------------------------------------------------------------------------------------
# Thin class


class NonLeakyAugment:
    """Configured augmentation: ``x_aug, labels = NonLeakyAugment(p, ops, kind)(x, generator)``.

    Calls :func:`augment_images` (``kind="image"``) or :func:`augment_points`. Configuration
    only (no mutable state). ``label_dim`` is the width of the labels to reserve in the
    network; :meth:`zero_labels` gives the labels to use at evaluation and sampling.
    """

    def __init__(
        self,
        p: float,
        ops: Sequence[str] | None = None,
        kind: Kind = "image",
        max_translate: float = 0.125,
        max_log2_scale: float = 0.2,
    ) -> None:
        self.ops = _check_ops(_CANONICAL.get(kind, ()) if ops is None else ops, kind)
        _check_params(p, max_translate, max_log2_scale)
        self.p, self.kind = float(p), kind
        self.max_translate, self.max_log2_scale = float(max_translate), float(max_log2_scale)
        self.label_dim = label_dim(self.ops, kind)

    def __call__(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        fn = augment_images if self.kind == "image" else augment_points
        return fn(
            x,
            self.p,
            generator=generator,
            ops=self.ops,
            max_translate=self.max_translate,
            max_log2_scale=self.max_log2_scale,
        )

    def invert(self, x_aug: Tensor, labels: Tensor, approximate: bool = False) -> Tensor:
        """Undo a call from its labels; see :func:`invert_images` / :func:`invert_points`."""
        if self.kind == "image":
            return invert_images(x_aug, labels, ops=self.ops, max_translate=self.max_translate, approximate=approximate)
        return invert_points(x_aug, labels, ops=self.ops, max_translate=self.max_translate)

    def zero_labels(
        self, batch_size: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> Tensor:
        """All-zero labels (N, label_dim): "not augmented", for evaluation and sampling."""
        return torch.zeros(batch_size, self.label_dim, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return (
            f"NonLeakyAugment(p={self.p}, ops={self.ops}, kind={self.kind!r}, max_translate={self.max_translate}, "
            f"max_log2_scale={self.max_log2_scale})"
        )


def build(settings: Settings, context: BuildContext) -> functools.partial[NonLeakyAugment]:
    """The task's pipeline factory: ``factory(kind="points")`` → :class:`NonLeakyAugment`."""
    return functools.partial(
        NonLeakyAugment,
        settings["p"],
        max_translate=settings["max_translate"],
        max_log2_scale=settings["max_log2_scale"],
    )


CARD = TrickCard(
    name="nonleaky_augmentation",
    summary="Geometric augmentation with the transform's parameters fed to the network as labels (EDM-style).",
    off="No augmentation; zero (or no) augmentation labels.",
    on=(
        "Each op (flip, rot90, [rotate,] translate, scale) is applied per sample with probability p and its "
        "parameters are fed as labels; labels are zero at evaluation/sampling. Leakage check: evaluate with "
        "labels = 0 against the clean distribution."
    ),
    params=(
        Param(
            "p",
            float,
            0.5,
            "Probability per op and sample (0 would be the trick switched off).",
            "probability",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
        Param(
            "max_translate",
            float,
            0.125,
            "Largest shift (images: fraction of the size, whole pixels; points: data units).",
            "fraction of size",
            low=0.0,
            high=0.5,
        ),
        Param("max_log2_scale", float, 0.2, "Zoom factors in [2^-m, 2^m].", "log2 scale", low=0.0),
    ),
    cost="A few batched gathers and one grid_sample on the scaled subset per step; label_dim extra inputs.",
    effect="Less overfitting on small data; no leakage if the network honours labels = 0 (check it).",
    references=(
        "Karras et al. 2022, EDM, arXiv 2206.00364",
        "NVlabs/edm:training/augment.py (AugmentPipe, augment_dim=9)",
        "crowsonkb/k-diffusion:k_diffusion/augmentation.py (KarrasAugmentationPipeline)",
        "NVlabs/edm#17 (leakage)",
    ),
    role="task",
    build=build,
    tiny_setting={"p": 0.5},
    incompatible=(),
)
