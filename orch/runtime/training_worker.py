"""One training process, the body of ``python -m orch.runtime.worker CONFIG [--set ...]
[--resume ...]`` (``orch.runtime.worker`` imports this module, which imports torch and all of
orch, under its Ctrl-C guard, then calls :func:`main`).

Started by ``orch launch`` (torchrun) on every rank. It rebuilds the same plan the launcher
validated, checks before any other collective that every rank holds it with the same config and
resume mode, and applies it (``orch.runtime.parallelize``: TP/SP, EP, CP, activation
checkpointing, FSDP/DDP); then the optimizer, data, checkpoint resume and training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.fsdp import FSDPModule

from orch.config import Config, load_config, recorded_config
from orch.errors import OrchError, PlanError
from orch.launch.launcher import (
    CPU_BF16,
    LAUNCH_ID,
    backend,
    launch_plan,
    planned_world_problem,
    resume_problems,
    run_precision,
    worker_parser,
)
from orch.launch.lifeline import end_with_launcher
from orch.launch.nodes import NODE_ENV
from orch.models.hf_load import HFCheckpoint
from orch.models.llama import Transformer
from orch.models.weights import SeededInit, Unfilled, WeightSource
from orch.offload.engine import offload_transformer
from orch.offload.host_memory import return_large_frees
from orch.parallel.interfaces import cluster_placement, planned_rank
from orch.parallel.pipeline.rebalance import REBALANCE_EXIT, Repartition
from orch.plan import Plan
from orch.plan.layout import dense_layout
from orch.plan.support import unsupported_features
from orch.runtime import agent_store
from orch.runtime.blend import training_stream
from orch.runtime.checkpoint import CheckpointManager, restore_rng
from orch.runtime.evaluation import Evaluation
from orch.runtime.metrics import MetricsLog
from orch.runtime.optim import build_optimizer
from orch.runtime.parallelize import RanksDisagree, agree_on_plan, agree_on_run_dir, parallelize
from orch.runtime.rank_log import log_to_file, record_failure, report_crash
from orch.runtime.train_state import TrainState
from orch.runtime.trainer import NonFiniteStep, Trainer


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    # DeepSpeed's ops (async I/O, CPU Adam) would otherwise warn that they fell back to the CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return torch.device("cpu")


def _precision(cfg: Config, device: torch.device, rank: int) -> str:
    """The precision this run computes in (:func:`~orch.launch.launcher.run_precision`); rank 0
    says so where it is not the config's."""
    precision = run_precision(cfg, device.type)
    if precision != cfg.train.precision and rank == 0:
        print(f"orch: train.precision bf16 needs a GPU; computing in fp32 on CPU "
              f"({CPU_BF16}=1 keeps bf16)", flush=True)
    return precision


def _write_run_files(run_dir: Path, cfg: Config, plan: Plan) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded_config(cfg), sort_keys=False))
    (run_dir / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1) + "\n")


def run(argv: Sequence[str]) -> None:
    # torch 2.13 warns on every rank that slicing a flattened dimension from the root mesh (how
    # FSDP gets its dp_shard x cp mesh, here as in torchtitan) is deprecated: noise in the logs.
    warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
    parser = worker_parser()
    parser.add_argument("config")
    args = parser.parse_args(list(argv))
    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if problem := planned_world_problem(world, local_world):
        # Plan nothing for a world nobody validated, and stop every rank with this one: the
        # other nodes' workers, planning the world they were given, meet it in the agreement.
        init_process_group(backend(), world)
        agree_on_plan(None, cfg, args.resume or cfg.checkpoint.resume, [problem])  # raises
    plan = launch_plan(cfg, world, local_world)
    # the plan's rank, not torchrun's: a cluster description may place this node elsewhere
    # (its log and terminal were rank 1's on the node holding rank 0, which showed no steps)
    log_to_file(cfg.run.dir, planned_rank(plan, os.environ.get(NODE_ENV)), world)
    device = _device()
    if problems := unsupported_features(cfg, world):  # the launcher says so first
        raise PlanError(problems, title="cannot run")
    with cluster_placement(cfg.cluster or "", plan, os.environ.get(NODE_ENV), backend()):
        init_process_group(backend(), world)
        train(cfg, plan, device, args.resume)


