"""Mirror a run's metrics to Weights & Biases — opt-in, and never in the way of training.

The local store (``results/<grid>/runs/<run_id>/``) is the truth; wandb is a mirror of it.
Switch it on per grid (the spec's ``wandb:`` block, see ``bench.spec.WANDB_PARAMS``) or per
launch (``bench run --wandb / --no-wandb``, which overrides the spec; merge the two with
:func:`wandb_settings`).

How a worker uses it (``bench/executors/worker.py``)::

    tracker = make_tracker(cell, run_dir, wandb_cfg, code_version=...)   # None when off or unavailable
    result = train_cell(cell, run_dir, replace(ctx, tracker=tracker))      # the loop calls tracker.log(step, {...})
    if tracker is not None:
        tracker.finish(result)                                             # summary, then wandb's own finish()

What a mirrored run looks like (W&B conventions, so W&B's own charts answer "does the arm help"):

- id = ``<grid>-<run_id>`` (:func:`wandb_run_id`), so a resumed or re-launched run (any
  executor, any node) continues the same wandb run (``resume="allow"``);
- group = ``<grid>/<task>/<arm>`` (:func:`wandb_group`): W&B's grouped charts draw one line per
  arm with the seeds as its band, so arms are compared, never averaged together;
  ``job_type`` = the task label; tags = the task, each trick that is on (``baseline`` when
  none); name = ``<task> <arm> s<seed>``; config = the resolved config plus grid, arm, seed,
  run_id and code version (group-by any of them in the UI);
- history: the training curve from :meth:`WandbTracker.log_train` — ``train/loss``,
  ``train/grad_norm`` (means over a stride of steps), ``train/grad_norm_max`` (its max, so a
  spike is not averaged away) and ``train/lr`` — at every step for runs of up to
  :data:`MAX_TRAIN_POINTS` steps, else at a stride that keeps a run near that many points;
  plus the evaluations (``eval/<metric>``) from :meth:`WandbTracker.log`, merged into the row
  of their step. Steps are optimizer steps (``step=``); charts use ``samples`` as the x axis;
- summary: ``status`` of every run (completed, diverged, incomplete, failed, interrupted),
  and for finished runs its final ``metric/*``, ``stability/*`` and ``cost/*`` numbers;
- files under ``<run_dir>/wandb/`` (or ``$WANDB_DIR/wandb/``).

Where the project, entity and folder come from (W&B's own precedence: what a program passes to
``wandb.init`` beats the environment, so the harness passes only what the user chose): the
spec's ``wandb.project`` when it is not the default ``trickbench``, else ``WANDB_PROJECT``,
else ``trickbench``; ``WANDB_ENTITY`` (or the spec's ``entity``, when the spec has one), else
the account's default entity; ``WANDB_DIR``, else the run folder.

No step is logged twice: the last step handed to wandb is kept in ``<run_dir>/wandb_state.json``
(replaced atomically *before* the row is handed to wandb), and after a resume every step ≤ it
is skipped. A run killed after its last checkpoint replays those steps; they are not sent again
(a kill between the state write and wandb's own write loses that one row in the mirror rather
than duplicating it). Training rows are handed to wandb in batches — at every evaluation (which
joins the row of its step) and otherwise at most every :data:`SEND_INTERVAL_S` — so the state
file is written a few times a minute, not per row; a kill loses the rows held since the last
batch only where the resume does not replay them (rows before the run's last checkpoint).

Modes: ``offline`` writes only local files (``wandb sync <run_dir>/wandb/offline-run-*`` uploads
them later) and never touches the network; ``online`` streams; ``auto`` is online when an
account is configured (``WANDB_API_KEY``, or a ``.netrc`` entry for the wandb host) and offline
otherwise. ``WANDB_MODE`` in the environment wins over the spec and the flag
(``disabled`` switches mirroring off).

Failure never reaches training: ``wandb.init`` is bounded by ``init_timeout_s``; an online
init that fails (unreachable host, bad key) warns once and falls back to offline files — and
later runs in the same process go offline directly, so a grid pays the timeout at most once
per worker process; any error of ``log``/``finish`` warns once and switches the tracker off.
``finish`` is bounded too (``FINISH_TIMEOUT_S``); what did not upload stays on disk for ``wandb sync``.
"""

from __future__ import annotations

import hashlib
import json
import math
import netrc
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from bench import store
from bench.grid import Cell

