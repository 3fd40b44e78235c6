"""``run.comm_timeout_s`` reaches every process group: a collective whose peer never comes stops
after the timeout (torch's default for gloo is 30 minutes, and subgroups take it whatever the
world group was given)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from gloo_harness import run_on_gloo

from orch.runtime.comm_timeout import set_comm_timeout

pytestmark = pytest.mark.dist


def _wait_for_a_peer_that_never_comes(rank: int, world: int, results: dict) -> None:
    group = dist.new_group(list(range(world)))  # a subgroup, as a mesh's or FSDP's
    results[(rank, "set")] = set_comm_timeout(2)
    if rank == 1:  # the lost node: alive, but never joins the collective
        time.sleep(12)
        results[(rank, "done")] = True
        return
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
        results[(rank, "error")] = None
    except RuntimeError as exc:
        results[(rank, "error")] = str(exc).splitlines()[0]
    results[(rank, "waited")] = time.monotonic() - start


def test_a_collective_whose_peer_never_comes_stops_after_the_timeout(tmp_path):
    results = run_on_gloo(_wait_for_a_peer_that_never_comes, 2, tmp_path)
    assert results[(0, "set")] == 2  # the world group and the subgroup
    assert results[(0, "error")] is not None and "Timed out" in results[(0, "error")]
    assert results[(0, "waited")] < 10, results[(0, "waited")]


def test_zero_leaves_torchs_timeouts():
    assert set_comm_timeout(0) == 0
