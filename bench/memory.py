"""Peak memory of a run: exact allocator peaks on CUDA, sampled resident-set growth on CPU.

On CPU there is no allocator counter, so a daemon thread samples ``/proc/self/statm`` every
``interval_s`` and the run records the peak growth over the RSS at :meth:`PeakMemory.rebase`
— called by the loop once data and model exist, so imports and datasets are not counted.
``rebase`` first returns the allocator's free pages to the OS (glibc ``malloc_trim``), so a
worker that already trained a run does not serve the next run from memory it kept and
under-report. Still an approximation (sampling can miss a short spike); on CUDA the number
is exact (allocator peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading

import torch

__all__ = ["PeakMemory"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> None:
    """Give free heap pages back to the OS (glibc only; a no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:
        return 0


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
        self._start = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._start)

    def rebase(self) -> None:
        """Measure growth from now on (call after the data and the model are built)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()
        _malloc_trim()
        self._start = _rss_bytes()
        self.peak_bytes = 0

    def read_peak(self) -> int:
        """Peak growth so far (bytes); callable while the context is open."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self._start
        return max(self.peak_bytes, _rss_bytes() - self._start)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes() - self._start)
