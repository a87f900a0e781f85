"""``cifar_autoencoder``: a small convolutional autoencoder with BatchNorm on 32×32 images.

Data: real CIFAR-10 through torchvision (``params.data: cifar10``) or the offline
procedural image set (``data: offline``, no download; see ``experiments/data/shapes.py``).
The decoder also receives a low-resolution hint of the input (its 4×-average-pooled copy,
the conditioning signal of a cascaded model) so that conditioning tricks have a signal to
act on. Metrics: test MSE (primary, lower is better) and PSNR on full images, plus the
training-loss curve from the loop.

Where each data/loss-level trick acts (search for "TRICK:"):
- patchwise: ``batch`` crops patches on a schedule; evaluation is always on full images.
- nonleaky_augmentation: ``batch`` augments input+target; labels feed the decoder; zero at eval.
- cond_noise: ``batch`` adds noise to the low-res hint; its std feeds the decoder.
- replay_buffer: ``batch`` draws from a buffer fed by the (class-sorted) stream of image indices,
  uniformly or by priority; prioritized replay (Schaul et al. 2016) ranks images by their last
  reconstruction error, weights the reconstruction loss by the importance weights and anneals
  β to 1 over the budget (as the RL task does).
- feature_matching: ``loss`` adds the consumer-feature term.
Loop-role tricks (EMA, averaging, accumulation, precise BN, zero weight decay) act in bench/loop.py.

Random sub-streams of one purpose are named by the ``IntEnum`` classes below.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from experiments.base import MicroBatch, Task
from experiments.consumer import CONV_LAYERS
from experiments.data.shapes import make_shapes
from tricks import patchwise
from tricks.card import Param

__all__ = ["TASK", "CifarAutoencoder", "ConvAE"]

HINT_POOL = 4  # the hint is the input average-pooled by this factor
IMAGE_SIZE = 32


class Augment(IntEnum):
    """Sub-streams of the ``augment`` purpose (per step and micro-batch)."""

    PATCHES = 0  # patchwise crop offsets
    NONLEAKY = 1  # nonleaky_augmentation's transform draws
    COND_NOISE = 2  # cond_noise's noise on the hint


class Data(IntEnum):
    """Sub-streams of the ``data`` purpose (the epoch orders use the bare stream, per epoch)."""

    REPLAY = 1  # replay sampling (per step and micro-batch)


class Eval(IntEnum):
    """Sub-streams of the ``eval`` purpose (identical in every arm of a seed)."""

    INFERENCE_COND_NOISE = 0  # cond_noise's fixed inference noise
    HINT_PROBE = 1  # the hint-sensitivity probe (per test chunk)
    BN_BATCHES = 2  # the order of BatchNorm recalibration batches (per pass)


class Replayed(NamedTuple):
    """Prioritized replay's bookkeeping for one micro-batch: storage positions and importance weights
    of its images, and how many training rows (patches) each image became."""

    index: torch.Tensor
    weight: torch.Tensor
    crops: int


class AEBatch(NamedTuple):
    """One training micro-batch: images (or patches), the low-resolution hint, the extra conditioning."""

    x: torch.Tensor
    hint: torch.Tensor | None
    cond: torch.Tensor | None
    replayed: Replayed | None  # set only with prioritized replay


class ConvAE(nn.Module):
    """Conv encoder → narrow bottleneck (latent_channels × H/4 × W/4) → decoder; fully convolutional.

    ``hint`` (N×3×H/4×W/4) is concatenated to the latent; ``cond`` (N×cond_dim) shifts the
    first decoder features (a learned per-channel bias). The conditioning layer is created
    last so that switching a conditioning trick on does not change the other layers' init.
    """

    def __init__(self, width: int = 16, latent_channels: int = 4, hint: bool = True, cond_dim: int = 0) -> None:
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.Conv2d(4 * w, latent_channels, 1),
        )  # fmt: skip
        self.hint = hint
        self.dec_in = nn.Sequential(nn.Conv2d(latent_channels + 3 * hint, 4 * w, 1), nn.BatchNorm2d(4 * w))
        self.decoder = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, stride=2, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 3, 3, padding=1),
        )  # fmt: skip
        self.cond = nn.Linear(cond_dim, 4 * w) if cond_dim else None

    def forward(
        self, x: torch.Tensor, hint: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        z = self.encoder(x)
        if self.hint:
            z = torch.cat([z, hint if hint is not None else F.avg_pool2d(x, HINT_POOL)], dim=1)
        h = self.dec_in(z)
        if self.cond is not None:
            c = cond if cond is not None else x.new_zeros(len(x), self.cond.in_features)
            h = h + self.cond(c)[:, :, None, None]
        return torch.sigmoid(self.decoder(h))


class CifarAutoencoder(Task):
    name = "cifar_autoencoder"
    summary = "conv autoencoder with BatchNorm on 32×32 images (CIFAR-10 or offline shapes); test MSE/PSNR"
    # task-role tricks wired below ("TRICK:"); every loop role applies (the model has BatchNorm)
    tricks = ("patchwise", "nonleaky_augmentation", "cond_noise", "feature_matching", "replay_buffer")
    loop_roles = ("optimizer_groups", "micro_batches", "evaluated_weights", "bn_statistics")
    capabilities = frozenset({"batchnorm"})
    params = (
        Param(
            "data",
            str,
            "offline",
            "offline = procedural shapes (no download); cifar10 = torchvision CIFAR-10",
            choices=("offline", "cifar10"),
        ),
        Param("data_root", str, "~/.cache/trickbench/cifar10", "where CIFAR-10 is (or is downloaded to)"),
        Param(
            "train_size",
            int,
            4096,
            "training images used (offline: generated; cifar10: first N)",
            "images",
            low=64,
            high=50000,
        ),
        Param("test_size", int, 1024, "test images evaluated", "images", low=64, high=10000),
        Param("width", int, 16, "channels of the first conv layer", "channels", low=4, high=256),
        Param("latent_channels", int, 4, "bottleneck channels at 1/4 resolution", "channels", low=1, high=64),
        Param("lowres_hint", bool, True, "give the decoder the 4×-downsampled input (the conditioning signal)"),
        Param(
            "stream",
            str,
            "shuffled",
            "training order: shuffled epochs, or class_sorted (a non-i.i.d. stream for the replay trick)",
            choices=("shuffled", "class_sorted"),
        ),
        Param("dataset_seed", int, 0, "seed of the offline image set (the same for every arm and seed)", low=0),
    )
    metric = "test_mse"
    higher_is_better = False
    dense_grads = True  # every parameter is in every step's graph (tested per trick)
    metric_directions = {"test_psnr": True, "hint_sensitivity": False}
    train_defaults = {
        "budget_samples": 8192,
        "batch_size": 64,
        "lr": 2e-3,
        "eval_every_samples": 2048,
        "checkpoint_every_samples": 2048,
    }
    tiny = {
        "params": {"data": "offline", "train_size": 128, "test_size": 64, "width": 4},
        # a high lr: a metric that goes up and down, so "best" and "last" checkpoints differ (registry tests)
        "train": {
            "budget_samples": 192,
            "batch_size": 32,
            "lr": 0.05,
            "eval_every_samples": 32,
            "checkpoint_every_samples": 96,
        },
    }
    trick_defaults = {
        "ema": {"half_life_samples": 1024},
        "periodic_averaging": {"snapshot_every_samples": 512, "window_fraction": 0.5},
        "posthoc_ema": {"snapshot_every_samples": 1024},
        "precise_bn": {"num_batches": 16},
        "replay_buffer": {"capacity": 2048},
    }

    @classmethod
    def check(cls, params: dict[str, Any], tricks: dict[str, dict[str, Any]], train: dict[str, Any]) -> list[str]:
        problems = []
        if "cond_noise" in tricks and not params["lowres_hint"]:
            problems.append("tricks.cond_noise: needs params.lowres_hint: true (the hint is the noised conditioning)")
        if "patchwise" in tricks:
            m = tricks["patchwise"]["min_patch"]
            if m % HINT_POOL or m >= IMAGE_SIZE:
                problems.append(
                    f"tricks.patchwise.min_patch: {m} is not allowed; allowed: a multiple of {HINT_POOL} "
                    f"below {IMAGE_SIZE}"
                )
        if "feature_matching" in tricks and tricks["feature_matching"]["n_layers"] > CONV_LAYERS:
            problems.append(
                f"tricks.feature_matching.n_layers: {tricks['feature_matching']['n_layers']} is not allowed; allowed: "
                f"1 to {CONV_LAYERS} (the consumer's convolutional layers, whose features have spatial axes)"
            )
        return problems

    def __init__(self, params, tricks, streams, device, train) -> None:
        super().__init__(params, tricks, streams, device, train)
        p = params
        if p["data"] == "offline":
            x_train, y_train = make_shapes(p["train_size"], seed=p["dataset_seed"])
            x_test, _ = make_shapes(p["test_size"], seed=p["dataset_seed"] + 10_000)
        else:
            from experiments.data.cifar import load_cifar10

            x_train, y_train = load_cifar10(p["data_root"], train=True)
            x_test, _ = load_cifar10(p["data_root"], train=False)
            x_train, y_train, x_test = x_train[: p["train_size"]], y_train[: p["train_size"]], x_test[: p["test_size"]]
        # small data lives on the device as one tensor; batches are index gathers (no DataLoader workers)
        self.x_train = (x_train.float() / 255).to(device)
        self.y_train = y_train.to(device)
        self.y_train_cpu = y_train.cpu()  # the epoch orders are built on the CPU (see _stream_indices)
        self.x_test = (x_test.float() / 255).to(device)
        self._epoch_orders: dict[int, torch.Tensor] = {}
        # the task-role tricks that are on (None when off), built from their validated settings
        aug = tricks.get("nonleaky_augmentation")
        self.aug = aug(kind="image") if aug is not None else None
        self.cond_noise = tricks.get("cond_noise")
        std_inputs = 1 if self.cond_noise is not None and self.cond_noise.return_std else 0
        self.cond_dim = (self.aug.label_dim if self.aug is not None else 0) + std_inputs
        self.buffer = tricks.get("replay_buffer")
        self.fm = None
        fm = tricks.get("feature_matching")
        if fm is not None:
            from experiments.consumer import get_consumer

            self.fm = fm(get_consumer(x_train, y_train).to(device))
        schedule = tricks.get("patchwise")
        self.patch_schedule = schedule(IMAGE_SIZE) if schedule is not None else None

    def build_model(self) -> nn.Module:
        return ConvAE(self.p["width"], self.p["latent_channels"], self.p["lowres_hint"], self.cond_dim)

    # --- the stream -------------------------------------------------------------------------
    def _order(self, epoch: int) -> torch.Tensor:
        """Training indices of one epoch (a CPU tensor): a permutation, or class-sorted (shuffled within class)."""
        if epoch not in self._epoch_orders:
            g = self.streams.generator("data", epoch)
            perm = torch.randperm(len(self.x_train), generator=g)
            if self.p["stream"] == "class_sorted":
                perm = perm[torch.sort(self.y_train_cpu[perm], stable=True).indices]
            self._epoch_orders = {epoch: perm}  # keep one epoch cached
        return self._epoch_orders[epoch]

    def _stream_indices(self, start: int, count: int) -> torch.Tensor:
        # built on the CPU, then one copy to the device: a boolean-mask assignment into a GPU tensor
        # would synchronise host and device at every step (it needs the number of selected elements)
        n = len(self.x_train)
        pos = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in pos.div(n, rounding_mode="floor").unique().tolist():
            sel = pos // n == epoch
            out[sel] = self._order(epoch)[pos[sel] % n]
        return out.to(self.device, non_blocking=True)

    def batch(self, model: nn.Module, mb: MicroBatch) -> AEBatch:
        step, micro, size = mb.step, mb.index, mb.size
        # position of this micro-batch in the stream: a pure function of (step, micro), so resumes replay nothing
        start = step * self.train_cfg["batch_size"] + micro * size
        idx = self._stream_indices(start, size)
        replayed = None
        if self.buffer is not None:  # TRICK: replay_buffer — push the stream, learn from a (prioritized) sample
            self.buffer.extend({"item": idx})
            g = self.streams.generator("data", step, micro, Data.REPLAY)
            if self.buffer.prioritized:  # PER: anneal the importance-weight exponent to 1 over the budget
                sample = self.buffer.sample(size, g, beta=self.buffer.beta + (1.0 - self.buffer.beta) * mb.progress)
                replayed = Replayed(sample["index"], sample["weight"], 1)
            else:
                sample = self.buffer.sample(size, g)
            idx = sample["item"]
        x = self.x_train[idx]
        if self.patch_schedule is not None:  # TRICK: patchwise — crops, more per image, full images at the end
            patch = self.patch_schedule.size_at(mb.progress)
            if patch < IMAGE_SIZE:
                g = self.streams.generator("augment", step, micro, Augment.PATCHES)
                x, _ = patchwise.patch_batch(x, patch, generator=g)
                if replayed is not None:
                    replayed = replayed._replace(crops=patchwise.patches_per_image(IMAGE_SIZE, patch))
        cond_parts = []
        if self.aug is not None:  # TRICK: nonleaky_augmentation — augment input and target, labels as conditioning
            x, labels = self.aug(x, self.streams.generator("augment", step, micro, Augment.NONLEAKY))
            cond_parts.append(labels)
        hint = F.avg_pool2d(x, HINT_POOL) if self.p["lowres_hint"] else None
        if self.cond_noise is not None:  # TRICK: cond_noise — noise the low-res hint, pass its std
            hint, std = self.cond_noise.augment(
                hint, self.streams.generator("augment", step, micro, Augment.COND_NOISE)
            )
            if std is not None:
                cond_parts.append(std)
        cond = torch.cat(cond_parts, dim=1) if cond_parts else None
        return AEBatch(x, hint, cond, replayed)

    def loss(self, model: nn.Module, batch: AEBatch, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        pred = model(batch.x, batch.hint, batch.cond)
        if batch.replayed is None:
            loss = F.mse_loss(pred, batch.x)
        else:  # TRICK: replay_buffer (prioritized) — importance-weighted loss, per-image error as the new priorities
            r = batch.replayed
            per_image = (pred - batch.x).pow(2).flatten(1).mean(1).view(-1, r.crops).mean(1)
            self.buffer.update_priorities(r.index, per_image.detach())
            loss = (r.weight * per_image).mean()
        if self.fm is not None:  # TRICK: feature_matching — beside the reconstruction loss
            loss = loss + self.fm(pred, batch.x)
        return loss, {}

    # --- evaluation -------------------------------------------------------------------------
    def _eval_cond(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Evaluation conditioning: clean hint (or the fixed inference noise), zero augmentation labels."""
        hint = F.avg_pool2d(x, HINT_POOL) if self.p["lowres_hint"] else None
        parts = []
        if self.aug is not None:
            parts.append(self.aug.zero_labels(len(x), dtype=x.dtype, device=x.device))
        if self.cond_noise is not None:
            hint, std = self.cond_noise.at_inference(hint, self.streams.generator("eval", Eval.INFERENCE_COND_NOISE))
            if std is not None:
                parts.append(std)
        return hint, torch.cat(parts, dim=1) if parts else None

    def reconstruct(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        hint, cond = self._eval_cond(x)
        return model(x, hint, cond)

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        se = torch.zeros((), dtype=torch.float64)
        hint_sens = torch.zeros((), dtype=torch.float64)
        for i in range(0, len(self.x_test), 256):
            x = self.x_test[i : i + 256]
            pred = self.reconstruct(model, x)
            se += ((pred - x) ** 2).double().sum().cpu()
            if final and self.p["lowres_hint"]:
                # the conditioning-noise claim, measured: output change under a small hint perturbation
                hint, cond = self._eval_cond(x)
                eps = 0.02 * torch.randn(hint.shape, generator=self.streams.generator("eval", Eval.HINT_PROBE, i)).to(
                    hint
                )
                hint_sens += (model(x, hint + eps, cond) - pred).abs().double().sum().cpu()
        n = self.x_test.numel()
        mse = float(se / n)
        out = {"test_mse": mse, "test_psnr": float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))}
        if final and self.p["lowres_hint"]:
            out["hint_sensitivity"] = float(hint_sens / n)
        return out

    def intermediate_from_final(self, final_metrics: dict[str, float]) -> dict[str, float] | None:
        # every evaluation passes over the same test set; the final one only adds the hint probe
        return {k: v for k, v in final_metrics.items() if k != "hint_sensitivity"}

    def mean_predictor_mse(self) -> float:
        """Test MSE of predicting the training set's mean image (the "learned nothing" reference)."""
        return float(((self.x_test - self.x_train.mean(0, keepdim=True)) ** 2).mean())

    def bn_batches(self) -> Iterator[Any]:
        """Training images in batches of 64, pass after pass (each pass a new fixed permutation)."""
        for epoch in itertools.count():
            order = torch.randperm(len(self.x_train), generator=self.streams.generator("eval", Eval.BN_BATCHES, epoch))
            for i in range(0, len(order) - 63, 64):
                yield self.x_train[order[i : i + 64].to(self.device)]

    def bn_forward(self, model: nn.Module, batch: Any) -> Any:
        hint, cond = self._eval_cond(batch)
        return model(batch, hint, cond)

    def render_outputs(self, model: nn.Module, path: Path) -> bool:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        x = self.x_test[:8]
        with torch.no_grad():
            pred = self.reconstruct(model.eval(), x)
        fig, axes = plt.subplots(2, 8, figsize=(8, 2.3))
        for j in range(8):
            for row, img in enumerate((x[j], pred[j])):
                axes[row, j].imshow(img.permute(1, 2, 0).cpu().clamp(0, 1).numpy())
                axes[row, j].axis("off")
        axes[0, 0].set_title("input", fontsize=8, loc="left")
        axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True

    # --- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer.state_dict()} if self.buffer is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])


TASK = CifarAutoencoder
