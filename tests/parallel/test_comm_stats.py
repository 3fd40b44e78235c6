"""The communication ledger counts what each collective path hands to torch.distributed.

Two gloo ranks, one module with a ``dp_shard`` mesh (the world group): FSDP2's all-gather and
reduce-scatter, DDP's bucket all-reduce (through the hook the ledger attaches), a DTensor
redistribution (functional collectives), orch's labelled all-to-all, ring send/recv, a pipeline
runtime's batch of sends, and a collective outside ``tracking`` (not counted); then a tp and an
edp mesh on the same ranks (one process group), where c10d calls count as dp and functional ones
as tp. Expected bytes are worked out by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from gloo_harness import run_on_gloo
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.pipelining import schedules
from torch.distributed.tensor import Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from orch.parallel.comm import all_to_all
from orch.parallel.comm_stats import CommLedger, dimension

pytestmark = pytest.mark.dist

FLOAT = 4


def _run(rank: int, world: int, results) -> None:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    ledger = CommLedger([mesh])
    x = torch.randn(3, 8)

    fsdp = fully_shard(nn.Linear(8, 8, bias=False), mesh=mesh)  # root: kept gathered for bwd
    with ledger.tracking():
        fsdp(x).sum().backward()
    results[(rank, "fsdp")] = ledger.take()

    ddp = DistributedDataParallel(nn.Linear(8, 8, bias=False), process_group=mesh.get_group())
    ledger.attach_ddp(ddp, mesh.get_group())
    with ledger.tracking():
        ddp(x).sum().backward()
    results[(rank, "ddp")] = ledger.take()

    with ledger.tracking():
        distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]).full_tensor()  # funcol gather
        rows = torch.ones(6, 2, requires_grad=True)
        all_to_all(rows, mesh.get_group(), dim="ep").sum().backward()  # forward and backward
        with dimension("cp"):
            peer = 1 - rank
            ops = [dist.P2POp(dist.isend, torch.ones(5), peer),
                   dist.P2POp(dist.irecv, torch.empty(5), peer)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        # torch's pipelining runtime: a batch of sends alone goes through dist.isend per op
        if rank == 0:
            works = schedules._batch_p2p([dist.P2POp(dist.isend, torch.ones(7), 1)])
        else:
            works = schedules._batch_p2p([dist.P2POp(dist.irecv, torch.empty(7), 0)])
        schedules._wait_batch_p2p(works)
    dist.all_reduce(torch.ones(100))  # outside tracking
    results[(rank, "mixed")] = ledger.take()
    results[(rank, "empty")] = ledger.take()

    # tp and the experts' edp on the same two ranks (tp=2 with replicated experts): one group
    tp = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    edp = init_device_mesh("cpu", (world,), mesh_dim_names=("edp",))
    shared = CommLedger([tp, edp])
    with shared.tracking():
        dist.all_reduce(torch.ones(3), group=edp.get_group())  # c10d, as FSDP reduces
        distribute_tensor(torch.ones(4, 4), tp, [Shard(0)]).full_tensor()  # DTensor, as TP
    results[(rank, "shared")] = shared.take()


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    return run_on_gloo(_run, 2, tmp_path_factory.mktemp("ledger"))


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp_counts_the_shard_gathered_and_the_gradient_scattered(counted, rank):
    # forward all-gather of this rank's half (32 floats), reduce-scatter of the full gradient
    assert counted[(rank, "fsdp")] == {"dp": (32 + 64) * FLOAT}


@pytest.mark.parametrize("rank", [0, 1])
def test_ddp_counts_its_bucket_all_reduce(counted, rank):
    assert counted[(rank, "ddp")] == {"dp": 64 * FLOAT}


@pytest.mark.parametrize("rank", [0, 1])
def test_labels_win_over_groups_and_nothing_outside_tracking(counted, rank):
    assert counted[(rank, "mixed")] == {
        # the DTensor gather: this rank's 2 x 4 shard, named by its group; and on rank 0 the
        # pipeline send of 7 floats (not counted before: torch sends a lone batch op by op)
        "dp": 8 * FLOAT + (7 * FLOAT if rank == 0 else 0),
        "ep": 2 * 12 * FLOAT,  # all-to-all of 6 x 2 rows, forward and backward
        "cp": 5 * FLOAT,  # what this rank sent
    }
    assert counted[(rank, "empty")] == {}


@pytest.mark.parametrize("rank", [0, 1])
def test_a_shared_group_names_c10d_calls_dp_and_dtensor_calls_tp(counted, rank):
    assert counted[(rank, "shared")] == {"dp": 3 * FLOAT, "tp": 8 * FLOAT}


def test_counting_imports_no_pipelining_into_runs_without_a_pipeline():
    """Counting pipeline sends imported torch's pipelining into every run's first step."""
    import subprocess
    import sys

    code = ("import sys; from orch.parallel.comm_stats import CommLedger\n"
            "with CommLedger([]).tracking(): pass\n"
            "assert 'torch.distributed.pipelining' not in sys.modules, 'imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
