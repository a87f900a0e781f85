"""Batch-stratified sampling of per-sample random numbers.

Trick card
----------
Many losses draw one random number per sample: a diffusion noise level or timestep, an
augmentation strength, a mask ratio. With i.i.d. draws a batch can, by chance, hold mostly
easy (or mostly hard) values, and the loss estimate is noisier than it needs to be.
Stratified sampling splits [0, 1) into ``n`` equal strata and draws exactly one value in
each, then shuffles them across the batch:

    u = (randperm(n) + rand(n)) / n

Each element is still marginally U(0, 1) — so the expected loss is unchanged — but the
batch covers the range evenly, and the variance of a batch mean of u drops from
1/(12 n) to 1/(12 n³). Other distributions come from an inverse CDF applied to u
(:func:`to_normal`, :func:`to_lognormal`, :func:`to_uniform_int`); monotone transforms keep
one value per stratum.

- **off**: i.i.d. draws, :func:`iid_uniform` (``torch.rand``) — same signature, so a task
  switches arms with one flag (``StratifiedSampler(..., stratified=False)``).
- **on**: :func:`stratified_uniform` (or :func:`stratified_uniform_accumulated` when a
  step is split into micro-batches or across ranks).
- **parameters**: none.
- **cost**: negligible (one ``randperm`` of the batch size per draw).
- **expected effect**: lower-variance gradient estimates for losses that integrate over a
  per-sample random variable (diffusion training, augmentation strength); smoother loss
  curves; a small gain at small batch sizes, none at large ones.
- **incompatible**: none. Tasks without per-sample random numbers have nothing to stratify.

Pitfalls avoided:

- no permutation (k-diffusion ``k_diffusion/utils.py`` ``stratified_uniform``: sample i is
  always in stratum i). Harmless when the batch order is random, but then position 0 of
  every batch gets the lowest noise level, which correlates with anything else indexed by
  position (the first sample of a data shard, a fixed conditioning slot). Here every
  position is marginally U(0, 1).
- stratifying per micro-batch under gradient accumulation leaves the full step with k
  separate strata sets; :func:`stratified_uniform_accumulated` stratifies the whole step.
- u rounding to exactly 1.0 in float32 for large n (an out-of-range timestep, an infinite
  normal quantile): u is clamped below 1, and the normal adapters clamp away from 0 and 1.
- randomness only from the ``generator`` argument (``None`` means torch's default
  generator, for interactive use; the harness always passes its named stream).

References: k-diffusion ``k_diffusion/utils.py`` (``stratified_uniform``,
``stratified_with_settings``); Karras et al. 2022 (EDM, log-normal sigma, P_mean/P_std);
Kingma et al. 2021 (Variational Diffusion Models, low-discrepancy timesteps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tricks.card import BuildContext, Settings, TrickCard

__all__ = [
    "CARD",
    "StepStratifier",
    "StratifiedSampler",
    "build",
    "iid_uniform",
    "stratified_uniform",
    "stratified_uniform_accumulated",
    "to_lognormal",
    "to_normal",
    "to_uniform_int",
]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: {value!r} is not allowed; allowed: integer ≥ 1")
    return value


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"dtype: {dtype} is not allowed; allowed: a floating-point dtype")


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return torch.device("cpu") if generator is None else generator.device


def _below_one(u: Tensor) -> Tensor:
    # (n − 1 + r)/n with r close to 1 can round to exactly 1.0 after the cast to dtype;
    # keep the half-open interval [0, 1): 1 − eps/2 is the largest float below 1.
    return u.clamp_(max=1.0 - torch.finfo(u.dtype).eps / 2)


def stratified_uniform(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` values in [0, 1), exactly one in each stratum [i/n, (i+1)/n), in random order.

    Call once per batch, where i.i.d. ``torch.rand(n)`` would be used. Draws a
    ``randperm(n)`` and a ``rand(n)`` from ``generator`` (on the generator's device; the
    result is moved to ``device``). Computed in float64, then cast to ``dtype``.
    """
    _check_positive_int("n", n)
    _check_dtype(dtype)
    gdev = _gen_device(generator)
    perm = torch.randperm(n, generator=generator, device=gdev)
    jitter = torch.rand(n, generator=generator, device=gdev, dtype=torch.float64)
    u = _in_strata((perm.to(torch.float64) + jitter) / n, perm, n, dtype)
    return u.to(device=device)


