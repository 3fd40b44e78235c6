"""Named NVMe scratch files that older orch versions' killed runs left behind.

Kept apart from :mod:`orch.offload.nvme` (torch, the models) because the launcher checks the
NVMe path's free space before any worker starts, and its start-up should not pay for imports it
does not use (DTensor and sympy: about half a second of every ``orch launch``)."""

from __future__ import annotations

import os
from pathlib import Path


def scratch_name(rank: int) -> str:
    """The name a scratch file gets where the file system refuses ``O_TMPFILE`` (it is unlinked
    at once), and older orch versions' name for it: this process's rank and id."""
    return f"orch-rank{rank}-{os.getpid()}.swap"


def stale_scratch_files(directory: Path, rank: int | str = "*") -> list[Path]:
    """Named scratch files under ``directory`` of ``rank`` (any by default) whose process is
    gone: a killed run's of an older orch version, whose files had names until the process
    ended (the workers remove them before they write; the launcher counts their bytes as
    free)."""
    stale = []
    for path in Path(directory).glob(f"orch-rank{rank}-*.swap"):
        pid = path.name.removesuffix(".swap").rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            stale.append(path)
    return stale


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
