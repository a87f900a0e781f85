"""The ``rl_policy`` task: DQN on gymnasium's CartPole learns, resumes bit-exactly mid-episode,
learns from the right transitions, and evaluates every arm on the same episodes."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from bench.loop import RunContext, build_task, train
from bench.seeds import SeedBundle
from bench.spec import SpecError, parse_spec
from experiments.base import MicroBatch
from tests.test_loop import cell_for
from tricks import ema
from tricks.registry import REGISTRY

TASK = "rl_policy"
# small but real: ~25 random-policy episodes, so checkpoints fall mid-episode and across resets
SMALL_PARAMS = {"hidden": 16, "eval_episodes": 3, "eval_episodes_intermediate": 2, "eval_max_steps": 100}
SMALL_TRAIN = {"budget_samples": 512, "batch_size": 32, "eval_every_samples": 128, "checkpoint_every_samples": 200}


def _task(tricks: dict | None = None, params: dict | None = None, train_cfg: dict | None = None, seed: int = 0):
    """A task object built exactly as the loop builds it (resolved spec, seed bundle, model)."""
    cell = cell_for(TASK, tricks, params, train_cfg, seed=seed)
    cfg = cell.config
    task, _ = build_task(cfg, SeedBundle(cell.seed), torch.device("cpu"))
    torch.manual_seed(SeedBundle(cell.seed).seed_for("init"))
    return task, task.build_model()


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final_model.pt", weights_only=True)


# --- learning ---------------------------------------------------------------------------------


def test_baseline_learns_far_above_random_policy(tmp_path: Path) -> None:
    """The quick-grid baseline (no replay buffer, hard target copies) on CartPole-v1, seed 0.

    Measured over seeds 0-5 (24000 transitions): greedy eval returns 186, 108, 97, 264, 125, 119
    against 20-28 for the uniform-random policy on the same episodes.
    """
    cell = cell_for(TASK, seed=0)
    result = train(cell, tmp_path / "run", RunContext(threads=1))
    assert result["status"] == "completed"
    learned = result["metric"]["eval_return"]
    task, _ = _task(seed=0)
    episodes = task.p["eval_episodes"]
    random_return = sum(task.rollout_returns(None, episodes)) / episodes  # the same evaluation episodes
    assert 10 < random_return < 40  # CartPole's uniform-random policy: ~22
    assert learned > 100 and learned > 4 * random_return, (learned, random_return)
    assert result["metric"]["train_return_auc"] > 2 * random_return  # the training curve rises too
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# --- exact resume -----------------------------------------------------------------------------

RESUME_CASES = {
    "baseline": ({}, {}),
    "replay": ({"replay_buffer": REGISTRY["replay_buffer"].tiny_setting}, {}),
    "prioritized_replay": ({"replay_buffer": {"capacity": 128, "prioritized": True}}, {}),
    "fourier": ({"fourier_features": REGISTRY["fourier_features"].tiny_setting}, {}),
    "stratified": ({"stratified_sampling": REGISTRY["stratified_sampling"].tiny_setting}, {}),
    "target_ema": ({}, {"target_update": "ema", "target_half_life_samples": 64.0}),
    "accumulation": ({"accumulation": {"micro_batches": 2}}, {}),
    "acrobot": ({"replay_buffer": None}, {"env": "Acrobot-v1"}),
    "mountaincar": ({"fourier_features": {"num_features": 8}}, {"env": "MountainCar-v0"}),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_interrupted_run_resumes_bit_exactly(tmp_path: Path, case: str) -> None:
    tricks, params = RESUME_CASES[case]
    cell = cell_for(TASK, tricks, SMALL_PARAMS | params, SMALL_TRAIN)
    full = train(cell, tmp_path / "full", RunContext(threads=1))
    assert full["status"] == "completed"
    total = full["cost"]["steps"]
    stop_at = random.Random(case).randrange(1, total - 2)
    out = tmp_path / "resumed"
    assert train(cell, out, RunContext(threads=1, max_steps=stop_at)) == {"status": "interrupted", "step": stop_at}
    task_state = torch.load(out / "checkpoint.pt", weights_only=True)["task"]
    assert task_state["elapsed_steps"] > 0, "the interruption should fall mid-episode"
    if case not in ("acrobot", "mountaincar"):  # CartPole episodes have ended and been reset before
        assert task_state["episode"] > 0
    # a second interruption, then to the end
    assert train(cell, out, RunContext(threads=1, max_steps=(total - stop_at) // 2 + 1))["status"] == "interrupted"
    resumed = train(cell, out, RunContext(threads=1))
    assert resumed["cost"]["resumes"] == 2
    assert resumed["metric"] == full["metric"]
    for name in ("train.csv", "curve.csv"):
        assert (out / name).read_text() == (tmp_path / "full" / name).read_text(), name
    for k, v in _final(tmp_path / "full").items():
        torch.testing.assert_close(_final(out)[k], v, atol=0, rtol=0)


def test_task_state_round_trip_continues_the_same_stream() -> None:
    """Restoring ``state_dict`` into a fresh task (mid-episode) gives the same next transitions."""
    a, model = _task({"replay_buffer": {"capacity": 256}}, SMALL_PARAMS, SMALL_TRAIN)
    for step in range(7):
        a.batch(model, MicroBatch(step, 0, 1, 32, 0.0))
    state = a.state_dict()
    assert state["elapsed_steps"] > 0
    b, _ = _task({"replay_buffer": {"capacity": 256}}, SMALL_PARAMS, SMALL_TRAIN)
    b.load_state_dict(state)
    for step in range(7, 40):
        xa, xb = a.batch(model, MicroBatch(step, 0, 1, 32, 0.0)), b.batch(model, MicroBatch(step, 0, 1, 32, 0.0))
        for k in xa:
            assert torch.equal(xa[k], xb[k]), (step, k)
    assert a.train_returns == b.train_returns and a.episode == b.episode and a.env_steps == b.env_steps


# --- what the learner sees --------------------------------------------------------------------


def test_replay_off_learns_from_the_most_recent_transitions_only() -> None:
    # ε = 1: actions do not depend on the network, so both arms walk the same trajectory
    params = SMALL_PARAMS | {"eps_start": 1.0, "eps_end": 1.0}
    off, model = _task({}, params, SMALL_TRAIN)
    on, _ = _task({"replay_buffer": {"capacity": 4096}}, params, SMALL_TRAIN)
    # micro-batches of 16 (accumulation k = 2): the window kept (32) is longer than what is learned from
    m = 16
    per_call = off.samples_per_micro_batch(m)
    assert per_call == off.p["env_steps_per_update"] // 2
    saw_older = False
    for step in range(100):
        b_off, b_on = off.batch(model, MicroBatch(step, 0, 1, m, 0.0)), on.batch(model, MicroBatch(step, 0, 1, m, 0.0))
        n = (step + 1) * per_call  # transitions so far
        # the replay buffer (capacity > n) holds the whole stream in order: its tail is the recent window
        stream = on.unpack(on.buffer.state_dict()["storage"]["transition"])
        assert len(stream["obs"]) == n
        for k in stream:
            assert torch.equal(b_off[k], stream[k][-m:]), (step, k)
        assert torch.equal(b_off["target"], off.td_target(b_off))  # the TD target travels with the batch
        assert len(b_off["obs"]) == min(m, n)
        # replay on: a uniform sample over everything kept, older transitions included
        assert len(b_on["obs"]) == m
        positions = on.buffer.sample(m, on.streams.generator("data", step, 0))["index"]
        saw_older |= bool((positions < n - m).any())
    assert saw_older


def test_accumulation_keeps_transitions_per_update(tmp_path: Path) -> None:
    """k micro-batches share a step's env_steps_per_update transitions: same updates per transition."""
    base = train(cell_for(TASK, {}, SMALL_PARAMS, SMALL_TRAIN), tmp_path / "a", RunContext(threads=1))
    acc = cell_for(TASK, {"accumulation": {"micro_batches": 2}}, SMALL_PARAMS, SMALL_TRAIN)
    accumulated = train(acc, tmp_path / "b", RunContext(threads=1))
    assert accumulated["cost"]["steps"] == base["cost"]["steps"] == SMALL_TRAIN["budget_samples"] // 4
    assert accumulated["cost"]["samples"] == base["cost"]["samples"] == SMALL_TRAIN["budget_samples"]


