"""What the plan reads off a split-backward schedule: held states and bubble, on a short step."""

from __future__ import annotations

import pytest

from orch.parallel.schedules import Costs, build_schedule, simulate
from orch.plan import schedule_shape
from orch.plan.schedule_shape import COUNTED, SIMULATED, bound, bubble_share, held


def _walked(name: str, stages: int, microbatches: int, max_deferred: int | None) -> tuple:
    """:func:`held` on the whole step, the plain way."""
    built = build_schedule(name, stages, microbatches, 1, bound(name, max_deferred))
    ranks = []
    for actions in built.ranks:
        live = pending = 0
        points = set()
        for act in actions:
            if act.kind in ("F", "B", "I", "W"):
                live += {"F": 1, "B": -1, "I": -1}.get(act.kind, 0)
                pending += {"I": 1, "W": -1}.get(act.kind, 0)
                points.add((live, pending))
        ranks.append(tuple(sorted(p for p in points if not any(
            q[0] >= p[0] and q[1] >= p[1] and q != p for q in points))))
    return tuple(ranks)


@pytest.mark.parametrize("name", COUNTED)
def test_a_short_step_shows_what_the_whole_step_holds_and_idles(name):
    """The plan simulates ``2 (P + bound)`` micro-batches of a longer step (seconds saved at
    thousands): the same held states (GPipe's base shifted by the forwards it adds) and the
    same idle seconds as the whole step."""
    bounds = [None] if name == "zb-h1" else [None, 0, 1, 3, 9]
    for stages in (2, 3, 4):
        for max_deferred in bounds:
            for microbatches in (1, 2, 5, 11, 24, 40):
                args = (name, stages, microbatches, max_deferred)
                assert held(*args) == _walked(*args), args
                whole = build_schedule(name, stages, microbatches, 1, bound(name, max_deferred))
                idle = simulate(whole, Costs()).makespan - 3 * microbatches
                assert bubble_share(*args) * 3 * microbatches == pytest.approx(idle), args
    assert schedule_shape._simulated(name, 4, 4096, 3 if name != "zb-h1" else None) <= 14


def test_zbv_idles_on_a_short_step_what_it_idles_on_the_whole_step():
    """ZB-V is simulated on ``2P`` micro-batches of a longer step: past them only its fill, half
    a forward per stage after the first, idles; below them as much more as the built order
    idles (4 stages, 2 micro-batches: 3.5 against 1.5)."""
    assert "zbv" in SIMULATED and "zbv" not in COUNTED
    for stages in (2, 3, 4, 6):
        for microbatches in (1, 2, 3, 5, 2 * stages - 1, 2 * stages, 3 * stages + 1):
            idle = simulate(build_schedule("zbv", stages, microbatches, 2), Costs()).makespan
            idle -= 3 * microbatches
            assert bubble_share("zbv", stages, microbatches) * 3 * microbatches == (
                pytest.approx(idle)), (stages, microbatches)
    assert bubble_share("zbv", 4, 2) == pytest.approx(3.5 / 6)
    assert schedule_shape._simulated("zbv", 8, 4096, None) == 16
