"""Checkpoints seen from outside a run: find them, describe them, read tensors out of them.

What ``orch ckpt inspect``, ``verify`` and ``export`` stand on. Nothing here needs a process
group: DCP reads a checkpoint written by any number of ranks in one process, and every read goes
through ``safe_load`` (the index by the restricted unpickler, values by the weights-only loader).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from orch.runtime.checkpoint.files import CHECKPOINTS, MANIFEST, STEP_NAME, step_dirs
from orch.runtime.checkpoint.manifest import CheckpointError, read_manifest


def checkpoints_in(directory: str | Path) -> list[Path]:
    """The step directories ``directory`` stands for, oldest first: itself when it is one
    checkpoint, else those of a run directory or of its ``checkpoints/`` folder (complete or
    not). CheckpointError when it is none of these.

    A directory is one checkpoint when it has a manifest, or is named as a step directory
    (``step-NNNNNNNN``, an unfinished save) and holds no ``checkpoints/``: a run directory
    may be named ``step-lr-sweep``, or even ``step-00000001``."""
    path = Path(directory)
    if not path.exists():
        raise CheckpointError(path, "does not exist", "give a run directory or a checkpoint")
    if not path.is_dir():
        raise CheckpointError(path, "is not a directory", "give a run directory or a checkpoint")
    if (path / MANIFEST).exists():
        return [path]
    if STEP_NAME.match(path.name) and not (path / CHECKPOINTS).is_dir():
        return [path]
    for folder in (path / CHECKPOINTS, path):
        found = [p for _, p in sorted(step_dirs(folder))]
        if found:
            return found
    raise CheckpointError(path, "holds no checkpoints (no step-* directories, no manifest.json)",
                          f"give a run directory (with {CHECKPOINTS}/) or one step-* directory")


REMOVED = "removed while checking (checkpoint.keep_last of a running run)"
"""What ``inspect`` and ``verify`` say of a checkpoint deleted between listing and checking it."""


def removed_meanwhile(path: Path, had_manifest: bool = True) -> bool:
    """Whether checkpoint ``path``, listed a moment ago (with its manifest when
    ``had_manifest``), has been deleted since: ``files.remove_checkpoint`` takes the manifest
    first, so a directory gone, or one that had a manifest and has none now, is a checkpoint
    being deleted (the retention of a run still saving there), not a damaged one; checking
    it fails in ways that would otherwise read as damage (files missing, an index unreadable)."""
    return not path.exists() or (had_manifest and not (path / MANIFEST).exists())


def newest_complete(directory: str | Path) -> Path:
    """The newest checkpoint with a manifest among ``checkpoints_in(directory)``."""
    return newest_complete_and_newer(directory)[0]


def newest_complete_and_newer(directory: str | Path) -> tuple[Path, list[Path]]:
    """``newest_complete(directory)``, and the newer step directories passed over for it (none
    has a manifest), from one listing: a user who asked for a run's newest checkpoint is told
    when it is not the newest step (an export of step 2 beside a step 4 that lost its manifest
    looked like an export of step 4)."""
    listed = checkpoints_in(directory)
    complete = [i for i, p in enumerate(listed) if (p / MANIFEST).exists()]
    if not complete:
        raise CheckpointError(directory, "has no complete checkpoint (none has its manifest)",
                              "give a checkpoint whose save finished")
    return listed[complete[-1]], listed[complete[-1] + 1:]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * getattr(torch, self.dtype).itemsize


@dataclass(frozen=True)
class Contents:
    """What a checkpoint's DCP index says it holds: tensors (full shapes) and other values."""

    tensors: list[TensorInfo]
    values: list[str] = field(default_factory=list)


