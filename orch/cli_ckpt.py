"""``orch ckpt inspect|verify|export``: checkpoints from outside a run.

DIR is a run directory (every checkpoint under its ``checkpoints/``) or one ``step-*``
checkpoint. Nothing here starts a process group or runs code from a checkpoint
(``orch.runtime.checkpoint.safe_load``).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from orch.config.schema import COOLDOWN_FIELDS, ModelConfig


def add_ckpt_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ckpt",
        help="inspect, verify or export checkpoints",
        description="Checkpoints of a run directory (all of them) or one step-* checkpoint: "
        "what they hold, whether every file is as saved, and HuggingFace export.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = actions.add_parser(
        "inspect", help="step, plan, config, files and tensors of each checkpoint",
        description="Print each checkpoint's step, when it was saved, the plan and config it "
        "was saved under, its files and sizes, and the tensors it holds (full shapes). A DIR "
        "that is no checkpoint is named after the others are shown, with exit 2.")
    inspect.add_argument("dirs", nargs="+", metavar="DIR",
                         help="run directory or step-* checkpoint (several may be given)")
    inspect.add_argument("--tensors", action="store_true", help="list every tensor")
    inspect.add_argument("--json", action="store_true", help="print JSON (one object per "
                         "checkpoint, in a list)")
    inspect.set_defaults(func=cmd_inspect)
    verify = actions.add_parser(
        "verify", help="check every file against its manifest (exit 1 naming the bad ones)",
        description="Check each checkpoint: its manifest (and that its config is the one "
        "saved), every file's size and sha256, and that its index holds nothing but checkpoint "
        "data. Exit 0 when all are intact, 1 "
        "naming each bad file. In a run directory an unfinished save (no manifest) is listed "
        "but not an error: resume ignores it and the next save of that step replaces it.")
    verify.add_argument("dirs", nargs="+", metavar="DIR",
                        help="run directory or step-* checkpoint (several may be given)")
    verify.add_argument("--quick", action="store_true",
                        help="sizes and the index only, no hashes (fast on large checkpoints)")
    verify.set_defaults(func=cmd_verify)
    export = actions.add_parser(
        "export", help="write a checkpoint in another format (--to hf)",
        description="Write the newest complete checkpoint of DIR (or the one given) as a "
        "HuggingFace directory (LlamaForCausalLM, Qwen2's, Qwen3's, Mixtral's or Qwen3-MoE's, "
        "as the model is): config.json, safetensors shards and the model.init_from "
        "checkpoint's tokenizer files, which transformers loads and model.init_from reads "
        "back; it says which checkpoint, and which newer step directories (unfinished saves) "
        "it passed over.")
    export.add_argument("dir", metavar="DIR", help="run directory or step-* checkpoint")
    export.add_argument("--to", required=True, choices=["hf"], help="the format: hf")
    export.add_argument("out", metavar="OUT", help="directory to create (must not exist, nor be "
                        "in a run's checkpoints/, whose saves would delete it)")
    export.add_argument("--dtype", default="float32",
                        help="weights dtype: float32 (as trained), bfloat16 or float16")
    export.add_argument("--max-shard-size", default="5GB",
                        help="largest safetensors file (default 5GB)")
    export.set_defaults(func=cmd_export)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Describe the checkpoints of every DIR; a DIR that is none is said at the end (exit 2)
    after the others are shown, as verify goes on: one mistyped path among several hid the
    rest."""
    from orch.errors import ProblemsError
    from orch.runtime.checkpoint import CheckpointError
    from orch.runtime.checkpoint.browse import checkpoints_in, describe

    records, refused = [], []
    for directory in args.dirs:
        try:
            paths = checkpoints_in(directory)
        except CheckpointError as exc:
            refused.append(exc.problem)
            continue
        records += [describe(path, args.tensors) for path in paths]
    if args.json:
        print(json.dumps(records, indent=1))
    elif records:
        print("\n\n".join(render(record) for record in records))
    if refused:
        raise ProblemsError(refused, title="not a run directory or checkpoint")
    return 0


_DEGREES = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep", "etp")  # the ones a user sets
_LLAMA_ATTENTION = {name: getattr(ModelConfig(), name)
                    for name in ("head_dim", "qk_norm", "qkv_bias")}
