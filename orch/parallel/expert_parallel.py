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

Expert tensor parallelism (``etp > 1``) splits each expert's SwiGLU over the ``etp`` ranks of an
expert: ``w1``/``w3`` by columns and ``w2`` by rows of the hidden dimension. After step 2 the
``etp`` ranks gather each other's received rows (so each computes its hidden slice for all of
them), and before step 4 the partial outputs are reduce-scattered back (Megatron-Core's expert
tensor parallelism: all-gather before the experts, reduce-scatter after).

The expert weights become DTensors sharded ``Shard(0)`` over ``ep`` (and on the hidden dimension
over ``etp``), so distributed checkpoints hold the full ``[E, ...]`` stacks under one name and
resume onto other expert layouts, and gradient clipping sees the whole norm. Their gradients
already hold every token routed to them by the ``ep x etp`` ranks; the ranks holding the same
slice (``edp``) still average them, which ``orch.parallel.data_parallel`` does by sharding the
experts with FSDP over ``edp`` (the replicated parameters go over the dense ``dp`` ranks).
The row exchanges use ``orch.parallel.comm.all_to_all`` (differentiable, uneven splits).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Shard

from orch.errors import OrchError
from orch.models.moe import GroupedExperts, moe_layers
from orch.parallel.comm import all_to_all
from orch.parallel.comm_stats import dimension
from orch.plan.degrees import Degrees

EXPERT_MESH_DIMS = ("pp", "edp", "ep", "etp")
HIDDEN_DIM = {"w1": 2, "w3": 2, "w2": 1}
"""The hidden (SwiGLU inner) dimension of each stacked expert weight, which ``etp`` splits."""


def build_expert_mesh(deg: Degrees, device_type: str) -> DeviceMesh:
    """The folded expert mesh ``(pp, edp, ep, etp)`` over all ranks: row-major order makes
    ``etp`` fastest and ``pp`` slowest, which is ``orch.plan.layout.expert_layout``'s order, so
    ``mesh["ep"]`` is the plan's ep group of this rank and ``mesh["edp"]`` its edp group."""
    shape = (deg.pp, deg.edp, deg.ep, deg.etp)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=EXPERT_MESH_DIMS)
    if deg.edp * deg.ep * deg.etp > 1:
        # The expert weights' gradient norm is partial over all three (those of size 1 too):
        # with them flattened here (every rank takes part, as a new group needs) DTensor sums
        # it in one all-reduce, where it ran one per dimension and every rank logged a warning.
        mesh["edp", "ep", "etp"]._flatten()
    return mesh


class AllToAllDispatcher:
    """Moves permuted rows to their expert's rank, computes there, and brings the results back.

    Called by :class:`MoEFeedForward` as ``dispatcher(permuted, tokens_per_expert, compute)``:
    ``permuted`` is sorted by global expert with ``tokens_per_expert [E]`` rows each, and
    ``compute(rows, counts)`` runs the local experts on rows sorted by local expert. Every rank
    of ``ep`` (and ``etp``) must call it for the same layers in the same order (collectives).
    """

    def __init__(
        self, ep: dist.ProcessGroup, num_experts: int, etp: dist.ProcessGroup | None = None
    ) -> None:
        self.group, self.etp_group = ep, etp
        self.size = dist.get_world_size(ep)
        self.etp = dist.get_world_size(etp) if etp is not None else 1
        self.local = num_experts // self.size

    def __call__(self, permuted, tokens_per_expert, compute):  # type: ignore[no-untyped-def]
        ep, local = self.size, self.local
        send = tokens_per_expert.to(torch.int64)
        recv = torch.empty_like(send)  # recv[s * local + j]: rows source s sends to my expert j
        with dimension("ep"):
            dist.all_to_all_single(recv, send, group=self.group)
        counts = torch.stack([send, recv]).view(2, ep, local).cpu()  # the one host read
        send_sizes, recv_sizes = counts[0].sum(1).tolist(), counts[1].sum(1).tolist()
        received = all_to_all(permuted, self.group, recv_sizes, send_sizes, "ep")
        if self.etp == 1:
            out = self._compute_local(received, counts[1], compute)
        else:
            out = self._compute_tensor_parallel(received, counts[1], compute)
        return all_to_all(out, self.group, send_sizes, recv_sizes, "ep")

    def _compute_local(self, rows, from_source, compute):  # type: ignore[no-untyped-def]
        """``rows`` arrive source-major with ``from_source [source, local expert]`` counts."""
        by_expert = _sources_to_experts(rows, from_source)
        return _experts_to_sources(compute(by_expert, from_source.sum(0)), from_source)

    def _compute_tensor_parallel(self, rows, from_source, compute):  # type: ignore[no-untyped-def]
        """All-gather the etp ranks' rows, compute this rank's hidden slice for all of them, and
        reduce-scatter the partial outputs back to the ranks that brought the rows."""
        etp, group = self.etp, self.etp_group
        table = from_source.to(rows.device)  # NCCL gathers device tensors only
        tables = [torch.empty_like(table) for _ in range(etp)]
        with dimension("etp"):
            dist.all_gather(tables, table, group=group)
        tables = [t.cpu() for t in tables]  # the second host read
        sizes = [int(t.sum()) for t in tables]
        mine = rows.shape[0]
        gathered = all_to_all(rows.repeat(etp, *([1] * (rows.dim() - 1))), group, sizes,
                              [mine] * etp, "etp")
        partial = self._compute_local(gathered, torch.cat(tables), compute)
        parts = all_to_all(partial, group, [mine] * etp, sizes, "etp")
        return parts.view(etp, mine, *parts.shape[1:]).sum(0)


