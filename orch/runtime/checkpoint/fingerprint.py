"""The config fingerprint that ties a run directory to one training run.

A run directory belongs to one training run, identified by ``config_fingerprint``: checkpoints of
another config are refused, never overwritten or deleted. The fingerprint covers what defines the
run's math, so a run may resume onto another plan or be extended, and ``config_differences``
says what changed when it is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from orch.config import Config, config_to_dict
from orch.runtime.checkpoint.manifest import CheckpointError, Manifest

FINGERPRINT_SECTIONS = ("model", "data", "optimizer", "train")
"""Config sections that define the training run's math; the rest says how and where it runs."""
FINGERPRINT_EXCLUDED = {"train": ("steps", "micro_batch", "recompute", "compile"),
                       "model": ("init_from",)}
"""Fields that may change on resume: more steps, or another split of the same global batch and
another memory/compute trade-off when the run moves to another plan, compiled or not; and where
the weights started (a resume loads them from the checkpoint)."""


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


def refuse_other_configs(
    checkpoints: Path, complete: list[Manifest], fingerprint: str, config: dict[str, Any]
) -> None:
    """Raise if any of the ``complete`` checkpoints in ``checkpoints`` is of another config."""
    others = [m for m in complete if m.fingerprint != fingerprint]
    if not others:
        return
    first = others[0]
    diffs = config_differences(first.config, config)
    what = f"; changed (there -> here): {', '.join(diffs)}" if diffs else ""
    raise CheckpointError(
        checkpoints,
        f"holds {len(others)} checkpoint(s) of another config ({first.path.name} has "
        f"fingerprint {first.fingerprint[:12]}, this config {fingerprint[:12]}){what}",
        "use another run.dir for this config, or set checkpoint.resume=none with a fresh "
        f"run.dir; orch never overwrites or deletes the checkpoints in {checkpoints}",
    )


def check_fingerprint(manifest: Manifest, fingerprint: str, config: dict[str, Any]) -> None:
    """Raise unless ``manifest`` was saved by the config with this ``fingerprint``."""
    if manifest.fingerprint == fingerprint:
        return
    diffs = config_differences(manifest.config, config)
    raise CheckpointError(
        manifest.path,
        f"was saved by another config (fingerprint {manifest.fingerprint[:12]}, this config "
        f"{fingerprint[:12]}); changed (there -> here): {', '.join(diffs) or '?'}",
        "resume with the config it was saved with, or start a fresh run.dir",
    )
