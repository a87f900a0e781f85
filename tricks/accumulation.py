"""Batch (gradient) accumulation: one optimizer step from k micro-batches.

Trick card
----------
**Off**: each optimizer step computes one forward/backward pass on a batch of B samples.
**On**: the same B samples are split into k micro-batches of about B/k
(:func:`split_micro_batches`); each micro-batch's mean loss is divided by k (:func:`scale_loss`)
and back-propagated, gradients add up in ``.grad``, and the optimizer steps once. The sample
budget, the effective batch size, the number of optimizer steps and the learning rate are all
unchanged — only how the batch is computed changes.

What is measured: for a model without BatchNorm the gradient is the same as without accumulation
to float tolerance (summation order only), so the effect is *cost*: peak activation memory drops
about k-fold, wall time rises (k smaller kernels, k Python iterations). With BatchNorm the
training statistics are computed over B/k samples instead of B, which changes the gradient, the
noise of the normalization and the running statistics — the only way accumulation changes the
result, and it is reported as such, not hidden (Deci-AI/super-gradients#1858). Per-sample
randomness drawn per micro-batch (augmentation, dropout masks) is also drawn differently.

Parameters (grid): ``micro_batches`` (int ≥ 2, unit: micro-batches per optimizer step;
default 4). B must be ≥ k; when k does not divide B the sizes differ by at most one and exact
equivalence needs each mean loss weighted by its size (``accumulate_gradients(sizes=...)``).

Cost: ≈ k× less activation memory, more wall time (smaller kernels, k launches), no extra
weights. Expected effect on quality: none without BN; with BN, typically slightly different (often
slightly worse at very small micro-batches).

References: huggingface/pytorch-image-models ``train.py`` (``--grad-accum-steps``); NVlabs/edm
``training/training_loop.py`` (``batch_gpu`` rounds); composer micro-batching
(``device_train_microbatch_size``); karpathy/nanoGPT ``train.py`` (``loss / gradient_accumulation_steps``).
Incompatible: none. Averaging tricks (``ema``, ``posthoc_ema``, ``periodic_averaging``) still step once
per *optimizer* step, never per micro-batch.

Pitfalls avoided: forgetting the 1/k makes the gradient k× larger (karpathy/nanoGPT#206;
super-gradients sums); stepping EMA/averaging per micro-batch shortens their windows k-fold
(SWivid/F5-TTS#631); the BatchNorm difference is documented and tested, not hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from tricks.card import BuildContext, CheckContext, Param, Settings, TrickCard

__all__ = ["CARD", "MicroBatching", "accumulate_gradients", "build", "scale_loss", "split_micro_batches"]


def _check_micro_batches(micro_batches: int) -> None:
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ValueError(f"micro_batches: {micro_batches!r} is not allowed; allowed: an integer ≥ 1")


def split_micro_batches(batch_size: int, micro_batches: int) -> list[int]:
    """Sizes of ``micro_batches`` micro-batches summing to ``batch_size``, as equal as possible.

    The first ``batch_size % micro_batches`` sizes are one larger, e.g. (10, 4) → [3, 3, 2, 2].
    Raises ``ValueError`` if a micro-batch would be empty (``batch_size < micro_batches``).
    """
    _check_micro_batches(micro_batches)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < micro_batches:
        raise ValueError(
            f"batch_size: {batch_size!r} is not allowed; allowed: an integer ≥ micro_batches ({micro_batches})"
        )
    base, extra = divmod(batch_size, micro_batches)
    return [base + 1 if i < extra else base for i in range(micro_batches)]


def scale_loss(loss: Tensor, micro_batches: int) -> Tensor:
    """``loss / micro_batches``: the mean loss of one of k equal micro-batches, before ``backward``.

    Summed over the k micro-batches, the gradients then equal the gradient of the mean loss
    over the whole batch. Not in place; no cost beyond one scalar division.
    """
    _check_micro_batches(micro_batches)
    return loss / micro_batches


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batches: Sequence[Any],
    *,
    sizes: Sequence[int] | None = None,
) -> None:
    """Back-propagate each micro-batch's scaled loss, adding gradients into ``.grad`` (no step).

    ``loss_fn(model, batch)`` returns the *mean* loss over ``batch``. Without ``sizes`` each loss
    is scaled by 1/k (equal micro-batches); with ``sizes`` by size/B, exact for unequal ones.
    The caller zeroes gradients before and calls ``optimizer.step()`` (and EMA updates) once after.
    """
    k = len(batches)
    _check_micro_batches(k)
    if sizes is not None:
        if len(sizes) != k or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"sizes: {list(sizes)!r} is not allowed; allowed: {k} integers ≥ 1, one per batch")
        total = sum(sizes)
    for i, batch in enumerate(batches):
        loss = loss_fn(model, batch)
        scaled = scale_loss(loss, k) if sizes is None else loss * (sizes[i] / total)
        scaled.backward()


class MicroBatching:
    """The loop's ``micro_batches`` role: each optimizer step's batch as ``micro_batches`` micro-batches.

    Configuration only. :meth:`split` is :func:`split_micro_batches`; the loop divides each
    micro-batch's loss by ``micro_batches`` (:func:`scale_loss`) and steps once per batch.
    """

    def __init__(self, micro_batches: int) -> None:
        _check_micro_batches(micro_batches)
        self.micro_batches = micro_batches

    def split(self, batch_size: int) -> list[int]:
        """Micro-batch sizes of one optimizer step of ``batch_size`` samples."""
        return split_micro_batches(batch_size, self.micro_batches)

    def __repr__(self) -> str:
        return f"MicroBatching(micro_batches={self.micro_batches})"


def build(settings: Settings, context: BuildContext) -> MicroBatching:
    """The run's micro-batching."""
    return MicroBatching(settings["micro_batches"])


def _check(settings: Any, context: CheckContext) -> list[str]:
    k, batch = settings["micro_batches"], context.train["batch_size"]
    if batch % k:
        return [f"micro_batches: {k} does not divide train.batch_size {batch}; allowed: a divisor of the batch size"]
    return []


CARD = TrickCard(
    name="accumulation",
    summary="Compute each optimizer step's batch as k micro-batches with loss/k (same samples, same step count).",
    off="One forward/backward pass on the whole batch of B samples per optimizer step.",
    on=(
        "The same B samples as k micro-batches of about B/k, each mean loss divided by k, gradients summed, one "
        "optimizer step; without BatchNorm the gradient is unchanged, so the effect is cost plus BN on smaller "
        "batches."
    ),
    params=(
        Param(
            "micro_batches",
            int,
            4,
            "Number of micro-batches per optimizer step (k); the batch size must be at least k.",
            unit="micro-batches",
            low=2,
        ),
    ),
    cost="About k-fold less activation memory; more wall time (k smaller forward/backward passes).",
    effect="None without BatchNorm (same gradient); with BatchNorm, statistics over B/k samples change training "
    "(Deci-AI/super-gradients#1858).",
    references=(
        "huggingface/pytorch-image-models:train.py (--grad-accum-steps)",
        "NVlabs/edm:training/training_loop.py (batch_gpu accumulation rounds)",
        "karpathy/nanoGPT:train.py (loss / gradient_accumulation_steps; issue #206)",
        "Deci-AI/super-gradients#1858 (BatchNorm with accumulation)",
    ),
    role="micro_batches",
    build=build,
    check=_check,
    tiny_setting={"micro_batches": 2},
    incompatible=(),
)
