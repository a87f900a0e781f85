"""Trick cards: the machine-readable description of a trick, and parameter validation.

A :class:`TrickCard` is what `bench list` prints, what grid validation checks trick
parameters against, and what the registry-driven smoke test reads its tiny setting from.
Every trick module defines one ``CARD`` and registers it in :mod:`tricks.registry`.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Param", "ParamError", "TrickCard", "did_you_mean"]


class ParamError(ValueError):
    """A parameter value is invalid. ``field`` names it, ``value`` is what was given."""

    def __init__(self, field: str, value: Any, allowed: str, hint: str = "") -> None:
        self.field, self.value, self.allowed = field, value, allowed
        msg = f"{field}: {value!r} is not allowed; allowed: {allowed}"
        super().__init__(msg + (f" ({hint})" if hint else ""))


def did_you_mean(name: str, options: list[str] | tuple[str, ...] | set[str]) -> str:
    """Return ' — did you mean "x"?' for the closest option, or '' if none is close."""
    close = difflib.get_close_matches(str(name), sorted(options), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else ""


_TYPE_NAMES = {int: "integer", float: "number", bool: "true/false", str: "string"}


@dataclass(frozen=True)
class Param:
    """One typed parameter with a unit, a range and a docstring.

    ``low``/``high`` bound numbers (inclusive unless ``low_open``/``high_open``);
    ``choices`` restricts strings (or numbers) to a set. ``None`` as default with
    ``optional=True`` means "not set".
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
        """Return ``value`` coerced to this parameter's type, or raise :class:`ParamError`."""
        if value is None:
            if self.optional:
                return None
            raise ParamError(path, value, self.allowed())
        if self.type is bool:
            if not isinstance(value, bool):
                raise ParamError(path, value, self.allowed())
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise ParamError(path, value, self.allowed())
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParamError(path, value, self.allowed())
            value = float(value)
            if not math.isfinite(value):
                raise ParamError(path, value, self.allowed())
        elif self.type is str and not isinstance(value, str):
            raise ParamError(path, value, self.allowed())
        if self.choices is not None and value not in self.choices:
            raise ParamError(path, value, self.allowed(), did_you_mean(str(value), [str(c) for c in self.choices]))
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ParamError(path, value, self.allowed())
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ParamError(path, value, self.allowed())
        return value


def validate_params(params: dict[str, Param], given: dict[str, Any] | None, path: str) -> dict[str, Any]:
    """Validate ``given`` against ``params``; fill defaults; reject unknown keys.

    Returns the resolved dict (every declared parameter present). Raises :class:`ParamError`.
    """
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise ParamError(path, given, "a mapping of parameter names to values")
    for key in given:
        if key not in params:
            names = sorted(params)
            raise ParamError(
                f"{path}.{key}", key, "keys " + (", ".join(names) if names else "(none)"), did_you_mean(key, names)
            )
    return {name: p.validate(given.get(name, p.default), f"{path}.{name}") for name, p in params.items()}


@dataclass(frozen=True)
class TrickCard:
    """What a trick is, as a grid and a reader see it.

    ``level`` says who applies the trick: ``"loop"`` tricks are called by the training loop
    in ``bench/`` (optimizer/weights level), ``"task"`` tricks by a task's own batch/loss code.
    ``tiny_setting`` are parameter overrides small enough for a seconds-long smoke run.
    """

    name: str
    summary: str
    off: str
    on: str
    params: tuple[Param, ...]
    cost: str
    effect: str
    references: tuple[str, ...]
    level: Literal["loop", "task"]
    tiny_setting: dict[str, Any] = field(default_factory=dict)
    incompatible: tuple[str, ...] = ()

    @property
    def param_map(self) -> dict[str, Param]:
        return {p.name: p for p in self.params}

    def resolve(self, given: dict[str, Any] | None, path: str | None = None) -> dict[str, Any]:
        """Validate user parameters for this trick and fill in defaults."""
        return validate_params(self.param_map, given, path or f"tricks.{self.name}")
