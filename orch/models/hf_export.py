"""``orch ckpt export DIR --to hf OUT``: an orch checkpoint as a HuggingFace directory: Llama's,
Qwen3's for a model with ``model.qk_norm``, Mixtral's or Qwen3-MoE's for an MoE one
(``hf.hf_family``; each routed expert's weights written as that family's per-expert tensors).

OUT gets ``config.json`` (``hf.hf_config`` of the checkpoint's own model config) and the
weights as safetensors, split into shards of at most ``max_shard_bytes`` with a
``model.safetensors.index.json`` when there is more than one, as ``save_pretrained`` writes
them; ``transformers`` loads the directory and ``model.init_from`` reads it back. Tensors are
read out of the sharded checkpoint one output shard at a time (DCP reshards any plan's
checkpoint into full tensors), so memory holds one shard, not the model. The directory is
written beside OUT and renamed into place at the end: a failed export leaves nothing named OUT,
and an existing OUT is never overwritten. The files it reads are verified against the manifest
first (sizes and hashes, as a resume does): a damaged one would export damaged weights silently;
and the manifest's config against its fingerprint and the tensors' shapes, since config.json is
written from it: one that does not describe the weights loads them wrongly or at random.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from orch.config.coerce import build, byte_count
from orch.config.schema import ModelConfig
from orch.errors import Problem, ProblemsError
from orch.models.hf import (
    EXPERT_BIAS,
    expert_bias_problem,
    hf_config,
    hf_family,
    hf_keys,
    is_expert_stack,
)
from orch.models.llama import Transformer
from orch.runtime.checkpoint.browse import (
    TensorInfo,
    contents,
    newest_complete_and_newer,
    read_tensors,
)
from orch.runtime.checkpoint.files import CHECKPOINTS, MANIFEST, STEP_NAME
from orch.runtime.checkpoint.fingerprint import fingerprint_matches
from orch.runtime.checkpoint.manifest import (
    INDEX,
    CheckpointError,
    Manifest,
    read_manifest,
    verify,
)
from orch.runtime.checkpoint.safe_load import read_metadata

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_PREFIX = "model."  # the worker saves {"model": ..., "optim": ...}
_EARLIER = ("export an earlier checkpoint (orch ckpt verify says which are ok), or restore this "
            "one")


@dataclasses.dataclass(frozen=True)
class Exported:
    """What ``export_hf`` wrote, and from which checkpoint: the command says so, since the
    newest complete checkpoint need not be the newest step directory."""

    files: list[Path]
    checkpoint: Path
    step: int
    passed_over: list[Path]
    """Step directories newer than ``checkpoint``, none with a manifest (an unfinished save)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Where the HF model computes otherwise than orch's in some cases, said not refused."""


