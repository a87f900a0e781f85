"""The frozen consumer network for feature matching: a small classifier, trained once, cached.

Feature matching compares statistics of a *consumer's* intermediate features for the
prediction and the target. The consumer is a small CNN classifier trained once on the
task's own training images and labels, cached on disk by a content hash of (images,
labels, architecture, recipe), so every run and worker of a grid reuses the same network.
Cache folder: ``$TRICKBENCH_CACHE`` or ``~/.cache/trickbench``; files are written atomically.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["build_consumer", "cache_dir", "get_consumer"]

RECIPE_VERSION = 1
EPOCHS, BATCH, LR = 3, 128, 2e-3


def cache_dir() -> Path:
    return Path(os.environ.get("TRICKBENCH_CACHE", Path.home() / ".cache" / "trickbench"))


#: leading layers of the consumer whose outputs are feature maps (N, C, H, W): what feature matching may read
CONV_LAYERS = 6


def build_consumer(num_classes: int = 10) -> nn.Sequential:
    """conv-relu-pool ×2 → linear; the first layers are what feature matching reads."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(32 * 16, num_classes),
    )  # fmt: skip


def _key(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"consumer-v{RECIPE_VERSION}-{EPOCHS}-{BATCH}-{LR}-{tuple(images.shape)}".encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def get_consumer(images_uint8: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> nn.Sequential:
    """The trained, frozen consumer for this training set (trained and cached on first use, ~10 s on CPU)."""
    path = cache_dir() / f"consumer-{_key(images_uint8, labels)}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = build_consumer(num_classes)
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        _train(net, images_uint8, labels)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    net.eval().requires_grad_(False)
    return net


def _train(net: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    x_all = images_uint8.float() / 255
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_all), generator=g)
        for i in range(0, len(order), BATCH):
            idx = order[i : i + BATCH]
            loss = nn.functional.cross_entropy(net(x_all[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
