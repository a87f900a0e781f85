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
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import checkpoints, store
from bench.gradbuffer import FlatGrads
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

__all__ = ["RunContext", "TrainState", "build_task", "train", "train_cell"]

BN_RECALIBRATION_BATCHES = 16  # when averaged weights need fresh BN statistics and no bn_statistics trick is on
GLOBAL_SEED_CHUNK_STEPS = 1024  # the loop derives the per-step global-RNG seeds this many steps at a time
CHECKPOINT_FORMAT = 2  # 2: trick state under its role ("evaluated_weights"), not under trick names


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


def _build_optimizer(model: nn.Module, cfg: dict[str, Any], grouping: Any) -> torch.optim.Optimizer:
    """The optimizer; ``grouping`` is the optimizer_groups role's object (None: one group, every parameter)."""
    wd = cfg["weight_decay"]
    if grouping is not None:
        groups = grouping.param_groups(model, wd)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": wd}]
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["momentum"], 0.999))
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])


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


class _Trainer:
    """One run's objects; ``run`` is the loop. Built fresh for every call of :func:`train`."""

    def __init__(self, cell: Cell, out_dir: Path, ctx: RunContext, mem: PeakMemory) -> None:
        self.cell, self.out_dir, self.ctx, self.mem = cell, out_dir, ctx, mem
        cfg = cell.config
        self.train_cfg: dict[str, Any] = cfg["train"]
        self.device = torch.device(ctx.device)
        self.streams = SeedBundle(cell.seed)
        # the tricks that are on: task-role objects are built now (the task asks for them by name)
        self.task, context = build_task(cfg, self.streams, self.device)
        self.tricks: TrickSet = self.task.trickset
        self.metric, self.higher_is_better = self.task.metric, self.task.higher_is_better
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.streams.seed_for("init"))
            self.model = self.task.build_model().to(self.device)
        self.mem.rebase()  # count what training adds (optimizer, trick state, activations), not imports or data
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
        # optimizer_groups: the optimizer's parameter groups
        grouping = self.tricks.build_role("optimizer_groups", context)
        self.optimizer = _build_optimizer(self.model, self.train_cfg, grouping)
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
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
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
            self.optimizer.load_state_dict(payload["optimizer"])
            if self.evaluated is not None:
                self.evaluated.load_state_dict(payload["evaluated_weights"])
            self.task.load_state_dict(payload["task"])
            self.state = TrainState(**payload["state"])
            self.history = payload["history"]

        for name, payload in resume:
            if fresh is None:  # the untouched state, to undo a restore that fails half-way
                fresh = copy.deepcopy(
                    {
                        "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
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
            if used is not self.model and self.metric in metrics:
                raw, _ = self._evaluate_weights(self.model, False, final, recalibrate=False)
                metrics[f"raw_{self.metric}"] = raw[self.metric]
            self._final_eval_model = used
        return metrics

    def _curve_point(self, final_metrics: dict[str, float]) -> dict[str, float]:
        """The last point of the learning curve: the final evaluated weights measured the way every
        intermediate evaluation measures (``final=False``; a task may use a larger sample at the final
        evaluation, a different estimator that would make every curve jump at its last point). The
        primary metric's value at the final evaluation stays in result.json."""
        used = getattr(self, "_final_eval_model", None)
        if used is None:
            return final_metrics
        metrics, _ = self._evaluate_weights(used, False, final=False, recalibrate=False)
        return metrics

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        self.maybe_resume()
        model, optimizer, task, k = self.model, self.optimizer, self.task, self.k
        fwd = self.train_model  # = model unless compiled
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()  # a disabled torch.autocast still costs µs per enter/exit
        )
        named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named_params]
        clip = self.train_cfg["grad_clip_norm"] or None
        uniform = len({(p.device, p.dtype) for p in params}) == 1
        # gradients as views of one flat buffer (one-kernel norm and zeroing), for tasks whose every
        # parameter gets a gradient at every step; adopted after this call's first backward
        flat = FlatGrads.for_params(named_params) if task.dense_grads else None
        eval_every, ckpt_every = self.train_cfg["eval_every_samples"], self.train_cfg["checkpoint_every_samples"]
        hist = self.history["train"]
        global_seeds: list[int] = []
        seeds_from = self.state.step
        lr_factor = math.nan  # the learning rate is written into the optimizer only when it changes
        steps_this_call = 0
        last_progress = 0.0
        model.train()
        t0 = time.perf_counter()
        for step in range(self.state.step, self.total_steps):
            if (self.ctx.stop is not None and self.ctx.stop()) or (
                self.ctx.max_steps is not None and steps_this_call >= self.ctx.max_steps
            ):
                self.state.train_s += time.perf_counter() - t0
                self.state.step = step
                self.save_checkpoint()
                return {"status": "interrupted", "step": step}
            if step - seeds_from >= len(global_seeds):
                seeds_from = step
                global_seeds = self.streams.seeds_for("global", step, step + GLOBAL_SEED_CHUNK_STEPS)
            _seed_global_rng(global_seeds[step - seeds_from], self.device)  # anything still on the global RNG
            samples_before = step * self.samples_per_step
            factor = _lr_factor(self.train_cfg, samples_before)
            if factor != lr_factor:
                lr_factor = factor
                for group, base in zip(optimizer.param_groups, self.base_lrs):
                    group["lr"] = base * factor

            # accumulation: k micro-batches, each loss / k, gradients summed, one optimizer step
            loss_sum: torch.Tensor | None = None
            progress = samples_before / self.train_cfg["budget_samples"]
            for micro, size in enumerate(self.micro_sizes):
                mb = MicroBatch(step=step, index=micro, count=k, size=size, progress=progress)
                batch = task.batch(fwd, mb)
                with autocast:
                    loss, _extra = task.loss(fwd, batch, mb)
                (accumulation.scale_loss(loss, k) if k > 1 else loss).backward()  # k = 1: no extra graph node
                # a float32 sum, as before from a float32 zero (0 + x == x bit for bit for any loss but -0.0)
                loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
            loss_value = float(loss_sum) / k
            if flat is not None and self.flat is None:
                flat.adopt(task.name)  # raises if a parameter got no gradient
                self.flat = flat
            if flat is not None and clip is None:
                grad_norm = flat.norm()
            else:  # clipping: clip_grad_norm_ (on the views when the buffer is used; the same bits)
                grad_norm = float(_grad_norm_(params, clip, uniform))
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                self.state.train_s += time.perf_counter() - t0
                return self._finish(diverged_step=step, last_loss=loss_value)
            optimizer.step()
            if flat is not None:
                flat.zero_()
            else:
                optimizer.zero_grad(set_to_none=True)
            task.after_optimizer_step(model, step)
            samples = (step + 1) * self.samples_per_step
            if self.evaluated is not None:
                self.evaluated.after_step(model, samples)  # once per optimizer step, never per micro-batch

            hist["step"].append(step)
            hist["samples"].append(samples)
            hist["loss"].append(loss_value)
            hist["grad_norm"].append(grad_norm)
            hist["lr"].append(optimizer.param_groups[0]["lr"])
            if self.ctx.tracker is not None:  # the training curve of the mirror (strides and buffers itself)
                self.ctx.tracker.log_train(step, samples, loss_value, grad_norm, hist["lr"][-1])
            steps_this_call += 1
            last = step == self.total_steps - 1

            if _crossed(step, self.samples_per_step, eval_every) or last:
                self.state.train_s += time.perf_counter() - t0
                t_eval = time.perf_counter()
                metrics = self.evaluate(step, final=last)
                if last:  # result.json gets the final estimator; the curve keeps the intermediate one
                    self._final_metrics, metrics = metrics, self._curve_point(metrics)
                self.state.eval_s += time.perf_counter() - t_eval
                self.history["eval"].append({"step": step, "samples": samples, **metrics})
                self._track(step, samples, loss_value, metrics)
                t0 = time.perf_counter()
            if _crossed(step, self.samples_per_step, ckpt_every) and not last:
                self.state.step = step + 1
                self.state.train_s += time.perf_counter() - t0
                self.save_checkpoint()
                t0 = time.perf_counter()
            if self.ctx.on_progress is not None and (
                time.perf_counter() - last_progress > self.ctx.progress_interval_s or last
            ):
                last_progress = time.perf_counter()
                self.ctx.on_progress(step + 1, self.total_steps, loss_value)
        self.state.train_s += time.perf_counter() - t0
        self.state.step = self.total_steps
        return self._finish(diverged_step=None, last_loss=hist["loss"][-1] if hist["loss"] else float("nan"))

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
            },
        }
        self._write_curves()
        if diverged_step is None and getattr(self, "_final_eval_model", None) is not None:
            buf = io.BytesIO()
            torch.save(self._final_eval_model.state_dict(), buf)
            store.atomic_write_bytes(self.out_dir / "final_model.pt", buf.getvalue())
        # size and SHA-256 of what the report reads: a later change to any of them marks the run damaged
        result["artefacts"] = store.artefact_manifest(self.out_dir)
        store.atomic_write_json(self.out_dir / store.RESULT, store.sealed(result))  # last: its presence = done
        checkpoints.remove(self.out_dir)
        return result


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
