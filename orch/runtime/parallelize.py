"""Apply a plan to the model on this rank, in torchtitan's order.

Before anything else, the worker has every rank check that all ranks hold the same plan and
settings (:func:`agree_on_plan`) and see the same run directory (:func:`agree_on_run_dir`).
Here each rank builds the meshes and checks that their groups are the plan's. Then: the pipeline
split (the rank keeps its stages' layers), tensor and sequence parallelism, expert parallelism on
the folded expert mesh, context parallelism, activation checkpointing, data parallelism
(FSDP2/HSDP over the TP- and EP-sharded DTensor parameters, per pipeline stage, the experts over
their own edp ranks; DDP for pure replication), the pipeline executor, and the communication
ledger.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from orch.config import Config, config_to_dict
from orch.config.blend import blend_field
from orch.config.schema import DataConfig
from orch.errors import PlanError, Problem
from orch.models.llama import Transformer
from orch.models.moe import inject_aux_gradients, set_sequence_group
from orch.models.weights import WeightSource, materialize
from orch.parallel.comm_stats import CommLedger
from orch.parallel.context_parallel import apply_context_parallel, local_positions
from orch.parallel.data_parallel import apply_data_parallel, replicates_with_ddp
from orch.parallel.expert_parallel import apply_expert_parallel, build_expert_mesh
from orch.parallel.mesh import (
    build_mesh,
    data_parallel_mesh,
    mesh_problems,
    sequence_split_group,
    token_parallel_group,
)
from orch.parallel.pipeline.stages import prune_to_rank, stage_layers, stage_view
from orch.parallel.recompute import apply_recompute
from orch.parallel.schedules import Schedule, build_schedule
from orch.parallel.tensor_parallel import (
    apply_tensor_parallel,
    vocab_parallel_loss,
    vocab_shard,
)
from orch.plan import Plan
from orch.runtime.block_compile import compile_blocks
from orch.runtime.data import DataError, problem_of, read_like_data, source_identity

if TYPE_CHECKING:  # imported where built: torch.distributed.pipelining adds ~1.5 s to start-up
    from orch.parallel.pipeline.executor import PipelineExecutor


class RanksDisagree(PlanError):
    """Ranks hold different plans, or a mesh that is not the plan's: every rank raises it, and
    only rank 0 prints it (``speaker``), so the user reads one message; the first rank of each
    other node prints a line that points there (``pointer``), since each node's launcher shows
    only its own workers' output."""

    title = "ranks disagree"

    def __init__(self, problems: list[Problem], speaker: bool, pointer: bool = False,
                 what: str = "plan") -> None:
        super().__init__(problems)
        self.speaker = speaker
        self.pointer = pointer
        self.what = what
        """What the ranks compared: ``plan`` or ``mesh``."""

    def pointer_line(self) -> str:
        return f"ranks disagree on the {self.what}; rank 0's node shows how"


@dataclass
class Parallelized:
    model: nn.Module
    """The module to train (a DDP wrapper for pure replication)."""
    positions: torch.Tensor | None
    """Under context parallelism, the sequence positions this rank holds."""
    token_group: dist.ProcessGroup | None
    """The ranks that see different tokens (MoE expert loads are summed over them)."""
    ledger: CommLedger | None
    """Communication bytes per dimension (None on a single process)."""
    pipeline: PipelineExecutor | None = None
    """Under pipeline parallelism, runs this rank's stages (``model`` is then the rank's share
    of the model: every stage it holds, under the original parameter names)."""
    offload_replicas: dist.ProcessGroup | None = None
    """Offloaded training on several processes (pure replication): the gloo group over which
    the offload engine averages the gradients at home (the model is not wrapped in DDP)."""


