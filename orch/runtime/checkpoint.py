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

A run directory belongs to one training run, identified by ``config_fingerprint``: checkpoints of
another config are refused, never overwritten or deleted.

Another world size may load a checkpoint (DCP reshards). Ranks that existed when it was saved get
their RNG states back; a rank that did not gets a seed derived from (train.seed, step, rank), so
the same restart always draws the same numbers (``derive_rng_seed``).

Collectives: every ``CheckpointManager`` method that touches a checkpoint is called by all ranks
(``save``, ``wait``, ``load``, ``resolve_resume``); ranks share the file system, as DCP requires.
Without an initialized process group the manager works in one process (``world_size == 1``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from orch.config import Config, config_to_dict
from orch.errors import OrchError, Problem

FORMAT = "orch-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"

FINGERPRINT_SECTIONS = ("model", "data", "optimizer", "train")
"""Config sections that define the training run's math; the rest says how and where it runs."""
FINGERPRINT_EXCLUDED = {"train": ("steps", "micro_batch", "recompute")}
"""Fields that may change on resume: more steps, or another split of the same global batch and
another memory/compute trade-off when the run moves to another plan."""

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_T = TypeVar("_T")


class CheckpointError(OrchError):
    """A checkpoint or run directory the user asked for cannot be used as it is."""

    def __init__(self, where: str | Path, message: str, fix: str = "") -> None:
        self.problem = Problem(str(where), message, fix)
        super().__init__(str(self.problem))


# --- fingerprint ---------------------------------------------------------------------------


def _fingerprinted(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved config dict that the fingerprint covers."""
    out: dict[str, Any] = {}
    for section in FINGERPRINT_SECTIONS:
        values = dict(config.get(section) or {})
        for name in FINGERPRINT_EXCLUDED.get(section, ()):
            values.pop(name, None)
        out[section] = values
    return out


def _fingerprint_of(config: dict[str, Any]) -> str:
    text = json.dumps(_fingerprinted(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_fingerprint(cfg: Config) -> str:
    """sha256 over the config sections that define the run's math (``FINGERPRINT_SECTIONS``).

    Parallel degrees, offload, checkpoint, run and cluster settings are left out, and so are
    ``train.steps``, ``train.micro_batch`` and ``train.recompute``, so a run can resume onto
    another plan or be extended; anything that changes what is computed changes the fingerprint.
    """
    return _fingerprint_of(config_to_dict(cfg))


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    """Fingerprinted fields that differ, as ``model.dim: 64 -> 128`` (old -> new)."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        elif a != b:
            diffs.append(f"{where}: {a!r} -> {b!r}")

    walk(_fingerprinted(old), _fingerprinted(new), "")
    return diffs[:limit] + ([f"... and {len(diffs) - limit} more"] if len(diffs) > limit else [])


# --- RNG states ----------------------------------------------------------------------------


def capture_rng() -> dict[str, Any]:
    """This process's RNG states in a form ``torch.load(weights_only=True)`` reads back."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": [version, list(keys), gauss],
        "numpy": [kind, np_keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def derive_rng_seed(seed: int, step: int, rank: int) -> int:
    """Seed for a rank that did not exist when the checkpoint was saved (the world grew).

    It depends only on (train.seed, step, rank), so every restart onto the same world size
    derives the same streams, and no two ranks share one.
    """
    digest = hashlib.sha256(f"orch-rng:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def restore_rng(states: dict[str, Any]) -> None:
    """Set this process's RNGs from ``capture_rng()`` output or a derived ``{"seed": n}``."""
    if "seed" in states:
        seed = int(states["seed"])
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # seeds every CUDA device too
        return
    version, keys, gauss = states["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


# --- manifest ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says about one checkpoint; ``rng`` is filled in by ``load``."""

    path: Path
    step: int
    fingerprint: str
    world_size: int
    plan: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any]
    rng_files: dict[int, str]
    files: dict[str, FileEntry]
    wall_time: float
    save_seconds: float
    version: int = VERSION
    rng: dict[str, Any] | None = None
    """This rank's RNG states after ``load``: saved ones, or ``{"seed": n}`` for a new rank."""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": self.version,
            "step": self.step,
            "fingerprint": self.fingerprint,
            "world_size": self.world_size,
            "wall_time": self.wall_time,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.wall_time)),
            "save_seconds": self.save_seconds,
            "data": self.data,
            "rng": {str(rank): name for rank, name in sorted(self.rng_files.items())},
            "files": {
                name: {"size": e.size, "sha256": e.sha256} for name, e in sorted(self.files.items())
            },
            "plan": self.plan,
            "config": self.config,
        }

    @classmethod
    def from_json(cls, path: Path, raw: dict[str, Any]) -> Manifest:
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, not {FORMAT!r}")
        if raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version')!r}; this orch reads version {VERSION}")
        return cls(
            path=path,
            step=int(raw["step"]),
            fingerprint=str(raw["fingerprint"]),
            world_size=int(raw["world_size"]),
            plan=dict(raw["plan"]),
            config=dict(raw["config"]),
            data=dict(raw["data"]),
            rng_files={int(rank): str(name) for rank, name in raw["rng"].items()},
            files={
                str(name): FileEntry(int(e["size"]), str(e["sha256"]))
                for name, e in raw["files"].items()
            },
            wall_time=float(raw["wall_time"]),
            save_seconds=float(raw["save_seconds"]),
        )


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of checkpoint directory ``path``; CheckpointError if absent or unreadable."""
    path = Path(path)
    file = path / MANIFEST
    try:
        return Manifest.from_json(path, json.loads(file.read_text()))
    except FileNotFoundError:
        raise CheckpointError(
            file,
            "is missing: the save of this checkpoint did not finish",
            "resume from another checkpoint (checkpoint.resume=auto picks the newest complete one)",
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            file,
            f"cannot be read ({type(exc).__name__}: {exc})",
            f"resume from another checkpoint, or delete {path} if it is damaged",
        ) from None


def verify(path: str | Path, hashes: bool = True, names: list[str] | None = None) -> list[str]:
    """Problems with the checkpoint at ``path``: manifest, then each listed file.

    ``hashes=False`` checks presence and sizes only (cheap); ``names`` limits the file checks to
    those entries, so ranks can split the hashing of a large checkpoint between them.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:
        return [str(exc.problem)]
    problems = []
    for name in sorted(manifest.files) if names is None else names:
        entry, file = manifest.files[name], path / name
        try:
            size = file.stat().st_size
        except OSError:
            problems.append(f"{file}: missing (the manifest lists it)")
            continue
        if size != entry.size:
            problems.append(f"{file}: {size} bytes, the manifest says {entry.size} (truncated?)")
        elif hashes and _sha256(file) != entry.sha256:
            problems.append(f"{file}: sha256 differs from the manifest (the file changed)")
    return problems


