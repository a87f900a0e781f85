"""Two re-implementations of an EMA of the weights, for ``bench equiv`` (the equivalence check).

``example_ema`` is written from the definition, independently of ``tricks/ema.py``: a deep copy of
the model whose parameters follow ``ema ← d·ema + (1 − d)·θ`` (``Tensor.lerp_``, one tensor at a
time) after every optimizer step, the first update a copy, ``d = 0.5^(samples_per_step / half_life)``,
buffers copied. It should be equivalent to the built-in ``ema`` — numerically identical up to the
last bits of the decay.

``example_ema_buggy`` is the same code with one deliberate, realistic bug (see :class:`BuggyEMA`):
a single run with it looks fine (it is still an EMA, it still smooths, its metric is plausible);
only a paired comparison over seeds against the reference shows it is not the same trick.

Both implement trickbench's ``evaluated_weights`` role (``tricks.binding.EvaluatedWeights``):
``after_step`` / ``candidate`` / ``weights`` / ``state_dict`` / ``load_state_dict`` /
``takes_candidates``; the loop builds them with the model and the samples per optimizer step.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from tricks.card import BuildContext, Param, Settings, TrickCard

__all__ = ["BUGGY_CARD", "CARD", "BuggyEMA", "LerpEMA"]


class LerpEMA:
    """An EMA copy of a model, updated once per optimizer step (role ``evaluated_weights``)."""

    takes_candidates = False  # evaluates its own copy; never chooses among checkpoints

    def __init__(self, model: nn.Module, half_life_samples: float, samples_per_step: int) -> None:
        if isinstance(half_life_samples, bool) or not (math.isfinite(half_life_samples) and half_life_samples > 0):
            raise ValueError(f"half_life_samples: {half_life_samples!r} is not allowed; allowed: a number > 0")
        if isinstance(samples_per_step, bool) or not (isinstance(samples_per_step, int) and samples_per_step > 0):
            raise ValueError(f"samples_per_step: {samples_per_step!r} is not allowed; allowed: an integer > 0")
        self.decay = self.decay_for(half_life_samples, samples_per_step)
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.updates = 0

    @staticmethod
    def decay_for(half_life_samples: float, samples_per_step: int) -> float:
        """Per-update decay: an update's weight halves after ``half_life_samples`` samples."""
        return 0.5 ** (samples_per_step / half_life_samples)

    @torch.no_grad()
    def after_step(self, model: nn.Module, samples_seen: int) -> None:
        """Once per optimizer step: move the copy toward ``model`` (the first update copies)."""
        weight = 1.0 if self.updates == 0 else 1.0 - self.decay
        for mine, theirs in zip(self.module.parameters(), model.parameters(), strict=True):
            mine.lerp_(theirs.detach(), weight)
        for mine, theirs in zip(self.module.buffers(), model.buffers(), strict=True):
            mine.copy_(theirs)
        self.updates += 1

    def candidate(self, model: nn.Module, metric: float | None, step: int) -> None:
        """Not a chooser: nothing to do."""

    def weights(self, model: nn.Module, final: bool) -> tuple[nn.Module, bool]:
        """The EMA copy; its buffers are the model's, so no BatchNorm recomputation."""
        return self.module, False

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["decay"] != self.decay:
            raise ValueError(f"state_dict.decay: {state['decay']!r} does not match this EMA's {self.decay!r}")
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


class BuggyEMA(LerpEMA):
    """DELIBERATELY WRONG: the half-life is turned into a decay with ``e`` instead of 2.

    ``d = exp(−samples_per_step / half_life)`` makes ``half_life_samples`` the e-folding time, so the
    real half-life is ``ln 2 ≈ 0.69`` of the one asked for. A classic slip (the formula looks right,
    and every single run looks like a normal EMA run); ``bench equiv`` against ``ema`` catches it.
    """

    @staticmethod
    def decay_for(half_life_samples: float, samples_per_step: int) -> float:
        return math.exp(-samples_per_step / half_life_samples)


def _builder(cls: type[LerpEMA]):
    def build(settings: Settings, context: BuildContext) -> LerpEMA:
        """Built by the loop once per run, with the model (on its device) and the samples per optimizer step."""
        if context.model is None or context.samples_per_step is None:
            raise ValueError(f"{cls.__name__}: build needs the model and samples_per_step (the loop builds it)")
        return cls(context.model, settings["half_life_samples"], context.samples_per_step)

    return build


_HALF_LIFE = Param(
    "half_life_samples",
    float,
    2000.0,
    "Samples after which an update's weight in the average has halved.",
    unit="samples",
    low=0.0,
    low_open=True,
)
_REFERENCES = (
    "pytorch/pytorch:torch/optim/swa_utils.py (AveragedModel, get_ema_multi_avg_fn)",
    "NVlabs/edm:training/training_loop.py (ema_halflife_kimg)",
)

CARD = TrickCard(
    name="example_ema",
    summary="EMA of the weights (example plugin; an independent re-implementation of the built-in ema).",
    off="The training model is evaluated.",
    on="An EMA copy, d = 0.5^(samples per step / half-life), first update a copy, is updated after every optimizer "
    "step and evaluated instead.",
    params=(_HALF_LIFE,),
    cost="One copy of the weights; one lerp per parameter tensor per optimizer step.",
    effect="Smoother evaluated weights; should equal the built-in ema (check with `bench equiv`).",
    references=_REFERENCES,
    role="evaluated_weights",
    build=_builder(LerpEMA),
    tiny_setting={"half_life_samples": 64.0},
)

BUGGY_CARD = TrickCard(
    name="example_ema_buggy",
    summary="EMA of the weights with a deliberate bug (decay from e, not 2: the half-life is 0.69x the one asked for).",
    off="The training model is evaluated.",
    on="An EMA copy with d = exp(-samples per step / half-life) — a deliberately wrong decay — evaluated instead.",
    params=(_HALF_LIFE,),
    cost="One copy of the weights; one lerp per parameter tensor per optimizer step.",
    effect="Like an EMA with a 31% shorter half-life: `bench equiv ... ema example_ema_buggy` must flag it.",
    references=_REFERENCES,
    role="evaluated_weights",
    build=_builder(BuggyEMA),
    tiny_setting={"half_life_samples": 64.0},
)
