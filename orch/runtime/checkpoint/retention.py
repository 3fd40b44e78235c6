"""Which step directories a run directory keeps, before and after a save (rank 0 only).

Nothing complete of another history is ever deleted silently: a complete checkpoint at or after
the step being saved, not written by this manager, is renamed aside. Retention deletes only this
config's complete checkpoints beyond ``keep_last``/``keep_every`` and unfinished directories.
"""

from __future__ import annotations

import os
from pathlib import Path

from orch.errors import warn_once
from orch.runtime.checkpoint.files import (
    MANIFEST,
    fsync_dir,
    remove_checkpoint,
    step_dirs,
    superseded_path,
)


def clear_way(checkpoints: Path, step: int, path: Path, written: set[int]) -> None:
    """Make ``path`` a fresh, empty directory for saving ``step``.

    An unfinished directory of the same step is deleted. A complete one of this step or a later
    one, not in ``written``, belongs to an abandoned history (a restart from an older checkpoint
    or with resume=none); it is renamed aside, not deleted, so that ``latest`` can never pick a
    checkpoint from the abandoned history.
    """
    for other_step, other in sorted(step_dirs(checkpoints)):
        if other_step < step or other_step in written:
            continue
        if (other / MANIFEST).exists():
            aside = superseded_path(other)
            warn_once(f"moving {other} aside to {aside.name}: it is from an earlier history of "
                      f"this run, saving step {step} now")
            os.replace(other, aside)
        elif other_step == step:
            remove_checkpoint(other)
    path.mkdir(parents=True, exist_ok=False)
    fsync_dir(checkpoints)


def retain(checkpoints: Path, step: int, mine: list[int], keep_last: int, keep_every: int) -> None:
    """After saving ``step``: of ``mine`` (this config's complete steps, oldest first) keep the
    newest ``keep_last`` (0 = all) and every step divisible by ``keep_every``; drop unfinished
    directories of earlier steps."""
    keep = {step} | set(mine[-keep_last:] if keep_last > 0 else mine)
    keep |= {s for s in mine if keep_every > 0 and s % keep_every == 0}
    for other_step, other in sorted(step_dirs(checkpoints)):
        complete = (other / MANIFEST).exists()
        if (complete and other_step in mine and other_step not in keep) or (
            not complete and other_step < step
        ):
            remove_checkpoint(other)
