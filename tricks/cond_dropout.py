"""Dropout of an optional conditioning input, for classifier-free guidance (CFG).

Trick card
----------
**Off**: the model is always trained with its conditioning; sampling uses the conditional
prediction alone (no guidance).

**On**: during training each sample's conditioning is replaced by a *null value* with
probability ``p`` (a reserved class index such as ``num_classes``, a zero or learned null
vector, optionally with a 0/1 "present" indicator bit), so one network learns both the
conditional and the unconditional model. At sampling the two predictions are combined with
guidance weight ``w``: ``(1 + w)·cond − w·uncond`` (:func:`guided`; ``w = 0`` is the plain
conditional prediction).

Parameters
~~~~~~~~~~
- ``p`` (float in [0, 1), probability per sample, default 0.1): the drop rate (k-diffusion's
  ``cond_dropout_rate``; EDM's ``label_dropout``). 0 = nothing is dropped.
- ``guidance_weight`` (float ≥ 0, default 1.0): ``w`` at sampling time only.

Several conditioning inputs: independent droppers compound — with ``k`` inputs each dropped
at rate ``p`` the fully unconditional rate is ``p^k`` (0.1 → 0.001 for k = 3), so the
unconditional model is barely trained (pytorch/torchtitan#1259, YuchuanTian/U-DiT#12).
:func:`joint_masks` controls the joint rate exactly while keeping each marginal at ``p``.

Cost: one ``rand`` per sample in training; guided sampling costs a second forward pass (or
one pass on a doubled batch) per sampling step.
Expected effect: better sample quality/fidelity to the condition at moderate ``w`` (a
trade-off with diversity), at the price of a slightly worse purely conditional model.

References: Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv 2207.12598;
crowsonkb/k-diffusion ``train.py`` (null class index ``num_classes``, ``cond_dropout_rate``
0.1); NVlabs/edm ``training/networks.py`` (``label_dropout``).

Pitfalls avoided: the mask computed but never applied (lucidrains/DALLE2-pytorch#144) —
:func:`apply_dropout` returns the conditioning with the null value in place and the tests
check that the model input changes; compounding droppers (above); dropping from the global
RNG (only an explicit generator here). Incompatibilities: with ``cond_noise`` apply noise
first and dropout last, so dropped entries stay exactly null.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from tricks._checks import check_generator
from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = ["CARD", "CondDropout", "apply_dropout", "build", "dropout_mask", "guided", "joint_masks", "with_indicator"]


def _check_p(name: str, p: float, high: float = 1.0) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= high:
        raise ValueError(f"{name}: {p!r} is not allowed; allowed: a number in [0, {high:g}]")
    return float(p)


def _check_batch(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"batch_size: {batch_size!r} is not allowed; allowed: an integer ≥ 0")


def dropout_mask(
    batch_size: int, p: float, *, generator: torch.Generator, device: torch.device | str | None = None
) -> Tensor:
    """Bool mask (N,), True = drop this sample's conditioning, each with probability ``p``.

    One ``rand`` per sample on the generator's device, so the stream consumed does not depend
    on ``p`` (arms with different ``p`` use the same uniforms). Moved to ``device`` if given.
    """
    _check_batch(batch_size)
    p = _check_p("p", p)
    check_generator(generator)
    u = torch.rand(batch_size, generator=generator, device=generator.device)
    return (u < p).to(device if device is not None else u.device)


def apply_dropout(cond: Tensor, mask: Tensor, null_value: float | int | Tensor) -> Tensor:
    """Return ``cond`` with the rows where ``mask`` is True replaced by ``null_value`` exactly.

    ``cond``: class indices (N,) int64, or float vectors/maps (N, ...). ``null_value``: a scalar
    (a reserved class index for integer conditioning, e.g. ``num_classes``) or a tensor
    broadcastable to one row ``cond.shape[1:]`` (e.g. a learned null embedding, which then
    receives the gradient of the dropped rows). ``cond`` is not modified. Cost: one ``where``.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 1:
        raise ValueError(f"mask: {getattr(mask, 'dtype', type(mask))} is not allowed; allowed: a bool tensor (N,)")
    if cond.ndim < 1 or cond.shape[0] != mask.shape[0]:
        raise ValueError(
            f"cond: shape {tuple(cond.shape)} is not allowed; "
            f"allowed: a leading batch dim of {mask.shape[0]} (the mask's length)"
        )
    if not cond.is_floating_point():
        is_int = (isinstance(null_value, int) and not isinstance(null_value, bool)) or (
            isinstance(null_value, Tensor) and not null_value.is_floating_point()
        )
        if not is_int:
            raise ValueError(
                f"null_value: {null_value!r} is not allowed for {cond.dtype} conditioning; allowed: an integer "
                "(a reserved class index)"
            )
    null = torch.as_tensor(null_value, dtype=cond.dtype, device=cond.device)
    try:
        fits = torch.broadcast_shapes(null.shape, cond.shape[1:]) == cond.shape[1:]
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"null_value: shape {tuple(null.shape)} is not allowed; "
            f"allowed: broadcastable to one row of cond, {tuple(cond.shape[1:])}"
        )
    m = mask.to(cond.device).view(-1, *([1] * (cond.ndim - 1)))
    return torch.where(m, null, cond)


