"""Every plan rule: feed the bad degrees, check the message names the field, value and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from orch.config import load_config
from orch.errors import PlanError
from orch.plan import build_plan

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/tiny.yaml"
MOE = REPO / "configs/tiny-moe.yaml"
LLAMA = REPO / "configs/llama3-8b.yaml"


def plan_problems(config: Path, overrides: list[str], **machine) -> str:
    with pytest.raises(PlanError) as info:
        build_plan(load_config(config, overrides), **machine)
    return str(info.value)


@pytest.mark.parametrize(
    "config,overrides,machine,message",
    [
        (TINY, ["parallel.tp=3"], {"world_size": 3}, "model.heads=8 is not divisible by tp=3"),
        (
            TINY,
            ["parallel.tp=8", "model.kv_heads=4"],
            {"world_size": 8},
            "model.kv_heads=4 is not divisible by tp=8",
        ),
        (
            TINY,
            ["parallel.tp=2", "model.ffn_dim=687"],
            {"world_size": 2},
            "model.ffn_dim=687 is not divisible by tp=2",
        ),
        (
            TINY,
            ["parallel.pp=5"],
            {"world_size": 5},
            "5 pipeline stages for model.layers=4: each stage needs a layer",
        ),
        (
            TINY,
            ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.virtual_stages=4",
             "model.layers=10"],
            {"world_size": 2},
            "is not divisible by pp x virtual_stages = 2 x 4",
        ),
        (  # no stage_layers can give 8 stages a layer each of 4: pp or virtual_stages must go
            TINY,
            ["parallel.pp=4", "parallel.pp_schedule=zbv", "parallel.virtual_stages=2"],
            {"world_size": 4},
            "8 pipeline stages (pp x virtual_stages = 4 x 2) for model.layers=4: each stage needs "
            "a layer\n        fix: pick pp and virtual_stages whose product is at most 4",
        ),
        (
            TINY,
            ["parallel.pp=2", "parallel.stage_layers=[1, 2]"],
            {"world_size": 2},
            "[1, 2] must be 2 numbers (pp x virtual_stages = 2 x 1), each at least 1, adding "
            "up to model.layers=4",
        ),
        (
            TINY,
            ["parallel.pp=2", "model.tie_embeddings=true"],
            {"world_size": 2},
            "true with pp=2: the embedding and the output head live on different stages",
        ),
        (MOE, ["parallel.ep=3"], {"world_size": 3}, "model.experts=4 is not divisible by ep=3"),
        (
            MOE,
            ["parallel.etp=3", "model.expert_ffn_dim=344"],
            {"world_size": 3},
            "expert_ffn_dim=344 is not divisible by etp=3",
        ),
        (
            MOE,
            ["parallel.ep=4"],
            {"world_size": 2},
            "ep x etp = 4 x 1 does not fold into the 2 ranks",
        ),
        (
            TINY,
            ["parallel.cp=4", "train.seq_len=100"],
            {"world_size": 4},
            "100 is not divisible by 2 x cp = 8",
        ),
        (
            TINY,
            ["parallel.cp=3", "parallel.cp_kind=ulysses", "train.seq_len=256"],
            {"world_size": 3},
            "256 is not divisible by cp=3",
        ),
        (
            TINY,
            ["parallel.cp=8", "parallel.cp_kind=ulysses"],
            {"world_size": 8},
            "Ulysses needs heads/tp and kv_heads/tp divisible by cp=8",
        ),
        (
            TINY,
            ["parallel.tp=4", "parallel.cp=4", "train.seq_len=40", "model.max_seq_len=64"],
            {"world_size": 16, "gpus_per_node": 16},
            "sequence parallel splits the 10 tokens",
        ),
        (TINY, [], {"world_size": 3}, "train.global_batch: 8 is not divisible by micro_batch x dp"),
        (
            TINY,
            [
                "parallel.pp=2",
                "parallel.pp_schedule=interleaved",
                "parallel.virtual_stages=2",
                "train.global_batch=6",
            ],
            {"world_size": 2},
            "train.global_batch: interleaved 1F1B needs microbatches to be a multiple of "
            "stages; got microbatches=3, stages=2",  # was under parallel.pp_schedule
        ),
        (  # the fix names the settings' values, so that global_batch shows as the lever
            TINY,
            ["parallel.pp=2", "parallel.pp_schedule=interleaved", "parallel.virtual_stages=2",
             "train.global_batch=2"],
            {"world_size": 2},
            "(micro_batch x dp): now 2 / (2 x 1) = 1",
        ),
        (
            LLAMA,
            ["parallel.tp=8"],
            {"world_size": 16, "gpus_per_node": 4},
            "tp=8 spans nodes of 4 devices",
        ),
        (
            REPO / "configs/mixtral-8x22b.yaml",
            ["parallel.etp=8", "parallel.ep=1"],
            {"world_size": 16, "gpus_per_node": 4},
            "etp=8 spans nodes of 4 devices",
        ),
        (
            TINY,
            ["parallel.tp=2"],
            {"world_size": 3},
            "world size 3 is not divisible by pp x dp_replicate x cp x tp = 1 x 1 x 1 x 2 = 2",
        ),
        (
            TINY,
            ["parallel.dp_shard=2"],
            {"world_size": 4},
            "pp x dp_replicate x dp_shard x cp x tp = 1 x 1 x 2 x 1 x 1 = 2, not the world size 4",
        ),
        (TINY, ["train.compile=aot_eager", "train.recompute=selective",  # crashed in dynamo's
                "parallel.dp_replicate=2"], {"world_size": 2},  # DDP graph splitting; the
         "train.compile: aot_eager with train.recompute=selective under DDP"),  # default dp_shard
        (TINY, ["parallel.pp_schedule=interleaved", "parallel.virtual_stages=2"],
         {"world_size": 1}, "parallel.virtual_stages: 2 stages per pipeline rank, but the plan "
                            "has no pipeline"),
        (TINY, [], {}, "--world-size: not given"),
        (TINY, [], {"world_size": 0}, "--world-size: must be between 1 and 1,048,576, got 0"),
        (TINY, [], {"world_size": 10**9}, "--world-size: must be between 1 and 1,048,576"),
        (TINY, [], {"world_size": 8, "gpus_per_node": 3}, "--gpus-per-node: 3 does not divide"),
        (TINY, [], {"world_size": 2, "device": "h1000"}, "h1000"),
    ],
)
def test_each_plan_rule(config, overrides, machine, message):
    text = plan_problems(config, overrides, **machine)
    assert message in text and "fix:" in text


def test_ffn_dim_need_not_divide_tp_where_no_layer_has_a_dense_mlp():
    """tiny-moe's layers are all MoE (experts of expert_ffn_dim): its ffn_dim builds nothing,
    and tp=2 with ffn_dim 687 was refused; with a dense layer in between it still is."""
    odd = ["parallel.tp=2", "model.ffn_dim=687"]
    assert build_plan(load_config(MOE, odd), world_size=2).degrees.tp == 2
    assert "model.ffn_dim=687 is not divisible by tp=2" in plan_problems(
        MOE, [*odd, "model.moe_layer_interval=2"], world_size=2)


def test_a_ring_seq_len_refusal_offers_ulysses_where_it_would_run():
    ring = plan_problems(TINY, ["parallel.cp=2", "train.seq_len=254"], world_size=2)
    assert "fix: use a multiple of 4, or parallel.cp_kind=ulysses (a multiple of cp does " \
        "there)" in ring
    odd = plan_problems(TINY, ["parallel.cp=2", "train.seq_len=255"], world_size=2)
    assert "fix: use a multiple of 4\n" in odd + "\n"  # ulysses needs a multiple of cp too


@pytest.mark.parametrize("config, offers_off", [(TINY, True), (MOE, False)])
def test_a_sequence_parallel_seq_len_refusal_offers_turning_it_off_only_where_allowed(
        config, offers_off):
    """MoE layers with tp need sequence parallelism (a rule of its own refuses it off): its
    fix there would only trade one refusal for the other."""
    text = plan_problems(config, ["parallel.tp=2", "parallel.cp=2", "parallel.cp_kind=ulysses",
                                  "train.seq_len=130", "model.max_seq_len=256"], world_size=4)
    assert "fix: use a seq_len divisible by cp x tp = 4" in text
    assert ("parallel.sequence_parallel=false" in text) == offers_off


def test_cross_node_tp_can_be_forced():
    cfg = load_config(LLAMA, ["parallel.tp=8", "parallel.allow_cross_node_tp=true"])
    plan = build_plan(cfg, world_size=16, gpus_per_node=4)
    assert plan.degrees.tp == 8 and plan.links["tp"].kind == "inter"


def test_all_problems_at_once():
    text = plan_problems(TINY, ["parallel.tp=3", "parallel.pp=5"], world_size=15, gpus_per_node=15)
    assert "tp=3" in text and "5 pipeline stages" in text and "(5 problems)" in text


def test_world_size_from_fixed_degrees():
    plan = build_plan(load_config(TINY, ["parallel.dp_shard=2", "parallel.tp=2"]), device="cpu")
    assert plan.world_size == 4 and plan.degrees.dp_shard == 2


@pytest.mark.parametrize("config, overrides, world", [
    (TINY, ["parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.cp=2"], 4),  # HSDP
    ("configs/tiny-moe.yaml", ["parallel.dp_replicate=2", "parallel.dp_shard=1",
                               "parallel.ep=2"], 2),  # the experts' own FSDP
])
def test_compiled_selective_recompute_is_refused_under_ddp_only(config, overrides, world):
    """The rule took every dp_shard=1 plan for DDP: with context parallelism or folded experts
    the wrapper is FSDP (HSDP), and such a run trains to the uncompiled numbers."""
    build_plan(load_config(config, ["train.compile=aot_eager", "train.recompute=selective",
                                    *overrides]), world_size=world)


def test_the_search_with_virtual_stages_leaves_them_to_pipelines(capsys):
    """Searching interleaved or ZB-V plans needs virtual_stages in the config, whose pp stays 1
    (the search picks it): refused as 'a pipeline of one stage' when checked on the config."""
    from orch.cli import main

    assert main(["plan", str(LLAMA), "--world-size", "64", "--auto", "--set",
                 "parallel.virtual_stages=2", "--set", "parallel.pp_schedule=interleaved"]) == 0
    assert "searched" in capsys.readouterr().out


def test_degrees_that_do_not_fill_the_world_meet_the_other_rules_in_the_same_round():
    """A world the degrees did not fill hid every other rule: tp=3 on 4 devices said only the
    world's problem, and on 3 the next round named the heads, kv_heads and ffn_dim tp=3 does not
    divide."""
    text = plan_problems(TINY, ["parallel.tp=3"], world_size=4)
    for said in ("world size 4 is not divisible by pp x dp_replicate x cp x tp", "heads=8",
                 "kv_heads=4", "ffn_dim=688"):
        assert said in text, said
    text = plan_problems(MOE, ["parallel.ep=3", "parallel.cp=2", "parallel.dp_shard=2",
                               "train.seq_len=66"], world_size=2, device="cpu")
    for said in ("not the world size 2", "experts=4 is not divisible by ep=3",
                 "66 is not divisible by 2 x cp = 4"):
        assert said in text, said


def test_a_given_dp_shard_is_the_users_own_on_a_world_it_does_not_fill():
    """dp_shard=3 on 4 devices: the batch rule reads the user's dp (3), not a made-up one, and
    was said only a round later."""
    text = plan_problems(TINY, ["parallel.dp_shard=3"], world_size=4)
    assert "not the world size 4" in text and "micro_batch x dp = 2 x 3" in text


def test_zbv_runs_its_v_without_virtual_stages_spelled_out():
    """ZB-V runs 2 stages per rank and nothing else; the config's default (1, left out) was
    refused as 'not virtual_stages=1' where ``orch schedule zbv`` defaults to 2."""
    plan = build_plan(load_config(TINY, ["parallel.pp=2", "parallel.pp_schedule=zbv"]),
                      world_size=2, device="cpu")
    assert plan.degrees.virtual_stages == 2 and tuple(plan.layers_per_stage) == (1, 1, 1, 1)
    spelled = build_plan(load_config(TINY, ["parallel.pp=2", "parallel.pp_schedule=zbv",
                                            "parallel.virtual_stages=2"]),
                         world_size=2, device="cpu")
    assert spelled.degrees == plan.degrees


def test_a_device_budget_above_the_devices_usable_memory_is_noted():
    """offload.device_budget=100GB on a device with 72 GiB usable said 'of a 93.1 GiB offload
    budget' and nothing else: the budget bounds nothing there."""
    offload = ["offload.params=cpu", "offload.grads=cpu", "offload.optimizer=cpu"]
    over = build_plan(load_config("configs/tiny.yaml", [*offload, "offload.device_budget=100GB"]),
                      1)
    (note,) = [n for n in over.notes if n.startswith("offload.device_budget")]
    left = over.memory_limit_bytes - (over.memory.total - over.memory.window)
    assert (f"offload.device_budget 93.1 GiB is above the {left / 2**30:.1f} GiB the device "
            f"has left beside what is not offloaded (of {over.memory_limit_bytes / 2**30:.1f} "
            "GiB usable)") in note
    assert note.endswith(f"set auto, or at most {left:,} bytes")
    # between what is left and what is usable: it said 'above the device's 72.0 GiB usable'
    big = ["configs/llama3-8b.yaml", ["parallel.dp_replicate=8", "parallel.dp_shard=1",
                                      *offload, "offload.device_budget=30GB"]]
    between = build_plan(load_config(*big), 8)
    (note,) = [n for n in between.notes if n.startswith("offload.device_budget")]
    assert "27.9 GiB is above the 23.0 GiB the device has left" in note
    assert "of 72.0 GiB usable" in note
    within = build_plan(load_config("configs/tiny.yaml", [*offload, "offload.device_budget=1GB"]),
                        1)
    assert not [n for n in within.notes if n.startswith("offload.device_budget")]
