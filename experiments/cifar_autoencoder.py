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
- replay_buffer: ``batch`` draws from a buffer fed by the (class-sorted) stream.
- feature_matching: ``loss`` adds the consumer-feature term.
Loop-level tricks (EMA, averaging, accumulation, precise BN, zero weight decay) act in bench/loop.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from experiments.base import Task
from experiments.data.shapes import make_shapes
from tricks import cond_noise, feature_matching, nonleaky_aug, patchwise, replay
from tricks.card import Param

__all__ = ["TASK", "CifarAutoencoder", "ConvAE"]

HINT_POOL = 4  # the hint is the input average-pooled by this factor
IMAGE_SIZE = 32


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
    tricks = (
        "ema",
        "checkpoint_averaging",
        "periodic_averaging",
        "posthoc_ema",
        "accumulation",
        "precise_bn",
        "no_weight_decay",
        "patchwise",
        "nonleaky_augmentation",
        "cond_noise",
        "feature_matching",
        "replay_buffer",
    )
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
        "train": {"budget_samples": 192, "batch_size": 32, "eval_every_samples": 64, "checkpoint_every_samples": 96},
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
        self.aug = tricks.get("nonleaky_augmentation")
        self.noise = tricks.get("cond_noise")
        self.cond_dim = (nonleaky_aug.label_dim(nonleaky_aug.IMAGE_OPS, "image") if self.aug else 0) + (
            1 if self.noise and self.noise["return_std"] else 0
        )
        self.buffer = replay.ReplayBuffer(tricks["replay_buffer"]["capacity"]) if "replay_buffer" in tricks else None
        self.fm = None
        if "feature_matching" in tricks:
            from experiments.consumer import get_consumer

            f = tricks["feature_matching"]
            consumer = get_consumer(x_train, y_train).to(device)
            dims = (0, 2, 3) if f["reduce"] == "batch_spatial" else (2, 3)
            self.fm = feature_matching.FeatureMatchingLoss(
                consumer, f["n_layers"], reduce_dims=dims, weight=f["weight"]
            )
        if "patchwise" in tricks:
            q = tricks["patchwise"]
            sizes = [s for s in (q["min_patch"] * 2**i for i in range(6)) if s < IMAGE_SIZE]
            self.patch_schedule = patchwise.PatchSchedule(sizes, IMAGE_SIZE, q["full_fraction"])

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

    def batch(self, model: nn.Module, step: int, micro: int, micro_batch_size: int, progress: float) -> Any:
        # position of this micro-batch in the stream: a pure function of (step, micro), so resumes replay nothing
        start = step * self.train_cfg["batch_size"] + micro * micro_batch_size
        idx = self._stream_indices(start, micro_batch_size)
        if self.buffer is not None:  # TRICK: replay_buffer — push the stream, learn from a uniform sample
            self.buffer.extend({"item": idx})
            idx = self.buffer.sample(micro_batch_size, generator=self.streams.generator("data", step, micro, 1))["item"]
        x = self.x_train[idx]
        if "patchwise" in self.tricks_on:  # TRICK: patchwise — crops, more per image, full images at the end
            size = self.patch_schedule.size_at(progress)
            if size < IMAGE_SIZE:
                x, _ = patchwise.patch_batch(x, size, generator=self.streams.generator("augment", step, micro, 0))
        cond_parts = []
        if self.aug is not None:  # TRICK: nonleaky_augmentation — augment input and target, labels as conditioning
            x, labels = nonleaky_aug.augment_images(
                x,
                self.aug["p"],
                generator=self.streams.generator("augment", step, micro, 1),
                max_translate=self.aug["max_translate"],
                max_log2_scale=self.aug["max_log2_scale"],
            )
            cond_parts.append(labels)
        hint = F.avg_pool2d(x, HINT_POOL) if self.p["lowres_hint"] else None
        if self.noise is not None:  # TRICK: cond_noise — noise the low-res hint, pass its std
            hint, std = cond_noise.noise_augment(
                hint,
                self.noise["std"],
                random_std=self.noise["random_std"],
                generator=self.streams.generator("augment", step, micro, 2),
            )
            if self.noise["return_std"]:
                cond_parts.append(std[:, None])
        cond = torch.cat(cond_parts, dim=1) if cond_parts else None
        return x, hint, cond

    def loss(self, model: nn.Module, batch: Any, step: int, micro: int) -> tuple[torch.Tensor, dict[str, float]]:
        x, hint, cond = batch
        pred = model(x, hint, cond)
        loss = F.mse_loss(pred, x)
        if self.fm is not None:  # TRICK: feature_matching — beside the reconstruction loss
            loss = loss + self.fm(pred, x)
        return loss, {}

    # --- evaluation -------------------------------------------------------------------------
    def _eval_cond(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Evaluation conditioning: clean hint (or the fixed inference noise), zero augmentation labels."""
        hint = F.avg_pool2d(x, HINT_POOL) if self.p["lowres_hint"] else None
        parts = []
        if self.aug is not None:
            parts.append(x.new_zeros(len(x), self.cond_dim - (1 if self.noise and self.noise["return_std"] else 0)))
        if self.noise is not None:
            s = self.noise["inference_std"]
            if s > 0:
                hint = hint + s * torch.randn(hint.shape, generator=self.streams.generator("eval", 0)).to(hint)
            if self.noise["return_std"]:
                parts.append(x.new_full((len(x), 1), s))
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
                eps = 0.02 * torch.randn(hint.shape, generator=self.streams.generator("eval", 1, i)).to(hint)
                hint_sens += (model(x, hint + eps, cond) - pred).abs().double().sum().cpu()
        n = self.x_test.numel()
        mse = float(se / n)
        out = {"test_mse": mse, "test_psnr": float(10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))))}
        if final and self.p["lowres_hint"]:
            out["hint_sensitivity"] = float(hint_sens / n)
        return out

    def mean_predictor_mse(self) -> float:
        """Test MSE of predicting the training set's mean image (the "learned nothing" reference)."""
        return float(((self.x_test - self.x_train.mean(0, keepdim=True)) ** 2).mean())

    def bn_batches(self) -> Iterator[Any]:
        """Training images in batches of 64, pass after pass (each pass a new fixed permutation)."""
        for epoch in itertools.count():
            order = torch.randperm(len(self.x_train), generator=self.streams.generator("eval", 2, epoch))
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
