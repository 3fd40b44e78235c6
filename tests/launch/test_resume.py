"""Checkpoints and exact resume under ``orch launch``, and what a launch refuses to start."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from launch_harness import REPO, launch, metrics, overrides

from orch.errors import OrchError
from orch.launch.launcher import prepare

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
    out = launch(*SHARD2, *overrides(whole, *args, "run.profile.start=3", "run.profile.steps=2",
                                     "run.tensorboard=true", "eval.interval=3",
                                     "eval.path=README.md"))  # (changes no step's numbers)
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
    # each start's first record says where it started from (orch report's medians skip them)
    assert [(m["step"], m["resumed_from"]) for m in split if "resumed_from" in m] == [
        (1, None), (6, str(runs["split"] / "checkpoints" / "step-00000005"))]
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


def test_fewer_steps_than_the_checkpoint_or_a_run_dir_as_resume_are_refused(runs, monkeypatch):
    """Before: train.steps below the resumed checkpoint's step ran nothing, said "done at step
    5 of 3" and rewrote config.yaml with steps 3; a run directory given as --resume was "missing
    manifest.json: the save did not finish"."""
    monkeypatch.chdir(REPO)
    run = runs["split"]
    before = (run / "config.yaml").read_text()
    for sets, resume, message in [
        (["train.steps=3"], [], "train.steps: 3 is below step 10 of the checkpoint the run "
                                "resumes"),
        ([f"train.steps={STEPS}"], ["--resume", str(run)], "is a run directory (or its "
                                                           "checkpoints/), not one checkpoint"),
    ]:
        with pytest.raises(OrchError) as refused:
            prepare([*SHARD2, *overrides(run, *sets, "checkpoint.interval=5"), *resume])
        assert message in str(refused.value)
    assert (run / "config.yaml").read_text() == before


def test_a_finished_run_launched_again_starts_no_workers(runs):
    """Relaunching a run at its train.steps started every worker to load the checkpoint (a
    whole model onto every device) and train nothing."""
    run = runs["whole"]
    metrics_before = (run / "metrics.jsonl").read_text()
    out = launch(*SHARD2, *overrides(run, f"train.steps={STEPS}", "checkpoint.interval=5"))
    assert out.returncode == 0, out.stderr
    assert f"nothing to train: {run / 'checkpoints' / 'step-00000010'} is at train.steps=" \
        f"{STEPS}" in out.stdout and f"done at step {STEPS} of {STEPS}" in out.stdout
    assert "resumed from" not in out.stdout + out.stderr  # no worker ran
    assert (run / "metrics.jsonl").read_text() == metrics_before
    # a stop before the checkpoint's step: the workers loaded it and trained nothing either
    out = launch(*SHARD2, *overrides(run, f"train.steps={2 * STEPS}", "checkpoint.interval=5",
                                     "run.stop_at_step=5"))
    assert out.returncode == 0, out.stderr
    assert f"nothing to train: {run / 'checkpoints' / 'step-00000010'} is past " \
        "run.stop_at_step=5" in out.stdout and "resumed from" not in out.stdout + out.stderr
    assert (run / "metrics.jsonl").read_text() == metrics_before


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


