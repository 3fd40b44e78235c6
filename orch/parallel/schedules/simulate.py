"""Turn a schedule plus per-action costs into a timeline: makespan, bubbles, activation peaks.

The model is deliberately small: each rank runs its actions in order, one at a time; compute
takes its cost; a send is buffered and takes no time on the sender; a receive ends when the data
has arrived, at max(its own start, matching send's end + comm). Good enough to compare schedules
and to check the analytic bubble results, not a substitute for measuring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from orch.parallel.schedules.actions import COMPUTE, RECVS, SENDS, Action, Schedule
from orch.parallel.schedules.validate import check, issue_order


@dataclass(frozen=True)
class Costs:
    """Seconds per action for one rank's whole share of the model and one micro-batch.

    ``b`` is the fused backward and defaults to ``i + w``. In an interleaved schedule a rank's
    share is split into V chunks, so each chunk's compute costs 1/V of these; ``comm`` is per
    transfer and does not shrink, because every chunk boundary moves a full activation.
    """

    f: float = 1.0
    b: float | None = None
    i: float = 1.0
    w: float = 1.0
    comm: float = 0.0

    def compute(self, kind: str, virtual: int = 1) -> float:
        seconds = {
            "F": self.f,
            "B": self.i + self.w if self.b is None else self.b,
            "I": self.i,
            "W": self.w,
        }[kind]
        return seconds / virtual


class Span(NamedTuple):
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """What ``simulate`` found: per-rank spans in execution order and summary numbers.

    ``peak_activations[r]`` is the most (stage, micro-batch) activations rank r holds at once.
    An F stores one; a fused B frees it; with a split backward, I does *not* free it, because W
    still needs the stored inputs to form weight gradients, so only W does. That is why deferring
    W's (2BP, zero-bubble) costs memory.
    """

    spans: list[list[Span]]
    makespan: float
    idle_fraction: list[float]
    peak_activations: list[int]

    @property
    def bubble_fraction(self) -> float:
        """Mean idle fraction over ranks."""
        return sum(self.idle_fraction) / len(self.idle_fraction)


def peak_activations(actions: list[Action]) -> int:
    """Most activations held at once by a rank running ``actions`` (see ``Timeline``)."""
    held = peak = 0
    for act in actions:
        held += {"F": 1, "B": -1, "W": -1}.get(act.kind, 0)
        peak = max(peak, held)
    return peak


class _Walk(NamedTuple):
    """A valid schedule's actions in an order where every send precedes its receive
    (``issue_order``), each with its rank and, for a receive, the position of its send: what
    timing the schedule under any costs needs, worked out once."""

    order: list[tuple[int, Action]]
    sends: list[int]
    """Per position: the position of the send a receive waits for; -1 for other actions."""

    @classmethod
    def of(cls, schedule: Schedule) -> _Walk:
        order, _ = issue_order(schedule)
        at = {act.key(): n for n, (_, act) in enumerate(order) if act.kind in SENDS}
        return cls(order, [at[act.peer_key()] if act.kind in RECVS else -1
                           for _, act in order])

    def times(self, costs: Costs, stages: int, virtual: int
              ) -> tuple[list[float], list[float], list[float]]:
        """Each position's start and end under ``costs``, and each rank's busy seconds."""
        seconds = {kind: costs.compute(kind, virtual) for kind in COMPUTE}
        clock, busy = [0.0] * stages, [0.0] * stages
        starts, ends = [0.0] * len(self.order), [0.0] * len(self.order)
        for n, ((rank, act), send) in enumerate(zip(self.order, self.sends, strict=True)):
            start = end = clock[rank]
            if (cost := seconds.get(act.kind)) is not None:
                end = start + cost
                busy[rank] += cost
            elif send >= 0:  # a receive: the data left when its send started
                end = max(start, starts[send] + costs.comm)
            starts[n], ends[n] = start, end
            clock[rank] = end
        return starts, ends, busy


def simulate(schedule: Schedule, costs: Costs, *, trusted: bool = False) -> Timeline:
    """Time ``schedule`` under ``costs``; raises ValueError (from ``check``) if it is invalid.
    ``trusted`` skips the check (two thirds of the time) for a schedule known to be valid."""
    if not trusted:
        check(schedule)
    walk = _Walk.of(schedule)
    starts, ends, busy = walk.times(costs, schedule.stages, schedule.virtual)
    spans: list[list[Span]] = [[] for _ in range(schedule.stages)]
    for (rank, act), start, end in zip(walk.order, starts, ends, strict=True):
        spans[rank].append(Span(act, start, end))
    makespan = max((rank_spans[-1].end for rank_spans in spans if rank_spans), default=0.0)
    idle = [1.0 - b / makespan if makespan else 0.0 for b in busy]
    peaks = [peak_activations(actions) for actions in schedule.ranks]
    return Timeline(spans, makespan, idle, peaks)


def makespan(schedule: Schedule, costs: Costs) -> float:
    """The end of a valid schedule's last action under ``costs``: ``simulate``'s timing without
    its spans or check, for a caller (the plan's pricing) that asks it of built schedules many
    times."""
    _, ends, _ = _Walk.of(schedule).times(costs, schedule.stages, schedule.virtual)
    return max(ends, default=0.0)


COST_MIXES = tuple(Costs(f=f, i=i, w=2 - i) for f in (0.8, 1.0, 1.25) for i in (0.8, 1.0, 1.2))
"""Forward 0.8-1.25x a backward half, I against W from 0.8:1.2 to 1.2:0.8: the spread of real
costs around the equal ones a static order is usually made for."""


def worst_mix(schedule: Schedule, *, trusted: bool = False,
              above: float | None = None) -> float:
    """The longest simulated step of ``schedule`` over ``COST_MIXES``, as a multiple of the work
    each rank does, M (F + I + W): how well a fixed order holds up when the costs it was made
    for are not the ones the run has (the run then waits where the order assumed data ready).
    With ``above``, the first step found longer than that is returned at once (a search that
    only needs to know the order is worse than one it has)."""
    if not trusted:
        check(schedule)
    walk, worst = _Walk.of(schedule), 0.0
    for costs in COST_MIXES:
        _, ends, _ = walk.times(costs, schedule.stages, schedule.virtual)
        step = max(ends, default=0.0) / (schedule.microbatches * (costs.f + costs.i + costs.w))
        worst = max(worst, step)
        if above is not None and worst > above:
            break
    return worst
