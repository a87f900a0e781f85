"""Trick cards: what a trick is, which of its settings are valid, and how settings become behaviour.

A :class:`TrickCard` is the one place where a trick's validated settings turn into the object that
acts in a run (``card.build(settings, context)``):

- ``bench list`` prints it, grid validation checks parameters against it (:meth:`TrickCard.resolve`),
  and the registry-driven tests read its tiny setting from it;
- its **role** says where the built object acts — in the task's own ``batch``/``loss`` code
  (``"task"``), or at one of the training loop's named points (see :data:`ROLES`);
- its **build** consumes every parameter: :func:`build_trick` raises if a build leaves a resolved
  parameter unread, so no setting can be validated and then ignored.

A parameter that a task cannot honour is rejected there, not silently kept: ``Param.needs`` names a
task capability it requires (e.g. ``"batchnorm"``), ``Param.only_if`` another parameter's value it
depends on (e.g. ``alpha`` only with ``prioritized: true``), and ``TrickCard.check`` reports
cross-field problems (e.g. a setting that equals the trick switched off).

This module imports neither torch nor anything from ``bench``/``experiments``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EXCLUSIVE_ROLES",
    "LOOP_ROLES",
    "ROLES",
    "BuildContext",
    "CheckContext",
    "Param",
    "ParamError",
    "Settings",
    "TrickCard",
    "build_trick",
    "did_you_mean",
    "validate_params",
]

#: Where a trick's object acts. ``task``: the task calls it inside ``batch``/``loss``/``evaluate``
#: (the task must list the trick in ``Task.tricks``). Every other role is a named point of the one
#: training loop (``bench/loop.py``), which asks the run's trick set for the object of each role.
ROLES: dict[str, str] = {
    "task": "called by the task's own batch / loss / evaluation code",
    "optimizer_groups": "splits the model's parameters into optimizer parameter groups (loop: building the optimizer)",
    "micro_batches": "splits each optimizer step's batch into micro-batches (loop: the accumulation loop)",
    "evaluated_weights": "chooses the weights that are evaluated: averages or EMAs of the training weights "
    "(loop: after every optimizer step, at every evaluation)",
    "bn_statistics": "recomputes BatchNorm statistics of the evaluated weights (loop: before every evaluation)",
}
LOOP_ROLES = tuple(r for r in ROLES if r != "task")
#: roles the loop has exactly one slot for: two tricks of one of these roles in one arm are rejected
EXCLUSIVE_ROLES = LOOP_ROLES


class ParamError(ValueError):
    """A parameter value is invalid. ``field`` names it, ``value`` is what was given."""

    def __init__(self, field: str, value: Any, allowed: str, hint: str = "") -> None:
        self.field, self.value, self.allowed = field, value, allowed
        msg = f"{field}: {value!r} is not allowed; allowed: {allowed}"
        super().__init__(msg + (f" ({hint})" if hint else ""))


def did_you_mean(name: str, options: list[str] | tuple[str, ...] | set[str] | Any) -> str:
    """Return 'did you mean "x"?' for the closest option, or '' if none is close."""
    close = difflib.get_close_matches(str(name), sorted(str(o) for o in options), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else ""


_TYPE_NAMES = {int: "integer", float: "number", bool: "true/false", str: "string"}
#: the largest magnitude a numeric setting may have (a float64 that survives JSON and arithmetic)
MAX_MAGNITUDE = 1e15


@dataclass(frozen=True)
class Param:
    """One typed parameter with a unit, a range and a docstring.

    ``low``/``high`` bound numbers (inclusive unless ``low_open``/``high_open``);
    ``choices`` restricts strings (or numbers) to a set. ``None`` as default with
    ``optional=True`` means "not set".

    ``needs``: a task capability the parameter acts through (e.g. ``"batchnorm"``: the task's
    model has BatchNorm statistics). On a task without it the parameter is dropped from the
    resolved settings, and giving it is an error. ``only_if=(other, value)``: the parameter acts
    only when parameter ``other`` has ``value``; otherwise it is dropped, and giving it is an error.
    """

    name: str
    type: type
    default: Any
    doc: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[Any, ...] | None = None
    optional: bool = False
    needs: str = ""
    only_if: tuple[str, Any] | None = None

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = [_TYPE_NAMES.get(self.type, self.type.__name__)]
        if self.low is not None:
            parts.append((">" if self.low_open else "≥") + f" {self.low:g}")
        if self.high is not None:
            parts.append((", <" if self.high_open else ", ≤") + f" {self.high:g}")
        text = " ".join(parts[:2]) + "".join(parts[2:])
        if self.optional:
            text += " or null"
        return text

    def validate(self, value: Any, path: str) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise :class:`ParamError`.

        Booleans are never numbers (``True`` is not 1), numbers must be finite and of a
        magnitude that fits a float64 comfortably (≤ 1e15), integers given as ``2.0`` become 2.
        """
        if value is None:
            if self.optional:
                return None
            raise ParamError(path, value, self.allowed())
        if self.type is bool:
            if not isinstance(value, bool):
                raise ParamError(path, value, self.allowed())
            return value
        if self.type in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParamError(path, _short(value), self.allowed())
            try:
                as_float = float(value)
            except OverflowError:  # a 400-digit integer
                raise ParamError(path, _short(value), self.allowed(), "too large") from None
            if not math.isfinite(as_float) or abs(as_float) > MAX_MAGNITUDE:
                raise ParamError(path, _short(value), self.allowed(), f"magnitude at most {MAX_MAGNITUDE:g}")
            if self.type is int:
                if isinstance(value, float):
                    if not value.is_integer():
                        raise ParamError(path, value, self.allowed())
                    value = int(value)
            else:
                value = as_float
        elif self.type is str and not isinstance(value, str):
            raise ParamError(path, _short(value), self.allowed())
        if self.choices is not None and value not in self.choices:
            raise ParamError(path, value, self.allowed(), did_you_mean(str(value), [str(c) for c in self.choices]))
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ParamError(path, value, self.allowed())
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ParamError(path, value, self.allowed())
        return value


