"""``mlp_regression``: a student MLP fits a fixed random teacher from a small, noisy training set.

Data: inputs ``x ~ N(0, I_dim)``; targets ``y = teacher(x) + noise_std·ε`` from a fixed random
tanh MLP (the teacher), scaled so that ``teacher(x)`` has unit variance. The teacher, the
``train_size`` training points and the ``test_size`` test points come from ``dataset_seed``: the
same for every seed and arm of a grid. Training goes through the training set in epochs, each in
its own random order (the ``data`` stream of that epoch); the position in that stream is the task's
checkpointed state (:meth:`MLPRegression.state_dict`), so a resumed run continues exactly where the
interrupted one stopped.

Model: an MLP (``depth`` hidden layers of ``hidden`` SiLU units). Loss: mean squared error.

Metrics: ``test_mse`` (primary, lower is better): MSE against the *noise-free* teacher on the test
points — how well the student recovered the function; ``train_mse``: MSE on the noisy training
targets (below the noise variance = fitting noise: overfitting).

Where the task-role trick acts (search for "TRICK:"): ``mixup`` mixes each micro-batch in
:meth:`MLPRegression.batch`. Loop-role tricks (ema, example_ema, checkpoint averaging,
accumulation, no_weight_decay, ...) act in trickbench's loop and never appear here.
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from experiments.base import MicroBatch, Task
from tricks.card import Param

__all__ = ["TASK", "MLPRegression", "student", "teacher_data"]

HERE = Path(__file__).resolve().parent


class Augment(IntEnum):
    """Sub-streams of the ``augment`` purpose (per step and micro-batch)."""

    MIXUP = 0


def teacher_data(dim: int, teacher_hidden: int, noise_std: float, train_size: int, test_size: int, seed: int) -> dict:
    """The fixed dataset of ``dataset_seed``: training inputs and noisy targets, test inputs and clean targets.

    Deterministic in its arguments (its own generator; no run stream), so every arm and seed shares it.
    """
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(dim, teacher_hidden, generator=g) * 2.0 / dim**0.5
    b1 = torch.randn(teacher_hidden, generator=g) * 0.5
    w2 = torch.randn(teacher_hidden, 1, generator=g) / teacher_hidden**0.5

    def teacher(x: Tensor) -> Tensor:
        return torch.tanh(x @ w1 + b1) @ w2

    probe = torch.randn(4096, dim, generator=g)
    scale = float(teacher(probe).std())
    x_train = torch.randn(train_size, dim, generator=g)
    y_train = teacher(x_train) / scale + noise_std * torch.randn(train_size, 1, generator=g)
    x_test = torch.randn(test_size, dim, generator=g)
    y_test = teacher(x_test) / scale
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "teacher": {"w1": w1, "b1": b1, "w2": w2, "scale": scale},
    }


def student(dim: int, hidden: int, depth: int) -> nn.Sequential:
    """The trained MLP: ``depth`` hidden layers of ``hidden`` SiLU units, one output."""
    layers: list[nn.Module] = []
    width = dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class MLPRegression(Task):
    name = "mlp_regression"
    summary = "student MLP fitting a random teacher MLP from a small noisy training set; test MSE to the teacher"
    tricks = ("mixup",)  # task-role tricks wired below ("TRICK:")
    # loop roles: the default (optimizer groups, micro-batches, evaluated weights); no BatchNorm
    params = (
        Param("dim", int, 8, "input dimension", "features", low=1, high=1024),
        Param("teacher_hidden", int, 32, "hidden units of the teacher", "units", low=1, high=4096),
        Param("noise_std", float, 0.5, "std of the training targets' noise (teacher has unit std)", low=0.0),
        Param("train_size", int, 256, "training points (one fixed set per dataset_seed)", "points", low=2),
        Param("test_size", int, 2048, "test points", "points", low=1),
        Param("dataset_seed", int, 0, "seed of the teacher and of the training and test points", low=0),
        Param("hidden", int, 64, "hidden units of the student", "units", low=1, high=4096),
        Param("depth", int, 2, "hidden layers of the student", "layers", low=1, high=16),
    )
    metric = "test_mse"
    higher_is_better = False
    metric_directions: ClassVar[dict[str, bool]] = {"train_mse": False}
    dense_grads = True  # every parameter is in every step's graph (mixup only changes the inputs)
    train_defaults: ClassVar[dict[str, Any]] = {
        "budget_samples": 16384,
        "batch_size": 32,
        "lr": 3e-3,
        "eval_every_samples": 1024,
        "checkpoint_every_samples": 4096,
    }
    trick_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "ema": {"half_life_samples": 1024},
        "example_ema": {"half_life_samples": 1024},
        "example_ema_buggy": {"half_life_samples": 1024},
        "posthoc_ema": {"snapshot_every_samples": 1024},
        "periodic_averaging": {"snapshot_every_samples": 512},
    }
    tiny: ClassVar[dict[str, dict[str, Any]]] = {
        "params": {"hidden": 16, "train_size": 64, "test_size": 128},
        # a high learning rate and 8 evaluations: the metric is not monotone, so "best" and "last" checkpoints differ
        "train": {
            "budget_samples": 256,
            "batch_size": 16,
            "lr": 0.03,
            "eval_every_samples": 32,
            "checkpoint_every_samples": 96,
        },
    }
    # `bench check` finds the plugin's own regression grid and baseline here (see docs/extending.md)
    regression_spec: ClassVar[Path | None] = HERE / "regression.yaml"
    regression_baselines: ClassVar[Path | None] = HERE / "baselines"

    def __init__(self, params, tricks, streams, device, train) -> None:
        super().__init__(params, tricks, streams, device, train)
        p = params
        data = teacher_data(
            p["dim"], p["teacher_hidden"], p["noise_std"], p["train_size"], p["test_size"], p["dataset_seed"]
        )
        self.teacher = data.pop("teacher")
        self.data = {k: v.to(device) for k, v in data.items()}
        self.mixup = tricks.get("mixup")  # the task-role trick's object, or None when it is off
        self.cursor = 0  # samples consumed from the epoch stream (checkpointed: state_dict)
        self._epoch: int | None = None
        self._order: Tensor | None = None

    def build_model(self) -> nn.Module:
        return student(self.p["dim"], self.p["hidden"], self.p["depth"])

    def _indices(self, n: int) -> Tensor:
        """The next ``n`` training indices of the epoch stream (each epoch a fresh order from ``data``)."""
        size = self.p["train_size"]
        out = []
        while n > 0:
            epoch, pos = divmod(self.cursor, size)
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = torch.randperm(size, generator=self.streams.generator("data", epoch))
            take = min(n, size - pos)
            out.append(self._order[pos : pos + take])
            self.cursor += take
            n -= take
        return torch.cat(out).to(self.device)

    def batch(self, model: nn.Module, mb: MicroBatch) -> tuple[Tensor, Tensor]:
        idx = self._indices(mb.size)
        x, y = self.data["x_train"][idx], self.data["y_train"][idx]
        if self.mixup is not None:  # TRICK: mixup — the micro-batch mixed with a permutation of itself
            x, y = self.mixup(x, y, self.streams.numpy("augment", mb.step, mb.index, Augment.MIXUP))
        return x, y

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
        x, y = batch
        return torch.mean((model(x) - y) ** 2), {}

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        d = self.data
        return {
            "test_mse": float(torch.mean((model(d["x_test"]) - d["y_test"]) ** 2)),
            "train_mse": float(torch.mean((model(d["x_train"]) - d["y_train"]) ** 2)),
        }

    def render_outputs(self, model: nn.Module, path: Path) -> bool:
        """The student and the teacher along one line through the input space (the teacher's first direction)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        w = self.teacher
        direction = w["w1"][:, 0] / w["w1"][:, 0].norm()
        t = torch.linspace(-3, 3, 200)
        x = t[:, None] * direction[None, :]
        truth = (torch.tanh(x @ w["w1"] + w["b1"]) @ w["w2"]).squeeze(1) / w["scale"]
        with torch.no_grad():
            pred = model(x.to(self.device)).squeeze(1).cpu()
        fig, ax = plt.subplots(figsize=(4, 3))
        ax.plot(t, truth, label="teacher", color="black", linewidth=1)
        ax.plot(t, pred, label="student")
        ax.set_xlabel("position along the teacher's first direction")
        ax.set_ylabel("output")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True

    # --- checkpointed state: where the epoch stream stands -------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self._epoch = None  # the epoch's order is re-derived from its stream on the next batch


TASK = MLPRegression
