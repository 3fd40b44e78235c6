"""Helpers for tests that run ``orch launch`` as a user does: a subprocess per launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orch.runtime.records import is_eval

REPO = Path(__file__).resolve().parents[2]
ORCH = Path(sys.executable).parent / "orch"

# Small and quick on 2 cores, and still the real tiny model on the shipped corpus.
FAST = [
    "train.seq_len=64", "train.global_batch=8", "train.micro_batch=2", "train.warmup_steps=2",
    "run.log_interval=1", "checkpoint.interval=0",
]


def launch(*args: str, timeout: int = 300, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """``orch launch ARGS`` as a user runs it; ``env`` adds to the environment."""
    return subprocess.run([str(ORCH), "launch", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def overrides(run_dir: Path, *extra: str) -> list[str]:
    out = []
    for item in [*FAST, f"run.dir={run_dir}", *extra]:
        out += ["--set", item]
    return out


def records(run_dir: Path) -> list[dict]:
    """Every record of ``run_dir/metrics.jsonl``: the steps' and the evaluations'."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def metrics(run_dir: Path) -> list[dict]:
    """The training steps' records (not the held-out evaluations')."""
    return [r for r in records(run_dir) if not is_eval(r)]


def eval_metrics(run_dir: Path) -> list[dict]:
    """The held-out evaluations' records (``eval:``)."""
    return [r for r in records(run_dir) if is_eval(r)]


ONE_THREAD = {"OMP_NUM_THREADS": "1"}
"""The environment of launches run side by side: two launches whose threads outnumber the cores
wait for each other's OpenMP barriers (measured: two 1-process runs at 2 threads each took
0.5-8.2 s a step instead of 0.15)."""


def two_at_a_time(run: Callable[..., None], names: Iterable[str], *args: object) -> None:
    """``run(name, *args)`` for every name, two at a time (each launching with
    :data:`ONE_THREAD`): a launch alone leaves a core idle much of the time (start-up is one
    process importing, a 1-process run computes on a core and a half); 34 launches took 318 s
    one at a time and 273 s two at a time. The first failure is raised and the runs not started
    yet are dropped."""
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(run, name, *args) for name in names]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