def _sources_to_experts(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Rows ordered ``[src0: e0 e1 .., src1: e0 e1 ..]`` -> ``[e0: src0 src1 .., e1: ..]``."""
    sources, local = counts.shape
    if sources == 1 or local == 1:
        return x
    chunks = x.split(counts.flatten().tolist())
    return torch.cat([chunks[s * local + j] for j in range(local) for s in range(sources)])


def _experts_to_sources(x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_sources_to_experts`."""
    sources, local = counts.shape
    if sources == 1 or local == 1:
        return x
    chunks = x.split(counts.t().flatten().tolist())
    return torch.cat([chunks[j * sources + s] for s in range(sources) for j in range(local)])


def _expert_mesh(mesh: DeviceMesh | dist.ProcessGroup | None) -> DeviceMesh:
    """A 1-D ``(ep,)`` or 2-D ``(ep, etp)`` mesh from what the caller has."""
    if isinstance(mesh, DeviceMesh):
        if mesh.ndim not in (1, 2):
            raise ValueError(f"expert parallelism needs an (ep,) or (ep, etp) mesh, got {mesh}")
        return mesh
    group = mesh if mesh is not None else dist.group.WORLD
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return DeviceMesh.from_group(group, device, mesh_dim_names=("ep",))


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh | dist.ProcessGroup | None) -> None:
    """Shard every MoE layer of ``model`` (a Transformer, or a single MoEFeedForward).

    ``mesh``: ``build_expert_mesh(deg, ...)["ep", "etp"]`` (expert and expert-tensor
    parallelism), a 1-D ``(ep,)`` mesh, an ep process group, or None for the world group. Apply
    after the weights are initialized (the slice is taken from the full stack) and before
    FSDP, activation checkpointing and compile. A mesh of one rank leaves the model untouched.
    """
    mesh = _expert_mesh(mesh)
    if mesh.size() == 1:
        return
    if mesh.ndim == 2 and mesh.size(1) == 1:  # no expert tensor parallelism: plain Shard(0)
        mesh = mesh[mesh.mesh_dim_names[0]]
    ep_mesh = mesh[mesh.mesh_dim_names[0]] if mesh.ndim == 2 else mesh
    etp_mesh = mesh[mesh.mesh_dim_names[1]] if mesh.ndim == 2 else None
    etp = etp_mesh.size() if etp_mesh is not None else 1
    for layer in moe_layers(model):
        experts = layer.experts
        if layer.dispatcher is not None:
            raise RuntimeError("apply_expert_parallel was already applied to this model")
        if any(isinstance(p, DTensor) for p in experts.parameters()):
            raise RuntimeError("apply expert parallelism before FSDP/tensor parallelism")
        _check_divisible(experts, ep_mesh.size(), etp)
        _shard_experts(experts, mesh, etp)
        layer.dispatcher = AllToAllDispatcher(
            ep_mesh.get_group(), experts.num_experts,
            etp_mesh.get_group() if etp > 1 else None,
        )


def _check_divisible(experts: GroupedExperts, ep: int, etp: int) -> None:
    total, hidden = experts.num_experts, experts.w1.shape[2]
    if total % ep:
        raise OrchError(
            f"parallel.ep: {ep} does not divide model.experts={total}; fix: pick an ep "
            f"degree that divides {total} (e.g. {_divisor_below(total, ep)})"
        )
    if hidden % etp:
        raise OrchError(
            f"parallel.etp: {etp} does not divide the expert hidden size {hidden}; fix: pick an "
            f"etp that divides it (e.g. {_divisor_below(hidden, etp)})"
        )


def _shard_experts(experts: GroupedExperts, mesh: DeviceMesh, etp: int) -> None:
    """Replace the full stacks by this rank's slice, as DTensors on ``mesh``."""
    ep_rank = mesh.get_local_rank(0)
    etp_rank = mesh.get_local_rank(1) if mesh.ndim == 2 else 0
    local = experts.num_experts // mesh.size(0)
    lo = ep_rank * local
    for name in ("w1", "w2", "w3"):
        full = getattr(experts, name)
        dim = HIDDEN_DIM[name]
        piece = full.detach()[lo : lo + local]
        width = piece.shape[dim] // etp
        piece = piece.narrow(dim, etp_rank * width, width).clone()
        placements: list[Placement] = [Shard(0)] + ([Shard(dim)] if mesh.ndim == 2 else [])
        shard = DTensor.from_local(piece, mesh, placements, run_check=False,
                                   shape=full.shape, stride=full.stride())
        setattr(experts, name, nn.Parameter(shard, requires_grad=full.requires_grad))
    experts.expert_offset = lo


def _divisor_below(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


__all__ = ["AllToAllDispatcher", "apply_expert_parallel", "build_expert_mesh"]
