"""Host memory an offloaded run gives back: large frees return to the system at once.

An offloaded step frees and re-allocates multi-megabyte host buffers all the time (device copies
of a unit's parameters on a CPU device, gradients on their way home, saved activations, the
NVMe tier's pageable write buffers). glibc serves an allocation from its own mapping, returned
to the system on free, only from ``M_MMAP_THRESHOLD`` bytes up; the threshold starts at 128 KiB
but rises to the size of every such block freed, up to 32 MiB, and from then on those buffers
come from the heap, whose freed pieces stay in the process between steps. That retention is
what kept an offloaded run's peak RSS near a plain loop's although it holds far less.

Fixing the threshold at 4 MiB (``mallopt``, which also stops the rise) gives those buffers back;
smaller ones stay on the heap, where re-use is cheap. Measured on the 128M-parameter model of
``benchmarks/offload_cpu.py`` with parameters and optimizer states on NVMe, 2 cores: peak RSS
3.8 GiB with glibc's default, 3.1 GiB at 4 MiB at the same step time (7.3-8.5 s against
7.8-8.2 s), 2.3 GiB at 2 MiB but about 35% slower steps (every hidden-state tensor of 3 MiB
then faults its pages in again each step), and no change at 8 MiB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 4 << 20
"""Host allocations of at least this many bytes get their own mapping, unmapped on free."""

_M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""


def return_large_frees() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process; False (and
    nothing changed) when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice stands) or the
    C library has no ``mallopt`` (not glibc)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


__all__ = ["MMAP_THRESHOLD", "return_large_frees"]
