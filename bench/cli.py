"""The ``bench`` command. Run ``bench --help`` or ``bench <command> --help``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.spec import SpecError

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "experiments" / "grids" / "quick.yaml"
DEFAULT_RESULTS = Path("results")

EPILOG = """\
examples:
  bench run                                   the quick suite over all three tasks (local, offline data, report)
  bench run experiments/grids/cifar_quick.yaml --jobs 2
  bench run my_grid.yaml --dry-run            validate and list the runs, train nothing
  bench run my_grid.yaml --executor slurm --slurm-partition gpu --slurm-gpus-per-run 1 --slurm-time-min 120
  bench status results/quick                  done / partial / failed runs of a grid
  bench report results/quick                  (re)write report.md and report.html
  bench list                                  tricks, tasks and which tricks apply to which task
  bench check                                 regression check against results/baselines/

A grid spec is YAML: grid name, design (one_at_a_time | leave_one_out | full_factorial |
fractional_factorial), seeds, and per task its params, train block and tricks. Results go
to <results>/<grid>/runs/<run_id>/; re-running a command skips finished runs and resumes
checkpointed ones. Exit status: 0 ok, 1 some runs failed, 2 invalid input, 130 interrupted.
"""


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="train a grid (skips finished runs, resumes checkpointed ones)",
        description="Validate a grid spec, then train every run that is not finished yet and write the report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "spec",
        nargs="?",
        default=str(DEFAULT_SPEC),
        help="grid spec YAML (default: the quick suite, experiments/grids/quick.yaml)",
    )
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
        "or each GPU of an array task (slurm; --runs-per-task defaults to N × --slurm-gpus-per-run)",
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


def build_parser() -> argparse.ArgumentParser:
    """The ``bench`` argument parser (all subcommands)."""
    parser = argparse.ArgumentParser(
        prog="bench",
        description="trickbench: does a training trick help, how much, how reliably, at what cost?",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    p = sub.add_parser("list", help="the tricks (with their cards) and tasks, and which tricks apply to which task")
    p.add_argument("what", nargs="?", choices=("all", "tricks", "tasks", "matrix"), default="all")
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
        "check",
        help="re-run the regression grids and compare with results/baselines/",
        description="Regression check of the trick implementations: re-runs the small deterministic "
        "grids and compares every metric with the committed baselines within tolerances.",
    )
    _optional_arguments("bench.check", p)
    p = sub.add_parser("perf", help="benchmark the harness against a bare PyTorch loop, and the cost of each trick")
    _optional_arguments("bench.perf", p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the store is consistent — run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
