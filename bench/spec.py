"""Grid specs: YAML in, a validated :class:`GridSpec` out — or a :class:`SpecError` naming every problem.

A spec is data, never code: it is read with a safe loader that also rejects duplicate keys,
and every name in it (task, trick, design, option) is resolved through a registry.
Validation runs completely before anything is written or submitted.

Example::

    grid: quick-cifar
    design: one_at_a_time        # one_at_a_time | leave_one_out | full_factorial | fractional_factorial
    seeds: 3                     # or an explicit list: [0, 1, 2]
    tasks:
      cifar_autoencoder:
        params: {data: offline}
        train: {budget_samples: 8192, batch_size: 64}
        tricks:
          ema: {half_life_samples: 1000}
          no_weight_decay:       # empty = the card's (or the task's) defaults
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.specfile import (
    DEFAULT_MAX_RUNS,
    GRID_NAME,
    INT64_MAX,
    MAX_RUNS_CEILING,
    MAX_SEEDS,
    SpecError,
    check_limits,
    grid_name_problem,
    load_yaml,
    seed_duplicates_problem,
    short_repr,
)
from tricks.card import CheckContext, Param, ParamError, TrickCard, did_you_mean, validate_params

__all__ = [
    "DEFAULT_MAX_RUNS",
    "DESIGNS",
    "MAX_RUNS_CEILING",
    "TRAIN_PARAMS",
    "GridSpec",
    "SpecError",
    "TaskSpec",
    "load_spec",
    "parse_spec",
]

DESIGNS = ("one_at_a_time", "leave_one_out", "full_factorial", "fractional_factorial")
TOP_KEYS = ("grid", "description", "design", "seeds", "tasks", "wandb", "fraction")
TASK_KEYS = ("task", "params", "train", "tricks")


#: the ``train`` block: how long and how a task trains (what-to-train; how-to-run is CLI flags)
TRAIN_PARAMS: tuple[Param, ...] = (
    Param("budget_samples", int, 8192, "training budget in samples (images, transitions, points)", "samples", low=1),
    Param(
        "batch_size",
        int,
        64,
        "samples per optimizer step (split into micro-batches by accumulation)",
        "samples",
        low=1,
        high=65536,
    ),
    Param("optimizer", str, "adamw", "optimizer", choices=("adamw", "sgd")),
    Param("lr", float, 1e-3, "peak learning rate", low=0.0, high=10.0, low_open=True),
    Param("momentum", float, 0.9, "SGD momentum / Adam beta1", low=0.0, high=1.0, high_open=True),
    Param(
        "weight_decay",
        float,
        1e-4,
        "decoupled weight decay (zeroed for norms/biases by no_weight_decay)",
        low=0.0,
        high=1.0,
    ),
    Param(
        "lr_schedule", str, "constant", "learning-rate schedule over the sample budget", choices=("constant", "cosine")
    ),
    Param("warmup_samples", int, 0, "linear learning-rate warmup", "samples", low=0),
    Param(
        "grad_clip_norm",
        float,
        None,
        "clip the global gradient norm (null = no clipping)",
        low=0.0,
        low_open=True,
        optional=True,
    ),
    Param("channels_last", bool, False, "train with channels_last memory format (conv models on GPU)"),
    Param(
        "autocast",
        str,
        "none",
        "mixed precision for forward/loss: bf16 autocast (GPU; changes results)",
        choices=("none", "bf16"),
    ),
    Param("compile", bool, False, "torch.compile the model for training (compiles once per run)"),
    Param("eval_every_samples", int, 2048, "evaluate every this many samples (and at the end)", "samples", low=1),
    Param(
        "checkpoint_every_samples", int, 2048, "checkpoint every this many samples (and at the end)", "samples", low=1
    ),
)
TRAIN_MAP = {p.name: p for p in TRAIN_PARAMS}
WANDB_PARAMS = {
    p.name: p
    for p in (
        Param("enabled", bool, False, "mirror runs to Weights & Biases"),
        Param("project", str, "trickbench", "wandb project"),
        Param(
            "mode",
            str,
            "auto",
            "auto = online if an account is configured, else offline",
            choices=("auto", "online", "offline"),
        ),
    )
}


@dataclass(frozen=True)
class TaskSpec:
    """One task block of a grid, fully resolved (every default filled in)."""

    label: str  # the key in the spec's ``tasks`` mapping (names the task in reports)
    task: str  # the registered task it runs (= label unless the block says ``task: ...``)
    params: dict[str, Any]
    train: dict[str, Any]
    tricks: dict[str, dict[str, Any]]  # trick name -> resolved parameters, in spec order


@dataclass(frozen=True)
class GridSpec:
    """A validated grid: what to train. Serialise with :meth:`to_dict` (stored as ``grid.yaml``)."""

    grid: str
    design: str
    seeds: tuple[int, ...]
    tasks: tuple[TaskSpec, ...]
    description: str = ""
    fraction: int = 0
    wandb: dict[str, Any] = field(default_factory=lambda: validate_params(WANDB_PARAMS, {}, "wandb"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "description": self.description,
            "design": self.design,
            **({"fraction": self.fraction} if self.design == "fractional_factorial" else {}),
            "seeds": list(self.seeds),
            "wandb": dict(self.wandb),
            "tasks": {
                t.label: ({"task": t.task} if t.task != t.label else {})
                | {"params": t.params, "train": t.train, "tricks": t.tricks}
                for t in self.tasks
            },
        }

    @classmethod
    def from_resolved(cls, data: Any, source: str = "grid.yaml") -> GridSpec:
        """A grid from a stored resolved spec (:meth:`to_dict`'s output), trusted as resolved: nothing is
        re-validated against the registries, so reading a launched grid imports neither them nor torch.

        Raises :class:`SpecError` when the structure is not that of a stored spec (a damaged file).
        """
        try:
            tasks = tuple(
                TaskSpec(
                    label=str(label),
                    task=str(block.get("task", label)),
                    params=dict(block["params"]),
                    train=dict(block["train"]),
                    tricks={str(k): dict(v or {}) for k, v in block["tricks"].items()},
                )
                for label, block in data["tasks"].items()
            )
            return cls(
                grid=str(data["grid"]),
                design=str(data["design"]),
                seeds=tuple(int(s) for s in data["seeds"]),
                tasks=tasks,
                description=str(data.get("description", "")),
                fraction=int(data.get("fraction", 0)),
                wandb=dict(data.get("wandb") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpecError([f"not a stored resolved spec ({type(exc).__name__}: {exc})"], source) from None


def load_spec(path: str | Path, max_runs: int = DEFAULT_MAX_RUNS) -> GridSpec:
    """Read and validate a YAML grid spec. Raises :class:`SpecError`; writes nothing.

    The file, YAML and size limits (``bench.specfile``) are checked first, then :func:`parse_spec`;
    ``max_runs`` caps the runs the spec may plan (``bench run --max-runs``).
    """
    return parse_spec(load_yaml(path), source=str(path), max_runs=max_runs)


def parse_spec(data: Any, source: str = "spec", max_runs: int | None = None) -> GridSpec:
    """Validate an already-parsed spec (a dict). Collects all problems before raising.

    The limits of ``bench.specfile.check_limits`` come first (no registry imported, nothing expanded);
    ``max_runs`` caps the planned runs (None: :data:`MAX_RUNS_CEILING`, e.g. a stored ``grid.yaml``).
    """
    limits = check_limits(data, MAX_RUNS_CEILING if max_runs is None else max_runs)
    if limits:
        raise SpecError(limits, source)
    problems: list[str] = []
    if not isinstance(data, dict):
        raise SpecError(
            [f"(top level): {type(data).__name__} given; allowed: a mapping with keys {', '.join(TOP_KEYS)}"], source
        )
    for key in data:
        if key not in TOP_KEYS:
            hint = did_you_mean(str(key), TOP_KEYS)
            problems.append(f"{key}: unknown key; allowed: {', '.join(TOP_KEYS)}" + (f" ({hint})" if hint else ""))

    grid = data.get("grid")
    if grid_name_problem(grid):
        problems.append(grid_name_problem(grid))
    description = data.get("description", "")
    if not isinstance(description, str):
        problems.append(f"description: {short_repr(description)} is not allowed; allowed: a string")

    design = data.get("design", "one_at_a_time")
    if not isinstance(design, str) or design not in DESIGNS:
        hint = did_you_mean(str(design), DESIGNS)
        problems.append(
            f"design: {short_repr(design)} is not allowed; allowed: one of {', '.join(DESIGNS)}"
            + (f" ({hint})" if hint else "")
        )

    seeds = _parse_seeds(data.get("seeds", 3), problems)
    fraction = data.get("fraction", 0)
    if design == "fractional_factorial":
        if isinstance(fraction, bool) or not isinstance(fraction, int) or fraction < 1:
            problems.append(
                f"fraction: {short_repr(fraction)} is not allowed; allowed: an integer p ≥ 1 (the design runs "
                "2^(k-p) of the 2^k trick combinations)"
            )
    elif "fraction" in data:
        problems.append(f"fraction: only used with design fractional_factorial (design is {design!r})")
        fraction = 0

    wandb_cfg: dict[str, Any] = {}
    raw_wandb = data.get("wandb", False)
    try:
        wandb_cfg = validate_params(
            WANDB_PARAMS, {"enabled": raw_wandb} if isinstance(raw_wandb, bool) else raw_wandb, "wandb"
        )
    except ParamError as exc:
        problems.append(str(exc))

    tasks: list[TaskSpec] = []
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, dict) or not raw_tasks:
        problems.append(
            f"tasks: {short_repr(raw_tasks)} is not allowed; allowed: a mapping from task name "
            f"({', '.join(_task_names())}) to its block (params, train, tricks)"
        )
    else:
        for name, block in raw_tasks.items():
            spec = _parse_task(str(name), block, problems, design if design in DESIGNS else "one_at_a_time")
            if spec is not None:
                tasks.append(spec)

    if design == "fractional_factorial" and isinstance(fraction, int) and fraction >= 1:
        for t in tasks:
            k = len(t.tricks)
            if k - fraction < 1:
                problems.append(
                    f"fraction: {fraction} is too large for task {t.task} with {k} tricks; "
                    f"allowed: 1 ≤ fraction ≤ {max(k - 1, 0)}"
                )
    if problems:
        raise SpecError(problems, source)
    return GridSpec(
        grid=grid,
        design=design,
        seeds=seeds,
        tasks=tuple(tasks),
        description=description,
        fraction=int(fraction),
        wandb=wandb_cfg,
    )


def _parse_seeds(raw: Any, problems: list[str]) -> tuple[int, ...]:
    allowed = f"an integer count 1..{MAX_SEEDS} or a list of 1..{MAX_SEEDS} distinct integers 0..2^63-1"
    if isinstance(raw, bool):
        problems.append(f"seeds: {raw!r} is not allowed; allowed: {allowed}")
        return ()
    if isinstance(raw, int):
        if not 1 <= raw <= MAX_SEEDS:
            problems.append(f"seeds: {short_repr(raw)} is out of range; allowed: {allowed}")
            return ()
        return tuple(range(raw))
    if (
        isinstance(raw, list)
        and 0 < len(raw) <= MAX_SEEDS
        and all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= INT64_MAX for s in raw)
    ):
        if seed_duplicates_problem(raw):
            problems.append(seed_duplicates_problem(raw))
            return ()
        return tuple(raw)
    problems.append(f"seeds: {short_repr(raw)} is not allowed; allowed: {allowed}")
    return ()


def _task_names() -> tuple[str, ...]:
    from experiments.registry import task_names

    return task_names()


def _parse_task(label: str, block: Any, problems: list[str], design: str = "one_at_a_time") -> TaskSpec | None:
    from experiments.registry import get_task

    path = f"tasks.{label}"
    if not GRID_NAME.match(label):
        problems.append(
            f"{path}: {label!r} is not allowed as a task label; allowed: lower-case letters, digits, '_', '-', '.'"
        )
        return None
    name = block.get("task", label) if isinstance(block, dict) else label
    if not isinstance(name, str):
        problems.append(f"{path}.task: {name!r} is not allowed; allowed: one of {', '.join(_task_names())}")
        return None
    if name != label:
        path = f"{path}.task"
    try:
        task_cls = get_task(name)
    except KeyError:
        known = _task_names()
        hint = did_you_mean(name, known)
        problems.append(f"{path}: unknown task {name!r}; allowed: {', '.join(known)}" + (f" ({hint})" if hint else ""))
        return None
    block = {} if block is None else block
    if not isinstance(block, dict):
        problems.append(f"{path}: {block!r} is not allowed; allowed: a mapping with keys {', '.join(TASK_KEYS)}")
        return None
    for key in block:
        if key not in TASK_KEYS:
            hint = did_you_mean(str(key), TASK_KEYS)
            problems.append(
                f"{path}.{key}: unknown key; allowed: {', '.join(TASK_KEYS)}" + (f" ({hint})" if hint else "")
            )

    path = f"tasks.{label}"
    n_before = len(problems)
    params = _validate(task_cls_params(task_cls), block.get("params"), f"{path}.params", problems)
    train_params = {
        name_: Param(**{**p.__dict__, "default": task_cls.train_defaults.get(name_, p.default)})
        for name_, p in TRAIN_MAP.items()
    }
    train = _validate(train_params, block.get("train"), f"{path}.train", problems)
    if len(problems) > n_before:
        return None
    tricks = _parse_tricks(task_cls, block.get("tricks"), f"{path}.tricks", problems, params, train, design)
    if len(problems) > n_before:
        return None
    extra = task_cls.check(params, tricks, train)
    if extra:
        problems.extend(f"{path}.{msg}" for msg in extra)
        return None
    return TaskSpec(label=label, task=name, params=params, train=train, tricks=tricks)


def task_cls_params(task_cls: Any) -> dict[str, Param]:
    return {p.name: p for p in task_cls.params}


def _validate(params: dict[str, Param], given: Any, path: str, problems: list[str]) -> dict[str, Any]:
    try:
        return validate_params(params, given, path)
    except ParamError as exc:
        problems.append(str(exc))
        return {}


def count_evaluations(train: dict[str, Any], samples_per_step: int) -> int:
    """How many evaluations a run of this ``train`` block has (the loop's rule: every step that crosses a
    multiple of ``eval_every_samples``, and the last step)."""
    steps = max(1, -(-train["budget_samples"] // samples_per_step))
    every = train["eval_every_samples"]
    crossing = min(steps, steps * samples_per_step // every)  # at most one evaluation per step
    last_crosses = steps * samples_per_step // every > (steps - 1) * samples_per_step // every
    return crossing + (0 if last_crosses else 1)


def applicable_tricks(task_cls: Any) -> dict[str, TrickCard]:
    """The registered tricks that apply to ``task_cls`` (see ``Task.accepts``), by name."""
    from tricks.registry import cards

    return {name: card for name, card in cards().items() if task_cls.accepts(card)}


def resolve_trick(
    task_cls: Any,
    card: TrickCard,
    given: dict[str, Any] | None,
    path: str,
    params: dict[str, Any],
    train: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    """A trick's settings on a task: the task's defaults, then ``given``, validated against the card.

    Returns (resolved settings, problems). Parameters the task cannot honour are left out (an error
    when given); the card's cross-field check runs on the result.
    """
    merged = {**task_cls.trick_defaults.get(card.name, {}), **(given or {})}
    try:
        resolved = card.resolve(merged, path, task_cls.capabilities)
    except ParamError as exc:
        return {}, [str(exc)]
    sps = task_cls.step_samples(params, train)
    context = CheckContext(task_cls.name, task_cls.capabilities, train, params, sps, count_evaluations(train, sps))
    problems = []
    for msg in card.problems(resolved, context):
        head = msg.split(":", 1)[0]
        problems.append(f"{path}.{msg}" if head in card.param_map else f"{path}: {msg}")
    return resolved, problems


def _parse_tricks(
    task_cls: Any,
    raw: Any,
    path: str,
    problems: list[str],
    params: dict[str, Any],
    train: dict[str, Any],
    design: str,
) -> dict[str, dict[str, Any]]:
    from tricks.binding import arm_conflicts
    from tricks.registry import cards

    if raw is None:
        return {}
    allowed_forms = "a list of trick names or a mapping trick -> parameters"
    if isinstance(raw, list):
        if not all(isinstance(x, str) for x in raw):
            problems.append(f"{path}: {raw!r} is not allowed; allowed: {allowed_forms}")
            return {}
        repeated = sorted({x for x in raw if raw.count(x) > 1})
        if repeated:
            problems.append(f"{path}: {', '.join(repeated)} listed more than once; allowed: each trick once")
            return {}
        raw = dict.fromkeys(raw)
    if not isinstance(raw, dict):
        problems.append(f"{path}: {raw!r} is not allowed; allowed: {allowed_forms}")
        return {}
    registry = cards()
    applicable = applicable_tricks(task_cls)
    out: dict[str, dict[str, Any]] = {}
    for trick, given in raw.items():
        trick = str(trick)
        if trick not in registry:
            hint = did_you_mean(trick, list(registry))
            problems.append(
                f"{path}.{trick}: unknown trick; allowed: {', '.join(sorted(registry))}"
                + (f" ({hint})" if hint else "")
            )
            continue
        if trick not in applicable:
            problems.append(
                f"{path}.{trick}: trick {trick!r} does not apply to task {task_cls.name!r}; "
                f"tricks that apply: {', '.join(applicable)}"
            )
            continue
        if given is not None and not isinstance(given, dict):
            problems.append(f"{path}.{trick}: {given!r} is not allowed; allowed: a mapping of parameters, or empty")
            continue
        resolved, trick_problems = resolve_trick(task_cls, registry[trick], given, f"{path}.{trick}", params, train)
        problems.extend(trick_problems)
        if not trick_problems:
            out[trick] = resolved
    if design != "one_at_a_time" and len(out) > 1:
        # leave_one_out trains all tricks in one arm; a two-level factorial (full, or fractional of
        # resolution ≥ III) has every pair of tricks on together in some arm
        for conflict in arm_conflicts(registry[t] for t in out):
            problems.append(
                f"{path}: design {design!r} would train them in one arm: {conflict}; allowed: design one_at_a_time, "
                "or only one of them in this task block (another block of the same task can hold the other)"
            )
    return out
