"""A worker's rank and network interfaces on a cluster that mixes networks.

``orch launch`` tells each worker its node (``ORCH_NODE``, see ``orch.launch.nodes``). Two things
follow here, before and while the process groups are made:

- :func:`place_rank`: the worker's global rank is the plan's (its node's first rank in the plan's
  node order plus its local rank), not the order in which the nodes joined the rendezvous, so
  data-parallel groups land on the nodes the plan chose for them.
- :func:`pin_gloo_groups`: gloo binds each process group to one network interface, read from
  ``GLOO_SOCKET_IFNAME`` when the group is made. Holmes' point is that each communicator should
  use its own network: a data-parallel group of InfiniBand nodes their fast fabric, a pipeline
  group that joins an InfiniBand and an Ethernet node the network they share. So while the
  groups are made, each new gloo group of ranks on several nodes is made with
  ``GLOO_SOCKET_IFNAME`` set to this node's interfaces on the network the plan's topology picks
  for exactly those ranks (``Topology.link``): all of them, as the plan prices them (gloo makes
  one device per listed interface and dispatches the group's collectives round-robin over
  them). The hook wraps torch's ``_new_process_group_helper`` (the one function every group,
  DeviceMesh's included, is made by, and the only place a group's ranks and its gloo devices
  meet); a test checks its signature.

NCCL chooses NICs per process (``NCCL_IB_HCA``), not per communicator; on NCCL only the rank
placement and the per-node environment apply.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from orch.errors import PlanError, Problem
from orch.plan.cluster import ClusterSpec, load_cluster
from orch.plan.plan import Plan
from orch.plan.topology import Topology


@contextmanager
def cluster_placement(cluster: str, plan: Plan, node: str | None, backend: str
                      ) -> Iterator[None]:
    """Around making the process groups and training: this worker's rank placed on ``node``
    of the description ``cluster`` (the launcher's ``ORCH_NODE``) once every worker agrees on
    the placement, and on gloo its groups pinned to their networks' interfaces; nothing without
    a node or a placement."""
    if not node or not plan.placement:
        yield
        return
    description = load_cluster(cluster)
    agree_on_placement(plan, node, description, int(os.environ.get("WORLD_SIZE", "1")))
    place_rank(plan, node)
    if backend != "gloo":
        yield
        return
    with pin_gloo_groups(interface_chooser(description, plan, node)):
        yield


def agree_on_placement(plan: Plan, node: str, cluster: ClusterSpec, world: int,
                       timeout: timedelta = timedelta(minutes=5)) -> None:
    """Before any process group: every worker publishes, through torchrun's store, its node,
    the plan rank it takes there and a digest of its cluster description, and all check them.
    Nodes holding differently ordered (or otherwise different) descriptions each took ranks of
    their own reading: two took rank 0, and the process group waited in silence for a rank
    nobody had. Only under torchrun's agent store (which every worker reaches before any group
    exists); a problem raised on every worker names the nodes."""
    if world == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"orch/placement/attempt-{attempt}", dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
        timeout=timeout))
    digest = hashlib.sha256(repr(cluster.nodes).encode()).hexdigest()[:12]
    claim = {"node": node, "rank": planned_rank(plan, node), "digest": digest}
    store.set(f"claim/{os.environ['RANK']}", json.dumps(claim))
    keys = [f"claim/{rank}" for rank in range(world)]
    store.wait(keys, timeout)
    problems = placement_problems([json.loads(store.get(key)) for key in keys], cluster.source)
    if problems:
        raise PlanError(problems, title="cannot run")


def placement_problems(claims: list[dict[str, Any]], source: str) -> list[Problem]:
    """What the workers' claims (node, plan rank, description digest) disagree on."""
    digests: dict[str, list[str]] = {}
    for claim in claims:
        nodes = digests.setdefault(claim["digest"], [])
        if claim["node"] not in nodes:
            nodes.append(claim["node"])
    if len(digests) > 1:
        readings = "; ".join(f"{', '.join(nodes)}: {digest}" for digest, nodes in digests.items())
        return [Problem("cluster", f"the nodes hold different descriptions ({readings}), so "
                        "each placed the ranks its own way", f"give every node the same file "
                        f"{source} (the same nodes in the same order)")]
    taken: dict[int, list[str]] = {}
    for claim in claims:
        taken.setdefault(claim["rank"], []).append(claim["node"])
    twice = {rank: nodes for rank, nodes in taken.items() if len(nodes) > 1}
    return [Problem("cluster", f"rank {rank} is taken on nodes {', '.join(nodes)}",
                    "give each node its own --node-name (or ORCH_NODE)")
            for rank, nodes in sorted(twice.items())]