def _short(value: Any) -> Any:
    """A value for an error message: long reprs (a 400-digit number, a huge list) are cut."""
    text = repr(value)
    return value if len(text) <= 60 else f"{text[:40]}…({len(text)} characters)"


def validate_params(
    params: dict[str, Param],
    given: dict[str, Any] | None,
    path: str,
    capabilities: frozenset[str] | None = None,
) -> dict[str, Any]:
    """Validate ``given`` against ``params``; fill defaults; reject unknown and inactive keys.

    Returns the resolved dict: every parameter that acts, with its value. A parameter whose
    ``needs`` is not among ``capabilities`` (None = all capabilities), or whose ``only_if``
    condition does not hold, is left out — and an error if it was given. Raises :class:`ParamError`.
    """
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise ParamError(path, _short(given), "a mapping of parameter names to values")
    for key in given:
        if key not in params:
            names = sorted(params)
            raise ParamError(
                f"{path}.{key}", key, "keys " + (", ".join(names) if names else "(none)"), did_you_mean(key, names)
            )
    values = {name: p.validate(given.get(name, p.default), f"{path}.{name}") for name, p in params.items()}
    resolved: dict[str, Any] = {}
    for name, p in params.items():
        why = _inactive_reason(p, values, capabilities)
        if why is None:
            resolved[name] = values[name]
        elif name in given:
            raise ParamError(f"{path}.{name}", given[name], f"leave it out: it has no effect here ({why})")
    return resolved


def _inactive_reason(p: Param, values: dict[str, Any], capabilities: frozenset[str] | None) -> str | None:
    if p.needs and capabilities is not None and p.needs not in capabilities:
        has = ", ".join(repr(c) for c in sorted(capabilities)) or "none"
        return f"it acts only on tasks with the capability {p.needs!r}; this task has {has}"
    if p.only_if is not None:
        other, wanted = p.only_if
        if values.get(other) != wanted:
            return f"it is used only with {other}: {_as_yaml(wanted)}"
    return None


