"""megatron-core's parallel state built from an orch plan has the plan's groups (4 gloo ranks)."""

from __future__ import annotations

import warnings

import pytest
from gloo_harness import run_on_gloo

from orch.config import load_config
from orch.plan import build_plan

pytestmark = pytest.mark.dist

CASES = [
    ("configs/tiny.yaml", ["parallel.tp=2", "parallel.pp=2"]),
    ("configs/tiny.yaml", ["parallel.cp=2", "parallel.dp_replicate=2"]),
    ("configs/tiny-moe.yaml", ["parallel.ep=2", "parallel.pp=2"]),
    ("configs/tiny-moe.yaml", ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
]


def _check(rank: int, world: int, results) -> None:
    warnings.simplefilter("ignore")
    from orch.parallel.megatron import destroy_megatron, initialize_megatron, megatron_groups

    for index, (config, sets) in enumerate(CASES):
        plan = build_plan(load_config(config, sets), world, world, "cpu")
        initialize_megatron(plan)
        ours = {dim: next(g for g in groups if rank in g) for dim, groups in plan.groups().items()}
        theirs = megatron_groups()
        results[(index, rank)] = {dim: (ours[dim], theirs[dim]) for dim in theirs}
        destroy_megatron()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_on_gloo(_check, 4, tmp_path_factory.mktemp("megatron"))


@pytest.mark.parametrize("index", range(len(CASES)))
def test_megatron_groups_equal_plan_groups(results, index):
    for rank in range(4):
        for dim, (ours, theirs) in results[(index, rank)].items():
            assert ours == theirs, (CASES[index], rank, dim)