def parallelize(model: nn.Module, plan: Plan, cfg: Config, device: torch.device,
                precision: str, weights: WeightSource | None = None) -> Parallelized:
    """Shard and wrap ``model`` as ``plan`` says: a model initialized on ``device``, or one
    built on the meta device with its ``weights``, which is pruned to this rank's pipeline
    stages and sharded (tensor, expert and FSDP data parallelism) before each rank allocates
    and fills its own share, so no rank ever holds the whole model."""
    world = dist.get_world_size()
    mesh = build_mesh(plan, device.type)
    d = plan.degrees
    moe = cfg.model.is_moe  # the same on every rank (collectives below depend on it)
    # Experts replicated over tensor-parallel ranks (ep < stage ranks) need the folded expert
    # mesh too: its edp ranks sum the gradients of the tokens each tp rank routed.
    folded = moe and d.experts_folded
    expert_mesh = build_expert_mesh(d, device.type) if folded else None
    _agree("mesh", "", mesh_problems(plan, mesh, expert_mesh))

    layers, stages, schedule = stage_layers(plan.layers_per_stage), [0], None
    if d.pp > 1:
        p = cfg.parallel
        schedule = build_schedule(p.pp_schedule, d.pp, plan.microbatches, d.virtual_stages,
                                  p.pp_max_deferred if p.pp_schedule.startswith("2bp-") else None)
        stages = schedule.stages_of(mesh.get_local_rank("pp"))
        prune_to_rank(model, layers, stages)
    if d.tp > 1:
        apply_tensor_parallel(model, mesh["tp"], d.sequence_parallel, loss_parallel=True)
    if expert_mesh is not None:
        apply_expert_parallel(model, expert_mesh["ep", "etp"])
    positions = None
    if d.cp > 1:
        apply_context_parallel(model, mesh.get_group("cp"), cfg.parallel.cp_kind)
        cp_rank = mesh.get_local_rank("cp")
        positions = local_positions(cfg.train.seq_len, d.cp, cp_rank, cfg.parallel.cp_kind)
    # MoE layers under tensor parallelism route each rank's sequence shard (sequence parallel).
    tp_routes_apart = d.tp > 1 and moe
    if group := sequence_split_group(mesh, tp_routes_apart):
        dims = "+".join(n for n, k in (("cp", d.cp), ("tp", d.tp)) if k > 1)
        set_sequence_group(model, group, dims)
    if (compiled := compile_blocks(model, cfg.train.compile)) and dist.get_rank() == 0:
        print(f"orch: torch.compile ({cfg.train.compile}) on this rank's {compiled} decoder "
              "blocks; the first step compiles them", flush=True)
    apply_recompute(model, cfg.train.recompute)
    parts = [model]
    if d.pp > 1:
        model.positions = positions if positions is not None else torch.arange(cfg.train.seq_len)
        parts = _stage_modules(model, layers, stages)
    dp_mesh, offload_replicas = None, None
    if cfg.offload.enabled and world > 1:  # replicas only (the launcher refuses other plans)
        offload_replicas = (dist.group.WORLD if dist.get_backend() == "gloo"
                            else dist.new_group(backend="gloo"))
    elif d.dp * d.cp > 1 or (expert_mesh is not None and d.edp > 1):
        dp_mesh = data_parallel_mesh(mesh)
        expert_dp = expert_mesh["edp"] if expert_mesh is not None else None
        # A meta-built model gets memory once sharded: after FSDP (torchtitan's order), each
        # rank allocating only its shard; before DDP, which broadcasts rank 0's values.
        if weights is not None and replicates_with_ddp(dp_mesh, expert_dp, d.pp > 1):
            materialize(model, device, weights)
            weights = None
        parts = [apply_data_parallel(part, dp_mesh, precision, expert_dp,
                                     expert_grad_divide=d.dp * d.cp, pipelined=d.pp > 1)
                 for part in parts]
    if weights is not None:
        materialize(model, device, weights, roots=parts)
    if len(stages) == 1:  # the rank's one stage is its model (maybe wrapped)
        model = parts[0]
    pipeline = None
    if schedule is not None:
        pipeline = _pipeline(parts, stages, schedule, plan, cfg, mesh, device, precision)
    token_group = token_parallel_group(mesh, tp_routes_apart)
    ledger = None
    if world > 1:
        ledger = CommLedger([m for m in (mesh, expert_mesh) if m is not None])
        for part in parts:
            if isinstance(part, DistributedDataParallel):
                assert dp_mesh is not None
                ledger.attach_ddp(part, dp_mesh.get_group("dp_replicate"))
    return Parallelized(model, positions, token_group, ledger, pipeline, offload_replicas)


