"""The tricks that are on in one run, bound to the objects that act: :class:`TrickSet`.

A run's config names its tricks and their resolved settings; :class:`TrickSet` turns them into
objects through each card's ``build`` (see :mod:`tricks.card`). The task receives the trick set
and asks it for its task-role objects (``tricks.get("replay_buffer")`` → a ``ReplayBuffer`` or
None); the training loop asks it for the object of each of its named points, in the loop's own
written order (``tricks.build_role("evaluated_weights", context)``) — never by trick name.

The protocols below are what the loop expects of each role's object. :func:`arm_conflicts` is
what grid validation calls for every arm a design generates: two tricks of one exclusive role,
or two tricks whose cards call each other incompatible, never train together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from tricks.card import EXCLUSIVE_ROLES, ROLES, BuildContext, TrickCard, build_trick

if TYPE_CHECKING:
    from torch import Tensor, nn

__all__ = [
    "BNStatistics",
    "EvaluatedWeights",
    "MicroBatches",
    "OptimizerGroups",
    "TrickSet",
    "arm_conflicts",
]


class OptimizerGroups(Protocol):
    """Role ``optimizer_groups``: the optimizer's parameter groups (called once, building the optimizer)."""

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]: ...


class MicroBatches(Protocol):
    """Role ``micro_batches``: how one optimizer step's batch is split (called once per run)."""

    micro_batches: int

    def split(self, batch_size: int) -> list[int]: ...


class EvaluatedWeights(Protocol):
    """Role ``evaluated_weights``: which weights the loop evaluates.

    ``after_step`` once per optimizer step (never per micro-batch); ``candidate`` at every
    evaluation where the training weights' own metric is known (intermediate evaluations of the
    training weights, and the final evaluation, before :meth:`weights`); ``weights`` returns the
    module or state dict to evaluate and whether its BatchNorm statistics must be recomputed.
    """

    #: True when :meth:`candidate` acts (the loop then evaluates the training weights for it)
    takes_candidates: bool

    def after_step(self, model: nn.Module, samples_seen: int) -> None: ...

    def candidate(self, model: nn.Module, metric: float | None, step: int) -> None: ...

    def weights(self, model: nn.Module, final: bool) -> tuple[nn.Module | Mapping[str, Tensor], bool]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class BNStatistics(Protocol):
    """Role ``bn_statistics``: recompute the evaluated model's BatchNorm statistics before an evaluation."""

    def recalibrate(
        self, model: nn.Module, batches: Iterable[Any], forward_fn: Callable[[nn.Module, Any], Any]
    ) -> int: ...


def arm_conflicts(cards: Iterable[TrickCard]) -> list[str]:
    """Why these tricks cannot be on together in one arm (empty when they can).

    Two tricks of one exclusive role (the loop has one slot: e.g. two ``evaluated_weights``
    tricks would each replace the evaluated model, and only one could act), or a pair whose
    cards list each other as ``incompatible``.
    """
    cards = list(cards)
    problems = []
    by_role: dict[str, list[str]] = {}
    for card in cards:
        if card.role in EXCLUSIVE_ROLES:
            by_role.setdefault(card.role, []).append(card.name)
    for role, names in by_role.items():
        if len(names) > 1:
            problems.append(
                f"{' and '.join(names)} both have the role {role!r} ({ROLES[role]}); the loop has one such slot, so "
                "only one of them could act"
            )
    names = {c.name for c in cards}
    seen: set[frozenset[str]] = set()
    for card in cards:
        for other in card.incompatible:
            pair = frozenset((card.name, other))
            if other in names and pair not in seen and not _same_exclusive_role(card, cards, other):
                seen.add(pair)
                problems.append(f"{card.name} and {other} are incompatible (see `bench list {card.name}`)")
    return problems


def _same_exclusive_role(card: TrickCard, cards: list[TrickCard], other: str) -> bool:
    return any(c.name == other and c.role == card.role and c.role in EXCLUSIVE_ROLES for c in cards)


class TrickSet:
    """The tricks of one run: their cards, resolved settings and built objects.

    Built by the loop before the task (task-role objects are built at once: they need no
    model); the loop builds its own roles later with :meth:`build_role`. ``cards`` maps every
    name in ``settings`` to its card (the loop passes the registry's).
    """

    def __init__(
        self, settings: Mapping[str, Mapping[str, Any]], cards: Mapping[str, TrickCard], context: BuildContext
    ) -> None:
        missing = [n for n in settings if n not in cards]
        if missing:
            raise KeyError(f"no card for trick(s) {', '.join(missing)}")
        self._cards = {n: cards[n] for n in settings}
        self._settings = {n: dict(s) for n, s in settings.items()}
        conflicts = arm_conflicts(self._cards.values())
        if conflicts:
            raise ValueError("tricks cannot be on together: " + "; ".join(conflicts))
        for name, card in self._cards.items():
            if card.role != "task" and context.task and card.applies_to and context.task not in card.applies_to:
                raise ValueError(f"trick {name!r} does not apply to task {context.task!r}")
        self._objects = {
            n: build_trick(c, self._settings[n], context) for n, c in self._cards.items() if c.role == "task"
        }

    def __contains__(self, name: object) -> bool:
        return name in self._cards

    def __iter__(self) -> Iterator[str]:
        return iter(self._cards)

    def __len__(self) -> int:
        return len(self._cards)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._cards)

    def get(self, name: str) -> Any:
        """The task-role object of trick ``name`` when it is on, else None. Call in the task's ``__init__``."""
        card = self._cards.get(name)
        if card is not None and card.role != "task":
            raise ValueError(f"trick {name!r} has the role {card.role!r}: the loop applies it, not the task")
        return self._objects.get(name)

    def role(self, role: str) -> str | None:
        """The name of the trick that is on in ``role`` (exclusive roles), or None."""
        if role not in ROLES:
            raise ValueError(f"role: {role!r} is not allowed; allowed: one of {', '.join(ROLES)}")
        return next((n for n, c in self._cards.items() if c.role == role), None)

    def build_role(self, role: str, context: BuildContext) -> Any:
        """Build the object of the trick that is on in loop role ``role`` (None when none is).

        The loop calls this once per run for each of its roles, in its written order.
        """
        if role == "task" or role not in ROLES:
            raise ValueError(
                f"role: {role!r} is not allowed; allowed: one of {', '.join(r for r in ROLES if r != 'task')}"
            )
        name = self.role(role)
        return None if name is None else build_trick(self._cards[name], self._settings[name], context)

    def settings(self, name: str) -> dict[str, Any]:
        """The resolved settings of trick ``name`` (a copy; for reports and provenance)."""
        return dict(self._settings[name])
