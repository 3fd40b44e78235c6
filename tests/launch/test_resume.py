"""Checkpoints and exact resume under ``orch launch``, and what a launch refuses to start."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from launch_harness import launch, metrics, overrides

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS = 10
SHARD2 = ["--nproc-per-node", "2", "configs/tiny.yaml"]
OFFLOAD = ["--set", "offload.params=cpu", "--set", "offload.grads=cpu", "--set",
           "offload.optimizer=cpu"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 10-step run, and one stopped at step 5 then resumed (2 ranks, FSDP)."""
    root = tmp_path_factory.mktemp("resume")
    whole, split = root / "whole", root / "split"
    args = [f"train.steps={STEPS}", "checkpoint.interval=5"]
    out = launch(*SHARD2, *overrides(whole, *args))
    assert out.returncode == 0, out.stdout + out.stderr
    first = launch(*SHARD2, *overrides(split, *args, "run.stop_at_step=5"))
    assert first.returncode == 0, first.stdout + first.stderr
    second = launch(*SHARD2, *overrides(split, *args))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from" in second.stdout and "step-00000005" in second.stdout
    return {"whole": whole, "split": split}


def test_resumed_steps_equal_uninterrupted_run_exactly(runs):
    whole, split = metrics(runs["whole"]), metrics(runs["split"])
    assert [m["step"] for m in split] == list(range(1, STEPS + 1))
    for a, b in zip(whole, split, strict=True):
        assert (a["step"], a["loss"], a["grad_norm"], a["lr"]) == (
            b["step"], b["loss"], b["grad_norm"], b["lr"])


def test_run_directory_files(runs):
    run = runs["whole"]
    assert (run / "config.yaml").is_file()
    plan = json.loads((run / "plan.json").read_text())
    assert plan["degrees"]["dp_shard"] == 2 and plan["world_size"] == 2
    keys = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops", "mfu", "step_time_s",
            "mem_bytes"}
    assert all(keys <= set(m) for m in metrics(run))
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept == ["step-00000005", "step-00000010"]  # tiny-run.yaml keeps the last 2
    assert all((run / "checkpoints" / k / "manifest.json").is_file() for k in kept)


def test_other_config_is_refused_and_kept(runs):
    run = runs["whole"]
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    out = launch(*SHARD2, *overrides(run, f"train.steps={STEPS}", "model.dim=128"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert str(run) in out.stderr and "another config" in out.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_corrupted_checkpoint_is_refused_before_loading(runs, tmp_path):
    import shutil

    run = tmp_path / "corrupt"
    shutil.copytree(runs["split"], run)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:-7])
    out = launch(*SHARD2, *overrides(run, f"train.steps={STEPS + 5}", "checkpoint.interval=5"),
                 "--resume", str(newest))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert shard.name in out.stderr


def test_bad_launches_stop_before_any_process(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (["--nproc-per-node", "3", "configs/tiny.yaml", "--set", "parallel.dp_shard=2"],
         "--nproc-per-node 3"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", "data.path=/nonexistent.txt"],
         "data.path: '/nonexistent.txt' does not exist"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={blocker}/run"],
         "run.dir:"),
        (["--nproc-per-node", "2", "configs/tiny.yaml", "--set", "parallel.pp=2",
          "--set", "parallel.stage_layers=[1,2]"],
         "parallel.stage_layers: [1, 2] must be 2 numbers"),
        (["--nproc-per-node", "2", "configs/tiny.yaml", "--set", "parallel.pp=2",
          "--set", "parallel.pp_schedule=interleaved", "--set", "parallel.virtual_stages=2",
          "--set", "train.global_batch=6"],
         "parallel.pp_schedule: interleaved: interleaved 1F1B needs microbatches to be a "
         "multiple of stages"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", "model.dimm=3"],
         "did you mean 'dim'"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", "model.init_from=/nonexistent"],
         "model.init_from: '/nonexistent' is not a directory"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", *OFFLOAD, "--set",
          "offload.device_budget=1MB"],
         "offload.device_budget: 1000000 (1,000,000 bytes) is less than one layer needs on the "
         "device: 3,606,528 bytes"),
        (["--nproc-per-node", "2", "configs/tiny.yaml", *OFFLOAD, "--set", "offload.params=nvme",
          "--set", "offload.nvme_path=/tmp"],
         "offload: with 2 processes: this version offloads one process's training"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", *OFFLOAD, "--set", "offload.grads=nvme",
          "--set", "offload.nvme_path=/tmp", "--set", "offload.params=nvme",
          "--set", "offload.pinned_budget=1MB"],
         "offload.pinned_budget: 1000000 (1,000,000 bytes) is less than the NVMe tier stages at "
         "once: 5,804,032 bytes"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", *OFFLOAD, "--set",
          "offload.activations=auto", "--set", "train.recompute=selective"],
         "offload.activations: auto with train.recompute=selective"),
        (["--nproc-per-node", "2", "configs/tiny-moe.yaml", "--set", "parallel.tp=2",
          "--set", "parallel.sequence_parallel=false"],
         "parallel.sequence_parallel: false with tp=2 and MoE layers"),
    ]
    with ThreadPoolExecutor(2) as pool:  # each launch spends its ~4 s importing torch
        outs = list(pool.map(lambda args: launch(*args), [args for args, _ in cases]))
    for (args, message), out in zip(cases, outs, strict=True):
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert "resumed" not in out.stdout and "step 1/" not in out.stdout
