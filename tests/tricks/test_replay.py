"""Replay buffer: FIFO eviction, uniform and prioritized sampling, state_dict, decorrelation."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from tricks.replay import CARD, ReplayBuffer, priority_probabilities, ring_positions


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _items(start: int, count: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(start, start + count)
    return {"id": ids, "x": ids.double().view(-1, 1, 1).expand(-1, 2, 3).clone()}


def test_ring_positions() -> None:
    assert ring_positions(0, 3, 5).tolist() == [0, 1, 2]
    assert ring_positions(3, 4, 5).tolist() == [3, 4, 0, 1]
    assert ring_positions(4, 5, 5).tolist() == [4, 0, 1, 2, 3]
    assert ring_positions(2, 0, 5).tolist() == []
    assert ring_positions(0, 1, 1).tolist() == [0]
    with pytest.raises(ValueError, match="count: 6"):
        ring_positions(0, 6, 5)
    with pytest.raises(ValueError, match="start: 5"):
        ring_positions(5, 1, 5)
    with pytest.raises(ValueError, match="capacity: 0"):
        ring_positions(0, 0, 0)


def test_extend_writes_at_ring_positions() -> None:
    buf = ReplayBuffer(5)
    assert buf.extend(_items(0, 3)).tolist() == ring_positions(0, 3, 5).tolist()
    assert buf.extend(_items(3, 4)).tolist() == ring_positions(3, 4, 5).tolist()
    assert buf._storage["id"].tolist() == [5, 6, 2, 3, 4]


def test_fifo_eviction_at_capacity() -> None:
    buf = ReplayBuffer(5)
    assert len(buf) == 0 and buf.capacity == 5
    for i in range(13):
        buf.add({"id": torch.tensor(i), "x": torch.full((2, 3), float(i), dtype=torch.float64)})
        assert len(buf) == min(i + 1, 5)
        assert sorted(buf._storage["id"][: len(buf)].tolist()) == list(range(max(0, i - 4), i + 1))
    # one oversized batch keeps its last `capacity` items, at the same positions as adding one by one
    big = ReplayBuffer(5)
    big.extend(_items(0, 13))
    assert len(big) == 5
    for key in buf._storage:
        assert torch.equal(big._storage[key], buf._storage[key])
    # and the next write lands on the same position
    assert big.extend(_items(13, 1)).tolist() == buf.extend(_items(13, 1)).tolist() == [3]
    # capacity 1: only the latest item
    one = ReplayBuffer(1)
    one.extend(_items(0, 4))
    one.extend(_items(4, 3))
    assert one._storage["id"].tolist() == [6]
    assert one.sample(3, _gen())["id"].tolist() == [6, 6, 6]


def test_samples_are_copies_of_stored_items() -> None:
    buf = ReplayBuffer(8)
    buf.extend(_items(0, 6))
    s = buf.sample(50, _gen(1))
    assert s["x"].shape == (50, 2, 3) and s["x"].dtype == torch.float64
    assert torch.equal(s["x"][:, 0, 0].long(), s["id"])
    assert torch.equal(buf._storage["id"][s["index"]], s["id"])
    assert torch.equal(s["weight"], torch.ones(50))
    s["x"].zero_()  # the sample is not a view of the storage
    assert float(buf._storage["x"].abs().sum()) > 0


def test_uniform_sampling_over_stored_items_chi_square() -> None:
    buf = ReplayBuffer(20)
    buf.extend(_items(0, 13))
    ids = buf.sample(26000, _gen(2))["id"]
    counts = np.bincount(ids.numpy(), minlength=13)
    assert len(counts) == 13  # nothing outside what is stored
    assert stats.chisquare(counts).pvalue > 1e-3
    # after wrapping: the evicted ids never come back
    buf.extend(_items(13, 17))
    ids = buf.sample(20000, _gen(3))["id"].numpy()
    assert ids.min() == 10 and ids.max() == 29
    assert stats.chisquare(np.bincount(ids - 10, minlength=20)).pvalue > 1e-3


def test_priority_probabilities_formula() -> None:
    p = torch.tensor([1.0, 2.0, 4.0, 0.5], dtype=torch.float64)
    for alpha in (0.0, 0.6, 1.0, 2.0):
        want = p**alpha / (p**alpha).sum()
        torch.testing.assert_close(priority_probabilities(p, alpha), want)
    # huge priorities do not overflow
    big = torch.tensor([1e300, 1e299], dtype=torch.float64)
    torch.testing.assert_close(
        priority_probabilities(big, 2.0), torch.tensor([100 / 101, 1 / 101], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="priorities"):
        priority_probabilities(torch.tensor([1.0, 0.0]), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        priority_probabilities(p, -1.0)


def test_prioritized_probabilities_weights_and_frequencies() -> None:
    alpha, beta, eps = 0.7, 0.5, 1e-6
    buf = ReplayBuffer(10, prioritized=True, alpha=alpha, beta=beta, eps=eps)
    buf.extend(_items(0, 6))
    torch.testing.assert_close(buf.probabilities(), torch.full((6,), 1 / 6, dtype=torch.float64))
    td = torch.tensor([0.5, -2.0, 3.0, 0.0, 1.0, 4.0])
    buf.update_priorities(torch.arange(6), td)
    raw = td.double().abs() + eps
    probs = raw**alpha / (raw**alpha).sum()
    torch.testing.assert_close(buf.probabilities(), probs)
    s = buf.sample(60000, _gen(4))
    # importance weights: (N·P(i))^-β normalised by the max over the buffer
    w_all = (6 * probs) ** -beta
    torch.testing.assert_close(s["weight"].double(), (w_all / w_all.max())[s["index"]], rtol=1e-6, atol=1e-7)
    assert float(s["weight"].max()) <= 1.0
    assert torch.equal(buf._storage["id"][s["index"]], s["id"])
    counts = np.bincount(s["index"].numpy(), minlength=6)
    assert stats.chisquare(counts, probs.numpy() * 60000).pvalue > 1e-3
    # beta override and beta = 0 (no correction)
    assert torch.equal(buf.sample(10, _gen(5), beta=0.0)["weight"], torch.ones(10))


def test_priorities_transformed_exactly_once() -> None:
    # pytorch/rl#2205: alpha applied at update *and* at sampling -> p^(α²)
    alpha = 0.5
    buf = ReplayBuffer(4, prioritized=True, alpha=alpha, eps=1e-9)
    buf.extend(_items(0, 2))
    buf.update_priorities(torch.tensor([0, 1]), torch.tensor([16.0, 1.0]))
    p = buf.probabilities()
    assert float(p[0] / p[1]) == pytest.approx(4.0, rel=1e-6)  # (16/1)^0.5; twice would be 2
    # a new item gets the max priority so far, without a second transform
    buf.add({"id": torch.tensor(2), "x": torch.zeros(2, 3, dtype=torch.float64)})
    p = buf.probabilities()
    assert float(p[2]) == pytest.approx(float(p[0]), rel=1e-9)
    # the max is kept even if the item holding it is lowered later
    buf.update_priorities(torch.tensor([0]), torch.tensor([1.0]))
    buf.add({"id": torch.tensor(3), "x": torch.zeros(2, 3, dtype=torch.float64)})
    p = buf.probabilities()
    assert float(p[3] / p[1]) == pytest.approx(4.0, rel=1e-6)


def test_update_priorities_duplicates_last_wins_and_validation() -> None:
    buf = ReplayBuffer(4, prioritized=True, alpha=1.0, eps=1e-9)
    buf.extend(_items(0, 3))
    buf.update_priorities(torch.tensor([1, 0, 1, 1]), torch.tensor([5.0, 2.0, 7.0, 3.0]))
    raw = torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)  # item 2 kept its initial max priority 1
    torch.testing.assert_close(buf.probabilities(), raw / raw.sum())
    with pytest.raises(ValueError, match="index"):
        buf.update_priorities(torch.tensor([3]), torch.tensor([1.0]))  # position 3 not filled yet
    with pytest.raises(ValueError, match="index"):
        buf.update_priorities(torch.tensor([0, 1]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="priority"):
        buf.update_priorities(torch.tensor([0]), torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="prioritized=False"):
        ReplayBuffer(4).update_priorities(torch.tensor([0]), torch.tensor([1.0]))


@pytest.mark.parametrize("prioritized", [False, True])
def test_state_dict_round_trip_reproduces_next_samples(prioritized: bool) -> None:
    buf = ReplayBuffer(7, prioritized=prioritized)
    buf.extend(_items(0, 5))
    buf.extend(_items(5, 4))  # wrapped: cursor 2
    if prioritized:
        buf.update_priorities(torch.tensor([0, 3, 6]), torch.tensor([2.0, 0.1, 5.0]))
    gen = _gen(9)
    buf.sample(3, gen)
    saved_gen = gen.get_state()
    blob = io.BytesIO()
    torch.save(buf.state_dict(), blob)
    blob.seek(0)
    state = torch.load(blob, weights_only=True)

    def continue_run(b: ReplayBuffer, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
        out = [b.sample(4, g)]
        b.extend(_items(100, 3))
        out.append(b.sample(5, g))
        if prioritized:
            b.update_priorities(out[-1]["index"], torch.arange(5.0))
        b.add({"id": torch.tensor(200), "x": torch.zeros(2, 3, dtype=torch.float64)})
        out.append(b.sample(6, g))
        return out

    expected = continue_run(buf, gen)
    fresh = ReplayBuffer(7, prioritized=prioritized)
    fresh.load_state_dict(state)
    g2 = torch.Generator()
    g2.set_state(saved_gen)
    got = continue_run(fresh, g2)
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert fresh.state_dict()["cursor"] == buf.state_dict()["cursor"]


def test_state_dict_before_first_extend_and_mismatch() -> None:
    empty = ReplayBuffer(3)
    other = ReplayBuffer(3)
    other.load_state_dict(empty.state_dict())
    assert len(other) == 0
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(4).load_state_dict(empty.state_dict())
    with pytest.raises(ValueError, match="prioritized"):
        ReplayBuffer(3, prioritized=True).load_state_dict(empty.state_dict())
    with pytest.raises(ValueError, match="keys"):
        ReplayBuffer(3).load_state_dict({"capacity": 3})


def _lag1_autocorrelation_of_drawn_labels(capacity: int) -> float:
    # class-sorted stream: blocks of 20 items of one class, cycling through 10 classes;
    # each step one new item arrives and one item is drawn to learn from
    labels = torch.arange(10).repeat_interleave(20).repeat(15)  # 3000 items
    buf = ReplayBuffer(capacity)
    gen = _gen(11)
    drawn = []
    for t in range(len(labels)):
        buf.extend({"label": labels[t : t + 1]})
        drawn.append(buf.sample(1, gen)["label"])
    seq = torch.cat(drawn).double().numpy()
    return float(np.corrcoef(seq[:-1], seq[1:])[0, 1])


def test_lag1_autocorrelation_drops_as_buffer_grows() -> None:
    rho = [_lag1_autocorrelation_of_drawn_labels(c) for c in (1, 10, 100, 1000)]
    assert all(a > b for a, b in itertools.pairwise(rho)), rho
    assert rho[0] > 0.9 and abs(rho[-1]) < 0.1, rho
    # capacity 1 is the "off" arm: exactly the stream as it comes
    stream = torch.arange(10).repeat_interleave(20).repeat(15).double().numpy()
    assert rho[0] == pytest.approx(float(np.corrcoef(stream[:-1], stream[1:])[0, 1]), abs=1e-12)


def test_batch_validation() -> None:
    buf = ReplayBuffer(4)
    with pytest.raises(ValueError, match="sample: the buffer is empty"):
        buf.sample(1, _gen())
    with pytest.raises(ValueError, match="leading dimensions"):
        buf.extend({"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="not allowed"):
        buf.extend({"index": torch.zeros(2)})
    with pytest.raises(ValueError, match="leading item dimension"):
        buf.extend({"a": torch.tensor(1.0)})
    buf.extend({"a": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="keys"):
        buf.extend({"b": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="item shape"):
        buf.extend({"a": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="batch_size: 0"):
        buf.sample(0, _gen())
    with pytest.raises(ValueError, match="generator"):
        buf.sample(1, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        buf.sample(1, _gen(), beta=1.5)
    # lazily allocated storage takes the dtype of the first batch; later batches are cast
    buf.extend({"a": torch.ones(1, 3, dtype=torch.float64)})
    assert buf._storage["a"].dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": 2.5}, "capacity"),
        ({"capacity": 4, "alpha": -0.1}, "alpha"),
        ({"capacity": 4, "beta": 1.1}, "beta"),
        ({"capacity": 4, "eps": 0.0}, "eps"),
        ({"capacity": 4, "prioritized": 1}, "prioritized"),
        ({"capacity": 2**24 + 1, "prioritized": True}, "capacity"),
    ],
)
def test_constructor_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ReplayBuffer(**kwargs)


def test_card() -> None:
    assert CARD.name == "replay_buffer" and CARD.role == "task"
    # alpha and beta act only with prioritized replay: absent otherwise, and an error when given
    assert CARD.resolve({}) == {"capacity": 10000, "prioritized": False}
    assert CARD.resolve({"prioritized": True}) == {"capacity": 10000, "prioritized": True, "alpha": 0.6, "beta": 0.4}
    with pytest.raises(ValueError, match=r"alpha: 1.0 is not allowed; allowed: leave it out.*prioritized: true"):
        CARD.resolve({"alpha": 1.0})
    tiny = CARD.resolve({**CARD.tiny_setting, "prioritized": True})
    ReplayBuffer(tiny["capacity"], prioritized=tiny["prioritized"], alpha=tiny["alpha"], beta=tiny["beta"])
    with pytest.raises(ValueError, match="capacity"):
        CARD.resolve({"capacity": 0})
    with pytest.raises(ValueError, match="beta"):
        CARD.resolve({"prioritized": True, "beta": 2.0})
