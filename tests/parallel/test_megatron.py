"""megatron-core's parallel state built from an orch plan has the plan's groups (4 gloo ranks)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from orch.config import load_config
from orch.plan import build_plan

pytestmark = pytest.mark.dist

CASES = [
    ("configs/tiny.yaml", ["parallel.tp=2", "parallel.pp=2"]),
    ("configs/tiny.yaml", ["parallel.cp=2", "parallel.dp_replicate=2"]),
    ("configs/tiny-moe.yaml", ["parallel.ep=2", "parallel.pp=2"]),
    ("configs/tiny-moe.yaml", ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
]


def _check(rank: int, world: int, store: str, results) -> None:
    warnings.simplefilter("ignore")
    from orch.parallel.megatron import destroy_megatron, initialize_megatron, megatron_groups

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for index, (config, sets) in enumerate(CASES):
            plan = build_plan(load_config(config, sets), world, world, "cpu")
            initialize_megatron(plan)
            ours = {dim: next(g for g in groups if rank in g)
                    for dim, groups in plan.groups().items()}
            theirs = megatron_groups()
            results[(index, rank)] = {dim: (ours[dim], theirs[dim]) for dim in theirs}
            destroy_megatron()
    finally:
        dist.destroy_process_group()
        os._exit(0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    store = tmp_path_factory.mktemp("megatron") / "store"
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.start_processes(_check, args=(4, str(store), shared), nprocs=4, start_method="spawn")
        return dict(shared)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_megatron_groups_equal_plan_groups(results, index):
    for rank in range(4):
        for dim, (ours, theirs) in results[(index, rank)].items():
            assert ours == theirs, (CASES[index], rank, dim)
