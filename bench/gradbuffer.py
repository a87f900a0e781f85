"""All of a model's gradients in one flat tensor, so the per-step gradient norm is one kernel.

The loop records the gradient norm at every optimizer step (a stability outcome). With one
gradient tensor per parameter that costs a kernel per parameter (~2 µs each on CPU: 5 % of a
tiny task's 1 ms step); with the gradients as views of one flat buffer it is one kernel
(a BLAS dot on CPU, ``vector_norm`` elsewhere) and zeroing is one ``zero_()`` — cheaper than
autograd allocating fresh gradients every step, so the harness matches a bare PyTorch loop
(``bench perf``). DDP's gradient buckets make the same trade.

The trade: a parameter's gradient is never ``None`` between steps, only zero. A parameter
that received no gradient would then be *stepped* with a zero gradient (AdamW decays it and
applies its momentum) instead of *skipped*. The loop therefore uses the buffer only for
tasks that declare ``Task.dense_grads`` (every trainable parameter gets a gradient at every
step, under every trick — tested for every cell of the applicability matrix) and checks it
on the first step of every call: :meth:`FlatGrads.adopt` raises if a gradient is missing. A
``.grad`` replaced later (e.g. by a ``zero_grad`` inside the task) is caught by
:meth:`FlatGrads.attached` before the run evaluates, checkpoints or reports.

Values are bit-identical to per-parameter gradients: autograd adds each micro-batch's
gradient into the zeroed view (``0 + g == g``), exactly as it sums micro-batches otherwise.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import nn

_GRAD = operator.attrgetter("grad")

__all__ = ["FlatGrads", "SeedFlatGrads"]

ROW_ALIGN_BYTES = 64  # SeedFlatGrads: each seed's row starts at a multiple of this (a cache line, AVX-512)


class FlatGrads:
    """One flat gradient buffer whose slices are the parameters' ``.grad`` (same shape and strides).

    Use: build once per run with :meth:`for_params` (``None`` when not applicable); run the
    first backward with the gradients unset and call :meth:`adopt` (checks every parameter
    got one and moves them into the buffer); then per step read :meth:`norm` and call
    :meth:`zero_` instead of ``optimizer.zero_grad``. Check :meth:`attached` before anything
    leaves the run (evaluation, checkpoint, result): if code replaced or unset a ``.grad``, the
    steps since then used wrong gradients, so the run must fail rather than report.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        first = named_params[0][1]
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.flat = torch.zeros(sum(p.numel() for p in self.params), device=first.device, dtype=first.dtype)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self.views.append(self.flat.as_strided(p.shape, p.stride(), offset))
            offset += p.numel()

    @staticmethod
    def for_params(named_params: list[tuple[str, nn.Parameter]]) -> FlatGrads | None:
        """A buffer for these parameters, or ``None`` when they do not fit one.

        They fit when all share one device and dtype and each is dense (its elements fill its
        storage with no gaps or overlaps, in any order: contiguous or channels_last).
        """
        if not named_params or len({(p.device, p.dtype) for _, p in named_params}) != 1:
            return None
        for _, p in named_params:
            if p.is_sparse or p.storage_offset() != 0 or p.untyped_storage().nbytes() != p.numel() * p.element_size():
                return None
            if not (p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)):
                return None
        return FlatGrads(named_params)

    def adopt(self, task: str) -> None:
        """After the first backward of a call: move every gradient into the buffer.

        Raises RuntimeError naming the parameter when one got no gradient: the task then
        must not declare ``dense_grads``.
        """
        missing = [n for n, p in zip(self.names, self.params) if p.grad is None]
        if missing:
            raise RuntimeError(
                f"task {task} declares dense_grads, but parameter(s) {missing} received no gradient; "
                "set dense_grads = False on the task"
            )
        for p, view in zip(self.params, self.views):
            view.copy_(p.grad)
            p.grad = view

    def attached(self) -> bool:
        """True while every ``.grad`` is still its view (nothing replaced or unset a gradient)."""
        return all(map(operator.is_, map(_GRAD, self.params), self.views))

    def norm(self) -> float:
        """Total 2-norm of all gradients (reads it to the host).

        On CPU ``sqrt(dot(g, g))``: one BLAS call, the cheapest path through the dispatcher
        (~30 % less than ``vector_norm`` between a tiny task's kernels); elsewhere ``vector_norm``.
        """
        if self.flat.device.type == "cpu":
            return math.sqrt(float(torch.dot(self.flat, self.flat)))
        return float(torch.linalg.vector_norm(self.flat))

    def zero_(self) -> None:
        """Zero every gradient in place (one kernel); call instead of ``optimizer.zero_grad``."""
        self.flat.zero_()


class SeedFlatGrads(FlatGrads):
    """The gradients of S seeds' stacked parameters in one ``(S, P)`` buffer, seed-major.

    For a seed-vectorized group (``bench.loop.train_group``): each stacked parameter ``(S, *shape)``
    gets as ``.grad`` a strided view of the buffer whose seed-i slice is row i's segment, so row i
    holds seed i's gradients in exactly the layout of :class:`FlatGrads` of that seed's run alone.
    Per-seed norms are then the same one-BLAS-call ``sqrt(dot(g, g))`` as a run alone computes
    (bit-identical for identical gradients), and zeroing is one kernel. Same use as
    :class:`FlatGrads`: build with :meth:`for_params`, :meth:`adopt` after the first backward, then
    :meth:`norms` and :meth:`zero_` every step, :meth:`attached` before results leave.
    """

    def __init__(self, named_params: list[tuple[str, nn.Parameter]]) -> None:  # adopt(), attached(): FlatGrads'
        first = named_params[0][1]
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        seeds = first.shape[0]
        sizes = [p[0].numel() for p in self.params]
        total = sum(sizes)
        # rows padded to 64 bytes: every row starts aligned as a run alone's buffer does (a BLAS dot sums in an
        # order that can depend on the alignment of its input); the padding stays zero and is never read
        row = -(-total * first.element_size() // ROW_ALIGN_BYTES) * ROW_ALIGN_BYTES // first.element_size()
        self._buffer = torch.zeros(seeds, row, device=first.device, dtype=first.dtype)
        self.flat = self._buffer[:, :total]  # (S, P): seed i's gradients in row i
        self.views: list[torch.Tensor] = []
        offset = 0
        for p, size in zip(self.params, sizes):
            self.views.append(self.flat[:, offset : offset + size].view(p.shape))
            offset += size

    @staticmethod
    def for_params(named_params: list[tuple[str, nn.Parameter]]) -> SeedFlatGrads | None:
        """A buffer for these stacked parameters (leading seed dimension), or ``None`` when they do not fit one
        (several devices or dtypes, or a parameter that is not contiguous)."""
        if not named_params or len({(p.device, p.dtype) for _, p in named_params}) != 1:
            return None
        if any(p.is_sparse or not p.is_contiguous() or p.ndim < 1 for _, p in named_params):
            return None
        if len({p.shape[0] for _, p in named_params}) != 1:
            return None
        return SeedFlatGrads(named_params)

    def norms(self) -> list[float]:
        """Each seed's total gradient 2-norm, computed as :meth:`FlatGrads.norm` computes a run's."""
        if self.flat.device.type == "cpu":
            return [math.sqrt(float(torch.dot(row, row))) for row in self.flat]
        return torch.linalg.vector_norm(self.flat, dim=1).tolist()

    def zero_(self) -> None:
        """Zero every seed's gradients in place (one kernel)."""
        self._buffer.zero_()
