"""The benchmarks' paired rounds (benchmarks/rounds.py) and what offload_cpu.py makes of its
contenders' results, with the training replaced by fakes: the order rotates from round to round,
the disk is synced between contenders, and ratios are taken within a round."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from benchmark_modules import benchmark

rounds = benchmark("rounds")


def test_the_order_rotates_so_that_each_runs_first_once():
    names = ["a", "b", "c"]
    assert [rounds.in_turn(names, r) for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_paired_ratios_are_taken_within_a_round():
    assert rounds.paired([2.0, 9.0, 3.0], [1.0, 3.0, 2.0]) == (2.0, 1.5, 3.0)
    with pytest.raises(ValueError):
        rounds.paired([1.0], [1.0, 2.0])  # a round without its pair


READ = [9e9, 0.823e9, 0.624e9, 2.10e9]
"""Bytes a fake orch nvme run reads per step: as counted, they jump from step to step."""


def _result(seconds: float, steps: int) -> dict:
    return {"step_s": [seconds] * steps, "losses": [5.72, 4.22, 4.80][:steps],
            "read": [0] * steps, "written": [0] * steps, "peak_rss": 1 << 30, "tokens": 1024}


def _no_training(*args: object, **kwargs: object) -> None:
    raise AssertionError("a test of the benchmark's bookkeeping started a real training run")


@pytest.fixture
def offload_cpu(monkeypatch):
    """offload_cpu.py whose contenders are fakes: each call is logged (with the syncs between),
    DeepSpeed's NVMe run takes 2 s per step in round 1 and 3 s in round 2, orch's 1 s, and
    DeepSpeed's CPU run fails as a missing module would make it."""
    module = benchmark("offload_cpu")
    contenders = sys.modules["offload_contenders"]
    log: list[str] = []
    monkeypatch.setattr(module.os, "sync", lambda: log.append("sync"))

    def run_other(name, sets, nvme_dir, env, device):
        log.append(name)
        if name == "deepspeed cpu":
            raise RuntimeError(f"{name} failed:\n...\nModuleNotFoundError: No module named 'x'")
        return _result(1.0 + sum(entry == name for entry in log), 3)

    def run_orch(sets, nvme_dir, env):
        log.append("orch " + next(s for s in sets if s.startswith("offload.params="))[15:])
        return {**_result(1.0, 4), "read": READ, "written": [x / 2 for x in READ]}

    monkeypatch.setattr(contenders, "run_other", run_other)
    monkeypatch.setattr(contenders, "run_orch", run_orch)
    for where, name in ((contenders, "launch"), (contenders.subprocess, "run")):
        monkeypatch.setattr(where, name, _no_training)  # whatever the fakes miss fails at once
    module.log = log
    return module


def test_offload_cpu_rotates_syncs_and_pairs_its_rounds(offload_cpu, tmp_path, capsys):
    assert offload_cpu.main(["--only", "deepspeed nvme", "orch nvme", "--rounds", "2",
                             "--steps", "3", "--warmup", "1", "--dir", str(tmp_path)]) == 0
    assert offload_cpu.log == ["sync", "deepspeed nvme", "sync", "orch nvme",
                               "sync", "orch nvme", "sync", "deepspeed nvme"]
    out = capsys.readouterr().out
    assert "| deepspeed nvme | 2.50 (2.00, 3.00) |" in out  # rounds in order, whatever ran first
    assert "the speed of the same round: median 2.50x (2.00x-3.00x over 2 rounds" in out


def test_a_failing_contender_is_reported_and_the_others_still_make_the_table(offload_cpu,
                                                                          tmp_path, capsys):
    assert offload_cpu.main(["--only", "deepspeed cpu", "deepspeed nvme", "orch nvme",
                             "--rounds", "2", "--steps", "3", "--warmup", "1",
                             "--dir", str(tmp_path)]) == 0
    assert offload_cpu.log.count("deepspeed cpu") == 1  # not run again after it failed
    out = capsys.readouterr().out
    assert "| deepspeed cpu | failed: ModuleNotFoundError: No module named 'x' |" in out
    assert "| orch nvme | 1.00 (1.00, 1.00) |" in out
    assert "median 2.50x (2.00x-3.00x over 2 rounds" in out


def test_without_deepspeed_its_contenders_are_left_out_saying_so(offload_cpu, monkeypatch,
                                                                 tmp_path, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else find_spec(name, *a))
    assert offload_cpu.main(["--rounds", "1", "--steps", "3", "--warmup", "1",
                             "--dir", str(tmp_path)]) == 0
    assert [e for e in offload_cpu.log if e != "sync"] == ["torch loop", "orch cpu", "orch nvme"]
    out = capsys.readouterr().out
    assert "DeepSpeed is not installed here: deepspeed cpu, deepspeed nvme left out" in out
    assert "| orch nvme | 1.00 (1.00) |" in out


def test_disk_bytes_per_step_are_the_total_over_the_steps_after_warm_up(offload_cpu, tmp_path,
                                                                         capsys):
    contenders = sys.modules["offload_contenders"]
    runs = [{"read": READ, "written": [0, 1, 2, 3]}, {"read": [5e9, 1e9], "written": [0, 4]}]
    assert contenders.disk_per_step(runs, 1) == ((0.823e9 + 0.624e9 + 2.10e9 + 1e9) / 4, 10 / 4)
    assert offload_cpu.main(["--only", "orch nvme", "--rounds", "2", "--steps", "4",
                             "--warmup", "1", "--dir", str(tmp_path)]) == 0
    # (0.823 + 0.624 + 2.10) / 3 = 1.18 GB read, half that written; the median would say 0.82
    assert "| orch nvme | 1.00 (1.00, 1.00) | 1.00 | 1.18 | 0.59 |" in capsys.readouterr().out


def test_parallel_cpu_pairs_each_layout_with_one_process_of_its_config(monkeypatch, capsys):
    module = benchmark("parallel_cpu")
    calls: list[tuple[str, int]] = []
    single = iter([100.0, 300.0])  # the machine's speed drifts between rounds

    def launch(config, procs, sets):
        calls.append((config, procs))
        rate = next(single) if procs == 1 else 150.0
        rows = [{"tokens": rate, "step_time_s": 1.0, "comm_bytes": {"dp": 2e6}}] * 5
        return rows, {"step": {"tokens_per_s": 1000.0}}

    monkeypatch.setattr(module, "launch", launch)
    module.main(["--only", "fsdp2", "--rounds", "2"])
    assert calls == [("configs/tiny.yaml", 2), ("configs/tiny.yaml", 1),
                     ("configs/tiny.yaml", 1), ("configs/tiny.yaml", 2)]  # no MoE run
    out = capsys.readouterr().out
    assert "| fsdp2 | 2 | 150 | 1,000 | 0.15 | 200 | 1.00 (0.50-1.50) | dp 2.0 |" in out
