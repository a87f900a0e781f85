"""The trick registry: name -> :class:`~tricks.card.TrickCard`.

Each trick module defines ``CARD`` (or ``CARDS`` for a module with several variants);
this module collects them. ``bench list`` prints the registry, grid validation resolves
trick names only through it, and the registry-driven smoke test iterates over it.
"""

from __future__ import annotations

from importlib import import_module

from tricks.card import TrickCard

# Modules are listed explicitly (never discovered from a path a user gives).
_MODULES = (
    "ema",
    "checkpoint_averaging",
    "accumulation",
    "precise_bn",
    "no_weight_decay",
    "stratified",
    "replay",
    "patchwise",
    "fourier",
    "cond_noise",
    "cond_dropout",
    "nonleaky_aug",
    "weight_averaging",
    "feature_matching",
)


def _collect() -> dict[str, TrickCard]:
    cards: dict[str, TrickCard] = {}
    for mod_name in _MODULES:
        mod = import_module(f"tricks.{mod_name}")
        found = list(getattr(mod, "CARDS", ())) or [mod.CARD]
        for card in found:
            if card.name in cards:
                raise RuntimeError(f"duplicate trick name {card.name!r} in tricks.{mod_name}")
            cards[card.name] = card
    return cards


REGISTRY: dict[str, TrickCard] = _collect()


def get_card(name: str) -> TrickCard:
    """Return the card of trick ``name`` or raise ``KeyError`` with a did-you-mean."""
    from tricks.card import did_you_mean

    if name not in REGISTRY:
        hint = did_you_mean(name, list(REGISTRY))
        raise KeyError(f"unknown trick {name!r}; known: {', '.join(sorted(REGISTRY))}" + (f" ({hint})" if hint else ""))
    return REGISTRY[name]
