"""Reading a checkpoint never runs code from it.

A DCP checkpoint holds three kinds of pickled data, and torch reads two of them with plain
``pickle`` (torch 2.13): the ``.metadata`` index (``FileSystemReader.read_metadata``) and the
non-tensor values such as optimizer hyperparameters (``DefaultLoadPlanner.load_bytes``,
``weights_only=False``). A planted pickle in either runs arbitrary code on every rank at resume.
Here the index is read by an unpickler that resolves only the classes DCP's index is made of
(and dtypes), and every non-tensor value must pass torch's weights-only loader before DCP reads
it. Tensors are read by DCP with ``weights_only=True`` already, RNG states by ``rng``'s
weights-only load, the manifest is JSON and configs go through ``yaml.safe_load``.

``SafeReader`` and ``SafeLoadPlanner`` are what every orch load hands to ``dcp.load``;
``read_metadata`` is the checked index on its own (``verify``, ``orch ckpt inspect``).
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.serialization import _get_layout

from orch.runtime.checkpoint.manifest import INDEX, CheckpointError

_ALLOWED: dict[tuple[str, str], Any] = {
    (cls.__module__, cls.__qualname__): cls
    for cls in (
        dcp_metadata.Metadata,
        dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta,
        dcp_metadata.TensorProperties,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata._MEM_FORMAT_ENCODING,
        _StorageInfo,
        torch.Size,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
    )
}
_ALLOWED[("torch.serialization", "_get_layout")] = _get_layout  # a name -> torch.layout lookup
_ALLOWED[("torch", "Size")] = torch.Size


class _IndexUnpickler(pickle.Unpickler):
    """Resolves only the globals of DCP's index; anything else (a function to call, a class
    with side effects) is refused before it is looked up, let alone called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name}, which a checkpoint index does "
                                     "not hold")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("holds a persistent reference, which an index does not")


def unsafe(where: str | Path, why: str) -> CheckpointError:
    """The refusal of something in a checkpoint that is not the data it should be."""
    return CheckpointError(where, f"{why}; it was not loaded, nothing in it ran",
                           "do not resume from a checkpoint you did not write; resume from "
                           "another one (checkpoint.resume=auto|PATH)")


def refusal(exc: Exception) -> str:
    """The line of a weights-only load error that says what was refused (torch's message
    opens with several lines of advice to load it unsafely)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line for line in lines if "WeightsUnpickler error:" in line]
    text = said[0].split("WeightsUnpickler error:", 1)[1] if said else (lines or [""])[0]
    return text.split(" was not an allowed global")[0].strip()


def unwrap(exc: BaseException) -> BaseException:
    """The CheckpointError inside DCP's gathered ``CheckpointException``, if one rank raised
    it (``SafeLoadPlanner``'s refusal), so every rank reports it rather than a traceback list."""
    for wrapped in getattr(exc, "failures", {}).values():
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(inner, CheckpointError):
            return inner
    return exc


def read_metadata(path: str | Path) -> Metadata:
    """The DCP index of checkpoint directory ``path``, read without running code from it."""
    file = Path(path) / INDEX
    try:
        with open(file, "rb") as f:
            metadata = _IndexUnpickler(f).load()
    except OSError as exc:
        raise CheckpointError(file, f"cannot be read ({exc.strerror})",
                              "resume from another checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - every way a hostile or broken pickle fails
        if isinstance(exc, EOFError) or "truncated" in str(exc):  # cut short, not hostile
            raise CheckpointError(file, "is truncated: the file ends before the index does",
                                  "resume from another checkpoint") from None
        raise unsafe(file, f"is not a checkpoint index: {exc}") from None
    if not isinstance(metadata, Metadata):
        raise unsafe(file, f"holds a {type(metadata).__name__}, not a checkpoint index")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with the index read by ``read_metadata``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None:  # per-rank indexes: a save mode orch does not use
            raise CheckpointError(self.path, f"has a per-rank index (rank {rank})",
                                  "save it with orch's checkpointing")
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that a non-tensor value must load with torch's
    weights-only loader (plain data, tensors) before DCP reads it."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the weights-only loader's refusal
            raise unsafe(f"checkpoint value {read_item.dest_index.fqn}",
                         f"is not plain data ({refusal(exc)})") from None
        value.seek(0)
        super().load_bytes(read_item, value)


__all__ = ["refusal", "unwrap", "SafeLoadPlanner", "SafeReader", "read_metadata", "unsafe"]
