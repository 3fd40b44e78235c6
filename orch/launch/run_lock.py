"""One ``orch launch`` per run directory and node at a time.

Two launches writing one run directory (the same config run twice by mistake, a job requeued
while the first still runs) each prune and supersede the other's checkpoints and interleave
their metrics. Each node's launcher holds an advisory lock on a file of its own in the run
directory for as long as it runs: a second launch of the same node finds it taken and stops
before any process starts. Per node (host name and node rank; with a cluster description the
node's name, which fixes its ranks), not per directory, because every node of one job launches
into the same shared directory at once. ``flock`` locks are advisory
and may not span hosts on a network file system, so two jobs on different hosts are not caught.
"""

from __future__ import annotations

import fcntl
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orch.errors import PlanError, Problem


@contextmanager
def run_dir_lock(run_dir: Path, node: str) -> Iterator[None]:
    """Hold this node's launch lock on ``run_dir`` inside the block; PlanError if another
    launch holds it, naming its process."""
    path = run_dir / f".orch-launch-{re.sub(r'[^A-Za-z0-9_.-]', '_', node)}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise PlanError([Problem("run.dir", f"{str(run_dir)!r} is in use by another orch launch "
                                 f"on this node ({holder})",
                                 "wait for that run to end, or give this one its own run.dir")],
                        title="cannot launch") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, empty of meaning


__all__ = ["run_dir_lock"]
