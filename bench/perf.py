"""``bench perf``: what the harness costs, what each trick costs, and how grids scale.

Every number here is measured on this machine when the command runs; the tables are printed and
written, with the machine description (torch version, load), to a new folder per invocation:
``<out>/<YYYYmmdd-HHMMSS>/perf.md`` and one ``<part>.csv`` per part (``--out``, default
``./benchmarks-out`` in the working directory — never the source tree, never overwriting an
earlier invocation). Parts (``--only``; default all):

- ``parity``: :func:`bench.loop.train` of a task with no tricks against a bare hand-written
  PyTorch loop (:func:`bare_train`) with the same model (``build_model`` under the same init
  seed), the same batches (each loop's own task instance draws them from the same streams), the
  same optimizer, seed and steps, in one process. Their per-step losses must agree to 5
  decimals (the exit status is 1 otherwise); the table gives the step-time ratio harness/bare in
  wall time and in thread CPU time side by side (on a loaded machine the wall ratio takes in the
  neighbours' bursts; the CPU ratio is what the harness itself costs), with both verdicts.
- ``tricks``: time and peak memory per sample of each applicable trick relative to the
  baseline, each run in a fresh process (CPU peak memory is the growth of resident memory,
  which a process that already ran something under-reports).
- ``ema``: the cost of one EMA / post-hoc EMA update against a training step, and which kernels
  an update launches (one fused ``_foreach_lerp_`` expected).
- ``data``: where each task's data lives (device tensors; no DataLoader worker processes).
- ``vectorized``: S seeds of ``toy_diffusion`` trained as one seed-vectorized group
  (:func:`bench.loop.train_group`) against the same S runs one after another, in one process.
- ``grid``: grid throughput — a 64-run toy_diffusion grid (8 arms × 8 seeds, short runs) through
  ``bench run`` against the sum of the same runs' bare training loops (CPU time), and the same grid
  with ``--vectorize-seeds`` (end-to-end speedup), interleaved, in fresh processes
  (:func:`grid_throughput`).
- ``scaling``: wall time of a small grid on the local executor by number of runs and ``--jobs``,
  and an estimate for a 1,000-run grid on GPUs (assumptions printed with it).

Step times (parity): the two loops train interleaved, step by step — after each harness step
(its ``on_progress`` callback, interval 0) the bare loop trains its own next step — so both see
the same machine load; each step is timed in wall clock and thread CPU time
(``time.thread_time``). The first step (warm-up) and the last (the harness evaluates there) are
dropped; a repeat's ratio is harness/bare of the median step times.

Both loops compute the same numbers on the same data, and a step that repeats the computation
the other loop has just done runs faster (measured A/A, two bare loops: the follower is ~1-2 %
faster on the tiny tasks — branch predictors and caches warmed on identical data). So the
repeats alternate which loop leads: in even repeats the harness trains step i first, in odd
repeats the bare loop is one step ahead. The table's ratio is the geometric mean of the two
orders' median ratios (first repeat dropped), which cancels that bias; both are listed, with
the range. Other parts time whole runs; timings on a shared machine are noisy, and the load
average is recorded with the tables.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from bench.grid import Cell, run_id_of
from bench.loop import build_task
from bench.seeds import SeedBundle
from bench.spec import parse_spec
from experiments.base import MicroBatch

__all__ = [
    "PARTS",
    "BareLoop",
    "ParityResult",
    "StepClock",
    "add_arguments",
    "bare_train",
    "harness_train",
    "parity",
    "perf_cell",
    "run",
    "tiny_cell",
]

PARTS = ("parity", "tricks", "ema", "data", "vectorized", "grid", "scaling")
#: optimizer steps per timed run: a few seconds per run on one core
DEFAULT_STEPS = {"cifar_autoencoder": 40, "toy_diffusion": 300, "rl_policy": 300}
#: steps per trick-cost run (whole runs are timed there: longer runs average over load bursts)
TRICK_STEPS = {"cifar_autoencoder": 40, "toy_diffusion": 1000, "rl_policy": 1000}
TARGET_RATIO = 1.02  # harness/bare step-time target with no tricks
DECIMALS = 5  # losses must agree to this many decimals (numpy's assert_almost_equal: |a - b| < 1.5e-5)
DEFAULT_OUT = Path("benchmarks-out")  # relative to the working directory: never inside the installed package


# ----------------------------------------------------------------------------------------------
# Cells and clocks


def perf_cell(
    task: str,
    tricks: dict[str, Any] | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    params: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
) -> Cell:
    """A one-run cell of ``task`` with ``tricks`` on (``{name: params or None}``), validated like a grid spec.

    With ``steps`` the budget is ``steps`` optimizer steps and evaluation/checkpoints happen only
    at the end (nothing but training steps is timed in between). Budgets and intervals given in
    ``train`` win over that.
    """
    train = dict(train or {})
    if steps is not None:
        probe = _validated(task, {}, params or {}, train, seed)
        budget = steps * _samples_per_step(task, probe["params"], probe["train"], seed)
        train = {"budget_samples": budget, "eval_every_samples": budget, "checkpoint_every_samples": budget} | train
    config = _validated(task, tricks or {}, params or {}, train, seed)
    on = tuple(config["tricks"])
    return Cell("perf", task, "+".join(on) or "baseline", on, seed, config, run_id_of(config))


def tiny_cell(task: str, steps: int, tricks: dict[str, Any] | None = None, train: dict[str, Any] | None = None) -> Cell:
    """A one-run cell of ``task`` at its ``tiny`` setting (seconds) for ``steps`` steps; ``train`` overrides."""
    from experiments.registry import get_task

    tiny = get_task(task).tiny or {"params": {}, "train": {}}
    given = {
        k: v
        for k, v in tiny["train"].items()
        if k not in ("budget_samples", "eval_every_samples", "checkpoint_every_samples", "lr")  # the task's own lr
    }
    return perf_cell(task, tricks, steps=steps, params=tiny["params"], train=given | (train or {}))


def _validated(task: str, tricks: dict[str, Any], params: dict[str, Any], train: dict[str, Any], seed: int) -> dict:
    spec = parse_spec(
        {"grid": "perf", "seeds": [seed], "tasks": {task: {"params": params, "train": train, "tricks": tricks}}}
    )
    t = spec.tasks[0]
    return {"task": t.task, "params": t.params, "train": t.train, "tricks": dict(t.tricks), "seed": seed}


_SPS_CACHE: dict[str, int] = {}


def _samples_per_step(task: str, params: dict[str, Any], train: dict[str, Any], seed: int) -> int:
    """Budget samples one optimizer step consumes (images, points, transitions) — asks the task."""

    key = repr((task, sorted(params.items()), train["batch_size"]))
    if key not in _SPS_CACHE:
        inst, _ = build_task(
            {"task": task, "params": params, "train": train, "tricks": {}}, SeedBundle(seed), torch.device("cpu")
        )
        _SPS_CACHE[key] = inst.samples_per_micro_batch(train["batch_size"])
    return _SPS_CACHE[key]


@dataclass
class StepClock:
    """Timestamps (wall and thread CPU) after every optimizer step; call it as the progress callback."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def __call__(self, *_: Any) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.thread_time())

    def step_times(self) -> tuple[list[float], list[float]]:
        """Per-step durations (wall, CPU) in seconds, without the first step and the last one."""
        dw = [b - a for a, b in zip(self.wall, self.wall[1:])]
        dc = [b - a for a, b in zip(self.cpu, self.cpu[1:])]
        return dw[:-1], dc[:-1]


@dataclass
class TimedRun:
    """One timed training run: its per-step losses and gradient norms, step times and final figures."""

    losses: list[float]
    grad_norms: list[float]
    step_wall_s: list[float]
    step_cpu_s: list[float]
    result: dict[str, Any]
    final_state: dict[str, torch.Tensor]

    @property
    def median_wall_s(self) -> float:
        return statistics.median(self.step_wall_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.step_cpu_s)


