"""Grid spec validation: every bad spec is rejected with the field, the value and what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from bench.cli import main
from bench.spec import SpecError, load_spec, parse_spec

GOOD = {
    "grid": "t",
    "design": "one_at_a_time",
    "seeds": 2,
    "tasks": {
        "cifar_autoencoder": {
            "params": {"data": "offline"},
            "train": {"budget_samples": 128},
            "tricks": {"ema": {"half_life_samples": 100}, "no_weight_decay": None},
        }
    },
}


def _with(path: str, value, base=GOOD) -> dict:
    spec = copy.deepcopy(base)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value
    return spec


# (spec, substrings the message must contain): field, value, what is allowed / did-you-mean
BAD = [
    (_with("grdi", "x"), ["grdi", "unknown key", 'did you mean "grid"']),
    (_with("grid", "Has Spaces/../x"), ["grid", "Has Spaces", "lower-case"]),
    (_with("design", "one_at_time"), ["design", "one_at_time", 'did you mean "one_at_a_time"']),
    (_with("seeds", 0), ["seeds", "0", "1..1000"]),
    (_with("seeds", [1, 1]), ["seeds", "duplicates"]),
    (_with("seeds", "three"), ["seeds", "'three'", "integer"]),
    (_with("tasks", {}), ["tasks", "mapping from task name"]),
    (
        _with("tasks", {"cifar_autoencoderr": {}}),
        ["cifar_autoencoderr", "unknown task", 'did you mean "cifar_autoencoder"'],
    ),
    (_with("tasks.cifar_autoencoder.trics", {}), ["tasks.cifar_autoencoder.trics", 'did you mean "tricks"']),
    (_with("tasks.cifar_autoencoder.tricks", {"emma": None}), ["tricks.emma", "unknown trick", 'did you mean "ema"']),
    (
        _with("tasks.cifar_autoencoder.tricks", {"cond_dropout": None}),
        ["cond_dropout", "does not apply to task 'cifar_autoencoder'", "tricks that apply", "ema"],
    ),
    (
        _with("tasks.cifar_autoencoder.tricks", {"ema": {"half_life_samples": -3}}),
        ["tricks.ema.half_life_samples", "-3", "> 0"],
    ),
    (
        _with("tasks.cifar_autoencoder.tricks", {"ema": {"half_lif_samples": 3}}),
        ["tricks.ema.half_lif_samples", 'did you mean "half_life_samples"'],
    ),
    (_with("tasks.cifar_autoencoder.train.budget_samples", "lots"), ["train.budget_samples", "'lots'", "integer"]),
    (_with("tasks.cifar_autoencoder.train.budget_samples", 0), ["train.budget_samples", "0", "≥ 1"]),
    (_with("tasks.cifar_autoencoder.train.lr", 0.0), ["train.lr", "0.0", "> 0"]),
    (_with("tasks.cifar_autoencoder.train.lr", float("nan")), ["train.lr", "nan"]),
    (_with("tasks.cifar_autoencoder.train.optimizer", "adam"), ["train.optimizer", "'adam'", "adamw"]),
    (_with("tasks.cifar_autoencoder.params.data", "imagenet"), ["params.data", "'imagenet'", "offline", "cifar10"]),
    (_with("tasks.cifar_autoencoder.params.width", 2.5), ["params.width", "2.5", "integer"]),
    (_with("tasks.cifar_autoencoder.params.lowres_hint", "yes"), ["params.lowres_hint", "'yes'", "true/false"]),
    (
        _with("tasks.cifar_autoencoder.tricks", {"accumulation": {"micro_batches": 5}}),
        ["accumulation.micro_batches", "5", "divide", "batch_size"],
    ),
    (_with("design", "fractional_factorial"), ["fraction", "integer p ≥ 1"]),
    (_with("fraction", 1), ["fraction", "only used with design fractional_factorial"]),
    (_with("wandb", {"mode": "sometimes"}), ["wandb.mode", "'sometimes'", "offline"]),
    (
        _with("tasks.cifar_autoencoder.tricks", "ema"),
        ["tasks.cifar_autoencoder.tricks", "'ema'", "list of trick names"],
    ),
    (_with("tasks.cifar_autoencoder.train.weight_decay", True), ["train.weight_decay", "True", "number"]),
]


@pytest.mark.parametrize(("spec", "needles"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_spec_rejected_with_field_value_and_allowed(spec: dict, needles: list[str]) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} missing from:\n{msg}"


def test_at_least_fifteen_distinct_bad_specs() -> None:
    assert len(BAD) >= 15


def test_good_spec_resolves_defaults() -> None:
    spec = parse_spec(GOOD)
    task = spec.tasks[0]
    assert spec.seeds == (0, 1)
    assert task.train["budget_samples"] == 128
    assert task.train["batch_size"] == 64  # task default
    assert task.tricks["ema"] == {"half_life_samples": 100.0, "warmup": False, "buffers": "copy"}
    assert set(task.tricks["no_weight_decay"]) == set()


def test_all_problems_reported_at_once() -> None:
    bad = _with("design", "nope", _with("seeds", -1))
    with pytest.raises(SpecError) as info:
        parse_spec(bad)
    assert len(info.value.problems) == 2


def test_duplicate_yaml_keys_rejected(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("grid: a\ngrid: b\ntasks: {cifar_autoencoder: {}}\n")
    with pytest.raises(SpecError, match="duplicate key 'grid'"):
        load_spec(path)


def test_yaml_is_data_not_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("grid: !!python/object/apply:os.system ['echo pwned']\ntasks: {cifar_autoencoder: {}}\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_cli_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(yaml.safe_dump(_with("tasks.cifar_autoencoder.tricks", {"emma": None})))
    results = tmp_path / "results"
    code = main(["run", str(spec_path), "--results", str(results), "--no-progress"])
    assert code == 2
    assert 'did you mean "ema"' in capsys.readouterr().err
    assert not results.exists()


def test_cli_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope.yaml"), "--results", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_grids_validate() -> None:
    grids = sorted((Path(__file__).resolve().parent.parent / "experiments" / "grids").glob("*.yaml"))
    assert grids
    for path in grids:
        load_spec(path)
