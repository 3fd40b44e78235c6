"""Offloaded data-parallel replicas average their home gradients as DDP averages device ones."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo_harness import run_on_gloo
from torch import nn

from orch.offload.grad_homes import GradientHomes

pytestmark = pytest.mark.dist


def _run(rank: int, world: int, results) -> None:
    a, b, c = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4)), nn.Parameter(
        torch.zeros(1))
    d = nn.Parameter(torch.zeros(5))
    homes = GradientHomes([[a, b, c], [d]])
    homes.group = dist.group.WORLD
    reached = {a, d} | ({b} if rank == 0 else set())  # c: no replica's micro-batches
    for p in (a, b, c, d):  # what this rank's backward left at home (stale where unreached)
        homes.of[p].fill_(float(rank + 1) if p in reached else 99.0)
    unreached = {a, b, c, d} - reached
    homes.reduce(1, unreached)  # a unit whose backward ended first starts first
    grads = homes.finish(unreached)
    results[rank] = {name: None if grads[p] is None else grads[p].clone()
                     for name, p in zip("abcd", (a, b, c, d), strict=True)}


def test_replicas_average_and_a_parameter_nobody_reached_gets_no_gradient(tmp_path):
    results = run_on_gloo(_run, 2, tmp_path)
    assert sorted(results) == [0, 1]
    for got in results.values():
        torch.testing.assert_close(got["a"], torch.full((2, 3), 1.5))  # (1 + 2) / 2
        torch.testing.assert_close(got["b"], torch.full((4,), 0.5))  # rank 1 adds nothing
        assert got["c"] is None
        torch.testing.assert_close(got["d"], torch.full((5,), 1.5))


def test_one_process_keeps_its_own_gradients():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    homes = GradientHomes([[a], [b]])
    homes.of[a].fill_(2.0)
    grads = homes.finish({b})
    torch.testing.assert_close(grads[a], torch.full((3,), 2.0))
    assert grads[b] is None and grads[a].data_ptr() == homes.of[a].data_ptr()
