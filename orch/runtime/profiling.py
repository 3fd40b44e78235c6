"""``run.profile: {start, steps}``: a torch profiler trace of those steps, on every rank.

The profiler records from the start of step ``start`` to the end of step ``start + steps - 1``
(CPU, and CUDA kernels on a GPU, with stacks off to keep the trace small), then each rank writes
``RUN_DIR/profile/rank-<rank>.json``, a Chrome trace that chrome://tracing, Perfetto and
TensorBoard's profiler open. Outside those steps nothing is recorded and nothing slows down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orch.config.schema import ProfileConfig


class StepProfiler:
    """Starts and stops torch's profiler around the configured steps."""

    def __init__(self, profile: ProfileConfig, run_dir: Path, rank: int,
                 device: torch.device) -> None:
        self.first = profile.start
        self.last = profile.start + profile.steps - 1
        self.path = run_dir / "profile" / f"rank-{rank}.json"
        self.rank = rank
        self.device = device
        self._profiler: Any = None

    def before(self, step: int) -> None:
        """Call at the start of ``step``."""
        if self.first and step == self.first:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities, record_shapes=False)
            self._profiler.__enter__()

    def after(self, step: int) -> None:
        """Call at the end of ``step``; writes the trace after the last profiled step."""
        if self._profiler is None or step != self.last:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profiler.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.path))
        self._profiler = None
        if self.rank == 0:
            print(f"orch: profiled steps {self.first}-{self.last}: {self.path.parent}/rank-N.json",
                  flush=True)


__all__ = ["StepProfiler"]