# ----------------------------------------------------------------------------------------------
# The two loops


def harness_train(cell: Cell, threads: int = 1, device: str = "cpu", out_dir: Path | None = None) -> TimedRun:
    """Train ``cell`` with :func:`bench.loop.train` (in ``out_dir`` or a temporary folder), timing every step."""
    from bench.loop import RunContext, train

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        run_dir = Path(out_dir) if out_dir is not None else Path(tmp) / cell.run_id
        result = train(
            cell, run_dir, RunContext(device=device, threads=threads, on_progress=clock, progress_interval_s=0)
        )
        rows = (run_dir / "train.csv").read_text().splitlines()[1:]
        final = run_dir / "final_model.pt"
        state = torch.load(final, weights_only=True) if final.exists() else {}
    losses = [float(r.split(",")[2]) for r in rows]
    norms = [float(r.split(",")[3]) for r in rows]
    wall, cpu = clock.step_times()
    return TimedRun(losses, norms, wall, cpu, result, state)


class BareLoop:
    """A plain hand-written PyTorch training loop around a task, one :meth:`step` at a time.

    What a user would write by hand: model from ``build_model`` under the ``init`` seed, the
    loop's optimizer (AdamW or SGD with the train block's settings), then per step ``batch`` →
    ``loss`` → ``backward`` → ``step`` → ``zero_grad`` → the task's ``after_optimizer_step``
    (e.g. a DQN's target network). Losses are kept as tensors and read once at the end. No
    history, gradient norm, schedule, global-RNG re-seeding, evaluation or checkpoint. Tricks of the
    ``task`` role are allowed: they act inside the task's own ``batch``/``loss``, which the bare loop
    calls as the harness does; tricks of the loop's roles are not (the bare loop has none of them).
    """

    def __init__(self, cell: Cell, threads: int = 1, device: str = "cpu") -> None:
        from tricks.registry import REGISTRY

        cfg = cell.config
        loop_tricks = sorted(t for t in cfg["tricks"] if REGISTRY[t].role != "task")
        if loop_tricks:
            raise ValueError(
                f"cell.tricks: {loop_tricks} given; allowed: tricks of the task role only (the bare loop has none of "
                "the loop's roles)"
            )
        tr = self.train_cfg = cfg["train"]
        if tr["lr_schedule"] != "constant" or tr["warmup_samples"] or tr["grad_clip_norm"]:
            raise ValueError(
                "cell.train: the bare loop needs lr_schedule constant, warmup_samples 0, grad_clip_norm null"
            )
        torch.set_num_threads(threads)
        dev = torch.device(device)
        streams = SeedBundle(cell.seed)
        self.task, _ = build_task(cfg, streams, dev)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(streams.seed_for("init"))
            self.model = self.task.build_model().to(dev)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if tr["optimizer"] == "adamw":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(
                trainable, lr=tr["lr"], betas=(tr["momentum"], 0.999), weight_decay=tr["weight_decay"]
            )
        else:
            self.opt = torch.optim.SGD(trainable, lr=tr["lr"], momentum=tr["momentum"], weight_decay=tr["weight_decay"])
        self.samples_per_step = self.task.samples_per_micro_batch(tr["batch_size"])
        self.steps = max(1, math.ceil(tr["budget_samples"] / self.samples_per_step))
        self.losses: list[torch.Tensor] = []
        self.model.train()

    def step(self) -> None:
        """Train the next optimizer step."""
        step, tr, task, model = len(self.losses), self.train_cfg, self.task, self.model
        progress = step * self.samples_per_step / tr["budget_samples"]
        mb = MicroBatch(step=step, index=0, count=1, size=tr["batch_size"], progress=progress)
        loss, _ = task.loss(model, task.batch(model, mb), mb)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        task.after_optimizer_step(model, step)
        self.losses.append(loss.detach())

    def final_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def evaluate(self) -> dict[str, float]:
        """The task's final evaluation of the trained model, as a hand-written script would end."""
        self.model.eval()
        with torch.no_grad():
            metrics = self.task.evaluate(self.model, True)
        self.model.train()
        return {k: float(v) for k, v in metrics.items()}


def bare_train(cell: Cell, threads: int = 1, device: str = "cpu") -> TimedRun:
    """The same training as :func:`harness_train` of a no-trick ``cell``, by :class:`BareLoop`, timed per step."""
    bare = BareLoop(cell, threads, device)
    clock = StepClock()
    for _ in range(bare.steps):
        bare.step()
        clock()
    wall, cpu = clock.step_times()
    return TimedRun([float(v) for v in bare.losses], [], wall, cpu, {}, bare.final_state())


# ----------------------------------------------------------------------------------------------
# Part 1: parity


@dataclass
class ParityResult:
    task: str
    steps: int
    repeats: int
    threads: int
    losses_equal: bool  # bit for bit
    max_abs_loss_diff: float
    params_equal: bool
    harness_step_ms: float  # median over repeats (first dropped) of the per-repeat median step time
    bare_step_ms: float
    harness_step_cpu_ms: float  # the same in thread CPU time
    ratio_wall: float  # harness/bare step time: geometric mean of the two orders' medians (first repeat dropped)
    ratio_cpu: float  # the same in thread CPU time
    ratio_wall_range: tuple[float, float]  # over the kept repeats
    ratio_wall_harness_first: float  # median over the repeats where the harness trained each step first
    ratio_wall_harness_second: float  # ... where the bare loop did (nan with a single repeat)
    bare_step_cpu_ms: float = math.nan  # the bare loop's median step in thread CPU time
    ratio_cpu_range: tuple[float, float] = (math.nan, math.nan)  # over the kept repeats
    ratio_cpu_harness_first: float = math.nan
    ratio_cpu_harness_second: float = math.nan

    @property
    def agree(self) -> bool:
        return self.max_abs_loss_diff < 1.5 * 10**-DECIMALS

    def row(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "steps": self.steps,
            "repeats": self.repeats,
            "threads": self.threads,
            "losses_equal_exactly": self.losses_equal,
            "max_abs_loss_diff": self.max_abs_loss_diff,
            "final_params_equal": self.params_equal,
            "harness_step_ms": round(self.harness_step_ms, 4),
            "bare_step_ms": round(self.bare_step_ms, 4),
            "harness_step_cpu_ms": round(self.harness_step_cpu_ms, 4),
            "bare_step_cpu_ms": round(self.bare_step_cpu_ms, 4),
            "ratio_wall": round(self.ratio_wall, 4),
            "ratio_cpu": round(self.ratio_cpu, 4),
            "ratio_wall_min": round(self.ratio_wall_range[0], 4),
            "ratio_wall_max": round(self.ratio_wall_range[1], 4),
            "ratio_cpu_min": round(self.ratio_cpu_range[0], 4),
            "ratio_cpu_max": round(self.ratio_cpu_range[1], 4),
            "ratio_wall_harness_first": round(self.ratio_wall_harness_first, 4),
            "ratio_wall_harness_second": round(self.ratio_wall_harness_second, 4),
            "ratio_cpu_harness_first": round(self.ratio_cpu_harness_first, 4),
            "ratio_cpu_harness_second": round(self.ratio_cpu_harness_second, 4),
            "target_met_wall": self.ratio_wall <= TARGET_RATIO,
            "target_met_cpu": self.ratio_cpu <= TARGET_RATIO,
        }


