"""Hostile grid specs: every one refused by ``bench run`` with exit 2, the field named, nothing written —
fast, with bounded memory, and without importing torch (the limits run before any registry is imported).

The corpus runs through the real CLI entry point in one fresh Python process (the driver below), which
reports per spec the exit status, the message and the seconds it took, and at the end its peak resident
memory and whether torch was imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.spec import SpecError, load_spec, parse_spec
from bench.specfile import MAX_DEPTH, MAX_NODES, MAX_SEEDS, MAX_SPEC_BYTES, check_limits

ROOT = Path(__file__).resolve().parent.parent
MAX_SECONDS = 2.0  # per spec, inside the driver (the bound; the typical time is milliseconds)
MAX_RSS_MB = 300.0

TASK = "toy_diffusion"
TEN_TRICKS = "[ema, posthoc_ema, weight_averaging, stratified, fourier, cond_noise, cond_dropout, nonleaky_aug, a, b]"


def _labels(n: int, tricks: str) -> str:
    return "".join(f"  t{i}: {{task: {TASK}, tricks: {tricks}}}\n" for i in range(n))


def _nested_maps(n: int) -> str:
    return "grid: x\ntasks: " + "{a: " * n + "1" + "}" * n + "\n"


BOMB = textwrap.dedent(
    """\
    a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    grid: bomb
    seeds: *i
    tasks: {toy_diffusion: {}}
    """
)

# (id, spec text, substrings the message must contain: the field and what is wrong)
CORPUS: list[tuple[str, str, list[str]]] = [
    ("alias-bomb", BOMB, ["line 1", "anchor"]),
    ("alias-in-field", "grid: x\nbase: &b {lr: 0.1}\ntasks: {toy_diffusion: {train: *b}}\n", ["anchor &b"]),
    ("merge-key", "grid: x\ntasks:\n  toy_diffusion: {<<: *m}\n", ["alias *m"]),
    ("seeds-int-1e6", f"grid: x\nseeds: 1000000\ntasks: {{{TASK}: {{}}}}\n", ["seeds", "1000000", "too many"]),
    (
        "seeds-list-5000",
        f"grid: x\nseeds: {list(range(5000))}\ntasks: {{{TASK}: {{}}}}\n",
        ["seeds", "5000 seeds", f"at most {MAX_SEEDS}"],
    ),
    (
        "seeds-list-200000",  # past the size cap before it is even parsed
        f"grid: x\nseeds: {list(range(200_000))}\ntasks: {{{TASK}: {{}}}}\n",
        ["spec file", "bytes", f"at most {MAX_SPEC_BYTES}"],
    ),
    (
        "seeds-block-list-30000",
        "grid: x\nseeds:\n" + "".join(f"- {i}\n" for i in range(30_000)) + f"tasks: {{{TASK}: {{}}}}\n",
        [f"more than {MAX_NODES} values"],
    ),
    (
        "factorial-1e6",
        f"grid: x\ndesign: full_factorial\nseeds: 1000\ntasks:\n  {TASK}: {{tricks: {TEN_TRICKS}}}\n",
        ["runs", "1,024,000 runs", "1,024 arms × 1000 seeds", "--max-runs"],
    ),
    (
        "factorial-2e6-list-seeds",
        f"grid: x\ndesign: full_factorial\nseeds: {list(range(1000))}\n"
        f"tasks:\n  {TASK}: {{tricks: [{', '.join(f'k{i}' for i in range(11))}]}}\n",
        ["runs", "2,048,000 runs"],
    ),
    (
        "fractional-1e6",
        f"grid: x\ndesign: fractional_factorial\nfraction: 2\nseeds: 1000\n"
        f"tasks:\n  {TASK}: {{tricks: [{', '.join(f'k{i}' for i in range(12))}]}}\n",
        ["runs", "1,024,000 runs"],
    ),
    (
        "factorial-2^5000",
        f"grid: x\ndesign: full_factorial\nseeds: 1\n"
        f"tasks:\n  {TASK}: {{tricks: [{', '.join(f'k{i}' for i in range(5000))}]}}\n",
        ["runs", "more than 10^"],
    ),
    (
        "one-at-a-time-labels-1e6",
        f"grid: x\nseeds: 1000\ntasks:\n{_labels(100, TEN_TRICKS)}",
        ["runs", "1,100,000 runs"],
    ),
    (
        "leave-one-out-labels-1e6",
        f"grid: x\ndesign: leave_one_out\nseeds: 1000\ntasks:\n{_labels(100, TEN_TRICKS)}",
        ["runs", "1,100,000 runs"],
    ),
    ("lr-400-digits", f"grid: x\ntasks:\n  {TASK}: {{train: {{lr: {'9' * 400}}}}}\n", ["train.lr", "64-bit"]),
    ("int-5000-digits", f"grid: x\ntasks:\n  {TASK}: {{train: {{lr: {'9' * 5000}}}}}\n", ["not valid YAML"]),
    ("lr-1e400", f"grid: x\ntasks:\n  {TASK}: {{train: {{lr: 1.0e+400}}}}\n", ["train.lr", "finite"]),
    ("lr-nan", f"grid: x\ntasks:\n  {TASK}: {{train: {{lr: .nan}}}}\n", ["train.lr", "finite"]),
    (
        "budget-1e18",
        f"grid: x\ntasks:\n  {TASK}: {{train: {{budget_samples: 1.0e+18}}}}\n",
        ["train.budget_samples", "too large", "samples"],
    ),
    (
        "budget-int-1e30",
        f"grid: x\ntasks:\n  {TASK}: {{train: {{budget_samples: {10**30}}}}}\n",
        ["train.budget_samples", "64-bit"],
    ),
    (
        "half-life-1e12",
        f"grid: x\ntasks:\n  {TASK}: {{tricks: {{ema: {{half_life_samples: 1000000000000}}}}}}\n",
        ["tricks.ema.half_life_samples", "too large"],
    ),
    ("seed-value-2^64", f"grid: x\nseeds: [0, {2**64}]\ntasks: {{{TASK}: {{}}}}\n", ["seeds[1]", "64-bit"]),
    (
        "fraction-huge",
        f"grid: x\ndesign: fractional_factorial\nfraction: {10**20}\ntasks: {{{TASK}: {{}}}}\n",
        ["fraction"],
    ),
    ("key-list", "grid: x\n? [a, b]\n: 1\ntasks: {toy_diffusion: {}}\n", ["mapping key", "a list"]),
    ("key-map", "grid: x\ntasks:\n  ? {a: 1}\n  : {}\n", ["mapping key", "a dict"]),
    ("key-flow-list", "grid: x\ntasks: {[1, 2]: {}}\n", ["mapping key", "a list"]),
    ("key-bool", "grid: x\ntasks: {yes: {}}\n", ["mapping key True", "quote"]),
    ("deep-brackets", "grid: x\nseeds: " + "[" * 50_000 + "]" * 50_000 + f"\ntasks: {{{TASK}: {{}}}}\n", ["nested"]),
    ("deep-mappings", _nested_maps(5000), ["nested", f"at most {MAX_DEPTH}"]),
    ("grid-trailing-newline", f'grid: "x\\n"\ntasks: {{{TASK}: {{}}}}\n', ["grid", "control characters"]),
    ("grid-separator", f"grid: ../../etc\ntasks: {{{TASK}: {{}}}}\n", ["grid", "'../../etc'", "lower-case"]),
    ("grid-slash", f"grid: a/b\ntasks: {{{TASK}: {{}}}}\n", ["grid", "'a/b'"]),
    ("grid-nul", f'grid: "a\\0b"\ntasks: {{{TASK}: {{}}}}\n', ["grid", "control characters"]),
    ("grid-bidi", f'grid: "ab\\u202ecd"\ntasks: {{{TASK}: {{}}}}\n', ["grid", "control characters"]),
    ("label-separator", 'grid: x\ntasks:\n  "a/../b": {task: toy_diffusion}\n', ["tasks.'a/../b'", "key"]),
    ("label-newline", 'grid: x\ntasks:\n  "toy\\n": {task: toy_diffusion}\n', ["tasks.'toy\\n'", "key"]),
    ("trick-newline", f'grid: x\ntasks:\n  {TASK}: {{tricks: ["ema\\n"]}}\n', ["tricks[0]", "control"]),
    ("trick-separator", f"grid: x\ntasks:\n  {TASK}: {{tricks: [../ema]}}\n", ["tricks[0]", "'../ema'"]),
    ("param-key-tab", f'grid: x\ntasks:\n  {TASK}: {{tricks: {{ema: {{"half\\tlife": 1}}}}}}\n', ["tricks.ema", "key"]),
    ("trick-twice", f"grid: x\ntasks:\n  {TASK}: {{tricks: [ema, fourier, ema]}}\n", ["tricks[2]", "listed twice"]),
    ("key-twice", f"grid: x\ngrid: y\ntasks: {{{TASK}: {{}}}}\n", ["duplicate key 'grid'"]),
    ("seed-twice", f"grid: x\nseeds: [1, 2, 1]\ntasks: {{{TASK}: {{}}}}\n", ["seeds", "duplicates"]),
    ("python-tag", "grid: !!python/object/apply:os.system ['touch pwned']\ntasks: {}\n", ["not valid YAML"]),
    ("two-documents", f"grid: x\ntasks: {{{TASK}: {{}}}}\n---\ngrid: y\n", ["second YAML document"]),
    ("huge-comment", "# " + "x" * (MAX_SPEC_BYTES + 10) + "\ngrid: x\n", ["spec file", "bytes"]),
    ("long-string", f"grid: {'a' * 5000}\ntasks: {{{TASK}: {{}}}}\n", ["grid", "5000 characters"]),
]
BINARY = [("not-utf8", b"grid: \xff\xfe\ntasks: {}\n", ["not UTF-8"])]
PATHS = [  # (id, path given to bench run, substrings)
    ("missing", "missing.yaml", ["does not exist"]),
    ("a-folder", ".", ["is a folder"]),
    ("a-device", "/dev/zero", ["not a regular file"]),
]

DRIVER = """
import contextlib, io, json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from bench.cli import main

