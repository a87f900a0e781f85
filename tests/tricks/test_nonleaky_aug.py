"""Tests of tricks.nonleaky_aug: identity at p=0, labels describe the transform exactly, rates."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats

from tricks.card import ParamError
from tricks.nonleaky_aug import (
    CARD,
    IMAGE_OPS,
    POINT_OPS,
    NonLeakyAugment,
    augment_images,
    augment_points,
    invert_images,
    invert_points,
    label_dim,
    label_names,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within_binomial(count: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(count / n - p) <= z * math.sqrt(p * (1 - p) / n) + 1e-12


def cols(ops, kind, op):
    names = label_names(ops, kind)
    return [i for i, name in enumerate(names) if name.startswith(op)]


# ---------------------------------------------------------------------------------------- layout


def test_label_layout():
    assert label_dim(IMAGE_OPS, "image") == 6
    assert label_dim(POINT_OPS, "points") == 8
    assert len(IMAGE_OPS) >= 4 and len(POINT_OPS) >= 4
    # Canonical order whatever order the ops are given in.
    assert label_names(("scale", "xflip"), "image") == ("xflip", "scale_log2")
    assert label_dim((), "points") == 0


# ---------------------------------------------------------------------------------------- p = 0


def test_p_zero_is_identity_with_zero_labels():
    images = torch.randn(16, 3, 8, 8, generator=gen(1))
    out, labels = augment_images(images, 0.0, generator=gen(2))
    assert torch.equal(out, images) and labels.shape == (16, 6) and not labels.any()
    points = torch.randn(50, 2, generator=gen(3))
    out, labels = augment_points(points, 0.0, generator=gen(4))
    assert torch.equal(out, points) and labels.shape == (50, 8) and not labels.any()


def test_zero_labels_iff_unchanged():
    images = torch.randn(200, 2, 8, 8, generator=gen(5))
    out, labels = augment_images(images, 0.3, generator=gen(6))
    untouched = ~labels.bool().any(dim=1)
    assert 0 < int(untouched.sum()) < 200
    assert torch.equal(out[untouched], images[untouched])
    assert torch.all((out[~untouched] - images[~untouched]).flatten(1).abs().amax(dim=1) > 0)
    points = torch.randn(500, 2, generator=gen(7))
    out, labels = augment_points(points, 0.3, generator=gen(8))
    untouched = ~labels.bool().any(dim=1)
    assert torch.equal(out[untouched], points[untouched])
    assert torch.all((out[~untouched] - points[~untouched]).abs().amax(dim=1) > 0)


# ---------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("ops", [("xflip",), ("rot90",), ("translate",), ("xflip", "rot90", "translate")])
def test_image_inverse_recovers_exactly(ops):
    images = torch.randn(64, 3, 8, 8, generator=gen(9))
    out, labels = augment_images(images, 0.7, generator=gen(10), ops=ops)
    assert labels.bool().any(dim=1).float().mean() > 0.5
    assert torch.equal(invert_images(out, labels, ops=ops), images)


def test_image_ops_match_torch_reference_per_sample():
    images = torch.randn(40, 2, 8, 8, generator=gen(11))
    ops = ("xflip", "rot90", "translate")
    out, labels = augment_images(images, 0.6, generator=gen(12), ops=ops, max_translate=0.25)
    tmax = round(0.25 * 8)
    for i in range(40):
        ref = images[i]
        if labels[i, 0] != 0:
            ref = TF.horizontal_flip(ref)
        c, s = labels[i, 1].item() + 1, labels[i, 2].item()
        k = round(math.atan2(s, c) / (math.pi / 2)) % 4
        ref = torch.rot90(ref, k, dims=(1, 2))
        dx, dy = round(labels[i, 3].item() * tmax), round(labels[i, 4].item() * tmax)
        assert abs(dx) <= tmax and abs(dy) <= tmax
        ref = torch.roll(ref, shifts=(dy, dx), dims=(1, 2))
        assert torch.equal(out[i], ref), i


def test_image_scale_zooms_about_centre():
    # A linear ramp f(x) = x is mapped to centre + (x − centre)/s by a zoom of s about the centre
    # (bilinear interpolation is exact on linear functions away from the padded border).
    w = 32
    ramp = torch.arange(w, dtype=torch.float64).expand(8, 1, w, w).clone()
    out, labels = augment_images(ramp, 1.0, generator=gen(13), ops=("scale",), max_log2_scale=0.5)
    u = labels[:, 0]
    assert torch.all(u != 0) and torch.all(u.abs() <= 0.5)
    centre = (w - 1) / 2
    interior = slice(8, 24)
    for i in range(8):
        expected = centre + (torch.arange(w, dtype=torch.float64) - centre) / 2 ** u[i].item()
        torch.testing.assert_close(out[i, 0, 12, interior], expected[interior], rtol=0, atol=1e-9)


def test_image_scale_inverse_only_approximate():
    x = torch.linspace(-1, 1, 32, dtype=torch.float64)
    smooth = (torch.sin(2 * x)[:, None] * torch.cos(3 * x)[None, :]).expand(4, 1, 32, 32).clone()
    out, labels = augment_images(smooth, 1.0, generator=gen(14), ops=("scale",), max_log2_scale=0.2)
    with pytest.raises(ValueError, match="approximate"):
        invert_images(out, labels, ops=("scale",))
    back = invert_images(out, labels, ops=("scale",), approximate=True)
    assert (back - smooth)[:, :, 8:24, 8:24].abs().max() < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_point_inverse_recovers_input(dtype):
    points = torch.randn(2000, 2, generator=gen(15), dtype=dtype)
    out, labels = augment_points(points, 0.8, generator=gen(16))
    assert labels.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(invert_points(out, labels), points, rtol=0, atol=tol)


def test_point_labels_describe_rotation_flip_and_scale():
    # Without translation, |x_aug| = 2^u |x| and the angle changes by exactly the labelled amount.
    points = torch.randn(1000, 2, generator=gen(17), dtype=torch.float64)
    ops = ("xflip", "rot90", "rotate", "scale")
    out, labels = augment_points(points, 0.5, generator=gen(18), ops=ops)
    u = labels[:, 5]
    torch.testing.assert_close(out.norm(dim=1), points.norm(dim=1) * 2**u, rtol=1e-12, atol=0)
    flip = labels[:, 0] != 0
    src = torch.where(flip[:, None], points * torch.tensor([-1.0, 1.0], dtype=torch.float64), points)
    rot = torch.atan2(labels[:, 2], labels[:, 1] + 1) + torch.atan2(labels[:, 4], labels[:, 3] + 1)
    d_angle = torch.atan2(out[:, 1], out[:, 0]) - torch.atan2(src[:, 1], src[:, 0]) - rot
    assert torch.allclose(torch.sin(d_angle), torch.zeros(1000, dtype=torch.float64), atol=1e-9)
    assert torch.all(torch.cos(d_angle) > 0)


# ---------------------------------------------------------------------------------------- rates


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_each_op_empirical_probability_is_p_images(p):
    n = 4000
    images = torch.randn(n, 1, 8, 8, generator=gen(19))
    _, labels = augment_images(images, p, generator=gen(20))
    for op in IMAGE_OPS:
        applied = labels[:, cols(IMAGE_OPS, "image", op)].bool().any(dim=1)
        assert within_binomial(int(applied.sum()), n, p), op


@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_each_op_empirical_probability_is_p_points(p):
    n = 20000
    _, labels = augment_points(torch.randn(n, 2, generator=gen(21)), p, generator=gen(22))
    for op in POINT_OPS:
        applied = labels[:, cols(POINT_OPS, "points", op)].bool().any(dim=1)
        assert within_binomial(int(applied.sum()), n, p), op


def test_parameter_distributions():
    n = 6000
    _, lab = augment_images(torch.zeros(n, 1, 8, 8), 1.0, generator=gen(23), max_translate=0.125)
    # rot90: k uniform over {1, 2, 3}.
    k = (torch.atan2(lab[:, 2], lab[:, 1] + 1) / (math.pi / 2)).round().long() % 4
    assert stats.chisquare(torch.bincount(k, minlength=4)[1:].numpy()).pvalue > 1e-3
    # translate: T = 1 → the 8 non-zero shifts uniformly.
    d = (lab[:, 3].round().long() + 1) * 3 + (lab[:, 4].round().long() + 1)
    counts = torch.bincount(d, minlength=9)
    assert counts[4] == 0
    assert stats.chisquare(counts[torch.arange(9) != 4].numpy()).pvalue > 1e-3
    # scale: u ~ U(−0.2, 0.2).
    assert stats.kstest(lab[:, 5].double().numpy(), "uniform", args=(-0.2, 0.4)).pvalue > 1e-3
    _, lab = augment_points(torch.zeros(n, 2), 1.0, generator=gen(24))
    theta = torch.atan2(lab[:, 4].double(), lab[:, 3].double() + 1)
    assert stats.kstest(theta.numpy(), "uniform", args=(-math.pi, 2 * math.pi)).pvalue > 1e-3
    assert stats.kstest(lab[:, 5].double().numpy(), "uniform", args=(-1, 2)).pvalue > 1e-3  # t / max


def test_no_whole_pixel_translation_means_never_applied():
    _, labels = augment_images(torch.randn(100, 1, 4, 4), 1.0, generator=gen(25), ops=("translate",))
    assert not labels.any()  # round(0.125 · 4) = 0 pixels


# ---------------------------------------------------------------------------------------- streams


def test_determinism_and_paired_streams():
    images = torch.randn(32, 1, 8, 8, generator=gen(26))
    a = augment_images(images, 0.5, generator=gen(27))
    b = augment_images(images, 0.5, generator=gen(27))
    c = augment_images(images, 0.5, generator=gen(28))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # Switching an op off does not shift another op's draws.
    _, only_rot = augment_images(images, 0.5, generator=gen(27), ops=("rot90",))
    assert torch.equal(only_rot, a[1][:, 1:3])
    # A larger p applies each op to a superset of the samples.
    _, small = augment_points(torch.randn(300, 2), 0.2, generator=gen(29))
    _, large = augment_points(torch.randn(300, 2), 0.6, generator=gen(29))
    assert torch.all(large.bool().any(dim=1)[small.bool().any(dim=1)])


def test_class_agrees_with_functions():
    images = torch.randn(20, 3, 8, 8, generator=gen(30))
    aug = NonLeakyAugment(0.5, kind="image")
    assert aug.label_dim == 6
    x1, l1 = aug(images, gen(31))
    x2, l2 = augment_images(images, 0.5, generator=gen(31))
    assert torch.equal(x1, x2) and torch.equal(l1, l2)
    pts = torch.randn(20, 2, generator=gen(32))
    aug_p = NonLeakyAugment(0.5, ops=("rotate", "translate"), kind="points", max_translate=0.3)
    y1, m1 = aug_p(pts, gen(33))
    y2, m2 = augment_points(pts, 0.5, generator=gen(33), ops=("rotate", "translate"), max_translate=0.3)
    assert torch.equal(y1, y2) and torch.equal(m1, m2)
    torch.testing.assert_close(aug_p.invert(y1, m1), pts, rtol=0, atol=1e-5)
    assert not aug_p.zero_labels(5).any() and aug_p.zero_labels(5).shape == (5, 4)


def test_validation_errors():
    with pytest.raises(ValueError, match="ops"):
        augment_images(torch.zeros(2, 1, 4, 4), 0.5, generator=gen(), ops=("rotate",))
    with pytest.raises(ValueError, match="ops"):
        augment_points(torch.zeros(2, 2), 0.5, generator=gen(), ops=("xflip", "xflip"))
    with pytest.raises(ValueError, match="ops"):
        NonLeakyAugment(0.5, ops="xflip")
    with pytest.raises(ValueError, match="kind"):
        NonLeakyAugment(0.5, kind="video")
    with pytest.raises(ValueError, match="square"):
        augment_images(torch.zeros(2, 1, 4, 6), 0.5, generator=gen())
    augment_images(torch.zeros(2, 1, 4, 6), 0.5, generator=gen(), ops=("xflip", "translate", "scale"))
    with pytest.raises(ValueError, match="p"):
        augment_points(torch.zeros(2, 2), 1.5, generator=gen())
    with pytest.raises(ValueError, match="max_translate"):
        augment_points(torch.zeros(2, 2), 0.5, generator=gen(), max_translate=0.7)
    with pytest.raises(ValueError, match="points"):
        augment_points(torch.zeros(2, 3), 0.5, generator=gen())
    with pytest.raises(ValueError, match="labels"):
        invert_points(torch.zeros(2, 2), torch.zeros(2, 3))


def test_card():
    assert CARD.name == "nonleaky_augmentation" and CARD.role == "task"
    assert CARD.resolve({}) == {"p": 0.5, "max_translate": 0.125, "max_log2_scale": 0.2}
    CARD.resolve(CARD.tiny_setting)
    with pytest.raises(ParamError):
        CARD.resolve({"p": -0.1})
    with pytest.raises(ParamError):
        CARD.resolve({"max_log2_scale": -1.0})
    NonLeakyAugment(**CARD.resolve({}), kind="points")  # card parameters are the class's kwargs
