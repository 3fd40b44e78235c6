"""benchmarks/offload_finetune.py, the GPU fine-tuning benchmark, run on its CPU path with a
tiny model: both contenders train, the table and the ratio come out, and the two runs' first
losses agree (fp32 on the CPU; on a GPU both compute in bf16 and agree only closely)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "offload_finetune.py"


def test_the_finetune_benchmark_trains_both_contenders_on_its_cpu_path(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--shape", "tiny",
                          "--seq", "64", "--batch", "2", "--steps", "2", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in out.stdout.splitlines() if line.startswith(("| orch", "| deepspeed"))}
    assert set(rows) == {"orch nvme", "deepspeed nvme"}
    assert rows["orch nvme"][-1] == rows["deepspeed nvme"][-1]  # first losses, 4 decimals
    assert float(rows["deepspeed nvme"][5]) > 0  # ZeRO-Infinity read its NVMe tier
    assert "orch / DeepSpeed ZeRO-Infinity TFLOP/s: " in out.stdout
    assert not list(tmp_path.iterdir())  # both scratch directories are gone
