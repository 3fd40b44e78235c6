"""``manifest.json``: the commit record of a checkpoint, and the check of its files.

Rank 0 writes the manifest last, durably (``files.write_durable``). It records the step, the
config fingerprint, the plan, the resolved config, the caller's data position, the RNG file of
every rank, the size and sha256 of every other file, and the launch that saved it. A directory
without one is a save that did not finish. ``verify`` checks every file against it, so loading can
refuse a truncated or bit-flipped shard, naming the file, before reading any state.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orch.errors import OrchError, Problem
from orch.runtime.checkpoint.files import MANIFEST, STEP_NAME, sha256

FORMAT = "orch-checkpoint"
INDEX = ".metadata"
"""DCP's index of the sharded state (a pickle; ``safe_load`` reads it)."""
VERSION = 1


class CheckpointError(OrchError):
    """A checkpoint or run directory the user asked for cannot be used as it is."""

    def __init__(self, where: str | Path, message: str, fix: str = "") -> None:
        self.problem = Problem(str(where), message, fix)
        super().__init__(str(self.problem))


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
    launch: str | None = None
    """The ``orch launch`` that saved it (``ORCH_LAUNCH_ID``): its restarts resume from their own
    launch's checkpoints. Absent (None) in manifests saved before, or outside a launch."""
    lr: dict[str, Any] | None = None
    """The lr history of the weights: ``{"peak_until": N or None}``, the last step they trained
    at the peak lr (warmup aside) before a step below it, across the resumes that led here
    (``orch.runtime.optim.peak_until``), which the closing lines of a wsd run read to name a
    checkpoint of its stable phase once the ones in between are gone. None in manifests saved
    before (their own config's schedule stands in)."""
    rng: dict[str, Any] | None = None
    """This rank's RNG states after ``load``: saved ones, or ``{"seed": n}`` for a new rank."""

    def to_json(self) -> dict[str, Any]:
        launch = {} if self.launch is None else {"launch": self.launch}  # older orch ignores it
        lr = {} if self.lr is None else {"lr": self.lr}
        return {
            "format": FORMAT,
            "version": self.version,
            "step": self.step,
            "fingerprint": self.fingerprint,
            "world_size": self.world_size,
            "wall_time": self.wall_time,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.wall_time)),
            "save_seconds": self.save_seconds,
            **launch,
            **lr,
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
        if not isinstance(raw, dict):
            raise ValueError(f"holds a JSON {type(raw).__name__}, not an object")
        if raw.get("format") != FORMAT:
            raise ValueError(f"format is {raw.get('format')!r}, not {FORMAT!r}")
        if raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version')!r}; this orch reads version {VERSION}")
        for name in [*raw["files"], *raw["rng"].values()]:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                # a forged entry would make verify read (and report on) files elsewhere
                raise ValueError(f"lists {name!r}, which is not a file name inside the checkpoint")
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
            launch=str(raw["launch"]) if raw.get("launch") is not None else None,
            lr=dict(raw["lr"]) if isinstance(raw.get("lr"), dict) else None,
        )