def test_bad_launches_stop_before_any_process(tmp_path, monkeypatch):
    import numpy as np

    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "short.txt").write_text("hi")
    np.save(tmp_path / "floats.npy", np.zeros(10, np.float32))
    cases = [
        (["--nproc-per-node", "3", "configs/tiny.yaml", "--set", "parallel.dp_shard=2"],
         "--nproc-per-node 3"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", "data.path=/nonexistent.txt"],
         "data.path: '/nonexistent.txt' does not exist"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={blocker}/run"],
         f"run.dir: '{blocker}/run': '{blocker}' is a file"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path}"],
         f"run.dir: '{tmp_path}/checkpoints' is a file, where the run writes its directory "
         "checkpoints"),  # the first save failed, steps in
        (["--nproc-per-node", "2", "configs/tiny.yaml", "--set", "parallel.pp=2",
          "--set", "parallel.stage_layers=[1,2]"],
         "parallel.stage_layers: [1, 2] must be 2 numbers"),
        (["--nproc-per-node", "2", "configs/tiny.yaml", "--set", "parallel.pp=2",
          "--set", "parallel.pp_schedule=interleaved", "--set", "parallel.virtual_stages=2",
          "--set", "train.global_batch=6"],
         "train.global_batch: interleaved 1F1B needs microbatches to be a multiple of stages; "
         "got microbatches=3, stages=2\n        fix: try 4 (the next multiple of 2); the "
         "micro-batches per step are train.global_batch / (micro_batch x dp): now 6 / (2 x 1) = "
         "3"),  # was under parallel.pp_schedule
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
         "offload: with 2 processes and parallel.dp_replicate=1: offloaded training runs one "
         "process, or 2 replicas"),
        (["--nproc-per-node", "2", "configs/tiny.yaml", *OFFLOAD, "--set", "offload.grads=nvme",
          "--set", "offload.nvme_path=/tmp", "--set", "parallel.dp_replicate=2",
          "--set", "parallel.dp_shard=1"],
         "offload.grads: nvme with 2 processes: replicas average their gradients in CPU memory"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", *OFFLOAD, "--set", "offload.grads=nvme",
          "--set", "offload.nvme_path=/tmp", "--set", "offload.params=nvme",
          "--set", "offload.pinned_budget=1MB"],
         "offload.pinned_budget: 1000000 (1,000,000 bytes) is less than the NVMe tier stages at "
         "once: 5,828,608 bytes"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", *OFFLOAD, "--set",
          "offload.activations=auto", "--set", "train.recompute=selective"],
         "offload.activations: auto with train.recompute=selective"),
        (["--nproc-per-node", "2", "configs/tiny-moe.yaml", "--set", "parallel.tp=2",
          "--set", "parallel.sequence_parallel=false"],
         "parallel.sequence_parallel: false with tp=2 and MoE layers"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", "run.dir="],
         "run.dir: is empty"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", "train.lr=-1", "--set",
          f"run.dir={tmp_path / 'never-made'}"], "train.lr: must be positive"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--resume", ""], "--resume: is empty"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path / 'r'}",
          "--resume", "/nonexistent"], "--resume: /nonexistent: does not exist"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path / 'r'}",
          "--set", "checkpoint.resume=bogus"], "checkpoint.resume: bogus: does not exist"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", f"run.dir={tmp_path / 'r'}",
          "--resume", str(tmp_path / "empty")], "is empty: no checkpoint is saved there"),
        (["--nnodes", "1:2", "--nproc-per-node", "1", "configs/tiny.yaml"],
         "--nnodes: 1:2: orch plans for one world size, not an elastic range"),
        (["--nnodes", "abc", "--nproc-per-node", "1", "configs/tiny.yaml"],
         "--nnodes: 'abc' is not a number of nodes"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set", "offload.params=nvme",
          "--set", "offload.nvme_path=/tmp", "--set", "offload.optimizer=cpu"],
         "offload.grads: device, with params=nvme, optimizer=cpu: once anything is offloaded "
         "this version keeps grads on cpu or nvme"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set",
          f"data.path={tmp_path / 'short.txt'}"],  # the workers found these two before
         "train.global_batch: 8 sequences of train.seq_len=256 need at least 2049 tokens, but "
         "the data has 2"),
        (["--nproc-per-node", "1", "configs/tiny.yaml", "--set",
          f"data.path={tmp_path / 'floats.npy'}"],
         "holds a float32 array of shape (10,); token ids must be a 1-D integer array"),
    ]
    # Two as a user runs them (exit 2, the message, no traceback, nothing started); the rest
    # through the launcher's own check in this process (a launch costs ~6 s importing torch).
    (tmp_path / "checkpoints").write_text("")
    (tmp_path / "empty").mkdir()
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda args: launch(*args), [args for args, _ in cases[:2]]))
    for (args, message), out in zip(cases, outs, strict=False):
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert "resumed" not in out.stdout and "step 1/" not in out.stdout
    monkeypatch.chdir(REPO)
    for args, message in cases[2:]:
        with pytest.raises(OrchError) as refused:
            prepare(args)
        assert message in str(refused.value), (args, str(refused.value))
    assert not (tmp_path / "never-made").exists()  # a refused launch makes no run directory


