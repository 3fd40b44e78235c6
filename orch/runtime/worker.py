"""The worker's entry: ``python -m orch.runtime.worker CONFIG [--set ...] [--resume ...]``.

Started by ``orch launch`` (torchrun) on every rank; the work is in
:mod:`orch.runtime.training_worker`. Importing it (torch and all of orch) takes seconds, and a
Ctrl-C then (torchrun passes the launcher's SIGINT on to every worker) raised KeyboardInterrupt
before the worker's own handler was in place: each worker dumped its import traceback, some 35
lines, interleaved with the others'. Here the import runs under a guard that says one line, as
a worker stopped later does, and exits 130 (128 + SIGINT). This module imports nothing heavy,
so it is also a light ``__main__`` for processes started with spawn.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

INTERRUPTED = 130
"""The exit code of a worker stopped by SIGINT while it was starting (128 + 2)."""


def _load() -> Callable[[], None]:
    from orch.runtime.training_worker import main

    return main


def load_worker(load: Callable[[], Callable[[], None]] = _load) -> Callable[[], None] | None:
    """The worker's ``main``, imported by ``load``; ``None``, after one line on stderr, when a
    Ctrl-C interrupted the import."""
    try:
        return load()
    except KeyboardInterrupt:
        sys.stderr.write("orch worker: stopped by SIGINT while starting\n")  # one write
        sys.stderr.flush()
        return None


def main() -> None:
    run = load_worker()
    if run is None:
        os._exit(INTERRUPTED)  # half-imported torch: no interpreter shutdown
    run()


if __name__ == "__main__":
    main()
