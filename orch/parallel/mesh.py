"""The device mesh of a plan.

One mesh over all ranks with the plan's dense dimensions, slowest first:
``(pp, dp_replicate, dp_shard, cp, tp)``. Row-major order makes ``tp`` the fastest-varying rank
coordinate and ``pp`` the slowest, which is exactly ``orch.plan.layout``'s Megatron order, so
every mesh sub-group equals the plan's group of the same name (tested). Dimensions of size 1 stay
in the mesh so code can always slice ``mesh["dp_replicate", "dp_shard"]``.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from orch.plan import Plan
from orch.plan.layout import dense_layout, expert_layout

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def build_mesh(plan: Plan, device_type: str) -> DeviceMesh:
    d = plan.degrees
    shape = (d.pp, d.dp_replicate, d.dp_shard, d.cp, d.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 2-D ``(dp_replicate, dp_shard x cp)`` mesh FSDP2 runs on: HSDP when both exceed 1.

    Context-parallel ranks hold the same parameters and see different tokens of the same
    samples, so FSDP shards over them too and their gradients are averaged with the shard
    group's (as torchtitan's ``dp_shard_cp``).
    """
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    return mesh["dp_replicate", "dp_shard_cp"]


def token_parallel_group(mesh: DeviceMesh, tp_routes_apart: bool) -> dist.ProcessGroup | None:
    """The ranks of this pipeline stage whose MoE layers route different tokens
    (``dp_replicate x dp_shard x cp``, and ``tp`` when ``tp_routes_apart``: MoE layers under
    sequence parallelism), or None when that is only this rank. MoE layers sum their expert
    loads over it, so every router replica keeps the same bias."""
    dims = ("dp_replicate", "dp_shard", "cp") + (("tp",) if tp_routes_apart else ())
    return _flat_group(mesh, dims, "dp_cp_tp" if tp_routes_apart else "dp_cp")


def sequence_split_group(mesh: DeviceMesh, tp_routes_apart: bool) -> dist.ProcessGroup | None:
    """The ranks holding the other parts of this rank's sequences at the MoE layers (``cp``, and
    ``tp`` when ``tp_routes_apart``), or None when that is only this rank."""
    return _flat_group(mesh, ("cp",) + (("tp",) if tp_routes_apart else ()), "cp_tp")


def _flat_group(mesh: DeviceMesh, dims: tuple[str, ...], name: str) -> dist.ProcessGroup | None:
    """The group of ``dims`` flattened (as mesh dimension ``name``); None if it is one rank."""
    names = mesh.mesh_dim_names or ()
    if all(mesh.size(names.index(d)) == 1 for d in dims):
        return None
    if len(dims) == 1:
        return mesh.get_group(dims[0])
    return mesh[dims]._flatten(name).get_group()


def mesh_problems(plan: Plan, mesh: DeviceMesh, expert_mesh: DeviceMesh | None) -> list[str]:
    """Where this rank's mesh groups differ from the plan's groups holding it (empty: none)."""
    rank = dist.get_rank()
    views = [(mesh, dense_layout(plan.degrees))]
    if expert_mesh is not None:
        views.append((expert_mesh, expert_layout(plan.degrees)))
    problems = []
    for view, layout in views:
        for dim in view.mesh_dim_names or ():
            got = dist.get_process_group_ranks(view[dim].get_group())
            want = next(g for g in layout.groups(dim) if rank in g)
            if got != want:
                problems.append(f"mesh dimension {dim} holds ranks {got}, the plan says {want}")
    return problems
