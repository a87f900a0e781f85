"""Seed-vectorized training: S seeds of one arm of a tiny task in one process, as one batched model.

For tasks whose model is tiny, one run uses a CPU core or a GPU poorly: most of a step is
Python and kernel-launch overhead. Here the S seeds' models are stacked
(``torch.func.stack_module_state``) and one ``torch.func.vmap`` of ``functional_call`` computes
every seed's loss and gradients in one pass; one optimizer steps all of them (Adam/AdamW/SGD are
element-wise, so an optimizer over stacked tensors is S independent optimizers).

Randomness stays per seed: every seed has its own task instance built from its own seed bundle,
its model is built under its own ``init`` stream exactly as :func:`bench.loop.train` builds it,
and its batches are drawn by its own ``task.batch`` (with the global RNG re-seeded per seed and
step as the loop does) and only then stacked. The vmapped function draws no random numbers
(``randomness="error"`` enforces it). Per-seed results equal independent runs up to float
rounding: batched matrix products sum in another order than one run's (differences ~1e-7).

Supported: tasks in :data:`SUPPORTED_TASKS` (``batch`` does not use the model, ``loss`` is a pure
function of model and batch, no ``after_optimizer_step``), and the arms whose tricks are in
:data:`SUPPORTED_TRICKS`: the task-level tricks act in each seed's own ``batch``/model, and the
loop-level ``ema``, ``accumulation`` and ``no_weight_decay`` are element-wise or per-group and map
directly onto stacked tensors. Not supported (a clear error): ``posthoc_ema``,
``periodic_averaging``, ``checkpoint_averaging`` (they choose the evaluated weights from stored
snapshots), BatchNorm models (``precise_bn``), ``compile``/``channels_last``/``autocast``, and
checkpoints: a vectorized group trains from start to end (the tiny tasks take seconds).

Use::

    results = train_vectorized(cells)            # cells: S seeds of one arm (bench.grid.Cell)
    results[i]["metric"], results[i]["history"]  # as bench.loop.train records them
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap
from torch.utils import _pytree as pytree

from bench import store
from bench.grid import Cell
from bench.loop import _build_optimizer, _crossed, _lr_factor, _seed_global_rng, build_task
from bench.seeds import SeedBundle
from bench.stability import stability_metrics
from experiments.base import MicroBatch, Task
from experiments.registry import get_task
from tricks import accumulation, ema
from tricks.card import BuildContext

__all__ = ["SUPPORTED_TASKS", "SUPPORTED_TRICKS", "check_vectorizable", "train_vectorized"]

#: tasks whose ``batch`` ignores the model and whose ``loss`` is a pure function of (model, batch)
SUPPORTED_TASKS = ("toy_diffusion",)
#: tricks that act inside each seed's own task code, or element-wise / per parameter group in the loop
SUPPORTED_TRICKS = (
    "ema",
    "accumulation",
    "no_weight_decay",
    "stratified_sampling",
    "fourier_features",
    "cond_dropout",
    "cond_noise",
    "nonleaky_augmentation",
)


def check_vectorizable(cells: Sequence[Cell]) -> None:
    """Raise ``ValueError`` (naming the field and what is allowed) unless ``cells`` can train together.

    They must be distinct seeds of one arm: equal configs apart from the seed, a task of
    :data:`SUPPORTED_TASKS`, tricks of :data:`SUPPORTED_TRICKS`, and no performance options.
    """
    if not cells:
        raise ValueError("cells: an empty list is not allowed; allowed: the seeds of one arm (at least one cell)")
    ref = {k: v for k, v in cells[0].config.items() if k != "seed"}
    seeds = [c.seed for c in cells]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"cells: seeds {seeds} repeat; allowed: distinct seeds of one arm")
    for c in cells[1:]:
        other = {k: v for k, v in c.config.items() if k != "seed"}
        if other != ref:
            diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
            raise ValueError(
                f"cells: run {c.run_id} differs from run {cells[0].run_id} in {', '.join(diff)}; "
                "allowed: seeds of one arm (configs equal apart from the seed)"
            )
    task = ref["task"]
    if task not in SUPPORTED_TASKS:
        raise ValueError(
            f"task: {task!r} cannot be seed-vectorized; allowed: {', '.join(SUPPORTED_TASKS)} "
            "(tasks whose batch() ignores the model and whose loss() is a pure function of model and batch)"
        )
    unsupported = [t for t in ref["tricks"] if t not in SUPPORTED_TRICKS]
    if unsupported:
        raise ValueError(
            f"tricks: {', '.join(unsupported)} cannot be seed-vectorized; allowed: {', '.join(SUPPORTED_TRICKS)}"
        )
    if ref["tricks"].get("ema", {}).get("buffers") == "recompute":
        raise ValueError("tricks.ema.buffers: 'recompute' is not allowed when seed-vectorized; allowed: copy, average")
    train = ref["train"]
    for option, off in (("compile", False), ("channels_last", False), ("autocast", "none")):
        if train.get(option, off) != off:
            raise ValueError(f"train.{option}: {train[option]!r} is not allowed when seed-vectorized; allowed: {off!r}")


class _Stacked(nn.Module):
    """Calls ``base`` (a meta-device skeleton) with one seed's slice of the stacked weights (inside vmap)."""

    def __init__(self, base: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
        super().__init__()
        self._base, self._weights = [base], (params, buffers)  # a list: not registered as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params, buffers = self._weights
        return functional_call(self._base[0], (params, buffers), args, kwargs)


def _stack_batches(batches: list[Any]) -> Any:
    """One batch whose tensors have a leading seed dimension (``None`` fields stay ``None``)."""
    flat = [pytree.tree_flatten(b) for b in batches]
    spec = flat[0][1]
    for _, other in flat[1:]:
        if other != spec:
            raise ValueError("batch: the seeds' batches differ in structure; allowed: one arm's batches")
    columns = [[f[0][i] for f in flat] for i in range(len(flat[0][0]))]
    leaves = [None if col[0] is None else torch.stack(col) for col in columns]
    return pytree.tree_unflatten(leaves, spec)


class _StackedEMA:
    """The ``ema`` trick on stacked weights: :func:`tricks.ema.ema_update_` with the EMA class's decay rule."""

    def __init__(self, cfg: dict[str, Any], params: dict[str, Tensor], buffers: dict[str, Tensor], sps: int) -> None:
        self.decay = ema.decay_from_half_life(cfg["half_life_samples"], sps)
        self.warmup, self.policy = cfg["warmup"], cfg.get("buffers", "copy")
        self.params = {k: v.detach().clone() for k, v in params.items()}
        self.buffers = {k: v.detach().clone() for k, v in buffers.items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, params: dict[str, Tensor], buffers: dict[str, Tensor]) -> None:
        d = (
            0.0
            if self.num_updates == 0
            else (ema.warmup_decay(self.decay, self.num_updates) if self.warmup else self.decay)
        )
        names = list(self.params)
        ema.ema_update_([self.params[n] for n in names], [params[n] for n in names], d)
        for n, b in buffers.items():
            if self.policy == "average" and b.is_floating_point():
                ema.ema_update_([self.buffers[n]], [b], d)
            else:
                self.buffers[n].copy_(b)
        self.num_updates += 1


def _grad_norms_(grads: list[Tensor], max_norm: float | None) -> Tensor:
    """Per-seed total gradient 2-norm (S,), as ``get_total_norm`` of each seed; optionally clip per seed."""
    per_tensor = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)  # (S, P)
    total = torch.linalg.vector_norm(per_tensor, dim=1)
    if max_norm is not None:  # clip_grad_norm_'s rule, per seed: multiply by min(1, max_norm / (norm + 1e-6))
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.ndim - 1))))
    return total


