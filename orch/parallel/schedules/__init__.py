"""Pipeline schedules as data: actions per rank, generators, one validator, one simulator."""

from orch.parallel.schedules.actions import Action, Schedule
from orch.parallel.schedules.generators import (
    SCHEDULES,
    build_schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    schedule_problem,
    schedule_with_comms,
    two_bp,
    zb_h1,
)
from orch.parallel.schedules.simulate import Costs, Span, Timeline, peak_activations, simulate
from orch.parallel.schedules.validate import check, issue_order, validate

__all__ = [
    "SCHEDULES",
    "Action",
    "Costs",
    "Schedule",
    "Span",
    "Timeline",
    "build_schedule",
    "schedule_problem",
    "check",
    "gpipe",
    "interleaved_1f1b",
    "issue_order",
    "one_f_one_b",
    "peak_activations",
    "schedule_with_comms",
    "simulate",
    "two_bp",
    "validate",
    "zb_h1",
]
