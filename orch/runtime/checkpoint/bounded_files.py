"""A DCP storage writer whose files hold at most a bounded number of bytes each.

torch's ``FileSystemWriter`` writes each rank's items into one file and keeps every tensor it
wrote to a file until the file is closed (torch 2.13 gathers them for its safetensors format,
whichever format is chosen). For a state that is read as it is written (an offloaded run's
NVMe homes, :class:`~orch.offload.checkpoint_homes.ReadingSavePlanner`) one file per rank would
bring back the whole state it never held at once. This writer starts a new file whenever the
next tensor would take the current one past ``file_bytes`` (a tensor larger than that gets a
file of its own), so the writer holds at most about one file's bytes; the checkpoint is an
ordinary DCP checkpoint with more files.
"""

from __future__ import annotations

import math
import queue
from concurrent.futures import Future
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult

FILE_BYTES = 256 << 20
"""The bound orch saves with: a few files per billion fp32 values, and far below the size of a
model offloaded to NVMe."""


def _item_bytes(item: WriteItem) -> int:
    """The bytes a tensor item writes (0 for a pickled value)."""
    if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
        return 0
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def _bounded_files(items: list[WriteItem], file_bytes: int) -> list[list[WriteItem]]:
    """``items`` in plan order, cut into files of at most ``file_bytes`` of tensors (pickled
    values go into the first)."""
    files: list[list[WriteItem]] = [[item for item in items if _item_bytes(item) == 0]]
    size = 0
    for item in items:
        if (nbytes := _item_bytes(item)) == 0:
            continue
        if size and size + nbytes > file_bytes:
            files.append([])
            size = 0
        files[-1].append(item)
        size += nbytes
    return [file for file in files if file]


class BoundedFilesWriter(FileSystemWriter):
    """``FileSystemWriter`` with files of at most ``file_bytes`` (module docstring)."""

    def __init__(self, path: str | Path, file_bytes: int | None = None) -> None:
        super().__init__(path)
        self.file_bytes = FILE_BYTES if file_bytes is None else file_bytes

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        files: queue.Queue = queue.Queue()
        for count, items in enumerate(_bounded_files(plan.items, self.file_bytes)):
            name = f"{plan.storage_data.prefix}{count}{DEFAULT_SUFFIX}"
            files.put((self.fs.concat_path(self.path, name), name, items))
        return self._write_data(planner, files)


__all__ = ["FILE_BYTES", "BoundedFilesWriter"]
