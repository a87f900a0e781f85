"""A test-only task: noisy linear regression whose trick effect and noise are known.

Registered by tests (``tests/conftest.py``) under the name ``synthetic``; never part of the
shipped registry. ``params.lr_blowup`` makes training diverge on purpose.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from experiments.base import MicroBatch, Task
from tricks.card import Param


class Synthetic(Task):
    name = "synthetic"
    summary = "test-only noisy linear regression"
    params = (
        Param("dim", int, 8, "input dimension", low=1),
        Param("noise_std", float, 0.1, "label noise", low=0.0),
    )
    metric = "test_mse"
    higher_is_better = False
    train_defaults = {
        "budget_samples": 2048,
        "batch_size": 32,
        "lr": 0.05,
        "optimizer": "sgd",
        "eval_every_samples": 512,
        "checkpoint_every_samples": 512,
    }

    def __init__(self, params, tricks, streams, device, train) -> None:
        super().__init__(params, tricks, streams, device, train)
        g = torch.Generator().manual_seed(1234)
        self.w_true = torch.randn(params["dim"], 1, generator=g)
        self.x_test = torch.randn(256, params["dim"], generator=g)
        self.y_test = self.x_test @ self.w_true

    def build_model(self) -> nn.Module:
        return nn.Linear(self.p["dim"], 1)

    def batch(self, model: nn.Module, mb: MicroBatch) -> Any:
        g = self.streams.generator("data", mb.step, mb.index)
        x = torch.randn(mb.size, self.p["dim"], generator=g)
        y = x @ self.w_true + self.p["noise_std"] * torch.randn(mb.size, 1, generator=g)
        return x, y

    def loss(self, model: nn.Module, batch: Any, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        x, y = batch
        return ((model(x) - y) ** 2).mean(), {}

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        return {"test_mse": float(((model(self.x_test) - self.y_test) ** 2).mean())}


TASK = Synthetic


class VecSynthetic(Synthetic):
    """Seed-vectorizable (tests/test_vectorized.py): seed 1's inputs become infinite at step 3 (it diverges)."""

    name = "vec_synthetic"
    vectorizable = True
    dense_grads = True

    def batch(self, model: nn.Module, mb: MicroBatch) -> Any:
        x, y = super().batch(model, mb)
        if self.streams.seed == 1 and mb.step >= 3:
            x = x * math.inf
        return x, y
