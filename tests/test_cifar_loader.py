"""The real torchvision CIFAR-10 loader reading a tiny CIFAR-format archive written by the test."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import CIFAR10

from experiments.data.cifar import CifarUnavailable, load_cifar10


def _write_tiny_cifar(root: Path, n: int = 20) -> dict[str, str]:
    """cifar-10-batches-py with 5 train batches + test batch of ``n`` images each; returns md5 per file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    md5 = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": labels}, fh)
        md5[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump(meta, fh)
    md5["batches.meta"] = hashlib.md5((folder / "batches.meta").read_bytes()).hexdigest()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return md5


def test_real_loader_reads_tiny_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md5 = _write_tiny_cifar(tmp_path)
    # torchvision verifies each file's md5; point it at the checksums of the tiny files (the loader itself is real)
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names", "md5": md5["batches.meta"]})
    x, y = load_cifar10(tmp_path, train=True, download=False)
    assert tuple(x.shape) == (100, 3, 32, 32) and x.dtype.is_floating_point is False
    assert len(y) == 100 and int(y.max()) < 10
    xt, _ = load_cifar10(tmp_path, train=False, download=False)
    assert tuple(xt.shape) == (20, 3, 32, 32)
    # the channel layout is right: image 0's red plane is the first 1024 bytes of the first row
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        raw = pickle.load(fh, encoding="latin1")["data"]
    assert np.array_equal(x[0, 0].numpy().ravel(), raw[0, :1024])


def test_missing_dataset_gives_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CifarUnavailable, match=r"params\.data: offline"):
        load_cifar10(tmp_path / "nothing-here", train=True, download=False)
