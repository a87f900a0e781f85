"""Argument checks shared by the trick modules' functional cores (a clear ``ValueError`` naming the argument)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_generator"]


def check_generator(generator: Any, name: str = "generator") -> torch.Generator:
    """Return ``generator`` if it is a ``torch.Generator``, else raise ``ValueError`` naming ``name``.

    The trick functions draw all randomness from an explicit generator (the run's named stream);
    ``None`` would silently use the global RNG, so it is refused.
    """
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"{name}: {generator!r} is not allowed; allowed: a torch.Generator (a named random stream)")
    return generator
