"""The machine a plan is for: world size, devices per node, device type and network links.

It comes from a cluster description when the config names one (the description says how many
devices each node has and which NICs connect them), otherwise from the command line
(``--world-size``, ``--gpus-per-node``, ``--device``). Problems are collected, not raised one at
a time, so ``orch plan`` can report them with the config's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from math import gcd

from orch.config.schema import WORLD_DEGREES, Config
from orch.errors import OrchError, Problem, ProblemsError
from orch.plan.cluster import MAX_WORLD_SIZE, ClusterSpec, load_cluster
from orch.plan.degrees import Degrees
from orch.plan.devices import DeviceSpec, UnknownDeviceError, get_device
from orch.plan.layout import dim_groups, group_shapes, span
from orch.plan.placement import NodePlace, candidate_orders, placement_of
from orch.plan.topology import Link, Topology

DEFAULT_DEVICE = "h100-sxm-80gb"
DEFAULT_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class Machine:
    world_size: int
    gpus_per_node: int
    """Devices per node (for a cluster with uneven nodes: the gcd of their device counts)."""
    device: DeviceSpec
    topology: Topology
    cluster: ClusterSpec | None = None
    order: tuple[int, ...] = ()
    """The cluster's nodes in rank order (indices into ``cluster.nodes``; empty: as listed)."""
    only_listed: bool = False
    """``parallel.node_order: listed``: no other order is tried (a NIC-oblivious plan)."""

    def links(self, deg: Degrees) -> dict[str, Link]:
        """The link of every group dimension of ``deg``: the slowest of its groups.

        A dimension's groups follow from its shape (:func:`group_shapes`), so each shape is
        looked at once per machine, whatever degrees it comes from (the search asks this of
        thousands of degrees that share most of their groups). On alike nodes one group tells
        for a dimension whose groups tile the nodes (:func:`tiles`); otherwise (a group may
        straddle a node boundary the first does not, or nodes differ) every group is looked at.
        """
        links = {}
        for dim, shape in group_shapes(deg).items():
            if shape not in self._group_links:
                first = span(shape)
                self._group_links[shape] = (
                    self.topology.link(first)
                    if len(first) == 1 or (self.topology.homogeneous
                                           and tiles(first, self.gpus_per_node))
                    else self.topology.worst_link(dim_groups(deg, dim)))
            links[dim] = self._group_links[shape]
        return links

    @cached_property
    def _group_links(self) -> dict[tuple[tuple[int, int], ...], Link]:
        """:meth:`links`' link of each group shape seen on this machine (its node order's)."""
        return {}

    def placements(self) -> list[Machine]:
        """This machine under each node order worth pricing (``orch.plan.placement``); a
        machine without a cluster description has one."""
        if self.cluster is None or self.only_listed:
            return [self]
        return [replace(self, order=order, topology=Topology.from_cluster(self.cluster, order))
                for order in candidate_orders(self.cluster)]

    def places(self) -> tuple[NodePlace, ...]:
        """The nodes in rank order, with their fastest NIC type."""
        return self._places

    @cached_property
    def _places(self) -> tuple[NodePlace, ...]:
        """:meth:`places`, made once per machine: every plan priced on it asks (each node's
        NICs looked at again, at a hundred nodes and thousands of plans)."""
        if self.cluster is None:
            return ()
        return placement_of(self.cluster, self.order)

    @property
    def nodes(self) -> int:
        if self.cluster is not None:
            return len(self.cluster.nodes)
        return -(-self.world_size // self.gpus_per_node)


def tiles(group: list[int], per_node: int) -> bool:
    """Whether every group of a dimension crosses nodes as its first one, ``group``, does.

    A dimension's groups are translates of its first, an arithmetic progression of stride
    ``s`` and ``n`` ranks, each inside an aligned block of ``n * s`` ranks. When blocks and
    nodes align (one divides the other) each group spans the whole of its block's nodes, or
    one node; when ``s`` is at least a node each rank has a node of its own. Otherwise a group
    can straddle a boundary the first does not: 4 ranks of context parallelism on 6-device
    nodes put ranks 0-3 on one node and 4-7 on two.
    """
    if len(group) == 1:
        return True
    stride = group[1] - group[0]
    if group != list(range(group[0], group[-1] + 1, stride)):
        return False
    block = stride * len(group)
    return stride >= per_node or block % per_node == 0 or per_node % block == 0


def resolve_machine(
    cfg: Config,
    world_size: int | None,
    gpus_per_node: int | None,
    device: str | None,
    problems: list[Problem],
) -> Machine | None:
    """Build the Machine, appending Problems; None when there is nothing valid to plan for."""
    cluster = None
    if cfg.cluster:
        try:
            cluster = load_cluster(cfg.cluster)
        except ProblemsError as exc:
            problems.extend(  # each ``where`` starts with the file (and line)
                Problem(f"cluster {p.where}", p.message, p.fix, ("cluster",))
                for p in exc.problems
            )
            return None
        except OrchError as exc:
            problems.append(Problem("cluster", str(exc), "fix the cluster description"))
            return None
    spec = None
    if device is not None and not device.strip():  # fell back to the default silently
        problems.append(Problem("--device", "is empty", "name a device, e.g. h100, or leave "
                                "--device out for the default"))
        return None
    if device is not None or cluster is None:
        try:
            spec = get_device(device or DEFAULT_DEVICE)
        except UnknownDeviceError as exc:
            problems.append(Problem("--device", exc.message, exc.fix))
            return None

    if cluster is not None:
        topology = Topology.from_cluster(cluster)
        if world_size is not None and world_size != cluster.world_size:
            problems.append(
                Problem(
                    "--world-size",
                    f"{world_size} differs from the "
                    f"{cluster.world_size} devices of cluster {cfg.cluster}",
                    "leave --world-size out, or edit the cluster description",
                    ("cluster",),
                )
            )
        if gpus_per_node is not None:  # was ignored
            problems.append(Problem("--gpus-per-node", f"{gpus_per_node} is set, but cluster "
                                    f"{cfg.cluster} lists each node's devices",
                                    "leave --gpus-per-node out, or edit the cluster description",
                                    ("cluster",)))
        if spec is not None:  # mixed the device's compute with the nodes' links and memory
            problems.append(Problem("--device", f"{device} is set, but cluster {cfg.cluster} "
                                    "names each node's device (and its links follow them)",
                                    "leave --device out, or edit the cluster description's "
                                    "device (or its device_overrides)", ("cluster",)))
        node_gcd = 0
        for node in cluster.nodes:
            node_gcd = gcd(node_gcd, node.devices)
        return Machine(cluster.world_size, node_gcd, topology.slowest(cfg.train.precision),
                       topology, cluster, only_listed=cfg.parallel.node_order == "listed")

    assert spec is not None
    # what the world size was read from, without a cluster description (which would set it)
    world_reads = ("cluster", *(WORLD_DEGREES if world_size is None else ()))
    if world_size is None:
        world_size = _world_from_degrees(cfg)
    if world_size is None:
        problems.append(
            Problem(
                "--world-size",
                "not given, and parallel.dp_shard is -1 so the degrees do not fix it",
                "pass --world-size N (devices in all), or set cluster: in the config",
                world_reads,
            )
        )
        return None
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        problems.append(
            Problem(
                "--world-size",
                f"must be between 1 and {MAX_WORLD_SIZE:,}, got {world_size:,}",
                "pass the number of devices in the job",
                world_reads,
            )
        )
        return None
    if gpus_per_node is None:
        gpus_per_node = world_size if spec.name == "cpu" else min(DEFAULT_GPUS_PER_NODE, world_size)
    if gpus_per_node < 1 or world_size % gpus_per_node:
        message = (f"must be at least 1, got {gpus_per_node}" if gpus_per_node < 1 else
                   f"{gpus_per_node} does not divide the world size {world_size} into whole "
                   "nodes")
        problems.append(Problem("--gpus-per-node", message,
                                "pass a --gpus-per-node that divides --world-size", world_reads))
        return None
    return Machine(
        world_size, gpus_per_node, spec, Topology.uniform(world_size, gpus_per_node, spec)
    )


def _world_from_degrees(cfg: Config) -> int | None:
    p = cfg.parallel
    if p.dp_shard == -1:
        return None
    return p.pp * p.dp_replicate * p.dp_shard * p.cp * p.tp
