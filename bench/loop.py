"""The one training loop. Every task and every trick combination trains through :func:`train`.

Read it top to bottom: the order in which tricks act is written here, not hidden in
callbacks. The task supplies model, batches, loss and evaluation (and applies its own
task-role tricks inside ``batch``/``loss``/``evaluate``); this loop asks the run's trick set
(:class:`tricks.binding.TrickSet`) for the object of each of its named points — never for a
trick by name — and calls it at a visible place:

    build:                micro_batches role → samples per step; optimizer_groups role →
                          optimizer; evaluated_weights role; bn_statistics role
    per optimizer step:   k micro-batches (micro_batches role: loss / k) → divergence check →
                          gradient norm (+ optional clipping) → optimizer step →
                          task.after_optimizer_step → evaluated_weights.after_step →
                          [evaluate: training weights as candidates → evaluated weights →
                          bn_statistics recalibration] → [checkpoint]

Gradients: for a task that declares ``dense_grads`` (every parameter gets a gradient every
step) they live in one flat buffer (``bench.gradbuffer``), so the per-step gradient norm is one
kernel and zeroing replaces ``zero_grad(set_to_none=True)`` — the same numbers as per-parameter
gradients, at less than a bare loop's gradient handling costs (``bench perf``).

Budgets and intervals are counted in samples. Randomness comes from the run's seed
bundle through named per-step streams, so a run resumed from its checkpoint at step t
computes exactly what the uninterrupted run computes (CPU, atol=0): the checkpoint holds
model, optimizer, trick and task state plus the metric history, and nothing else is needed.

Seed-vectorized groups (``bench run --vectorize-seeds S``, :func:`train_group`): S seeds of one arm
train through this same loop in one process — :func:`_loop` is written once for S members (a run
alone is S = 1); only the step's arithmetic differs (:class:`_OneRun` for one run, :class:`_Group`
for S seeds at once), behind the three calls ``begin``, ``forward_backward``, ``step_optimizer``.
Every seed is a full run of its own — its own task
instance (data, environment, replay buffer, target network) built from its own seed bundle, its own
model built under its own ``init`` stream, its own evaluated-weights object (per-seed EMA, post-hoc
EMA, periodic or checkpoint averaging state), history, divergence check, evaluations, run folder,
checkpoint and ``result.json``. What the seeds share is the arithmetic of a step: their weights are
slices of stacked tensors (a leading seed dimension; each seed's ``nn.Module`` holds *views* of its
slice, so everything that reads a model — the tricks, ``batch``, evaluation — reads that seed's
weights), one ``torch.func.vmap`` of ``functional_call`` computes every seed's loss and gradients,
and one optimizer steps the stacked tensors (Adam/AdamW/SGD are element-wise: S independent
optimizers). Gradient norms and clipping are per seed. A seed that diverges is finished as its run
alone would be; its slice keeps computing (on its last batch) and is ignored, so the others' numbers
do not depend on it.

Per-seed numbers equal the same seed trained alone within ``VECTORIZED_TOLERANCE`` (relative; final
metrics ``VECTORIZED_METRIC_TOLERANCE``), tested on both tasks: a batched matrix product may sum in
another order than one run's. Measured on this CPU (torch 2.14.1, one thread): toy_diffusion's
seeds are bit-identical to their runs alone in every recorded number (losses, gradient norms — the
seed-major gradient buffer gives each seed the same BLAS dot as its run alone, ``SeedFlatGrads`` —
weights, metrics); rl_policy's differ in the last bits from the first step (its small input layer's
weight gradient, a batched product of another shape), ~1e-7 relative after 64 steps and up to
~1e-4 after 1,000 — a greedy policy amplifies differences, and a near tie of its argmax can send a
seed down another trajectory (the evaluation returns were equal in every run measured). Within a
group, numbers are deterministic and do not
depend on which other seeds are in the group (CPU, tested): a group interrupted at any step and
re-launched computes exactly, bit for bit, what the uninterrupted group computes. Checkpoints are
per seed, written together at the group's checkpoint points, in the format of a run alone (the
seed's slice of weights and optimizer state); members found at different steps when a group
resumes (a kill between two members' writes, a checkpoint set aside) train as separate groups.

What can be vectorized (:func:`vectorize_problems`, checked before anything is written): a task
that declares ``Task.vectorizable`` (``loss`` reads only the model, the batch and configuration
every seed shares: no per-seed state, no random draws, no side effects; ``batch`` may use the
model and anything of its own seed) and whose settings its ``Task.vectorize_problems`` accepts;
every loop role but ``bn_statistics``; no ``compile``/``channels_last``/``autocast``.

The CIFAR autoencoder does not declare ``vectorizable`` and is rejected by name. What it would need:
its BatchNorm running statistics are state that every training forward updates, so the stacked
buffers would have to be trained state of the group (``functional_call`` under ``vmap`` does update
batched buffers in place, per seed) that checkpoints, EMA buffer policies and resumes carry per
seed; ``precise_bn`` and the BN recalibration of averaged weights would run per seed on each
member's own batches; prioritized replay's priority update would have to leave ``loss`` (a side
effect per seed); and ``vmap`` turns its convolutions into grouped convolutions, whose speed on CPU
is unmeasured — its step is compute-bound already (a run keeps a core busy), so the gain would be
small next to the tiny MLP tasks, whose steps are dispatch-bound.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from bench import checkpoints, store
from bench.gradbuffer import FlatGrads, SeedFlatGrads
from bench.grid import Cell
from bench.memory import PeakMemory
from bench.seeds import SeedBundle
from bench.stability import stability_metrics
from experiments.base import MicroBatch, Task
from experiments.registry import get_task
from tricks import accumulation
from tricks.binding import BNStatistics, EvaluatedWeights, TrickSet
from tricks.card import BuildContext
from tricks.precise_bn import PreciseBN
from tricks.registry import REGISTRY

__all__ = [
    "VECTORIZED_TOLERANCE",
    "RunContext",
    "TrainState",
    "build_task",
    "train",
    "train_cell",
    "train_group",
    "train_group_cells",
    "vectorize_problems",
]

BN_RECALIBRATION_BATCHES = 16  # when averaged weights need fresh BN statistics and no bn_statistics trick is on
GLOBAL_SEED_CHUNK_STEPS = 1024  # the loop derives the per-step global-RNG seeds this many steps at a time
CHECKPOINT_FORMAT = 2  # 2: trick state under its role ("evaluated_weights"), not under trick names
#: a seed trained in a vectorized group against the same seed trained alone (CPU, float32, the tests' tiny runs
#: of up to 64 steps): losses, gradient norms and final weights agree to this relative tolerance, final metrics
#: to ``VECTORIZED_METRIC_TOLERANCE`` (measured: 0 on toy_diffusion, ≤ 2e-7 on rl_policy; the margin is for
#: other CPUs' kernels; see the module docstring for longer runs)
VECTORIZED_TOLERANCE = 1e-4
VECTORIZED_METRIC_TOLERANCE = 1e-3


@dataclass
class RunContext:
    """How to run (never part of the config or the run_id).

    ``stop`` is polled at every step boundary: when it returns True the run checkpoints
    and returns status ``interrupted`` (Ctrl-C, SLURM preemption). ``max_steps`` stops
    after that many optimizer steps in this call (tests use it to interrupt at a chosen
    step). ``threads`` defaults to 1 on every executor: CPU kernels may sum in a different order
    with another thread count, so a run resumed elsewhere stays bit-exact only if this is equal
    (grids get their parallelism from running one run per core).
    ``on_progress(steps_done, total_steps, loss)`` is called at most every ``progress_interval_s``.
    ``tracker`` mirrors metrics (e.g. wandb); it may fail silently.
    """

    device: str = "cpu"
    threads: int | None = 1  # torch CPU threads; results are bit-identical only for equal thread counts
    stop: Callable[[], bool] | None = None
    max_steps: int | None = None
    on_progress: Callable[[int, int, float], None] | None = None
    progress_interval_s: float = 0.5
    tracker: Any = None
    code_version: str = "unknown"


@dataclass
class TrainState:
    """Everything that a checkpoint restores besides module/optimizer tensors."""

    step: int = 0  # next optimizer step to run
    train_s: float = 0.0
    eval_s: float = 0.0
    peak_mem_bytes: int = 0
    resumes: int = 0
    vectorized_seeds: int = 1  # seeds in the group that last trained it (1: trained alone)


def _build_optimizer(model: nn.Module, cfg: dict[str, Any], grouping: Any) -> torch.optim.Optimizer:
    """The optimizer; ``grouping`` is the optimizer_groups role's object (None: one group, every parameter)."""
    wd = cfg["weight_decay"]
    if grouping is not None:
        groups = grouping.param_groups(model, wd)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": wd}]
    # foreach: the multi-tensor update, bit-identical to the per-parameter loop that is torch's CPU default and
    # 5-25 % cheaper (`bench perf`); the fused kernels are faster still but move last bits, so they are not used
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["momentum"], 0.999), foreach=True)
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], foreach=True)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a checkpoint's optimizer state; the update stays the multi-tensor one (a checkpoint written
    before it was chosen carries ``foreach: None`` in its groups — the same numbers, the slower loop)."""
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["foreach"] = True


def _lr_factor(cfg: dict[str, Any], samples: int) -> float:
    """Learning-rate multiplier at ``samples`` seen: linear warmup, then constant or cosine."""
    warm = cfg["warmup_samples"]
    if warm and samples < warm:
        return (samples + 1) / warm
    if cfg["lr_schedule"] == "cosine":
        progress = min(1.0, (samples - warm) / max(1, cfg["budget_samples"] - warm))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def _crossed(step: int, samples_per_step: int, every: int) -> bool:
    """True when optimizer step ``step`` (0-based) crosses a multiple of ``every`` samples."""
    return (step + 1) * samples_per_step // every > step * samples_per_step // every


def _seed_global_rng(seed: int, device: torch.device) -> None:
    """Re-seed torch's global RNG of the CPU (and of ``device`` when it is a GPU) to ``seed``.

    Same generator states as ``torch.manual_seed(seed)`` for every device the run uses, at a
    fraction of the cost: on a build with CUDA support but CUDA not initialized (any CPU run),
    ``torch.manual_seed`` formats the Python stack on every call to queue a lazy CUDA seed
    (~0.1-2 ms depending on stack depth), more than a whole step of the tiny tasks.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ].manual_seed(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)  # other accelerators: the generic (slower) path


