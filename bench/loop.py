"""The one training loop. Every task and every trick combination trains through :func:`train`.

Read it top to bottom: the order in which tricks act is written here, not hidden in
callbacks. The task supplies model, batches, loss and evaluation (and applies its own
data/loss-level tricks inside ``batch``/``loss``); this loop applies the optimizer- and
weight-level tricks at visible points:

    per optimizer step:   k micro-batches (accumulation: loss / k) → divergence check →
                          gradient norm (+ optional clipping) → optimizer step →
                          task.after_optimizer_step → EMA / post-hoc EMA update →
                          periodic snapshot → [evaluate] → [checkpoint]

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
from dataclasses import dataclass
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
from experiments.base import Task
from experiments.registry import get_task
from tricks import accumulation, checkpoint_averaging, ema, no_weight_decay, precise_bn, weight_averaging

__all__ = ["RunContext", "TrainState", "train", "train_cell"]

BN_RECALIBRATION_BATCHES = 16  # when averaged weights need fresh BN statistics and precise_bn is off
GLOBAL_SEED_CHUNK_STEPS = 1024  # the loop derives the per-step global-RNG seeds this many steps at a time
CHECKPOINT_FORMAT = 1


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


def _build_optimizer(model: nn.Module, cfg: dict[str, Any], zero_wd_norm_bias: bool) -> torch.optim.Optimizer:
    wd = cfg["weight_decay"]
    if zero_wd_norm_bias:
        groups = no_weight_decay.param_groups(model, wd)
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


class _Averagers:
    """The weight-level tricks of one run and which model is evaluated.

    Priority when several are on (an incompatible combination the cards warn about):
    post-hoc EMA > periodic averaging > EMA > the live weights; checkpoint averaging
    replaces the final evaluated weights by the average of its kept checkpoints.
    """

    def __init__(
        self, model: nn.Module, tricks: dict[str, dict[str, Any]], samples_per_step: int, higher_is_better: bool
    ) -> None:
        self.tricks = tricks
        self.ema = self.posthoc = self.periodic = self.ckpt = None
        if "ema" in tricks:
            p = tricks["ema"]
            self.ema = ema.EMA(
                model,
                half_life_samples=p["half_life_samples"],
                samples_per_update=samples_per_step,
                warmup=p["warmup"],
                buffers=p["buffers"],
            )
        if "posthoc_ema" in tricks:
            p = tricks["posthoc_ema"]
            self.posthoc = weight_averaging.PostHocEMA(
                model,
                sigma_rels=(p["sigma_rel_a"], p["sigma_rel_b"]),
                snapshot_every_samples=p["snapshot_every_samples"],
                samples_per_update=samples_per_step,
            )
        if "periodic_averaging" in tricks:
            p = tricks["periodic_averaging"]
            self.periodic = weight_averaging.PeriodicAverager(p["snapshot_every_samples"], p["window_fraction"])
        if "checkpoint_averaging" in tricks:
            p = tricks["checkpoint_averaging"]
            self.ckpt = checkpoint_averaging.CheckpointAverager(p["n"], p["mode"], higher_is_better=higher_is_better)

    def update(self, model: nn.Module, samples: int) -> None:
        """Once per optimizer step (never per micro-batch)."""
        if self.ema is not None:
            self.ema.update(model)
        if self.posthoc is not None:
            self.posthoc.update(model)
            self.posthoc.maybe_snapshot(samples)
        if self.periodic is not None:
            self.periodic.maybe_snapshot(model, samples)

    def eval_state(self, model: nn.Module, final: bool) -> tuple[dict[str, torch.Tensor] | nn.Module, bool]:
        """(weights to evaluate, whether their BN statistics must be recomputed)."""
        if final and self.ckpt is not None and self.ckpt.kept_steps:
            return self.ckpt.average(), self.tricks["checkpoint_averaging"]["recompute_bn"]
        if self.posthoc is not None and self.posthoc.num_snapshots:
            return self.posthoc.reconstruct(self.tricks["posthoc_ema"]["target_sigma_rel"]), True
        if self.periodic is not None and self.periodic.num_snapshots:
            return self.periodic.average(), True
        if self.ema is not None:
            return self.ema.module, self.ema.needs_bn_recompute
        return model, False

    def state_dict(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self._items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, obj in self._items():
            obj.load_state_dict(state[name])

    def _items(self) -> list[tuple[str, Any]]:
        pairs = [("ema", self.ema), ("posthoc", self.posthoc), ("periodic", self.periodic), ("ckpt", self.ckpt)]
        return [(n, o) for n, o in pairs if o is not None]


class _Trainer:
    """One run's objects; ``run`` is the loop. Built fresh for every call of :func:`train`."""

    def __init__(self, cell: Cell, out_dir: Path, ctx: RunContext, mem: PeakMemory) -> None:
        self.cell, self.out_dir, self.ctx, self.mem = cell, out_dir, ctx, mem
        cfg = cell.config
        self.train_cfg: dict[str, Any] = cfg["train"]
        self.tricks: dict[str, dict[str, Any]] = cfg["tricks"]
        self.device = torch.device(ctx.device)
        self.streams = SeedBundle(cell.seed)
        task_cls = get_task(cfg["task"])
        self.task: Task = task_cls(cfg["params"], self.tricks, self.streams, self.device, self.train_cfg)
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

        # accumulation: the same batch as k micro-batches of batch/k, loss / k, one optimizer step
        self.k = self.tricks["accumulation"]["micro_batches"] if "accumulation" in self.tricks else 1
        self.micro_sizes = accumulation.split_micro_batches(self.train_cfg["batch_size"], self.k)
        self.samples_per_step = sum(self.task.samples_per_micro_batch(m) for m in self.micro_sizes)
        self.total_steps = max(1, math.ceil(self.train_cfg["budget_samples"] / self.samples_per_step))

        self.optimizer = _build_optimizer(self.model, self.train_cfg, "no_weight_decay" in self.tricks)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.averagers = _Averagers(self.model, self.tricks, self.samples_per_step, task_cls.higher_is_better)
        self.metric, self.higher_is_better = task_cls.metric, task_cls.higher_is_better
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
            "averagers": self.averagers.state_dict(),
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
            self.averagers.load_state_dict(payload["averagers"])
            self.task.load_state_dict(payload["task"])
            self.state = TrainState(**payload["state"])
            self.history = payload["history"]

        for name, payload in resume:
            if fresh is None:  # the untouched state, to undo a restore that fails half-way
                fresh = copy.deepcopy(
                    {
                        "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "averagers": self.averagers.state_dict(),
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
    def evaluate(self, final: bool) -> dict[str, float]:
        """Evaluate the trick-selected weights (EMA / averages) without touching training weights."""
        self.check_grads()
        weights, recompute_bn = self.averagers.eval_state(self.model, final)
        needs_copy = not isinstance(weights, nn.Module) or "precise_bn" in self.tricks or recompute_bn
        if isinstance(weights, nn.Module) and not needs_copy:
            eval_model = weights
        else:
            if self._eval_copy is None:
                self._eval_copy = copy.deepcopy(self.model)
                for p in self._eval_copy.parameters():
                    p.grad = None  # deepcopy copies gradients (the flat buffer's views); evaluation needs none
            eval_model = self._eval_copy
            src = weights.state_dict() if isinstance(weights, nn.Module) else weights
            eval_model.load_state_dict(src)
        if _has_bn(eval_model) and ("precise_bn" in self.tricks or recompute_bn):
            n = self.tricks.get("precise_bn", {}).get("num_batches", BN_RECALIBRATION_BATCHES)
            precise_bn.recompute_bn_stats(eval_model, self.task.bn_batches(), n, forward_fn=self.task.bn_forward)
        was_training = eval_model.training
        eval_model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(eval_model, final)
        if final and eval_model is not self.model and self.metric in metrics:
            self.model.eval()
            with torch.no_grad():
                metrics[f"raw_{self.metric}"] = self.task.evaluate(self.model, final)[self.metric]
            self.model.train()
        eval_model.train(was_training)
        if final:
            self._final_eval_model = eval_model
        return {k: float(v) for k, v in metrics.items()}

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
            for micro, size in enumerate(self.micro_sizes):
                batch = task.batch(fwd, step, micro, size, samples_before / self.train_cfg["budget_samples"])
                with autocast:
                    loss, _extra = task.loss(fwd, batch, step, micro)
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
            self.averagers.update(model, samples)

            hist["step"].append(step)
            hist["samples"].append(samples)
            hist["loss"].append(loss_value)
            hist["grad_norm"].append(grad_norm)
            hist["lr"].append(optimizer.param_groups[0]["lr"])
            steps_this_call += 1
            last = step == self.total_steps - 1

            if _crossed(step, self.samples_per_step, eval_every) or last:
                self.state.train_s += time.perf_counter() - t0
                t_eval = time.perf_counter()
                metrics = self.evaluate(final=last)
                self.state.eval_s += time.perf_counter() - t_eval
                self.history["eval"].append({"step": step, "samples": samples, **metrics})
                if self.averagers.ckpt is not None and not last:
                    weights, _ = self.averagers.eval_state(model, final=False)
                    sd = weights.state_dict() if isinstance(weights, nn.Module) else weights
                    self.averagers.ckpt.offer(sd, metrics.get(self.metric), step)
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
        final = evals[-1] if evals and diverged_step is None else {}
        metric_values = [e[self.metric] for e in evals if self.metric in e]
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
    """``config.json``: the resolved config, the cell's identity, code version and seed bundle."""
    meta = cell.to_dict() | {
        "code_version": code_version,
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
