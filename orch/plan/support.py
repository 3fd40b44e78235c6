"""What the plan allows but this version's runtime cannot run yet: said up front by ``orch
launch`` (before any process starts), by each worker, and beside the plan by ``orch plan``.

Imports no torch, so ``orch plan`` stays quick (the launcher's own imports pull torch in).
"""

from __future__ import annotations

import dataclasses

from orch.config import Config
from orch.config.schema import OFFLOADED
from orch.errors import Problem
from orch.plan.degrees import Degrees

OFFLOAD_HOMES_RUN = {"params": ("cpu", "nvme"), "grads": ("cpu", "nvme"),
                     "optimizer": ("cpu", "nvme"),
                     "activations": ("device", "cpu", "nvme", "auto")}
"""The homes the offload runtime (``orch.offload``) runs, per group, once anything is
offloaded (gradients and parameters always leave the device)."""


def ddp_over_tp(tp: int, fsdp: int, dp_replicate: int, pp: int = 1, moe: bool = False) -> bool:
    """Replicas by plain DDP (``fsdp``, dp_shard x cp, of one) of tensor-parallel ranks: DDP
    cannot hold DTensor parameters, so the runtime refuses it and the search never lists it. A
    pipeline's replicas and an MoE model's (whose experts tp folds) are FSDP2 with shards of
    one, not DDP (``orch.parallel.data_parallel.replicates_with_ddp``): those run, as do
    replicas of cp ranks (FSDP2 over dp_shard x cp)."""
    return tp > 1 and fsdp == 1 and dp_replicate > 1 and pp == 1 and not moe


def unsupported_features(cfg: Config, world: int) -> list[Problem]:
    """What the plan allows but this version of the runtime cannot run yet, said up front,
    each with the config fields it read (``world``'s are the caller's to add)."""
    p, off, problems = cfg.parallel, cfg.offload, []
    if ddp_over_tp(p.tp, p.dp_shard * p.cp, p.dp_replicate, p.pp, cfg.model.is_moe):
        problems.append(Problem("parallel.dp_shard", "1 with dp_replicate > 1 and tp > 1: DDP "
                                "cannot replicate tensor-parallel (DTensor) parameters",
                                "use parallel.dp_shard >= 2 (FSDP or HSDP) with tensor parallel",
                                ("parallel.dp_replicate", "parallel.tp")))
    tiers = {g: getattr(off, g) for g in OFFLOAD_HOMES_RUN}
    unrun = {g: t for g, t in tiers.items() if t not in OFFLOAD_HOMES_RUN[g]}
    if off.enabled:  # one problem per group the runtime does not run where it is asked
        offloaded = ", ".join(f"{g}={t}" for g, t in tiers.items() if t != "device")
        for group, tier in unrun.items():
            problems.append(Problem(
                f"offload.{group}", f"{tier}, with {offloaded}: once anything is offloaded this "
                f"version keeps {group} on {' or '.join(OFFLOAD_HOMES_RUN[group])}",
                f"set offload.{group}={OFFLOAD_HOMES_RUN[group][0]}", OFFLOADED))
    split = {name: degree for name, degree in (("pp", p.pp), ("tp", p.tp), ("cp", p.cp))
             if degree > 1}
    splits = (*OFFLOADED, "parallel.pp", "parallel.tp", "parallel.cp")
    if off.enabled and split:  # said first: the replica rule below cannot be met with them
        settings = " ".join(f"parallel.{name}={degree}" for name, degree in split.items())
        problems.append(Problem("offload", f"with {settings}: offloaded units are whole layers "
                                "at home on every process, so offloaded training runs one "
                                "process or data-parallel replicas only",
                                f"set {' '.join(f'parallel.{name}=1' for name in split)}, or "
                                "offload nothing", splits))
    elif off.enabled and world > 1 and p.dp_replicate != world:
        problems.append(Problem("offload", f"with {world} processes and parallel.dp_replicate="
                                f"{p.dp_replicate}: offloaded training runs one process, or "
                                f"{world} replicas (each process keeps the whole model at home "
                                "and steps a share of it on the CPU)",
                                f"set parallel.dp_replicate={world} parallel.dp_shard=1, or launch "
                                "with --nproc-per-node 1", (*splits, "parallel.dp_replicate")))
    units = cfg.model.layers + 2  # orch.offload.engine.transformer_units
    if off.enabled and world > units:
        problems.append(Problem("offload", f"with {world} processes: each offloaded replica steps "
                                f"at least one of the model's {units} units (embedding, blocks, "
                                "head)", f"launch at most {units} processes",
                                (*OFFLOADED, "model.layers")))
    if off.shard_params and off.params == "device":
        problems.append(Problem("offload.shard_params", "true with offload.params=device: "
                                "replicas share parameters that rest off the device", "set "
                                "offload.params=cpu or nvme, or offload.shard_params=false",
                                ("offload.params",)))
    if off.enabled and (p.ep > 1 or p.etp > 1):
        problems.append(Problem("offload", f"with parallel.ep={p.ep}, etp={p.etp}: offloaded "
                                "units are whole on every replica, so experts cannot be split "
                                "over ranks", "set parallel.ep=1 parallel.etp=1 (each replica "
                                "keeps every expert at home), or offload nothing",
                                (*OFFLOADED, "parallel.ep", "parallel.etp")))
    if off.enabled and cfg.model.tie_embeddings:
        problems.append(Problem("model.tie_embeddings", "true with offload: the embedding and "
                                "the head are offloaded as separate units, and one weight "
                                "cannot rest in both", "set model.tie_embeddings=false, or "
                                "offload nothing", OFFLOADED))
    if off.enabled and world > 1 and off.grads == "nvme":
        problems.append(Problem("offload.grads", f"nvme with {world} processes: replicas average "
                                "their gradients in CPU memory", "set offload.grads=cpu",
                                OFFLOADED))
    return problems


def layout_refusals(cfg: Config, degrees: Degrees, world: int) -> list[Problem]:
    """:func:`unsupported_features` of ``cfg`` laid out as ``degrees`` (a searched plan's
    own layout need not be the config's)."""
    d = degrees
    return unsupported_features(dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, pp=d.pp, dp_replicate=d.dp_replicate, dp_shard=d.dp_shard, cp=d.cp,
        tp=d.tp, ep=d.ep, etp=d.etp, virtual_stages=d.virtual_stages,
        sequence_parallel=d.sequence_parallel)), world)


__all__ = ["OFFLOAD_HOMES_RUN", "ddp_over_tp", "layout_refusals", "unsupported_features"]
