"""Feature matching loss: match mean intermediate features of a frozen consumer network.

Trick card
----------
**Off**: the task trains on its usual reconstruction loss alone (e.g. ``|x_pred − x|``).

**On**: beside that loss the task adds ``weight · L_fm`` with

    L_fm = (1/n) Σ_{l=1..n} Σ_c | mean_R f_l(x_pred)_c − mean_R f_l(x)_c |^p

where ``f_l`` is the output of layer ``l`` of a *frozen* consumer network (e.g. a classifier
trained on the clean data), the mean is over the axes ``R`` (batch and spatial by default, so
each channel's mean activation is matched — the feature matching of Salimans et al. 2016),
the sum is over the remaining feature entries, and ``p = 1`` (L1, default) or ``p = 2``
(squared L2, Salimans' form). With ``reduce="spatial"`` the batch axis is kept — per-sample
channel means, closer to torchgan's per-sample ``FeatureMatchingGeneratorLoss`` — and the
per-sample sums are averaged over the batch so the value does not grow with batch size.

Parameters
~~~~~~~~~~
- ``weight`` (float ≥ 0, loss weight, default 0.1): relative to the reconstruction loss. 0 = off.
- ``n_layers`` (int ≥ 1, default 2): how many leading layers of the consumer to match.
- ``reduce`` (``"batch_spatial"`` → dims (0, 2, 3), ``"spatial"`` → dims (2, 3); default
  ``"batch_spatial"``): the axes the features are averaged over before comparing.

Cost: two forward passes through the first ``n_layers`` of the consumer per step (the
target's under ``no_grad``) and one backward through them for ``x_pred``.
Expected effect: outputs whose feature statistics match the data's (sharper textures, fewer
"average" reconstructions); can trade a little pixel MSE for it. Matching batch means only is a
weak constraint — that is the point (Salimans) and also its limit.

References: Salimans et al. 2016, "Improved Techniques for Training GANs", arXiv 1606.03498
(feature matching on means of intermediate features); torchgan
``torchgan/losses/featurematching.py`` (``FeatureMatchingGeneratorLoss``: per sample — the
contrast to our default).

Pitfalls avoided: gradients flowing into (and an optimizer updating) the consumer — its
parameters are frozen and, inside the loss, used detached; the consumer in train mode —
BatchNorm would normalise each batch by its *own* statistics, making the per-channel means
of pred and target nearly equal and the loss ≈ 0, and would update running statistics from
predictions; the loss therefore requires eval mode and :class:`FeatureMatchingLoss` keeps the
consumer in eval even when the parent's ``.train()`` is called. Incompatibilities: the
consumer must accept the task's images (channels, value range) — normalise before the call
if it was trained on normalised inputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = ["CARD", "REDUCE_DIMS", "FeatureMatchingLoss", "build", "consumer_layers", "feature_matching_loss"]

REDUCE_DIMS: dict[str, tuple[int, ...]] = {"batch_spatial": (0, 2, 3), "spatial": (2, 3)}


def consumer_layers(consumer: nn.Module, n_layers: int) -> nn.Sequential:
    """The first ``n_layers`` of ``consumer`` (an ``nn.Sequential``, or a module whose ``features``
    is one) as an ``nn.Sequential`` sharing the same layer objects (no copy)."""
    seq = consumer if isinstance(consumer, nn.Sequential) else getattr(consumer, "features", None)
    if not isinstance(seq, nn.Sequential):
        raise ValueError(
            f"consumer: {type(consumer).__name__} is not allowed; allowed: an nn.Sequential or a module with an "
            "nn.Sequential `features` attribute"
        )
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= len(seq):
        raise ValueError(f"n_layers: {n_layers!r} is not allowed; allowed: an integer in [1, {len(seq)}]")
    return seq[:n_layers]


def _check_reduce(feat: Tensor, reduce_dims: tuple[int, ...], layer: int) -> None:
    if any(not -feat.ndim <= d < feat.ndim for d in reduce_dims):
        raise ValueError(
            f"reduce_dims: {reduce_dims} is not allowed at layer {layer} (features of shape {tuple(feat.shape)}); "
            f"allowed: dims in [0, {feat.ndim - 1}]"
        )


def feature_matching_loss(
    consumer_layers: nn.Sequential | Sequence[nn.Module],
    pred: Tensor,
    target: Tensor,
    n_layers: int,
    reduce_dims: Sequence[int] = (0, 2, 3),
    p: int = 1,
) -> Tensor:
    """Mean over the first ``n_layers`` of Σ |mean_R f_l(pred) − mean_R f_l(target)|^p (a scalar).

    Call in the task's loss code beside the reconstruction loss. The layers run in their
    current mode and must all be in eval mode (see the module's pitfalls); their parameters are
    used *detached*, so they never receive a gradient whatever their ``requires_grad``, while
    the gradient flows to ``pred``. Target features are computed under ``no_grad``. If the batch
    axis 0 is not reduced, per-sample sums are averaged over the batch. Nothing is changed in
    place. Cost: 2 partial forward passes and 1 partial backward.
    """
    layers = list(consumer_layers)
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers: {n_layers!r} is not allowed; allowed: an integer in [1, {len(layers)}]")
    if p not in (1, 2):
        raise ValueError(f"p: {p!r} is not allowed; allowed: 1 (L1) or 2 (squared L2)")
    if pred.shape != target.shape:
        raise ValueError(f"pred: shape {tuple(pred.shape)} is not allowed; allowed: the target's {tuple(target.shape)}")
    dims = tuple(int(d) for d in reduce_dims)
    if len(set(dims)) != len(dims) or not dims:
        raise ValueError(f"reduce_dims: {dims} is not allowed; allowed: distinct dims, at least one")
    layers = layers[:n_layers]
    training = [type(m).__name__ for layer in layers for m in layer.modules() if m.training]
    if training:
        raise ValueError(
            f"consumer_layers: modules in train mode ({', '.join(sorted(set(training)))}) are not allowed; allowed: "
            "eval mode (call .eval() on the consumer: BatchNorm in train mode hides mean differences)"
        )
    h_pred, h_target = pred, target
    total = pred.new_zeros(())
    for i, layer in enumerate(layers):
        # Detached parameters: the gradient reaches h_pred through the layer, never the weights.
        params = {name: w.detach() for name, w in layer.named_parameters()}
        h_pred = functional_call(layer, params, (h_pred,))
        with torch.no_grad():
            h_target = layer(h_target)
        _check_reduce(h_pred, dims, i)
        diff = h_pred.mean(dim=dims) - h_target.mean(dim=dims)
        term = diff.abs() if p == 1 else diff.square()
        batch_kept = 0 not in {d % h_pred.ndim for d in dims}
        total = total + (term.reshape(term.shape[0], -1).sum(dim=1).mean() if batch_kept else term.sum())
    return total / n_layers


class FeatureMatchingLoss(nn.Module):
    """``weight · feature_matching_loss(...)`` with the consumer frozen and kept in eval mode.

    At construction the consumer is changed in place: ``requires_grad_(False)`` and ``eval()``.
    Its first ``n_layers`` are registered as a submodule (so ``.to(device)`` moves them and a
    parent's ``state_dict`` carries them); ``.train()`` on this module or any parent leaves them
    in eval mode. ``forward(pred, target)`` returns the weighted scalar loss.
    """

    def __init__(
        self,
        consumer: nn.Module,
        n_layers: int,
        reduce_dims: Sequence[int] = (0, 2, 3),
        weight: float = 0.1,
        p: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"weight: {weight!r} is not allowed; allowed: a finite number ≥ 0")
        if p not in (1, 2):
            raise ValueError(f"p: {p!r} is not allowed; allowed: 1 (L1) or 2 (squared L2)")
        self.layers = consumer_layers(consumer, n_layers)
        consumer.requires_grad_(False)
        consumer.eval()
        self.n_layers, self.reduce_dims, self.weight, self.p = n_layers, tuple(reduce_dims), float(weight), p

    def train(self, mode: bool = True) -> FeatureMatchingLoss:
        super().train(mode)
        self.layers.eval()  # frozen consumer: always eval, whatever the parent asks
        return self

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        loss = feature_matching_loss(self.layers, pred, target, self.n_layers, self.reduce_dims, p=self.p)
        return self.weight * loss

    def extra_repr(self) -> str:
        return f"n_layers={self.n_layers}, reduce_dims={self.reduce_dims}, weight={self.weight}, p={self.p}"


def build(settings: Settings, context: BuildContext) -> functools.partial[FeatureMatchingLoss]:
    """The task's loss factory: ``factory(consumer)`` → :class:`FeatureMatchingLoss` on the task's frozen consumer."""
    return functools.partial(
        FeatureMatchingLoss,
        n_layers=settings["n_layers"],
        reduce_dims=REDUCE_DIMS[settings["reduce"]],
        weight=settings["weight"],
    )


CARD = TrickCard(
    name="feature_matching",
    summary="Add weight·|mean features(x_pred) − mean features(x)| over the first layers of a frozen consumer.",
    off="The usual reconstruction loss alone.",
    on=(
        "Reconstruction loss + weight · mean over the first n_layers of a frozen consumer (eval mode) of the L1 "
        "distance between feature means (over batch and space, or space only) of the prediction and the target."
    ),
    params=(
        Param(
            "weight",
            float,
            0.1,
            "Weight of the feature matching term (0 would be the trick switched off).",
            "loss weight",
            low=0.0,
            low_open=True,
        ),
        Param("n_layers", int, 2, "Leading consumer layers to match.", "layers", low=1),
        Param(
            "reduce",
            str,
            "batch_spatial",
            "Axes the features are averaged over: batch_spatial = (0, 2, 3), spatial = (2, 3) per sample.",
            choices=("batch_spatial", "spatial"),
        ),
    ),
    cost="Two partial forward passes of the consumer and one partial backward per step.",
    effect="Feature statistics of outputs closer to the data's; may trade a little pixel error.",
    references=(
        "Salimans et al. 2016, Improved Techniques for Training GANs, arXiv 1606.03498",
        "torchgan/torchgan:torchgan/losses/featurematching.py (FeatureMatchingGeneratorLoss, per sample)",
    ),
    role="task",
    build=build,
    tiny_setting={"n_layers": 1, "weight": 0.1},
    incompatible=(),
)
