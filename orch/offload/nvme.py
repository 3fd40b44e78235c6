"""The NVMe tier: named groups of tensors kept in one file while they are not in use.

A group (a unit's parameters, a unit's optimizer states) gets a region of the file the first
time it is written: its tensors packed one after another (each at a 64-byte boundary, so views
of any dtype line up), the region a multiple of the I/O alignment. Reading a group fills a
staging buffer from its region and hands back views of the buffer shaped like the tensors;
writing writes that buffer back when the tensors are its views (the steady state: read,
stepped in place, written), else copies the tensors into a pageable buffer of its own (the first
spill, fresh optimizer states), so a write never waits for the pool it gives buffers back to.
Staging buffers are the :class:`~orch.offload.blockio.BlockIO`'s own (page-locked when
DeepSpeed's op is there), come from a pool bounded by ``pinned_budget``, and are reused by
size: a step touches the same few region sizes over and over.

Between uses the owners keep *placeholders*: tensors with the right shape and dtype whose
storage holds no bytes, so a parameter's ``data`` or an optimizer state entry costs no memory
while its bytes are on disk.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from orch.offload.blockio import BlockIO, aligned

TENSOR_ALIGN = 64


def scratch_file(directory: Path, rank: int) -> Path:
    """This process's scratch file under ``directory`` (``offload.nvme_path``), after removing
    the ones that ``rank``'s earlier processes left there when they were killed (a SIGKILL or
    an OOM kill skips the cleanup at the end of a run; a restarted run would otherwise leave
    one whole tier's bytes behind per failure). A file counts as left behind when the process
    id in its name is gone."""
    for stale in Path(directory).glob(f"orch-rank{rank}-*.swap"):
        pid = stale.name.removeprefix(f"orch-rank{rank}-").removesuffix(".swap")
        if pid.isdigit() and not _alive(int(pid)):
            stale.unlink(missing_ok=True)
            print(f"orch: removed {stale}, the NVMe scratch file of a killed run", flush=True)
    return Path(directory) / f"orch-rank{rank}-{os.getpid()}.swap"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def placeholder(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``tensor`` that holds no bytes."""
    empty = torch.empty(tensor.shape, dtype=tensor.dtype)
    empty.untyped_storage().resize_(0)
    return empty


