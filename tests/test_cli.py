"""The ``bench`` command as a shell user meets it: start-up imports, pipes, file modes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from bench import store

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "numpy", "pandas", "scipy", "matplotlib", "wandb", "experiments.registry", "tricks.registry")
STATUS_HEAVY = tuple(m for m in HEAVY if m != "numpy")  # numpy (~0.1 s) is fine for status: grid designs use it


def _bench(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=ROOT, **kw)


# --- start-up -------------------------------------------------------------------------------------


def test_help_imports_nothing_heavy() -> None:
    """``bench --help`` and the help of the commands that do not train start without torch."""
    script = f"""
import contextlib, io, json, sys
from bench.cli import main
seen = {{}}
for argv in (["--help"], ["run", "--help"], ["list", "--help"], ["status", "--help"], ["report", "--help"],
             ["selftest", "--help"], ["equiv", "--help"], []):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    assert code in (0, 2) and "usage: bench" in out.getvalue(), (argv, code)
    seen[" ".join(argv) or "(none)"] = [m for m in {HEAVY!r} if m in sys.modules]
print(json.dumps(seen))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert all(not heavy for heavy in seen.values()), seen
    assert len(seen) == 8


def test_status_of_a_trained_grid_imports_no_torch(tmp_path: Path) -> None:
    """``bench status`` reads a grid's stored files only: no registry, no task module, no torch (a login node)."""
    spec = tmp_path / "g.yaml"
    spec.write_text(
        "grid: nt\nseeds: 2\ntasks:\n  synthetic:\n    train: {budget_samples: 64, eval_every_samples: 64}\n"
        "    tricks: [ema]\n"
    )
    launch = (
        "import sys; from experiments.registry import register_task; from tests.synthetic_task import Synthetic\n"
        "register_task(Synthetic); from bench.cli import main\n"
        f"sys.exit(main(['run', {str(spec)!r}, '--results', {str(tmp_path / 'r')!r}, '--executor', 'debug', "
        "'--no-progress', '--no-report']))\n"
    )
    assert subprocess.run([sys.executable, "-c", launch], cwd=ROOT, timeout=300).returncode == 0
    status = (
        "import sys; from bench.cli import main\n"
        f"code = main(['status', {str(tmp_path / 'r' / 'nt')!r}])\n"
        f"print('HEAVY', [m for m in {STATUS_HEAVY!r} if m in sys.modules], code)\n"
    )
    out = subprocess.run([sys.executable, "-c", status], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4 completed" in out.stdout and "HEAVY [] 0" in out.stdout, out.stdout


def test_help_epilogs_teach_overrides_and_selection(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for needle in ("tasks.toy_diffusion.train.lr=3e-3", "+tasks.", "~tasks.", "--tricks ema", "--seeds 0-3,7"):
        assert needle in text, needle
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "seeds=8" in capsys.readouterr().out


# --- pipes ----------------------------------------------------------------------------------------


def test_status_into_a_pipe_closed_after_the_first_line_ends_quietly(tmp_path: Path) -> None:
    """``bench status GRID | head -1`` on a 2,000-run grid: more output than a pipe buffer holds."""
    from bench.runner import write_grid_spec
    from bench.spec import parse_spec

    spec = parse_spec(
        {
            "grid": "big",
            "seeds": 1000,
            "tasks": {"cifar_autoencoder": {"params": {"data": "offline"}, "tricks": ["ema"]}},
        }
    )
    write_grid_spec(spec, tmp_path / "big")
    proc = _bench("status", str(tmp_path / "big"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # like `head -1` exiting
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert first.startswith(b"grid big: 2000 runs"), first
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert code == 141, (code, err)


def test_help_into_a_closed_pipe_ends_quietly() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # nobody reads: the first write fails with EPIPE
    try:
        proc = _bench("--help", stdout=write_fd, stderr=subprocess.PIPE)
    finally:
        os.close(write_fd)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, 141)  # argparse itself ignores a failed write of the help
    assert err == "", err


# --- file modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_store_files_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        path = tmp_path / "runs" / "result.json"
        store.atomic_write_json(path, {"status": "completed"})
        assert stat.S_IMODE(path.stat().st_mode) == mode
        store.atomic_write_text(path, "replaced\n")  # replacing keeps the umask's mode too
        assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_text() == "replaced\n"
    finally:
        os.umask(old)
    assert [p.name for p in path.parent.iterdir()] == ["result.json"], "no temporary file left behind"


def test_an_interrupted_command_ignores_further_ctrl_c_only_when_the_process_ends_next(capsys) -> None:
    """``bench`` itself (the process exits next) ignores Ctrl-C from the interruption to its exit (exit status 130
    whatever the timing); a caller of ``main(argv)`` in its own process (a notebook, a test) keeps its handler."""
    import signal

    from bench.cli import _interrupted

    before = signal.getsignal(signal.SIGINT)
    try:
        assert _interrupted(exits_after=False) == 130
        assert signal.getsignal(signal.SIGINT) is before
        assert _interrupted(exits_after=True) == 130
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert capsys.readouterr().err.count("interrupted; the store is consistent") == 2
