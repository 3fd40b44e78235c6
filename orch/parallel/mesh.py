"""The device mesh of a plan.

One mesh over all ranks with the plan's dense dimensions, slowest first:
``(pp, dp_replicate, dp_shard, cp, tp)``. Row-major order makes ``tp`` the fastest-varying rank
coordinate and ``pp`` the slowest, which is exactly ``orch.plan.layout``'s Megatron order, so
every mesh sub-group equals the plan's group of the same name (tested). Dimensions of size 1 stay
in the mesh so code can always slice ``mesh["dp_replicate", "dp_shard"]``.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from orch.plan import Plan

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