def test_stratified_exploration_counts_exploratory_steps_exactly() -> None:
    """Per block of B steps at constant ε: ⌊εB⌋ or ⌈εB⌉ explorations (i.i.d.: Binomial spread), balanced actions."""
    params = {"eps_start": 0.3, "eps_end": 0.3, "exploration_block_steps": 40}
    strat, _ = _task({"stratified_sampling": None}, params)
    iid, _ = _task({}, params)
    B, eps = 40, 0.3
    counts_s, counts_i, action_gap_s, action_gap_i = [], [], [], []
    for block in range(200):
        us = [strat.exploration_number(block * B + i) for i in range(B)]
        ui = [iid.exploration_number(block * B + i) for i in range(B)]
        assert all(0 <= u < 1 for u in us + ui)
        counts_s.append(sum(u < eps for u in us))
        counts_i.append(sum(u < eps for u in ui))
        # the exploratory steps' action numbers u/ε are stratified too: the two actions split them evenly
        action_gap_s.append(abs(sum(u < eps / 2 for u in us) - sum(eps / 2 <= u < eps for u in us)))
        action_gap_i.append(abs(sum(u < eps / 2 for u in ui) - sum(eps / 2 <= u < eps for u in ui)))
    assert set(counts_s) <= {math.floor(eps * B), math.ceil(eps * B)}
    assert max(counts_i) - min(counts_i) >= 6  # Binomial(40, 0.3) has std 2.9
    assert max(action_gap_s) <= 1 and max(action_gap_i) >= 4
    assert abs(sum(counts_i) / len(counts_i) - eps * B) < 1.0  # i.i.d. is unbiased too


