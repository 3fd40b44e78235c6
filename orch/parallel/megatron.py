"""Megatron-Core interop: its parallel state, initialized from an orch plan.

orch numbers ranks in Megatron-Core's own order (``tp-cp-ep-dp-pp``), so megatron-core's groups
built from the plan's degrees are the plan's groups, and megatron-core layers (its tensor-parallel
linears, MoE dispatchers, ...) can run in the user's own torchrun script on the plan's layout
(``initialize_megatron(build_plan(...))``; ``orch launch`` runs orch's own worker, with no hook for
user code). ``megatron_groups`` reads the groups back so callers (and the tests) can check them
against the plan.

Megatron-Core's parallel state assumes its interleaved layout (rank ``r`` holds chunks ``r``,
``r + pp``, ...), so a plan it would misread (ZB-V's V, where rank ``r`` holds stages ``r`` and
``2 pp - 1 - r``) is refused; uneven ``parallel.stage_layers`` are not its business (see
``initialize_megatron``). HSDP's replicas (``parallel.dp_replicate``) are megatron-core's
distributed-optimizer instances: each shards over its own ``dp_shard x cp`` ranks, as FSDP does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from orch.errors import OrchError, Problem, ProblemsError
from orch.plan import Plan

# This rank's group of each plan dimension -> megatron-core's call for the same group.
_GETTERS: dict[str, Callable[[Any], Any]] = {
    "tp": lambda ps: ps.get_tensor_model_parallel_group(),
    "pp": lambda ps: ps.get_pipeline_model_parallel_group(),
    "cp": lambda ps: ps.get_context_parallel_group(),
    "dp": lambda ps: ps.get_data_parallel_group(),
    "ep": lambda ps: ps.get_expert_model_parallel_group(),
    "etp": lambda ps: ps.get_expert_tensor_parallel_group(),
    "edp": lambda ps: ps.get_expert_data_parallel_group(),
    # What its distributed optimizer and FSDP shard over: one instance's dp x cp ranks.
    "dp_shard-cp": lambda ps: ps.get_data_parallel_group(
        with_context_parallel=True, partial_data_parallel=True),
    # Across the instances; None where there is one (megatron-core then makes no such group).
    "dp_replicate": lambda ps: ps.get_inter_distributed_optimizer_instance_group(
        check_initialized=False),
}


def _parallel_state() -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # it warns about missing Transformer Engine / Apex
            from megatron.core import parallel_state
    except ImportError as exc:
        raise OrchError(
            f"megatron-core is not importable ({exc}); fix: pip install megatron-core"
        ) from exc
    return parallel_state


class MegatronPlanError(ProblemsError):
    """A plan megatron-core's parallel state cannot express, or a job that does not match it."""

    title = "megatron-core cannot take this plan"


def _problems(plan: Plan) -> list[Problem]:
    """What megatron-core's parallel state cannot express about ``plan``, or the running job
    does not match."""
    d, problems = plan.degrees, []
    if plan.schedule == "zbv":
        problems.append(Problem(
            "parallel.pp_schedule",
            "zbv places stages r and 2*pp-1-r on pipeline rank r (a V); megatron-core's parallel "
            "state assumes the interleaved layout (stages r and r+pp), so its first/last-stage "
            "answers would be wrong",
            "use parallel.pp_schedule=interleaved (same virtual_stages) for a megatron-core job",
        ))
    if d.edp % d.dp_replicate:
        problems.append(Problem(
            "parallel.dp_replicate",
            f"its {d.dp_replicate} replicas are megatron-core's {d.dp_replicate} "
            f"distributed-optimizer instances, and megatron-core needs each to hold whole expert "
            f"groups: ep x etp = {d.ep} x {d.etp} must divide one replica's dp_shard x cp x tp "
            f"= {d.dp_shard} x {d.cp} x {d.tp} ranks (edp {d.edp} is not a multiple of "
            f"{d.dp_replicate})",
            "make parallel.ep x parallel.etp divide parallel.dp_shard x parallel.cp x "
            "parallel.tp (fewer expert ranks, or more dp_shard and fewer dp_replicate), or set "
            "parallel.dp_replicate=1",
            reads=("parallel.ep", "parallel.etp", "parallel.dp_shard", "parallel.cp",
                   "parallel.tp"),
        ))
    if not dist.is_initialized():
        problems.append(Problem(
            "", "torch.distributed is not initialized",
            "call torch.distributed.init_process_group() first (under torchrun), then "
            "initialize_megatron(plan)",
        ))
    elif dist.get_world_size() != plan.world_size:
        problems.append(Problem(
            "world size",
            f"the plan is for {plan.world_size} ranks ({d.short()}), "
            f"but this job has {dist.get_world_size()}",
            f"start the job on {plan.world_size} processes, or build the plan with "
            f"world size {dist.get_world_size()}",
        ))
    return problems


def initialize_megatron(plan: Plan) -> None:
    """Create megatron-core's process groups for ``plan`` (torch.distributed must be up, with
    the plan's world size); raises :class:`MegatronPlanError` for a plan megatron-core would
    misread (ZB-V) or cannot build (HSDP replicas that split an expert group) or a job that
    does not match it. The replicas become its distributed-optimizer instances, so what its
    optimizer shards over is FSDP's ``dp_shard x cp`` group, not the whole dp. Which layers
    each stage holds is the model's to place (``plan.layers_per_stage``: orch's split, by FLOPs
    unless set), not the parallel state's, so an uneven split is no problem here."""
    if problems := _problems(plan):
        raise MegatronPlanError(problems)
    d = plan.degrees
    ps = _parallel_state()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=d.tp,
        pipeline_model_parallel_size=d.pp,
        virtual_pipeline_model_parallel_size=d.virtual_stages if d.virtual_stages > 1 else None,
        context_parallel_size=d.cp,
        expert_model_parallel_size=d.ep,
        expert_tensor_parallel_size=d.etp,
        num_distributed_optimizer_instances=d.dp_replicate,
        order="tp-cp-ep-dp-pp",
    )


def megatron_groups() -> dict[str, list[int]]:
    """This rank's megatron-core group of every dimension, as global ranks."""
    ps = _parallel_state()
    if not ps.model_parallel_is_initialized():
        raise OrchError("megatron-core's parallel state is not initialized\n"
                        "    fix: call initialize_megatron(plan) first")
    return {dim: _ranks(getter(ps)) for dim, getter in _GETTERS.items()}


def _ranks(group: Any) -> list[int]:
    """``group``'s global ranks; this rank alone for a group megatron-core does not make (the
    inter-instance group of a single distributed-optimizer instance)."""
    return [dist.get_rank()] if group is None else dist.get_process_group_ranks(group)


def destroy_megatron() -> None:
    _parallel_state().destroy_model_parallel()