# --- files ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
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


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing (temp + rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory, manifest first, so a half-deleted one is never complete."""
    (path / MANIFEST).unlink(missing_ok=True)
    _fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def _files_of(path: Path) -> list[str]:
    """Relative names of every file in a checkpoint directory except the manifest (and temps)."""
    return sorted(
        p.relative_to(path).as_posix()
        for p in path.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(f".{MANIFEST}.tmp")
    )


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every one-process save/load that it assumes one process; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rng_file_name(rank: int) -> str:
    return f"rng-rank-{rank:05d}.pt"


# --- the manager ---------------------------------------------------------------------------


@dataclass
class _Pending:
    """An asynchronous save whose DCP write may still be running; finished by ``wait``."""

    step: int
    path: Path
    data: dict[str, Any]
    started: float
    future: Future[Any] | None


class CheckpointManager:
    """Saves, finds, verifies and loads one run directory's checkpoints; see the module doc."""

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
        self._dist = dist.is_available() and dist.is_initialized()
        if self._dist and (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(
                f"rank {rank} of {world_size} given, process group says "
                f"{dist.get_rank()} of {dist.get_world_size()}"
            )
        if not self._dist and world_size != 1:
            raise ValueError("world_size > 1 needs an initialized torch.distributed process group")
        self._written: set[int] = set()
        self._pending: _Pending | None = None
        self._async_group: Any = None
        if cfg.checkpoint.async_save and self._dist:
            # Background writes run their own collectives; a group of their own keeps them from
            # interleaving with the training step's collectives on the default group.
            self._async_group = dist.new_group(backend="gloo")

    # --- collectives (no-ops in one process) ---

    def _gather(self, obj: _T) -> list[_T]:
        if not self._dist:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _from_rank0(self, fn: Callable[[], _T]) -> _T:
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
        if self._dist:
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

    def _raise_if_any(self, error: str | None, where: Path, doing: str) -> None:
        """Gather each rank's local error; raise the same CheckpointError on every rank."""
        errors = [(r, e) for r, e in enumerate(self._gather(error)) if e]
        if errors:
            text = "; ".join(f"rank {r}: {e}" for r, e in errors)
            raise CheckpointError(
                where,
                f"{doing} failed ({text})",
                "check free space and permissions under run.dir; an unfinished checkpoint "
                "directory is ignored and replaced by the next save",
            )

    # --- finding checkpoints ---

    def _step_dirs(self) -> Iterator[tuple[int, Path]]:
        if not self.dir.is_dir():
            return
        for path in self.dir.iterdir():
            match = _STEP_DIR.match(path.name)
            if match and path.is_dir():
                yield int(match.group(1)), path

    def complete(self) -> list[Manifest]:
        """Readable manifests of this run directory, oldest first (any fingerprint)."""
        out = []
        for _, path in sorted(self._step_dirs()):
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
        others = [m for m in self.complete() if m.fingerprint != self.fingerprint]
        if not others:
            return
        first = others[0]
        diffs = config_differences(first.config, self.config)
        what = f"; changed (there -> here): {', '.join(diffs)}" if diffs else ""
        raise CheckpointError(
            self.dir,
            f"holds {len(others)} checkpoint(s) of another config ({first.path.name} has "
            f"fingerprint {first.fingerprint[:12]}, this config {self.fingerprint[:12]}){what}",
            "use another run.dir for this config, or set checkpoint.resume=none with a fresh "
            f"run.dir; orch never overwrites or deletes the checkpoints in {self.dir}",
        )

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
            self._check_fingerprint(read_manifest(path))
            problems = verify(path, hashes=False)
            if problems:
                raise self._damaged(path, problems)
            return path

        return self._from_rank0(resolve)

    def _check_fingerprint(self, manifest: Manifest) -> None:
        if manifest.fingerprint == self.fingerprint:
            return
        diffs = config_differences(manifest.config, self.config)
        raise CheckpointError(
            manifest.path,
            f"was saved by another config (fingerprint {manifest.fingerprint[:12]}, this config "
            f"{self.fingerprint[:12]}); changed (there -> here): {', '.join(diffs) or '?'}",
            "resume with the config it was saved with, or start a fresh run.dir",
        )

    @staticmethod
    def _damaged(path: Path, problems: list[str]) -> CheckpointError:
        return CheckpointError(
            problems[0].split(": ", 1)[0],
            "checkpoint is damaged, nothing was loaded:\n      " + "\n      ".join(problems),
            f"resume from an older checkpoint (checkpoint.resume=<path>) or delete {path}",
        )

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
        self._from_rank0(lambda: self._prepare(step, path))
        error = None
        try:
            buf = io.BytesIO()
            torch.save(capture_rng(), buf)
            _write_durable(path / _rng_file_name(self.rank), buf.getvalue())
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._raise_if_any(error, path, "writing RNG states")
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
        self._raise_if_any(error, pending.path, "writing the sharded state")
        # Every rank hashes a share of the files; rank 0 lists them so all agree on the split.
        names = self._from_rank0(lambda: _files_of(pending.path))
        mine: dict[str, FileEntry] = {}
        try:
            for name in names[self.rank :: self.world_size]:
                file = pending.path / name
                mine[name] = FileEntry(file.stat().st_size, _sha256(file))
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._raise_if_any(error, pending.path, "hashing the checkpoint files")
        files = {k: v for part in self._gather(mine) for k, v in part.items()}
        if self.rank == 0:
            manifest = Manifest(
                path=pending.path,
                step=pending.step,
                fingerprint=self.fingerprint,
                world_size=self.world_size,
                plan=self.plan,
                config=self.config,
                data=pending.data,
                rng_files={r: _rng_file_name(r) for r in range(self.world_size)},
                files=files,
                wall_time=time.time(),
                save_seconds=time.time() - pending.started,
            )
            try:
                text = json.dumps(manifest.to_json(), indent=1, sort_keys=False) + "\n"
                _write_durable(pending.path / MANIFEST, text.encode())
                self._retain(pending.step)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        self._raise_if_any(error, pending.path, "writing the manifest")
        self._written.add(pending.step)

    def _prepare(self, step: int, path: Path) -> None:
        """Rank 0, before a save: refuse a foreign run dir; clear the way for ``path``.

        An unfinished directory of the same step is deleted. A complete one of this step or a
        later one, not written by this manager, belongs to an abandoned history (a restart from
        an older checkpoint or with resume=none); it is renamed aside, not deleted, so that
        ``latest`` can never pick a checkpoint from the abandoned history.
        """
        self.check_run_dir()
        try:
            self._clear_way(step, path)
        except OSError as exc:
            raise CheckpointError(
                path,
                f"cannot be prepared for saving ({type(exc).__name__}: {exc})",
                "check free space and permissions under run.dir",
            ) from exc

    def _clear_way(self, step: int, path: Path) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for other_step, other in sorted(self._step_dirs()):
            if other_step < step or other_step in self._written:
                continue
            if (other / MANIFEST).exists():
                aside = other.with_name(f"{other.name}.superseded-{stamp}")
                warnings.warn(
                    f"moving {other} aside to {aside.name}: it is from an earlier "
                    f"history of this run, saving step {step} now",
                    stacklevel=3,
                )
                os.replace(other, aside)
            elif other_step == step:
                _remove_checkpoint(other)
        path.mkdir(parents=True, exist_ok=False)
        _fsync_dir(self.dir)

    def _retain(self, step: int) -> None:
        """Rank 0, after saving ``step``: keep the newest ``keep_last`` (0 = all) and every step
        divisible by ``keep_every``; drop unfinished directories of earlier steps."""
        keep_last, keep_every = self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every
        mine = [m.step for m in self.complete() if m.fingerprint == self.fingerprint]
        keep = {step} | set(mine[-keep_last:] if keep_last > 0 else mine)
        keep |= {s for s in mine if keep_every > 0 and s % keep_every == 0}
        for other_step, other in sorted(self._step_dirs()):
            complete = (other / MANIFEST).exists()
            if (complete and other_step in mine and other_step not in keep) or (
                not complete and other_step < step
            ):
                _remove_checkpoint(other)

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
            self._check_fingerprint(manifest)
        except CheckpointError as exc:
            error = exc.problem
        errors = [e for e in self._gather(error) if e]
        if errors:
            raise CheckpointError(errors[0].where, errors[0].message, errors[0].fix)
        names = sorted(manifest.files)[self.rank :: self.world_size]
        problems = [p for part in self._gather(verify(path, names=names)) for p in part]
        missing = [name for name in manifest.rng_files.values() if name not in manifest.files]
        problems += [f"{path / name}: not listed in the manifest" for name in missing]
        if problems:
            raise self._damaged(path, problems)
        with _quiet_single_process():
            dcp.load(app_state, checkpoint_id=path, no_dist=not self._dist)
        if self.rank in manifest.rng_files:
            rng_file = path / manifest.rng_files[self.rank]
            rng = torch.load(rng_file, weights_only=True)
        else:
            rng = {"seed": derive_rng_seed(self.cfg.train.seed, manifest.step, self.rank)}
        return dataclasses.replace(manifest, rng=rng)
