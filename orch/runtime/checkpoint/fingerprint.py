"""Which training run a checkpoint belongs to: the config fields that define its math.

A run directory belongs to one training run: checkpoints of another config are refused, never
overwritten or deleted. What counts is the part of the config that defines the run's math, so a run
may resume onto another plan or be extended, and ``config_changes`` says what changed when it is
refused.

A checkpoint is matched by re-deriving that part from the resolved config its manifest records,
not by the fingerprint hash it stores: a hash changes whenever orch adds a config field or leaves
one out of the comparison, which would make every checkpoint an older orch wrote unresumable.
Fields a saved config lacks (added since) are taken at the schema's defaults, which a new field
must give to keep the old behaviour.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from orch.config import Config, config_to_dict
from orch.config.blend import parse_blend
from orch.config.schema import AFTER_PEAK_FIELDS, COOLDOWN_FIELDS, ModelConfig
from orch.runtime.checkpoint.files import MANIFEST
from orch.runtime.checkpoint.manifest import CheckpointError, Manifest
from orch.runtime.indexed import typed_by_config
from orch.runtime.optim import after_peak_refusal, train_of

FINGERPRINT_SECTIONS = ("model", "data", "optimizer", "train")
"""Config sections that define the training run's math; the rest says how and where it runs."""
FINGERPRINT_EXCLUDED = {"train": ("steps", "decay_steps", *COOLDOWN_FIELDS, "micro_batch",
                                  "recompute", "compile", "stop_on_nonfinite"),
                        "model": ("init_from", "name"),
                        "data": ("path", "blend")}
"""Fields that may change on resume: more steps (and where the lr decay ends, or a wsd schedule's
cooldown starts and how it falls: the launcher says when that changes the steps to come,
``orch.runtime.optim.decay_change``), or another split of the
same global batch and another memory/compute trade-off when the run moves to another plan,
compiled or not; whether a non-finite step stops the run (it changes nothing while steps are
finite); where the weights started (a resume loads them from the checkpoint); the model's
label; and where the data file is, since the file itself is checked: every checkpoint saves its
identity (size and sampled sha256, ``orch.runtime.data.source_identity``; a ``data.blend``'s
files' and its normalized weights) and a resume onto other data is refused, so the same file
under another spelling of its path, or a blend's weights written otherwise, resumes."""
EXCLUDED_BEFORE: tuple[dict[str, tuple[str, ...]], ...] = (
    {"train": ("steps", "micro_batch", "recompute")},
    {"train": ("steps", "micro_batch", "recompute"), "model": ("init_from",)},
    {"train": ("steps", "micro_batch", "recompute", "compile"), "model": ("init_from",)},
    {"train": ("steps", "micro_batch", "recompute", "compile"), "model": ("init_from", "name"),
     "data": ("path",)},
    {"train": ("steps", "decay_steps", "micro_batch", "recompute", "compile"),
     "model": ("init_from", "name"), "data": ("path",)},
    {"train": ("steps", "decay_steps", "micro_batch", "recompute", "compile",
               "stop_on_nonfinite"), "model": ("init_from", "name"), "data": ("path",)},
    {"train": ("steps", "decay_steps", "micro_batch", "recompute", "compile",
               "stop_on_nonfinite"), "model": ("init_from", "name"), "data": ("path", "blend")},
)
"""``FINGERPRINT_EXCLUDED`` as earlier orchs had it, oldest first: the fingerprint a manifest
records was hashed with its own orch's, so ``fingerprint_matches`` tries each. When changing
``FINGERPRINT_EXCLUDED``, append its old value here, or every checkpoint saved before reads as
one whose config was edited."""
UNIDENTIFIED_DATA = frozenset({"data.path"})
"""Compared after all for a checkpoint saved before the data file's identity was: for it, the path
is the only sign of which data it was trained on."""


@functools.cache
def _defaults() -> dict[str, Any]:
    return config_to_dict(Config())