def _grad_norm_(params: list[nn.Parameter], max_norm: float | None, uniform: bool) -> torch.Tensor:
    """Total 2-norm of the gradients; with ``max_norm`` also clips them in place to that norm.

    Without clipping only the norm is computed: ``clip_grad_norm_(max_norm=inf)`` would also
    multiply every gradient by 1.0 (an extra pass over all gradients that changes no bit).
    ``uniform`` (all parameters on one device with one dtype): the norm is computed with the
    same kernels ``get_total_norm`` uses for a single device/dtype group (identical bits),
    without its per-call grouping (~10 µs, 1% of a tiny task's step).
    """
    if max_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not uniform or not grads:
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def build_task(config: dict[str, Any], streams: SeedBundle, device: torch.device) -> tuple[Task, BuildContext]:
    """The task of a resolved run config, given the run's tricks (task-role objects built from their cards).

    Returns the task and the build context the loop's own roles are built with. Used by the loop,
    ``bench perf`` and tests that drive a task by hand.
    """
    task_cls = get_task(config["task"])
    context = BuildContext(task_cls.name, task_cls.capabilities, task_cls.higher_is_better)
    tricks = TrickSet(config["tricks"], {n: REGISTRY[n] for n in config["tricks"]}, context)
    return task_cls(config["params"], tricks, streams, device, config["train"]), context


def _compact(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every tensor that views a larger storage cloned (others as they are).

    A group member's weights are views of the group's stacked tensors: saved as they are, each
    would carry the whole stack (``torch.save`` writes storages). A run alone has none: no copy.
    """
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()
        out[k] = v
    return out


def vectorize_problems(cells: Sequence[Cell]) -> list[str]:
    """Why ``cells`` cannot train as one seed-vectorized group, as ``"<field>: ..."`` messages (empty: they can).

    They must be distinct seeds of one arm (configs equal apart from the seed) of a task that declares
    ``Task.vectorizable``, with no ``bn_statistics`` trick, no performance option on, and settings the
    task's ``vectorize_problems`` accepts. Call before anything is written (``bench run`` does, for
    every group of a launch); :func:`train_group` calls it too.
    """
    if not cells:
        return ["cells: an empty group is not allowed; allowed: the seeds of one arm (at least one cell)"]
    ref = {k: v for k, v in cells[0].config.items() if k != "seed"}
    seeds = [c.seed for c in cells]
    if len(set(seeds)) != len(seeds):
        return [f"cells: seeds {seeds} repeat; allowed: distinct seeds of one arm"]
    for c in cells[1:]:
        other = {k: v for k, v in c.config.items() if k != "seed"}
        if other != ref or c.grid != cells[0].grid:
            diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k)) or ["grid"]
            return [
                f"cells: run {c.run_id} differs from run {cells[0].run_id} in {', '.join(diff)}; allowed: seeds of "
                "one arm (configs equal apart from the seed)"
            ]
    from experiments.registry import available_tasks

    task_cls = get_task(ref["task"])
    if not task_cls.vectorizable:
        able = [n for n in available_tasks() if get_task(n).vectorizable]
        why = (
            " (its model has BatchNorm running statistics, which would have to be per-seed state of the group)"
            if "batchnorm" in task_cls.capabilities
            else " (it does not declare Task.vectorizable)"
        )
        return [
            f"task: {ref['task']!r} cannot be seed-vectorized{why}; allowed: {', '.join(able) or 'none'} "
            "(train it without --vectorize-seeds, or leave it out of this launch with --tasks)"
        ]
    problems = []
    for option, off in (("compile", False), ("channels_last", False), ("autocast", "none")):
        if ref["train"].get(option, off) != off:
            problems.append(
                f"train.{option}: {ref['train'][option]!r} is not allowed when seed-vectorized; allowed: {off!r}"
            )
    for name in ref["tricks"]:
        if REGISTRY[name].role == "bn_statistics":
            problems.append(
                f"tricks.{name}: cannot be seed-vectorized (role bn_statistics: BatchNorm statistics per seed are not "
                "supported); allowed: train this arm without --vectorize-seeds"
            )
    problems += task_cls.vectorize_problems(ref["params"], ref["tricks"], ref["train"])
    return problems


def _bind_to_stack(model: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], i: int) -> None:
    """Make ``model``'s parameters and buffers views of slice ``i`` of the stacked ``params``/``buffers``.

    After this, ``model`` holds seed i's weights as the group trains them (no copy): whatever reads the
    model — tricks, ``batch``, ``after_optimizer_step``, evaluation, ``state_dict`` — sees that seed.
    Tied parameters stay tied (one view per stacked tensor).
    """
    first: dict[int, str] = {}
    for name, p in model.named_parameters():
        first.setdefault(id(p), name)
    for name, b in model.named_buffers():
        first.setdefault(id(b), name)
    views: dict[str, torch.Tensor] = {}
    for module in model.modules():
        for key, p in list(module._parameters.items()):
            if p is not None:
                name = first[id(p)]
                if name not in views:
                    views[name] = nn.Parameter(params[name].detach()[i], requires_grad=p.requires_grad)
                module._parameters[key] = views[name]
        for key, b in list(module._buffers.items()):
            if b is not None:
                name = first[id(b)]
                if name not in views:
                    views[name] = buffers[name][i]
                module._buffers[key] = views[name]


class _Skeleton:
    """A meta-device copy of the model whose parameters and buffers are set, per call, to one seed's tensors.

    Inside ``vmap`` each seed's loss calls this module with that seed's (batched) weights written straight
    into the modules' ``_parameters``/``_buffers`` slots — what ``torch.func.functional_call`` does, minus
    its per-call bookkeeping (~0.5 ms per call for a 14-tensor MLP: a tenth of a tiny group step). Tied
    weights share one name, so every slot of a name receives the same tensor.
    """

    def __init__(self, model: nn.Module) -> None:
        self.module = copy.deepcopy(model).to("meta")
        first: dict[int, str] = {}
        for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
            first.setdefault(id(t), name)
        self.param_slots: dict[str, list[tuple[dict[str, Any], str]]] = {}
        self.buffer_slots: dict[str, list[tuple[dict[str, Any], str]]] = {}
        for module in self.module.modules():
            for key, t in module._parameters.items():
                if t is not None:
                    self.param_slots.setdefault(first[id(t)], []).append((module._parameters, key))
            for key, t in module._buffers.items():
                if t is not None:
                    self.buffer_slots.setdefault(first[id(t)], []).append((module._buffers, key))
        self._meta = [(slot, key, slot[key]) for slots in (self.param_slots, self.buffer_slots)
                      for pairs in slots.values() for slot, key in pairs]  # fmt: skip

    def load(self, names: Sequence[str], tensors: Sequence[torch.Tensor], buffers: bool = False) -> None:
        """Put ``tensors`` (one per name, in order) into the skeleton's slots."""
        slots = self.buffer_slots if buffers else self.param_slots
        for name, t in zip(names, tensors):
            for slot, key in slots[name]:
                slot[key] = t

    def clear(self) -> None:
        """Back to the meta tensors (no reference to a call's tensors is kept)."""
        for slot, key, t in self._meta:
            slot[key] = t