def export_hf(checkpoint_dir: str | Path, out: str | Path, dtype: str = "float32",
              max_shard_size: int | str = 5 * 2**30) -> Exported:
    """Write the newest complete checkpoint under ``checkpoint_dir`` to ``out`` (see the module
    doc). ``max_shard_size``: bytes, or a size such as ``"5GB"``.

    ProblemsError before anything is written: first every problem of the request at once (an
    unknown dtype, a shard size that is none, an ``out`` that is empty, exists or is a link,
    one that cannot be made or one in a run's ``checkpoints/``, an MoE model no HF class
    computes, an unreadable manifest, or one whose config was edited after the save), since
    those take no time to find; then, hashing only the files the export reads, the
    checkpoint's damage; then every tensor whose shape the manifest's config does not give (a
    config.json must describe the weights it is written beside) and every balancing bias that
    is not zero (HF's routers have none). After the writing, an ``out`` that appeared meanwhile
    (``_into_place``)."""
    problems: list[Problem] = []
    path: Path | None = None
    passed_over: list[Path] = []
    try:
        path, passed_over = newest_complete_and_newer(checkpoint_dir)
    except CheckpointError as exc:  # said beside the request's own problems
        problems.append(exc.problem)
    if dtype not in DTYPES:
        problems.append(Problem("--dtype", f"{dtype!r} is not a dtype an export writes",
                                f"use one of {', '.join(DTYPES)}"))
    limit, why = _shard_size(max_shard_size)
    if why:
        problems.append(Problem("--max-shard-size", f"{str(max_shard_size)!r} {why}",
                                "give a whole number of bytes, or a size such as 5GB, 500MB or "
                                "1.5GB"))
    problems += _out_problems(out)
    out = Path(out)
    config, model, manifest = None, None, None
    try:
        manifest = read_manifest(path) if path is not None else None
    except CheckpointError as exc:
        problems.append(dataclasses.replace(exc.problem, fix=_EARLIER))
    if manifest is not None and not fingerprint_matches(manifest):
        problems.append(_edited(manifest))
    elif manifest is not None:
        model = build(ModelConfig, manifest.config.get("model"), "model", {}, problems)
        try:
            config = hf_config(model, dtype if dtype in DTYPES else "float32")
        except ProblemsError as exc:  # an MoE model no HF class computes
            problems.extend(exc.problems)
    if problems:
        raise ProblemsError(problems, title="cannot export")
    assert path is not None and manifest is not None  # (else a problem above)
    problems = [Problem(str(path), f"does not match its manifest: {damage}", _EARLIER)
                for damage in _damage(path, manifest)]
    if problems:
        raise ProblemsError(problems, title="cannot export")
    ours = [t for t in contents(path).tensors if t.name.startswith(MODEL_PREFIX)]
    if problems := _shape_problems(path, model, ours) or _bias_problems(path, ours):
        raise ProblemsError(problems, title="cannot export")
    names = {t.name: hf_names(t, model) for t in ours}
    shards = _shard(ours, names, limit)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:  # what the checks above cannot see (a read-only mount, /proc)
        raise ProblemsError([Problem(str(out), f"cannot be created ({exc.strerror})",
                                     "give --to a path in a writable directory")],
                            title="cannot export") from None
    tokenizer, special, unread = _from_init(model)
    try:
        written = _write(path, shards, names, DTYPES[dtype], tmp)
        for file in tokenizer:
            shutil.copyfile(file, tmp / file.name)
        # model_type: what transformers' Auto classes (pipeline(), vLLM) read to pick the
        # architecture; without it only LlamaForCausalLM itself could load the directory
        (tmp / "config.json").write_text(json.dumps(
            {"model_type": hf_family(model)[1], **config, **special}, indent=2) + "\n")
        _into_place(tmp, out)
    except BaseException as exc:  # DCP's CheckpointException is a BaseException
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, KeyboardInterrupt | SystemExit | ProblemsError) and not (
                path / MANIFEST).exists():
            raise ProblemsError([_removed(path)], title="cannot export") from None
        raise
    return Exported([out / name for name in [*written, *(f.name for f in tokenizer),
                                             "config.json"]],
                    path, manifest.step, passed_over, _notes(model) + unread)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")
"""What save_pretrained writes beside the weights of a model whose ids are its tokenizer's."""
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _from_init(model: ModelConfig) -> tuple[list[Path], dict[str, Any], list[str]]:
    """What a model fine-tuned from ``model.init_from`` keeps of that checkpoint: its tokenizer
    files (the ids it was trained on are that tokenizer's: an export without them loaded in
    transformers with nothing to encode text) and special token ids (the byte tokenizer's are
    none); and a note where the directory can no longer be read, so none was copied."""
    if not model.init_from:
        return [], {}, []
    source = Path(model.init_from)
    try:
        theirs = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        return [], {}, [f"model.init_from {source} cannot be read any more: its tokenizer files "
                        "and special token ids were not copied; copy them from the original "
                        "checkpoint"]
    special = {key: theirs[key] for key in SPECIAL_IDS if isinstance(theirs, dict)
               and theirs.get(key) is not None}
    return [source / name for name in TOKENIZER_FILES if (source / name).is_file()], special, []


