"""The trick registry: name -> :class:`~tricks.card.TrickCard`, built-in and plugin tricks alike.

Three sources, read once per process on first use:

1. the built-in modules listed in :data:`BUILTIN_MODULES` (never a path a user gives);
2. Python package entry points of group ``trickbench.tricks`` (a plugin distribution declares
   ``[project.entry-points."trickbench.tricks"] my_trick = "my_pkg.my_trick:CARD"``; the object
   may be a card, a sequence of cards, or a module with ``CARD``/``CARDS``) — visible in every
   process where the distribution is installed: pool workers, SLURM array tasks, ``bench report``;
3. :func:`register_trick` for code that imports trickbench directly (a notebook, a launcher).
   Such registrations are recorded so that executors can repeat them in their worker processes
   (:func:`tricks.plugins.registrations`).

Specs name tricks only through this registry. A plugin that fails to load is an error naming
the distribution and the entry point, never a silent skip.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from importlib import import_module

from tricks.card import TrickCard, did_you_mean
from tricks.plugins import PluginError, entry_point_objects, forget_registration, record_registration

__all__ = ["BUILTIN_MODULES", "REGISTRY", "cards", "get_card", "origin", "register_trick", "unregister_trick"]

# Modules are listed explicitly (never discovered from a path a user gives).
BUILTIN_MODULES = (
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
ENTRY_POINT_GROUP = "trickbench.tricks"

_cards: dict[str, TrickCard] | None = None
_origin: dict[str, str] = {}  # name -> where it came from (for duplicate-name errors)


def _cards_of(obj: object, where: str) -> list[TrickCard]:
    if isinstance(obj, TrickCard):
        return [obj]
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(c, TrickCard) for c in obj):
        return list(obj)
    found = list(getattr(obj, "CARDS", ())) or ([obj.CARD] if hasattr(obj, "CARD") else [])  # type: ignore[attr-defined]
    if not found or not all(isinstance(c, TrickCard) for c in found):
        raise PluginError(f"{where}: {obj!r} is not a TrickCard, a list of cards, or a module with CARD/CARDS")
    return found


def _add(table: dict[str, TrickCard], card: TrickCard, where: str) -> None:
    if card.name in table and table[card.name] is not card:
        raise PluginError(f"duplicate trick name {card.name!r}: from {where} and from {_origin[card.name]}")
    table[card.name] = card
    _origin[card.name] = where


def _load() -> dict[str, TrickCard]:
    global _cards
    if _cards is None:
        table: dict[str, TrickCard] = {}
        for mod_name in BUILTIN_MODULES:
            for card in _cards_of(import_module(f"tricks.{mod_name}"), f"tricks.{mod_name}"):
                _add(table, card, f"tricks.{mod_name}")
        for where, obj in entry_point_objects(ENTRY_POINT_GROUP):
            for card in _cards_of(obj, where):
                _add(table, card, where)
        _cards = table
    return _cards


def cards() -> dict[str, TrickCard]:
    """Every registered trick card by name: built-ins first, then plugins (a copy)."""
    return dict(_load())


def get_card(name: str) -> TrickCard:
    """The card of trick ``name``; ``KeyError`` naming the known tricks and a did-you-mean otherwise."""
    table = _load()
    if name not in table:
        hint = did_you_mean(name, list(table))
        raise KeyError(f"unknown trick {name!r}; known: {', '.join(sorted(table))}" + (f" ({hint})" if hint else ""))
    return table[name]


def origin(name: str) -> str:
    """Where trick ``name`` came from: its built-in module, the entry point and distribution, or ``register_trick``."""
    get_card(name)
    return _origin[name]


def register_trick(card: TrickCard) -> TrickCard:
    """Register ``card`` in this process (and in the workers executors start from it); returns it.

    For tricks defined in code that imports trickbench directly; a distribution should use the
    ``trickbench.tricks`` entry point instead. The card must be importable as a module-level
    attribute (``module:NAME``) so worker processes can repeat the registration.
    """
    if not isinstance(card, TrickCard):
        raise ValueError(f"card: {card!r} is not allowed; allowed: a tricks.card.TrickCard")
    _add(_load(), card, "register_trick")
    record_registration("trick", card)
    return card


def unregister_trick(name: str) -> None:
    """Remove a trick added by :func:`register_trick` (tests); built-in and entry-point tricks stay."""
    if _origin.get(name) != "register_trick":
        raise ValueError(f"trick {name!r} was not added by register_trick")
    card = _load().pop(name, None)
    _origin.pop(name, None)
    if card is not None:
        forget_registration("trick", card)


class _RegistryView(Mapping[str, TrickCard]):
    """``REGISTRY``: a read-only, lazily loaded view of the registry (name -> card)."""

    def __getitem__(self, name: str) -> TrickCard:
        return _load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_load())

    def __len__(self) -> int:
        return len(_load())

    def __repr__(self) -> str:
        return f"REGISTRY({', '.join(_load())})"


REGISTRY: Mapping[str, TrickCard] = _RegistryView()