def _flatten_batch(batch: Any) -> tuple[list[Any], Any]:
    """The leaves of one batch and its structure: a flat tuple, NamedTuple or dict directly (the tasks' batches;
    ~10x cheaper than a pytree walk, which costs ~10 % of a tiny group step), anything else through pytree."""
    if isinstance(batch, tuple) and not any(isinstance(v, (tuple, list, dict)) for v in batch):
        return list(batch), (type(batch), len(batch))
    if type(batch) is dict and not any(isinstance(v, (tuple, list, dict)) for v in batch.values()):
        return list(batch.values()), (dict, tuple(batch))
    leaves, spec = pytree.tree_flatten(batch)
    return leaves, spec


def _unflatten_batch(leaves: Sequence[Any], structure: Any) -> Any:
    """The batch of :func:`_flatten_batch`'s leaves and structure."""
    if isinstance(structure, tuple) and len(structure) == 2 and isinstance(structure[0], type):
        kind, shape = structure
        if kind is dict:
            return dict(zip(shape, leaves))
        return kind(leaves) if kind is tuple else kind(*leaves)
    return pytree.tree_unflatten(list(leaves), structure)


def _stack_batches(batches: list[Any]) -> tuple[list[Any], tuple[int | None, ...], Any]:
    """The seeds' batches as one: (leaves with a leading seed dimension, ``vmap`` in_dims per leaf, structure).

    Tensors are stacked (dim 0); anything else (``None``, numbers) must be equal in every seed's batch
    and is passed as it is (dim None). :func:`_unflatten_batch` rebuilds a seed's batch inside ``vmap``.
    """
    flat = [_flatten_batch(b) for b in batches]
    structure = flat[0][1]
    if any(other != structure for _, other in flat[1:]):
        raise ValueError("batch: the seeds' batches differ in structure; a vectorizable task returns one structure")
    leaves, dims = [], []
    for column in zip(*(f[0] for f in flat)):
        if isinstance(column[0], torch.Tensor):
            leaves.append(torch.stack(column))
            dims.append(0)
        else:
            if any(v != column[0] for v in column[1:]):
                raise ValueError(f"batch: a non-tensor field differs between seeds ({column[0]!r} vs others)")
            leaves.append(column[0])
            dims.append(None)
    return leaves, tuple(dims), structure


class _SeedGrad:
    """Seed ``i``'s slice of a stacked parameter's gradient, as the ``.grad`` that ``clip_grad_norm_`` reads."""

    __slots__ = ("i", "param")

    def __init__(self, param: torch.Tensor, i: int) -> None:
        self.param, self.i = param, i

    @property
    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g[self.i]