def _first_weights(cfg: Config, model: Transformer, resuming: bool) -> WeightSource:
    """Where training starts from: nothing when ``resuming`` (the checkpoint's load overwrites
    every parameter), else ``model.init_from``'s checkpoint, else orch's seeded init."""
    if resuming:
        return Unfilled()
    if cfg.model.init_from:
        return HFCheckpoint(cfg.model, model, checked=True)  # by orch launch, before start
    return SeededInit(model, cfg.train.seed)


def init_process_group(backend_name: str, world: int) -> None:
    """``dist.init_process_group``, with a key space of its own per torchrun attempt.

    torchrun's agent keeps one store for the whole job, and the process group's keys (each
    rank's gloo address, NCCL's unique id) are the same in every attempt. After a restart
    (``--max-restarts``) a worker could read its peer's address from the failed attempt: seen
    here as "Gloo connectFullMesh failed ... Connection refused" on 1 of 2 first restarts.
    The worker reaches that store within a minute, or says why, and claims its node there
    before joining (``orch.runtime.agent_store``).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend_name)
        return
    store, rank = agent_store.connect(world), int(os.environ["RANK"])
    agent_store.claim_node(store, attempt, os.environ.get("GROUP_RANK", "0"),
                           agent_store.this_launcher())
    dist.init_process_group(backend_name, store=dist.PrefixStore(f"orch/attempt-{attempt}", store),
                            rank=rank, world_size=world)


def train(cfg: Config, plan: Plan, device: torch.device, resume_arg: str | None) -> None:
    """Build the model, optimizer, data and checkpoints of ``plan`` on this rank; train."""
    rank, world = dist.get_rank(), dist.get_world_size()
    run_dir = Path(cfg.run.dir)

    if cfg.offload.enabled:  # what an offloaded step frees must leave the process
        return_large_frees()
    mode = resume_arg or cfg.checkpoint.resume
    # first: resolving the resume below is collective; the data's identity, compared there,
    # is read once for the resume's check and every save
    source = agree_on_plan(plan, cfg, mode)
    agree_on_run_dir(run_dir)  # before the resume reads it and the first save writes it
    checkpoints = CheckpointManager(run_dir, cfg, plan.to_dict(with_groups=False), rank, world,
                                    os.environ.get(LAUNCH_ID))
    resume = checkpoints.resolve_resume(mode)
    if resume is not None and (problems := resume_problems(cfg, plan.degrees, resume, source)):
        raise PlanError(problems, title="cannot resume")
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):  # shapes only: the weights are filled where they will live
        model = Transformer(cfg.model)
    weights = _first_weights(cfg, model, resuming=resume is not None)
    filling = time.perf_counter()  # the offload homes or the sharded model filled from it
    offload = None
    precision = _precision(cfg, device, rank)
    if cfg.offload.enabled:  # unit by unit into their homes (CPU or NVMe), never all in memory
        model.init_buffers()
        offload = offload_transformer(model, device, plan.offload_budget_bytes,
                                      plan.pinned_budget_bytes, cfg.offload, rank,
                                      plan.degrees.dp_replicate, weights,
                                      torch.bfloat16 if precision == "bf16" else None)
    transformer = model
    # without offload, each rank allocates and fills only its share once the plan has sharded
    par = parallelize(model, plan, cfg, device, precision, None if offload else weights)
    if isinstance(weights, HFCheckpoint):
        weights.close()
        if rank == 0:
            print(f"orch: initialized from {cfg.model.init_from} ({weights.read} tensors, "
                  f"{weights.bytes_read / 2**20:,.1f} MiB read by rank 0 in "
                  f"{time.perf_counter() - filling:.1f} s)", flush=True)
    model = par.model
    if offload is not None and par.offload_replicas is not None:
        offload.average_gradients_over(par.offload_replicas, cfg.offload.shard_params)
    if rank == 0:  # every rank agreed on the plan: record it
        _write_run_files(run_dir, cfg, plan)
    # FSDP's mixed-precision policy casts the blocks it wraps; otherwise autocast does.
    cast = any(isinstance(block, FSDPModule) for block in transformer.layers.values())
    autocast = torch.bfloat16 if precision == "bf16" and not cast else None
    optimizer = build_optimizer(model, cfg, precision)

    coords = dense_layout(plan.degrees).coords(rank)
    dp_rank = coords["dp_shard"] + coords["dp_replicate"] * plan.degrees.dp_shard
    stream = training_stream(cfg, dp_rank, plan.degrees.dp, source)
    evaluation = Evaluation.of(cfg, dp_rank, plan.degrees.dp)

    start = 0
    train_state = TrainState(model, optimizer, offload)
    if resume is not None:
        manifest = train_state.load(checkpoints, resume)
        stream.load_state_dict(manifest.data)
        restore_rng(manifest.rng)
        start = manifest.step
        if rank == 0:
            print(f"orch: resumed from {resume} at step {start}", flush=True)

    def save(step: int) -> None:  # the manager says when the checkpoint is complete
        train_state.save(checkpoints, step, stream.state_dict())

    metrics = MetricsLog(run_dir, rank == 0, sys.stdout, resume_step=start,
                         tensorboard=cfg.run.tensorboard, resumed_from=resume,
                         last_step=cfg.run.stop_at_step or cfg.train.steps)
    repartitioner = None
    if par.pipeline is not None and cfg.parallel.pp_rebalance_threshold > 0:
        from orch.parallel.pipeline.rebalance import Repartitioner

        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))

        def fits(split: list[int]) -> bool:  # (or the run's own split does not fit either)
            moved = dataclasses.replace(cfg, parallel=dataclasses.replace(
                cfg.parallel, stage_layers=split))
            return launch_plan(moved, world, local_world).fits or not plan.fits

        repartitioner = Repartitioner(cfg, list(plan.layers_per_stage), run_dir, rank, fits)
    try:
        trainer = Trainer(cfg, plan, model, optimizer, stream, metrics, device, save, autocast,
                          par.positions, par.token_group, par.ledger, par.pipeline,
                          run_dir if rank == 0 else None, offload, repartitioner,
                          finish_saves=checkpoints.poll, evaluation=evaluation)
        trainer.train(start)
    except (Repartition, NonFiniteStep):  # every rank stops here, at the same step: the save
        checkpoints.wait()  # in flight completes (the new split starts from it; it is the
        raise  # newest good one)
    except BaseException:  # the peers may be mid-step or gone: no collective, let it surface
        checkpoints.abandon()
        raise
    else:
        checkpoints.wait()  # an async save still in flight completes before the process ends
    finally:
        metrics.close()
        if offload is not None:
            offload.close()  # frees the NVMe tier's scratch file's space now


def main() -> None:
    end_with_launcher()
    code, failed = 0, True
    try:
        run(sys.argv[1:])
        failed = False
    except Repartition:  # saved; the launcher (or torchrun's restart) starts the new split
        code, failed = REBALANCE_EXIT, False
    except OrchError as exc:
        # One write each, newline included: print's separate newline let another rank's
        # message start on the same terminal line.
        if exc.speaker:  # an error every rank raises alike is said once a node
            sys.stderr.write(f"orch worker: {exc}\n")
        elif isinstance(exc, RanksDisagree) and exc.pointer:
            sys.stderr.write(f"orch worker: {exc.pointer_line()}\n")
        sys.stderr.flush()
        record_failure(exc)
        code = exc.exit_code
    except BaseException as exc:  # a bug, or torch's (out of memory, a peer gone)
        report_crash(exc)
        record_failure(exc)
        code = 1
    finally:
        # gloo threads can abort at interpreter exit after good work (DESIGN.md, known traps):
        # tear the group down ourselves and leave without running interpreter shutdown. After a
        # failure, leave at once: tearing down while a peer is gone or still inside a collective
        # can hang this rank, and its launcher with it (torchtitan stopped doing it on failure
        # for that reason).
        if dist.is_initialized() and not failed:
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
