"""The automatic activation policy's decision, on numbers: keep the last blocks while they fit,
then swap when the copies cost less than the forward, else recompute."""

from __future__ import annotations

import pytest
import torch

from orch.offload.policy import Measured, choose

MB = 10**6


def test_the_last_blocks_are_kept_while_they_fit_then_the_cheaper_of_swap_and_recompute():
    blocks = [Measured("layers.0", forward_s=0.010, saved_bytes=4 * MB),   # copies 8 ms
              Measured("layers.1", forward_s=0.002, saved_bytes=4 * MB),   # copies 8 ms
              Measured("layers.2", forward_s=0.010, saved_bytes=4 * MB),
              Measured("layers.3", forward_s=0.010, saved_bytes=4 * MB)]
    choices = choose(blocks, room_bytes=9 * MB, bandwidth=1e9)
    assert [c.action for c in choices] == ["swap", "recompute", "keep", "keep"]
    assert [c.name for c in choices] == [b.name for b in blocks]
    assert choices[0].reason == "4.0 MB: copies 8.0 ms < forward 10.0 ms"
    assert choices[1].reason == "4.0 MB: copies 8.0 ms >= forward 2.0 ms"
    assert choices[3].reason == "4.0 MB fit in the budget's room, 5.0 MB left"


def test_only_a_suffix_is_kept_so_no_early_block_holds_memory_through_the_whole_backward():
    blocks = [Measured("a", 0.01, 1 * MB), Measured("b", 0.01, 8 * MB), Measured("c", 0.01, MB)]
    actions = [c.action for c in choose(blocks, room_bytes=3 * MB, bandwidth=1e12)]
    assert actions == ["swap", "swap", "keep"]  # "a" would fit, but it is before a swapped one


def test_no_room_and_a_slow_link_recompute_everything():
    blocks = [Measured(f"layers.{i}", 0.001, 2 * MB) for i in range(3)]
    assert {c.action for c in choose(blocks, room_bytes=0, bandwidth=1e8)} == {"recompute"}


def test_each_blocks_first_forward_is_left_out_of_its_timing(monkeypatch):
    """The policy timed only each block's first forward, which carries one-time costs (288 ms
    against 57 ms for the same block on this machine), so launches chose differently; it now
    takes the fastest forward after the first, and decides once every block has one: at the
    end of step 1 with two micro-batches a step, of step 2 with one."""
    from orch.offload import policy

    clock = iter([0.0, 0.288, 1.0, 1.057, 2.0, 2.060, 3.0, 3.070])
    monkeypatch.setattr(policy.time, "perf_counter", lambda: next(clock))
    auto = policy.AutoActivations({0: "layers.0"}, torch.device("cpu"))
    for _ in range(2):  # step 1, one micro-batch
        auto.forward_started(0)
        auto.forward_ended(0)
        ready = auto.step_done()
        assert ready == (auto.steps == 2)
    assert auto.forward_s.seconds[0] == pytest.approx(0.057)
    for _ in range(2):  # later forwards while still measuring: the fastest after the first
        auto.forward_started(0)
        auto.forward_ended(0)
    assert auto.forward_s.seconds[0] == pytest.approx(0.057)
