"""``offload.pinned_budget`` at the least the plan accepts trains to the end with the plain
run's numbers.

The least covers a unit's parameters on their way to the device beside another unit's
parameters and optimizer states being updated; the reads ahead (the forward's, and the update's
of the next unit) waited for room beyond it, holding what they had, and a run of the tiny model
at 11,608,064 bytes (the least the plan then said) hung after its second step, every thread
waiting on the pool. Reads ahead now take only spare room, the update reads a unit's states
before its parameters (so the parameters' room is free wherever the states went), and the
least counts each group's padded region."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orch.config import load_config
from orch.plan import build_plan

REPO = Path(__file__).resolve().parents[2]
ORCH = Path(sys.executable).parent / "orch"
SETS = ["train.steps=6", "train.warmup_steps=2", "run.log_interval=1", "checkpoint.interval=0"]


def _launch(run_dir: Path, *sets: str, timeout: int = 240) -> list[dict]:
    """The run's step records; a launch that does not end in ``timeout`` seconds is a hang (its
    process group is killed: the workers too)."""
    argv = [str(ORCH), "launch", "--nproc-per-node", "1", "configs/tiny.yaml"]
    for item in [*SETS, f"run.dir={run_dir}", *sets]:
        argv += ["--set", item]
    with subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True) as proc:
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            pytest.fail(f"hung: no end in {timeout} s\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("plain") / "run")


@pytest.mark.slow
@pytest.mark.parametrize("homes", [
    ("offload.params=nvme", "offload.grads=cpu", "offload.optimizer=nvme"),
    ("offload.params=nvme", "offload.grads=nvme", "offload.optimizer=nvme",
     "offload.activations=nvme"),
], ids=["params+optimizer", "everything"])
def test_the_least_pinned_budget_the_plan_accepts_trains_to_the_end(plain, tmp_path, homes):
    sets = [*homes, f"offload.nvme_path={tmp_path}", "offload.cpu_adam=torch"]
    least = build_plan(load_config("configs/tiny.yaml", [*SETS, *sets]), 1, 1,
                       "cpu").memory.staging_min
    records = _launch(tmp_path / "run", *sets, f"offload.pinned_budget={least}")
    assert len(records) == len(plain) == 6
    for got, want in zip(records, plain, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-6), got["step"]
