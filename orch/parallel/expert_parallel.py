"""Expert parallelism (``parallel.ep``): each rank of an expert-parallel group owns a slice of
every MoE layer's routed experts, and tokens travel to their expert's owner and back.

Sharding: with ``ep`` ranks and ``E`` experts, group rank ``r`` keeps experts
``[r * E / ep, (r + 1) * E / ep)`` as new local parameters (``experts.w1/w2/w3`` become
``[E / ep, ...]``; ``experts.num_experts`` stays ``E``, ``experts.expert_offset`` records the
first). The router, the shared expert and ``expert_bias`` stay replicated.

Dispatch (Megatron-Core's all-to-all dispatcher), per MoE layer and micro-batch, after the local
route and ``moe_permute`` by *global* expert id:

1. exchange counts: ``all_to_all_single`` of the ``[E]`` per-expert row counts (``E / ep`` to each
   rank), so every rank learns how many rows each source sends to each of its local experts;
   one host read turns both count tables into split sizes;
2. send rows: ``all_to_all_single`` with uneven ``input_split_sizes`` (rows per destination
   rank) and ``output_split_sizes`` (rows per source rank); autograd's backward is the reverse
   exchange. What arrives is source-rank-major (``[src0: e0 e1 .., src1: e0 e1 ..]``);
3. reorder to local-expert-major (``[e0: src0 src1 .., e1: ..]``) for ``grouped_mm``, compute
   the SwiGLU of the local experts, and reorder back;
4. send results back with the reverse all-to-all; the layer then unpermutes and combines with
   the router weights on the source rank.

Experts with no rows, and ranks that send or receive nothing, are ordinary zero-size splits.

Gradients of the local expert weights stay local: they already hold every token routed to them
by the group. Ranks that hold the same expert slice (the ``edp`` dimension of the plan's expert
layout) must still average them, and the replicated parameters (router, shared expert,
attention...) over the dense data-parallel ranks; FSDP/DDP wrapping does both later (experts
over ``edp``, the rest over ``dp``). Expert tensor parallelism (``etp > 1``) is not built yet.
The row exchanges use ``orch.parallel.comm.all_to_all`` (differentiable, uneven splits).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from orch.errors import OrchError
from orch.models.moe import moe_layers
from orch.parallel.comm import all_to_all
from orch.plan.degrees import Degrees

EXPERT_MESH_DIMS = ("pp", "edp", "ep", "etp")


def build_expert_mesh(deg: Degrees, device_type: str) -> DeviceMesh:
    """The folded expert mesh ``(pp, edp, ep, etp)`` over all ranks: row-major order makes
    ``etp`` fastest and ``pp`` slowest, which is ``orch.plan.layout.expert_layout``'s order, so
    ``mesh["ep"]`` is the plan's ep group of this rank and ``mesh["edp"]`` its edp group."""
    shape = (deg.pp, deg.edp, deg.ep, deg.etp)
    return init_device_mesh(device_type, shape, mesh_dim_names=EXPERT_MESH_DIMS)


class AllToAllDispatcher:
    """Moves permuted rows to their expert's rank, computes there, and brings the results back.

    Called by :class:`MoEFeedForward` as ``dispatcher(permuted, tokens_per_expert, compute)``:
    ``permuted`` is sorted by global expert with ``tokens_per_expert [E]`` rows each, and
    ``compute(rows, counts)`` runs the local experts on rows sorted by local expert. Every rank
    of ``group`` must call it for the same layers in the same order (it is a collective).
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.local = num_experts // self.size

    def __call__(self, permuted, tokens_per_expert, compute):  # type: ignore[no-untyped-def]
        ep, local = self.size, self.local
        send = tokens_per_expert.to(torch.int64)
        recv = torch.empty_like(send)  # recv[s * local + j]: rows source s sends to my expert j
        dist.all_to_all_single(recv, send, group=self.group)
        counts = torch.stack([send, recv]).view(2, ep, local).cpu()  # the one host read
        send_sizes, recv_sizes = counts[0].sum(1).tolist(), counts[1].sum(1).tolist()
        from_source = counts[1]  # [source rank, local expert]

        received = all_to_all(permuted, self.group, recv_sizes, send_sizes)
        rows = self._source_to_expert(received, from_source)
        out = self._expert_to_source(compute(rows, from_source.sum(0)), from_source)
        return all_to_all(out, self.group, send_sizes, recv_sizes)

    def _source_to_expert(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, local = counts.shape
        if ep == 1 or local == 1:
            return x
        chunks = x.split(counts.flatten().tolist())
        return torch.cat([chunks[s * local + j] for j in range(local) for s in range(ep)])

    def _expert_to_source(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ep, local = counts.shape
        if ep == 1 or local == 1:
            return x
        chunks = x.split(counts.t().flatten().tolist())
        return torch.cat([chunks[j * ep + s] for s in range(ep) for j in range(local)])


def _group_of(ep: dist.ProcessGroup | DeviceMesh | None) -> dist.ProcessGroup:
    if isinstance(ep, DeviceMesh):
        if ep.ndim != 1:
            raise ValueError(f"expert parallelism needs a 1-D mesh (mesh['ep']), got {ep.ndim}-D")
        return ep.get_group()
    return ep if ep is not None else dist.group.WORLD


def apply_expert_parallel(
    model: nn.Module, ep: dist.ProcessGroup | DeviceMesh | None, *, etp: int = 1
) -> None:
    """Shard every MoE layer of ``model`` (a Transformer, or a single MoEFeedForward) over ``ep``.

    ``ep``: the expert-parallel process group of this rank, or a 1-D DeviceMesh (e.g.
    ``build_expert_mesh(deg, ...)["ep"]``), or None for the default (world) group; the group's
    size and this rank's position in it decide the slice. Apply after the weights are
    initialized (the slice is taken from the full stack) and before FSDP/DDP, activation
    checkpointing and compile. A group of size 1 leaves the model untouched.
    """
    if etp != 1:
        raise OrchError(
            f"parallel.etp: {etp} (expert tensor parallelism) is not supported yet; fix: set "
            "parallel.etp=1 and shard experts with parallel.ep instead"
        )
    group = _group_of(ep)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if size == 1:
        return
    for layer in moe_layers(model):
        experts = layer.experts
        if layer.dispatcher is not None:
            raise RuntimeError("apply_expert_parallel was already applied to this model")
        if any(isinstance(p, DTensor) for p in experts.parameters()):
            raise RuntimeError("apply expert parallelism before FSDP/tensor parallelism")
        total = experts.num_experts
        if total % size:
            raise OrchError(
                f"parallel.ep: {size} does not divide model.experts={total}; fix: pick an ep "
                f"degree that divides {total} (e.g. {_divisor_below(total, size)})"
            )
        local = total // size
        lo = rank * local
        for name in ("w1", "w2", "w3"):
            full = getattr(experts, name)
            shard = nn.Parameter(
                full.detach()[lo : lo + local].clone(), requires_grad=full.requires_grad
            )
            setattr(experts, name, shard)
        experts.expert_offset = lo
        layer.dispatcher = AllToAllDispatcher(group, total)


def _divisor_below(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


__all__ = ["AllToAllDispatcher", "apply_expert_parallel", "build_expert_mesh"]
