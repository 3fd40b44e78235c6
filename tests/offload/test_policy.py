"""The automatic activation policy's decision, on numbers: keep the last blocks while they fit,
then swap when the copies cost less than the forward, else recompute."""

from __future__ import annotations

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