@pytest.mark.parametrize("drill, why", [
    ("kill rank=5 step=3", "rank 5 is not one of this run's 1"),
    ("kill rank=0 step=600", "step 600 is after the run's last, 500"),
    ("kill rank=0 step=3 during=save", "no checkpoint is saved at step 3 "
                                       "(checkpoint.interval=100, last step 500)"),
])
def test_a_drill_that_could_never_fire_is_refused(drill, why, monkeypatch, tmp_path):
    """It ran the job through and showed nothing."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ORCH_DRILL", drill)
    with pytest.raises(OrchError, match="would never fire: " + re.escape(why)):
        prepare(["--nproc-per-node", "1", "configs/tiny.yaml", "--set",
                 f"run.dir={tmp_path}", "--set", "checkpoint.interval=100"])


def test_every_rank_records_its_device_and_a_profile_of_the_asked_steps(runs):
    for record in metrics(runs["whole"]):
        assert [d["rank"] for d in record["devices"]] == [0, 1]
        assert all(d["device"] == "cpu" and d["rss_bytes"] > 50e6 for d in record["devices"])
    for rank in (0, 1):  # run.profile: {start: 3, steps: 2}
        trace = json.loads((runs["whole"] / "profile" / f"rank-{rank}.json").read_text())
        names = {event.get("name", "") for event in trace["traceEvents"]}
        assert any("aten::" in name for name in names)
        assert "evaluation after step 3" in names  # inside the window, a range of its own
    assert not (runs["split"] / "profile").exists()


def test_tensorboard_gets_the_metrics_when_asked(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(runs["whole"] / "tb"))
    board.Reload()
    losses = [event.value for event in board.Scalars("train/loss")]
    assert losses == pytest.approx([m["loss"] for m in metrics(runs["whole"])])
    assert {"memory_gib/rank0", "memory_gib/rank1"} <= set(board.Tags()["scalars"])
    assert not (runs["split"] / "tb").exists()


def test_report_renders_the_plots_and_summary_of_a_real_run(runs, tmp_path):
    from orch.cli import main

    assert main(["report", str(runs["whole"]), "--out", str(tmp_path / "report")]) == 0
    for name in ("loss", "optimization", "throughput", "memory", "communication"):
        assert (tmp_path / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "- plan: 2 x cpu, fsdp2\n" in summary
    assert "- steps logged: 10, last step 10 of 10" in summary
    assert "(2 rank(s) recorded)" in summary
    assert "- checkpoints: step-00000005, step-00000010" in summary
    assert "![memory](memory.png)" in summary
    assert "- learning rate: " in summary and "gradient norm median" in summary


# --- fault drills: a rank killed with SIGKILL (orch.runtime.drills), a full disk -------------


def _same_as_whole(runs, run: Path) -> None:
    whole, got = metrics(runs["whole"]), metrics(run)
    assert [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in got] == [
        (m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in whole]


@pytest.mark.parametrize(("during", "step"), [("step", 7), ("save", 10)])
def test_a_rank_killed_mid_step_or_mid_save_restarts_and_ends_like_an_uninterrupted_run(
        runs, tmp_path, during, step):
    """kill -9 of rank 1 in the middle of step 7, or while checkpoint 10 is being written (its
    shards written, the manifest not): torchrun restarts both workers (--max-restarts 2), they
    resume from the newest complete checkpoint (5) and finish with the uninterrupted run's
    numbers, every step's, exactly."""
    from orch.runtime.checkpoint import verify

    run = tmp_path / during
    out = launch("--max-restarts", "2", *SHARD2,
                 *overrides(run, f"train.steps={STEPS}", "checkpoint.interval=5"),
                 env={"ORCH_DRILL": f"kill rank=1 step={step} during={during}"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"drill: rank 1 kills itself (SIGKILL) during {during} {step}" in out.stderr
    assert "resumed from" in out.stdout and "step-00000005" in out.stdout
    assert re.search(r"orch launch: attempt 1 of 3 failed on node \S+; restarting every worker "
                     r"\(1 restart left after this one\)\n  rank 1 \(local rank 1, pid \d+\) "
                     r"on \S+: killed by SIGKILL", out.stderr), out.stderr
    _same_as_whole(runs, run)
    kept = sorted((run / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-00000005", "step-00000010"]
    assert all(verify(p) == [] for p in kept)
    log = (run / "logs" / "rank-1.log").read_text()
    assert "attempt 1," in log and "attempt 2," in log  # one file across the restart
    assert f" rank 1 step {step} | orch: drill: rank 1 kills itself" in log


def test_an_error_during_a_background_save_ends_the_run_promptly_and_is_reported(tmp_path):
    """Rank 1 raises in step 3 while checkpoint 2 is still written in the background: it leaves
    without the save's collectives, which rank 0 never joins (waiting for them hung the run
    until gloo's 30-minute timeout, and the error was never shown), and the launcher names its
    error; the unfinished checkpoint is no complete one."""
    run = tmp_path / "raised"
    out = launch(*SHARD2, *overrides(run, "train.steps=8", "checkpoint.interval=2",
                                     "checkpoint.async_save=true"),
                 env={"ORCH_DRILL": "raise rank=1 step=3 during=step"}, timeout=150)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "writing checkpoint" in out.stdout and "step-00000002" in out.stdout
    assert "rank 1 (local rank 1" in out.stderr
    assert "error: DrillError: drill: rank 1 raises during step 3" in out.stderr
    assert not (run / "checkpoints" / "step-00000002" / "manifest.json").exists()


@pytest.mark.parametrize("resume", ["another run", "this run, keep_last=1", "none"])
def test_a_restart_resumes_from_its_own_launchs_newest_checkpoint_whatever_the_mode(
        runs, tmp_path, resume):
    """--resume PATH or none applies to a launch's first start only: rank 1 killed in step 9,
    the restarted workers resume from the checkpoint of step 8 this launch saved, where they
    went back to PATH (moving steps 6 and 8 aside as another history) or to step 0. With PATH
    in the run's own directory and keep_last=1, retention had deleted it once step 6 was
    saved, and the restart failed on both ranks ('does not exist'). Every step's numbers
    equal the uninterrupted run's."""
    run = tmp_path / "run"
    args, first = ["checkpoint.interval=2"], 1
    if resume == "none":
        given = "none"
    else:
        given, first = str(runs["split"] / "checkpoints" / "step-00000005"), 6
        if resume.startswith("this run"):
            (run / "checkpoints").mkdir(parents=True)
            given = str(shutil.copytree(given, run / "checkpoints" / "step-00000005"))
            args.append("checkpoint.keep_last=1")
    out = launch("--max-restarts", "1", *SHARD2,
                 *overrides(run, f"train.steps={STEPS}", *args), "--resume", given,
                 env={"ORCH_DRILL": "kill rank=1 step=9 during=step"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "drill: rank 1 kills itself (SIGKILL) during step 9" in out.stderr
    assert f"orch: this launch saved {run / 'checkpoints' / 'step-00000008'} before it " \
        f"restarted: resuming from it, not from {given} again" in out.stdout
    assert f"resumed from {run / 'checkpoints' / 'step-00000008'} at step 8" in out.stdout
    assert not list((run / "checkpoints").glob("*superseded*"))
    whole, got = metrics(runs["whole"]), metrics(run)
    assert [(m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in got] == [
        (m["step"], m["loss"], m["grad_norm"], m["lr"]) for m in whole if m["step"] >= first]


def test_a_run_killed_with_its_state_on_nvme_resumes_exactly_and_leaves_no_scratch(tmp_path):
    """Parameters, gradients and optimizer states on the NVMe tier, the process killed (SIGKILL)
    in the middle of step 5: the killed worker's scratch file has no name and went with it (the
    restarted worker finds none to remove), the run resumes from checkpoint 3 (the tier is
    scratch; checkpoints hold the state) and ends with an uninterrupted run's numbers exactly,
    and the tier's directory is empty at the end.
    ``offload.cpu_adam=torch``: the automatic choice is timed, and two attempts could differ."""
    scratch = tmp_path / "nvme"
    scratch.mkdir()
    common = [f"offload.nvme_path={scratch}", "offload.params=nvme", "offload.grads=nvme",
              "offload.optimizer=nvme", "offload.cpu_adam=torch", "train.steps=6",
              "checkpoint.interval=3"]
    whole = launch("--nproc-per-node", "1", "configs/tiny.yaml",
                   *overrides(tmp_path / "whole", *common))
    assert whole.returncode == 0, whole.stdout + whole.stderr
    killed = launch("--max-restarts", "1", "--nproc-per-node", "1", "configs/tiny.yaml",
                    *overrides(tmp_path / "killed", *common),
                    env={"ORCH_DRILL": "kill rank=0 step=5 during=step"})
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert "the NVMe scratch file of a killed run" not in killed.stdout
    assert "resumed from" in killed.stdout and "step-00000003" in killed.stdout
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in metrics(tmp_path / "killed")] == [
        (m["step"], m["loss"], m["grad_norm"]) for m in metrics(tmp_path / "whole")]
    assert not list(scratch.iterdir())


def test_resume_auto_passes_over_a_changed_checkpoint_and_says_so(runs, tmp_path):
    """One byte of the newest checkpoint's shard changed (sizes still match, so only the
    workers' hashes see it): resume=auto falls back to step 5, says so, reruns 6-10 exactly,
    and moves the damaged step 10 aside instead of deleting it."""
    import shutil

    run = tmp_path / "changed"
    shutil.copytree(runs["split"], run)
    shard = sorted((run / "checkpoints" / "step-00000010").glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = launch(*SHARD2, *overrides(run, f"train.steps={STEPS}", "checkpoint.interval=5"))
    assert out.returncode == 0, out.stdout + out.stderr
    newest = run / "checkpoints" / "step-00000010"
    assert f"checkpoint {newest} is damaged ({shard}: sha256 differs" in out.stdout
    assert "resuming from the previous complete checkpoint" in out.stdout
    assert "resumed from" in out.stdout and "step-00000005" in out.stdout
    _same_as_whole(runs, run)
    assert len(list((run / "checkpoints").glob("step-00000010.superseded-*"))) == 1


def test_a_changed_checkpoint_given_by_path_fails_once_not_once_per_restart(runs, tmp_path):
    """``--resume PATH`` to a checkpoint whose bytes changed (only the workers' hashes see it):
    every worker stops on bad input, which a restart would meet again, so torchrun's restarts
    are not spent on it: one attempt, exit 2, and the report says so."""
    run = tmp_path / "changed"
    shutil.copytree(runs["split"], run)
    newest = run / "checkpoints" / "step-00000010"
    shard = sorted(newest.glob("*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = launch("--max-restarts", "2", *SHARD2,
                 *overrides(run, f"train.steps={STEPS + 2}", "checkpoint.interval=5"),
                 "--resume", str(newest))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "sha256 differs" in out.stdout + out.stderr
    assert "(not restarted: a restart would meet the same bad input)" in out.stderr
    assert "attempt 1 of 3 failed" not in out.stderr
    assert "attempt 2," not in (run / "logs" / "rank-0.log").read_text()


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs: room for one checkpoint of the tiny model (37 MB), not two."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_save_onto_a_full_disk_fails_cleanly_and_keeps_the_previous_checkpoint(small_disk):
    from orch.runtime.checkpoint import verify

    run = small_disk / "run"
    out = launch(*SHARD2, *overrides(run, f"train.steps={STEPS}", "checkpoint.interval=5"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "saving step 10 failed while" in out.stderr
    assert "(the file system is full: " in out.stderr  # ENOSPC, or torch's zip writer's words
    assert "step-00000005, is intact" in out.stderr and "Traceback" not in out.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000005"]
    assert verify(run / "checkpoints" / "step-00000005") == []
    # the launcher's failure summary: each rank, its node, the reason, its log
    assert "orch launch: training failed on node" in out.stderr
    named = [rank for rank in (0, 1) if f"rank {rank} (local rank {rank}, pid " in out.stderr]
    assert named, out.stderr  # both failed; torchrun may have stopped one before it exited
    assert all(f"log: {run / 'logs' / f'rank-{rank}.log'}" in out.stderr for rank in named)
    assert "error: SaveFailed: " in out.stderr


def test_a_data_file_changed_under_a_run_is_refused_on_resume(tmp_path):
    """A checkpoint saves its data file's size and a sha256 of pieces of it: a file rewritten
    with other text of the same size was resumed on without a word, its saved position
    continuing in other samples."""
    import random

    corpus = tmp_path / "corpus.txt"
    rng = random.Random(0)
    corpus.write_text("".join(rng.choice("abcdefgh ") for _ in range(100_000)))
    run = tmp_path / "run"
    args = ["--nproc-per-node", "1", "configs/tiny.yaml",
            *overrides(run, f"data.path={corpus}", "train.steps=2", "checkpoint.interval=2")]
    out = launch(*args)
    assert out.returncode == 0, out.stdout + out.stderr
    manifest = json.loads((run / "checkpoints/step-00000002/manifest.json").read_text())
    assert manifest["data"]["source"]["bytes"] == 100_000
    longer = [*args, "--set", "train.steps=4"]
    prepare(longer)  # the same file resumes
    corpus.write_text(corpus.read_text().upper())
    with pytest.raises(OrchError) as info:
        prepare(longer)
    text = str(info.value)
    assert (f"data.path: '{corpus}' is not the data the checkpoint was trained on (the same "
            "size, 100,000 bytes, but other contents)") in text
    assert "orch ckpt export RUN_DIR --to hf OUT" in text


def test_a_constant_run_cools_down_as_wsd_from_its_checkpoint(tmp_path, monkeypatch):
    """Deciding to cool down a run trained at a constant lr is the wsd use case; resumed with
    train.lr_schedule=wsd, it was refused as another config. Now it resumes where its steps
    trained keep their lr (the cooldown after the checkpoint's step), says what the steps to
    come get, and cools down; a cooldown from before that step is refused with the --set that
    moves it."""
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    args = ["--nproc-per-node", "1", "configs/tiny.yaml",
            *overrides(run, "train.steps=8", "train.lr_schedule=constant")]
    out = launch(*args, "--set", "run.stop_at_step=4")
    assert out.returncode == 0, out.stdout + out.stderr
    wsd = [*args, "--set", "train.lr_schedule=wsd"]
    with pytest.raises(OrchError) as refused:
        prepare([*wsd, "--set", "train.cooldown_steps=5"])  # cooling from step 4
    assert ("its weights trained at the peak lr through step 4, and the cooldown starts at "
            "step 4: hold the peak through step 4 with --set train.cooldown_steps=4 (or fewer) "
            "or --set train.steps=9 (or more)") in str(refused.value)
    out = launch(*wsd, "--set", "train.cooldown_steps=2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert ("orch launch: the lr schedule is wsd where the checkpoint's run's was constant "
            "(train.lr_schedule): step 7's lr is ") in out.stdout
    lrs = [m["lr"] for m in metrics(run)]
    peak = lrs[1]
    assert lrs[1:6] == [peak] * 5 and peak > lrs[6] > lrs[7] == pytest.approx(peak * 0.1)


def test_a_drill_before_the_step_the_run_resumes_at_is_refused(runs, monkeypatch):
    """The run resumed past it (step 10 here), finished, and the drill never fired."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("ORCH_DRILL", "kill rank=1 step=7")
    args = [*SHARD2, *overrides(runs["whole"], "train.steps=20", "checkpoint.interval=5")]
    with pytest.raises(OrchError, match=re.escape(
            "would never fire: the run resumes after step 7, from its checkpoint of step 10")):
        prepare(args)
    monkeypatch.setenv("ORCH_DRILL", "kill rank=1 step=12")  # after it: fires
    prepare(args)