def _notes(model: ModelConfig) -> list[str]:
    """What the export's HF model computes otherwise than orch's where it does: an expert
    capacity (``model.capacity_factor``) drops a token's copies routed to an expert beyond it,
    in training and evaluation alike, where transformers' MoE classes route every token (as
    orch does with it null); the weights are the same, and so are the outputs where no expert
    overflows."""
    if not model.is_moe or model.capacity_factor is None:
        return []
    return [f"model.capacity_factor is {model.capacity_factor:g}: orch drops the routed copies "
            f"over an expert's capacity, {hf_family(model)[0]} routes every token, so their "
            "outputs differ where an expert overflows (as orch's own do with "
            "model.capacity_factor: null)"]


def _out_problems(given: str | Path) -> list[Problem]:
    """Why the export cannot be written to ``given``: empty (``Path("")`` is ".", which exists,
    so "" was refused as "- .: exists"), taken (a link too, dangling or not: ``exists()``
    follows links), not creatable, or in a run's ``checkpoints/``."""
    if str(given) == "":
        return [Problem("OUT", "is empty", "give the directory to create, such as runs/tiny-hf")]
    out = Path(given)
    if out.is_symlink() and not out.exists():
        problems = [Problem(str(out), f"is a link to {os.readlink(out)}, which does not exist; "
                            "an export never writes through a link",
                            "choose a new directory, or remove the link")]
    elif out.exists():
        problems = [Problem(str(out), "exists; an export never overwrites",
                            "choose a new directory, or remove this one")]
    else:
        problems = _unwritable(out.parent)
    return problems + _in_checkpoints(out)


def _into_place(tmp: Path, out: Path) -> None:
    """Rename the finished export ``tmp`` to ``out``, which was absent when the export began.
    One that appeared since (a second export into the same path, a link made meanwhile) fails
    the rename (not empty, not a directory) and is left as it is: a ProblemsError, not the
    OSError's traceback. (rename(2) replaces a directory that appeared empty: nothing is lost.)"""
    try:
        os.replace(tmp, out)
    except OSError as exc:
        if not (out.exists() or out.is_symlink()):
            raise  # not what this export raced with: an internal error, with its traceback
        raise ProblemsError([Problem(str(out), f"appeared while exporting ({exc.strerror}); "
                                     "nothing of it was touched, and nothing was written",
                                     "export again into a new directory")],
                            title="cannot export") from None


def _shard_size(given: int | str) -> tuple[int, str]:
    """``--max-shard-size`` in bytes, and what is wrong with it ("" if nothing): one reason each,
    since "is not a positive byte size" said of ``1.5`` (1.5 bytes) sent users looking for a
    sign or a unit."""
    size = Fraction(given) if isinstance(given, int) else byte_count(given)
    if size is None:
        return 0, "is not a byte size"
    if size.denominator != 1:
        return 0, "is not a whole number of bytes"
    if size <= 0:
        return 0, "is not a positive size"
    return int(size), ""


def _edited(manifest: Manifest) -> Problem:
    """The problem of a manifest whose config is not the one it was saved with: a config.json
    written from it would describe other weights than the checkpoint's (``fingerprint_matches``)."""
    return Problem(str(manifest.path / MANIFEST), "config does not hash to the fingerprint saved "
                   f"with it ({manifest.fingerprint[:12]}...): it was edited after the save, so "
                   "a config.json written from it may not describe the weights (transformers "
                   "would load them with other shapes, rope_theta, norm_eps or tying)",
                   "restore manifest.json's config as it was saved (the run directory's "
                   "config.yaml holds the resolved config), or export an earlier checkpoint "
                   "(orch ckpt verify says which are ok)")


