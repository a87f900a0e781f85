"""Seed bundles: independent, named random streams derived from one seed.

Every random number a run consumes comes from ``SeedBundle(seed).generator(purpose, *index)``.
A stream is a pure function of (seed, purpose, index) — e.g. ``("data", step, micro)`` —
so switching a trick on in one arm never shifts the random numbers any other part of the
run consumes (the arms stay *paired*), and resuming at step t needs no saved RNG state:
step t's generators are re-derived from their names (AlgoPerf-style per-step streams).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

try:  # CPython's own SHA-256 (the same digest as hashlib's): ~2x cheaper per short message than
    from _sha256 import sha256 as _sha256  # OpenSSL's, which matters at several calls per ~1 ms step
except ImportError:  # pragma: no cover - Python >= 3.12 names it _sha2; other interpreters: hashlib
    try:
        from _sha2 import sha256 as _sha256
    except ImportError:
        from hashlib import sha256 as _sha256

__all__ = ["STREAMS", "SeedBundle"]

# The purposes a run draws from. Documented here so a reader sees every stream in one place.
STREAMS = {
    "init": "model initialisation (and any module that draws at construction time)",
    "data": "data order, batch sampling, crops, replay sampling (per step, per micro-batch)",
    "augment": "augmentation parameters and conditioning noise/dropout (per step, per micro-batch)",
    "noise": "diffusion noise levels and noise samples (per step, per micro-batch)",
    "env": "environment resets and exploration (per episode / per step)",
    "eval": "evaluation: held-out samples, sampler noise, evaluation episodes",
    "global": "torch's global RNG, re-seeded every step for anything that still uses it",
    "dataset": "procedural dataset generation (shared by every arm and seed of a task)",
}


def _derive(*parts: object) -> int:
    """A 63-bit integer seed from the parts (stable across processes and Python versions)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(_sha256(text).digest()[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class SeedBundle:
    """The random streams of one seed. Arms with equal ``seed`` draw identical streams."""

    seed: int

    def seed_for(self, purpose: str, *index: int) -> int:
        """Integer seed of stream ``purpose`` at ``index`` (e.g. step, micro-batch, a named sub-stream).

        Index parts are integers; a task's named sub-streams are ``IntEnum`` members, which count
        as their integer value (the stream of ``Augment.COND_NOISE`` = 1 is the stream of 1).
        """
        if purpose not in STREAMS:
            raise ValueError(f"unknown random stream {purpose!r}; known: {', '.join(STREAMS)}")
        return _derive("trickbench", self.seed, purpose, *(int(i) for i in index))

    def seeds_for(self, purpose: str, start: int, stop: int) -> list[int]:
        """``[seed_for(purpose, i) for i in range(start, stop)]``: a per-step stream's seeds in one go.

        For a loop that needs one seed every step: computed together they cost a fraction
        of the same calls spread between the steps' kernels (cold caches).
        """
        if purpose not in STREAMS:
            raise ValueError(f"unknown random stream {purpose!r}; known: {', '.join(STREAMS)}")
        return [_derive("trickbench", self.seed, purpose, i) for i in range(start, stop)]

    def generator(self, purpose: str, *index: int, device: str | torch.device = "cpu") -> torch.Generator:
        """A fresh ``torch.Generator`` for stream ``purpose`` at ``index``. Cheap (~µs)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed_for(purpose, *index))
        return gen

    def numpy(self, purpose: str, *index: int) -> np.random.Generator:
        """A fresh NumPy generator for stream ``purpose`` at ``index``."""
        return np.random.default_rng(self.seed_for(purpose, *index))

    def as_dict(self) -> dict[str, int]:
        """The bundle's base seed per purpose, for provenance in ``config.json``."""
        return {"seed": self.seed, **{p: self.seed_for(p) for p in STREAMS}}
