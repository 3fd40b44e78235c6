"""Pipeline schedules as data: actions per rank, generators, one validator, one simulator."""

from orch.parallel.schedules.actions import Action, Schedule, rank_stages, stage_rank
from orch.parallel.schedules.generators import (
    CHUNKED,
    SCHEDULES,
    build_schedule,
    chunks_per_rank,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    placement_of,
    schedule_problem,
    schedule_with_comms,
    two_bp,
    zb_h1,
    zbv,
)
from orch.parallel.schedules.simulate import (
    COST_MIXES,
    Costs,
    Span,
    Timeline,
    peak_activations,
    simulate,
    worst_mix,
)
from orch.parallel.schedules.validate import check, issue_order, validate

__all__ = [
    "CHUNKED",
    "COST_MIXES",
    "SCHEDULES",
    "Action",
    "Costs",
    "Schedule",
    "Span",
    "Timeline",
    "build_schedule",
    "chunks_per_rank",
    "schedule_problem",
    "check",
    "gpipe",
    "interleaved_1f1b",
    "issue_order",
    "one_f_one_b",
    "peak_activations",
    "placement_of",
    "rank_stages",
    "schedule_with_comms",
    "simulate",
    "stage_rank",
    "two_bp",
    "validate",
    "zb_h1",
    "worst_mix",
    "zbv",
]
