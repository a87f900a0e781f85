"""Trick bindings: settings become behaviour only through a card's build; what cannot act is rejected.

The registry-driven proofs (every cell: on ≠ off; every parameter: acts or rejected) are in
tests/test_trick_registry.py; this file checks the rules they rely on, one by one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.loop import RunContext, train
from bench.selftest import tiny_cell
from bench.spec import SpecError, parse_spec
from tricks.binding import TrickSet, arm_conflicts
from tricks.card import BuildContext, Param, TrickCard, build_trick
from tricks.registry import REGISTRY

EVALUATED_WEIGHTS = [n for n, c in REGISTRY.items() if c.role == "evaluated_weights"]


def _spec(design: str, tricks: dict, task: str = "toy_diffusion") -> dict:
    return {"grid": "g", "design": design, "seeds": 1, "tasks": {task: {"tricks": tricks}}}


@pytest.mark.parametrize("design", ["leave_one_out", "full_factorial"])
def test_two_tricks_of_one_exclusive_role_are_rejected_for_designs_that_combine_them(design: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_spec(design, {"ema": None, "posthoc_ema": None}))
    msg = str(err.value)
    assert "tasks.toy_diffusion.tricks" in msg and "ema and posthoc_ema" in msg and "evaluated_weights" in msg
    assert "one_at_a_time" in msg  # what to do instead


def test_one_at_a_time_keeps_them_apart_and_validates() -> None:
    parse_spec(_spec("one_at_a_time", dict.fromkeys(EVALUATED_WEIGHTS)))


def test_every_pair_of_evaluated_weights_tricks_conflicts() -> None:
    for a in EVALUATED_WEIGHTS:
        for b in EVALUATED_WEIGHTS:
            if a != b:
                assert arm_conflicts([REGISTRY[a], REGISTRY[b]]), (a, b)
    assert arm_conflicts([REGISTRY["ema"], REGISTRY["accumulation"], REGISTRY["stratified_sampling"]]) == []


def test_an_incompatible_arm_exits_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "grid: bad\ndesign: leave_one_out\nseeds: 1\n"
        "tasks:\n  toy_diffusion:\n    tricks: {ema: , checkpoint_averaging: }\n"
    )
    code = main(["run", str(spec), "--results", str(tmp_path / "results"), "--no-progress"])
    assert code == 2
    assert "checkpoint_averaging" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_a_trick_set_refuses_conflicting_tricks_even_when_built_by_hand() -> None:
    context = BuildContext("toy_diffusion", frozenset(), higher_is_better=False)
    with pytest.raises(ValueError, match="evaluated_weights"):
        TrickSet(
            {"ema": REGISTRY["ema"].resolve({}), "posthoc_ema": REGISTRY["posthoc_ema"].resolve({})}, REGISTRY, context
        )


def test_a_setting_the_task_cannot_honour_is_rejected_with_the_field_named() -> None:
    # toy_diffusion's model has no BatchNorm: EMA's buffer policy and checkpoint averaging's BN recomputation do nothing
    with pytest.raises(SpecError, match=r"tricks\.ema\.buffers: 'average' is not allowed; allowed: leave it out"):
        parse_spec(_spec("one_at_a_time", {"ema": {"buffers": "average"}}))
    with pytest.raises(SpecError, match=r"tricks\.checkpoint_averaging\.recompute_bn"):
        parse_spec(_spec("one_at_a_time", {"checkpoint_averaging": {"recompute_bn": False}}))
    # replay's alpha acts only with prioritized replay
    with pytest.raises(SpecError, match=r"tricks\.replay_buffer\.alpha: .*prioritized: true"):
        parse_spec(_spec("one_at_a_time", {"replay_buffer": {"alpha": 1.0}}, task="rl_policy"))
    # and on the AE stream prioritized replay is a real arm now
    cell = parse_spec(
        _spec("one_at_a_time", {"replay_buffer": {"prioritized": True, "alpha": 1.0, "beta": 1.0}}, "cifar_autoencoder")
    )
    assert cell.tasks[0].tricks["replay_buffer"] == {"capacity": 2048, "prioritized": True, "alpha": 1.0, "beta": 1.0}


def test_settings_that_switch_the_trick_off_are_rejected() -> None:
    with pytest.raises(SpecError, match=r"no_weight_decay: has no effect: train.weight_decay is 0"):
        parse_spec(
            {"grid": "g", "tasks": {"toy_diffusion": {"train": {"weight_decay": 0}, "tricks": ["no_weight_decay"]}}}
        )
    with pytest.raises(SpecError, match=r"checkpoint_averaging\.n: 1 with mode 'last'"):
        parse_spec(_spec("one_at_a_time", {"checkpoint_averaging": {"n": 1, "mode": "last"}}))
    for trick, setting in (
        ("cond_noise", {"std": 0.0}),
        ("cond_dropout", {"p": 0.0}),
        ("nonleaky_augmentation", {"p": 0.0}),
    ):
        with pytest.raises(SpecError, match=rf"tricks\.{trick}\."):
            parse_spec(_spec("one_at_a_time", {trick: setting}))


def test_a_trick_listed_twice_is_rejected() -> None:
    with pytest.raises(SpecError, match=r"tricks\[1\]: trick .ema. is listed twice"):
        parse_spec({"grid": "g", "tasks": {"toy_diffusion": {"tricks": ["ema", "ema"]}}})


def test_a_build_that_ignores_a_setting_fails_loudly() -> None:
    card = TrickCard(
        name="lazy",
        summary="s",
        off="o",
        on="o",
        params=(Param("used", float, 1.0, "d"), Param("ignored", float, 2.0, "d")),
        cost="c",
        effect="e",
        references=("r",),
        role="task",
        build=lambda s, ctx: s["used"],
    )
    with pytest.raises(TypeError, match="ignored the setting"):
        build_trick(card, card.resolve({}), BuildContext("t", frozenset(), False))


def test_an_unknown_role_is_refused_with_a_did_you_mean() -> None:
    with pytest.raises(ValueError, match='did you mean "evaluated_weights"'):
        TrickCard("x", "s", "o", "o", (), "c", "e", ("r",), role="evaluated_weight", build=lambda s, c: None)


def test_bools_are_not_numbers_and_huge_numbers_are_clear_errors() -> None:
    card = REGISTRY["ema"]
    with pytest.raises(ValueError, match="half_life_samples"):
        card.resolve({"half_life_samples": True})
    with pytest.raises(ValueError, match="too large"):
        card.resolve({"half_life_samples": 10**400})
    from tricks.ema import EMA

    with pytest.raises(ValueError, match="half_life_samples: True"):
        EMA(torch.nn.Linear(2, 2), half_life_samples=True)


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


def test_checkpoint_averaging_n1_last_evaluates_exactly_the_final_weights(tmp_path: Path) -> None:
    """With BN recomputation on (the only way n: 1, mode: last is not the trick switched off), the evaluated
    parameters are the final training parameters exactly; only the BN statistics are recomputed."""
    base = tiny_cell("cifar_autoencoder", {})
    ckpt = tiny_cell("cifar_autoencoder", {"checkpoint_averaging": {"n": 1, "mode": "last", "recompute_bn": True}})
    train(base, tmp_path / "base", RunContext(threads=1))
    train(ckpt, tmp_path / "ckpt", RunContext(threads=1))
    a, b = _final(tmp_path / "base"), _final(tmp_path / "ckpt")
    from experiments.cifar_autoencoder import ConvAE

    params = {n for n, _ in ConvAE(4).named_parameters()}
    assert params <= a.keys()
    for name in params:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("running_mean"))  # BN recomputed


def test_checkpoint_averaging_best_offers_the_final_weights(tmp_path: Path, synthetic_task: str) -> None:
    """The synthetic regression's test error falls at every evaluation: the best single checkpoint is the final one."""
    train_cfg = {"budget_samples": 1024, "eval_every_samples": 256, "lr": 0.02, "momentum": 0.0}
    base = tiny_cell_for(synthetic_task, {}, train_cfg)
    best = tiny_cell_for(synthetic_task, {"checkpoint_averaging": {"n": 1, "mode": "best"}}, train_cfg)
    train(base, tmp_path / "base", RunContext(threads=1))
    res = train(best, tmp_path / "best", RunContext(threads=1))
    curve = (tmp_path / "base" / "curve.csv").read_text().splitlines()[1:]
    mses = [float(line.split(",")[2]) for line in curve]
    assert mses == sorted(mses, reverse=True) and len(mses) == 4  # falling: the final checkpoint is the best
    a, b = _final(tmp_path / "base"), _final(tmp_path / "best")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res["metric"]["test_mse"] == pytest.approx(mses[-1])


