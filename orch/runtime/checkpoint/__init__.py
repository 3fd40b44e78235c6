"""Checkpoints that are complete or absent.

A checkpoint is one directory, ``RUN_DIR/checkpoints/step-00000010/``, holding:

- the sharded model and optimizer state written by ``torch.distributed.checkpoint`` (DCP):
  ``.metadata`` and one ``__<rank>_<n>.distcp`` file per writing rank, so any world size and plan
  can load it back (DCP reshards on load);
- ``rng-rank-00000.pt`` per rank: that rank's python, numpy, torch CPU (and CUDA) RNG states;
- ``manifest.json``, written last by rank 0 through write-to-temp, fsync and an atomic rename.
  It records the step, the config fingerprint, the plan, the resolved config, the caller's data
  position, the RNG file of every rank and the size and sha256 of every other file.

The manifest is the commit record: a directory without one is a save that did not finish. It is
never resumed from, and it is replaced when the same step is saved again. Deleting a checkpoint
removes the manifest first for the same reason. Loading checks every file against the manifest
*before* reading any state, so a truncated or bit-flipped shard fails loudly, naming the file,
instead of resuming a silently damaged model.

Modules, one job each: ``files`` (layout and durable writes), ``manifest`` (the commit record and
``verify``), ``fingerprint`` (which run a directory belongs to), ``rng`` (RNG states per rank),
``collectives`` (ranks agree and fail together), ``retention`` (which step directories stay),
``safe_load`` (reading one never runs code from it) and ``manager`` (``CheckpointManager``, which
all ranks call to save, resume and load).
"""

from orch.runtime.checkpoint.files import CHECKPOINTS, MANIFEST, step_dir_name
from orch.runtime.checkpoint.fingerprint import (
    FINGERPRINT_EXCLUDED,
    FINGERPRINT_SECTIONS,
    config_changes,
    config_fingerprint,
)
from orch.runtime.checkpoint.manager import CheckpointManager, SaveFailed
from orch.runtime.checkpoint.manifest import (
    FORMAT,
    VERSION,
    CheckpointError,
    FileEntry,
    Manifest,
    read_manifest,
    verify,
)
from orch.runtime.checkpoint.rng import capture_rng, derive_rng_seed, load_rng, restore_rng

__all__ = [
    "CHECKPOINTS",
    "FINGERPRINT_EXCLUDED",
    "FINGERPRINT_SECTIONS",
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "CheckpointError",
    "CheckpointManager",
    "FileEntry",
    "Manifest",
    "SaveFailed",
    "capture_rng",
    "config_changes",
    "config_fingerprint",
    "derive_rng_seed",
    "load_rng",
    "read_manifest",
    "restore_rng",
    "step_dir_name",
    "verify",
]
