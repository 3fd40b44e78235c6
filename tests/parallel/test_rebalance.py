"""Pipeline re-partitioning by measured stage speed: the split, the decision, the record."""

from __future__ import annotations

import pytest

from orch.config import load_config
from orch.errors import PlanError
from orch.parallel.pipeline.rebalance import (
    StageMeter,
    apply_rebalance,
    rebalance_notice,
    write_rebalance,
)
from orch.parallel.pipeline.timeline import exposed_transfers
from orch.parallel.schedules.actions import Action
from orch.parallel.schedules.simulate import Span, Timeline
from orch.plan import build_plan


def _timeline(busy: list[float]) -> Timeline:
    spans = [[Span(Action("F", rank, 0), 0.0, seconds)] for rank, seconds in enumerate(busy)]
    return Timeline(spans, max(busy), [0.0] * len(busy), [1] * len(busy))


def test_a_slow_stage_gets_fewer_layers_and_a_balanced_one_none():
    meter = StageMeter()
    for _ in range(3):
        meter.add(_timeline([0.9, 0.3]))  # 3 layers take 0.9 s, 1 layer 0.3 s: equal speed
    assert meter.per_step() == [0.9, 0.3]
    assert meter.per_step('idle') == [0.0, 0.6]  # the step lasts 0.9 s on every rank
    alike = (1.0,) * 4  # each layer's FLOPs
    assert meter.proposal([3, 1], threshold=1.2, work=alike) == [2, 2]
    assert meter.proposal([3, 1], threshold=4.0, work=alike) is None  # under the threshold
    balanced = StageMeter()
    balanced.add(_timeline([0.5, 0.5]))
    assert balanced.proposal([2, 2], threshold=1.01, work=alike) is None
    slow_second = StageMeter()
    slow_second.add(_timeline([0.2, 0.6]))  # the second stage's device is 3x slower
    assert slow_second.proposal([2, 2], threshold=1.2, work=alike) == [3, 1]


def test_a_last_stage_slow_by_its_head_is_not_taken_for_a_slow_device():
    """12 layers and a head of 6 layers' FLOPs on equal devices, measured as the FLOPs say
    (6 s and 12 s on 6/6): layers per measured second made the last device look twice as slow
    and proposed 8/4 (8 s against 10 s); the FLOPs at measured speeds give 9/3 (9 s each)."""
    meter = StageMeter()
    meter.add(_timeline([6.0, 12.0]))
    assert meter.proposal([6, 6], threshold=1.2, work=(1.0,) * 11 + (7.0,)) == [9, 3]


@pytest.mark.parametrize("room", [True, False])
def test_a_split_that_does_not_fit_is_not_proposed(tmp_path, capsys, room):
    """The plan keeps the even split where the split by FLOPs does not fit in memory; the
    re-partition by measured speed proposed its split without asking, and could put more
    layers on the first stage (the most micro-batches in flight) than it has room for."""
    from orch.parallel.pipeline.rebalance import Repartitioner

    cfg = load_config("configs/tiny.yaml", ["parallel.pp=2", "parallel.pp_rebalance_threshold=1.2",
                                            "parallel.pp_rebalance_steps=1"])
    asked = []
    repartitioner = Repartitioner(cfg, [2, 2], tmp_path, 0,
                                  fits=lambda split: asked.append(split) or room)
    assert repartitioner._observe(_timeline([0.2, 0.6])) == (None, False)  # the warm-up step
    proposal, done = repartitioner._observe(_timeline([0.2, 0.6]))
    assert asked == [[3, 1]] and done and proposal == ([3, 1] if room else None)
    dropped = "3/1 would even them out but does not fit in device memory: not re-partitioning"
    assert (dropped in capsys.readouterr().out) is not room


def _spans(*rows: list[tuple[str, float, float]]) -> Timeline:
    spans = [[Span(Action.parse(text), start, end) for text, start, end in row] for row in rows]
    return Timeline(spans, max(s.end for row in spans for s in row), [0.0] * len(rows),
                    [1] * len(rows))


