"""CIFAR-10 through torchvision's real loader, as uint8 tensors held in memory.

Downloads where the machine can reach the dataset host; otherwise a clear error says
where the data was looked for and how to provide it (or to use the offline set).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10

__all__ = ["CifarUnavailable", "load_cifar10"]


class CifarUnavailable(RuntimeError):
    """CIFAR-10 is not on disk and could not be downloaded."""


def load_cifar10(root: str | Path, train: bool, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 N×3×32×32, labels int64) of the train or test split under ``root``."""
    root = Path(root).expanduser()
    try:
        ds = CIFAR10(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise CifarUnavailable(_missing(root, "download disabled")) from None
        try:
            ds = CIFAR10(str(root), train=train, download=True)
        except Exception as exc:
            raise CifarUnavailable(_missing(root, f"download failed: {exc}")) from None
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)


def _missing(root: Path, why: str) -> str:
    return (
        f"CIFAR-10 not found under {root} ({why}). Put the extracted 'cifar-10-batches-py' folder (or "
        f"cifar-10-python.tar.gz) there, set the task's params.data_root to where it is, or use "
        f"params.data: offline for the built-in image set that needs no download."
    )
