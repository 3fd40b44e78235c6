"""This node's place in a cluster description, and the communication settings that follow.

With ``cluster:`` in the config, ``orch launch`` runs once per node as usual; it finds which of
the description's nodes it is on (``--node NAME``, else ``ORCH_NODE``, else the host name), checks
what the description claims about it against what is there (node count, processes, network
interfaces), and sets, for the workers it starts:

- ``ORCH_NODE``: the workers place their ranks by it (the plan's node order, see
  ``orch.plan.placement``), whatever order the rendezvous joined the nodes in;
- for gloo, ``GLOO_SOCKET_IFNAME``: the interfaces on the fastest network every node shares (the
  world group's), comma-separated, as many on every node as the node with the fewest there has
  (gloo's rule); each smaller group is pinned to its own network's interfaces by
  ``orch.parallel.interfaces``;
- for NCCL, ``NCCL_SOCKET_IFNAME`` (bootstrap and socket transport: every interface on that
  shared network, exact names), ``NCCL_IB_HCA`` (this node's InfiniBand or RoCE HCAs on the
  network they give the most bandwidth, every one, exact names), ``NCCL_IB_GID_INDEX=3`` on
  RoCE (RoCE v2's usual GID), or ``NCCL_IB_DISABLE=1`` on a node with neither.

The planner prices a network at the sum of a node's NICs on it, so these list every NIC there.

A variable already set in the environment is kept (the user knows better) and shown as such.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from orch.errors import Problem
from orch.plan.cluster import ClusterSpec, NodeSpec
from orch.plan.plan import Plan
from orch.plan.topology import Topology

NODE_ENV = "ORCH_NODE"


@dataclass(frozen=True)
class NodeSettings:
    """This node of the cluster, its ranks under the plan, and the environment its workers
    get (``env``: the variables orch chose; ``kept``: those the user had set)."""

    node: NodeSpec
    first_rank: int
    env: dict[str, str]
    kept: dict[str, str]
    address: str | None = None
    """This node's IPv4 address on the network every node shares (its first interface there),
    for torchrun's ``--local-addr``; None where it has none."""

    def describe(self) -> str:
        last = self.first_rank + self.node.devices - 1
        chosen = " ".join(f"{k}={v}" for k, v in self.env.items())
        kept = " ".join(f"{k}={v} (yours)" for k, v in self.kept.items())
        return (f"orch launch: node {self.node.name}, ranks {self.first_rank}-{last}: "
                f"{' '.join(filter(None, (chosen, kept)))}")


def this_node(cluster: ClusterSpec, given: str | None, problems: list[Problem],
              after: str = "") -> NodeSpec | None:
    """The description's node this process runs on: ``given`` (``--node-name``),
    ``ORCH_NODE``, or the host name; a problem when none of them names a node of ``cluster``.
    ``after``: the positional argument ``--node-name`` must follow on the command line (launch's
    CONFIG: torchrun's options come before it), none where it may go anywhere."""
    names = [node.name for node in cluster.nodes]
    host = socket.gethostname()
    name = given or os.environ.get(NODE_ENV) or host
    for node in cluster.nodes:
        if node.name in (name, name.split(".")[0]):
            return node
    source = ("--node-name" if given else NODE_ENV if os.environ.get(NODE_ENV)
              else "this host's name")
    place = f" (after {after})" if after else ""
    problems.append(Problem("--node-name", f"{name!r} ({source}) is not a node of cluster "
                            f"{cluster.name} ({', '.join(names)})",
                            f"pass --node-name NAME{place} with this machine's node in the "
                            "description"))
    return None


INFINIBAND = Path("/sys/class/infiniband")
"""Where the kernel lists the RDMA devices (HCAs) by name: ``mlx5_0``, ..."""


def _listing(directory: Path) -> list[str]:
    try:
        return [entry.name for entry in directory.iterdir()]
    except OSError:
        return []