__all__ = [
    "FINISH_TIMEOUT_S",
    "INIT_TIMEOUT_S",
    "MAX_TRAIN_POINTS",
    "STATE_FILE",
    "Tracker",
    "WandbTracker",
    "account_configured",
    "make_tracker",
    "resolve_mode",
    "train_stride",
    "wandb_group",
    "wandb_run_id",
    "wandb_settings",
]

INIT_TIMEOUT_S = 20.0  # longest wandb.init may take before the run goes on (offline) without it
FINISH_TIMEOUT_S = 30.0  # longest wandb's finish() may wait for uploads; the rest stays on disk for `wandb sync`
STATE_FILE = "wandb_state.json"  # in the run folder: the wandb id and the last step handed to wandb
DEFAULT_HOST = "https://api.wandb.ai"
DEFAULT_PROJECT = "trickbench"
MAX_ID_CHARS = 64
MAX_GROUP_CHARS = 128  # W&B's limit on a group name
MAX_TRAIN_POINTS = 1000  # training-curve rows per run at most (plus the final partial stride)
SEND_INTERVAL_S = 2.0  # training rows are handed to wandb in batches at most this often (and at every evaluation)
_ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "run": "online", "dryrun": "offline"}

# hosts this process failed to reach online: later runs in this process mirror offline at once
_unreachable_hosts: set[str] = set()


class Tracker(Protocol):
    """What the loop and the worker need from a metrics mirror (``RunContext.tracker``)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def log_train(self, step: int, samples: int, loss: float, grad_norm: float, lr: float) -> None: ...

    def finish(self, result: Mapping[str, Any] | None = None) -> None: ...


def wandb_settings(spec_cfg: Mapping[str, Any] | None, flag: bool | None = None) -> dict[str, Any]:
    """The spec's ``wandb`` block with the ``--wandb/--no-wandb`` flag applied (the flag wins when given)."""
    cfg = {"enabled": False, "project": "trickbench", "mode": "auto", **(spec_cfg or {})}
    if flag is not None:
        cfg["enabled"] = bool(flag)
    return cfg


def _host(env: Mapping[str, str]) -> str:
    return env.get("WANDB_BASE_URL") or DEFAULT_HOST


