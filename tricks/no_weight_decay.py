"""Zero weight decay on normalization and bias parameters.

Trick card
----------
Weight decay shrinks weights toward zero. For a conv/linear weight followed by a
normalization layer this only controls the effective learning rate, but for the gain and
shift of a normalization layer and for biases it pulls the function itself toward a
degenerate one (gain 0), and those parameters are few, so regularizing them buys nothing.
Most modern recipes (timm, nanoGPT, DeiT, ConvNeXt) exclude them from decay.

- **off**: one parameter group, the optimizer's weight decay on every parameter
  (``param_groups(model, wd, enabled=False)``).
- **on**: two groups, passable directly to any ``torch.optim`` optimizer:
  ``[{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]``.
  Decay: weights with ``ndim ≥ 2`` (conv, linear, embedding) outside normalization
  modules. No decay: every bias, every parameter of a normalization module (BatchNorm*,
  SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm*, RMSNorm, LocalResponseNorm, and any
  module whose class name ends in "Norm"/"Norm1d/2d/3d", e.g. timm's LayerNorm2d), every
  parameter with ``ndim ≤ 1``, and the names given in ``extra_no_decay`` (e.g. a
  ViT's ``pos_embed``, ``cls_token``).
- **parameters**: none in the card; the weight decay value comes from the optimizer config.
- **cost**: none at run time (group membership is computed once, when the optimizer is built).
- **expected effect**: small accuracy gains at large weight decay (AdamW ~0.05, SGD ~5e-4),
  larger for small models and long schedules; little at small weight decay.
- **incompatible**: none. Optimizers with their own grouping logic (e.g. LARS/LAMB
  exclusions) should get the groups from here instead.

Pitfalls avoided:

- exclusion silently skipped on a wrapped model (facebookresearch/deit#39: name lists
  written for ``model`` did not match ``module.``-prefixed names under DDP). Membership is
  decided by module type and tensor shape while walking the module tree, which is the same
  through ``nn.DataParallel``/DDP (``.module``), ``torch.compile`` (``._orig_mod``),
  ``AveragedModel`` and nested containers. ``extra_no_decay`` names are matched after
  removing wrapper prefixes, and a name that matches nothing is an error.
- parameters missing from every group or in two groups: every trainable parameter is in
  exactly one group; a parameter shared by several modules is listed once (and goes to
  no-decay if *any* of its owners is a normalization module).
- frozen parameters (``requires_grad=False``) are in no group.

References: timm ``timm/optim/_param_groups.py`` (``param_groups_weight_decay``: ndim ≤ 1
or ``.bias``); super-gradients ``separate_zero_wd_params_groups_for_optimizer`` (by module
type); nanoGPT ``model.py`` ``configure_optimizers`` (``p.dim() >= 2`` decays); Loshchilov &
Hutter 2019 (AdamW).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from tricks.card import BuildContext, CheckContext, Settings, TrickCard

__all__ = [
    "CARD",
    "NORM_TYPES",
    "ZeroDecayGroups",
    "build",
    "grouping_summary",
    "is_norm_module",
    "param_groups",
    "split_parameter_names",
]

# Type-based detection first (exact); a class-name rule below catches user/timm norms.
NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        _NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d, lazy variants
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.CrossMapLRN2d,
        getattr(nn, "RMSNorm", None),  # torch ≥ 2.4
    )
    if t is not None
)

# Prefixes that wrappers put in front of the wrapped model's parameter names.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_norm_module(module: nn.Module) -> bool:
    """True for normalization layers: known torch types, or a class name ending in Norm[1-3]d?."""
    if isinstance(module, NORM_TYPES):
        return True
    name = type(module).__name__
    return name.endswith("Norm") or (name[-2:] in ("1d", "2d", "3d") and name[:-2].endswith("Norm"))


def _is_bias_name(local_name: str) -> bool:
    # "bias", "in_proj_bias" (MultiheadAttention), "bias_k"/"bias_v" (ndim 3!)
    return local_name == "bias" or local_name.endswith("_bias") or local_name.startswith("bias_")


def _strip_wrappers(name: str) -> str:
    """``module._orig_mod.encoder.w`` -> ``encoder.w`` (wrapper prefixes anywhere in front)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _no_decay_ids(model: nn.Module) -> set[int]:
    """ids of parameters that some owner marks as no-decay (norm module or bias name)."""
    ids: set[int] = set()
    # Walk every module's *own* parameters: a parameter shared by two modules is seen under
    # each owner, so one shared by a Linear and a LayerNorm is caught by the LayerNorm.
    for module in model.modules():
        norm = is_norm_module(module)
        for local_name, p in module.named_parameters(recurse=False):
            if norm or _is_bias_name(local_name) or p.ndim <= 1:
                ids.add(id(p))
    return ids