def check_node(cluster: ClusterSpec, node: NodeSpec | None, nnodes: int, nproc: int,
               problems: list[Problem], gpus: int = 0) -> None:
    """What launch finds against what the description says: the node count, and on this node
    (when found) its processes, its ``gpus`` (the visible ones; 0 on a CPU machine, where only
    a node described with ``device: cpu`` runs, its devices the processes), the network
    interfaces of its NICs and, where NCCL runs (a GPU machine), the RDMA devices its ib and
    roce NICs name (what ``NCCL_IB_HCA`` lists)."""
    where = f"cluster {cluster.source or cluster.name}"
    if nnodes != len(cluster.nodes):
        problems.append(Problem("--nnodes", f"{nnodes}, but {where} lists {len(cluster.nodes)} "
                                "nodes", f"pass --nnodes {len(cluster.nodes)}, or edit the "
                                "description"))
    if node is None:
        return
    if nproc != node.devices:
        problems.append(Problem("--nproc-per-node", f"{nproc}, but {where} gives node "
                                f"{node.name} {node.devices} devices",
                                f"pass --nproc-per-node {node.devices}, or leave it out"))
    if not gpus and node.device.name != "cpu":  # a broken driver's node joined on gloo
        problems.append(Problem(f"{where}: node {node.name}", f"{node.devices} "
                                f"{node.device.name} devices, but this machine shows no GPU "
                                "(it would train on its CPUs, planned as GPUs)",
                                "check the driver and CUDA_VISIBLE_DEVICES (orch doctor), or "
                                "describe the node with device: cpu to run the job on CPUs"))
    elif gpus and gpus < node.devices:
        problems.append(Problem(f"{where}: node {node.name}", f"{node.devices} devices, but "
                                f"this machine shows {gpus} GPUs", "correct 'devices:' in the "
                                "description, or check CUDA_VISIBLE_DEVICES"))
    present = {name for _, name in socket.if_nameindex()}
    hcas = set(_listing(INFINIBAND))
    for nic in node.nics:
        if nic.netdev and nic.netdev not in present:
            problems.append(Problem(
                f"{where}: node {node.name}, NIC {nic.name}",
                f"interface {nic.netdev!r} does not exist here (this machine has "
                f"{', '.join(sorted(present))})",
                "set the NIC's 'interface' to one of those, or run on the right machine"))
    if gpus and (missing := [nic.name for nic in node.nics  # NCCL_IB_HCA's names
                             if nic.type in ("ib", "roce") and nic.name not in hcas]):
        problems.append(Problem(
            f"{where}: node {node.name}",
            f"no RDMA device {', '.join(missing)} here ({INFINIBAND} lists "
            f"{', '.join(sorted(hcas)) or 'none'})",
            "name each ib or roce NIC after its HCA (what NCCL_IB_HCA takes; orch cluster detect "
            "writes it), or run on the right machine"))


def node_settings(cluster: ClusterSpec, plan: Plan, node: NodeSpec, backend: str) -> NodeSettings:
    """The environment ``node``'s workers get under ``plan`` (see the module docstring)."""
    first = plan.place_of(node.name).first_rank
    topology = Topology.from_cluster(cluster)
    shared = topology.network_link(range(len(cluster.nodes))).network
    env = {NODE_ENV: node.name}
    if backend == "gloo":  # the world group: every node lists as many
        env["GLOO_SOCKET_IFNAME"] = ",".join(node.gloo_interfaces(shared, cluster.nodes))
    else:
        socket_ifs = node.interfaces_on(shared)  # "=": these names exactly, not as prefixes
        env["NCCL_SOCKET_IFNAME"] = "=" + ",".join(socket_ifs) if socket_ifs else ""
        verbs = [nic for nic in node.nics if nic.type in ("ib", "roce")]
        if verbs:
            totals: dict[str, float] = {}  # per network, as the planner adds its NICs up
            for nic in verbs:
                totals[nic.network] = totals.get(nic.network, 0.0) + nic.bandwidth
            fastest = max(totals, key=lambda network: totals[network])
            env["NCCL_IB_HCA"] = "=" + ",".join(n.name for n in verbs if n.network == fastest)
            if any(n.type == "roce" for n in verbs):
                env["NCCL_IB_GID_INDEX"] = "3"
        else:
            env["NCCL_IB_DISABLE"] = "1"
    env = {k: v for k, v in env.items() if v}  # no NIC listed: leave the choice to the library
    kept = {k: os.environ[k] for k in env if k != NODE_ENV and k in os.environ}
    return NodeSettings(node, first, {k: v for k, v in env.items() if k not in kept}, kept,
                        _address_on(node, shared))


def _address_on(node: NodeSpec, network: str) -> str | None:
    """``node``'s IPv4 address on ``network`` (its first interface there with one), as this
    machine has it."""
    from orch.cluster.detect import ipv4_interface

    for interface in node.interfaces_on(network):
        if (found := ipv4_interface(interface)) is not None:
            return str(found.ip)
    return None


__all__ = ["NODE_ENV", "NodeSettings", "check_node", "node_settings", "this_node"]
