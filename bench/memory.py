"""Peak memory of a run: exact allocator peaks on CUDA, sampled live heap growth on CPU.

On CPU there is no allocator peak counter, so a daemon thread samples the bytes the process's
C heap has handed out and not taken back (glibc ``mallinfo2``: ``uordblks + hblkhd``, which
holds every CPU tensor's storage; ~0.5 µs a call) every ``interval_s``, and the run records the
peak growth over the level at :meth:`PeakMemory.rebase` — called by the loop once data and model
exist, so imports and datasets are not counted. Live bytes, unlike the resident set, do not
depend on what an earlier run in the same warm worker freed: memory glibc kept for reuse is
not live, so no ``gc.collect()`` or ``malloc_trim`` is needed before a run (a run leaves no
tensors in reference cycles; its garbage is freed by reference counting). Still an
approximation (sampling can miss a short spike); without glibc it falls back to resident-set
growth. On CUDA the number is exact (allocator peak).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

import torch

__all__ = ["PeakMemory", "cpu_bytes_in_use"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


_MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (*_MALLINFO2_FIELDS, "keepcost")]  # glibc >= 2.33, all size_t


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return 0


def _heap_reader() -> Callable[[], int]:
    """A function returning the live C-heap bytes (glibc ``mallinfo2``), else the resident set size."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return _rss_bytes
    fn.restype, fn.argtypes = _MallInfo2, []

    def live_bytes() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return live_bytes


cpu_bytes_in_use = _heap_reader()
cpu_bytes_in_use.__doc__ = "Bytes of this process's C heap in use now (mallinfo2), or its resident set without glibc."


class PeakMemory:
    """Context manager measuring peak memory growth (bytes) of the code inside it."""

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device, self.interval_s = device, interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = cpu_bytes_in_use()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, cpu_bytes_in_use() - self._start)

    def rebase(self) -> None:
        """Measure growth from now on (call after the data and the model are built; costs ~1 µs on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return
        self._start = cpu_bytes_in_use()
        self.peak_bytes = 0

    def read_peak(self) -> int:
        """Peak growth so far (bytes); callable while the context is open."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._start
        return max(self.peak_bytes, cpu_bytes_in_use() - self._start)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, cpu_bytes_in_use() - self._start)
