"""Offloaded data-parallel replicas: gradients averaged onto each unit's owner (as DDP averages
them), the owner's parameters sent back to every replica, the clip's norm over all owners; with
shared parameters (``offload.shard_params``) each unit kept by its owner only and sent per use,
and every micro-batch's gradients summed at once."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
from gloo_harness import run_on_gloo
from torch import nn

from orch.offload.grad_homes import GradientHomes
from orch.offload.param_shards import SharedParams
from orch.offload.partition import Partition, owners_by_size

pytestmark = pytest.mark.dist


def _run(rank: int, world: int, results) -> None:
    a, b, c = nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4)), nn.Parameter(
        torch.zeros(1))
    d = nn.Parameter(torch.zeros(5))
    units = [[a, b, c], [d]]
    homes = GradientHomes(units)
    partition = Partition(units, dist.group.WORLD)
    homes.group, homes.owners = dist.group.WORLD, partition.owners
    reached = {a, d} | ({b} if rank == 0 else set())  # c: no replica's micro-batches
    for p in (a, b, c, d):  # what this rank's backward left at home (stale where unreached)
        homes.of[p].fill_(float(rank + 1) if p in reached else 99.0)
    unreached = {a, b, c, d} - reached
    homes.reduce(1, unreached)  # a unit whose backward ended first starts first
    grads = homes.finish(unreached)
    out = {"owners": partition.owners}
    out |= {name: None if grads[p] is None else grads[p].clone()
            for name, p in zip("abcd", (a, b, c, d), strict=True)}
    for p in (a, b, c, d):
        p.grad = grads[p]
    out["norm"] = partition.global_norm([a, b, c, d])
    for p in (a, b, c, d):  # the replicas' parameters differ until each owner shares its own
        p.data.fill_(10.0 * (rank + 1))
    for index in range(len(units)):
        partition.share(index)
    out["params"] = [p.data.clone() for p in (a, b, c, d)]
    results[rank] = out


def test_gradients_reach_their_owner_and_the_replicas_end_equal(tmp_path):
    results = run_on_gloo(_run, 2, tmp_path)
    assert sorted(results) == [0, 1]
    owners = results[0]["owners"]
    assert owners == results[1]["owners"] == [0, 1]  # 44 and 20 bytes of parameters
    mean_a, mean_b, mean_d = torch.full((2, 3), 1.5), torch.full((4,), 0.5), torch.full((5,), 1.5)
    for rank, got in results.items():
        if rank == owners[0]:  # rank 1 adds nothing to b; nobody reached c
            torch.testing.assert_close(got["a"], mean_a)
            torch.testing.assert_close(got["b"], mean_b)
        else:
            assert got["a"] is None and got["b"] is None
        assert got["c"] is None
        if rank == owners[1]:
            torch.testing.assert_close(got["d"], mean_d)
        else:
            assert got["d"] is None
        want = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in (mean_a, mean_b, mean_d)]))
        assert torch.equal(got["norm"], want)  # as clip_grad_norm_ forms it from all of them
        for p, owner in zip(got["params"], [0, 0, 0, 1], strict=True):
            assert torch.equal(p, torch.full_like(p, 10.0 * (owner + 1)))


def _run_out_of_order(rank: int, world: int, results, free_summed: bool) -> None:
    units = [[nn.Parameter(torch.zeros(4))] for _ in range(4)]  # equal sizes: owners 0, 1, 0, 1
    homes = GradientHomes(units)
    homes.group, homes.owners = dist.group.WORLD, owners_by_size([16] * 4, world)
    homes.free_summed = free_summed
    out = {}
    for step in (1, 2):
        homes.start_step()
        for index, (p,) in enumerate(units):
            homes.take_in(index)  # as a backward does before adding
            homes.of[p].fill_(float((rank + step) * (index + 1)))
        # rank 1's micro-batch missed a parameter of unit 2 (an expert no token chose): that
        # unit is through only when the whole backward is, after the units before it
        for index in ([3, 2, 1, 0] if rank == 0 else [3, 1, 0, 2]):
            homes.reduce(index, set())
        grads = homes.finish(set())
        out[step] = {index: None if grads[p] is None else grads[p].clone()
                     for index, (p,) in enumerate(units)}
    out["resting"] = [homes.of[p].untyped_storage().nbytes() for (p,) in units]
    results[rank] = out


@pytest.mark.parametrize("free_summed", [False, True], ids=["kept", "freed"])
def test_gradients_sum_per_unit_whatever_order_the_replicas_finish_units_in(tmp_path,
                                                                            free_summed):
    """Replicas finish units in different orders when one's micro-batches miss a parameter that
    another's reach; the sums still pair each unit with itself (a collective started in a
    different order would sum unit 2 of one replica with unit 1 of the other). With shared
    parameters a replica frees its buffers of the units it does not own once summed, and the
    next step's backward grows them again."""
    results = run_on_gloo(_run_out_of_order, 2, tmp_path, free_summed)
    assert sorted(results) == [0, 1]
    owners = [0, 1, 0, 1]
    for step in (1, 2):
        for index, owner in enumerate(owners):
            want = torch.full((4,), (step + 0.5) * (index + 1))  # mean of rank + step over ranks
            torch.testing.assert_close(results[owner][step][index], want)
            assert results[1 - owner][step][index] is None
    for rank, got in results.items():  # 4 floats and one count per unit
        assert got["resting"] == [20 if owner == rank or not free_summed else 0
                                  for owner in owners]