def _interleaved(cell: Cell, threads: int, bare_leads: bool = False) -> tuple[TimedRun, TimedRun]:
    """Harness and bare loop trained together, alternating step by step, each step timed.

    After every harness step (its progress callback) the bare loop trains its own next step,
    so the two loops' steps run back to back under the same machine load; a load burst hits
    both alike instead of one run. The two share nothing but the process: each has its task
    instance, model and optimizer, and neither draws from the other's streams. The harness
    trains step i before the bare loop does, or after it when ``bare_leads`` (the bare loop
    then trains its step 0 before the harness starts and stays one step ahead).
    """
    from bench.loop import RunContext, train

    bare = BareLoop(cell, threads)
    h_wall: list[float] = []
    h_cpu: list[float] = []
    b_wall: list[float] = []
    b_cpu: list[float] = []
    last = [0.0, 0.0]

    def timed_bare_step() -> None:
        w, c = time.perf_counter(), time.thread_time()
        bare.step()
        last[0], last[1] = time.perf_counter(), time.thread_time()
        b_wall.append(last[0] - w)
        b_cpu.append(last[1] - c)

    def after_harness_step(*_: Any) -> None:
        w, c = time.perf_counter(), time.thread_time()
        h_wall.append(w - last[0])
        h_cpu.append(c - last[1])
        if len(bare.losses) < bare.steps:
            timed_bare_step()
        else:  # bare_leads: the bare loop has finished; the harness's last step follows nothing
            last[0], last[1] = time.perf_counter(), time.thread_time()

    if bare_leads:
        timed_bare_step()

    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        run_dir = Path(tmp) / cell.run_id
        ctx = RunContext(threads=threads, on_progress=after_harness_step, progress_interval_s=0)
        result = train(cell, run_dir, ctx)
        rows = (run_dir / "train.csv").read_text().splitlines()[1:]
        state = torch.load(run_dir / "final_model.pt", weights_only=True)
    # step 1: warm-up (and its "start" is unknown); last step: the harness evaluates there
    keep = slice(1, -1)
    harness = TimedRun(
        [float(r.split(",")[2]) for r in rows],
        [float(r.split(",")[3]) for r in rows],
        h_wall[keep],
        h_cpu[keep],
        result,
        state,
    )
    return harness, TimedRun([float(v) for v in bare.losses], [], b_wall[keep], b_cpu[keep], {}, bare.final_state())


def parity(task: str, steps: int | None = None, repeats: int = 7, threads: int = 1, seed: int = 0) -> ParityResult:
    """Harness vs bare loop on ``task`` (no tricks): loss agreement and step-time ratio.

    Each repeat trains both loops interleaved step by step (:func:`_interleaved`), the harness
    leading in even repeats and following in odd ones; its ratio is the harness's median step
    time over the bare loop's. Raises nothing on disagreement: :attr:`ParityResult.agree` says it.
    """
    cell = perf_cell(task, steps=steps or DEFAULT_STEPS.get(task, 100), seed=seed)
    ratios_w, ratios_c, h_ms, b_ms, h_cpu_ms, b_cpu_ms = [], [], [], [], [], []
    max_diff, equal, params_equal = 0.0, True, True
    for r in range(repeats):
        h, b = _interleaved(cell, threads, bare_leads=r % 2 == 1)
        if len(h.losses) != len(b.losses):
            raise RuntimeError(f"{task}: harness ran {len(h.losses)} steps, the bare loop {len(b.losses)}")
        max_diff = max(max_diff, max(abs(x - y) for x, y in zip(h.losses, b.losses)))
        equal &= h.losses == b.losses
        params_equal &= h.final_state.keys() == b.final_state.keys() and all(
            torch.equal(v, b.final_state[k]) for k, v in h.final_state.items()
        )
        ratios_w.append(h.median_wall_s / b.median_wall_s)
        ratios_c.append(h.median_cpu_s / b.median_cpu_s)
        h_ms.append(1e3 * h.median_wall_s)
        b_ms.append(1e3 * b.median_wall_s)
        h_cpu_ms.append(1e3 * h.median_cpu_s)
        b_cpu_ms.append(1e3 * b.median_cpu_s)
    kept = slice(1, None) if repeats > 1 else slice(None)  # the first repeat warms caches and allocators
    led_w, followed_w = _by_order(ratios_w, repeats > 1)
    led_c, followed_c = _by_order(ratios_c, repeats > 1)
    return ParityResult(
        task=task,
        steps=len(h.losses),
        repeats=repeats,
        threads=threads,
        losses_equal=equal,
        max_abs_loss_diff=max_diff,
        params_equal=params_equal,
        harness_step_ms=statistics.median(h_ms[kept]),
        bare_step_ms=statistics.median(b_ms[kept]),
        harness_step_cpu_ms=statistics.median(h_cpu_ms[kept]),
        ratio_wall=_order_balanced(led_w, followed_w),
        ratio_cpu=_order_balanced(led_c, followed_c),
        ratio_wall_range=(min(ratios_w[kept]), max(ratios_w[kept])),
        ratio_wall_harness_first=statistics.median(led_w) if led_w else math.nan,
        ratio_wall_harness_second=statistics.median(followed_w) if followed_w else math.nan,
        bare_step_cpu_ms=statistics.median(b_cpu_ms[kept]),
        ratio_cpu_range=(min(ratios_c[kept]), max(ratios_c[kept])),
        ratio_cpu_harness_first=statistics.median(led_c) if led_c else math.nan,
        ratio_cpu_harness_second=statistics.median(followed_c) if followed_c else math.nan,
    )


def _by_order(ratios: list[float], drop_first: bool) -> tuple[list[float], list[float]]:
    """Per-repeat ratios split into (harness led: even repeats, harness followed: odd repeats)."""
    led = ratios[0::2][1:] if drop_first else ratios[0::2]
    return led, ratios[1::2]


def _order_balanced(led: list[float], followed: list[float]) -> float:
    """Geometric mean of the two orders' median ratios (one order's median if the other has none)."""
    medians = [statistics.median(r) for r in (led, followed) if r]
    return math.exp(sum(math.log(m) for m in medians) / len(medians))


# ----------------------------------------------------------------------------------------------
# Part 2: trick costs (time: every arm in one process, step by step in turn; memory: fresh processes)


class _Baton:
    """Round-robin turns for threads that train one step each in turn (exactly one runs at a time)."""

    def __init__(self, n: int) -> None:
        self.turn, self.active = 0, [True] * n
        self.cond = threading.Condition()

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i)

    def pass_on(self, i: int, finished: bool = False) -> None:
        with self.cond:
            self.active[i] = not finished
            n = len(self.active)
            nxt = next(((i + k) % n for k in range(1, n + 1) if self.active[(i + k) % n]), None)
            self.turn = nxt if nxt is not None else -1
            self.cond.notify_all()


