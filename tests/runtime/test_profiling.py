"""``run.profile`` on runs that do only part of its window: resumed inside it, stopped inside it,
or entirely outside it (before, no trace was written and nothing was said)."""

from __future__ import annotations

import json

import pytest
import torch

from orch.config.schema import ProfileConfig
from orch.runtime.profiling import StepProfiler


def _run(tmp_path, steps: range, capsys) -> tuple[list[int], str]:
    """Profile ``steps`` of a window of steps 3-5 around a small matmul; the steps traced."""
    profiler = StepProfiler(ProfileConfig(start=3, steps=3), tmp_path, 0, torch.device("cpu"),
                            steps)
    traced = []
    for step in steps:
        profiler.before(step)
        if profiler._profiler is not None:
            traced.append(step)
        torch.ones(8, 8) @ torch.ones(8, 8)
        profiler.after(step)
    return traced, capsys.readouterr().out


@pytest.mark.parametrize("steps, traced, said", [
    (range(1, 8), [3, 4, 5], "orch: profiled steps 3-5: "),
    (range(5, 8), [5], "orch: profiled step 5 (of run.profile's 3-5: the steps this run does)"),
    (range(1, 5), [3, 4], "orch: profiled steps 3-4 (of run.profile's 3-5: the steps this run"),
])
def test_a_run_profiles_and_writes_the_steps_of_the_window_it_does(tmp_path, capsys, steps,
                                                                   traced, said):
    got, out = _run(tmp_path, steps, capsys)
    assert got == traced and said in out
    trace = json.loads((tmp_path / "profile" / "rank-0.json").read_text())
    assert any("aten::mm" in event.get("name", "") for event in trace["traceEvents"])


@pytest.mark.parametrize("steps", [range(6, 9), range(1, 3)])
def test_a_window_outside_the_run_is_said(tmp_path, capsys, steps):
    traced, out = _run(tmp_path, steps, capsys)
    assert traced == [] and not (tmp_path / "profile").exists()
    assert (f"orch: run.profile's steps 3-5 are outside this run's steps {steps[0]}-{steps[-1]}: "
            "nothing is profiled") in out


def test_a_restart_inside_the_window_writes_the_steps_traced_so_far(tmp_path, capsys):
    """A pipeline re-partition restarts the workers at a logged step: the profiler was left
    running and its trace never written."""
    profiler = StepProfiler(ProfileConfig(start=3, steps=3), tmp_path, 0, torch.device("cpu"),
                            range(1, 11))
    for step in (3, 4):
        profiler.before(step)
        torch.ones(8, 8) @ torch.ones(8, 8)
        assert profiler.after(step) == 0.0  # nothing written before the window's end
    profiler.finish(4)
    assert (tmp_path / "profile" / "rank-0.json").is_file()
    assert "orch: profiled steps 3-4 (of run.profile's 3-5" in capsys.readouterr().out
    profiler.finish(4)  # nothing left running: nothing more


def test_one_profiled_step_is_said_as_one(tmp_path, capsys):
    """``run.profile: {start: 2, steps: 1}`` said "profiled steps 2-2"."""
    profiler = StepProfiler(ProfileConfig(start=2, steps=1), tmp_path, 0, torch.device("cpu"),
                            range(1, 4))
    for step in range(1, 4):
        profiler.before(step)
        profiler.after(step)
    assert "orch: profiled step 2: " in capsys.readouterr().out
    StepProfiler(ProfileConfig(start=2, steps=1), tmp_path, 0, torch.device("cpu"), range(3, 4))
    assert ("orch: run.profile's step 2 is outside this run's step 3: nothing is profiled"
            in capsys.readouterr().out)