def agree_on_plan(plan: Plan | None, cfg: Config, resume: str, problems: list[str] | None = None
                  ) -> dict[str, Any]:
    """Raise :class:`RanksDisagree` on every rank unless all ranks hold ``plan``, the same
    settings, the same ``resume`` (``--resume``, else ``checkpoint.resume``) and the same data
    file, and none has ``problems`` (a rank with problems may hold no plan). Returns this rank's
    data identity (:func:`~orch.runtime.data.source_identity`), read once here for the
    resume's check and every save.

    The worker's first collective: ranks that disagree would otherwise enter different
    collectives and wait for each other until the backend's timeout (30 minutes under gloo).
    Nodes started with different configs built different meshes; a node started with
    ``--resume none`` beside nodes resuming skipped the checkpoint's verification that the
    others entered (or, the other way round, crashed on its result); nodes reading different
    files of one size at a relative ``data.path`` trained together on different samples."""
    problems = list(problems or [])
    source = _data_identity(cfg.data, problems)
    held_out = None  # evaluations that read eval.path: every node's copy the same file too
    if cfg.eval.interval > 0 and cfg.eval.path:
        held_out = _data_identity(read_like_data(cfg.data, cfg.eval.path), problems, "eval.path")
    settings = _settings(cfg, source, held_out)
    del settings["checkpoint.resume"]  # the mode in effect instead, under both of its names
    settings["--resume or checkpoint.resume"] = json.dumps(resume)
    _agree("plan", _plan_fingerprint(plan, settings), problems, settings)
    assert source is not None  # else the rank had a problem and every rank raised
    return source


def _data_identity(data: DataConfig, problems: list[str], field: str = "data.path"
                   ) -> dict[str, Any] | None:
    """``data``'s identity, or None with the reason added to ``problems``: a rank that cannot
    read its copy raises nothing alone, which would leave the others waiting in the agreement.
    ``field``: the field holding ``data.path``'s file (``eval.path``: a held-out file read by
    the training data's rules), which problems are said of."""
    try:
        return source_identity(data)
    except DataError as exc:
        problems.append(str(exc.problem if field == "data.path"
                            else problem_of(exc.problem, field)))
    except OSError as exc:
        where = "data.blend" if data.blend else field
        problems.append(f"{where}: {exc.filename or data.path!r} cannot be read ({exc.strerror})")
    return None


def agree_on_run_dir(run_dir: Path) -> None:
    """Raise :class:`RanksDisagree` on every rank unless every node sees the run directory rank
    0 writes: rank 0 writes a marker file there, of a name new to this start, and the first
    rank of each node looks for it; rank 0 removes it once all have looked.

    A ``run.dir`` not on a file system every node shares (each node its own relative
    directory) trained until its first save, which failed on the other nodes ("0 bytes free",
    their checkpoints directory did not exist); the launchers, each checking its own node's
    directory, cannot tell."""
    if dist.get_world_size() == 1:
        return
    marker, problems = _write_marker(run_dir) if dist.get_rank() == 0 else (None, [])
    name = [marker.name if marker is not None else None]
    dist.broadcast_object_list(name, src=0)  # once rank 0 has written it
    first_on_node = os.environ.get("LOCAL_RANK", "0") == "0"  # the others see what it sees
    try:
        if name[0] is not None and first_on_node and not _appears(run_dir / name[0]):
            problems.append(_not_shared(run_dir))
        _agree("run directory", "", problems)
    finally:
        if marker is not None:
            marker.unlink(missing_ok=True)