def _as_yaml(value: Any) -> str:
    """A value as a spec writes it: ``true``/``false``/``null``, other values as ``repr``."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value)


class Settings(Mapping[str, Any]):
    """A trick's resolved settings as its ``build`` sees them; records which ones were read.

    :func:`build_trick` checks after the build that every setting was read, so a parameter
    that validates cannot be ignored by the code that turns settings into behaviour.
    """

    def __init__(self, trick: str, values: Mapping[str, Any]) -> None:
        self.trick = trick
        self._values = dict(values)
        self._read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            raise KeyError(f"{self.trick}: no setting {key!r} here (known: {', '.join(self._values) or 'none'})")
        self._read.add(key)
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def unread(self) -> list[str]:
        """Settings no one has read yet."""
        return [k for k in self._values if k not in self._read]

    def __repr__(self) -> str:
        return f"Settings({self.trick}: {self._values})"


@dataclass(frozen=True)
class CheckContext:
    """What a card's ``check`` may look at: the task, its resolved ``train`` and ``params`` blocks, and
    the run's schedule — samples per optimizer step and how many evaluations the run has."""

    task: str
    capabilities: frozenset[str]
    train: Mapping[str, Any]
    params: Mapping[str, Any]
    samples_per_step: int
    evaluations: int


@dataclass(frozen=True)
class BuildContext:
    """What a card's ``build`` receives besides its settings.

    Task-role tricks are built before the model exists (``model`` is None): their objects carry
    configuration, and the task hands them tensors and generators at call time. Loop-role tricks
    are built by the loop after the model (on its device) and the optimizer step size are known.
    """

    task: str
    capabilities: frozenset[str]
    higher_is_better: bool
    model: Any = None  # torch.nn.Module (loop roles)
    samples_per_step: int | None = None  # samples between two optimizer steps (loop roles)


@dataclass(frozen=True)
class TrickCard:
    """What a trick is, as a grid and a reader see it, and how its settings become an object.

    ``role``: one of :data:`ROLES`. ``build(settings, context)`` returns the object acting in
    that role (the module's thin class, e.g. ``EMA`` or ``ReplayBuffer``) and must read every
    setting. ``applies_to``: task names; for a ``task``-role trick, tasks that wire it besides
    those listing it in ``Task.tricks``; for a loop-role trick, restricts it to these tasks
    (empty: every task that accepts the role). ``check(settings, context)`` returns messages
    ``"<param>: ..."`` for settings that validate one by one but not together or not on this
    task. ``incompatible``: tricks that must not be on in the same arm (besides a shared
    exclusive role). ``tiny_setting`` are overrides small enough for a seconds-long smoke run.
    """

    name: str
    summary: str
    off: str
    on: str
    params: tuple[Param, ...]
    cost: str
    effect: str
    references: tuple[str, ...]
    role: str
    build: Callable[[Settings, BuildContext], Any]
    tiny_setting: dict[str, Any] = field(default_factory=dict)
    incompatible: tuple[str, ...] = ()
    applies_to: tuple[str, ...] = ()
    check: Callable[[Mapping[str, Any], CheckContext], list[str]] | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(
                f"trick {self.name!r}: role {self.role!r} is not allowed; allowed: one of {', '.join(ROLES)}"
                + (f" ({hint})" if (hint := did_you_mean(self.role, ROLES)) else "")
            )
        if not callable(self.build):
            raise ValueError(f"trick {self.name!r}: build {self.build!r} is not callable")

    @property
    def param_map(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    @property
    def exclusive(self) -> bool:
        """True when at most one trick of this card's role may be on in an arm."""
        return self.role in EXCLUSIVE_ROLES

    def resolve(
        self, given: dict[str, Any] | None, path: str | None = None, capabilities: frozenset[str] | None = None
    ) -> dict[str, Any]:
        """Validate user parameters for this trick and fill in defaults (see :func:`validate_params`)."""
        return validate_params(self.param_map, given, path or f"tricks.{self.name}", capabilities)

    def problems(self, settings: Mapping[str, Any], context: CheckContext) -> list[str]:
        """Cross-field problems of resolved ``settings`` on a task, as ``"<param>: ..."`` messages."""
        return list(self.check(settings, context)) if self.check is not None else []


def build_trick(card: TrickCard, values: Mapping[str, Any], context: BuildContext) -> Any:
    """``card.build`` on ``values``, checked: a build that leaves a setting unread raises ``TypeError``.

    Call once per run for each trick that is on (the loop and the task's trick set do).
    """
    settings = Settings(card.name, values)
    obj = card.build(settings, context)
    unread = settings.unread()
    if unread:
        raise TypeError(
            f"trick {card.name!r}: its build ignored the setting(s) {', '.join(unread)}; every validated "
            "setting must act (consume it in build, or declare when it does not apply with Param.needs/only_if)"
        )
    return obj