"""Model fields the model line names only where they differ from Llama's attention: a Qwen3
checkpoint (QK-norm, heads wider than dim / heads) read as a Llama one, and a resume refused for
``model.qk_norm`` sent the user to a line that did not say it (Qwen2's biases alike)."""


def render(record: dict[str, Any]) -> str:
    """One checkpoint of ``orch ckpt inspect`` as text."""
    if record.get("removed"):
        from orch.runtime.checkpoint.browse import REMOVED

        return f"{record['path']}\n  {REMOVED}"
    if not record["complete"]:
        return f"{record['path']}\n  unfinished save (no manifest): resume ignores it"
    if "error" in record:
        fix = f"\n  fix: {record['fix']}" if record.get("fix") else ""
        return f"{record['path']}\n  damaged: {record['error']}{fix}"
    ranks = record["plan"].get("world_size", record["world_size"])
    config = record["config"]
    model, train, optimizer = (config.get(k, {}) for k in ("model", "train", "optimizer"))
    lines = [
        f"{record['path']}",
        f"  step      {record['step']} (saved {record['saved_at']} in "
        f"{record['save_seconds']:.1f} s)",
        f"  plan      {ranks} rank{'s' if ranks > 1 else ''}" + _layout(record["plan"]),
        "  model     " + " ".join(f"{k}={model[k]}" for k in (
            "dim", "layers", "heads", "kv_heads", "head_dim", "qk_norm", "qkv_bias", "vocab_size",
            "experts")
            if k in model and (k not in _LLAMA_ATTENTION or model[k] != _LLAMA_ATTENTION[k])),
        "  train     " + " ".join(f"{k}={train[k]}" for k in (
            "steps", "global_batch", "seq_len", "lr", *_schedule_keys(train), "precision",
            "seed") if k in train),
        "  optimizer " + " ".join(f"{k}={v}" for k, v in optimizer.items()  # (muon_*: Muon's)
                                  if not k.startswith("muon_") or optimizer.get("name") == "muon"),
        f"  data      {json.dumps(record['data'])}",
        f"  files     {len(record['files'])}, {_size(record['bytes'])}: " + ", ".join(
            f"{file} {_size(size)}" for file, size in record["files"].items()),
        "  tensors   " + ", ".join(
            f"{group} {g['tensors']} ({g['elements']:,} elements, {_size(g['bytes'])})"
            for group, g in record["groups"].items()) + f"; {record['values']} other values",
    ]
    for tensor in record.get("tensors", []):
        lines.append(f"    {tensor['name']}  {tensor['shape']}  {tensor['dtype']}")
    return "\n".join(lines)


def _schedule_keys(train: dict[str, Any]) -> tuple[str, ...]:
    """The saved ``train`` fields that shape the lr schedule: which one, its warmup, where its
    decay ends when set, a ``wsd`` schedule's cooldown and the floor it decays to (what a
    resume with ``--resume PATH`` goes on from: a run resumed from a stable-phase checkpoint
    needs its warmup, and places its own cooldown and floor)."""
    schedule = train.get("lr_schedule")
    ends = ("decay_steps",) if train.get("decay_steps") else ()
    cooldown = COOLDOWN_FIELDS if schedule == "wsd" else ()
    floor = ("min_lr_ratio",) if schedule != "constant" else ()
    return ("lr_schedule", "warmup_steps", *ends, *cooldown, *floor)


def _layout(plan: dict[str, Any]) -> str:
    """The plan line's tail: the degrees above 1, the pipeline's schedule and virtual stages,
    and the offload tiers away from the device, where the saved plan has them (``pp=2`` alone
    did not say which of five schedules, nor that the states lived on NVMe)."""
    saved = plan.get("degrees", {})
    parts = [f"{k}={saved[k]}" for k in _DEGREES if _above_one(saved.get(k))]
    if _above_one(saved.get("pp")) and plan.get("schedule"):
        virtual = saved.get("virtual_stages")
        stages = f", {virtual} virtual stages per rank" if _above_one(virtual) else ""
        parts[0] += f" ({plan['schedule']} schedule{stages})"
    from orch.plan.render import offloaded_tiers

    offloaded = offloaded_tiers(plan.get("tiers"))
    text = ", ".join(parts) + ("; " if parts and offloaded else "") + (
        f"offload {offloaded}" if offloaded else "")
    return f": {text}" if text else ""