def _set_aside(path: Path) -> str:
    """How to get damaged checkpoint ``path`` out of the way without losing it. The fixes said
    "delete {path}", though its damage may be repairable (a file copied again) and it may hold
    the only copy of its step, and resume needs no deletion: it passes the checkpoint over and
    moves it aside when its step is saved again (``retention.clear_way``), as orch never deletes
    a complete checkpoint for being damaged. A ``step-N.damaged-STAMP`` name is no step
    directory, so nothing lists, resumes or prunes it; the stamp (local time to the second, as
    ``files.superseded_path``'s) makes a name that does not exist yet: ``mv PATH PATH.damaged``
    onto an existing ``PATH.damaged`` directory (a checkpoint set aside before) moved the
    checkpoint inside it."""
    return (f"--resume auto passes over this one, and moves it aside when its step is saved "
            f"again; to set it aside now, rename it rather than delete it: "
            f"mv {path} {path}.damaged-$(date +%Y%m%dT%H%M%S)")


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of checkpoint directory ``path``; CheckpointError if absent or unreadable."""
    path = Path(path)
    file = path / MANIFEST
    try:
        manifest = Manifest.from_json(path, json.loads(file.read_text()))
    except FileNotFoundError:
        raise CheckpointError(
            file,
            "is missing: the save of this checkpoint did not finish",
            "resume from another checkpoint (checkpoint.resume=auto picks the newest complete one)",
        ) from None
    except KeyError as exc:
        raise CheckpointError(
            file, f"has no {exc.args[0]!r} entry: it is damaged, or not one orch wrote",
            f"resume from another checkpoint: {_set_aside(path)}",
        ) from None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        reason = str(exc) if isinstance(exc, OSError | ValueError) else (
            f"an entry has the wrong type: {exc}")
        raise CheckpointError(
            file,
            f"cannot be read: {reason}",
            f"resume from another checkpoint: {_set_aside(path)}",
        ) from None
    named = STEP_NAME.match(path.name)  # a copy under a name of its own is not checked
    if named and int(named.group(1)) != manifest.step:
        raise CheckpointError(
            file, f"says step {manifest.step}, but its directory is {path.name}: the manifest "
            "was edited, or belongs elsewhere",
            f"restore it, or resume from another checkpoint: {_set_aside(path)}")
    return manifest


def verify(path: str | Path, hashes: bool = True, names: list[str] | None = None) -> list[str]:
    """Problems with the checkpoint at ``path``: manifest, then each listed file.

    ``hashes=False`` checks presence and sizes only (cheap); ``names`` limits the file checks to
    those entries, so ranks can split the hashing of a large checkpoint between them.
    """
    path = Path(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as exc:  # its fix (another checkpoint) is the caller's to give
        return [f"{exc.problem.where}: {exc.problem.message}"]
    problems = []
    names = sorted(manifest.files) if names is None else names
    for name in names:
        entry, file = manifest.files[name], path / name
        try:
            size = file.stat().st_size
            if size != entry.size:
                problems.append(f"{file}: {size} bytes, the manifest says {entry.size} "
                                "(truncated?)")
            elif hashes and sha256(file) != entry.sha256:
                problems.append(f"{file}: sha256 differs from the manifest (the file changed)")
        except FileNotFoundError:
            problems.append(f"{file}: missing (the manifest lists it)")
        except OSError as exc:  # permissions, an I/O error: a problem to name, not a crash
            problems.append(f"{file}: cannot be read ({exc.strerror or exc})")
    if INDEX in names and not any(p.startswith(str(path / INDEX)) for p in problems):
        # Here, not at import: the launcher checks resumes without importing DCP (slow).
        from orch.runtime.checkpoint.safe_load import read_metadata

        try:
            index = read_metadata(path)  # a planted pickle passes the hashes when the manifest
        except CheckpointError as exc:  # is forged
            problems.append(f"{exc.problem.where}: {exc.problem.message}")
        else:  # a file the manifest leaves out would be loaded unchecked
            used = {getattr(info, "relative_path", None) for info in index.storage_data.values()}
            unlisted = (used | set(manifest.rng_files.values())) - set(manifest.files) - {None}
            problems += [f"{path / name}: used by the checkpoint but not listed in the manifest "
                         "(so never checked)" for name in sorted(unlisted)]
    return problems


def damaged(path: Path, problems: list[str]) -> CheckpointError:
    """The error for checkpoint ``path`` whose files ``verify`` found ``problems`` with."""
    return CheckpointError(
        problems[0].split(": ", 1)[0],
        "checkpoint is damaged, nothing was loaded:\n      " + "\n      ".join(problems),
        f"resume from an older checkpoint (checkpoint.resume=<path>): {_set_aside(path)}",
    )
