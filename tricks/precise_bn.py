"""Precise BatchNorm: recompute BatchNorm population statistics before evaluation.

Trick card
----------
BatchNorm layers keep an exponential moving average (EMA) of per-batch statistics, which
lags behind the weights and mixes statistics of old weights in (Wu & Johnson 2021,
"Rethinking 'Batch' in BatchNorm", sec. 3). Precise BN throws that average away before
each evaluation and recomputes, with the weights frozen, the *population* statistics of
``num_batches`` training batches.

- **off**: evaluate with the running statistics the training loop left in the BN buffers.
- **on**: before each evaluation the loop calls :func:`recompute_bn_stats` on the model it
  evaluates (the raw model, or the EMA/averaged copy — an averaged model's BN buffers are
  stale by construction, so it benefits most).
- **parameters**: ``num_batches`` (integer ≥ 1, unit: batches, default 32) — how many
  training batches the statistics are pooled over. The paper finds ~10⁴ samples enough.
- **cost**: ``num_batches`` extra forward passes (no backward) per evaluation.
- **expected effect**: better and less noisy evaluation metrics for BN models, most visibly
  for EMA/averaged weights and early in training; no effect on models without BN.
- **incompatible**: none as such. Models without any BatchNorm are rejected (ValueError)
  so a grid cannot silently run a no-op arm.

The estimator (fvcore ``fvcore/nn/precise_bn.py``, ``_PopulationVarianceEstimator``):
population mean = batch means weighted by the per-channel sample count of each batch
(N·H·W for images); population variance = the *biased* variance of all values pooled
together, i.e. within-batch plus between-batch spread. It equals what one forward pass over
all the data at once would compute, however the data is split into batches. PyTorch's
``torch.optim.swa_utils.update_bn`` instead averages per-batch means and per-batch
*unbiased* variances with equal weight per batch — it misses the between-batch variance
and over-weights small batches, a weaker estimator (it agrees on the mean only when all
batches have the same size).

Pitfalls avoided:

- momentum set to 0 instead of something that replaces the buffers (Lightning#14866,
  accuracy ~0): we set momentum to 1.0 so that each BN forward writes exactly the batch
  statistics into the buffers, read them in a forward hook (so a BN layer called several
  times per forward contributes every call), and pool them in float64 with Chan's
  parallel-variance update (numerically stable). Original momentum (also ``None``) and
  ``num_batches_tracked`` are restored.
- train/eval mode of the model and of *every* submodule is restored, including mixed
  modes. During recalibration only the BN layers are in train mode; all other modules are
  in eval mode (``eval_other_modules=True``) so dropout is off and other stateful layers do
  not change — the statistics then describe the inputs BN sees at evaluation time.
- custom model call signatures (pytorch/pytorch#49082): pass ``forward_fn``.
- too little data is an error, and on any error every BN buffer is put back as it was.
- under DDP each rank sees different data (fvcore#152): the statistics computed here are
  per rank. Use SyncBatchNorm, or all-reduce the buffers afterwards; this module does not
  talk to ``torch.distributed``.

References: Wu & Johnson 2021 (arXiv:2105.07576); fvcore ``fvcore/nn/precise_bn.py``;
PyTorch ``torch/optim/swa_utils.py`` (``update_bn``).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = ["CARD", "PreciseBN", "bn_modules", "build", "recompute_bn_stats"]


def bn_modules(model: nn.Module) -> list[_BatchNorm]:
    """All BatchNorm layers of ``model`` that keep running statistics (each once).

    Covers every ``_BatchNorm`` subclass (BatchNorm1d/2d/3d, SyncBatchNorm, lazy and
    user subclasses) with ``track_running_stats=True``. Layers without running statistics
    use batch statistics at evaluation too, so there is nothing to recalibrate.
    """
    return [
        m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]


class _PooledStats:
    """Running count, mean and sum of squared deviations (M2) of one BN layer, in float64.

    Chan et al.'s parallel update: merging a batch of ``n`` values with mean ``m`` and
    biased variance ``v`` is exact and does not suffer the cancellation of E[x²] − E[x]².
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.count = 0
        self.mean = torch.zeros_like(like, dtype=torch.float64)
        self.m2 = torch.zeros_like(like, dtype=torch.float64)

    def update(self, batch_mean: torch.Tensor, batch_unbiased_var: torch.Tensor, n: int) -> None:
        batch_mean = batch_mean.to(torch.float64)
        # BN stores the unbiased variance (Bessel correction with n = values per channel);
        # undo it: sum of squared deviations of this batch = var_unbiased·(n − 1).
        batch_m2 = batch_unbiased_var.to(torch.float64) * (n - 1)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta.square() * (self.count * n / total)
        self.count = total

    @property
    def biased_var(self) -> torch.Tensor:
        return self.m2 / self.count


