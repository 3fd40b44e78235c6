"""argparse types the benchmarks share, so a bad flag is an argparse error (usage line, the flag,
what it must be, exit 2) before anything runs, not a traceback minutes into a run.

    parser.add_argument("--steps", type=at_least(6), default=30)
    parser.add_argument("--size", type=byte_size, default="1GiB")
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from orch.config.coerce import parse_bytes


def at_least(low: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a whole number ``>= low`` (``why``, if given, is said after it: what the
    bound comes from, such as the warm-up steps left out of the median)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(
                f"must be a whole number of at least {low}{reason}, not {text!r}")
        return value

    parse.__name__ = f"whole number >= {low}"
    return parse


positive_int = at_least(1)


def byte_size(text: str) -> int:
    """An argparse type: a positive byte size such as ``64MiB``, ``1GiB`` or ``4096B``."""
    value = parse_bytes(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive byte size such as 64MiB, 1GiB or 4096B, not {text!r}")
    return value
