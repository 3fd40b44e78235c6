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
import shutil
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from orch.config import Config, recorded_config
from orch.errors import Problem, warn_once
from orch.runtime.checkpoint.browse import newest_complete
from orch.runtime.checkpoint.collectives import RankGroup
from orch.runtime.checkpoint.files import (
    CHECKPOINTS,
    MANIFEST,
    files_of,
    remove_checkpoint,
    rng_file_name,
    sha256,
    step_dir_name,
    step_dirs,
    write_durable,
)
from orch.runtime.checkpoint.fingerprint import (
    check_same_config,
    config_changes,
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
from orch.runtime.checkpoint.rng import capture_rng, derive_rng_seed, load_rng
from orch.runtime.drills import maybe_fail
from orch.runtime.optim import checkpoint_peak_until, peak_until

if TYPE_CHECKING:
    from torch.distributed.checkpoint.planner import SavePlanner


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every one-process save/load that it assumes one process; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


class SaveFailed(CheckpointError):
    """A checkpoint could not be written (a full disk, permissions): the run stops, exit 1."""

    exit_code = 1


def _first_line(exc: BaseException) -> str:
    """``Type: message`` of ``exc``'s first line; for DCP's gathered CheckpointException, of
    the first rank's underlying error (its own text is a list of tracebacks)."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        wrapped = next(iter(failures.values()))
        exc = wrapped[0] if isinstance(wrapped, tuple) else exc
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


FULL_BELOW = 1 << 20
"""Free bytes under which a failed write is put down to a full file system."""


def _wrapped(exc: BaseException) -> list[BaseException]:
    """The underlying errors of DCP's gathered CheckpointException (one per failed rank), or
    ``[exc]`` for any other error."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return [w[0] if isinstance(w, tuple) else exc for w in failures.values()]
    return [exc]


def _reraise_interrupt(exc: BaseException) -> None:
    """Raise KeyboardInterrupt when DCP wrapped one (or a SystemExit) in its
    CheckpointException: Ctrl-C during a save is the user stopping the run, which the worker
    reports as such, not a failed write whose fix is freeing disk space."""
    if any(not isinstance(e, Exception) for e in _wrapped(exc)):
        raise KeyboardInterrupt from exc


def _is_disk_error(exc: BaseException, text: str) -> bool:
    """Whether a failed write is the file system's doing (an OSError, or the full disk
    ``_write_error`` noticed), so that freeing space or fixing permissions is the fix."""
    return any(isinstance(e, OSError) for e in _wrapped(exc)) or "file system is full" in text


def _write_error(exc: BaseException, directory: Path) -> str:
    """``_first_line`` of a failed write, saying so when the file system is full: a full disk
    surfaces as ENOSPC from a plain write but as torch's "unexpected pos" from its zip writer,
    depending on which write it hits."""
    text = _first_line(exc)
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return text
    return text + (f" (the file system is full: {free:,} bytes free)" if free < FULL_BELOW else "")


def _unreadable(path: Path) -> bool:
    """Whether ``path`` has a manifest that cannot be read: a checkpoint finished and then
    damaged (a manifest is written last), which ``--resume auto`` must not take for no
    checkpoint, lest the run start over from step 0."""
    if not (path / MANIFEST).exists():
        return False
    try:
        read_manifest(path)
    except CheckpointError:
        return True
    return False


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
        launch: str | None = None,
    ) -> None:
        """``launch``: the id of the ``orch launch`` running this (``ORCH_LAUNCH_ID``), recorded
        in every manifest saved here; ``resolve_resume`` prefers its checkpoints."""
        self.run_dir = Path(run_dir)
        self.launch = launch
        self.dir = self.run_dir / CHECKPOINTS
        self.cfg = cfg
        self.config = recorded_config(cfg)
        self.plan = plan_dict
        self.fingerprint = config_fingerprint(cfg)
        self.rank = rank
        self.world_size = world_size
        self._ranks = RankGroup(rank, world_size)
        self._dist = self._ranks.dist
        self._written: set[int] = set()
        self._verified: Path | None = None  # hashed by resolve_resume; load need not again
        self._pending: _Pending | None = None
        self._loaded: Path | None = None  # by load; read_into reads only from it
        self._resumed: tuple[int, int | None] = (0, None)
        """The step ``load`` resumed at and its checkpoint's ``peak_until``, which every
        manifest saved after carries on (``Manifest.lr``)."""
        self._said_synchronous = False
        self._async_group: Any = None
        if cfg.checkpoint.async_save and self._dist:
            # Background writes run their own collectives; a group of their own keeps them from
            # interleaving with the training step's collectives on the default group.
            self._async_group = dist.new_group(backend="gloo")

    # --- finding checkpoints ---

    def complete(self) -> list[Manifest]:
        """Readable manifests of this run directory, oldest first (any config)."""
        out = []
        for _, path in sorted(step_dirs(self.dir)):
            if not (path / MANIFEST).exists():
                continue
            try:
                out.append(read_manifest(path))
            except CheckpointError as exc:
                warn_once(f"ignoring checkpoint {path}: {exc}")
        return out

    def own(self) -> list[Manifest]:
        """The complete checkpoints of this config, oldest first."""
        return [m for m in self.complete() if not config_changes(m, self.config)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint of this config, or None; never an unfinished one."""
        own = self.own()
        return own[-1].path if own else None

    def this_launch(self) -> list[Path]:
        """This config's complete checkpoints saved by this launch (``launch``), newest first:
        the progress its restarts must not throw away."""
        if self.launch is None:
            return []
        return [m.path for m in reversed(self.own()) if m.launch == self.launch]

    def check_run_dir(self) -> None:
        """Refuse a run directory holding complete checkpoints of another config."""
        refuse_other_configs(self.dir, self.complete(), self.config)

    def resolve_resume(self, mode: str, hashes: bool = True, report: bool = True) -> Path | None:
        """The checkpoint to resume from: ``auto``, ``none`` or a checkpoint path.

        Every mode first refuses a run directory with another config's checkpoints. Where this
        launch has saved checkpoints already (a restart: torchrun's ``--max-restarts``, or a
        re-partitioned pipeline), the newest whole one of them is taken whatever ``mode`` says,
        as ``auto`` takes it: a path or ``none`` again would throw away the launch's progress (and
        retention may have deleted the path since); where all of them are damaged, the mode
        decides (``none``: start over). A launch's first start has none. The chosen
        checkpoint is verified: its manifest and config, every file's size, its index read
        safely, and (``hashes``, split over the ranks) every file's sha256; ``load`` then skips
        what was verified here. ``auto`` takes the newest complete checkpoint that passes, and
        when it passes over damaged ones, rank 0 says which and why (``report``); a path given
        explicitly is refused when damaged. The launcher calls this in one process without
        ``hashes`` (sizes and the index are cheap), the workers with.
        """

        def launch_own() -> list[Path]:
            self.check_run_dir()
            return self.this_launch()

        def for_mode() -> tuple[list[Path], bool]:
            """The mode's checkpoints to try, newest first, and whether a damaged one is passed
            over (else refused)."""
            if mode == "none":
                return [], False
            if mode == "auto":  # an unreadable manifest is a damaged checkpoint, not none
                own = {m.path for m in self.own()}
                return [path for _, path in sorted(step_dirs(self.dir), reverse=True)
                        if path in own or _unreadable(path)], True
            path = Path(mode)
            path = path.parent if path.name == MANIFEST else path
            if (path / CHECKPOINTS).is_dir() or any(path.glob("step-*/")):
                raise CheckpointError(path, "is a run directory (or its checkpoints/), not one "
                                      "checkpoint", self._one_of(path))
            if not path.exists():
                raise CheckpointError(path, "does not exist",
                                      "check the path, or give checkpoint.resume=auto|none")
            if path.is_dir() and not any(path.iterdir()):
                raise CheckpointError(path, "is empty: no checkpoint is saved there",
                                      "give a step-* directory of a run, or auto|none")
            if not path.is_dir():
                raise CheckpointError(
                    path,
                    "is not a checkpoint directory",
                    "give a checkpoint, RUN_DIR/checkpoints/step-NNNNNNNN, or "
                    "checkpoint.resume=auto|none",
                )
            check_same_config(read_manifest(path), self.config)
            return [path], False

        # this launch's own first (damaged ones passed over), then, where none of them is
        # whole (a launch's first start has none), what the mode says
        def candidates() -> Iterator[tuple[list[Path], bool, bool]]:
            """(paths, pass damaged ones over, a restart's own); the mode's asked only when
            needed (retention may have deleted its path since)."""
            yield self._ranks.from_rank0(launch_own), True, True
            yield (*self._ranks.from_rank0(for_mode), False)

        damaged_ones: list[tuple[Path, list[str]]] = []
        for paths, pass_over, restart in candidates():
            for path in paths:
                if path in (done for done, _ in damaged_ones):
                    continue
                problems = self._problems(path, hashes)
                if not problems:
                    if damaged_ones and report and self.rank == 0:
                        print(skipped_damaged(damaged_ones, path), flush=True)
                    if restart and mode != "auto" and report and self.rank == 0:
                        print(f"orch: this launch saved {path} before it restarted: resuming "
                              f"from it, not from {mode} again", flush=True)
                    self._verified = path if hashes else None
                    return path
                if not pass_over:
                    raise damaged(path, problems)
                damaged_ones.append((path, problems))
        if damaged_ones and mode != "none":
            raise CheckpointError(
                self.dir,
                "has no undamaged checkpoint to resume from:\n      " + "\n      ".join(
                    f"{path.name}: {problems[0]}" for path, problems in damaged_ones),
                "restore the files, or start over with checkpoint.resume=none (the damaged "
                "checkpoints are moved aside, not deleted)",
            )
        if damaged_ones and report and self.rank == 0:
            print("\n".join(f"orch: checkpoint {path} is damaged ({problems[0]}); starting "
                            "over, as resume none says" for path, problems in damaged_ones),
                  flush=True)
        return None

    def _one_of(self, run: Path) -> str:
        """The fix for ``--resume`` naming run directory ``run``: its newest complete checkpoint
        (by name; resolving checks it), and ``--resume auto`` where ``run`` is this run's."""
        try:
            fix = f"give one of its checkpoints, such as its newest, {newest_complete(run)}"
        except CheckpointError:
            fix = "it holds no complete checkpoint: give a checkpoint of another run"
        if run.resolve() in (self.run_dir.resolve(), self.dir.resolve()):
            fix += ", or --resume auto for this run's newest"
        return fix

    def _problems(self, path: Path, hashes: bool) -> list[str]:
        """``verify``'s findings for ``path`` on every rank: sizes and the index (rank 0), or
        every file's hash with the ranks splitting the files."""
        if not hashes:
            return self._ranks.from_rank0(lambda: verify(path, hashes=False))
        def listed() -> list[str] | None:
            try:
                return sorted(read_manifest(path).files)
            except CheckpointError:
                return None

        names = self._ranks.from_rank0(listed)
        if names is None:  # the manifest cannot be read: verify says why
            return self._ranks.from_rank0(lambda: verify(path, hashes=False))
        mine = verify(path, names=names[self.rank :: self.world_size])
        return [problem for part in self._ranks.gather(mine) for problem in part]

    def verify(self, path: str | Path) -> list[str]:
        """Problems with checkpoint ``path`` (unreadable manifest, missing, truncated or changed
        files); an empty list means every byte is as saved. Local: no collectives."""
        return verify(path)

    # --- saving ---

    def save(self, step: int, app_state: dict[str, Any], data_state: dict[str, Any],
             planner: SavePlanner | None = None) -> Path:
        """Save ``app_state`` through DCP as checkpoint ``step``; all ranks call it.

        ``data_state`` is the data position as JSON data; rank 0's is recorded. With
        ``checkpoint.async_save`` the DCP write continues in the background and the manifest is
        written by the first ``poll`` after every rank's write has ended (or the next ``save``
        or ``wait``); otherwise the checkpoint is complete (manifest
        written, retention applied) when this returns on any rank. A ``planner`` that reads
        state as DCP writes it (offloaded state on NVMe) makes the save synchronous (an async
        save first copies the whole state into memory), in files of bounded size
        (:mod:`~orch.runtime.checkpoint.bounded_files`).
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
            error = _write_error(exc, self.dir)
        self._check_saving(error, step, path, "writing RNG states")
        import torch.distributed.checkpoint as dcp  # here: the launcher resolves resumes without it
        from torch.distributed.checkpoint.api import CheckpointException

        from orch.runtime.checkpoint.bounded_files import BoundedFilesWriter

        future = None
        disk = True
        if planner is not None and self._async_group is not None and self.rank == 0 and (
                not self._said_synchronous):
            self._said_synchronous = True
            print("orch: checkpoint.async_save: saving synchronously (offloaded state on NVMe is "
                  "read as it is written; an async save would first copy all of it into memory)",
                  flush=True)
        try:
            if self._async_group is not None and planner is None:
                # Thread mode: state is staged to CPU before this returns, so training goes on.
                response = dcp.async_save(
                    app_state, checkpoint_id=path, process_group=self._async_group
                )
                future = getattr(response, "upload_completion", response)  # newer torch: a pair
            else:
                # A planner reading state as it goes needs files that do not gather it all.
                writer = None if planner is None else BoundedFilesWriter(path)
                with _quiet_single_process():
                    dcp.save(app_state, checkpoint_id=path, storage_writer=writer,
                             planner=planner, no_dist=not self._dist)
        except (Exception, CheckpointException) as exc:  # DCP raises it on every rank
            _reraise_interrupt(exc)
            error = _write_error(exc, self.dir)
            disk = _is_disk_error(exc, error)
        self._check_saving(error, step, path, "writing the sharded state", disk)
        self._pending = _Pending(step, path, data, started, future)
        if future is None:
            self.wait()
        elif self.rank == 0:
            print(f"orch: writing checkpoint {path} in the background", flush=True)
        return path

    def poll(self) -> None:
        """Finish a background save as soon as every rank's write has ended, so that it counts
        (and a failure after it costs only the steps since) without waiting for the next save;
        all ranks call it after every step. One small gather per step while a save is in
        flight, none otherwise."""
        pending = self._pending
        if pending is None or pending.future is None:
            return
        if all(self._ranks.gather(pending.future.done())):
            self.wait()

    def wait(self) -> None:
        """Finish a pending save: wait for its DCP write, then hash, write the manifest, apply
        retention. All ranks call it (``save`` does); trainers call it before exiting."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        from torch.distributed.checkpoint.api import CheckpointException

        error = None
        disk = True
        if pending.future is not None:
            try:
                pending.future.result()
            except (Exception, CheckpointException) as exc:  # reported on every rank below
                _reraise_interrupt(exc)
                error = _write_error(exc, self.dir)
                disk = _is_disk_error(exc, error)
        self._check_saving(error, pending.step, pending.path, "writing the sharded state", disk)
        maybe_fail("save", pending.step)  # a fault drill (ORCH_DRILL), when one is set
        # Every rank hashes a share of the files; rank 0 lists them so all agree on the split.
        names = self._ranks.from_rank0(lambda: files_of(pending.path))
        mine: dict[str, FileEntry] = {}
        try:
            for name in names[self.rank :: self.world_size]:
                file = pending.path / name
                mine[name] = FileEntry(file.stat().st_size, sha256(file))
        except OSError as exc:
            error = _first_line(exc)
        self._check_saving(error, pending.step, pending.path, "hashing the checkpoint files")
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
                launch=self.launch,
                lr={"peak_until": peak_until(pending.step, self.cfg.train, *self._resumed)},
            )
            try:
                text = json.dumps(manifest.to_json(), indent=1, sort_keys=False) + "\n"
                write_durable(pending.path / MANIFEST, text.encode())
            except OSError as exc:
                error = _write_error(exc, self.dir)
        self._check_saving(error, pending.step, pending.path, "writing the manifest")
        if self.rank == 0:
            print(f"orch: saved checkpoint {pending.path}", flush=True)
            try:
                self._retain(pending.step)
            except OSError as exc:  # the checkpoint is complete; older ones stay for now
                warn_once(f"checkpoint retention after {pending.path}: {exc}")
        self._written.add(pending.step)

    def abandon(self) -> None:
        """Give up a pending save without any collective: for a rank leaving on an error.

        ``wait`` gathers every rank's outcome, which peers still training (or already gone)
        never join, so calling it while an exception unwinds hung the run and hid the error.
        The abandoned directory has no manifest, so it is never resumed from; the next save of
        its step, or retention after a later one, removes it. Its background write may still
        run until the process ends."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.future is not None and self.rank == 0:
            warn_once(f"checkpoint {pending.path} was still being written when this rank "
                      "failed: left unfinished, it is never resumed from")

    def _check_saving(
        self, error: str | None, step: int, path: Path, doing: str, disk: bool = True
    ) -> None:
        """Raise ``SaveFailed`` on every rank when any rank's ``error`` is set, after rank 0
        removed the unfinished directory (it would never be resumed from, and a full disk wants
        its space back); older checkpoints are left as they are. ``disk`` says whether this
        rank's error is the file system's (an OSError, a full disk): only then is freeing space
        or fixing permissions the fix; any other error is named without it."""
        gathered = self._ranks.gather((error, disk) if error else None)
        errors = [(r, g) for r, g in enumerate(gathered) if g]
        if not errors:
            return
        self._pending = None
        if self.rank == 0:
            remove_checkpoint(path)
        newest = self.latest()
        kept = f"the newest complete checkpoint, {newest}, is intact" if newest else (
            "there is no earlier complete checkpoint")
        again = "then run the same command: it resumes from the newest complete checkpoint"
        if any(d for _, (_, d) in errors):
            fix = f"{self._disk_fix()}, {again}"
        else:
            names = sorted({e.split(":")[0] for _, (e, _) in errors})
            fix = (f"this is not a disk problem: fix the cause of the {', '.join(names)} "
                   f"above, {again}")
        raise SaveFailed(
            path,
            f"saving step {step} failed while {doing} ("
            + "; ".join(f"rank {r}: {e}" for r, (e, _) in errors)
            + f"); the unfinished directory was removed and {kept}",
            fix,
        )

    def _disk_fix(self) -> str:
        """What to do about a save the file system refused, as this rank sees the checkpoints
        directory: free space or fix permissions there, with the space free now. A directory
        this rank cannot see has no space to free: it was removed, or run.dir is not on a file
        system every node shares (its node's saves failed, said to have "0 bytes free")."""
        if not self.dir.exists():
            return (f"{self.dir} does not exist on rank {self.rank}'s node: restore it if it was "
                    "removed; every node must see the same run.dir (a shared file system)")
        free = shutil.disk_usage(self.dir).free
        return f"free space or fix permissions under {self.dir} ({free:,} bytes free now)"

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
        keep = self.cfg.checkpoint
        retain(self.dir, step, [m.step for m in self.own()], keep.keep_last, keep.keep_every)

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
            check_same_config(manifest, self.config)
        except CheckpointError as exc:
            error = exc.problem
        errors = [e for e in self._ranks.gather(error) if e]
        if errors:
            raise CheckpointError(errors[0].where, errors[0].message, errors[0].fix)
        problems = [] if path == self._verified else self._problems(path, hashes=True)
        missing = [name for name in manifest.rng_files.values() if name not in manifest.files]
        problems += [f"{path / name}: not listed in the manifest" for name in missing]
        if problems:
            raise damaged(path, problems)
        self._read(path, app_state, no_dist=not self._dist)
        self._loaded = path
        self._resumed = (manifest.step, checkpoint_peak_until(manifest, self.cfg.train))
        if self.rank in manifest.rng_files:
            rng = load_rng(path / manifest.rng_files[self.rank])
        else:
            rng = {"seed": derive_rng_seed(self.cfg.train.seed, manifest.step, self.rank)}
        return dataclasses.replace(manifest, rng=rng)

    def read_into(self, path: str | Path, state: dict[str, Any]) -> None:
        """Load ``state`` (part of a state dict, in place) from checkpoint ``path``, which
        :meth:`load` verified and loaded, in this process alone: no collectives, so ranks may
        read different parts, or none (an offloaded run reads its NVMe units one by one)."""
        if Path(path) != self._loaded:
            raise RuntimeError(f"read_into({path}) must follow load() of the same checkpoint")
        self._read(Path(path), state, no_dist=True)

    @staticmethod
    def _read(path: Path, state: dict[str, Any], no_dist: bool) -> None:
        """DCP's load of ``state`` in place from ``path``, reading no code from it
        (:mod:`~orch.runtime.checkpoint.safe_load`); a refusal raised by one rank is raised as
        itself on every rank."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        from orch.runtime.checkpoint.safe_load import SafeLoadPlanner, SafeReader, unwrap

        try:
            with _quiet_single_process():
                dcp.load(state, checkpoint_id=path, storage_reader=SafeReader(path),
                         planner=SafeLoadPlanner(), no_dist=no_dist)
        except CheckpointException as exc:
            if (inner := unwrap(exc)) is not exc:
                raise inner from None
            raise


def skipped_damaged(skipped: list[tuple[Path, list[str]]], chosen: Path) -> str:
    """What ``resume=auto`` says when it passes over damaged checkpoints."""
    lines = [f"orch: checkpoint {path} is damaged ({problems[0]}); not resuming from it"
             for path, problems in skipped]
    return "\n".join([*lines, f"orch: resuming from the previous complete checkpoint {chosen}"])