def account_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when wandb has credentials: ``WANDB_API_KEY``, or a ``.netrc`` entry ($NETRC or ~/.netrc) for the host."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    path = Path(env.get("NETRC") or Path.home() / ".netrc")
    netloc = urlsplit(_host(env)).netloc
    if not netloc or not path.is_file():
        return False
    try:
        entry = netrc.netrc(str(path)).authenticators(netloc)
    except (netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def resolve_mode(cfg_mode: str, env: Mapping[str, str] | None = None) -> str:
    """``online`` | ``offline`` | ``disabled`` for a spec mode (auto/online/offline); ``WANDB_MODE`` wins.

    Raises ``ValueError`` naming the value when ``WANDB_MODE`` or ``cfg_mode`` is not a known mode.
    """
    env = os.environ if env is None else env
    forced = env.get("WANDB_MODE", "").strip().lower()
    if forced:
        if forced not in _ENV_MODES:
            raise ValueError(
                f"WANDB_MODE={env['WANDB_MODE']!r} is not allowed; allowed: {', '.join(sorted(_ENV_MODES))}"
            )
        return _ENV_MODES[forced]
    if cfg_mode == "auto":
        return "online" if account_configured(env) else "offline"
    if cfg_mode not in ("online", "offline"):
        raise ValueError(f"wandb.mode: {cfg_mode!r} is not allowed; allowed: auto, online, offline")
    return cfg_mode


def wandb_run_id(cell: Cell) -> str:
    """``<grid>-<run_id>``: stable across launches, resumes and executors; unique across grids of a project.

    (The run_id alone is a content hash, so the same config in two grids would share a wandb
    run.) Grid names longer than fit in 64 characters are replaced by a hash prefix.
    """
    rid = f"{cell.grid}-{cell.run_id}"
    if len(rid) > MAX_ID_CHARS:
        rid = f"g{hashlib.sha256(cell.grid.encode()).hexdigest()[:12]}-{cell.run_id}"
    return rid


def wandb_group(cell: Cell) -> str:
    """``<grid>/<task>/<arm>``: the seeds of one arm form a group, so W&B compares arms.

    Longer than W&B's 128 characters (factorial arms of many tricks): the arm is replaced by a hash.
    """
    group = f"{cell.grid}/{cell.task}/{cell.arm}"
    if len(group) > MAX_GROUP_CHARS:
        group = f"{cell.grid}/{cell.task}/arm-{hashlib.sha256(cell.arm.encode()).hexdigest()[:12]}"
    return group[:MAX_GROUP_CHARS]


def train_stride(total_steps: int, max_points: int | None = None) -> int:
    """Optimizer steps per training-curve row: 1 up to ``max_points`` steps, else ⌈total / max_points⌉.

    ``max_points`` defaults to :data:`MAX_TRAIN_POINTS` (read at call time).
    """
    return max(1, math.ceil(total_steps / (max_points or MAX_TRAIN_POINTS)))


def _read_last_step(path: Path, wandb_id: str) -> int:
    """The last step handed to wandb for this id (−1 when none; a state of another id is ignored)."""
    if not path.exists():
        return -1
    try:
        state = store.read_json(path)
    except (OSError, ValueError):
        return -1  # written atomically, so only a hand-edited file gets here; re-logging beats crashing
    return int(state["last_step"]) if state.get("wandb_id") == wandb_id else -1


def _flat_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": result.get("status")}
    if result.get("status") not in store.RunStatus.FINISHED:
        return out  # an interrupted or failed run has no final numbers yet
    for section in ("metric", "stability", "cost"):
        for k, v in (result.get(section) or {}).items():
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                out[f"{section}/{k}"] = v
    return out


class _Window:
    """The training steps of one curve row: sums and max, the last step's samples and lr."""

    __slots__ = ("grad_norm_max", "grad_norm_sum", "loss_sum", "lr", "n", "samples", "step")

    def __init__(self) -> None:
        self.n, self.loss_sum, self.grad_norm_sum, self.grad_norm_max = 0, 0.0, 0.0, -math.inf
        self.step, self.samples, self.lr = -1, 0, 0.0

    def add(self, step: int, samples: int, loss: float, grad_norm: float, lr: float) -> None:
        self.n += 1
        self.loss_sum += loss
        self.grad_norm_sum += grad_norm
        self.grad_norm_max = max(self.grad_norm_max, grad_norm)
        self.step, self.samples, self.lr = step, samples, lr

    def row(self) -> dict[str, float]:
        return {
            "samples": self.samples,
            "train/loss": self.loss_sum / self.n,
            "train/grad_norm": self.grad_norm_sum / self.n,
            "train/grad_norm_max": self.grad_norm_max,
            "train/lr": self.lr,
        }


class WandbTracker:
    """One run's mirror. Built by :func:`make_tracker`; every wandb call is guarded.

    The loop calls ``log_train`` after every optimizer step and ``log`` at every evaluation;
    the worker calls ``finish`` once after training returns. After the first wandb error the
    tracker is inactive (one warning). ``budget_samples`` (the run's ``train.budget_samples``)
    sets the curve's stride; without it every step is a row.
    """

    def __init__(self, run: Any, run_dir: Path, wandb_id: str, mode: str, budget_samples: int | None = None) -> None:
        self.run = run
        self.wandb_id = wandb_id
        self.mode = mode
        self.state_path = run_dir / STATE_FILE
        self.last_step = _read_last_step(self.state_path, wandb_id)
        self.active = True
        self.budget_samples = budget_samples
        self.stride: int | None = None  # known at the first training step (samples per step)
        self.final_step: int | None = None
        self._window: _Window | None = None
        self._rows: list[tuple[int, dict[str, Any]]] = []  # rows not yet handed to wandb
        self._sent_at = time.monotonic()

    def _disable(self, what: str, exc: BaseException) -> None:
        self.active = False
        warnings.warn(
            f"wandb {what} failed ({exc!r}); not mirroring run {self.wandb_id} any further. "
            "Training is unaffected and the local results are complete.",
            RuntimeWarning,
            stacklevel=3,
        )

    def log_train(self, step: int, samples: int, loss: float, grad_norm: float, lr: float) -> None:
        """One optimizer step's training numbers (the loop calls it after every step; a few float ops).

        Steps are gathered into windows of :attr:`stride` steps; a full window (or the run's last
        step) becomes one curve row. Never raises; steps ≤ the last one mirrored are skipped.
        """
        if not self.active or step <= self.last_step:
            return
        try:
            if self.stride is None:
                samples_per_step = samples / (step + 1)
                total = math.ceil(self.budget_samples / samples_per_step) if self.budget_samples else step + 1
                self.final_step = max(1, total) - 1
                self.stride = train_stride(max(1, total)) if self.budget_samples else 1
            window = self._window = self._window or _Window()
            window.add(step, samples, loss, grad_norm, lr)
            if window.n >= self.stride or step >= (self.final_step or 0):
                self._window = None
                self._stage(step, window.row())
        except (Exception, SystemExit) as exc:
            self._disable("log", exc)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Mirror ``metrics`` (an evaluation) at optimizer step ``step``, in one row with that step's
        training numbers (which win over a ``train/*`` key of ``metrics``), and send every row held;
        steps ≤ the last one mirrored are skipped."""
        if not self.active or step <= self.last_step:
            return
        try:
            row = {k: v for k, v in metrics.items() if v is not None}
            if self._window is not None and self._window.step == step:  # a partial window ends here
                row |= self._window.row()
                self._window = None
            if self._rows and self._rows[-1][0] == step:
                row |= self._rows.pop()[1]
            self._rows.append((step, row))
            self._send(len(self._rows))
        except (Exception, SystemExit) as exc:  # wandb's teardown paths can sys.exit; never into the loop
            self._disable("log", exc)

    def _stage(self, step: int, row: dict[str, Any]) -> None:
        """Hold a training row; every :data:`SEND_INTERVAL_S` send those held, all but this one (the
        evaluation of its step, if any, comes next and joins it)."""
        self._rows.append((step, row))
        if time.monotonic() - self._sent_at >= SEND_INTERVAL_S:
            self._send(len(self._rows) - 1)

    def _send(self, n: int) -> None:
        """Hand the first ``n`` rows held to wandb, after recording the last of their steps."""
        if n <= 0:
            return
        rows, self._rows = self._rows[:n], self._rows[n:]
        # write-ahead: a kill between the state write and wandb's writes loses these rows from the
        # mirror instead of sending them twice after the resume
        _replace_text(self.state_path, json.dumps({"wandb_id": self.wandb_id, "last_step": rows[-1][0]}))
        self.last_step = rows[-1][0]
        self._sent_at = time.monotonic()
        for step, row in rows:
            self.run.log(row, step=step)

    def finish(self, result: Mapping[str, Any] | None = None) -> None:
        """Send the rows still held, write the status (and a finished run's final numbers) into the
        run summary, and close the wandb run."""
        if not self.active:
            return
        status = (result or {}).get("status")
        self.active = False
        failed: BaseException | None = None
        try:
            if self._window is not None and self._window.n:
                window, self._window = self._window, None
                self._rows.append((window.step, window.row()))
            self._send(len(self._rows))
            if result is not None:
                self.run.summary.update(_flat_summary(result))
            if status == "interrupted":
                self.run.mark_preempting()  # shown as preempted; a re-launch resumes the same wandb run
        except (Exception, SystemExit) as exc:
            failed = exc
        try:  # closed even when the rows could not be sent
            self.run.finish(exit_code=0 if status in store.RunStatus.FINISHED else 1)
        except (Exception, SystemExit) as exc:
            failed = failed or exc
        if failed is not None:
            self._disable("finish", failed)


def _replace_text(path: Path, text: str) -> None:
    """Replace ``path`` by rename (atomic for readers and kills; not fsynced — called per curve row)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wandb_destination(cfg: Mapping[str, Any], run_dir: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """``project``, ``entity`` and ``dir`` for ``wandb.init`` (see the module docstring for the precedence)."""
    env = os.environ if env is None else env
    project = cfg.get("project") or DEFAULT_PROJECT
    if project == DEFAULT_PROJECT:
        project = env.get("WANDB_PROJECT") or DEFAULT_PROJECT
    return {
        "project": project,
        "entity": cfg.get("entity") or env.get("WANDB_ENTITY") or None,
        "dir": env.get("WANDB_DIR") or str(run_dir),
    }


def _init(
    wandb: Any, mode: str, cell: Cell, run_dir: Path, cfg: Mapping[str, Any], code_version: str, timeout_s: float
) -> Any:
    """``wandb.init`` for this run (raises whatever wandb raises; the callers catch it)."""
    settings = wandb.Settings(
        init_timeout=timeout_s,
        finish_timeout=FINISH_TIMEOUT_S,
        console="off",  # never wrap the worker's stdout/stderr
        silent=True,  # no banners from every worker; failures come as our one warning
        x_disable_stats=True,  # no system-metrics sampler process competing with the run for cores
        x_save_requirements=False,
        disable_git=True,  # the code version is in the config
        save_code=False,
    )
    dest = wandb_destination(cfg, run_dir)
    Path(dest["dir"]).mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        **dest,
        id=wandb_run_id(cell),
        resume="allow",
        name=f"{cell.task} {cell.arm} s{cell.seed}",
        group=wandb_group(cell),
        job_type=cell.task,
        tags=[cell.task, *(cell.tricks_on or ("baseline",))],
        config={
            **cell.config,
            "grid": cell.grid,
            "arm": cell.arm,
            "tricks_on": list(cell.tricks_on),
            "run_id": cell.run_id,
            "code_version": code_version,
        },
        mode=mode,
        settings=settings,
    )
    run.define_metric("samples")
    run.define_metric("train/*", step_metric="samples")
    run.define_metric("eval/*", step_metric="samples")
    return run


def make_tracker(
    cell: Cell,
    run_dir: Path,
    wandb_cfg: Mapping[str, Any] | None,
    *,
    code_version: str = "unknown",
    init_timeout_s: float = INIT_TIMEOUT_S,
) -> WandbTracker | None:
    """The run's wandb mirror, or None when mirroring is off (or wandb cannot start at all).

    Call once per training call of a run, after its folder exists and before ``train_cell``;
    pass the result as ``RunContext.tracker`` and call ``finish(result)`` afterwards.
    ``wandb_cfg`` is the spec's ``wandb`` block with the CLI flag applied (:func:`wandb_settings`).
    Never raises: trouble (wandb missing or failing, a bad ``WANDB_MODE``) is one warning and an
    offline tracker or None. Launchers should call :func:`resolve_mode` once before anything
    trains, so that a bad ``WANDB_MODE`` is rejected as bad input instead.
    """
    cfg = wandb_settings(wandb_cfg)
    if not cfg["enabled"]:
        return None
    try:
        mode = resolve_mode(cfg["mode"])  # launchers call it before training, where a bad value is an error
    except ValueError as exc:
        warnings.warn(f"{exc}; not mirroring run {cell.run_id}", RuntimeWarning, stacklevel=2)
        return None
    if mode == "disabled":
        return None
    host = _host(os.environ)
    if mode == "online" and host in _unreachable_hosts:
        mode = "offline"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import wandb
    except ImportError as exc:
        warnings.warn(f"wandb is not installed ({exc}); not mirroring runs", RuntimeWarning, stacklevel=2)
        return None
    try:
        run = _init(wandb, mode, cell, run_dir, cfg, code_version, init_timeout_s)
    except (Exception, SystemExit) as exc:
        if mode != "online":
            warnings.warn(
                f"wandb init ({mode}) failed ({exc!r}); not mirroring run {cell.run_id}", RuntimeWarning, stacklevel=2
            )
            return None
        _unreachable_hosts.add(host)
        warnings.warn(
            f"wandb online init failed within {init_timeout_s:g} s ({str(exc).splitlines()[0] if str(exc) else exc!r});"
            f" mirroring offline into {run_dir / 'wandb'} instead (upload later with `wandb sync`), "
            "and so will later runs of this process",
            RuntimeWarning,
            stacklevel=2,
        )
        return _offline_fallback(wandb, cell, run_dir, cfg, code_version, init_timeout_s)
    return WandbTracker(run, run_dir, wandb_run_id(cell), mode, _budget(cell))


def _offline_fallback(
    wandb: Any, cell: Cell, run_dir: Path, cfg: Mapping[str, Any], code_version: str, timeout_s: float
) -> WandbTracker | None:
    try:
        # wandb's service still holds the run id of the failed online attempt ("run ID is in use"):
        # restart it (milliseconds; a worker has no other wandb run open at this point)
        wandb.teardown()
        run = _init(wandb, "offline", cell, run_dir, cfg, code_version, timeout_s)
    except (Exception, SystemExit) as exc:
        warnings.warn(f"wandb offline init failed too ({exc!r}); not mirroring", RuntimeWarning, stacklevel=3)
        return None
    return WandbTracker(run, run_dir, wandb_run_id(cell), "offline", _budget(cell))


def _budget(cell: Cell) -> int | None:
    budget = (cell.config.get("train") or {}).get("budget_samples")
    return int(budget) if isinstance(budget, (int, float)) and budget > 0 else None
