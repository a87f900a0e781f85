"""Small Gaussian noise augmentation of a conditioning signal (conditioning augmentation).

Trick card
----------
**Off**: the model sees the conditioning input exactly as given, in training and at inference.

**On**: during training the task adds ``N(0, σ²)`` noise to the conditioning input
(``cond + σ·ε``), either a fixed ``σ = std`` or, with ``random_std``, a level drawn per sample
``σ_i ~ U(0, std)``; with ``return_std`` the network also receives the level ``σ_i`` as an extra
input column, so it can learn how much to trust the conditioning. At inference a fixed level
``inference_std`` is used (0 = clean conditioning, the usual choice; a non-zero level draws
from a generator seeded with a constant, so inference stays deterministic).

Parameters
~~~~~~~~~~
- ``std`` (float ≥ 0, units of the conditioning signal, default 0.1): the training noise std
  (the upper end of the range with ``random_std``). 0 = the trick is off.
- ``random_std`` (bool, default False): draw ``σ_i ~ U(0, std)`` per sample (Imagen's
  low-resolution noise augmentation) instead of a fixed level.
- ``inference_std`` (float ≥ 0, same units, default 0): the level used in eval mode.
- ``return_std`` (bool, default True): return the per-sample level as a (N, 1) column to feed
  the network. Without it a random level cannot be told apart from signal.

Cost: one ``randn`` of the conditioning's size per step — negligible.
Expected effect: a model that is smoother in its conditioning input — its output changes less
under small perturbations of the conditioning (:func:`sensitivity` measures this claim), more
robust to a train/test mismatch of the conditioning (Ho et al. 2021 report it as essential for
cascaded diffusion); a small cost in fidelity to exact conditioning when std is too large.

References: Ho et al. 2021, "Cascaded Diffusion Models for High Fidelity Image Generation",
arXiv 2106.15282 (conditioning augmentation); lucidrains/imagen-pytorch
``imagen_pytorch/imagen_pytorch.py`` (``lowres_noise_schedule``, ``lowres_sample_noise_level``:
a fixed noise level at sampling, the level fed to the network).

Pitfalls avoided: noise drawn from the global RNG (breaks paired seeds — here only from an
explicit generator); noise still on at evaluation (eval mode uses ``inference_std``); a random
level the network cannot see (``return_std``). Works on float conditioning only — noise on class
indices is meaningless; embed them first. Incompatibilities: none known; combined with
``cond_dropout`` apply dropout *after* noise so the null value stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from tricks._checks import check_generator
from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = ["CARD", "ConditioningNoise", "build", "noise_augment", "sensitivity"]


def _check_std(name: str, std: float) -> float:
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std < 0:
        raise ValueError(f"{name}: {std!r} is not allowed; allowed: a finite number ≥ 0")
    return float(std)


def _check_cond(cond: Tensor) -> None:
    if not isinstance(cond, Tensor) or cond.ndim < 1 or not cond.is_floating_point():
        what = f"{cond.dtype} tensor of shape {tuple(cond.shape)}" if isinstance(cond, Tensor) else type(cond).__name__
        raise ValueError(f"cond: {what} is not allowed; allowed: a floating-point tensor (N, ...) with a batch dim")


def noise_augment(
    cond: Tensor, std: float, *, generator: torch.Generator, random_std: bool = False
) -> tuple[Tensor, Tensor]:
    """Return ``(cond + σ_i·ε, σ)`` with ε ~ N(0, 1) elementwise and σ of shape (N,).

    Call in the task's batch/loss code on the conditioning input, training only. ``cond``
    (N, ...) float is not modified. ``σ_i = std`` for all i, or ``σ_i ~ U(0, std)`` with
    ``random_std``. ``std == 0`` returns ``cond`` itself (exact identity) and zero levels
    without drawing random numbers. Noise is drawn on the generator's device in ``cond``'s
    dtype, then moved. Cost: one randn of cond's size.
    """
    _check_cond(cond)
    std = _check_std("std", std)
    check_generator(generator)
    n = cond.shape[0]
    if std == 0.0:
        return cond, torch.zeros(n, dtype=cond.dtype, device=cond.device)
    dev = generator.device
    if random_std:
        sigma = torch.rand(n, generator=generator, device=dev, dtype=cond.dtype) * std
    else:
        sigma = torch.full((n,), std, dtype=cond.dtype, device=dev)
    eps = torch.randn(cond.shape, generator=generator, device=dev, dtype=cond.dtype)
    noise = (eps * sigma.view(n, *([1] * (cond.ndim - 1)))).to(cond.device)
    return cond + noise, sigma.to(cond.device)


class ConditioningNoise(nn.Module):
    """Noise augmentation of a conditioning input as a module: noisy in train mode, fixed in eval.

    ``forward(cond, generator)``: in train mode calls :func:`noise_augment` with ``std`` (a
    generator is required); in eval mode applies the fixed ``inference_std`` — identity when it
    is 0, else noise from a fresh generator seeded with ``inference_seed`` on every call, so
    inference is deterministic and independent of the training streams. Returns
    ``(cond, σ (N, 1))`` when ``return_std`` else ``cond``. No parameters or buffers.
    """

    def __init__(
        self,
        std: float,
        random_std: bool = False,
        inference_std: float = 0.0,
        return_std: bool = True,
        inference_seed: int = 0,
    ) -> None:
        super().__init__()
        self.std = _check_std("std", std)
        self.inference_std = _check_std("inference_std", inference_std)
        self.random_std = bool(random_std)
        self.return_std = bool(return_std)
        self.inference_seed = int(inference_seed)

    def forward(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if self.training:
            if generator is None:
                raise ValueError("generator: None is not allowed in train mode; allowed: a torch.Generator")
            out, sigma = noise_augment(cond, self.std, generator=generator, random_std=self.random_std)
        else:
            # A constant-seeded generator: the same cond always gives the same output.
            fixed = torch.Generator(device=cond.device).manual_seed(self.inference_seed)
            out, sigma = noise_augment(cond, self.inference_std, generator=fixed)
        return (out, sigma[:, None]) if self.return_std else out

    def augment(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Training: ``(noisy cond, σ (N, 1) or None)`` — the level column only with ``return_std``.

        Call in the task's ``batch`` code with the run's named stream; the module's mode is ignored.
        """
        out, sigma = noise_augment(cond, self.std, generator=generator, random_std=self.random_std)
        return out, (sigma[:, None] if self.return_std else None)

    def at_inference(self, cond: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Evaluation/sampling: ``cond`` with the fixed ``inference_std`` noise (none at 0, and then
        ``generator`` is not used), and the level column (all ``inference_std``) with ``return_std``."""
        out = cond
        if self.inference_std > 0:
            out, _ = noise_augment(cond, self.inference_std, generator=generator)
        return out, (cond.new_full((len(cond), 1), self.inference_std) if self.return_std else None)

    def extra_repr(self) -> str:
        return (
            f"std={self.std}, random_std={self.random_std}, inference_std={self.inference_std}, "
            f"return_std={self.return_std}"
        )


@torch.no_grad()
def sensitivity(
    model_fn: Callable[[Tensor], Tensor],
    cond: Tensor,
    eps: float,
    generator: torch.Generator,
    n_draws: int = 4,
) -> float:
    """Mean output change per unit of conditioning perturbation: E ‖f(c + eps·u) − f(c)‖₂ / eps.

    ``u ~ N(0, I)`` of ``cond``'s shape; the norm is over each sample's output, the mean over
    samples and ``n_draws`` draws. A finite-difference estimate of the typical gain of the
    model along random conditioning directions (≈ ‖J u‖ for small eps). Used by tasks to
    measure this trick's claim (lower is smoother). Runs under ``no_grad``; ``model_fn`` takes
    the conditioning batch and returns (N, ...). Cost: ``n_draws + 1`` forward passes.
    """
    _check_cond(cond)
    if _check_std("eps", eps) == 0.0:
        raise ValueError("eps: 0 is not allowed; allowed: a finite number > 0")
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws: {n_draws!r} is not allowed; allowed: an integer ≥ 1")
    check_generator(generator)
    base = model_fn(cond)
    total = 0.0
    for _ in range(n_draws):
        u = torch.randn(cond.shape, generator=generator, device=generator.device, dtype=cond.dtype).to(cond.device)
        diff = (model_fn(cond + eps * u) - base).flatten(1)
        total += diff.norm(dim=1).mean().item() / eps
    return total / n_draws


def build(settings: Settings, context: BuildContext) -> ConditioningNoise:
    """The task's conditioning noise (training noise with :meth:`~ConditioningNoise.augment`, fixed
    inference noise with :meth:`~ConditioningNoise.at_inference`)."""
    return ConditioningNoise(
        settings["std"],
        random_std=settings["random_std"],
        inference_std=settings["inference_std"],
        return_std=settings["return_std"],
    )


CARD = TrickCard(
    name="cond_noise",
    summary="Add small Gaussian noise to the conditioning input during training (conditioning augmentation).",
    off="The conditioning input is used as given in training and at inference.",
    on=(
        "Training adds N(0, σ²) to the conditioning (σ = std, or σ_i ~ U(0, std) with random_std), feeding σ "
        "to the network when return_std; inference uses the fixed inference_std (0 = clean)."
    ),
    params=(
        Param(
            "std",
            float,
            0.1,
            "Training noise std (max of the range with random_std); 0 would be the trick switched off.",
            "conditioning units",
            low=0.0,
            low_open=True,
        ),
        Param("random_std", bool, False, "Draw σ_i ~ U(0, std) per sample instead of a fixed level."),
        Param("inference_std", float, 0.0, "Fixed noise std at evaluation/sampling.", "conditioning units", low=0.0),
        Param("return_std", bool, True, "Feed the per-sample noise level to the network as an extra input."),
    ),
    cost="One randn of the conditioning's size per step; negligible.",
    effect="Output less sensitive to small conditioning perturbations; more robust to conditioning mismatch.",
    references=(
        "Ho et al. 2021, Cascaded Diffusion Models, arXiv 2106.15282 (conditioning augmentation)",
        "lucidrains/imagen-pytorch:imagen_pytorch/imagen_pytorch.py (lowres_noise_schedule)",
    ),
    role="task",
    build=build,
    tiny_setting={"std": 0.1},
    incompatible=(),
)
