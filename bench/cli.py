"""The ``bench`` command. Run ``bench --help`` or ``bench <command> --help``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

# Nothing heavy at module level: `bench --help` and `bench run|list|status|report --help` import
# neither torch nor the registries (tested). Commands import what they need when they run.

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "experiments" / "grids" / "quick.yaml"
DEFAULT_RESULTS = Path("results")

EPILOG = """\
examples:
  bench run                                   the quick suite over all three tasks (local, offline data, report)
  bench run experiments/grids/cifar_quick.yaml --jobs 2
  bench run my_grid.yaml --dry-run            validate and list the runs, train nothing
  bench run grid.yaml seeds=8 tasks.toy_diffusion.train.lr=3e-3      Hydra-style overrides (see bench run --help)
  bench run grid.yaml --tricks ema --seeds 0-3 run a subset of the grid (same run ids as the whole grid)
  bench run my_grid.yaml --executor slurm --slurm-partition gpu --slurm-gpus-per-run 1 --slurm-time-min 120
  bench status results/quick                  done / partial / failed runs of a grid
  bench report results/quick                  (re)write report.md and report.html
  bench compare results/old results/new       B − A per arm of two versions of one grid, paired by seed
  bench list                                  tricks, tasks and which tricks apply to which task
  bench check                                 regression check against results/baselines/ (and plugins' own)
  bench selftest mixup mlp_regression         the checks a plugin author runs: smoke, bit-exact resume, on≠off, ...
  bench equiv mlp_regression ema example_ema  is a re-implementation equivalent to the reference? (paired TOST)

A grid spec is YAML: grid name, design (one_at_a_time | leave_one_out | full_factorial |
fractional_factorial), seeds, and per task its params, train block and tricks. Results go
to <results>/<grid>/runs/<run_id>/; re-running a command skips finished runs and resumes
checkpointed ones. Exit status: 0 ok, 1 some runs failed, 2 invalid input, 130 interrupted,
141 output pipe closed (e.g. `bench status results/quick | head`).

Your own tricks and tasks (plugins): docs/extending.md.
"""

SELFTEST_EPILOG = """\
examples:
  bench selftest mixup                        a trick: its card, then every task it applies to
  bench selftest mlp_regression               a task: alone (tiny setting, metric, resume), then every trick on it
  bench selftest example_ema --task mlp_regression   only the cells of one task (faster)

Checks, each at the task's `tiny` setting (CPU, one thread): card (complete, tiny setting valid),
smoke (trains), bit-exact resume (interrupted half-way and resumed = uninterrupted: losses, metrics,
final weights), on ≠ off (switching the trick on changes the run), parameter <name> (every parameter
moved to another valid value changes the run, or validation rejects it on that task).
Exit status: 0 every check passed, 1 some check failed, 2 unknown name.
"""

EQUIV_EPILOG = """\
examples:
  bench equiv mlp_regression ema example_ema                   my EMA against the built-in one (10 seeds)
  bench equiv mlp_regression ema example_ema_buggy --delta 0.002   δ in metric units
  bench equiv mlp_regression ema ema reference.half_life_samples=1024 candidate.half_life_samples=1100
  bench equiv toy_diffusion ema posthoc_ema train.budget_samples=65536 --seeds 20

Overrides (Hydra's grammar): params.KEY=V and train.KEY=V set the task block of both arms,
reference.KEY=V / candidate.KEY=V the settings of that arm's trick, seeds=[...] explicit seeds.
REFERENCE or CANDIDATE may be `baseline` (no trick: "is this trick equivalent to nothing?").

Both arms (and the baseline) train on the same seeds (paired: the same random streams), into
results/<grid>/ like any grid (resumable; `bench report` works on it). The answer is a paired TOST
at --alpha on candidate − reference: "equivalent within ±δ" when the (1 − 2α) confidence interval of
the mean difference lies inside ±δ, else "not shown equivalent". δ is --delta (metric units) or
--delta-sd × the sample SD over seeds of the baseline arm's metric. Also printed: per seed the
largest absolute difference between the two arms' final evaluated weights (0 = identical numbers).
Exit status: 0 equivalent, 1 not shown equivalent or a run failed, 2 invalid input.
"""

RUN_EPILOG = """\
overrides (Hydra's grammar; applied to the spec before validation, so checked like the YAML):
  bench run grid.yaml seeds=8                                   8 seeds (0-7); the runs of seeds 0-2 are kept
  bench run grid.yaml tasks.toy_diffusion.train.lr=3e-3         a train setting (also one left at its default)
  bench run grid.yaml tasks.rl_policy.tricks.ema.half_life_samples=500
  bench run grid.yaml +tasks.rl_policy.tricks.ema=null          add a trick (+key: a key the spec does not set)
  bench run grid.yaml ~tasks.toy_diffusion.tricks.ema           remove a trick (~key)
  bench run grid.yaml 'seeds=[0,1,2]' wandb.enabled=true        lists in brackets (quote them for the shell)
  bench run seeds=1 --dry-run                                   overrides of the default spec (the quick suite)
Paths are dotted keys of the spec (grid, design, seeds, wandb.*, tasks.<label>.{params,train,tricks}.*).
The overrides are recorded as `overrides:` in results/<grid>/grid.yaml beside the resolved spec.

selection (run part of a grid; the runs kept have the same run ids as in the whole grid):
  bench run grid.yaml --tasks toy_diffusion                    one task block (by its label in the spec)
  bench run grid.yaml --tricks ema,posthoc_ema                 the arms whose tricks are all selected (+ baseline)
  bench run grid.yaml --seeds 0-3,7                            seeds 0, 1, 2, 3 and 7 of the grid
  bench run grid.yaml seeds=10 --seeds 3-9 --dry-run           add seeds, and list only the new runs
"""


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="train a grid (skips finished runs, resumes checkpointed ones)",
        description="Validate a grid spec (with any overrides), then train every run that is not finished yet "
        "and write the report.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec",
        nargs="?",
        default=str(DEFAULT_SPEC),
        help="grid spec YAML (default: the quick suite, experiments/grids/quick.yaml)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of the spec in Hydra's grammar: key=value, +key=value (add), ++key=value, ~key (remove); "
        "examples below",
    )
    g = p.add_argument_group("selection (a subset of the grid; the stored grid.yaml stays the whole grid)")
    g.add_argument(
        "--tasks", action="append", metavar="LABEL[,LABEL]", help="only these task blocks of the spec (repeatable)"
    )
    g.add_argument(
        "--tricks",
        action="append",
        metavar="TRICK[,TRICK]",
        help="only the arms whose tricks are all among these (the baseline always; repeatable)",
    )
    g.add_argument("--seeds", action="append", metavar="RANGES", help="only these seeds of the grid, e.g. 0-3,7")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results root folder (default: ./results)")
    p.add_argument(
        "--executor",
        choices=("local", "debug", "slurm"),
        default="local",
        help="local = process pool on this machine (default); debug = in-process, one run after another; "
        "slurm = submitit job arrays (see --slurm-* options)",
    )
    p.add_argument(
        "--jobs", type=int, default=None, help="parallel runs for the local executor (default: one per core)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per run (default: 1; results are bit-identical only for equal thread counts)",
    )
    p.add_argument("--device", default="cpu", help="torch device for training, e.g. cpu or cuda (default: cpu)")
    p.add_argument("--dry-run", action="store_true", help="validate and list the runs; train and write nothing")
    p.add_argument(
        "--rerun-stale",
        action="store_true",
        help="train again the runs whose code changed since they trained (their tricks', task's or the loop's "
        "source: see config.json's fingerprint); without it they are kept, not resumed, and marked stale",
    )
    g = p.add_argument_group(
        "adaptive seeds (--until-decisive)",
        "Train in rounds: the first seeds of every arm, then more seeds only for the arms whose verdict is still "
        "open, until each is decisive (helps / hurts / equivalent within --margin) or has the spec's seeds (the "
        "cap). Error control stays valid under this stopping (group-sequential repeated intervals, family-wise "
        "alpha 0.05 per task). The plan is stored in <grid>/adaptive.json: re-launch with the same options.",
    )
    g.add_argument("--until-decisive", action="store_true", help="run the grid in rounds until every arm is decisive")
    g.add_argument("--first-seeds", type=int, default=3, metavar="N", help="seeds of every arm in round 1 (default 3)")
    g.add_argument(
        "--round-seeds", type=int, default=3, metavar="N", help="seeds added per open arm per round (default 3)"
    )
    g.add_argument(
        "--margin",
        type=float,
        default=None,
        metavar="X",
        help="equivalence margin in the task's metric units: an arm whose interval lies within ±X stops as equivalent",
    )
    g.add_argument(
        "--futility",
        type=float,
        default=0.0,
        metavar="P",
        help="stop an arm whose chance to reach a verdict by the cap is below P (non-binding; default 0: never)",
    )
    p.add_argument(
        "--max-runs",
        type=int,
        default=None,
        metavar="N",
        help="allow a spec to plan up to N runs (default: 10000; at most 1000000) — a guard against a typo "
        "that plans a million runs",
    )
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument(
        "--wandb",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mirror runs to Weights & Biases (offline when no account); overrides the spec",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--runs-per-gpu",
        type=int,
        default=None,
        metavar="N",
        help="with --device cuda: train N runs at once on each GPU — each visible GPU (local; replaces --jobs) "
        "or each GPU of an array task (slurm; --runs-per-task defaults to N × --slurm-gpus-per-run). Processes "
        "sharing a GPU take turns: for short runs, --vectorize-seeds S with N = 1 or 2 trains as fast on a "
        "fraction of the CPU (README, Performance)",
    )
    p.add_argument(
        "--vectorize-seeds",
        type=int,
        default=None,
        metavar="S",
        help="train the seeds of each arm S at a time as one vmapped model in one process (one unit of work of "
        "the pool, the debug executor or a SLURM array task; every seed still its own run folder). Tasks that "
        "declare it: toy_diffusion, rl_policy; an arm that cannot is an error naming why. Per-seed numbers equal "
        "runs alone to float rounding, not bit for bit",
    )
    _add_slurm(p)


def _add_slurm(p: argparse.ArgumentParser) -> None:
    """The ``--executor slurm`` options (how-to-run; validated in bench.executors.slurm.SlurmOptions)."""
    g = p.add_argument_group(
        "SLURM executor (--executor slurm; sbatch mapping, logs and requeues: slurm/README.md)",
        "Submits the runs still to train as one submitit job array and returns (see --slurm-wait). "
        "Runs resume from their own checkpoints after preemption, time limits, requeues and re-launches.",
    )
    g.add_argument("--slurm-partition", metavar="NAME", help="partition(s), comma-separated (default: the cluster's)")
    g.add_argument("--slurm-account", metavar="NAME", help="account to charge (sbatch --account)")
    g.add_argument("--slurm-qos", metavar="NAME", help="quality of service (sbatch --qos)")
    g.add_argument(
        "--slurm-gpus-per-run",
        metavar="[TYPE:]N",
        help="GPUs per array task, of one type when given, e.g. 1 or a100:2 (sbatch --gpus-per-node; default: 0)",
    )
    g.add_argument(
        "--slurm-gres",
        metavar="SPEC",
        help="generic resources per array task, e.g. gpu:a100:2 or gpu:1,nvme:1 (sbatch --gres)",
    )
    g.add_argument(
        "--slurm-cpus-per-run",
        type=int,
        metavar="N",
        help="CPUs per run; an array task asks for N × the runs it trains at once (default: 1)",
    )
    g.add_argument(
        "--slurm-mem-gb",
        type=float,
        metavar="GB",
        help="memory per run; an array task asks for GB × the runs it trains at once (default: the cluster's)",
    )
    g.add_argument(
        "--slurm-time-min", type=int, metavar="MIN", help="time limit of one array task, all its runs (default: 60)"
    )
    g.add_argument("--slurm-constraint", metavar="EXPR", help="node features, e.g. 'a100|h100' (sbatch --constraint)")
    g.add_argument(
        "--slurm-sbatch",
        action="append",
        metavar="KEY=VALUE",
        help="any further sbatch option, e.g. mail-type=END (repeatable)",
    )
    g.add_argument(
        "--slurm-setup",
        action="append",
        metavar="LINE",
        help="a shell line the job runs before the worker, e.g. 'module load cuda/12.1' (repeatable, in order)",
    )
    g.add_argument(
        "--runs-per-task",
        type=int,
        metavar="N",
        help="runs one array task trains, one after another (or --runs-per-gpu at a time), for short runs (default: 1)",
    )
    g.add_argument(
        "--slurm-array-parallelism", type=int, metavar="N", help="array tasks running at once (default: 256)"
    )
    g.add_argument(
        "--slurm-max-requeues",
        type=int,
        metavar="N",
        help="time-limit requeues per run; past it the run is recorded incomplete (default: 3)",
    )
    g.add_argument(
        "--slurm-signal-delay-s",
        type=int,
        metavar="S",
        help="USR2 this many seconds before the time limit: checkpoint and requeue (default: 90)",
    )
    g.add_argument(
        "--slurm-wait",
        action="store_true",
        help="wait until the jobs have left the queue, then write summary and report; exit 1 with the reason "
        "when runs are left unfinished (default: submit and return)",
    )
    g.add_argument(
        "--retry-incomplete",
        action="store_true",
        help="also submit runs recorded incomplete (time-limit requeues used up): they train on from their "
        "checkpoints with a fresh --slurm-max-requeues (their incomplete result is kept in state.json)",
    )


def _add_selftest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "selftest",
        help="check a trick or task (built-in or plugin): smoke, bit-exact resume, on ≠ off, no dead parameter",
        description="The checks trickbench's own tests run on every registered trick and task, for the names given "
        "— the one command a plugin author runs. Prints a table of checks as they finish.",
        epilog=SELFTEST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="trick or task names (as in `bench list`)")
    p.add_argument("--task", action="append", metavar="TASK[,TASK]", help="only the cells of these tasks (repeatable)")
    p.add_argument(
        "--workdir", type=Path, default=None, help="keep the runs in this folder (default: a temporary folder)"
    )


def _add_equiv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "equiv",
        help="is a re-implementation equivalent to the reference? two arms over paired seeds, paired TOST",
        description="Equivalence check: train REFERENCE and CANDIDATE (two tricks of one role, or two settings of "
        "one trick) on TASK over paired seeds and answer 'equivalent within ±δ' or 'not shown equivalent' with the "
        "confidence interval of the mean difference.",
        epilog=EQUIV_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("task", help="the task both arms train on")
    p.add_argument("reference", help="the trusted trick (or `baseline`)")
    p.add_argument("candidate", help="the trick to check against it (or `baseline`)")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="params.K=V, train.K=V, reference.K=V, candidate.K=V"
    )
    p.add_argument("--seeds", type=int, default=None, help="paired seeds 0..N-1 (default: 10)")
    delta = p.add_mutually_exclusive_group()
    delta.add_argument("--delta", type=float, default=None, help="equivalence margin δ in metric units")
    delta.add_argument(
        "--delta-sd",
        type=float,
        default=None,
        metavar="F",
        help="δ = F × the baseline arm's seed SD (sample SD of its metric over the seeds; default F = 0.25)",
    )
    p.add_argument("--metric", default=None, help="the metric compared (default: the task's primary metric)")
    p.add_argument("--alpha", type=float, default=0.05, help="TOST level: each one-sided test at α (default 0.05)")
    p.add_argument(
        "--identical-atol",
        type=float,
        default=None,
        metavar="ATOL",
        help="the two are meant to compute the same numbers: also require every seed's largest weight "
        "difference ≤ ATOL (e.g. 0)",
    )
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results root folder (default: ./results)")
    p.add_argument("--grid", default=None, help="grid name of the runs (default: equiv-<task>)")
    p.add_argument(
        "--executor", choices=("local", "debug"), default="local", help="local process pool (default) or in-process"
    )
    p.add_argument("--jobs", type=int, default=None, help="parallel runs (default: one per core)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _optional_arguments(module: str, parser: argparse.ArgumentParser) -> None:
    """Let ``module`` declare its own options (``add_arguments(parser)``); absent modules add none."""
    from importlib import import_module

    try:
        mod = import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        return
    mod.add_arguments(parser)


def _command_of(argv: list[str] | None) -> str | None:
    """The subcommand named in ``argv`` (its first token that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None) if argv is not None else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``bench`` argument parser (all subcommands).

    With ``argv``, the options of ``check`` and ``perf`` (declared by their own modules, which
    import torch) are added only when ``argv`` names that command, so that ``bench --help`` and
    the other commands start without importing them.
    """
    command = _command_of(argv)
    parser = argparse.ArgumentParser(
        prog="bench",
        description="trickbench: does a training trick help, how much, how reliably, at what cost?",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    p = sub.add_parser(
        "list",
        help="the tricks and tasks, which tricks apply to which task; `bench list ema` for one trick's full card",
        description="Without an argument: every trick (role, summary, tasks it applies to), every task and the "
        "applicability matrix. With a section (tricks, tasks, matrix): only that. With a trick's name: its whole "
        "card — parameters with units and ranges, the defaults a run of each task uses, cost, expected effect, "
        "references, incompatibilities. With a task's name: its metric, parameters, train defaults and the "
        "defaults of every trick that applies to it.",
    )
    p.add_argument(
        "what", nargs="?", default="all", metavar="WHAT", help="all | tricks | tasks | matrix | TRICK | TASK"
    )
    p = sub.add_parser(
        "status",
        help="counts and a per-run table of a grid: completed / running / pending / requeued / partial / "
        "diverged / failed / incomplete",
    )
    p.add_argument("grid", type=Path, help="grid folder, e.g. results/quick")
    p.add_argument("--failed", action="store_true", help="then print the end of each failed run's log")
    p = sub.add_parser("report", help="write report.md and report.html (figures embedded) for a grid")
    p.add_argument("grid", type=Path, help="grid folder, e.g. results/quick")
    p = sub.add_parser(
        "compare",
        help="compare two versions of one grid (e.g. before/after a code change): B − A per arm, paired by seed",
        description="Pairs the completed runs of GRID_A and GRID_B by task, arm and seed; per arm and metric the "
        "mean B − A with its 95% paired t-interval, p (Holm) across arms, a verdict (B better / B worse / same / "
        "unclear / identical), train time B / A and the code parts that differ. Prints the table and writes "
        "compare.md and compare.csv.",
    )
    p.add_argument("grid_a", type=Path, metavar="GRID_A", help="grid folder of the first version (A)")
    p.add_argument("grid_b", type=Path, metavar="GRID_B", help="grid folder of the second version (B)")
    p.add_argument("--out", type=Path, default=None, help="folder for compare.md / compare.csv (default: GRID_B)")
    p = sub.add_parser(
        "check",
        help="re-run the regression grids and compare with results/baselines/",
        description="Regression check of the trick implementations: re-runs the small deterministic "
        "grids and compares every metric with the committed baselines within tolerances.",
    )
    if argv is None or command == "check":
        _optional_arguments("bench.check", p)
    _add_selftest(sub)
    _add_equiv(sub)
    p = sub.add_parser("perf", help="benchmark the harness against a bare PyTorch loop, and the cost of each trick")
    if argv is None or command == "perf":
        _optional_arguments("bench.perf", p)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; overrides of ``run``/``equiv`` may also come after options (``run g.yaml --dry-run seeds=2``)."""
    args, extra = parser.parse_known_args(argv)
    if args.command in ("run", "equiv"):
        stray = [a for a in extra if a.startswith("-")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``bench`` with ``argv`` (default: the command line); returns the exit status.

    Called without ``argv`` it is the ``bench`` command: the process ends next, so after an interruption a
    further Ctrl-C is ignored until then (exit status 130 whatever the timing). With ``argv`` (a script, a
    notebook) the caller's Ctrl-C handling is left as it was.

    A closed output pipe (``bench status ... | head``) ends quietly with 141, as the Python
    docs recommend: stdout is pointed at devnull so that the interpreter's final flush is silent.
    """
    exits_after = argv is None  # the `bench` command itself (not a caller in this process): the process ends next
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        try:
            status = _main(argv, exits_after)
        except Exception as exc:  # a plugin that fails to load: name it, exit 2 (nothing was written)
            from tricks.plugins import PluginError

            if not isinstance(exc, PluginError):
                raise
            print(f"error: {plugin_error_message(exc)}", file=sys.stderr)
            return 2
        sys.stdout.flush()  # a broken pipe surfaces here rather than at interpreter exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a program killed by it
    return status


def plugin_error_message(exc: BaseException) -> str:
    """A broken plugin's error: the message naming distribution and entry point, and where the plugin raised."""
    import traceback

    text = str(exc)
    cause = exc.__cause__
    if cause is not None and cause.__traceback__ is not None:
        frame = traceback.extract_tb(cause.__traceback__)[-1]
        text += f"\n  raised at {frame.filename}:{frame.lineno}" + (f": {frame.line}" if frame.line else "")
    import re

    dist = re.search(r"of distribution '([^']+)'", text)
    name = dist.group(1) if dist else "<distribution>"
    return text + f"\n  (fix that plugin, or uninstall it: `pip uninstall {name}`)"


def _main(argv: list[str], exits_after: bool = False) -> int:
    parser = build_parser(argv)
    args = _parse(parser, argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            from bench.commands import cmd_run

            return cmd_run(args)
        if args.command == "list":
            from bench.commands import cmd_list

            return cmd_list(args.what)
        if args.command == "status":
            from bench.commands import cmd_status

            return cmd_status(args.grid, failed=args.failed)
        if args.command in ("check", "perf"):
            from importlib import import_module

            return int(import_module(f"bench.{args.command}").run(args))
        if args.command == "report":
            from bench.commands import cmd_report

            return cmd_report(args.grid)
        if args.command == "compare":
            from bench.compare import cmd_compare

            return cmd_compare(args.grid_a, args.grid_b, args.out)
        if args.command == "selftest":
            from bench.commands import cmd_selftest

            return cmd_selftest(args)
        if args.command == "equiv":
            from bench.equiv_runner import cmd_equiv

            return cmd_equiv(args)
    except (FileNotFoundError, ValueError) as exc:  # SpecError is a ValueError: bad input, nothing written
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(exits_after)
    return 0


def _interrupted(exits_after: bool) -> int:
    """Say that the launch was interrupted and give exit status 130.

    The pool has already stopped and checkpointed. When the process ends next (``exits_after``: the ``bench``
    command), a further Ctrl-C (a user pressing twice, or a terminal repeating it) from here to the exit is
    ignored, so the exit status is 130 whatever the timing; a caller in the same process (a notebook, a test)
    keeps its Ctrl-C.
    """
    while True:
        try:
            if exits_after and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, signal.SIG_IGN)
            print("interrupted; the store is consistent — run the same command again to resume", file=sys.stderr)
            return 130
        except KeyboardInterrupt:  # arrived before SIGINT was ignored
            continue


if __name__ == "__main__":
    sys.exit(main())
