"""Paired rounds: contenders measured in turn, round after round, and compared within a round.

This machine's speed drifts over minutes (other jobs' load, a disk still writing back what the
last run wrote), so a contender measured once at the start and another at the end differ by the
drift as much as by what they do. Each round runs every contender, in an order that rotates from
round to round (no contender always runs first, or always after the same one), and a ratio is
taken between two contenders of the same round: the drift moves both sides of it. The ratios'
median and range over the rounds is what to report.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def in_turn(names: Sequence[str], round_: int) -> list[str]:
    """``names`` in round ``round_``'s order (0-based): rotated left by ``round_``, so over
    ``len(names)`` rounds each name runs first once and after each of the others' turns."""
    start = round_ % len(names)
    return [*names[start:], *names[:start]]


def paired(ours: Sequence[float], base: Sequence[float]) -> tuple[float, float, float]:
    """The ratios ``ours / base`` of each round: their median, lowest and highest."""
    ratios = sorted(o / b for o, b in zip(ours, base, strict=True))
    return statistics.median(ratios), ratios[0], ratios[-1]
