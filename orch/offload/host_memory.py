"""Host memory for an offloaded run: large frees return to the system at once, and I/O buffers
sit on huge pages.

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

The NVMe tier's staging arena is backed by transparent huge pages (:func:`onto_huge_pages`):
O_DIRECT reads land in it by DMA (or, on a virtual disk, by the host's copy), and every 4 KiB
page costs a translation of its own. Measured on this 2-core VM's virtual disk, 1 GiB read in
64 MiB calls through DeepSpeed's async I/O op into a 256 MiB locked buffer: 1.48 GB/s on 4 KiB
pages, 2.71 GB/s on 2 MiB pages (medians of 4 rounds, 1.31-1.68 against 2.22-2.81).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import sys
from pathlib import Path

import torch

MMAP_THRESHOLD = 4 << 20
"""Host allocations of at least this many bytes get their own mapping, unmapped on free."""

_M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""

HUGE_PAGE = 2 << 20
"""A transparent huge page on x86-64 and (with 4 KiB base pages) arm64."""

THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")
HUGE_PAGES_FIX = f"set {THP_ENABLED} to madvise (as root: echo madvise > {THP_ENABLED})"

_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
"""``madvise`` advice numbers (linux/mman.h; Python 3.11's mmap module lacks the second)."""


def return_large_frees() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` for this process; False (and
    nothing changed) when ``MALLOC_MMAP_THRESHOLD_`` is set (the user's choice stands) or the
    C library has no ``mallopt`` (not glibc)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def onto_huge_pages(buffer: torch.Tensor) -> str | None:
    """Back the whole 2 MiB pages inside ``buffer`` (new: a byte of each is zeroed) with
    transparent huge pages, whether its pages are already there (a locked buffer: collapsed in
    place, Linux 6.1+) or not yet (an anonymous mapping: faulted in as huge pages). None when
    the kernel did, else why not. Best effort: the buffer works either way, with slower I/O
    into it."""
    base = buffer.data_ptr()
    start = -(-base // HUGE_PAGE) * HUGE_PAGE
    end = (base + buffer.numel() * buffer.element_size()) // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return None  # no whole huge page inside: nothing to gain
    if (refused := huge_pages_refused()) is not None:
        return refused + (f"; {HUGE_PAGES_FIX}" if sys.platform == "linux" else "")
    if (madvise := getattr(libc(), "madvise", None)) is None:
        return "this C library has no madvise"
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if madvise(start, end - start, _MADV_HUGEPAGE) != 0:
        return f"madvise(MADV_HUGEPAGE): {os.strerror(ctypes.get_errno())}"
    flat = buffer.view(-1).view(torch.uint8)
    flat[start - base:end - base:HUGE_PAGE].zero_()  # a first touch faults a whole huge page
    if madvise(start, end - start, _MADV_COLLAPSE) != 0:
        error = ctypes.get_errno()
        return (f"madvise(MADV_COLLAPSE) of {(end - start) >> 20} MiB: {os.strerror(error)}"
                + {errno.EINVAL: " (a kernel before Linux 6.1?)",
                   errno.EAGAIN: " (no free huge pages: memory fragmented)",
                   errno.ENOMEM: " (no free huge pages)"}.get(error, ""))
    return None


def huge_pages_refused() -> str | None:
    """Why this system gives no process transparent huge pages on request (fix:
    :data:`HUGE_PAGES_FIX` on Linux); None when it does."""
    if sys.platform != "linux":
        return f"{sys.platform} has no transparent huge pages"
    if (setting := huge_pages_setting()) not in ("always", "madvise"):
        return f"transparent huge pages are {setting!r} here"
    return None


def huge_pages_setting() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or why it
    is unknown."""
    try:
        modes = THP_ENABLED.read_text().split()
    except OSError:
        return "unknown (no /sys/kernel/mm/transparent_hugepage)"
    return next((mode.strip("[]") for mode in modes if mode.startswith("[")), " ".join(modes))


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library (for the calls Python does not wrap), or None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


__all__ = ["HUGE_PAGE", "HUGE_PAGES_FIX", "MMAP_THRESHOLD", "THP_ENABLED", "huge_pages_refused",
           "huge_pages_setting", "libc", "onto_huge_pages", "return_large_frees"]
