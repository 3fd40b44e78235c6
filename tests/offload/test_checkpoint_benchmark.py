"""benchmarks/offload_checkpoint.py at its smallest size: both ways save and load, agree on the
loaded values, and the table comes out (the benchmark failed on every run for a while, its worker's
config refused, with nothing to notice it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "offload_checkpoint.py"


def test_the_checkpoint_benchmark_saves_and_loads_both_ways(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dim", "128", "--layers", "1", "--ffn",
                          "128", "--rounds", "1", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| a")]
    assert [row.split(" | ")[0] for row in rows] == ["| all in memory",
                                                      "| a tensor / a unit at a time"]
    assert "save: resident-set growth" in out.stdout and "load: resident-set growth" in out.stdout
    assert not list(tmp_path.iterdir())  # every scratch and run directory is gone