def lockstep_train(cells: Sequence[Cell], threads: int = 1) -> list[TimedRun]:
    """Train ``cells`` with the harness in this process, one optimizer step each in turn, each step timed.

    One thread per run, but only one trains at any moment (a baton passed in each run's progress
    callback), so every run's step i runs within one round of the others' step i: a load burst hits
    all arms alike, and no run pays for another's process start or memory layout (fresh processes
    differ by ±20 % on a 1 ms step). Step windows exclude the hand-over; thread CPU time is per run.
    """
    from bench.loop import RunContext, train

    n = len(cells)
    baton = _Baton(n)
    walls: list[list[float]] = [[] for _ in range(n)]
    cpus: list[list[float]] = [[] for _ in range(n)]
    results: list[dict[str, Any] | BaseException] = [{} for _ in range(n)]

    def worker(i: int, run_dir: Path) -> None:
        baton.wait(i)
        start = [time.perf_counter(), time.thread_time()]

        def after_step(*_: Any) -> None:
            walls[i].append(time.perf_counter() - start[0])
            cpus[i].append(time.thread_time() - start[1])
            baton.pass_on(i)
            baton.wait(i)
            start[0], start[1] = time.perf_counter(), time.thread_time()

        try:
            results[i] = train(
                cells[i], run_dir, RunContext(threads=threads, on_progress=after_step, progress_interval_s=0)
            )
        except BaseException as exc:  # re-raised in the caller's thread
            results[i] = exc
        finally:
            baton.pass_on(i, finished=True)

    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        pool = [threading.Thread(target=worker, args=(i, Path(tmp) / f"{i}-{c.run_id}")) for i, c in enumerate(cells)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    for r in results:
        if isinstance(r, BaseException):
            raise r
    keep = slice(1, -1)  # step 1: construction and warm-up; last step: the final evaluation
    return [TimedRun([], [], walls[i][keep], cpus[i][keep], results[i], {}) for i in range(n)]


def _memory_run_in_child(cell: Cell, threads: int) -> dict[str, Any]:
    """Runs in a fresh spawned process: one harness run; its peak memory and status."""
    run = harness_train(cell, threads)
    return {"peak_mem_mb": run.result["cost"]["peak_mem_mb"], "status": run.result["status"]}


def trick_costs(
    task: str, steps: int | None = None, repeats: int = 3, threads: int = 1, seed: int = 0,
    tricks: Sequence[str] | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per arm (baseline first, then each trick alone with its task defaults).

    Time per sample = mean step time (steps 2..n−1: the mean keeps periodic costs such as
    snapshots) / samples per step. Each trick is timed against the baseline in one process,
    the two trained one step each in turn (:func:`lockstep_train`; which leads alternates
    between repeats): ``time_rel`` is the median of those paired ratios. Pairs, not all arms
    at once: a dozen models trained in turn evict each other from the caches and double every
    step. Peak memory = resident growth of a fresh process per arm (two at a time: memory does
    not depend on the neighbour), median over ``repeats``, relative to the baseline's.
    """
    from bench.spec import applicable_tricks
    from experiments.registry import get_task

    steps = steps or DEFAULT_STEPS.get(task, 100)
    names = list(tricks) if tricks is not None else list(applicable_tricks(get_task(task)))
    base_cell = perf_cell(task, {}, steps=steps, seed=seed)
    # each trick against a baseline on the same schedule: evaluation at the end only, or — for a trick whose card
    # needs evaluations to act on (checkpoint averaging chooses among them) — TRICK_COST_EVALS of them
    pairs: dict[str, tuple[Cell, Cell]] = {}
    refused: dict[str, str] = {}
    for name in names:
        try:
            pairs[name] = (base_cell, perf_cell(task, {name: None}, steps=steps, seed=seed))
        except ValueError:
            try:
                train = {"eval_every_samples": _evaluation_spacing(task, steps, seed)}
                pairs[name] = tuple(
                    perf_cell(task, on, steps=steps, seed=seed, train=train) for on in ({}, {name: None})
                )  # type: ignore[assignment]
            except ValueError as exc:  # its defaults cannot act on a short timed run: said in the table, not timed
                refused[name] = str(exc).splitlines()[-1].strip(" -")
    arms = [("baseline", {})] + [(t, {t: None}) for t in names if t in pairs]
    base_runs: list[TimedRun] = []
    timed: dict[str, list[TimedRun]] = {a: [] for a, _ in arms}
    ratios: dict[str, list[tuple[float, float]]] = {a: [] for a, _ in arms}

    def per_sample_s(run: TimedRun, cpu: bool = False) -> float:
        sps = run.result["cost"]["samples"] / max(1, run.result["cost"]["steps"])
        return statistics.mean(run.step_cpu_s if cpu else run.step_wall_s) / sps

    for r in range(repeats):
        for arm, _ in arms[1:]:
            pair = list(pairs[arm])
            base, trick = lockstep_train(pair, threads) if r % 2 == 0 else lockstep_train(pair[::-1], threads)[::-1]
            base_runs.append(base)
            timed[arm].append(trick)
            ratios[arm].append(
                (per_sample_s(trick) / per_sample_s(base), per_sample_s(trick, True) / per_sample_s(base, True))
            )
    timed["baseline"] = base_runs or lockstep_train([base_cell], threads)
    ratios["baseline"] = [(1.0, 1.0)]
    ctx = get_context("spawn")
    memory: dict[str, list[dict[str, Any]]] = {a: [] for a, _ in arms}
    with ProcessPoolExecutor(max_workers=2, mp_context=ctx, max_tasks_per_child=1) as pool:  # a fresh process each
        futures = [
            (arm, pool.submit(_memory_run_in_child, pairs[arm][1] if arm in pairs else base_cell, threads))
            for _ in range(repeats)
            for arm, _ in arms
        ]
        for arm, fut in futures:
            memory[arm].append(fut.result())
    rows = []
    base_mem = statistics.median(m["peak_mem_mb"] for m in memory["baseline"])
    for arm, _ in arms:
        runs = timed[arm]
        mem = statistics.median(m["peak_mem_mb"] for m in memory[arm])
        rows.append(
            {
                "task": task,
                "trick": arm,
                "steps": steps,
                "repeats": repeats,
                "us_per_sample": round(1e6 * statistics.median(per_sample_s(r) for r in runs), 3),
                "cpu_us_per_sample": round(1e6 * statistics.median(per_sample_s(r, True) for r in runs), 3),
                "peak_mem_mb": round(mem, 2),
                "final_eval_s": round(statistics.median(r.result["cost"]["eval_s"] for r in runs), 3),
                "status": ",".join(sorted({r.result["status"] for r in runs} | {m["status"] for m in memory[arm]})),
                "time_rel": round(statistics.median(w for w, _ in ratios[arm]), 3),
                "cpu_time_rel": round(statistics.median(c for _, c in ratios[arm]), 3),
                "mem_rel": round(mem / base_mem, 3) if base_mem > 0 else math.nan,
            }
        )
    for name, why in refused.items():
        rows.append({"task": task, "trick": name, "steps": steps, "repeats": 0, "status": f"not timed: {why}"})
    return rows


TRICK_COST_EVALS = 4  # evaluations of a timed run whose trick needs them (both arms of its pair evaluate alike)


def _evaluation_spacing(task: str, steps: int, seed: int) -> int:
    """``eval_every_samples`` giving a ``steps``-step run of ``task`` :data:`TRICK_COST_EVALS` evaluations."""
    probe = _validated(task, {}, {}, {}, seed)
    return max(1, steps // TRICK_COST_EVALS) * _samples_per_step(task, probe["params"], probe["train"], seed)


# ----------------------------------------------------------------------------------------------
# Part 3: EMA / averaging update cost and kernels


def _median_call_s(fn: Callable[[], None], calls: int = 200) -> tuple[float, float]:
    """Median wall and thread-CPU seconds of one ``fn()`` call (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    wall, cpu = [], []
    for _ in range(calls):
        w, c = time.perf_counter(), time.thread_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.thread_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def _op_counts(fn: Callable[[], None]) -> dict[str, int]:
    """aten operators one call of ``fn`` dispatches from Python (not those inside another aten op), by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for e in prof.events():
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


def averaging_costs(task: str, step_s: float, step_cpu_s: float, threads: int = 1, seed: int = 0) -> list[dict]:
    """Cost of one ``ema`` and one ``posthoc_ema`` update on ``task``'s model against one step.

    ``step_s``/``step_cpu_s``: the task's median harness step time without tricks (from
    :func:`parity`, same process and threads). Kernels: whether the update is one fused
    ``_foreach_lerp_`` and how many per-tensor copies it adds (buffers such as BN statistics).
    """
    from tricks import ema, weight_averaging

    torch.set_num_threads(threads)
    cell = perf_cell(task, seed=seed)

    streams = SeedBundle(seed)
    inst, _ = build_task(cell.config, streams, torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(streams.seed_for("init"))
        model = inst.build_model()
    sps = inst.samples_per_micro_batch(cell.config["train"]["batch_size"])
    averagers: dict[str, Callable[[], None]] = {}
    e = ema.EMA(model, half_life_samples=1000.0, samples_per_update=sps)
    e.update(model)  # the first update is a copy; time the steady state
    averagers["ema"] = lambda: e.update(model)
    ph = weight_averaging.PostHocEMA(model, snapshot_every_samples=10**9, samples_per_update=sps)
    averagers["posthoc_ema"] = lambda: ph.update(model)
    rows = []
    for name, fn in averagers.items():
        wall, cpu = _median_call_s(fn)
        ops = _op_counts(fn)
        rows.append(
            {
                "task": task,
                "update": name,
                "update_us": round(1e6 * wall, 1),
                "update_cpu_us": round(1e6 * cpu, 1),
                "step_ms": round(1e3 * step_s, 3),
                "overhead_pct": round(100 * wall / step_s, 2),
                "overhead_cpu_pct": round(100 * cpu / step_cpu_s, 2),
                "foreach_lerp_calls": ops.get("aten::_foreach_lerp_", 0),
                "per_tensor_lerp_calls": ops.get("aten::lerp_", 0),
                "per_tensor_copy_calls": ops.get("aten::copy_", 0),
                "ops_per_update": sum(ops.values()),
                "tensors": sum(1 for _ in model.parameters()) + sum(1 for _ in model.buffers()),
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Part 4: where the data lives


def data_residency(task: str, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The tensors a task instance holds (its in-memory dataset) and their devices; DataLoaders if any."""

    cell = perf_cell(task, seed=seed)
    dev = torch.device(device)
    inst, _ = build_task(cell.config, SeedBundle(seed), dev)
    tensors = {}
    for name, value in vars(inst).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for key, v in items:
            for i, t in enumerate(v if isinstance(v, tuple) else (v,)):
                if isinstance(t, torch.Tensor) and t.numel() > 0:
                    label = name + (f"[{key!r}]" if key != "" else "") + (f"[{i}]" if isinstance(v, tuple) else "")
                    tensors[label] = t
    loaders = [n for n, v in vars(inst).items() if isinstance(v, torch.utils.data.DataLoader)]
    off_device = [n for n, t in tensors.items() if t.device.type != dev.type]
    return {
        "task": task,
        "device": device,
        "tensors": ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items()) or "none (drawn per step)",
        "mb": round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20, 2),
        "not_on_device": ", ".join(off_device) or "none",
        "dataloaders": len(loaders),
    }