@torch.no_grad()
def recompute_bn_stats(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    *,
    eval_other_modules: bool = True,
) -> int:
    """Replace the running mean/var of every BN layer by population statistics.

    Call before evaluating ``model`` (on the model that is evaluated, e.g. the EMA copy).
    Takes the first ``num_batches`` items of ``batches`` and runs
    ``forward_fn(model, batch)`` (default ``model(batch)``) on each under ``torch.no_grad``.

    Changes in place: only ``running_mean`` and ``running_var`` of the BN layers. Weights,
    ``momentum``, ``num_batches_tracked`` and the train/eval mode of every module are as
    before afterwards. BN layers the forward never reaches keep their statistics (warning).

    Cost: ``num_batches`` forward passes.

    Args:
        model: module containing at least one BatchNorm layer with running statistics.
        batches: iterable of batches (e.g. a training DataLoader); must yield at least
            ``num_batches`` items.
        num_batches: integer ≥ 1.
        forward_fn: ``(model, batch) -> Any``; for ``(x, y)`` pairs use
            ``lambda m, b: m(b[0])``.
        eval_other_modules: put every non-BN module in eval mode during recalibration
            (dropout off); ``False`` keeps their current modes.

    Returns:
        The number of samples used: the sum over batches of the leading dimension of the
        input of the first BN layer reached in each forward.

    Raises:
        ValueError: ``num_batches`` < 1, no BatchNorm with running statistics, or fewer
            than ``num_batches`` batches (all buffers are then restored).
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches: {num_batches!r} is not allowed; allowed: integer ≥ 1")
    layers = bn_modules(model)
    if not layers:
        raise ValueError(
            f"model: {type(model).__name__} has no BatchNorm layer with running statistics "
            "(track_running_stats=True); precise BN has nothing to recompute"
        )
    if forward_fn is None:

        def forward_fn(m: nn.Module, b: Any) -> Any:
            return m(b)

    # Snapshot everything we touch so that any exit (error included) restores it.
    modes = [(m, m.training) for m in model.modules()]
    momenta = [bn.momentum for bn in layers]
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), _tracked(bn)) for bn in layers]
    pooled = {bn: _PooledStats(bn.running_mean) for bn in layers}
    first_batch_size: list[int] = []  # leading dim of the first BN input of the current forward

    def pre_hook(bn: nn.Module, args: tuple[Any, ...]) -> None:
        if not first_batch_size:
            first_batch_size.append(int(args[0].shape[0]))

    def post_hook(bn: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        x = args[0]
        # values per channel = N·(spatial size), the n of BN's Bessel correction
        pooled[bn].update(bn.running_mean, bn.running_var, x.numel() // x.shape[1])

    handles = []
    seen = 0
    samples = 0
    ok = False
    try:
        if eval_other_modules:
            model.eval()
        for bn in layers:
            bn.train()
            # momentum 1 makes each forward *replace* the buffers by the batch statistics
            # (momentum 0 would freeze them: Lightning#14866). Reset first so that a NaN
            # left in the buffers cannot leak in through 0·NaN.
            bn.momentum = 1.0
            bn.reset_running_stats()
            handles.append(bn.register_forward_pre_hook(pre_hook))
            handles.append(bn.register_forward_hook(post_hook))
        for batch in itertools.islice(batches, num_batches):
            first_batch_size.clear()
            forward_fn(model, batch)
            samples += first_batch_size[0] if first_batch_size else 0
            seen += 1
        if seen < num_batches:
            raise ValueError(
                f"batches: yielded {seen} batches but num_batches={num_batches}; "
                "give a longer iterable or lower num_batches"
            )
        unreached = [name for name, m in model.named_modules() if m in pooled and pooled[m].count == 0]
        if len(unreached) == len(layers):
            raise ValueError("forward_fn: no BatchNorm layer was called; check forward_fn")
        if unreached:
            warnings.warn(f"BatchNorm layers never called, statistics kept: {unreached}", stacklevel=2)
        ok = True
    finally:
        for h in handles:
            h.remove()
        for bn, momentum, (mean, var, tracked) in zip(layers, momenta, saved):
            bn.momentum = momentum
            stats = pooled[bn]
            if ok and stats.count > 0:
                bn.running_mean.copy_(stats.mean)
                bn.running_var.copy_(stats.biased_var)
            else:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
            if tracked is not None:
                bn.num_batches_tracked.copy_(tracked)
        for m, training in modes:
            m.training = training
    return samples


def _tracked(bn: _BatchNorm) -> torch.Tensor | None:
    return None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone()


class PreciseBN:
    """Callable form of :func:`recompute_bn_stats` with its settings bound.

    ``PreciseBN(num_batches)(model, batches)`` is ``recompute_bn_stats(model, batches,
    num_batches, forward_fn)``. Holds no state beyond its settings.
    """

    def __init__(
        self,
        num_batches: int,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        *,
        eval_other_modules: bool = True,
    ) -> None:
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches: {num_batches!r} is not allowed; allowed: integer ≥ 1")
        self.num_batches = num_batches
        self.forward_fn = forward_fn
        self.eval_other_modules = eval_other_modules

    def __call__(self, model: nn.Module, batches: Iterable[Any]) -> int:
        """Recalibrate ``model``'s BN statistics in place; returns the samples used."""
        return recompute_bn_stats(
            model, batches, self.num_batches, self.forward_fn, eval_other_modules=self.eval_other_modules
        )

    def recalibrate(
        self, model: nn.Module, batches: Iterable[Any], forward_fn: Callable[[nn.Module, Any], Any] | None = None
    ) -> int:
        """The loop's ``bn_statistics`` role: recalibrate before an evaluation, calling the model with
        ``forward_fn`` (the task's ``bn_forward``; default: this object's). Returns the samples used."""
        return recompute_bn_stats(
            model,
            batches,
            self.num_batches,
            forward_fn if forward_fn is not None else self.forward_fn,
            eval_other_modules=self.eval_other_modules,
        )


