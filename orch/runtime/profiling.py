"""``run.profile: {start, steps}``: a torch profiler trace of those steps, on every rank.

The profiler records from the start of step ``start`` to the end of step ``start + steps - 1``
(CPU, and CUDA kernels on a GPU, with stacks off to keep the trace small), then each rank writes
``RUN_DIR/profile/rank-<rank>.json``, a Chrome trace that chrome://tracing, Perfetto and
TensorBoard's profiler open. Outside those steps nothing is recorded and nothing slows down.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from orch.config.schema import ProfileConfig


class StepProfiler:
    """Starts and stops torch's profiler around the configured steps that this run does: a run
    resumed inside the window, or stopped inside it (``run.stop_at_step``, a re-partition's
    restart), profiles and writes the steps it has; a window wholly outside the run is said
    once, rather than left without a trace and without a word."""

    def __init__(self, profile: ProfileConfig, run_dir: Path, rank: int,
                 device: torch.device, steps: range) -> None:
        self.first = profile.start
        self.last = profile.start + profile.steps - 1
        self.path = run_dir / "profile" / f"rank-{rank}.json"
        self.rank = rank
        self.device = device
        self._profiler: Any = None
        self._started = 0
        self._end = min(self.last, steps[-1]) if steps else 0
        """The last step profiled: the window's, or this run's last step inside it."""
        if self.first and rank == 0 and steps and not (
                self.first <= steps[-1] and self.last >= steps[0]):
            verb = "is" if self.first == self.last else "are"
            print(f"orch: run.profile's {_steps(self.first, self.last)} {verb} outside this "
                  f"run's {_steps(steps[0], steps[-1])}: nothing is profiled", flush=True)

    def before(self, step: int) -> None:
        """Call at the start of ``step``."""
        if self.first and self._profiler is None and self.first <= step <= self._end:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(ProfilerActivity.CUDA)
            self._profiler = profile(activities=activities, record_shapes=False)
            self._profiler.__enter__()
            self._started = step

    def after(self, step: int) -> float:
        """Call at the end of ``step``; writes the trace after the last profiled step. Returns
        the seconds that took (0 on other steps), which are not the step's time."""
        if self._profiler is None or step != self._end:
            return 0.0
        start = time.perf_counter()
        self._write(step)
        return time.perf_counter() - start

    def finish(self, step: int) -> None:
        """Write what was traced when the run leaves the window early (a re-partition's
        restart): the steps up to ``step``."""
        if self._profiler is not None:
            self._write(step)

    def _write(self, step: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._profiler.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profiler.export_chrome_trace(str(self.path))
        self._profiler = None
        if self.rank == 0:
            cut = ("" if (self._started, step) == (self.first, self.last) else
                   f" (of run.profile's {_span(self.first, self.last)}: the steps this run "
                   "does)")
            print(f"orch: profiled {_steps(self._started, step)}{cut}: "
                  f"{self.path.parent}/rank-N.json", flush=True)


def _span(first: int, last: int) -> str:
    """``3-5``, or ``3`` for one step."""
    return f"{first}" if first == last else f"{first}-{last}"


def _steps(first: int, last: int) -> str:
    """``steps 3-5``, or ``step 3``: "profiled steps 2-2" read as a typo."""
    return f"step {first}" if first == last else f"steps {first}-{last}"


__all__ = ["StepProfiler"]
