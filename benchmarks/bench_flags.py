"""argparse types and checks the benchmarks share, so a bad flag is an argparse error (usage line,
the flag, what it must be, exit 2) before anything runs, not a traceback minutes into a run.

    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("--steps", type=at_least(6), default=30)
    parser.add_argument("--size", type=byte_size, default="1GiB")
    add_model_shape(parser, dim=1024, layers=16, ffn=2816)   # --dim, --layers, --ffn
    args = parser.parse_args(argv)
    steps_after_warmup(parser, args)                          # --steps > --warmup
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from orch.config.coerce import parse_bytes


def description(doc: str) -> str:
    """A benchmark's ``--help`` description: its docstring's first paragraph, as one line (its
    first line alone stops mid-sentence wherever the sentence wraps)."""
    return " ".join(doc.split("\n\n")[0].split())


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


def steps_after_warmup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse ``--steps`` not above ``--warmup`` as an argparse error: the median is taken over
    the steps after the warm-up, and of none there is no median (a StatisticsError after every
    run had been made, before)."""
    if args.steps <= args.warmup:
        parser.error(f"argument --steps: must be more than --warmup ({args.warmup}), whose steps "
                     f"are left out of the median, not {args.steps}")


def timed_launches(parser: argparse.ArgumentParser, argv: list[str] | None, steps: int,
                   sets: list[str]) -> argparse.Namespace:
    """The flags of a benchmark that times ``orch launch`` runs of a config in rounds
    (``--procs``, ``--steps``, ``--warmup``, ``--rounds``, ``--config``, ``--set``; defaults
    ``steps`` and ``sets``), parsed from ``argv`` and checked (:func:`steps_after_warmup`)."""
    parser.add_argument("--procs", type=positive_int, default=1)
    parser.add_argument("--steps", type=positive_int, default=steps)
    parser.add_argument("--warmup", type=at_least(0), default=3)
    parser.add_argument("--rounds", type=positive_int, default=2)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", dest="sets", nargs="*", default=sets)
    args = parser.parse_args(argv)
    steps_after_warmup(parser, args)
    return args


HEAD_DIM = 128
"""The offload benchmarks' models have heads of this width: ``--dim`` is a multiple of it."""


def add_model_shape(parser: argparse.ArgumentParser, dim: int, layers: int, ffn: int) -> None:
    """``--dim``, ``--layers`` and ``--ffn`` (defaults given) of a benchmark's Llama-style model
    on ``configs/tiny.yaml``; :func:`model_sets` makes them ``--set`` items."""
    parser.add_argument("--dim", type=at_least(HEAD_DIM, f"heads of {HEAD_DIM}",
                                               multiple_of=HEAD_DIM), default=dim)
    parser.add_argument("--layers", type=positive_int, default=layers)
    parser.add_argument("--ffn", type=positive_int, default=ffn)


def model_sets(args: argparse.Namespace) -> list[str]:
    """The model of :func:`add_model_shape`'s flags, as orch ``--set`` items."""
    heads = args.dim // HEAD_DIM
    return [f"model.dim={args.dim}", f"model.layers={args.layers}", f"model.ffn_dim={args.ffn}",
            f"model.heads={heads}", f"model.kv_heads={heads}"]


def byte_size(text: str) -> int:
    """An argparse type: a positive byte size such as ``64MiB``, ``1GiB`` or ``4096B``."""
    value = parse_bytes(text)
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a positive byte size such as 64MiB, 1GiB or 4096B, not {text!r}")
    return value