def _above_one(value: Any) -> bool:
    return isinstance(value, int) and value > 1


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def cmd_verify(args: argparse.Namespace) -> int:
    from orch.runtime.checkpoint import CheckpointError
    from orch.runtime.checkpoint.browse import checkpoints_in

    paths, refused = [], 0
    for d in args.dirs:  # one that is no checkpoint is reported, and the others still checked
        try:
            paths += [(path, Path(d).resolve() == path.resolve()) for path in checkpoints_in(d)]
        except CheckpointError as exc:
            refused += 1
            print(f"BAD         {d}\n  {exc.problem}")
    # one: asked for by name, so an unfinished save is bad
    found = Counter(_verify_one(path, one, args.quick) for path, one in paths)
    print(_summary(found, refused))
    return 1 if found["bad"] or refused else 0


def _summary(found: Counter[str], refused: int) -> str:
    """verify's last line: checkpoints by outcome, then the arguments that were none (they were
    counted as bad checkpoints: ``verify nowhere RUN`` said "2 checkpoint(s), 1 bad")."""
    total = sum(found.values())
    line = f"{total} checkpoint{'' if total == 1 else 's'}: " + ", ".join(
        f"{found[what]} {what}" for what in ("ok", "bad", "unfinished", "removed")
        if found[what] or what in ("ok", "bad"))
    if found["removed"]:
        line += " while checking"
    if refused:
        line += f"; {refused} argument{'' if refused == 1 else 's'} not a checkpoint"
    return line


def _verify_one(path: Path, one: bool, quick: bool) -> str:
    """Check one listed checkpoint and print its line(s); returns ``ok``, ``bad``,
    ``unfinished`` or ``removed``. A checkpoint deleted while it is checked (a live run's
    ``checkpoint.keep_last``) is ``removed``, not bad: its files vanish mid-check."""
    from orch.runtime.checkpoint import MANIFEST, verify
    from orch.runtime.checkpoint.browse import removed_meanwhile

    had_manifest = (path / MANIFEST).exists()
    if removed_meanwhile(path, had_manifest=False):  # the whole directory gone
        return _removed(path)
    if not had_manifest and not one:
        print(f"unfinished  {path} (no manifest: resume ignores it)")
        return "unfinished"
    problems = verify(path, hashes=not quick) + _edited(path)
    if problems and removed_meanwhile(path, had_manifest):
        return _removed(path)
    if problems:
        print(f"BAD         {path}")
        for problem in problems:
            print(f"  {problem}")
        return "bad"
    print(f"ok          {path}" + (" (sizes and index; no hashes)" if quick else ""))
    return "ok"


def _edited(path: Path) -> list[str]:
    """The manifest's config edited after the save (``fingerprint.edited_config``): the files
    still match the manifest, but the config no longer says what they hold, and an export, or
    anyone reading the config, would take it at its word. [] when the manifest cannot be read
    (``verify`` says why)."""
    from orch.runtime.checkpoint import CheckpointError, read_manifest
    from orch.runtime.checkpoint.fingerprint import edited_config

    try:
        problem = edited_config(read_manifest(path))
    except CheckpointError:
        return []
    return [problem] if problem else []


def _removed(path: Path) -> str:
    from orch.runtime.checkpoint.browse import REMOVED

    print(f"removed     {path}: {REMOVED}, not counted as bad")
    return "removed"


PASSED_OVER = ("it has no manifest.json (a save that did not finish, or a checkpoint whose "
               "manifest was lost), and resume passes over it too")
"""Why ``export`` passed over a newer step directory (the only kind it passes over: one whose
manifest cannot be read, or whose files are damaged, is refused, naming it)."""


def cmd_export(args: argparse.Namespace) -> int:
    """Export, and say from which checkpoint: a run's newest step without its manifest was
    passed over for an older one with the same line as a full export of the newest."""
    from orch.models.hf_export import export_hf

    done = export_hf(args.dir, args.out, args.dtype, args.max_shard_size)
    total = sum(file.stat().st_size for file in done.files)
    print(f"wrote {args.out} from {done.checkpoint} (step {done.step}): {len(done.files)} "
          f"files, {_size(total)} (" + ", ".join(file.name for file in done.files) + ")")
    for path in done.passed_over:
        print(f"  passed over newer {path}: {PASSED_OVER}")
    for note in done.notes:
        print(f"  note: {note}")
    return 0


__all__ = ["add_ckpt_parser"]