def _run_micro_batches(rank: int, world: int, results) -> None:
    """The engine's part, by hand: per micro-batch each unit's backward copies into a fresh
    home or adds, then the unit's sum starts; with shared parameters a sent buffer is fresh
    again for the next micro-batch."""
    units = [[nn.Parameter(torch.zeros(4))] for _ in range(4)]  # owners 0, 1, 0, 1
    homes = GradientHomes(units)
    homes.group, homes.owners = dist.group.WORLD, owners_by_size([16] * 4, world)
    homes.free_summed = True
    reached = {0: lambda r, m: False,  # nobody
               1: lambda r, m: (r, m) == (0, 1),  # not its owner, one micro-batch of rank 0
               2: lambda r, m: True,
               3: lambda r, m: (r, m) != (0, 0)}
    fresh = {p for (p,) in units}
    homes.start_step()
    for micro in (0, 1):
        for index in (3, 2, 1, 0):
            (p,) = units[index]
            homes.take_in(index)
            if reached[index](rank, micro):
                value = float((rank + 1) * (micro + 1) * (index + 1))
                homes.of[p].fill_(value) if p in fresh else homes.of[p].add_(value)
                fresh.discard(p)
            homes.reduce(index, fresh)
            if not homes.owns(index):
                fresh.add(p)
        homes.end_micro_batch()
    grads = homes.finish(fresh)
    results[rank] = {"grads": [None if grads[p] is None else grads[p].clone() for (p,) in units],
                     "resting": [homes.of[p].untyped_storage().nbytes() for (p,) in units]}


def test_shared_replicas_sum_every_micro_batch_and_keep_only_their_own(tmp_path):
    """With shared parameters each micro-batch's gradients are summed onto the owners at once
    (the others keep no whole-model gradients over the accumulation): the owners end with the
    replicas' mean over all micro-batches, None where nobody reached a parameter."""
    results = run_on_gloo(_run_micro_batches, 2, tmp_path)
    assert sorted(results) == [0, 1]
    owners = [0, 1, 0, 1]
    want = [None, 2.0, 13.5, 16.0]  # sums over the reaching (rank, micro-batch) pairs, halved
    for rank, got in results.items():
        for index, owner in enumerate(owners):
            grad = got["grads"][index]
            if owner != rank or want[index] is None:
                assert grad is None, index
            else:
                torch.testing.assert_close(grad, torch.full((4,), want[index]))
        assert got["resting"] == [20 if owner == rank else 0 for owner in owners]


def _run_shared(rank: int, world: int, results) -> None:
    units = [[nn.Parameter(torch.full((3,), 10.0 * (index + 1) + rank))] for index in range(3)]
    partition = Partition(units, dist.group.WORLD)  # equal sizes: owners 0, 1, 0
    partition.params_sharded = True
    stepped: list[int] = []
    shared = SharedParams(units, partition, lambda n: torch.empty(n, dtype=torch.uint8),
                          stepped.append, lambda index: nullcontext([p.data for p in units[index]]))
    out = {"resting": [unit[0].untyped_storage().nbytes() for unit in units]}
    shared.start_pass()
    shared.ask(range(0, 2))
    out["asked"] = [shared.asked(index) for index in range(3)]
    out["taken"] = [shared.take(index)[0].clone() for index in range(3)]  # unit 2: asked now
    out["stepped"] = list(stepped)
    shared.start_pass()
    shared.ask(range(2, -1, -1))  # never taken: waited for and dropped by the next pass
    shared.start_pass()
    with shared.all_in_memory():
        out["gathered"] = [unit[0].data.clone() for unit in units]
    out["after"] = [unit[0].untyped_storage().nbytes() for unit in units]
    out["received"] = shared.bytes_received
    results[rank] = out


