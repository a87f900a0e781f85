"""Replay buffer: decorrelate a non-i.i.d. data stream by sampling from a FIFO memory.

Trick card
----------
When data arrives as a correlated stream — RL transitions from consecutive environment
steps, or a class-sorted image stream — learning from each batch as it comes gives
highly correlated gradients and forgets the past. A replay buffer keeps the last
``capacity`` items and each step trains on a batch drawn uniformly (or by priority) from
all of them.

- **off**: learn from the most recent items only (the stream as it comes).
- **on**: each step, ``extend`` the buffer with the new items, then train on
  ``sample(batch_size, generator)``. It is the data source of a task whose stream is not
  i.i.d. (class-sorted images, RL transitions).
- **parameters**: ``capacity`` (integer ≥ 1, unit items, default 10000); ``prioritized``
  (default false): prioritized experience replay, P(i) ∝ p_i^α; ``alpha`` (≥ 0, default
  0.6; 0 is uniform); ``beta`` (in [0, 1], default 0.4; importance-weight exponent, 1 fully
  corrects the bias — PER anneals it to 1 via the ``beta`` attribute or ``sample(beta=)``).
- **cost**: memory ``capacity × item size`` (allocated once, on the first ``extend``, on
  the device of the first batch); per step a gather of ``batch_size`` items. Prioritized
  sampling is O(capacity) per call (``torch.multinomial`` over all priorities, not a sum
  tree) — fine up to ~10⁶ items; at most 2²⁴ items.
- **expected effect**: the lag-1 autocorrelation of what the model sees drops as capacity
  grows (tests check this); less forgetting on a sorted stream; stabler off-policy RL.
  Too large a buffer trains on stale data.
- **incompatible**: on-policy RL (PPO, A2C) — their updates need the current policy's data.

Semantics: sampling is uniform with replacement over what is stored; FIFO eviction at
capacity (a batch larger than ``capacity`` keeps its last ``capacity`` items). Every
sample also returns ``"index"`` (storage positions, for :meth:`ReplayBuffer.update_priorities`)
and ``"weight"`` (importance weights, all ones when not prioritized), so the loss code is
the same in both modes: ``(weight * per_sample_loss).mean()``.

Prioritized replay (Schaul et al. 2016): stored priorities are the raw ``|p| + eps``;
the exponent α is applied exactly once, at sampling time, by
:func:`priority_probabilities` (torchrl applied it twice: pytorch/rl#2205, #2211). New
items get the largest raw priority seen so far (1.0 at first), so each is likely sampled at
least once. Importance weights ``w_i = (N·P(i))^-β`` are divided by the largest weight over
the whole buffer (``(N·min P)^-β``, as torchrl and OpenAI baselines), so ``w ≤ 1``.

References: torchrl ``torchrl/data/replay_buffers`` (``ReplayBuffer``,
``LazyTensorStorage``, ``RandomSampler``, ``PrioritizedSampler``); Lin 1992; Mnih et al.
2015 (DQN); Schaul et al. 2016 (PER, arXiv:1511.05952).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = ["CARD", "ReplayBuffer", "build", "priority_probabilities", "ring_positions"]

_RESERVED = ("index", "weight")


def ring_positions(start: int, count: int, capacity: int) -> Tensor:
    """Storage positions (int64) written by ``count`` items starting at ``start`` in a ring.

    ``(start + arange(count)) % capacity``; ``count`` must not exceed ``capacity`` (two
    items would land on one position).
    """
    for name, v, lo in (("capacity", capacity, 1), ("count", count, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: {v!r} is not allowed; allowed: integer ≥ {lo}")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < capacity:
        raise ValueError(f"start: {start!r} is not allowed; allowed: integer in [0, {capacity - 1}]")
    if count > capacity:
        raise ValueError(f"count: {count!r} is not allowed; allowed: integer ≤ capacity ({capacity})")
    return (start + torch.arange(count, dtype=torch.int64)) % capacity


def priority_probabilities(priorities: Tensor, alpha: float) -> Tensor:
    """Sampling probabilities ``p_i^α / Σ_j p_j^α`` of prioritized replay (float64).

    ``priorities`` are the raw, positive priorities (the buffer stores ``|p| + eps``);
    this is the only place α is applied. α = 0 is uniform.
    """
    _check_alpha(alpha)
    if priorities.ndim != 1 or priorities.numel() == 0:
        raise ValueError(f"priorities: shape {tuple(priorities.shape)} is not allowed; allowed: 1-d, non-empty")
    p = priorities.to(torch.float64)
    if not bool(torch.isfinite(p).all()) or bool((p <= 0).any()):
        raise ValueError("priorities: not allowed; allowed: finite values > 0")
    # divide by the max before the power: no overflow for large priorities·α
    w = (p / p.max()).pow(alpha)
    return w / w.sum()


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha: {alpha!r} is not allowed; allowed: finite number ≥ 0")


def _check_beta(beta: float) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta: {beta!r} is not allowed; allowed: number in [0, 1]")


class ReplayBuffer:
    """FIFO ring buffer of tensor dicts with uniform or prioritized sampling.

    Items are dicts of tensors (one key per field: ``"obs"``, ``"action"``, ``"image"``…);
    a batch of items is a dict whose tensors share their leading dimension. Storage is
    allocated on the first :meth:`extend` with the dtype, shape and device of that batch.
    """

    def __init__(
        self,
        capacity: int,
        *,
        prioritized: bool = False,
        alpha: float = 0.6,
        beta: float = 0.4,
        eps: float = 1e-6,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity: {capacity!r} is not allowed; allowed: integer ≥ 1")
        if not isinstance(prioritized, bool):
            raise ValueError(f"prioritized: {prioritized!r} is not allowed; allowed: true/false")
        _check_alpha(alpha)
        _check_beta(beta)
        if prioritized and capacity > 2**24:
            raise ValueError(
                f"capacity: {capacity!r} is not allowed with prioritized=True; allowed: ≤ 2**24 (torch.multinomial)"
            )
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
            raise ValueError(f"eps: {eps!r} is not allowed; allowed: finite number > 0")
        self._capacity = capacity
        self.prioritized = prioritized
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self._storage: dict[str, Tensor] = {}
        self._cursor = 0  # next position to write
        self._size = 0
        # raw priorities |p| + eps (float64, CPU); α is applied at sampling time only
        self._priorities = torch.zeros(capacity, dtype=torch.float64) if prioritized else None
        self._max_priority = 1.0

    @property
    def capacity(self) -> int:
        """Maximum number of items kept."""
        return self._capacity

    def __len__(self) -> int:
        return self._size

    def _check_batch(self, batch: Mapping[str, Tensor]) -> int:
        if not isinstance(batch, Mapping) or not batch:
            raise ValueError(f"batch: {type(batch).__name__} is not allowed; allowed: a non-empty dict of tensors")
        sizes = set()
        for key, value in batch.items():
            if not isinstance(key, str) or key in _RESERVED:
                raise ValueError(f"batch key: {key!r} is not allowed; allowed: strings other than {_RESERVED}")
            if not isinstance(value, Tensor) or value.ndim == 0:
                raise ValueError(f"batch[{key!r}]: not allowed; allowed: a tensor with a leading item dimension")
            sizes.add(value.shape[0])
        if len(sizes) != 1:
            raise ValueError(f"batch: leading dimensions {sorted(sizes)} differ; allowed: one number of items")
        if self._storage:
            if set(batch) != set(self._storage):
                raise ValueError(f"batch: keys {sorted(batch)} are not allowed; allowed: {sorted(self._storage)}")
            for key, value in batch.items():
                if value.shape[1:] != self._storage[key].shape[1:]:
                    raise ValueError(
                        f"batch[{key!r}]: item shape {tuple(value.shape[1:])} is not allowed; "
                        f"allowed: {tuple(self._storage[key].shape[1:])}"
                    )
        return sizes.pop()

    def extend(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Append a batch of items (FIFO: the oldest are overwritten at capacity).

        Returns the storage positions written. Copies the data (and casts to the storage
        dtype/device); the caller may reuse its tensors. A batch larger than ``capacity``
        keeps its last ``capacity`` items.
        """
        count = self._check_batch(batch)
        if count == 0:
            return torch.zeros(0, dtype=torch.int64)
        if not self._storage:  # lazy allocation, like torchrl's LazyTensorStorage
            self._storage = {
                k: torch.zeros((self._capacity, *v.shape[1:]), dtype=v.dtype, device=v.device) for k, v in batch.items()
            }
        skip = max(0, count - self._capacity)  # items that would be overwritten at once
        start = (self._cursor + skip) % self._capacity
        pos = ring_positions(start, count - skip, self._capacity)
        for key, value in batch.items():
            dest = self._storage[key]
            dest.index_copy_(0, pos.to(dest.device), value[skip:].to(device=dest.device, dtype=dest.dtype))
        if self._priorities is not None:
            self._priorities[pos] = self._max_priority
        self._cursor = (self._cursor + count) % self._capacity
        self._size = min(self._size + count, self._capacity)
        return pos

    def add(self, item: Mapping[str, Any]) -> int:
        """Append one item (a dict of tensors without the leading dimension); returns its position."""
        if not isinstance(item, Mapping):
            raise ValueError(f"item: {type(item).__name__} is not allowed; allowed: a dict of tensors")
        return int(self.extend({k: torch.as_tensor(v).unsqueeze(0) for k, v in item.items()})[0])

    def sample(self, batch_size: int, generator: torch.Generator, *, beta: float | None = None) -> dict[str, Tensor]:
        """Draw ``batch_size`` items with replacement; returns a new dict of tensors.

        Uniform over the stored items, or by priority. Adds ``"index"`` (int64 storage
        positions) and ``"weight"`` (float32 importance weights
        on the storage device; ones when not prioritized). ``beta`` overrides
        ``self.beta`` for this call. Randomness only from ``generator``.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: {batch_size!r} is not allowed; allowed: integer ≥ 1")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: {generator!r} is not allowed; allowed: a torch.Generator")
        if self._size == 0:
            raise ValueError("sample: the buffer is empty; extend it first")
        beta = self.beta if beta is None else beta
        _check_beta(beta)
        device = next(iter(self._storage.values())).device
        if self._priorities is None:
            index = torch.randint(0, self._size, (batch_size,), generator=generator, device=generator.device)
            weight = torch.ones(batch_size, device=device)
        else:
            # filled positions are [0, size) (the ring fills from 0 before it wraps)
            probs = priority_probabilities(self._priorities[: self._size], self.alpha)
            index = torch.multinomial(probs.to(generator.device), batch_size, replacement=True, generator=generator)
            # w_i = (N·P(i))^-β / max_j (N·P(j))^-β = (P(i) / min P)^-β
            weight = (probs[index.cpu()] / probs.min()).pow(-beta).to(device=device, dtype=torch.float32)
        out = {k: v[index.to(v.device)] for k, v in self._storage.items()}
        out["index"] = index.to(device)
        out["weight"] = weight
        return out

    def update_priorities(self, index: Tensor, priority: Tensor) -> None:
        """Set the raw priorities of the items at ``index`` to ``|priority| + eps``.

        Call after the loss, with the ``"index"`` of the sample and e.g. its TD errors.
        α is not applied here (it is applied once, at sampling). Duplicate indices: the
        last one wins. Also raises the max priority given to new items.
        """
        if self._priorities is None:
            raise ValueError("update_priorities: not allowed on a buffer with prioritized=False")
        index = torch.as_tensor(index).reshape(-1).cpu()
        priority = torch.as_tensor(priority).detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if index.dtype not in (torch.int64, torch.int32) or index.numel() != priority.numel():
            raise ValueError(
                f"index: {index.numel()} {index.dtype} values for {priority.numel()} priorities; "
                "allowed: as many integer indices as priorities"
            )
        if index.numel() == 0:
            return
        if bool((index < 0).any()) or bool((index >= self._size).any()):
            raise ValueError(f"index: values outside [0, {self._size - 1}] are not allowed (stored items)")
        if not bool(torch.isfinite(priority).all()):
            raise ValueError("priority: non-finite values are not allowed; allowed: finite numbers")
        raw = priority.abs() + self.eps
        # duplicates: keep the last occurrence (index_put_ with duplicates is unordered)
        uniq, inverse = torch.unique(index.long(), return_inverse=True)
        last = torch.full((uniq.numel(),), -1, dtype=torch.int64)
        last.scatter_reduce_(0, inverse, torch.arange(index.numel()), reduce="amax")
        self._priorities[uniq] = raw[last]
        self._max_priority = max(self._max_priority, float(raw.max()))

    def probabilities(self) -> Tensor:
        """Current sampling probability of each stored item (float64, length ``len(self)``)."""
        if self._size == 0:
            return torch.zeros(0, dtype=torch.float64)
        if self._priorities is None:
            return torch.full((self._size,), 1.0 / self._size, dtype=torch.float64)
        return priority_probabilities(self._priorities[: self._size], self.alpha)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: config, positions, stored items, priorities.

        Only the filled part of the storage is saved. Survives ``torch.save`` /
        ``torch.load(weights_only=True)``. The generator passed to :meth:`sample` is the
        caller's to save (``generator.get_state()``).
        """
        return {
            "capacity": self._capacity,
            "prioritized": self.prioritized,
            "alpha": self.alpha,
            "beta": self.beta,
            "eps": self.eps,
            "cursor": self._cursor,
            "size": self._size,
            "max_priority": self._max_priority,
            "storage": {k: v[: self._size].clone() for k, v in self._storage.items()},
            "priorities": None if self._priorities is None else self._priorities[: self._size].clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; capacity and ``prioritized`` must match."""
        expected = {
            "capacity",
            "prioritized",
            "alpha",
            "beta",
            "eps",
            "cursor",
            "size",
            "max_priority",
            "storage",
            "priorities",
        }
        if set(state) != expected:
            raise ValueError(f"state: keys {sorted(state)} are not allowed; allowed: {sorted(expected)}")
        for key in ("capacity", "prioritized"):
            if state[key] != getattr(self, "_capacity" if key == "capacity" else key):
                raise ValueError(f"state[{key!r}]: {state[key]!r} does not match this buffer's {key}")
        size = int(state["size"])
        if not 0 <= size <= self._capacity or not 0 <= int(state["cursor"]) < self._capacity:
            raise ValueError(
                f"state: size {size} / cursor {state['cursor']} out of range for capacity {self._capacity}"
            )
        self.alpha, self.beta, self.eps = float(state["alpha"]), float(state["beta"]), float(state["eps"])
        self._cursor, self._size = int(state["cursor"]), size
        self._max_priority = float(state["max_priority"])
        self._storage = {}
        for k, v in state["storage"].items():
            if v.shape[0] != size:
                raise ValueError(f"state['storage'][{k!r}]: {v.shape[0]} items, expected size {size}")
            full = torch.zeros((self._capacity, *v.shape[1:]), dtype=v.dtype, device=v.device)
            full[:size] = v
            self._storage[k] = full
        if self._priorities is not None:
            self._priorities = torch.zeros(self._capacity, dtype=torch.float64)
            self._priorities[:size] = state["priorities"].to(torch.float64)


def build(settings: Settings, context: BuildContext) -> ReplayBuffer:
    """The task's buffer (the task extends it with its stream and samples its batches from it)."""
    prioritized = settings["prioritized"]
    if not prioritized:
        return ReplayBuffer(settings["capacity"])
    return ReplayBuffer(settings["capacity"], prioritized=True, alpha=settings["alpha"], beta=settings["beta"])


CARD = TrickCard(
    name="replay_buffer",
    summary="Train on batches sampled from a FIFO memory of the last `capacity` items of a non-i.i.d. stream.",
    off="learn from the most recent items only (the stream as it comes)",
    on="append each new chunk of the stream to a FIFO buffer and train on a batch sampled uniformly "
    "(or by priority) from it; the data source for non-i.i.d. streams (class-sorted images, RL transitions)",
    params=(
        Param("capacity", int, 10000, "items kept (FIFO)", unit="items", low=1),
        Param("prioritized", bool, False, "prioritized experience replay: P(i) ∝ p_i^alpha"),
        Param(
            "alpha",
            float,
            0.6,
            "priority exponent (0 = uniform); only with prioritized: true",
            low=0.0,
            only_if=("prioritized", True),
        ),
        Param(
            "beta",
            float,
            0.4,
            "importance-weight exponent at the start (annealed to 1 over the budget; 1 = full bias correction); "
            "only with prioritized: true",
            low=0.0,
            high=1.0,
            only_if=("prioritized", True),
        ),
    ),
    cost="memory capacity × item size; a gather of batch_size items per step (prioritized: O(capacity))",
    effect="lower correlation between consecutive training samples (less forgetting on sorted streams, "
    "stabler off-policy RL); too large a buffer trains on stale data",
    references=(
        "pytorch/rl:torchrl/data/replay_buffers (ReplayBuffer, LazyTensorStorage, RandomSampler, PrioritizedSampler)",
        "Schaul et al. 2016, Prioritized Experience Replay, arXiv:1511.05952",
        "pytorch/rl#2205, #2211 (priorities transformed twice)",
        "Mnih et al. 2015, DQN (uniform replay)",
    ),
    role="task",
    build=build,
    tiny_setting={"capacity": 64},
    incompatible=(),
)
