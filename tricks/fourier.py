"""Fourier feature encoding of scalar inputs (noise levels, timesteps, coordinates).

Trick card
----------
A network fed a raw scalar (a diffusion noise level, a timestep, a coordinate) sees it
through one input weight: nearby values give nearly identical activations, and small
differences are lost among the other inputs (spectral bias, Tancik et al. 2020). Fourier
features map the scalar to ``[sin, cos]`` of many frequencies, so small differences move
the high-frequency features a lot and the network separates them easily.

- **off**: the raw scalar (optionally through a linear layer) is the input.
- **on**: :class:`FourierFeatures` of the scalar is the input (then usually an MLP).
- **parameters**: ``kind`` — ``"log"`` (NeRF positional encoding: octave-spaced
  frequencies), ``"gaussian"`` (k-diffusion ``FourierFeatures``: random Gaussian
  frequencies, Tancik et al.), ``"mp"`` (EDM2 ``MPFourier``: random frequencies and phases,
  magnitude-preserving, E[y²] = 1); ``num_features`` (even integer ≥ 2: output width);
  ``scale`` (number > 0): for ``"log"`` the highest angular frequency (radians per input
  unit), for ``"gaussian"`` and ``"mp"`` the std of the frequencies (cycles per input
  unit; EDM2's "bandwidth"). Pick ``scale`` against the input's range: the smallest input
  difference that matters should move the phase of the top frequencies by ≳ 1 rad.
- **cost**: one (N × in) @ (in × F) product and a sin/cos per feature — negligible.
- **expected effect**: faster fitting of functions of the scalar, better conditioning on
  noise level/timestep; too large ``scale`` gives noisy, aliased fits.
- **incompatible**: none.

Pitfalls avoided:

- frequencies trained or lost by accident: they are *buffers* — saved in ``state_dict``,
  not in ``parameters()``, so neither the optimizer nor weight decay touches them, and a
  checkpoint restores the same random draw. ``learnable=True`` makes them ``nn.Parameter``.
- phase precision: the encoding is computed in float32 at least (float64 for float64
  inputs) and cast back to the input dtype afterwards — in bf16, ``2π·x·f`` for large x·f
  has no digits left for the phase (EDM2 does the same).
- integer timesteps are accepted (converted to float32).
- random frequencies come from the ``generator`` argument (``None``: torch's default
  generator, like ``nn.Linear`` initialization).

References: Tancik et al. 2020 (arXiv:2006.10739); Mildenhall et al. 2020 (NeRF positional
encoding); k-diffusion ``k_diffusion/layers.py`` (``FourierFeatures``); EDM
``training/networks.py`` (``PositionalEmbedding``, ``FourierEmbedding``); EDM2
``training/networks_edm2.py`` (``MPFourier``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from tricks.card import BuildContext, CheckContext, Param, Settings, TrickCard

__all__ = [
    "CARD",
    "KINDS",
    "FourierFeatures",
    "build",
    "fourier_encode",
    "gaussian_frequencies",
    "log_spaced_frequencies",
    "random_phases",
]

KINDS = ("log", "gaussian", "mp")


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: {value!r} is not allowed; allowed: integer ≥ {low}")
    return value


def _check_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: {value!r} is not allowed; allowed: finite number > 0")
    return float(value)


def log_spaced_frequencies(num_frequencies: int, max_frequency: float) -> Tensor:
    """Octave-spaced angular frequencies ``max_frequency · 2^(k − L + 1)``, k = 0..L−1 (float32).

    NeRF's positional encoding uses ``2^k · π`` for k < L, i.e.
    ``log_spaced_frequencies(L, 2 ** (L - 1) * math.pi)``. Deterministic.
    """
    _check_int("num_frequencies", num_frequencies, 1)
    _check_positive("max_frequency", max_frequency)
    k = torch.arange(num_frequencies, dtype=torch.float64)
    return (max_frequency * torch.exp2(k - (num_frequencies - 1))).to(torch.float32)


def gaussian_frequencies(
    in_features: int, num_features: int, std: float, generator: torch.Generator | None = None
) -> Tensor:
    """Random frequencies ``N(0, std²)`` of shape ``(num_features, in_features)`` (float32).

    k-diffusion's ``FourierFeatures`` weight (in cycles per input unit; the encoding
    multiplies by 2π). Drawn on the CPU from ``generator``.
    """
    _check_int("in_features", in_features, 1)
    _check_int("num_features", num_features, 1)
    _check_positive("std", std)
    return torch.randn(num_features, in_features, generator=generator) * std


def random_phases(num_features: int, generator: torch.Generator | None = None) -> Tensor:
    """Phases ``U(0, 1)`` (in cycles) of shape ``(num_features,)`` for the ``"mp"`` encoding."""
    _check_int("num_features", num_features, 1)
    return torch.rand(num_features, generator=generator)


def _as_2d(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim not in (1, 2):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x: shape {shape} is not allowed; allowed: (N,) or (N, D)")
    return x.unsqueeze(1) if x.ndim == 1 else x


def _compute_dtype(x: Tensor) -> torch.dtype:
    # at least float32 for the phase; float64 stays float64
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype.is_floating_point else torch.get_default_dtype()


def fourier_encode(x: Tensor, frequencies: Tensor, kind: str, phases: Tensor | None = None) -> Tensor:
    """Fourier features of ``x`` (shape (N,) or (N, D)) → (N, F), dtype of x (float for integer x).

    - ``"log"``: ``frequencies`` (L,) angular; output ``[sin(x_d f_l), cos(x_d f_l)]`` for
      every dim d and frequency l: F = 2·D·L (all sines, then all cosines; NeRF).
    - ``"gaussian"``: ``frequencies`` W (F/2, D) in cycles; ``[cos(2π x Wᵀ), sin(2π x Wᵀ)]``
      (k-diffusion).
    - ``"mp"``: ``frequencies`` W (F, D) (or (F,) for D = 1) and ``phases`` φ (F,) in
      cycles; ``√2 · cos(2π (x Wᵀ + φ))`` (EDM2 MPFourier): for φ ~ U(0, 1), E[y²] = 1.

    Pure function; differentiable in x, frequencies and phases.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not allowed; allowed: one of {', '.join(map(repr, KINDS))}")
    x2 = _as_2d(x)
    dt = _compute_dtype(x)
    xf = x2.to(dt)
    f = frequencies.to(dt)
    if kind == "log":
        if f.ndim != 1:
            raise ValueError(f"frequencies: shape {tuple(f.shape)} is not allowed for kind 'log'; allowed: (L,)")
        angle = (xf.unsqueeze(-1) * f).flatten(1)  # (N, D·L)
        y = torch.cat([angle.sin(), angle.cos()], dim=1)
    else:
        if f.ndim == 1:
            f = f.unsqueeze(1)
        if f.ndim != 2 or f.shape[1] != xf.shape[1]:
            raise ValueError(
                f"frequencies: shape {tuple(frequencies.shape)} is not allowed for x with {xf.shape[1]} features; "
                f"allowed: (F, {xf.shape[1]})"
            )
        cycles = xf @ f.T  # (N, F) or (N, F/2)
        if kind == "gaussian":
            angle = 2 * math.pi * cycles
            y = torch.cat([angle.cos(), angle.sin()], dim=1)
        else:
            if phases is None or phases.shape != (f.shape[0],):
                shape = None if phases is None else tuple(phases.shape)
                raise ValueError(f"phases: {shape} is not allowed for kind 'mp'; allowed: shape ({f.shape[0]},)")
            y = math.sqrt(2) * torch.cos(2 * math.pi * (cycles + phases.to(dt)))
    return y.to(_out_dtype(x))


