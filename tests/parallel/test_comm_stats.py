"""The communication ledger counts what each collective path hands to torch.distributed.

Two gloo ranks, one module with a ``dp_shard`` mesh (the world group): FSDP2's all-gather and
reduce-scatter, DDP's bucket all-reduce (through the hook the ledger attaches), a DTensor
redistribution (functional collectives), orch's labelled all-to-all, ring send/recv, a pipeline
runtime's batch of sends, and a collective outside ``tracking`` (not counted); then a tp and an
edp mesh on the same ranks (one process group), where c10d calls count as dp and functional ones
as tp; the experts' flattened gradient-norm group (dp); then the offloaded replicas' reduce and
broadcasts, from the training thread and from a helper thread between two steps. Expected bytes
are worked out by hand.
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

from orch.offload.partition import Partition
from orch.offload.threads import helper_thread
from orch.parallel.comm import all_to_all
from orch.parallel.comm_stats import CommLedger, dimension
from orch.parallel.expert_parallel import build_expert_mesh
from orch.plan.degrees import Degrees

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

    # the experts' mesh, its three data dimensions flattened for the gradient norm: dp
    experts = build_expert_mesh(Degrees(dp_shard=world, ep=world), "cpu")
    ledger_experts = CommLedger([experts])
    with ledger_experts.tracking():
        dist.all_reduce(torch.ones(2), group=experts["edp_ep_etp"].get_group())
    results[(rank, "experts_norm")] = ledger_experts.take()

    _offload_replicas(rank, mesh, ledger, results)


def _offload_replicas(rank: int, mesh, ledger: CommLedger, results) -> None:
    """The collectives offloaded replicas use: reduce, broadcast (not counted before), the
    partition's broadcasts on a group no mesh has, and a helper thread's between two steps."""
    with ledger.tracking():
        dist.reduce(torch.ones(10), dst=0, group=mesh.get_group())  # every rank puts in
        dist.broadcast(torch.ones(6) if rank == 1 else torch.empty(6), src=1)  # the source
        dist.broadcast(torch.ones(4) if rank == 0 else torch.empty(4), group_src=0,
                       group=mesh.get_group())
    results[(rank, "reduce_broadcast")] = ledger.take()

    # owners: unit 1 (5 floats) on rank 0, unit 0 (3 floats) on rank 1; the replicas' group
    # and the partition's own are not the mesh's: named dp by the partition, not "other"
    units = [[nn.Parameter(torch.ones(3))], [nn.Parameter(torch.ones(5))]]
    partition = Partition(units, dist.new_group([0, 1], backend="gloo"))
    with ledger.tracking():
        partition.share(0)
        partition.share(1)
    results[(rank, "partition")] = ledger.take()

    # the CPU optimizer's thread shares a stepped unit between two steps' windows: counted
    # while installed, in the step that says so; the training thread's own collective there
    # is not counted
    with ledger.installed():
        with ledger.tracking():
            pass
        helper = helper_thread("orch-cpu-optimizer", partition.share, 1)
        helper.start()
        helper.join()
        with ledger.helpers_left_out():  # an evaluation's broadcasts: in no step
            helper = helper_thread("orch-shared-params", partition.share, 0)
            helper.start()
            helper.join()
        dist.all_reduce(torch.ones(100))  # the training thread, outside a step
        with ledger.tracking():
            results[(rank, "before_count")] = ledger.take()
            ledger.count_helpers()
    results[(rank, "between_steps")] = ledger.take()


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


@pytest.mark.parametrize("rank", [0, 1])
def test_the_experts_gradient_norm_group_counts_as_dp(counted, rank):
    """It was logged under its mesh's flattened name, ``edp_ep_etp``, which the README's list of
    dimensions does not have."""
    assert counted[(rank, "experts_norm")] == {"dp": 2 * FLOAT}


def test_counting_imports_no_pipelining_into_runs_without_a_pipeline():
    """Counting pipeline sends imported torch's pipelining into every run's first step."""
    import subprocess
    import sys

    code = ("import sys; from orch.parallel.comm_stats import CommLedger\n"
            "with CommLedger([]).tracking(): pass\n"
            "assert 'torch.distributed.pipelining' not in sys.modules, 'imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_a_reduce_counts_on_every_rank_and_a_broadcast_on_its_source(counted, rank):
    """Offloaded replicas sum gradients with ``dist.reduce`` and send parameters with
    ``dist.broadcast``: neither was counted, and comm_bytes said only the norms' all-reduce."""
    sent = 4 if rank == 0 else 6  # group_src=0 of the mesh's group; src=1 of the world
    assert counted[(rank, "reduce_broadcast")] == {"dp": (10 + sent) * FLOAT}


@pytest.mark.parametrize("rank", [0, 1])
def test_the_partitions_broadcasts_count_as_dp_on_its_own_group(counted, rank):
    assert counted[(rank, "partition")] == {"dp": (5 if rank == 0 else 3) * FLOAT}


@pytest.mark.parametrize("rank", [0, 1])
def test_a_helper_threads_broadcast_between_steps_counts_the_training_threads_does_not(
        counted, rank):
    """The owners share a stepped unit from the CPU optimizer's thread beside the next forward,
    often before that step's window opens: counted in the step that counts the helpers' bytes
    (the trainer: once the update is done), not lost, and not in a step before; those of an
    evaluation (``helpers_left_out``: unit 0, rank 1's) in none."""
    assert counted[(rank, "before_count")] == {}
    assert counted[(rank, "between_steps")] == ({"dp": 5 * FLOAT} if rank == 0 else {})
