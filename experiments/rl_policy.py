"""``rl_policy``: DQN on gymnasium's classic-control environments (CartPole-v1 by default).

The model the loop trains is an MLP Q-network (observation → one Q-value per discrete
action). The task owns everything else a DQN needs: the environment, the target network,
ε-greedy exploration and the transition store (replay buffer, or the most recent
transitions when the replay trick is off). The budget is counted in **environment
transitions**: every optimizer step steps the environment ``env_steps_per_update`` times
(its update-to-data ratio), whatever the accumulation setting.

One optimizer step, top to bottom:

1. ``batch``: act ε-greedily with the online network for this micro-batch's share of the
   step's transitions, store them, return a learning batch of ``micro_batch_size`` transitions
   with its TD target ``r + γ·(1 − terminated)·max_a' Q_target(s', a')``.
2. ``loss``: Huber TD error ``Q(s, a) − target``. Time-limit truncation is not termination: it
   bootstraps (Pardo et al. 2018).
3. ``after_optimizer_step``: target-network update (hard copy or EMA, ``params.target_update``).

Where each task-level trick acts (search for "TRICK:"):

- replay_buffer: ``batch`` pushes into a :class:`tricks.replay.ReplayBuffer` and samples a
  uniform (or prioritized) batch from the "data" stream; off: the most recent
  ``micro_batch_size`` transitions, in order (a FIFO in task state).
- fourier_features: :class:`QNetwork` encodes the normalised observation with
  :class:`tricks.fourier.FourierFeatures` before the MLP; off: the raw normalised observation.
- stratified_sampling: stratified exploration noise (see :meth:`RLPolicy.exploration_number`).
- ``params.target_update: ema`` — EMA as the target-network update: Polyak averaging with
  :func:`tricks.ema.ema_update_` and a decay from a half-life in transitions
  (:func:`tricks.ema.decay_from_half_life`). A task parameter, not a grid trick: the
  ``ema`` trick is the loop-level one (the *evaluated* policy is the EMA of the online weights).

Loop-level tricks (ema, checkpoint_averaging, periodic_averaging, posthoc_ema,
accumulation, no_weight_decay) act in ``bench/loop.py``. Accumulation splits each step's
learning batch into k micro-batches *and* its environment steps into k shares (each
micro-batch steps the environment ``env_steps_per_update / k`` times), so a step still
consumes ``env_steps_per_update`` transitions and the number of updates per transition is
the same in both arms — only the granularity of acting and learning changes.
Not applicable: precise_bn (no BatchNorm), patchwise, cond_noise, cond_dropout,
nonleaky_augmentation, feature_matching (no images, no conditioning, no consumer network).

Determinism and exact resume: training episode ``e`` is reset with seed
``streams.seed_for("env", 0, e)``; exploration numbers come from ``("env", 1, block)``
streams (a pure function of the environment-step index); replay sampling from
``("data", step, micro)``; evaluation episodes from ``("eval", 0, i)``. The classic-control
dynamics are deterministic given their state, so :meth:`RLPolicy.state_dict` holds the
environment's physical state, the time-limit counter, the current observation, the episode
counters, the target network and the transition store — and nothing else is needed for a
resumed run to equal the uninterrupted one bit for bit.

Metrics: ``eval_return`` (primary, higher is better): mean undiscounted return of the
greedy policy over fixed evaluation episodes (``eval_episodes`` at the final evaluation,
the first ``eval_episodes_intermediate`` of the same episodes at intermediate ones; each
capped at ``eval_max_steps`` steps); ``train_return_auc``: mean return of the training
episodes completed so far (the area under the training curve divided by its length);
``episodes``: training episodes completed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from gymnasium.wrappers import TimeLimit
from torch import nn

from experiments.base import MicroBatch, Task
from tricks import ema, stratified
from tricks.card import Param
from tricks.fourier import FourierFeatures

__all__ = ["ENVS", "TASK", "QNetwork", "RLPolicy"]

# Observation normalisation per environment: (centre, half-range) per dimension, so that
# typical observations lie in about [-1, 1] (the unit the Fourier ``scale`` is measured in).
# Unbounded velocities get a typical range rather than the observation space's ±inf.
ENVS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # cart position, cart velocity, pole angle (rad), pole angular velocity
    "CartPole-v1": ((0.0, 0.0, 0.0, 0.0), (2.4, 3.0, 0.2095, 3.5)),
    # cos/sin of both joint angles, both angular velocities (the observation space's bounds)
    "Acrobot-v1": ((0.0,) * 6, (1.0, 1.0, 1.0, 1.0, 4 * math.pi, 9 * math.pi)),
    # position, velocity (the observation space's bounds)
    "MountainCar-v0": ((-0.3, 0.0), (0.9, 0.07)),
}


class Env(IntEnum):
    """Sub-streams of the ``env`` purpose."""

    RESET = 0  # training episode resets (per episode)
    EXPLORE = 1  # exploration numbers (per block of environment steps)


class Eval(IntEnum):
    """Sub-streams of the ``eval`` purpose (identical in every arm of a seed)."""

    EPISODES = 0  # evaluation episode resets (per episode)
    RANDOM_POLICY = 1  # the random-policy reference's actions (per episode)


class Init(IntEnum):
    """Sub-streams of the ``init`` purpose."""

    FOURIER = 1  # the Fourier encoder's random frequencies


class QNetwork(nn.Module):
    """Normalised observation → [Fourier features] → Linear-ReLU-Linear-ReLU-Linear → Q-values.

    The hidden and output layers are created before the input layer (and the Fourier
    frequencies come from their own generator), so switching Fourier features on changes
    only the input layer's initialisation, not the rest of the network's.
    """

    def __init__(
        self,
        obs_center: tuple[float, ...],
        obs_scale: tuple[float, ...],
        num_actions: int,
        hidden: int = 64,
        fourier: Callable[..., FourierFeatures] | None = None,
        fourier_generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        obs_dim = len(obs_center)
        self.hidden = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, num_actions)
        # constants, not state: non-persistent, so averaging tricks never touch them
        self.register_buffer("obs_center", torch.tensor(obs_center, dtype=torch.float32), persistent=False)
        self.register_buffer("obs_scale", torch.tensor(obs_scale, dtype=torch.float32), persistent=False)
        self.encoder: FourierFeatures | None = None
        in_dim = obs_dim
        if fourier is not None:  # TRICK: fourier_features — sin/cos features of the normalised observation
            self.encoder = fourier(obs_dim, generator=fourier_generator)
            in_dim = self.encoder.out_features
        self.input = nn.Linear(in_dim, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = (obs - self.obs_center) / self.obs_scale
        if self.encoder is not None:
            x = self.encoder(x)
        h = F.relu(self.hidden(F.relu(self.input(x))))
        return self.head(h)


def _time_limit(env: gym.Env) -> TimeLimit:
    """The ``TimeLimit`` wrapper of an environment made by ``gym.make`` (it holds the step counter)."""
    wrapper: Any = env
    while isinstance(wrapper, gym.Wrapper):
        if isinstance(wrapper, TimeLimit):
            return wrapper
        wrapper = wrapper.env
    raise ValueError(f"environment {env} has no TimeLimit wrapper; rl_policy needs one to checkpoint its step counter")


class RLPolicy(Task):
    name = "rl_policy"
    summary = "DQN (MLP Q-network, target network, ε-greedy) on gymnasium CartPole-v1 / Acrobot / MountainCar"
    # task-role tricks wired below ("TRICK:"); loop roles: the default (no BatchNorm)
    tricks = ("replay_buffer", "fourier_features", "stratified_sampling")
    params = (
        Param(
            "env",
            str,
            "CartPole-v1",
            "gymnasium environment (discrete actions); the defaults are tuned for CartPole-v1 — Acrobot-v1 and "
            "MountainCar-v0 train and resume exactly but are not learned at these settings",
            choices=tuple(ENVS),
        ),
        Param("hidden", int, 64, "width of the two hidden layers", "units", low=1, high=4096),
        Param("gamma", float, 0.99, "discount factor of the TD target", low=0.0, high=1.0, high_open=True),
        Param(
            "env_steps_per_update",
            int,
            4,
            "environment transitions per optimizer step (the budget unit; with accumulation shared by the "
            "micro-batches, so it must be a multiple of accumulation.micro_batches)",
            "transitions",
            low=1,
        ),
        Param("eps_start", float, 1.0, "ε of ε-greedy exploration at the start", low=0.0, high=1.0),
        Param("eps_end", float, 0.05, "ε after the decay (kept until the end)", low=0.0, high=1.0),
        Param(
            "eps_decay_fraction",
            float,
            0.25,
            "fraction of train.budget_samples over which ε falls linearly from eps_start to eps_end",
            low=0.0,
            low_open=True,
            high=1.0,
        ),
        Param(
            "exploration_block_steps",
            int,
            64,
            "consecutive environment steps whose exploration numbers are drawn together (stratified over the "
            "block when stratified_sampling is on)",
            "env steps",
            low=1,
        ),
        Param(
            "target_update",
            str,
            "hard",
            "target network: hard copy every target_update_every_samples, or ema (Polyak averaging, EMA as the "
            "target-network update) with half-life target_half_life_samples",
            choices=("hard", "ema"),
        ),
        Param("target_update_every_samples", int, 400, "hard target copy interval", "transitions", low=1),
        Param("target_half_life_samples", float, 400.0, "EMA target half-life", "transitions", low=0.0, low_open=True),
        Param("huber_delta", float, 1.0, "Huber loss threshold on the TD error", low=0.0, low_open=True),
        Param("eval_episodes", int, 10, "greedy evaluation episodes at the final evaluation", "episodes", low=1),
        Param(
            "eval_episodes_intermediate",
            int,
            3,
            "episodes at intermediate evaluations (the first ones of the final set)",
            "episodes",
            low=1,
        ),
        Param(
            "eval_max_steps",
            int,
            500,
            "cap on an evaluation episode's length (also capped by the environment's own time limit)",
            "env steps",
            low=1,
        ),
    )
    metric = "eval_return"
    higher_is_better = True
    dense_grads = True  # every parameter is in every step's graph (tested per trick)
    # loss reads only model, batch (with its TD target) and shared settings; not prioritized replay (vectorize_problems)
    vectorizable = True
    metric_directions = {"train_return_auc": True}
    train_defaults = {
        "budget_samples": 24000,
        "batch_size": 64,
        "lr": 1e-3,
        "eval_every_samples": 6000,
        "checkpoint_every_samples": 6000,
    }
    trick_defaults = {
        "ema": {"half_life_samples": 2000.0},
        "periodic_averaging": {"snapshot_every_samples": 1000, "window_fraction": 0.25},
        "posthoc_ema": {"snapshot_every_samples": 2000},
        "replay_buffer": {"capacity": 10000},
        "fourier_features": {"num_features": 64, "scale": 1.0},
    }
    tiny = {
        "params": {"hidden": 16, "eval_episodes": 2, "eval_episodes_intermediate": 1, "eval_max_steps": 50,
                   "target_update_every_samples": 32},
        "train": {"budget_samples": 256, "batch_size": 32, "eval_every_samples": 64, "checkpoint_every_samples": 96},
    }  # fmt: skip

    @classmethod
    def step_samples(cls, params: dict[str, Any], train: dict[str, Any]) -> int:
        """Transitions per optimizer step: ``env_steps_per_update``, whatever the batch size."""
        return int(params["env_steps_per_update"])

    @classmethod
    def check(cls, params: dict[str, Any], tricks: dict[str, dict[str, Any]], train: dict[str, Any]) -> list[str]:
        problems = []
        k = tricks.get("accumulation", {}).get("micro_batches")
        if k and params["env_steps_per_update"] % k:
            problems.append(
                f"params.env_steps_per_update: {params['env_steps_per_update']} is not allowed with "
                f"tricks.accumulation.micro_batches {k}; allowed: a multiple of {k} (each micro-batch steps the "
                "environment env_steps_per_update / micro_batches times)"
            )
        if params["eval_episodes_intermediate"] > params["eval_episodes"]:
            problems.append(
                f"params.eval_episodes_intermediate: {params['eval_episodes_intermediate']} is not allowed; "
                f"allowed: ≤ params.eval_episodes ({params['eval_episodes']})"
            )
        if "fourier_features" in tricks:
            f = tricks["fourier_features"]
            dim = len(ENVS[params["env"]][0])
            if f["kind"] == "log" and f["num_features"] % (2 * dim):
                problems.append(
                    f"tricks.fourier_features.num_features: {f['num_features']} is not allowed with kind 'log' on "
                    f"{params['env']} ({dim} observation dims); allowed: a multiple of {2 * dim}"
                )
            elif f["num_features"] % 2:
                problems.append(
                    f"tricks.fourier_features.num_features: {f['num_features']} is not allowed; allowed: even"
                )
        return problems

    @classmethod
    def vectorize_problems(
        cls, params: dict[str, Any], tricks: dict[str, dict[str, Any]], train: dict[str, Any]
    ) -> list[str]:
        """Prioritized replay updates each seed's priorities inside ``loss``: not vectorizable."""
        if tricks.get("replay_buffer", {}).get("prioritized"):
            return [
                "tricks.replay_buffer.prioritized: true cannot be seed-vectorized on rl_policy (the loss updates "
                "each seed's priorities); allowed: false, or train this arm without --vectorize-seeds"
            ]
        return []

    def __init__(self, params, tricks, streams, device, train) -> None:
        super().__init__(params, tricks, streams, device, train)
        p = params
        if p["env"] not in ENVS:  # the spec validates this; a task built by hand gets the same message
            raise ValueError(f"params.env: {p['env']!r} is not allowed; allowed: one of {', '.join(ENVS)}")
        self.env = gym.make(p["env"], disable_env_checker=True)
        self.num_actions = int(self.env.action_space.n)
        self.obs_center, self.obs_scale = ENVS[p["env"]]
        self.batch_size = train["batch_size"]
        self.eps_decay_samples = max(1.0, p["eps_decay_fraction"] * train["budget_samples"])
        # the task-role tricks that are on (None when off), built from their validated settings
        self.stratifier = tricks.get("stratified_sampling")
        self.buffer = tricks.get("replay_buffer")
        self.fourier = tricks.get("fourier_features")
        # replay off: the latest transitions as rows, oldest first (at most one full batch is ever needed)
        self.recent = torch.zeros(0, 2 * len(self.obs_center) + 3)
        self.target: nn.Module | None = None
        self._eval_envs: list[gym.Env] = []
        self._u_block, self._u_values = -1, []
        # the environment stream: counters, current episode, training-episode log
        self.env_steps = 0
        self.episode = 0
        self.episode_return = 0.0
        self.train_returns: list[float] = []
        self.train_return_steps: list[int] = []  # env steps at each training episode's end
        self.obs, _ = self.env.reset(seed=self.streams.seed_for("env", Env.RESET, 0))

    # --- model ------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        model = QNetwork(
            self.obs_center,
            self.obs_scale,
            self.num_actions,
            self.p["hidden"],
            self.fourier,
            fourier_generator=self.streams.generator("init", Init.FOURIER) if self.fourier is not None else None,
        )
        self.target = copy.deepcopy(model).to(self.device).requires_grad_(False)
        return model

    # --- acting -----------------------------------------------------------------------------
    def samples_per_micro_batch(self, micro_batch_size: int) -> int:
        """Environment transitions one micro-batch consumes: its share of ``env_steps_per_update``."""
        steps, rem = divmod(self.p["env_steps_per_update"] * micro_batch_size, self.batch_size)
        if rem or steps < 1:
            raise ValueError(
                f"micro_batch_size: {micro_batch_size} is not allowed; allowed: batch_size / k for a k dividing "
                f"params.env_steps_per_update ({self.p['env_steps_per_update']})"
            )
        return steps

    def epsilon(self, env_step: int) -> float:
        """ε of ε-greedy at environment step ``env_step``: linear from eps_start to eps_end, then constant."""
        frac = min(1.0, env_step / self.eps_decay_samples)
        return self.p["eps_start"] + frac * (self.p["eps_end"] - self.p["eps_start"])

    def exploration_number(self, env_step: int) -> float:
        """The exploration number u ∈ [0, 1) of environment step ``env_step``.

        One uniform per step decides both whether to explore (u < ε) and, if so, the random
        action ``floor(u/ε · A)`` (given u < ε, u/ε is uniform on [0, 1)). The numbers of
        ``exploration_block_steps`` consecutive steps are drawn together from the stream
        ``("env", 1, block)``, a pure function of the step index (nothing to checkpoint).

        TRICK: stratified_sampling — the block's numbers are stratified (one in each of the
        B strata [i/B, (i+1)/B), shuffled over the block's steps) instead of i.i.d. Each step
        still explores with probability ε and picks a uniform action, but within a block
        the number of exploratory steps is ⌊εB⌋ or ⌈εB⌉ (i.i.d.: Binomial(B, ε)) and the
        exploratory actions are spread evenly over the actions (their u/ε are stratified
        too) — the analogue of stratifying a diffusion batch's noise levels: the same
        per-sample distribution, less variance in what a stretch of training sees.
        """
        block, offset = divmod(env_step, self.p["exploration_block_steps"])
        if block != self._u_block:
            gen = self.streams.generator("env", Env.EXPLORE, block)
            n = self.p["exploration_block_steps"]
            if self.stratifier is not None:  # TRICK: stratified_sampling — one number per stratum of the block
                u = self.stratifier.uniform(n, generator=gen, dtype=torch.float64)
            else:
                u = stratified.iid_uniform(n, generator=gen, dtype=torch.float64)
            self._u_block, self._u_values = block, u.tolist()
        return self._u_values[offset]

    def _explore(self, env_step: int) -> int | None:
        """The random action of ε-greedy at environment step ``env_step``, or None when it acts greedily."""
        eps = self.epsilon(env_step)
        u = self.exploration_number(env_step)
        if u < eps:
            return min(int(u / eps * self.num_actions), self.num_actions - 1)
        return None

    def _act(self, model: nn.Module, obs: np.ndarray, env_step: int) -> int:
        action = self._explore(env_step)
        if action is not None:
            return action
        return int(model(torch.as_tensor(obs, device=self.device)[None]).argmax(1))

    def _env_steps(self, model: nn.Module, n: int) -> torch.Tensor:
        """Step the training environment ``n`` times with ε-greedy actions; return the transitions as rows.

        A transition is one float32 row ``[obs, action, reward, next_obs, terminated]`` (see
        :meth:`unpack`): one tensor per batch keeps the per-step tensor operations few, which
        is most of the cost of a task this small.
        """
        rows = np.empty((n, 2 * len(self.obs_center) + 3), dtype=np.float32)
        with torch.no_grad():
            for i in range(n):
                self._env_step(self._act(model, self.obs, self.env_steps), rows[i])
        return torch.from_numpy(rows)

    def _env_step(self, action: int, row: np.ndarray) -> None:
        """One environment step with ``action``: the transition into ``row``, episode bookkeeping, resets."""
        d = len(self.obs_center)
        next_obs, reward, terminated, truncated, _ = self.env.step(action)
        row[:d] = self.obs
        row[d : d + 2] = (action, reward)
        row[d + 2 : 2 * d + 2] = next_obs
        row[-1] = terminated
        self.env_steps += 1
        self.episode_return += float(reward)
        if terminated or truncated:
            self.train_returns.append(self.episode_return)
            self.train_return_steps.append(self.env_steps)
            self.episode += 1
            self.episode_return = 0.0
            next_obs, _ = self.env.reset(seed=self.streams.seed_for("env", Env.RESET, self.episode))
        self.obs = next_obs

    def unpack(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of transition rows: obs, action (int64), reward, next_obs, terminated (0/1 float)."""
        d = len(self.obs_center)
        return {
            "obs": rows[:, :d],
            "action": rows[:, d].long(),
            "reward": rows[:, d + 1],
            "next_obs": rows[:, d + 2 : 2 * d + 2],
            "terminated": rows[:, -1],
        }

    # --- training ---------------------------------------------------------------------------
    def batch(self, model: nn.Module, mb: MicroBatch) -> Any:
        return self._learning_batch(self._env_steps(model, self.samples_per_micro_batch(mb.size)), mb)

    @classmethod
    def batch_group(
        cls, tasks: Sequence[Task], forward: Callable[[torch.Tensor], torch.Tensor], mb: MicroBatch
    ) -> list[Any]:
        """Seed-vectorized: every seed's micro-batch, their environments stepped in lockstep.

        At each environment step every seed draws its own exploration number (as :meth:`batch` does);
        when at least one acts greedily, one batched forward of all the seeds' Q-networks on their own
        observations (``forward``) gives the greedy actions. Then each seed steps its own environment and
        builds its learning batch from its own transitions and replay buffer — each seed's stream of
        transitions is the one its run alone would collect, up to a greedy argmax that a last-bit
        difference of the batched forward can flip on a near tie.
        """
        me: list[RLPolicy] = list(tasks)  # type: ignore[arg-type]
        n = me[0].samples_per_micro_batch(mb.size)
        rows = [np.empty((n, 2 * len(t.obs_center) + 3), dtype=np.float32) for t in me]
        with torch.no_grad():
            for i in range(n):
                actions = [t._explore(t.env_steps) for t in me]
                if any(a is None for a in actions):
                    obs = torch.as_tensor(np.stack([t.obs for t in me]), device=me[0].device)[:, None]  # (S, 1, d)
                    greedy = forward(obs)[:, 0].argmax(1).tolist()
                    actions = [g if a is None else a for a, g in zip(actions, greedy)]
                for t, a, r in zip(me, actions, rows):
                    t._env_step(a, r[i])
        return [t._learning_batch(torch.from_numpy(r), mb) for t, r in zip(me, rows)]

    def _learning_batch(self, new: torch.Tensor, mb: MicroBatch) -> dict[str, torch.Tensor]:
        """The learning batch of micro-batch ``mb`` once its new transitions ``new`` were collected."""
        extra = {}
        if self.buffer is not None:  # TRICK: replay_buffer — push the transitions, learn from a sample of all kept
            self.buffer.extend({"transition": new})
            beta = None
            if self.buffer.prioritized:  # PER: anneal the importance-weight exponent to 1 over the budget
                beta = self.buffer.beta + (1.0 - self.buffer.beta) * mb.progress
            sample = self.buffer.sample(mb.size, self.streams.generator("data", mb.step, mb.index), beta=beta)
            rows = sample["transition"]
            if self.buffer.prioritized:
                extra = {"weight": sample["weight"], "index": sample["index"]}
        else:  # replay off: learn from the most recent transitions only, oldest first
            self.recent = torch.cat([self.recent, new])[-self.batch_size :]
            rows = self.recent[-mb.size :]
        batch = self.unpack(rows.to(self.device)) | extra
        # the TD target here, with this seed's target network, so that loss needs no per-seed state
        # (seed-vectorized training computes every seed's loss in one call); the target network does not
        # change between batch and loss, so the numbers are those computed in loss
        batch["target"] = self.td_target(batch)
        return batch

    @torch.no_grad()
    def td_target(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The TD target ``r + γ·(1 − terminated)·max_a' Q_target(s', a')`` of a batch, by the target network."""
        if self.target is None:
            raise ValueError("td_target: call build_model first (it creates the target network)")
        next_q = self.target(batch["next_obs"]).max(1).values
        return batch["reward"] + self.p["gamma"] * (1.0 - batch["terminated"]) * next_q

    def q_and_target(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``Q(s, a)`` of the online network and the TD target (``batch["target"]``, else :meth:`td_target`)."""
        q = model(batch["obs"]).gather(1, batch["action"][:, None]).squeeze(1)
        y = batch["target"] if "target" in batch else self.td_target(batch)
        return q, y

    def loss(self, model: nn.Module, batch: Any, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
        q, y = self.q_and_target(model, batch)
        delta = self.p["huber_delta"]
        if "weight" not in batch:
            return F.huber_loss(q, y, delta=delta), {}
        # TRICK: replay_buffer (prioritized) — importance-weighted loss, |TD error| as the new priorities
        self.buffer.update_priorities(batch["index"], (q - y).detach())
        return (batch["weight"] * F.huber_loss(q, y, reduction="none", delta=delta)).mean(), {}

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Target-network update, once per optimizer step."""
        if self.target is None:
            raise ValueError("after_optimizer_step: call build_model first (it creates the target network)")
        per_step = self.p["env_steps_per_update"]
        if self.p["target_update"] == "ema":  # EMA as the target-network update (Polyak averaging)
            decay = ema.decay_from_half_life(self.p["target_half_life_samples"], per_step)
            ema.ema_update_(list(self.target.parameters()), list(model.parameters()), decay)
        else:  # hard copy whenever this step crosses a multiple of the interval (in transitions)
            every = self.p["target_update_every_samples"]
            if (step + 1) * per_step // every > step * per_step // every:
                self.target.load_state_dict(model.state_dict())

    # --- evaluation -------------------------------------------------------------------------
    def eval_seeds(self, episodes: int) -> list[int]:
        """Reset seeds of the first ``episodes`` evaluation episodes (the same for every arm of a seed)."""
        return [self.streams.seed_for("eval", Eval.EPISODES, i) for i in range(episodes)]

    def _eval_env_list(self, n: int) -> list[gym.Env]:
        while len(self._eval_envs) < n:
            self._eval_envs.append(gym.make(self.p["env"], disable_env_checker=True))
        return self._eval_envs[:n]

    def rollout_returns(self, model: nn.Module | None, episodes: int) -> list[float]:
        """Undiscounted returns of the evaluation episodes under the greedy policy of ``model``.

        ``model=None`` plays uniformly random actions (from the "eval" stream) instead: the
        "learned nothing" reference on the same episodes. The episodes run in lockstep, one
        batched forward per step; each stops at termination, truncation or ``eval_max_steps``.
        """
        envs = self._eval_env_list(episodes)
        obs = [env.reset(seed=s)[0] for env, s in zip(envs, self.eval_seeds(episodes))]
        returns = [0.0] * episodes
        active = list(range(episodes))
        gens = [self.streams.generator("eval", Eval.RANDOM_POLICY, i) for i in range(episodes)]
        for _ in range(self.p["eval_max_steps"]):
            if not active:
                break
            if model is None:
                actions = [int(torch.randint(self.num_actions, (1,), generator=gens[i])) for i in active]
            else:
                with torch.no_grad():
                    x = torch.as_tensor(np.stack([obs[i] for i in active]), device=self.device)
                    actions = model(x).argmax(1).tolist()
            still = []
            for i, a in zip(active, actions):
                obs[i], reward, terminated, truncated, _ = envs[i].step(a)
                returns[i] += float(reward)
                if not (terminated or truncated):
                    still.append(i)
            active = still
        return returns

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        n = self.p["eval_episodes"] if final else self.p["eval_episodes_intermediate"]
        returns = self.rollout_returns(model, n)
        auc = sum(self.train_returns) / len(self.train_returns) if self.train_returns else float("nan")
        return {"eval_return": sum(returns) / n, "train_return_auc": auc, "episodes": float(len(self.train_returns))}

    def intermediate_from_final(self, final_metrics: dict[str, float]) -> dict[str, float] | None:
        # the same episodes only when both evaluations play all of them (fewer: a smaller batched forward)
        return dict(final_metrics) if self.p["eval_episodes_intermediate"] == self.p["eval_episodes"] else None

    def render_outputs(self, model: nn.Module, path: Path) -> bool:
        """Two panels: training-episode returns over environment steps, and the evaluation episodes' returns."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        returns = self.rollout_returns(model.eval(), self.p["eval_episodes"])
        fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(9, 3.2))
        ax_train.plot(self.train_return_steps, self.train_returns, ".", ms=3, alpha=0.5, label="episode")
        if len(self.train_returns) >= 10:
            w = 10
            mean = np.convolve(self.train_returns, np.ones(w) / w, mode="valid")
            ax_train.plot(self.train_return_steps[w - 1 :], mean, "-", label=f"mean of {w}")
            ax_train.legend(fontsize=8)
        ax_train.set_xlabel("environment steps (transitions)")
        ax_train.set_ylabel("training episode return")
        ax_train.set_title(f"{self.p['env']}: training", fontsize=9)
        ax_eval.bar(range(len(returns)), returns)
        ax_eval.set_xlabel("evaluation episode")
        ax_eval.set_ylabel("return (greedy policy)")
        ax_eval.set_title(f"evaluation: mean {sum(returns) / len(returns):.1f}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True

    # --- checkpointed state -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.target is None:
            raise ValueError("state_dict: call build_model first (it creates the target network)")
        state: dict[str, Any] = {
            # the environment: physical state (float64, exact), time-limit counter, current observation
            "env_state": torch.from_numpy(np.array(self.env.unwrapped.state, dtype=np.float64)),
            "elapsed_steps": int(_time_limit(self.env)._elapsed_steps),
            "obs": torch.from_numpy(np.array(self.obs, copy=True)),
            "env_steps": self.env_steps,
            "episode": self.episode,
            "episode_return": self.episode_return,
            "train_returns": torch.tensor(self.train_returns, dtype=torch.float64),
            "train_return_steps": torch.tensor(self.train_return_steps, dtype=torch.int64),
            "target": self.target.state_dict(),
        }
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        else:
            state["recent"] = self.recent.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target is None:
            raise ValueError("load_state_dict: call build_model first (it creates the target network)")
        self.episode = int(state["episode"])
        # reset to the current episode (wrappers initialised), then overwrite the physics and the counter
        self.env.reset(seed=self.streams.seed_for("env", Env.RESET, self.episode))
        self.env.unwrapped.state = state["env_state"].numpy().copy()
        _time_limit(self.env)._elapsed_steps = int(state["elapsed_steps"])
        self.obs = state["obs"].numpy().copy()
        self.env_steps = int(state["env_steps"])
        self.episode_return = float(state["episode_return"])
        self.train_returns = state["train_returns"].tolist()
        self.train_return_steps = state["train_return_steps"].tolist()
        self.target.load_state_dict(state["target"])
        if self.buffer is not None:
            self.buffer.load_state_dict(state["buffer"])
        else:
            self.recent = state["recent"].clone()
        self._u_block = -1  # the exploration block is re-derived from its stream


TASK = RLPolicy