class _Trainer:
    """One run's objects; ``run`` is the loop. Built fresh for every call of :func:`train`.

    In a vectorized group (``member=True``) the same object is one seed of the group: the group
    (:class:`_Group`) re-points its model's tensors to the seed's slice of the stacked ones, then
    calls :meth:`build_roles` with the group's optimizer, and drives the steps; everything per run
    (task, evaluation, checkpoints, result) stays here.
    """

    def __init__(self, cell: Cell, out_dir: Path, ctx: RunContext, mem: PeakMemory, member: bool = False) -> None:
        self.cell, self.out_dir, self.ctx, self.mem = cell, out_dir, ctx, mem
        cfg = cell.config
        self.train_cfg: dict[str, Any] = cfg["train"]
        self.device = torch.device(ctx.device)
        self.streams = SeedBundle(cell.seed)
        # the tricks that are on: task-role objects are built now (the task asks for them by name)
        self.task, self.context = build_task(cfg, self.streams, self.device)
        self.tricks: TrickSet = self.task.trickset
        self.metric, self.higher_is_better = self.task.metric, self.task.higher_is_better
        with torch.random.fork_rng(devices=[]):  # the model is built on the CPU, from the CPU generator
            torch.default_generator.manual_seed(self.streams.seed_for("init"))  # = torch.manual_seed's CPU state
            self.model = self.task.build_model().to(self.device)
        # the optimizer state a checkpoint holds, and how a checkpoint's is restored (a group member: its slice)
        self.optimizer_state: Callable[[], dict[str, Any]] = lambda: self.optimizer.state_dict()
        self.load_optimizer_state: Callable[[dict[str, Any]], None] = lambda sd: _load_optimizer_state(
            self.optimizer, sd
        )
        if not member:
            self.mem.rebase()  # count what training adds (optimizer, trick state, activations), not imports or data
            self.build_roles(None)

    def build_roles(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Performance options, then the loop's roles in their order; ``optimizer``: a group's (else built here)."""
        context = self.context
        # performance options (all off by default; off = the plain eager fp32 path, unchanged results)
        if self.train_cfg["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        # the module the task's batch/loss code calls; parameters are shared with self.model
        self.train_model: nn.Module = torch.compile(self.model) if self.train_cfg["compile"] else self.model
        self.autocast_dtype = torch.bfloat16 if self.train_cfg["autocast"] == "bf16" else None

        # the loop's roles, built in this order (each may need what the previous one fixed)
        # micro_batches: the same batch as k micro-batches of batch/k, loss / k, one optimizer step
        micro = self.tricks.build_role("micro_batches", context)
        self.k = micro.micro_batches if micro is not None else 1
        self.micro_sizes = (
            micro.split(self.train_cfg["batch_size"]) if micro is not None else [self.train_cfg["batch_size"]]
        )
        self.samples_per_step = sum(self.task.samples_per_micro_batch(m) for m in self.micro_sizes)
        self.total_steps = max(1, math.ceil(self.train_cfg["budget_samples"] / self.samples_per_step))
        # optimizer_groups: the optimizer's parameter groups (a group's optimizer was built from the same role)
        if optimizer is None:
            grouping = self.tricks.build_role("optimizer_groups", context)
            optimizer = _build_optimizer(self.model, self.train_cfg, grouping)
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # evaluated_weights: which weights every evaluation sees; bn_statistics: their BN recalibration
        weights_context = replace(context, model=self.model, samples_per_step=self.samples_per_step)
        self.evaluated: EvaluatedWeights | None = self.tricks.build_role("evaluated_weights", weights_context)
        self.bn_statistics: BNStatistics | None = self.tricks.build_role("bn_statistics", context)
        self.state = TrainState()
        self.history: dict[str, Any] = {
            "train": {"step": [], "samples": [], "loss": [], "grad_norm": [], "lr": []},
            "eval": [],
        }
        self._eval_copy: nn.Module | None = None
        self.flat: FlatGrads | None = None  # the flat gradient buffer, once adopted (see run)

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def ckpt_path(self) -> Path:
        return self.out_dir / store.CHECKPOINT

    def check_grads(self) -> None:
        """Raise if code replaced or unset a gradient the flat buffer holds (the steps since then were wrong).

        Called before anything leaves the run: evaluation, checkpoint, result.
        """
        if self.flat is not None and not self.flat.attached():
            raise RuntimeError(
                f"task {self.task.name}: a parameter's .grad was replaced or unset during training (e.g. a "
                "zero_grad(set_to_none=True) inside batch/loss), so the loop's flat gradient buffer no longer "
                "holds it; such a task must not declare dense_grads"
            )

    def save_checkpoint(self) -> None:
        """Write the run's latest checkpoint (``bench.checkpoints.save``): the previous one is kept as
        ``checkpoint.prev.pt`` until the new one is complete, so a kill at any moment leaves a good one."""
        self.check_grads()
        payload = {
            "format": CHECKPOINT_FORMAT,
            "run_id": self.cell.run_id,
            "model": _compact(self.model.state_dict()),
            "optimizer": self.optimizer_state(),
            "evaluated_weights": self.evaluated.state_dict() if self.evaluated is not None else None,
            "task": self.task.state_dict(),
            "history": self.history,
            "state": vars(self.state),
        }
        self.state.peak_mem_bytes = max(self.state.peak_mem_bytes, self.mem.read_peak())
        checkpoints.save(self.out_dir, payload)
        self._write_curves()

    def maybe_resume(self) -> None:
        """Resume from the newest usable checkpoint, at the start of every launch of the run.

        Deletes the ``.tmp`` files a killed writer left. A checkpoint that cannot be read, fails its
        digest, is of another format or run, or cannot be restored is set aside (``quarantine/``) and the
        previous one is tried, then a clean restart; ``recovery.json`` records why (``bench status``).
        """
        checkpoints.remove_stale_tmp(self.out_dir)
        resume = checkpoints.Resume(self.out_dir, self.cell.run_id, CHECKPOINT_FORMAT, self.device)
        fresh: dict[str, Any] | None = None

        def restore(payload: dict[str, Any]) -> None:
            self.model.load_state_dict(payload["model"])
            self.load_optimizer_state(payload["optimizer"])
            if self.evaluated is not None:
                self.evaluated.load_state_dict(payload["evaluated_weights"])
            self.task.load_state_dict(payload["task"])
            self.state = TrainState(**payload["state"])
            self.history = payload["history"]

        for name, payload in resume:
            if fresh is None:  # the untouched state, to undo a restore that fails half-way
                fresh = copy.deepcopy(
                    {
                        "model": _compact(self.model.state_dict()),
                        "optimizer": self.optimizer_state(),
                        "evaluated_weights": self.evaluated.state_dict() if self.evaluated is not None else None,
                        "task": self.task.state_dict(),
                        "state": vars(self.state),
                        "history": self.history,
                    }
                )
            try:
                restore(payload)
            except Exception as exc:
                restore(copy.deepcopy(fresh))
                resume.reject(name, f"{name} cannot be restored ({type(exc).__name__}: {str(exc)[:160]})")
                continue
            self.state.resumes += 1
            resume.finish(f"resumed from {name} at step {self.state.step}")
            return
        if resume.problems:  # nothing usable: the earlier attempt's curves go aside with its checkpoints
            resume.set_aside_leftovers()
        resume.finish("restarted from scratch")

    # --- evaluation -----------------------------------------------------------------------
    def _evaluate_weights(
        self, weights: nn.Module | dict[str, torch.Tensor], recompute_bn: bool, final: bool, recalibrate: bool = True
    ) -> tuple[dict[str, float], nn.Module]:
        """Metrics of ``weights`` (a module or a state dict) and the module that was evaluated.

        Training weights are never touched: state dicts, and modules whose BatchNorm statistics are
        recomputed (the bn_statistics trick, or ``recompute_bn`` of averaged weights), are evaluated
        in a copy of the model. ``recalibrate=False`` evaluates without the bn_statistics trick.
        """
        bn = self.bn_statistics if recalibrate else None
        if isinstance(weights, nn.Module) and bn is None and not recompute_bn:
            eval_model = weights
        else:
            if self._eval_copy is None:
                self._eval_copy = copy.deepcopy(self.model)
                for p in self._eval_copy.parameters():
                    p.grad = None  # deepcopy copies gradients (the flat buffer's views); evaluation needs none
            eval_model = self._eval_copy
            eval_model.load_state_dict(weights.state_dict() if isinstance(weights, nn.Module) else weights)
        if _has_bn(eval_model) and (bn is not None or recompute_bn):
            recal = bn if bn is not None else PreciseBN(BN_RECALIBRATION_BATCHES)
            recal.recalibrate(eval_model, self.task.bn_batches(), self.task.bn_forward)
        was_training = eval_model.training
        eval_model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(eval_model, final)
        eval_model.train(was_training)
        return {k: float(v) for k, v in metrics.items()}, eval_model

    def evaluate(self, step: int, final: bool) -> dict[str, float]:
        """Evaluate the weights the evaluated_weights trick chooses (the training weights when none is on).

        A trick that takes candidates (checkpoint averaging) is offered the training weights with
        their metric at every evaluation — at the final one too, before it chooses, with the metric
        measured the way the intermediate evaluations measure it so candidates compare fairly.
        At the final evaluation ``raw_<metric>`` records the training weights as they are whenever
        something else was evaluated (other weights, or recalibrated BN statistics).
        """
        self.check_grads()
        chooser = self.evaluated
        if chooser is not None and chooser.takes_candidates:
            weights, recompute = chooser.weights(self.model, final=False)
            if final or weights is not self.model or recompute:
                live, _ = self._evaluate_weights(self.model, False, final=False)
                chooser.candidate(self.model, live.get(self.metric), step)
            else:  # the intermediate evaluation is of the training weights: they are the candidate
                metrics, used = self._evaluate_weights(self.model, False, final)
                chooser.candidate(self.model, metrics.get(self.metric), step)
                return metrics
        weights, recompute = chooser.weights(self.model, final) if chooser is not None else (self.model, False)
        metrics, used = self._evaluate_weights(weights, recompute, final)
        if final:
            self._final_task_metrics = dict(metrics)  # the task's own numbers, before the loop adds raw_<metric>
            if used is not self.model and self.metric in metrics:
                raw, _ = self._evaluate_weights(self.model, False, final, recalibrate=False)
                metrics[f"raw_{self.metric}"] = raw[self.metric]
            self._final_eval_model = used
        return metrics

    def _curve_point(self, final_metrics: dict[str, float]) -> dict[str, float]:
        """The last point of the learning curve: the final evaluated weights measured the way every
        intermediate evaluation measures (``final=False``; a task may use a larger sample at the final
        evaluation, a different estimator that would make every curve jump at its last point). The
        primary metric's value at the final evaluation stays in result.json. When the task says its final
        evaluation measured those numbers already (:meth:`Task.intermediate_from_final`), no second evaluation."""
        used = getattr(self, "_final_eval_model", None)
        if used is None:
            return final_metrics
        derived = self.task.intermediate_from_final(dict(self._final_task_metrics))
        if derived is not None:
            return derived
        metrics, _ = self._evaluate_weights(used, False, final=False, recalibrate=False)
        return metrics

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Resume if there is a checkpoint, then train through :func:`_loop` (a run alone: one member)."""
        self.maybe_resume()
        return _loop([self], _OneRun(self))[0]

    def _track(self, step: int, samples: int, loss: float, metrics: dict[str, float]) -> None:
        if self.ctx.tracker is not None:
            self.ctx.tracker.log(
                step, {"samples": samples, "train/loss": loss, **{f"eval/{k}": v for k, v in metrics.items()}}
            )

    # --- results ---------------------------------------------------------------------------
    def _write_curves(self) -> None:
        tr = self.history["train"]
        lines = ["step,samples,loss,grad_norm,lr"]
        lines += [
            f"{s},{n},{loss!r},{g!r},{lr!r}"
            for s, n, loss, g, lr in zip(tr["step"], tr["samples"], tr["loss"], tr["grad_norm"], tr["lr"])
        ]
        store.atomic_write_text(self.out_dir / "train.csv", "\n".join(lines) + "\n")
        evals = self.history["eval"]
        keys = ["step", "samples", *sorted({k for e in evals for k in e} - {"step", "samples"})]
        rows = [",".join(keys)] + [",".join(repr(e.get(k, float("nan"))) for k in keys) for e in evals]
        store.atomic_write_text(self.out_dir / "curve.csv", "\n".join(rows) + "\n")

    def _finish(self, diverged_step: int | None, last_loss: float) -> dict[str, Any]:
        self.check_grads()
        evals = self.history["eval"]
        final = getattr(self, "_final_metrics", None) or (evals[-1] if evals else {})
        final = final if diverged_step is None else {}
        # the best metric during training: the intermediate evaluations and the final one (as measured for result.json)
        metric_values = [e[self.metric] for e in evals[: -1 if final else None] if self.metric in e]
        metric_values += [final[self.metric]] if self.metric in final else []
        self.state.peak_mem_bytes = max(self.state.peak_mem_bytes, self.mem.read_peak())
        samples = self.history["train"]["samples"][-1] if self.history["train"]["samples"] else 0
        result = {
            "run_id": self.cell.run_id,
            "status": store.RunStatus.DIVERGED if diverged_step is not None else store.RunStatus.COMPLETED,
            "diverged_step": diverged_step,
            "metric": {k: v for k, v in final.items() if k not in ("step", "samples")}
            | ({self.metric: float("nan")} if diverged_step is not None else {}),
            "primary_metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "metric_directions": dict(self.task.metric_directions),  # the report reads them here, not from the task
            "stability": stability_metrics(
                self.history["train"]["loss"],
                self.history["train"]["grad_norm"],
                metric_values,
                self.higher_is_better,
                diverged_step,
            )
            | {"final_train_loss": last_loss},
            "cost": {
                "samples": samples,
                "steps": len(self.history["train"]["step"]),
                "train_s": self.state.train_s,
                "eval_s": self.state.eval_s,
                "train_s_per_sample": self.state.train_s / max(1, samples),
                "peak_mem_mb": self.state.peak_mem_bytes / 2**20,
                "peak_mem_mb_per_sample": self.state.peak_mem_bytes / 2**20 / max(1, self.train_cfg["batch_size"]),
                "resumes": self.state.resumes,
                "device": str(self.device),
                "threads": torch.get_num_threads(),
                "vectorized_seeds": self.state.vectorized_seeds,
            },
        }
        self._write_curves()
        if diverged_step is None and getattr(self, "_final_eval_model", None) is not None:
            buf = io.BytesIO()
            torch.save(_compact(self._final_eval_model.state_dict()), buf)
            store.atomic_write_bytes(self.out_dir / "final_model.pt", buf.getvalue())
        # size and SHA-256 of what the report reads: a later change to any of them marks the run damaged
        result["artefacts"] = store.artefact_manifest(self.out_dir)
        store.atomic_write_json(self.out_dir / store.RESULT, store.sealed(result))  # last: its presence = done
        checkpoints.remove(self.out_dir)
        return result


class _Group:
    """S seeds of one arm trained together: per-seed :class:`_Trainer` members, stacked weights, one optimizer.

    Built with every member's model re-pointed to its slice of the stack, then each member's roles
    (with the group's optimizer) and each member's resume; ``run`` trains the members through
    :func:`_loop`, the loop of a run alone, with this object as the step's arithmetic (as
    :class:`_OneRun` is for one run): every seed's batches, one vmapped forward/backward, per-seed
    gradient norms, one optimizer step of the stacked weights.
    """

    def __init__(
        self, cells: Sequence[Cell], out_dirs: Sequence[Path], ctxs: Sequence[RunContext], mem: PeakMemory
    ) -> None:
        self.members = [_Trainer(c, d, x, mem, member=True) for c, d, x in zip(cells, out_dirs, ctxs)]
        self.ctx = ctxs[0]
        self.mem = mem
        lead = self.members[0]
        self.skeleton = _Skeleton(lead.model)  # the module each seed's loss runs with that seed's weights
        models = [m.model for m in self.members]
        self.params = {
            n: torch.stack([dict(m.named_parameters())[n].detach() for m in models]).requires_grad_(p.requires_grad)
            for n, p in lead.model.named_parameters()
        }
        self.buffers = {
            n: torch.stack([dict(m.named_buffers())[n] for m in models]) for n, _ in lead.model.named_buffers()
        }
        for i, model in enumerate(models):
            _bind_to_stack(model, self.params, self.buffers, i)
        mem.rebase()  # once for the group: count what training adds
        # the optimizer over the stacked tensors: built from the lead's model (its groups, its order), then each
        # parameter swapped for its stacked tensor — so a member's slice of its state is a run alone's state
        grouping = lead.tricks.build_role("optimizer_groups", lead.context)
        self.optimizer = _build_optimizer(lead.model, lead.train_cfg, grouping)
        name_of = {id(p): n for n, p in lead.model.named_parameters()}
        for group in self.optimizer.param_groups:
            group["params"] = [self.params[name_of[id(p)]] for p in group["params"]]
        self.optimizer.state.clear()
        self._pending: list[dict[str, Any] | None] = [None] * len(self.members)
        for i, member in enumerate(self.members):
            member.build_roles(self.optimizer)
            member.optimizer_state = lambda i=i: self.member_optimizer_state(i)
            member.load_optimizer_state = lambda sd, i=i: self._pending.__setitem__(i, sd)
        self.trainable = [n for n, p in lead.model.named_parameters() if p.requires_grad]
        self._param_names, self._buffer_names = list(self.params), list(self.buffers)

    # --- optimizer state per seed -----------------------------------------------------------------
    def member_optimizer_state(self, i: int) -> dict[str, Any]:
        """Seed ``i``'s optimizer state in the format of a run alone: its slice of every per-parameter tensor.

        ``step`` (one count per parameter, equal for every seed) is shared; every other tensor of the state
        has the stacked parameter's leading seed dimension.
        """
        sd = self.optimizer.state_dict()
        state = {
            idx: {
                key: (v.clone() if key == "step" else v[i].clone()) if isinstance(v, torch.Tensor) else v
                for key, v in entry.items()
            }
            for idx, entry in sd["state"].items()
        }
        return {"state": state, "param_groups": copy.deepcopy(sd["param_groups"])}

    def load_pending_optimizer_state(self) -> None:
        """After every member resumed: stack their optimizer states into the group's optimizer."""
        pending = self._pending
        if all(p is None for p in pending):
            return
        if any(p is None for p in pending):  # train_group splits such groups by step before getting here
            raise RuntimeError("a group's members resumed at different points; split the group by step")
        first = pending[0]
        state: dict[Any, dict[str, Any]] = {}
        for idx, entry in first["state"].items():
            state[idx] = {}
            for key, v in entry.items():
                values = [p["state"][idx][key] for p in pending]
                if not isinstance(v, torch.Tensor):
                    state[idx][key] = v
                elif key == "step":
                    if any(not torch.equal(x, v) for x in values):
                        raise RuntimeError(f"optimizer state {idx}.step differs between the group's members")
                    state[idx][key] = v
                else:
                    state[idx][key] = torch.stack(values)
        _load_optimizer_state(self.optimizer, {"state": state, "param_groups": first["param_groups"]})
        self._pending = [None] * len(self.members)

    # --- the loop ---------------------------------------------------------------------------------
    def _vmapped_loss(self, dims: tuple[int | None, ...], structure: Any, mb: MicroBatch) -> Callable[..., Any]:
        """``vmap`` of one seed's loss over (weights, batch leaves), for batches of this structure.

        Weights and batch travel as flat tuples (vmap flattens its arguments; nested dicts cost a pytree
        walk per call); one seed's model is the meta skeleton called with that seed's weights.
        """
        names_p, names_b, skeleton, task = self._param_names, self._buffer_names, self.skeleton, self.members[0].task

        def seed_loss(params: tuple[torch.Tensor, ...], buffers: tuple[torch.Tensor, ...], leaves: tuple) -> Any:
            skeleton.load(names_p, params)
            skeleton.load(names_b, buffers, buffers=True)
            try:
                return task.loss(skeleton.module, _unflatten_batch(leaves, structure), mb)[0]
            finally:
                skeleton.clear()

        return torch.func.vmap(seed_loss, in_dims=(0, 0, dims), randomness="error")

    def _forward_fn(self, live: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
        """``forward(x)`` for :meth:`Task.batch_group`: every live seed's model on its own slice of ``x`` (one
        slice per live seed, in order), as one batched call without gradients."""
        n = len(self.members)
        names_p, names_b, skeleton = self._param_names, self._buffer_names, self.skeleton
        weights = tuple(p.detach() for p in self.params.values())
        buffers = tuple(self.buffers.values())

        def seed_forward(params: tuple[torch.Tensor, ...], bufs: tuple[torch.Tensor, ...], x: torch.Tensor) -> Any:
            skeleton.load(names_p, params)
            skeleton.load(names_b, bufs, buffers=True)
            try:
                return skeleton.module(x)
            finally:
                skeleton.clear()

        batched = torch.func.vmap(seed_forward, in_dims=(0, 0, 0), randomness="error")

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                if len(live) == n:
                    return batched(weights, buffers, x)
                full = x.new_zeros((n, *x.shape[1:]))  # a finished seed's slice computes on zeros, ignored
                full[live] = x
                return batched(weights, buffers, full)[live]

        return forward

    def run(self) -> list[dict[str, Any]]:
        """Train every member through :func:`_loop`, this group doing each step's arithmetic for all of them."""
        with warnings.catch_warnings():
            # the seed-major gradient buffer's views have other strides than the stacked parameters (by design:
            # row i must be seed i's run-alone layout); autograd accumulates into them in place all the same
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            return _loop(self.members, self)

    # --- the step's arithmetic (called by _loop) ----------------------------------------------------
    def begin(self) -> None:
        """Before the first step of this launch: training mode, the gradient buffer and per-seed views."""
        lead = self.members[0]
        self.weights, self.stacked_buffers = tuple(self.params.values()), tuple(self.buffers.values())
        trainable = [self.params[name] for name in self.trainable]
        self.clip = lead.train_cfg["grad_clip_norm"] or None
        self.uniform = len({(p.device, p.dtype) for p in trainable}) == 1
        task_cls = type(lead.task)
        # a task that builds all seeds' batches at once (Task.batch_group) is asked; else each seed's batch
        self.group_batch = getattr(task_cls.batch_group, "__func__", None) is not getattr(
            Task.batch_group, "__func__", None
        )
        # as a run alone: gradients in one buffer (seed-major: row i = seed i's run-alone layout) for tasks that
        # declare dense_grads, so each seed's norm is the same one BLAS call; else each seed's _grad_norm_
        self.flat_grads = (
            SeedFlatGrads.for_params([(n, self.params[n]) for n in self.trainable]) if lead.task.dense_grads else None
        )
        self.adopted = False
        self.seed_grads = [[_SeedGrad(p, i) for p in trainable] for i in range(len(self.members))]
        self.last_batches: list[list[Any]] = [[] for _ in self.members]  # a diverged seed's slice: its last batch
        for m in self.members:
            m.state.vectorized_seeds = len(self.members)
            m.model.train()
        self.skeleton.module.train()  # the module every seed's loss runs (in training mode, as a run's model)

    def forward_backward(
        self, mbs: list[MicroBatch], live: list[int], global_seeds: list[list[int]], offset: int
    ) -> tuple[list[float], list[float]]:
        """Every live seed's micro-batches (from its own task), one vmapped forward/backward per micro-batch for
        all seeds, then each seed's gradient norm (clipped as its run alone when clipping). Returns the losses
        and gradient norms of every member (a finished seed's slice computes on its last batch, ignored)."""
        members, k = self.members, len(mbs)
        lead = members[0]
        if self.group_batch:  # the task builds every live seed's batch at once (e.g. environments in lockstep)
            _seed_global_rng(global_seeds[live[0]][offset], lead.device)
            forward = self._forward_fn(live)
            task_cls = type(lead.task)
            per_micro = [task_cls.batch_group([members[i].task for i in live], forward, mb) for mb in mbs]
            for pos, i in enumerate(live):
                self.last_batches[i] = [batches[pos] for batches in per_micro]  # type: ignore[index]
        else:
            for i in live:
                m = members[i]
                _seed_global_rng(global_seeds[i][offset], m.device)
                self.last_batches[i] = [m.task.batch(m.model, mb) for mb in mbs]
        # the seeds are independent, so the gradient of the sum of their losses is each seed's own gradient
        loss_sum: torch.Tensor | None = None
        for j, mb in enumerate(mbs):
            leaves, dims, structure = _stack_batches([b[j] for b in self.last_batches])
            losses = self._vmapped_loss(dims, structure, mb)(self.weights, self.stacked_buffers, tuple(leaves))
            (accumulation.scale_loss(losses, k) if k > 1 else losses).sum().backward()
            loss_sum = losses.detach().float() if loss_sum is None else loss_sum + losses.detach().float()
        loss_values = [v / k for v in loss_sum.tolist()]  # type: ignore[union-attr]
        flat = self.flat_grads
        if flat is not None and not self.adopted:
            flat.adopt(lead.task.name)  # raises if a parameter got no gradient
            self.adopted = True
            for m in members:
                m.flat = flat  # each member checks it is still attached before anything leaves its run
        if flat is not None and self.clip is None:
            return loss_values, flat.norms()
        # each seed as its run alone: _grad_norm_ (clip_grad_norm_ when clipping) on its slices
        return loss_values, [float(_grad_norm_(g, self.clip, self.uniform)) for g in self.seed_grads]  # type: ignore[arg-type]

    def step_optimizer(self) -> None:
        """One optimizer step of the stacked weights (every seed's), then gradients zeroed."""
        _step_and_zero(self.optimizer, self.flat_grads)


class _OneRun:
    """The step's arithmetic of a run alone (one member): its micro-batches, forward/backward, gradient norm
    (one kernel on the flat buffer, or ``clip_grad_norm_`` when clipping) and optimizer step. :func:`_loop`
    calls it; :class:`_Group` is the same for S seeds at once."""

    def __init__(self, run: _Trainer) -> None:
        self.run = run
        self.optimizer = run.optimizer

    def begin(self) -> None:
        """Before the first step of this launch: training mode and the flat gradient buffer (adopted after the
        first backward)."""
        run = self.run
        named_params = [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named_params]
        self.clip = run.train_cfg["grad_clip_norm"] or None
        self.uniform = len({(p.device, p.dtype) for p in self.params}) == 1
        # gradients as views of one flat buffer (one-kernel norm and zeroing), for tasks whose every
        # parameter gets a gradient at every step; adopted after this launch's first backward
        self.flat = FlatGrads.for_params(named_params) if run.task.dense_grads else None
        self.fwd = run.train_model  # = model unless compiled
        self.autocast = (
            torch.autocast(run.device.type, dtype=run.autocast_dtype)
            if run.autocast_dtype is not None
            else contextlib.nullcontext()  # a disabled torch.autocast still costs µs per enter/exit
        )
        run.model.train()

    def forward_backward(
        self, mbs: list[MicroBatch], live: list[int], global_seeds: list[list[int]], offset: int
    ) -> tuple[list[float], list[float]]:
        """k micro-batches, each loss / k, gradients summed; then the gradient norm (clipped when clipping)."""
        run, fwd, k = self.run, self.fwd, len(mbs)
        task = run.task
        _seed_global_rng(global_seeds[0][offset], run.device)  # anything still on the global RNG
        loss_sum: torch.Tensor | None = None
        for mb in mbs:
            batch = task.batch(fwd, mb)
            with self.autocast:
                loss, _extra = task.loss(fwd, batch, mb)
            (accumulation.scale_loss(loss, k) if k > 1 else loss).backward()  # k = 1: no extra graph node
            # a float32 sum, as before from a float32 zero (0 + x == x bit for bit for any loss but -0.0)
            loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
        loss_value = float(loss_sum) / k  # type: ignore[arg-type]
        flat = self.flat
        if flat is not None and run.flat is None:
            flat.adopt(task.name)  # raises if a parameter got no gradient
            run.flat = flat
        if flat is not None and self.clip is None:
            return [loss_value], [flat.norm()]
        # clipping: clip_grad_norm_ (on the views when the buffer is used; the same bits)
        return [loss_value], [float(_grad_norm_(self.params, self.clip, self.uniform))]

    def step_optimizer(self) -> None:
        """One optimizer step, then gradients zeroed (the flat buffer in one kernel)."""
        _step_and_zero(self.optimizer, self.flat)


def _step_and_zero(optimizer: torch.optim.Optimizer, flat: FlatGrads | None) -> None:
    """``optimizer.step()``, then the gradients zeroed: the flat buffer in one kernel, else set to None."""
    optimizer.step()
    if flat is not None:
        flat.zero_()
    else:
        optimizer.zero_grad(set_to_none=True)


def _loop(members: list[_Trainer], arithmetic: _OneRun | _Group) -> list[dict[str, Any]]:
    """The training loop, for a run alone (one member) and for a seed-vectorized group (S members) alike.

    Per optimizer step, in this order: stop? (checkpoint every live member, ``interrupted``) → the
    per-step global-RNG seed → learning rate → the step's micro-batches, forward/backward and gradient
    norms (``arithmetic``: one run's, or one vmapped computation for every seed) → divergence check per
    member (a diverged member is finished as its run alone: this step not recorded) → optimizer step →
    per member: ``task.after_optimizer_step``, ``evaluated_weights.after_step``, history, tracker →
    [evaluate every live member] → [checkpoint every live member] → progress. Time is split evenly over
    the live members. Returns one result per member, in order.
    """
    lead = members[0]
    ctx, optimizer = lead.ctx, arithmetic.optimizer
    n = len(members)
    train_cfg, micro_sizes = lead.train_cfg, lead.micro_sizes
    k, sps, total_steps = lead.k, lead.samples_per_step, lead.total_steps
    eval_every, ckpt_every = train_cfg["eval_every_samples"], train_cfg["checkpoint_every_samples"]
    budget = train_cfg["budget_samples"]
    arithmetic.begin()
    results: list[dict[str, Any] | None] = [None] * n
    live = list(range(n))
    global_seeds: list[list[int]] = [[] for _ in members]
    seeds_from = lead.state.step
    offset = 0
    lr_factor = math.nan  # the learning rate is written into the optimizer only when it changes
    steps_this_call = 0
    last_progress = 0.0
    t0 = time.perf_counter()

    def account() -> None:  # the shared time since t0, split evenly over the live members
        nonlocal t0
        now = time.perf_counter()
        for i in live:
            members[i].state.train_s += (now - t0) / len(live)
        t0 = now

    stops = [m.ctx.stop for m in members if m.ctx.stop is not None]  # polled every step: a stop stops all
    max_steps = ctx.max_steps if ctx.max_steps is not None else math.inf
    for step in range(lead.state.step, total_steps):
        if steps_this_call >= max_steps or (stops and any([stop() for stop in stops])):
            account()
            for i in live:
                members[i].state.step = step
                members[i].save_checkpoint()
                results[i] = {"status": "interrupted", "step": step}
            return results  # type: ignore[return-value]
        offset = step - seeds_from
        if offset >= len(global_seeds[0]):
            seeds_from, offset = step, 0
            chunk_end = min(step + GLOBAL_SEED_CHUNK_STEPS, total_steps)
            global_seeds = [m.streams.seeds_for("global", step, chunk_end) for m in members]
        samples_before = step * sps
        factor = _lr_factor(train_cfg, samples_before)
        if factor != lr_factor:
            lr_factor = factor
            for group, base in zip(optimizer.param_groups, lead.base_lrs):
                group["lr"] = base * factor

        # micro_batches role: k micro-batches, each loss / k, gradients summed, one optimizer step
        progress = samples_before / budget
        mbs = [
            MicroBatch(step=step, index=j, count=k, size=size, progress=progress) for j, size in enumerate(micro_sizes)
        ]
        loss_values, norm_values = arithmetic.forward_backward(mbs, live, global_seeds, offset)
        if not (math.isfinite(sum(loss_values)) and math.isfinite(sum(norm_values))):  # some member diverged
            for i in [i for i in live if not (math.isfinite(loss_values[i]) and math.isfinite(norm_values[i]))]:
                account()
                live.remove(i)  # finished at this step, the step not recorded
                results[i] = members[i]._finish(diverged_step=step, last_loss=loss_values[i])
            if not live:
                return results  # type: ignore[return-value]
        arithmetic.step_optimizer()
        samples = (step + 1) * sps
        lr = optimizer.param_groups[0]["lr"]
        for i in live:
            m = members[i]
            m.task.after_optimizer_step(m.model, step)
            if m.evaluated is not None:
                m.evaluated.after_step(m.model, samples)  # once per optimizer step, never per micro-batch
            hist = m.history["train"]
            hist["step"].append(step)
            hist["samples"].append(samples)
            hist["loss"].append(loss_values[i])
            hist["grad_norm"].append(norm_values[i])
            hist["lr"].append(lr)
            if m.ctx.tracker is not None:  # the training curve of the mirror (strides and buffers itself)
                m.ctx.tracker.log_train(step, samples, loss_values[i], norm_values[i], lr)
        steps_this_call += 1
        last = step == total_steps - 1

        if _crossed(step, sps, eval_every) or last:
            account()
            for i in live:
                m = members[i]
                t_eval = time.perf_counter()
                metrics = m.evaluate(step, final=last)
                if last:  # result.json gets the final estimator; the curve keeps the intermediate one
                    m._final_metrics, metrics = metrics, m._curve_point(metrics)
                m.state.eval_s += time.perf_counter() - t_eval
                m.history["eval"].append({"step": step, "samples": samples, **metrics})
                m._track(step, samples, loss_values[i], metrics)
            t0 = time.perf_counter()
        if _crossed(step, sps, ckpt_every) and not last:
            account()
            for i in live:  # written together: every member's checkpoint at the same step
                members[i].state.step = step + 1
                members[i].save_checkpoint()
            t0 = time.perf_counter()
        if time.perf_counter() - last_progress > ctx.progress_interval_s or last:
            last_progress = time.perf_counter()
            for i in live:
                if members[i].ctx.on_progress is not None:
                    members[i].ctx.on_progress(step + 1, total_steps, loss_values[i])
    account()
    for i in live:
        m = members[i]
        m.state.step = total_steps
        hist = m.history["train"]["loss"]
        results[i] = m._finish(diverged_step=None, last_loss=hist[-1] if hist else float("nan"))
    return results  # type: ignore[return-value]


def write_config(cell: Cell, out_dir: Path, code_version: str, grid_tricks: list[str]) -> None:
    """``config.json``: the resolved config, the cell's identity, code version and fingerprint, seed bundle.

    Written when a run starts (never rewritten by a resume): the fingerprint is the code the run trains with
    (``bench.fingerprint``), which a later launch compares with its own to find stale runs.
    """
    from bench.fingerprint import run_fingerprint

    meta = cell.to_dict() | {
        "code_version": code_version,
        "fingerprint": run_fingerprint(cell.config),
        "seed_bundle": SeedBundle(cell.seed).as_dict(),
        "grid_tricks": grid_tricks,
    }
    store.atomic_write_json(out_dir / store.CONFIG, meta)


def train(cell: Cell, out_dir: Path, ctx: RunContext | None = None) -> dict[str, Any]:
    """Train one cell into ``out_dir``, resuming from its checkpoint if there is one.

    Returns the result dict (also written as ``result.json``), or ``{"status":
    "interrupted", "step": t}`` when stopped early (a checkpoint was written). A
    non-finite loss is a result (status ``diverged``), not an exception.
    """
    ctx = ctx or RunContext()
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / store.ERROR).unlink(missing_ok=True)  # a re-run of a crashed run starts clean
    with PeakMemory(torch.device(ctx.device)) as mem:
        trainer = _Trainer(cell, out_dir, ctx, mem)
        return trainer.run()


def train_cell(cell: Cell, out_dir: Path, ctx: RunContext | None = None) -> dict[str, Any]:
    """:func:`train`, but a crash is recorded as ``error.json`` (status failed) instead of raised."""
    try:
        return train(cell, out_dir, ctx)
    except Exception as exc:
        tb = traceback.format_exc()
        store.atomic_write_json(
            out_dir / store.ERROR, {"run_id": cell.run_id, "error": repr(exc), "traceback_tail": tb.splitlines()[-15:]}
        )
        return {"status": store.RunStatus.FAILED, "error": repr(exc)}


def train_group(
    cells: Sequence[Cell], out_dirs: Sequence[Path], ctxs: RunContext | Sequence[RunContext] | None = None
) -> list[dict[str, Any]]:
    """Train the seeds ``cells`` of one arm as one seed-vectorized group, each into its folder of ``out_dirs``.

    ``ctxs``: one :class:`RunContext` for all, or one per cell (their own ``on_progress``/``tracker``;
    ``device``, ``threads``, ``max_steps`` and ``progress_interval_s`` are the first one's, ``stop`` is
    polled for every member and stops the whole group). Each member resumes from its own checkpoint;
    members found at different steps train as separate groups, one after another. Returns one result per
    cell, in order, as :func:`train` returns it (``interrupted`` for every member when stopped: each wrote
    its checkpoint). Raises ``ValueError`` (naming the field) when the cells cannot train together
    (:func:`vectorize_problems`).
    """
    problems = vectorize_problems(cells)
    if problems:
        raise ValueError("; ".join(problems))
    if len(out_dirs) != len(cells):
        raise ValueError(f"out_dirs: {len(out_dirs)} folders for {len(cells)} cells; allowed: one per cell")
    if ctxs is None or isinstance(ctxs, RunContext):
        ctxs = [ctxs or RunContext()] * len(cells)
    if len(ctxs) != len(cells):
        raise ValueError(f"ctxs: {len(ctxs)} contexts for {len(cells)} cells; allowed: one, or one per cell")
    lead = ctxs[0]
    if lead.threads:
        torch.set_num_threads(lead.threads)
    for out_dir in out_dirs:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / store.ERROR).unlink(missing_ok=True)  # a re-run of a crashed run starts clean
    with PeakMemory(torch.device(lead.device)) as mem:
        group = _Group(cells, out_dirs, ctxs, mem)
        for member in group.members:
            member.maybe_resume()
        steps = [m.state.step for m in group.members]
        if len(set(steps)) == 1:
            group.load_pending_optimizer_state()
            return group.run()
    # members at different steps (a kill between two members' checkpoint writes, a checkpoint set aside, a
    # seed trained alone before): each step's members train as a group of their own, resumed afresh
    del group
    results: list[dict[str, Any] | None] = [None] * len(cells)
    for step in sorted(set(steps)):
        index = [i for i, s in enumerate(steps) if s == step]
        sub = train_group([cells[i] for i in index], [out_dirs[i] for i in index], [ctxs[i] for i in index])
        for i, res in zip(index, sub):
            results[i] = res
    return results  # type: ignore[return-value]


def train_group_cells(
    cells: Sequence[Cell], out_dirs: Sequence[Path], ctxs: RunContext | Sequence[RunContext] | None = None
) -> list[dict[str, Any]]:
    """:func:`train_group`, but a crash is recorded as ``error.json`` (status failed) in every member's folder
    that has no result yet, instead of raised. A ``ValueError`` from :func:`vectorize_problems` is raised:
    check groups before launching them."""
    problems = vectorize_problems(cells)
    if problems:
        raise ValueError("; ".join(problems))
    try:
        return train_group(cells, out_dirs, ctxs)
    except Exception as exc:
        tb = traceback.format_exc()
        results = []
        for cell, out_dir in zip(cells, out_dirs):
            result_path = Path(out_dir) / store.RESULT
            if result_path.exists():  # finished (e.g. diverged) before the group crashed: its result stands
                results.append(store.read_json(result_path))
                continue
            store.atomic_write_json(
                Path(out_dir) / store.ERROR,
                {"run_id": cell.run_id, "error": repr(exc), "traceback_tail": tb.splitlines()[-15:]},
            )
            results.append({"status": store.RunStatus.FAILED, "error": repr(exc)})
        return results