def with_indicator(cond: Tensor, mask: Tensor) -> Tensor:
    """Append a "present" column to float conditioning (N, D) → (N, D + 1): 1 = kept, 0 = dropped.

    Lets the network tell a dropped row from a genuine all-null-valued condition.
    """
    if cond.ndim != 2 or not cond.is_floating_point():
        raise ValueError(
            f"cond: {cond.dtype} of shape {tuple(cond.shape)} is not allowed; allowed: float vectors (N, D) "
            "(embed class indices first)"
        )
    if mask.dtype != torch.bool or mask.shape != (cond.shape[0],):
        raise ValueError(f"mask: shape {tuple(mask.shape)} is not allowed; allowed: bool ({cond.shape[0]},)")
    present = (~mask).to(device=cond.device, dtype=cond.dtype)[:, None]
    return torch.cat([cond, present], dim=1)


@functools.lru_cache(maxsize=64)
def _count_distribution(k: int, m: float) -> tuple[float, ...]:
    """P(j dropped), j = 0..k−1, for k exchangeable inputs never all dropped with marginal m.

    The truncated binomial Binomial(k, q) | j < k whose mean is k·m; q is found by bisection
    (the mean is strictly increasing in q: an exponential family in log(q/(1−q))). At q = p
    and joint rate p^k this is exactly what independent droppers give when not all dropped.
    Cached: a training loop calls it with the same (k, m) every step.
    """
    j = torch.arange(k, dtype=torch.float64)
    log_binom = torch.tensor(
        [math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) for i in range(k)], dtype=torch.float64
    )
    target = k * m
    if target <= 0.0:  # nothing dropped unless all are
        return tuple(1.0 if i == 0 else 0.0 for i in range(k))
    if target >= k - 1 - 1e-12:  # the lower Fréchet bound: always exactly k − 1 dropped
        return tuple(1.0 if i == k - 1 else 0.0 for i in range(k))

    def probs(theta: float) -> Tensor:  # theta = log(q / (1 − q))
        logits = log_binom + j * theta
        return torch.softmax(logits, dim=0)

    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if float((probs(mid) * j).sum()) < target:
            lo = mid
        else:
            hi = mid
    return tuple(probs((lo + hi) / 2).tolist())


def joint_masks(
    batch_size: int, num_inputs: int, p_each: float, p_all: float | None, *, generator: torch.Generator
) -> Tensor:
    """Drop masks (N, k) for k conditioning inputs, True = dropped.

    ``p_all=None``: independent droppers, each input at rate ``p_each``; the joint
    unconditional rate compounds to ``p_each^k``. ``p_all`` set: exactly ``P(all k dropped) =
    p_all`` and ``P(input i dropped) = p_each`` for every i. Construction: with probability
    ``p_all`` drop all; otherwise draw the number dropped ``j < k`` from the binomial
    Binomial(k, q) truncated to ``j < k``, and drop a uniformly random subset of that size —
    ``q`` is solved so the marginal is ``(p_each − p_all)/(1 − p_all)`` in this branch. With
    ``p_all = p_each^k`` this reproduces independent droppers exactly. Valid range (the
    Fréchet bounds, nothing outside them is achievable): ``max(0, k·p_each − (k−1)) ≤ p_all ≤
    p_each``; for k = 1 that forces ``p_all = p_each``. Cost: O(N·k) draws.
    """
    _check_batch(batch_size)
    if isinstance(num_inputs, bool) or not isinstance(num_inputs, int) or num_inputs < 1:
        raise ValueError(f"num_inputs: {num_inputs!r} is not allowed; allowed: an integer ≥ 1")
    k = num_inputs
    p_each = _check_p("p_each", p_each)
    dev = check_generator(generator).device
    if p_all is None:
        return torch.rand(batch_size, k, generator=generator, device=dev) < p_each
    p_all = _check_p("p_all", p_all)
    low = max(0.0, k * p_each - (k - 1))
    if not low - 1e-12 <= p_all <= p_each + 1e-12:
        raise ValueError(
            f"p_all: {p_all!r} is not allowed with p_each={p_each}, num_inputs={k}; allowed: a number in "
            f"[{low:g}, {p_each:g}] (no joint distribution has those marginals outside it)"
        )
    drop_all = torch.rand(batch_size, generator=generator, device=dev) < p_all
    if p_all >= 1.0:
        return drop_all[:, None].expand(batch_size, k).clone()
    m = min(max((p_each - p_all) / (1.0 - p_all), 0.0), (k - 1) / k)
    if batch_size == 0:
        return torch.zeros(0, k, dtype=torch.bool, device=dev)
    count_probs = torch.tensor(_count_distribution(k, m), dtype=torch.float64, device=dev)
    counts = torch.multinomial(count_probs, batch_size, replacement=True, generator=generator)  # j in 0..k−1
    # A uniform random subset of size j: the j smallest of k iid uniform keys.
    ranks = torch.rand(batch_size, k, generator=generator, device=dev).argsort(dim=1).argsort(dim=1)
    return (ranks < counts[:, None]) | drop_all[:, None]


