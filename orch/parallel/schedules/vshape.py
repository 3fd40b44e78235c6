"""The compute order of ZB-V, the zero-bubble V-shape schedule (Qi et al., 2024).

Each rank holds two model chunks placed in a V (rank r runs stages r and 2P - 1 - r,
``orch.parallel.schedules.actions``): the first rank starts the forward and also computes the
loss, so a micro-batch's backward starts where its forward began, and a rank's idle warm-up and
cool-down are filled by its other chunk's work and by deferred weight-gradient steps.

The order is found by simulating the step with unit costs per chunk (F = I = W, the paper's
setting; the first stage's fused B is I + W) and letting each rank, whenever it is free, run the
first ready action of:

1. an input-gradient step (I; B on stage 0, whose input gradient nobody waits for), deepest
   stage first: another rank is, or soon will be, waiting for it;
2. a forward, deepest stage first (it reaches the loss, and so the backward, sooner), while the
   rank holds fewer than 2P chunk activations: P micro-batches of its share, 1F1B's peak on its
   first rank and ZB-V's memory bound;
3. the oldest deferred weight-gradient step (W), which frees an activation.

Under unit costs every rank's work is 3M (M micro-batches of F + I + W over its whole share) and
the last rank cannot start before the first forward has come down P - 1 chunks, so no schedule
beats 3M + (P - 1) / 2; this order comes within 7% of that bound for 1 to 8 ranks and every M
from P to 4P, within 4% at M = P, 2P and 4P (tests/parallel/test_schedules.py), where ZB-H1 is
8%, 11% and 13% above it at M = P = 2, 4 and 8.
"""

from __future__ import annotations

from collections import deque

from orch.parallel.schedules.actions import Action, rank_stages

_UNIT_COST = {"F": 1, "B": 2, "I": 1, "W": 1}


class _Step:
    """The greedy simulation of one ZB-V step: which action each rank runs next, and when."""

    def __init__(self, stages: int, microbatches: int) -> None:
        self.ranks, self.microbatches = stages, microbatches
        self.last = 2 * stages - 1
        self.limit = 2 * stages
        self.mine = [rank_stages(rank, stages, 2, "v")[::-1] for rank in range(stages)]
        self.forwards = [0] * (2 * stages)  # next micro-batch to go forward, per stage
        self.backwards = [0] * (2 * stages)  # next micro-batch to go backward, per stage
        self.held = [0] * stages  # chunk activations alive on each rank
        self.deferred: list[deque[Action]] = [deque() for _ in range(stages)]
        self.ends: dict[Action, int] = {}
        self.now = 0

    def _done(self, act: Action) -> bool:
        return self.ends.get(act, self.now + 1) <= self.now

    def _backward(self, rank: int) -> Action | None:
        for s in self.mine[rank]:
            m = self.backwards[s]
            if m >= self.forwards[s]:
                continue
            if s == self.last:
                ready = self._done(Action("F", s, m))
            else:
                ready = self._done(Action("I", s + 1, m)) or self._done(Action("B", s + 1, m))
            if ready:
                self.backwards[s] += 1
                if s == 0:
                    self.held[rank] -= 1
                    return Action("B", s, m)
                self.deferred[rank].append(Action("W", s, m))
                return Action("I", s, m)
        return None

    def _forward(self, rank: int) -> Action | None:
        if self.held[rank] >= self.limit:
            return None
        for s in self.mine[rank]:
            m = self.forwards[s]
            if m < self.microbatches and (s == 0 or self._done(Action("F", s - 1, m))):
                self.forwards[s] += 1
                self.held[rank] += 1
                return Action("F", s, m)
        return None

    def _weight(self, rank: int) -> Action | None:
        if not self.deferred[rank]:
            return None
        self.held[rank] -= 1
        return self.deferred[rank].popleft()

    def run(self) -> list[list[Action]]:
        order: list[list[Action]] = [[] for _ in range(self.ranks)]
        free = [0] * self.ranks
        left = self.microbatches * (3 * (self.last + 1) - 1)  # F, I and W; stage 0's B fused
        while left:
            for rank in range(self.ranks):
                if free[rank] > self.now:
                    continue
                act = self._backward(rank) or self._forward(rank) or self._weight(rank)
                if act is not None:
                    order[rank].append(act)
                    free[rank] = self.ends[act] = self.now + _UNIT_COST[act.kind]
                    left -= 1
            # every running action ends at its rank's free time: the next event is the soonest
            later = [t for t in free if t > self.now]
            if left and not later:
                raise RuntimeError(f"ZB-V order stuck at time {self.now} with {left} actions "
                                   f"left (stages={self.ranks}, microbatches="
                                   f"{self.microbatches}): a bug in orch's generator")
            self.now = min(later, default=self.now)
        return order


def v_order(stages: int, microbatches: int) -> list[list[Action]]:
    """Per rank, the ZB-V compute actions in the order that rank runs them."""
    return _Step(stages, microbatches).run()


__all__ = ["v_order"]
