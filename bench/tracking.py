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

What a mirrored run looks like: id = ``<grid>-<run_id>`` (:func:`wandb_run_id`), so a
resumed or re-launched run (any executor, any node) continues the same wandb run
(``resume="allow"``); group = the grid, tags = the task and the tricks that are on, config =
the resolved config, files under ``<run_dir>/wandb/``. History steps are optimizer steps
(``step=``) and charts use ``samples`` as their x axis.

No step is logged twice: the last logged step is kept in ``<run_dir>/wandb_state.json``
(written atomically *before* the step is handed to wandb), and after a resume every step
≤ it is skipped. A run killed after its last checkpoint replays those steps; they are not
sent again (a kill between the state write and wandb's own write loses that one point in the
mirror rather than duplicating it).

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
import netrc
import os
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
    "STATE_FILE",
    "Tracker",
    "WandbTracker",
    "account_configured",
    "make_tracker",
    "resolve_mode",
    "wandb_run_id",
    "wandb_settings",
]

INIT_TIMEOUT_S = 20.0  # longest wandb.init may take before the run goes on (offline) without it
FINISH_TIMEOUT_S = 30.0  # longest wandb's finish() may wait for uploads; the rest stays on disk for `wandb sync`
STATE_FILE = "wandb_state.json"  # in the run folder: the wandb id and the last step handed to wandb
DEFAULT_HOST = "https://api.wandb.ai"
MAX_ID_CHARS = 64
_ENV_MODES = {"online": "online", "offline": "offline", "disabled": "disabled", "run": "online", "dryrun": "offline"}

# hosts this process failed to reach online: later runs in this process mirror offline at once
_unreachable_hosts: set[str] = set()


class Tracker(Protocol):
    """What the loop and the worker need from a metrics mirror (``RunContext.tracker``)."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

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
    for section in ("metric", "stability", "cost"):
        for k, v in (result.get(section) or {}).items():
            if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                out[f"{section}/{k}"] = v
    return out


class WandbTracker:
    """One run's mirror. Built by :func:`make_tracker`; every wandb call is guarded.

    ``log`` is called by the loop at every evaluation; ``finish`` once by the worker after
    training returns. After the first wandb error the tracker is inactive (one warning).
    """

    def __init__(self, run: Any, run_dir: Path, wandb_id: str, mode: str) -> None:
        self.run = run
        self.wandb_id = wandb_id
        self.mode = mode
        self.state_path = run_dir / STATE_FILE
        self.last_step = _read_last_step(self.state_path, wandb_id)
        self.active = True

    def _disable(self, what: str, exc: BaseException) -> None:
        self.active = False
        warnings.warn(
            f"wandb {what} failed ({exc!r}); not mirroring run {self.wandb_id} any further. "
            "Training is unaffected and the local results are complete.",
            RuntimeWarning,
            stacklevel=3,
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Mirror ``metrics`` at optimizer step ``step``; steps ≤ the last one logged are skipped."""
        if not self.active or step <= self.last_step:
            return
        try:
            # write-ahead: a kill between these two calls loses one mirrored point instead of sending it twice
            store.atomic_write_json(self.state_path, {"wandb_id": self.wandb_id, "last_step": step})
            self.last_step = step
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        except (Exception, SystemExit) as exc:  # wandb's teardown paths can sys.exit; never into the loop
            self._disable("log", exc)

    def finish(self, result: Mapping[str, Any] | None = None) -> None:
        """Write the final result into the run summary (finished runs) and close the wandb run."""
        if not self.active:
            return
        self.active = False
        status = (result or {}).get("status")
        try:
            if status in store.RunStatus.FINISHED:
                self.run.summary.update(_flat_summary(result or {}))
            if status == "interrupted":
                self.run.mark_preempting()  # shown as preempted; a re-launch resumes the same wandb run
            self.run.finish(exit_code=0 if status in store.RunStatus.FINISHED else 1)
        except (Exception, SystemExit) as exc:
            self._disable("finish", exc)


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
    run = wandb.init(
        project=cfg.get("project", "trickbench"),
        id=wandb_run_id(cell),
        resume="allow",
        name=f"{cell.task} {cell.arm} s{cell.seed}",
        group=cell.grid,
        job_type=cell.task,
        tags=[cell.task, *cell.tricks_on],
        config={**cell.config, "arm": cell.arm, "run_id": cell.run_id, "code_version": code_version},
        dir=str(run_dir),
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
    return WandbTracker(run, run_dir, wandb_run_id(cell), mode)


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
    return WandbTracker(run, run_dir, wandb_run_id(cell), "offline")
