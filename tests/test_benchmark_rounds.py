"""The benchmarks' paired rounds (benchmarks/rounds.py) and what offload_cpu.py makes of its
contenders' results, with the training replaced by fakes: the order rotates from round to round,
the disk is synced between contenders, and ratios are taken within a round."""

from __future__ import annotations

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


def _result(seconds: float, steps: int) -> dict:
    return {"step_s": [seconds] * steps, "losses": [5.72, 4.22, 4.80][:steps],
            "read": [0] * steps, "written": [0] * steps, "peak_rss": 1 << 30, "tokens": 1024}


@pytest.fixture
def offload_cpu(monkeypatch):
    """offload_cpu.py whose contenders are fakes: each call is logged (with the syncs between),
    and DeepSpeed's NVMe run takes 2 s per step in round 1 and 3 s in round 2, orch's 1 s."""
    module = benchmark("offload_cpu")
    log: list[str] = []
    monkeypatch.setattr(module.os, "sync", lambda: log.append("sync"))

    def run_other(name, sets, nvme_dir, env):
        log.append(name)
        return _result(1.0 + sum(entry == name for entry in log), 3)

    def run_orch(sets, nvme_dir, env):
        log.append("orch nvme")
        return _result(1.0, 3)

    monkeypatch.setattr(module, "run_other", run_other)
    monkeypatch.setattr(module, "run_orch", run_orch)
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
