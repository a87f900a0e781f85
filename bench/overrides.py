"""Command-line overrides of a grid spec, in Hydra's override grammar: ``bench run SPEC key=value ...``.

When to call: :func:`apply_overrides` on the *raw* spec mapping (as read from YAML), before
``bench.spec.parse_spec`` validates it — so an overridden value is validated exactly like one
written in the YAML (the same errors, naming the same field). Nothing here writes a file.

Grammar (Hydra's, https://hydra.cc/docs/advanced/override_grammar/basic/)::

    seeds=8                                    change a value (the key may be one the spec leaves at its default)
    tasks.toy_diffusion.train.lr=3e-3          dotted path into the spec; values are typed: 3e-3 is a float
    tasks.rl_policy.tricks.ema.half_life_samples=500
    seeds=[0,1,2]   tasks.x.params={data: offline, train_size: 512}   lists and mappings
    +tasks.rl_policy.tricks.ema.half_life_samples=500    add a key the spec does not have (here: a trick)
    ++key=value                                add or change
    ~tasks.toy_diffusion.tricks.ema             remove a key (here: a trick from the grid), ~key=value: only if equal

Why hydra-core's grammar and parser rather than a hand-written one or OmegaConf's dotlist:
``OmegaConf.from_dotlist`` parses ``a.b=v`` but has no add/remove forms, and types values with
YAML 1.1 rules (``3e-3`` stays a string); hydra-core's ``OverridesParser`` parses a single
override without running an app, types values (ints, floats incl. ``3e-3``, bools, null, quoted
strings, lists, mappings), knows ``+``/``++``/``~``, gives positioned syntax errors, and is the
form Hydra users already type. It is imported only when a launch has overrides (0.1 s).
What Hydra does and a grid spec does not need is rejected with a clear error: sweeps
(``a=1,2``, ``range()``, ``choice()`` — a grid is the sweep), ``@package``, config groups
(``a/b=``) and ``${...}`` interpolations (a spec is data).

Path rules (Hydra's, adapted to a spec whose defaults live in registries, not in the YAML):
a plain ``key=value`` must name a key that exists — in the raw spec, or in the schema at that
level (a ``train``/``params``/trick parameter, a top-level key) even when the YAML leaves it at
its default; otherwise the error names the path, the keys that exist there and a did-you-mean.
``+key`` adds (an error if the key is already set), ``++key`` adds or changes, ``~key`` removes
a key that is set. Task labels and trick names are the keys below ``tasks`` and ``tricks``; a
label containing a dot cannot be addressed (replace its whole block: ``tasks={...}``).

The overrides of a launch are recorded in the stored ``grid.yaml`` as a top-level
``overrides:`` list (:data:`RECORD_KEY`) beside the resolved spec (which already has them
applied): provenance, never applied again. :func:`split_record` takes it off a mapping
before validation, so a stored ``grid.yaml`` can be launched again.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tricks.card import did_you_mean

__all__ = [
    "RECORD_KEY",
    "Override",
    "apply_overrides",
    "looks_like_override",
    "parse_overrides",
    "split_record",
]

#: top-level key of a stored grid.yaml listing the overrides it was launched with
RECORD_KEY = "overrides"
GRAMMAR = "key=value, +key=value (add), ++key=value (add or change), ~key (remove) — Hydra's override grammar"
_KINDS = {"CHANGE": "change", "ADD": "add", "FORCE_ADD": "force_add", "DEL": "delete"}


@dataclass(frozen=True)
class Override:
    """One parsed override: ``kind`` is change | add | force_add | delete; ``path`` the dotted key split."""

    text: str
    kind: str
    path: tuple[str, ...]
    value: Any = None
    has_value: bool = True


def looks_like_override(token: str) -> bool:
    """Whether a command-line token is an override rather than a spec path (``k=v``, ``+k=v``, ``~k``)."""
    return "=" in token or token.startswith("~")


def parse_overrides(texts: Iterable[str]) -> list[Override]:
    """Parse override strings; raises ``SpecError`` listing every one that is not a supported override."""
    from bench.spec import SpecError

    texts = list(texts)
    if not texts:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    out: list[Override] = []
    problems: list[str] = []
    for text in texts:
        try:
            (o,) = parser.parse_overrides([text])
        except HydraException as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip() and not ln.startswith("See https://")]
            detail = "; ".join(ln.strip() for ln in lines[1:]) or lines[0]
            problems.append(f"override {text!r}: not an override ({detail}); allowed: {GRAMMAR}")
            continue
        key = o.key_or_group
        path = tuple(key.split(".")) if key else ()
        if not path or any(not part for part in path):
            problems.append(f"override {text!r}: no key before '='; allowed: {GRAMMAR}")
            continue
        if o.package is not None or "/" in key:
            problems.append(
                f"override {text!r}: config groups and @package are not used by grid specs; "
                "allowed: a dotted path into the spec, e.g. tasks.toy_diffusion.train.lr=3e-3"
            )
            continue
        if o.is_sweep_override():
            problems.append(
                f"override {text!r}: sweeps (a,b / range() / choice() / glob()) are not supported — the grid is "
                "the sweep; allowed: one value (a list in brackets, e.g. seeds=[0,1,2])"
            )
            continue
        kind = _KINDS[o.type.name]
        has_value = kind != "delete" or o._value is not None  # `~key` vs `~key=value`
        value = o.value() if has_value else None
        if _has_interpolation(value):
            problems.append(
                f"override {text!r}: ${{...}} interpolations are not supported (a spec is data); allowed: a plain value"
            )
            continue
        out.append(Override(text, kind, path, value, has_value))
    if problems:
        raise SpecError(problems, "command-line overrides")
    return out


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, Mapping):
        return any(_has_interpolation(k) or _has_interpolation(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return False


def split_record(raw: Any) -> tuple[Any, list[str]]:
    """``(raw without the recorded overrides, the recorded overrides)``; the input is not changed.

    A stored ``grid.yaml`` carries ``overrides: [...]`` (provenance: already applied). Anything but a
    list of strings there is left in place, for the validator to reject as an unknown key.
    """
    if not isinstance(raw, dict) or RECORD_KEY not in raw:
        return raw, []
    recorded = raw[RECORD_KEY]
    if not (isinstance(recorded, list) and all(isinstance(x, str) for x in recorded)):
        return raw, []
    return {k: v for k, v in raw.items() if k != RECORD_KEY}, list(recorded)


def apply_overrides(raw: Any, overrides: Iterable[Override], source: str = "spec") -> dict[str, Any]:
    """A deep copy of the raw spec mapping with the overrides applied, in order.

    Raises ``SpecError`` listing every override whose path is invalid (naming the path, the keys that
    exist at that level and a did-you-mean). Values are not checked here: ``parse_spec`` does that.
    """
    from bench.spec import SpecError

    if not isinstance(raw, dict):
        raise SpecError([f"(top level): {type(raw).__name__} given; overrides need a mapping"], source)
    root = copy.deepcopy(raw)
    problems: list[str] = []
    for ov in overrides:
        problem = _apply_one(root, ov)
        if problem:
            problems.append(problem)
    if problems:
        raise SpecError(problems, f"{source} with overrides")
    return root


def _apply_one(root: dict[str, Any], ov: Override) -> str | None:
    """Apply one override in place; return the problem (a message) or None."""
    node: dict[str, Any] = root
    for depth, key in enumerate(ov.path[:-1]):
        at = ov.path[:depth]
        if key not in node:
            if ov.kind == "change" and key not in _schema_keys(root, at):
                return _unknown(ov, at, key, node, root)
            node[key] = {}
        child = _as_mapping(node[key], ov.path[: depth + 1])
        if child is None:
            return (
                f"{_dotted(ov.path[: depth + 1])}: is {node[key]!r}, not a mapping (override {ov.text!r}); "
                f"set it whole instead, e.g. {_dotted(ov.path[: depth + 1])}={{...}}"
            )
        node[key] = child
        node = child
    at, key = ov.path[:-1], ov.path[-1]
    present = key in node
    if ov.kind == "change" and not present and key not in _schema_keys(root, at):
        return _unknown(ov, at, key, node, root)
    if ov.kind == "add" and present:
        return (
            f"{_dotted(ov.path)}: already set to {node[key]!r}, so +{_dotted(ov.path)} cannot add it "
            f"(override {ov.text!r}); allowed: {_dotted(ov.path)}=... to change it, ++{_dotted(ov.path)}=... to set it"
        )
    if ov.kind == "delete":
        if not present:
            known = sorted(map(str, node))
            hint = did_you_mean(key, known)
            return (
                f"{_dotted(ov.path)}: not set in the spec, nothing to remove (override {ov.text!r}); "
                f"set at {_dotted(at) or '(top level)'}: {', '.join(known) or '(nothing)'}"
                + (f" ({hint})" if hint else "")
            )
        if ov.has_value and node[key] != ov.value:
            return (
                f"{_dotted(ov.path)}: is {node[key]!r}, not {ov.value!r} (override {ov.text!r}); "
                f"allowed: ~{_dotted(ov.path)} to remove it whatever its value"
            )
        del node[key]
        return None
    node[key] = ov.value
    return None


def _dotted(path: Iterable[str]) -> str:
    return ".".join(path)


def _as_mapping(value: Any, path: tuple[str, ...]) -> dict[str, Any] | None:
    """The mapping form of a node the spec also accepts in short form, or None if it has none.

    ``ema:`` (null) is ``{}``; ``tricks: [a, b]`` is ``{a: null, b: null}``; ``wandb: true`` is
    ``{enabled: true}`` — the same readings ``parse_spec`` gives them.
    """
    if isinstance(value, dict):
        return value
    if value is None:
        return {}
    if isinstance(value, list) and path[-1] == "tricks" and all(isinstance(x, str) for x in value):
        return dict.fromkeys(value)
    if isinstance(value, bool) and path == ("wandb",):
        return {"enabled": value}
    return None


def _unknown(ov: Override, at: tuple[str, ...], key: str, node: dict[str, Any], root: dict[str, Any]) -> str:
    known = sorted({*map(str, node), *_schema_keys(root, at)})
    hint = did_you_mean(key, known)
    where = _dotted(at) or "(top level)"
    add = (
        f"; to add it use +{ov.text}"
        if at == ("tasks",) or (len(at) == 3 and at[0] == "tasks" and at[2] == "tricks")  # a new task or trick
        else ""
    )
    return (
        f"{_dotted((*at, key))}: unknown key (override {ov.text!r}); keys at {where}: {', '.join(known) or '(none)'}"
        + (f" ({hint})" if hint else "")
        + add
    )


def _schema_keys(root: dict[str, Any], at: tuple[str, ...]) -> set[str]:
    """Keys the spec schema allows at ``at`` even when the raw spec does not set them (registry defaults).

    Levels whose keys are the user's own choice (task labels, the tricks of a task) have none:
    there only what the spec sets exists. Imports the registries (torch): overrides mean training.
    """
    from bench import spec as spec_mod

    if not at:
        return set(spec_mod.TOP_KEYS)
    if at == ("wandb",):
        return set(spec_mod.WANDB_PARAMS)
    if at[0] != "tasks" or len(at) < 3:
        return set(spec_mod.TASK_KEYS) if len(at) == 2 and at[0] == "tasks" else set()
    block = root.get("tasks", {}).get(at[1])
    block = block if isinstance(block, dict) else {}
    if len(at) == 3 and at[2] == "train":
        return set(spec_mod.TRAIN_MAP)
    if len(at) == 3 and at[2] == "params":
        from experiments.registry import get_task

        try:
            return set(spec_mod.task_cls_params(get_task(str(block.get("task", at[1])))))
        except KeyError:
            return set()
    if len(at) == 4 and at[2] == "tricks":
        from tricks.registry import cards

        card = cards().get(at[3])
        return {p.name for p in card.params} if card is not None else set()
    return set()