def test_target_updates_hard_and_ema() -> None:
    hard, model = _task({}, SMALL_PARAMS | {"target_update_every_samples": 12})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the online network moves away from the target
    hard.after_optimizer_step(model, 0)  # samples 0 → 4: no multiple of 12 crossed
    assert not torch.equal(hard.target.head.weight, model.head.weight)
    hard.after_optimizer_step(model, 2)  # samples 8 → 12: copy
    for p, q in zip(hard.target.parameters(), model.parameters()):
        assert torch.equal(p, q)

    soft, model = _task({}, SMALL_PARAMS | {"target_update": "ema", "target_half_life_samples": 8.0})
    before = [p.clone() for p in soft.target.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    soft.after_optimizer_step(model, 0)
    decay = ema.decay_from_half_life(8.0, 4)  # 2^(-4/8) per step of 4 transitions
    for b, p, q in zip(before, soft.target.parameters(), model.parameters()):
        torch.testing.assert_close(p, decay * b + (1 - decay) * q, atol=1e-6, rtol=0)
    assert not soft.target.head.weight.requires_grad


# --- evaluation -------------------------------------------------------------------------------


def test_every_arm_evaluates_on_the_same_episodes() -> None:
    arms = [{}, {"replay_buffer": None}, {"stratified_sampling": None}, {"ema": None}, {"fourier_features": None}]
    tasks = [_task(t, SMALL_PARAMS)[0] for t in arms] + [_task({}, SMALL_PARAMS | {"target_update": "ema"})[0]]
    seeds = tasks[0].eval_seeds(10)
    assert len(set(seeds)) == 10
    random_returns = tasks[0].rollout_returns(None, 3)
    for t in tasks[1:]:
        assert t.eval_seeds(10) == seeds
        assert t.rollout_returns(None, 3) == random_returns  # the same initial states and random actions
    assert tasks[0].eval_seeds(3) == seeds[:3]  # intermediate evaluations: the first episodes of the final set
    # the same network evaluated in two arms that share its architecture: identical greedy returns
    _, model = _task({}, SMALL_PARAMS)
    assert tasks[1].evaluate(model, final=True)["eval_return"] == tasks[2].evaluate(model, final=True)["eval_return"]
    # another seed, other episodes
    assert not set(_task({}, SMALL_PARAMS, seed=1)[0].eval_seeds(10)) & set(seeds)


def test_evaluation_does_not_touch_the_training_stream(tmp_path: Path) -> None:
    often = cell_for(TASK, {}, SMALL_PARAMS, SMALL_TRAIN | {"eval_every_samples": 64})
    rarely = cell_for(TASK, {}, SMALL_PARAMS, SMALL_TRAIN | {"eval_every_samples": 512})
    train(often, tmp_path / "a", RunContext(threads=1))
    train(rarely, tmp_path / "b", RunContext(threads=1))
    assert (tmp_path / "a" / "train.csv").read_text() == (tmp_path / "b" / "train.csv").read_text()


def test_render_outputs_writes_png(tmp_path: Path) -> None:
    task, model = _task({}, SMALL_PARAMS)
    for step in range(30):
        task.batch(model, MicroBatch(step, 0, 1, 32, 0.0))
    assert task.train_returns
    path = tmp_path / "returns.png"
    assert task.render_outputs(model, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- spec errors ------------------------------------------------------------------------------


def _spec(params: dict, tricks: dict | None = None) -> dict:
    return {"grid": "t", "seeds": 1, "tasks": {TASK: {"params": params, "tricks": tricks or {}}}}


def test_bad_env_name_is_a_clear_spec_error() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec(_spec({"env": "CartPol-v1"}))
    msg = str(err.value)
    assert "tasks.rl_policy.params.env" in msg and "'CartPol-v1'" in msg
    assert "CartPole-v1" in msg and "Acrobot-v1" in msg and "did you mean" in msg


def test_cross_field_problems_are_spec_errors() -> None:
    with pytest.raises(SpecError, match=r"params\.env_steps_per_update: 3 .*micro_batches 2"):
        parse_spec(_spec({"env_steps_per_update": 3}, {"accumulation": {"micro_batches": 2}}))
    with pytest.raises(SpecError, match=r"params\.eval_episodes_intermediate: 5 .*≤ params\.eval_episodes \(2\)"):
        parse_spec(_spec({"eval_episodes": 2, "eval_episodes_intermediate": 5}))
    with pytest.raises(SpecError, match=r"precise_bn.*does not apply to task 'rl_policy'"):
        parse_spec(_spec({}, {"precise_bn": None}))