def _in_strata(u64: Tensor, strata: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """``u64`` cast to ``dtype`` with every value kept inside its stratum ``[s/n, (s+1)/n)`` and below 1.

    Rounding to a narrower float can carry a value just below a stratum's upper edge onto the
    edge (float32: about one draw in 75 at n = 1000, every draw at n ≥ 65536), putting two values
    in one stratum. Such values are moved back one representable step at a time
    (``torch.nextafter``). Raises when ``dtype`` cannot represent a value inside every stratum.
    """
    u = _below_one(u64.to(dtype))
    if dtype == torch.float64:
        return u
    for _ in range(4):
        k = torch.floor(u.to(torch.float64) * n).to(strata.dtype)
        high, low = k > strata, k < strata
        if not (high.any() or low.any()):
            return u
        u = torch.where(high, torch.nextafter(u, torch.zeros_like(u)), u)
        u = torch.where(low, torch.nextafter(u, torch.ones_like(u)), u)
    raise ValueError(
        f"n: {n} is not allowed with dtype {dtype}; allowed: a smaller n, or dtype=torch.float64 (strata of width "
        f"1/{n} are too narrow for {dtype} to hold one value each)"
    )


def iid_uniform(
    n: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The "off" arm of :func:`stratified_uniform`: ``n`` i.i.d. U[0, 1) values (``torch.rand``)."""
    _check_positive_int("n", n)
    _check_dtype(dtype)
    u = torch.rand(n, generator=generator, device=_gen_device(generator), dtype=torch.float64)
    return _below_one(u.to(device=device, dtype=dtype))


def stratified_uniform_accumulated(
    n_per_micro: int,
    micro_batches: int,
    micro_index: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The ``micro_index``-th slice of one stratified draw over a whole optimizer step.

    With gradient accumulation over ``micro_batches`` micro-batches of ``n_per_micro``
    samples, the step holds ``n = n_per_micro · micro_batches`` samples; this draws one
    permutation of those ``n`` strata and returns positions
    ``[micro_index · n_per_micro, (micro_index + 1) · n_per_micro)``. Across the micro
    steps every stratum is used exactly once, and within each micro-batch each element is
    still marginally U(0, 1).

    The caller must pass, for every micro step of one optimizer step, a generator in the
    *same* state — e.g. ``torch.Generator().manual_seed(s)`` re-created per micro index,
    with ``s`` derived from (seed, step) — so that all micro steps see the same
    permutation. Across data-parallel ranks use ``micro_index = rank · micro_batches +
    micro`` and ``micro_batches = world_size · micro_batches`` (k-diffusion spreads its
    strata across ranks the same way).

    Cost: a ``randperm`` of the full step size per micro step.
    """
    _check_positive_int("n_per_micro", n_per_micro)
    _check_positive_int("micro_batches", micro_batches)
    if isinstance(micro_index, bool) or not isinstance(micro_index, int) or not 0 <= micro_index < micro_batches:
        raise ValueError(
            f"micro_index: {micro_index!r} is not allowed; allowed: integer in [0, {micro_batches - 1}] "
            f"(micro_batches={micro_batches})"
        )
    full = stratified_uniform(n_per_micro * micro_batches, generator=generator, device=device, dtype=dtype)
    return full[micro_index * n_per_micro : (micro_index + 1) * n_per_micro]


def _clamp_open(u: Tensor) -> Tensor:
    """u clamped to [eps/2, 1 − eps/2] of its dtype: symmetric, finite normal quantiles."""
    if not u.dtype.is_floating_point:
        raise ValueError(f"u: dtype {u.dtype} is not allowed; allowed: floating-point values in [0, 1]")
    half_eps = torch.finfo(u.dtype).eps / 2
    return u.clamp(half_eps, 1.0 - half_eps)


def _check_mean_std(mean: float, std: float) -> None:
    if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not math.isfinite(mean):
        raise ValueError(f"mean: {mean!r} is not allowed; allowed: finite number")
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not math.isfinite(std) or std <= 0:
        raise ValueError(f"std: {std!r} is not allowed; allowed: finite number > 0")


def to_normal(u: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Normal N(mean, std²) values by the inverse CDF: ``mean + std · Φ⁻¹(u)``.

    Monotone, so stratified u gives stratified normal draws. u is clamped to
    [eps/2, 1 − eps/2] of its dtype (±5.4 std in float32, ±8.3 in float64) so no value is
    infinite. Returns a new tensor of u's dtype.
    """
    _check_mean_std(mean, std)
    return mean + std * torch.special.ndtri(_clamp_open(u))


def to_lognormal(u: Tensor, mean: float, std: float) -> Tensor:
    """Log-normal values: ``exp(mean + std · Φ⁻¹(u))``.

    EDM's training noise levels: ``sigma = to_lognormal(u, P_mean, P_std)`` with
    P_mean = −1.2, P_std = 1.2 (Karras et al. 2022, Table 1). ``mean`` and ``std`` are of
    log(sigma).
    """
    return to_normal(u, mean, std).exp()


def to_uniform_int(u: Tensor, low: int, high: int) -> Tensor:
    """Integers uniform on [low, high) (int64): ``low + floor(u · (high − low))``.

    For discrete diffusion timesteps. With stratified u and n = high − low every integer
    appears exactly once; with n a multiple of high − low each appears n/(high − low) times.
    """
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name}: {v!r} is not allowed; allowed: integer")
    if high <= low:
        raise ValueError(f"high: {high!r} is not allowed; allowed: integer > low ({low})")
    if not u.dtype.is_floating_point:
        raise ValueError(f"u: dtype {u.dtype} is not allowed; allowed: floating-point values in [0, 1)")
    # float64 so that u·(high − low) does not round up to the next integer for large ranges
    k = torch.floor(u.to(torch.float64) * (high - low)).to(torch.int64)
    return low + k.clamp_(0, high - low - 1)


_KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required params, optional params)
    "uniform": ((), ()),
    "normal": ((), ("mean", "std")),
    "lognormal": (("mean", "std"), ()),
    "uniform_int": (("low", "high"), ()),
}


class StratifiedSampler:
    """Draws per-sample random numbers of one distribution, stratified or i.i.d.

    ``StratifiedSampler("lognormal", mean=-1.2, std=1.2).sample(n, generator)`` is
    ``to_lognormal(stratified_uniform(n, generator=generator), -1.2, 1.2)``;
    ``stratified=False`` swaps in :func:`iid_uniform` (the "off" arm). Stateless: all
    randomness comes from the generator passed to :meth:`sample`.

    Kinds and parameters: ``"uniform"`` (none), ``"normal"`` (``mean``=0, ``std``=1),
    ``"lognormal"`` (``mean``, ``std`` of the log), ``"uniform_int"`` (``low``, ``high``).
    """

    def __init__(self, kind: str = "uniform", *, stratified: bool = True, **params: float) -> None:
        if kind not in _KINDS:
            raise ValueError(f"kind: {kind!r} is not allowed; allowed: one of {', '.join(map(repr, _KINDS))}")
        required, optional = _KINDS[kind]
        unknown = set(params) - set(required) - set(optional)
        if unknown:
            raise ValueError(
                f"params: {sorted(unknown)!r} not allowed for kind {kind!r}; allowed: {list(required + optional)!r}"
            )
        missing = [p for p in required if p not in params]
        if missing:
            raise ValueError(f"params: {missing!r} missing for kind {kind!r}; required: {list(required)!r}")
        if not isinstance(stratified, bool):
            raise ValueError(f"stratified: {stratified!r} is not allowed; allowed: true/false")
        self.kind, self.stratified, self.params = kind, stratified, dict(params)
        # validate the parameter values once, now, on a dummy u
        self._transform(torch.full((1,), 0.5, dtype=torch.float64))

    def _transform(self, u: Tensor) -> Tensor:
        p = self.params
        if self.kind == "normal":
            return to_normal(u, p.get("mean", 0.0), p.get("std", 1.0))
        if self.kind == "lognormal":
            return to_lognormal(u, p["mean"], p["std"])
        if self.kind == "uniform_int":
            return to_uniform_int(u, p["low"], p["high"])  # type: ignore[arg-type]
        return u

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``n`` values (one per sample); int64 for ``uniform_int``, else ``dtype``."""
        draw: Callable[..., Tensor] = stratified_uniform if self.stratified else iid_uniform
        return self._transform(draw(n, generator=generator, device=device, dtype=dtype))

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"StratifiedSampler({self.kind!r}{args}, stratified={self.stratified})"


class StepStratifier:
    """The trick's object for tasks: stratified uniforms over a whole optimizer step.

    ``uniform(n, generator=g)`` is :func:`stratified_uniform`; with ``micro_batches=k,
    micro_index=i`` it is :func:`stratified_uniform_accumulated` (the same generator state for
    every micro-batch of a step). Configuration only.
    """

    def uniform(
        self,
        n: int,
        *,
        generator: torch.Generator,
        micro_batches: int = 1,
        micro_index: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``n`` stratified values in [0, 1) (this micro-batch's share of one draw over the step)."""
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: {generator!r} is not allowed; allowed: a torch.Generator")
        return stratified_uniform_accumulated(
            n, micro_batches, micro_index, generator=generator, device=device, dtype=dtype
        )

    def __repr__(self) -> str:
        return "StepStratifier()"


def build(settings: Settings, context: BuildContext) -> StepStratifier:
    """The task's stratifier (the trick has no settings)."""
    return StepStratifier()


CARD = TrickCard(
    name="stratified_sampling",
    summary="Draw per-sample random numbers (noise levels, timesteps) one per stratum of [0,1), shuffled.",
    off="i.i.d. draws: u = torch.rand(n), pushed through the task's inverse CDF",
    on="stratified draws: u = (randperm(n) + rand(n)) / n — one value per stratum [i/n,(i+1)/n), randomly "
    "permuted; stratified across accumulation micro-batches of a step",
    params=(),
    cost="negligible: one randperm of the batch size per draw",
    effect="lower-variance loss/gradient estimates for losses averaged over a per-sample random variable "
    "(Var of batch mean 1/(12n³) vs 1/(12n)); most visible at small batch sizes",
    references=(
        "crowsonkb/k-diffusion:k_diffusion/utils.py (stratified_uniform; does not permute)",
        "Karras et al. 2022, EDM (log-normal noise levels), arXiv:2206.00364",
        "Kingma et al. 2021, Variational Diffusion Models (low-discrepancy sampler), arXiv:2107.00630",
    ),
    role="task",
    build=build,
    tiny_setting={},
    incompatible=(),
)