def _shape_problems(path: Path, model: ModelConfig, held: list[TensorInfo]) -> list[Problem]:
    """Where the checkpoint's model tensors ``held`` differ from those of ``model`` (its
    manifest's config), built on the meta device (no memory): a tensor of another shape, one
    missing, or one the model has no place for. A config.json from a config that does not
    describe the tensors makes transformers re-initialize the mismatched weights at random
    ("Reinit due to size mismatch") and load the model anyway. A tied model's head may be
    absent: the export writes the embedding for it."""
    with torch.device("meta"):
        wanted = {MODEL_PREFIX + name: tuple(t.shape)
                  for name, t in Transformer(model).state_dict().items()}
    saved = {t.name: t.shape for t in held}
    head = MODEL_PREFIX + "output.weight"
    differ = [f"{name} is {list(saved[name])}, the config's model {list(shape)}"
              for name, shape in wanted.items() if name in saved and saved[name] != shape]
    differ += [f"{name} is missing" for name in wanted
               if name not in saved and not (model.tie_embeddings and name == head)]
    differ += [f"{name} has no place in the config's model" for name in saved
               if name not in wanted]
    if not differ:
        return []
    shown = differ[:4] + ([f"and {len(differ) - 4} more"] if len(differ) > 4 else [])
    return [Problem(str(path / MANIFEST), "config.model does not describe the checkpoint's "
                    f"tensors ({'; '.join(shown)}): the manifest belongs to another "
                    "checkpoint, or its config was edited",
                    "restore the manifest.json saved with this checkpoint, or export an earlier "
                    "checkpoint (orch ckpt verify says which are ok)")]


def _removed(path: Path) -> Problem:
    """The checkpoint ``path`` was deleted (manifest first, ``files.remove_checkpoint``) while
    its tensors were read: most likely by the retention of a run still saving into its run
    directory. DCP's read then fails with errors that do not say so (an AssertionError, a
    claim of a per-rank index)."""
    return Problem(str(path), "was removed while it was being exported, probably by "
                   "checkpoint.keep_last of a run still saving there; nothing was written",
                   "export again (the newest checkpoint is removed last), export one that "
                   "checkpoint.keep_every keeps, or export after the run has stopped")


def _damage(path: Path, manifest: Manifest) -> list[str]:
    """``verify``'s findings (sizes and hashes, as a resume checks) for the files the export
    reads: the index and the files holding the model's tensors; the optimizer's states, twice
    the model's bytes under AdamW, are not hashed where they have files of their own (an
    offloaded run's bounded files)."""
    try:
        index = read_metadata(path)
    except CheckpointError as exc:
        return [f"{exc.problem.where}: {exc.problem.message}"]
    read = {INDEX} | {info.relative_path for key, info in index.storage_data.items()
                      if key.fqn.startswith(MODEL_PREFIX)}
    return verify(path, names=sorted(read & set(manifest.files)))


def _bias_problems(path: Path, held: list[TensorInfo]) -> list[Problem]:
    """The balancing biases among the checkpoint's tensors ``held`` that are not all zero (read:
    one vector per MoE layer), each a problem (``hf.expert_bias_problem``)."""
    biases = [t for t in held if EXPERT_BIAS.fullmatch(t.name.removeprefix(MODEL_PREFIX))]
    read = read_tensors(path, biases) if biases else {}
    return [expert_bias_problem(name) for name, bias in read.items() if bias.any()]


def hf_names(info: TensorInfo, model: ModelConfig) -> list[str]:
    """The HuggingFace keys of checkpoint tensor ``info`` (``model.<our fqn>``) in ``model``'s
    family: one, or one per expert of a stacked routed-expert weight (``hf.hf_keys``); none for
    the head of a tied model (HF stores the embedding once) and the balancing biases (zero:
    ``_bias_problems``), the tensors the export leaves out. ProblemsError for any other tensor
    ``hf_keys`` has no key for: the export would have dropped it without a word (a model
    parameter the mapping does not know yet)."""
    fqn = info.name.removeprefix(MODEL_PREFIX)
    if model.tie_embeddings and fqn == "output.weight" or EXPERT_BIAS.fullmatch(fqn):
        return []
    family = hf_family(model)
    if not (hf := hf_keys(fqn, family[1], info.shape[0] if is_expert_stack(fqn) else 0)):
        raise ProblemsError([Problem(info.name, f"has no {family[0]} key (orch.models.hf."
                                     "hf_keys maps none), so the export would leave it out",
                                     "keep this model in orch's own checkpoints: HuggingFace "
                                     "export covers the parameters HuggingFace's classes have")],
                            title="cannot export")
    return hf


