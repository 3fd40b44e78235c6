"""glibc's mmap threshold, fixed for offloaded runs (orch.offload.host_memory)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, torch
from orch.offload.host_memory import return_large_frees
changed = return_large_frees()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
big = torch.ones(8 << 20, dtype=torch.uint8)  # glibc's default: its free raises the threshold
del big
keep = []
for _ in range(64):  # 6 MiB blocks with small long-lived ones between them: a fragmented heap
    keep.append((torch.ones(6 << 20, dtype=torch.uint8), torch.ones(64, dtype=torch.uint8)))
before = rss()
keep = [small for _, small in keep]
print(changed, (before - rss()) >> 20)
"""


def _probe(env: dict) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    changed, freed_mib = out.stdout.split()
    return changed == "True", int(freed_mib)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_of_the_threshold_and_more_leave_the_process():
    changed, freed = _probe({})
    assert changed and freed >= 350  # 64 x 6 MiB given back
    unchanged, kept = _probe({"MALLOC_MMAP_THRESHOLD_": str(64 << 20)})  # the user's stands
    assert not unchanged and kept < 50
