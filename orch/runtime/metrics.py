"""Per-step metrics: the progress line on rank 0 and ``RUN_DIR/metrics.jsonl``.

The progress line has the same fields on every backend (DESIGN.md):
``step 120/1000 | loss 3.412 | 48.2k tok/s | 412 TFLOP/s | MFU 41.7% | mem 61.2/80.0 GiB |
0.41 s/step``; the JSON line holds the same values unrounded. Throughput figures are per step
(tokens of the whole global batch over the step's wall time); TFLOP/s and MFU are per device,
from the plan's model FLOPs per token, so they compare across plans and with other frameworks.
"""

from __future__ import annotations

import json
import os
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

import torch

GIB = 2**30


@dataclass(frozen=True)
class StepMetrics:
    step: int
    steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    step_time_s: float
    tokens_per_s: float
    tflops: float
    """Model TFLOP/s per device."""
    mfu: float
    mem_bytes: int
    mem_total_bytes: int
    aux_loss: float | None = None
    """MoE models: the weighted load-balancing term added to ``loss`` for backward (``loss``
    itself is the language-model loss alone)."""
    expert_load: list[list[int]] | None = None
    """MoE models: tokens routed to each expert in the step, per MoE layer, over all ranks."""
    comm_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes rank 0 handed to collectives in the step, per parallel dimension (dp, tp, cp, ep,
    etp, edp, other; ``orch.parallel.comm_stats``)."""
    pipeline_idle: list[float] | None = None
    """Pipeline runs: each pipeline rank's idle fraction of the step's forward and backward,
    measured (``pipeline_timeline.png`` and ``pipeline_trace.json`` in the run directory)."""
    offload: dict[str, int] | None = None
    """Offloaded runs: the step's accounted device peak (``device_peak_bytes``, never over
    ``offload.device_budget``) and bytes moved to the device and back home."""

    def line(self) -> str:
        tok = self.tokens_per_s
        rate = f"{tok / 1e6:.2f}M" if tok >= 1e6 else f"{tok / 1e3:.1f}k"
        return (
            f"step {self.step}/{self.steps} | loss {self.loss:.3f} | {rate} tok/s | "
            f"{self.tflops:.3g} TFLOP/s | MFU {self.mfu * 100:.1f}% | "
            f"mem {self.mem_bytes / GIB:.1f}/{self.mem_total_bytes / GIB:.1f} GiB | "
            f"{self.step_time_s:.2f} s/step"
        )


def memory_bytes(device: torch.device) -> tuple[int, int]:
    """(peak bytes in use so far, bytes the device has): CUDA's allocator peak, or on the CPU
    this process's peak resident set (``ru_maxrss``), the figure offload is judged by."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return torch.cuda.max_memory_allocated(device), total
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, total


class MetricsLog:
    """Writes metrics on rank 0: a line to ``out`` and a JSON object to ``metrics.jsonl``.

    A resumed run first drops the records after ``resume_step`` (steps it will redo), so the
    file always reads as one run.
    """

    def __init__(self, run_dir: Path, enabled: bool, out: IO[str], resume_step: int = 0) -> None:
        self.enabled, self.out, self.file = enabled, out, None
        if not enabled:
            return
        path = run_dir / "metrics.jsonl"
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = path.open("a")

    def log(self, metrics: StepMetrics) -> None:
        if not self.enabled:
            return
        print(metrics.line(), file=self.out, flush=True)
        assert self.file is not None
        self.file.write(json.dumps(asdict(metrics)) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