def contents(path: str | Path) -> Contents:
    """The tensors and plain values in checkpoint ``path``, read from its index safely."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from orch.runtime.checkpoint.safe_load import read_metadata

    tensors, values = [], []
    for name, entry in sorted(read_metadata(path).state_dict_metadata.items()):
        if isinstance(entry, TensorStorageMetadata):
            dtype = str(entry.properties.dtype).removeprefix("torch.")
            tensors.append(TensorInfo(name, tuple(entry.size), dtype))
        else:
            values.append(name)
    return Contents(tensors, values)


def read_tensors(path: str | Path, infos: Iterable[TensorInfo]) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors ``infos`` from checkpoint ``path``, on the CPU, by DCP's
    resharding load through ``safe_load``; names as in the index (``model.layers.0...``)."""
    import torch.distributed.checkpoint as dcp

    from orch.runtime.checkpoint.safe_load import SafeLoadPlanner, SafeReader

    out = {info.name: torch.empty(info.shape, dtype=getattr(torch, info.dtype))
           for info in infos}
    if out:
        with warnings.catch_warnings():  # one process on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(out, storage_reader=SafeReader(path), planner=SafeLoadPlanner(),
                     no_dist=True)
    return out


def _counted(tensors: list[TensorInfo], tied: object) -> list[TensorInfo]:
    """``tensors`` as inspect counts them: a tied model's head (``output.weight``, saved beside
    the embedding it is, and likewise any state of it) left out, so the count is the model's
    parameters, not one more (the export writes it once, as transformers does)."""
    if tied is not True:
        return tensors
    names = {t.name for t in tensors}
    return [t for t in tensors if not (_HEAD.search(t.name) and _HEAD.sub(
        r"\1tok_embeddings.weight\2", t.name) in names)]


_HEAD = re.compile(r"(^|\.)output\.weight(\.|$)")
"""The head's name inside a tensor's (``model.output.weight``, ``optim.state.output.weight.x``)."""


def describe(path: Path, with_tensors: bool = False) -> dict[str, Any]:
    """``orch ckpt inspect``'s record of one checkpoint (JSON-ready); an unfinished save is
    ``complete: false``, an unreadable manifest or index an ``error`` (with its ``fix``), and
    one deleted since it was listed ``removed: true`` (``removed_meanwhile``), not an error."""
    had_manifest = (path / MANIFEST).exists()
    if removed_meanwhile(path, had_manifest=False):
        return {"path": str(path), "complete": False, "removed": True}
    if not had_manifest:
        return {"path": str(path), "complete": False}
    try:
        manifest = read_manifest(path)
        held = contents(path)
    except CheckpointError as exc:
        if removed_meanwhile(path):
            return {"path": str(path), "complete": False, "removed": True}
        where, message, fix = exc.problem.where, exc.problem.message, exc.problem.fix
        return {"path": str(path), "complete": True, "error": f"{where}: {message}", "fix": fix}
    groups: dict[str, dict[str, int]] = {}
    model = manifest.config.get("model")
    tied = model.get("tie_embeddings") if isinstance(model, dict) else None
    for info in _counted(held.tensors, tied):
        group = groups.setdefault(info.name.split(".", 1)[0], {"tensors": 0, "bytes": 0,
                                                               "elements": 0})
        group["tensors"] += 1
        group["bytes"] += info.nbytes
        group["elements"] += info.numel
    out: dict[str, Any] = {
        "path": str(path),
        "complete": True,
        "step": manifest.step,
        "saved_at": manifest.to_json()["saved_at"],
        "save_seconds": round(manifest.save_seconds, 3),
        "world_size": manifest.world_size,
        "fingerprint": manifest.fingerprint,
        "plan": manifest.plan,
        "config": manifest.config,
        "data": manifest.data,
        "files": {name: entry.size for name, entry in sorted(manifest.files.items())},
        "bytes": sum(entry.size for entry in manifest.files.values()),
        "groups": groups,
        "values": len(held.values),
    }
    if with_tensors:
        out["tensors"] = [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype}
                          for t in held.tensors]
    return out


__all__ = ["REMOVED", "Contents", "TensorInfo", "checkpoints_in", "contents", "describe",
           "newest_complete", "newest_complete_and_newer", "read_tensors", "removed_meanwhile"]