def place_rank(plan: Plan, node: str) -> int:
    """Set ``RANK`` to the plan's rank of this worker on ``node`` (before the default process
    group is made) and return it."""
    rank = planned_rank(plan, node)
    os.environ["RANK"] = str(rank)
    return rank


def planned_rank(plan: Plan, node: str | None) -> int:
    """This worker's rank in ``plan``: on ``node`` of a cluster description, its place there
    (the plan orders nodes by their networks, not by torchrun's node ranks), else torchrun's."""
    if not node or not plan.placement:
        return int(os.environ.get("RANK", "0"))
    return plan.place_of(node).first_rank + int(os.environ["LOCAL_RANK"])


def interface_chooser(cluster: ClusterSpec, plan: Plan, node: str
                      ) -> Callable[[list[int]], str | None]:
    """For a group of global ranks: this node's interfaces on the network the group runs over
    (``GLOO_SOCKET_IFNAME``'s comma-separated list: every one there, as the planner prices
    them, but no more on any node than the group's node with the fewest has, as gloo needs),
    "" where no interface is known there (an HCA listed without its IPoIB netdev: gloo's one
    default device, which the other nodes count it as; leaving the launcher's world list in
    place gave it as many devices as that list, and the group's first collective timed out),
    or None when the group stays on one node (any interface reaches the node itself)."""
    names = [n.name for n in cluster.nodes]
    order = [names.index(p.name) for p in plan.placement]
    topology = Topology.from_cluster(cluster, order)
    mine = cluster.nodes[names.index(node)]

    def choose(ranks: list[int]) -> str | None:
        group = sorted(ranks)
        link = topology.link(group)
        if link.kind != "inter":
            return None
        spanned = [cluster.nodes[order[index]] for index in topology.nodes_of(group)]
        return ",".join(mine.gloo_interfaces(link.network, spanned))

    return choose


@contextmanager
def gloo_interface(interface: str) -> Iterator[None]:
    """Within the block, ``GLOO_SOCKET_IFNAME`` is ``interface``; after it, what it was (unset
    where it was unset). gloo reads it when a group is made, so a value left behind would pick
    the interface of every later group of the process (and of the tests after it)."""
    before = os.environ.get("GLOO_SOCKET_IFNAME")
    os.environ["GLOO_SOCKET_IFNAME"] = interface
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GLOO_SOCKET_IFNAME", None)
        else:
            os.environ["GLOO_SOCKET_IFNAME"] = before


@contextmanager
def pin_gloo_groups(choose: Callable[[list[int]], str | None]) -> Iterator[None]:
    """Within the block, make each gloo group with ``GLOO_SOCKET_IFNAME`` set by ``choose``."""
    original = c10d._new_process_group_helper

    def helper(group_size: int, group_rank: int, global_ranks_in_group: list[int],
               backend: Any, *args: Any, **kwargs: Any) -> Any:
        interface = choose(global_ranks_in_group) if global_ranks_in_group else None
        if interface is None or str(backend) != "gloo":
            return original(group_size, group_rank, global_ranks_in_group, backend, *args,
                            **kwargs)
        with gloo_interface(interface):
            return original(group_size, group_rank, global_ranks_in_group, backend, *args,
                            **kwargs)

    c10d._new_process_group_helper = helper
    try:
        yield
    finally:
        c10d._new_process_group_helper = original


__all__ = ["agree_on_placement", "cluster_placement", "gloo_interface", "interface_chooser",
           "pin_gloo_groups", "place_rank", "placement_problems", "planned_rank"]
