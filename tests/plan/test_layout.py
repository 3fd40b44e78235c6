"""Our rank groups must equal Megatron-Core's, so users move between the two freely."""

from __future__ import annotations

import warnings

import pytest

from orch.plan.degrees import Degrees
from orch.plan.layout import dense_layout, expert_layout, plan_groups, rank_coordinates

# (pp, dp, cp, tp, ep, etp): dense world = pp*dp*cp*tp; experts fold into dp*cp*tp per stage.
COMBOS = [
    (1, 1, 1, 1, 1, 1),
    (1, 8, 1, 1, 1, 1),
    (1, 1, 1, 8, 1, 1),
    (2, 2, 1, 2, 1, 1),
    (2, 2, 2, 2, 1, 1),
    (4, 2, 1, 1, 2, 1),
    (1, 4, 1, 2, 4, 2),
    (2, 4, 2, 2, 8, 2),
    (1, 2, 4, 1, 4, 2),
    (3, 2, 1, 2, 2, 1),
    (1, 6, 1, 1, 3, 2),
    (2, 8, 1, 4, 8, 4),
    (4, 16, 2, 8, 32, 4),
    (8, 64, 1, 8, 64, 8),
    (16, 32, 1, 8, 8, 1),
    (8, 8, 8, 8, 64, 2),
    (2, 256, 1, 8, 64, 1),
    (4, 128, 2, 4, 16, 8),
    (1, 512, 1, 8, 8, 8),
    (32, 16, 1, 8, 16, 2),
    (16, 16, 2, 8, 8, 4),
    (5, 3, 1, 2, 3, 1),
    (2, 3, 2, 1, 6, 1),
    (4, 1024, 1, 1, 128, 1),
]


@pytest.fixture(scope="module")
def rank_generator():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.parallel_state import RankGenerator
    return RankGenerator


def test_enough_combinations_up_to_4096():
    worlds = {pp * dp * cp * tp for pp, dp, cp, tp, _, _ in COMBOS}
    assert len(COMBOS) >= 20 and max(worlds) == 4096


@pytest.mark.parametrize("pp,dp,cp,tp,ep,etp", COMBOS)
def test_groups_equal_megatron(rank_generator, pp, dp, cp, tp, ep, etp):
    deg = Degrees(pp=pp, dp_shard=dp, cp=cp, tp=tp, ep=ep, etp=etp)
    ours = plan_groups(deg)
    dense = rank_generator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    for dim in ("tp", "cp", "dp", "pp"):
        assert ours[dim] == dense.get_ranks(dim), dim
    assert dense_layout(deg).groups("tp-dp") == dense.get_ranks("tp-dp")
    assert dense_layout(deg).groups("dp-cp") == dense.get_ranks("dp-cp")
    expert = rank_generator(tp=etp, ep=ep, dp=deg.edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    for dim, theirs in (("etp", "tp"), ("ep", "ep"), ("edp", "dp")):
        assert ours[dim] == expert.get_ranks(theirs), dim
    assert expert_layout(deg).groups("pp") == expert.get_ranks("pp")


def test_every_rank_in_exactly_one_group_per_dim():
    deg = Degrees(pp=2, dp_replicate=2, dp_shard=2, cp=2, tp=2, ep=4, etp=2)
    for dim, groups in plan_groups(deg).items():
        flat = sorted(r for g in groups for r in g)
        assert flat == list(range(deg.world)), dim


def test_hsdp_shard_groups_are_inside_replicas():
    deg = Degrees(dp_replicate=2, dp_shard=4, tp=2)
    groups = plan_groups(deg)
    assert groups["dp_shard"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert groups["dp_replicate"][0] == [0, 8]
    assert sorted(groups["dp"][0]) == [0, 2, 4, 6, 8, 10, 12, 14]


def test_rank_coordinates_agree_with_groups():
    deg = Degrees(pp=2, dp_replicate=2, dp_shard=2, cp=2, tp=2, ep=2, etp=2)
    coords = rank_coordinates(deg)
    groups = plan_groups(deg)
    for dim in ("tp", "cp", "dp", "pp", "ep", "etp", "edp"):
        for group in groups[dim]:
            assert [coords[r][dim] for r in group] == list(range(len(group))), dim


def test_replicas_with_sharded_experts_are_labelled_hsdp_as_they_run():
    """With ep x etp > 1 the runtime wraps the dense weights in FSDP2 (one shard a replica),
    not DDP, as for a pipeline's replicas: the label said ddp2 ep2."""
    assert Degrees(dp_replicate=2, ep=2).short() == "hsdp2(2x1) ep2"
    assert Degrees(dp_replicate=2, etp=2).short() == "hsdp2(2x1) etp2"
    assert Degrees(pp=2, dp_replicate=2).short() == "pp2 hsdp2(2x1)"  # (so are pipelines)
    assert Degrees(dp_replicate=2, tp=2).short() == "hsdp2(2x1) tp2"  # (and MoE's tp ranks)
    assert Degrees(dp_replicate=2, cp=2).short() == "hsdp2(2x1) cp2"  # (FSDP2 over cp)
    assert Degrees(dp_replicate=2).short() == "ddp2"


def test_the_short_label_names_the_pipeline_schedule_where_there_is_one():
    """The launch banner said ``pp2`` for a 2BP-1F1B and a ZB-V run alike, where the report's
    summary (and the README quoting it as the banner) named the schedule."""
    assert Degrees(pp=2, dp_shard=2).short("2bp-1f1b") == "pp2 fsdp2 (2bp-1f1b schedule)"
    assert Degrees(pp=2, virtual_stages=2).short("zbv") == "pp2v2 (zbv schedule)"
    assert Degrees(dp_shard=2).short("none") == Degrees(dp_shard=2).short() == "fsdp2"
