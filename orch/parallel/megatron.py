"""Megatron-Core interop: its parallel state, initialized from an orch plan.

orch numbers ranks in Megatron-Core's own order (``tp-cp-ep-dp-pp``), so megatron-core's groups
built from the plan's degrees are the plan's groups, and megatron-core layers (its tensor-parallel
linears, MoE dispatchers, ...) can run inside an ``orch launch`` job. ``megatron_groups`` reads
the groups back so callers (and the tests) can check them against the plan.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch.distributed as dist

from orch.errors import OrchError
from orch.plan import Plan

# This rank's group of each plan dimension -> megatron-core's getter for the same group.
_GETTERS = {
    "tp": "get_tensor_model_parallel_group",
    "pp": "get_pipeline_model_parallel_group",
    "cp": "get_context_parallel_group",
    "dp": "get_data_parallel_group",
    "ep": "get_expert_model_parallel_group",
    "etp": "get_expert_tensor_parallel_group",
    "edp": "get_expert_data_parallel_group",
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


def initialize_megatron(plan: Plan) -> None:
    """Create megatron-core's process groups for ``plan`` (torch.distributed must be up)."""
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
        order="tp-cp-ep-dp-pp",
    )


def megatron_groups() -> dict[str, list[int]]:
    """This rank's megatron-core group of every dimension, as global ranks."""
    ps = _parallel_state()
    return {dim: dist.get_process_group_ranks(getattr(ps, getter)())
            for dim, getter in _GETTERS.items()}


def destroy_megatron() -> None:
    _parallel_state().destroy_model_parallel()