def test_shared_parameters_rest_on_their_owner_and_reach_the_others_per_use(tmp_path):
    """``offload.shard_params``: a replica keeps only the units it owns; each use of another
    gets the owner's values (the owner waits for its own update of the unit first), and a
    checkpoint's gather brings every unit in, the others dropped again after."""
    results = run_on_gloo(_run_shared, 2, tmp_path)
    assert sorted(results) == [0, 1]
    owners = [0, 1, 0]
    for rank, got in results.items():
        owned = [owner == rank for owner in owners]
        assert got["resting"] == got["after"] == [12 if mine else 0 for mine in owned]
        assert got["asked"] == [True, True, False]
        for index, owner in enumerate(owners):
            want = torch.full((3,), 10.0 * (index + 1) + owner)
            assert torch.equal(got["taken"][index], want)
            assert torch.equal(got["gathered"][index], want)
        assert got["stepped"] == [i for i, mine in enumerate(owned) if mine]
        assert got["received"] == 12 * owned.count(False)


def test_shared_parameters_need_offloaded_parameters():
    from orch.config import load_config
    from orch.plan.support import unsupported_features

    cfg = load_config("configs/tiny.yaml", ["offload.shard_params=true",
                                            "parallel.dp_replicate=2", "parallel.dp_shard=1"])
    assert [str(p) for p in unsupported_features(cfg, 2)] == [
        "offload.shard_params: true with offload.params=device: replicas share parameters that "
        "rest off the device\n    fix: set offload.params=cpu or nvme, or "
        "offload.shard_params=false"]


def test_units_go_to_the_least_loaded_replica_largest_first():
    assert owners_by_size([10, 50, 20, 30], 2) == [0, 0, 1, 1]  # 60 and 50 bytes
    assert owners_by_size([5, 5, 5], 3) == [0, 1, 2]


def test_one_process_keeps_its_own_gradients():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    homes = GradientHomes([[a], [b]])
    homes.of[a].fill_(2.0)
    grads = homes.finish({b})
    torch.testing.assert_close(grads[a], torch.full((3,), 2.0))
    assert grads[b] is None and grads[a].data_ptr() == homes.of[a].data_ptr()


def test_more_replicas_than_units_are_refused_before_start():
    from orch.config import load_config
    from orch.plan.support import unsupported_features

    cfg = load_config("configs/tiny.yaml", ["offload.params=cpu", "offload.grads=cpu",
                                            "offload.optimizer=cpu", "parallel.dp_replicate=8",
                                            "parallel.dp_shard=1"])
    assert [str(p) for p in unsupported_features(cfg, 8)] == [
        "offload: with 8 processes: each offloaded replica steps at least one of the model's 6 "
        "units (embedding, blocks, head)\n    fix: launch at most 6 processes"]
    six = load_config("configs/tiny.yaml", ["offload.params=cpu", "offload.grads=cpu",
                                            "offload.optimizer=cpu", "parallel.dp_replicate=6",
                                            "parallel.dp_shard=1"])
    assert unsupported_features(six, 6) == []


@pytest.mark.parametrize("config, sets, where, message", [
    # both crashed after the workers started: a KeyError on the sharded experts in the clip,
    # and a ValueError filling the tied weight a second time
    ("configs/tiny-moe.yaml", ["parallel.ep=2"], "offload",
     "with parallel.ep=2, etp=1: offloaded units are whole on every replica"),
    ("configs/tiny.yaml", ["model.tie_embeddings=true"], "model.tie_embeddings",
     "true with offload: the embedding and the head are offloaded as separate units"),
])
def test_what_offload_cannot_hold_is_refused_before_start(config, sets, where, message):
    from orch.config import load_config
    from orch.plan.support import unsupported_features

    cfg = load_config(config, ["offload.params=cpu", "offload.grads=cpu", "offload.optimizer=cpu",
                               "parallel.dp_replicate=2", "parallel.dp_shard=1", *sets])
    (problem,) = unsupported_features(cfg, 2)
    assert problem.where == where and problem.message.startswith(message) and problem.fix


@pytest.mark.parametrize("sets, settings", [
    (["parallel.pp=2"], "parallel.pp=2"),
    (["parallel.tp=2", "parallel.cp=2"], "parallel.tp=2 parallel.cp=2"),
])
def test_offload_with_model_parallelism_is_one_clear_refusal(sets, settings):
    """Offload with pp (or tp, cp) was refused by the replica rule alone, whose fix
    (dp_replicate = the world) the degrees then refused: round and round, pp never named."""
    from orch.config import load_config
    from orch.plan.support import unsupported_features

    cfg = load_config("configs/tiny.yaml", ["offload.params=cpu", "offload.grads=cpu",
                                            "offload.optimizer=cpu", *sets])
    (problem,) = unsupported_features(cfg, 4)
    assert problem.where == "offload" and problem.message.startswith(f"with {settings}:")
    assert problem.fix == f"set {settings.replace('=2', '=1')}, or offload nothing"