def train_vectorized(cells: Sequence[Cell], *, device: str = "cpu", threads: int | None = 1) -> list[dict[str, Any]]:
    """Train the seeds ``cells`` (one arm) together; return one result per cell, in order.

    Each result holds what :func:`bench.loop.train` records for that run: ``status``
    (``completed`` or ``diverged``), ``diverged_step``, ``metric`` (final evaluation, including
    ``raw_<metric>`` when EMA weights are evaluated), ``stability``, ``history`` (per-step
    ``loss``/``grad_norm``/``lr`` and the evaluations), ``cost`` (the group's training time split
    evenly over its seeds), plus ``final_model`` (the evaluated weights, CPU tensors — what
    ``final_model.pt`` holds) and ``model`` (the trained weights). Nothing is written to disk.
    """
    check_vectorizable(cells)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    cfg = cells[0].config
    train_cfg, tricks = cfg["train"], cfg["tricks"]
    task_cls = get_task(cfg["task"])
    if task_cls.after_optimizer_step is not Task.after_optimizer_step:
        raise ValueError(f"task: {cfg['task']!r} has an after_optimizer_step hook; it cannot be seed-vectorized")
    streams = [SeedBundle(c.seed) for c in cells]
    tasks: list[Task] = [build_task(cfg, s, dev)[0] for s in streams]
    models: list[nn.Module] = []
    for task, s in zip(tasks, streams):  # exactly as the loop builds a run's model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed_for("init"))
            models.append(task.build_model().to(dev))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules()):
        raise ValueError("model: BatchNorm layers are not allowed when seed-vectorized (their statistics are state)")
    params, buffers = stack_module_state(models)  # leaves with a leading seed dimension
    base = copy.deepcopy(models[0]).to("meta")
    grouping = tasks[0].trickset.build_role(
        "optimizer_groups", BuildContext(task_cls.name, task_cls.capabilities, True)
    )
    optimizer = _build_optimizer(models[0], train_cfg, grouping)
    # the optimizer was built over seed 0's parameters; swap in the stacked ones by name (no state exists yet)
    name_of = {id(p): n for n, p in models[0].named_parameters()}
    for group in optimizer.param_groups:
        group["params"] = [params[name_of[id(p)]] for p in group["params"]]
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    trainable = [params[n] for n, p in models[0].named_parameters() if p.requires_grad]

    k = tricks["accumulation"]["micro_batches"] if "accumulation" in tricks else 1
    micro_sizes = accumulation.split_micro_batches(train_cfg["batch_size"], k)
    sps = sum(tasks[0].samples_per_micro_batch(m) for m in micro_sizes)
    total_steps = max(1, math.ceil(train_cfg["budget_samples"] / sps))
    averager = _StackedEMA(tricks["ema"], params, buffers, sps) if "ema" in tricks else None
    clip = train_cfg["grad_clip_norm"] or None
    n_seeds = len(cells)
    hist = [{"step": [], "samples": [], "loss": [], "grad_norm": [], "lr": []} for _ in cells]
    evals: list[list[dict[str, float]]] = [[] for _ in cells]
    diverged: list[int | None] = [None] * n_seeds
    final_models: list[dict[str, Tensor]] = [{} for _ in cells]
    train_s = eval_s = 0.0

    def seed_loss(p: dict[str, Tensor], b: dict[str, Tensor], batch: Any, mb: MicroBatch) -> Tensor:
        return tasks[0].loss(_Stacked(base, p, b), batch, mb)[0]

    def evaluate(step: int, final: bool) -> None:
        """Each live seed's evaluation, as the loop's: the EMA weights if on (+ the raw ones at the end)."""
        for i in range(n_seeds):
            if diverged[i] is not None:
                continue
            live = {n: t[i] for n, t in (params | buffers).items()}
            weights = live if averager is None else {n: t[i] for n, t in (averager.params | averager.buffers).items()}
            model = models[i]
            with torch.no_grad():
                model.load_state_dict(weights)
                model.eval()
                metrics = tasks[i].evaluate(model, final)
                if final:
                    final_models[i] = {n: w.detach().cpu().clone() for n, w in weights.items()}
                    if averager is not None and task_cls.metric in metrics:
                        model.load_state_dict(live)
                        metrics[f"raw_{task_cls.metric}"] = tasks[i].evaluate(model, final)[task_cls.metric]
                model.train()
            evals[i].append({"step": step, "samples": (step + 1) * sps, **{m: float(v) for m, v in metrics.items()}})

    t0 = time.perf_counter()
    for step in range(total_steps):
        samples_before = step * sps
        factor = _lr_factor(train_cfg, samples_before)
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * factor
        progress = samples_before / train_cfg["budget_samples"]
        per_seed = []
        for task, s in zip(tasks, streams):  # each seed draws its own batches, as in its own run
            _seed_global_rng(s.seed_for("global", step), dev)
            mbs = [MicroBatch(step, m, k, size, progress) for m, size in enumerate(micro_sizes)]
            per_seed.append([task.batch(None, mb) for mb in mbs])
        loss_sum = torch.zeros(n_seeds, device=dev)
        for micro in range(len(micro_sizes)):
            batch = _stack_batches([b[micro] for b in per_seed])
            batch_dims = pytree.tree_map(lambda t: None if t is None else 0, batch)
            mb = MicroBatch(step, micro, k, micro_sizes[micro], progress)
            losses = vmap(seed_loss, in_dims=(0, 0, batch_dims, None), randomness="error")(params, buffers, batch, mb)
            # the seeds are independent: d(sum)/d(loss_i) = 1, so each seed gets exactly its own gradient
            (losses / k if k > 1 else losses).sum().backward()
            loss_sum += losses.detach()
        grad_norms = _grad_norms_([p.grad for p in trainable], clip)
        loss_values = [v / k for v in loss_sum.tolist()]  # as the loop: float(sum) / k
        norm_values = grad_norms.tolist()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if averager is not None:
            averager.update(params, buffers)
        samples = (step + 1) * sps
        for i in range(n_seeds):
            if diverged[i] is not None:
                continue
            if not (math.isfinite(loss_values[i]) and math.isfinite(norm_values[i])):
                diverged[i] = step  # as the loop: the step is not recorded; its run ends here
                continue
            h = hist[i]
            h["step"].append(step)
            h["samples"].append(samples)
            h["loss"].append(loss_values[i])
            h["grad_norm"].append(norm_values[i])
            h["lr"].append(optimizer.param_groups[0]["lr"])
        if all(d is not None for d in diverged):
            break
        last = step == total_steps - 1
        if _crossed(step, sps, train_cfg["eval_every_samples"]) or last:
            train_s += time.perf_counter() - t0
            t_eval = time.perf_counter()
            evaluate(step, final=last)
            eval_s += time.perf_counter() - t_eval
            t0 = time.perf_counter()
    train_s += time.perf_counter() - t0

    results = []
    for i, cell in enumerate(cells):
        final = evals[i][-1] if evals[i] and diverged[i] is None else {}
        metric_values = [e[task_cls.metric] for e in evals[i] if task_cls.metric in e]
        n_samples = hist[i]["samples"][-1] if hist[i]["samples"] else 0
        results.append(
            {
                "run_id": cell.run_id,
                "seed": cell.seed,
                "status": store.RunStatus.DIVERGED if diverged[i] is not None else store.RunStatus.COMPLETED,
                "diverged_step": diverged[i],
                "metric": {k_: v for k_, v in final.items() if k_ not in ("step", "samples")}
                | ({task_cls.metric: float("nan")} if diverged[i] is not None else {}),
                "primary_metric": task_cls.metric,
                "higher_is_better": task_cls.higher_is_better,
                "stability": stability_metrics(
                    hist[i]["loss"], hist[i]["grad_norm"], metric_values, task_cls.higher_is_better, diverged[i]
                )
                | {"final_train_loss": hist[i]["loss"][-1] if hist[i]["loss"] else float("nan")},
                "history": {"train": hist[i], "eval": evals[i]},
                "cost": {
                    "samples": n_samples,
                    "steps": len(hist[i]["step"]),
                    "train_s": train_s / n_seeds,
                    "eval_s": eval_s / n_seeds,
                    "train_s_per_sample": train_s / n_seeds / max(1, n_samples),
                    "vectorized_seeds": n_seeds,
                    "device": str(dev),
                    "threads": torch.get_num_threads(),
                },
                "final_model": final_models[i],
                "model": {n: t[i].detach().cpu().clone() for n, t in (params | buffers).items()},
            }
        )
    return results
