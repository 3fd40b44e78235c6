"""Data parallelism: FSDP2 sharding over ``dp_shard``, replication over ``dp_replicate``.

``fully_shard`` on a 2-D ``(dp_replicate, dp_shard)`` mesh is HSDP: parameters are sharded
inside each replica and gradients all-reduced across replicas; with ``dp_replicate == 1`` it is
plain FSDP. Each decoder block is its own FSDP unit, so only one block's parameters are unsharded
at a time, and the root unit holds the embedding, final norm and output head (as torchtitan
does). Pure replication (``dp_shard == 1``) uses DDP instead: its bucketed all-reduce overlaps
backward and keeps parameters plain tensors, where FSDP2 with shards of one would pay DTensor
dispatch on every optimizer op (0.64x DDP's throughput on the tiny model on CPU, measured),
except for pipeline stages: DDP reduces from autograd's accumulation hooks, which a split backward
(input gradients first, weight gradients later) never fires, so replicas drifted apart silently
(pp2 x ddp2: loss 3.9954 at step 6 against 3.9866 for one process); pipelined replicas are HSDP
with shards of one, which torch's pipeline runtime reduces once per step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from orch.models.moe import MoEFeedForward


def apply_data_parallel(
    model: nn.Module,
    dp_mesh: DeviceMesh,
    precision: str,
    expert_dp_mesh: DeviceMesh | None = None,
    expert_grad_divide: int = 1,
    pipelined: bool = False,
) -> nn.Module:
    """Wrap ``model`` (an ``orch.models.llama.Transformer``) for data parallelism on the 2-D
    ``(replicate, shard)`` mesh ``dp_mesh`` (``orch.parallel.mesh.data_parallel_mesh``);
    returns the module to train (a DDP wrapper for pure replication outside a pipeline, else
    ``model`` itself).

    Under expert parallelism (experts already DTensors over ``ep``), ``expert_dp_mesh`` is the
    expert layout's ``edp`` mesh: each MoE layer's experts become their own FSDP unit over it,
    before their block, so the block's unit leaves them out (when ``dp_mesh`` is one rank, only the
    experts are wrapped; a pipeline stage then is no FSDP module, and orch's stage keeps its expert
    units gathered and reduces them once per step: ``orch.parallel.pipeline.late_grads``). Their
    gradients are sums over the tokens of ``expert_grad_divide`` ranks (the dense data-parallel
    size: every rank's loss is a mean over its own tokens), so FSDP divides by that instead of the
    edp size. DDP cannot hold DTensor parameters: expert parallelism always takes the FSDP path.

    Under ``bf16`` the blocks compute in bf16 and reduce gradients in fp32, while parameters and
    optimizer state stay fp32 (FSDP2's mixed precision; DDP under autocast); under ``fp32``
    nothing is cast.
    """
    if replicates_with_ddp(dp_mesh, expert_dp_mesh, pipelined):
        return DistributedDataParallel(model, process_group=dp_mesh.get_group("dp_replicate"))
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    # Only the experts when the dense layers have no data parallelism (experts replicated over
    # tensor-parallel ranks that routed different tokens).
    dense = dp_mesh.size() > 1
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them
        # gathered. A pipeline stage keeps all of them for the step (torch's runtime gathers
        # once and reshards at the end, as torchtitan does): its split backward looks up the
        # parameters autograd used, which must still be the gathered ones.
        reshard = index < len(blocks) - 1 and not pipelined
        if expert_dp_mesh is not None and isinstance(block.feed_forward, MoEFeedForward):
            experts = block.feed_forward.experts
            fully_shard(experts, mesh=expert_dp_mesh, mp_policy=policy,
                        reshard_after_forward=reshard)
            experts.set_gradient_divide_factor(float(expert_grad_divide))
            # NCCL applies the factor inside the reduce-scatter (PREMUL_SUM); gloo cannot. (On
            # one rank, torch 2.13 would divide twice with the forced sum: keep its default.)
            gloo = expert_dp_mesh.device_type == "cpu"
            experts.set_force_sum_reduction_for_comms(gloo and expert_dp_mesh.size() > 1)
        if dense:
            fully_shard(block, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard)
    if dense:
        fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    return model


def replicates_with_ddp(dp_mesh: DeviceMesh, expert_dp_mesh: DeviceMesh | None,
                        pipelined: bool) -> bool:
    """Whether :func:`apply_data_parallel` wraps in DDP (pure replication outside a pipeline),
    which needs its parameters' values (it broadcasts rank 0's), rather than in FSDP, which
    shards parameters that may still be on the meta device."""
    return dp_mesh.size(1) == 1 and expert_dp_mesh is None and not pipelined


def set_gradient_sync(model: nn.Module, last: bool, grad_reduce: str) -> None:
    """Say whether the coming backward is its step's ``last`` micro-batch's, under
    ``parallel.grad_reduce``.

    ``step`` reduces once per step: the earlier micro-batches skip the reduce-scatter (and
    HSDP's all-reduce) and FSDP2 keeps each unit's whole unsharded fp32 gradient until the last
    backward reduces the sum. ``microbatch`` (torchtitan's default) reduce-scatters every
    backward, so only shards are kept between micro-batches; HSDP defers only its all-reduce
    across replicas to the last (FSDP2 adds the reduce-scatter outputs up until then: torch PR
    126166). DDP keeps whole gradients either way, so it always skips until the last; a pipeline
    stage's sync is its runtime's (it reduces once per step) and never comes here."""
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = last  # what DDP.no_sync() toggles
        return
    for module in model.modules():  # the root, or only the experts' units
        if isinstance(module, FSDPModule):
            if grad_reduce == "microbatch":
                module.set_requires_gradient_sync(True, recurse=False)
                module.set_requires_all_reduce(last, recurse=False)  # HSDP's only
            else:
                module.set_requires_gradient_sync(last, recurse=False)
