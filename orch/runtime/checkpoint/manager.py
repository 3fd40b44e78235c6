"""``CheckpointManager``: save, find, verify and load one run directory's checkpoints.

Collectives: every ``CheckpointManager`` method that touches a checkpoint is called by all ranks
(``save``, ``wait``, ``load``, ``resolve_resume``); ranks share the file system, as DCP requires.
Without an initialized process group the manager works in one process (``world_size == 1``).

A save writes each rank's RNG states and the DCP shards, then (in ``wait``) hashes the files, with
the ranks splitting the work, and has rank 0 write the manifest and apply retention. A load checks
every file against the manifest before reading any state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orch.config import Config, config_to_dict
from orch.errors import Problem
from orch.runtime.checkpoint.collectives import RankGroup
from orch.runtime.checkpoint.files import (
    CHECKPOINTS,
    MANIFEST,
    files_of,
    rng_file_name,
    sha256,
    step_dir_name,
    step_dirs,
    write_durable,
)
from orch.runtime.checkpoint.fingerprint import (
    check_fingerprint,
    config_fingerprint,
    refuse_other_configs,
)
from orch.runtime.checkpoint.manifest import (
    CheckpointError,
    FileEntry,
    Manifest,
    damaged,
    read_manifest,
    verify,
)
from orch.runtime.checkpoint.retention import clear_way, retain
from orch.runtime.checkpoint.rng import capture_rng, derive_rng_seed


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every one-process save/load that it assumes one process; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


@dataclass
class _Pending:
    """An asynchronous save whose DCP write may still be running; finished by ``wait``."""

    step: int
    path: Path
    data: dict[str, Any]
    started: float
    future: Future[Any] | None


class CheckpointManager:
    """Saves, finds, verifies and loads one run directory's checkpoints; see the package doc."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: Config,
        plan_dict: dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / CHECKPOINTS
        self.cfg = cfg
        self.config = config_to_dict(cfg)
        self.plan = plan_dict
        self.fingerprint = config_fingerprint(cfg)
        self.rank = rank
        self.world_size = world_size
        self._ranks = RankGroup(rank, world_size)
        self._dist = self._ranks.dist
        self._written: set[int] = set()
        self._pending: _Pending | None = None
        self._async_group: Any = None
        if cfg.checkpoint.async_save and self._dist:
            # Background writes run their own collectives; a group of their own keeps them from
            # interleaving with the training step's collectives on the default group.
            self._async_group = dist.new_group(backend="gloo")

    # --- finding checkpoints ---

    def complete(self) -> list[Manifest]:
        """Readable manifests of this run directory, oldest first (any fingerprint)."""
        out = []
        for _, path in sorted(step_dirs(self.dir)):
            if not (path / MANIFEST).exists():
                continue
            try:
                out.append(read_manifest(path))
            except CheckpointError as exc:
                warnings.warn(f"ignoring checkpoint {path}: {exc}", stacklevel=2)
        return out

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this config, or None; never an unfinished one."""
        mine = [m for m in self.complete() if m.fingerprint == self.fingerprint]
        return mine[-1].path if mine else None

    def check_run_dir(self) -> None:
        """Refuse a run directory holding complete checkpoints of another config."""
        refuse_other_configs(self.dir, self.complete(), self.fingerprint, self.config)

    def resolve_resume(self, mode: str) -> Path | None:
        """The checkpoint to resume from: ``auto``, ``none`` or a checkpoint path.

        Every mode first refuses a run directory with another config's checkpoints. A path is
        checked here for its manifest, fingerprint, files and sizes; ``load`` checks hashes.
        """

        def resolve() -> Path | None:
            self.check_run_dir()
            if mode == "none":
                return None
            if mode == "auto":
                return self.latest()
            path = Path(mode)
            path = path.parent if path.name == MANIFEST else path
            if not path.is_dir():
                raise CheckpointError(
                    path,
                    "is not a checkpoint directory",
                    f"give a directory like {self.dir / step_dir_name(100)}, or "
                    "checkpoint.resume=auto|none",
                )
            check_fingerprint(read_manifest(path), self.fingerprint, self.config)
            problems = verify(path, hashes=False)
            if problems:
                raise damaged(path, problems)
            return path

        return self._ranks.from_rank0(resolve)

    def verify(self, path: str | Path) -> list[str]:
        """Problems with checkpoint ``path`` (unreadable manifest, missing, truncated or changed
        files); an empty list means every byte is as saved. Local: no collectives."""
        return verify(path)

    # --- saving ---

    def save(self, step: int, app_state: dict[str, Any], data_state: dict[str, Any]) -> Path:
        """Save ``app_state`` through DCP as checkpoint ``step``; all ranks call it.

        ``data_state`` is the data position as JSON data; rank 0's is recorded. With
        ``checkpoint.async_save`` the DCP write continues in the background and the manifest is
        written by the next ``save`` or ``wait``; otherwise the checkpoint is complete (manifest
        written, retention applied) when this returns on any rank.
        """
        path = self.dir / step_dir_name(step)
        self.wait()
        if step in self._written:
            return path  # saved already (e.g. an interval save at the final step)
        started = time.time()
        data = json.loads(json.dumps(data_state))  # a copy, and fail early if not JSON
        self._ranks.from_rank0(lambda: self._prepare(step, path))
        error = None
        try:
            buf = io.BytesIO()
            torch.save(capture_rng(), buf)
            write_durable(path / rng_file_name(self.rank), buf.getvalue())
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._ranks.raise_if_any(error, path, "writing RNG states")
        import torch.distributed.checkpoint as dcp  # here: the launcher resolves resumes without it

        if self._async_group is not None:
            # Thread mode: state is staged to CPU before this returns, so training may go on.
            response = dcp.async_save(
                app_state, checkpoint_id=path, process_group=self._async_group
            )
            future = getattr(response, "upload_completion", response)  # newer torch: a pair
            self._pending = _Pending(step, path, data, started, future)
        else:
            with _quiet_single_process():
                dcp.save(app_state, checkpoint_id=path, no_dist=not self._dist)
            self._pending = _Pending(step, path, data, started, None)
            self.wait()
        return path

    def wait(self) -> None:
        """Finish a pending save: wait for its DCP write, then hash, write the manifest, apply
        retention. All ranks call it (``save`` does); trainers call it before exiting."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error = None
        if pending.future is not None:
            try:
                pending.future.result()
            except Exception as exc:  # noqa: BLE001 - reported on every rank below
                error = f"{type(exc).__name__}: {exc}"
        self._ranks.raise_if_any(error, pending.path, "writing the sharded state")
        # Every rank hashes a share of the files; rank 0 lists them so all agree on the split.
        names = self._ranks.from_rank0(lambda: files_of(pending.path))
        mine: dict[str, FileEntry] = {}
        try:
            for name in names[self.rank :: self.world_size]:
                file = pending.path / name
                mine[name] = FileEntry(file.stat().st_size, sha256(file))
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._ranks.raise_if_any(error, pending.path, "hashing the checkpoint files")
        files = {k: v for part in self._ranks.gather(mine) for k, v in part.items()}
        if self.rank == 0:
            manifest = Manifest(
                path=pending.path,
                step=pending.step,
                fingerprint=self.fingerprint,
                world_size=self.world_size,
                plan=self.plan,
                config=self.config,
                data=pending.data,
                rng_files={r: rng_file_name(r) for r in range(self.world_size)},
                files=files,
                wall_time=time.time(),
                save_seconds=time.time() - pending.started,
            )
            try:
                text = json.dumps(manifest.to_json(), indent=1, sort_keys=False) + "\n"
                write_durable(pending.path / MANIFEST, text.encode())
                self._retain(pending.step)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        self._ranks.raise_if_any(error, pending.path, "writing the manifest")
        self._written.add(pending.step)

    def _prepare(self, step: int, path: Path) -> None:
        """Rank 0, before a save: refuse a foreign run dir; clear the way for ``path``
        (``retention.clear_way``: an earlier history's checkpoints are moved aside)."""
        self.check_run_dir()
        try:
            clear_way(self.dir, step, path, self._written)
        except OSError as exc:
            raise CheckpointError(
                path,
                f"cannot be prepared for saving ({type(exc).__name__}: {exc})",
                "check free space and permissions under run.dir",
            ) from exc

    def _retain(self, step: int) -> None:
        """Rank 0, after saving ``step``: apply ``checkpoint.keep_last``/``keep_every``."""
        mine = [m.step for m in self.complete() if m.fingerprint == self.fingerprint]
        retain(self.dir, step, mine, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)

    # --- loading ---

    def load(self, path: str | Path, app_state: dict[str, Any]) -> Manifest:
        """Verify checkpoint ``path`` completely, then load it into ``app_state`` in place.

        Ranks split the hashing and share their findings, so all raise the same CheckpointError
        (naming the bad file) before any state is read. Returns the manifest with ``rng`` set to
        this rank's saved RNG states, or, for a rank the saving run did not have, to
        ``{"seed": derive_rng_seed(train.seed, step, rank)}``; pass it to ``restore_rng``.
        """
        self.wait()
        path = Path(path)
        error: Problem | None = None
        try:
            manifest = read_manifest(path)
            check_fingerprint(manifest, self.fingerprint, self.config)
        except CheckpointError as exc:
            error = exc.problem
        errors = [e for e in self._ranks.gather(error) if e]
        if errors:
            raise CheckpointError(errors[0].where, errors[0].message, errors[0].fix)
        names = sorted(manifest.files)[self.rank :: self.world_size]
        problems = [p for part in self._ranks.gather(verify(path, names=names)) for p in part]
        missing = [name for name in manifest.rng_files.values() if name not in manifest.files]
        problems += [f"{path / name}: not listed in the manifest" for name in missing]
        if problems:
            raise damaged(path, problems)
        import torch.distributed.checkpoint as dcp

        with _quiet_single_process():
            dcp.load(app_state, checkpoint_id=path, no_dist=not self._dist)
        if self.rank in manifest.rng_files:
            rng_file = path / manifest.rng_files[self.rank]
            rng = torch.load(rng_file, weights_only=True)
        else:
            rng = {"seed": derive_rng_seed(self.cfg.train.seed, manifest.step, self.rank)}
        return dataclasses.replace(manifest, rng=rng)
