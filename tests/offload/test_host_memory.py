"""Host memory of offloaded runs (orch.offload.host_memory): glibc's mmap threshold, fixed; the
NVMe tier's staging buffers on transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from orch.offload import blockio
from orch.offload.host_memory import (
    HUGE_PAGE,
    HUGE_PAGES_FIX,
    huge_pages_refused,
    huge_pages_setting,
    onto_huge_pages,
)

PROBE = """
import ctypes, torch
from orch.offload.host_memory import return_large_frees

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
changed = return_large_frees()
big = torch.ones(8 << 20, dtype=torch.uint8)
del big  # by glibc's default this free raises the threshold to 8 MiB
mapped = libc.mallinfo2().hblkhd
block = torch.ones(6 << 20, dtype=torch.uint8)
print(changed, (libc.mallinfo2().hblkhd - mapped) >> 20)
"""


def _probe(env: dict) -> tuple[bool, int]:
    """Whether the threshold was set, and the MiB of a 6 MiB tensor glibc mapped on its own
    (given back to the system when freed) rather than carved from the heap."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    changed, mapped_mib = out.stdout.split()
    return changed == "True", int(mapped_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_blocks_of_the_threshold_and_more_get_mappings_of_their_own():
    assert _probe({}) == (True, 6)
    # a threshold the user set stands: 32 MiB, glibc's largest, keeps the block on the heap
    assert _probe({"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}) == (False, 0)


def _huge_bytes_in(buffer: torch.Tensor) -> int:
    """Bytes on transparent huge pages in this process's mappings that overlap ``buffer`` (the
    advice splits a mapping where a buffer's whole huge pages begin and end)."""
    low_end, high_end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and ":" not in first:
            low, high = (int(x, 16) for x in first.split("-"))
            inside = low < high_end and low_end < high
        elif inside and first == "AnonHugePages:":
            total += int(line.split()[1]) * 1024
    return total


needs_huge_pages = pytest.mark.skipif(huge_pages_refused() is not None,
                                      reason=str(huge_pages_refused()))


@needs_huge_pages
@pytest.mark.parametrize("kind", [pytest.param("async", marks=pytest.mark.nvme), "direct"])
def test_staging_buffers_sit_on_huge_pages_and_pageable_ones_do_not(tmp_path, kind, monkeypatch):
    reasons: list[str | None] = []  # why not, per buffer (the log says it once per process)
    monkeypatch.setattr(blockio, "onto_huge_pages",
                        lambda buffer: reasons.append(onto_huge_pages(buffer)) or reasons[-1])
    if kind == "async":
        try:
            io = blockio.AsyncIO(tmp_path / "f", block_size=1 << 20, queue_depth=4, threads=1)
        except RuntimeError as exc:
            pytest.skip(str(exc))
    else:
        io = blockio.DirectIO(tmp_path / "f", block_size=1 << 20, threads=1)
    staging = io.buffer(8 * HUGE_PAGE)  # locked: the arena's kind
    if reasons[-1] is not None and "no free huge pages" in reasons[-1]:
        pytest.skip(f"the kernel has no free huge pages now: {reasons[-1]}")
    whole = (8 if staging.data_ptr() % HUGE_PAGE == 0 else 7) * HUGE_PAGE
    assert _huge_bytes_in(staging) >= whole
    pageable = io.buffer(8 * HUGE_PAGE, locked=False)
    pageable.fill_(1)
    if kind == "direct" and huge_pages_setting() == "madvise":  # only where advised; a mapping
        assert _huge_bytes_in(pageable) == 0  # of its own (the async path's is torch's)
    io.free(staging)
    io.close()


def test_a_buffer_without_a_whole_huge_page_inside_is_left_as_it_is():
    small = torch.arange(HUGE_PAGE // 8, dtype=torch.int64)
    assert onto_huge_pages(small) is None and torch.equal(small, torch.arange(HUGE_PAGE // 8))


def test_staging_buffers_the_kernel_keeps_on_small_pages_are_said_once_with_why(monkeypatch,
                                                                                 capsys):
    monkeypatch.setattr(blockio, "onto_huge_pages", lambda buffer: "the reason")
    monkeypatch.setattr(blockio, "_said_small_pages", False)
    for _ in range(2):
        blockio._on_huge_pages(torch.empty(16, dtype=torch.uint8))
    err = capsys.readouterr().err
    assert err.count("NVMe staging buffers stay on 4 KiB pages (the reason)") == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages")
def test_a_kernel_without_huge_pages_is_named_with_the_fix(monkeypatch):
    from orch.offload import host_memory

    monkeypatch.setattr(host_memory, "huge_pages_setting", lambda: "never")
    why = onto_huge_pages(torch.empty(4 * HUGE_PAGE, dtype=torch.uint8))
    assert why == f"transparent huge pages are 'never' here; {HUGE_PAGES_FIX}"
    assert "set /sys/kernel/mm/transparent_hugepage/enabled to madvise" in why
