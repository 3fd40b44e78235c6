"""The device mesh built from a plan has exactly the plan's (Megatron-ordered) rank groups."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from orch.config import load_config
from orch.parallel.mesh import MESH_DIMS, build_mesh
from orch.plan import build_plan
from orch.plan.layout import plan_groups


@pytest.fixture(scope="module")
def fake_world():
    """One process standing in for rank 0 of 16 (no communication happens)."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=16)
    yield
    dist.destroy_process_group()


def mesh_groups(mesh, dim: str) -> list[list[int]]:
    ranks = mesh.mesh.movedim(MESH_DIMS.index(dim), -1)
    return sorted(ranks.reshape(-1, ranks.shape[-1]).tolist())


@pytest.mark.parametrize("sets", [
    ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.tp=2", "parallel.cp=2"],
    ["parallel.dp_replicate=4", "parallel.tp=4"],
    ["parallel.pp=4", "parallel.cp=2"],
])
def test_mesh_groups_equal_plan_groups(fake_world, sets):
    plan = build_plan(load_config("configs/tiny.yaml", sets), 16, 16, "cpu")
    mesh = build_mesh(plan, "cpu")
    assert mesh.mesh.flatten().tolist() == list(range(16))
    groups = plan_groups(plan.degrees)
    for dim in MESH_DIMS:
        assert mesh_groups(mesh, dim) == sorted(groups[dim]), dim
    assert torch.equal(mesh["dp_replicate", "dp_shard"].mesh.flatten(),
                       torch.tensor(sorted(next(g for g in groups["dp"] if 0 in g))))