def test_transfers_are_the_waits_that_begin_after_the_producer_finished():
    # Two stages, one micro-batch: stage 1 idles until 0.0 + 1.0 (bubble), then 0.2 s more
    # (the activation in flight); stage 0 idles until stage 1's backward ends at 3.2, then 0.3.
    two = _spans([("0F0", 0.0, 1.0), ("0B0", 3.5, 4.5)], [("1F0", 1.2, 2.2), ("1B0", 2.2, 3.2)])
    assert exposed_transfers(two) == pytest.approx([0.3, 0.2])
    # Rank 0 still computes (0F1 until 3.6) when 1I0's gradient is ready at 3.2: that transfer
    # is hidden behind compute and counts nothing; 1W0 needs nothing sent.
    hidden = _spans([("0F0", 0.0, 1.0), ("0F1", 1.0, 3.6), ("0I0", 3.6, 4.0)],
                    [("1F0", 1.1, 2.2), ("1I0", 2.2, 3.2), ("1W0", 3.2, 3.5)])
    assert exposed_transfers(hidden) == pytest.approx([0.0, 0.1])
    # Stages on the same rank (a V-shape's turn) hand over without a transfer.
    same_rank = _spans([("0F0", 0.0, 1.0), ("1F0", 1.5, 2.0)])
    assert exposed_transfers(same_rank) == [0.0]
    meter = StageMeter()
    meter.add(two)
    assert meter.per_step("transfer") == [0.3, 0.2]


def test_a_run_directorys_repartition_sets_the_plans_stage_layers(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["parallel.pp=2", f"run.dir={tmp_path}"])
    assert build_plan(cfg, 2, 2, "cpu").layers_per_stage == (2, 2)
    write_rebalance(tmp_path, {"step": 4, "layers_before": [2, 2], "compute_before_s": [1, 3],
                               "layers_after": [3, 1], "compute_after_s": None})
    assert apply_rebalance(cfg).parallel.stage_layers == [3, 1]
    other = load_config("configs/tiny.yaml", ["parallel.pp=4", f"run.dir={tmp_path}"])
    assert apply_rebalance(other) is other  # another pipeline: the record does not apply


def test_an_explicit_split_the_repartition_replaces_is_said(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["parallel.pp=2", f"run.dir={tmp_path}",
                                            "parallel.stage_layers=[3,1]"])
    assert rebalance_notice(cfg) is None  # no record yet
    write_rebalance(tmp_path, {"layers_after": [2, 2]})
    notice = rebalance_notice(cfg)
    assert notice is not None and "parallel.stage_layers [3, 1] gives way" in notice
    assert "re-partition [2, 2]" in notice and str(tmp_path / "rebalance.json") in notice
    even = load_config("configs/tiny.yaml", ["parallel.pp=2", f"run.dir={tmp_path}"])
    assert rebalance_notice(even) is None  # nothing given: nothing replaced


@pytest.mark.parametrize("text, said", [
    ("{not json", "unreadable (Expecting property name"),
    ('{"step": 4}', "layers_after is None"),
    ('{"layers_after": [0, 4]}', "layers_after is [0, 4]"),
    ('[1, 3]', "layers_after is None"),
])
def test_a_damaged_repartition_record_is_a_problem_naming_the_file(tmp_path, text, said):
    """It was a JSONDecodeError or KeyError traceback from orch launch (any plan), or a
    stage_layers problem naming a split the user never set."""
    (tmp_path / "rebalance.json").write_text(text)
    cfg = load_config("configs/tiny.yaml", ["parallel.pp=2", f"run.dir={tmp_path}"])
    with pytest.raises(PlanError) as info:
        apply_rebalance(cfg)
    (problem,) = info.value.problems
    assert problem.where == str(tmp_path / "rebalance.json") and said in problem.message
    assert problem.fix.startswith("delete the file")
    assert info.value.title == "damaged run directory"
    unpipelined = load_config("configs/tiny.yaml", [f"run.dir={tmp_path}"])
    assert apply_rebalance(unpipelined) is unpipelined  # no record applies: none is read


def test_rebalancing_without_a_plain_pipeline_is_refused():
    from orch.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config("configs/tiny.yaml", ["parallel.pp_rebalance_threshold=0.5"])
    text = str(info.value)
    assert "0.5 must be above 1" in text and "needs a pipeline of one stage per rank" in text


def test_no_repartition_at_the_runs_last_step(tmp_path):
    """Decided at the last step, the re-partition saved, restarted every worker and trained
    nothing (and never measured the new split); at the last step nothing is asked or saved
    (no broadcast either: this test has no process group, which one would need)."""
    from orch.parallel.pipeline.rebalance import Repartitioner

    cfg = load_config("configs/tiny.yaml", ["parallel.pp=2", "parallel.pp_rebalance_threshold=1.2",
                                            "parallel.pp_rebalance_steps=1"])
    repartitioner = Repartitioner(cfg, [3, 1], tmp_path, 0)
    saved = []
    repartitioner.after_log(2, _timeline([0.9, 0.1]), saved.append, last=True)
    assert saved == [] and not (tmp_path / "rebalance.json").exists()
