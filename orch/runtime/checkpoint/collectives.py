"""The few collectives checkpointing needs, so that all ranks agree and fail together.

Rank 0 decides what touches the shared file system and broadcasts the outcome; a local error on
any rank is gathered and raised on every rank as the same CheckpointError, so no rank waits
forever in a collective the others have left. Without an initialized process group these are
no-ops for the one process (``world_size == 1``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from orch.errors import Problem
from orch.runtime.checkpoint.manifest import CheckpointError

_T = TypeVar("_T")


class RankGroup:
    """This process's rank in the default process group, or the only rank when there is none."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size
        self.dist = dist.is_available() and dist.is_initialized()
        if self.dist and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(
                f"rank {rank} of {world_size} given, process group says "
                f"{dist.get_rank()} of {dist.get_world_size()}"
            )
        if not self.dist and world_size != 1:
            raise ValueError("world_size > 1 needs an initialized torch.distributed process group")

    def gather(self, obj: _T) -> list[_T]:
        if not self.dist:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def from_rank0(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on rank 0 and give every rank its result, or raise its CheckpointError.

        Any other exception keeps its traceback on rank 0; the other ranks raise RuntimeError
        rather than wait forever for a result that will not come.
        """
        result: tuple[str, Any] = ("", None)
        crash: BaseException | None = None
        if self.rank == 0:
            try:
                result = ("ok", fn())
            except CheckpointError as exc:
                result = ("error", exc.problem)
            except BaseException as exc:
                crash, result = exc, ("crash", f"{type(exc).__name__}: {exc}")
        if self.dist:
            box = [result]
            dist.broadcast_object_list(box, src=0)
            result = box[0]
        if crash is not None:
            raise crash
        if result[0] == "crash":
            raise RuntimeError(f"checkpointing failed on rank 0: {result[1]}")
        if result[0] == "error":
            p: Problem = result[1]
            raise CheckpointError(p.where, p.message, p.fix)
        return result[1]

    def errors(self, error: str | None) -> list[tuple[int, str]]:
        """Every rank's local error (``None`` where it has none), as ``(rank, error)`` pairs."""
        return [(r, e) for r, e in enumerate(self.gather(error)) if e]