# ----------------------------------------------------------------------------------------------
# Part 5: seed-vectorized training


def vectorized_speed(
    seeds: int = 8,
    steps: int = 300,
    repeats: int = 3,
    threads: int = 1,
    params: dict[str, Any] | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``seeds`` toy_diffusion runs: one seed-vectorized group (:func:`bench.loop.train_group`) against the
    same runs one after another (:func:`bench.loop.train`), in this process.

    Both with ``threads`` threads, repeats interleaved (which goes first alternates); the first repeat
    (warm-up) is dropped. Training time (the runs' ``cost.train_s`` summed) and total time (building
    tasks and models, training, the final evaluation, writing the run folders) are reported, and the
    largest per-seed difference of the final metric (0 when the group computed the runs' numbers).
    On ``device`` cuda every run ends by reading its metrics back, so the times include the GPU's work.
    """
    from bench.grid import expand
    from bench.loop import RunContext, train, train_group

    params = params or {"eval_samples_per_class": 64, "final_samples_per_class": 64}
    probe = perf_cell("toy_diffusion", steps=steps, params=params)
    spec = parse_spec(
        {
            "grid": "perf-vectorized",
            "seeds": seeds,
            "tasks": {"toy_diffusion": {"params": params, "train": probe.config["train"], "tricks": {}}},
        }
    )
    cells = expand(spec)
    torch.set_num_threads(threads)
    ctx = RunContext(device=device, threads=threads)
    seq_total, seq_train, vec_total, vec_train, max_metric_diff = [], [], [], [], 0.0
    for r in range(repeats + 1):
        order = ("vec", "seq") if r % 2 == 0 else ("seq", "vec")
        with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
            for kind in order:
                t0 = time.perf_counter()
                if kind == "vec":
                    vec = train_group(cells, [Path(tmp) / "vec" / c.run_id for c in cells], ctx)
                    vec_total.append(time.perf_counter() - t0)
                    vec_train.append(sum(v["cost"]["train_s"] for v in vec))
                else:
                    seq = [train(c, Path(tmp) / "seq" / c.run_id, ctx) for c in cells]
                    seq_total.append(time.perf_counter() - t0)
                    seq_train.append(sum(s["cost"]["train_s"] for s in seq))
        for s, v in zip(seq, vec):
            max_metric_diff = max(max_metric_diff, abs(s["metric"]["swd"] - v["metric"]["swd"]))
    med = statistics.median
    return {
        "task": "toy_diffusion",
        "device": device,
        "seeds": seeds,
        "steps": vec[0]["cost"]["steps"],
        "batch_size": cells[0].config["train"]["batch_size"],
        "hidden": cells[0].config["params"]["hidden"],
        "threads": threads,
        "repeats": repeats,
        "sequential_train_s": round(med(seq_train[1:]), 3),
        "vectorized_train_s": round(med(vec_train[1:]), 3),
        "speedup_train": round(med(seq_train[1:]) / med(vec_train[1:]), 3),
        "sequential_total_s": round(med(seq_total[1:]), 3),
        "vectorized_total_s": round(med(vec_total[1:]), 3),
        "speedup_total": round(med(seq_total[1:]) / med(vec_total[1:]), 3),
        "max_abs_swd_diff": max_metric_diff,
    }


# ----------------------------------------------------------------------------------------------
# Part 6: scaling of a local grid, and the GPU-cluster estimate


SCALING_PARAMS = {"toy_diffusion": {"eval_samples_per_class": 256, "final_samples_per_class": 256}}


def grid_scaling(
    runs: Sequence[int] = (4, 8, 16), jobs: Sequence[int] = (1, 2), task: str = "toy_diffusion", steps: int = 500
) -> list[dict[str, Any]]:
    """Wall time of ``bench run``'s local executor for grids of ``runs`` seeds × ``jobs`` workers.

    Each grid: ``task`` at its default size (smaller final evaluation) for ``steps`` steps,
    baseline only, fresh results folder; the wall time includes starting the worker processes.
    """
    from bench.executors.local import run_local
    from bench.grid import expand

    params = SCALING_PARAMS.get(task, {})
    probe = perf_cell(task, steps=steps, params=params)
    rows = []
    for n in runs:
        spec = parse_spec(
            {
                "grid": "perf-scaling",
                "seeds": n,
                "tasks": {task: {"params": params, "train": probe.config["train"], "tricks": {}}},
            }
        )
        cells = expand(spec)
        for j in jobs:
            with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
                t0 = time.perf_counter()
                counts = run_local(cells, Path(tmp), j, show_progress=False)
                wall = time.perf_counter() - t0
            rows.append(
                {
                    "task": task,
                    "steps_per_run": steps,
                    "runs": n,
                    "jobs": j,
                    "wall_s": round(wall, 2),
                    "s_per_run": round(wall / n, 3),
                    "completed": counts.get("completed", 0),
                }
            )
    one_job = {r["runs"]: r["wall_s"] for r in rows if r["jobs"] == 1}
    for r in rows:
        r["speedup_vs_1_job"] = round(one_job[r["runs"]] / r["wall_s"], 2) if r["runs"] in one_job else math.nan
    return rows


LAUNCH_US = 10.0  # assumed cost of one eager op on a GPU (Python + dispatch + kernel launch), microseconds
GPU_TFLOPS = 20.0  # assumed effective fp32/TF32 throughput of an A100/H100-class GPU on these small matrices


def _top_level_ops(prof: Any) -> int:
    """aten operators called from Python (not from inside another aten op): one dispatch each."""
    return sum(
        1
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def step_profile(cell: Cell, threads: int = 1) -> dict[str, float]:
    """Ops, FLOPs and CPU time of one training step and one intermediate evaluation of ``cell``'s config.

    Built like :func:`bare_train` (the optimizer with ``foreach=True``, as it defaults on GPUs);
    one warm-up step, then one step profiled (aten ops called from Python, FLOPs by
    ``torch.utils.flop_counter``) and timed; the same for ``evaluate(final=False)``.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(threads)
    cfg, tr = cell.config, cell.config["train"]
    streams = SeedBundle(cell.seed)
    task, _ = build_task(cfg, streams, torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(streams.seed_for("init"))
        model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], foreach=True)
    bs = tr["batch_size"]

    def step(i: int) -> None:
        mb = MicroBatch(step=i, index=0, count=1, size=bs, progress=0.5)
        loss, _ = task.loss(model, task.batch(model, mb), mb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def evaluate() -> None:
        model.eval()
        with torch.no_grad():
            task.evaluate(model, False)
        model.train()

    step(0)
    out: dict[str, float] = {}
    for name, fn in (("step", lambda: step(1)), ("eval", evaluate)):
        t0 = time.thread_time()
        fn()
        out[f"cpu_{name}_s"] = time.thread_time() - t0
        with profile(activities=[ProfilerActivity.CPU]) as prof, FlopCounterMode(display=False) as flops:
            fn()
        out[f"ops_{name}"] = _top_level_ops(prof)
        out[f"flops_{name}"] = float(flops.get_total_flops())
    return out


def _data_available(task: str, params: dict[str, Any]) -> bool:
    """Whether ``task`` with ``params`` can load its data set here (CIFAR-10 offline: no)."""
    try:
        build_task(_validated(task, {}, params, {}, 0), SeedBundle(0), torch.device("cpu"))
    except Exception:
        return False
    return True


def cluster_estimate(
    grids: Sequence[Path],
    runs: int = 1000,
    gpus: int = 8,
    runs_per_gpu: int = 8,
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Wall time of a ``runs``-run grid on ``gpus`` GPUs, per task config of the full grids ``grids``.

    Per run: steps × t_step + evaluations × t_eval, each t = max(ops × LAUNCH_US, FLOPs /
    GPU_TFLOPS) — eager PyTorch on a GPU is bound by per-op dispatch for models this small, by
    arithmetic for large ones. Ops and FLOPs are counted here on CPU (:func:`step_profile`);
    LAUNCH_US and GPU_TFLOPS are assumptions. The final evaluation is counted as an intermediate
    one. ``runs_per_gpu`` runs share a GPU without slowing each other (each has its own CPU
    core; the GPU is mostly idle for these models); waves = ceil(runs / (gpus × runs_per_gpu)).
    Also given: the same run on one CPU core of this machine, from the measured CPU times.
    """
    from bench.spec import load_spec

    rows = []
    for path in grids:
        spec = load_spec(path)
        for t in spec.tasks:
            if t.params.get("data") not in (None, "offline") and not _data_available(t.task, t.params):
                # ops and FLOPs depend on the shapes, not the images: the built-in offline set stands in
                t = dataclasses.replace(t, params=t.params | {"data": "offline"})
            sps = _samples_per_step(t.task, t.params, t.train, 0)
            steps = math.ceil(t.train["budget_samples"] / sps)
            evals = math.ceil(t.train["budget_samples"] / t.train["eval_every_samples"])
            config = {"task": t.task, "params": t.params, "train": t.train, "tricks": {}, "seed": 0}
            prof = step_profile(Cell(path.stem, t.label, "baseline", (), 0, config, run_id_of(config)), threads)
            t_step = max(prof["ops_step"] * LAUNCH_US * 1e-6, prof["flops_step"] / (GPU_TFLOPS * 1e12))
            t_eval = max(prof["ops_eval"] * LAUNCH_US * 1e-6, prof["flops_eval"] / (GPU_TFLOPS * 1e12))
            per_run = steps * t_step + evals * t_eval
            cpu_run = steps * prof["cpu_step_s"] + evals * prof["cpu_eval_s"]
            waves = math.ceil(runs / (gpus * runs_per_gpu))
            rows.append(
                {
                    "grid": path.name,
                    "task": t.label,
                    "steps_per_run": steps,
                    "evals_per_run": evals,
                    "ops_per_step": int(prof["ops_step"]),
                    "gflop_per_step": round(prof["flops_step"] / 1e9, 3),
                    "est_gpu_step_ms": round(1e3 * t_step, 3),
                    "est_gpu_run_s": round(per_run, 1),
                    "cpu_core_run_s": round(cpu_run, 1),
                    "runs": runs,
                    "gpus": gpus,
                    "runs_per_gpu": runs_per_gpu,
                    "waves": waves,
                    "est_grid_h": round(waves * per_run / 3600, 2),
                    "est_gpu_hours": round(runs * per_run / runs_per_gpu / 3600, 2),
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------
# Part 7: grid throughput — a grid through `bench run` against the bare training loops of its runs

#: the throughput grid's arms: the full factorial of three task-role tricks (2^3 = 8 arms, baseline included).
#: Task-role tricks act inside the task's batch/loss, so the bare loop trains every arm exactly as the harness does
GRID_TRICKS = ("fourier_features", "stratified_sampling", "cond_noise")
#: short runs: a final evaluation only, a light sampler (what per-run fixed costs weigh most on)
GRID_PARAMS = {"sampling_steps": 16, "eval_samples_per_class": 64, "final_samples_per_class": 64}
GRID_BATCH = 128
GRID_TARGET_CPU = 1.15  # bench run's CPU time / the bare loops' (issue 18)
GRID_TARGET_SPEEDUP = 3.0  # seed-vectorized bench run against per-run bench run, end to end (wall)


def throughput_spec(seeds: int = 8, steps: int = 200, tricks: Sequence[str] = GRID_TRICKS) -> dict[str, Any]:
    """The throughput grid: toy_diffusion, ``2**len(tricks)`` arms × ``seeds`` seeds, ``steps`` steps per run."""
    budget = steps * GRID_BATCH
    train = {"budget_samples": budget, "batch_size": GRID_BATCH, "eval_every_samples": budget,
             "checkpoint_every_samples": budget}  # fmt: skip
    return {
        "grid": "perf-throughput",
        "design": "full_factorial",
        "seeds": seeds,
        "tasks": {"toy_diffusion": {"params": GRID_PARAMS, "train": train, "tricks": {t: None for t in tricks}}},
    }


def bare_grid(spec: dict[str, Any], threads: int = 1, device: str = "cpu") -> dict[str, float]:
    """Every run of ``spec`` by :class:`BareLoop` then one final evaluation, one after another in this process.

    Returns the process CPU and wall seconds of those loops alone (task and model construction, steps,
    evaluation; not the imports, which a script training many configs pays once).
    """
    from bench.grid import expand

    cells = expand(parse_spec(spec))
    torch.set_num_threads(threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for cell in cells:
        bare = BareLoop(cell, threads, device)
        for _ in range(bare.steps):
            bare.step()
        bare.evaluate()
    return {"runs": len(cells), "cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed_child(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``argv`` to the end; (wall s, CPU s of it and every process it waited for, stdout)."""
    import subprocess

    cpu0, wall0 = _children_cpu_s(), time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    wall, cpu = time.perf_counter() - wall0, _children_cpu_s() - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return wall, cpu, done.stdout


def grid_throughput(
    seeds: int = 8,
    steps: int = 200,
    repeats: int = 3,
    jobs: int = 2,
    vectorize: int = 8,
    tricks: Sequence[str] = GRID_TRICKS,
    threads: int = 1,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """A ``2**len(tricks)``-arm × ``seeds``-seed toy_diffusion grid, three ways, each in fresh processes:

    - ``bench run`` (local executor, ``jobs`` workers, no report): wall time, and the CPU time of the
      launching process and everything it started (``RUSAGE_CHILDREN``: its workers); on ``device`` cuda
      ``--device cuda --runs-per-gpu jobs`` (``jobs`` runs share the one GPU);
    - the same with ``--vectorize-seeds`` ``vectorize``;
    - the bare loops of the same runs (:func:`bare_grid`, in a fresh Python): their CPU time.

    Repeats interleave the three (the order rotates), each into a fresh results folder; every repeat
    is kept (process-level timings have no warm-up to drop). Returns one row per measure with the
    median and the range over repeats; ratios are formed within each repeat, then summarised.
    """
    spec = throughput_spec(seeds, steps, tricks)
    runs = seeds * 2 ** len(tricks)
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    import json

    with tempfile.TemporaryDirectory(prefix="bench-perf-grid-") as tmp:
        folder = Path(tmp)
        spec_path = folder / "throughput.yaml"
        spec_path.write_text(json.dumps(spec))  # JSON is YAML
        kinds = ("run", "vectorized", "bare")
        for r in range(repeats):
            per: dict[str, tuple[float, float]] = {}
            for kind in kinds[r % 3 :] + kinds[: r % 3]:
                if kind == "bare":
                    code = (
                        "import json, sys; from bench.perf import bare_grid; "
                        f"print(json.dumps(bare_grid(json.loads(sys.argv[1]), {threads}, {device!r})))"
                    )
                    wall, cpu, out = _timed_child([sys.executable, "-c", code, json.dumps(spec)], folder)
                    loops = json.loads(out.strip().splitlines()[-1])
                    per[kind] = (loops["wall_s"], loops["cpu_s"])
                    per["bare process"] = (wall, cpu)
                    add("bare process CPU s (with interpreter start and imports)", cpu)
                    continue
                flags = ["--vectorize-seeds", str(vectorize)] if kind == "vectorized" else []
                results = folder / f"results-{r}-{kind}"
                argv = [sys.executable, "-m", "bench.cli", "run", str(spec_path), "--results", str(results)]
                on_gpu = ["--device", device, "--runs-per-gpu", str(jobs)]
                parallel = ["--jobs", str(jobs)] if device == "cpu" else on_gpu
                argv += [*parallel, "--threads", str(threads), "--no-report", "--no-progress", *flags]
                wall, cpu, out = _timed_child(argv, folder)
                if f"trained: {runs} completed" not in out:
                    raise RuntimeError(f"bench run {' '.join(flags)}: not every run completed: {out[-400:]}")
                per[kind] = (wall, cpu)
            add("bench run: wall s", per["run"][0])
            add("bench run: CPU s", per["run"][1])
            add(f"bench run --vectorize-seeds {vectorize}: wall s", per["vectorized"][0])
            add(f"bench run --vectorize-seeds {vectorize}: CPU s", per["vectorized"][1])
            add("bare loops: CPU s (sum of the loops)", per["bare"][1])
            add("CPU ratio: bench run / bare loops", per["run"][1] / per["bare"][1])
            # the same imports paid once on both sides: a script training the 64 configs must import torch too
            add("CPU ratio: bench run / bare process", per["run"][1] / per["bare process"][1])
            add(
                f"CPU ratio: bench run --vectorize-seeds {vectorize} / bare loops",
                per["vectorized"][1] / per["bare"][1],
            )
            add(f"speedup, wall: bench run / --vectorize-seeds {vectorize}", per["run"][0] / per["vectorized"][0])
            add(f"speedup, CPU: bench run / --vectorize-seeds {vectorize}", per["run"][1] / per["vectorized"][1])
    targets = {
        "CPU ratio: bench run / bare loops": f"≤ {GRID_TARGET_CPU}",
        f"speedup, wall: bench run / --vectorize-seeds {vectorize}": f"≥ {GRID_TARGET_SPEEDUP}",
    }
    rows = []
    for key, values in samples.items():
        rows.append(
            {
                "measure": key,
                "median": round(statistics.median(values), 3),
                "min": round(min(values), 3),
                "max": round(max(values), 3),
                "repeats": len(values),
                "target": targets.get(key, ""),
                "runs": runs,
                "steps_per_run": steps,
                "jobs": jobs,
                "device": device,
            }
        )
    return rows


# ----------------------------------------------------------------------------------------------
# Tables, machine, CLI


def machine_description() -> dict[str, str]:
    """CPU model, usable cores, torch version and threads, load average now."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpu": model,
        "cores": str(cores),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1_5_15min": load,
    }


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of ``rows`` (the keys of the first row are the columns)."""
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4g}"
    return str(v)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def output_folder(parent: Path) -> Path:
    """A new folder ``<parent>/<YYYYmmdd-HHMMSS>`` for one invocation (``-2``, ``-3``... when taken): never reused."""
    parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = parent / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"--out: {parent} has 999 folders named {stamp}*; allowed: a parent folder with room")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench perf`` options."""
    parser.description = __doc__.split("\n\n")[0] if __doc__ else None
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to measure (default: every task that imports)")
    parser.add_argument(
        "--repeats", type=int, default=7, help="timed repeats per measurement (default 7; first dropped)"
    )
    parser.add_argument("--trick-repeats", type=int, default=3, help="fresh-process repeats per trick arm (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1, as grids run)")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per timed run (default: per task, a few seconds)"
    )
    parser.add_argument(
        "--vectorized-seeds", type=int, default=8, help="seeds S of the vectorized benchmarks (default 8)"
    )
    parser.add_argument("--grid-seeds", type=int, default=8, help="seeds per arm of the throughput grid (default 8)")
    parser.add_argument(
        "--grid-steps", type=int, default=200, help="steps per run of the throughput grid (default 200)"
    )
    parser.add_argument(
        "--grid-repeats", type=int, default=3, help="interleaved repeats of the throughput grid (default 3)"
    )
    parser.add_argument(
        "--grid-jobs", type=int, default=None, help="--jobs of the throughput grid's bench run (default: one per core)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="parent folder of the results: each invocation writes a new <out>/<date-time>/ (default: "
        "./benchmarks-out)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the vectorized and grid parts train (default cpu; cuda: the grid's runs share one GPU, "
        "--grid-jobs at a time); the other parts measure CPU steps only",
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke pass (few steps and repeats; noisy)")


def run(args: argparse.Namespace) -> int:
    """Run the selected parts, print and write the tables. Exit 1 if harness and bare losses disagree."""
    from experiments.registry import available_tasks

    tasks = args.tasks or list(available_tasks())
    unknown = [t for t in tasks if t not in available_tasks()]
    if unknown:
        raise ValueError(f"--tasks: {', '.join(unknown)} not available; allowed: {', '.join(available_tasks())}")
    for name in ("repeats", "trick_repeats", "threads", "vectorized_seeds", "grid_seeds", "grid_steps", "grid_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: {getattr(args, name)} is not allowed; allowed: ≥ 1")
    if args.steps is not None and args.steps < 3:
        raise ValueError(f"--steps: {args.steps} is not allowed; allowed: ≥ 3 (first and last steps are not timed)")
    repeats, trick_repeats = (2, 1) if args.quick else (args.repeats, args.trick_repeats)
    device = args.device
    if device != "cpu":
        cpu_only = [p for p in args.only if p not in ("vectorized", "grid")]
        if cpu_only:
            raise ValueError(
                f"--device: {device!r} is not allowed with --only {' '.join(cpu_only)}; allowed: cpu, or --only "
                "vectorized grid (the other parts time CPU steps)"
            )
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} is not allowed here: CUDA is not available")

    def steps_for(task: str, table: dict[str, int] = DEFAULT_STEPS) -> int:
        base = args.steps or table.get(task, 100)
        return max(3, base // 5) if args.quick else base

    if args.grid_jobs is not None and args.grid_jobs < 1:
        raise ValueError(f"--grid-jobs: {args.grid_jobs} is not allowed; allowed: ≥ 1")
    from bench.executors.local import default_jobs

    machine = machine_description()
    out = output_folder(args.out)
    sections: list[str] = []
    tables: dict[str, list[dict[str, Any]]] = {}
    ok = True

    header = "# bench perf\n\n" + "\n".join(f"- {k}: {v}" for k, v in machine.items())
    options = (
        f"--only {' '.join(args.only)} --tasks {' '.join(tasks)} --repeats {repeats} --trick-repeats {trick_repeats} "
        f"--threads {args.threads}"
        + (f" --steps {args.steps}" if args.steps else "")
        + (f" --vectorized-seeds {args.vectorized_seeds}" if {"vectorized", "grid"} & set(args.only) else "")
        + (
            f" --grid-seeds {args.grid_seeds} --grid-steps {args.grid_steps} --grid-repeats {args.grid_repeats}"
            f" --grid-jobs {args.grid_jobs or default_jobs()}"
            if "grid" in args.only
            else ""
        )
        + (f" --device {device}" if device != "cpu" else "")
        + (" --quick" if args.quick else "")
    )
    header += f"\n- command: bench perf {options}\n\n"
    md_path = out / "perf.md"

    def emit(part: str, title: str, rows: list[dict[str, Any]], note: str = "") -> None:
        """Print a part's table and write it at once (perf.md so far, the part's CSV): a later part that fails
        or is interrupted leaves the finished ones on disk."""
        text = f"## {title}\n\n{note}\n\n{format_table(rows)}" if note else f"## {title}\n\n{format_table(rows)}"
        print(text, flush=True)
        sections.append(text)
        tables[part] = rows
        md_path.write_text(header + "\n".join(sections))
        _write_csv(out / f"{part}.csv", rows)

    print(f"machine: {machine}", flush=True)
    parity_rows: dict[str, ParityResult] = {}
    if "parity" in args.only or "ema" in args.only:
        for task in tasks:
            parity_rows[task] = res = parity(task, steps_for(task), repeats, args.threads)
            ok &= res.agree
            if not res.agree:
                print(f"error: {task}: harness and bare losses differ by {res.max_abs_loss_diff:.3g}", file=sys.stderr)
        emit(
            "parity",
            "Harness vs bare PyTorch loop (no tricks)",
            [p.row() for p in parity_rows.values()],
            "Both loops train interleaved step by step in one process; step time = median over steps 2..n-1; "
            f"ratio = harness/bare over {repeats} repeats, the first dropped; the harness trains each step "
            "before the bare loop in even repeats and after it in odd ones (a loop repeating the other's "
            "identical computation runs ~1-2 % faster), and ratio_wall is the geometric mean of the two "
            f"orders' medians (range over the kept repeats). Target ≤ {TARGET_RATIO}. Losses must agree to "
            f"{DECIMALS} decimals.",
        )
    if "tricks" in args.only:
        rows = [
            r for task in tasks for r in trick_costs(task, steps_for(task, TRICK_STEPS), trick_repeats, args.threads)
        ]
        emit(
            "tricks",
            "Cost of each trick relative to the baseline",
            rows,
            "Time per sample = mean step time (steps 2..n-1) / samples per step; each trick trained against the "
            "baseline in one process, one step each in turn (which leads alternates between repeats); time_rel = "
            "median of those paired ratios. Peak memory = resident-memory growth of a fresh process per arm (CPU: "
            f"sampled every 50 ms, approximate; exact on CUDA). Medians over {trick_repeats} repeats.",
        )
    if "ema" in args.only:
        rows = [
            r
            for task in tasks
            for r in averaging_costs(
                task,
                parity_rows[task].harness_step_ms / 1e3,
                parity_rows[task].harness_step_cpu_ms / 1e3,
                args.threads,
            )
        ]
        emit(
            "ema",
            "EMA and post-hoc EMA update cost per optimizer step",
            rows,
            "overhead = one update / the task's median harness step (no tricks). A fused update is one "
            "aten::_foreach_lerp_; per-tensor copies are buffers (BatchNorm statistics) copied one by one.",
        )
    if "data" in args.only:
        emit("data", "Where the training data lives", [data_residency(t) for t in tasks])
    if "vectorized" in args.only:
        vec_steps = max(10, steps_for("toy_diffusion"))
        row = vectorized_speed(args.vectorized_seeds, vec_steps, max(1, repeats - 1), args.threads, device=device)
        emit(
            "vectorized",
            "Seed-vectorized training (bench.loop.train_group) vs the same runs one after another",
            [row],
            "Same process and threads; times are medians over repeats (first dropped). total = building tasks and "
            "models + training + final evaluation + writing the run folders (per seed in both).",
        )
    if "grid" in args.only:
        grid_jobs = args.grid_jobs or default_jobs()
        grid_kw = (
            {"seeds": 2, "steps": 20, "repeats": 1, "tricks": GRID_TRICKS[:1]}
            if args.quick
            else {"seeds": args.grid_seeds, "steps": args.grid_steps, "repeats": args.grid_repeats}
        )
        launch = f"--jobs {grid_jobs}" if device == "cpu" else f"--device {device} --runs-per-gpu {grid_jobs}"
        rows = grid_throughput(
            jobs=grid_jobs, vectorize=args.vectorized_seeds, threads=args.threads, device=device, **grid_kw
        )
        emit(
            "grid",
            "Grid throughput: bench run vs the bare training loops of its runs, and seed-vectorized",
            rows,
            f"toy_diffusion, full factorial of {', '.join(grid_kw.get('tricks', GRID_TRICKS))} (task-role tricks: "
            "the bare loop trains every arm as the harness does), evaluation at the end only. bench run: a fresh "
            f"`bench run {launch} --no-report` (CPU = that process and every process it waited for: "
            "workers); bare loops: BareLoop + one final evaluation per run, one after another in a fresh "
            "Python, CPU of the loops alone (imports excluded), and of that whole process (interpreter start and "
            "imports paid once, as by bench run: the `bare process` ratio). The three "
            "are interleaved (rotating order), each repeat kept; ratios are formed within a repeat. Targets (issue "
            f"18): bench run ≤ {GRID_TARGET_CPU}× the bare loops' CPU; seed-vectorized ≥ {GRID_TARGET_SPEEDUP}× "
            "faster end to end than per-run bench run.",
        )
    if "scaling" in args.only:
        sizes = (2, 4) if args.quick else (4, 8, 16)
        rows = grid_scaling(runs=sizes, steps=50 if args.quick else 500)
        emit("scaling", "Local grid wall time by runs and --jobs", rows)
        grids_dir = Path(__file__).resolve().parent.parent / "experiments" / "grids"
        grid_files = sorted(grids_dir.glob("*_full.yaml")) or [grids_dir / "quick.yaml"]
        est = cluster_estimate(grid_files, threads=args.threads)
        emit(
            "cluster",
            "Estimate: a 1,000-run grid on a GPU cluster",
            est,
            f"Per run = steps × t_step + evaluations × t_eval (final evaluation counted as an intermediate one), "
            f"t = max(ops × {LAUNCH_US:g} µs, FLOPs / {GPU_TFLOPS:g} TFLOP/s): ops (aten ops called from Python "
            "per step / evaluation) and FLOPs counted on this machine for each full grid's configuration; the "
            f"{LAUNCH_US:g} µs per eager op and {GPU_TFLOPS:g} TFLOP/s effective are assumptions for an "
            "A100/H100-class GPU. 8 GPUs, 8 runs packed per GPU (--runs-per-gpu 8, one CPU core per run), all "
            "runs equally long: waves = ceil(1000 / 64). cpu_core_run_s: the same run on one core of this "
            "machine (measured step and evaluation times). A grid whose data set is not on this machine (CIFAR-10 "
            "offline) is counted on the task's built-in offline data: the same shapes, so the same ops and FLOPs.",
        )

    print(f"written: {md_path} and {len(tables)} CSV file(s) in {out}")
    return 0 if ok else 1
