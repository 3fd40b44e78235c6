"""Measure each network of a cluster description between its nodes, and write the figures in.

``orch cluster probe CLUSTER --master-addr A --master-port P`` runs once on every node at the same
time, as a launch does (one process per node; the first node listed holds the rendezvous store,
so ``A`` is its address). Each process is the node of the description it runs on (``--node-name``,
``ORCH_NODE`` or the host name, as for ``orch launch``); its rank is the node's place in the list.
A node waits ``--timeout`` seconds for the others to join, then stops with the nodes missing;
the gloo group itself gets at least ``GLOO_TIMEOUT_S`` (its connection and every collective on
it, such as the gather that waits for the slowest network's timings, take that long at most).
For every network with two or more nodes, a gloo group of those nodes is made on that network's
interfaces (``GLOO_SOCKET_IFNAME`` at creation, as ``orch.parallel.interfaces`` does for
training), and two things are timed over it:

- point to point: every node sends a buffer to the next node of the group and receives one from
  the previous, all at once (each link carries one stream each way), ``repeats`` times; a node's
  figure is the slower of its send and its receive;
- all-reduce of the same buffer, reported as bus bandwidth (``2 (n - 1) / n`` of the buffer per
  rank, NCCL-tests' convention).

The first node then writes each node's point-to-point figure into the description as
``measured_gbps`` on that node's NICs of that network (split evenly between them, so they add up
to the node's figure), which the planner prefers to the nominal ``bandwidth_gbps``. The file is
rewritten through PyYAML (comments and anchors go; ``count:`` entries are written out node by
node, since each node gets its own figures) only once the new text loads, and atomically.
Sysfs cannot say what a link carries (veth always reports 10 Gb/s; a rate limit, a congested
switch or a misconfigured port does not show there): this is how measured speeds get in.
"""

from __future__ import annotations

import copy
import datetime
import socket
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from orch.errors import Problem, ProblemsError
from orch.parallel.interfaces import gloo_interface
from orch.plan.cluster import ClusterSpec, NodeSpec
from orch.plan.topology import Topology

DEFAULT_BYTES = 16 * 2**20
_JOINED = "orch-probe/joined/"
"""Store key prefix; each node sets ``<prefix><rank>`` once it is in."""
_POLL_S = 0.2
GLOO_TIMEOUT_S = 300.0
"""The least timeout of the probe's gloo group. ``--timeout`` says how long a node waits for the
others to join; as the group's timeout it also bounded every transfer timed on it, so
``--timeout 10 --mbytes 2048`` on a slow network ended mid-transfer with a traceback (a node
outside a network waits in the final gather while the others time it)."""


@dataclass(frozen=True)
class NetworkFigures:
    """What one network measured: per node (by name) its point-to-point Gb/s, and the group's
    all-reduce bus bandwidth in Gb/s."""

    network: str
    p2p_gbps: dict[str, float]
    allreduce_gbps: float


def members(cluster: ClusterSpec) -> dict[str, list[int]]:
    """Each network with two or more nodes: the nodes (indices, listed order) attached to it."""
    out: dict[str, list[int]] = {}
    for index, node in enumerate(cluster.nodes):
        for network in sorted({nic.network for nic in node.nics}):
            out.setdefault(network, []).append(index)
    return {net: nodes for net, nodes in sorted(out.items()) if len(nodes) > 1}