class FourierFeatures(nn.Module):
    """Fourier feature layer: (N,) or (N, in_features) → (N, out_features).

    Frequencies (and for ``"mp"`` phases) are drawn once at construction from
    ``generator`` and registered as buffers (saved, not trained) unless ``learnable``.
    ``out_features == num_features``. For ``"log"``, ``num_features`` must be a multiple
    of ``2 · in_features`` (``L = num_features / (2 · in_features)`` frequencies per dim).
    """

    def __init__(
        self,
        in_features: int,
        num_features: int,
        kind: str = "mp",
        scale: float = 1.0,
        learnable: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        _check_int("in_features", in_features, 1)
        _check_int("num_features", num_features, 2)
        if num_features % 2:
            raise ValueError(f"num_features: {num_features!r} is not allowed; allowed: even integer ≥ 2")
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not allowed; allowed: one of {', '.join(map(repr, KINDS))}")
        _check_positive("scale", scale)
        if not isinstance(learnable, bool):
            raise ValueError(f"learnable: {learnable!r} is not allowed; allowed: true/false")
        self.in_features, self.out_features = in_features, num_features
        self.kind, self.scale, self.learnable = kind, float(scale), learnable
        phases: Tensor | None = None
        if kind == "log":
            if num_features % (2 * in_features):
                raise ValueError(
                    f"num_features: {num_features!r} is not allowed for kind 'log' with in_features={in_features}; "
                    f"allowed: a multiple of {2 * in_features}"
                )
            freqs = log_spaced_frequencies(num_features // (2 * in_features), scale)
        elif kind == "gaussian":
            freqs = gaussian_frequencies(in_features, num_features // 2, scale, generator)
        else:
            freqs = gaussian_frequencies(in_features, num_features, scale, generator)
            phases = random_phases(num_features, generator)
        self._register("frequencies", freqs)
        if phases is not None:
            self._register("phases", phases)
        else:
            self.register_buffer("phases", None)  # attribute exists; nothing saved

    def _register(self, name: str, value: Tensor) -> None:
        if self.learnable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def forward(self, x: Tensor) -> Tensor:
        if (x.ndim == 2 and x.shape[1] != self.in_features) or (x.ndim == 1 and self.in_features != 1):
            raise ValueError(
                f"x: shape {tuple(x.shape)} is not allowed; allowed: (N, {self.in_features})"
                + (" or (N,)" if self.in_features == 1 else "")
            )
        return fourier_encode(x, self.frequencies, self.kind, self.phases)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind!r}, "
            f"scale={self.scale:g}, learnable={self.learnable}"
        )


def build(settings: Settings, context: BuildContext) -> functools.partial[FourierFeatures]:
    """The task's layer factory: ``factory(in_features, generator=g)`` → :class:`FourierFeatures`."""
    return functools.partial(
        FourierFeatures, num_features=settings["num_features"], kind=settings["kind"], scale=settings["scale"]
    )


def _check(settings: Any, context: CheckContext) -> list[str]:
    if settings["num_features"] % 2:
        return [f"num_features: {settings['num_features']} is not allowed; allowed: an even number (sin/cos pairs)"]
    return []


CARD = TrickCard(
    name="fourier_features",
    summary="Encode scalar inputs (noise level, timestep, coordinate) as sin/cos of many frequencies.",
    off="the raw scalar (or a linear layer of it) is the network's input",
    on="the scalar is mapped by FourierFeatures (log-spaced, Gaussian or magnitude-preserving random "
    "frequencies; fixed buffers) before the network",
    params=(
        Param("kind", str, "mp", "log (NeRF), gaussian (k-diffusion), mp (EDM2 MPFourier)", choices=KINDS),
        Param("num_features", int, 64, "output width; even (log: multiple of 2·inputs)", unit="features", low=2),
        Param(
            "scale",
            float,
            1.0,
            "log: highest angular frequency (rad per input unit); gaussian/mp: frequency std (cycles per unit)",
            low=0.0,
            low_open=True,
        ),
    ),
    cost="one tiny (N × in) @ (in × F) product and sin/cos per feature",
    effect="the network separates nearby scalar values; faster fitting of functions of the scalar; too "
    "large a scale gives noisy, aliased fits",
    references=(
        "Tancik et al. 2020, Fourier Features Let Networks Learn High Frequency Functions, arXiv:2006.10739",
        "crowsonkb/k-diffusion:k_diffusion/layers.py (FourierFeatures)",
        "NVlabs/edm:training/networks.py (PositionalEmbedding, FourierEmbedding)",
        "NVlabs/edm2:training/networks_edm2.py (MPFourier)",
        "Mildenhall et al. 2020, NeRF (positional encoding)",
    ),
    role="task",
    build=build,
    check=_check,
    tiny_setting={"num_features": 8},
    incompatible=(),
)