def _fingerprinted(config: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The part of a resolved config dict that the fingerprint covers, as JSON data (a tuple
    reads as a list, as it does from a manifest), with the fields it lacks at their defaults and
    those the schema lacks left out;
    ``keep`` names excluded fields (``section.field``) to cover nonetheless."""
    out: dict[str, Any] = {}
    for section in FINGERPRINT_SECTIONS:
        saved, defaults = config.get(section), _defaults()[section]
        # fields the schema no longer has (removed or renamed since) cannot change this run's
        # math: left out, or every checkpoint holding one would be another config's
        values = {**defaults, **{name: value for name, value in (
            saved.items() if isinstance(saved, dict) else ()) if name in defaults}}
        for name in FINGERPRINT_EXCLUDED.get(section, ()):
            if f"{section}.{name}" not in keep:
                values.pop(name, None)
        out[section] = json.loads(json.dumps(values))
    return out


def config_fingerprint(cfg: Config) -> str:
    """sha256 over the config fields that define the run's math, recorded in every manifest to
    tell runs apart at a glance (``orch ckpt inspect``); resumes compare the fields themselves
    (``config_changes``).

    Parallel degrees, offload, checkpoint, run and cluster settings are left out, and so are
    the ``FINGERPRINT_EXCLUDED`` fields, so a run can resume onto another plan or be extended;
    anything that changes what is computed changes the fingerprint.
    """
    return _digest(_fingerprinted(config_to_dict(cfg)))


def _digest(sections: dict[str, Any]) -> str:
    """sha256 of ``sections`` as canonical JSON (sorted keys, no spaces): a fingerprint."""
    text = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def fingerprint_matches(manifest: Manifest) -> bool:
    """Whether the config ``manifest`` records hashes to the fingerprint it records, as the orch
    that saved it hashed it: its own fields (none at a default: it saved every field it had),
    less the fields that orch left out (``FINGERPRINT_EXCLUDED`` or an ``EXCLUDED_BEFORE``).
    False means the config was edited after the save (``verify`` checks the files against the
    manifest, but nothing checks the manifest), so it may not describe the weights: an export's
    config.json from it would load them wrongly (another rope_theta, norm_eps, tying) or not at
    all."""
    saved = manifest.config
    if not all(isinstance(saved.get(s, {}), dict) for s in FINGERPRINT_SECTIONS):
        return False
    for excluded in (FINGERPRINT_EXCLUDED, *reversed(EXCLUDED_BEFORE)):
        covered = {section: {name: value for name, value in (saved.get(section) or {}).items()
                             if name not in excluded.get(section, ())}
                   for section in FINGERPRINT_SECTIONS}
        if _digest(covered) == manifest.fingerprint:
            return True
    return False


def edited_config(manifest: Manifest) -> str | None:
    """What is wrong with ``manifest`` when its config is not the one it was saved with
    (``fingerprint_matches``), as ``verify`` words a problem (``file: what``); else None."""
    if fingerprint_matches(manifest):
        return None
    return (f"{manifest.path / MANIFEST}: config does not hash to the fingerprint saved with it "
            f"({manifest.fingerprint[:12]}...): it was edited after the save, so it may not "
            "describe the weights")


def config_changes(manifest: Manifest, config: dict[str, Any]) -> list[str]:
    """Fingerprinted fields whose values differ between the config ``manifest`` was saved with
    and the resolved ``config``, as ``model.dim: 64 -> 128`` (there -> here); empty when the
    checkpoint belongs to this config's run. A changed schedule or floor
    (``AFTER_PEAK_FIELDS``) is not one where no step the checkpoint trained reads it
    (``orch.runtime.optim.after_peak_refusal``): the run reads as this config's from step 1."""
    source = manifest.data.get("source") if isinstance(manifest.data, dict) else None
    keep = frozenset() if source else UNIDENTIFIED_DATA
    diffs: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        elif a != b:
            diffs.append(f"{where}: {a!r} -> {b!r}")

    there, here = _fingerprinted(manifest.config, keep), _fingerprinted(config, keep)
    there["model"], here["model"] = _spelled_alike(there["model"], here["model"])
    walk(there, here, "")
    unread = set()  # fields that change nothing computed where nothing reads them
    if not reads_token_dtype(config.get("data", {})):
        unread.add("data.token_dtype")
    if not any((c.get("train") or {}).get("document_mask") for c in (manifest.config, config)):
        unread.add("data.eos_id")  # (orch data prepare prints it: pasted into a running run)
    if _schedule_changes(diffs) and _after_peak_refusal(manifest, config) is None:
        unread.update(_schedule_changes(diffs))
    return [diff for diff in diffs if diff.partition(":")[0] not in unread]


def _schedule_changes(diffs: list[str]) -> set[str]:
    """The ``AFTER_PEAK_FIELDS`` among ``config_changes``' ``diffs``, as ``train.NAME``."""
    names = {f"train.{name}" for name in AFTER_PEAK_FIELDS}
    return {field for diff in diffs if (field := diff.partition(":")[0]) in names}


def _after_peak_refusal(manifest: Manifest, config: dict[str, Any]) -> str | None:
    """``orch.runtime.optim.after_peak_refusal`` for a resume of ``manifest`` under ``config``."""
    return after_peak_refusal(manifest, train_of(config.get("train") or {}))


def _schedule_only(diffs: list[str], manifest: Manifest, config: dict[str, Any]) -> str:
    """Why a resume that changes only the schedule or its floor (``AFTER_PEAK_FIELDS``) is
    refused, and the ``--set``s that make it one nothing trained reads; nothing where other
    fields changed too (that is not the way on)."""
    if not diffs or len(_schedule_changes(diffs)) != len(diffs):
        return ""
    why = _after_peak_refusal(manifest, config)
    return ("; train.lr_schedule and train.min_lr_ratio may change on resume only where the "
            f"steps the checkpoint trained keep their lr, but {why}")


def _spelled_alike(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two ``model`` sections with a null ``head_dim`` or ``kv_heads`` that the other writes out
    read as the value null stands for (dim / heads, heads): the same model either way (a run
    resumed with ``model.head_dim: 128`` written out was refused as ``None -> 128`` and told to
    start over). A null on both sides stays null, so a changed dim is said once."""
    def meant(model: dict[str, Any]) -> dict[str, Any]:  # as ModelConfig reads a null
        dim, heads = model.get("dim"), model.get("heads")
        if not (isinstance(dim, int) and isinstance(heads, int) and heads > 0):
            return {}
        shape = ModelConfig(dim=dim, heads=heads)
        return {"head_dim": shape.head_size, "kv_heads": shape.n_kv_heads}

    a, b = dict(a), dict(b)
    for name in set(meant(a)) & set(meant(b)):
        if (a.get(name) is None) != (b.get(name) is None):
            for model in (a, b):
                model[name] = meant(model)[name] if model.get(name) is None else model[name]
    return a, b


def reads_token_dtype(data: dict[str, Any]) -> bool:
    """Whether the training data of a resolved config's ``data`` section is read by
    ``data.token_dtype``: some file of it is a ``.bin`` without a Megatron index beside it. Text,
    ``.npy`` and indexed pairs say their ids' type, so a change of it changes nothing there."""
    paths = [entry for _, entry in parse_blend(data.get("blend") or [])[0]]
    if data.get("format") != "text":
        paths.append(data.get("path") or "")
    return any(typed_by_config(path) for path in paths)


def _shown(diffs: list[str], limit: int = 8) -> str:
    more = [f"... and {len(diffs) - limit} more"] if len(diffs) > limit else []
    return ", ".join(diffs[:limit] + more)


def refuse_other_configs(checkpoints: Path, complete: list[Manifest],
                         config: dict[str, Any]) -> None:
    """Raise if any of the ``complete`` checkpoints in ``checkpoints`` is of another config."""
    others = [(m, diffs) for m in complete if (diffs := config_changes(m, config))]
    if not others:
        return
    first, diffs = others[0]
    raise CheckpointError(
        checkpoints,
        f"holds {len(others)} checkpoint(s) of another config ({first.path.name} changed, there "
        f"-> here: {_shown(diffs)})",
        "use another run.dir for this config, or set checkpoint.resume=none with a fresh "
        f"run.dir; orch never overwrites or deletes the checkpoints in {checkpoints}"
        + _weights_only(diffs, config, checkpoints.parent)
        + _schedule_only(diffs, first, config),
    )


def _weights_only(diffs: list[str], config: dict[str, Any], source: Path) -> str:
    """The way on for a resume refused because the optimizer changed: its state cannot load
    into another optimizer (Muon's momenta are not AdamW's moments), but the weights can start
    a new run, as Megatron's ``--no-load-optim`` and torchtitan's ``exclude_from_loading``
    allow; nothing where the optimizer is the same, or the model is not (its weights would
    not fit), or has experts (export and ``model.init_from`` take dense models only)."""
    changed = {diff.partition(".")[0] for diff in diffs}
    moe = (config.get("model") or {}).get("experts")
    if "optimizer" not in changed or "model" in changed or moe:
        return ""
    return (f"; to train its weights under the new optimizer settings, export them and start "
            f"a fresh run.dir from them: orch ckpt export {source} --to hf OUT, then --set "
            "model.init_from=OUT (step, data position and optimizer state start over)")


def check_same_config(manifest: Manifest, config: dict[str, Any]) -> None:
    """Raise unless ``manifest`` was saved by a config with the same math as ``config``."""
    if diffs := config_changes(manifest, config):
        raise CheckpointError(
            manifest.path,
            f"was saved by another config; changed (there -> here): {_shown(diffs)}",
            "resume with the config it was saved with, or start a fresh run.dir"
            + _weights_only(diffs, config, manifest.path)
            + _schedule_only(diffs, manifest, config),
        )
