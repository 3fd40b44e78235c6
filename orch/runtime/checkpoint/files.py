"""Where a checkpoint's files live, and how they are written and removed durably.

Durability is what makes the manifest a commit record: it is written through a temp file, fsync
and an atomic rename, so readers see all of it or nothing, and it is removed first when a
checkpoint is deleted, so a half-deleted directory is never complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
STEP_NAME = re.compile(r"^step-(\d{8,})(?:$|\.superseded-)")
"""The name of a step directory, also one moved aside (``step-N.superseded-*``)."""


def superseded_path(path: Path) -> Path:
    """An unused name beside ``path`` to move it aside to: ``NAME.superseded-STAMP`` (local time
    to the second), then ``-2``, ``-3``... for later moves within the same second. A stamp alone
    was the same for two moves within a second (two quick restarts), and the second
    ``os.replace`` onto the first's non-empty directory failed and ended the worker."""
    base = f"{path.name}.superseded-{time.strftime('%Y%m%dT%H%M%S')}"
    candidate, n = path.with_name(base), 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{base}-{n}")
    return candidate


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def rng_file_name(rank: int) -> str:
    return f"rng-rank-{rank:05d}.pt"


def step_dirs(checkpoints: Path) -> Iterator[tuple[int, Path]]:
    """``(step, path)`` of every step directory under ``checkpoints``, complete or not."""
    if not checkpoints.is_dir():
        return
    for path in checkpoints.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            yield int(match.group(1)), path


def of_run(checkpoint: Path, run_dir: str | Path) -> bool:
    """Whether ``checkpoint`` is one of ``run_dir``'s own (in its ``checkpoints/``), not another
    run directory's taken with ``--resume PATH``: a run continued from another's has none of its
    own history before it."""
    return checkpoint.resolve().parent == (Path(run_dir) / CHECKPOINTS).resolve()


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not fsync directories; the rename is still atomic
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing (temp + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, manifest first, so a half-deleted one is never complete."""
    (path / MANIFEST).unlink(missing_ok=True)
    fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def files_of(path: Path) -> list[str]:
    """Relative names of every file in a checkpoint directory except the manifest (and temps)."""
    return sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.tmp")
    )
