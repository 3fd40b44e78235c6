"""``orch launch`` refuses a forced kernel choice this machine cannot run, before any process
starts or any file is written, and beside the config's own problems (one round of fixes).

``ORCH_KERNELS=triton`` on a machine without a GPU passed every check: torchrun started, the
run directory was made, and the first step failed inside triton ("0 active drivers")."""

from __future__ import annotations

from pathlib import Path

import pytest

from orch.errors import ConfigError, PlanError
from orch.launch.launcher import prepare


@pytest.fixture
def triton_forced_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("ORCH_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _argv(run_dir: Path, *sets: str) -> list[str]:
    return ["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={run_dir}",
            *[arg for item in sets for arg in ("--set", item)]]


def test_triton_forced_on_the_cpu_is_refused_before_the_run(triton_forced_without_interpreter,
                                                            tmp_path: Path):
    run_dir = tmp_path / "run"
    with pytest.raises(PlanError) as refused:
        prepare(_argv(run_dir, "train.steps=2", "train.warmup_steps=1"))
    [problem] = refused.value.problems
    assert problem.where == "ORCH_KERNELS" and "no CUDA device on this machine" in problem.message
    assert not run_dir.exists()


def test_the_kernel_choice_is_said_beside_the_configs_problems(triton_forced_without_interpreter,
                                                               tmp_path: Path):
    with pytest.raises(ConfigError) as refused:
        prepare(_argv(tmp_path / "run", "train.steps=2", "train.warmup_steps=20"))
    assert [p.where for p in refused.value.problems] == ["train.warmup_steps", "ORCH_KERNELS"]
