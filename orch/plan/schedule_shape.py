"""What a split-backward pipeline schedule holds and idles, read off the schedule that runs.

2BP and ZB-H1 defer weight-gradient steps (``W``) behind their input-gradient steps (``I``); how
many wait on a rank, and so how much memory a rank holds and how much of the step's idle time the
W's fill, depends on the schedule's bound (``parallel.pp_max_deferred``: 0 runs each W right after
its I, 16 lets 16 wait) in ways no fixed scale follows. So the plan builds the schedule the run
builds (``orch.parallel.schedules``, torch-free and cheap for these) and counts, per rank, the
forwards whose activations are in flight and the W's pending, and simulates it for the bubble;
each answer is cached per (schedule, stages, micro-batches, bound): a search asks a few shapes
thousands of times.

ZB-V's bubble is read off its built schedule too (:data:`SIMULATED`): with fewer than ``2P``
micro-batches its fill is not yet all that idles (at ``P = 4, M = 2`` it idles 0.58 of its work,
where a sixth of 1F1B's ``(P - 1) / M`` said 0.25), and how much more follows no closed form.
The other schedules keep their closed forms (``orch.plan.memory._in_flight``,
``orch.plan.cost.CLOSED_FORM``), which equal what the simulator finds for them, as does ZB-V's
activation peak.
"""

from __future__ import annotations

from functools import lru_cache

from orch.parallel.schedules.actions import Schedule
from orch.parallel.schedules.generators import build_schedule, chunks_per_rank
from orch.parallel.schedules.simulate import Costs, makespan

COUNTED = ("2bp-gpipe", "2bp-1f1b", "zb-h1")
"""Schedules whose activation peaks and bubble are read off the built schedule."""
SIMULATED = (*COUNTED, "zbv")
"""Schedules whose bubble is read off the built schedule (:func:`bubble_share`)."""

Held = tuple[tuple[int, int], ...]
"""One rank's ``(activations in flight, weight-gradient steps pending)`` points that can be its
peak in bytes whatever either costs: those no other point matches or exceeds in both."""


def bound(schedule: str, max_deferred: int | None) -> int | None:
    """The ``max_deferred`` the run builds ``schedule`` with: the config's for the 2BP schedules
    (``orch.runtime.parallelize``), none for the others (ZB-H1's staircase is fixed)."""
    return max_deferred if schedule.startswith("2bp-") else None


def _simulated(schedule: str, stages: int, microbatches: int, max_deferred: int | None) -> int:
    """Micro-batches that show all a step of ``microbatches`` does: past a few pipelines' worth
    (``2 (P + bound)``; ZB-V's ``2P``, where its idle time settles at the fill's ``(P - 1) / 2``
    forwards) a step only repeats its steady state for longer (tests check this against the
    whole step)."""
    if schedule == "zbv":
        return min(microbatches, 2 * stages)
    limit = bound(schedule, max_deferred)
    return min(microbatches, 2 * (stages + (stages - 1 if limit is None else limit)))


def _built(schedule: str, stages: int, microbatches: int, max_deferred: int | None) -> Schedule:
    """The schedule :func:`held` and :func:`bubble_share` read, built once for both (and for
    every step longer than what it shows)."""
    return _build(schedule, stages, _simulated(schedule, stages, microbatches, max_deferred),
                  bound(schedule, max_deferred))


@lru_cache(maxsize=64)
def _build(schedule: str, stages: int, microbatches: int, limit: int | None) -> Schedule:
    return build_schedule(schedule, stages, microbatches, chunks_per_rank(schedule, 1), limit)


@lru_cache(maxsize=256)
def held(schedule: str, stages: int, microbatches: int,
         max_deferred: int | None = None) -> tuple[Held, ...]:
    """Per pipeline rank, the points of :data:`Held` its actions pass through: an ``F`` adds an
    activation, a fused ``B`` frees one, an ``I`` turns one into a pending ``W`` (which keeps the
    linears' inputs and output gradients, ``deferred_weight_grad_bytes``), a ``W`` frees that.

    Counted on a step of :func:`_simulated` micro-batches; 2BP-GPipe, which runs every forward
    first, then holds as many more activations as the step has more micro-batches."""
    built = _built(schedule, stages, microbatches, max_deferred)
    more = microbatches - built.microbatches if schedule == "2bp-gpipe" else 0
    ranks = []
    for actions in built.ranks:
        live, pending = more, 0
        points: set[tuple[int, int]] = set()
        for act in actions:
            if act.kind == "F":
                live += 1
            elif act.kind == "B":
                live -= 1
            elif act.kind == "I":
                live, pending = live - 1, pending + 1
            elif act.kind == "W":
                pending -= 1
            else:
                continue
            points.add((live, pending))
        ranks.append(tuple(sorted(
            (a, w) for a, w in points
            if not any(b >= a and x >= w and (b, x) != (a, w) for b, x in points))))
    return tuple(ranks)


@lru_cache(maxsize=256)
def bubble_share(schedule: str, stages: int, microbatches: int,
                 max_deferred: int | None = None) -> float:
    """Idle time of the step over each rank's work, ``makespan / (M (F + I + W)) - 1``, with
    forward and the two backward halves equal (backward two thirds of the compute, as
    ``orch.plan.cost`` prices it) and transfers free: 1F1B's ``(P - 1) / M`` scaled as the
    schedule's W's fill it.

    Past a few pipelines' worth of micro-batches the idle seconds stop growing (the warm-up and
    the cool-down are all there is), so a step of many micro-batches is simulated at
    :func:`_simulated` of them and its idle time taken over its own work: the same number, in
    milliseconds instead of seconds at thousands of micro-batches."""
    built = _built(schedule, stages, microbatches, max_deferred)
    return (makespan(built, Costs()) - 3 * built.microbatches) / (3 * microbatches)