def _split(
    model: nn.Module, extra_no_decay: Collection[str]
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: {type(model).__name__} is not allowed; allowed: a torch.nn.Module")
    if isinstance(extra_no_decay, str):
        raise ValueError(f"extra_no_decay: {extra_no_decay!r} is not allowed; allowed: a collection of names")
    no_decay_ids = _no_decay_ids(model)
    extra = set(extra_no_decay)
    matched: set[str] = set()
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    # named_parameters() lists each parameter once (first name) even when shared.
    for name, p in model.named_parameters():
        bare = _strip_wrappers(name)
        if bare in extra:
            matched.add(bare)
        if not p.requires_grad:
            continue
        (no_decay if id(p) in no_decay_ids or bare in extra else decay).append((name, p))
    unmatched = extra - matched
    if unmatched:
        known = sorted(_strip_wrappers(n) for n, _ in model.named_parameters())
        raise ValueError(
            f"extra_no_decay: {sorted(unmatched)!r} match no parameter; allowed: parameter names "
            f"without wrapper prefixes, e.g. {known[:5]!r}"
        )
    return decay, no_decay


def split_parameter_names(model: nn.Module, *, extra_no_decay: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters that get weight decay and that do not.

    Names are as ``model.named_parameters()`` gives them (wrapper prefixes included); a
    shared parameter appears once, under its first name. Frozen parameters appear in
    neither list.
    """
    decay, no_decay = _split(model, extra_no_decay)
    return [n for n, _ in decay], [n for n, _ in no_decay]


def param_groups(
    model: nn.Module, weight_decay: float, *, enabled: bool = True, extra_no_decay: Collection[str] = ()
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim``: decay and zero-decay.

    Call once, when building the optimizer: ``AdamW(param_groups(model, 0.05), lr=...)``.
    Nothing is changed in place. Both groups are always present (possibly empty), so the
    optimizer's state_dict has the same structure for every model.

    Args:
        model: the model, wrapped or not.
        weight_decay: decay of the first group, a finite number ≥ 0.
        enabled: ``False`` gives the "off" arm: one group with ``weight_decay`` on every
            trainable parameter.
        extra_no_decay: further parameter names to exclude from decay (names without
            wrapper prefixes, e.g. ``{"pos_embed"}``); a name matching nothing is an error.
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise ValueError(f"weight_decay: {weight_decay!r} is not allowed; allowed: number ≥ 0")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay: {weight_decay!r} is not allowed; allowed: number ≥ 0")
    decay, no_decay = _split(model, extra_no_decay)
    if not enabled:
        everything = [p for _, p in decay] + [p for _, p in no_decay]
        return [{"params": everything, "weight_decay": float(weight_decay)}]
    return [
        {"params": [p for _, p in decay], "weight_decay": float(weight_decay)},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]


def grouping_summary(model: nn.Module, *, extra_no_decay: Collection[str] = ()) -> str:
    """A readable table: one row per trainable parameter with its shape and group.

    For logs and for checking a new model by eye; frozen parameters are listed as "frozen".
    """
    decay, no_decay = _split(model, extra_no_decay)
    group = {id(p): "decay" for _, p in decay} | {id(p): "no_decay" for _, p in no_decay}
    rows = [
        (name, "x".join(str(s) for s in p.shape) or "scalar", group.get(id(p), "frozen"))
        for name, p in model.named_parameters()
    ]
    rows.insert(0, ("name", "shape", "group"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    lines.insert(1, "-" * len(lines[0]))
    n_decay = sum(p.numel() for _, p in decay)
    n_no = sum(p.numel() for _, p in no_decay)
    lines.append(f"decay: {len(decay)} tensors, {n_decay} values; no_decay: {len(no_decay)} tensors, {n_no} values")
    return "\n".join(lines)


class ZeroDecayGroups:
    """The loop's ``optimizer_groups`` role: :func:`param_groups` (decay / zero decay) for the optimizer."""

    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
        """Called once, building the optimizer."""
        return param_groups(model, weight_decay)

    def __repr__(self) -> str:
        return "ZeroDecayGroups()"


def build(settings: Settings, context: BuildContext) -> ZeroDecayGroups:
    """The run's parameter grouping (the trick has no settings)."""
    return ZeroDecayGroups()


def _check(settings: Any, context: CheckContext) -> list[str]:
    if not context.train["weight_decay"]:
        return ["has no effect: train.weight_decay is 0, so there is no decay to exclude; allowed: weight_decay > 0"]
    return []


CARD = TrickCard(
    name="no_weight_decay",
    summary="Exclude normalization parameters and biases from weight decay.",
    off="one parameter group: the optimizer's weight decay on every parameter",
    on="two groups: conv/linear/embedding weights (ndim ≥ 2) keep the weight decay; norm-layer "
    "parameters, biases and all ndim ≤ 1 parameters get weight_decay 0",
    params=(),
    cost="none at run time (groups are built once with the optimizer)",
    effect="small gains at large weight decay (AdamW ~0.05), more for small models and long training; "
    "prevents decay from shrinking norm gains",
    references=(
        "huggingface/pytorch-image-models:timm/optim/_param_groups.py (param_groups_weight_decay)",
        "Deci-AI/super-gradients: separate_zero_wd_params_groups_for_optimizer",
        "karpathy/nanoGPT:model.py (configure_optimizers)",
        "facebookresearch/deit#39 (exclusion skipped on a wrapped model)",
    ),
    role="optimizer_groups",
    build=build,
    check=_check,
    tiny_setting={},
    incompatible=(),
)