def probe_problems(cluster: ClusterSpec, path: str) -> list[Problem]:
    """The probe measures the networks of the NICs listed, between two nodes or more, and
    gathers the figures over one network all nodes share: a single node, or a node with no NIC
    (which ``orch cluster detect`` leaves so when it cannot tell a link's speed), would measure
    nothing it can write down (NIC-less nodes all meet on the default network, which has no NIC
    to hold a figure), and nodes on separate networks cannot gather; and it measures each
    network with gloo, over each member's socket interface there."""
    if len(cluster.nodes) < 2:
        return [Problem(path, f"one node ({cluster.nodes[0].name}): the probe measures networks "
                        "between two nodes or more, so it would measure nothing",
                        "list every node of the cluster (orch cluster detect --out FILE "
                        "--append on each), then run the probe on all of them")]
    link = Topology.from_cluster(cluster).network_link(range(len(cluster.nodes)))
    bare = [node.name for node in cluster.nodes if not node.nics]
    if not bare and link.kind != "unreachable":
        return [Problem(f"{path}: node {cluster.nodes[index].name}",
                        f"lists no 'interface' for its NIC(s) on network {network!r} (an HCA's "
                        "name is not a socket interface), and the probe's gloo group for that "
                        "network runs over one",
                        "set each such NIC's 'interface' to its IPoIB or RoCE netdev (ib0, ...: "
                        "ls /sys/class/infiniband/NAME/device/net), which orch cluster detect "
                        "writes where the HCA has one")
                for network, nodes in members(cluster).items() for index in nodes
                if not cluster.nodes[index].interface_on(network)]
    why = (f"node(s) {', '.join(bare)} list no NIC" if bare else
           "the nodes share no network")
    return [Problem(path, f"{why}: the probe measures over a network every node is attached to",
                    "list each node's NICs with the network they are on (orch cluster detect "
                    "leaves out an interface whose speed it cannot read: add it by hand with its "
                    "speed), with at least one network common to all nodes")]


def probe(cluster: ClusterSpec, node: NodeSpec, address: str, port: int, timeout_s: float,
          nbytes: int = DEFAULT_BYTES, repeats: int = 3) -> list[NetworkFigures] | None:
    """Run this node's part of the probe; the first node gets every network's figures, the
    others None. A node that waits over ``timeout_s`` for the others raises an OrchError; gloo's
    connection and collectives get ``max(timeout_s, GLOO_TIMEOUT_S)``."""
    rank = [n.name for n in cluster.nodes].index(node.name)
    world = len(cluster.nodes)
    shared = Topology.from_cluster(cluster).network_link(range(world)).network
    with gloo_interface(node.interface_on(shared)):  # the default group's; restored after
        store = _join(cluster, rank, address, port, timeout_s)
        gloo_s = max(timeout_s, GLOO_TIMEOUT_S)
        try:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=gloo_s))
        except dist.DistError as exc:
            raise _not_started(
                f"node {node.name}", f"every node joined, but gloo could not connect them over "
                f"interface {node.interface_on(shared)!r} within {gloo_s:g} s "
                f"({str(exc).splitlines()[0]})",
                f"check that each node's 'interface' on network {shared!r} in "
                f"{cluster.source or cluster.name} "
                "has an address the other nodes reach (not lo, on more than one machine)"
            ) from None
        try:
            groups = _network_groups(cluster, node, rank)
            mine = {net: _measure(nodes, group, rank, nbytes, repeats)
                    for net, (nodes, group) in groups.items() if rank in nodes}
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
        finally:
            dist.destroy_process_group()
    if rank != 0:
        return None
    return [NetworkFigures(net, {cluster.nodes[r].name: gathered[r][net][0] for r in nodes},
                           gathered[nodes[0]][net][1])
            for net, (nodes, _) in groups.items()]


def _network_groups(cluster: ClusterSpec, node: NodeSpec,
                    rank: int) -> dict[str, tuple[list[int], dist.ProcessGroup]]:
    """Each network's nodes and gloo group, made by every rank (as ``new_group`` requires), a
    member on its interface on that network."""
    groups = {}
    for network, nodes in members(cluster).items():
        with gloo_interface(node.interface_on(network)) if rank in nodes else nullcontext():
            groups[network] = (nodes, dist.new_group(nodes, backend="gloo"))
    return groups


