"""Command-line overrides (Hydra grammar) and subset selection of ``bench run``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from bench.cli import DEFAULT_SPEC, build_parser, main
from bench.commands import run_inputs
from bench.grid import expand
from bench.overrides import RECORD_KEY, apply_overrides, parse_overrides, split_record
from bench.runner import grid_cells, plan
from bench.selection import Selection, parse_seeds
from bench.spec import SpecError, parse_spec
from tests.synthetic_task import Synthetic

TINY_TRAIN = {"budget_samples": 64, "batch_size": 32, "eval_every_samples": 64, "checkpoint_every_samples": 64}


def _spec(**top) -> dict:
    return {
        "grid": "ov",
        "design": "one_at_a_time",
        "seeds": 3,
        "tasks": {
            "synthetic": {
                "params": {"dim": 4},
                "train": dict(TINY_TRAIN),
                "tricks": {"ema": {"half_life_samples": 64}, "accumulation": {"micro_batches": 2}},
            }
        },
        **top,
    }


def _write(tmp_path: Path, data: dict, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False))  # no shared objects: no aliases
    return path


def _problems(exc: pytest.ExceptionInfo[SpecError]) -> list[str]:
    return exc.value.problems


# --- valid overrides --------------------------------------------------------------------------------


@pytest.mark.usefixtures("synthetic_task")
def test_overrides_change_values_typed_like_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, _spec())
    launch = plan(
        path,
        tmp_path / "results",
        [
            "seeds=5",
            "tasks.synthetic.train.lr=3e-3",  # not in the YAML: the schema default is overridden
            "tasks.synthetic.tricks.ema.half_life_samples=500",
            "tasks.synthetic.params.noise_std=0.5",
            "wandb.project=elsewhere",
        ],
    )
    (task,) = launch.spec.tasks
    assert launch.spec.seeds == (0, 1, 2, 3, 4)
    assert task.train["lr"] == 3e-3 and isinstance(task.train["lr"], float)
    assert task.tricks["ema"]["half_life_samples"] == 500
    assert task.params == {"dim": 4, "noise_std": 0.5}
    assert launch.spec.wandb["project"] == "elsewhere"
    # the same values written in the YAML give the same resolved spec
    edited = _spec(seeds=5, wandb={"project": "elsewhere"})
    block = edited["tasks"]["synthetic"]
    block["train"]["lr"] = 3e-3
    block["tricks"]["ema"]["half_life_samples"] = 500
    block["params"]["noise_std"] = 0.5
    assert parse_spec(edited).to_dict() == launch.spec.to_dict()


@pytest.mark.usefixtures("synthetic_task")
def test_more_seeds_keep_the_run_ids_of_the_existing_seeds(tmp_path: Path) -> None:
    path = _write(tmp_path, _spec())
    before = {c.run_id for c in plan(path, tmp_path / "r").cells}
    after = plan(path, tmp_path / "r", ["seeds=5"]).cells
    assert len(before) == 9 and len(after) == 15
    assert before == {c.run_id for c in after if c.seed < 3}


@pytest.mark.usefixtures("synthetic_task")
def test_add_remove_and_short_forms() -> None:
    raw = _spec()
    raw["tasks"]["synthetic"]["tricks"] = ["ema"]  # the list form
    raw["wandb"] = True  # the bool form
    out = apply_overrides(
        raw,
        parse_overrides(
            [
                "+tasks.synthetic.tricks.no_weight_decay=null",
                "tasks.synthetic.tricks.ema.half_life_samples=128",  # into a trick given by name only
                "~tasks.synthetic.train.eval_every_samples",
                "~tasks.synthetic.params.dim=4",  # only if equal
                "wandb.mode=offline",
                "++description=overridden",
                "seeds=[0,2]",
            ]
        ),
    )
    assert raw["tasks"]["synthetic"]["tricks"] == ["ema"], "the input mapping is not changed"
    spec = parse_spec(out)
    (task,) = spec.tasks
    assert list(task.tricks) == ["ema", "no_weight_decay"]
    assert task.tricks["ema"]["half_life_samples"] == 128
    assert task.train["eval_every_samples"] == Synthetic.train_defaults["eval_every_samples"]  # the default again
    assert task.params["dim"] == 8
    assert spec.wandb == {"enabled": True, "project": "trickbench", "mode": "offline"}
    assert spec.description == "overridden" and spec.seeds == (0, 2)
    # removing a trick removes its arms
    out = apply_overrides(_spec(), parse_overrides(["~tasks.synthetic.tricks.ema"]))
    assert {c.arm for c in expand(parse_spec(out))} == {"baseline", "+accumulation"}


# --- invalid overrides ------------------------------------------------------------------------------


@pytest.mark.usefixtures("synthetic_task")
def test_invalid_paths_name_the_path_with_did_you_mean() -> None:
    with pytest.raises(SpecError) as exc:
        apply_overrides(
            _spec(),
            parse_overrides(
                [
                    "tasks.synthetic.train.lrr=1e-3",
                    "tasks.synthetc.train.lr=1e-3",
                    "tasks.synthetic.tricks.eam.half_life_samples=1",
                    "sedes=4",
                    "tasks.synthetic.params.dim.x=1",
                ]
            ),
        )
    lrr, task, trick, top, scalar = _problems(exc)
    assert lrr.startswith("tasks.synthetic.train.lrr: unknown key") and 'did you mean "lr"?' in lrr
    assert "keys at tasks.synthetic.train: " in lrr and "budget_samples" in lrr
    assert task.startswith("tasks.synthetc: unknown key") and 'did you mean "synthetic"?' in task
    assert "+tasks.synthetc.train.lr=1e-3" in task  # how to add a task block instead
    assert trick.startswith("tasks.synthetic.tricks.eam: unknown key") and 'did you mean "ema"?' in trick
    assert "+tasks.synthetic.tricks.eam.half_life_samples=1" in trick
    assert top.startswith("sedes: unknown key") and 'did you mean "seeds"?' in top
    assert scalar.startswith("tasks.synthetic.params.dim: is 4, not a mapping")


@pytest.mark.usefixtures("synthetic_task")
def test_add_of_a_set_key_and_remove_of_an_unset_key_are_errors() -> None:
    with pytest.raises(SpecError) as exc:
        apply_overrides(
            _spec(),
            parse_overrides(
                ["+seeds=4", "~tasks.synthetic.train.lr", "~tasks.synthetic.params.dim=5", "~tasks.synthetic.trics"]
            ),
        )
    add, rm_default, rm_value, rm_typo = _problems(exc)
    assert add.startswith("seeds: already set to 3") and "++seeds=..." in add
    assert rm_default.startswith("tasks.synthetic.train.lr: not set in the spec, nothing to remove")
    assert rm_value.startswith("tasks.synthetic.params.dim: is 4, not 5")
    assert 'did you mean "tricks"?' in rm_typo


@pytest.mark.usefixtures("synthetic_task")
def test_wrong_value_gets_the_validators_error_as_in_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, _spec())
    cases = {
        "tasks.synthetic.train.lr=abc": ("train", "lr", "abc"),
        "tasks.synthetic.tricks.ema.half_life_samples=-5": ("tricks", "ema", {"half_life_samples": -5}),
        "tasks.synthetic.train.optimizer=adamm": ("train", "optimizer", "adamm"),
    }
    for override, (block, key, value) in cases.items():
        with pytest.raises(SpecError) as from_override:
            plan(path, tmp_path / "r", [override])
        edited = _spec()
        edited["tasks"]["synthetic"][block][key] = value
        with pytest.raises(SpecError) as from_yaml:
            parse_spec(edited)
        assert _problems(from_override) == _problems(from_yaml), override
    assert 'did you mean "adamw"?' in _problems(from_override)[0]
    with pytest.raises(SpecError, match=r"seeds: 0 is out of range"):
        plan(path, tmp_path / "r", ["seeds=0"])
    with pytest.raises(SpecError, match=r"tasks\.synthetic\.train\.lrr: 'lrr' is not allowed.*did you mean \"lr\""):
        plan(path, tmp_path / "r", ["+tasks.synthetic.train.lrr=1"])  # added keys meet the validator's check


def test_grammar_errors_are_all_reported() -> None:
    with pytest.raises(SpecError) as exc:
        parse_overrides(["seeds", "seeds=1,2", "a=${b}", "a@pkg=1", "=3", "a=[1,2"])
    no_eq, sweep, interp, package, no_key, unclosed = _problems(exc)
    assert no_eq.startswith("override 'seeds': not an override") and "key=value" in no_eq
    assert "sweeps" in sweep and "seeds=[0,1,2]" in sweep
    assert "interpolations are not supported" in interp
    assert "@package" in package
    assert "no key before '='" in no_key
    assert unclosed.startswith("override 'a=[1,2': not an override")


@pytest.mark.usefixtures("synthetic_task")
def test_cli_bad_override_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _spec())
    results = tmp_path / "results"
    cases = {
        "tasks.synthetic.train.lrr=1e-3": "tasks.synthetic.train.lrr: unknown key (override",
        "tasks.synthetic.train.lr=abc": "tasks.synthetic.train.lr: 'abc' is not allowed; allowed: number > 0",
        "seeds=1,2": "override 'seeds=1,2': sweeps",
    }
    for bad, needle in cases.items():
        assert main(["run", str(path), bad, "--results", str(results), "--executor", "debug", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: invalid grid") and needle in err, err
    assert not results.exists()


# --- recorded in the stored spec --------------------------------------------------------------------


@pytest.mark.usefixtures("synthetic_task")
def test_overrides_recorded_in_grid_yaml_and_the_grid_still_reads(tmp_path: Path) -> None:
    path = _write(tmp_path, _spec(seeds=1))
    results = tmp_path / "results"
    common = ["--results", str(results), "--executor", "debug", "--no-progress", "--no-report"]
    assert main(["run", str(path), "--tricks", "ema", "tasks.synthetic.train.lr=0.02", *common]) == 0
    gdir = results / "ov"
    stored = yaml.safe_load((gdir / "grid.yaml").read_text())
    assert stored[RECORD_KEY] == ["tasks.synthetic.train.lr=0.02"]
    assert stored["tasks"]["synthetic"]["train"]["lr"] == 0.02  # the resolved spec has it applied
    spec, cells = grid_cells(gdir)  # what `bench status` and `bench report` read
    assert len(cells) == 3 and spec.tasks[0].train["lr"] == 0.02
    assert main(["status", str(gdir)]) == 0
    # launching the stored grid.yaml again: the record is kept (not re-applied) and extended
    assert main(["run", str(gdir / "grid.yaml"), "tasks.synthetic.train.weight_decay=0", *common]) == 0
    stored = yaml.safe_load((gdir / "grid.yaml").read_text())
    assert stored[RECORD_KEY] == ["tasks.synthetic.train.lr=0.02", "tasks.synthetic.train.weight_decay=0"]
    assert list((gdir / "history").glob("grid-*.yaml")), "the earlier grid.yaml is kept in history/"
    assert split_record({"grid": "g", RECORD_KEY: "not a list"})[1] == []


# --- selection --------------------------------------------------------------------------------------


def test_seed_ranges() -> None:
    assert parse_seeds(["0-3,7"]) == (0, 1, 2, 3, 7)
    assert parse_seeds(["5", "1-2"]) == (5, 1, 2)
    for bad in ("3-1", "a", "-2", "1-"):
        with pytest.raises(ValueError, match=rf"--seeds: {bad!r} is not allowed; allowed: comma-separated"):
            parse_seeds([bad])


@pytest.mark.usefixtures("synthetic_task")
def test_selection_keeps_run_ids_and_filters_arms(tmp_path: Path) -> None:
    raw = _spec(design="full_factorial", seeds=8)
    path = _write(tmp_path, raw)
    whole = plan(path, tmp_path / "r").cells
    by_id = {c.run_id: c for c in whole}
    sel = plan(path, tmp_path / "r", selection=Selection(tricks=("ema",), seeds=parse_seeds(["0-3,7"]))).cells
    assert [c.run_id for c in sel] == [
        c.run_id for c in whole if set(c.tricks_on) <= {"ema"} and c.seed in (0, 1, 2, 3, 7)
    ]
    assert {c.arm for c in sel} == {"baseline", "ema"}  # the factorial arm ema+accumulation is not all-selected
    assert all(by_id[c.run_id] == c for c in sel)  # the very cells of the whole grid
    # a second task block: --tasks keeps its cells, with their ids
    raw["tasks"]["other"] = {**raw["tasks"]["synthetic"], "task": "synthetic", "params": {"dim": 5}}
    path = _write(tmp_path, raw)
    whole = plan(path, tmp_path / "r").cells
    other = plan(path, tmp_path / "r", selection=Selection(tasks=("other",))).cells
    assert [c.run_id for c in other] == [c.run_id for c in whole if c.task == "other"] and other


@pytest.mark.usefixtures("synthetic_task")
def test_selection_errors_name_the_flag(tmp_path: Path) -> None:
    path = _write(tmp_path, _spec())
    with pytest.raises(ValueError, match=r"--tasks: 'synthetc' is not a task of grid ov.*did you mean \"synthetic\""):
        plan(path, tmp_path / "r", selection=Selection(tasks=("synthetc",)))
    with pytest.raises(ValueError, match=r"--tricks: 'eam' is not a trick .*allowed: ema, accumulation.*\"ema\""):
        plan(path, tmp_path / "r", selection=Selection(tricks=("eam",)))
    with pytest.raises(ValueError, match=r"--seeds: 9 is not a seed of grid ov; allowed: 0-2"):
        plan(path, tmp_path / "r", selection=Selection(seeds=(9,)))
    raw = _spec(design="leave_one_out")
    raw["tasks"]["synthetic"]["tricks"]["no_weight_decay"] = None
    loo = _write(tmp_path, raw, "loo.yaml")
    with pytest.raises(ValueError, match=r"--tricks ema: selects no run of grid ov"):
        plan(loo, tmp_path / "r", selection=Selection(tricks=("ema",)))  # every arm has at least two tricks


@pytest.mark.usefixtures("synthetic_task")
def test_selected_launch_trains_the_subset_and_stores_the_whole_grid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, _spec(seeds=2))
    results = tmp_path / "results"
    common = ["--results", str(results), "--executor", "debug", "--no-progress", "--no-report"]
    assert main(["run", str(path), "--tricks", "ema", "--seeds", "1", *common]) == 0
    out = capsys.readouterr().out
    assert "selection --tricks ema --seeds 1: 2 of the grid's 6 runs" in out
    _, cells = grid_cells(results / "ov")
    assert len(cells) == 6  # the whole grid is stored
    trained = {p.name for p in (results / "ov" / "runs").iterdir() if (p / "result.json").exists()}
    assert trained == {c.run_id for c in cells if c.seed == 1 and c.arm in ("baseline", "+ema")}
    # the whole grid afterwards trains only the rest
    assert main(["run", str(path), "--dry-run", *common]) == 0
    assert "6 runs (2 completed, 4 pending); 4 to train, 2 already finished" in capsys.readouterr().out


# --- argument handling ------------------------------------------------------------------------------


def test_overrides_may_follow_options_and_replace_the_default_spec() -> None:
    args = build_parser(["run"]).parse_args(["run", "g.yaml", "seeds=2"])
    assert run_inputs(args)[:2] == ("g.yaml", ["seeds=2"])
    args = argparse.Namespace(spec="seeds=2", overrides=["~tasks.rl_policy"], tasks=None, tricks=None, seeds=None)
    assert run_inputs(args)[:2] == (str(DEFAULT_SPEC), ["seeds=2", "~tasks.rl_policy"])


def test_cli_override_after_options_and_default_spec(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    results = ["--results", str(tmp_path / "r")]
    assert main(["run", "--dry-run", "seeds=1", "--tasks", "rl_policy", *results, "--tricks", "ema"]) == 0
    out = capsys.readouterr().out
    assert "overrides: seeds=1" in out and "selection --tasks rl_policy --tricks ema: 2 of the grid's" in out
    with pytest.raises(SystemExit) as exc:
        main(["run", str(DEFAULT_SPEC), "--dry-run", *results, "seeds=2", "--bogus"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
