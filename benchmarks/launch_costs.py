"""Fixed costs of a launch, before/after a code change, interleaved (issue 18 item 2).

    python benchmarks/launch_costs.py --before /path/to/old/checkout [--repeats 5]

Measures, each configuration as a fresh process tree (wall time, and CPU time of the process and
all its children from ``wait4``), interleaved repeat by repeat so machine load hits all alike:

- ``bare``: one toy_diffusion tiny run trained by a bare script (import, expand, ``bench.loop.train``);
- ``grid1 jobs1 <code>``: the same run as a 1-run grid, ``bench run --jobs 1 --no-report``;
- ``grid4 debug <code>`` / ``grid4 pool <code>``: a 4-run toy_diffusion tiny grid in-process
  (``--executor debug``) and through the local pool (``--jobs 2``), ``--no-report``;

with ``<code>`` = ``before`` (the checkout given) and ``after`` (this one). Medians, with the range.
And ``--optimizer``: one AdamW step on each task's tiny model, default (per-parameter loop on CPU) vs
``foreach=True`` vs ``fused=True``, thread CPU time, interleaved, plus whether the results are equal.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent.parent
TINY = {"grid": "cost", "design": "one_at_a_time", "seeds": 1, "tasks": {"toy_diffusion": {}}}
BARE = (
    "import sys, yaml; from pathlib import Path\n"
    "from bench.grid import expand; from bench.spec import parse_spec; from bench.loop import train, RunContext\n"
    "(cell,) = expand(parse_spec(yaml.safe_load(open(sys.argv[1]))))\n"
    "train(cell, Path(sys.argv[2]) / cell.run_id, RunContext(threads=1))\n"
)


def _spec(folder: Path, seeds: int) -> Path:
    from experiments.registry import get_task

    spec = TINY | {"seeds": seeds, "tasks": {"toy_diffusion": get_task("toy_diffusion").tiny}}
    path = folder / f"grid{seeds}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(argv: list[str], code: Path) -> tuple[float, float]:
    """(wall s, CPU s of the process tree) of ``argv`` run with ``code`` first on the path."""
    env = os.environ | {"PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=code)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
    return wall, usage.ru_utime + usage.ru_stime


def launches(before: Path, repeats: int) -> None:
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        one, four = _spec(folder, 1), _spec(folder, 4)
        configs: dict[str, tuple[list[str], Path]] = {"bare": ([py, "-c", BARE, str(one), "RESULTS"], HERE)}
        for name, code in (("before", before), ("after", HERE)):
            run = [py, "-m", "bench.cli", "run"]
            tail = ["--results", "RESULTS", "--no-progress", "--no-report"]
            configs[f"grid1 jobs1 {name}"] = ([*run, str(one), "--jobs", "1", *tail], code)
            configs[f"grid4 debug {name}"] = ([*run, str(four), "--executor", "debug", *tail], code)
            configs[f"grid4 pool {name}"] = ([*run, str(four), "--jobs", "2", *tail], code)
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in configs}
        for rep in range(repeats + 1):  # the first round warms the page cache and is dropped
            for name, (argv, code) in configs.items():
                out = folder / f"r{rep}-{name.replace(' ', '-')}"
                measured = _run([a.replace("RESULTS", str(out)) for a in argv], code)
                if rep:
                    got[name].append(measured)
        print(f"| configuration | wall s (median) | wall range | CPU s (median) | CPU range |  repeats: {repeats}")
        print("|---|---|---|---|---|")
        for name, values in got.items():
            walls, cpus = [v[0] for v in values], [v[1] for v in values]
            print(
                f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f}-{max(walls):.2f} "
                f"| {statistics.median(cpus):.2f} | {min(cpus):.2f}-{max(cpus):.2f} |"
            )


def optimizers(repeats: int, steps: int) -> None:
    """One AdamW step on the quick suite's models (baseline cell of each task): default, foreach, fused."""
    import torch

    from bench.grid import expand
    from bench.seeds import SeedBundle
    from bench.spec import load_spec
    from experiments.registry import get_task

    torch.set_num_threads(1)
    cells = {c.task: c for c in reversed(expand(load_spec(HERE / "experiments" / "grids" / "quick.yaml")))}
    print(f"| task (quick.yaml) | params | tensors | variant | us/step (median of {repeats}) | ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for task_name in ("toy_diffusion", "rl_policy", "cifar_autoencoder"):
        cfg = cells[task_name].config
        task = get_task(task_name)(cfg["params"], {}, SeedBundle(0), torch.device("cpu"), cfg["train"])
        torch.manual_seed(0)
        base = task.build_model()
        variants = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
        params, opts = {}, {}
        for name, kw in variants.items():
            params[name] = [p for p in copy.deepcopy(base).parameters() if p.requires_grad]
            g = torch.Generator().manual_seed(1)
            for p in params[name]:
                p.grad = torch.randn(p.shape, generator=g)
            opts[name] = torch.optim.AdamW(params[name], lr=1e-3, **kw)
            opts[name].step()  # first step: lazy state and imports
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            for name in variants:
                t0 = time.thread_time()
                for _ in range(steps):
                    opts[name].step()
                times[name].append((time.thread_time() - t0) / steps * 1e6)
        default = statistics.median(times["default"])
        n_params = sum(p.numel() for p in params["default"])
        for name in variants:
            diff = max(float((a - b).detach().abs().max()) for a, b in zip(params[name], params["default"]))
            med = statistics.median(times[name])
            row = f"| {task_name} | {n_params} | {len(params[name])} | {name} | {med:.1f} | {med / default:.3f}"
            print(f"{row} | {diff:.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="checkout of the code to compare with (launch costs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--optimizer", action="store_true", help="AdamW default vs foreach vs fused on CPU")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per timing (--optimizer)")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    print(
        f"torch {__import__('torch').__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cores, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    if args.optimizer:
        optimizers(args.repeats, args.steps)
    if args.before:
        launches(args.before.resolve(), args.repeats)


if __name__ == "__main__":
    main()
