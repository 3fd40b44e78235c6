"""Run ``orch launch`` as a user does and read back what the run recorded, or a benchmark's own
worker in a process of its own (for benchmarks)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from orch.runtime.records import is_eval

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ORCH = [sys.executable, "-m", "orch.cli"]
"""The ``orch`` command, through this Python (also where orch is importable but not installed,
``PYTHONPATH`` at a checkout)."""


def launch(config: str, procs: int, sets: list[str],
           env: dict | None = None) -> tuple[list[dict], dict]:
    """Train ``config`` on ``procs`` local processes with ``--set`` items ``sets`` (in ``env``,
    default this process's); returns the metrics records (one per step: pass
    ``run.log_interval=1``) and the plan."""
    with tempfile.TemporaryDirectory() as run_dir:
        items = [f"run.dir={run_dir}", "checkpoint.interval=0", *sets]
        args = [arg for item in items for arg in ("--set", item)]
        out = subprocess.run([*ORCH, "launch", "--nproc-per-node", str(procs),
                              config, *args], capture_output=True, text=True, env=env,
                             cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"orch launch {config} {sets} failed:\n{out.stderr[-3000:]}")
        rows = [row for row in map(json.loads, (Path(run_dir) / "metrics.jsonl").open())
                if not is_eval(row)]  # the steps' records, not held-out evaluations'
        plan = json.loads((Path(run_dir) / "plan.json").read_text())
    return rows, plan


def steady_tokens_per_s(rows: list[dict], warmup: int) -> float:
    """Tokens per step over the median step time after ``warmup`` steps."""
    return rows[0]["tokens"] / statistics.median(r["step_time_s"] for r in rows[warmup:])


def json_worker(command: list[str], what: str) -> dict:
    """Run ``command`` (a benchmark's worker, in a process of its own so that its resident set is
    its own) and return the JSON of its last line of output. If it fails, exit saying ``what``
    failed with the end of its stderr: the worker's own error, not a ``CalledProcessError``."""
    out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        sys.exit(f"{what} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