def guided(cond_pred: Tensor, uncond_pred: Tensor, guidance_weight: float) -> Tensor:
    """Classifier-free guidance: ``(1 + w)·cond_pred − w·uncond_pred``, at sampling time.

    Written as ``cond + w·(cond − uncond)``, so ``w = 0`` returns ``cond_pred`` exactly. Any
    finite ``w`` is accepted (``w = −1`` gives the unconditional prediction); the card's range
    is ``w ≥ 0``.
    """
    w = guidance_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"guidance_weight: {w!r} is not allowed; allowed: a finite number")
    if cond_pred.shape != uncond_pred.shape:
        raise ValueError(
            f"uncond_pred: shape {tuple(uncond_pred.shape)} is not allowed; allowed: {tuple(cond_pred.shape)} "
            "(the shape of cond_pred)"
        )
    if w == 0:
        return cond_pred
    return cond_pred + w * (cond_pred - uncond_pred)


class CondDropout:
    """Conditioning dropout and guidance: ``(cond, mask) = CondDropout(p, null)(cond, generator)``.

    Training: calls :func:`dropout_mask`, :func:`apply_dropout` and (with ``indicator``)
    :func:`with_indicator`; the null value is the constructor's or the one given per call (a
    task's null row). Sampling: :meth:`guide` is :func:`guided` with ``guidance_weight``.
    Configuration only (no mutable state).
    """

    def __init__(
        self,
        p: float,
        null_value: float | int | Tensor | None = None,
        indicator: bool = False,
        guidance_weight: float = 0.0,
    ) -> None:
        self.p = _check_p("p", p)
        self.null_value = null_value
        self.indicator = bool(indicator)
        w = guidance_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"guidance_weight: {w!r} is not allowed; allowed: a finite number")
        self.guidance_weight = float(w)

    def __call__(
        self, cond: Tensor, generator: torch.Generator, null_value: float | int | Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        null = self.null_value if null_value is None else null_value
        if null is None:
            raise ValueError(
                "null_value: None is not allowed; allowed: the null condition (here or in the constructor)"
            )
        mask = dropout_mask(cond.shape[0], self.p, generator=generator, device=cond.device)
        out = apply_dropout(cond, mask, null)
        if self.indicator:
            out = with_indicator(out, mask)
        return out, mask

    def guide(self, cond_pred: Tensor, uncond_pred: Tensor) -> Tensor:
        """Classifier-free guidance of a sampling step with this trick's ``guidance_weight``."""
        return guided(cond_pred, uncond_pred, self.guidance_weight)

    def __repr__(self) -> str:
        return (
            f"CondDropout(p={self.p}, null_value={self.null_value!r}, indicator={self.indicator}, "
            f"guidance_weight={self.guidance_weight})"
        )


def build(settings: Settings, context: BuildContext) -> CondDropout:
    """The task's dropper (the task gives its null condition per call) and guidance at sampling."""
    return CondDropout(settings["p"], guidance_weight=settings["guidance_weight"])


CARD = TrickCard(
    name="cond_dropout",
    summary="Drop the conditioning to a null value at rate p in training; sample with classifier-free guidance.",
    off="Always conditional in training; sampling uses the conditional prediction (no guidance).",
    on=(
        "Each sample's conditioning is replaced by the null value with probability p; sampling combines "
        "(1 + w)·cond − w·uncond with w = guidance_weight."
    ),
    params=(
        Param(
            "p",
            float,
            0.1,
            "Probability of dropping a sample's conditioning (0 would leave training unchanged).",
            "probability",
            0.0,
            1.0,
            low_open=True,
            high_open=True,
        ),
        Param("guidance_weight", float, 1.0, "Guidance weight w at sampling time (0 = no guidance).", low=0.0),
    ),
    cost="One rand per sample in training; guided sampling doubles the forward passes per sampling step.",
    effect="Guided samples sit closer to their condition (class fidelity / precision up) and, at w ≈ 1 and above, "
    "further from the data distribution as a whole (less diversity: a distribution distance such as FID or the "
    "sliced Wasserstein distance goes up) — the fidelity/diversity trade of Ho & Salimans 2022; a usable "
    "unconditional model.",
    references=(
        "Ho & Salimans 2022, Classifier-Free Diffusion Guidance, arXiv 2207.12598",
        "crowsonkb/k-diffusion:train.py (null class index, cond_dropout_rate 0.1)",
        "NVlabs/edm:training/networks.py (label_dropout)",
        "pytorch/torchtitan#1259 (compounding droppers)",
        "lucidrains/DALLE2-pytorch#144 (mask never applied)",
    ),
    role="task",
    build=build,
    tiny_setting={"p": 0.2, "guidance_weight": 1.0},
    incompatible=(),
)
