"""glibc's mmap threshold, fixed for offloaded runs (orch.offload.host_memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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
