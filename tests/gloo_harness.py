"""Run a function on N spawned processes that share one gloo process group.

Spawn, not fork: a child forked after the parent's OpenMP pool ran (earlier tests' matmuls) can
hang in libgomp. The manager process that carries the results back is spawned too: forked from
a pytest worker that had run many tests in-process, it died of a segmentation fault at the fork
in one full run (2026-12-07), and every later test of that worker using this harness with it.
Process start-up dominates small distributed tests, so each test module starts one group and runs
all its cases inside it, returning results through a manager dict.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[..., None]
"""``fn(rank, world, results, *args)``: runs inside the group, stores into ``results``."""


def _entry(rank: int, fn: Worker, world: int, store: str, results: Any, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn(rank, world, results, *args)
    except Exception:  # the parent sees a missing result; the traceback says why
        traceback.print_exc()
    finally:
        dist.destroy_process_group()
        os._exit(0)  # gloo threads can abort at interpreter exit (DESIGN.md, known traps)


def run_on_gloo(fn: Worker, world: int, directory: Path, *args: Any) -> dict:
    """``fn`` on ``world`` ranks; the union of what every rank put into ``results``."""
    with mp.get_context("spawn").Manager() as manager:
        shared = manager.dict()
        mp.start_processes(
            _entry,
            args=(fn, world, str(directory / "store"), shared, args),
            nprocs=world,
            start_method="spawn",
        )
        return dict(shared)