def build(settings: Settings, context: BuildContext) -> PreciseBN:
    """The run's BatchNorm recalibration (the loop passes the task's batches and forward function)."""
    return PreciseBN(settings["num_batches"])


CARD = TrickCard(
    name="precise_bn",
    summary="Recompute BatchNorm population statistics over N training batches before each evaluation.",
    off="evaluate with the BN running averages accumulated during training (momentum EMA)",
    on="before each evaluation, replace the evaluated model's BN running mean/var by the pooled "
    "mean and biased variance of num_batches training batches (weights frozen, no grad)",
    params=(
        Param(
            "num_batches",
            int,
            32,
            "training batches pooled into the BN statistics; ~10⁴ samples suffice",
            unit="batches",
            low=1,
        ),
    ),
    cost="num_batches extra forward passes (no backward) per evaluation",
    effect="better, less noisy eval metrics for BN models, especially EMA/averaged weights and early in "
    "training; no effect without BN (rejected)",
    references=(
        "Wu & Johnson 2021, Rethinking 'Batch' in BatchNorm, arXiv:2105.07576",
        "facebookresearch/fvcore:fvcore/nn/precise_bn.py",
        "pytorch/pytorch:torch/optim/swa_utils.py (update_bn, a weaker estimator)",
    ),
    role="bn_statistics",
    build=build,
    tiny_setting={"num_batches": 2},
    incompatible=(),
)
