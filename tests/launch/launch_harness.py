"""Helpers for tests that run ``orch launch`` as a user does: a subprocess per launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
