"""argparse types the benchmarks share, so a bad flag is an argparse error (usage line, the flag,
what it must be, exit 2) before anything runs, not a traceback minutes into a run.

    parser.add_argument("--steps", type=at_least(6), default=30)
    parser.add_argument("--dim", type=at_least(128, "heads of 128", multiple_of=128))
    parser.add_argument("--size", type=byte_size, default="1GiB")
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from orch.config.coerce import parse_bytes


def at_least(low: int, why: str = "", multiple_of: int = 1) -> Callable[[str], int]:
    """An argparse type: a whole number ``>= low``, and a multiple of ``multiple_of`` where that
    is above 1 (``why``, if given, is said after it: what the bound comes from, such as the
    warm-up steps left out of the median, or a model width cut into heads)."""
    kind = "whole number" if multiple_of == 1 else f"multiple of {multiple_of}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or value % multiple_of:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(
                f"must be a {kind} of at least {low}{reason}, not {text!r}")
        return value

    parse.__name__ = f"{kind} >= {low}"
    return parse


positive_int = at_least(1)


def byte_size(text: str) -> int:
    """An argparse type: a positive byte size such as ``64MiB``, ``1GiB`` or ``4096B``."""
    value = parse_bytes(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive byte size such as 64MiB, 1GiB or 4096B, not {text!r}")
    return value
