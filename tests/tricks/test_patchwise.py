"""Tests of tricks.patchwise: exact crops, uniform offsets, the schedule, the pixel budget."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats
from torch import nn

from tricks.card import ParamError
from tricks.patchwise import (
    CARD,
    PatchSchedule,
    patch_batch,
    patch_coords,
    patch_size_at,
    patch_sizes_from,
    patches_per_image,
    random_crops,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def distinct_images(n: int, c: int = 2, h: int = 12, w: int = 12) -> torch.Tensor:
    # Every element distinct, so a patch can only match one (image, offset).
    return torch.arange(n * c * h * w, dtype=torch.float64).reshape(n, c, h, w)


@pytest.mark.parametrize("p", [1, 3, 7, 11])
def test_patches_are_exact_crops_at_offsets(p):
    images = distinct_images(9)
    patches, offsets = random_crops(images, p, generator=gen(1))
    assert patches.shape == (9, 2, p, p) and offsets.shape == (9, 2) and offsets.dtype == torch.long
    for i, (top, left) in enumerate(offsets.tolist()):
        assert 0 <= top <= 12 - p and 0 <= left <= 12 - p
        # Differential check against torchvision's crop.
        assert torch.equal(patches[i], TF.crop(images[i], top, left, p, p))


def test_rectangular_images_crop_exactly():
    images = distinct_images(5, h=6, w=10)
    patches, offsets = random_crops(images, 4, generator=gen(2))
    for i, (top, left) in enumerate(offsets.tolist()):
        assert top <= 2 and left <= 6
        assert torch.equal(patches[i], images[i, :, top : top + 4, left : left + 4])


def test_full_size_patch_returns_images_and_zero_offsets():
    images = distinct_images(4)
    g = gen(3)
    state = g.get_state()
    patches, offsets = random_crops(images, 12, generator=g)
    assert patches is images
    assert torch.equal(offsets, torch.zeros(4, 2, dtype=torch.long))
    assert torch.equal(g.get_state(), state)  # nothing drawn
    patches2, offsets2 = patch_batch(images, 12, g)
    assert patches2 is images and not offsets2.any()


def test_offsets_cover_valid_range_uniformly():
    # 8×8 images, p=5 → 4×4 = 16 valid (top, left) cells; 16000 draws, 1000 expected per cell.
    n, h, p = 16000, 8, 5
    images = torch.zeros(n, 1, h, h)
    _, offsets = random_crops(images, p, generator=gen(4))
    cells = offsets[:, 0] * (h - p + 1) + offsets[:, 1]
    counts = torch.bincount(cells, minlength=(h - p + 1) ** 2)
    assert counts.numel() == 16 and (counts > 0).all()  # both edges (0 and H−p) reached
    # Seeded, so deterministic; a biased sampler (e.g. never the last row) fails at p ≪ 1e-3.
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    # Marginals too: top and left are each uniform over 0..3.
    for axis in (0, 1):
        c = torch.bincount(offsets[:, axis], minlength=4).numpy()
        assert stats.chisquare(c).pvalue > 1e-3


def test_determinism_given_generator():
    images = torch.randn(6, 3, 16, 16)
    a = patch_batch(images, 4, gen(7))
    b = patch_batch(images, 4, gen(7))
    c = patch_batch(images, 4, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize(
    ("full", "p", "k"), [(32, 32, 1), (32, 16, 4), (32, 8, 16), (32, 4, 64), (32, 12, 7), (32, 24, 1)]
)
def test_patches_per_image_and_pixel_budget(full, p, k):
    assert patches_per_image(full, p) == k
    b = 3
    pixels_full = b * full * full
    pixels_patch = b * k * p * p
    # Never more pixels than a full-image step, and less than one patch per image short of it.
    assert pixels_patch <= pixels_full
    assert pixels_full - pixels_patch < b * p * p or p == full
    if full % p == 0:
        assert pixels_patch == pixels_full  # power-of-two sizes: exactly equal


def test_patch_batch_expands_and_groups_by_source():
    b, h, p = 3, 12, 4
    images = distinct_images(b, h=h, w=h)
    patches, offsets = patch_batch(images, p, gen(5))
    k = patches_per_image(h, p)
    assert k == 9 and patches.shape == (b * k, 2, p, p) and offsets.shape == (b * k, 2)
    for j, (top, left) in enumerate(offsets.tolist()):
        src = j // k  # rows [i·k, (i+1)·k) come from image i
        assert torch.equal(patches[j], images[src, :, top : top + p, left : left + p])
    # Crops of one image have independent offsets (not all equal).
    assert len({tuple(o) for o in offsets[:k].tolist()}) > 1


def test_schedule_segments_and_final_full_fraction():
    sizes, full, ff = (16, 4, 8), 32, 0.25  # unsorted on purpose: the schedule sorts them
    # Patch phase [0, 0.75) split in three: [0, .25) → 4, [.25, .5) → 8, [.5, .75) → 16.
    assert patch_size_at(0.0, sizes, full, ff) == 4
    assert patch_size_at(0.2499, sizes, full, ff) == 4
    assert patch_size_at(0.25, sizes, full, ff) == 8
    assert patch_size_at(0.7499, sizes, full, ff) == 16
    for prog in (0.75, 0.8, 0.99, 1.0):
        assert patch_size_at(prog, sizes, full, ff) == full
    # Fraction of progress values on full images equals full_fraction.
    grid = torch.linspace(0, 1, 10001).tolist()
    on_full = sum(patch_size_at(q, sizes, full, ff) == full for q in grid) / len(grid)
    assert on_full == pytest.approx(ff, abs=2e-4)


def test_schedule_edge_fractions_and_no_sizes():
    assert all(patch_size_at(q, (8,), 32, 1.0) == 32 for q in (0.0, 0.5, 1.0))  # full_fraction 1 = off
    assert patch_size_at(0.999, (8,), 32, 0.0) == 8  # full_fraction 0: patches until the end
    assert patch_size_at(0.3, (), 32, 0.25) == 32  # no patch sizes: always full


def test_random_mixed_schedule_is_seeded_and_covers_sizes():
    sizes = (4, 8, 16)
    g1, g2 = gen(0), gen(0)
    first = [patch_size_at(0.1, sizes, 32, 0.25, generator=g1) for _ in range(300)]
    again = [patch_size_at(0.1, sizes, 32, 0.25, generator=g2) for _ in range(300)]
    assert first == again
    assert set(first) == set(sizes)
    assert stats.chisquare([first.count(s) for s in sizes]).pvalue > 1e-3
    # The final fraction stays full even in random mode.
    assert patch_size_at(0.9, sizes, 32, 0.25, generator=gen(0)) == 32


def test_class_agrees_with_function_and_card_sizes():
    assert patch_sizes_from(8, 32) == (8, 16)
    assert patch_sizes_from(16, 32) == (16,)
    assert patch_sizes_from(32, 32) == ()
    assert patch_sizes_from(5, 32) == (5, 10, 20)
    sched = PatchSchedule.from_card(min_patch=8, full_fraction=0.25, full_size=32)
    for q in torch.linspace(0, 1, 101).tolist():
        assert sched.size_at(q) == patch_size_at(q, (8, 16), 32, 0.25)
    assert sched.size_at(0.1, gen(3)) == patch_size_at(0.1, (8, 16), 32, 0.25, generator=gen(3))


def test_fully_convolutional_model_accepts_both_sizes():
    torch.manual_seed(0)
    fcn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
    images = torch.randn(2, 3, 16, 16)
    patches, _ = patch_batch(images, 8, gen(0))
    assert fcn(patches).shape == patches.shape == (8, 3, 8, 8)
    assert fcn(images).shape == images.shape
    # A model that is not fully convolutional fails loudly on patches (why the card requires one).
    not_fcn = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))
    not_fcn(images)
    with pytest.raises(RuntimeError):
        not_fcn(patches)


def test_patch_coords_are_crops_of_full_grid():
    full = 10
    _, offsets = random_crops(torch.zeros(5, 1, full, full), 4, generator=gen(9))
    coords = patch_coords(offsets, 4, full)
    grid = patch_coords(torch.zeros(1, 2, dtype=torch.long), full, full)[0]
    assert grid[0, 0, 0] == -1 and grid[0, 0, -1] == 1 and grid[1, -1, 0] == 1  # x along width, y along height
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(coords[i], grid[:, top : top + 4, left : left + 4])


def test_validation_errors():
    images = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="patch_size"):
        random_crops(images, 9, generator=gen())
    with pytest.raises(ValueError, match="patch_size"):
        random_crops(images, 0, generator=gen())
    with pytest.raises(ValueError, match="images"):
        random_crops(torch.zeros(8, 8), 4, generator=gen())
    with pytest.raises(ValueError, match="patch_size"):
        patches_per_image(8, 16)
    with pytest.raises(ValueError, match="progress"):
        patch_size_at(1.5, (8,), 32, 0.25)
    with pytest.raises(ValueError, match="full_fraction"):
        patch_size_at(0.5, (8,), 32, 1.5)
    with pytest.raises(ValueError, match="patch_sizes"):
        PatchSchedule((64,), 32, 0.25)


def test_card():
    assert CARD.name == "patchwise" and CARD.role == "task"
    resolved = CARD.resolve(CARD.tiny_setting)
    assert resolved == {"min_patch": 8, "full_fraction": 0.5}
    assert CARD.resolve({}) == {"min_patch": 16, "full_fraction": 0.25}
    with pytest.raises(ParamError):
        CARD.resolve({"min_patch": 2})
    with pytest.raises(ParamError):
        CARD.resolve({"full_fraction": 1.2})
    with pytest.raises(ParamError, match="did you mean"):
        CARD.resolve({"min_pach": 8})