def _not_shared(run_dir: Path) -> str:
    """The problem of a node whose ``run_dir`` is not the one rank 0 writes, naming where it
    points on which host."""
    return str(Problem(
        "run.dir", f"{str(run_dir)!r} ({run_dir.resolve()} on {socket.gethostname()}) is not the "
        "directory rank 0 writes: every node must see the same run.dir (a shared file system)",
        "put run.dir on a file system every node mounts at the same path (e.g. --set "
        "run.dir=/shared/runs/NAME), and start every node's launcher from the same directory "
        "or give run.dir as an absolute path"))


def _write_marker(run_dir: Path) -> tuple[Path | None, list[str]]:
    """Rank 0's marker file in ``run_dir`` (made where missing), or None and why it could not
    be written."""
    marker = run_dir / f".orch-shared-{uuid.uuid4().hex}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.touch(exist_ok=False)
    except OSError as exc:
        return None, [str(Problem("run.dir", f"{str(run_dir)!r}: cannot write {marker.name} "
                                  f"there ({exc.strerror})",
                                  "fix the permissions of run.dir or choose another"))]
    return marker, []


def _appears(path: Path, wait_s: float = 2.0) -> bool:
    """Whether ``path`` exists within ``wait_s`` seconds: a network file system may show
    another node's new file a moment late."""
    deadline = time.monotonic() + wait_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _stage_modules(model: Transformer, layers: list[range], stages: list[int]) -> list[nn.Module]:
    """The modules the pipeline runs: ``model`` itself for one stage per rank, else a view of
    it per stage (each its own FSDP unit tree and torch pipeline stage)."""
    if len(stages) == 1:
        return [model]
    last = len(layers) - 1
    return [stage_view(model, layers[s], s == 0, s == last) for s in stages]


def _pipeline(parts: list[nn.Module], stages: list[int], schedule: Schedule, plan: Plan,
              cfg: Config, mesh: DeviceMesh, device: torch.device,
              precision: str) -> PipelineExecutor:
    """The executor of this rank's stages under ``schedule``, with the micro-batch shapes
    crossing stages."""
    from orch.parallel.pipeline.executor import PipelineExecutor, StageShapes, transformer_stages
    d, t, m = plan.degrees, cfg.train, cfg.model
    tokens = t.seq_len // d.cp
    hidden = tokens // d.tp if d.sequence_parallel else tokens
    sharded = any(isinstance(part, FSDPModule) for part in parts)
    bf16 = precision == "bf16"
    tp_mesh = mesh["tp"] if d.tp > 1 else None
    vocab = (m.vocab_size if tp_mesh is None
             else vocab_shard(m.vocab_size, d.tp, tp_mesh.get_local_rank()))
    shapes = StageShapes(
        tokens=(t.micro_batch, tokens), hidden=(t.micro_batch, hidden, m.dim),
        logits=(t.micro_batch, tokens, vocab),
        hidden_dtype=torch.bfloat16 if bf16 and sharded else torch.float32,
        logits_dtype=torch.bfloat16 if bf16 else torch.float32)
    if tp_mesh is not None:  # stages exchange plain tensors: the vocabulary shard of the logits
        for part in parts:
            part.register_forward_hook(_local_logits)
    inject_aux_gradients(parts, 1.0)  # the runtime scales every gradient by 1 / microbatches
    group = mesh.get_group("pp")
    torch_stages = transformer_stages(parts, stages, schedule.num_stages, device, shapes, group,
                                      torch_split=d.tp > 1)
    return PipelineExecutor(torch_stages, schedule, group,
                            functools.partial(vocab_parallel_loss, tp_mesh=tp_mesh,
                                              vocab=m.vocab_size))