@dataclass(frozen=True)
class _Region:
    offset: int
    nbytes: int
    """Aligned size on disk, and of the staging buffer."""
    layout: tuple[tuple[int, torch.Size, torch.dtype], ...]
    """Per tensor: byte offset in the region, shape, dtype."""

    @staticmethod
    def describe(tensors: list[torch.Tensor]) -> tuple[tuple[int, torch.Size, torch.dtype], ...]:
        layout, at = [], 0
        for t in tensors:
            layout.append((at, t.shape, t.dtype))
            at += -(-t.numel() * t.element_size() // TENSOR_ALIGN) * TENSOR_ALIGN
        return tuple(layout)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for at, shape, dtype in self.layout:
            nbytes = shape.numel() * dtype.itemsize
            out.append(buffer[at:at + nbytes].view(dtype).view(shape))
        return out


class PinnedPool:
    """Staging buffers of the tier's I/O, at most ``limit`` bytes of them at once; a request
    over the limit drops idle buffers of other sizes, then waits for one to come back."""

    def __init__(self, io: BlockIO, limit: int) -> None:
        self.io, self.limit = io, limit
        self._idle: dict[int, list[torch.Tensor]] = {}
        self._allocated = 0
        self._cond = threading.Condition()
        self.peak = 0

    def take(self, nbytes: int) -> torch.Tensor:
        if nbytes > self.limit:
            raise ValueError(f"a staging buffer of {nbytes:,} bytes is over offload.pinned_budget "
                             f"({self.limit:,}); raise offload.pinned_budget")
        with self._cond:
            while True:
                if self._idle.get(nbytes):
                    return self._idle[nbytes].pop()
                for size, idle in self._idle.items():
                    while idle and self._allocated + nbytes > self.limit:
                        self.io.free(idle.pop())
                        self._allocated -= size
                if self._allocated + nbytes <= self.limit:
                    self._allocated += nbytes
                    self.peak = max(self.peak, self._allocated)
                    return self.io.buffer(nbytes)
                self._cond.wait()

    def give(self, buffer: torch.Tensor) -> None:
        with self._cond:
            self._idle.setdefault(buffer.numel(), []).append(buffer)
            self._cond.notify_all()


class NvmeTier:
    """Groups of tensors, by key, in the file ``path`` (see the module docstring)."""

    def __init__(self, path: Path, io: BlockIO, pinned_limit: int) -> None:
        self.path, self.io = path, io
        self.pool = PinnedPool(io, pinned_limit)
        self._regions: dict[object, _Region] = {}
        self._reading: dict[object, tuple[torch.Tensor, bool]] = {}
        """Buffers of reads not yet written back or done, and whether they are the pool's."""
        self._end = 0
        self._lock = threading.Lock()
        self.bytes_read = self.bytes_written = 0

    def has(self, key: object) -> bool:
        return key in self._regions

    def read(self, key: object, staged: bool = True) -> list[torch.Tensor]:
        """The group's tensors, as views of a buffer held until :meth:`write` or :meth:`done`
        for the same key: a staging buffer of the pool, or with ``staged=False`` a pageable
        one of its own (for reads that hold many groups at once, as a checkpoint save does,
        which the pinned budget is not sized for)."""
        region = self._regions[key]
        buffer = self.pool.take(region.nbytes) if staged else self.io.buffer(region.nbytes, False)
        self.io.read(buffer, region.offset)
        self._reading[key] = (buffer, staged)
        self.bytes_read += region.nbytes
        return region.views(buffer)

    def done(self, key: object) -> None:
        """Give back the buffer of a read whose tensors did not change."""
        buffer, staged = self._reading.pop(key)
        if staged:
            self.pool.give(buffer)

    def write(self, key: object, tensors: list[torch.Tensor]) -> None:
        """Store ``tensors`` as the group ``key`` (a new region the first time, or when their
        shapes changed and no longer fit the old one) and give back the group's buffer (the
        staging buffer of its read, if ``tensors`` are that read's views: the steady state, no
        copy)."""
        region = self._region_for(key, tensors)
        held = self._reading.pop(key, None)
        if held is not None and held[0].numel() == region.nbytes:
            buffer, staged = held
        else:  # nothing read (new tensors: the first spill, fresh optimizer states) or a new
            # layout: a pageable buffer of its own, so a write never waits for the pool (it is
            # what gives the pool's buffers back)
            if held is not None and held[1]:
                self.pool.give(held[0])
            buffer, staged = self.io.buffer(region.nbytes, False), False
        for view, tensor in zip(region.views(buffer), tensors, strict=True):
            if view.data_ptr() != tensor.data_ptr():
                view.copy_(tensor)
        self.io.write(buffer, region.offset)
        if staged:
            self.pool.give(buffer)
        self.bytes_written += region.nbytes

    def _region_for(self, key: object, tensors: list[torch.Tensor]) -> _Region:
        layout = _Region.describe(tensors)
        region = self._regions.get(key)
        if region is not None and region.layout == layout:
            return region
        end = layout[-1][0] + tensors[-1].numel() * tensors[-1].element_size() if layout else 0
        nbytes = aligned(max(end, 1))
        if region is not None and nbytes <= region.nbytes:  # a new layout that fits: same place
            region = _Region(region.offset, nbytes, layout)
        else:
            with self._lock:
                region = _Region(self._end, nbytes, layout)
                self._end += nbytes
        self._regions[key] = region
        return region

    @property
    def file_bytes(self) -> int:
        return self._end

    def close(self) -> None:
        """Close the I/O and delete the file (it is scratch: checkpoints hold the state)."""
        self.io.close()
        Path(self.path).unlink(missing_ok=True)


__all__ = ["NvmeTier", "PinnedPool", "placeholder"]
