"""megatron-core's parallel state built from an orch plan has the plan's groups (4 gloo ranks),
HSDP's among them (its distributed optimizer's shard and inter-instance groups); plans it would
misread or cannot build, and jobs that do not match the plan, are refused with what to do."""

from __future__ import annotations

import warnings

import pytest
import torch.distributed as dist
from gloo_harness import run_on_gloo

from orch.config import load_config
from orch.errors import OrchError
from orch.plan import build_plan

pytestmark = pytest.mark.dist

CASES = [
    ("configs/tiny.yaml", ["parallel.tp=2", "parallel.pp=2"]),
    # an uneven split (the plan's by FLOPs, or set) is the model's to place, not the parallel
    # state's: it was refused, so every default pipeline plan was
    ("configs/tiny.yaml", ["parallel.pp=2", "parallel.stage_layers=[3,1]"]),
    # HSDP: megatron-core's distributed optimizer sharded over the whole dp ([0,1,2,3]), not
    # the plan's dp_shard x cp ([0,1]/[2,3]), and had no inter-instance ([0,2]/[1,3]) group
    ("configs/tiny.yaml", ["parallel.dp_replicate=2", "parallel.dp_shard=2"]),
    ("configs/tiny.yaml", ["parallel.cp=2", "parallel.dp_replicate=2"]),
    ("configs/tiny-moe.yaml", ["parallel.dp_replicate=2", "parallel.ep=2"]),
    ("configs/tiny-moe.yaml", ["parallel.ep=2", "parallel.pp=2"]),
    ("configs/tiny-moe.yaml", ["parallel.tp=2", "parallel.ep=2", "parallel.etp=1"]),
]

# Refused: (config, overrides, world size of the plan) on 4 ranks.
REFUSED = {
    "zbv": ("configs/tiny.yaml", ["parallel.pp=2", "parallel.pp_schedule=zbv",
                                  "parallel.virtual_stages=2"], 4),
    "world": ("configs/tiny.yaml", ["parallel.tp=2"], 2),
    "replicas": ("configs/tiny-moe.yaml", ["parallel.dp_replicate=2", "parallel.ep=4"], 4),
}
EXPECTED = {
    "zbv": ["parallel.pp_schedule", "zbv", "fix: use parallel.pp_schedule=interleaved"],
    "world": ["the plan is for 2 ranks", "this job has 4", "fix: start the job on 2 processes"],
    "replicas": ["parallel.dp_replicate: its 2 replicas", "ep x etp = 4 x 1 must divide",
                 "dp_shard x cp x tp = 2 x 1 x 1", "fix: make parallel.ep x parallel.etp divide"],
    "groups before initialize": ["not initialized", "fix: call initialize_megatron(plan) first"],
}


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
    for name, (config, sets, plan_world) in REFUSED.items():
        plan = build_plan(load_config(config, sets), plan_world, plan_world, "cpu")
        try:
            initialize_megatron(plan)
            results[(name, rank)] = "initialized"
            destroy_megatron()
        except OrchError as exc:
            results[(name, rank)] = str(exc)
    try:
        megatron_groups()
        results[("groups before initialize", rank)] = "returned"
    except OrchError as exc:
        results[("groups before initialize", rank)] = str(exc)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_on_gloo(_check, 4, tmp_path_factory.mktemp("megatron"))


@pytest.mark.parametrize("index", range(len(CASES)))
def test_megatron_groups_equal_plan_groups(results, index):
    for rank in range(4):
        for dim, (ours, theirs) in results[(index, rank)].items():
            assert ours == theirs, (CASES[index], rank, dim)


@pytest.mark.parametrize("name", EXPECTED)
def test_megatron_refuses_what_it_would_misread(results, name):
    for rank in range(4):
        message = results[(name, rank)]
        for part in EXPECTED[name]:
            assert part in message, (name, rank, message)


def test_megatron_needs_torch_distributed():
    from orch.parallel.megatron import initialize_megatron

    assert not dist.is_initialized()
    plan = build_plan(load_config("configs/tiny.yaml", []), 1, 1, "cpu")
    with pytest.raises(OrchError, match="torch.distributed is not initialized") as info:
        initialize_megatron(plan)
    assert "fix: call torch.distributed.init_process_group()" in str(info.value)
