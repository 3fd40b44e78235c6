"""One ``orch launch`` per run directory and node at a time.

Two launches writing one run directory (the same config run twice by mistake, a job requeued
while the first still runs) each prune and supersede the other's checkpoints and interleave
their metrics. Each node's launcher holds an advisory lock on a file of its own in the run
directory for as long as it runs: a second launch of the same node finds it taken and stops
before any process starts. Per node (host name and node rank; with a cluster description the
node's name, which fixes its ranks), not per directory, because every node of one job launches
into the same shared directory at once. ``flock`` locks are advisory
and may not span hosts on a network file system, so two jobs on different hosts are not caught.
Where the file system has no ``flock`` at all, the launch warns and goes on unlocked; a lock
file that cannot be opened stops it with the path and the fix (both were tracebacks).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orch.errors import PlanError, Problem, warn_once

UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP}
"""flock's errors where the file system cannot lock (some network and FUSE file systems): the
launch goes on unlocked, with a warning, rather than refuse every run there."""


def _file_system(path: Path, mounts: Path = Path("/proc/self/mounts")) -> str | None:
    """The type of the file system ``path`` is on (the longest mount point above it)."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    resolved = str(path.resolve())
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and (
                best is None or len(point) > best[0]):
            best = (len(point), parts[2])
    return best[1] if best else None


@contextmanager
def run_dir_lock(run_dir: Path, node: str) -> Iterator[None]:
    """Hold this node's launch lock on ``run_dir`` inside the block; PlanError if another
    launch holds it, naming its process."""
    path = run_dir / f".orch-launch-{re.sub(r'[^A-Za-z0-9_.-]', '_', node)}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a directory in its place, no permission
        raise PlanError([Problem("run.dir", f"cannot open the launch lock file {str(path)!r}: "
                                 f"{exc.strerror or exc}",
                                 f"remove what is at {path} (orch makes the file), or fix the "
                                 "permissions of the run directory")],
                        title="cannot launch") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise PlanError([Problem("run.dir", f"{str(run_dir)!r} is in use by another orch launch "
                                 f"on this node ({holder})",
                                 "wait for that run to end, or give this one its own run.dir; "
                                 "for another node of the same job on this machine (a c10d "
                                 "rendezvous has every node at --node-rank 0), give each "
                                 "launcher its own ORCH_NODE=NAME (or --node-name NAME under a "
                                 "cluster description)")],
                        title="cannot launch") from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in UNSUPPORTED:
            raise PlanError([Problem("run.dir", f"cannot lock {str(path)!r}: "
                                     f"{exc.strerror or exc}",
                                     "fix the run directory's file system or permissions, or "
                                     "give this run another run.dir")],
                            title="cannot launch") from None
        kind = _file_system(run_dir)
        warn_once(f"the run directory {run_dir} cannot be locked ({kind or 'its file system'} "
                  f"does not support flock: {exc.strerror}): a second launch into it on this "
                  "node would not be stopped")
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, empty of meaning


__all__ = ["run_dir_lock"]
