"""The contract between a task and the training loop in ``bench/``.

A task supplies the model, the batches, the loss and the evaluation, and applies its own
data- and loss-level tricks (role ``task``: replay, patches, augmentation, conditioning
noise/dropout, Fourier encodings, feature matching, stratified sampling) inside
``batch``/``loss``/``evaluate`` at visible points, through the objects of its trick set
(``self.trickset.get("replay_buffer")``). The loop applies the tricks of its own roles (optimizer
groups, micro-batches, evaluated weights, BN statistics); they never appear in task code.

Which tricks apply to a task: the task-role tricks it lists in ``Task.tricks`` (it wires them),
and every loop-role trick whose role is in ``Task.loop_roles`` (see :meth:`Task.accepts`).
``Task.capabilities`` (e.g. ``"batchnorm"``) decide which trick parameters act on it.

Randomness: a task draws only from the ``streams`` it is given (see ``bench/seeds.py``):
``streams.generator(purpose, *index)`` returns a fresh ``torch.Generator`` for that
named stream, so e.g. ``streams.generator("data", mb.step, mb.index)`` is the same in every
arm of a seed and after a resume. Sub-streams of one purpose are named constants (an
``IntEnum`` of the task), not bare integers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from tricks.card import Param, TrickCard

if TYPE_CHECKING:
    from tricks.binding import TrickSet


@dataclass(frozen=True)
class MicroBatch:
    """Where a ``batch``/``loss`` call sits in training; built by the loop for every micro-batch.

    ``count`` is the number of micro-batches of this optimizer step (accumulation's k, else 1):
    tricks that act over a whole step (e.g. stratified draws across micro-batches) need it.
    """

    step: int  # optimizer step, 0-based
    index: int  # micro-batch within the step, 0-based
    count: int  # micro-batches in this step
    size: int  # samples (rows) in this micro-batch
    progress: float  # fraction of the sample budget done at the start of the step, in [0, 1)


class RandomStreams(Protocol):
    """What a task may ask of the run's seed bundle (implemented by ``bench.seeds.SeedBundle``)."""

    seed: int

    def seed_for(self, purpose: str, *index: int) -> int: ...

    def generator(self, purpose: str, *index: int, device: str | torch.device = "cpu") -> torch.Generator: ...

    def numpy(self, purpose: str, *index: int) -> np.random.Generator: ...


class Task(ABC):
    """One reference task. Subclasses set the class attributes and implement the methods.

    Lifecycle in one run: ``__init__`` (data prepared, deterministic in the seed) →
    ``build_model`` (called once, under the ``init`` stream) → per optimizer step and
    micro-batch: ``batch`` then ``loss`` → ``after_optimizer_step`` → periodically
    ``evaluate``. ``state_dict``/``load_state_dict`` carry the task's own mutable state
    (replay buffer, environment, target network) through checkpoints.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    #: task-role tricks this task wires into its own batch/loss/evaluate code (by name)
    tricks: ClassVar[tuple[str, ...]] = ()
    #: loop roles this task accepts: every trick of such a role applies (see tricks.card.ROLES)
    loop_roles: ClassVar[tuple[str, ...]] = ("optimizer_groups", "micro_batches", "evaluated_weights")
    #: what the task's model and data offer to trick parameters (``Param.needs``), e.g. "batchnorm"
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: task parameters, validated from the grid spec's ``params`` block
    params: ClassVar[tuple[Param, ...]]
    #: the primary accuracy metric (a key returned by ``evaluate``) and its direction
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool]
    #: direction of secondary metrics returned by ``evaluate`` (True = higher is better); the
    #: report falls back to the metric's name (``psnr`` higher, ``mse`` lower) and otherwise shows none
    metric_directions: ClassVar[dict[str, bool]] = {}
    #: defaults for the spec's ``train`` block (budget_samples, batch_size, lr, ...)
    train_defaults: ClassVar[dict[str, Any]]
    #: tricks' parameter defaults specific to this task, e.g. {"ema": {"half_life_samples": 500}}
    trick_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: True when every trainable parameter receives a gradient at every optimizer step, under every
    #: trick of ``tricks``: the loop may then keep gradients in one flat buffer (``bench.gradbuffer``)
    #: and never unset them. Checked on the first step of every run and for every cell of the
    #: applicability matrix by tests/test_trick_registry.py; leave False if unsure (always correct).
    dense_grads: ClassVar[bool] = False
    #: a seconds-long setting {"params": {...}, "train": {...}} for the registry-driven smoke tests
    tiny: ClassVar[dict[str, dict[str, Any]] | None] = None
    #: seed-vectorized execution (``bench run --vectorize-seeds S``; ``bench/loop.py``): True when S seeds of
    #: one arm can train as one vmapped model. Then ``loss`` must read only the model, the batch and settings
    #: every seed shares — no per-seed task state (compute e.g. a target network's values in ``batch``), no
    #: random draws (``vmap(randomness="error")`` enforces it), no side effects — and its batches must have
    #: the same structure and shapes in every seed. ``batch``, ``after_optimizer_step`` and ``evaluate`` run
    #: per seed on that seed's own task instance and model, as in a run alone. The model must have no
    #: BatchNorm statistics. Paths that break this for some settings are named by :meth:`vectorize_problems`.
    vectorizable: ClassVar[bool] = False
    #: plugin tasks: the task's own `bench check` regression grid (a spec file) and the folder of its baseline
    #: ``<name>.json`` (built-in tasks use experiments/grids/regression_<name>.yaml and results/baselines/)
    regression_spec: ClassVar[Path | None] = None
    regression_baselines: ClassVar[Path | None] = None

    @classmethod
    def accepts(cls, card: TrickCard) -> bool:
        """Whether the trick of ``card`` applies to this task (the one rule validation and ``bench list`` use).

        A task-role trick applies where the task lists it (or the card names the task in
        ``applies_to``); a loop-role trick wherever the task accepts its role, unless the card
        restricts itself to other tasks.
        """
        if card.role == "task":
            return card.name in cls.tricks or cls.name in card.applies_to
        return card.role in cls.loop_roles and (not card.applies_to or cls.name in card.applies_to)

    @classmethod
    def step_samples(cls, params: dict[str, Any], train: dict[str, Any]) -> int:
        """Budget samples one optimizer step consumes (default: the batch size); for validation.

        Must agree with what :meth:`samples_per_micro_batch` adds up to over a step's micro-batches.
        """
        return int(train["batch_size"])

    @classmethod
    def check(cls, params: dict[str, Any], tricks: dict[str, dict[str, Any]], train: dict[str, Any]) -> list[str]:
        """Cross-field problems of a resolved task block (called by spec validation), as messages."""
        return []

    @classmethod
    def vectorize_problems(
        cls, params: dict[str, Any], tricks: dict[str, dict[str, Any]], train: dict[str, Any]
    ) -> list[str]:
        """Settings of a resolved run config whose path cannot train seed-vectorized, as ``"<field>: ..."``
        messages (only asked of a task that declares :attr:`vectorizable`; called before a launch writes)."""
        return []

    def __init__(
        self,
        params: dict[str, Any],
        tricks: TrickSet,
        streams: RandomStreams,
        device: torch.device,
        train: dict[str, Any],
    ) -> None:
        self.p = params
        self.trickset = tricks  # the run's tricks that are on: task-role objects via .get(name)
        self.streams = streams
        self.device = device
        self.train_cfg = train  # the resolved ``train`` block (budget_samples, batch_size, ...)

    # --- model ------------------------------------------------------------------------
    @abstractmethod
    def build_model(self) -> nn.Module:
        """Create the trained model. Called once; the loop seeds torch's RNG from ``init``."""

    # --- training -----------------------------------------------------------------------
    def samples_per_micro_batch(self, micro_batch_size: int) -> int:
        """How many budget samples (images, transitions, points) one micro-batch consumes."""
        return micro_batch_size

    @abstractmethod
    def batch(self, model: nn.Module, mb: MicroBatch) -> Any:
        """The micro-batch ``mb`` (``mb.size`` samples of step ``mb.step``)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss of ``batch`` (not yet divided for accumulation) and extra per-step stats."""

    @classmethod
    def batch_group(
        cls, tasks: Sequence[Task], forward: Callable[[torch.Tensor], torch.Tensor], mb: MicroBatch
    ) -> list[Any] | None:
        """Seed-vectorized groups only: micro-batch ``mb`` of every seed at once (``tasks``: each seed's own
        task instance, in order), or None (the default) to have the loop call each seed's :meth:`batch`.

        For batches that act with the model (e.g. environments stepped in lockstep): ``forward(x)`` applies
        every seed's model to its own slice of ``x`` (leading seed dimension, one slice per task) in one
        batched call, without gradients. Each seed's batch must be what its :meth:`batch` would return from
        its own state and streams; the global RNG is not re-seeded per seed here (draw from named streams).
        """
        return None

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:  # noqa: B027 - optional hook
        """Called once after every optimizer step (e.g. a DQN target-network update)."""

    # --- evaluation ---------------------------------------------------------------------
    @abstractmethod
    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        """Metrics of ``model`` (already in eval mode). ``final`` = the last evaluation of the run."""

    def intermediate_from_final(self, final_metrics: dict[str, float]) -> dict[str, float] | None:
        """What ``evaluate(model, final=False)`` returns for the model that ``evaluate(model, final=True)`` just
        measured as ``final_metrics`` — when the final evaluation already measured it the same way (same data,
        same streams) — or None (the default) when it did not.

        The loop asks right after a run's final evaluation, for the learning curve's last point (measured like
        every intermediate point); None makes it evaluate the model once more. Optional: a task whose final
        evaluation uses a larger sample or other estimators keeps the default. ``tests/test_trick_registry.py``
        checks every task's answer against a real intermediate evaluation.
        """
        return None

    def bn_batches(self) -> Iterator[Any]:
        """Training inputs for BatchNorm recalibration (precise BN, averaged weights)."""
        raise NotImplementedError(f"task {self.name} has no BatchNorm batches")

    def bn_forward(self, model: nn.Module, batch: Any) -> Any:
        """How to call the model on one of ``bn_batches`` (default: ``model(batch)``)."""
        return model(batch)

    def render_outputs(self, model: nn.Module, path: Path) -> bool:
        """Optionally save a PNG of the model's outputs (reconstructions, samples); True if written."""
        return False

    # --- checkpointed state -------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The task's own mutable state (tensors and plain Python only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore ``state_dict``'s output after a resume."""
