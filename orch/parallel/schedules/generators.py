"""Schedule generators: GPipe, 1F1B, interleaved 1F1B, 2BP, zero-bubble ZB-H1 and ZB-V.

Each generator decides only the order of compute actions on each rank; ``schedule_with_comms``
then places the sends and receives the same way for all of them, a receive right before the
compute that needs it and a send right after the compute that produced it. With buffered sends
that placement adds no waiting of its own, so a generator is deadlock-free exactly when its
compute order is (the validator checks both).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from orch.parallel.schedules.actions import Action, Schedule
from orch.parallel.schedules.simulate import Costs, simulate, worst_mix
from orch.parallel.schedules.vshape import paper_orders, v_orders

Order = list[list[Action]]
"""Compute actions per rank, in execution order, before communication is added."""


def schedule_with_comms(
    name: str, stages: int, microbatches: int, compute: Order, virtual: int = 1,
    placement: str = "loop",
) -> Schedule:
    """Wrap per-rank compute orders into a Schedule with SEND/RECV between adjacent stages on
    different ranks (adjacent stages on one rank hand over in memory)."""
    schedule = Schedule(name, stages, virtual, microbatches, [[] for _ in range(stages)],
                        placement)
    last = schedule.num_stages - 1
    for rank, actions in enumerate(compute):
        out = schedule.ranks[rank]
        for act in actions:
            s, m = act.stage, act.microbatch
            crosses_prev = s > 0 and schedule.rank_of(s - 1) != rank
            crosses_next = s < last and schedule.rank_of(s + 1) != rank
            if act.kind == "F" and crosses_prev:
                out.append(Action("RECV_F", s, m))
            if act.kind in ("B", "I") and crosses_next:
                out.append(Action("RECV_B", s, m))
            out.append(act)
            if act.kind == "F" and crosses_next:
                out.append(Action("SEND_F", s, m))
            if act.kind in ("B", "I") and crosses_prev:
                out.append(Action("SEND_B", s, m))
    return schedule


class ScheduleProblem(NamedTuple):
    """One reason a schedule cannot be built, about one argument of :func:`build_schedule`
    (``name``, ``stages``, ``microbatches``, ``virtual`` or ``max_deferred``): a caller names it
    as its user gave it (``orch schedule``'s ``--stages``, a config's ``parallel.pp``)."""

    argument: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.argument}: {self.message}; fix: {self.fix}"


def _refuse(problems: list[ScheduleProblem]) -> None:
    """Raise ValueError naming every problem at once, or return when there is none."""
    if problems:
        raise ValueError("; ".join(map(str, problems)))


def _gpipe_order(stages: int, microbatches: int) -> Order:
    mbs = range(microbatches)
    return [
        [Action("F", r, m) for m in mbs] + [Action("B", r, m) for m in mbs] for r in range(stages)
    ]


def _one_f_one_b_order(stages: int, microbatches: int) -> Order:
    order = []
    for r in range(stages):
        warmup = min(stages - 1 - r, microbatches)
        acts = [Action("F", r, m) for m in range(warmup)]
        for m in range(microbatches - warmup):
            acts += [Action("F", r, warmup + m), Action("B", r, m)]
        acts += [Action("B", r, m) for m in range(microbatches - warmup, microbatches)]
        order.append(acts)
    return order


def gpipe(stages: int, microbatches: int) -> Schedule:
    """GPipe: every forward, then every backward. Holds all M activations at once."""
    _refuse(schedule_problems("gpipe", stages, microbatches))
    return schedule_with_comms("gpipe", stages, microbatches, _gpipe_order(stages, microbatches))


def one_f_one_b(stages: int, microbatches: int) -> Schedule:
    """1F1B (PipeDream-flush): P - r - 1 warm-up forwards on rank r, then alternate F and B.

    Same bubble as GPipe, but rank r holds at most min(P - r, M) activations.
    """
    _refuse(schedule_problems("1f1b", stages, microbatches))
    order = _one_f_one_b_order(stages, microbatches)
    return schedule_with_comms("1f1b", stages, microbatches, order)


def interleaved_1f1b(stages: int, microbatches: int, virtual: int = 2) -> Schedule:
    """Megatron's interleaved 1F1B: V model chunks per rank, stage s on rank s % P.

    Micro-batches go through a rank's chunks in groups of P, which is why M must be a multiple
    of P. The bubble shrinks by about V at the price of V times the point-to-point traffic.
    """
    _refuse(schedule_problems("interleaved", stages, microbatches, virtual))
    group, total = stages * virtual, microbatches * virtual

    def action(kind: str, rank: int, k: int) -> Action:
        chunk = (k % group) // stages
        if kind == "B":
            chunk = virtual - 1 - chunk
        return Action(kind, chunk * stages + rank, (k // group) * stages + k % stages)

    order = []
    for r in range(stages):
        warmup = min((stages - r - 1) * 2 + (virtual - 1) * stages, total)
        acts = [action("F", r, k) for k in range(warmup)]
        for k in range(total - warmup):
            acts += [action("F", r, warmup + k), action("B", r, k)]
        acts += [action("B", r, k) for k in range(total - warmup, total)]
        order.append(acts)
    return schedule_with_comms("interleaved", stages, microbatches, order, virtual)


def _split_backward(order: Order, bound: Callable[[int], int | None]) -> Order:
    """Replace each B with I and defer its W, keeping at most ``bound(rank)`` W's pending.

    When an I would leave more than the bound waiting, the oldest pending W runs right after it;
    whatever is still pending runs at the end of the step, where it fills the cooldown.

    The first stage keeps its fused B: no stage waits for its input gradient, so splitting it
    gains nothing and deferring its W would only push its whole backward to the end of the step
    (measured on 2 pipeline ranks, 8 micro-batches: 0.84x 1F1B with the first stage deferred).
    """
    split = []
    for rank, actions in enumerate(order):
        limit, pending, acts = bound(rank), [], []
        for act in actions:
            if act.kind != "B" or act.stage == 0:
                acts.append(act)
                continue
            acts.append(Action("I", act.stage, act.microbatch))
            pending.append(Action("W", act.stage, act.microbatch))
            while limit is not None and len(pending) > limit:
                acts.append(pending.pop(0))
        split.append(acts + pending)
    return split


_BASES = {"gpipe": _gpipe_order, "1f1b": _one_f_one_b_order}


def two_bp(base: str, stages: int, microbatches: int, max_deferred: int | None = None) -> Schedule:
    """2BP: ``base`` ("gpipe" or "1f1b") with each backward split into I then a deferred W.

    I stays where B was, so the gradient reaches the previous stage sooner; W waits. Every
    pending W keeps its activation alive, so a bound caps how many W's wait on a rank while it
    computes anything else: ``max_deferred`` on every rank, or by default ``r`` on rank ``r``
    (a later stage has more cooldown to fill and, in 1F1B, fewer activations held: ZB-H1's
    staircase, which keeps every rank within the first's 1F1B activation peak). An I that would
    exceed the bound is followed at once by the oldest pending W (after the I's gradient send),
    so 0 means W right after I; the rest run at the end of the step. Placement is static: W's
    fill the idle time at the end of the step, not gaps found from costs. Measured on 2 ranks at
    8 micro-batches, every W at the end of the step ran at 0.8x 1F1B: the backlog becomes a tail.
    """
    if base not in _BASES:
        raise ValueError(f"unknown 2BP base {base!r}; valid bases: {', '.join(_BASES)}")
    _refuse(schedule_problems(f"2bp-{base}", stages, microbatches, max_deferred=max_deferred))
    bound = (lambda rank: rank) if max_deferred is None else (lambda rank: max_deferred)
    order = _split_backward(_BASES[base](stages, microbatches), bound)
    return schedule_with_comms(f"2bp-{base}", stages, microbatches, order)


def zb_h1(stages: int, microbatches: int) -> Schedule:
    """Zero-bubble ZB-H1 (Qi et al. 2023): 1F1B with B split into I and W.

    In 1F1B rank r holds P - r activations at most, rank 0 the most (P). ZB-H1 lets rank r
    defer up to r W's, which keeps every rank within rank 0's P (the 1F1B peak) while the
    deferred W's fill the cooldown bubbles, cutting the bubble by about a third for F = I = W.
    """
    _refuse(schedule_problems("zb-h1", stages, microbatches))
    order = _split_backward(_one_f_one_b_order(stages, microbatches), lambda rank: rank)
    return schedule_with_comms("zb-h1", stages, microbatches, order)


_ZBV_WIDE, _ZBV_NARROW = 256, 1024
"""ZB-V keeps the best of every candidate order up to this many stage micro-batches (P x M; up
to 30 orders, 1.6 s at P = 8, M = 32), of the first six up to the second (3.5 s at P = 16,
M = 64; the time grows with the square), and the first alone above (6.8 s at P = 32, M = 128;
this 2-core machine, busy)."""


def zbv(stages: int, microbatches: int) -> Schedule:
    """ZB-V (Qi et al. 2024): two chunks per rank placed in a V, backward split into I and W,
    within 1F1B's activation peak on every rank (2P half-share chunks). Of the candidate orders
    of :mod:`orch.parallel.schedules.vshape`, the one whose longest step over ``COST_MIXES`` is
    shortest (then the shortest at equal costs): an order that holds up when the run's costs are
    not the ones it was made for (``_ZBV_WIDE``, ``_ZBV_NARROW``)."""
    _refuse(schedule_problems("zbv", stages, microbatches, 2))
    size = stages * microbatches
    orders = itertools.chain(
        paper_orders(stages, microbatches),
        itertools.islice(v_orders(stages, microbatches),
                         None if size <= _ZBV_WIDE else 6 if size <= _ZBV_NARROW else 1))
    best: tuple[tuple[float, float], Schedule] | None = None
    for order in orders:
        candidate = schedule_with_comms("zbv", stages, microbatches, order, 2, "v")
        worst = worst_mix(candidate, trusted=True, above=best[0][0] if best else None)
        if best is not None and worst > best[0][0]:
            continue
        key = (worst, simulate(candidate, Costs(), trusted=True).makespan)
        if best is None or key < best[0]:
            best = (key, candidate)
    if best is None:
        raise RuntimeError(f"no ZB-V order completed for stages={stages}, microbatches="
                           f"{microbatches}: a bug in orch's generator")
    return best[1]


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved": interleaved_1f1b,
    "2bp-gpipe": partial(two_bp, "gpipe"),
    "2bp-1f1b": partial(two_bp, "1f1b"),
    "zb-h1": zb_h1,
    "zbv": zbv,
}

SPLIT_BACKWARD = ("2bp-gpipe", "2bp-1f1b", "zb-h1", "zbv")
"""Schedules that split each backward into I (input gradients) and W (weight gradients, run
later)."""

CHUNKED = ("interleaved", "zbv")
"""Schedules that run several model chunks (virtual stages) per rank: interleaved any number of
2 or more, ZB-V 2."""


def chunks_per_rank(name: str, virtual: int) -> int:
    """Model chunks each rank runs under schedule ``name`` given ``virtual`` stages per rank;
    for ZB-V, which runs nothing but 2, the config's default 1 means 2 (``parallel.
    virtual_stages`` left out), as ``orch schedule zbv`` defaults ``--virtual`` to 2."""
    if name == "zbv" and virtual == 1:
        return 2
    return virtual if name in CHUNKED else 1


def placement_of(name: str) -> str:
    """Where schedule ``name`` puts its stages: ``v`` for ZB-V, else ``loop``."""
    return "v" if name == "zbv" else "loop"


def schedule_problems(
    name: str, stages: int, microbatches: int, virtual: int = 1, max_deferred: int | None = None
) -> list[ScheduleProblem]:
    """Every reason :func:`build_schedule` would refuse these arguments (none: it builds), each
    under its argument, so that a user fixes them all in one round; without building the
    schedule (the plan search asks for thousands of candidates)."""
    problems = []
    if name not in SCHEDULES:
        problems.append(ScheduleProblem("name", f"unknown schedule {name!r}",
                                        f"use one of {', '.join(SCHEDULES)}"))
    for argument, value, what in (("stages", stages, "pipeline stages"),
                                  ("microbatches", microbatches, "micro-batches")):
        if value < 1:
            problems.append(ScheduleProblem(argument, f"must be at least 1, got {value}",
                                            f"give 1 or more {what}"))
    if problem := _virtual_problem(name, virtual):
        problems.append(problem)
    if name == "interleaved" and stages >= 1 and microbatches >= 1 and microbatches % stages:
        next_multiple = -(-microbatches // stages) * stages
        problems.append(ScheduleProblem(
            "microbatches", f"interleaved 1F1B needs microbatches to be a multiple of stages; "
            f"got microbatches={microbatches}, stages={stages}",
            f"try {next_multiple} (the next multiple of {stages})"))
    if max_deferred is not None and not name.startswith("2bp-"):
        problems.append(ScheduleProblem(
            "max_deferred", f"{max_deferred} applies to 2bp-gpipe and 2bp-1f1b, not {name!r}",
            "leave it out"))
    elif max_deferred is not None and max_deferred < 0:
        problems.append(ScheduleProblem(
            "max_deferred", f"must be 0 or more, got {max_deferred}",
            "give 0 (each W right after its I) or more, or leave it out (r on rank r)"))
    return problems


def _virtual_problem(name: str, virtual: int) -> ScheduleProblem | None:
    """What is wrong with ``virtual`` stages per rank for schedule ``name``: interleaved runs 2
    or more (as the config says, parallel.virtual_stages), ZB-V 2 (a V), the others 1."""
    if name == "interleaved" and virtual < 2:
        return ScheduleProblem("virtual", f"interleaved runs 2 or more stages per rank, not "
                               f"virtual={virtual}{' (that is 1f1b)' if virtual == 1 else ''}",
                               "give 2 or more")
    if name == "zbv" and virtual != 2:
        return ScheduleProblem("virtual", f"zbv runs 2 stages per rank (a V), not "
                               f"virtual={virtual}", "give 2")
    if virtual < 1:
        return ScheduleProblem("virtual", f"must be at least 1, got {virtual}", "leave it out (1)")
    if name in SCHEDULES and name not in CHUNKED and virtual != 1:
        chunked = " or ".join(repr(n) for n in CHUNKED)
        return ScheduleProblem("virtual", f"virtual={virtual} needs schedule {chunked}; "
                               f"{name!r} runs one stage per rank", "leave it out (1)")
    return None


def build_schedule(
    name: str, stages: int, microbatches: int, virtual: int = 1, max_deferred: int | None = None
) -> Schedule:
    """Make the schedule called ``name``; options a schedule does not take must stay default."""
    _refuse(schedule_problems(name, stages, microbatches, virtual, max_deferred))
    if name == "interleaved":
        return interleaved_1f1b(stages, microbatches, virtual)
    if name == "zbv":
        return zbv(stages, microbatches)
    if name.startswith("2bp-"):
        return SCHEDULES[name](stages, microbatches, max_deferred=max_deferred)
    return SCHEDULES[name](stages, microbatches)