def _unwritable(parent: Path) -> list[Problem]:
    """Why the export cannot create a directory in ``parent`` (made with its own parents if
    missing), if it cannot: the nearest existing ancestor must be a writable directory."""
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return []
    why = "is not a directory" if not existing.is_dir() else "is not writable"
    return [Problem(str(existing), f"{why}, so the export cannot be written under it",
                    "give --to a path in a writable directory")]


RUN_FILES = ("plan.json", "metrics.jsonl")
"""Files every run writes beside its ``checkpoints/`` as it starts, before its first save."""


def _in_checkpoints(out: Path) -> list[Problem]:
    """Why ``out`` cannot be written where it is, if it is a run's ``checkpoints/`` directory
    or inside one: the run's saves take a step directory without a manifest for an unfinished
    save and delete it (``checkpoint.keep_last``'s retention, a save of the same step), and an
    export inside a checkpoint goes when that checkpoint is pruned; so a later training run
    would delete the export. A ``checkpoints`` directory is a run's when it holds step
    directories (the one being exported always does) or sits beside a run's files (a run that
    has not saved yet)."""
    resolved = out.resolve()  # through .. and links, to the directory a run would see
    for folder in (resolved, *resolved.parents):
        if folder.name == CHECKPOINTS and (_holds_steps(folder) or any(
                (folder.parent / name).is_file() for name in RUN_FILES)):
            where = "is" if folder == resolved else f"is inside {folder},"
            return [Problem(str(out), f"{where} a run's {CHECKPOINTS} directory, whose saves "
                            "delete what they take for an unfinished or pruned checkpoint",
                            f"export outside it, such as to {folder.parent / 'hf'}")]
    return []


def _holds_steps(folder: Path) -> bool:
    """Whether ``folder`` holds a step directory (complete, unfinished or moved aside)."""
    try:
        return any(STEP_NAME.match(entry.name) for entry in folder.iterdir())
    except OSError:  # missing, or not a directory we can list
        return False


def _shard(infos: list[TensorInfo], names: dict[str, list[str]],
           max_bytes: int) -> list[list[TensorInfo]]:
    """Tensors in HF key order (a stacked expert weight's first expert's), cut into
    consecutive groups of at most ``max_bytes`` (a tensor larger than that gets a shard of its
    own; a stacked expert weight stays in one)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in sorted((i for i in infos if names[i.name]), key=lambda i: names[i.name][0]):
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return [shard for shard in shards if shard]


def _write(path: Path, shards: list[list[TensorInfo]], names: dict[str, list[str]],
           dtype: torch.dtype, out: Path) -> list[str]:
    from safetensors.torch import save_file

    files = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(files, shards, strict=True):
        tensors = read_tensors(path, shard)
        renamed = {key: (t[j].T if is_expert_stack(n.removeprefix(MODEL_PREFIX)) else t)
                   .to(dtype).contiguous() for n, t in tensors.items()
                   for j, key in enumerate(names[n])}
        save_file(renamed, str(out / file), metadata={"format": "pt"})
        os.chmod(out / file, 0o666 & ~_umask())  # safetensors writes 0600; like config.json
        weight_map.update({key: file for key in renamed})
        total += sum(t.numel() * t.element_size() for t in renamed.values())
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        files.append("model.safetensors.index.json")
    return files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["DTYPES", "Exported", "export_hf", "hf_names"]