out = []
for case_id, spec, results in json.loads(Path(sys.argv[1]).read_text()):
    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["run", spec, "--results", results, "--no-progress"])
    out.append({{"id": case_id, "rc": rc, "s": time.perf_counter() - t0, "err": err.getvalue(),
                "written": Path(results).exists()}})
# peak resident memory of this program: VmHWM belongs to the address space exec created (ru_maxrss would
# also count the pages of a large parent that forked us)
try:
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    rss_mb = int(hwm.split()[1]) / 1024
except (OSError, StopIteration):
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"cases": out, "rss_mb": rss_mb, "torch": "torch" in sys.modules}}))
"""


@pytest.fixture(scope="module")
def driven(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the whole corpus through ``bench run`` in one fresh process; its report."""
    tmp = tmp_path_factory.mktemp("hostile")
    cases = []
    for case_id, text, _ in CORPUS:
        path = tmp / f"{case_id}.yaml"
        path.write_text(text)
        cases.append([case_id, str(path), str(tmp / "results" / case_id)])
    for case_id, data, _ in BINARY:
        path = tmp / f"{case_id}.yaml"
        path.write_bytes(data)
        cases.append([case_id, str(path), str(tmp / "results" / case_id)])
    for case_id, given, _ in PATHS:
        cases.append(
            [case_id, str(tmp / given) if not given.startswith("/") else given, str(tmp / "results" / case_id)]
        )
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "driver.py").write_text(DRIVER.format(root=str(ROOT)))
    proc = subprocess.run(
        [sys.executable, str(tmp / "driver.py"), str(tmp / "cases.json")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["by_id"] = {c["id"]: c for c in report["cases"]}
    report["tmp"] = tmp
    return report


ALL = [(i, n) for i, _, n in CORPUS] + [(i, n) for i, _, n in BINARY] + [(i, n) for i, _, n in PATHS]


@pytest.mark.parametrize(("case_id", "needles"), ALL, ids=[i for i, _ in ALL])
def test_hostile_spec_refused_fast_with_field_and_nothing_written(driven: dict, case_id: str, needles: list[str]):
    case = driven["by_id"][case_id]
    assert case["rc"] == 2, case
    for needle in needles:
        assert needle in case["err"], f"{needle!r} missing from:\n{case['err'][:2000]}"
    assert len(case["err"]) < 4000, "a hostile value must not flood the message"
    assert case["s"] < MAX_SECONDS, case
    assert not case["written"]


def test_corpus_stays_small_and_never_imports_torch(driven: dict) -> None:
    assert 10 < driven["rss_mb"] < MAX_RSS_MB, driven["rss_mb"]  # measured (a Python needs > 10 MB), and small
    assert not driven["torch"], "rejecting a bad spec must not import torch (or the registries)"
    assert not (driven["tmp"] / "pwned").exists()
    assert len(driven["cases"]) >= 40


def test_cli_refuses_a_missing_spec_in_a_fresh_process_quickly(tmp_path: Path) -> None:
    """The whole command, from a cold start: no torch import on the way to the error."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cli", "run", str(tmp_path / "nope.yaml"), "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert elapsed < MAX_SECONDS, elapsed
    assert not (tmp_path / "r").exists()


# --- the same limits on data that did not come from a file (parse_spec) -------------------------------------


def test_python_data_cycles_deep_nesting_and_odd_keys_are_problems_not_tracebacks() -> None:
    cyclic: dict = {"grid": "x", "tasks": {}}
    cyclic["tasks"]["toy_diffusion"] = cyclic
    deep: list = []
    node = deep
    for _ in range(100_000):
        node.append([])
        node = node[0]
    cases = [
        (cyclic, "appears twice"),
        ({"grid": "x", "seeds": deep, "tasks": {TASK: {}}}, "nested more than"),
        ({"grid": "x", ("a", "b"): 1, "tasks": {TASK: {}}}, "(a tuple)"),
        ({"grid": "x", 7: 1, "tasks": {TASK: {}}}, "(a int)"),
        ({"grid": "x", "seeds": 10**400, "tasks": {TASK: {}}}, "seeds: <integer of 401 digits>"),
    ]
    for data, needle in cases:
        with pytest.raises(SpecError) as info:
            parse_spec(data)
        assert needle in str(info.value), str(info.value)


def test_limits_do_not_refuse_the_shipped_grids() -> None:
    import yaml

    for path in sorted((ROOT / "experiments" / "grids").glob("*.yaml")):
        assert check_limits(yaml.safe_load(path.read_text())) == [], path


def test_max_runs_caps_and_raises_deliberately(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.cli import main

    path = tmp_path / "big.yaml"
    path.write_text(
        f"grid: big\nseeds: 1000\ntasks:\n  {TASK}: {{tricks: [ema, fourier_features, stratified_sampling]}}\n"
    )
    with pytest.raises(SpecError, match="4,000 runs"):  # 4 arms × 1000 seeds
        load_spec(path, max_runs=3999)
    assert len(load_spec(path, max_runs=4000).seeds) == 1000
    small = tmp_path / "small.yaml"
    small.write_text(f"grid: small\nseeds: 2\ntasks:\n  {TASK}: {{tricks: [ema, fourier_features]}}\n")
    results = tmp_path / "results"
    assert main(["run", str(small), "--results", str(results), "--max-runs", "5", "--dry-run"]) == 2
    assert "plans 6 runs" in capsys.readouterr().err
    assert main(["run", str(small), "--results", str(results), "--max-runs", "0", "--dry-run"]) == 2
    assert "--max-runs: 0" in capsys.readouterr().err
    assert main(["run", str(small), "--results", str(results), "--max-runs", "6", "--dry-run"]) == 0
    assert not results.exists()