def _local_logits(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    return output.to_local() if isinstance(output, DTensor) else output


def _settings(cfg: Config, source: dict[str, Any] | None,
              held_out: dict[str, Any] | None = None) -> dict[str, str]:
    """Every setting of the resolved config as ``section.key`` -> its value, and the data
    file's ``source`` identity (``data.bytes``, ``data.sampled_sha256``; each ``data.blend``
    file's as ``data.blend[i].bytes`` ...; ``eval.path``'s, ``held_out``, as ``eval.bytes``
    ...): nodes reading different copies of a relative ``data.path`` trained together on
    different samples (of an ``eval.path``, evaluated on them), and copies of one size are told
    apart only by their contents."""
    flat = {f"{section}.{key}": json.dumps(value, sort_keys=True, default=str)
            for section, values in config_to_dict(cfg).items() if isinstance(values, dict)
            for key, value in values.items()}
    files = ([] if source is None else [("data", source)] if "blend" not in source
             else [(blend_field(index), one) for index, one in enumerate(source["blend"])])
    files += [("eval", held_out)] if held_out is not None else []
    for where, one in files:
        flat[f"{where}.bytes"] = str(one["bytes"])
        flat[f"{where}.sampled_sha256"] = one["sampled_sha256"]
        if "index" in one:  # a Megatron .idx types the ids
            flat[f"{where}.index_sha256"] = one["index"]["sampled_sha256"]
    return flat


def _plan_fingerprint(plan: Plan | None, settings: dict[str, str]) -> str:
    """What must be equal on every rank: the degrees and every setting."""
    text = json.dumps(settings, sort_keys=True)
    degrees = plan.degrees.short() if plan is not None else "no plan"
    return f"{degrees}, config {hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _agree(what: str, fingerprint: str, problems: list[str],
           settings: dict[str, str] | None = None) -> None:
    """Gather every rank's ``fingerprint`` and ``problems``; if the fingerprints of the ranks
    without problems differ or any rank has problems, raise :class:`RanksDisagree` on every
    rank (nobody is left waiting), naming the ``settings`` that differ."""
    world = dist.get_world_size()
    if world == 1 and not problems:
        return
    node = os.environ.get("GROUP_RANK", "0")  # torchrun's number for this node
    gathered: list[tuple[str, list[str], dict[str, str], str] | None] = [None] * world
    dist.all_gather_object(gathered, (fingerprint, problems, settings or {}, node))
    views: dict[str, list[int]] = {}
    found: list[Problem] = []
    for rank, item in enumerate(gathered):
        assert item is not None
        if not item[1]:  # a rank with problems may hold no plan: they say why
            views.setdefault(item[0], []).append(rank)
        found += [Problem(f"rank {rank}", message) for message in item[1]]
    if len(views) > 1:
        found.append(Problem(
            what, "; ".join(f"ranks {_ranges(ranks)} have {view}" for view, ranks in views.items())
            + _differences([item[2] for item in gathered if item is not None]),
            "start every node with the same config file, --set overrides, --resume, data and "
            "orch version"))
    if found:
        rank = dist.get_rank()
        nodes = [item[3] for item in gathered if item is not None]
        first_here = min(r for r, item in enumerate(nodes) if item == node)
        raise RanksDisagree(found, speaker=rank == 0,
                            pointer=rank == first_here and nodes[0] != node, what=what)


def _differences(settings: list[dict[str, str]]) -> str:
    """The settings whose values differ between ranks, each with its values and ranks."""
    keys = sorted({key for ranks in settings for key in ranks}
                  - {key for key in settings[0] if all(s.get(key) == settings[0][key]
                                                        for s in settings)})
    parts = []
    for key in keys:
        values: dict[str, list[int]] = {}
        for rank, ranks in enumerate(settings):
            values.setdefault(ranks.get(key, "unset"), []).append(rank)
        parts.append(f"{key}: " + ", ".join(f"{value} on ranks {_ranges(ranks)}"
                                            for value, ranks in values.items()))
    return ("; differing: " + "; ".join(parts)) if parts else ""


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    spans: list[list[int]] = []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


__all__ = ["Parallelized", "RanksDisagree", "agree_on_plan", "agree_on_run_dir", "parallelize"]