def tiny_cell_for(task: str, tricks: dict, train_cfg: dict):  # a Cell
    spec = parse_spec(
        {"grid": "t", "seeds": [0], "design": "leave_one_out" if tricks else "one_at_a_time",
         "tasks": {task: {"train": train_cfg, "tricks": tricks}}}
    )  # fmt: skip
    from bench.grid import expand

    return expand(spec)[0]


def test_bench_list_shows_a_full_card_with_the_defaults_each_task_uses(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "ema"]) == 0
    out = capsys.readouterr().out
    for text in ("role: evaluated_weights", "half_life_samples [samples]", "references:", "incompatible: "):
        assert text in out
    # the task's own defaults, not the card's; and what has no effect on a task is said so
    assert "toy_diffusion: half_life_samples=8192, warmup=false   [no effect here, so not settable: buffers]" in out
    assert "cifar_autoencoder: half_life_samples=1024, warmup=false, buffers=copy" in out


def test_bench_list_task_and_unknown_names(capsys: pytest.CaptureFixture) -> None:
    assert main(["list", "rl_policy"]) == 0
    out = capsys.readouterr().out
    assert "metric: eval_return (higher is better)" in out and "replay_buffer (task): capacity=10000" in out
    assert "env_steps_per_update [transitions]" in out
    assert main(["list", "emma"]) == 2
    assert 'did you mean "ema"' in capsys.readouterr().err
