"""trickbench's trick layer: fourteen training tricks as plain PyTorch.

Imports nothing from ``bench`` or ``experiments``. Each module has a pure functional core,
a thin stateful class where state is kept, and a trick card (``CARD``) in
:data:`tricks.registry.REGISTRY`.
"""

from tricks.card import Param, ParamError, TrickCard

__all__ = ["Param", "ParamError", "TrickCard"]
