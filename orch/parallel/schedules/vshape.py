"""Candidate compute orders for ZB-V, the zero-bubble V-shape schedule (Qi et al., 2024).

Each rank holds two model chunks placed in a V (rank r runs stages r and 2P - 1 - r,
``orch.parallel.schedules.actions``): the first rank starts the forward and also computes the
loss, so a micro-batch's backward starts where its forward began, and a rank's idle warm-up and
cool-down are filled by its other chunk's work and by deferred weight-gradient steps.

An order is found by simulating the step with given costs per chunk and letting each rank,
whenever it is free, run the first ready action by priority among:

- an input-gradient step (I; B on stage 0, whose input gradient nobody waits for), deepest
  stage first: another rank is, or soon will be, waiting for it;
- a forward, deepest stage first (it reaches the loss, and so the backward, sooner), while the
  rank holds fewer than 2P chunk activations: P micro-batches of its share, 1F1B's peak on its
  first rank and ZB-V's memory bound;
- the oldest deferred weight-gradient step (W), which frees an activation.

The order is static while the run's costs are not the ones it was made with, and an order made
for exactly equal costs leaves no slack: at P = 2, M = 8 its worst step over ``COST_MIXES`` is
1.14x the work, against 1.027x for the same search made with I a little dearer than W and the
forward dearer than a backward half (torch's ScheduleZBVZeroBubble's hand-made order: 1.027x).
So :func:`v_orders` gives candidates made for a grid of costs (input-gradient or forward first;
the forward at 1, 0.8 and 1.2 times a backward half; I at 1, 1.1, 1.2, 0.9 and 1.3 times W),
each distinct order once, and the generator keeps the one whose worst step over ``COST_MIXES``
is shortest (``orch.parallel.schedules.generators.zbv``). Which grid point wins varies with P
and M with no pattern worth a rule: at P = 8, M = 32 the grid's best is 1.065x where the first
six candidates' was 1.089x.

On 4 and 8 ranks at M = 2P to 4P a greedy steady state holds up worse than the paper's hand-made
one (torch's order: 1.073x against the grid's 1.107x at P = 8, M = 24), so :func:`paper_orders`
adds candidates that follow the paper's warm-up and steady state and leave only the cool-down to
the greedy; with them the kept order is never longer than torch's in the simulator, and shorter
below 2P - 1 micro-batches, where torch's pads (tests/parallel/test_schedules.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from orch.parallel.schedules.actions import Action, rank_stages

_SCALE = 10
"""Costs are integers (F = 10, I + W = 20) so the simulated clock is exact."""


class _Step:
    """The greedy simulation of one ZB-V step: which action each rank runs next, and when."""

    def __init__(self, stages: int, microbatches: int, forward_first: bool,
                 input_cost: int, forward_cost: int = _SCALE, scripted: bool = False) -> None:
        self.ranks, self.microbatches = stages, microbatches
        self.script = [_paper_prefix(stages, microbatches, rank) if scripted else deque()
                       for rank in range(stages)]
        self.last = 2 * stages - 1
        self.limit = 2 * stages
        self.cost = {"F": forward_cost, "B": 2 * _SCALE, "I": input_cost,
                     "W": 2 * _SCALE - input_cost}
        self.picks = ((self._forward, self._backward, self._weight) if forward_first
                      else (self._backward, self._forward, self._weight))
        self.mine = [rank_stages(rank, stages, 2, "v")[::-1] for rank in range(stages)]
        self.forwards = [0] * (2 * stages)  # next micro-batch to go forward, per stage
        self.backwards = [0] * (2 * stages)  # next micro-batch to go backward, per stage
        self.held = [0] * stages  # chunk activations alive on each rank
        self.deferred: list[deque[Action]] = [deque() for _ in range(stages)]
        self.ends: dict[Action, int] = {}
        self.now = 0

    def _done(self, act: Action) -> bool:
        return self.ends.get(act, self.now + 1) <= self.now

    def _ready(self, act: Action) -> bool:
        """Whether what ``act`` needs has finished (its own rank's order aside)."""
        s, m = act.stage, act.microbatch
        if act.kind == "F":
            return s == 0 or self._done(Action("F", s - 1, m))
        if act.kind == "W":
            return self._done(Action("I", s, m))
        if s == self.last:
            return self._done(Action("F", s, m))
        return self._done(Action("I", s + 1, m)) or self._done(Action("B", s + 1, m))

    def _take(self, rank: int, act: Action) -> Action:
        """Account ``act`` as started on ``rank``: the counters the pickers read."""
        if act.kind == "F":
            self.forwards[act.stage] += 1
            self.held[rank] += 1
        elif act.kind == "W":
            self.deferred[rank].remove(act)
            self.held[rank] -= 1
        else:
            self.backwards[act.stage] += 1
            if act.kind == "B":  # stage 0's fused backward: its activation freed
                self.held[rank] -= 1
            else:
                self.deferred[rank].append(Action("W", act.stage, act.microbatch))
        return act

    def _next(self, rank: int) -> Action | None:
        """The rank's next action: its prescribed one once ready (the rank waits for it), else
        the first ready one by the greedy's priorities; None to stay idle."""
        if self.script[rank]:
            act: Action | None = self.script[rank][0]
            if not self._ready(act):
                return None
            self.script[rank].popleft()
        else:
            act = next((a for pick in self.picks if (a := pick(rank)) is not None), None)
        return None if act is None else self._take(rank, act)

    def _backward(self, rank: int) -> Action | None:
        for s in self.mine[rank]:
            if self.backwards[s] < self.forwards[s]:
                act = Action("B" if s == 0 else "I", s, self.backwards[s])
                if self._ready(act):
                    return act
        return None

    def _forward(self, rank: int) -> Action | None:
        if self.held[rank] >= self.limit:
            return None
        for s in self.mine[rank]:
            act = Action("F", s, self.forwards[s])
            if act.microbatch < self.microbatches and self._ready(act):
                return act
        return None

    def _weight(self, rank: int) -> Action | None:
        return self.deferred[rank][0] if self.deferred[rank] else None

    def run(self) -> list[list[Action]] | None:
        """Per rank, the compute actions in order; None when the greedy runs into the memory
        bound with nothing it may run (possible with forwards first; never seen otherwise)."""
        order: list[list[Action]] = [[] for _ in range(self.ranks)]
        free = [0] * self.ranks
        left = self.microbatches * (3 * (self.last + 1) - 1)  # F, I and W; stage 0's B fused
        while left:
            for rank in range(self.ranks):
                if free[rank] > self.now:
                    continue
                act = self._next(rank)
                if act is not None:
                    order[rank].append(act)
                    free[rank] = self.ends[act] = self.now + self.cost[act.kind]
                    left -= 1
            # every running action ends at its rank's free time: the next event is the soonest
            later = [t for t in free if t > self.now]
            if left and not later:
                return None
            self.now = min(later, default=self.now)
        return order


def _paper_prefix(stages: int, microbatches: int, rank: int) -> deque[Action]:
    """The warm-up and steady state of the ZB-V order drawn in the paper (and hand-made in
    torch's ScheduleZBVZeroBubble), for ``rank``: forwards of its first chunk (``down``, stage
    r) until the second chunk's first micro-batch can arrive, the two chunks' forwards
    alternating, then each second-chunk forward followed by a backward of that chunk, and in
    the steady state a forward and a whole backward (I, then W at once) of each chunk in turn,
    up to the last forward; the cool-down is left to the greedy, input-gradient steps first.
    On 4 and 8 ranks at M = 2P to 4P its steady state holds up better than the greedy's (P =
    8, M = 24: 1.073x the work in the worst cost mix against 1.107x)."""
    down, up = rank, 2 * stages - 1 - rank
    forwards, backwards = {down: 0, up: 0}, {down: 0, up: 0}
    out: deque[Action] = deque()

    def forward(stage: int) -> None:
        if forwards[stage] < microbatches:
            out.append(Action("F", stage, forwards[stage]))
            forwards[stage] += 1

    def backward(stage: int) -> None:
        if backwards[stage] < forwards[stage]:
            m = backwards[stage]
            backwards[stage] += 1
            out.extend([Action("B", stage, m)] if stage == 0 else
                       [Action("I", stage, m), Action("W", stage, m)])

    for _ in range(2 * (stages - rank) - 1):
        forward(down)
    for _ in range(rank):
        forward(up)
        forward(down)
    for _ in range(stages - rank):
        forward(up)
        backward(up)
    while min(forwards.values()) < microbatches:
        forward(down)
        backward(down)
        forward(up)
        backward(up)
    return out


_FORWARD_COSTS = (_SCALE, _SCALE - 2, _SCALE + 2)
_INPUT_COSTS = (_SCALE, _SCALE + 1, _SCALE + 2, _SCALE - 1, _SCALE + 3)


def v_orders(stages: int, microbatches: int) -> Iterator[list[list[Action]]]:
    """Candidate ZB-V orders (each: per rank, the compute actions in order), made lazily, each
    distinct order once, the ones made at the forward's equal cost first. The first, made with
    input-gradient steps first at equal costs, completed for every size tried (1-8 ranks, 1 to
    4P micro-batches, tests/parallel/test_schedules.py)."""
    seen: set[tuple[tuple[Action, ...], ...]] = set()
    for forward_cost in _FORWARD_COSTS:
        for forward_first in (False, True):
            for input_cost in _INPUT_COSTS:
                yield from _new(_Step(stages, microbatches, forward_first, input_cost,
                                      forward_cost).run(), seen)


def paper_orders(stages: int, microbatches: int) -> Iterator[list[list[Action]]]:
    """The paper's warm-up and steady state (:func:`_paper_prefix`) with greedy cool-downs made
    for I at 0.9, 1 and 1.1 times W; none when a rank would wait forever (too few
    micro-batches for the prefix: M < 2P - 1, where the greedy orders do better anyway)."""
    seen: set[tuple[tuple[Action, ...], ...]] = set()
    if microbatches < 2 * stages - 1:
        return
    for input_cost in (_SCALE, _SCALE - 1, _SCALE + 1):
        yield from _new(_Step(stages, microbatches, False, input_cost, scripted=True).run(),
                        seen)


def _new(order: list[list[Action]] | None, seen: set[tuple[tuple[Action, ...], ...]]
         ) -> Iterator[list[list[Action]]]:
    """``order`` unless it is None or already in ``seen`` (which it joins)."""
    if order is not None and (key := tuple(map(tuple, order))) not in seen:
        seen.add(key)
        yield order


__all__ = ["paper_orders", "v_orders"]