def _join(cluster: ClusterSpec, rank: int, address: str, port: int,
          timeout_s: float) -> dist.TCPStore:
    """The rendezvous store at ``address:port`` (held by rank 0), once every node is in it.

    torch's own wait (a ``TCPStore`` that waits for its workers) ended, after 5 minutes, in a
    ``DistStoreError`` traceback that named no node; this one polls the nodes' keys, so the
    error says which did not come. A client first waits for the port with a plain socket:
    ``TCPStore``'s client logs a C++ stack for every connection it retries."""
    deadline = time.monotonic() + timeout_s
    if rank and not _port_answers(address, port, deadline):
        raise _not_joined(cluster, address, port, timeout_s,
                          f"node {cluster.nodes[rank].name} could not reach the probe's store "
                          f"at {address}:{port}, which node {cluster.nodes[0].name} (the first "
                          f"listed) holds, within {timeout_s:g} s")
    try:
        store = dist.TCPStore(address, port, len(cluster.nodes), rank == 0,
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        store.set(f"{_JOINED}{rank}", cluster.nodes[rank].name)
    except dist.DistError as exc:
        raise _no_store(cluster, rank, address, port, timeout_s, exc) from None
    _wait_for_all(store, cluster, address, port, timeout_s, deadline)
    return store


def _no_store(cluster: ClusterSpec, rank: int, address: str, port: int, timeout_s: float,
              exc: dist.DistError) -> ProblemsError:
    """The error of a node that could not hold (the first) or enter (the others) the store: a
    taken ``--master-port`` (a probe still running, another job) was a ``DistNetworkError
    ... EADDRINUSE`` traceback on the first node."""
    why = str(exc).splitlines()[0]
    if rank == 0:
        return _not_started("--master-port", f"node {cluster.nodes[0].name} could not hold the "
                            f"probe's store on port {port} ({why}): the port is in use on this "
                            "machine (a probe still running, another job)",
                            "pass another --master-port, the same on every node")
    return _not_joined(cluster, address, port, timeout_s,
                       f"node {cluster.nodes[rank].name} reached {address}:{port} but could not "
                       f"join the probe's store there ({why})")


def _wait_for_all(store: dist.TCPStore, cluster: ClusterSpec, address: str, port: int,
                  timeout_s: float, deadline: float) -> None:
    """Return once every node's key is in ``store``; raise, naming those missing, at
    ``deadline`` (monotonic) or when the store goes away."""
    world = len(cluster.nodes)
    joined: list[int] = []
    while True:
        try:
            joined = [r for r in range(world) if store.check([f"{_JOINED}{r}"])]
        except dist.DistError:  # rank 0 gave up waiting, or failed, and its store went with it
            raise _not_joined(cluster, address, port, timeout_s,
                              f"the probe's store at {address}:{port} stopped answering with "
                              f"{len(joined)} of {world} nodes joined (node "
                              f"{cluster.nodes[0].name}, which holds it, gave up or failed: "
                              "see its output)") from None
        if len(joined) == world:
            return
        if time.monotonic() >= deadline:
            missing = [cluster.nodes[r].name for r in range(world) if r not in joined]
            raise _not_joined(cluster, address, port, timeout_s,
                              f"{len(joined)} of {world} nodes joined the probe at "
                              f"{address}:{port} within {timeout_s:g} s (not joined: "
                              f"{', '.join(missing)})")
        time.sleep(_POLL_S)


def _port_answers(address: str, port: int, deadline: float) -> bool:
    """Whether ``address:port`` accepts a connection before ``deadline`` (monotonic)."""
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


def _not_joined(cluster: ClusterSpec, address: str, port: int, timeout_s: float,
                message: str) -> ProblemsError:
    """The error of a probe whose nodes did not all come: start it everywhere, at one address."""
    return _not_started(
        "--master-addr/--master-port", message,
        f"start orch cluster probe on every node of {cluster.source or cluster.name} within "
        f"--timeout ({timeout_s:g} s) of each other, each with --master-addr the address of "
        f"node {cluster.nodes[0].name} (the first listed; {address} here) and the same "
        f"--master-port ({port})")


def _not_started(where: str, message: str, fix: str) -> ProblemsError:
    """A user error (printed without a traceback) for a probe that could not get going."""
    return ProblemsError([Problem(where, message, fix)], title="the probe did not run")


def _measure(nodes: list[int], group: dist.ProcessGroup, rank: int, nbytes: int,
             repeats: int) -> tuple[float, float]:
    """This rank's point-to-point Gb/s on ``group`` and the group's all-reduce bus Gb/s."""
    at = nodes.index(rank)
    after, before = nodes[(at + 1) % len(nodes)], nodes[at - 1]
    out = torch.ones(nbytes // 4)
    into = torch.empty_like(out)
    p2p, reduce = [], []
    for _ in range(repeats + 1):  # the first round makes the connections: not counted
        dist.barrier(group)
        start = time.perf_counter()
        ops = [dist.P2POp(dist.isend, out, after, group), dist.P2POp(dist.irecv, into, before,
                                                                       group)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        p2p.append(time.perf_counter() - start)
        dist.barrier(group)
        start = time.perf_counter()
        dist.all_reduce(out, group=group)
        reduce.append(time.perf_counter() - start)
        out.fill_(1.0)
    n = len(nodes)
    p2p_s, reduce_s = statistics.median(p2p[1:]), statistics.median(reduce[1:])
    return nbytes * 8 / p2p_s / 1e9, 2 * (n - 1) / n * nbytes * 8 / reduce_s / 1e9


def with_measurements(data: dict[str, Any], figures: list[NetworkFigures]) -> dict[str, Any]:
    """The description ``data`` (as read from YAML) with ``measured_gbps`` on every measured NIC
    and ``count:`` entries written out node by node; ``data`` itself is left as it was."""
    nodes = []
    for entry in copy.deepcopy(data.get("nodes") or []):
        count = entry.pop("count", None)
        names = ([entry["name"].replace("{i}", str(i)) for i in range(count)] if count
                 else [entry["name"]])
        nodes += [copy.deepcopy(entry) | {"name": name} for name in names]
    for node in nodes:
        for figure in figures:
            nics = [nic for nic in node.get("nics") or [] if nic.get("network", "") ==
                    figure.network]
            for nic in nics if node["name"] in figure.p2p_gbps else []:
                nic["measured_gbps"] = round(figure.p2p_gbps[node["name"]] / len(nics), 4)
    return copy.deepcopy(data) | {"nodes": nodes}


def report(figures: list[NetworkFigures], nbytes: int) -> str:
    """The figures as a table for the terminal."""
    lines = [f"probe of {nbytes / 2**20:.0f} MiB buffers, {datetime.date.today()}:",
             f"  {'network':<12}{'node':<16}{'point to point':>16}{'all-reduce (bus)':>18}"]
    for figure in figures:
        for index, (name, gbps) in enumerate(figure.p2p_gbps.items()):
            bus = f"{figure.allreduce_gbps:.3f} Gb/s" if index == 0 else ""
            lines.append(f"  {figure.network if index == 0 else '':<12}{name:<16}"
                         f"{gbps:>11.3f} Gb/s{bus:>18}".rstrip())
    return "\n".join(lines)


def write_measurements(source: Path, figures: list[NetworkFigures], target: Path) -> None:
    """The description at ``source`` with ``figures`` in, written to ``target`` (checked to
    load, then atomically); never without figures, which would only drop comments and expand
    ``count:`` entries."""
    from orch.cluster.write import read_cluster_data, replace_checked

    if not figures:  # probe_problems refuses what would measure nothing; rewriting drops comments
        raise ValueError(f"no figures to write into {target}: nothing was measured")
    replace_checked(target, with_measurements(read_cluster_data(source), figures))


__all__ = ["DEFAULT_BYTES", "NetworkFigures", "members", "probe", "report", "with_measurements",
           "write_measurements"]
